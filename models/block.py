"""One pre-norm transformer block: x + MLA(norm(x)), then x + FFN(norm(x)).

The FFN is a dense SwiGLU MLP in the first `first_k_dense` blocks and DeepSeekMoE after them
(MTP blocks, numbered after the main ones, are MoE too, as in DeepSeek-V3).
"""
from __future__ import annotations

import torch
from torch import nn

from models.attention import MLA, LatentCache
from models.config import ModelConfig
from models.layers import MLP, RMSNorm
from models.moe import MoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = (MoE(cfg) if cfg.is_moe_layer(layer_id)
                    else MLP(cfg.hidden_size, cfg.intermediate_size))

    def norm_consumers(self) -> dict[str, list[nn.Module]]:
        """The modules each of this block's norms feeds its output to as their input (FP8
        conversion fuses a norm with its FP8 consumers' input quantization). In a MoE block
        the router and the routed experts read the norm's output too, but not as a Linear's
        input: only the shared experts are listed."""
        ffn = self.ffn.shared if isinstance(self.ffn, MoE) else self.ffn
        return {"attn_norm": self.attn.input_projections(),
                "ffn_norm": [] if ffn is None else [ffn]}

    def forward(self, x_BSD: torch.Tensor, cos_SR, sin_SR) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SR, sin_SR)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))

    def decode(self, x_BSD: torch.Tensor, cos_SR, sin_SR, cache: LatentCache,
               start_pos: int) -> torch.Tensor:
        x_BSD = x_BSD + self.attn.decode(self.attn_norm(x_BSD), cos_SR, sin_SR, cache, start_pos)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))
