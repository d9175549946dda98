// Host-side helpers the nvcc-built kernel libraries of csrc/ share (included by
// fp8_grouped/grouped.cu and fp8_norm/rmsnorm_quant.cu; csrc/nvcc_build.py digests this file
// with each library's sources, so editing it rebuilds both).
//
// The libraries link only the static CUDA runtime: this machine class may have the toolkit but
// no driver (`-lcuda` fails), so the driver's cuTensorMapEncodeTiled, which builds TMA
// descriptors, is looked up at run time through cudaGetDriverEntryPointByVersion; tile_map
// builds a 2-D descriptor from it.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums only
#include <cuda_runtime.h>

#include <cstdint>
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

// How far each TMA read is widened in L2 (CUtensorMapL2promotion: 0 none, 1 64 B, 2 128 B,
// 3 256 B). A build switch so that the choice can be measured (scripts/sweep_grouped_cuda.py).
#ifndef TMA_L2_PROMOTION
#define TMA_L2_PROMOTION 3
#endif

// A row-major [rows, cols] matrix of `dtype` with row stride ld bytes, read in box_rows x
// box_cols boxes with `swizzle`; zeros outside. 0, or 1 with the reason in err.
inline int tile_map(CUtensorMap* map, CUtensorMapDataType dtype, CUtensorMapSwizzle swizzle,
                    const void* base, int64_t rows, int64_t cols, int64_t ld, int box_cols,
                    int box_rows, char* err, int err_len) {
  const auto encode = encode_tiled();
  if (encode == nullptr) return fail(err, err_len, "cuTensorMapEncodeTiled is not available");
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(ld)};
  const cuuint32_t box[2] = {cuuint32_t(box_cols), cuuint32_t(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(map, dtype, 2, const_cast<void*>(base), dims, strides, box,
                            elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                            CUtensorMapL2promotion(TMA_L2_PROMOTION),
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    snprintf(err, err_len, "cuTensorMapEncodeTiled failed (CUresult %d) for a [%lld, %lld] "
             "operand with row stride %lld: bases and row strides must be 16-byte aligned",
             int(r), (long long)rows, (long long)cols, (long long)ld);
    return 1;
  }
  return 0;
}

}  // namespace csrc_common
