"""Triton quantization kernels for the FP8 recipe: bf16 in, E4M3 + FP32 scales out, in one pass.

Every kernel computes exactly what `models.fp8.reference` computes (same fp32 operations: the
correctly rounded reciprocal `div_rn(1, s)` once per tile times x, the same power-of-two bit
trick), so on identical input the outputs are bitwise equal to the reference;
tests/test_fp8_quant.py checks that, and that the kernels compile for sm90 with the hardware
e4m3 conversion and 16-byte vector loads.

Wrappers (x_MK: 2-D bf16/fp16/fp32 with unit column stride; all return fresh tensors)
-------------------------------------------------------------------------------------
    quantize_1x128(x_MK, pow2_scales=False, check_finite=True) -> (q_MK, s_MKb)
    quantize_dual(x_MK, pow2_scales=False, check_finite=True)  -> (q_MK, s_MKb, qt_KMp, st_MbK)
        both with rows=idx: the copies of x_MK[idx] read through the index (the MoE dispatch's
        gather fused into the quantization)
    swiglu_quantize(gate_MF, up_MF, pow2_scales=False, colwise=True, check_finite=True, hp_out=None,
                    input_copy=False)
        -> (q_MF, s_MFb) or (q_MF, s_MFb, qt_FMp, st_MbF);  value quantized: silu(gate) * up in fp32
        [+ (q_M2F, s_M2Fb), input_copy: [gate | up]'s own 1x128 copy from the same read]
    rmsnorm_quantize(x_MK, weight_K, eps=1e-6, pow2_scales=False, colwise=True, check_finite=True,
                     hp_out=None) -> (q, s[, qt, st], rstd_M);  value quantized: x * rstd * weight in fp32
                     (on an sm90 GPU the CUDA cluster kernel of csrc/fp8_norm, see below)
    quantize_128x128(w_NK or w_ENK, pow2_scales=False, transpose=False, check_finite=True)
        -> (q, s) or (q, s, qt, st);  w may be a list of weights joined along N (quantized as
        their torch.cat, into the joined outputs directly)
Every wrapper also takes `tiling=` (a `Tiling`; default `DEFAULT_TILING[kernel]`): how the launch
cuts the work. It never changes a result, only the speed; scripts/sweep_quant.py times them.

Layouts (Mb = ceil(M/128), Kb = ceil(K/128), Mp = Mb * 128):
    q_MK   [M, K] e4m3, row-major: the 1x128 (row-wise) copy, left operand of Fprop/Dgrad.
    s_MKb  [M, Kb] fp32 *MN-major* (strides (1, M)): one scale per row per 128 columns, stored
           column by column, which is what cuBLAS's blockwise path (torch._scaled_mm) and
           DeepGEMM read for the left operand. s_MKb.t() is a contiguous [Kb, M] tensor.
    qt_KMp [K, Mp] e4m3, row-major: the transposed 128x1 (column-wise) copy, the Wgrad operand.
           Rows are padded with zeros from M to Mp, so the token (reduction) dimension of Wgrad
           is always a multiple of 128; qt_KMp[:, :M] equals reference quantize_128x1(x)[0].t().
    st_MbK [Mb, K] fp32 contiguous: the 128x1 scales, exactly reference quantize_128x1's layout;
           st_MbK.t() is the MN-major [K, Mb] scale of qt_KMp as a 1x128 left/right operand.
    weights: q [N, K] with s [Nb, Kb] contiguous; transpose=True adds qt [K, N], st [Kb, Nb]
           (the Dgrad operand), both from the same pass. A 3-D w_ENK (stacked experts, N % 128
           == 0) gives q [E, N, K], s [E, Nb, Kb] (and qt [E, K, N], st [E, Kb, Nb]).

Why these kernels and not more: DeepSeek-V3 (section 3.5.2) measures the cost of online
quantization as an extra HBM round trip, and on Hopper the FP8 WGMMA takes only K-major operands,
so every activation and gradient needs a row-wise and a column-wise copy. `quantize_dual` reads
the bf16 tensor once and writes both. The fused producers compute the value they quantize
(SwiGLU of the up-projection output, RMSNorm of the residual stream) so it never goes to HBM in
bf16. The SwiGLU one can also write the 1x128 copy of its own input h = [gate | up], which an FP8
SwiGLU saves for its backward, from the same read (`input_copy`; twenty-fourth session, H100:
bitwise what quantize_1x128(h) writes, 1.47-1.52x faster than the two kernels one after the other
at 8192-65536 rows x 3072-20480 columns, at 2.7-2.95 TB/s of GPU busy time, a copy's rate).

What each kernel moves, and why it is tiled the way it is
---------------------------------------------------------
All of them are memory-bound in principle: the figure of merit is GB/s (input read once, FP8
copies and scales written) against a device-to-device copy (scripts/bench_fp8.py). But an H100
SM's share of HBM is about 13 bytes per clock, and it issues at most 128 thread-instructions per
clock: the dual kernel moves 4 bytes per element (2 in, 1 + 1 out), so it has about 40
instructions per element before the SM, not HBM, sets the pace, and latency hiding needs slack
below that. The first dual kernel compiled to about 36 (SASS per element, sm90); the integer-path
transposed weight cast alone costs about 13. So these kernels are designed around instructions:
  * the clamp to +-448 is not executed on the GPU: the hardware conversion
    (cvt.rn.satfinite.e4m3x2.f32) saturates finite values to +-448 exactly as clamp-then-cast does;
  * a tile's inf/NaN check rides on its max-abs (a NaN-propagating max, then amax - amax is 0 for
    finite tiles and NaN otherwise) instead of a second reduction over x * 0;
  * a scale and its reciprocal are correctly rounded divisions (about 14 instructions), and
    Triton computes a column's 128x1 scale in every thread holding that column (32 threads of a
    128x128 tile with 8 warps, each holding 16 columns: a fifth of the dual kernel's
    instructions). `Tiling(compact_scales=True)` sends the amaxes out through the scale buffer
    (store, CTA barrier, load: they come back one scale per thread), computes scale and
    reciprocal there, and sends the reciprocals back the same way; the scale buffer is the
    kernel's output anyway. The dual kernel drops from 1848 to 1192 SASS instructions per thread
    (8 warps) at the price of registers.
Measured on the H100 (scripts/sweep_quant.py, fraction of a D2D copy at 32768x7168): the dual
kernel went from 0.59 to 0.92 (4 warps, compact scales), SwiGLU -> dual from 0.69 to 0.90, the
128x128 + transpose weight kernel from 0.65 to 0.93; DEFAULT_TILING holds the winners.

`quant_tile_kernel` (1x128, dual, SwiGLU): a tile is BLOCK_M rows x 128 columns, the smallest
shape that holds whole 1x128 groups and, with BLOCK_M = 128, whole 128x1 groups: the row-wise
scales are a reduction along the tile's columns (within a thread and its warp), the column-wise
scales one along its rows (across warps, through shared memory). The column-wise copy is stored
transposed, so Triton shuffles that FP8 tile through shared memory to write 128-byte rows of
qt_KMp. A program handles `tiles` consecutive tiles of one row block (prefetching the next
tile's input while it quantizes the current one when `prefetch`), which amortizes its set-up and
keeps loads in flight during the arithmetic; the 1-D grid runs along K fastest, so neighbouring
programs read neighbouring bytes of the same rows.

`rmsnorm_quant_kernel`: a row's scale depends on its full sum of squares, and with the 128x1
copy a tile needs the sums of all its 128 rows. Computing them in a separate pass over x reads x
twice from HBM (1.5x the bytes). Instead one launch runs a sequence of work items, each program
claiming the next item from an atomic counter: for each 128-row block, "sum" items (`tiles`
tiles each, read at once so that more bytes are in flight: partial sums of squares of its 128
rows over each 128 columns) and, at least `lag` tiles later (rounded up to whole row blocks),
Kb "quant" items that re-read the same tiles, by then still in L2 (the gap is a few MB; L2 is
50 MB), and quantize them; only sum items read HBM. The last sum item of a row block (the one
whose atomic increment completes the count) adds the Kb partials in tile order, whoever it is,
so rstd is deterministic; it writes rstd and raises the row block's flag, on which a quant item
spins. Items are claimed in order by programs already running, so the item a spinner waits for
belongs to a running program that waits on nothing later: no deadlock, whatever order the GPU
starts programs in and however many are resident (and under the interpreter, which runs
programs one after another, every flag is already up when it is read). By default a program
does one item (grid = items); `persistent` programs loop over items instead. The sum of
squares is thus added in another order than a whole-row reduction: rstd may differ from the
two-pass form's in the last bit, and the copies are bitwise the reference quantization of the
normalized value this kernel computed (hp_out). `Tiling(fused=False)` keeps the two-pass form
(rms pass, then the tile kernel with the norm as prologue) for comparison. A quant item loads its
tile before it waits for the flag (x is ready from the start), and with `l2_hints` the sum items
read with evict_last, the quant items with evict_first and store their copies evict_first.
Measured on the H100 (sweep_quant.py, 32768x7168 / 8192x4096): 63% / 56% of the copy, against
53-56% / 49-53% for the two-pass form; every fused Triton form tried lands within a few points of
an rms pass at full read bandwidth plus the dual kernel. Reading x once needs the row block's
partial sums exchanged between SMs while the tiles stay on chip, which Triton cannot express
(csrc/fp8_norm/EXPERIMENTS.md has the forms tried and their figures).
The CUDA kernel (csrc/fp8_norm/rmsnorm_quant.cu through models/fp8/norm_cuda.py; the default on
an sm90 GPU for bf16 x, `Tiling.cuda`) does that: a thread-block cluster owns a 128-row block
(at K = 7168, 8 CTAs of 7 tiles, 32 KB of shared memory each), loads it once by TMA, sends each
row's per-CTA sums of squares to the CTA owning the row with st.async, gets its rstd back the
same way, and quantizes the tiles from shared memory while the next row block's tiles load.
On the H100 it reaches 81-83% of a copy's bandwidth at 32768x7168 (bench_fp8, twenty-ninth and
thirtieth sessions), against 59-62% for the Triton kernel: a steady round runs at about 91% of a
copy's rate on the 120 of 132 SMs that hold a cluster of 8, and the call loses the rest to the
first round's loads, the clusters' drift with the one 18th round of 256 row blocks on 15 clusters
(which the cluster that finishes its 17 first now takes), and the launch (programmatic, so that
its set-up runs under the previous kernel's end).
csrc/fp8_norm/EXPERIMENTS.md has how it got there and every variant measured and not kept.
The model calls it through models.fp8.linear.FP8RMSNorm, for a norm whose output goes
straight into FP8 Linears or MLPs, with a bf16 hp_out: a norm's output also feeds bf16 consumers
(the router, MLA projections that convert.py keeps bf16, the routed experts' dispatch), which
read that. On the H100 the pair it replaces (the Triton norm, then the dual quantizer) took
1.04-1.6x as long; in `small`'s training step the five norms it serves make no measurable
difference (965.1 vs 964.5 ms at 4 x 4096 x 4).

`quant_128x128_kernel`: one 128x128 weight block per program, one scale; with transpose=True the
same block is also written transposed. What must never happen is one hardware-cast value stored
directly and also shuffled through shared memory for the transposed store: ptxas 12.x (Triton
3.6 bundles 12.8) miscompiles that pair, writing foreign bytes into the transposed copy
(triton-lang/triton#11111; on the H100 this was NaN in every Dgrad with fp32 weights). A value
that is only shuffled (quantize_dual's column-wise copy has its own scales) is unaffected. So the
transposed copy is cast separately: for bf16/fp16 weights in hardware from tl.trans(w) (a
register relabelling; the PTX keeps it a second set of conversions, then shuffles it), for fp32
weights, or with `Tiling(hw_transpose=False)`, a second time on the integer path (`_e4m3_rne`,
bitwise the same bytes; about twice the instructions). With fp32 the hardware form is unsafe:
LLVM merges the two casts into one, which is the miscompiled pair again.
tests/test_fp8_quant.py compiles every kernel for sm90 and rejects both patterns (in the TTGIR,
and by counting the e4m3 conversions in the PTX).

Non-finite input: a tile holding inf/NaN gets a NaN scale, so it can never produce a silently
wrong value. With check_finite=True (default) the wrapper then raises ValueError; that check
synchronizes with the GPU, so the training path (models/fp8/linear.py) passes check_finite=False
and lets the NaN propagate to the loss, where the trainer sees it.

Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CPU tests) rounds fp32 -> e4m3 wrongly
when rounding carries into the exponent (triton 3.6), so under the interpreter the kernels clamp
and round with integer arithmetic (`_e4m3_rne`, exact round-to-nearest-even); on the GPU they use
the hardware conversion. Both are checked bitwise against torch's cast.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from models.triton_env import INTERPRET  # before triton: the interpreter on CPU-only machines
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from models.kernels import cast_rne  # noqa: E402
from models.triton_launch import CachedLauncher  # noqa: E402

from . import norm_cuda
from .reference import AMAX_EPS, BLOCK, E4M3, FP8_MAX, ceil_div

_INTERPRET = INTERPRET
_INTERPRETED = tl.constexpr(_INTERPRET)
_PLAIN, _SWIGLU, _RMSNORM = 0, 1, 2
_EPS = tl.constexpr(AMAX_EPS)
_FMAX = tl.constexpr(FP8_MAX)


@dataclass(frozen=True)
class Tiling:
    """How one launch cuts its work; any choice gives bitwise the same copies and scales (for
    rmsnorm, of the normalized value: rstd may move in its last bit, see the module docstring).

    warps        num_warps of each program (every kernel)
    stages       num_stages, the software pipelining of a program's loop (tile kernels)
    tiles        consecutive 128-column tiles of one row block a program quantizes (tile kernels
                 and the two-pass rmsnorm), tiles one sum item of the fused rmsnorm reads at once
                 (rounded up to a power of two), or consecutive 128x128 blocks along K (weight
                 kernel)
    prefetch     load the next tile while quantizing the current one (tile kernels)
    block_m      rows per tile of the row-wise-only tile kernel (the 128x1 copy needs 128)
    fused        rmsnorm: one persistent kernel (True) or an rms pass, then the tile kernel
    persistent   fused rmsnorm: a program per SM slot walking items in a loop (True), or a
                 program per item (False; a loop costs ~60 registers per thread here, and fewer
                 programs per SM hide less latency)
    ctas_per_sm  persistent fused rmsnorm: programs launched per SM
    lag          fused rmsnorm: tiles between a tile's sum-of-squares read and its quantizing re-read
    compact_scales  128x1 copies (dual, SwiGLU, rmsnorm): compute each column's scale once, from its
                 amax passed through the st buffer, instead of in every thread holding the column
    maxnreg      register cap per thread (0: the compiler's choice); 128 lets two 8-warp programs
                 share an SM (tile kernels, fused rmsnorm)
    hw_transpose weight kernel: cast the transposed copy in hardware from tl.trans(w) (True; bf16
                 and fp16 weights only, fp32 always takes the integer path) or on the integer path
    l2_hints     fused rmsnorm: L2 eviction hints that keep x's lines for their re-read and let
                 everything else go first
    cuda         rmsnorm: the CUDA cluster kernel (csrc/fp8_norm, models/fp8/norm_cuda.py) where
                 it runs (an sm90 GPU, bf16 x, see norm_cuda.fits); the Triton fields above
                 apply where it does not
    cluster      CUDA rmsnorm: CTAs per thread-block cluster (a power of two up to 16; 0: the
                 fewest whose shared memory holds a 128-row block)
    """

    warps: int = 8
    stages: int = 1
    tiles: int = 1
    prefetch: bool = False
    block_m: int = 128
    fused: bool = True
    persistent: bool = False
    ctas_per_sm: int = 2
    lag: int = 256
    hw_transpose: bool = True
    compact_scales: bool = False
    maxnreg: int = 0
    l2_hints: bool = False
    cuda: bool = False
    cluster: int = 0

    def __post_init__(self):
        for name in ("warps", "stages", "tiles", "ctas_per_sm", "lag"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Tiling.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"Tiling.warps must be a power of two up to 32, got {self.warps}")
        if self.maxnreg and not 24 <= self.maxnreg <= 255:
            raise ValueError(f"Tiling.maxnreg must be 0 (no cap) or 24..255, got {self.maxnreg}")
        if self.block_m not in (16, 32, 64, 128):
            raise ValueError(f"Tiling.block_m must be 16, 32, 64 or 128, got {self.block_m}")
        if self.cluster not in (0, 1, 2, 4, 8, 16):
            raise ValueError(f"Tiling.cluster must be 0 (auto) or a power of two up to 16, got "
                             f"{self.cluster}")


DEFAULT_TILING = MappingProxyType({  # H100 sweep (fraction of a D2D copy, 32768x7168 / 8192x4096)
    "1x128": Tiling(warps=4, block_m=64, tiles=4, prefetch=True),  # 95% / 86%
    "dual": Tiling(warps=4, compact_scales=True),                   # 92% / 83%
    "swiglu": Tiling(warps=4, compact_scales=True),                 # 90% / 85%
    "swiglu 1x128": Tiling(warps=4, block_m=32),                    # 98% / 87%
    "rmsnorm": Tiling(cuda=True, warps=4, compact_scales=True, l2_hints=True),  # CUDA: 69% / 60%
    "128x128": Tiling(warps=8),                                     # 93% / 73%
})
"""The launch each wrapper uses unless given `tiling=` (chosen with scripts/sweep_quant.py)."""


@triton.jit
def _e4m3_rne(v):
    """fp32 (|v| <= 448, finite) -> e4m3 by round-to-nearest-even on the bits (interpreter path)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = bits & 0x7FFFFFFF
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    f = tl.abs(v) * 512.0
    sub = ((f + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0x3C800000, sub, normal) | sign
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _nanmax(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _amax(x, axis: tl.constexpr):
    """max |x| along axis; NaN (GPU) or inf (interpreter) if any element is NaN, inf if any is inf.
    Either way amax - amax is NaN exactly for non-finite tiles. (The interpreter runs a custom
    combine function element by element, ~10x slower than its own max; NaN -> inf keeps it fast.)"""
    if _INTERPRETED:
        return tl.max(tl.where(x == x, tl.abs(x), float("inf")), axis)
    return tl.reduce(tl.abs(x), axis, _nanmax)


@triton.jit
def _scale(amax, nonfinite, POW2: tl.constexpr):
    """amax/448 (floored, optionally rounded up to 2^k); NaN where `nonfinite` is (amax - amax
    of a NaN-propagating amax, or sum(x * 0)): 0 for finite tiles, NaN otherwise."""
    s = tl.math.div_rn(tl.maximum(amax, _EPS), _FMAX)
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x7FFFFF) & -8388608).to(tl.float32, bitcast=True)
    return s + nonfinite


@triton.jit
def _to_e4m3(q, EXACT_CAST: tl.constexpr):
    """e4m3(clamp(q, -448, 448)); the hardware cvt's satfinite is that clamp."""
    if EXACT_CAST:
        return _e4m3_rne(tl.minimum(tl.maximum(q, -_FMAX), _FMAX))
    return q.to(tl.float8e4nv)


@triton.jit
def _cast(x, s, EXACT_CAST: tl.constexpr):
    """e4m3(clamp(x * (1/s), -448, 448))."""
    return _to_e4m3(x * tl.math.div_rn(1.0, s), EXACT_CAST)


@triton.jit
def _cast_compact(x, amax, s_ptrs, mask, AXIS: tl.constexpr, POW2: tl.constexpr,
                  EXACT_CAST: tl.constexpr):
    """_cast(x, s) with s = _scale(amax) (amax reduced over AXIS of x) stored at s_ptrs, the
    divisions done once per scale: amax goes out through the scale buffer and comes back one
    scale per thread (a plain 1-D load), the reciprocal goes out and comes back in whatever layout
    the cast wants, then s overwrites it. Each round trip is a CTA barrier; the scale bytes are
    the kernel's output anyway."""
    tl.store(s_ptrs, amax, mask=mask)
    tl.debug_barrier()
    a = tl.load(s_ptrs, mask=mask, other=1.0)
    s = _scale(a, a - a, POW2)
    tl.store(s_ptrs, tl.math.div_rn(1.0, s), mask=mask)
    tl.debug_barrier()
    inv = tl.load(s_ptrs, mask=mask, other=1.0)
    tl.debug_barrier()
    tl.store(s_ptrs, s, mask=mask)
    if AXIS == 0:
        return _to_e4m3(x * inv[None, :], EXACT_CAST)
    return _to_e4m3(x * inv[:, None], EXACT_CAST)


@triton.jit
def rms_kernel(x_ptr, rstd_ptr, K, stride_xm, eps, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / K + eps))


@triton.jit
def _load_tile(x_ptr, u_ptr, rm, src, rk, M, k_end, stride_xm, stride_um, PROLOGUE: tl.constexpr,
               EVICT: tl.constexpr):
    """The raw input of one tile (and the up projection for SwiGLU); zeros outside M x k_end.
    Output row rm[i] reads input row src[i]: rm itself, or the index row quant_tile_kernel's
    GATHER read for it.
    EVICT: the L2 eviction policy of x's lines ("", "evict_first" or "evict_last")."""
    mask = (rm[:, None] < M) & (rk[None, :] < k_end)
    rows = src.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * stride_xm + rk[None, :], mask=mask, other=0.0, eviction_policy=EVICT)
    u = x
    if PROLOGUE == 1:
        u = tl.load(u_ptr + rows * stride_um + rk[None, :], mask=mask, other=0.0)
    return x, u


@triton.jit
def _quant_tile(x, u, w_ptr, rstd_ptr, hp_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, qi_ptr, si_ptr, rm,
                rk, row_block, k_blk, M, K, Mp, PROLOGUE: tl.constexpr, COLWISE: tl.constexpr,
                STORE_HP: tl.constexpr, POW2: tl.constexpr, EXACT_CAST: tl.constexpr,
                COMPACT: tl.constexpr, INPUT_COPY: tl.constexpr, STORE_EVICT: tl.constexpr):
    """Prologue, then the 1x128 copy of the tile [and its 128x1 copy, stored transposed].
    INPUT_COPY (SwiGLU): also the 1x128 copy of the inputs, [gate | up], into qi and si.
    STORE_EVICT: the L2 eviction policy of the FP8 copies' lines."""
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    rows = rm.to(tl.int64)[:, None]
    x = x.to(tl.float32)
    if INPUT_COPY:  # K % 128 == 0 here: gate's group k_blk is [gate | up]'s k_blk, up's Kb + k_blk
        inside = k_blk * 128 < K
        _store_1x128(x, qi_ptr, si_ptr, rm, rk, k_blk, inside, M, 2 * K, 0, K, POW2, EXACT_CAST,
                     "")
        _store_1x128(u.to(tl.float32), qi_ptr, si_ptr, rm, rk, K // 128 + k_blk, inside, M,
                     2 * K, K, K, POW2, EXACT_CAST, "")
    if PROLOGUE == 1:  # SwiGLU: x is the gate, u the up projection
        x = x / (1.0 + tl.exp(-x)) * u.to(tl.float32)
    if PROLOGUE == 2:  # RMSNorm: x * rstd[row] * w[col]
        rstd = tl.load(rstd_ptr + rm, mask=rm < M, other=0.0)
        # w read as a whole tile (each row the same 256 bytes, from L1) rather than a vector
        # broadcast: see the fused rmsnorm's "one cause found and removed" in the module docstring
        w = tl.load(w_ptr + rk[None, :] + 0 * rm[:, None], mask=mask, other=0.0).to(tl.float32)
        x = x * rstd[:, None] * w
    if STORE_HP:
        tl.store(hp_ptr + rows * K + rk[None, :], cast_rne(x, hp_ptr.dtype.element_ty), mask=mask)
    if COMPACT:
        store_rowwise_compact(x, q_ptr, s_ptr, rm, rk, k_blk, M, K, POW2, EXACT_CAST, STORE_EVICT)
    else:
        _store_1x128(x, q_ptr, s_ptr, rm, rk, k_blk, k_blk * 128 < K, M, K, 0, K, POW2,
                     EXACT_CAST, STORE_EVICT)
    if COLWISE:  # BLOCK_M == 128: this tile is also one row of 128x1 tiles
        if COMPACT:
            store_colwise_compact(x, qt_ptr, st_ptr, rm, rk, row_block, Mp, K, POW2, EXACT_CAST,
                                  STORE_EVICT)
        else:
            amax_t = _amax(x, 0)
            st = _scale(amax_t, amax_t - amax_t, POW2)
            tl.store(st_ptr + row_block * K + rk, st, mask=rk < K)
            qt = _cast(x, st[None, :], EXACT_CAST)
            tl.store(qt_ptr + rk[None, :].to(tl.int64) * Mp + rm[:, None], qt,
                     mask=(rk[None, :] < K), eviction_policy=STORE_EVICT)


@triton.jit
def _store_1x128(v, q_ptr, s_ptr, rm, rk, group, inside, M, row_len, col0, K,
                 POW2: tl.constexpr, EXACT_CAST: tl.constexpr, STORE_EVICT: tl.constexpr):
    """v [rows rm, columns rk < K] as columns col0 + rk of the 1x128 copy q [M, row_len] with
    scales s (MN-major [row_len / 128, M]) at `group`, one scale per row computed in every thread
    holding it (store_rowwise_compact computes each once). _quant_tile's row-wise copy, and the
    SwiGLU input's: the same operations, so the same bits as quantizing [M, row_len] whole.
    inside: whether the tile starts before K (a program's last group of TILES may run past it);
    nothing is stored if not."""
    amax = _amax(v, 1)
    sc = _scale(amax, amax - amax, POW2)
    tl.store(s_ptr + group * M + rm, sc, mask=(rm < M) & inside)
    tl.store(q_ptr + rm.to(tl.int64)[:, None] * row_len + col0 + rk[None, :],
             _cast(v, sc[:, None], EXACT_CAST), mask=(rm[:, None] < M) & (rk[None, :] < K),
             eviction_policy=STORE_EVICT)


@triton.jit
def store_rowwise_compact(x, q_ptr, s_ptr, rm, rk, k_blk, M, K, POW2: tl.constexpr,
                          EXACT_CAST: tl.constexpr, STORE_EVICT: tl.constexpr):
    """x [rows rm, the 128 columns rk of group k_blk] of an [M, K] tensor: its 1x128 copy into
    q [M, K] and s (MN-major [K/128, M]), the scales computed once each (_cast_compact)."""
    q = _cast_compact(x, _amax(x, 1), s_ptr + k_blk * M + rm, (rm < M) & (k_blk * 128 < K), 1,
                      POW2, EXACT_CAST)
    tl.store(q_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], q,
             mask=(rm[:, None] < M) & (rk[None, :] < K), eviction_policy=STORE_EVICT)


@triton.jit
def store_colwise_compact(x, qt_ptr, st_ptr, rm, rk, row_block, Mp, K, POW2: tl.constexpr,
                          EXACT_CAST: tl.constexpr, STORE_EVICT: tl.constexpr):
    """x [the 128 rows rm of row block row_block, columns rk] of an [M, K] tensor: its 128x1 copy
    into qt [K, Mp] (transposed) and st [Mb, K], the scales computed once each."""
    qt = _cast_compact(x, _amax(x, 0), st_ptr + row_block * K + rk, rk < K, 0, POW2, EXACT_CAST)
    tl.store(qt_ptr + rk[None, :].to(tl.int64) * Mp + rm[:, None], qt, mask=(rk[None, :] < K),
             eviction_policy=STORE_EVICT)


@triton.jit
def _quant_group(x_ptr, u_ptr, w_ptr, rstd_ptr, hp_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, qi_ptr,
                 si_ptr, rm, src, row_block, k0, M, K, Mp, stride_xm, stride_um,
                 PROLOGUE: tl.constexpr, COLWISE: tl.constexpr, STORE_HP: tl.constexpr,
                 POW2: tl.constexpr, EXACT_CAST: tl.constexpr, COMPACT: tl.constexpr,
                 INPUT_COPY: tl.constexpr, TILES: tl.constexpr, PREFETCH: tl.constexpr):
    """Quantize tiles k0 .. k0 + TILES - 1 of row block rm (those inside K), reading the input
    rows src (see _load_tile)."""
    cols = tl.arange(0, 128)
    k_end = tl.minimum(K, (k0 + TILES) * 128)
    outs = (w_ptr, rstd_ptr, hp_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, qi_ptr, si_ptr)
    if PREFETCH:
        x, u = _load_tile(x_ptr, u_ptr, rm, src, k0 * 128 + cols, M, k_end, stride_xm, stride_um,
                          PROLOGUE, "")
        for t in range(TILES):
            rk = (k0 + t) * 128 + cols
            x_next, u_next = _load_tile(x_ptr, u_ptr, rm, src, rk + 128, M, k_end, stride_xm,
                                        stride_um, PROLOGUE, "")
            _quant_tile(x, u, *outs, rm, rk, row_block, k0 + t, M, K, Mp,
                        PROLOGUE, COLWISE, STORE_HP, POW2, EXACT_CAST, COMPACT, INPUT_COPY,
                        "")
            x, u = x_next, u_next
    else:
        for t in range(TILES):
            rk = (k0 + t) * 128 + cols
            x, u = _load_tile(x_ptr, u_ptr, rm, src, rk, M, k_end, stride_xm, stride_um, PROLOGUE,
                              "")
            _quant_tile(x, u, *outs, rm, rk, row_block, k0 + t, M, K, Mp,
                        PROLOGUE, COLWISE, STORE_HP, POW2, EXACT_CAST, COMPACT, INPUT_COPY,
                        "")


@triton.jit
def quant_tile_kernel(x_ptr, u_ptr, w_ptr, rstd_ptr, hp_ptr, q_ptr, s_ptr, qt_ptr, st_ptr,
                      qi_ptr, si_ptr, rows_ptr, M, K, Mp, stride_xm, stride_um,
                      PROLOGUE: tl.constexpr, COLWISE: tl.constexpr, STORE_HP: tl.constexpr,
                      POW2: tl.constexpr, EXACT_CAST: tl.constexpr, BLOCK_M: tl.constexpr,
                      TILES: tl.constexpr, PREFETCH: tl.constexpr, COMPACT: tl.constexpr,
                      GATHER: tl.constexpr, INPUT_COPY: tl.constexpr):
    # program -> (row block, group of TILES consecutive 128-column tiles), K fastest.
    # GATHER: output row m quantizes input row rows[m] (the copies of x[rows], never stored)
    groups = tl.cdiv(tl.cdiv(K, 128), TILES)
    pid = tl.program_id(0)
    row_block, k0 = pid // groups, (pid % groups) * TILES
    rm = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    src = rm
    if GATHER:
        src = tl.load(rows_ptr + rm, mask=rm < M, other=0)
    _quant_group(x_ptr, u_ptr, w_ptr, rstd_ptr, hp_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, qi_ptr,
                 si_ptr, rm, src, row_block, k0, M, K, Mp, stride_xm, stride_um, PROLOGUE, COLWISE,
                 STORE_HP, POW2, EXACT_CAST, COMPACT, INPUT_COPY, TILES, PREFETCH)


# Launched a few hundred times a training step: skip the JIT's per-call work (models/triton_launch).
_launch_quant_tile = CachedLauncher(quant_tile_kernel)


def _check_input(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, cols]; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"{name} must be bfloat16, float16 or float32, got {x.dtype}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"{name} must have unit column stride (got strides {x.stride()}); "
                         "pass x.contiguous()")
    if not x.is_cuda and not _INTERPRET:
        raise ValueError(f"{name} is on {x.device}: the Triton kernels need a CUDA tensor "
                         "(use models.fp8.reference on CPU, or TRITON_INTERPRET=1 in tests)")


def _tiling(tiling: Tiling | None, kernel: str) -> Tiling:
    if tiling is None:
        return DEFAULT_TILING[kernel]
    if not isinstance(tiling, Tiling):
        raise TypeError(f"tiling must be a models.fp8.quant.Tiling, got {type(tiling).__name__}")
    return tiling


def _launch_options(tiling: Tiling) -> dict:
    options = dict(num_warps=tiling.warps, num_stages=tiling.stages)
    if tiling.maxnreg:
        options["maxnreg"] = tiling.maxnreg
    return options


def _raise_if_nonfinite(name: str, *scales: torch.Tensor) -> None:
    for s in scales:
        if s.numel() and not bool(torch.isfinite(s).all()):
            raise ValueError(f"{name} contains inf or NaN; FP8 scales cannot represent it "
                             "(find where the non-finite values come from, e.g. a diverged loss)")


def _alloc_outputs(M: int, K: int, colwise: bool, device):
    Mb, Kb = ceil_div(M, BLOCK), ceil_div(K, BLOCK)
    q = torch.empty(M, K, dtype=E4M3, device=device)
    s = torch.empty(Kb, M, dtype=torch.float32, device=device).t()
    if not colwise:
        return q, s, q, s
    qt = torch.empty(K, Mb * BLOCK, dtype=E4M3, device=device)
    st = torch.empty(Mb, K, dtype=torch.float32, device=device)
    return q, s, qt, st


def _launch_tiles(prologue, x, u, w, rstd, hp_out, colwise, pow2_scales, tiling: Tiling,
                  rows=None, input_copy=None):
    """rows (plain quantization only): quantize x[rows], reading x's rows through the index.
    input_copy (SwiGLU only): (q, s) [M, 2K] outputs for the 1x128 copy of [x | u]."""
    M, K = x.shape if rows is None else (rows.numel(), x.shape[1])
    q, s, qt, st = _alloc_outputs(M, K, colwise, x.device)
    qi, si = (q, s) if input_copy is None else input_copy
    block_m = BLOCK if colwise else tiling.block_m
    if M and K:
        grid = (ceil_div(M, block_m) * ceil_div(ceil_div(K, BLOCK), tiling.tiles),)
        _launch_quant_tile[grid](
            x, x if u is None else u, x if w is None else w, s if rstd is None else rstd,
            q if hp_out is None else hp_out, q, s, qt, st, qi, si, s if rows is None else rows,
            M, K, qt.shape[1] if colwise else 0, x.stride(0), 0 if u is None else u.stride(0),
            PROLOGUE=prologue, COLWISE=colwise, STORE_HP=hp_out is not None, POW2=pow2_scales,
            EXACT_CAST=_INTERPRET, BLOCK_M=block_m, TILES=tiling.tiles, PREFETCH=tiling.prefetch,
            COMPACT=tiling.compact_scales, GATHER=rows is not None,
            INPUT_COPY=input_copy is not None, **_launch_options(tiling))
    return (q, s, qt, st) if colwise else (q, s)


def _check_rows(rows, x: torch.Tensor) -> None:
    """`rows` of the gathering wrappers: a 1-D integer index into x's rows, on x's device. The
    range is checked on the device (no host sync): an index out of range stops the stream with
    an assertion naming it."""
    if rows is None:
        return
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32,
                                                                                   torch.int64):
        raise TypeError("rows must be a 1-D int32/int64 tensor of row indices into x_MK, got "
                        f"{rows.dtype if isinstance(rows, torch.Tensor) else type(rows).__name__}"
                        f"{' ' + str(tuple(rows.shape)) if isinstance(rows, torch.Tensor) else ''}")
    if rows.device != x.device or not rows.is_contiguous():
        raise ValueError(f"rows must be contiguous and on x_MK's device ({x.device}), got "
                         f"{rows.device}, strides {rows.stride()}")
    if rows.numel():
        torch._assert_async(((rows >= 0) & (rows < x.shape[0])).all(),
                            "rows: a row index is outside x_MK's rows")


HP_OUT_DTYPES = (torch.float32, torch.bfloat16)
"""What `hp_out` may be: float32 holds the quantized value exactly (tests); bfloat16 is the
high-precision copy a model's other consumers read (models.fp8.linear.FP8RMSNorm)."""


def _check_hp_out(hp_out, M: int, K: int) -> None:
    if hp_out is not None and (hp_out.shape != (M, K) or hp_out.dtype not in HP_OUT_DTYPES
                               or not hp_out.is_contiguous()):
        raise ValueError(f"hp_out must be a contiguous float32 or bfloat16 [{M}, {K}] tensor, "
                         f"got a {'' if hp_out.is_contiguous() else 'non-contiguous '}"
                         f"{hp_out.dtype} {tuple(hp_out.shape)}")


def quantize_1x128(x_MK: torch.Tensor, pow2_scales: bool = False, check_finite: bool = True,
                   tiling: Tiling | None = None, rows: torch.Tensor | None = None):
    """Row-wise 1x128 quantization: (q_MK e4m3, s_MKb fp32 MN-major). See the module docstring.
    With `rows`, the copies of x_MK[rows] (len(rows) rows), read through the index."""
    _check_input(x_MK, "x_MK")
    _check_rows(rows, x_MK)
    out = _launch_tiles(_PLAIN, x_MK, None, None, None, None, False, pow2_scales,
                        _tiling(tiling, "1x128"), rows)
    if check_finite:
        _raise_if_nonfinite("x_MK", out[1])
    return out


def quantize_dual(x_MK: torch.Tensor, pow2_scales: bool = False, check_finite: bool = True,
                  tiling: Tiling | None = None, rows: torch.Tensor | None = None):
    """One read, both copies: (q_MK, s_MKb MN-major, qt_KMp transposed 128x1 copy, st_MbK).
    With `rows`, the copies of x_MK[rows] (len(rows) rows; the 128x1 groups run over the gathered
    order), read through the index: the gathered tensor never exists."""
    _check_input(x_MK, "x_MK")
    _check_rows(rows, x_MK)
    out = _launch_tiles(_PLAIN, x_MK, None, None, None, None, True, pow2_scales,
                        _tiling(tiling, "dual"), rows)
    if check_finite:
        _raise_if_nonfinite("x_MK", out[1], out[3])
    return out


def swiglu_quantize(gate_MF: torch.Tensor, up_MF: torch.Tensor, pow2_scales: bool = False,
                    colwise: bool = True, check_finite: bool = True, hp_out: torch.Tensor | None = None,
                    tiling: Tiling | None = None, input_copy: bool = False):
    """Quantize h = silu(gate) * up (computed in fp32, never stored in bf16) as 1x128 [and 128x1].

    gate and up may be column slices of one fused [M, 2F] up-projection output. hp_out, when
    given ([M, F] float32 or bfloat16), receives the h that was quantized (in bf16: rounded to
    nearest even, as .to() rounds). input_copy=True (F a multiple of 128) also returns the 1x128
    copy of the inputs themselves, (q [M, 2F], s MN-major) of [gate | up], bitwise what
    quantize_1x128(torch.cat([gate, up], 1)) returns, from the same read: what an FP8 SwiGLU
    saves for its backward (models.fp8.experts.swiglu_backward_quantize recomputes from it).
    """
    _check_input(gate_MF, "gate_MF")
    _check_input(up_MF, "up_MF")
    if gate_MF.shape != up_MF.shape or gate_MF.device != up_MF.device:
        raise ValueError(f"gate_MF {tuple(gate_MF.shape)} and up_MF {tuple(up_MF.shape)} must have "
                         "the same shape and device")
    _check_hp_out(hp_out, *gate_MF.shape)
    M, F = gate_MF.shape
    copy = None
    if input_copy:
        if F % BLOCK:
            raise ValueError(f"input_copy needs the SwiGLU width (gate_MF's {F} columns) to be a "
                             f"multiple of {BLOCK}; quantize torch.cat([gate, up], 1) instead")
        copy = _alloc_outputs(M, 2 * F, False, gate_MF.device)[:2]
    tiling = _tiling(tiling, "swiglu" if colwise else "swiglu 1x128")
    out = _launch_tiles(_SWIGLU, gate_MF, up_MF, None, None, hp_out, colwise, pow2_scales, tiling,
                        input_copy=copy)
    if check_finite:
        _raise_if_nonfinite("silu(gate_MF) * up_MF", *out[1::2])
        if copy is not None:
            _raise_if_nonfinite("gate_MF | up_MF", copy[1])
    return out if copy is None else (*out, *copy)


@triton.jit
def _norm_item(item, Mb, Kb, Ls, lag):
    """item -> (row block r, index j within its block, is a quant item). Row block r has Ls sum
    items S_r (SUM_TILES tiles each) and Kb quant items Q_r (one tile each), in the sequence
    S_0 .. S_{lag-1}, then S_{lag} Q_0 S_{lag+1} Q_1 ..., then the last lag Q blocks."""
    head = lag * Ls
    pair = Ls + Kb
    body = head + (Mb - lag) * pair
    t = item - head
    o = t % pair
    mid_quant = o >= Ls
    tail = item >= body
    is_quant = tail | ((item >= head) & mid_quant)
    r = tl.where(item < head, item // Ls,
                 tl.where(tail, Mb - lag + (item - body) // Kb, t // pair + tl.where(mid_quant, 0, lag)))
    j = tl.where(item < head, item % Ls, tl.where(tail, (item - body) % Kb, tl.where(mid_quant, o - Ls, o)))
    return r, j, is_quant


@triton.jit
def _norm_sum_item(x_ptr, rstd_ptr, part_ptr, count_ptr, flag_ptr, r, j, M, K, Kb, Ls, stride_xm,
                   eps, SUM_TILES: tl.constexpr, PARTS: tl.constexpr, EVICT: tl.constexpr):
    """Partial sums of squares of row block r over each of its tiles j * SUM_TILES + t (one load
    for all of them); the last of the row block's Ls sum items adds the Kb partials (in tile
    order, whoever finishes last) and publishes rstd."""
    rm = r * 128 + tl.arange(0, 128)
    cols = tl.arange(0, 128)
    x, _ = _load_tile(x_ptr, x_ptr, rm, rm, j * SUM_TILES * 128 + tl.arange(0, SUM_TILES * 128),
                      M, K, stride_xm, 0, 0, EVICT)
    x = x.to(tl.float32)
    part = tl.sum(tl.reshape(x * x, (128, SUM_TILES, 128)), axis=2)
    tile = j * SUM_TILES + tl.arange(0, SUM_TILES)
    tl.store(part_ptr + (r * Kb + tile).to(tl.int64)[None, :] * 128 + cols[:, None], part,
             mask=(tile < Kb)[None, :])
    tl.debug_barrier()  # every thread's partials are written before the count releases them
    if tl.atomic_add(count_ptr + r, 1, sem="acq_rel") == Ls - 1:
        ss = tl.zeros((128,), tl.float32)
        for j0 in range(0, Kb, PARTS):
            jj = j0 + tl.arange(0, PARTS)
            offs = (r * Kb + jj).to(tl.int64)[:, None] * 128 + cols[None, :]
            ss += tl.sum(tl.load(part_ptr + offs, mask=(jj < Kb)[:, None], other=0.0,
                                 cache_modifier=".cg"), axis=0)
        tl.store(rstd_ptr + rm, 1.0 / tl.sqrt_rn(ss / K + eps), mask=rm < M)
        tl.debug_barrier()
        tl.atomic_xchg(flag_ptr + r, 1, sem="release")


@triton.jit
def _norm_work(x_ptr, w_ptr, rstd_ptr, part_ptr, count_ptr, flag_ptr, hp_ptr, q_ptr, s_ptr, qt_ptr,
               st_ptr, item, Mb, Kb, Ls, lag, M, K, Mp, stride_xm, eps, COLWISE: tl.constexpr,
               STORE_HP: tl.constexpr, POW2: tl.constexpr, EXACT_CAST: tl.constexpr,
               COMPACT: tl.constexpr, SUM_TILES: tl.constexpr, PARTS: tl.constexpr,
               L2_HINTS: tl.constexpr):
    """One item: quantize a tile once its row block's rstd is out, or sum squares. A quant item
    loads its tile before it waits (x is the kernel's input, ready from the start), so the L2
    read overlaps the wait. With L2_HINTS a sum item's lines are kept in L2 for the quant item's
    re-read (evict_last), which lets them go once read (evict_first), as do the FP8 copies."""
    r, j, is_quant = _norm_item(item, Mb, Kb, Ls, lag)
    rm = r * 128 + tl.arange(0, 128)
    if is_quant:
        rk = j * 128 + tl.arange(0, 128)
        x, _ = _load_tile(x_ptr, x_ptr, rm, rm, rk, M, K, stride_xm, 0, 0,
                          "evict_first" if L2_HINTS else "")
        ready = tl.atomic_add(flag_ptr + r, 0, sem="acquire")
        while ready == 0:
            ready = tl.atomic_add(flag_ptr + r, 0, sem="acquire")
        _quant_tile(x, x, w_ptr, rstd_ptr, hp_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, q_ptr, s_ptr, rm,
                    rk, r, j, M, K, Mp, 2, COLWISE, STORE_HP, POW2, EXACT_CAST, COMPACT, False,
                    "evict_first" if L2_HINTS else "")
    else:
        _norm_sum_item(x_ptr, rstd_ptr, part_ptr, count_ptr, flag_ptr, r, j, M, K, Kb, Ls,
                       stride_xm, eps, SUM_TILES, PARTS, "evict_last" if L2_HINTS else "")


@triton.jit
def rmsnorm_quant_kernel(x_ptr, w_ptr, rstd_ptr, part_ptr, sync_ptr, hp_ptr, q_ptr, s_ptr, qt_ptr,
                         st_ptr, M, K, Mp, stride_xm, eps, lag,
                         COLWISE: tl.constexpr, STORE_HP: tl.constexpr, POW2: tl.constexpr,
                         EXACT_CAST: tl.constexpr, COMPACT: tl.constexpr,
                         SUM_TILES: tl.constexpr, PARTS: tl.constexpr, PERSISTENT: tl.constexpr,
                         L2_HINTS: tl.constexpr):
    # sync_ptr: [0] the item counter, [1 + r] row block r's finished sum items, [1 + Mb + r] its
    # flag. Sum items read HBM (SUM_TILES tiles at once, to keep more bytes in flight); quant
    # items re-read their tile from L2.
    Mb, Kb = tl.cdiv(M, 128), tl.cdiv(K, 128)
    Ls = tl.cdiv(Kb, SUM_TILES)
    count_ptr, flag_ptr = sync_ptr + 1, sync_ptr + 1 + Mb
    if PERSISTENT:
        item = tl.atomic_add(sync_ptr, 1, sem="relaxed")
        while item < Mb * (Ls + Kb):
            _norm_work(x_ptr, w_ptr, rstd_ptr, part_ptr, count_ptr, flag_ptr, hp_ptr, q_ptr, s_ptr,
                       qt_ptr, st_ptr, item, Mb, Kb, Ls, lag, M, K, Mp, stride_xm, eps, COLWISE,
                       STORE_HP, POW2, EXACT_CAST, COMPACT, SUM_TILES, PARTS, L2_HINTS)
            item = tl.atomic_add(sync_ptr, 1, sem="relaxed")
    else:  # one item per program, still claimed in order (not by program id)
        _norm_work(x_ptr, w_ptr, rstd_ptr, part_ptr, count_ptr, flag_ptr, hp_ptr, q_ptr, s_ptr,
                   qt_ptr, st_ptr, tl.atomic_add(sync_ptr, 1, sem="relaxed"), Mb, Kb, Ls, lag, M,
                   K, Mp, stride_xm, eps, COLWISE, STORE_HP, POW2, EXACT_CAST, COMPACT, SUM_TILES,
                   PARTS, L2_HINTS)


def _programs(device: torch.device, per_sm: int) -> int:
    if _INTERPRET:
        return 2  # the interpreter runs programs one after another: the first does every item
    return torch.cuda.get_device_properties(device).multi_processor_count * per_sm


def _launch_norm(x, w, rstd, hp_out, colwise, pow2_scales, eps, tiling: Tiling):
    """One persistent launch: sum items and quant items of every row block (module docstring)."""
    M, K = x.shape
    q, s, qt, st = _alloc_outputs(M, K, colwise, x.device)
    Mb, Kb = ceil_div(M, BLOCK), ceil_div(K, BLOCK)
    part = torch.empty(Mb * Kb * BLOCK, dtype=torch.float32, device=x.device)
    sync = torch.zeros(1 + 2 * Mb, dtype=torch.int32, device=x.device)
    lag = min(Mb, ceil_div(tiling.lag, Kb))
    sum_tiles = min(triton.next_power_of_2(tiling.tiles), triton.next_power_of_2(Kb))
    items = Mb * (ceil_div(Kb, sum_tiles) + Kb)
    grid = min(_programs(x.device, tiling.ctas_per_sm), items) if tiling.persistent else items
    rmsnorm_quant_kernel[(grid,)](
        x, w, rstd, part, sync, q if hp_out is None else hp_out, q, s, qt, st,
        M, K, qt.shape[1] if colwise else 0, x.stride(0), eps, lag,
        COLWISE=colwise, STORE_HP=hp_out is not None, POW2=pow2_scales, EXACT_CAST=_INTERPRET,
        COMPACT=tiling.compact_scales, SUM_TILES=sum_tiles,
        PARTS=min(64, triton.next_power_of_2(Kb)), PERSISTENT=tiling.persistent,
        L2_HINTS=tiling.l2_hints, **_launch_options(tiling))
    return (q, s, qt, st) if colwise else (q, s)


def rmsnorm_quantize(x_MK: torch.Tensor, weight_K: torch.Tensor, eps: float = 1e-6,
                     pow2_scales: bool = False, colwise: bool = True, check_finite: bool = True,
                     hp_out: torch.Tensor | None = None, tiling: Tiling | None = None):
    """Quantize y = x * rsqrt(mean(x^2) + eps) * weight (fp32) as 1x128 [and 128x1]; also returns rstd_M.

    Returns (q, s[, qt, st], rstd_M float32 [M]); rstd is what the norm's backward reuses.
    hp_out, when given ([M, K] float32 or bfloat16), receives y itself: in fp32 exactly what was
    quantized, in bf16 rounded to nearest even (the copy high-precision consumers of y read).
    """
    _check_input(x_MK, "x_MK")
    M, K = x_MK.shape
    if weight_K.shape != (K,) or weight_K.device != x_MK.device:
        raise ValueError(f"weight_K must be a [{K}] tensor on {x_MK.device}, got "
                         f"{tuple(weight_K.shape)} on {weight_K.device}")
    _check_hp_out(hp_out, M, K)
    tiling = _tiling(tiling, "rmsnorm")
    rstd = torch.empty(M, dtype=torch.float32, device=x_MK.device)
    w = weight_K.contiguous()
    if not (M and K):
        out = _alloc_outputs(M, K, colwise, x_MK.device)
        out = out if colwise else out[:2]
    elif (tiling.cuda and norm_cuda.available(x_MK.device)
          and norm_cuda.fits(x_MK, hp_out, tiling.cluster)):
        out = _alloc_outputs(M, K, colwise, x_MK.device)
        norm_cuda.rmsnorm_quantize(x_MK, w, eps, pow2_scales, colwise, hp_out, rstd, out,
                                   tiling.cluster)
        out = out if colwise else out[:2]
    elif tiling.fused:
        out = _launch_norm(x_MK, w, rstd, hp_out, colwise, pow2_scales, eps, tiling)
    else:
        rms_kernel[(M,)](x_MK, rstd, K, x_MK.stride(0), eps, BLOCK_K=triton.next_power_of_2(K),
                         num_warps=8)
        out = _launch_tiles(_RMSNORM, x_MK, None, w, rstd, hp_out, colwise, pow2_scales, tiling)
    if check_finite:
        _raise_if_nonfinite("rmsnorm(x_MK)", *out[1::2])
    return (*out, rstd)


# Quantizes w [E, N, K] into rows row0.. of outputs NJ rows high (NJb of 128-row blocks): the
# whole output for one weight (row0 = 0, NJ = N), one part of a join along N otherwise.
@triton.jit
def quant_128x128_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, Nb, Kb, row0, NJ, NJb,
                         TRANSPOSE: tl.constexpr, POW2: tl.constexpr, EXACT_CAST: tl.constexpr,
                         HW_TRANSPOSE: tl.constexpr, TILES: tl.constexpr):
    pid_n, e = tl.program_id(0), tl.program_id(1).to(tl.int64)
    groups = tl.cdiv(Kb, TILES)
    pid_n, k0 = pid_n // groups, (pid_n % groups) * TILES
    rn = pid_n * 128 + tl.arange(0, 128)  # rows of w
    rj = row0 + rn                        # the same rows in the (joined) outputs
    bj = row0 // 128 + pid_n              # and their block row
    w_base, out_base = e * N * K, e * NJ * K
    for t in range(TILES):
        pid_k = k0 + t
        rk = pid_k * 128 + tl.arange(0, 128)
        mask = (rn[:, None] < N) & (rk[None, :] < K)
        w = tl.load(w_ptr + w_base + rn[:, None].to(tl.int64) * K + rk[None, :], mask=mask,
                    other=0.0)
        wf = w.to(tl.float32)
        amax = _amax(_amax(wf, 1), 0)
        s = _scale(amax, amax - amax, POW2)
        tl.store(q_ptr + out_base + rj[:, None].to(tl.int64) * K + rk[None, :],
                 _cast(wf, s, EXACT_CAST), mask=mask)
        tl.store(s_ptr + e * NJb * Kb + bj * Kb + pid_k, s, mask=pid_k < Kb)
        if TRANSPOSE:  # never the hardware-cast q shuffled (see the module docstring)
            if HW_TRANSPOSE:
                qt = _cast(tl.trans(w).to(tl.float32), s, EXACT_CAST)
            else:
                qt = tl.trans(_cast(wf, s, True))
            tl.store(qt_ptr + out_base + rk[:, None].to(tl.int64) * NJ + rj[None, :], qt,
                     mask=(rk[:, None] < K) & (rn[None, :] < N))
            tl.store(st_ptr + e * Kb * NJb + pid_k * NJb + bj, s, mask=pid_k < Kb)


_launch_quant_128x128 = CachedLauncher(quant_128x128_kernel)


def quantize_128x128(w_NK: torch.Tensor | Sequence[torch.Tensor], pow2_scales: bool = False,
                     transpose: bool = False, check_finite: bool = True,
                     tiling: Tiling | None = None):
    """128x128 block quantization of a weight [N, K] (or stacked experts [E, N, K], N % 128 == 0).

    Returns (q, s) or, with transpose=True, (q, s, qt, st) where qt is q's transpose and st is s's
    transpose, both contiguous: the Fprop and the Dgrad operands from one read of the weight.

    w_NK may also be a list or tuple of weights joined along N (same K, and same E when 3-D; every
    part's N a multiple of 128 but the last's): the result is that of
    quantize_128x128(torch.cat(w_NK, dim=-2)) bit for bit, each part written into its rows of the
    joined outputs, without the concatenated bf16 copy or an FP8 one (how FP8MLP and the experts
    quantize gate and up as one [w1; w3]).
    """
    parts = _joined_parts(w_NK)
    tiling = _tiling(tiling, "128x128")
    first = parts[0]
    lead, K = first.shape[:-2], first.shape[-1]
    NJ = sum(w.shape[-2] for w in parts)
    NJb, Kb = ceil_div(NJ, BLOCK), ceil_div(K, BLOCK)
    q = torch.empty(*lead, NJ, K, dtype=E4M3, device=first.device)
    s = torch.empty(*lead, NJb, Kb, dtype=torch.float32, device=first.device)
    qt = torch.empty(*lead, K, NJ, dtype=E4M3, device=first.device) if transpose else q
    st = torch.empty(*lead, Kb, NJb, dtype=torch.float32, device=first.device) if transpose else s
    row0 = 0
    for w in parts:
        _launch_128x128(w, q, s, qt, st, row0, NJ, NJb, transpose, pow2_scales, tiling)
        row0 += w.shape[-2]
    if check_finite:
        _raise_if_nonfinite("w_NK", s)
    return (q, s, qt, st) if transpose else (q, s)


def _joined_parts(w_NK) -> list[torch.Tensor]:
    """The weights to quantize as one (a single tensor: itself), checked and contiguous."""
    many = isinstance(w_NK, (list, tuple))
    parts = list(w_NK) if many else [w_NK]
    name = "w_NK" if not many else "each part of w_NK"
    if not parts:
        raise ValueError("w_NK is an empty sequence; pass a weight or the parts to join along N")
    for i, w in enumerate(parts):
        if not isinstance(w, torch.Tensor) or w.dim() not in (2, 3):
            raise ValueError(f"{name} must be a 2-D [N, K] or 3-D [E, N, K] tensor")
        if w.dim() == 3 and w.shape[1] % BLOCK:
            raise ValueError(f"stacked weights [E, N, K] need N % 128 == 0 (got N={w.shape[1]}): a "
                             "128x128 block must not straddle two experts")
        if i < len(parts) - 1 and w.shape[-2] % BLOCK:
            raise ValueError(f"part {i} of w_NK has N={w.shape[-2]}, not a multiple of 128, so a "
                             "128x128 block would straddle two parts; torch.cat them first")
        _check_input(w.reshape(-1, w.shape[-1]), "w_NK")
    first = parts[0]
    for i, w in enumerate(parts[1:], start=1):
        if (w.dim(), w.shape[:-2], w.shape[-1], w.dtype, w.device) != (
                first.dim(), first.shape[:-2], first.shape[-1], first.dtype, first.device):
            raise ValueError(f"part {i} of w_NK is {w.dtype} {tuple(w.shape)} on {w.device}, part "
                             f"0 {first.dtype} {tuple(first.shape)} on {first.device}: parts "
                             "joined along N need the same E, K, dtype and device")
    return [w.contiguous() for w in parts]


def _launch_128x128(w, q, s, qt, st, row0, NJ, NJb, transpose, pow2_scales, tiling) -> None:
    """quant_128x128_kernel over one weight w, into rows row0.. of the outputs."""
    if not w.numel():
        return
    E, (N, K) = (w.shape[0] if w.dim() == 3 else 1), w.shape[-2:]
    Nb, Kb = ceil_div(N, BLOCK), ceil_div(K, BLOCK)
    grid = (Nb * ceil_div(Kb, tiling.tiles), E)
    _launch_quant_128x128[grid](w, q, s, qt, st, N, K, Nb, Kb, row0, NJ, NJb,
                                TRANSPOSE=transpose, POW2=pow2_scales, EXACT_CAST=_INTERPRET,
                                HW_TRANSPOSE=tiling.hw_transpose and w.element_size() == 2,
                                TILES=tiling.tiles, num_warps=tiling.warps)
