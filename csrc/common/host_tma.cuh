// Host-side helpers the nvcc-built kernel libraries of csrc/ share (included by
// fp8_grouped/grouped.cu and fp8_norm/rmsnorm_quant.cu; csrc/nvcc_build.py digests this file
// with each library's sources, so editing it rebuilds both).
//
// The libraries link only the static CUDA runtime: this machine class may have the toolkit but
// no driver (`-lcuda` fails), so the driver's cuTensorMapEncodeTiled, which builds TMA
// descriptors, is looked up at run time through cudaGetDriverEntryPointByVersion.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums only
#include <cuda_runtime.h>

#include <cstdio>

namespace csrc_common {

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                   const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                   const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled (CUDA 12.0 ABI), or nullptr where the driver lacks it.
inline EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = nullptr;
  if (fn == nullptr) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &found) == cudaSuccess &&
        found == cudaDriverEntryPointSuccess)
      fn = reinterpret_cast<EncodeTiledFn>(ptr);
  }
  return fn;
}

// The C ABI's error convention: the message into the caller's buffer, nonzero returned
// (models/fp8/cuda_lib.call raises it).
inline int fail(char* err, int err_len, const char* message) {
  snprintf(err, err_len, "%s", message);
  return 1;
}

}  // namespace csrc_common
