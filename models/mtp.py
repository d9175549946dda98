"""Multi-token prediction (DeepSeek-V3 §2.2).

Module k (k = 1..D) predicts token i+k+1 from position i. It takes the depth-(k-1) hidden state
h^{k-1}_i (depth 0: the main model's output after its final norm, as vLLM, SGLang and Megatron
feed it) and the embedding of token i+k, normalizes each, concatenates them embedding first (the
order of the released `eh_proj` weights), projects 2d -> d with `eh_proj`, runs one transformer
block, and normalizes with its own final norm; the shared output head turns that into logits.
The embedding and the head are the main model's (shared, not copied).

Training runs every depth over the whole sequence (positions whose target lies past the end are
ignored by the loss); speculative decoding runs one depth at a time as the draft
(`Transformer.mtp_step` / `Transformer.mtp_decode`).
"""
from __future__ import annotations

import torch
from torch import nn

from models.attention import LatentCache
from models.block import Block
from models.config import ModelConfig
from models.layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(cfg, layer_id)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)

    def _merge(self, h_BSD: torch.Tensor, emb_BSD: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat((self.enorm(emb_BSD), self.hnorm(h_BSD)), dim=-1))

    def forward(self, h_BSD, emb_BSD, cos_SR, sin_SR) -> torch.Tensor:
        """Normalized depth-k hidden state, from depth k-1's and the next tokens' embeddings."""
        return self.norm(self.block(self._merge(h_BSD, emb_BSD), cos_SR, sin_SR))

    def decode(self, h_BSD, emb_BSD, cos_SR, sin_SR, cache: LatentCache,
               start_pos: int) -> torch.Tensor:
        return self.norm(self.block.decode(self._merge(h_BSD, emb_BSD), cos_SR, sin_SR, cache,
                                           start_pos))
