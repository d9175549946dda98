// The CUDA driver API, reached at run time.
//
// The saver links neither libcuda nor libcudart: build machines may have the CUDA headers but no
// driver, and a library loaded with LD_PRELOAD must not drag a runtime in before the program's own.
// `driver()` dlopens libcuda.so.1 once (or the library named by FP8MOE_SAVER_LIBCUDA, which the CPU
// tests point at a fake driver) and resolves every entry point under the exact symbol name cuda.h
// maps it to (cuMemGetInfo -> cuMemGetInfo_v2 ...), so the prototypes and the symbols always agree.
//
// Every call goes through CU_CALL, which turns a failed CUresult into a Status carrying the call,
// file:line and CUDA's own name and message for the error. Nothing here exits the process.
#pragma once

#include <cuda.h>

#include <string>

#include "trace.h"

namespace saver {

// Error classes returned through the C ABI; Python maps them to exception types.
enum Code : int {
  kOk = 0,
  kOutOfMemory = 1,  // the device had too little free memory; state is unchanged
  kUsage = 2,        // the call does not fit the saver's state (unknown tag, wrong state ...)
  kDriver = 3,       // any other driver failure
  kUnavailable = 4,  // the driver library could not be loaded or initialised
};

struct Status {
  int code = kOk;
  CUresult cu = CUDA_SUCCESS;  // the driver's result when a driver call failed
  std::string message;
  bool ok() const { return code == kOk; }
};

Status make_status(int code, std::string message);

// One member per driver entry point we use; each is typed from cuda.h's own prototype.
#define SAVER_DRIVER_FUNCTIONS(X) \
  X(cuInit)                       \
  X(cuGetErrorName)               \
  X(cuGetErrorString)             \
  X(cuDeviceGet)                  \
  X(cuDeviceGetAttribute)         \
  X(cuDevicePrimaryCtxRetain)     \
  X(cuCtxGetCurrent)              \
  X(cuCtxGetDevice)               \
  X(cuCtxPushCurrent)             \
  X(cuCtxPopCurrent)              \
  X(cuCtxSynchronize)             \
  X(cuMemGetInfo)                 \
  X(cuMemGetAllocationGranularity) \
  X(cuMemCreate)                  \
  X(cuMemRelease)                 \
  X(cuMemAddressReserve)          \
  X(cuMemAddressFree)             \
  X(cuMemMap)                     \
  X(cuMemUnmap)                   \
  X(cuMemSetAccess)               \
  X(cuStreamCreate)               \
  X(cuStreamSynchronize)          \
  X(cuStreamWaitEvent)            \
  X(cuEventCreate)                \
  X(cuEventDestroy)               \
  X(cuEventRecord)                \
  X(cuEventSynchronize)           \
  X(cuMemcpyDtoHAsync)            \
  X(cuMemcpyHtoDAsync)            \
  X(cuMemHostRegister)            \
  X(cuMemHostUnregister)

struct Driver {
#define SAVER_DECLARE_MEMBER(name) decltype(&::name) name = nullptr;
  SAVER_DRIVER_FUNCTIONS(SAVER_DECLARE_MEMBER)
#undef SAVER_DECLARE_MEMBER
};

// Loads and initialises the driver once; later calls return the same table or the same error.
Status load_driver(const Driver** out);

// The loaded table; only valid after load_driver succeeded.
const Driver& drv();

// "CUDA_ERROR_OUT_OF_MEMORY (out of memory)".
std::string describe(CUresult result);

Status check_cu(CUresult result, const char* call, const char* file, int line);

// Notes a driver call in the trace ring before it is made (see trace.h).
inline void trace_call(const char* call, const char* file, int line) {
  if (tracing()) trace("%s at %s:%d", call, file, line);
}

}  // namespace saver

// CU_CALL(cuMemMap, ptr, size, 0, handle, 0) -> Status.
#define CU_CALL(fn, ...)                                 \
  (::saver::trace_call(#fn, __FILE__, __LINE__),         \
   ::saver::check_cu(::saver::drv().fn(__VA_ARGS__), #fn, __FILE__, __LINE__))

#define SAVER_RETURN_IF_ERROR(expr)      \
  do {                                   \
    ::saver::Status _st = (expr);        \
    if (!_st.ok()) return _st;           \
  } while (0)
