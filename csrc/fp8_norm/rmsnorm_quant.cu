// Fused RMSNorm -> FP8 (1x128 and 128x1) quantization for Hopper (sm_90a): x read from HBM once.
//
// What it computes is models.fp8.quant.rmsnorm_quantize's contract (that module's docstring has
// the layouts): y = x * rstd[row] * w[col] in fp32, rstd = 1 / sqrt(sum(x^2) / K + eps), then
// the 1x128 copy q [M, K] with scales s (MN-major, [K/128][M] in memory), the 128x1 copy stored
// transposed qt [K, Mp] (rows past M are zeros) with scales st [Mb, K], rstd [M] and, if asked,
// y itself (hp: fp32 for tests, or rounded to bf16 for the model's consumers that read y in high
// precision, models.fp8.linear.FP8RMSNorm). Scales and casts are the reference's operations
// (models/fp8/reference.py): s = max(amax, 1e-12) / 448 correctly rounded [rounded up to 2^k],
// q = e4m3_satfinite(y * (1/s)) with the reciprocal correctly rounded; a tile holding inf/NaN
// gets a NaN scale.
//
// Why a cluster kernel: a row's scale needs the row's whole sum of squares, and a 128x1 scale
// needs all 128 rows of its column, so a 128-row block of x must be on chip in full before any of
// it can be quantized. The Triton kernel (quant.py) reads x twice (a sum pass, then a re-read
// that mostly hits L2) and reaches about 63% of a copy's bandwidth. Here one thread-block
// cluster owns one row block: its `cluster` CTAs split the block's Kb = K/128 column tiles
// evenly (128 x 128 bf16 = 32 KB of shared memory per tile, loaded by TMA, rows past M and
// columns past K filled with zeros), so the whole row block (1.8 MB at K = 7168: 8 CTAs x 7
// tiles) stays in shared memory. Each CTA sums the squares of its tiles' rows; each row's CTA
// partials go to the CTA that owns the row (128 / cluster rows each) by st.async into its shared
// memory, which adds them in rank order and sends the row's rstd back to every CTA the same way
// (an mbarrier per direction counts the bytes; no cluster-wide barrier, whose release would wait
// for all of the CTA's outstanding global stores). Then each CTA quantizes its tiles from shared
// memory and stores both copies straight from registers.
//
// The kernel is persistent: a cluster walks row blocks rb, rb + clusters, ... and as soon as a
// tile of the current block has been read into registers for quantizing, the TMA load of the
// next block's next tile goes into its buffer (a ring of as many buffers as fit, see Ring), so
// the next block's loads overlap this block's arithmetic and stores; the squares of next-block
// tiles that have landed are added between this block's tiles.
//
// Measured on an H100 (EXPERIMENTS.md beside this file has the figures and where the time goes):
// 77% of a device-to-device copy's bandwidth at 32768 x 7168, 58% at 8192 x 4096 and 61-62% at
// 16384 x 2048 (68%, 54% and 58% before the weights were loaded a tile ahead, load_weights());
// 80-81% at 32768 x 7168 since a round's last tile is held in registers there (HOLD, below).
// Per active SM that is 95% of the dual quantizer's DRAM rate, on the 120 of 132 SMs that hold a
// cluster of 8; a launch over all 132 (groups exchanging through L2, commit 3f64301) was no
// faster: each SM slowed as SMs were added (EXPERIMENTS.md has the figures). Fetching the
// next round's tiles into L2 during each exchange (cp.async.bulk.prefetch.tensor) ran slower too:
// 68% against 74% of a copy at 32768 x 7168.
//
// Threads: 256 (8 warps); in every phase thread (i, j), i, j in 0..15, owns the 8 x 8 elements at
// rows 8i.., columns 8j.. of a tile: warp w holds i = 4 (w % 4) + lane / 8, j = 8 (w / 4) +
// lane % 8. A quarter-warp (8 lanes of one i) then reads 128 contiguous bytes of one row of the
// unswizzled tile (no bank conflicts), a q store of a warp writes 4 rows x 64 bytes and a qt
// store 8 rows of qt x 32 bytes: whole 32-byte sectors either way, with no shuffle through
// shared memory for the transposed copy. Row amaxes are reduced over the 8 lanes of one i with
// shuffles, column amaxes over the 4 i of a warp; across warps (2 per row, 4 per column) through
// shared-memory atomicMax on the bit patterns of |y| (for non-negative floats the integer order
// is the float order, and NaN's pattern is above inf's, so a NaN propagates into the scale).
//
// Measured and not kept (commit a274961 has the code): 16 warps of 4 x 8 values each (126
// registers; the amaxes reduce-scattered over lanes), with or without the tile loaded as two
// 128-byte-swizzled boxes, and one __syncthreads a tile instead of two. All bitwise equal to this
// design on an H100 at nine shapes and modes, and 2.5-5% faster (16 warps + swizzle: 69.5-69.8% /
// 60.0% / 60.4-60.9% of the copy at 32768x7168 / 8192x4096 / 16384x2048, against 67.8-68.1% /
// 57.1-57.7% / 57.6-58.0% in the same interleaved rounds): not worth a second thread map (the
// model's FP8RMSNorm calls this kernel, but its norms are about 0.05% of a `small` training
// step). Twice the warps giving 3% says the quantizing phase is not
// mainly latency-bound either; its stores are the next suspect (unprofiled).
// Cache hints on those stores (st.global.cs, L1::no_allocate, L2::evict_first) and evict_first on
// the TMA loads: 0.95-1.00x this kernel at three shapes (twenty-fifth session, H100, bitwise the
// same outputs); the same hints and whole-line staged stores did nothing for the SwiGLU backward
// kernel either (csrc/fp8_swiglu/swiglu_backward.cu).
#include <cuda.h>  // CUtensorMap and its enums only: the driver is reached through the runtime
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>

#include "../common/device_ptx.cuh"  // smem_addr, mbar_init, mbar_arrive_expect_tx, ...
#include "../common/fp8_cast.cuh"    // e4m3x8, scale_of, bf16x2, unpack8
#include "../common/host_tma.cuh"    // tile_map, fail

namespace {

using csrc_common::ABS_MASK;
using csrc_common::allow_dependent_grids;
using csrc_common::bf16x2;
using csrc_common::cluster_sync;
using csrc_common::e4m3x8;
using csrc_common::mbar_arrive_expect_tx;
using csrc_common::mbar_init;
using csrc_common::scale_of;
using csrc_common::smem_addr;
using csrc_common::tma_load_tile;
using csrc_common::unpack8;
using csrc_common::wait_for_prior_grids;

constexpr int TILE = 128;
constexpr int THREADS = 256;
constexpr uint32_t TILE_BYTES = TILE * TILE * 2;  // one 128 x 128 bf16 tile
constexpr int MAX_CLUSTER = 16;                   // the largest (non-portable) cluster on sm90

// Shared memory: `tiles` tile buffers, the amaxes of the tile being quantized [rows 0..127 |
// columns 0..127], the reciprocal column scales, the two receive buffers of the rstd exchange
// (recv_a: partial sums of squares of this CTA's slice of rows from every CTA; recv_b: rstd of
// all 128 rows; between exchanges recv_b holds the reciprocal row scales), their mbarriers, and
// one mbarrier per tile buffer. At K = 7168 (8 CTAs x 7 tiles) that is 232008 of the 232448 bytes
// an H100 CTA may have, which is why the buffers are few and reused.
struct Smem {
  uint8_t* tiles;
  uint32_t* amax;   // [256]
  float* inv_cols;  // [128]
  float* recv_a;    // [cluster][128 / cluster]: sender-major
  float* recv_b;    // [128]
  uint64_t* bar_a;
  uint64_t* bar_b;
  uint64_t* full;   // [tiles]
  int* held;        // HOLD: threads that have copied the held tile into registers
  int* claim;       // RowBlocks: the leftover row block CTA 0 claimed for its cluster, if any
};
constexpr size_t SCRATCH_BYTES =
    (2 * TILE + 3 * TILE) * sizeof(float) + 2 * sizeof(uint64_t) + 2 * sizeof(int);
__host__ __device__ constexpr size_t smem_bytes(int tiles) {
  return size_t(tiles) * TILE_BYTES + SCRATCH_BYTES + size_t(tiles) * sizeof(uint64_t);
}

// HOLD (the kernel's template argument): each round's last tile is copied into registers (32 a
// thread) when its squares are added and its buffer refilled at once, so that the load the next
// round's exchange waits for longest goes out a round early; the tile is then quantized from the
// registers. The host holds when a CTA's tiles fill all its buffers (no buffer left to load the
// next round into ahead: K = 7168, 3584, 1792), where it measured 76.4% -> 81.2% of a copy at
// 32768 x 7168 and +1.7% at 16384 x 7168 (twenty-eighth session, H100, interleaved, bitwise the
// same outputs); with buffers to spare (K = 4096, 2048) it ran 2-3% slower (248 registers a thread
// against 214). NORM_HOLD=0 / 1 forces it off / on (measurement builds; -1: that rule). Odd
// clusters started 3 or 10 us late (__nanosleep, so that the clusters' phases stop coinciding)
// ran 0.92-1.02x over three shapes in the same session: not kept. Nor the tail split (commit
// d1b88aa has the code): the last Mb % clusters row blocks, which leave the other clusters idle
// for a round, shared tile by tile by all CTAs (per-tile row sums through a global buffer, work
// claimed from atomic counters, so no CTA waits on one that has not started): 0.96-1.00x at five
// shapes (32768 x 7168 80.8% against 80.6%), the GPU tests passing with it. Where a round goes
// with HOLD (NORM_TIMELINE, same session): at 32768 x 7168 20.7 us, of which 0.45 us waiting for
// and summing the next tiles (2.5 us in round 0), 1.63 us in the exchange and 17.9 us quantizing,
// the lone last round ending 3.7 us after the others'; at 32768 x 4096 11.4 us with a 1.22 us
// exchange. (Read again in the twenty-ninth session with entry and exit marks: the first cluster
// left at 354 us, the median one ended its 17th row block at 366.5 us and cluster 0 its 18th at
// 388.5 us. Claiming every row block past round 1 did not pay; claiming only the leftover ones,
// so that the cluster that finishes first takes the 18th, did: RowBlocks, EXPERIMENTS.md.)
#ifndef NORM_HOLD
#define NORM_HOLD -1
#endif
// NORM_LOAD_AFTER_SYNC=1: the first round's tile loads are issued after the kernel's one cluster
// barrier (which only orders the mbarriers' initialization before remote arrivals) instead of
// before it. Issued before it, the barrier was passed only 14.25 us after the CTA started at
// 32768 x 7168 (the loads were issued by 2.25 us; NORM_TIMELINE's entry marks), so round 0's
// sums started after all its tiles had landed; now it is passed at 1.75 us and the sums follow
// the tiles as they land. Twenty-ninth session, H100, sweep_quant_cuda (outputs bitwise the
// same): 81.7% -> 81.9% of a copy at 32768 x 7168, 80.7 -> 82.5% at 32768 x 4096, 76.8 -> 77.3%
// at 16384 x 7168, 73.7 -> 76.0% at 16384 x 4096, 66.3 -> 68.4% at 8192 x 7168.
#ifndef NORM_LOAD_AFTER_SYNC
#define NORM_LOAD_AFTER_SYNC 1
#endif

struct Args {
  const void* w;  // [K], bf16 (w_bf16) or fp32
  int w_bf16;
  uint8_t* q;     // [M, K]
  float* s;       // [Kb][M]
  uint8_t* qt;    // [K, Mp]
  float* st;      // [Mb, K]
  float* rstd;    // [M]
  void* hp;       // [M, K] or null: fp32, or bf16 (hp_bf16)
  int hp_bf16;
  int M, K, Mp, Mb, Kb, buffers;  // buffers: tile buffers per CTA
  float eps;
  int pow2, colwise;
  int* claims;    // a zeroed int no launch uses meanwhile, or null: leftovers dealt (RowBlocks)
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers (the ones both libraries use: ../common/device_ptx.cuh)

__device__ __forceinline__ uint32_t special(int which) {
  uint32_t v;
  if (which == 0) asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(v));
  else if (which == 1) asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(v));
  else if (which == 2) asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(v));
  else asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(v));
  return v;
}

__device__ __forceinline__ bool mbar_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  return done != 0;
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}

// Wait for a phase of an mbarrier completed by other CTAs' st.async (acquire at cluster scope:
// their stores are visible after it).
__device__ __forceinline__ void mbar_wait_cluster(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
  }
}

// The address of `p`'s offset in the shared memory of CTA `rank` of this cluster.
__device__ __forceinline__ uint32_t mapa(const void* p, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(p)),
               "r"(rank));
  return remote;
}

// v into CTA `rank`'s copy of *p, completing 4 bytes of its mbarrier at `bar`'s offset.
__device__ __forceinline__ void st_async(float* p, float v, uint64_t* bar, uint32_t rank) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];"
               ::"r"(mapa(p, rank)), "r"(__float_as_uint(v)), "r"(mapa(bar, rank)) : "memory");
}

// The 128 x 128 bf16 box at (column col, row row) of x into `dst`; completes `bar`'s transaction.
__device__ __forceinline__ void load_tile(void* dst, const CUtensorMap* map, uint64_t* bar,
                                          int col, int row) {
  mbar_arrive_expect_tx(bar, TILE_BYTES);
  tma_load_tile(dst, map, bar, col, row);
}

// v[k] without indexing registers by a run-time value (which would put v in local memory).
template <typename T>
__device__ __forceinline__ T pick(const T (&v)[8], int k) {
  T out = v[0];
#pragma unroll
  for (int r = 1; r < 8; ++r) out = k == r ? v[r] : out;
  return out;
}

// ---------------------------------------------------------------------------------------------
// The phases of one row block

struct Thread {
  int tid, warp, lane, i, j;  // (i, j): this thread's 8 x 8 block of every tile
  __device__ Thread() {
    tid = threadIdx.x;
    warp = tid >> 5;
    lane = tid & 31;
    i = 4 * (warp & 3) + (lane >> 3);
    j = 8 * (warp >> 2) + (lane & 7);
  }
};

__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {  // 16-byte aligned
  const float4 lo = *reinterpret_cast<const float4*>(p);
  const float4 hi = *reinterpret_cast<const float4*>(p + 4);
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z;
  v[7] = hi.w;
}

// Row 8i + r of this thread's 8 x 8 block of the tile.
__device__ __forceinline__ void tile_row(const uint8_t* tile, const Thread& t, int r,
                                         float (&x)[8]) {
  unpack8(*reinterpret_cast<const uint4*>(tile + (8 * t.i + r) * 256 + t.j * 16), x);
}

// ss[r] += the squares of this thread's 8 columns of row 8i + r of the tile, left to right.
__device__ __forceinline__ void add_squares(const uint8_t* tile, const Thread& t, float (&ss)[8]) {
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    float x[8];
    tile_row(tile, t, r, x);
#pragma unroll
    for (int c = 0; c < 8; ++c) ss[r] = fmaf(x[c], x[c], ss[r]);
  }
}

// add_squares, keeping this thread's 8 raw rows (8 bf16 each) of the tile in `raw`.
__device__ __forceinline__ void add_squares_held(const uint8_t* tile, const Thread& t,
                                                 float (&ss)[8], uint4 (&raw)[8]) {
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    raw[r] = *reinterpret_cast<const uint4*>(tile + (8 * t.i + r) * 256 + t.j * 16);
    float x[8];
    unpack8(raw[r], x);
#pragma unroll
    for (int c = 0; c < 8; ++c) ss[r] = fmaf(x[c], x[c], ss[r]);
  }
}

// Bytes a round's rstd messages bring each CTA: 128 rstd, and in one round CTA 0's claim.
__device__ __forceinline__ uint32_t rstd_message_bytes(bool with_claim) {
  return TILE * sizeof(float) + (with_claim ? sizeof(int) : 0);
}

// rstd of this thread's rows 8i .. 8i + 7 of row block rb from its partial sums of squares `ss`
// (round `round` of the exchange). The 16 threads of a row add theirs: the 8 lanes of a warp by
// a butterfly (every lane gets the same sum, since a + b == b + a), then the two warps of the
// row through recv_b. Row r's CTA partial goes to its owner, CTA r / (128 / cluster), by st.async
// into its recv_a; each owner adds the cluster's partials of its rows in rank order, forms rstd
// and sends it to every CTA's recv_b. Each rstd is computed once, so every CTA uses the same one.
// Neither buffer needs a second copy: a CTA sends round n + 1's data only after it received
// round n's rstd from every CTA, which each sends only after reading what it received in round n.
// In the round RowBlocks names (`with_claim`), CTA 0 also sends every CTA the leftover row block
// it claimed (`claim`), under the same mbarrier; every CTA returns it in `claimed`. `next_bytes`:
// what the next round's messages will bring.
__device__ __forceinline__ void row_rstd(float (&ss)[8], const Smem& sm, const Thread& t,
                                         const Args& a, uint32_t rank, uint32_t csize, int rb,
                                         uint32_t round, bool with_claim, int claim, int& claimed,
                                         uint32_t next_bytes, float (&rstd)[8]) {
#pragma unroll
  for (int r = 0; r < 8; ++r) {
#pragma unroll
    for (int m = 1; m < 8; m <<= 1) ss[r] += __shfl_xor_sync(0xFFFFFFFFu, ss[r], m);
  }
  const float mine = pick(ss, t.lane & 7);
  const int row = 8 * t.i + (t.lane & 7);
  const int slice = TILE / int(csize);  // rows per owner
  __syncthreads();  // the last tile's reciprocal row scales in recv_b have been read
  if (t.warp >= 4) sm.recv_b[row] = mine;  // columns 64..127 of each tile
  __syncthreads();
  if (t.warp < 4) {
    const float partial = mine + sm.recv_b[row];
    const uint32_t owner = uint32_t(row / slice);
    st_async(sm.recv_a + rank * slice + row % slice, partial, sm.bar_a, owner);
  }
  if (t.tid < slice) {
    mbar_wait_cluster(sm.bar_a, round & 1);
    float total = sm.recv_a[t.tid];
    for (int sender = 1; sender < int(csize); ++sender) total += sm.recv_a[sender * slice + t.tid];
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fdiv_rn(total, float(a.K)) + a.eps));
    const int own_row = int(rank) * slice + t.tid;
    for (uint32_t dest = 0; dest < csize; ++dest) st_async(sm.recv_b + own_row, r, sm.bar_b, dest);
    if (with_claim && rank == 0 && t.tid == 0)
      for (uint32_t dest = 0; dest < csize; ++dest)
        st_async(reinterpret_cast<float*>(sm.claim), __int_as_float(claim), sm.bar_b, dest);
    if (rb * TILE + own_row < a.M) a.rstd[rb * TILE + own_row] = r;
  }
  mbar_wait_cluster(sm.bar_b, round & 1);
  load8(sm.recv_b + 8 * t.i, rstd);
  if (with_claim) claimed = *reinterpret_cast<volatile int*>(sm.claim);
  if (t.tid == 0) {  // this round is over in this CTA: arm both barriers for the next one
    mbar_arrive_expect_tx(sm.bar_a, TILE * sizeof(float));
    mbar_arrive_expect_tx(sm.bar_b, next_bytes);
  }
}

// w[col0 .. col0 + 7] as loaded: 16 bytes of bf16 (lo) or 32 of fp32 (lo, hi). It comes from L2
// (shared memory is full, and L1 is invalidated by every exchange's acquire), so it is loaded one
// tile ahead of its use and converted to floats only then (weights()): a conversion next to the
// load made every warp wait for the L2 round trip at the same point of every tile, a fifth of the
// kernel's stall samples in an ncu profile (H100, 32768 x 7168).
struct RawWeights {
  uint4 lo, hi;
};

__device__ __forceinline__ RawWeights load_weights(const Args& a, int col0) {
  RawWeights raw{make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
  if (col0 < a.K) {  // K % 8 == 0: a group of 8 columns is all inside or all outside
    if (a.w_bf16) {
      raw.lo = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(a.w) + col0);
    } else {
      const uint4* p = reinterpret_cast<const uint4*>(static_cast<const float*>(a.w) + col0);
      raw.lo = p[0];
      raw.hi = p[1];
    }
  }
  return raw;
}

__device__ __forceinline__ void weights(const RawWeights& raw, int w_bf16, float (&w)[8]) {
  if (w_bf16) {
    unpack8(raw.lo, w);  // zeros past K: bf16 0 is float 0
  } else {
    const uint32_t words[8] = {raw.lo.x, raw.lo.y, raw.lo.z, raw.lo.w,
                               raw.hi.x, raw.hi.y, raw.hi.z, raw.hi.w};
#pragma unroll
    for (int c = 0; c < 8; ++c) w[c] = __uint_as_float(words[c]);
  }
}

// y = x * rstd * w of this thread's 8 x 8 block of the tile.
__device__ __forceinline__ void normalize(const uint8_t* tile, const Thread& t,
                                          const float (&w)[8], const float (&rstd)[8],
                                          float (&y)[8][8]) {
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    float x[8];
    tile_row(tile, t, r, x);
#pragma unroll
    for (int c = 0; c < 8; ++c) y[r][c] = x[c] * rstd[r] * w[c];
  }
}

// normalize() of the tile held in registers (add_squares_held's `raw`).
__device__ __forceinline__ void normalize_held(const uint4 (&raw)[8], const float (&w)[8],
                                               const float (&rstd)[8], float (&y)[8][8]) {
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    float x[8];
    unpack8(raw[r], x);
#pragma unroll
    for (int c = 0; c < 8; ++c) y[r][c] = x[c] * rstd[r] * w[c];
  }
}

// Row amaxes into am[0..127], column amaxes into am[128..255] (atomicMax on |y|'s bits).
__device__ __forceinline__ void tile_amax(const float (&y)[8][8], const Thread& t, bool colwise,
                                          uint32_t* am) {
  uint32_t ra[8], ca[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) ca[c] = 0;
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    ra[r] = 0;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const uint32_t b = __float_as_uint(y[r][c]) & ABS_MASK;
      ra[r] = max(ra[r], b);
      ca[c] = max(ca[c], b);
    }
#pragma unroll
    for (int m = 1; m < 8; m <<= 1) ra[r] = max(ra[r], __shfl_xor_sync(0xFFFFFFFFu, ra[r], m));
  }
  atomicMax(am + 8 * t.i + (t.lane & 7), pick(ra, t.lane & 7));
  if (colwise) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      ca[c] = max(ca[c], __shfl_xor_sync(0xFFFFFFFFu, ca[c], 8));
      ca[c] = max(ca[c], __shfl_xor_sync(0xFFFFFFFFu, ca[c], 16));
    }
    const int c0 = 2 * (t.lane >> 3);  // the 4 lanes of a column group take 2 columns each
    uint32_t even = ca[0], odd = ca[1];
#pragma unroll
    for (int c = 2; c < 8; c += 2) {
      even = c0 == c ? ca[c] : even;
      odd = c0 == c ? ca[c + 1] : odd;
    }
    atomicMax(am + TILE + 8 * t.j + c0, even);
    atomicMax(am + TILE + 8 * t.j + c0 + 1, odd);
  }
}


// Thread tid < 128: the scale of row tid, threads 128..255: of column tid - 128. Stores the scale,
// leaves its reciprocal in recv_b (rows) or inv_cols, and clears the amax for the next tile.
__device__ __forceinline__ void tile_scales(const Smem& sm, const Thread& t, const Args& a, int rb,
                                            int kb) {
  const int u = t.tid & (TILE - 1);
  if (t.tid < TILE) {
    const float2 s = scale_of(sm.amax[t.tid], a.pow2);
    const int row = rb * TILE + u;
    if (row < a.M) a.s[int64_t(kb) * a.M + row] = s.x;
    sm.recv_b[u] = s.y;
  } else if (a.colwise) {
    const float2 s = scale_of(sm.amax[t.tid], a.pow2);
    const int k = kb * TILE + u;
    if (k < a.K) a.st[int64_t(rb) * a.K + k] = s.x;
    sm.inv_cols[u] = s.y;
  }
  sm.amax[t.tid] = 0;
}

// y of this thread's block into hp: 32 bytes a row in fp32, 16 in bf16.
__device__ __forceinline__ void tile_store_hp(const float (&y)[8][8], const Args& a, int row0,
                                              int col0) {
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    if (row0 + r >= a.M) continue;
    const int64_t at = int64_t(row0 + r) * a.K + col0;
    if (a.hp_bf16) {
      *reinterpret_cast<uint4*>(static_cast<uint16_t*>(a.hp) + at) =
          make_uint4(bf16x2(y[r][0], y[r][1]), bf16x2(y[r][2], y[r][3]),
                     bf16x2(y[r][4], y[r][5]), bf16x2(y[r][6], y[r][7]));
    } else {
      float4* p = reinterpret_cast<float4*>(static_cast<float*>(a.hp) + at);
      p[0] = make_float4(y[r][0], y[r][1], y[r][2], y[r][3]);
      p[1] = make_float4(y[r][4], y[r][5], y[r][6], y[r][7]);
    }
  }
}

// Both FP8 copies (and hp) of this thread's block. Plain stores, and the reciprocal scales read
// first, so the compiler issues the shared-memory loads together rather than one per store.
__device__ __forceinline__ void tile_store(const float (&y)[8][8], const Smem& sm, const Thread& t,
                                           const Args& a, int rb, int col0) {
  if (col0 >= a.K) return;
  const int row0 = rb * TILE + 8 * t.i;
  float inv_rows[8], inv_cols[8];
  load8(sm.recv_b + 8 * t.i, inv_rows);
  load8(sm.inv_cols + 8 * t.j, inv_cols);
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    if (row0 + r < a.M)
      *reinterpret_cast<uint2*>(a.q + int64_t(row0 + r) * a.K + col0) = e4m3x8(y[r], inv_rows[r]);
  }
  if (a.colwise) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      float column[8];
#pragma unroll
      for (int r = 0; r < 8; ++r) column[r] = y[r][c];
      *reinterpret_cast<uint2*>(a.qt + int64_t(col0 + c) * a.Mp + row0) =
          e4m3x8(column, inv_cols[c]);
    }
  }
  if (a.hp != nullptr) tile_store_hp(y, a, row0, col0);
}

// ---------------------------------------------------------------------------------------------
// The kernel

#ifdef NORM_TIMELINE  // per CTA and round: %globaltimer at its start, sums, exchange, end;
                      // then (slots 256..260) the CTA's entry, exit, set-up issued by thread 0,
                      // first cluster barrier passed, and the SM it ran on (%smid)
__device__ unsigned long long g_timeline[1024][4 * 64 + 5];
__device__ __forceinline__ void mark(int round, int phase) {
  unsigned long long now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  if (threadIdx.x == 0 && round < 64) g_timeline[blockIdx.x][4 * round + phase] = now;
}
__device__ __forceinline__ void mark_edge(int which) {
  unsigned long long now;
  uint32_t sm;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  if (threadIdx.x == 0) g_timeline[blockIdx.x][4 * 64 + which] = now;
  if (threadIdx.x == 0 && which == 0) g_timeline[blockIdx.x][4 * 64 + 4] = sm;
}
#else
__device__ __forceinline__ void mark(int, int) {}
__device__ __forceinline__ void mark_edge(int) {}
#endif

// The tiles this CTA loads form one sequence over its rounds: tile k of round n is element
// s = n * n_tiles + k, kept in buffer s % buffers, whose mbarrier completes its (s / buffers)-th
// phase when it lands. Element s + buffers is loaded as soon as element s has been read into
// registers for quantizing, so with more buffers than tiles the next row block's first tiles
// are already on their way while this one's sums are exchanged.
struct Ring {
  uint8_t* tiles;
  uint64_t* full;
  int buffers, n_tiles, k_first;
  __device__ uint8_t* tile(int s) const { return tiles + size_t(s % buffers) * TILE_BYTES; }
  __device__ uint64_t* bar(int s) const { return full + s % buffers; }
  __device__ uint32_t parity(int s) const { return uint32_t(s / buffers) & 1; }
  __device__ void load(int s, const CUtensorMap* map, int rb) const {  // one thread
    load_tile(tile(s), map, bar(s), (k_first + s % n_tiles) * TILE, rb * TILE);
  }
  __device__ bool landed(int s) const {  // without waiting
    uint32_t done;
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(smem_addr(bar(s))), "r"(parity(s)) : "memory");
    return done != 0;
  }
};

// Which 128-row block a cluster quantizes in each round. The Mb / clusters full rounds are dealt
// round-robin (round n: block c + n * clusters for cluster c). The Mb % clusters leftover blocks,
// dealt the same way, would go to clusters 0, 1, ... whatever their speed, and the clusters do
// not run equally fast: at 32768 x 7168 (256 blocks, 15 clusters) the same cluster id ended its
// 17 blocks 348-351 us in, the others 353-373 us, over six calls, and cluster 0, which took the
// 256th, was among the slowest (NORM_TIMELINE with %smid, twenty-ninth session). With `claims`
// (NORM_LEFTOVER) the leftover blocks go to the clusters that get there first. A round's tiles
// load one round ahead where a CTA's tiles fill its buffers, two where buffers are to spare, so
// round R's block (R the full rounds) must be known after the exchange of round R - 1 or R - 2:
// CTA 0 of each cluster takes a ticket from a global counter right after the exchange before
// that one (off the exchange's path), the first Mb % clusters tickets are the leftover blocks,
// and CTA 0 sends its cluster's CTAs the result with the claim round's rstd messages. The counter
// is zero when a launch starts, and the launch leaves it zero (NORM_RESET_CLAIMS); models/fp8/
// norm_cuda.py keeps one per stream, and gives a launch captured into a CUDA graph its own, so
// launches on other streams or replayed from a graph never share one. Needs R >= the rounds
// ahead and buffers <= 2 x tiles a CTA; otherwise the leftovers are dealt too.
struct RowBlocks {
  int cluster, clusters, full_rounds;
  int claim_round;  // the round whose exchange brings the claimed block; -1: dealt
  int extra;        // the leftover block this cluster quantizes last (>= Mb: none)
  __device__ int of(int round) const {
    if (round < full_rounds) return cluster + round * clusters;
    return round == full_rounds ? extra : INT_MAX;
  }
};

// NORM_LEFTOVER=1 (kept): measured in two interleaved sweeps on the H100 against dealing the
// leftovers (outputs bitwise the same; twenty-ninth session): +0.2% / +2.6% at 32768 x 7168,
// +4.7 / +2.1 at 32768 x 4096, +0.8 / +0.5 at 16384 x 7168, +0.8 / +1.2 at 16384 x 4096, +3.6 /
// +8.2 at 20000 x 3584, +2.4 / -3.7 at 8192 x 7168. What it gains depends on which cluster the
// hardware makes fastest: in one process the cluster that round-robin gives the 256th block was
// already the first to finish its 17 (then nothing to gain), in another it was among the last.
// Claiming every block past round 1 (each cluster asking for its next one) ran 1.6-3.5% slower
// than dealing in order at most shapes (EXPERIMENTS.md).
#ifndef NORM_LEFTOVER
#define NORM_LEFTOVER 1
#endif

// NORM_RESET_CLAIMS=1: the cluster that takes the launch's last ticket zeroes the counter again,
// so that a launch finds it zeroed by the one before it in the stream and the wrapper can give
// every launch of a stream the same counter, one of g_claims' slots (models/fp8/norm_cuda.py asks
// fp8moe_rmsnorm_resets_claims), instead of allocating and zeroing one every call (a fill kernel
// and ~5 us of host time a call). Every cluster takes exactly one ticket where the leftovers are
// claimed, none where they are dealt. The slots live in this library's own device memory, loaded
// zeroed with it: no allocator hands them out, so no memory saver region can release them.
// Measured with NORM_PDL (below), thirtieth session, H100, two interleaved sweeps, outputs bitwise
// the same, both switches on against both off: 83.1 / 82.6% of a copy against 81.4 / 82.0% at
// 32768 x 7168, 81.4 / 82.6 against 80.3 / 80.8 at 32768 x 4096, 74.9 / 78.1 against 74.6 / 75.4
// at 16384 x 7168, 76.1 / 75.1 against 72.5 / 73.2 at 16384 x 4096, 68.6 / 69.4 against 64.5 /
// 65.1 at 8192 x 7168. In the first sweep the reset alone gave 83.0%, 81.3%, 76.1%, 74.8%, 66.5%
// and PDL alone 81.7%, 80.5%, 74.3%, 72.9%, 65.5%: the fill kernel was most of what they gained.
// A third sweep, with the counters in g_claims: 81.8 / 81.8 / 75.8 / 68.2% against 82.4 / 79.9 /
// 73.0 / 63.1% at 32768 x 7168 / 32768 x 4096 / 16384 x 4096 / 8192 x 7168.
#ifndef NORM_RESET_CLAIMS
#define NORM_RESET_CLAIMS 1
#endif
constexpr int CLAIM_SLOTS = 64;  // streams per device that get a counter of their own
__device__ int g_claims[CLAIM_SLOTS] = {};

// NORM_PDL=1: launched with programmatic stream serialization, so that the kernel's set-up
// (mbarriers, the cluster barrier) runs while the kernel before it in the stream finishes; every
// global access waits for that kernel (wait_for_prior_grids), and each CTA at once allows the
// next kernel to be scheduled on the SMs it leaves (the clusters end up to ~20 us apart).
#ifndef NORM_PDL
#define NORM_PDL 1
#endif

template <bool HOLD>
__global__ void __launch_bounds__(THREADS, 1)
rmsnorm_quant_kernel(const __grid_constant__ CUtensorMap x_map, const Args a) {
  mark_edge(0);
  extern __shared__ __align__(1024) uint8_t smem[];
  Smem sm;
  sm.tiles = smem;
  sm.amax = reinterpret_cast<uint32_t*>(smem + size_t(a.buffers) * TILE_BYTES);
  sm.inv_cols = reinterpret_cast<float*>(sm.amax + 2 * TILE);
  sm.recv_a = sm.inv_cols + TILE;
  sm.recv_b = sm.recv_a + TILE;
  sm.bar_a = reinterpret_cast<uint64_t*>(sm.recv_b + TILE);
  sm.bar_b = sm.bar_a + 1;
  sm.full = sm.bar_a + 2;
  sm.held = reinterpret_cast<int*>(sm.full + a.buffers);
  sm.claim = sm.held + 1;

  const Thread t;
  const uint32_t rank = special(0), csize = special(1);
  const int cluster = int(special(2)), clusters = int(special(3));
  Ring ring;
  ring.tiles = sm.tiles;
  ring.full = sm.full;
  ring.buffers = a.buffers;
  ring.k_first = int(rank) * a.Kb / int(csize);  // this CTA's column tiles: an even share
  ring.n_tiles = (int(rank) + 1) * a.Kb / int(csize) - ring.k_first;
  RowBlocks rows{cluster, clusters, a.Mb / clusters, -1, a.Mb};
  const int leftover = a.Mb % clusters, fewest_tiles = a.Kb / int(csize);  // same in every CTA
  // rounds ahead a round's tiles are loaded: one when every CTA's tiles fill its buffers
  const int ahead = a.buffers == fewest_tiles ? 1 : 2;
  if (NORM_LEFTOVER && a.claims != nullptr && leftover > 0 && rows.full_rounds >= ahead &&
      fewest_tiles >= 1 && a.buffers <= 2 * fewest_tiles)
    rows.claim_round = rows.full_rounds - ahead;
  else if (cluster < leftover)
    rows.extra = rows.full_rounds * clusters + cluster;
  // CTA 0, thread 0: its cluster's ticket, taken a round before the claim round's exchange so
  // that the atomic's round trip is off the exchange's path; the leftover block it gives, if any
  int claim = a.Mb;
  const auto take_ticket = [&]() {
    if (rank == 0 && t.tid == 0) {
      const int ticket = atomicAdd(a.claims, 1);
      if (ticket < leftover) claim = rows.full_rounds * clusters + ticket;
      if (NORM_RESET_CLAIMS && ticket == clusters - 1) atomicExch(a.claims, 0);  // the last one
    }
  };
  // thread 0: element s of the tile sequence into its buffer, if its round has a row block
  const auto load = [&](int s) {
    if (ring.n_tiles == 0) return;  // a CTA without column tiles only takes part in the exchange
    const int rb = rows.of(s / ring.n_tiles);
    if (rb < a.Mb) ring.load(s, &x_map, rb);
  };

  if (!NORM_LOAD_AFTER_SYNC) wait_for_prior_grids();
  if (t.tid == 0) {
    for (int b = 0; b < a.buffers; ++b) mbar_init(sm.full + b, 1);
    mbar_init(sm.bar_a, 1);
    mbar_init(sm.bar_b, 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    mbar_arrive_expect_tx(sm.bar_a, TILE * sizeof(float));  // round 0
    mbar_arrive_expect_tx(sm.bar_b, rstd_message_bytes(rows.claim_round == 0));
    if (!NORM_LOAD_AFTER_SYNC)
      for (int s = 0; s < a.buffers; ++s) load(s);
  }
  mark_edge(2);
  for (int u = t.tid; u < 2 * TILE; u += THREADS) sm.amax[u] = 0;
  if (HOLD && t.tid == 0) *sm.held = 0;
  cluster_sync();  // every CTA's barriers exist before anyone sends to them
  mark_edge(3);
  if (NORM_LOAD_AFTER_SYNC) wait_for_prior_grids();  // x, w, the outputs and claims: from here on
  allow_dependent_grids();
  if (rows.claim_round == 0) take_ticket();
  if (NORM_LOAD_AFTER_SYNC && t.tid == 0)
    for (int s = 0; s < a.buffers; ++s) load(s);

  float ss[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  RawWeights next_w = load_weights(a, ring.k_first * TILE + 8 * t.j);  // of the next tile
  int summed = 0;  // elements of the sequence whose squares this thread has added
  const int last = ring.n_tiles - 1;  // a round's last tile: held in registers if HOLD
  [[maybe_unused]] uint4 held[8];     // its raw rows
  [[maybe_unused]] int refill = -1;   // thread 0: the element the held tile's buffer takes next
  // Squares of element s; a round's last tile is copied into `held` and counted, and thread 0
  // refills its buffer at the next barrier by which every thread has copied it (release_held).
  auto add = [&](int s) {
    if (HOLD && s % ring.n_tiles == last) {
      add_squares_held(ring.tile(s), t, ss, held);
      atomicAdd(sm.held, 1);
      refill = s + a.buffers;
    } else {
      add_squares(ring.tile(s), t, ss);
    }
  };
  auto release_held = [&]() {  // thread 0, right after a CTA barrier
    if (HOLD && refill >= 0 && *reinterpret_cast<volatile int*>(sm.held) == THREADS) {
      *sm.held = 0;
      load(refill);
      refill = -1;
    }
  };
  for (int round = 0; rows.of(round) < a.Mb; ++round) {
    const int rb = rows.of(round), end = (round + 1) * ring.n_tiles;
    const bool with_claim = round == rows.claim_round;
    mark(round, 0);
    for (; summed < end; ++summed) {
      mbar_wait(ring.bar(summed), ring.parity(summed));
      add(summed);
    }
    mark(round, 1);
    float rstd[8];
    row_rstd(ss, sm, t, a, rank, csize, rb, uint32_t(round), with_claim, claim, rows.extra,
             rstd_message_bytes(round + 1 == rows.claim_round), rstd);  // (barriers inside)
    if (round + 1 == rows.claim_round) take_ticket();
    if (t.tid == 0) release_held();
#pragma unroll
    for (int r = 0; r < 8; ++r) ss[r] = 0.0f;
    mark(round, 2);
    for (int k = 0; k < ring.n_tiles; ++k) {
      const int s = round * ring.n_tiles + k;
      const int kb = ring.k_first + k, col0 = kb * TILE + 8 * t.j;
      const bool from_registers = HOLD && k == last;
      float w[8], y[8][8];
      weights(next_w, a.w_bf16, w);
      const int k_next = k + 1 < ring.n_tiles ? k + 1 : 0;  // the same columns every round
      next_w = load_weights(a, (ring.k_first + k_next) * TILE + 8 * t.j);
      if (from_registers) normalize_held(held, w, rstd, y);
      else normalize(ring.tile(s), t, w, rstd, y);
      tile_amax(y, t, a.colwise != 0, sm.amax);
      __syncthreads();  // the tile is in registers: its buffer takes the element `buffers` on
      if (t.tid == 0) {
        if (!from_registers) load(s + a.buffers);
        release_held();
      }
      tile_scales(sm, t, a, rb, kb);
      __syncthreads();
      tile_store(y, sm, t, a, rb, col0);
      // the next round's tiles that have landed: their squares now, off the exchange's path
      // (each thread adds its tiles in sequence order whenever it gets to them; a round's last
      // tile if HOLD only once this round's held one has been quantized)
      if (rows.of(round + 1) < a.Mb && summed < end + ring.n_tiles && summed <= s + a.buffers &&
          (!HOLD || summed % ring.n_tiles != last || k == last) && ring.landed(summed)) {
        add(summed);
        ++summed;
      }
    }
    mark(round, 3);
  }
  cluster_sync();  // no CTA leaves while a st.async to or from it may be in flight
  mark_edge(1);
}

// ---------------------------------------------------------------------------------------------
// Host side: the TMA descriptor of x, the launch, a C ABI for ctypes (models/fp8/norm_cuda.py)

using csrc_common::fail;
using csrc_common::tile_map;

// x [M, K] bf16 with row stride ld elements, read in 128 x 128 boxes; zeros outside.
int x_tile_map(CUtensorMap* map, const void* x, int M, int K, int64_t ld, char* err, int err_len) {
  return tile_map(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, CU_TENSOR_MAP_SWIZZLE_NONE, x, M, K,
                  ld * 2, TILE, TILE, err, err_len);
}

// The launch's configuration; `attrs` (two) holds its attributes: the cluster shape and, with
// NORM_PDL, programmatic stream serialization.
cudaLaunchConfig_t launch_config(int cluster, int buffers, int ctas, void* stream,
                                 cudaLaunchAttribute* attrs) {
  attrs[0] = csrc_common::cluster_dimension(cluster);
  attrs[1] = csrc_common::programmatic_serialization();
  cudaLaunchConfig_t config = {};
  config.blockDim = dim3(THREADS);
  config.gridDim = dim3(ctas);
  config.dynamicSmemBytes = smem_bytes(buffers);
  config.stream = static_cast<cudaStream_t>(stream);
  config.attrs = attrs;
  config.numAttrs = NORM_PDL ? 2 : 1;
  return config;
}

using Kernel = void (*)(CUtensorMap, Args);

// The kernel instance for a launch whose CTAs hold up to `tiles` column tiles in `buffers`
// buffers: HOLD when none is left over (see HOLD's comment), unless NORM_HOLD forces it.
Kernel kernel_for(int tiles, int buffers) {
  const bool hold = NORM_HOLD < 0 ? tiles == buffers : NORM_HOLD == 1;
  return hold ? rmsnorm_quant_kernel<true> : rmsnorm_quant_kernel<false>;
}

// Clusters of `cluster` CTAs with `buffers` tile buffers each that can be resident at once; 0
// with err set if none. Cached per device, kernel and shape: the attributes and the occupancy
// query cost microseconds per launch, and a model launches a few shapes (one per norm width)
// many times.
int resident_clusters(Kernel kernel, int cluster, int buffers, char* err, int err_len) {
  struct Entry {
    int device;
    Kernel kernel;
    int cluster, buffers, clusters;
  };
  static Entry cache[16];
  static int cached = 0;
  static size_t allowed[2][64] = {};  // per instance and device: the shared memory it may use
  int device = 0;
  cudaGetDevice(&device);
  for (int n = 0; n < cached; ++n)
    if (cache[n].device == device && cache[n].kernel == kernel && cache[n].cluster == cluster &&
        cache[n].buffers == buffers)
      return cache[n].clusters;
  cudaError_t e = cudaSuccess;
  size_t& room = allowed[kernel == rmsnorm_quant_kernel<true>][device % 64];
  if (smem_bytes(buffers) > room) {  // a maximum: never lowered for a later shape
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             int(smem_bytes(buffers)));
    if (e == cudaSuccess) room = smem_bytes(buffers);
  }
  if (e == cudaSuccess && cluster > 8)
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  int clusters = 0;
  cudaLaunchAttribute attrs[2];
  const cudaLaunchConfig_t config = launch_config(cluster, buffers, cluster, nullptr, attrs);
  if (e == cudaSuccess)
    e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  if (e != cudaSuccess) return fail(err, err_len, cudaGetErrorString(e)) - 1;
  if (clusters < 1) {
    snprintf(err, err_len, "no cluster of %d CTAs with %zu bytes of shared memory each fits "
             "this device", cluster, smem_bytes(buffers));
    return 0;
  }
  if (cached < 16) cache[cached++] = Entry{device, kernel, cluster, buffers, clusters};
  return clusters;
}

}  // namespace

extern "C" {

// Shared memory one CTA with `buffers` tile buffers needs (bytes).
size_t fp8moe_rmsnorm_smem_bytes(int buffers) { return smem_bytes(buffers); }

// Clusters of this shape resident at once on the current device (0: none, err says why).
int fp8moe_rmsnorm_resident_clusters(int cluster, int buffers, char* err, int err_len) {
  return resident_clusters(kernel_for(buffers, buffers), cluster, buffers, err, err_len);
}

// 1 when a launch leaves its `claims` counter zeroed (NORM_RESET_CLAIMS), so that one counter can
// serve every launch of a stream; 0 when each launch needs a freshly zeroed one.
int fp8moe_rmsnorm_resets_claims() { return NORM_RESET_CLAIMS; }

// The current device's address of counter `slot` of g_claims (zeroed when the library loads, and
// by every launch that uses it, NORM_RESET_CLAIMS) into *out.
int fp8moe_rmsnorm_claims_slot(int slot, int** out, char* err, int err_len) {
  if (slot < 0 || slot >= CLAIM_SLOTS) {
    snprintf(err, err_len, "claim slot %d: there are %d", slot, CLAIM_SLOTS);
    return 1;
  }
  void* base = nullptr;
  const cudaError_t e = cudaGetSymbolAddress(&base, g_claims);
  if (e != cudaSuccess) return fail(err, err_len, cudaGetErrorString(e));
  *out = static_cast<int*>(base) + slot;
  return 0;
}

// How many streams per device can have a claim slot.
int fp8moe_rmsnorm_claim_slots() { return CLAIM_SLOTS; }

#ifdef NORM_TIMELINE
int fp8moe_rmsnorm_timeline(unsigned long long* out) {  // [1024][4 * 64 + 5] to the host
  return int(cudaMemcpyFromSymbol(out, g_timeline, sizeof(g_timeline)));
}
#endif

// The whole operation, launched on `stream`: see the header and models/fp8/norm_cuda.py. cluster
// divides 128 (at most 16) and its CTAs split the ceil(K / 128) column tiles evenly, at most
// `buffers` each (CTAs without a tile only take part in the exchange); x bf16 with a 16-byte
// aligned base and row stride; K % 8 == 0. claims: one zeroed int the launch may use to hand out
// the leftover row blocks (RowBlocks), which no other launch uses meanwhile, or null. The launch
// is programmatic (NORM_PDL): it may start before the stream's previous kernel has finished.
int fp8moe_rmsnorm_quant(const void* x, int64_t ldx, const void* w, int w_bf16, float eps, int M,
                         int K, int pow2, int colwise, void* q, float* s, void* qt, float* st,
                         float* rstd, void* hp, int hp_bf16, int Mp, int cluster, int buffers,
                         int* claims, void* stream, char* err, int err_len) {
  const int Kb = (K + TILE - 1) / TILE, Mb = (M + TILE - 1) / TILE;
  if (M < 1 || K < 1 || K % 8)
    return fail(err, err_len, "need M >= 1 and K a positive multiple of 8");
  if (cluster < 1 || cluster > MAX_CLUSTER || TILE % cluster || buffers < 1 ||
      cluster * buffers < Kb) {
    snprintf(err, err_len, "%d CTAs x %d tile buffers do not hold the %d column tiles (cluster: "
             "a power of two up to %d)", cluster, buffers, Kb, MAX_CLUSTER);
    return 1;
  }
  CUtensorMap map;
  if (x_tile_map(&map, x, M, K, ldx, err, err_len)) return 1;
  const Kernel kernel = kernel_for((Kb + cluster - 1) / cluster, buffers);
  const int clusters = resident_clusters(kernel, cluster, buffers, err, err_len);
  if (clusters < 1) return 1;
  const Args args{w, w_bf16, static_cast<uint8_t*>(q), s, static_cast<uint8_t*>(qt), st, rstd, hp,
                  hp_bf16, M, K, Mp, Mb, Kb, buffers, eps, pow2, colwise, claims};
  cudaLaunchAttribute attrs[2];
  const cudaLaunchConfig_t config =
      launch_config(cluster, buffers, std::min(clusters, Mb) * cluster, stream, attrs);
  const cudaError_t e = cudaLaunchKernelEx(&config, kernel, map, args);
  if (e != cudaSuccess) return fail(err, err_len, cudaGetErrorString(e));
  return 0;
}

}  // extern "C"
