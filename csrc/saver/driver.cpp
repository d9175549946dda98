#include "driver.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#define SAVER_STR(x) #x
#define SAVER_XSTR(x) SAVER_STR(x)

namespace saver {
namespace {

Driver g_driver;
// Never destroyed: PyTorch may free pool memory (and so call in here) late in process exit.
Status& g_load_status = *new Status;
std::once_flag g_load_once;

Status resolve_all(void* lib, const char* path) {
#define SAVER_RESOLVE(name)                                                              \
  g_driver.name = reinterpret_cast<decltype(g_driver.name)>(dlsym(lib, SAVER_XSTR(name))); \
  if (g_driver.name == nullptr)                                                          \
    return make_status(kUnavailable, std::string(path) + " has no symbol " SAVER_XSTR(name));
  SAVER_DRIVER_FUNCTIONS(SAVER_RESOLVE)
#undef SAVER_RESOLVE
  return {};
}

Status load_once() {
  const char* env = std::getenv("FP8MOE_SAVER_LIBCUDA");
  const char* path = (env && *env) ? env : "libcuda.so.1";
  trace_init();
  trace("loading the driver from %s", path);
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    return make_status(kUnavailable, std::string("cannot load the CUDA driver ") + path + ": " +
                                         (why ? why : "unknown dlopen error"));
  }
  SAVER_RETURN_IF_ERROR(resolve_all(lib, path));
  Status st = CU_CALL(cuInit, 0);
  if (!st.ok()) st.code = kUnavailable;
  return st;
}

}  // namespace

Status make_status(int code, std::string message) {
  Status st;
  st.code = code;
  st.message = std::move(message);
  return st;
}

Status load_driver(const Driver** out) {
  std::call_once(g_load_once, [] { g_load_status = load_once(); });
  if (out) *out = &g_driver;
  return g_load_status;
}

const Driver& drv() { return g_driver; }

std::string describe(CUresult result) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (g_driver.cuGetErrorName) g_driver.cuGetErrorName(result, &name);
  if (g_driver.cuGetErrorString) g_driver.cuGetErrorString(result, &text);
  std::string out = name ? name : ("CUresult " + std::to_string(static_cast<int>(result)));
  if (text) out += std::string(" (") + text + ")";
  return out;
}

Status check_cu(CUresult result, const char* call, const char* file, int line) {
  if (result == CUDA_SUCCESS) return {};
  int code = result == CUDA_ERROR_OUT_OF_MEMORY ? kOutOfMemory : kDriver;
  Status st = make_status(code, std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                                    ": " + describe(result));
  trace("  %s", st.message.c_str());
  st.cu = result;
  return st;
}

}  // namespace saver
