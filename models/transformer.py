"""The full DeepSeek-V3-style model: embedding -> blocks -> final norm -> head, plus MTP.

`forward(tokens, labels=None)` returns logits, or with labels a `LossOutput` whose `loss` is

    lm_loss + mtp_loss_weight · mtp_loss + balance_loss_alpha · aux_loss

where lm_loss is the next-token cross-entropy, mtp_loss the mean of the D MTP depths'
cross-entropies and aux_loss the sequence-wise balance loss summed over every MoE layer (MTP
blocks included). `labels[b, i]` is the target of position i (the token i+1 of the packed
sequence), -100 where it must be ignored; depth k of MTP reads the token at i+k from the labels
and predicts the label k positions further.

The output also carries this forward's per-expert token counts, one row per router in
`routers()` order (main MoE layers, then MTP blocks), which the trainer sums over micro-batches
and ranks for the aux-loss-free bias update.

Decoding (`decode`) runs the absorbed-MLA path over per-layer `LatentCache`s and returns the
logits and the final hidden state, which `mtp_decode` turns into draft tokens.

Shape legend: B batch, S sequence, D model dim, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models import kernels
from models.attention import LatentCache
from models.block import Block
from models.config import ModelConfig
from models.cross_entropy import IGNORE, cross_entropy_sum
from models.layers import RMSNorm, rope_tables
from models.moe import GroupedExperts, MoE, Router, sequence_balance_loss
from models.mtp import MTPModule


@dataclass
class LossOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor
    aux_loss: torch.Tensor
    expert_counts: torch.Tensor
    mtp_losses: list[torch.Tensor] = field(default_factory=list)


class ParamCounts(NamedTuple):
    total: int
    activated: int


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_mtp_modules))
        self.mtp_loss_weight = cfg.mtp_loss_weight
        self.balance_loss_alpha = cfg.balance_loss_alpha

    # Structure -----------------------------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def routers(self) -> list[Router]:
        return [m.router for m in self.moe_layers()]

    def init_weights(self) -> None:
        """DeepSeek-V3 init: every weight matrix N(0, init_std); norms 1; router bias 0."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, Router)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, GroupedExperts):
                for w in (module.w1, module.w2, module.w3):
                    nn.init.normal_(w, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for router in self.routers():
            router.expert_bias.zero_()

    # Training ------------------------------------------------------------------------------
    def forward(self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor | None = None):
        self._check_tokens(tokens_BS, labels_BS)
        cos, sin = rope_tables(self.cfg, tokens_BS.shape[1], tokens_BS.device)
        h_BSD = self.embed(tokens_BS)
        for layer in self.layers:
            h_BSD = layer(h_BSD, cos, sin)
        h_BSD = self.norm(h_BSD)
        logits_BSV = self.head(h_BSD)
        if labels_BS is None:
            self._take_routings()
            return logits_BSV
        lm_loss = cross_entropy(logits_BSV, labels_BS)
        mtp_losses = self._mtp_losses(h_BSD, labels_BS, cos, sin)
        return self._loss_output(lm_loss, mtp_losses, tokens_BS.shape[0])

    def _mtp_losses(self, h_BSD, labels_BS, cos, sin) -> list[torch.Tensor]:
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            next_tokens = shift_left(labels_BS, k - 1, fill=0).clamp_min(0)
            h_BSD = module(h_BSD, self.embed(next_tokens), cos, sin)
            losses.append(cross_entropy(self.head(h_BSD), shift_left(labels_BS, k, IGNORE)))
        return losses

    def _loss_output(self, lm_loss, mtp_losses, batch: int) -> LossOutput:
        routings = self._take_routings()
        zero = lm_loss.new_zeros(())
        mtp_loss = torch.stack(mtp_losses).mean() if mtp_losses else zero
        aux_loss = zero
        if self.balance_loss_alpha > 0 and routings:
            aux_loss = sum(sequence_balance_loss(r, batch, moe.top_k)
                           for moe, r in routings)
        loss = lm_loss + self.mtp_loss_weight * mtp_loss + self.balance_loss_alpha * aux_loss
        counts = (torch.stack([r.counts_E for _, r in routings]) if routings
                  else torch.zeros(0, 0, dtype=torch.long, device=lm_loss.device))
        return LossOutput(loss, lm_loss, mtp_loss, aux_loss, counts, mtp_losses)

    def _take_routings(self):
        """Collect (and release) each MoE layer's routing of the forward that just ran."""
        out = []
        for moe in self.moe_layers():
            if moe.last_routing is not None:
                out.append((moe, moe.last_routing))
                moe.last_routing = None
        return out

    def _check_tokens(self, tokens_BS, labels_BS) -> None:
        if tokens_BS.dim() != 2 or tokens_BS.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor [batch, seq], got "
                             f"{tuple(tokens_BS.shape)} {tokens_BS.dtype}")
        if labels_BS is not None and labels_BS.shape != tokens_BS.shape:
            raise ValueError(f"labels {tuple(labels_BS.shape)} must have the tokens' shape "
                             f"{tuple(tokens_BS.shape)}")

    # Decoding ------------------------------------------------------------------------------
    def new_caches(self, batch: int, max_len: int, dtype=torch.bfloat16,
                   device=None) -> list[LatentCache]:
        """One latent cache per main block, then one per MTP block."""
        n = len(self.layers) + len(self.mtp)
        return [LatentCache.empty(self.cfg, batch, max_len, dtype, device) for _ in range(n)]

    def decode(self, tokens_BS: torch.Tensor, caches: list[LatentCache], start_pos: int):
        """Logits and final (normalized) hidden state of tokens at start_pos..start_pos+S-1."""
        cos, sin = self._rope_slice(start_pos, tokens_BS.shape[1], tokens_BS.device)
        h_BSD = self.embed(tokens_BS)
        for layer, cache in zip(self.layers, caches):
            h_BSD = layer.decode(h_BSD, cos, sin, cache, start_pos)
        self._take_routings()
        h_BSD = self.norm(h_BSD)
        return self.head(h_BSD), h_BSD

    def mtp_step(self, depth: int, h_BSD: torch.Tensor, next_tokens_BS: torch.Tensor):
        """Run MTP module `depth` (1-based) over a whole sequence: (logits, its hidden state)."""
        cos, sin = rope_tables(self.cfg, h_BSD.shape[1], h_BSD.device)
        h_BSD = self._mtp_module(depth)(h_BSD, self.embed(next_tokens_BS), cos, sin)
        self._take_routings()
        return self.head(h_BSD), h_BSD

    def mtp_decode(self, depth: int, h_BSD, next_tokens_BS, caches: list[LatentCache],
                   start_pos: int):
        """`mtp_step` for new positions only, over the MTP block's own latent cache."""
        cos, sin = self._rope_slice(start_pos, h_BSD.shape[1], h_BSD.device)
        cache = caches[len(self.layers) + depth - 1]
        h_BSD = self._mtp_module(depth).decode(h_BSD, self.embed(next_tokens_BS), cos, sin,
                                               cache, start_pos)
        self._take_routings()
        return self.head(h_BSD), h_BSD

    def _mtp_module(self, depth: int) -> MTPModule:
        if not 1 <= depth <= len(self.mtp):
            raise ValueError(f"MTP depth {depth} does not exist; the model has "
                             f"{len(self.mtp)} MTP module(s) (num_mtp_modules)")
        return self.mtp[depth - 1]

    def _rope_slice(self, start: int, length: int, device):
        cos, sin = rope_tables(self.cfg, start + length, device)
        return cos[start:], sin[start:]

    # Accounting ----------------------------------------------------------------------------
    def param_counts(self, include_mtp: bool = False) -> ParamCounts:
        """Total and per-token activated parameters.

        Activated counts what one token multiplies or reads: every dense weight, the shared
        experts, k of the E routed experts, the head, and the one embedding row it looks up (the
        convention of DeepSeek's published counts: V2-Lite's "2.4B activated" is 2.45B this way,
        V3's "37B" is 36.63B). MTP modules are left out by default, as in V3's published 671B.
        """
        modules = [self.embed, self.norm, self.head, *self.layers]
        if include_mtp:
            modules += list(self.mtp)
        total = sum(p.numel() for m in modules for p in m.parameters())
        idle_share = 0.0
        if self.cfg.n_routed_experts:
            idle_share = 1 - self.cfg.num_experts_per_tok / self.cfg.n_routed_experts
        idle = sum(p.numel() * idle_share for m in modules for sub in m.modules()
                   if isinstance(sub, GroupedExperts) for p in sub.parameters())
        unread_embedding = self.embed.weight.numel() - self.cfg.hidden_size
        return ParamCounts(total, round(total - idle - unread_embedding))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), MTP included.

        Matmuls: 6 per activated weight that multiplies the token (embedding lookup excluded).
        Attention core: 2·H·(qk_dim + v_dim) per attended key per layer, with the causal mask
        halving the keys on average, times 3 for training.
        """
        matmul = self.param_counts(include_mtp=True).activated - self.cfg.hidden_size
        matmul += self.head.weight.numel() * len(self.mtp)  # the shared head runs once per depth
        return 6.0 * matmul + self.attention_flops_per_token(seq_len)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """The attention core's share of `flops_per_token` (softmax(QK^T)V, no projections)."""
        cfg = self.cfg
        n_attn = len(self.layers) + len(self.mtp)
        return 3.0 * (2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
                      * (seq_len + 1) / 2 * n_attn)


def cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over labels != -100 (0 when every label is ignored).

    On the GPU one fused kernel each way (models/cross_entropy.py) reads the bf16 logits as they
    are; elsewhere the eager fp32 formula.
    """
    if kernels.fused(logits_BSV, "cross_entropy"):
        losses = cross_entropy_sum(logits_BSV.flatten(0, 1), labels_BS.flatten())
    else:
        losses = F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(),
                                 ignore_index=IGNORE, reduction="sum")
    return losses / (labels_BS != IGNORE).sum().clamp_min(1)


def shift_left(x_BS: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x shifted k positions to the left along the sequence, the tail filled with `fill`."""
    if k == 0:
        return x_BS
    out = torch.full_like(x_BS, fill)
    if k < x_BS.shape[1]:
        out[:, :-k] = x_BS[:, k:]
    return out


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> Transformer:
    """Build and initialize a model (on the meta device: shapes only, for counting).

    Modules are constructed on the meta device and materialized once, so each weight is written
    only by `init_weights` (not first by nn.Linear's own default init).
    """
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(cfg)
    if device.type != "meta":
        model.to_empty(device=device)
        model.init_weights()
    return model
