"""Fused Triton kernels for the bf16 model's elementwise work: RMSNorm, SwiGLU, rotary embedding.

Written in plain torch, each of these ops is a chain of small kernels, every one a full pass over
the activation in HBM: RMSNorm is a cast, a square, a mean, an rsqrt, a multiply, a cast and the
weight multiply forward (about seven passes over [T, D]) and more backward; SwiGLU is silu then a
multiply, with autograd saving both inputs and the silu output; rotary embedding casts, splits,
stacks, flattens and casts back. Next to GEMMs running near peak, those passes are a large part of
a step. Each op here is one kernel forward and one backward, with fp32 math inside and exactly the
bytes the op must move going to HBM (b = bytes per element of the activation dtype, N elements):

    rms_norm(x, weight, eps)   forward reads x, writes y and one fp32 rstd per row: 2Nb (+4/row)
                               saves x and rstd; backward reads x, dy, rstd, writes dx: 3Nb, plus
                               the weight gradient as per-program fp32 partial sums (one row of D
                               per program, ~512 programs) reduced by one torch sum: deterministic
    swiglu(a, b) = silu(a)*b   forward reads a, b, writes the product: 3Nb; saves a and b only
                               (silu is recomputed); backward reads dy, a, b, writes da, db: 5Nb
    rope(x, cos, sin)          rotates the pairs (x[2i], x[2i+1]) of the last dim by the angle of
                               the row's position: 2Nb forward (x may be a strided view, e.g. the
                               rope slice of the queries), backward is the inverse rotation: 2Nb

Numerics, matching the eager formulas in models/layers.py:
    rms_norm  y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the normalized value rounded to
              x's dtype BEFORE the weight multiply (as the eager module and Hugging Face's do), the
              product in the promoted dtype of x and weight. Forward equals eager up to the
              summation order of mean(x^2) (a last-bit difference in rstd, rarely one ulp of y).
              Backward treats the cast as identity, as autograd does, but keeps dy * weight in fp32
              where eager rounds it to x's dtype first: at least as accurate as eager.
    swiglu    silu(a) * b computed in fp32 and rounded once (eager rounds silu(a) first: one ulp
              apart at most); gradients in fp32, rounded once each.
    rope      the same fp32 products as eager, rounded once; the compiled kernel may contract a
              multiply-add into an FMA (last fp32 bit, rarely one ulp after rounding to bf16).

`fused(x)` is the one dispatch rule: the model calls these kernels for CUDA tensors and keeps its
eager torch code everywhere else, so CPU results (and the HF parity and exact-resume tests) do not
depend on this module. On a machine without CUDA the kernels run under Triton's interpreter
(models/triton_env.py picks it, as for every kernel module): that is what lets tests/test_kernels.py
run these very kernels on CPU tensors. Every kernel holds whole rows, so its loops have
compile-time bounds. They are launched a few times per layer and step, through
models/triton_launch.py's CachedLauncher, which skips the JIT's per-call work on GPU.

Shape legend: M rows (all leading dims flattened), D normalized width, N elements,
B batch, S sequence, H heads, R rotary dims (R/2 pairs).
"""
from __future__ import annotations

import torch

from models.triton_env import INTERPRET  # before triton: picks the interpreter on CPU-only machines
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from models.triton_launch import CachedLauncher  # noqa: E402

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_NORM_DIM = 16384
"""Widest row rms_norm takes: a program holds a whole row in registers (16 warps). Up to 8192
(DeepSeek-V3's 7168) nothing spills; the 16384-wide backward spills a few registers."""
TILE_ELEMS = 4096
"""Elements a row-tile program handles: narrow rows are stacked until a tile holds this many."""
ROPE_TILE_ELEMS = 4096
"""Elements a rope program rotates: rows of R stacked until a tile holds this many."""
WARP_ELEMS = 512
"""Tile elements per warp (16 per thread), hence a tile's warps (4 to 16)."""
NORM_BWD_PROGRAMS = 512
"""Programs of the RMSNorm backward, hence rows of fp32 weight-gradient partials (fixed, so the
reduction order, and the result, does not depend on the card)."""
ELEM_BLOCK, ELEM_WARPS = 4096, 8


def fused(x: torch.Tensor) -> bool:
    """The one dispatch rule: the model calls the Triton kernels for x when x is a CUDA tensor of
    a dtype they take and Triton compiles (is not the interpreter)."""
    return x.is_cuda and x.dtype in FLOAT_DTYPES and not INTERPRET


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the fused kernels take bfloat16, float16 or "
                        f"float32 (cast it first)")


def _check_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}; "
                         f"move it to the input's device")


def _warps(tile_elems: int) -> int:
    return max(4, min(16, tile_elems // WARP_ELEMS))


_EXACT_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest even in dtype. The interpreter's fp32 -> bf16 cast truncates
    (Triton 3.6), so there bf16 is rounded on the integer path; compiled kernels use the cast."""
    if _EXACT_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


# -- RMSNorm -------------------------------------------------------------------------------------

@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, D, stride_xm, eps,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=1) / D + eps)
    normed = cast_rne(x32 * rstd[:, None], x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = normed * w[None, :]
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], cast_rne(y, y_ptr.dtype.element_ty),
             mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


_launch_rms_norm = CachedLauncher(rms_norm_kernel)


def _norm_tiles(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, TILE_ELEMS // block_d), block_d


def rms_norm_forward(x_MD: torch.Tensor, weight_D: torch.Tensor, eps: float):
    """(y_MD in the promoted dtype of x and weight, rstd_M fp32); x_MD has unit column stride."""
    M, D = x_MD.shape
    y_MD = torch.empty((M, D), dtype=torch.promote_types(x_MD.dtype, weight_D.dtype),
                       device=x_MD.device)
    rstd_M = torch.empty(M, dtype=torch.float32, device=x_MD.device)
    if M:
        block_m, block_d = _norm_tiles(D)
        _launch_rms_norm[(triton.cdiv(M, block_m),)](
            x_MD, weight_D, y_MD, rstd_M, M, D, x_MD.stride(0), eps,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_warps(block_m * block_d))
    return y_MD, rstd_M


@triton.jit
def rms_norm_backward_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_ptr, M, D, stride_xm,
                             TILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    dw = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # reduced over rows once, at the end
    for t in range(TILES):
        rows = ((pid * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows[:, None] < M) & (cols[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
        normed = x.to(tl.float32) * rstd[:, None]
        dy32 = dy.to(tl.float32)
        dw += dy32 * cast_rne(normed, x.dtype).to(tl.float32)
        dn = dy32 * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        dot = tl.sum(dn * normed, axis=1) / D
        dx = rstd[:, None] * (dn - normed * dot[:, None])
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], cast_rne(dx, dx_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(dw_ptr + pid * D + cols, tl.sum(dw, axis=0), mask=cols < D)


_launch_rms_norm_backward = CachedLauncher(rms_norm_backward_kernel)


def rms_norm_backward(x_MD, weight_D, rstd_M, dy_MD):
    """(dx_MD in x's dtype, dweight_D in weight's dtype) of y = weight * rms_normed(x)."""
    M, D = x_MD.shape
    dx_MD = torch.empty((M, D), dtype=x_MD.dtype, device=x_MD.device)
    if not M:
        return dx_MD, torch.zeros_like(weight_D)
    block_m, block_d = _norm_tiles(D)
    n_tiles = triton.cdiv(M, block_m)
    tiles = triton.next_power_of_2(triton.cdiv(n_tiles, NORM_BWD_PROGRAMS))
    programs = triton.cdiv(n_tiles, tiles)
    dw_partial_PD = torch.empty((programs, D), dtype=torch.float32, device=x_MD.device)
    _launch_rms_norm_backward[(programs,)](
        x_MD, weight_D, rstd_M, dy_MD, dx_MD, dw_partial_PD, M, D, x_MD.stride(0),
        TILES=tiles, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=_warps(block_m * block_d))
    return dx_MD, dw_partial_PD.sum(0).to(weight_D.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, weight_D, eps):
        y_MD, rstd_M = rms_norm_forward(x_MD, weight_D, eps)
        ctx.save_for_backward(x_MD, weight_D, rstd_M)
        return y_MD

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, weight_D, rstd_M = ctx.saved_tensors
        dx_MD, dweight_D = rms_norm_backward(x_MD, weight_D, rstd_M, dy_MD.contiguous())
        return dx_MD, dweight_D, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype) over the last dim of x [..., D]."""
    _check_float("rms_norm input", x)
    _check_float("rms_norm weight", weight)
    _check_device("rms_norm weight", weight, x)
    D = x.shape[-1] if x.dim() else 0
    if weight.dim() != 1 or weight.numel() != D:
        raise ValueError(f"rms_norm weight has shape {tuple(weight.shape)} but the input's last "
                         f"dim is {D}; pass a 1-D weight of that size")
    if not 1 <= D <= MAX_NORM_DIM:
        raise ValueError(f"rms_norm normalizes a last dim of 1..{MAX_NORM_DIM}, got {D}; use the "
                         f"eager RMSNorm for wider rows")
    x_MD = x.reshape(-1, D)
    if x_MD.stride(1) != 1:
        x_MD = x_MD.contiguous()
    return RMSNormFunction.apply(x_MD, weight.contiguous(), float(eps)).view(x.shape)


# -- SwiGLU --------------------------------------------------------------------------------------

@triton.jit
def swiglu_kernel(a_ptr, b_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(y_ptr + offs, cast_rne(y, y_ptr.dtype.element_ty), mask=mask)


_launch_swiglu = CachedLauncher(swiglu_kernel)


def swiglu_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for contiguous a, b of one shape and dtype."""
    y = torch.empty_like(a)
    if a.numel():
        _launch_swiglu[(triton.cdiv(a.numel(), ELEM_BLOCK),)](
            a, b, y, a.numel(), BLOCK=ELEM_BLOCK, num_warps=ELEM_WARPS)
    return y


@triton.jit
def swiglu_backward_kernel(a_ptr, b_ptr, dy_ptr, da_ptr, db_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    silu = a * sig
    da = dy * b * (sig + silu * (1.0 - sig))
    tl.store(da_ptr + offs, cast_rne(da, da_ptr.dtype.element_ty), mask=mask)
    tl.store(db_ptr + offs, cast_rne(dy * silu, db_ptr.dtype.element_ty), mask=mask)


_launch_swiglu_backward = CachedLauncher(swiglu_backward_kernel)


def swiglu_backward(a: torch.Tensor, b: torch.Tensor, dy: torch.Tensor):
    """(da, db) of y = silu(a) * b from the saved a, b (silu recomputed); all contiguous."""
    da, db = torch.empty_like(a), torch.empty_like(b)
    if a.numel():
        _launch_swiglu_backward[(triton.cdiv(a.numel(), ELEM_BLOCK),)](
            a, b, dy, da, db, a.numel(), BLOCK=ELEM_BLOCK, num_warps=ELEM_WARPS)
    return da, db


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return swiglu_forward(a, b)

    @staticmethod
    def backward(ctx, dy):
        a, b = ctx.saved_tensors
        return swiglu_backward(a, b, dy.contiguous())


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b elementwise: a the gate projection, b the up projection (same shape, dtype)."""
    _check_float("swiglu gate", a)
    _check_device("swiglu up", b, a)
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"swiglu gate {tuple(a.shape)} {a.dtype} and up {tuple(b.shape)} "
                         f"{b.dtype} must have the same shape and dtype")
    return SwiGLUFunction.apply(a.contiguous(), b.contiguous())


# -- Rotary embedding ----------------------------------------------------------------------------

@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, S, H, stride_xb, stride_xs, stride_xh,
                stride_cs, HALF, INVERSE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    h, s, b = rows % H, (rows // H) % S, rows // (H * S)
    lane = tl.arange(0, 2 * BLOCK_HALF)
    mask = (rows[:, None] < n_rows) & (lane[None, :] < 2 * HALF)
    x_off = (b * stride_xb + s * stride_xs + h * stride_xh)[:, None] + lane[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    even, odd = tl.split(tl.reshape(x, [BLOCK_ROWS, BLOCK_HALF, 2]))
    pair = tl.arange(0, BLOCK_HALF)
    cs_mask = (rows[:, None] < n_rows) & (pair[None, :] < HALF)
    cs_off = s[:, None] * stride_cs + pair[None, :]
    cos = tl.load(cos_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    y = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos),
                   [BLOCK_ROWS, 2 * BLOCK_HALF])
    tl.store(y_ptr + rows[:, None] * (2 * HALF) + lane[None, :],
             cast_rne(y, y_ptr.dtype.element_ty),
             mask=mask)


_launch_rope = CachedLauncher(rope_kernel)


def rope_rotate(x_BSHR: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor,
                inverse: bool = False) -> torch.Tensor:
    """Pairs of the last dim of a 4-D x (unit last stride) rotated by +angle (or -angle): a fresh
    contiguous tensor in x's dtype."""
    B, S, H, R = x_BSHR.shape
    y_BSHR = torch.empty((B, S, H, R), dtype=x_BSHR.dtype, device=x_BSHR.device)
    n_rows = B * S * H
    if n_rows:
        block_half = triton.next_power_of_2(R // 2)
        block_rows = max(1, ROPE_TILE_ELEMS // (2 * block_half))
        sb, ss, sh, _ = x_BSHR.stride()
        _launch_rope[(triton.cdiv(n_rows, block_rows),)](
            x_BSHR, cos_SR, sin_SR, y_BSHR, n_rows, S, H, sb, ss, sh, cos_SR.stride(0), R // 2,
            INVERSE=inverse, BLOCK_ROWS=block_rows, BLOCK_HALF=block_half,
            num_warps=_warps(block_rows * block_half * 2))
    return y_BSHR


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BSHR, cos_SR, sin_SR):
        ctx.save_for_backward(cos_SR, sin_SR)
        return rope_rotate(x_BSHR, cos_SR, sin_SR)

    @staticmethod
    def backward(ctx, dy_BSHR):
        cos_SR, sin_SR = ctx.saved_tensors
        return rope_rotate(dy_BSHR, cos_SR, sin_SR, inverse=True), None, None


def rope(x: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """models.layers.apply_rope: x [B, S, R] or [B, S, H, R], cos/sin [S, R/2] -> rotated x."""
    _check_float("rope input", x)
    for name, t in (("rope cos", cos_SR), ("rope sin", sin_SR)):
        _check_float(name, t)
        _check_device(name, t, x)
    if x.dim() not in (3, 4) or x.shape[-1] % 2:
        raise ValueError(f"rope takes x [B, S, R] or [B, S, H, R] with R even, got "
                         f"{tuple(x.shape)}")
    S, R = x.shape[1], x.shape[-1]
    if cos_SR.shape != (S, R // 2) or sin_SR.shape != (S, R // 2):
        raise ValueError(f"rope tables must be [S, R/2] = [{S}, {R // 2}] for x {tuple(x.shape)}, "
                         f"got cos {tuple(cos_SR.shape)} and sin {tuple(sin_SR.shape)}")
    x_BSHR = x if x.dim() == 4 else x[:, :, None]
    if x_BSHR.stride(-1) != 1:
        x_BSHR = x_BSHR.contiguous()
    y_BSHR = RopeFunction.apply(x_BSHR, cos_SR.contiguous(), sin_SR.contiguous())
    return y_BSHR if x.dim() == 4 else y_BSHR[:, :, 0]
