"""Fused Triton kernels for the bf16 model's elementwise work: RMSNorm, SwiGLU, rotary embedding,
MLA's assembly of per-head queries and keys, and the MoE's weighted combine of the experts'
outputs.

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
    mla_qk(q, kv, k_pe, ...)   MLA's attention inputs: q = [q_nope ; rope(q_pe)] and k = [k_nope ;
                               rope(k_pe) repeated for every head] as fresh [B, S, H, N+R] tensors,
                               v a view of kv. One pass writes each forward; backward is one pass
                               for dq and one for dkv = [dk_nope ; dv] with dk_pe, the rope part of
                               dk summed over heads in fp32 and rotated back. Eager torch makes
                               them with two rope passes, an expand and two concatenations (and
                               the concatenations' copies again backward), non-vectorized copies
                               that took 11.6 ms of a 4 x 4096 `small` micro-batch on the H200
                               (fwd+bwd 1.03 ms against eager's 5.40, 99% of a copy's bandwidth;
                               +3.4% bf16 / +3.9% FP8 training tokens/s)
    moe_combine(y, p2s, gate)  out[t] = sum_k gate[t, k] y[p2s[t K + k]] for the experts' outputs y
                               in slot order (N = T K D elements): forward reads y once and writes
                               T D; saves y; backward reads the output gradient, y, and writes dy
                               (gate times the token's gradient, straight into slot order) and the
                               gates' gradient <g[t], y[slot]>: 2Nb + T D b. Eager torch makes
                               [T, K, D] copies for the gather, the product and its gradients
                               (H200: fwd+bwd 0.54 ms against eager's 3.03 at 16384 tokens x
                               top-4 x 4096, 93% of a copy's bandwidth; a `small` training step
                               at 4 x 4096 x 4 gained 3.4% bf16 / 5.0% FP8 tokens/s)
    sum_picks(y, p2s, K)       the same with unit gates, no autograd: the dispatch's backward, each
                               token's K slot gradients gathered and summed in one pass

Numerics, matching the eager formulas in models/layers.py (the combine's: models/moe.py; mla_qk's:
MLA._eager_qkv in models/attention.py):
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
    mla_qk    the rotations as rope's; the copies exact; dk_pe's sum over heads in fp32, rounded
              once after the rotation (eager rounds the sum, then the rotation).
    moe_combine  the K products summed in fp32 with the fp32 gate weights and rounded once (eager
              rounds the gates and each product to the activation dtype first); the gates' gradient
              an fp32 dot product over D (eager rounds the products first).

`fused(x, kernel)` is the one dispatch rule: the model calls these kernels for CUDA tensors (unless
they are turned off: FP8MOE_FUSED_KERNELS=0 all of them, =rope,swiglu every one but rope and
swiglu; `with kernels.eager():` all of them for a block of code) and keeps its eager torch code
everywhere else, so CPU results (and the HF parity and exact-resume tests) do not depend on this
module. On a machine without CUDA the kernels run under Triton's interpreter
(models/triton_env.py picks it, as for every kernel module): that is what lets
tests/test_kernels.py run these very kernels on CPU tensors. Every kernel holds whole rows, so
its loops have compile-time bounds (but mla_keys_backward's, over the heads). They are launched
a few times per layer and step, through models/triton_launch.py's CachedLauncher, which skips
the JIT's per-call work on GPU.

Shape legend: M rows (all leading dims flattened), D normalized width, N elements,
B batch, S sequence, H heads, R rotary dims (R/2 pairs).
"""
from __future__ import annotations

import contextlib
import os

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


KERNELS = ("rms_norm", "swiglu", "rope", "mla_qk", "moe_combine", "cross_entropy")
"""The fused kernels the model dispatches to, by the names FP8MOE_FUSED_KERNELS takes."""


def enabled_kernels(setting: str) -> frozenset[str]:
    """Which kernels FP8MOE_FUSED_KERNELS turns on: 1 (or unset) all, 0 none, or a comma list of
    names from KERNELS (the others keep their eager torch code): for ruling kernels in or out,
    one at a time, when two runs part ways."""
    if setting.strip() in ("", "1"):
        return frozenset(KERNELS)
    if setting.strip() == "0":
        return frozenset()
    names = {name.strip() for name in setting.split(",") if name.strip()}
    unknown = sorted(names - set(KERNELS))
    if unknown:
        raise ValueError(f"FP8MOE_FUSED_KERNELS={setting!r} names no kernel {unknown}: set 1 "
                         f"(all), 0 (none) or a comma list of {','.join(KERNELS)}")
    return frozenset(names)


ENABLED = enabled_kernels(os.environ.get("FP8MOE_FUSED_KERNELS", "1"))
"""The kernels this process dispatches to (read once, at import, in every process of a job)."""


@contextlib.contextmanager
def eager():
    """Inside, the model runs its eager torch code everywhere (no kernel is ENABLED): the
    baseline of benchmarks and gradient audits, in the same process as the fused runs."""
    global ENABLED
    saved, ENABLED = ENABLED, frozenset()
    try:
        yield
    finally:
        ENABLED = saved


def fused(x: torch.Tensor, kernel: str) -> bool:
    """The one dispatch rule: the model calls the Triton `kernel` for x when x is a CUDA tensor of
    a dtype it takes and Triton compiles (is not the interpreter), and the environment left
    `kernel` on (ENABLED)."""
    if kernel not in KERNELS:
        raise ValueError(f"no fused kernel {kernel!r}: one of {KERNELS}")
    return kernel in ENABLED and x.is_cuda and x.dtype in FLOAT_DTYPES and not INTERPRET


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the fused kernels take bfloat16, float16 or "
                        f"float32 (cast it first)")


def _check_device(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {ref.device}; "
                         f"move it to the input's device")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """t itself where its last dim is dense (the row kernels take any other strides), else a
    contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _warps(tile_elems: int) -> int:
    """Warps for a tile: WARP_ELEMS elements each, a power of two from 4 to 16."""
    warps = max(4, min(16, tile_elems // WARP_ELEMS))
    return 1 << (warps.bit_length() - 1)


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
def _rotate_pairs(x, s, live, cos_ptr, sin_ptr, stride_cs, HALF, INVERSE: tl.constexpr,
                  BLOCK_ROWS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """x [BLOCK_ROWS, 2 BLOCK_HALF] fp32, its pairs rotated by the angles of each row's position s
    (by minus them when INVERSE); fp32."""
    even, odd = tl.split(tl.reshape(x, [BLOCK_ROWS, BLOCK_HALF, 2]))
    pair = tl.arange(0, BLOCK_HALF)
    cs_mask = live[:, None] & (pair[None, :] < HALF)
    cs_off = s[:, None] * stride_cs + pair[None, :]
    cos = tl.load(cos_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    return tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos),
                      [BLOCK_ROWS, 2 * BLOCK_HALF])


@triton.jit
def _load_rotated(p_ptr, b, s, h, live, stride_pb, stride_ps, stride_ph, cos_ptr, sin_ptr,
                  stride_cs, HALF, INVERSE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                  BLOCK_HALF: tl.constexpr):
    """Rows (b, s, h) of p's 2 HALF rotary columns, rotated (_rotate_pairs): (y fp32, the column
    lanes, the mask of live rows and real columns), for the caller's store."""
    lane = tl.arange(0, 2 * BLOCK_HALF)
    mask = live[:, None] & (lane[None, :] < 2 * HALF)
    off = (b * stride_pb + s * stride_ps + h * stride_ph)[:, None] + lane[None, :]
    x = tl.load(p_ptr + off, mask=mask, other=0.0).to(tl.float32)
    y = _rotate_pairs(x, s, live, cos_ptr, sin_ptr, stride_cs, HALF, INVERSE, BLOCK_ROWS,
                      BLOCK_HALF)
    return y, lane, mask


@triton.jit
def rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, S, H, stride_xb, stride_xs, stride_xh,
                stride_cs, HALF, INVERSE: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                BLOCK_HALF: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    h, s, b = rows % H, (rows // H) % S, rows // (H * S)
    live = rows < n_rows
    y, lane, mask = _load_rotated(x_ptr, b, s, h, live, stride_xb, stride_xs, stride_xh, cos_ptr,
                                  sin_ptr, stride_cs, HALF, INVERSE, BLOCK_ROWS, BLOCK_HALF)
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
    x_BSHR = _unit_last_stride(x if x.dim() == 4 else x[:, :, None])
    y_BSHR = RopeFunction.apply(x_BSHR, cos_SR.contiguous(), sin_SR.contiguous())
    return y_BSHR if x.dim() == 4 else y_BSHR[:, :, 0]


# -- MLA's query and key assembly ----------------------------------------------------------------

@triton.jit
def rope_concat_kernel(a_ptr, p_ptr, cos_ptr, sin_ptr, y_ptr, n_rows, S, H, stride_ab, stride_as,
                       stride_ah, stride_pb, stride_ps, stride_ph, stride_cs, N, HALF,
                       INVERSE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_HALF: tl.constexpr):
    """y[row] = [a[row, :N] ; rotate(p[row, :2 HALF])] for rows (b, s, h), y contiguous."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    h, s, b = rows % H, (rows // H) % S, rows // (H * S)
    live = rows < n_rows
    y_row = rows * (N + 2 * HALF)
    col = tl.arange(0, BLOCK_N)
    a_mask = live[:, None] & (col[None, :] < N)
    a_off = (b * stride_ab + s * stride_as + h * stride_ah)[:, None] + col[None, :]
    tl.store(y_ptr + y_row[:, None] + col[None, :], tl.load(a_ptr + a_off, mask=a_mask),
             mask=a_mask)
    y, lane, p_mask = _load_rotated(p_ptr, b, s, h, live, stride_pb, stride_ps, stride_ph, cos_ptr,
                                    sin_ptr, stride_cs, HALF, INVERSE, BLOCK_ROWS, BLOCK_HALF)
    tl.store(y_ptr + y_row[:, None] + N + lane[None, :], cast_rne(y, y_ptr.dtype.element_ty),
             mask=p_mask)


_launch_rope_concat = CachedLauncher(rope_concat_kernel)


def rope_concat(a_BSHN: torch.Tensor, p_BSHR: torch.Tensor, cos_SR: torch.Tensor,
                sin_SR: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """[a ; p rotated by +angle (or -angle)] along the last dim: a fresh contiguous [B, S, H, N+R]
    in a's dtype. a and p are 4-D views with unit last stride; p may broadcast over heads (head
    stride 0: MLA's one rope key shared by every head)."""
    B, S, H, N = a_BSHN.shape
    R = p_BSHR.shape[-1]
    y_BSHK = torch.empty((B, S, H, N + R), dtype=a_BSHN.dtype, device=a_BSHN.device)
    n_rows = B * S * H
    if n_rows:
        block_n, block_half = triton.next_power_of_2(N), triton.next_power_of_2(R // 2)
        block_rows = max(1, ROPE_TILE_ELEMS // max(block_n, 2 * block_half))
        _launch_rope_concat[(triton.cdiv(n_rows, block_rows),)](
            a_BSHN, p_BSHR, cos_SR, sin_SR, y_BSHK, n_rows, S, H, *a_BSHN.stride()[:3],
            *p_BSHR.stride()[:3], cos_SR.stride(0), N, R // 2, INVERSE=inverse,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, BLOCK_HALF=block_half,
            num_warps=_warps(block_rows * (block_n + 2 * block_half)))
    return y_BSHK


@triton.jit
def mla_keys_backward_kernel(dk_ptr, dv_ptr, cos_ptr, sin_ptr, dkv_ptr, dpe_ptr, n_rows, S, H,
                             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                             stride_cs, N, V, HALF, BLOCK_ROWS: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                             BLOCK_HALF: tl.constexpr):
    """For positions (b, s): dkv[b, s, h] = [dk[b, s, h, :N] ; dv[b, s, h]] for every head h, and
    dpe[b, s] = rotate_back(sum over h of dk[b, s, h, N:]), the sum in fp32."""
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    s, b = rows % S, rows // S
    live = rows < n_rows
    col_n, col_v = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_V)
    lane = tl.arange(0, 2 * BLOCK_HALF)
    n_mask = live[:, None] & (col_n[None, :] < N)
    v_mask = live[:, None] & (col_v[None, :] < V)
    p_mask = live[:, None] & (lane[None, :] < 2 * HALF)
    dk_row, dv_row = b * stride_kb + s * stride_ks, b * stride_vb + s * stride_vs
    pe_sum = tl.zeros([BLOCK_ROWS, 2 * BLOCK_HALF], dtype=tl.float32)
    for h in range(H):
        dk_off = (dk_row + h * stride_kh)[:, None]
        dkv_off = ((rows * H + h) * (N + V))[:, None]
        tl.store(dkv_ptr + dkv_off + col_n[None, :],
                 tl.load(dk_ptr + dk_off + col_n[None, :], mask=n_mask), mask=n_mask)
        tl.store(dkv_ptr + dkv_off + N + col_v[None, :],
                 tl.load(dv_ptr + (dv_row + h * stride_vh)[:, None] + col_v[None, :],
                         mask=v_mask), mask=v_mask)
        pe_sum += tl.load(dk_ptr + dk_off + N + lane[None, :], mask=p_mask,
                          other=0.0).to(tl.float32)
    dpe = _rotate_pairs(pe_sum, s, live, cos_ptr, sin_ptr, stride_cs, HALF, True, BLOCK_ROWS,
                        BLOCK_HALF)
    tl.store(dpe_ptr + rows[:, None] * (2 * HALF) + lane[None, :],
             cast_rne(dpe, dpe_ptr.dtype.element_ty), mask=p_mask)


_launch_mla_keys_backward = CachedLauncher(mla_keys_backward_kernel)


def mla_keys_backward(dk_BSHK: torch.Tensor, dv_BSHV: torch.Tensor, cos_SR: torch.Tensor,
                      sin_SR: torch.Tensor, nope_dim: int, pe_dtype: torch.dtype):
    """The gradients of mla_keys: (dkv [B, S, H, N+V] contiguous, dpe [B, S, R] in pe_dtype)."""
    B, S, H, K = dk_BSHK.shape
    V, R = dv_BSHV.shape[-1], K - nope_dim
    dkv_BSHX = torch.empty((B, S, H, nope_dim + V), dtype=dk_BSHK.dtype, device=dk_BSHK.device)
    dpe_BSR = torch.empty((B, S, R), dtype=pe_dtype, device=dk_BSHK.device)
    n_rows = B * S
    if n_rows:
        block_n, block_v = triton.next_power_of_2(nope_dim), triton.next_power_of_2(V)
        block_half = triton.next_power_of_2(R // 2)
        block_rows = max(1, ROPE_TILE_ELEMS // max(block_n, block_v, 2 * block_half))
        _launch_mla_keys_backward[(triton.cdiv(n_rows, block_rows),)](
            dk_BSHK, dv_BSHV, cos_SR, sin_SR, dkv_BSHX, dpe_BSR, n_rows, S, H,
            *dk_BSHK.stride()[:3], *dv_BSHV.stride()[:3], cos_SR.stride(0), nope_dim, V, R // 2,
            BLOCK_ROWS=block_rows, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_HALF=block_half,
            num_warps=_warps(block_rows * max(block_n, block_v, 2 * block_half)))
    return dkv_BSHX, dpe_BSR


class MLAQueryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BSHK, cos_SR, sin_SR, nope_dim):
        ctx.save_for_backward(cos_SR, sin_SR)
        ctx.nope_dim = nope_dim
        return rope_concat(q_BSHK[..., :nope_dim], q_BSHK[..., nope_dim:], cos_SR, sin_SR)

    @staticmethod
    def backward(ctx, dq_BSHK):
        cos_SR, sin_SR = ctx.saved_tensors
        dq_BSHK, n = _unit_last_stride(dq_BSHK), ctx.nope_dim
        return rope_concat(dq_BSHK[..., :n], dq_BSHK[..., n:], cos_SR, sin_SR,
                           inverse=True), None, None, None


class MLAKeysFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv_BSHX, k_pe_BSR, cos_SR, sin_SR, nope_dim):
        ctx.save_for_backward(cos_SR, sin_SR)
        ctx.nope_dim, ctx.pe_dtype = nope_dim, k_pe_BSR.dtype
        H = kv_BSHX.shape[2]
        k_BSHK = rope_concat(kv_BSHX[..., :nope_dim], k_pe_BSR[:, :, None].expand(-1, -1, H, -1),
                             cos_SR, sin_SR)
        return k_BSHK, kv_BSHX[..., nope_dim:]

    @staticmethod
    def backward(ctx, dk_BSHK, dv_BSHV):
        cos_SR, sin_SR = ctx.saved_tensors
        dkv_BSHX, dpe_BSR = mla_keys_backward(_unit_last_stride(dk_BSHK),
                                              _unit_last_stride(dv_BSHV), cos_SR, sin_SR,
                                              ctx.nope_dim, ctx.pe_dtype)
        return dkv_BSHX, dpe_BSR, None, None, None


def _check_mla(q_BSHK, kv_BSHX, k_pe_BSR, cos_SR, sin_SR, nope_dim: int) -> None:
    for name, t in (("MLA queries", q_BSHK), ("MLA keys/values", kv_BSHX),
                    ("MLA rope key", k_pe_BSR), ("rope cos", cos_SR), ("rope sin", sin_SR)):
        _check_float(name, t)
        _check_device(name, t, q_BSHK)
    if q_BSHK.dim() != 4 or kv_BSHX.dim() != 4 or k_pe_BSR.dim() != 3:
        raise ValueError(f"mla_qk takes q [B, S, H, N+R], kv [B, S, H, N+V] and k_pe [B, S, R], "
                         f"got {tuple(q_BSHK.shape)}, {tuple(kv_BSHX.shape)}, "
                         f"{tuple(k_pe_BSR.shape)}")
    B, S, H, K = q_BSHK.shape
    R = K - nope_dim
    if not 0 < nope_dim < K or R % 2:
        raise ValueError(f"nope_dim {nope_dim} must split the query head dim {K} into a "
                         f"no-position part and an even rope part")
    if kv_BSHX.shape[:3] != (B, S, H) or kv_BSHX.shape[3] <= nope_dim:
        raise ValueError(f"kv {tuple(kv_BSHX.shape)} must be [B, S, H, N+V] = [{B}, {S}, {H}, "
                         f"{nope_dim}+V] for q {tuple(q_BSHK.shape)}")
    if k_pe_BSR.shape != (B, S, R) or kv_BSHX.dtype != q_BSHK.dtype:
        raise ValueError(f"k_pe {tuple(k_pe_BSR.shape)} must be [B, S, R] = [{B}, {S}, {R}] and "
                         f"kv {kv_BSHX.dtype} of the queries' dtype {q_BSHK.dtype}")
    if cos_SR.shape != (S, R // 2) or sin_SR.shape != (S, R // 2):
        raise ValueError(f"rope tables must be [S, R/2] = [{S}, {R // 2}], got cos "
                         f"{tuple(cos_SR.shape)} and sin {tuple(sin_SR.shape)}")


def mla_qk(q_BSHK: torch.Tensor, kv_BSHX: torch.Tensor, k_pe_BSR: torch.Tensor,
           cos_SR: torch.Tensor, sin_SR: torch.Tensor, nope_dim: int):
    """MLA's per-head queries, keys and values for attention, from the projections' outputs:
    q [B, S, H, N+R] (rope not yet applied), kv [B, S, H, N+V] (wkv_b's output), k_pe [B, S, R]
    (the shared rope key, not yet rotated). Returns (q, k, v): q = [q_nope ; rope(q_pe)] and
    k = [k_nope ; rope(k_pe) for every head], fresh contiguous tensors; v a view of kv. Eager
    torch makes these with a rope pass each, an expand and two concatenations forward, and as
    many copies backward; here one pass each way for q, one forward for k, and one backward for
    k and v together (dk_pe summed over the heads in fp32)."""
    _check_mla(q_BSHK, kv_BSHX, k_pe_BSR, cos_SR, sin_SR, nope_dim)
    cos_SR, sin_SR = cos_SR.contiguous(), sin_SR.contiguous()
    q_BSHK = MLAQueryFunction.apply(_unit_last_stride(q_BSHK), cos_SR, sin_SR, nope_dim)
    k_BSHK, v_BSHV = MLAKeysFunction.apply(_unit_last_stride(kv_BSHX),
                                           _unit_last_stride(k_pe_BSR), cos_SR, sin_SR, nope_dim)
    return q_BSHK, k_BSHK, v_BSHV


# -- MoE combine ---------------------------------------------------------------------------------

@triton.jit
def moe_combine_kernel(y_ptr, pick_to_slot_ptr, gate_ptr, out_ptr, T, D, K: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = tokens < T
    mask = live[:, None] & (cols[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        slot = tl.load(pick_to_slot_ptr + tokens * K + k, mask=live, other=0).to(tl.int64)
        gate = tl.load(gate_ptr + tokens * K + k, mask=live, other=0.0)
        y = tl.load(y_ptr + slot[:, None] * D + cols[None, :], mask=mask, other=0.0)
        acc += gate[:, None] * y.to(tl.float32)
    tl.store(out_ptr + tokens[:, None] * D + cols[None, :],
             cast_rne(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_combine_backward_kernel(g_ptr, y_ptr, pick_to_slot_ptr, gate_ptr, dy_ptr, dgate_ptr, T, D,
                                K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    live = tokens < T
    ks = tl.arange(0, BLOCK_K)
    dgate = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = live[:, None] & (cols[None, :] < D)
        g = tl.load(g_ptr + tokens[:, None] * D + cols[None, :], mask=mask, other=0.0)
        g = g.to(tl.float32)
        for k in tl.static_range(K):
            slot = tl.load(pick_to_slot_ptr + tokens * K + k, mask=live, other=0).to(tl.int64)
            gate = tl.load(gate_ptr + tokens * K + k, mask=live, other=0.0)
            rows = slot[:, None] * D + cols[None, :]
            y = tl.load(y_ptr + rows, mask=mask, other=0.0).to(tl.float32)
            tl.store(dy_ptr + rows, cast_rne(gate[:, None] * g, dy_ptr.dtype.element_ty),
                     mask=mask)
            dot = tl.sum(g * y, axis=1)
            dgate = tl.where(ks[None, :] == k, dgate + dot[:, None], dgate)
    k_mask = live[:, None] & (ks[None, :] < K)
    tl.store(dgate_ptr + tokens[:, None] * K + ks[None, :], dgate, mask=k_mask)


_launch_combine = CachedLauncher(moe_combine_kernel)
_launch_combine_backward = CachedLauncher(moe_combine_backward_kernel)
COMBINE_TILE_ELEMS = 4096
"""Elements (tokens x columns) a combine program handles per step."""


def _combine_tiles(D: int, widest: int = 1024) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D) of a combine program: up to `widest` columns, tokens filling the tile
    (the backward takes 512: it holds the gradient and an expert row at once)."""
    block_d = min(triton.next_power_of_2(D), widest)
    return max(1, COMBINE_TILE_ELEMS // block_d), block_d


def combine_forward(y_slots: torch.Tensor, pick_to_slot: torch.Tensor,
                    gate_TK: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k gate[t, k] * y_slots[pick_to_slot[t * K + k]], in fp32, rounded once."""
    (T, K), D = gate_TK.shape, y_slots.shape[1]
    out = torch.empty((T, D), dtype=y_slots.dtype, device=y_slots.device)
    if T and D:
        block_t, block_d = _combine_tiles(D)
        _launch_combine[(triton.cdiv(T, block_t), triton.cdiv(D, block_d))](
            y_slots, pick_to_slot, gate_TK, out, T, D, K=K, BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=_warps(block_t * block_d))
    return out


def combine_backward(g_TD: torch.Tensor, y_slots: torch.Tensor, pick_to_slot: torch.Tensor,
                     gate_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d y_slots, d gate) of combine_forward for the output gradient g_TD. Every slot a pick
    points at gets gate * g of its token; slots no pick points at (padding) get zeros."""
    (T, K), D = gate_TK.shape, y_slots.shape[1]
    full = y_slots.shape[0] == T * K
    dy = (torch.empty_like if full else torch.zeros_like)(y_slots)
    dgate = (torch.empty if D else torch.zeros)((T, K), dtype=torch.float32, device=g_TD.device)
    if T and D:
        block_t, block_d = _combine_tiles(D, widest=512)
        _launch_combine_backward[(triton.cdiv(T, block_t),)](
            g_TD, y_slots, pick_to_slot, gate_TK, dy, dgate, T, D, K=K,
            BLOCK_K=triton.next_power_of_2(K), BLOCK_T=block_t, BLOCK_D=block_d,
            num_warps=_warps(block_t * block_d))
    return dy, dgate


def sum_picks(y_slots: torch.Tensor, pick_to_slot: torch.Tensor, top_k: int) -> torch.Tensor:
    """out[t] = sum over k of y_slots[pick_to_slot[t * top_k + k]]: the combine with unit gates,
    for the dispatch's backward (the slots' gradients summed back onto their tokens; no autograd
    of its own). fp32 sums rounded once, as torch's sum of the gathered rows rounds them."""
    _check_float("sum_picks rows", y_slots)
    _check_device("sum_picks pick_to_slot", pick_to_slot, y_slots)
    if y_slots.dim() != 2 or pick_to_slot.dim() != 1 or pick_to_slot.numel() % top_k:
        raise ValueError(f"sum_picks takes rows [slots, D] and pick_to_slot [T * {top_k}]; got "
                         f"{tuple(y_slots.shape)} and {tuple(pick_to_slot.shape)}")
    ones = torch.ones(pick_to_slot.numel() // top_k, top_k, device=y_slots.device)
    return combine_forward(y_slots.contiguous(), pick_to_slot.contiguous(), ones)


class MoECombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_slots, pick_to_slot, gate_TK):
        ctx.save_for_backward(y_slots, pick_to_slot, gate_TK)
        return combine_forward(y_slots, pick_to_slot, gate_TK)

    @staticmethod
    def backward(ctx, g_TD):
        y_slots, pick_to_slot, gate_TK = ctx.saved_tensors
        dy, dgate = combine_backward(g_TD.contiguous(), y_slots, pick_to_slot, gate_TK)
        return dy, None, dgate.to(gate_TK.dtype)


def moe_combine(y_slots: torch.Tensor, pick_to_slot: torch.Tensor,
                gate_TK: torch.Tensor) -> torch.Tensor:
    """The routed experts' output per token: sum over k of gate_TK[t, k] times the expert output
    in slot pick_to_slot[t * K + k] of y_slots [slots, D] (models.moe.MoE._routed's eager
    gather, multiply and sum, in one pass). Returns [T, D] in y_slots' dtype; gate_TK is fp32."""
    _check_float("moe_combine expert outputs", y_slots)
    _check_device("moe_combine pick_to_slot", pick_to_slot, y_slots)
    _check_device("moe_combine gates", gate_TK, y_slots)
    if gate_TK.dtype != torch.float32:
        raise TypeError(f"moe_combine gates have dtype {gate_TK.dtype}; pass the router's fp32 "
                        f"weights (gate_TK.float())")
    if y_slots.dim() != 2 or gate_TK.dim() != 2 or pick_to_slot.shape != (gate_TK.numel(),):
        raise ValueError(f"moe_combine takes y_slots [slots, D], gate_TK [T, K] and pick_to_slot "
                         f"[T * K]; got {tuple(y_slots.shape)}, {tuple(gate_TK.shape)} and "
                         f"{tuple(pick_to_slot.shape)}")
    if y_slots.shape[0] < gate_TK.numel():
        raise ValueError(f"moe_combine: {gate_TK.numel()} picks but only {y_slots.shape[0]} "
                         f"slots of expert output")
    if pick_to_slot.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_combine pick_to_slot has dtype {pick_to_slot.dtype}; expected "
                        f"int64 (models.moe.sort_by_expert's)")
    return MoECombineFunction.apply(y_slots.contiguous(), pick_to_slot.contiguous(),
                                    gate_TK.contiguous())
