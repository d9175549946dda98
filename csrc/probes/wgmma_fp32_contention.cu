// Does FP32 arithmetic slow down the tensor cores beside it? A probe of the H100 behind the
// grouped Wgrad kernel's design (csrc/fp8_grouped/grouped.cu's header quotes it).
//
//   nvcc -gencode arch=compute_90a,code=sm_90a -O3 -std=c++17 -o /tmp/probe \
//       csrc/probes/wgmma_fp32_contention.cu && /tmp/probe
//
// One CTA of two warpgroups per SM. A warpgroup in the MMA role issues batches of four
// m64n128k32 FP8 WGMMAs (operands in shared memory, 128-byte swizzle, one batch = one Wgrad K
// block of a 64 x 128 half) and waits for each; one in the FP32 role runs a Wgrad promotion's
// instructions on registers (64 FMUL scratch *= column scale, 64 FFMA acc += scratch * row
// scale per iteration), or FFMA, FMUL or IMAD alone. Each times itself with clock64 (SM cycles,
// so clock changes under the power cap do not enter); the median over the SMs is printed.
//
// On the H100 80GB HBM3 (tenth session, two rounds, identical to the cycle):
//   MMA alone                          316 cycles a batch (256 ideal: fill and drain of a waited
//                                      batch)
//   MMA on both warpgroups             512 each: the tensor cores alternate between the two, so
//                                      both batches finish together (the Wgrad K loop's lockstep)
//   promotion alone / on both          143 / 265 cycles per 128 instructions (one instruction a
//                                      cycle per scheduler: two warps' promotions add up)
//   MMA + promotion                    MMA 435 (+38%), promotion 180 (+26%)
//   MMA + FFMA / FMUL                  MMA 449 / 434, the FP32 work 194 / 179 (alone 156 / 142)
//   MMA + FFMA over 32 registers       MMA 443: fewer registers touched do not help
//   MMA + IMAD                         MMA 317 (unchanged), IMAD 398 (alone 266)
// FP32 FMA-pipe work beside the MMAs slows them by about 40%. So a schedule in which one
// warpgroup promotes while the other's batch runs costs about 2 x 435 = 870 cycles for two
// batches and two promotions, against 512 + the two promotions one after the other (about 200)
// when both warpgroups issue together and then both promote: the lockstep is the better of the
// two, which is what every overlapping Wgrad schedule measured in grouped.cu found.
// The MMA role uses grouped.cu's own WGMMA wrappers and shared-memory descriptors (included
// whole: its kernels and C entry points come along unused).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "../fp8_grouped/grouped.cu"

namespace {

// Warpgroup role: `iters` batches of four m64n128k32 MMAs over the same A (64 x 128) and B
// (128 x 128) tiles, each batch waited for, as one Wgrad K block's half is. Each batch adds to
// the last one's result: batches that overwrite it (as mma_k_block's do) are dead code to ptxas,
// which then issues one batch in four.
__device__ float mma_role(const uint8_t* A, const uint8_t* B, int iters) {
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  for (int it = 0; it < iters; ++it) {
    mma_issue(acc, A, B, /*add_to=*/true);
    mma_wait(acc);
  }
  float r = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) r += acc[i];
  return r;
}

// Warpgroup role: `iters` iterations of 128 instructions a thread on registers. KIND 0: the
// promotion's pattern, scratch *= column scale then acc += scratch * row scale, 64 of each;
// 1: FFMA only; 2: FMUL only; 3: integer IMAD; 4: FFMA over 32 registers instead of 128. The
// scales come from global memory, so they are registers as in the kernel, not immediates.
template <int KIND>
__device__ float fp32_role(int iters, const float* scales) {
  float s[64], a[64], c[16];
  const float t = threadIdx.x * 1e-7f;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    s[i] = 1.f + i * 1e-6f + t;
    a[i] = 0.f;
  }
#pragma unroll
  for (int j = 0; j < 16; ++j) c[j] = scales[j];
  const float row = scales[16] + t;
  int ia[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) ia[i] = threadIdx.x + i;
  const int im = int(scales[0] * 3.f) | 1;
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int i = 4 * j + q;
        if (KIND == 0) {
          s[i] *= c[j];
          a[i] = fmaf(s[i], row, a[i]);
        } else if (KIND == 1) {
          a[i] = fmaf(s[i], row, a[i]);
          s[i] = fmaf(a[i], c[j], s[i]);
        } else if (KIND == 2) {
          s[i] *= c[j];
          a[i] *= row;
        } else if (KIND == 3) {
          ia[i] = ia[i] * im + j;
          ia[i] = ia[i] * im + q;
        } else {
          a[i % 32] = fmaf(s[i % 32], row, a[i % 32]);
          s[i % 32] = fmaf(a[i % 32], c[j], s[i % 32]);
        }
      }
    }
    fence_registers(s);
    fence_registers(a);
  }
  float r = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) r += a[i] + s[i] + float(ia[i]);
  return r;
}

__device__ float fp32_any(int kind, int iters, const float* scales) {
  switch (kind) {
    case 1: return fp32_role<1>(iters, scales);
    case 2: return fp32_role<2>(iters, scales);
    case 3: return fp32_role<3>(iters, scales);
    case 4: return fp32_role<4>(iters, scales);
    default: return fp32_role<0>(iters, scales);
  }
}

// Role bits: 1 warpgroup 0 runs the MMAs, 2 warpgroup 1 runs FP32 work of `kind`, 4 warpgroup 0
// runs FP32 work (without bit 1), 8 warpgroup 1 runs MMAs (without bit 2).
__global__ void __launch_bounds__(256, 1)
contention(int mode, int kind, int mma_iters, int fp_iters, const float* scales,
           long long* cycles, float* sink) {
  extern __shared__ uint8_t raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~1023ull);
  uint8_t* A = base;          // 64 x 128 e4m3
  uint8_t* B = base + 8192;   // 128 x 128 e4m3
  for (int i = threadIdx.x; i < 8192 + 16384; i += blockDim.x) base[i] = 0x30 + (i % 7);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  const int wg = threadIdx.x / 128;
  const long long t0 = clock64();
  float r = 0.f;
  if (wg == 0 && (mode & 1)) r = mma_role(A, B, mma_iters);
  else if (wg == 0 && (mode & 4)) r = fp32_any(kind, fp_iters, scales);
  else if (wg == 1 && (mode & 8)) r = mma_role(A, B, mma_iters);
  else if (wg == 1 && (mode & 2)) r = fp32_any(kind, fp_iters, scales);
  const long long t1 = clock64();
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 2 + wg] = t1 - t0;
  if (r == 1234.5f) sink[threadIdx.x] = r;
}

}  // namespace

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const size_t smem = 8192 + 16384 + 1024;
  cudaFuncSetAttribute(contention, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  long long* cycles;
  float* sink;
  cudaMalloc(&cycles, sizeof(long long) * sms * 2);
  cudaMalloc(&sink, 1024 * sizeof(float));
  float host_scales[17];
  for (int j = 0; j < 17; ++j) host_scales[j] = 1.f - (j + 1) * 1e-7f;
  float* scales;
  cudaMalloc(&scales, sizeof(host_scales));
  cudaMemcpy(scales, host_scales, sizeof(host_scales), cudaMemcpyHostToDevice);
  const int mma_iters = 4000, fp_iters = 4000;
  struct Mode { int bits, kind; const char* name; };
  const Mode modes[] = {{1, 0, "MMA alone (wg0)"},
                        {9, 0, "MMA on both warpgroups"},
                        {2, 0, "promotion FMUL+FFMA alone (wg1)"},
                        {6, 0, "promotion on both warpgroups"},
                        {3, 0, "MMA + promotion FMUL+FFMA"},
                        {2, 1, "FFMA alone"},
                        {3, 1, "MMA + FFMA"},
                        {2, 2, "FMUL alone"},
                        {3, 2, "MMA + FMUL"},
                        {2, 3, "IMAD alone"},
                        {3, 3, "MMA + IMAD"},
                        {2, 4, "FFMA on 32 registers alone"},
                        {3, 4, "MMA + FFMA on 32 registers"}};
  for (int round = 0; round < 2; ++round) {
    for (const Mode& m : modes) {
      contention<<<sms, 256, smem>>>(m.bits, m.kind, mma_iters, fp_iters, scales, cycles, sink);
      cudaError_t e = cudaDeviceSynchronize();
      if (e != cudaSuccess) { printf("error %s\n", cudaGetErrorString(e)); return 1; }
      std::vector<long long> c(sms * 2);
      cudaMemcpy(c.data(), cycles, c.size() * sizeof(long long), cudaMemcpyDeviceToHost);
      std::vector<long long> w0, w1;
      for (int i = 0; i < sms; ++i) { w0.push_back(c[2 * i]); w1.push_back(c[2 * i + 1]); }
      std::sort(w0.begin(), w0.end());
      std::sort(w1.begin(), w1.end());
      const double m0 = w0[sms / 2], m1 = w1[sms / 2];
      printf("%-36s", m.name);
      if (m.bits & 1) printf("  wg0 MMA batch %6.1f cyc", m0 / mma_iters);
      if (m.bits & 8) printf("  wg1 MMA batch %6.1f cyc", m1 / mma_iters);
      if (m.bits & 4) printf("  wg0 FP iteration %6.1f cyc", m0 / fp_iters);
      if (m.bits & 2) printf("  wg1 FP iteration %6.1f cyc (128 instr)", m1 / fp_iters);
      printf("\n");
    }
  }
  return 0;
}
