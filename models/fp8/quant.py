"""Triton quantization kernels for the FP8 recipe: bf16 in, E4M3 + FP32 scales out, in one pass.

Every kernel computes exactly what `models.fp8.reference` computes (same fp32 operations: the
correctly rounded reciprocal `div_rn(1, s)` once per tile times x, the same power-of-two bit
trick), so on identical input the outputs are bitwise equal to the reference;
tests/test_fp8_quant.py checks that, and that the kernels compile for sm90 with the hardware
e4m3 conversion and 16-byte vector loads. They are memory-bound: the figure of merit is GB/s
against a device-to-device copy (scripts/bench_fp8.py).

Wrappers (x_MK: 2-D bf16/fp16/fp32 with unit column stride; all return fresh tensors)
-------------------------------------------------------------------------------------
    quantize_1x128(x_MK, pow2_scales=False, check_finite=True) -> (q_MK, s_MKb)
    quantize_dual(x_MK, pow2_scales=False, check_finite=True)  -> (q_MK, s_MKb, qt_KMp, st_MbK)
    swiglu_quantize(gate_MF, up_MF, pow2_scales=False, colwise=True, check_finite=True, hp_out=None)
        -> (q_MF, s_MFb) or (q_MF, s_MFb, qt_FMp, st_MbF);  value quantized: silu(gate) * up in fp32
    rmsnorm_quantize(x_MK, weight_K, eps=1e-6, pow2_scales=False, colwise=True, check_finite=True,
                     hp_out=None) -> (q, s[, qt, st], rstd_M);  value quantized: x * rstd * weight in fp32
    quantize_128x128(w_NK or w_ENK, pow2_scales=False, transpose=False, check_finite=True)
        -> (q, s) or (q, s, qt, st)

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
the bf16 tensor once and writes both (one 128x128 tile per program: row amax over the tile's
columns, column amax over its rows). The fused producers compute the value they quantize
(SwiGLU of the up-projection output, RMSNorm of the residual stream) so it never goes to HBM in
bf16. RMSNorm needs each row's full sum of squares before any tile can be scaled, so it runs
as a small per-row pass (`rms_kernel`, rstd is also what the norm's backward needs) followed by
the tile kernel with the norm as its prologue.

Non-finite input: a tile holding inf/NaN gets a NaN scale (the kernel adds sum(x * 0) to the
scale: 0 for finite tiles, NaN otherwise), so it can never produce a silently wrong value.
With check_finite=True (default) the wrapper then raises ValueError; that check synchronizes
with the GPU, so the training path (models/fp8/linear.py) passes check_finite=False and lets the
NaN propagate to the loss, where the trainer sees it.

The transposed weight copy is cast a second time, on the integer path (`_e4m3_rne`, bitwise the
same bytes), instead of reusing the hardware-cast tile: with fp32 weights Triton stores that tile
directly and also shuffles it through shared memory for the transposed store, and ptxas 12.x
(Triton 3.6 bundles 12.8) miscompiles that pair, writing foreign bytes into the transposed copy
(triton-lang/triton#11111; on the H100 this was NaN in every Dgrad). A value that is only
shuffled (quantize_dual's column-wise copy has its own scales) is unaffected.
tests/test_fp8_quant.py compiles every kernel for sm90 and rejects the pattern.

Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CPU tests) rounds fp32 -> e4m3 wrongly
when rounding carries into the exponent (triton 3.6), so under the interpreter the kernels round
with integer arithmetic (`_e4m3_rne`, exact round-to-nearest-even); on the GPU they use the
hardware conversion. Both are checked bitwise against torch's cast. The same interpreter (with
numpy 2.4) cannot run a `for` loop whose bound is a runtime integer, so the kernels here have no
runtime-bounded loops (rms_kernel holds a whole row: BLOCK_K = next_power_of_2(K)).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import AMAX_EPS, BLOCK, E4M3, FP8_MAX, ceil_div

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_PLAIN, _SWIGLU, _RMSNORM = 0, 1, 2
_EPS = tl.constexpr(AMAX_EPS)
_FMAX = tl.constexpr(FP8_MAX)


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
def _scale(amax, nonfinite, POW2: tl.constexpr):
    """amax/448 (floored, optionally rounded up to 2^k); NaN where the tile held inf/NaN."""
    s = tl.math.div_rn(tl.maximum(amax, _EPS), _FMAX)
    if POW2:
        bits = s.to(tl.int32, bitcast=True)
        s = ((bits + 0x7FFFFF) & -8388608).to(tl.float32, bitcast=True)
    return s + nonfinite


@triton.jit
def _cast(x, s, EXACT_CAST: tl.constexpr):
    q = x * tl.math.div_rn(1.0, s)
    q = tl.minimum(tl.maximum(q, -_FMAX), _FMAX)
    if EXACT_CAST:
        return _e4m3_rne(q)
    return q.to(tl.float8e4nv)


@triton.jit
def rms_kernel(x_ptr, rstd_ptr, K, stride_xm, eps, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + row * stride_xm + rk, mask=rk < K, other=0.0).to(tl.float32)
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / K + eps))


@triton.jit
def quant_tile_kernel(x_ptr, u_ptr, w_ptr, rstd_ptr, hp_ptr, q_ptr, s_ptr, qt_ptr, st_ptr,
                      M, K, Mp, stride_xm, stride_um,
                      PROLOGUE: tl.constexpr, COLWISE: tl.constexpr, STORE_HP: tl.constexpr,
                      POW2: tl.constexpr, EXACT_CAST: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * 128 + tl.arange(0, 128)
    rm64 = rm.to(tl.int64)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    if PROLOGUE == 1:  # SwiGLU: x is the gate, u the up projection
        u = tl.load(u_ptr + rm64[:, None] * stride_um + rk[None, :], mask=mask, other=0.0)
        x = x / (1.0 + tl.exp(-x)) * u.to(tl.float32)
    if PROLOGUE == 2:  # RMSNorm: x * rstd[row] * w[col]
        rstd = tl.load(rstd_ptr + rm, mask=rm < M, other=0.0)
        w = tl.load(w_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)
        x = x * rstd[:, None] * w[None, :]
    if STORE_HP:
        tl.store(hp_ptr + rm64[:, None] * K + rk[None, :], x, mask=mask)
    s = _scale(tl.max(tl.abs(x), axis=1), tl.sum(x * 0.0, axis=1), POW2)
    q = _cast(x, s[:, None], EXACT_CAST)
    tl.store(q_ptr + rm64[:, None] * K + rk[None, :], q, mask=mask)
    tl.store(s_ptr + pid_k * M + rm, s, mask=rm < M)
    if COLWISE:  # BLOCK_M == 128: this tile is also one row of 128x1 tiles
        st = _scale(tl.max(tl.abs(x), axis=0), tl.sum(x * 0.0, axis=0), POW2)
        qt = _cast(x, st[None, :], EXACT_CAST)
        tl.store(qt_ptr + rk[None, :].to(tl.int64) * Mp + rm[:, None], qt, mask=(rk[None, :] < K))
        tl.store(st_ptr + pid_m * K + rk, st, mask=rk < K)


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


def _launch_tiles(prologue, x, u, w, rstd, hp_out, colwise, pow2_scales):
    M, K = x.shape
    q, s, qt, st = _alloc_outputs(M, K, colwise, x.device)
    block_m = BLOCK if colwise else 64
    if M and K:
        grid = (ceil_div(M, block_m), ceil_div(K, BLOCK))
        quant_tile_kernel[grid](
            x, x if u is None else u, x if w is None else w, s if rstd is None else rstd,
            q if hp_out is None else hp_out, q, s, qt, st,
            M, K, qt.shape[1] if colwise else 0, x.stride(0), 0 if u is None else u.stride(0),
            PROLOGUE=prologue, COLWISE=colwise, STORE_HP=hp_out is not None, POW2=pow2_scales,
            EXACT_CAST=_INTERPRET, BLOCK_M=block_m, num_warps=8 if colwise else 4)
    return (q, s, qt, st) if colwise else (q, s)


def _check_hp_out(hp_out, M: int, K: int) -> None:
    if hp_out is not None and (hp_out.shape != (M, K) or hp_out.dtype != torch.float32
                               or not hp_out.is_contiguous()):
        raise ValueError(f"hp_out must be a contiguous float32 [{M}, {K}] tensor, got "
                         f"{hp_out.dtype} {tuple(hp_out.shape)}")


def quantize_1x128(x_MK: torch.Tensor, pow2_scales: bool = False, check_finite: bool = True):
    """Row-wise 1x128 quantization: (q_MK e4m3, s_MKb fp32 MN-major). See the module docstring."""
    _check_input(x_MK, "x_MK")
    out = _launch_tiles(_PLAIN, x_MK, None, None, None, None, False, pow2_scales)
    if check_finite:
        _raise_if_nonfinite("x_MK", out[1])
    return out


def quantize_dual(x_MK: torch.Tensor, pow2_scales: bool = False, check_finite: bool = True):
    """One read, both copies: (q_MK, s_MKb MN-major, qt_KMp transposed 128x1 copy, st_MbK)."""
    _check_input(x_MK, "x_MK")
    out = _launch_tiles(_PLAIN, x_MK, None, None, None, None, True, pow2_scales)
    if check_finite:
        _raise_if_nonfinite("x_MK", out[1], out[3])
    return out


def swiglu_quantize(gate_MF: torch.Tensor, up_MF: torch.Tensor, pow2_scales: bool = False,
                    colwise: bool = True, check_finite: bool = True, hp_out: torch.Tensor | None = None):
    """Quantize h = silu(gate) * up (computed in fp32, never stored in bf16) as 1x128 [and 128x1].

    gate and up may be column slices of one fused [M, 2F] up-projection output. hp_out, when
    given (float32 [M, F]), receives the fp32 h that was quantized (for tests and debugging).
    """
    _check_input(gate_MF, "gate_MF")
    _check_input(up_MF, "up_MF")
    if gate_MF.shape != up_MF.shape or gate_MF.device != up_MF.device:
        raise ValueError(f"gate_MF {tuple(gate_MF.shape)} and up_MF {tuple(up_MF.shape)} must have "
                         "the same shape and device")
    _check_hp_out(hp_out, *gate_MF.shape)
    out = _launch_tiles(_SWIGLU, gate_MF, up_MF, None, None, hp_out, colwise, pow2_scales)
    if check_finite:
        _raise_if_nonfinite("silu(gate_MF) * up_MF", *out[1::2])
    return out


def rmsnorm_quantize(x_MK: torch.Tensor, weight_K: torch.Tensor, eps: float = 1e-6,
                     pow2_scales: bool = False, colwise: bool = True, check_finite: bool = True,
                     hp_out: torch.Tensor | None = None):
    """Quantize y = x * rsqrt(mean(x^2) + eps) * weight (fp32) as 1x128 [and 128x1]; also returns rstd_M.

    Returns (q, s[, qt, st], rstd_M float32 [M]); rstd is what the norm's backward reuses.
    """
    _check_input(x_MK, "x_MK")
    M, K = x_MK.shape
    if weight_K.shape != (K,) or weight_K.device != x_MK.device:
        raise ValueError(f"weight_K must be a [{K}] tensor on {x_MK.device}, got "
                         f"{tuple(weight_K.shape)} on {weight_K.device}")
    _check_hp_out(hp_out, M, K)
    rstd = torch.empty(M, dtype=torch.float32, device=x_MK.device)
    if M and K:
        rms_kernel[(M,)](x_MK, rstd, K, x_MK.stride(0), eps, BLOCK_K=triton.next_power_of_2(K),
                         num_warps=8)
    out = _launch_tiles(_RMSNORM, x_MK, None, weight_K.contiguous(), rstd, hp_out, colwise,
                        pow2_scales)
    if check_finite:
        _raise_if_nonfinite("rmsnorm(x_MK)", *out[1::2])
    return (*out, rstd)


@triton.jit
def quant_128x128_kernel(w_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, N, K, Nb, Kb,
                         TRANSPOSE: tl.constexpr, POW2: tl.constexpr, EXACT_CAST: tl.constexpr):
    pid_n, pid_k, e = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rn = pid_n * 128 + tl.arange(0, 128)
    rk = pid_k * 128 + tl.arange(0, 128)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    base = e * N * K
    w = tl.load(w_ptr + base + rn[:, None].to(tl.int64) * K + rk[None, :], mask=mask, other=0.0)
    w = w.to(tl.float32)
    s = _scale(tl.max(tl.max(tl.abs(w), axis=1), axis=0), tl.sum(tl.sum(w * 0.0, axis=1), axis=0), POW2)
    q = _cast(w, s, EXACT_CAST)
    tl.store(q_ptr + base + rn[:, None].to(tl.int64) * K + rk[None, :], q, mask=mask)
    tl.store(s_ptr + e * Nb * Kb + pid_n * Kb + pid_k, s)
    if TRANSPOSE:  # the same bytes, cast again on the integer path (see the module docstring)
        qt = _cast(w, s, True)
        tl.store(qt_ptr + base + rk[None, :].to(tl.int64) * N + rn[:, None], qt, mask=mask)
        tl.store(st_ptr + e * Nb * Kb + pid_k * Nb + pid_n, s)


def quantize_128x128(w_NK: torch.Tensor, pow2_scales: bool = False, transpose: bool = False,
                     check_finite: bool = True):
    """128x128 block quantization of a weight [N, K] (or stacked experts [E, N, K], N % 128 == 0).

    Returns (q, s) or, with transpose=True, (q, s, qt, st) where qt is q's transpose and st is s's
    transpose, both contiguous: the Fprop and the Dgrad operands from one read of the weight.
    """
    if not isinstance(w_NK, torch.Tensor) or w_NK.dim() not in (2, 3):
        raise ValueError("w_NK must be a 2-D [N, K] or 3-D [E, N, K] tensor")
    if w_NK.dim() == 3 and w_NK.shape[1] % BLOCK:
        raise ValueError(f"stacked weights [E, N, K] need N % 128 == 0 (got N={w_NK.shape[1]}): a "
                         "128x128 block must not straddle two experts")
    _check_input(w_NK.reshape(-1, w_NK.shape[-1]), "w_NK")
    w = w_NK.contiguous()
    E, (N, K) = (w.shape[0] if w.dim() == 3 else 1), w.shape[-2:]
    Nb, Kb = ceil_div(N, BLOCK), ceil_div(K, BLOCK)
    lead = w.shape[:-2]
    q = torch.empty_like(w, dtype=E4M3)
    s = torch.empty(*lead, Nb, Kb, dtype=torch.float32, device=w.device)
    qt = torch.empty(*lead, K, N, dtype=E4M3, device=w.device) if transpose else q
    st = torch.empty(*lead, Kb, Nb, dtype=torch.float32, device=w.device) if transpose else s
    if w.numel():
        quant_128x128_kernel[(Nb, Kb, E)](w, q, s, qt, st, N, K, Nb, Kb, TRANSPOSE=transpose,
                                          POW2=pow2_scales, EXACT_CAST=_INTERPRET, num_warps=8)
    if check_finite:
        _raise_if_nonfinite("w_NK", s)
    return (q, s, qt, st) if transpose else (q, s)
