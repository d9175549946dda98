// Does FP32 arithmetic slow down the tensor cores beside it, and how fast could the grouped Wgrad
// kernel's K loop run without the rest of the kernel? Probes of the H100 behind that kernel's
// design (csrc/fp8_grouped/EXPERIMENTS.md quotes them).
//
//   nvcc -gencode arch=compute_90a,code=sm_90a -O3 -std=c++17 -o /tmp/probe \
//       csrc/probes/wgmma_fp32_contention.cu && /tmp/probe [--random] [--fed-only] ...
//
// (--help lists the options; -DWGRAD_CYCLES=2 builds the fed K loops with grouped.cu's
// step timeline, printed after each.)
//
// One CTA of three warpgroups per SM. A warpgroup in the MMA role issues batches of four
// m64n128k32 FP8 WGMMAs (operands in shared memory, 128-byte swizzle, one batch = one Wgrad K
// block of a 64 x 128 half) and waits for each; one in the FP32 role runs a Wgrad promotion's
// instructions on registers (64 FMUL scratch *= column scale, 64 FFMA acc += scratch * row
// scale per iteration), or FFMA, FMUL or IMAD alone; the third can stream bulk copies (TMA)
// from L2 into shared memory, as a GEMM's producer does. Each times itself with clock64 (SM
// cycles, so clock changes under the power cap do not enter); the median over the SMs is printed.
//
// On the H100 80GB HBM3 (tenth session; two rounds agree to the cycle; the first figure of a
// pair from this three-warpgroup build, the second from the two-warpgroup one of commit 59751bd):
//   MMA alone                          318 / 316 cycles a batch (256 ideal: the fill and drain
//                                      of a batch waited for)
//   MMA on both warpgroups             512 each: the tensor cores alternate between the two, so
//                                      both batches finish together (the Wgrad K loop's lockstep)
//   promotion alone / on both          141 / 262 cycles per 128 instructions (one instruction a
//                                      cycle per scheduler: two warps' promotions add up)
//   MMA + promotion                    MMA 425 / 435 (+34-38%), promotion 165 / 180 (+17-26%)
//   MMA + FFMA / FMUL                  MMA 441 / 425, the FP32 work 181 / 165 (alone 155 / 141)
//   MMA + FFMA over 32 registers       MMA 449: fewer registers touched do not help
//   MMA + IMAD                         MMA 320 (unchanged), IMAD 395 (alone 266)
//   MMA on both + bulk copies          MMA 512 (unchanged) with 16 KB copies landing at 24, 35 or,
//                                      unpaced, 33 bytes a cycle (the most one thread with four
//                                      in flight gets from L2 with every SM copying; alone 32)
// FP32 FMA-pipe work beside the MMAs slows them by about 40%; the TMA's shared-memory writes at
// a GEMM's rates do not. So a schedule in which one warpgroup promotes while the other's batch
// runs costs about 2 x 430 = 860 cycles for two batches and two promotions, against 512 + the
// two promotions one after the other (about 200) when both warpgroups issue together and then
// both promote: the lockstep is the better of the two, which is what every overlapping Wgrad
// schedule measured in grouped.cu found. The Wgrad K loop's arithmetic alone (k_loop below: two
// halves of batch, wait, 16 shared loads + 64 FMUL + 64 FFMA, both warpgroups in step) takes
// 1617-1640 cycles a K block, 63% of the tensor cores' time. Adding the kernel's bookkeeping one
// piece at a time: row scales read from the stage 1679, a wait on a full barrier that completed
// long ago 1880 (alone: less together with the rest), each warp's release 1692, a ring of three
// stages 1735, all four together 1752. Fed as the kernel is (k_loop_fed: a producer warpgroup,
// full and empty barriers, three stages): 49 KB of bulk copies a K block from L2 1696; one K
// block in six or in three from DRAM 1731 / 1739; the kernel's own 2D tensor-map loads of
// dsv3-down's Wgrad operands (E8 x 4096, walked tile by tile as a CTA does) 1705-1713, with
// grouped.cu's promotion code (8 pairs' products formed under the MMAs) 1762, and with three
// more warps waiting on an mbarrier throughout, as the storer warps do, 1762. With random
// operand bits and scales (--random) instead of constant fills, over 300 launches at the power
// cap, or on 33 or 66 SMs instead of all (--sms): 1712 / 1763 every time (the clock the cycles
// imply falls from ~1.8 GHz to ~1.48 GHz with random bits; cycles do not). So neither the data
// path, the promotion's code nor the data's power explains grouped.cu's K block (2092 cycles at
// dsv3-down E8 x 4096 at the eleventh session's start, 1921 after it: grouped.cu's WGRAD_DIAG
// note): what the probe lacks is the kernel's tiles and its own code.
// The MMA role uses grouped.cu's own WGMMA wrappers and shared-memory descriptors (included
// whole: its kernels and C entry points come along unused).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
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
  constexpr int NI = KIND == 3 ? 64 : 1;  // only the IMAD kind holds integers (384 threads)
  int ia[NI];
#pragma unroll
  for (int i = 0; i < NI; ++i) ia[i] = threadIdx.x + i;
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
          ia[i % NI] = ia[i % NI] * im + j;
          ia[i % NI] = ia[i % NI] * im + q;
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
  for (int i = 0; i < 64; ++i) r += a[i] + s[i];
  for (int i = 0; i < NI; ++i) r += float(ia[i]);
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

// Warpgroup 2's first thread: bulk copies (TMA) of 16 KB from global memory into a ring of
// four shared-memory buffers, one started every `pace` cycles (as fast as they complete when
// pace is 0), `copies` in all: the stage loads a GEMM's producer keeps in flight, whose writes
// share the shared memory's bandwidth with the WGMMAs' operand reads.
constexpr int COPY_BYTES = 16384, COPY_RING = 4;
__device__ void copy_role(uint8_t* ring, uint64_t* bars, const uint8_t* src, int copies,
                          int pace) {
  long long next = clock64();
  for (int c = 0; c < copies; ++c) {
    const int slot = c % COPY_RING;
    if (c >= COPY_RING) mbar_wait(&bars[slot], ((c / COPY_RING) - 1) & 1);
    while (pace > 0 && clock64() < next) {
    }
    next += pace;
    mbar_arrive_expect_tx(&bars[slot], COPY_BYTES);
    bulk_load(ring + slot * COPY_BYTES, src + (c % 64) * COPY_BYTES, COPY_BYTES, &bars[slot]);
  }
  for (int c = max(0, copies - COPY_RING); c < copies; ++c)
    mbar_wait(&bars[c % COPY_RING], (c / COPY_RING) & 1);
}

// Role bits: 1 warpgroup 0 runs the MMAs, 2 warpgroup 1 runs FP32 work of `kind`, 4 warpgroup 0
// runs FP32 work (without bit 1), 8 warpgroup 1 runs MMAs (without bit 2), 16 warpgroup 2 runs
// the bulk copies.
__global__ void __launch_bounds__(384, 1)
contention(int mode, int kind, int mma_iters, int fp_iters, const float* scales,
           const uint8_t* copy_src, int copies, int pace, long long* cycles, float* sink) {
  extern __shared__ uint8_t raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~1023ull);
  uint8_t* A = base;          // 64 x 128 e4m3
  uint8_t* B = base + 8192;   // 128 x 128 e4m3
  uint8_t* copy_ring = base + 8192 + 16384;
  uint64_t* bars = reinterpret_cast<uint64_t*>(copy_ring + COPY_RING * COPY_BYTES);
  for (int i = threadIdx.x; i < 8192 + 16384; i += blockDim.x) base[i] = 0x30 + (i % 7);
  if (threadIdx.x < COPY_RING) mbar_init(&bars[threadIdx.x], 1);
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  __syncthreads();
  const int wg = threadIdx.x / 128;
  const long long t0 = clock64();
  float r = 0.f;
  if (wg == 0 && (mode & 1)) r = mma_role(A, B, mma_iters);
  else if (wg == 0 && (mode & 4)) r = fp32_any(kind, fp_iters, scales);
  else if (wg == 1 && (mode & 8)) r = mma_role(A, B, mma_iters);
  else if (wg == 1 && (mode & 2)) r = fp32_any(kind, fp_iters, scales);
  else if (wg == 2 && (mode & 16) && threadIdx.x == 256)
    copy_role(copy_ring, bars, copy_src + size_t(blockIdx.x % 16) * 64 * COPY_BYTES, copies, pace);
  const long long t1 = clock64();
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 3 + wg] = t1 - t0;
  if (r == 1234.5f) sink[threadIdx.x] = r;
}

// One half's promotion with all its column scales read from shared memory after the wait:
// acc += scratch * (row scale x column scale), 16 shared loads, 64 FMUL, 64 FFMA.
__device__ __forceinline__ void promote_after_wait(float (&acc)[64], const float (&scratch)[64],
                                                   float s0, float s1, const float* col_scales) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const float2 c = ld_shared_v2(col_scales + 8 * j);
    acc[4 * j + 0] += scratch[4 * j + 0] * (s0 * c.x);
    acc[4 * j + 1] += scratch[4 * j + 1] * (s0 * c.y);
    acc[4 * j + 2] += scratch[4 * j + 2] * (s1 * c.x);
    acc[4 * j + 3] += scratch[4 * j + 3] * (s1 * c.y);
  }
}

// The Wgrad K loop's arithmetic alone, on both warpgroups in step: per K block two halves, each
// a batch into scratch, its wait, then the promotion acc[h] += scratch * (row scale x column
// scale) (16 shared loads, 64 FMUL, 64 FFMA), with no barriers and no data movement: the floor
// the kernel's K block would reach without its synchronization and loads. PARTS adds, one by
// one, what grouped.cu's K loop does besides: ROW_SCALES its two row scales read from the
// stage per K block; READY_WAIT a wait on a stage's full barrier whose phase completed long
// ago (as when the loads run ahead); RELEASE each warp's arrival on the stage's empty barrier;
// STAGES the operands and scales of a ring of three stages, the stage advancing per K block.
enum KLoopParts { ROW_SCALES = 1, READY_WAIT = 2, RELEASE = 4, STAGES = 8 };
constexpr int KSTAGES = 3, KSTAGE_BYTES = 8192 + 16384 + 1024;  // a, b, 256 scales (1 KB)

template <int PARTS>
__global__ void __launch_bounds__(256, 1)
k_loop(int iters, const float* scales, long long* cycles, float* sink) {
  extern __shared__ uint8_t raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~1023ull);
  uint64_t* bars = reinterpret_cast<uint64_t*>(base + KSTAGES * KSTAGE_BYTES);  // ready, empty
  for (int st = 0; st < KSTAGES; ++st) {
    uint8_t* stage = base + st * KSTAGE_BYTES;
    for (int i = threadIdx.x; i < 8192 + 16384; i += blockDim.x) stage[i] = 0x30 + (i % 7);
    float* sc = reinterpret_cast<float*>(stage + 8192 + 16384);
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sc[i] = scales[i % 17];
  }
  if (threadIdx.x == 0) {
    mbar_init(&bars[0], 1);
    mbar_init(&bars[1], 8);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    mbar_arrive(&bars[0]);  // the ready barrier's phase 0 completes, once and for all
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  float acc[2][64], scratch[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[0][i] = acc[1][i] = 0.f;
  float s0 = scales[16], s1 = scales[15];
  const int lane = threadIdx.x % 32, row = (threadIdx.x % 128) / 32 * 16 + lane / 4;
  const long long t0 = clock64();
  int stage = 0;
  for (int it = 0; it < iters; ++it) {
    const uint8_t* st = base + ((PARTS & STAGES) ? stage : 0) * KSTAGE_BYTES;
    const float* sc = reinterpret_cast<const float*>(st + 8192 + 16384);
    if (PARTS & READY_WAIT) mbar_wait(&bars[0], 0);
    if (PARTS & ROW_SCALES) {
      s0 = ld_shared(sc + row);
      s1 = ld_shared(sc + row + 8);
    } else {
      asm volatile("" : "+f"(s0), "+f"(s1));  // a new K block's row scales, as in the kernel
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mma_k_block(scratch, st, st + 8192);
      promote_after_wait(acc[h], scratch, s0, s1, sc + 2 * (lane % 4) + h * 128);
    }
    if ((PARTS & RELEASE) && lane == 0) mbar_arrive(&bars[1]);
    if (++stage == KSTAGES) stage = 0;
  }
  const long long t1 = clock64();
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 2 + threadIdx.x / 128] = t1 - t0;
  float r = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) r += acc[0][i] + acc[1][i];
  if (r == 1234.5f) sink[threadIdx.x] = r;
}

// The same K loop fed as grouped.cu feeds it: a producer warpgroup (setmaxnreg down, as there)
// whose first thread refills a ring of three stages by bulk copies (the K block's 16 KB of a,
// 32 KB of b and 1 KB of scales, from an L2-resident buffer) once both consumer warpgroups have
// released a stage, each stage's full barrier completed by the copies' bytes. No tiles, no
// epilogue, no storers: what the data path adds to the K loop with all four parts above.
constexpr int PSTAGE_BYTES = 16384 + 32768 + 1024;
constexpr int PSTAGES = 3;

template <bool KERNEL_PROMOTION>
__global__ void __launch_bounds__(384, 1)
k_loop_fed(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
           int tensor_loads, int spinners, int iters, const uint8_t* src, const uint8_t* cold,
           size_t cold_stages, int cold_every, const float* scales, long long* cycles,
           float* sink) {
  extern __shared__ uint8_t raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~1023ull);
  uint64_t* full = reinterpret_cast<uint64_t*>(base + PSTAGES * PSTAGE_BYTES);
  uint64_t* empty = full + PSTAGES;
  uint64_t* done = empty + PSTAGES;  // the consumers have finished (what spinners wait for)
  if (threadIdx.x == 0) {
    for (int i = 0; i < PSTAGES; ++i) {
      mbar_init(&full[i], 1);
      mbar_init(&empty[i], 8);  // lane 0 of the eight consumer warps
    }
    mbar_init(done, 8);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    producer_registers();
    if (threadIdx.x == 0) {
      for (int it = 0, stage = 0, phase = 0; it < iters; ++it) {
        mbar_wait(&empty[stage], phase ^ 1);
        mbar_arrive_expect_tx(&full[stage], PSTAGE_BYTES);
        if (tensor_loads) {  // the kernel's loads: 2D boxes of dsv3-down's dW operands, tile by
                             // tile (32 K blocks each) as a CTA walks them
          const int t = blockIdx.x + gridDim.x * (it / 32), kb = it % 32;
          const int m = t % 56, n = (t / 56) % 8, expert = (t / 448) % 8;
          const int token0 = expert * 4096 + kb * 128;
          uint8_t* st = base + stage * PSTAGE_BYTES;
          tma_load_tile(st, &map_a, &full[stage], token0, m * 128);
          tma_load_tile(st + 16384, &map_b, &full[stage], token0, n * 256);
          bulk_load(st + 16384 + 32768, src + size_t(it % 64) * 1024, 1024, &full[stage]);
          if (++stage == PSTAGES) stage = 0, phase ^= 1;
          continue;
        }
        // every cold_every-th K block from a buffer no other load touches (an L2 miss), the rest
        // from the small shared one (hits)
        const uint8_t* from =
            cold_every > 0 && it % cold_every == 0
                ? cold + ((size_t(blockIdx.x) * iters + it) % cold_stages) * PSTAGE_BYTES
                : src + size_t(it % 64) * PSTAGE_BYTES;
        bulk_load(base + stage * PSTAGE_BYTES, from, PSTAGE_BYTES, &full[stage]);
        if (++stage == PSTAGES) stage = 0, phase ^= 1;
      }
    }
    // the kernel's storer warps wait the whole tile for the consumers' next staged tile
    if (spinners && threadIdx.x >= 32) mbar_wait(done, 0);
    return;
  }
  consumer_registers();
  float acc[2][64], scratch[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[0][i] = acc[1][i] = 0.f;
  const int lane = threadIdx.x % 32, row = (threadIdx.x % 128) / 32 * 16 + lane / 4;
  const long long t0 = clock64();
  stamp_tile(wg, 0, 0, 0);  // grouped.cu's WGRAD_CYCLES=2 timeline: the run as one tile
  for (int it = 0, stage = 0, phase = 0; it < iters; ++it) {
    stamp_k(wg, it, K_TOP);
    mbar_wait(&full[stage], phase);
    stamp_k(wg, it, K_DATA);
    const uint8_t* st = base + stage * PSTAGE_BYTES;
    const float* sc = reinterpret_cast<const float*>(st + 16384 + 32768);
    const float s0 = ld_shared(sc + row), s1 = ld_shared(sc + row + 8);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float* col_scales = sc + 2 * (lane % 4) + h * 128;
      if (KERNEL_PROMOTION) {  // grouped.cu's own: PRELOAD pairs' products formed under the MMAs
        mma_issue(scratch, st + (wg - 1) * 8192, st + 16384 + h * 16384);
        float4 early[PRELOAD + 1];
        early_products(early, s0, s1, col_scales);
        mma_wait(scratch);
        stamp_k(wg, it, h == 0 ? K_MMA0 : K_MMA1);
        promote_outer(acc[h], scratch, s0, s1, early, col_scales);
        stamp_k(wg, it, h == 0 ? K_PROMO0 : K_PROMO1);
        continue;
      }
      mma_k_block(scratch, st + (wg - 1) * 8192, st + 16384 + h * 16384);
      promote_after_wait(acc[h], scratch, s0, s1, col_scales);
    }
    if (lane == 0) mbar_arrive(&empty[stage]);
    stamp_k(wg, it, K_END);
    if (++stage == PSTAGES) stage = 0, phase ^= 1;
  }
  stamp_tile(wg, 0, iters, 1);
  record_cycles(wg, t0, iters, 1);
  const long long t1 = clock64();
  if (lane == 0) mbar_arrive(done);
  if (threadIdx.x % 128 == 0) cycles[blockIdx.x * 2 + wg - 1] = t1 - t0;
  float r = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) r += acc[0][i] + acc[1][i];
  if (r == 1234.5f) sink[threadIdx.x] = r;
}

// Pseudo-random bytes that are valid E4M3 (never the NaN pattern S.1111.111): operands whose
// bits toggle as real data's do, unlike the constant fills (a tensor core's power, and so the
// clock under the power cap, depends on how many bits change).
__global__ void fill_random_e4m3(uint8_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 0x9E3779B1u ^ seed ^ uint32_t(i >> 32) * 0x85EBCA77u;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 12;
    x *= 0x297A2D39u;
    x ^= x >> 15;
    uint8_t b = uint8_t(x >> 24);
    if ((b & 0x7F) == 0x7F) b ^= 1;
    p[i] = b;
  }
}

// Pseudo-random floats in [1/512, 1/256): scales as a quantizer's would be, all normal.
__global__ void fill_random_scales(float* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 0x9E3779B1u ^ seed;
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    p[i] = (1.f + float(x >> 8) * (1.f / 16777216.f)) * (1.f / 512.f);
  }
}

template <int PARTS>
bool run_k_loop(int sms, int iters, const float* scales, long long* cycles, float* sink,
                const char* name) {
  const size_t smem = KSTAGES * KSTAGE_BYTES + 64 + 1024;
  cudaFuncSetAttribute(k_loop<PARTS>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  k_loop<PARTS><<<sms, 256, smem>>>(iters, scales, cycles, sink);
  if (cudaDeviceSynchronize() != cudaSuccess) {
    printf("k_loop failed\n");
    return false;
  }
  std::vector<long long> c(sms * 2);
  cudaMemcpy(c.data(), cycles, c.size() * sizeof(long long), cudaMemcpyDeviceToHost);
  std::sort(c.begin(), c.end());
  printf("K loop %-29s  K block %6.1f cyc (two halves, both warpgroups)\n", name,
         double(c[sms]) / iters);
  return true;
}

// One k_loop_fed variant: cold_every >= 0 bulk copies (1 in cold_every K blocks from DRAM);
// -1 the kernel's 2D tensor loads; -2 those with grouped.cu's promotion code; -3 that and three
// waiting warps. Launched `repeat` times back to back; the last launch is the one reported, with
// its SM cycles per K block and the clock they imply (cycles over its wall time).
struct FedRun {
  CUtensorMap map_a, map_b;
  const uint8_t *copy_src, *cold;
  size_t cold_stages;
  const float* scales;
  long long* cycles;
  float* sink;
};

bool run_fed(int sms, int iters, int repeat, int cold_every, const FedRun& f) {
  const size_t fed_smem = PSTAGES * PSTAGE_BYTES + 64 + 1024;  // + barriers
  cudaFuncSetAttribute(k_loop_fed<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       int(fed_smem));
  cudaFuncSetAttribute(k_loop_fed<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       int(fed_smem));
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int r = 0; r < repeat; ++r) {
    if (r == repeat - 1) cudaEventRecord(start);
    if (cold_every <= -2)
      k_loop_fed<true><<<sms, 384, fed_smem>>>(f.map_a, f.map_b, 1, cold_every == -3, iters,
                                               f.copy_src, f.cold, f.cold_stages, 0, f.scales,
                                               f.cycles, f.sink);
    else
      k_loop_fed<false><<<sms, 384, fed_smem>>>(f.map_a, f.map_b, cold_every < 0, 0, iters,
                                                f.copy_src, f.cold, f.cold_stages, cold_every,
                                                f.scales, f.cycles, f.sink);
  }
  cudaEventRecord(stop);
  if (cudaDeviceSynchronize() != cudaSuccess) {
    printf("k_loop_fed failed\n");
    return false;
  }
#if WGRAD_CYCLES >= 2  // the timeline of CTA 0
  report_wgrad_cycles<<<1, 1>>>();
  cudaDeviceSynchronize();
#endif
  float ms = 0.f;
  cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::vector<long long> c(sms * 2);
  cudaMemcpy(c.data(), f.cycles, c.size() * sizeof(long long), cudaMemcpyDeviceToHost);
  std::sort(c.begin(), c.end());
  char name[64];
  if (cold_every == -3)
    snprintf(name, sizeof(name), "+ three warps waiting");
  else if (cold_every == -2)
    snprintf(name, sizeof(name), "+ grouped.cu's promotion");
  else if (cold_every < 0)
    snprintf(name, sizeof(name), "fed by 2D tensor loads");
  else
    snprintf(name, sizeof(name), "fed, %s%d K blocks from DRAM", cold_every ? "1 in " : "",
             cold_every);
  printf("K loop %-29s  K block %6.1f cyc (two halves, both warpgroups), %.0f MHz\n", name,
         double(c[sms]) / iters, double(c[sms]) / (ms * 1e3));
  return true;
}

struct Options {
  bool random = false;    // --random: operands and scales of random bits, not constant fills
  bool fed_only = false;  // --fed-only: only the fed K loops over real tensor loads
  int iters = 2000;       // --iters N: K blocks per K-loop launch
  int repeat = 1;         // --repeat R: launches back to back, the last one reported
  int sms = 0;            // --sms N: CTAs of the fed K loops (default: one per SM)
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool more = i + 1 < argc;
    if (a == "--random") o.random = true;
    else if (a == "--fed-only") o.fed_only = true;
    else if (a == "--iters" && more) o.iters = std::atoi(argv[++i]);
    else if (a == "--repeat" && more) o.repeat = std::atoi(argv[++i]);
    else if (a == "--sms" && more) o.sms = std::atoi(argv[++i]);
    else {
      printf("usage: %s [--random] [--fed-only] [--iters N] [--repeat R] [--sms N]\n", argv[0]);
      std::exit(a == "--help" ? 0 : 2);
    }
  }
  o.iters = std::max(o.iters, 1);
  o.repeat = std::max(o.repeat, 1);
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int fed_sms = opt.sms > 0 ? std::min(opt.sms, sms) : sms;
  const size_t smem = 8192 + 16384 + COPY_RING * COPY_BYTES + 64 + 1024;
  uint8_t* copy_src;  // 16 MB: stays in L2
  const size_t copy_bytes = size_t(16) * 64 * COPY_BYTES;
  cudaMalloc(&copy_src, copy_bytes);
  cudaMemset(copy_src, 0x31, copy_bytes);
  const size_t cold_stages = 60000;  // 3 GB: K blocks that miss L2 (see k_loop_fed)
  uint8_t* cold;
  cudaMalloc(&cold, cold_stages * PSTAGE_BYTES);
  cudaMemset(cold, 0x32, cold_stages * PSTAGE_BYTES);
  // dsv3-down's Wgrad operands, token-major copies over 8 experts x 4096 tokens: dy^T [7168, T],
  // x^T [2048, T] e4m3, read through the kernel's own tensor maps
  const int64_t T = 8 * 4096;
  uint8_t *op_a, *op_b;
  cudaMalloc(&op_a, size_t(7168) * T);
  cudaMalloc(&op_b, size_t(2048) * T);
  cudaMemset(op_a, 0x33, size_t(7168) * T);
  cudaMemset(op_b, 0x34, size_t(2048) * T);
  if (opt.random) {  // copy_src also holds the tensor-loaded K loops' scales: floats there
    fill_random_e4m3<<<1024, 256>>>(op_a, size_t(7168) * T, 1);
    fill_random_e4m3<<<1024, 256>>>(op_b, size_t(2048) * T, 2);
    fill_random_e4m3<<<1024, 256>>>(cold, cold_stages * PSTAGE_BYTES, 3);
    fill_random_scales<<<1024, 256>>>(reinterpret_cast<float*>(copy_src), copy_bytes / 4, 4);
  }
  CUtensorMap map_a, map_b;
  char err[256];
  if (fp8_tile_map(&map_a, op_a, 7168, T, T, 128, err, sizeof(err)) ||
      fp8_tile_map(&map_b, op_b, 2048, T, T, 256, err, sizeof(err))) {
    printf("tensor map: %s\n", err);
    return 1;
  }
  cudaFuncSetAttribute(contention, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  long long* cycles;
  float* sink;
  cudaMalloc(&cycles, sizeof(long long) * sms * 3);
  cudaMalloc(&sink, 1024 * sizeof(float));
  float host_scales[17];
  for (int j = 0; j < 17; ++j) host_scales[j] = 1.f - (j + 1) * 1e-7f;
  float* scales;
  cudaMalloc(&scales, sizeof(host_scales));
  cudaMemcpy(scales, host_scales, sizeof(host_scales), cudaMemcpyHostToDevice);
  const FedRun fed{map_a, map_b, copy_src, cold, cold_stages, scales, cycles, sink};
  printf("operands: %s; K loops: %d K blocks a launch, the last of %d launches reported\n",
         opt.random ? "random bits" : "constant fills", opt.iters, opt.repeat);
  if (opt.fed_only) {
    printf("fed K loops on %d CTAs\n", fed_sms);
    for (int cold_every : {-1, -2})
      if (!run_fed(fed_sms, opt.iters, opt.repeat, cold_every, fed)) return 1;
    return 0;
  }
  const int mma_iters = 4000, fp_iters = 4000;
  struct Mode { int bits, kind, pace; const char* name; };
  const Mode modes[] = {{1, 0, 0, "MMA alone (wg0)"},
                        {9, 0, 0, "MMA on both warpgroups"},
                        {2, 0, 0, "promotion FMUL+FFMA alone (wg1)"},
                        {6, 0, 0, "promotion on both warpgroups"},
                        {3, 0, 0, "MMA + promotion FMUL+FFMA"},
                        {2, 1, 0, "FFMA alone"},
                        {3, 1, 0, "MMA + FFMA"},
                        {2, 2, 0, "FMUL alone"},
                        {3, 2, 0, "MMA + FMUL"},
                        {2, 3, 0, "IMAD alone"},
                        {3, 3, 0, "MMA + IMAD"},
                        {2, 4, 0, "FFMA on 32 registers alone"},
                        {3, 4, 0, "MMA + FFMA on 32 registers"},
                        {16, 0, 0, "bulk copies alone, unpaced"},
                        {25, 0, 0, "MMA on both + copies unpaced"},
                        {25, 0, 340, "MMA on both + a copy every 340 cyc"},
                        {25, 0, 680, "MMA on both + a copy every 680 cyc"}};
  for (int round = 0; round < 2; ++round) {
    for (const Mode& m : modes) {
      // copies spanning the MMAs: a pair of batches takes about 512 cycles
      const int copies = m.pace ? mma_iters * 512 / m.pace : mma_iters * 4;
      contention<<<sms, 384, smem>>>(m.bits, m.kind, mma_iters, fp_iters, scales, copy_src,
                                     copies, m.pace, cycles, sink);
      cudaError_t e = cudaDeviceSynchronize();
      if (e != cudaSuccess) { printf("error %s\n", cudaGetErrorString(e)); return 1; }
      std::vector<long long> c(sms * 3);
      cudaMemcpy(c.data(), cycles, c.size() * sizeof(long long), cudaMemcpyDeviceToHost);
      std::vector<long long> w[3];
      for (int i = 0; i < sms; ++i)
        for (int g = 0; g < 3; ++g) w[g].push_back(c[3 * i + g]);
      for (auto& v : w) std::sort(v.begin(), v.end());
      const double m0 = w[0][sms / 2], m1 = w[1][sms / 2], m2 = w[2][sms / 2];
      printf("%-36s", m.name);
      if (m.bits & 1) printf("  wg0 MMA batch %6.1f cyc", m0 / mma_iters);
      if (m.bits & 8) printf("  wg1 MMA batch %6.1f cyc", m1 / mma_iters);
      if (m.bits & 4) printf("  wg0 FP iteration %6.1f cyc", m0 / fp_iters);
      if (m.bits & 2) printf("  wg1 FP iteration %6.1f cyc (128 instr)", m1 / fp_iters);
      if (m.bits & 16)
        printf("  copies %5.1f B/cyc over %.0f cyc", double(copies) * COPY_BYTES / m2, m2);
      printf("\n");
    }
  }
  for (int round = 0; round < 2; ++round) {
    const int it = opt.iters;
    if (!run_k_loop<0>(sms, it, scales, cycles, sink, "arithmetic") ||
        !run_k_loop<ROW_SCALES>(sms, it, scales, cycles, sink, "+ row scales from the stage") ||
        !run_k_loop<READY_WAIT>(sms, it, scales, cycles, sink, "+ a full barrier's wait") ||
        !run_k_loop<RELEASE>(sms, it, scales, cycles, sink, "+ the release") ||
        !run_k_loop<STAGES>(sms, it, scales, cycles, sink, "+ a ring of three stages") ||
        !run_k_loop<15>(sms, it, scales, cycles, sink, "+ all four"))
      return 1;
    for (int cold_every : {0, 6, 3, -1, -2, -3})
      if (!run_fed(fed_sms, it, opt.repeat, cold_every, fed)) return 1;
  }
  return 0;
}
