"""AdamW with moments in a chosen dtype, the learning-rate schedules, and the parameter groups.

DeepSeek-V3 keeps AdamW's two moments in BF16 while the master weights stay FP32 (tech report
section 3.3.3): the moments are smooth running averages that lose nothing important at 8 mantissa
bits, and halving them frees 4 bytes per parameter. `AdamW` below does exactly the update of
`torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, same operation order, so with
`moment_dtype=float32` it matches torch bit for bit); with `moment_dtype=bfloat16` each moment is
read into FP32, updated, used for this step's update, and stored back rounded to BF16. Large tensors are updated in chunks so those FP32 working copies stay
small whatever the parameter size.

The master weights are whatever tensors the optimizer is handed. Under DeepSpeed with bf16 the
engine keeps an FP32 copy of every parameter (ZeRO's flat FP32 partitions) and gives those to the
client optimizer, so the update always happens in FP32; on the CPU the model itself is FP32.

Schedules map the optimizer step (0-based) to a factor of the peak learning rate:
`cosine` (linear warmup, then cosine down to `min_lr_ratio`) and `wsd` (warmup, stable, then a
linear decay over the last `decay_fraction` of the steps). They are callables with plain fields so
`torch.optim.lr_scheduler.LambdaLR` can save and restore them with a checkpoint.

Parameter groups: matrices (embedding, projections, experts) get weight decay, vectors (norm
weights) do not. The router's correction bias is a buffer, never a parameter; a model that makes
it one is refused here because the optimizer would then move it by gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

MOMENT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
UPDATE_CHUNK = 1 << 26
"""Elements updated at a time: ZeRO hands the optimizer one flat partition per group (1.9B elements
for `small`), and BF16 moments need FP32 working copies, which chunking keeps to ~1 GiB."""
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


class AdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with the two moments stored in `moment_dtype`."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 moment_dtype: torch.dtype = torch.bfloat16):
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas) or weight_decay < 0:
            raise ValueError(f"AdamW got lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}: "
                             "need lr >= 0, 0 <= beta < 1, eps > 0, weight_decay >= 0")
        if moment_dtype not in MOMENT_DTYPES.values():
            raise ValueError(f"moment_dtype={moment_dtype} is not supported; use torch.bfloat16 or torch.float32")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts loaded moments to the parameter's dtype; put them back in moment_dtype (lossless)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.dtype != torch.float32:
            raise TypeError(f"AdamW updates FP32 master weights, got a {p.dtype} parameter of shape "
                            f"{tuple(p.shape)}; let the engine keep FP32 masters (bf16 mode) or keep the model FP32")
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
        state["step"] += 1
        tensors = (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
        if all(t.is_contiguous() for t in tensors):
            chunks = zip(*(t.view(-1).split(UPDATE_CHUNK) for t in tensors))
        else:
            chunks = [tensors]
        for p_c, grad_c, exp_avg_c, exp_avg_sq_c in chunks:
            self._update_chunk(p_c, grad_c, exp_avg_c, exp_avg_sq_c, group, state["step"])

    def _update_chunk(self, p, grad, exp_avg_stored, exp_avg_sq_stored, group: dict, step: int) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        grad = grad.float()
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
