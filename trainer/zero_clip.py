"""The gradient norm, overflow check and clipping of DeepSpeed's ZeRO-1/2 step, made cheap.

Before it updates the weights, DeepSpeed's ZeRO optimizer (stage 1 or 2) does three things with
the gradients of this rank's partition, one parameter tensor at a time:

  1. an overflow check: the amax and the amin of every gradient, each tested for inf/NaN, then an
     all-reduce and a host sync (`has_overflow`);
  2. the global L2 norm: every gradient copied to float64, its norm taken, the squares summed and
     all-reduced (`get_grad_norm_direct`);
  3. clipping: a multiply of the flat FP32 gradient partition by 1 / max(1, norm / clip)
     (`unscale_and_clip_grads`), a full pass of its own just before the optimizer reads it.

On the `small` model (1.9e9 parameters in 83 tensors, MTP and head included; bf16, one H100)
these took 37 of the 63 ms of `engine.step()`: about 20 ms of GPU work (the float64 copies alone
8.6 ms) and the rest host time, over a thousand small launches for the per-tensor checks.
`install(engine)` replaces the three methods on that one optimizer object (DeepSpeed's own
ZenFlow swaps its optimizers' methods the same way) with:

  1. no separate check: a gradient holding inf/NaN makes the norm inf/NaN, and DeepSpeed's step
     already treats a non-finite norm as an overflow (skips the update, reports the norm as inf),
     so the check is kept and the norm does it;
  2. `torch._foreach_norm(..., dtype=float64)` over the same gradient list: float64 norms as
     DeepSpeed takes them, but accumulated as each bf16 gradient is read (a few multi-tensor
     launches) instead of from a float64 copy; then DeepSpeed's arithmetic (squares summed, cast
     to FP32, all-reduced over the same data-parallel group, pow(0.5));
  3. DeepSpeed's factor, computed on the GPU (no host sync) and handed to our AdamW
     (`AdamW.scale_next_grads`), whose kernel multiplies each gradient as it reads it: the same
     FP32 multiply, without a pass of its own.

So the step is DeepSpeed's, bit for bit where the float64 norms come out the same (on the CPU
they do: tests/test_engine.py compares the two paths' weights bitwise under ZeRO-1 and 2, bf16
and fp32, with clipping active and not, and a NaN gradient skips the step in both).

Measured on an H100 (`small`, bf16, 4 x 2048 tokens, one micro-batch a step; A/B with
`--deepspeed-grad-clip` in the same session): `engine.step()` 56.8 -> 27.8 ms and the step's GPU
kernel time 155.1 -> 131.6 ms (scripts/profile_step.py); a whole training step 179.2 -> 145.2 ms
in bf16 (+23% tokens/s) and 170.3 -> 141.4 ms in FP8 (+20%) (scripts/bench_train.py). What is
left of `engine.step()` is AdamW (12.7 ms at HBM speed) and ZeRO's own copies: the gradients
flattened, cast to FP32 and the new weights cast back to bf16 (~12 ms).

Scope: DeepSpeedZeroOptimizer without CPU offload or model parallelism, with our AdamW as the
client optimizer and the norm computed (`zero_optimization.compute_grad_norm`, DeepSpeed's
default). Anything else (ZeRO stage 0, whose bf16 wrapper keeps per-tensor masters, or a
DeepSpeed without these methods) keeps DeepSpeed's own code, with one log line saying why.
`parallel.fused_grad_clip=false` keeps it always (the A/B of scripts/bench_train.py).
"""
from __future__ import annotations

import logging
import types

import torch
import torch.distributed as dist

from trainer.optim import AdamW

log = logging.getLogger(__name__)

REPLACED = ("has_overflow", "get_grad_norm_direct", "unscale_and_clip_grads")


def install(engine) -> bool:
    """Swap the three methods on `engine.optimizer`; False (and a log line) where that does not
    apply."""
    reason = _unsupported(engine)
    if reason:
        log.info("gradient norm and clipping left to DeepSpeed: %s", reason)
        return False
    zero = engine.optimizer
    zero.has_overflow = types.MethodType(_overflow_via_norm, zero)
    zero.get_grad_norm_direct = types.MethodType(_grad_norm_without_copies, zero)
    zero.unscale_and_clip_grads = types.MethodType(_clip_in_adamw, zero)
    return True


def installed(engine) -> bool:
    return swapped_in(engine.optimizer, "get_grad_norm_direct", _grad_norm_without_copies)


def swapped_in(obj, name: str, func) -> bool:
    """Whether obj's method `name` is `func`, bound to obj (swapped in by install())."""
    return getattr(getattr(obj, name, None), "__func__", None) is func


def not_zero_optimizer(engine) -> str:
    """Why engine.optimizer is not DeepSpeed's ZeRO-1/2 optimizer; "" when it is."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    if isinstance(engine.optimizer, DeepSpeedZeroOptimizer):
        return ""
    return f"its optimizer wrapper is {type(engine.optimizer).__name__}, not the ZeRO-1/2 optimizer"


def _unsupported(engine) -> str:
    reason = not_zero_optimizer(engine)
    if reason:
        return reason
    zero = engine.optimizer
    if not all(callable(getattr(zero, name, None)) for name in REPLACED):
        return f"this DeepSpeed's ZeRO optimizer lacks one of {REPLACED}"
    if not isinstance(getattr(zero, "optimizer", None), AdamW):
        return "the client optimizer is not trainer.optim.AdamW"
    if getattr(zero, "cpu_offload", False) or getattr(engine, "mpu", None) is not None:
        return "optimizer offload or model parallelism is on"
    if not getattr(zero, "compute_grad_norm", True):
        return ("zero_optimization.compute_grad_norm is off (nothing would catch an inf/NaN "
                "gradient)")
    return ""


def _overflow_via_norm(zero, partition_gradients=True) -> bool:
    """No pass of its own: step() computes the norm next and skips the update if it is not finite
    (it does for bf16 with check_grad_overflow, the default, and for fp32 always)."""
    return False


def _grad_norm_without_copies(zero, gradients, params, norm_type=2):
    """L2 norm of this rank's gradients (DeepSpeed's padding excluded), summed over the
    data-parallel group, as a one-element FP32 tensor; inf/NaN when a gradient holds one."""
    if float(norm_type) != 2.0:
        raise ValueError(f"fused_grad_clip computes L2 norms only, asked for norm_type={norm_type}")
    grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
    if grads:  # DeepSpeed's arithmetic: float64 norms, their squares summed, then FP32
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
        squares = torch.stack(norms).pow(2).sum().float()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=zero.device)
    if dist.is_initialized() and dist.get_world_size(group=zero.dp_process_group) > 1:
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=zero.dp_process_group)
    return squares.pow(0.5)


def _clip_in_adamw(zero, grad_groups_flat, total_norm) -> None:
    """DeepSpeed's factor 1 / (max(1, (norm / loss_scale + 1e-6) / clip) * loss_scale), handed to
    the AdamW step that follows instead of multiplied into the gradients here."""
    loss_scale = zero.loss_scale
    if zero.clip_grad == 0.0 and loss_scale == 1.0:
        return
    combined = torch.full((), loss_scale, dtype=torch.float32, device=zero.device)
    if zero.clip_grad > 0.0:
        norm = torch.as_tensor(total_norm, dtype=torch.float32, device=zero.device)
        norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, float("inf"))
        clip = ((norm / loss_scale) + 1e-6) / zero.clip_grad
        combined = torch.clamp(clip, min=1.0) * loss_scale
    zero.optimizer.scale_next_grads((1.0 / combined).reshape(1))
