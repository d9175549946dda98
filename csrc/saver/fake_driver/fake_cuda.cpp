// A fake CUDA driver for the saver's CPU tests (never shipped, never loaded unless
// FP8MOE_SAVER_LIBCUDA points at it).
//
// It implements the driver entry points the saver resolves with host memory and the same rules
// the real virtual-memory API enforces, strictly enough to catch the saver's mistakes:
//   * an address reservation is an inaccessible anonymous mapping;
//   * a physical allocation (cuMemCreate) is a memfd counted against a per-device capacity, so
//     out-of-memory happens where a real device would run out;
//   * cuMemMap maps the memfd into a reservation without access, cuMemSetAccess makes it
//     read-write, cuMemUnmap puts the inaccessible anonymous mapping back. Fresh physical memory
//     is zero, so contents survive a pause only if the saver copied them out and back;
//   * releasing a handle frees its capacity once it is also unmapped, as on CUDA;
//   * copies are synchronous memcpy; streams and events are tokens.
// fake_cuda_config() sets capacity, granularity, device count, and one-shot failures of the nth
// map / set-access; fake_cuda_stat() reads call counters and byte totals.
#include <cuda.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Phys {
  int fd = -1;
  size_t size = 0;
  int device = 0;
  bool released = false;
  int maps = 0;
};

struct Mapping {
  size_t size;
  Phys* phys;
};

struct State {
  std::mutex mu;
  std::map<uintptr_t, size_t> reservations;
  std::map<uintptr_t, Mapping> mappings;
  std::map<uintptr_t, size_t> registered;
  std::map<std::string, long long> config{{"capacity", 1ll << 30}, {"granularity", 1 << 16},
                                          {"devices", 2}, {"fail_map_in", -1},
                                          {"fail_access_in", -1}};
  std::map<std::string, long long> stats;
  long long used[64] = {};
};

State& st() {
  static State* s = new State;
  return *s;
}

thread_local std::vector<CUcontext> t_ctx_stack;

CUcontext ctx_of(int device) { return reinterpret_cast<CUcontext>(uintptr_t(0x1000 + device)); }

int current_device() {
  if (t_ctx_stack.empty()) return -1;
  return int(reinterpret_cast<uintptr_t>(t_ctx_stack.back()) - 0x1000);
}

void count(const char* name, long long by = 1) { st().stats[name] += by; }

// A one-shot failure armed by fake_cuda_config(name, n): the call after n successful ones fails.
bool should_fail(const char* name) {
  long long& left = st().config[name];
  if (left < 0) return false;
  return left-- == 0;
}

void drop_phys_if_unused(Phys* p) {
  if (!p->released || p->maps > 0) return;
  close(p->fd);
  st().used[p->device] -= p->size;
  count("physical_bytes", -(long long)p->size);
  delete p;
}

bool inside_reservation(uintptr_t ptr, size_t size) {
  auto it = st().reservations.upper_bound(ptr);
  if (it == st().reservations.begin()) return false;
  --it;
  return ptr >= it->first && ptr + size <= it->first + it->second;
}

bool overlaps_mapping(uintptr_t ptr, size_t size) {
  auto it = st().mappings.lower_bound(ptr);
  if (it != st().mappings.end() && it->first < ptr + size) return true;
  if (it == st().mappings.begin()) return false;
  --it;
  return it->first + it->second.size > ptr;
}

// The mappings exactly tiling [ptr, ptr + size), or empty if they do not.
std::vector<std::map<uintptr_t, Mapping>::iterator> tiling(uintptr_t ptr, size_t size) {
  std::vector<std::map<uintptr_t, Mapping>::iterator> out;
  uintptr_t at = ptr;
  while (at < ptr + size) {
    auto it = st().mappings.find(at);
    if (it == st().mappings.end()) return {};
    out.push_back(it);
    at += it->second.size;
  }
  if (at != ptr + size) return {};
  return out;
}

void make_inaccessible(uintptr_t ptr, size_t size) {
  mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE,
       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
}

}  // namespace

extern "C" {

long long fake_cuda_stat(const char* name) {
  std::lock_guard<std::mutex> lock(st().mu);
  return st().stats[name];
}

int fake_cuda_config(const char* name, long long value) {
  std::lock_guard<std::mutex> lock(st().mu);
  if (!st().config.count(name)) return 1;
  st().config[name] = value;
  return 0;
}

CUresult cuInit(unsigned int) { return CUDA_SUCCESS; }

CUresult cuGetErrorName(CUresult error, const char** out) {
  switch (error) {
    case CUDA_SUCCESS: *out = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *out = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *out = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_INVALID_DEVICE: *out = "CUDA_ERROR_INVALID_DEVICE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *out = "CUDA_ERROR_INVALID_CONTEXT"; break;
    default: *out = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
  }
  return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char** out) {
  switch (error) {
    case CUDA_ERROR_INVALID_VALUE: *out = "invalid argument"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *out = "out of memory"; break;
    default: *out = "fake driver error"; break;
  }
  return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice* dev, int ordinal) {
  std::lock_guard<std::mutex> lock(st().mu);
  if (ordinal < 0 || ordinal >= st().config["devices"]) return CUDA_ERROR_INVALID_DEVICE;
  *dev = ordinal;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* value, CUdevice_attribute, CUdevice) {
  *value = 0;
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice dev) {
  *ctx = ctx_of(dev);
  return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext* ctx) {
  *ctx = t_ctx_stack.empty() ? nullptr : t_ctx_stack.back();
  return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice* dev) {
  if (t_ctx_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
  *dev = current_device();
  return CUDA_SUCCESS;
}

CUresult cuCtxPushCurrent(CUcontext ctx) {
  t_ctx_stack.push_back(ctx);
  return CUDA_SUCCESS;
}

CUresult cuCtxPopCurrent(CUcontext* ctx) {
  if (t_ctx_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
  *ctx = t_ctx_stack.back();
  t_ctx_stack.pop_back();
  return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize(void) {
  std::lock_guard<std::mutex> lock(st().mu);
  if (t_ctx_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
  count("ctx_sync_calls");
  return CUDA_SUCCESS;
}

CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
  std::lock_guard<std::mutex> lock(st().mu);
  int dev = current_device();
  if (dev < 0) return CUDA_ERROR_INVALID_CONTEXT;
  *total = st().config["capacity"];
  *free_bytes = *total - st().used[dev];
  return CUDA_SUCCESS;
}

CUresult cuMemGetAllocationGranularity(size_t* gran, const CUmemAllocationProp*,
                                       CUmemAllocationGranularity_flags) {
  std::lock_guard<std::mutex> lock(st().mu);
  *gran = st().config["granularity"];
  return CUDA_SUCCESS;
}

CUresult cuMemCreate(CUmemGenericAllocationHandle* handle, size_t size,
                     const CUmemAllocationProp* prop, unsigned long long) {
  std::lock_guard<std::mutex> lock(st().mu);
  count("create_calls");
  const int dev = prop->location.id;
  if (size == 0 || size % st().config["granularity"] != 0) return CUDA_ERROR_INVALID_VALUE;
  if (st().used[dev] + (long long)size > st().config["capacity"]) return CUDA_ERROR_OUT_OF_MEMORY;
  int fd = memfd_create("fake_cuda", 0);
  if (fd < 0 || ftruncate(fd, size) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
  Phys* p = new Phys{fd, size, dev, false, 0};
  st().used[dev] += size;
  count("physical_bytes", size);
  *handle = reinterpret_cast<CUmemGenericAllocationHandle>(p);
  return CUDA_SUCCESS;
}

CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
  std::lock_guard<std::mutex> lock(st().mu);
  count("release_calls");
  Phys* p = reinterpret_cast<Phys*>(handle);
  if (p == nullptr || p->released) return CUDA_ERROR_INVALID_VALUE;
  p->released = true;
  drop_phys_if_unused(p);
  return CUDA_SUCCESS;
}

CUresult cuMemAddressReserve(CUdeviceptr* ptr, size_t size, size_t align, CUdeviceptr, unsigned long long) {
  std::lock_guard<std::mutex> lock(st().mu);
  const size_t gran = st().config["granularity"];
  if (size == 0 || size % gran != 0) return CUDA_ERROR_INVALID_VALUE;
  align = align ? align : gran;
  void* raw = mmap(nullptr, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  uintptr_t start = (reinterpret_cast<uintptr_t>(raw) + align - 1) / align * align;
  if (start > uintptr_t(raw)) munmap(raw, start - uintptr_t(raw));
  munmap(reinterpret_cast<void*>(start + size), uintptr_t(raw) + size + align - (start + size));
  st().reservations[start] = size;
  *ptr = start;
  return CUDA_SUCCESS;
}

CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
  std::lock_guard<std::mutex> lock(st().mu);
  auto it = st().reservations.find(ptr);
  if (it == st().reservations.end() || it->second != size || overlaps_mapping(ptr, size)) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  munmap(reinterpret_cast<void*>(ptr), size);
  st().reservations.erase(it);
  return CUDA_SUCCESS;
}

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long) {
  std::lock_guard<std::mutex> lock(st().mu);
  count("map_calls");
  Phys* p = reinterpret_cast<Phys*>(handle);
  if (should_fail("fail_map_in")) return CUDA_ERROR_INVALID_VALUE;
  if (p == nullptr || p->released || offset + size > p->size || !inside_reservation(ptr, size) ||
      overlaps_mapping(ptr, size)) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  void* at = mmap(reinterpret_cast<void*>(ptr), size, PROT_NONE, MAP_SHARED | MAP_FIXED, p->fd, offset);
  if (at == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  st().mappings[ptr] = Mapping{size, p};
  p->maps++;
  count("mapped_bytes", size);
  return CUDA_SUCCESS;
}

CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc*, size_t) {
  std::lock_guard<std::mutex> lock(st().mu);
  if (should_fail("fail_access_in")) return CUDA_ERROR_INVALID_VALUE;
  if (tiling(ptr, size).empty()) return CUDA_ERROR_INVALID_VALUE;
  mprotect(reinterpret_cast<void*>(ptr), size, PROT_READ | PROT_WRITE);
  return CUDA_SUCCESS;
}

CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
  std::lock_guard<std::mutex> lock(st().mu);
  count("unmap_calls");
  auto pieces = tiling(ptr, size);
  if (pieces.empty()) return CUDA_ERROR_INVALID_VALUE;
  make_inaccessible(ptr, size);
  for (auto it : pieces) {
    Phys* p = it->second.phys;
    count("mapped_bytes", -(long long)it->second.size);
    st().mappings.erase(it);
    p->maps--;
    drop_phys_if_unused(p);
  }
  return CUDA_SUCCESS;
}

CUresult cuStreamCreate(CUstream* stream, unsigned int) {
  *stream = reinterpret_cast<CUstream>(new int(0));
  return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream) {
  std::lock_guard<std::mutex> lock(st().mu);
  count("stream_sync_calls");
  return CUDA_SUCCESS;
}

CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned int) { return CUDA_SUCCESS; }

CUresult cuEventCreate(CUevent* event, unsigned int) {
  *event = reinterpret_cast<CUevent>(new int(0));
  return CUDA_SUCCESS;
}

CUresult cuEventDestroy(CUevent event) {
  delete reinterpret_cast<int*>(event);
  return CUDA_SUCCESS;
}

CUresult cuEventRecord(CUevent, CUstream) { return CUDA_SUCCESS; }

CUresult cuEventSynchronize(CUevent) { return CUDA_SUCCESS; }

CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, CUstream) {
  std::memcpy(dst, reinterpret_cast<void*>(src), n);
  std::lock_guard<std::mutex> lock(st().mu);
  count("to_host_bytes", n);
  return CUDA_SUCCESS;
}

CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream) {
  std::memcpy(reinterpret_cast<void*>(dst), src, n);
  std::lock_guard<std::mutex> lock(st().mu);
  count("to_device_bytes", n);
  return CUDA_SUCCESS;
}

CUresult cuMemHostRegister(void* ptr, size_t size, unsigned int) {
  std::lock_guard<std::mutex> lock(st().mu);
  if (st().registered.count(uintptr_t(ptr))) return CUDA_ERROR_INVALID_VALUE;
  st().registered[uintptr_t(ptr)] = size;
  count("registered_bytes", size);
  count("register_calls");
  return CUDA_SUCCESS;
}

CUresult cuMemHostUnregister(void* ptr) {
  std::lock_guard<std::mutex> lock(st().mu);
  auto it = st().registered.find(uintptr_t(ptr));
  if (it == st().registered.end()) return CUDA_ERROR_INVALID_VALUE;
  count("registered_bytes", -(long long)it->second);
  st().registered.erase(it);
  return CUDA_SUCCESS;
}

}  // extern "C"
