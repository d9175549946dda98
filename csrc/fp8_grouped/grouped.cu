// Grouped block-scaled FP8 GEMMs for the routed experts, written for Hopper (sm_90a).
//
// Two kernels, the CUDA counterparts of models/fp8/grouped.py's Triton kernels (same operands,
// same layouts, same results up to fp32 summation order):
//
//   grouped_fprop   out[t] = deq(a)[t] . deq(b[e(t)])^T     grouped along M (tokens): Fprop, Dgrad
//                   a [T, K] e4m3, 1x128 scales sa[t, k/128]; b [E, N, K] e4m3, 128x128 scales
//   grouped_wgrad   out[e] (+)= deq(a)[rows of e]^T . deq(b)[rows of e]   grouped along K: Wgrad
//                   a [T, N], b [T, K] e4m3 stored token-major, 128x1 scales per 128 tokens
//
// Why a hand-written kernel: Triton issues each FP8 MMA and then waits for it before it can
// apply the 1x128 scales (DeepSeek-V3's promotion every 128 elements of K), so the tensor cores
// sit idle while the CUDA cores scale. Here the work is split the way DeepGEMM splits it:
//
//   - one producer warpgroup. Its first thread streams the 128 x 128 `a` tile and the 256 x 128
//     `b` tile of each 128-wide K block (plus their scales) into a ring of shared-memory stages
//     (Fprop three, Wgrad as many as the same bytes hold: see RING_BYTES) with the Tensor Memory
//     Accelerator (TMA), each stage guarded by a "full" mbarrier (the TMA's byte count completes
//     it) and an "empty" mbarrier (the consumers release it). Its other three warps are the
//     storers of bf16 outputs (Fprop, Dgrad, Wgrad): they write each finished tile from a
//     shared-memory staging tile to global memory in whole 512-byte rows, while the consumers
//     already multiply the next tile;
//   - two consumer warpgroups, 64 rows of the 128 x 256 output tile each. Per K block and per
//     128-column half they issue four m64n128k32 WGMMAs into a scratch accumulator, wait, and
//     fold the scratch into that half's fp32 accumulator scaled by the block's scales. While one
//     warpgroup scales, the other's MMAs keep the tensor cores busy. Registers: 2 x 64
//     accumulators + 64 scratch per thread, which setmaxnreg (232 for the consumers, 40 for the
//     producer warpgroup) makes room for.
//
// Measured (csrc/fp8_grouped/EXPERIMENTS.md has the figures and how each was made): on an H100
// the 128 x 256 tile, the staged epilogue, warp-uniform descriptors and stmatrix each paid, and
// Fprop/Dgrad's bands of 16 tile rows where experts are large (fprop_band); under sustained load
// every GEMM here runs at the power cap, so the clock follows how busy the SMs are and time
// follows energy per FLOP; Wgrad's promotion (two FP32 operations per element) cannot overlap the
// other warpgroup's MMAs without slowing them (csrc/probes/wgmma_fp32_contention.cu), and its K
// block takes ~1780 SM cycles against 1024 of tensor work. That file also lists every variant
// measured and not kept (other tile shapes, warpgroups taking turns, split tails, clusters, leaner
// loops, ...): read it before trying one.
//
// Both kernels are persistent: one CTA per SM walks the tiles, so the producer is already
// loading the next tile while the consumers store the previous one. The router's counts stay
// on the GPU: every CTA turns counts_E into per-expert tile and row offsets in shared memory
// (a scan over E values), so there is no host-side tile table and no device-to-host sync. Each
// walk goes to only as many CTAs as its rounds need (BALANCED_GRID on the host, FPROP_BALANCE
// on the GPU for the walk that depends on the counts): at the power cap, SMs idling through a
// last round cost the whole call a worse energy per FLOP.
//
// The contiguous layout is padded in tile space, not in memory (as in grouped.py): an expert's
// rows start a fresh 128-row tile; the last tile of an expert reads past its end (the next
// expert's rows, or TMA's zero fill past T) and stores only its own rows. Wgrad walks each
// expert's tokens in the 128-token groups of the whole sorted tensor (the groups its 128x1 scales
// belong to); a group shared with a neighbouring expert has the other expert's tokens zeroed in
// the shared-memory copy of `a` before the MMA.
//
// Shared-memory layout: TMA writes each 128-byte row of a tile with the 128-byte swizzle (16-byte
// chunk c of row r lands at chunk c ^ (r % 8)), which is the layout the WGMMA descriptors below
// name, so the tensor cores read it without bank conflicts. Accumulator layout of m64nN (PTX ISA,
// "wgmma register fragments"): thread t of the warpgroup holds, for j < N/8, the four values
// rows {16 w + l/4, +8} x cols {8 j + 2 (l%4), +1} at d[4j .. 4j+3] (w = warp, l = lane).
//
// Shape conditions: Fprop/Dgrad N and K multiples of 128 (a last tile column may be partial: its
// `b` rows past N are the next expert's or TMA's zero fill, its columns past N are not stored);
// Wgrad N a multiple of 128 and K of 256.
// Shape legend: T tokens, E experts, N output columns, K reduction, BM/BN/BK tile sizes.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

#include <algorithm>

#include "../common/device_ptx.cuh"  // smem_addr, mbar_init, mbar_arrive_expect_tx, ...
#include "../common/host_tma.cuh"  // tile_map, fail

namespace {

using csrc_common::cluster_sync;
using csrc_common::mbar_arrive_expect_tx;
using csrc_common::mbar_init;
using csrc_common::smem_addr;
using csrc_common::tma_load_tile;

constexpr int BM = 128;             // output rows per tile (two consumer warpgroups x 64)
// Wgrad output columns per tile: 256, two 128-column halves (one MMA batch and promotion each per
// K block); 128, one half, so that all its column scales fit in registers (WGRAD_PRELOAD=16).
#ifndef WGRAD_BN
#define WGRAD_BN 256
#endif
constexpr int BN = WGRAD_BN;
static_assert(BN == 128 || BN == 256, "WGRAD_BN: 128 or 256");
constexpr int HALF = 128;           // one half: one 128x128 weight block, one m64n128 WGMMA
constexpr int HALVES = BN / HALF;

// Fprop/Dgrad output columns per tile. 192: one m64n192 MMA batch per K block (96 scratch + 96
// accumulator registers); 256: two 128-column halves like Wgrad; 128: one m64n128 batch.
#ifndef FPROP_BN
#define FPROP_BN 256
#endif
constexpr int FBN = FPROP_BN;
constexpr int FPART = FBN == 256 ? 128 : FBN;  // columns of one MMA batch
constexpr int FPARTS = FBN / FPART;
constexpr int FREGS = FPART / 2;               // its accumulator registers per thread
static_assert(FBN == 128 || FBN == 192 || FBN == 256, "FPROP_BN: 128, 192 or 256");
constexpr int BK = 128;             // K per stage: one scale group, the promotion interval
constexpr int FPROP_STAGES = 3;    // + a staging tile for the epilogue (see fprop_storer)
// bf16 dW: written out of a staging tile by the storer warps like Fprop's output (WGRAD_STAGED=0:
// stores from registers, as for fp32 dW, and the staging tile's space holds more stages)
#ifndef WGRAD_STAGED
#define WGRAD_STAGED 1
#endif
constexpr int STORERS = 3;         // producer-warpgroup warps 1..3 write staged tiles out
constexpr int CONSUMERS = 2;
constexpr int THREADS = 128 * (CONSUMERS + 1);
constexpr int MAX_EXPERTS = 1024;
constexpr int SCALE_BOX = BM + 4;  // Fprop: a's scales from row0 & ~3, so BM + 3 rows at most

// One K block of operands and scales (1024-byte alignment: the 128-byte swizzle's repeat).
struct alignas(1024) Stage {  // Fprop / Dgrad
  uint8_t a[BM * BK];
  uint8_t b[FBN * BK];
  float sa[SCALE_BOX];  // the K block's scales of a's rows, from a 16-byte aligned row rounded
                        // down (TMA boxes start 16-byte aligned)
};
struct alignas(1024) WgradStage {
  uint8_t a[BM * BK];
  uint8_t b[BN * BK];
  float sa[BM];  // the token group's scales of dW's rows
  float sb[BN];  // and of its columns
};
constexpr uint32_t WGRAD_TILE_BYTES = (BM + BN) * BK;

// bf16 staging tile of a finished WIDTH-column output tile; a row's 16 bytes of padding spread
// stmatrix's rows over the banks.
template <int WIDTH>
__host__ __device__ constexpr int out_pitch() {
  return WIDTH + 8;
}
template <int WIDTH>
constexpr size_t out_tile_bytes() {
  return BM * out_pitch<WIDTH>() * sizeof(__nv_bfloat16);
}

// The stage ring, shared by the two kernels' layouts: Fprop's three stages and its staging tile;
// Wgrad fits as many of its stages as the same bytes hold (with its own staging tile for bf16 dW):
// three (four without staging) of 128 x 256 tiles, five (six) of 128 x 128.
constexpr size_t RING_BYTES = std::max(FPROP_STAGES * sizeof(Stage) + out_tile_bytes<FBN>(),
                                       3 * sizeof(WgradStage) + out_tile_bytes<BN>());
#ifndef WGRAD_MAX_STAGES
#define WGRAD_MAX_STAGES 8
#endif
constexpr int MAX_STAGES = 8;
constexpr int WGRAD_STAGED_STAGES = std::min<int>(
    WGRAD_MAX_STAGES, (RING_BYTES - out_tile_bytes<BN>()) / sizeof(WgradStage));
constexpr int WGRAD_DIRECT_STAGES = std::min<int>(WGRAD_MAX_STAGES,
                                                  RING_BYTES / sizeof(WgradStage));
static_assert(WGRAD_DIRECT_STAGES <= MAX_STAGES, "WGRAD_MAX_STAGES: 8 at most");

struct SharedStorage {
  alignas(1024) uint8_t ring[RING_BYTES];
  uint64_t full[MAX_STAGES];
  uint64_t empty[MAX_STAGES];
  uint64_t out_full;   // the consumers have staged a finished bf16 tile
  uint64_t out_empty;  // the storer warps have written it to global memory
  int tile_start[MAX_EXPERTS + 1];  // grouped_fprop: first M tile of each expert
  int row_start[MAX_EXPERTS + 1];   // first sorted row (token) of each expert

  __device__ __forceinline__ Stage& stage(int i) { return reinterpret_cast<Stage*>(ring)[i]; }
  __device__ __forceinline__ WgradStage& wgrad_stage(int i) {
    return reinterpret_cast<WgradStage*>(ring)[i];
  }
  // the staging tile lies after the kernel's stages
  __device__ __forceinline__ __nv_bfloat16* fprop_out_tile() {
    return reinterpret_cast<__nv_bfloat16*>(ring + FPROP_STAGES * sizeof(Stage));
  }
  __device__ __forceinline__ __nv_bfloat16* wgrad_out_tile() {
    return reinterpret_cast<__nv_bfloat16*>(ring + WGRAD_STAGED_STAGES * sizeof(WgradStage));
  }
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers: mbarriers, TMA, WGMMA (the ones both libraries use: ../common/device_ptx.cuh)

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}

// Spin until the phase with this parity has completed. A fresh barrier is in phase 0, so
// waiting for parity 1 returns at once: that is how the producer sees every stage empty at first.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred ready;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n"
      "@!ready bra WAIT;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}

// A shared-memory load the compiler would otherwise issue as a generic one (slower): `p` points
// into this CTA's shared memory.
__device__ __forceinline__ float ld_shared(const float* p) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(smem_addr(p)));
  return v;
}

// A contiguous run of global memory (16-byte aligned, a multiple of 16 bytes) into shared memory.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes),
      "r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_arrive_remote(uint64_t* bar, uint32_t cta_rank) {
  asm volatile(
      "{\n.reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n"
      ::"r"(smem_addr(bar)), "r"(cta_rank) : "memory");
}

// The same tile into the same shared-memory offset of every CTA in `cta_mask`, completing each
// one's mbarrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_multicast(void* dst, const CUtensorMap* map, uint64_t* bar,
                                                   int inner, int outer, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)),
      "r"(inner), "r"(outer), "h"(cta_mask) : "memory");
}

// Shared-memory matrix descriptor of a K-major tile with 128-byte rows and the 128-byte swizzle:
// start address (>> 4), leading offset 1 (unused by swizzled K-major layouts), stride 1024 bytes
// between groups of 8 rows, swizzle mode 1 (128B) in bits 62-63. Advancing K by 32 FP8 values
// inside the swizzle atom adds 32 bytes to the start address.
// The low word holds the start address and the leading offset, the high word the stride and the
// swizzle mode, which are the same for every tile here: the K loop only ever adds to the low word
// (shared memory ends below 2^18 bytes, so the 14-bit address field never carries).
constexpr uint32_t SMEM_DESC_HI = (1024 >> 4) | (1u << 30);
__device__ __forceinline__ uint32_t smem_desc_lo(const uint8_t* tile) {
  return ((smem_addr(tile) & 0x3FFFF) >> 4) | (1u << 16);
}
__device__ __forceinline__ uint64_t smem_desc(uint32_t lo) {
  return (uint64_t(SMEM_DESC_HI) << 32) | lo;
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}

// Keeps the compiler from moving accumulator reads/writes across the asynchronous MMA.
template <int R>
__device__ __forceinline__ void fence_registers(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Generated shape: one m64n128k32 FP8 (e4m3 x e4m3 -> f32) warpgroup MMA, operands in shared
// memory, 64 accumulator registers per thread. `accumulate` = 0 overwrites d (scale-d false).
__device__ __forceinline__ void wgmma_m64n128k32(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                 int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63},"
      " %64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
      "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
      "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),
      "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

// The same with N = 192: 96 accumulator registers per thread.
[[maybe_unused]] __device__ __forceinline__ void wgmma_m64n192k32(float (&d)[96], uint64_t desc_a,
                                                                  uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k32.f32.e4m3.e4m3 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19,"
      "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37,"
      "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55,"
      "%56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73,"
      "%74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91,"
      "%92, %93, %94, %95"
      "}, %96, %97, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
        "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
        "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
        "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
        "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
}

template <int R>
__device__ __forceinline__ void wgmma_k32(float (&d)[R], uint64_t desc_a, uint64_t desc_b,
                                          int accumulate) {
  static_assert(R == 64 || R == 96, "m64n128 or m64n192");
  if constexpr (R == 64) wgmma_m64n128k32(d, desc_a, desc_b, accumulate);
  else wgmma_m64n192k32(d, desc_a, desc_b, accumulate);
}

// ---------------------------------------------------------------------------------------------
// Pieces both kernels share

struct Counts {
  const void* ptr;
  int is_int64;
  __device__ __forceinline__ int operator[](int e) const {
    return is_int64 ? int(static_cast<const int64_t*>(ptr)[e]) : static_cast<const int*>(ptr)[e];
  }
};

// Warp 0 turns the router's counts into per-expert offsets: row_start (exclusive scan of the
// counts) and tile_start (exclusive scan of ceil(count / BM)); entry E holds the totals. Each
// lane scans a contiguous slice of experts, then the lanes' totals are scanned with shuffles.
__device__ void scan_counts(SharedStorage& s, Counts counts, int E) {
  const int lane = threadIdx.x % 32;
  const int per_lane = (E + 31) / 32;
  const int lo = min(lane * per_lane, E), hi = min(lo + per_lane, E);
  int rows = 0, tiles = 0;
  for (int e = lo; e < hi; ++e) {
    const int c = counts[e];
    rows += c;
    tiles += (c + BM - 1) / BM;
  }
  int rows_incl = rows, tiles_incl = tiles;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int r = __shfl_up_sync(0xffffffffu, rows_incl, offset);
    const int t = __shfl_up_sync(0xffffffffu, tiles_incl, offset);
    if (lane >= offset) {
      rows_incl += r;
      tiles_incl += t;
    }
  }
  int row = rows_incl - rows, tile = tiles_incl - tiles;
  for (int e = lo; e < hi; ++e) {
    s.row_start[e] = row;
    s.tile_start[e] = tile;
    const int c = counts[e];
    row += c;
    tile += (c + BM - 1) / BM;
  }
  if (lane == 31) {
    s.row_start[E] = rows_incl;
    s.tile_start[E] = tiles_incl;
  }
}

// Where this CTA sits in its thread-block cluster. Clusters of 2 CTAs work on two tiles side by
// side (same rows, neighbouring columns), so they share the `a` tile: each loads half of its rows
// and multicasts them into both CTAs, which halves the L2 traffic for `a`. Measured 5-10% slower
// than single CTAs on an H100 (the kernel does not wait on memory), so the host launches size 1.
// So is Wgrad, though cuBLAS's 1x128 x 1x128 kernel pairs CTAs (its name in the profiler ends
// 128x128_128x6_1x2_...): at 128 x 256 and at 128 x 128 (WGRAD_BN=128, WGRAD_PRELOAD=16), pairs
// ran 2-12% slower in 11 of the 12 tile-and-case runs over the six bench cases (5 interleaved
// rounds; +3% for 128 x 128 at 64 experts x 512 tokens). Unpaired, 128 x 128 ran at -6% to +2% of
// 128 x 256.
struct Cluster {
  int size, rank, index, count;  // CTAs per cluster, rank in it, cluster index, clusters
};

__device__ __forceinline__ Cluster cluster_position(int size) {
  uint32_t rank = 0;
  if (size > 1) asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  return Cluster{size, int(rank), int(blockIdx.x) / size, int(gridDim.x) / size};
}

__device__ void init_barriers(SharedStorage& s, int cluster_size) {
  for (int i = 0; i < MAX_STAGES; ++i) {
    mbar_init(&s.full[i], 1);  // the producer's expect_tx arrival
    // lane 0 of every consumer warp of every CTA of the cluster: a stage is refilled (by
    // multicast, also from the other CTA) only once every CTA has finished reading it
    mbar_init(&s.empty[i], CONSUMERS * 4 * cluster_size);
  }
  mbar_init(&s.out_full, CONSUMERS * 4);
  mbar_init(&s.out_empty, STORERS);
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

// Position in the stage ring; producer and consumers walk the same sequence of K blocks.
struct Ring {
  int stages;
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ explicit Ring(int n) : stages(n) {}
  __device__ __forceinline__ void advance() {
    if (++stage == stages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// Tile t of a band-major walk over m_tiles x n_tiles: bands of `band` tile rows, column by
// column inside a band, so the CTAs running at one time share operand tiles in L2.
__host__ __device__ __forceinline__ void band_order(int t, int m_tiles, int n_tiles, int band,
                                                    int& m, int& n) {
  const int per_band = band * n_tiles;
  const int first_m = (t / per_band) * band;
  const int band_rows = m_tiles - first_m < band ? m_tiles - first_m : band;
  m = first_m + (t % per_band) % band_rows;
  n = (t % per_band) / band_rows;
}

// Fprop/Dgrad's bands: FPROP_TALL_BAND tile rows where the experts average at least that many
// (2048 tokens an expert at 16), else FPROP_BAND. Measured at steady state (thirty-second session,
// H100, sweep_grouped_cuda.py --steady --power, 30 Fprop/Dgrad cells, 16 against 8 everywhere):
// -0.8% to +3.1% where experts hold 2048 tokens or more (dsv3-up E8 x 4096 Fprop 1078 -> 1103
// TFLOPS, past the cuBLAS loop's 1101; Dgrad 1063 -> 1093; dsv3-down E8 x 4096 Fprop +3.1%;
// dsv3-up E8 x 8192 +1.7% / +3.0%; small E16 x 2048 +0.4% to +2.0%), 0.0% to -2.1% where they
// hold 512 or 1024 (E64 x 512, E32 x 1024, E16 x 512, E64 x 1024), whose bands of 16 rows span
// several experts. Under short batches (earlier sessions) 4, 16 and 32 measured no better than 8:
// that method's noise was larger than these differences.
#ifndef FPROP_BAND
#define FPROP_BAND 8
#endif
#ifndef FPROP_TALL_BAND
#define FPROP_TALL_BAND 16
#endif
__host__ __device__ __forceinline__ int fprop_band(int m_tiles, int experts) {
  return m_tiles >= FPROP_TALL_BAND * experts ? FPROP_TALL_BAND : FPROP_BAND;
}

// Wgrad's bands (twelfth session): with 8 rows, ncu counted 1.26 GB of DRAM reads for one Wgrad
// at dsv3-up E8 x 4096 (3.4x the operands; each 256-column `b` stripe is read again for every
// band), against 0.79 GB for the cuBLAS loop's 8 kernels, and 6.6 / 14.2 GB of L2 traffic at
// dsv3-down / dsv3-up against the loop's 5.2 / 10.7. Bands of 16 or 32 rows (one `b` pass an
// expert) ran 0.96-1.03x the TFLOPS of 8 over the six bench cases (5 interleaved rounds): DRAM
// traffic is not what the Wgrad gap to the loop is made of.
#ifndef WGRAD_GROUP_M
#define WGRAD_GROUP_M 8
#endif

// One 128-wide K block of this warpgroup's 64 rows times 2 R rows of `b` (128 or 192): four MMAs
// into `scratch` (overwritten, or added to with add_to), issued (mma_wait waits). The
// descriptors are built from warp-uniform values (warp_uniform), so ptxas keeps them in uniform
// registers.
template <int R>
__device__ __forceinline__ void mma_issue(float (&scratch)[R], const uint8_t* a_rows,
                                          const uint8_t* b_rows, bool add_to = false) {
  const uint32_t a_lo = smem_desc_lo(a_rows), b_lo = smem_desc_lo(b_rows);
  fence_registers(scratch);
  wgmma_fence();
#pragma unroll
  for (int k = 0; k < BK / 32; ++k)  // +32 bytes of K = +2 in the descriptor's address field
    wgmma_k32(scratch, smem_desc(a_lo + 2 * k), smem_desc(b_lo + 2 * k), add_to || k > 0);
  wgmma_commit();
}

template <int R>
__device__ __forceinline__ void mma_wait(float (&scratch)[R]) {
  wgmma_wait_all();
  fence_registers(scratch);
}

template <int R>
__device__ __forceinline__ void mma_k_block(float (&scratch)[R], const uint8_t* a_rows,
                                            const uint8_t* b_rows) {
  mma_issue(scratch, a_rows, b_rows);
  mma_wait(scratch);
}

__device__ __forceinline__ void release_stage(SharedStorage& s, int stage, const Cluster& c) {
  if (threadIdx.x % 32 != 0) return;
  if (c.size == 1) {
    mbar_arrive(&s.empty[stage]);
  } else {
    for (int r = 0; r < c.size; ++r) mbar_arrive_remote(&s.empty[stage], r);
  }
}

// The `a` tile: this CTA's share of its rows, multicast to the cluster (all rows when alone).
__device__ __forceinline__ void load_a_tile(uint8_t* dst, const CUtensorMap* map, uint64_t* bar,
                                            int k0, int row0, const Cluster& c) {
  if (c.size == 1) {
    tma_load_tile(dst, map, bar, k0, row0);
  } else {
    const int rows = BM / c.size;
    tma_load_multicast(dst + c.rank * rows * BK, map, bar, k0, row0 + c.rank * rows,
                       uint16_t((1 << c.size) - 1));
  }
}

// Register budget: the producer warpgroup needs few, the consumers hold 2 x 64 accumulators.
__device__ __forceinline__ void producer_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
}
__device__ __forceinline__ void consumer_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
}

// A value every lane of the warp holds, said so to the compiler (a shuffle from lane 0): what is
// computed from it can then live in uniform registers, as the WGMMA descriptors must, instead of
// being computed per thread and moved over instruction by instruction.
// WARP_UNIFORM=0 leaves the compiler to find out (it does not), for measuring the difference.
#ifndef WARP_UNIFORM
#define WARP_UNIFORM 1
#endif
__device__ __forceinline__ int warp_uniform(int v) {
  return WARP_UNIFORM ? __shfl_sync(0xffffffffu, v, 0) : v;
}

__device__ __forceinline__ SharedStorage& shared_storage() {
  extern __shared__ uint8_t dynamic_smem[];
  const uintptr_t base = reinterpret_cast<uintptr_t>(dynamic_smem);
  return *reinterpret_cast<SharedStorage*>((base + 1023) & ~uintptr_t(1023));
}

// ---------------------------------------------------------------------------------------------
// Grouped along M (Fprop, Dgrad): out[t] = deq(a)[t] . deq(b[e(t)])^T

struct FpropArgs {  // a and its scales come through TMA maps
  int cluster_size;
  const float* sb;  // [E, N/128, K/128]
  int64_t sb_e, sb_n, sb_kb;
  void* out;        // [T, N] bf16 or fp32, row stride ld_out
  int64_t ld_out;
  int out_fp32;
  Counts counts;
  int T, N, K, E;
};

struct MTile {
  int expert, row0, row_end, col0;
};

// Tile t of the cluster's walk (its share of the pairs of side-by-side tiles).
__device__ __forceinline__ MTile fprop_tile(const SharedStorage& s, const FpropArgs& p, int t,
                                            int m_tiles, int n_tiles, const Cluster& c) {
  int m, n;
  band_order(t, m_tiles, n_tiles / c.size, fprop_band(m_tiles, p.E), m, n);
  n = n * c.size + c.rank;
  int lo = 0, hi = p.E - 1;  // the last expert whose first tile is <= m
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (s.tile_start[mid] <= m) lo = mid; else hi = mid - 1;
  }
  MTile tile;
  tile.expert = lo;
  tile.row0 = s.row_start[lo] + (m - s.tile_start[lo]) * BM;
  tile.row_end = s.row_start[lo + 1];
  tile.col0 = n * FBN;
  return tile;
}

__device__ void fprop_producer(SharedStorage& s, const CUtensorMap* map_a, const CUtensorMap* map_b,
                               const CUtensorMap* map_sa, const FpropArgs& p, int m_tiles,
                               int n_tiles, const Cluster& c) {
  Ring ring(FPROP_STAGES);
  for (int t = c.index; t < m_tiles * (n_tiles / c.size); t += c.count) {
    const MTile tile = fprop_tile(s, p, t, m_tiles, n_tiles, c);
    for (int kb = 0; kb < p.K / BK; ++kb, ring.advance()) {
      mbar_wait(&s.empty[ring.stage], ring.phase ^ 1);
      Stage& st = s.stage(ring.stage);
      mbar_arrive_expect_tx(&s.full[ring.stage], (BM + FBN) * BK + SCALE_BOX * sizeof(float));
      load_a_tile(st.a, map_a, &s.full[ring.stage], kb * BK, tile.row0, c);
      tma_load_tile(st.b, map_b, &s.full[ring.stage], kb * BK, tile.expert * p.N + tile.col0);
      tma_load_tile(st.sa, map_sa, &s.full[ring.stage], tile.row0 & ~3, kb);
    }
  }
}

// One fp32 pair (bf16 outputs always go through the staging tile).
__device__ __forceinline__ void store_pair(const FpropArgs& p, int row, int col, float x, float y) {
  *reinterpret_cast<float2*>(static_cast<float*>(p.out) + int64_t(row) * p.ld_out + col) =
      make_float2(x, y);
}

// The scale products of one K block for this thread's two rows (sa0, sa1) and the tile's columns.
// A tile starts at a multiple of 64 columns, so its columns meet at most two 128x128 blocks of
// `b` (scales sb0, sb1): columns 0-63 of the tile lie in the first, 128 and beyond in the second,
// and 64-127 in the first when the tile starts on a block boundary, else in the second.
struct BlockScales {
  float lo[2], mid[2], hi[2];  // [row half]: columns < 64, 64-127, >= 128
};

__device__ __forceinline__ BlockScales block_scales(float sa0, float sa1, float sb0, float sb1,
                                                    bool starts_mid_block) {
  const float sb_mid = starts_mid_block ? sb1 : sb0;
  return BlockScales{{sa0 * sb0, sa1 * sb0}, {sa0 * sb_mid, sa1 * sb_mid}, {sa0 * sb1, sa1 * sb1}};
}

// acc += buf scaled; buf covers tile columns col_base .. col_base + 2 R - 1 (col_base a multiple
// of 128, known at compile time, so each column group's choice of scale folds away).
template <int R, int COL_BASE>
__device__ __forceinline__ void promote(float (&acc)[R], float (&buf)[R], const BlockScales& f) {
  fence_registers(buf);
#pragma unroll
  for (int j = 0; j < R / 4; ++j) {
    const int col = COL_BASE + 8 * j;
    const float* sc = col < 64 ? f.lo : col < 128 ? f.mid : f.hi;
    acc[4 * j + 0] += buf[4 * j + 0] * sc[0];
    acc[4 * j + 1] += buf[4 * j + 1] * sc[0];
    acc[4 * j + 2] += buf[4 * j + 2] * sc[1];
    acc[4 * j + 3] += buf[4 * j + 3] * sc[1];
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float x, float y) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// One 64 x 2R part of a consumer's accumulators straight to global memory (fp32 output), its
// columns from part_col0 on, those at or past col_end dropped.
template <int R>
__device__ __forceinline__ void store_tile(const FpropArgs& p, const float (&acc)[R], int r0,
                                           int row_end, int part_col0, int col_end) {
  const int q = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < R / 4; ++j) {
    const int col = part_col0 + 8 * j + 2 * q;
    if (col >= col_end) continue;
    if (r0 < row_end) store_pair(p, r0, col, acc[4 * j + 0], acc[4 * j + 1]);
    if (r0 + 8 < row_end) store_pair(p, r0 + 8, col, acc[4 * j + 2], acc[4 * j + 3]);
  }
}

// stmatrix: four 8x8 bf16 matrices to shared memory in one instruction. Lane l's register i holds
// row l / 4, columns 2 (l % 4) and + 1 of matrix i, which is how a WGMMA accumulator fragment
// already lies in registers, and lanes 8 i .. 8 i + 7 give the addresses of matrix i's 8 rows.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2,
                                            uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};"
               ::"r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}

// One part into the shared-memory staging tile (rows and columns within the tile): per 16
// columns, the warp's 16 rows as four 8x8 matrices (rows + 0 / + 8, columns + 0 / + 8), one
// stmatrix. The row pitch (an odd number of 16-byte chunks) puts a matrix's 8 rows in different
// banks.
template <int WIDTH, int R>
__device__ __forceinline__ void stage_tile(__nv_bfloat16* tile, const float (&acc)[R], int row,
                                           int part_col0) {
  const int lane = threadIdx.x % 32, matrix = lane / 8;
  const int warp_row0 = row & ~15;  // row = the warp's first row + lane / 4
  const uint32_t addr = smem_addr(tile + (warp_row0 + 8 * (matrix % 2) + lane % 8) *
                                  out_pitch<WIDTH>() + part_col0 + 8 * (matrix / 2));
#pragma unroll
  for (int jp = 0; jp < R / 8; ++jp) {
    const float* a = acc + 8 * jp;
    stmatrix_x4(addr + 32 * jp, pack_bf16(a[0], a[1]), pack_bf16(a[2], a[3]),
                pack_bf16(a[4], a[5]), pack_bf16(a[6], a[7]));
  }
}

// Consumers: stage a finished tile (PARTS parts of 2 R columns) into `tile` for the storer warps
// once they have written out the previous one, and go on to the next tile.
// In two steps where MMAs run meanwhile: wait_staging_free (a spin loop, which must not lie
// between an MMA's issue and its wait) and stage_for_storers.
__device__ __forceinline__ void wait_staging_free(SharedStorage& s, uint32_t out_phase) {
  mbar_wait(&s.out_empty, out_phase ^ 1);
}

template <int PARTS, int R>
__device__ __forceinline__ void stage_for_storers(SharedStorage& s, __nv_bfloat16* tile,
                                                  const float (&acc)[PARTS][R], int row_in_tile,
                                                  uint32_t& out_phase) {
#pragma unroll
  for (int h = 0; h < PARTS; ++h) stage_tile<PARTS * 2 * R>(tile, acc[h], row_in_tile, h * 2 * R);
  __syncwarp();
  if (threadIdx.x % 32 == 0) mbar_arrive(&s.out_full);
  out_phase ^= 1;
}

template <int PARTS, int R>
__device__ __forceinline__ void hand_to_storers(SharedStorage& s, __nv_bfloat16* tile,
                                                const float (&acc)[PARTS][R], int row_in_tile,
                                                uint32_t& out_phase) {
  wait_staging_free(s, out_phase);
  stage_for_storers(s, tile, acc, row_in_tile, out_phase);
}

// Storer warps (producer-warpgroup warps 1..3): the staged tile's first `rows` rows and `cols`
// columns (a multiple of 8; WIDTH staged per row) to `out`, row stride ld, in whole rows (512
// bytes at WIDTH 256), then the staging tile is free for the consumers again.
template <int WIDTH>
__device__ __forceinline__ void write_staged_tile(SharedStorage& s, const __nv_bfloat16* tile,
                                                  __nv_bfloat16* out, int64_t ld, int rows,
                                                  int cols, uint32_t phase) {
  mbar_wait(&s.out_full, phase);
  for (int i = threadIdx.x - 32; i < rows * (WIDTH / 8); i += 32 * STORERS) {
    const int r = i / (WIDTH / 8), chunk = i % (WIDTH / 8);
    if (8 * chunk < cols)
      *reinterpret_cast<uint4*>(out + int64_t(r) * ld + 8 * chunk) =
          *reinterpret_cast<const uint4*>(tile + r * out_pitch<WIDTH>() + 8 * chunk);
  }
  __syncwarp();
  if (threadIdx.x % 32 == 0) mbar_arrive(&s.out_empty);
}

// FPROP_DIAG=3 (a diagnostic build, for timing only: its output is wrong): the consumers wait for
// a stage's data after its MMAs, just before releasing it, instead of before them, so that the
// time they spend waiting for data drops out (as WGRAD_DIAG=3 does for Wgrad). On the H100
// (thirtieth session) 0.93-1.00x the default: EXPERIMENTS.md.
#ifndef FPROP_DIAG
#define FPROP_DIAG 0
#endif

// The K block's MMA batches (one per FPART columns of the tile), each promoted as it completes;
// the stage is released once the last batch has read it.
template <int P = 0>
__device__ __forceinline__ void fprop_k_block(SharedStorage& s, const Stage& st, int stage,
                                              uint32_t phase, int wg_row0, const BlockScales& f,
                                              float (&acc)[FPARTS][FREGS], float (&scratch)[FREGS],
                                              const Cluster& c) {
  mma_k_block(scratch, st.a + wg_row0 * BK, st.b + P * FPART * BK);
  if (P == FPARTS - 1) {
    if (FPROP_DIAG == 3) mbar_wait(&s.full[stage], phase);
    release_stage(s, stage, c);
  }
  promote<FREGS, P * FPART>(acc[P], scratch, f);
  if constexpr (P + 1 < FPARTS)
    fprop_k_block<P + 1>(s, st, stage, phase, wg_row0, f, acc, scratch, c);
}

// The scales of `b` a tile's K blocks need, read one K block ahead so that the load's latency
// hides behind the MMAs: the (at most two) 128x128 blocks of b the tile's columns meet.
struct WeightScales {
  const float* sb0;
  const float* sb1;
  int64_t step;  // between K blocks
  float next0, next1;
  bool starts_mid_block;

  __device__ __forceinline__ WeightScales(const FpropArgs& p, const MTile& tile) {
    const int block0 = tile.col0 / 128, block1 = min(block0 + 1, p.N / 128 - 1);
    starts_mid_block = tile.col0 % 128 != 0;
    sb0 = p.sb + int64_t(tile.expert) * p.sb_e + int64_t(block0) * p.sb_n;
    sb1 = sb0 + int64_t(block1 - block0) * p.sb_n;
    step = p.sb_kb;
    next0 = __ldg(sb0);
    next1 = __ldg(sb1);
  }

  // K block kb's scale products for this thread's rows (sa: its first row's scale in the stage),
  // and the load of block kb + 1's weight scales.
  __device__ __forceinline__ BlockScales take(int kb, int k_blocks, const float* sa) {
    const float b0 = next0, b1 = next1;
    if (kb + 1 < k_blocks) {
      next0 = __ldg(sb0 + (kb + 1) * step);
      next1 = __ldg(sb1 + (kb + 1) * step);
    }
    return block_scales(ld_shared(sa), ld_shared(sa + 8), b0, b1, starts_mid_block);
  }
};

// FPROP_SCALE_PREFETCH=1: a consumer starts the global loads of the next tile's first weight
// scales before it hands the finished tile to the storers, instead of at the next tile's start,
// where their latency stalls the first K block.
#ifndef FPROP_SCALE_PREFETCH
#define FPROP_SCALE_PREFETCH 1
#endif

__device__ void fprop_consumer(SharedStorage& s, const FpropArgs& p, int m_tiles, int n_tiles,
                               int wg_row0, const Cluster& c) {
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int row_in_tile = wg_row0 + warp * 16 + lane / 4;
  float acc[FPARTS][FREGS], scratch[FREGS];
  Ring ring(FPROP_STAGES);
  uint32_t out_phase = 0;
  const int walk = m_tiles * (n_tiles / c.size);
  if (c.index >= walk) return;  // no tile for this CTA (nothing else to do: see the kernel)
  MTile tile = fprop_tile(s, p, c.index, m_tiles, n_tiles, c);
  WeightScales w(p, tile);
  for (int t = c.index; t < walk; t += c.count) {
    if (!FPROP_SCALE_PREFETCH) {
      tile = fprop_tile(s, p, t, m_tiles, n_tiles, c);
      w = WeightScales(p, tile);
    }
#pragma unroll
    for (int h = 0; h < FPARTS; ++h)
#pragma unroll
      for (int i = 0; i < FREGS; ++i) acc[h][i] = 0.f;
    const int k_blocks = p.K / BK;
    for (int kb = 0; kb < k_blocks; ++kb, ring.advance()) {
      if (FPROP_DIAG != 3) mbar_wait(&s.full[ring.stage], ring.phase);
      const Stage& st = s.stage(ring.stage);
      const BlockScales f = w.take(kb, k_blocks, st.sa + (tile.row0 & 3) + row_in_tile);
      fprop_k_block(s, st, ring.stage, ring.phase, wg_row0, f, acc, scratch, c);
    }
    const MTile done = tile;
    if (FPROP_SCALE_PREFETCH && t + c.count < walk) {
      tile = fprop_tile(s, p, t + c.count, m_tiles, n_tiles, c);
      w = WeightScales(p, tile);
    }
    if (!p.out_fp32) {
      hand_to_storers(s, s.fprop_out_tile(), acc, row_in_tile, out_phase);
    } else {
#pragma unroll
      for (int h = 0; h < FPARTS; ++h)
        store_tile(p, acc[h], done.row0 + row_in_tile, done.row_end, done.col0 + h * FPART, p.N);
    }
  }
}

// The storer warps' walk (bf16 output): each staged tile's real rows and columns, while the
// consumers already multiply the next tile.
__device__ void fprop_storer(SharedStorage& s, const FpropArgs& p, int m_tiles, int n_tiles,
                             const Cluster& c) {
  if (p.out_fp32) return;
  uint32_t phase = 0;
  for (int t = c.index; t < m_tiles * (n_tiles / c.size); t += c.count, phase ^= 1) {
    const MTile tile = fprop_tile(s, p, t, m_tiles, n_tiles, c);
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + int64_t(tile.row0) * p.ld_out +
                         tile.col0;
    write_staged_tile<FBN>(s, s.fprop_out_tile(), out, p.ld_out, min(BM, tile.row_end - tile.row0),
                           min(FBN, p.N - tile.col0), phase);
  }
}

// FPROP_BALANCE=1: the walk's tiles go to only as many clusters as its rounds need, as the host
// sizes a grid whose walk it knows (BALANCED_GRID). Fprop/Dgrad's walk depends on the router's
// counts, which the host does not see, so the host launches for the bound on the M tiles and the
// kernel deals the real walk here: DeepSeek-V3's up projection at 8 experts x 4096 tokens is 4096
// tiles, on 132 CTAs 31 rounds and a 32nd of 4 tiles, on 128 CTAs 32 whole rounds. That is the
// same number of rounds, but the other 128 SMs idle through the 32nd round of every call, and at
// the power cap such a dip costs more than its length: the DVFS then runs the rest of the call at
// a higher clock and a worse energy per FLOP (csrc/fp8_grouped/EXPERIMENTS.md: 1434 against 1370
// MHz, 1257 against 1230 mJ a call). Clusters past the ones a walk needs leave at once. Measured
// at steady state on the H100 (thirty-first session, against FPROP_BALANCE=0, outputs checked):
// Fprop +1.4% to +3.5% and Dgrad -1.0% to +3.6% where it changes the grid (dsv3-up E8 x 4096,
// dsv3-down E8 x 4096, dsv3-up E64 x 512, small-up and small-down E16 x 2048), within 0.7% at the
// E8 x 8192 cases, where it hardly does.
#ifndef FPROP_BALANCE
#define FPROP_BALANCE 1
#endif

// Clusters a walk of `walks` tiles can keep busy with room for `room`: one for an empty walk.
__host__ __device__ __forceinline__ int usable_clusters(int walks, int room) {
  return walks < 1 ? 1 : room < walks ? room : walks;
}

// The fewest clusters that run a walk of `walks` tiles in as few rounds as `room` clusters do
// (one for an empty walk): ceil(walks / rounds), so that every cluster takes the same number of
// tiles to within one. (The host's grid, persistent_clusters, and the kernel's, balanced.)
__host__ __device__ __forceinline__ int balanced_clusters(int walks, int room) {
  const int clusters = usable_clusters(walks, room);
  const int rounds = (walks + clusters - 1) / clusters;
  return rounds > 0 ? (walks + rounds - 1) / rounds : clusters;
}

// `c` with the walk of `walk` tiles dealt to balanced_clusters(walk, c.count) clusters: c.count
// becomes that number, and a cluster past it gets index `walk` (no tile).
__device__ __forceinline__ Cluster balanced(Cluster c, int walk) {
  if (!FPROP_BALANCE) return c;
  const int active = warp_uniform(balanced_clusters(walk, c.count));
  return Cluster{c.size, c.rank, warp_uniform(c.index < active ? c.index : walk), active};
}

__global__ void __launch_bounds__(THREADS, 1)
grouped_fprop_kernel(const __grid_constant__ CUtensorMap map_a,
                     const __grid_constant__ CUtensorMap map_b,
                     const __grid_constant__ CUtensorMap map_sa, const FpropArgs p) {
  SharedStorage& s = shared_storage();
  const Cluster launched = cluster_position(p.cluster_size);
  if (threadIdx.x < 32) scan_counts(s, p.counts, p.E);
  if (threadIdx.x == 32) init_barriers(s, launched.size);
  __syncthreads();
  if (launched.size > 1) cluster_sync();  // the other CTA's barriers exist before any reach them
  const int m_tiles = warp_uniform(s.tile_start[p.E]), n_tiles = (p.N + FBN - 1) / FBN;
  const Cluster c = balanced(launched, m_tiles * (n_tiles / launched.size));
  const int wg = warp_uniform(threadIdx.x / 128);
  if (wg == 0) {
    producer_registers();
    if (threadIdx.x == 0) fprop_producer(s, &map_a, &map_b, &map_sa, p, m_tiles, n_tiles, c);
    if (threadIdx.x >= 32) fprop_storer(s, p, m_tiles, n_tiles, c);
  } else {
    consumer_registers();
    fprop_consumer(s, p, m_tiles, n_tiles, (wg - 1) * 64, c);
  }
  if (c.size > 1) cluster_sync();  // nobody exits while the other CTA may still signal it
}

// ---------------------------------------------------------------------------------------------
// Grouped along K (Wgrad): out[e] (+)= deq(a)[rows of e]^T . deq(b)[rows of e]

struct WgradArgs {
  int cluster_size;
  const float* sa;  // [ceil(T/128), N], unit stride along N
  int64_t sa_g;
  const float* sb;  // [ceil(T/128), K], unit stride along K
  int64_t sb_g;
  void* out;        // [E, N, K] fp32 or bf16, unit stride along K
  int64_t out_e, out_n;
  int out_bf16;
  int accumulate;   // out += result (fp32 arithmetic) instead of out = result
  Counts counts;
  int T, N, K, E;
};

struct KTile {
  int expert, row0, col0, start, end, group_lo, groups;
};

// Which tiles a Wgrad cluster pairs (sixteenth session; measurement builds). 0: side by side
// (same rows, neighbouring columns), sharing the 128-row `a` tile by multicast, as Fprop does.
// 1: one above the other (rows m and m + 1, same columns), sharing the 256-row `b` tile, which
// halves the larger operand's L2 reads: ncu counted 5.64 GB of L2 reads from the SMs for one
// Wgrad at dsv3-down E8 x 4096 here (the 128 x 256 tiles' operands exactly) against 4.25 GB for
// the cuBLAS loop's 8 kernels (its 1x2 clusters of 128 x 128 tiles read like 256 x 256 ones),
// a plausible share of the loop's 2-4.5% lower energy a call at the power cap. Measured (H100,
// scripts/sweep_grouped_cuda.py, 5 rounds, WGRAD_CLUSTER=2): pairs sharing `b` ran 0.92-0.96x
// the unpaired default on five of the six bench cases (1.03x at 64 experts x 512 tokens), pairs
// sharing `a` 0.93-0.99x: the two CTAs' K loops wait for each other at every stage, which costs
// more than the L2 traffic saves. Not kept (default 0, clusters of 1).
#ifndef WGRAD_SHARE_B
#define WGRAD_SHARE_B 0
#endif
// WGRAD_CLUSTER=n > 0: Wgrad's cluster size whatever the caller asks (measurement builds).
#ifndef WGRAD_CLUSTER
#define WGRAD_CLUSTER 0
#endif
constexpr bool SHARE_B = WGRAD_SHARE_B;

// Wgrad tile rows and columns a cluster's walk steps over (the shared dimension counts pairs).
__device__ __forceinline__ int wgrad_m_steps(const WgradArgs& p, const Cluster& c) {
  return p.N / BM / (SHARE_B ? c.size : 1);
}
__device__ __forceinline__ int wgrad_n_steps(const WgradArgs& p, const Cluster& c) {
  return p.K / BN / (SHARE_B ? 1 : c.size);
}

__device__ __forceinline__ int wgrad_walk_length(const WgradArgs& p, const Cluster& c) {
  return p.E * wgrad_m_steps(p, c) * wgrad_n_steps(p, c);
}

__device__ __forceinline__ KTile wgrad_tile(const SharedStorage& s, const WgradArgs& p, int t,
                                            const Cluster& c) {
  const int m_tiles = wgrad_m_steps(p, c), n_tiles = wgrad_n_steps(p, c);
  const int per_expert = m_tiles * n_tiles;
  KTile tile;
  tile.expert = t / per_expert;
  int m, n;
  band_order(t % per_expert, m_tiles, n_tiles, WGRAD_GROUP_M, m, n);
  if (SHARE_B) m = m * c.size + c.rank;
  else n = n * c.size + c.rank;
  tile.row0 = m * BM;
  tile.col0 = n * BN;
  tile.start = s.row_start[tile.expert];
  tile.end = s.row_start[tile.expert + 1];
  tile.group_lo = tile.start / BK;
  tile.groups = tile.end > tile.start ? (tile.end - 1) / BK - tile.group_lo + 1 : 0;
  return tile;
}

// (Accumulating into bf16 stays with the stores from registers: the sum is rounded once there.)
__device__ __forceinline__ bool wgrad_staged(const WgradArgs& p) {
  return WGRAD_STAGED && p.out_bf16 && !p.accumulate;
}

__device__ __forceinline__ int wgrad_stages(const WgradArgs& p) {
  return wgrad_staged(p) ? WGRAD_STAGED_STAGES : WGRAD_DIRECT_STAGES;
}

__device__ void wgrad_producer(SharedStorage& s, const CUtensorMap* map_a, const CUtensorMap* map_b,
                               const WgradArgs& p, const Cluster& c) {
  Ring ring(wgrad_stages(p));
  for (int t = c.index; t < wgrad_walk_length(p, c); t += c.count) {
    const KTile tile = wgrad_tile(s, p, t, c);
    for (int g = tile.group_lo; g < tile.group_lo + tile.groups; ++g, ring.advance()) {
      mbar_wait(&s.empty[ring.stage], ring.phase ^ 1);
      WgradStage& st = s.wgrad_stage(ring.stage);
      mbar_arrive_expect_tx(&s.full[ring.stage], WGRAD_TILE_BYTES + (BM + BN) * sizeof(float));
      if (SHARE_B && c.size > 1) {  // own `a`; this CTA's share of `b`'s rows, to the cluster
        tma_load_tile(st.a, map_a, &s.full[ring.stage], g * BK, tile.row0);
        const int rows = BN / c.size;
        tma_load_multicast(st.b + c.rank * rows * BK, map_b, &s.full[ring.stage], g * BK,
                           tile.col0 + c.rank * rows, uint16_t((1 << c.size) - 1));
      } else {
        load_a_tile(st.a, map_a, &s.full[ring.stage], g * BK, tile.row0, c);
        tma_load_tile(st.b, map_b, &s.full[ring.stage], g * BK, tile.col0);
      }
      bulk_load(st.sa, p.sa + int64_t(g) * p.sa_g + tile.row0, BM * sizeof(float),
                &s.full[ring.stage]);
      bulk_load(st.sb, p.sb + int64_t(g) * p.sb_g + tile.col0, BN * sizeof(float),
                &s.full[ring.stage]);
    }
  }
}

// In this warpgroup's 64 rows of the swizzled `a` tile, zero the tokens of the 128-token group
// starting at token0 that lie outside [start, end): they belong to a neighbouring expert.
__device__ void mask_other_experts(uint8_t* rows, int token0, int start, int end) {
  for (int i = threadIdx.x % 128; i < 64 * 8; i += 128) {
    const int r = i / 8, chunk = i % 8;
    const int first = token0 + 16 * (chunk ^ (r % 8));  // the chunk's first token
    if (first >= start && first + 16 <= end) continue;
    uint8_t* bytes = rows + r * BK + 16 * chunk;
    for (int b = 0; b < 16; ++b)
      if (first + b < start || first + b >= end) bytes[b] = 0;
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the tensor cores
}

// At the start of each tile consumer warpgroup 2 issues its first MMA batch only once warpgroup
// 1's first batch has completed (both meet at named barrier OFFSET_BAR, 1 after that batch, 2
// before its own), so that the two start half a period apart, one promoting while the other's
// batch runs (EXPERIMENTS.md's timeline: they drift back into step within a few K blocks). Both wait
// there: with 1 only arriving, it could arrive twice (two tiles of one 128-token group each)
// before 2 got there, and the barrier's count would pair the wrong tiles and hang. Three
// interleaved sweeps over the six bench cases (two of the one-sided version): 0.95-1.07x the
// kernel without it, 1.02x on average, 1.01-1.07x in every run of the three 8-expert DeepSeek-V3
// cases. WGRAD_OFFSET=0 leaves it out.
#ifndef WGRAD_OFFSET
#define WGRAD_OFFSET 1
#endif
constexpr int OFFSET_BAR = 3;  // 0 is __syncthreads, 1 and 2 are warpgroup_sync's

// Named barrier `id` (1..15; 0 is __syncthreads) for `threads` threads, a multiple of 32.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void warpgroup_sync(int wg) { named_barrier_sync(wg, 128); }

// Wgrad: how many of a thread's 16 column-scale pairs per 128-column half are read from shared
// memory while the half's MMAs run (between commit and wait) rather than after them, where each
// load's latency stalls the promotion that needs it. Each pair held costs two registers across the
// wait; all 16 spill. Re-measured after the eleventh session's loop changes (WGRAD_CYCLES, SM
// cycles a K block, dsv3-down E8 x 4096 / dsv3-up E64 x 512 / small-down E16 x 2048): 0 pairs
// 1979 / 2492 / 2052, 4 1874 / 2625 / 1944, 5 1856 / 2569 / 1929, 6 1868 / 2624 / 1940, 7
// 1869 / 2638 / 1943, 8 1921 / 2645 / 1979, 10 and 12 2000-2900 (they spill in the loop); in
// a sweep of the six bench cases 5 reached 1.005-1.09x and 4 1.01-1.12x the TFLOPS of 8.
#ifndef WGRAD_PRELOAD
#define WGRAD_PRELOAD 5
#endif
constexpr int PRELOAD = WGRAD_PRELOAD;
static_assert(PRELOAD >= 0 && PRELOAD <= 16, "WGRAD_PRELOAD: 0..16 scale pairs");
// With every scale of the last half in registers the stage is released as soon as its MMAs are
// done, before the promotion (as DeepGEMM's 1D1D kernel does), so the producer refills it sooner.
constexpr bool EARLY_RELEASE = PRELOAD == 16;
// Diagnostic builds, for timing only (their dW is wrong: scripts/sweep_grouped_cuda.py
// --diagnostic): 1 promotes with the row scales alone (one FFMA per element, no column scales),
// 2 skips the promotion (the MMAs add straight into the accumulators). On the H100 (six cases):
// 1.15-1.30x and 1.37-1.70x the real kernel: the promotion, not the data path, sets its pace.
// 3 moves the consumers' wait for each stage's data from before its MMAs to before its release
// (they multiply whatever the stage holds by then): 1.00-1.03x (tenth session), so waiting for
// data costs at most 3%. 4 leaves out the tile epilogue (no dW; a sum of the accumulators keeps
// ptxas from deleting the whole computation, which an empty asm fence does not): 0.97-1.08x at
// 2048-8192 tokens an expert, but 1.34x at 64 experts x 512 tokens, whose dW (64 x 4096 x 7168
// bf16, 3.8 GB) is ten times its operands: writing it, not the epilogue's code, is what costs
// there (the loop writes the same bytes). 2, timed in 3's sweep: 1.17-1.56x, 1219-1272
// TFLOPS on the DeepSeek-V3 shapes. The probe's K loop of the same arithmetic without barriers or
// loads (csrc/probes/wgmma_fp32_contention.cu) takes ~1640 cycles a K block; fed by a producer
// through full and empty barriers with this kernel's own tensor-map loads of real operands and
// its promotion code, ~1760. This kernel (WGRAD_CYCLES=1, below), dsv3-down E8 x 4096 / dsv3-up
// E64 x 512: 2092 / 2906 at the eleventh session's start; 1957 / 2742 with the expert-boundary
// check against two per-tile group indices (mask_first, mask_last) instead of the token bounds,
// and the ring's stage count a compile-time constant (wgrad_consumer<STAGED>); 1921 / 2671 with
// the epilogue under the next tile's first MMAs (WGRAD_OVERLAP). Neither random operand bits
// nor fewer CTAs (33, 66) move these counts (the probe's neither): the gap is per SM, not power,
// L2 or DRAM. Fitted over 4096 and 8192 tokens an expert, a steady K block now takes ~1843
// cycles and a tile's start and end ~2500 more. ncu (unlocked clocks, dsv3-down / dsv3-up E8 x
// 4096): 1.768M / 3.448M cycles against the cuBLAS loop's 1.687M / 3.288M (+4.8% / +4.9%; 7% and
// about 14% before), with 3% fewer instructions; tensor pipe 52.8-53.1% busy against 56.2-56.9%.
#ifndef WGRAD_DIAG
#define WGRAD_DIAG 0
#endif

__device__ __forceinline__ float2 ld_shared_v2(const float* p) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(smem_addr(p)));
  return v;
}

// The four scale products a thread's column pair j needs: its two rows' scales s0, s1 times the
// pair's two column scales.
__device__ __forceinline__ float4 outer_scales(float s0, float s1, float2 sb) {
  return make_float4(s0 * sb.x, s0 * sb.y, s1 * sb.x, s1 * sb.y);
}

// The first PRELOAD column-scale pairs' products, read and formed between a half's MMA issue and
// its wait. Asked for before the wait; ptxas keeps them there where registers allow (all 64
// products at 128 x 128; at 128 x 256 it moves them into the promotion).
__device__ __forceinline__ void early_products(float4 (&early)[PRELOAD + 1], float s0, float s1,
                                               const float* col_scales) {
#pragma unroll
  for (int j = 0; j < PRELOAD; ++j) {
    early[j] = outer_scales(s0, s1, ld_shared_v2(col_scales + 8 * j));
    asm volatile("" : "+f"(early[j].x), "+f"(early[j].y), "+f"(early[j].z), "+f"(early[j].w));
  }
}

// acc += scratch scaled by its rows' and columns' 128x1 scales (both operands scaled per token
// group): column pair j's scale products are early[j] for j < PRELOAD (formed while the MMAs ran),
// else formed here from the stage's column scales.
[[maybe_unused]] __device__ __forceinline__ void promote_outer(
    float (&acc)[64], float (&scratch)[64], float s0, float s1,
    const float4 (&early)[PRELOAD + 1], const float* col_scales) {
  fence_registers(scratch);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const float4 f =
        j < PRELOAD ? early[j] : outer_scales(s0, s1, ld_shared_v2(col_scales + 8 * j));
    acc[4 * j + 0] += scratch[4 * j + 0] * f.x;
    acc[4 * j + 1] += scratch[4 * j + 1] * f.y;
    acc[4 * j + 2] += scratch[4 * j + 2] * f.z;
    acc[4 * j + 3] += scratch[4 * j + 3] * f.w;
  }
}

__device__ __forceinline__ void store_wgrad_pair(const WgradArgs& p, int64_t offset, float x,
                                                 float y) {
  if (p.out_bf16) {
    __nv_bfloat162* o =
        reinterpret_cast<__nv_bfloat162*>(static_cast<__nv_bfloat16*>(p.out) + offset);
    if (p.accumulate) {
      const float2 old = __bfloat1622float2(*o);
      x += old.x;
      y += old.y;
    }
    *o = __floats2bfloat162_rn(x, y);
  } else {
    float2* o = reinterpret_cast<float2*>(static_cast<float*>(p.out) + offset);
    if (p.accumulate) {
      const float2 old = *o;
      x += old.x;
      y += old.y;
    }
    *o = make_float2(x, y);
  }
}

__device__ void store_wgrad(const WgradArgs& p, const float (&acc)[64], int expert, int r0,
                            int col0) {
  const int64_t base = int64_t(expert) * p.out_e + col0;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    store_wgrad_pair(p, base + int64_t(r0) * p.out_n + 8 * j, acc[4 * j + 0], acc[4 * j + 1]);
    store_wgrad_pair(p, base + int64_t(r0 + 8) * p.out_n + 8 * j, acc[4 * j + 2], acc[4 * j + 3]);
  }
}

// WGRAD_CYCLES=1 (measurement only): the first four CTAs' consumer warpgroups record their SM
// cycles from start to end and the K blocks they did, for cycles per K block free of the clock's
// changes under the power cap; a one-thread kernel launched after each Wgrad prints them
// (report_wgrad_cycles). WGRAD_CYCLES=2 adds a timeline: CTA 0's consumer warpgroups stamp
// clock64 at each step of every K block (KStep) and at each tile's start and end, and the report
// gives each step's mean length. The probe's fed K loop stamps the same steps. Its stamps inside
// the K block make ptxas spill around the MMAs (~+10% a K block); WGRAD_CYCLES=3 stamps only each
// K block's start and end and the tiles' (+5% a K block). Eleventh session, dsv3-down E8 x 4096,
// CTA 0: a K block after a tile's first ~1790 cycles and ~110 between K blocks; a tile's first K
// block (which also stages the previous tile and starts warpgroup 2 late) 2530-2680; the tile's
// start up to its first K block (the tile's coordinates: divisions, shared loads, broadcasts)
// ~420; from one tile's end to the next one's start 600-800. Reading the expert bounds through
// shared-space loads instead of generic ones moved these by nothing measurable (1863 against
// 1856 cycles a K block at E8 x 4096, 2550 against 2569 at E64 x 512). The kernel itself
// must not printf: a call inside it makes ptxas serialize every WGMMA (warning C7510), which
// the tenth session's WGRAD_CYCLES build did (its 2220-2240 cycles a K block were that
// serialized build's: the default ran about 7% faster in the same call).
#ifndef WGRAD_CYCLES
#define WGRAD_CYCLES 0
#endif
enum KStep { K_TOP, K_DATA, K_MMA0, K_PROMO0, K_MMA1, K_PROMO1, K_END, K_STEPS };
#if WGRAD_CYCLES
constexpr int CYCLED_CTAS = 4;
__device__ long long consumer_cycles[CYCLED_CTAS][2][2];  // cycles, K blocks
// every CTA's cycles (its first consumer warpgroup's): the slowest is the kernel's length in SM
// cycles, its gap to the mean what the last partial wave of tiles costs
constexpr int MAX_CYCLED_CTAS = 1024;
__device__ long long cta_cycles[MAX_CYCLED_CTAS];
__device__ int cycled_ctas;
#endif
#if WGRAD_CYCLES >= 2
constexpr int STAMPED_K_BLOCKS = 2048, STAMPED_TILES = 128;
__device__ long long k_stamps[2][STAMPED_K_BLOCKS][K_STEPS];
__device__ long long tile_stamps[2][STAMPED_TILES][2];  // a tile's start, its epilogue's end
__device__ int tile_first_k[2][STAMPED_TILES];           // the index of a tile's first K block
__device__ int stamped_counts[2][2];                     // K blocks, tiles

__device__ __forceinline__ bool stamping() {
  return blockIdx.x == 0 && threadIdx.x % 128 == 0;
}
#endif

__device__ __forceinline__ void stamp_k(int wg, int kb, KStep step) {
#if WGRAD_CYCLES >= 2
  if (WGRAD_CYCLES == 3 && step != K_TOP && step != K_END) return;
  if (stamping() && kb < STAMPED_K_BLOCKS) k_stamps[wg - 1][kb][step] = clock64();
#endif
}

// which: 0 a tile's start (its first K block is number kb), 1 the end of its epilogue
__device__ __forceinline__ void stamp_tile(int wg, int tile, int kb, int which) {
#if WGRAD_CYCLES >= 2
  if (!stamping() || tile >= STAMPED_TILES) return;
  tile_stamps[wg - 1][tile][which] = clock64();
  if (which == 0) tile_first_k[wg - 1][tile] = kb;
#endif
}

// At a consumer warpgroup's end: its cycles since `start` and its K blocks; its timeline's size.
__device__ __forceinline__ void record_cycles(int wg, long long start, int k_blocks, int tiles) {
#if WGRAD_CYCLES
  if (blockIdx.x < CYCLED_CTAS && threadIdx.x % 128 == 0) {
    consumer_cycles[blockIdx.x][wg - 1][0] = clock64() - start;
    consumer_cycles[blockIdx.x][wg - 1][1] = k_blocks;
  }
  if (wg == 1 && threadIdx.x % 128 == 0 && blockIdx.x < MAX_CYCLED_CTAS) {
    cta_cycles[blockIdx.x] = clock64() - start;
    if (blockIdx.x == 0) cycled_ctas = min(int(gridDim.x), MAX_CYCLED_CTAS);
  }
#endif
#if WGRAD_CYCLES >= 2
  if (stamping()) {
    stamped_counts[wg - 1][0] = k_blocks;
    stamped_counts[wg - 1][1] = tiles;
  }
#endif
}

#if WGRAD_CYCLES >= 2
// Mean cycles of each step of the K blocks that do not start a tile, and the gap before them;
// of a tile's first K block whole; of a tile's start up to its first K block (head) and of its
// last K block's end up to the epilogue's end; and of the step from one tile's epilogue to the
// next tile's start.
__device__ void report_k_steps(int wg) {
  const long long(*k)[K_STEPS] = k_stamps[wg - 1];
  const long long(*tl)[2] = tile_stamps[wg - 1];
  const int k_blocks = min(stamped_counts[wg - 1][0], STAMPED_K_BLOCKS);
  const int tiles = min(stamped_counts[wg - 1][1], STAMPED_TILES);
  double step[K_STEPS] = {}, gap = 0, first = 0, head = 0, epilogue = 0, between = 0;
  int inner = 0, counted = 0;
  for (int t = 0; t < tiles; ++t) {
    const int f = tile_first_k[wg - 1][t];
    const int l = min(t + 1 < tiles ? tile_first_k[wg - 1][t + 1] : k_blocks, k_blocks) - 1;
    if (t + 1 < tiles) between += tl[t + 1][0] - tl[t][1];
    if (f > l) continue;
    ++counted;
    head += k[f][K_TOP] - tl[t][0];
    epilogue += tl[t][1] - k[l][K_END];
    first += k[f][K_END] - k[f][K_TOP];
    for (int b = f + 1; b <= l; ++b, ++inner) {
      for (int i = 0; i + 1 < K_STEPS; ++i) step[i] += k[b][i + 1] - k[b][i];
      gap += k[b][K_TOP] - k[b - 1][K_END];
    }
  }
  const double n = max(inner, 1), c = max(counted, 1);
  if (WGRAD_CYCLES == 3) {  // only the K blocks' ends stamped: their steps' sum is the K block
    double k_block = 0;
    for (int i = 0; i + 1 < K_STEPS; ++i) k_block += step[i];
    printf("wgrad tile timeline, CTA 0 warpgroup %d: %d K blocks after a tile's first %.0f cycles "
           "each, gap %.0f; %d tiles: first K block %.0f, head %.0f, epilogue %.0f, to the next "
           "tile %.0f\n", wg, inner, k_block / n, gap / n, counted, first / c, head / c,
           epilogue / c, between / max(tiles - 1, 1));
    return;
  }
  printf("wgrad timeline, CTA 0 warpgroup %d, %d K blocks after a tile's first: data wait %.0f, "
         "mma0 %.0f, promo0 %.0f, mma1 %.0f, promo1 %.0f, release %.0f, gap %.0f cycles; "
         "%d tiles: first K block %.0f, head %.0f, epilogue %.0f, to the next tile %.0f\n",
         wg, inner, step[0] / n, step[1] / n, step[2] / n, step[3] / n, step[4] / n, step[5] / n,
         gap / n, counted, first / c, head / c, epilogue / c, between / max(tiles - 1, 1));
}
#endif

#if WGRAD_CYCLES
// One thread, launched after a WGRAD_CYCLES build's Wgrad: prints what its consumers recorded.
__global__ void report_wgrad_cycles() {
  for (int b = 0; b < CYCLED_CTAS; ++b)
    for (int wg = 1; wg <= 2; ++wg) {
      const long long cycles = consumer_cycles[b][wg - 1][0], k = consumer_cycles[b][wg - 1][1];
      printf("wgrad CTA %d warpgroup %d: %lld cycles, %lld K blocks, %.0f a K block\n", b, wg,
             cycles, k, double(cycles) / double(max(k, 1ll)));
    }
  long long slowest = 0;
  double sum = 0;
  for (int b = 0; b < cycled_ctas; ++b) {
    slowest = max(slowest, cta_cycles[b]);
    sum += double(cta_cycles[b]);
  }
  printf("wgrad CTAs: %d, slowest %lld cycles, mean %.0f\n", cycled_ctas, slowest,
         sum / max(cycled_ctas, 1));
#if WGRAD_CYCLES >= 2
  report_k_steps(1);
  report_k_steps(2);
#endif
}
#endif

// WGRAD_OVERLAP=1: a finished tile's epilogue (staging its bf16 dW for the storer warps) runs
// while the next tile's first MMA batch does, not before it starts. (dW stored from registers,
// fp32 or accumulated, keeps its epilogue at the tile's end.) Eleventh session, H100: 1.2-1.7%
// fewer SM cycles a K block on four cases (WGRAD_CYCLES); WGRAD_OVERLAP=0 ran 0.92-0.99x in a
// sweep of the six bench cases, and 0.97-1.05x (mean 1.01x) in another.
#ifndef WGRAD_OVERLAP
#define WGRAD_OVERLAP 1
#endif
// (not with WGRAD_DIAG=4, which writes no dW, nor 2, whose K blocks skip the staging point)
constexpr bool OVERLAP = WGRAD_OVERLAP && WGRAD_DIAG != 4 && WGRAD_DIAG != 2;

__device__ __forceinline__ void zero_accumulators(float (&acc)[HALVES][64]) {
#pragma unroll
  for (int h = 0; h < HALVES; ++h)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[h][i] = 0.f;
}

// A consumer's tile: the K loop's bounds and branches, read from shared memory, uniform for the
// descriptors.
__device__ __forceinline__ KTile consumer_tile(const SharedStorage& s, const WgradArgs& p, int t,
                                               const Cluster& c) {
  KTile tile = wgrad_tile(s, p, t, c);
  tile.group_lo = warp_uniform(tile.group_lo);
  tile.groups = warp_uniform(tile.groups);
  tile.start = warp_uniform(tile.start);
  tile.end = warp_uniform(tile.end);
  return tile;
}

// WGRAD_NEXT_TILE=1: each consumer works out its next tile's coordinates (divisions, shared
// loads, broadcasts: ~420 cycles, WGRAD_CYCLES=3) while its current tile's first K block's
// second MMA batch runs, not between the two tiles. Eleventh session (WGRAD_CYCLES=1, SM cycles
// a K block, against WGRAD_NEXT_TILE=0): dsv3-up E64 x 512 (4 K blocks a tile) 2509 against 2633,
// 1.07x the TFLOPS in a sweep; at 16-64 K blocks a tile (dsv3 E8 x 4096 / 8192, small-down) no
// change (1862 / 1820 / 1934 against 1866 / 1819 / 1935).
#ifndef WGRAD_NEXT_TILE
#define WGRAD_NEXT_TILE 1
#endif
// (WGRAD_DIAG=2's K blocks skip the place where the next tile is worked out)
constexpr bool NEXT_TILE = WGRAD_NEXT_TILE && WGRAD_DIAG != 2;

// STAGED: wgrad_staged(p), as a compile-time constant (the ring's stage count with it)
template <bool STAGED>
__device__ void wgrad_consumer(SharedStorage& s, const WgradArgs& p, int wg, const Cluster& c) {
  const int wg_row0 = (wg - 1) * 64;
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int row_in_tile = wg_row0 + warp * 16 + lane / 4;
  const int col_in_tile = 2 * (lane % 4);
  float acc[HALVES][64], scratch[64];
  Ring ring(STAGED ? WGRAD_STAGED_STAGES : WGRAD_DIRECT_STAGES);
  constexpr bool overlap = STAGED && OVERLAP;
  uint32_t out_phase = 0;
  bool pending = false;  // overlap: acc holds a finished tile not yet staged
  if (overlap) zero_accumulators(acc);
  [[maybe_unused]] const long long cycles0 = WGRAD_CYCLES ? clock64() : 0;
  // the K blocks and tiles done so far: WGRAD_CYCLES's counts and its timeline's indices
  [[maybe_unused]] int k_done = 0, tiles_done = 0;
  const int walk = wgrad_walk_length(p, c);
  KTile next = consumer_tile(s, p, c.index, c);
  for (int t = c.index; t < walk; t += c.count) {
    stamp_tile(wg, tiles_done, k_done, 0);
    const KTile tile = NEXT_TILE ? next : consumer_tile(s, p, t, c);
    const bool more = t + c.count < walk;
    if (NEXT_TILE && more && tile.groups == 0) next = consumer_tile(s, p, t + c.count, c);
    // the tile's first and last 128-token groups when they hold another expert's tokens too
    // (else -1): one check of the K block's index against these, not against the token bounds
    const int mask_first = warp_uniform(tile.start % BK ? tile.group_lo : -1);
    const int mask_last = warp_uniform(tile.end % BK ? tile.group_lo + tile.groups - 1 : -1);
    if (!overlap) {
      zero_accumulators(acc);
    } else if (pending && tile.groups == 0) {  // no MMA to hide the finished tile's epilogue
      hand_to_storers(s, s.wgrad_out_tile(), acc, row_in_tile, out_phase);
      zero_accumulators(acc);
      pending = false;
    }
    for (int g = tile.group_lo; g < tile.group_lo + tile.groups; ++g, ring.advance()) {
      stamp_k(wg, k_done, K_TOP);
      if (WGRAD_DIAG != 3) mbar_wait(&s.full[ring.stage], ring.phase);
      stamp_k(wg, k_done, K_DATA);
      WgradStage& st = s.wgrad_stage(ring.stage);
      if (g == mask_first || g == mask_last) {
        mask_other_experts(st.a + wg_row0 * BK, g * BK, tile.start, tile.end);
        warpgroup_sync(wg);
      }
      const float s0 = ld_shared(st.sa + row_in_tile), s1 = ld_shared(st.sa + row_in_tile + 8);
#pragma unroll
      for (int h = 0; h < HALVES; ++h) {
        const float* col_scales = st.sb + h * HALF + col_in_tile;
#if WGRAD_DIAG == 2
        mma_issue(acc[h], st.a + wg_row0 * BK, st.b + h * HALF * BK, true);
        mma_wait(acc[h]);
        continue;
#endif
        const bool tile_start = WGRAD_OFFSET && g == tile.group_lo && h == 0;
        if (tile_start && wg == 2) named_barrier_sync(OFFSET_BAR, 256);
        const bool finish_here = overlap && h == 0 && pending;
        if (finish_here) wait_staging_free(s, out_phase);
        mma_issue(scratch, st.a + wg_row0 * BK, st.b + h * HALF * BK);
        float4 early[PRELOAD + 1];
        early_products(early, s0, s1, col_scales);
        if (finish_here) {  // the previous tile's epilogue, under this tile's first MMAs
          stage_for_storers(s, s.wgrad_out_tile(), acc, row_in_tile, out_phase);
          zero_accumulators(acc);
          pending = false;
        }
        if (NEXT_TILE && more && h == HALVES - 1 && g == tile.group_lo)
          next = consumer_tile(s, p, t + c.count, c);  // its latency hidden by these MMAs
        mma_wait(scratch);
        stamp_k(wg, k_done, h == 0 ? K_MMA0 : K_MMA1);
        if (tile_start && wg == 1) named_barrier_sync(OFFSET_BAR, 256);
        if (EARLY_RELEASE && h == HALVES - 1) release_stage(s, ring.stage, c);
#if WGRAD_DIAG == 1
        fence_registers(scratch);
#pragma unroll
        for (int i = 0; i < 64; ++i) acc[h][i] += scratch[i] * (i & 2 ? s1 : s0);
#else
        promote_outer(acc[h], scratch, s0, s1, early, col_scales);
#endif
        stamp_k(wg, k_done, h == 0 ? K_PROMO0 : K_PROMO1);
      }
#if WGRAD_DIAG == 2
      release_stage(s, ring.stage, c);
      continue;
#endif
      if (WGRAD_DIAG == 3) mbar_wait(&s.full[ring.stage], ring.phase);
      // otherwise after the scale reads: the stage's scales are in it
      if (!EARLY_RELEASE) release_stage(s, ring.stage, c);
      stamp_k(wg, k_done++, K_END);
    }
    if (WGRAD_DIAG == 4) {  // no epilogue; a sum of the accumulators keeps ptxas computing them
      float sum = 0.f;
#pragma unroll
      for (int h = 0; h < HALVES; ++h)
#pragma unroll
        for (int i = 0; i < 64; ++i) sum += acc[h][i];
      if (sum == 1234.5f) asm volatile("trap;");
    } else if (overlap) {
      pending = true;  // staged under the next tile's first MMAs
    } else if (STAGED) {
      hand_to_storers(s, s.wgrad_out_tile(), acc, row_in_tile, out_phase);
    } else {
#pragma unroll
      for (int h = 0; h < HALVES; ++h)
        store_wgrad(p, acc[h], tile.expert, tile.row0 + row_in_tile,
                    tile.col0 + h * HALF + col_in_tile);
    }
    stamp_tile(wg, tiles_done++, k_done, 1);
  }
  if (pending) hand_to_storers(s, s.wgrad_out_tile(), acc, row_in_tile, out_phase);
  record_cycles(wg, cycles0, k_done, tiles_done);
}

// The storer warps' walk (bf16 dW): each staged 128 x 256 tile, whole, while the consumers go on.
__device__ void wgrad_storer(SharedStorage& s, const WgradArgs& p, const Cluster& c) {
  if (!wgrad_staged(p) || WGRAD_DIAG == 4) return;
  uint32_t phase = 0;
  for (int t = c.index; t < wgrad_walk_length(p, c); t += c.count, phase ^= 1) {
    const KTile tile = wgrad_tile(s, p, t, c);
    __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + int64_t(tile.expert) * p.out_e +
                         int64_t(tile.row0) * p.out_n + tile.col0;
    write_staged_tile<BN>(s, s.wgrad_out_tile(), out, p.out_n, BM, BN, phase);
  }
}

__global__ void __launch_bounds__(THREADS, 1)
grouped_wgrad_kernel(const __grid_constant__ CUtensorMap map_a,
                     const __grid_constant__ CUtensorMap map_b,
                     const __grid_constant__ CUtensorMap /* unused: scales come by bulk copy */,
                     const WgradArgs p) {
  SharedStorage& s = shared_storage();
  const Cluster c = cluster_position(p.cluster_size);
  if (threadIdx.x < 32) scan_counts(s, p.counts, p.E);
  if (threadIdx.x == 32) init_barriers(s, c.size);
  __syncthreads();
  if (c.size > 1) cluster_sync();
  const int wg = warp_uniform(threadIdx.x / 128);
  if (wg == 0) {
    producer_registers();
    if (threadIdx.x == 0) wgrad_producer(s, &map_a, &map_b, p, c);
    if (threadIdx.x >= 32) wgrad_storer(s, p, c);
  } else {
    consumer_registers();
    if (wgrad_staged(p))
      wgrad_consumer<true>(s, p, wg, c);
    else
      wgrad_consumer<false>(s, p, wg, c);
  }
  if (c.size > 1) cluster_sync();
}

// ---------------------------------------------------------------------------------------------
// Host side: TMA descriptors, launch, and a C ABI for ctypes (models/fp8/grouped_cuda.py)

using csrc_common::fail;
using csrc_common::tile_map;

// An FP8 [rows, 128 k] operand with row stride ld bytes, read in box_rows x 128-byte swizzled
// tiles.
int fp8_tile_map(CUtensorMap* map, const void* base, int64_t rows, int64_t cols, int64_t ld,
                 int box_rows, char* err, int err_len) {
  return tile_map(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, CU_TENSOR_MAP_SWIZZLE_128B, base, rows, cols,
                  ld, BK, box_rows, err, err_len);
}

constexpr size_t SMEM_BYTES = sizeof(SharedStorage) + 1024;  // + alignment slack

// GRID_LIMIT=n (measurement only): at most n CTAs, so that fewer SMs share the chip's power,
// L2 and DRAM (0: one per SM).
#ifndef GRID_LIMIT
#define GRID_LIMIT 0
#endif
// BALANCED_GRID=1: no more CTAs than the rounds of tiles need. With `walks` tiles on room for
// `clusters`, ceil(walks / clusters) rounds are run either way; ceil(walks / rounds) clusters run
// them with every CTA taking the same number of tiles (to within one), so none idles through
// the last round: 3584 Wgrad tiles at DeepSeek-V3's down projection, 8 experts, take 28 rounds
// on 128 CTAs instead of 27.15 on 132: the same SM cycles, and none spent idling at the end.
// Measured on the H100 (twelfth session): 3 s of back-to-back calls, nvidia-smi sampling at 50 ms,
// 821-828 TFLOPS at 1501-1507 MHz and ~700 W against 811-813 at 1632-1651 MHz and 691 W on 132
// CTAs (whose idle last round lowers the power and lifts the clock, without giving the time
// back), the same energy a call (814-818 mJ against 819-820); in a sweep of the six cases, Wgrad
// +1.0% / +0.6% at dsv3-down E8 x 4096 / 8192 (the cases whose grid changes), inside the sweep's
// +-3% noise (cases whose grid does not change moved -3% to +3%). BALANCED_GRID=0 fills every
// SM. (Fprop/Dgrad: their walk depends on the router's counts, so the host launches every SM
// their tile bound can use and the kernel balances the real walk: FPROP_FULL_GRID,
// FPROP_BALANCE.)
#ifndef BALANCED_GRID
#define BALANCED_GRID 1
#endif

// The clusters a persistent walk of `walks` tiles runs on, with room for `room` at once (one
// for an empty walk); `balance`: no more than its rounds need (BALANCED_GRID).
int persistent_clusters(int walks, int room, bool balance = true) {
  return balance && BALANCED_GRID ? balanced_clusters(walks, room) : usable_clusters(walks, room);
}

// FPROP_FULL_GRID=1: Fprop/Dgrad launched on every SM their tile bound can use instead of the
// bound's balanced grid, leaving the balancing to the kernel, which sees the real walk
// (FPROP_BALANCE). The bound's grid can cost the kernel a round: `small`'s down projection Dgrad at
// 16 x 2048 tokens is 1536 tiles, which 128 CTAs run in 12 rounds, but its bound (1626) gets 126
// CTAs, on which the kernel balances to 119 CTAs and 13 rounds; DeepSeek-V3's 14336-tile cases
// (Fprop of the down projection, Dgrad of the up one, 8 x 8192) get 131 CTAs and 110 rounds where
// 132 run 109. Other bench cases keep their rounds. Measured (thirty-second session, H100,
// sweep_grouped_cuda.py --steady 2 --rounds 2 --power, every case whose grid it changes, Fprop
// and Dgrad): small-down E16 x 2048 Dgrad +5.6% (1.50 against 1.42 TFLOP per joule at ~693 W),
// the other seven cells -0.1% to +0.3%. FPROP_FULL_GRID=0 sizes the grid for the bound.
#ifndef FPROP_FULL_GRID
#define FPROP_FULL_GRID 1
#endif

// Launch `kernel` persistently over `work` tiles: as many CTAs as can be resident at once (one
// per SM; in whole clusters), each cluster walking its share of the tiles; `balance`: only as
// many as the walk's rounds need (BALANCED_GRID).
template <typename Args>
int launch(void (*kernel)(CUtensorMap, CUtensorMap, CUtensorMap, Args), const CUtensorMap& map_a,
           const CUtensorMap& map_b, const CUtensorMap& map_sa, const Args& args, int work,
           bool balance, void* stream, char* err, int err_len) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(SMEM_BYTES));
  if (e == cudaSuccess && args.cluster_size > 1)
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (e != cudaSuccess) return fail(err, err_len, cudaGetErrorString(e));
  cudaLaunchAttribute cluster_dim = csrc_common::cluster_dimension(args.cluster_size);
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(THREADS);
  config.dynamicSmemBytes = SMEM_BYTES;
  config.stream = static_cast<cudaStream_t>(stream);
  config.attrs = &cluster_dim;
  config.numAttrs = 1;
  int device = 0, sms = 0, clusters = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  config.gridDim = dim3(sms / args.cluster_size * args.cluster_size);
  e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  if (e != cudaSuccess || clusters < 1) clusters = sms / args.cluster_size;
  const int walks = (work + args.cluster_size - 1) / args.cluster_size;
  if (GRID_LIMIT > 0) clusters = std::min(clusters, std::max(1, GRID_LIMIT / args.cluster_size));
  config.gridDim = dim3(persistent_clusters(walks, clusters, balance) * args.cluster_size);
  e = cudaLaunchKernelEx(&config, kernel, map_a, map_b, map_sa, args);
  if (e != cudaSuccess) return fail(err, err_len, cudaGetErrorString(e));
  return 0;
}

}  // namespace

extern "C" {

// Shared memory one CTA needs (bytes): the caller checks it against the device's limit.
size_t fp8moe_grouped_smem_bytes() { return SMEM_BYTES; }

// How many clusters a walk of `walks` tiles runs on with room for `room` (BALANCED_GRID), for
// tests: it needs no GPU.
int fp8moe_grouped_persistent_clusters(int walks, int room) {
  return persistent_clusters(walks, room);
}

// Tile t of an unpaired Fprop/Dgrad walk over m_tiles x n_tiles tiles of `experts` experts: its
// tile row *m and column *n (fprop_tile's order, without the expert lookup), for tests.
void fp8moe_grouped_fprop_tile(int t, int m_tiles, int n_tiles, int experts, int* m, int* n) {
  band_order(t, m_tiles, n_tiles, fprop_band(m_tiles, experts), *m, *n);
}

// cluster: 2 pairs CTAs on side-by-side tiles sharing the `a` tile (multicast); 1 does not.
// Pairs need an even number of 128-column tiles; otherwise the kernel runs unpaired.
int fp8moe_grouped_fprop(const void* a, int64_t lda, const float* sa, int64_t sa_kb,
                         const void* b, int64_t ldb, const float* sb, int64_t sb_e,
                         int64_t sb_n, int64_t sb_kb, void* out, int64_t ld_out, int out_fp32,
                         const void* counts, int counts_int64, int T, int N, int K, int E,
                         int m_tiles_bound, int cluster, void* stream, char* err, int err_len) {
  if (E < 1 || E > MAX_EXPERTS) return fail(err, err_len, "expert count out of range (1..1024)");
  if (N % 128 || K % BK) return fail(err, err_len, "N and K must be multiples of 128");
  const int n_tiles = (N + FBN - 1) / FBN;
  if (n_tiles % cluster) cluster = 1;
  CUtensorMap map_a, map_b, map_sa;
  if (fp8_tile_map(&map_a, a, T, K, lda, BM / cluster, err, err_len)) return 1;
  if (fp8_tile_map(&map_b, b, int64_t(E) * N, K, ldb, FBN, err, err_len)) return 1;
  // MN-major scales: row kb holds the T tokens' scales of K block kb
  if (tile_map(&map_sa, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, CU_TENSOR_MAP_SWIZZLE_NONE, sa, K / BK, T,
               sa_kb * int64_t(sizeof(float)), SCALE_BOX, 1, err, err_len))
    return 1;
  const FpropArgs args{cluster, sb, sb_e, sb_n, sb_kb, out, ld_out, out_fp32,
                       Counts{counts, counts_int64}, T, N, K, E};
  return launch(grouped_fprop_kernel, map_a, map_b, map_sa, args, m_tiles_bound * n_tiles,
                !(FPROP_FULL_GRID && FPROP_BALANCE), stream, err, err_len);
}

int fp8moe_grouped_wgrad(const void* a, int64_t lda, const float* sa, int64_t sa_g, const void* b,
                         int64_t ldb, const float* sb, int64_t sb_g, void* out, int64_t out_e,
                         int64_t out_n, int out_bf16, int accumulate, const void* counts,
                         int counts_int64,
                         int T, int padded_T, int N, int K, int E, int cluster, void* stream,
                         char* err, int err_len) {
  if (E < 1 || E > MAX_EXPERTS) return fail(err, err_len, "expert count out of range (1..1024)");
  if (N % BM || K % BN) {
    snprintf(err, err_len, "N must be a multiple of %d and K of %d", BM, BN);
    return 1;
  }
  if (WGRAD_CLUSTER > 0) cluster = WGRAD_CLUSTER;
  if ((SHARE_B ? N / BM : K / BN) % cluster) cluster = 1;  // the shared dimension pairs up
  const int a_rows = SHARE_B ? BM : BM / cluster, b_rows = SHARE_B ? BN / cluster : BN;
  CUtensorMap map_a, map_b;
  if (fp8_tile_map(&map_a, a, N, padded_T, lda, a_rows, err, err_len)) return 1;
  if (fp8_tile_map(&map_b, b, K, padded_T, ldb, b_rows, err, err_len)) return 1;
  const WgradArgs args{cluster, sa, sa_g, sb, sb_g, out, out_e, out_n, out_bf16, accumulate,
                       Counts{counts, counts_int64}, T, N, K, E};
  if (launch(grouped_wgrad_kernel, map_a, map_b, map_b, args, E * (N / BM) * (K / BN), true,
             stream, err, err_len))
    return 1;
#if WGRAD_CYCLES
  report_wgrad_cycles<<<1, 1, 0, static_cast<cudaStream_t>(stream)>>>();
#endif
  return 0;
}

}  // extern "C"
