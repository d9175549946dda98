// SwiGLU's backward straight into FP8, for Hopper (sm_90a): one pass over each 128 x 128 tile.
//
// What it computes is models.fp8.experts.swiglu_backward_quantize's contract (that docstring has
// the layouts): from the FP8 1x128 copy of h = [gate | up] (q_h [M, 2F] e4m3, scales s_h [M, 2F /
// 128] at any strides) and da = dL/da (bf16 [M, F]), in fp32 on the dequantized g and u,
//     sig = 1 / (1 + exp(-g)),  a = g sig u,  dup = da g sig,  dgate = da u sig (1 + g (1 - sig)),
// written as FP8 only: dh = [dgate | dup] in both copies (1x128 q_dh [M, 2F] with MN-major scales
// s_dh, 128x1 stored transposed qt_dh [2F, Mp] with st_dh [Mb, 2F]) and the 128x1 copy of a (qt_a
// [F, Mp], st_a [Mb, F]) for the down projection's Wgrad. Rows of qt past M are zeros. Scales and
// casts are the reference's (../common/fp8_cast.cuh). The sigmoid is the hardware's approximate
// one (see sigmoid()), so a last-bit tie may round the other way than the reference's
// torch.sigmoid.
//
// Why a CUDA kernel: the Triton kernel (experts.py) makes one of the three outputs per program,
// so every input is read and every sigmoid computed three times; an ncu profile on the H100
// (32768 x 3584) counted 110 instructions per element at 2.2 issued per cycle, 49.5% of a copy's
// bandwidth. Programs making two or all three outputs spill in Triton (three 128 x 128 fp32
// tiles live), and ran slower still. Here one CTA makes all three, in two passes over the tile:
//
//   1. the tile's inputs are in shared memory (cp.async, issued one tile ahead: the CTA is
//      persistent and double-buffers, so the next tile's loads run under this tile's work); each
//      thread computes the three outputs of its 4 x 8 block and keeps only their amaxes: per row
//      (dgate, dup) and per column (dgate, dup, a), reduced over lanes by shuffles and over warps
//      by shared-memory atomicMax on the bits of |v| (for non-negative floats the integer order
//      is the float order, and NaN's pattern is above inf's, so a NaN reaches its scale);
//   2. 640 scales (2 x 128 rows, 3 x 128 columns), one or two per thread;
//   3. each thread recomputes its block (the inputs are still in shared memory) and stores the
//      row-wise copies from registers and the column-wise copies, 4 rows of a column as one word.
// Recomputing costs the sigmoid twice per element instead of holding 3 x 64 KB of fp32.
//
// Measured on an H100 (bytes the operation must move against a device-to-device copy, each
// interleaved with its copy): 0.83-0.86 at 32768-65536 x 1536-3584, 0.77-0.79 at 8192-16384 x
// 1536-2048, 0.54 at 4096 x 1536 (0.50-0.51, 0.48-0.49 and 0.39 for Triton in the same runs:
// 1.6-1.7x, and 1.4x at the smallest). ncu at 32768 x 3584: 75 instructions per element (Triton
// 110), 2.7 issued per cycle with 16 warps per SM, DRAM 77% busy.
// Measured and not kept (twentieth session, H100, bitwise the same outputs, each against this
// kernel in interleaved rounds at 32768 x 7168, 16384 x 4096 / 3072 and 65536 x 3072): pass 1's
// sigmoids kept in shared memory for pass 3 (64 KB; 4 of the 75 instructions a pair saved,
// among them both MUFU): 83.3-83.6% of a copy against 83.3-83.4%; three input buffers, two tiles
// loaded ahead: +0.3%; three barriers a tile instead of four (the loads issued after the first):
// within 1% either way. ncu's stall samples spread over the whole tile (no site above 6%), so
// neither the instruction count nor the load depth is the limit on its own.
// Twenty-fifth session (H100, each variant interleaved with a copy): the stores are what costs,
// not their form. Built without the q / qt stores (pass 3's arithmetic then dead) the kernel
// took 217 us at 32768 x 7168 against 440 us; without pass 1's arithmetic (the scales left
// wrong) 445 us, without pass 3's (constants stored) 443 us: the arithmetic of either pass hides
// under the memory traffic. Whole-line stores did not help: the outputs staged in shared memory
// (80 KB, swizzled so that pass 3 writes without bank conflicts) and copied out as 128-byte
// lines, 16 bytes a thread, bitwise the same, ran 0.84-1.00x this kernel at four shapes (32768 x
// 7168: 84.3% of a copy against 85.0%; commit e7cf366 has the code), and cache hints on the
// stores (st.global.cs, L1::no_allocate, L2::evict_first) 0.96-0.99x. Nor did moving the
// stores in time: the staged tile copied out during the next tile's pass 1 (a quarter after each
// of its rows, so that stores and arithmetic overlap) or at that tile's start ran 0.93-0.99x,
// and the next tile's loads issued after pass 1 or pass 2 (beside the stores) instead of at the
// tile's start 0.92-1.02x (0.92-0.93x at 32768 x 7168).
// The form of the stores and their place among the phases are both ruled out; what holds the
// kernel at ~84% of a copy is not known. Nor is it the CTAs' phases coinciding across the GPU
// (they start together and do the same work): odd CTAs started 2 or 4 us late (__nanosleep)
// ran 0.985-1.001x at 32768 x 7168, 65536 x 3072 and 16384 x 4096 (twenty-eighth session, H100;
// the default reached 85.6% / 84.6% / 80.2% of a copy in that sweep).
//
// Threads: 512 (16 warps); thread (i, j), i in 0..31, j in 0..15, owns rows 4i.., columns 8j.. of
// the tile: warp w holds i = 8 (w % 4) + lane / 4, j = 4 (w / 4) + lane % 4. A warp's q_dh store
// of one row is then 4 lanes x 8 bytes and its qt store of one column 8 lanes x 4 bytes: whole
// 32-byte sectors either way. Shared memory is swizzled so that a warp's reads (8 rows x 32 bytes
// of g or u, 8 rows x 64 bytes of da) take the fewest wavefronts: the 16-byte chunk c of row r
// lies at c ^ (r / 4 % 8) in g and u and at c ^ (4 (r / 4 % 2)) in da.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/device_ptx.cuh"  // smem_addr, programmatic dependent launch
#include "../common/fp8_cast.cuh"    // e4m3x2, e4m3x8, scale_of, unpack8
#include "../common/host_tma.cuh"    // fail (the C ABI's error message)

namespace {

using csrc_common::allow_dependent_grids;
using csrc_common::e4m3x2;
using csrc_common::e4m3x8;
using csrc_common::fail;
using csrc_common::scale_of;
using csrc_common::smem_addr;
using csrc_common::unpack8;
using csrc_common::wait_for_prior_grids;

constexpr int TILE = 128;
constexpr int THREADS = 512;
constexpr int ROWS = 4;  // rows per thread
constexpr int COLS = 8;  // columns per thread

// One tile's inputs (a buffer of the double-buffered ring).
struct alignas(128) Inputs {
  uint8_t g[TILE * TILE];      // e4m3, swizzled (see the header)
  uint8_t u[TILE * TILE];
  uint8_t da[TILE * TILE * 2];  // bf16
  float sg[TILE];              // the tile's gate and up scales of each row
  float su[TILE];
};

struct Smem {
  Inputs in[2];
  uint32_t row_amax[2][TILE];  // dgate, dup
  uint32_t col_amax[3][TILE];  // dgate, dup, a
  float inv_row[2][TILE];      // reciprocal scales
  float inv_col[3][TILE];
};

struct Args {
  const uint8_t* qh;  // [M, 2F]
  const float* sh;    // scale of row m, group k at sh[m * sh_m + k * sh_k]
  int64_t sh_m, sh_k;
  const uint16_t* da;  // [M, F] bf16, row stride ld_da
  int64_t ld_da;
  uint8_t* q_dh;  // [M, 2F]
  float* s_dh;    // [2F / 128][M]
  uint8_t* qt_dh;  // [2F, Mp]
  float* st_dh;    // [Mb, 2F]
  uint8_t* qt_a;   // [F, Mp]
  float* st_a;     // [Mb, F]
  int M, F, Mp, Fb, tiles, pow2;
};

// ---------------------------------------------------------------------------------------------
// PTX wrappers

// 16 (cp_async16) or 4 (cp_async4) bytes from global to shared memory, asynchronously;
// src_bytes 0 reads nothing and writes zeros (rows past M).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
               ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Two e4m3 values (the low and high byte of `pair`) as floats.
__device__ __forceinline__ float2 e4m3x2_to_float2(uint16_t pair) {
  uint32_t h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(pair));
  return __half22float2(*reinterpret_cast<const __half2*>(&h));
}

// 1 / (1 + exp(-g)) from the hardware's approximate exp2 and reciprocal, flushing denormals (a
// result the flush changes is 1 either way: exp(-g) below 2^-126 next to 1). Triton's division
// is div.full, within 2 ulp like this reciprocal but not always the same bits; div.full here
// costs 4 more instructions per sigmoid, 8 per element (measured in SASS), so the two kernels
// may differ in the last bit of a value, and an FP8 value or a scale where that bit decides.
__device__ __forceinline__ float sigmoid(float g) {
  float e, r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(g * -1.4426950408889634f));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(1.0f + e));
  return r;
}

// ---------------------------------------------------------------------------------------------
// Loading a tile

__device__ __forceinline__ int swizzle_gu(int row, int chunk) { return chunk ^ ((row >> 2) & 7); }
__device__ __forceinline__ int swizzle_da(int row, int chunk) {
  return chunk ^ (((row >> 2) & 1) << 2);
}

struct Thread {
  int tid, warp, lane, i, j;
  int gu_at, da_at;  // where row 4i of this thread's block starts in Inputs::g / u and da
  __device__ Thread() {
    tid = threadIdx.x;
    warp = tid >> 5;
    lane = tid & 31;
    i = 8 * (warp & 3) + (lane >> 2);
    j = 4 * (warp >> 2) + (lane & 3);
    // the swizzles depend on the row through r / 4 only, which is i for all of the block's rows
    gu_at = ROWS * i * TILE + swizzle_gu(ROWS * i, j >> 1) * 16 + (j & 1) * 8;
    da_at = ROWS * i * 2 * TILE + swizzle_da(ROWS * i, j) * 16;
  }
};

// Issue the loads of tile (rb, cb) into `in`: 8 x 16 bytes of g and of u and 16 x 16 of da per
// row, and the 2 x 128 scales; rows past M are zero-filled (from a valid address).
__device__ __forceinline__ void load_tile(Inputs& in, const Args& a, const Thread& t, int rb,
                                          int cb) {
  const int row0 = rb * TILE;
#pragma unroll
  for (int k = 0; k < 2; ++k) {  // g and u: 1024 chunks each
    const int q = t.tid + k * THREADS, r = q >> 3, c = q & 7;
    const int row = min(row0 + r, a.M - 1);
    const uint32_t bytes = row0 + r < a.M ? 16 : 0;
    const uint8_t* src = a.qh + int64_t(row) * 2 * a.F + cb * TILE + c * 16;
    const int at = r * TILE + swizzle_gu(r, c) * 16;
    cp_async16(in.g + at, src, bytes);
    cp_async16(in.u + at, src + a.F, bytes);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // da: 2048 chunks
    const int q = t.tid + k * THREADS, r = q >> 4, c = q & 15;
    const int row = min(row0 + r, a.M - 1);
    const uint16_t* src = a.da + int64_t(row) * a.ld_da + cb * TILE + c * 8;
    cp_async16(in.da + r * 2 * TILE + swizzle_da(r, c) * 16, src, row0 + r < a.M ? 16 : 0);
  }
  if (t.tid < 2 * TILE) {  // the gate scales, then the up scales (group Fb + cb)
    const int r = t.tid & (TILE - 1), up = t.tid >> 7;
    const int row = min(row0 + r, a.M - 1);
    const float* src = a.sh + int64_t(row) * a.sh_m + int64_t(cb + up * a.Fb) * a.sh_k;
    cp_async4((up ? in.su : in.sg) + r, src, row0 + r < a.M ? 4 : 0);
  }
}

// ---------------------------------------------------------------------------------------------
// The arithmetic

// The three outputs of one row of this thread's block, columns 8j .. 8j + 7, from shared
// memory.
struct Outputs {
  float dgate[COLS], dup[COLS], a[COLS];
};

// r: the row within the block (0 .. ROWS - 1).
__device__ __forceinline__ void compute_row(const Inputs& in, const Thread& t, int r,
                                            Outputs& o) {
  const uint2 g8 = *reinterpret_cast<const uint2*>(in.g + t.gu_at + r * TILE);
  const uint2 u8 = *reinterpret_cast<const uint2*>(in.u + t.gu_at + r * TILE);
  const uint4 d16 = *reinterpret_cast<const uint4*>(in.da + t.da_at + r * 2 * TILE);
  const float sg = in.sg[ROWS * t.i + r], su = in.su[ROWS * t.i + r];
  float d[COLS];
  unpack8(d16, d);
  const uint32_t gw[2] = {g8.x, g8.y}, uw[2] = {u8.x, u8.y};
#pragma unroll
  for (int c = 0; c < COLS; c += 2) {
    const int w = c >> 2, shift = (c & 2) * 8;
    const float2 g2 = e4m3x2_to_float2(uint16_t(gw[w] >> shift));
    const float2 u2 = e4m3x2_to_float2(uint16_t(uw[w] >> shift));
    const float gs[2] = {g2.x * sg, g2.y * sg}, us[2] = {u2.x * su, u2.y * su};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float g = gs[h], u = us[h], da = d[c + h];
      const float sig = sigmoid(g);
      const float silu = g * sig;
      o.a[c + h] = silu * u;
      o.dup[c + h] = da * silu;
      o.dgate[c + h] = da * u * sig * (1.0f + g * (1.0f - sig));
    }
  }
}

// max(m, |v|), NaN if either is (one FMNMX: the abs is an operand modifier). Amaxes are held as
// floats while a thread accumulates them and as their bits once reduced across threads.
__device__ __forceinline__ float amax(float m, float v) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(m), "f"(fabsf(v)));
  return r;
}

// The max over the 2^BITS lanes whose ids differ only in bits first_bit .. first_bit + BITS - 1 (an
// xor butterfly) of each of the N values v[] per lane, reduce-scattered: afterwards a lane holds
// in v[0 .. N / 2^BITS - 1] the maxima of indices p * N / 2^BITS + 0, 1, ..., where p is the
// value of those bits of its id (its position among those lanes).
template <int N, int BITS>
__device__ __forceinline__ void reduce_scatter_max(uint32_t (&v)[N], int lane, int first_bit) {
  int n = N;
#pragma unroll
  for (int b = BITS - 1; b >= 0; --b) {
    const int h = n / 2;
    const bool upper = (lane >> (first_bit + b)) & 1;
#pragma unroll
    for (int k = 0; k < N / 2; ++k) {
      if (k < h) {
        const uint32_t send = upper ? v[k] : v[k + h];
        const uint32_t keep = upper ? v[k + h] : v[k];
        v[k] = max(keep, __shfl_xor_sync(0xFFFFFFFFu, send, 1 << (first_bit + b)));
      }
    }
    n = h;
  }
}

// Pass 1: this thread's amaxes into the shared row_amax / col_amax (cleared before).
__device__ __forceinline__ void tile_amaxes(const Inputs& in, Smem& sm, const Thread& t) {
  float row_max[2 * ROWS];  // [dgate rows 0..3 | dup rows 0..3]
  float col_max[3 * COLS];  // [dgate | dup | a] x 8 columns
#pragma unroll
  for (int k = 0; k < 3 * COLS; ++k) col_max[k] = 0.0f;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    Outputs o;
    compute_row(in, t, r, o);
    float rg = 0.0f, ru = 0.0f;
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
      rg = amax(rg, o.dgate[c]), ru = amax(ru, o.dup[c]);
      col_max[c] = amax(col_max[c], o.dgate[c]);
      col_max[COLS + c] = amax(col_max[COLS + c], o.dup[c]);
      col_max[2 * COLS + c] = amax(col_max[2 * COLS + c], o.a[c]);
    }
    row_max[r] = rg, row_max[ROWS + r] = ru;
  }
  uint32_t rows[2 * ROWS], cols[3 * COLS];
#pragma unroll
  for (int k = 0; k < 2 * ROWS; ++k) rows[k] = __float_as_uint(row_max[k]);
#pragma unroll
  for (int k = 0; k < 3 * COLS; ++k) cols[k] = __float_as_uint(col_max[k]);
  // rows: over the 4 lanes of an i (lane bits 0-1), 2 values left a lane: index 2 (lane & 3) + k
  reduce_scatter_max<2 * ROWS, 2>(rows, t.lane, 0);
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int idx = 2 * (t.lane & 3) + k;  // output idx / 4, row idx % 4
    atomicMax(&sm.row_amax[idx >> 2][ROWS * t.i + (idx & 3)], rows[k]);
  }
  // columns: over the 8 lanes of a j (lane bits 2-4), 3 values left a lane: 3 (lane >> 2) + k
  reduce_scatter_max<3 * COLS, 3>(cols, t.lane, 2);
#pragma unroll
  for (int k = 0; k < 3; ++k) {
    const int idx = 3 * (t.lane >> 2) + k;  // output idx / 8, column idx % 8
    atomicMax(&sm.col_amax[idx >> 3][COLS * t.j + (idx & 7)], cols[k]);
  }
}

// Pass 2: the 640 scales, one or two per thread: rows (dgate, dup) into s_dh, columns into st_dh (dgate,
// dup) and st_a; reciprocals into shared memory, amaxes cleared for the next tile.
__device__ __forceinline__ void tile_scales(Smem& sm, const Thread& t, const Args& a, int rb,
                                            int cb) {
  for (int k = t.tid; k < 5 * TILE; k += THREADS) {
    const int out = k >> 7, x = k & (TILE - 1);
    if (out < 2) {
      const float2 s = scale_of(sm.row_amax[out][x], a.pow2);
      const int row = rb * TILE + x;
      if (row < a.M) a.s_dh[int64_t(out * a.Fb + cb) * a.M + row] = s.x;
      sm.inv_row[out][x] = s.y;
      sm.row_amax[out][x] = 0;
    } else {
      const int which = out - 2;
      const float2 s = scale_of(sm.col_amax[which][x], a.pow2);
      const int col = cb * TILE + x;
      if (which < 2) a.st_dh[int64_t(rb) * 2 * a.F + which * a.F + col] = s.x;
      else a.st_a[int64_t(rb) * a.F + col] = s.x;
      sm.inv_col[which][x] = s.y;
      sm.col_amax[which][x] = 0;
    }
  }
}

// Pass 3: both copies of dgate and dup, the 128x1 copy of a, of this thread's block.
__device__ __forceinline__ void tile_store(const Inputs& in, const Smem& sm, const Thread& t,
                                           const Args& a, int rb, int cb) {
  float inv_cols[3][COLS];
#pragma unroll
  for (int w = 0; w < 3; ++w) {
#pragma unroll
    for (int c = 0; c < COLS; ++c) inv_cols[w][c] = sm.inv_col[w][COLS * t.j + c];
  }
  uint32_t packed[3][COLS];  // byte r: row 4i + r of column 8j + c, for qt
  const int row0 = rb * TILE + ROWS * t.i, col0 = cb * TILE + COLS * t.j;
#pragma unroll
  for (int r = 0; r < ROWS; r += 2) {
    Outputs o[2];
    compute_row(in, t, r, o[0]);
    compute_row(in, t, r + 1, o[1]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + r + h;
      if (row < a.M) {
        uint8_t* q = a.q_dh + int64_t(row) * 2 * a.F + col0;
        *reinterpret_cast<uint2*>(q) = e4m3x8(o[h].dgate, sm.inv_row[0][ROWS * t.i + r + h]);
        *reinterpret_cast<uint2*>(q + a.F) = e4m3x8(o[h].dup, sm.inv_row[1][ROWS * t.i + r + h]);
      }
    }
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
      const uint32_t pg = e4m3x2(o[0].dgate[c] * inv_cols[0][c], o[1].dgate[c] * inv_cols[0][c]);
      const uint32_t pu = e4m3x2(o[0].dup[c] * inv_cols[1][c], o[1].dup[c] * inv_cols[1][c]);
      const uint32_t pa = e4m3x2(o[0].a[c] * inv_cols[2][c], o[1].a[c] * inv_cols[2][c]);
      packed[0][c] = r ? packed[0][c] | (pg << 16) : pg;
      packed[1][c] = r ? packed[1][c] | (pu << 16) : pu;
      packed[2][c] = r ? packed[2][c] | (pa << 16) : pa;
    }
  }
#pragma unroll  // qt holds Mp >= Mb * 128 rows: no bound check
  for (int c = 0; c < COLS; ++c) {
    const int64_t col = col0 + c;
    *reinterpret_cast<uint32_t*>(a.qt_dh + col * a.Mp + row0) = packed[0][c];
    *reinterpret_cast<uint32_t*>(a.qt_dh + (col + a.F) * a.Mp + row0) = packed[1][c];
    *reinterpret_cast<uint32_t*>(a.qt_a + col * a.Mp + row0) = packed[2][c];
  }
}

// SWIGLU_PDL=1: launched with programmatic stream serialization, so that the CTAs start (and
// clear their amaxes) while the kernel before them in the stream finishes; the first global
// access waits for it (wait_for_prior_grids), and each CTA at once lets the next kernel be
// scheduled on the SMs it leaves. Thirtieth session, H100, an interleaved sweep, outputs bitwise
// the same: 84.2 / 77.6 / 83.4 / 73.2% of a copy at M x 2F = 32768 x 4096, 16384 x 3072, 65536 x
// 3072 and 8192 x 4096, against 83.9 / 76.2 / 82.7 / 72.4% without.
#ifndef SWIGLU_PDL
#define SWIGLU_PDL 1
#endif

// ---------------------------------------------------------------------------------------------
// The kernel: persistent, CTA b takes tiles b, b + gridDim.x, ... (column block fastest), each
// tile's inputs loaded while the previous one is worked on.

__global__ void __launch_bounds__(THREADS, 1) swiglu_backward_kernel(const Args a) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const Thread t;
  for (int k = t.tid; k < 5 * TILE; k += THREADS) {
    if (k < 2 * TILE) sm.row_amax[k >> 7][k & (TILE - 1)] = 0;
    else sm.col_amax[(k >> 7) - 2][k & (TILE - 1)] = 0;
  }
  wait_for_prior_grids();  // the inputs, and the outputs another kernel may still read
  allow_dependent_grids();
  int tile = blockIdx.x;
  if (tile < a.tiles) load_tile(sm.in[0], a, t, tile / a.Fb, tile % a.Fb);
  cp_async_commit();
  for (int n = 0; tile < a.tiles; tile += gridDim.x, ++n) {
    const int next = tile + gridDim.x;
    if (next < a.tiles) load_tile(sm.in[(n + 1) & 1], a, t, next / a.Fb, next % a.Fb);
    cp_async_commit();
    cp_async_wait<1>();  // this tile's group has landed (the next one may still be in flight)
    __syncthreads();
    const Inputs& in = sm.in[n & 1];
    const int rb = tile / a.Fb, cb = tile % a.Fb;
    tile_amaxes(in, sm, t);
    __syncthreads();
    tile_scales(sm, t, a, rb, cb);
    __syncthreads();
    tile_store(in, sm, t, a, rb, cb);
    __syncthreads();  // `in` is free for the load two tiles on, the reciprocals for the next tile
  }
  cp_async_wait<0>();
}

}  // namespace

extern "C" {

size_t fp8moe_swiglu_backward_smem_bytes() { return sizeof(Smem); }

// The whole operation on `stream`, `ctas` persistent CTAs (the SM count): see the header and
// models/fp8/swiglu_cuda.py. qh and da 16-byte aligned, F % 128 == 0, ld_da % 8 == 0, Mp a
// multiple of 128 holding M.
int fp8moe_swiglu_backward(const void* qh, const float* sh, int64_t sh_m, int64_t sh_k,
                           const void* da, int64_t ld_da, int M, int F, int pow2, void* q_dh,
                           float* s_dh, void* qt_dh, float* st_dh, void* qt_a, float* st_a, int Mp,
                           int ctas, void* stream, char* err, int err_len) {
  if (M < 1 || F < TILE || F % TILE || ld_da % 8 || Mp % TILE || Mp < M || ctas < 1)
    return fail(err, err_len, "need M >= 1, F a positive multiple of 128, ld_da % 8 == 0 and Mp "
                              "a multiple of 128 holding M");
  if (reinterpret_cast<uintptr_t>(qh) % 16 || reinterpret_cast<uintptr_t>(da) % 16)
    return fail(err, err_len, "q_h and da must be 16-byte aligned");
  const int Fb = F / TILE, Mb = (M + TILE - 1) / TILE;
  const int64_t tiles = int64_t(Fb) * Mb;
  if (tiles > INT32_MAX) return fail(err, err_len, "too many 128 x 128 tiles");
  cudaError_t e = cudaFuncSetAttribute(swiglu_backward_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, sizeof(Smem));
  if (e != cudaSuccess) return fail(err, err_len, cudaGetErrorString(e));
  const Args args{static_cast<const uint8_t*>(qh), sh, sh_m, sh_k,
                  static_cast<const uint16_t*>(da), ld_da, static_cast<uint8_t*>(q_dh), s_dh,
                  static_cast<uint8_t*>(qt_dh), st_dh, static_cast<uint8_t*>(qt_a), st_a,
                  M, F, Mp, Fb, int(tiles), pow2};
  cudaLaunchAttribute pdl = csrc_common::programmatic_serialization();
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(tiles < ctas ? tiles : ctas));
  config.blockDim = dim3(THREADS);
  config.dynamicSmemBytes = sizeof(Smem);
  config.stream = static_cast<cudaStream_t>(stream);
  config.attrs = &pdl;
  config.numAttrs = SWIGLU_PDL ? 1 : 0;
  e = cudaLaunchKernelEx(&config, swiglu_backward_kernel, args);
  if (e != cudaSuccess) return fail(err, err_len, cudaGetErrorString(e));
  return 0;
}

}  // extern "C"
