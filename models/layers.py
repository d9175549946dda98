"""Small building blocks: RMSNorm, rotary position embedding (with YaRN), the SwiGLU MLP.

Rotary embedding rotates consecutive pairs (x[2i], x[2i+1]) by angle pos·θ_i, as DeepSeek's own
inference code does with complex numbers and as the released checkpoints expect (Hugging Face
calls this `rope_interleave`). With YaRN (rope_scaling_factor s > 1) the low frequencies are
interpolated by s, the high ones left alone, with a linear ramp between the dims that complete
beta_slow and beta_fast rotations over the original context; the cos/sin amplitude is scaled by
mscale(s, mscale)/mscale(s, mscale_all_dim), which is 1 for DeepSeek-V3's settings.

Shape legend: B batch, S sequence, D model dim, F MLP width, R rotary dims.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import kernels
from models.config import ModelConfig, yarn_mscale


class RMSNorm(nn.Module):
    """y = x / rms(x) · weight, computed in fp32 and returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.fused(x, "rms_norm"):
            return kernels.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies θ_i (R/2 of them), YaRN-corrected when rope scaling is configured."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    s = cfg.rope_scaling_factor
    if s <= 1.0:
        return inv_freq.float()
    low, high = _yarn_correction_range(cfg.beta_fast, cfg.beta_slow, dim, base,
                                       cfg.original_max_position_embeddings)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1: high frequency, kept as is; 0: low frequency, interpolated by s
    return (inv_freq / s * (1 - keep) + inv_freq * keep).float()


def _yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                           original_len: int) -> tuple[float, float]:
    def dim_for(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low = math.floor(dim_for(beta_fast))
    high = math.ceil(dim_for(beta_slow))
    return max(low, 0), min(high, dim - 1)


def rope_tables(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [seq_len, R/2] in fp32 for positions 0..seq_len-1."""
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings="
                         f"{cfg.max_position_embeddings}; raise it in the model config")
    inv_freq = rope_frequencies(cfg)
    if device is not None and torch.device(device).type == "cuda":
        # through pinned memory: a copy from pageable memory would wait for all queued GPU work
        # (the previous step's optimizer) at the start of every forward
        inv_freq = inv_freq.pin_memory().to(device, non_blocking=True)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    amplitude = 1.0
    if cfg.rope_scaling_factor > 1.0:
        amplitude = (yarn_mscale(cfg.rope_scaling_factor, cfg.mscale)
                     / yarn_mscale(cfg.rope_scaling_factor, cfg.mscale_all_dim))
    return angles.cos() * amplitude, angles.sin() * amplitude


def apply_rope(x: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of x [..., S, H?, R] by the per-position angles.

    cos/sin are [S, R/2]; x is [B, S, R] or [B, S, H, R] (a head axis after S is broadcast).
    Computed in fp32, returned in x's dtype.
    """
    if kernels.fused(x, "rope"):
        return kernels.rope(x, cos_SR, sin_SR)
    pairs = x.float().unflatten(-1, (-1, 2))
    if x.dim() == 4:
        cos_SR, sin_SR = cos_SR[:, None], sin_SR[:, None]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos_SR - odd * sin_SR, even * sin_SR + odd * cos_SR), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the fused kernel where it runs, torch ops elsewhere."""
    return kernels.swiglu(gate, up) if kernels.fused(gate, "swiglu") else F.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) · w3 x). Used by dense blocks and shared experts."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))
