"""AdamW with moments in a chosen dtype (one fused Triton kernel on the GPU), the learning-rate
schedules, and the parameter groups.

DeepSeek-V3 keeps AdamW's two moments in BF16 while the master weights stay FP32 (tech report
section 3.3.3): the moments are smooth running averages that lose nothing important at 8 mantissa
bits, and halving them frees 4 bytes per parameter. `AdamW` below does the update of
`torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, same operation order); with
`moment_dtype=bfloat16` each moment is read into FP32, updated, used for this step's update, and
stored back rounded to BF16 (round to nearest even, as `tensor.to(torch.bfloat16)`).

Why a fused kernel. The update is memory-bound: per parameter it must read the FP32 weight and
gradient and the two moments and write the weight and the moments back, 20 bytes with BF16 moments
(4 + 4 + 2 + 2 in, 4 + 2 + 2 out; 28 with FP32 moments). Done as torch ops it is ~12 elementwise
kernels (the moments' casts to FP32, lerp, mul, addcmul, sqrt, div, add, addcdiv, the copies back),
each a full pass over its operands: ~100 bytes per parameter. So on CUDA tensors `adamw_kernel` does
the whole update in one pass. scripts/bench_optim.py on an H100, one step over 1.9e9 parameters (the
`small` model): 12.6 ms at 3.03 TB/s, as fast as a device-to-device copy moves bytes, against 70.1 ms
for the torch-ops path and 20.4 ms for torch.optim.AdamW(fused=True) (FP32 moments, 28 bytes; our
kernel with FP32 moments takes 17.7 ms).

Arithmetic of the kernel: torch's operations in torch's order, each rounded once to FP32
(correctly rounded sqrt and division; no fused multiply-add: the kernel is compiled with
enable_fp_fusion=False), so the compiled kernel, Triton's CPU interpreter and a float64-per-op
reference agree bit for bit (tests/test_optim.py). The BF16 rounding is done on the integer bits,
exactly torch's rule (the interpreter's own cast truncates). torch's kernels round differently in
places (its CPU lerp and addcmul are fused multiply-adds, its CPU sqrt is not correctly rounded, its
CUDA division by a scalar multiplies by the reciprocal), so the two paths are not bitwise equal: after
one step from the same state the moments differ by an FP32 rounding of their terms, which leaves a
BF16 moment at most one BF16 ulp away (exp_avg more only where 0.9 m + 0.1 g nearly cancels), and p
within an FP32 ulp or two. The torch path, kept for CPU tensors (the CPU suite and its exact-resume
checks rely on its results) and non-contiguous ones, matches torch.optim.AdamW bit for bit with FP32
moments on the CPU; it updates large tensors in chunks so the FP32 working copies of BF16 moments
stay small whatever the parameter size. Step-dependent scalars (learning rate, bias corrections)
are runtime kernel arguments, so a new step never recompiles.

The master weights are whatever tensors the optimizer is handed. Under DeepSpeed with bf16 the
engine keeps an FP32 copy of every parameter (ZeRO's flat FP32 partitions, FP32 .grad) and gives
those to the client optimizer, so the update always happens in FP32; on the CPU the model itself is
FP32. trainer/zero_step.py hands AdamW a flat partition's gradient as ZeRO holds it, one bf16
tensor per parameter (83 on `small`): `adamw_pieces_kernel` steps the whole partition from them in
one launch (a small table of the pieces' addresses and offsets goes up with it; each program finds
its piece by binary search): on an H100, 0.9 ms of host time to queue a 1.9B-parameter step
against 7.8 ms for a launch per piece (scripts/bench_optim.py), the GPU's time the same or 4%
less. Its loads and stores are 16 bytes wide when every piece starts on a multiple of 8 elements
(`ALIGNED`, checked at each launch), element-wide otherwise. On several ranks ZeRO cuts a
parameter at each partition boundary, which it only keeps on a multiple of 2 elements: where a
partition's first piece is not a multiple of 8 long, every later piece is off the grid too, and
the step runs element-wide (as the per-piece launches did then: their narrowed views lose the
alignment the same way). `small`'s partitions are on the grid on 2, 4 and 8 ranks (computed
from its parameter sizes); a model whose parameter count per group is not a multiple of 16 x
ranks may not be.

Schedules map the optimizer step (0-based) to a factor of the peak learning rate:
`cosine` (linear warmup, then cosine down to `min_lr_ratio`) and `wsd` (warmup, stable, then a
linear decay over the last `decay_fraction` of the steps). They are callables with plain fields so
`torch.optim.lr_scheduler.LambdaLR` can save and restore them with a checkpoint.

Parameter groups: matrices (embedding, projections, experts) get weight decay, vectors (norm
weights) do not. The router's correction bias is a buffer, never a parameter; a model that makes
it one is refused here because the optimizer would then move it by gradient.

Triton kernels run on the CPU only under its interpreter (models/triton_env.py picks it on a
machine without CUDA, before the kernel is defined); the CPU path still uses torch ops unless
`AdamW(fused=True)` asks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.triton_env import INTERPRET  # before triton: picks the interpreter on CPU-only machines
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from models.triton_launch import CachedLauncher  # noqa: E402

MOMENT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
UPDATE_CHUNK = 1 << 26
"""Elements updated at a time by the torch path: ZeRO hands the optimizer one flat partition per group
(1.9B elements for `small`), and BF16 moments need FP32 working copies, which chunking keeps to ~1 GiB."""
FUSED_BLOCK = 2048
"""Elements per program of adamw_kernel (16 per thread at 4 warps)."""
FUSED_WARPS = 4
SCHEDULES = ("cosine", "wsd", "constant")

@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate."""
    schedule: str = "cosine"
    """'cosine' (warmup then cosine decay), 'wsd' (warmup-stable-decay) or 'constant' (warmup only)."""
    warmup_steps: int = 20
    """Optimizer steps of linear warmup from lr/warmup_steps to lr."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    decay_fraction: float = 0.2
    """wsd only: fraction of all steps spent in the final linear decay."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    moment_dtype: str = "bfloat16"
    """Storage dtype of both AdamW moments: 'bfloat16' (DeepSeek-V3) or 'float32'."""
    bias_update_rate: float = 1e-3
    """gamma of the aux-loss-free router-bias update, applied once per optimizer step (0 disables)."""


@triton.jit
def _bf16_bits_to_f32(x_bf16):
    return (x_bf16.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_rne(x):
    """Round to nearest even on the bits (torch's fp32 -> bf16 rule); NaN stays a quiet NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _adamw_block(p_ptr, grad, exp_avg_ptr, exp_avg_sq_ptr, grad_scale_ptr, p_bf16_ptr, offs, mask,
                 decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                 step_size, MOMENTS_BF16: tl.constexpr, SCALE_GRAD: tl.constexpr,
                 GRAD_BF16: tl.constexpr, WRITE_BF16: tl.constexpr):
    """AdamW on the elements `offs` of the flat state, given their gradient as loaded."""
    if GRAD_BF16:  # widened exactly, as grad.float() would
        grad = _bf16_bits_to_f32(grad)
    if SCALE_GRAD:  # gradient clipping's factor, applied as the gradient is read (scale_next_grads)
        grad = grad * tl.load(grad_scale_ptr)
    p = tl.load(p_ptr + offs, mask=mask)
    exp_avg = tl.load(exp_avg_ptr + offs, mask=mask)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask)
    if MOMENTS_BF16:
        exp_avg = _bf16_bits_to_f32(exp_avg)
        exp_avg_sq = _bf16_bits_to_f32(exp_avg_sq)

    p = p * decay
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + (one_minus_beta2 * grad) * grad
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(step_size * exp_avg, denom)

    tl.store(p_ptr + offs, p, mask=mask)
    if WRITE_BF16:  # the model's bf16 copy of the new weight, rounded as tensor.copy_ rounds
        tl.store(p_bf16_ptr + offs, _f32_to_bf16_rne(p), mask=mask)
    if MOMENTS_BF16:
        exp_avg = _f32_to_bf16_rne(exp_avg)
        exp_avg_sq = _f32_to_bf16_rne(exp_avg_sq)
    tl.store(exp_avg_ptr + offs, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, exp_avg_sq, mask=mask)


@triton.jit
def adamw_kernel(p_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, grad_scale_ptr, p_bf16_ptr, n,
                 decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, eps,
                 step_size, MOMENTS_BF16: tl.constexpr, SCALE_GRAD: tl.constexpr,
                 GRAD_BF16: tl.constexpr, WRITE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    _adamw_block(p_ptr, tl.load(grad_ptr + offs, mask=mask), exp_avg_ptr, exp_avg_sq_ptr,
                 grad_scale_ptr, p_bf16_ptr, offs, mask, decay, one_minus_beta1, beta2,
                 one_minus_beta2, bias_correction2_sqrt, eps, step_size, MOMENTS_BF16, SCALE_GRAD,
                 GRAD_BF16, WRITE_BF16)


@triton.jit
def adamw_pieces_kernel(p_ptr, table_ptr, n_pieces, exp_avg_ptr, exp_avg_sq_ptr, grad_scale_ptr,
                        p_bf16_ptr, decay, one_minus_beta1, beta2, one_minus_beta2,
                        bias_correction2_sqrt, eps, step_size, MOMENTS_BF16: tl.constexpr,
                        SCALE_GRAD: tl.constexpr, GRAD_BF16: tl.constexpr,
                        WRITE_BF16: tl.constexpr, ALIGNED: tl.constexpr,
                        SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """adamw_kernel over a gradient in pieces, one launch for all of them. table (int64):
    [addresses of the n pieces | their first elements in p, and p's length | their first
    programs, and the grid's size]; each program finds its piece by binary search."""
    pid = tl.program_id(0)
    starts_ptr = table_ptr + n_pieces
    first_programs_ptr = starts_ptr + n_pieces + 1
    lo = 0
    hi = n_pieces
    for _ in tl.static_range(SEARCH_STEPS):  # the last piece whose first program <= pid
        mid = (lo + hi) // 2
        right = tl.load(first_programs_ptr + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    start = tl.load(starts_ptr + lo)
    length = tl.load(starts_ptr + lo + 1) - start
    if ALIGNED:  # every piece starts (and so ends) on a multiple of 8 elements: 16-byte accesses
        start = tl.multiple_of(start, 8)
        length = tl.multiple_of(length, 8)
    local = (pid - tl.load(first_programs_ptr + lo)).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = local < length
    if GRAD_BF16:
        grad_base = tl.load(table_ptr + lo).to(tl.pointer_type(tl.bfloat16))
    else:
        grad_base = tl.load(table_ptr + lo).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        grad_base = tl.multiple_of(grad_base, 16)
    _adamw_block(p_ptr, tl.load(grad_base + local, mask=mask), exp_avg_ptr, exp_avg_sq_ptr,
                 grad_scale_ptr, p_bf16_ptr, start + local, mask, decay, one_minus_beta1, beta2,
                 one_minus_beta2, bias_correction2_sqrt, eps, step_size, MOMENTS_BF16, SCALE_GRAD,
                 GRAD_BF16, WRITE_BF16)


_launch_adamw = CachedLauncher(adamw_kernel)
"""adamw_kernel launched without the JIT's per-call work (models/triton_launch.py)."""
_launch_adamw_pieces = CachedLauncher(adamw_pieces_kernel)


def adamw_update(p: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float, step: int,
                 grad_scale: torch.Tensor | None = None,
                 p_bf16: torch.Tensor | None = None) -> None:
    """One AdamW step (torch.optim.AdamW's math, `step` counted from 1) of the contiguous FP32 tensor p,
    in place, with its gradient (FP32, or bf16 widened as it is read) and its two moments (both bf16
    or both fp32, updated in place).
    grad_scale: a one-element FP32 tensor beside p; the step uses grad * grad_scale (grad itself is
    left as it is).
    p_bf16: a bf16 tensor of p's shape that also receives the new p, rounded to nearest even."""
    _check_fused_operands(p, grad, exp_avg, exp_avg_sq, p_bf16)
    _check_grad_scale(grad_scale, p)
    if step < 1:
        raise ValueError(f"adamw_update got step={step}; steps are counted from 1 (the first update is step 1)")
    n = p.numel()
    if n == 0:
        return
    _launch_adamw[(triton.cdiv(n, FUSED_BLOCK),)](
        p, grad, exp_avg, exp_avg_sq, p if grad_scale is None else grad_scale,
        p if p_bf16 is None else p_bf16, n,
        *_step_scalars(lr, betas, eps, weight_decay, step),
        MOMENTS_BF16=exp_avg.dtype == torch.bfloat16, SCALE_GRAD=grad_scale is not None,
        GRAD_BF16=grad.dtype == torch.bfloat16, WRITE_BF16=p_bf16 is not None,
        BLOCK=FUSED_BLOCK, num_warps=FUSED_WARPS, enable_fp_fusion=False)


def _step_scalars(lr, betas, eps, weight_decay, step) -> tuple[float, ...]:
    """The kernels' per-step scalars: decay, 1 - beta1, beta2, 1 - beta2, sqrt of the second
    moment's bias correction, eps, and the step size (negative)."""
    beta1, beta2 = (float(b) for b in betas)
    return (float(1 - lr * weight_decay), float(1 - beta1), beta2, float(1 - beta2),
            float((1 - beta2 ** step) ** 0.5), float(eps), float(-lr / (1 - beta1 ** step)))


def pieces_take_one_launch(p: torch.Tensor, pieces: list[torch.Tensor], exp_avg: torch.Tensor,
                           p_bf16: torch.Tensor | None) -> bool:
    """Whether adamw_update_pieces can step p from these gradient pieces: CUDA tensors (or the
    interpreter's CPU ones), the pieces one dtype, each contiguous, on p's device; p, p_bf16 and
    the moments (made together: exp_avg stands for both) contiguous."""
    if not pieces or (p.device.type != "cuda" and not INTERPRET):
        return False
    dtype = pieces[0].dtype
    pieces_ok = all(t.dtype == dtype and t.is_contiguous() and t.device == p.device
                    for t in pieces)
    return pieces_ok and dtype in (torch.float32, torch.bfloat16) and p.is_contiguous() and (
        exp_avg.is_contiguous() and (p_bf16 is None or p_bf16.is_contiguous()))


def adamw_update_pieces(p: torch.Tensor, pieces: list[torch.Tensor], exp_avg: torch.Tensor,
                        exp_avg_sq: torch.Tensor, *, lr: float, betas: tuple[float, float],
                        eps: float, weight_decay: float, step: int,
                        grad_scale: torch.Tensor | None = None,
                        p_bf16: torch.Tensor | None = None) -> None:
    """adamw_update of the flat p from its gradient in pieces (laid end to end they are p's
    gradient; ZeRO's, not flattened) in one launch: a table of the pieces' addresses and
    offsets goes to the GPU with the launch, where each program finds its piece. Bitwise the
    piece-by-piece adamw_update. pieces_take_one_launch(...) says whether the pieces qualify."""
    if not pieces_take_one_launch(p, pieces, exp_avg, p_bf16):
        raise ValueError("adamw_update_pieces: the pieces must be contiguous, of one dtype (FP32 "
                         "or bf16) and on p's device, and p, the moments and p_bf16 contiguous; "
                         "step them one by one with adamw_update otherwise")
    _check_grad_scale(grad_scale, p)
    if step < 1:
        raise ValueError(f"adamw_update_pieces got step={step}; steps are counted from 1")
    _launch_pieces(p, pieces, exp_avg, exp_avg_sq, lr=lr, betas=betas, eps=eps,
                   weight_decay=weight_decay, step=step, grad_scale=grad_scale, p_bf16=p_bf16)


def _launch_pieces(p, pieces, exp_avg, exp_avg_sq, *, lr, betas, eps, weight_decay, step,
                   grad_scale, p_bf16) -> None:
    """adamw_update_pieces after the checks its callers make once (pieces_take_one_launch,
    grad_scale, step): AdamW._update makes them itself, and walking ZeRO's pieces twice would
    cost host time while the GPU waits for the optimizer."""
    _check_fused_operands(p, p, exp_avg, exp_avg_sq, p_bf16)
    pieces = [t for t in pieces if t.numel()]
    if sum(t.numel() for t in pieces) != p.numel():
        raise ValueError(f"adamw_update_pieces: the pieces hold {sum(t.numel() for t in pieces)} "
                         f"elements, p {p.numel()}; pass all of p's gradient")
    if not pieces:
        return
    table, grid, aligned = _piece_table(pieces, p, p_bf16)
    _launch_adamw_pieces[(grid,)](
        p, table, len(pieces), exp_avg, exp_avg_sq, p if grad_scale is None else grad_scale,
        p if p_bf16 is None else p_bf16, *_step_scalars(lr, betas, eps, weight_decay, step),
        MOMENTS_BF16=exp_avg.dtype == torch.bfloat16, SCALE_GRAD=grad_scale is not None,
        GRAD_BF16=pieces[0].dtype == torch.bfloat16, WRITE_BF16=p_bf16 is not None,
        ALIGNED=aligned, SEARCH_STEPS=len(pieces).bit_length(), BLOCK=FUSED_BLOCK,
        num_warps=FUSED_WARPS, enable_fp_fusion=False)


def _piece_table(pieces: list[torch.Tensor], p: torch.Tensor,
                 p_bf16: torch.Tensor | None) -> tuple[torch.Tensor, int, bool]:
    """adamw_pieces_kernel's table on p's device (through pinned memory, without waiting), the
    grid size, and whether every piece's start is 16-byte aligned in all the tensors it touches
    (the kernel then reads and writes 16 bytes at a time)."""
    starts, first_programs = [0], [0]
    for t in pieces:
        starts.append(starts[-1] + t.numel())
        first_programs.append(first_programs[-1] + triton.cdiv(t.numel(), FUSED_BLOCK))
    addresses = [t.data_ptr() for t in pieces]
    table = torch.tensor(addresses + starts + first_programs, dtype=torch.int64)
    if p.is_cuda:
        table = table.pin_memory().to(p.device, non_blocking=True)
    aligned = (all(a % 16 == 0 for a in addresses) and all(s % 8 == 0 for s in starts)
               and all(t.data_ptr() % 16 == 0 for t in (p, p_bf16) if t is not None))
    return table, first_programs[-1], aligned


def _check_grad_scale(grad_scale: torch.Tensor | None, p: torch.Tensor) -> None:
    if grad_scale is None:
        return
    if (not isinstance(grad_scale, torch.Tensor) or grad_scale.numel() != 1
            or grad_scale.dtype != torch.float32):
        raise TypeError("grad_scale must be a one-element FP32 tensor (the clip factor), got "
                        f"{grad_scale!r:.80}")
    if grad_scale.device != p.device:
        raise ValueError(f"grad_scale is on {grad_scale.device}, the parameters on {p.device}; "
                         "make it on the parameters' device (no host round trip)")


def _check_fused_operands(p, grad, exp_avg, exp_avg_sq, p_bf16=None) -> None:
    named = dict(p=p, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    if p.dtype != torch.float32 or grad.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"adamw_update needs an FP32 p and an FP32 or bf16 grad, got {p.dtype} and "
                        f"{grad.dtype}; keep FP32 master weights (or use AdamW's torch path)")
    if p_bf16 is not None:
        if p_bf16.dtype != torch.bfloat16:
            raise TypeError(f"adamw_update: p_bf16 is {p_bf16.dtype}; it receives the new weight "
                            "rounded to bf16, so pass a bfloat16 tensor (or None)")
        named["p_bf16"] = p_bf16
    if exp_avg.dtype != exp_avg_sq.dtype or exp_avg.dtype not in MOMENT_DTYPES.values():
        raise TypeError(f"adamw_update needs both moments in bfloat16 or both in float32, got "
                        f"{exp_avg.dtype} and {exp_avg_sq.dtype}")
    for name, t in named.items():
        if t.shape != p.shape:
            raise ValueError(f"adamw_update: {name} has shape {tuple(t.shape)}, p has {tuple(p.shape)}; "
                             "pass the parameter's own gradient and moments")
        if not t.is_contiguous():
            raise ValueError(f"adamw_update: {name} is not contiguous; call .contiguous() or use AdamW's "
                             "torch path, which takes any strides")
        if t.device != p.device:
            raise ValueError(f"adamw_update: {name} is on {t.device}, p on {p.device}; keep all four together")
    if p.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"the fused AdamW kernel runs on CUDA tensors (or on the CPU under "
                           f"TRITON_INTERPRET=1), got a {p.device} tensor; use AdamW(fused=None) on the CPU")


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with the two moments stored in `moment_dtype`.

    fused: None (default) runs `adamw_kernel` on CUDA tensors and torch ops elsewhere; True runs the
    kernel on every tensor it can take (on the CPU that needs TRITON_INTERPRET=1: tests); False
    always uses torch ops. Non-contiguous tensors always take the torch path.

    `scale_next_grads(factor)` has the next step() read every gradient multiplied by `factor` (a
    one-element FP32 tensor on the parameters' device): gradient clipping without a pass of its
    own over the gradients (trainer/zero_clip.py hands DeepSpeed's clip factor over this way).

    `use_for_next_step(p, grad, p_bf16)` has the next step() update p from `grad` (FP32 or bf16)
    instead of p.grad and also write the new p, rounded to bf16, into `p_bf16`: ZeRO's step
    without an FP32 copy of the gradients or a cast of the weights back (trainer/zero_step.py)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.bfloat16, fused: bool | None = None):
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"AdamW got lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}: "
                             "need lr >= 0, 0 <= beta < 1, eps > 0, weight_decay >= 0")
        if moment_dtype not in MOMENT_DTYPES.values():
            raise ValueError(f"moment_dtype={moment_dtype} is not supported; use torch.bfloat16 or torch.float32")
        if fused not in (None, True, False):
            raise TypeError(f"AdamW(fused={fused!r}): use None (kernel on CUDA), True or False")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.moment_dtype = moment_dtype
        self.fused = fused
        self._grad_scale: torch.Tensor | None = None
        self._next_io: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def scale_next_grads(self, factor: torch.Tensor) -> None:
        """Multiply the gradients by `factor` as the next step() reads them (they stay as they
        are)."""
        self._grad_scale = factor

    def use_for_next_step(self, p: torch.Tensor, grad: torch.Tensor | list[torch.Tensor],
                          p_bf16: torch.Tensor | None = None) -> None:
        """The next step() updates p from `grad` (its gradient, FP32 or bf16) instead of p.grad,
        and writes the new p, rounded to bf16, into `p_bf16` as well when one is given.
        `grad` may also be a list of pieces, of any shapes, that make up p's gradient in order
        when laid end to end (p and p_bf16 contiguous): ZeRO's gradients, not flattened."""
        pieces = [grad] if isinstance(grad, torch.Tensor) else list(grad)
        for piece in pieces:
            if piece.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"use_for_next_step: grad is {piece.dtype}; pass FP32 or bf16")
        for name, t in (("grad", grad), ("p_bf16", p_bf16)):
            if isinstance(t, torch.Tensor) and t.shape != p.shape:
                raise ValueError(f"use_for_next_step: {name} has shape {tuple(t.shape)}, the "
                                 f"parameter {tuple(p.shape)}; pass tensors of its shape")
        if p_bf16 is not None and p_bf16.dtype != torch.bfloat16:
            raise TypeError(f"use_for_next_step: p_bf16 is {p_bf16.dtype}; it must be bfloat16")
        if not isinstance(grad, torch.Tensor):
            held = sum(piece.numel() for piece in pieces)
            if held != p.numel():
                raise ValueError(f"use_for_next_step: the pieces of grad hold {held} elements, "
                                 f"the parameter {p.numel()}; pass all of its gradient")
            if not p.is_contiguous() or (p_bf16 is not None and not p_bf16.is_contiguous()):
                raise ValueError("use_for_next_step: a gradient in pieces needs a contiguous "
                                 "parameter (and p_bf16); pass one tensor otherwise")
        self._next_io[id(p)] = (p, grad if isinstance(grad, torch.Tensor) else pieces, p_bf16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grad_scale, self._grad_scale = self._grad_scale, None
        next_io, self._next_io = self._next_io, {}
        for group in self.param_groups:
            for p in group["params"]:
                _, grad, p_bf16 = next_io.pop(id(p), (p, p.grad, None))
                if grad is not None:
                    self._update(p, grad, group, grad_scale, p_bf16)
        if next_io:
            raise ValueError(f"use_for_next_step was given {len(next_io)} tensor(s) that are not "
                             "parameters of this step's param_groups; pass the optimizer's own "
                             "parameters")
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded moments to the parameter's dtype; put them back in moment_dtype (lossless)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)

    def _update(self, p: torch.Tensor, grad: torch.Tensor | list[torch.Tensor], group: dict,
                grad_scale: torch.Tensor | None, p_bf16: torch.Tensor | None) -> None:
        if p.dtype != torch.float32:
            raise TypeError(f"AdamW updates FP32 master weights, got a {p.dtype} parameter of shape "
                            f"{tuple(p.shape)}; let the engine keep FP32 masters (bf16 mode) or keep the model FP32")
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
        _check_grad_scale(grad_scale, p)
        state["step"] += 1
        if isinstance(grad, torch.Tensor):
            self._update_tensors(p, grad, state["exp_avg"], state["exp_avg_sq"], p_bf16, group,
                                 state["step"], grad_scale)
            return
        if self._kernel_for(p) and pieces_take_one_launch(p, grad, state["exp_avg"], p_bf16):
            _launch_pieces(p, grad, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"],
                           betas=group["betas"], eps=group["eps"],
                           weight_decay=group["weight_decay"], step=state["step"],
                           grad_scale=grad_scale, p_bf16=p_bf16)
            return
        offset = 0  # a gradient in pieces: each piece updates its stretch of the flat tensors
        for piece in grad:
            n = piece.numel()
            p_c, exp_avg_c, exp_avg_sq_c, p_bf16_c = (
                None if t is None else t.view(-1).narrow(0, offset, n)
                for t in (p, state["exp_avg"], state["exp_avg_sq"], p_bf16))
            self._update_tensors(p_c, piece.reshape(-1), exp_avg_c, exp_avg_sq_c, p_bf16_c, group,
                                 state["step"], grad_scale)
            offset += n

    def _kernel_for(self, p: torch.Tensor) -> bool:
        """Whether `fused` sends p's update to the kernels."""
        return p.is_cuda if self.fused is None else self.fused

    def _update_tensors(self, p, grad, exp_avg, exp_avg_sq, p_bf16, group: dict, step: int,
                        grad_scale: torch.Tensor | None) -> None:
        tensors = (p, grad, exp_avg, exp_avg_sq)
        contiguous = all(t.is_contiguous() for t in tensors)
        if contiguous and self._kernel_for(p) and (
                p_bf16 is None or p_bf16.is_contiguous()):
            adamw_update(*tensors, lr=group["lr"], betas=group["betas"], eps=group["eps"],
                         weight_decay=group["weight_decay"], step=step,
                         grad_scale=grad_scale, p_bf16=p_bf16)
            return
        chunks = zip(*(t.view(-1).split(UPDATE_CHUNK) for t in tensors)) if contiguous else [tensors]
        for p_c, grad_c, exp_avg_c, exp_avg_sq_c in chunks:
            self._update_chunk(p_c, grad_c, exp_avg_c, exp_avg_sq_c, group, step, grad_scale)
        if p_bf16 is not None:
            p_bf16.copy_(p)

    def _update_chunk(self, p, grad, exp_avg_stored, exp_avg_sq_stored, group: dict, step: int,
                      grad_scale: torch.Tensor | None) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        grad = grad.float() if grad_scale is None else grad.float() * grad_scale
        exp_avg, exp_avg_sq = exp_avg_stored.float(), exp_avg_sq_stored.float()

        p.mul_(1 - lr * group["weight_decay"])
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

        if self.moment_dtype != torch.float32:
            exp_avg_stored.copy_(exp_avg)
            exp_avg_sq_stored.copy_(exp_avg_sq)


@dataclass
class Schedule:
    """Learning-rate factor (multiplies the peak lr) as a function of the 0-based optimizer step."""
    kind: str
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float
    decay_fraction: float

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.kind!r} is unknown; use one of {SCHEDULES}")
        if self.total_steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"schedule needs total_steps >= 1 and warmup_steps >= 0, got "
                             f"{self.total_steps} and {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.decay_fraction <= 1:
            raise ValueError("optim.min_lr_ratio and optim.decay_fraction must lie in [0, 1]")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = round(self.decay_fraction * self.total_steps)
        decay_start = self.total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1 - self.min_lr_ratio) * progress


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices with weight decay, vectors without; refuses a trainable router bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.endswith("expert_bias"):
            raise TypeError(f"{name} is a parameter; the router correction bias must be a buffer "
                            "(register_buffer) so that only the balance update moves it")
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> AdamW:
    if cfg.moment_dtype not in MOMENT_DTYPES:
        raise ValueError(f"optim.moment_dtype={cfg.moment_dtype!r} is unknown; use one of {tuple(MOMENT_DTYPES)}")
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                 eps=cfg.eps, weight_decay=cfg.weight_decay, moment_dtype=MOMENT_DTYPES[cfg.moment_dtype])


def build_schedule(cfg: OptimConfig, total_steps: int) -> Schedule:
    return Schedule(cfg.schedule, total_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction)
