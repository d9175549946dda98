// FP8 and bf16 conversions and the reference's scale, shared by the quantizing kernels of csrc/
// (fp8_norm/rmsnorm_quant.cu, fp8_swiglu/swiglu_backward.cu) and digested with each library's
// sources like the other headers here. Scales and casts are models/fp8/reference.py's
// operations: s = max(amax, 1e-12) / 448 correctly rounded [rounded up to 2^k], q =
// e4m3_satfinite(v * (1/s)) with the reciprocal correctly rounded; a tile holding inf/NaN gets a
// NaN scale.
#pragma once

#include <cstdint>

namespace csrc_common {

constexpr float FP8_MAX = 448.0f;
constexpr uint32_t AMAX_EPS_BITS = 0x2B8CBCCCu;  // 1e-12f, the floor of an amax
constexpr uint32_t ABS_MASK = 0x7FFFFFFFu;

// e4m3(lo) in the low byte, e4m3(hi) in the high byte; round to nearest even, finite values
// saturate to +-448 (the reference's clamp), NaN stays NaN.
__device__ __forceinline__ uint32_t e4m3x2(float lo, float hi) {
  uint16_t r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ uint2 e4m3x8(const float (&v)[8], float inv) {
  return make_uint2(e4m3x2(v[0] * inv, v[1] * inv) | (e4m3x2(v[2] * inv, v[3] * inv) << 16),
                    e4m3x2(v[4] * inv, v[5] * inv) | (e4m3x2(v[6] * inv, v[7] * inv) << 16));
}

// bf16(lo) in the low half, bf16(hi) in the high half, rounded to nearest even (torch's .to()).
__device__ __forceinline__ uint32_t bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float bf16_lo(uint32_t pair) { return __uint_as_float(pair << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t pair) {
  return __uint_as_float(pair & 0xFFFF0000u);
}

// 8 bf16 values (16 bytes) as floats.
__device__ __forceinline__ void unpack8(uint4 v, float (&x)[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    x[2 * c] = bf16_lo(words[c]);
    x[2 * c + 1] = bf16_hi(words[c]);
  }
}

// Scale of a tile whose max |v| has the bit pattern `amax`, and its correctly rounded reciprocal:
// the reference's s = max(amax, 1e-12) / 448 [rounded up to 2^k], plus (amax - amax), which is
// NaN exactly when amax is inf or NaN (quant.py's _scale).
__device__ __forceinline__ float2 scale_of(uint32_t amax, bool pow2) {
  const float a = __uint_as_float(amax);
  float s = __fdiv_rn(__uint_as_float(max(amax, AMAX_EPS_BITS)), FP8_MAX);
  if (pow2) s = __uint_as_float((__float_as_uint(s) + 0x7FFFFFu) & 0xFF800000u);
  s += a - a;
  return make_float2(s, __frcp_rn(s));
}

}  // namespace csrc_common
