// The C ABI that trainer/saver.py loads with ctypes, PyTorch's pluggable-allocator entry points,
// and the cudaMalloc/cudaFree interposer used when the library is in LD_PRELOAD.
//
// Every function that can fail returns a saver::Code and leaves the message in a thread-local
// string read by saver_last_error(); the allocator hooks, whose signatures cannot carry an error,
// return null / an error code and print the message once to stderr when it is not a plain
// out-of-memory (PyTorch retries those after emptying its cache).
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <sys/types.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core.h"

namespace {

// Every entry point leaves the outcome of its last call here: empty after a success. A plain
// array, not a std::string: PyTorch may free pool memory after this thread's thread_local
// destructors have run at exit, and a destroyed string must not be written then.
thread_local char t_error[4096];

int fail(const saver::Status& st) {
  const std::string& text = st.message;
  const size_t n = st.ok() ? 0 : std::min(text.size(), sizeof(t_error) - 1);
  std::memcpy(t_error, text.data(), n);
  t_error[n] = '\0';
  return st.code;
}

// Out-of-memory is PyTorch's to handle (it retries), and a driver already shut down at process
// exit has taken the memory with it; anything else is worth a line on stderr.
void complain(const saver::Status& st) {
  fail(st);
  if (st.code == saver::kOutOfMemory || st.cu == CUDA_ERROR_DEINITIALIZED) return;
  std::fprintf(stderr, "[fp8moe saver] %s\n", st.message.c_str());
}

void anchor() {}

std::vector<std::string> one_or_none(const char* name) {
  return name ? std::vector<std::string>{name} : std::vector<std::string>{};
}

using CudaMallocFn = cudaError_t (*)(void**, size_t);
using CudaFreeFn = cudaError_t (*)(void*);

// The runtime's own definition of `name`: the next one in the global scope, or, when the process
// loaded libcudart privately (RTLD_LOCAL), the one in whichever libcudart is mapped.
void* runtime_symbol(const char* name) {
  if (void* fn = dlsym(RTLD_NEXT, name)) return fn;
  FILE* maps = std::fopen("/proc/self/maps", "r");
  if (maps == nullptr) return nullptr;
  void* fn = nullptr;
  char line[4096];
  while (fn == nullptr && std::fgets(line, sizeof(line), maps)) {
    char* path = std::strchr(line, '/');
    if (path == nullptr || std::strstr(path, "libcudart.so") == nullptr) continue;
    path[std::strcspn(path, "\n")] = '\0';
    if (void* lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD)) fn = dlsym(lib, name);
  }
  std::fclose(maps);
  return fn;
}

template <typename Fn>
Fn cached_runtime_symbol(std::atomic<Fn>& slot, const char* name) {
  Fn fn = slot.load(std::memory_order_acquire);
  if (fn == nullptr) {
    fn = reinterpret_cast<Fn>(runtime_symbol(name));
    slot.store(fn, std::memory_order_release);
  }
  return fn;
}

std::atomic<CudaMallocFn> g_real_malloc{nullptr};
std::atomic<CudaFreeFn> g_real_free{nullptr};

CudaMallocFn real_malloc() { return cached_runtime_symbol(g_real_malloc, "cudaMalloc"); }

CudaFreeFn real_free() { return cached_runtime_symbol(g_real_free, "cudaFree"); }

// The device a raw cudaMalloc targets: the current context's, creating the runtime's primary
// context first when this is the process's first CUDA call.
saver::Status current_device(int* ordinal) {
  SAVER_RETURN_IF_ERROR(saver::load_driver(nullptr));
  CUcontext ctx = nullptr;
  SAVER_RETURN_IF_ERROR(CU_CALL(cuCtxGetCurrent, &ctx));
  if (ctx == nullptr && real_free()) real_free()(nullptr);
  CUdevice dev = 0;
  SAVER_RETURN_IF_ERROR(CU_CALL(cuCtxGetDevice, &dev));
  *ordinal = static_cast<int>(dev);
  return {};
}

}  // namespace

extern "C" {

struct SaverStats {
  uint64_t released_bytes;
  uint64_t restored_bytes;
  uint64_t to_host_bytes;
  uint64_t to_device_bytes;
  double pin_seconds;
};

const char* saver_version(void) { return "fp8moe-saver 1"; }

const char* saver_last_error(void) { return t_error; }

int saver_init(void) { return fail(saver::load_driver(nullptr)); }

int saver_open_tag(const char* name, int cpu_backup) {
  if (name == nullptr) return fail(saver::make_status(saver::kUsage, "tag name is null"));
  return fail(saver::open_tag(name, cpu_backup != 0));
}

int saver_set_thread_tag(const char* name) { return fail(saver::set_thread_tag(name)); }

int saver_set_chunk_bytes(uint64_t bytes) { return fail(saver::set_chunk_bytes(bytes)); }

static int run_transition(const char* pause, bool pause_all, const char* resume, bool resume_all,
                          SaverStats* out) {
  saver::Stats stats;
  saver::Status st = saver::transition(one_or_none(pause), pause_all, one_or_none(resume),
                                       resume_all, &stats);
  if (out) *out = SaverStats{stats.released_bytes, stats.restored_bytes, stats.to_host_bytes,
                             stats.to_device_bytes, stats.pin_seconds};
  return fail(st);
}

// name == NULL: every active tag.
int saver_pause(const char* name, SaverStats* out) {
  return run_transition(name, name == nullptr, nullptr, false, out);
}

// name == NULL: every paused tag.
int saver_resume(const char* name, SaverStats* out) {
  return run_transition(nullptr, false, name, name == nullptr, out);
}

// Pauses one tag while resuming another, overlapping their copies.
int saver_swap(const char* pause, const char* resume, SaverStats* out) {
  if (pause == nullptr || resume == nullptr) {
    return fail(saver::make_status(saver::kUsage, "swap needs both tag names"));
  }
  return run_transition(pause, false, resume, false, out);
}

// Writes the JSON report (NUL-terminated) when it fits; returns the size it needs.
size_t saver_report(char* buf, size_t capacity) {
  const std::string json = saver::report_json();
  if (buf && capacity > json.size()) std::memcpy(buf, json.c_str(), json.size() + 1);
  return json.size() + 1;
}

// Raw allocation in the current thread's tag; its free waits for the whole device, as cudaFree does.
int saver_alloc(uint64_t size, int device, void** out) {
  return fail(saver::allocate(size, device, nullptr, true, out));
}

int saver_free(void* ptr) {
  bool found = false;
  saver::Status st = saver::release(ptr, &found);
  if (st.ok() && !found) st = saver::make_status(saver::kUsage, "pointer was not allocated by the saver");
  return fail(st);
}

// torch.cuda.memory.CUDAPluggableAllocator entry points.
void* saver_torch_malloc(ssize_t size, int device, cudaStream_t stream) {
  saver::trace("saver_torch_malloc(%zd, %d, %p)", size, device, static_cast<void*>(stream));
  void* ptr = nullptr;
  saver::Status st = size < 0 ? saver::make_status(saver::kUsage, "negative allocation size")
                              : saver::allocate(size_t(size), device, stream, false, &ptr);
  if (st.ok()) fail(st);
  else complain(st);
  return ptr;
}

void saver_torch_free(void* ptr, ssize_t size, int device, cudaStream_t stream) {
  saver::trace("saver_torch_free(%p, %zd, %d, %p)", ptr, size, device, static_cast<void*>(stream));
  bool found = false;
  saver::Status st = saver::release(ptr, &found);
  if (st.ok() && !found) st = saver::make_status(saver::kUsage, "free of a pointer the saver does not own");
  if (!st.ok()) complain(st);
}

// 1 when this library's cudaMalloc is the one the process resolves (it is in LD_PRELOAD).
int saver_preload_active(void) {
  // The main program's handle searches the global scope only (preloads come first there), not
  // this library's own local scope, where our definition would always be found.
  void* resolved = dlsym(dlopen(nullptr, RTLD_NOW), "cudaMalloc");
  Dl_info theirs, ours;
  if (!resolved || !dladdr(resolved, &theirs) || !dladdr(reinterpret_cast<void*>(&anchor), &ours)) return 0;
  return theirs.dli_fbase == ours.dli_fbase ? 1 : 0;
}

// ---- LD_PRELOAD interposer ----

cudaError_t cudaMalloc(void** ptr, size_t size) {
  if (saver::has_thread_tag()) {
    saver::trace("cudaMalloc(%zu) in a region", size);
    int ordinal = 0;
    saver::Status st = current_device(&ordinal);
    if (st.ok()) st = saver::allocate(size, ordinal, nullptr, true, ptr);
    if (st.ok()) return cudaSuccess;
    complain(st);
    return st.code == saver::kOutOfMemory ? cudaErrorMemoryAllocation : cudaErrorUnknown;
  }
  CudaMallocFn fn = real_malloc();
  return fn ? fn(ptr, size) : cudaErrorInitializationError;
}

cudaError_t cudaFree(void* ptr) {
  if (ptr != nullptr) {
    bool found = false;
    saver::Status st = saver::release(ptr, &found);
    if (found) {
      if (st.ok()) return cudaSuccess;
      complain(st);
      return cudaErrorUnknown;
    }
  }
  CudaFreeFn fn = real_free();
  return fn ? fn(ptr) : cudaErrorInitializationError;
}

}  // extern "C"
