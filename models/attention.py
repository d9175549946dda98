"""Multi-head Latent Attention (MLA), DeepSeek-V2/V3.

Keys and values are not projected per head from the hidden state. Instead the hidden state is
compressed to a small latent c (kv_lora_rank dims, RMS-normalized) plus one RoPE key k_pe
(qk_rope_head_dim dims) shared by every head; per-head no-position keys and values are
up-projected from c by `wkv_b`. Queries are optionally compressed the same way (q_lora_rank > 0).
Each head's query/key is [no-position part ; RoPE part] and the softmax scale is
1/sqrt(qk_head_dim), times YaRN's mscale² when rope scaling is on.

Two ways to compute the same attention:

- training (`forward`): materialize per-head K and V from the latent and call PyTorch's
  `scaled_dot_product_attention` with a causal mask (cuDNN or flash attention on GPU, where
  `kernels.mla_qk` assembles the rotated queries and keys in one pass each way);
- decode (`decode`): the "absorbed" form. Only c and k_pe are cached (kv_lora_rank + rope dims
  per token instead of H·(qk + v)), the key up-projection is folded into the query
  (q_latent_h = q_nope_h · W_UK_h) and the value up-projection is applied after attending over
  the latent (o_h = (p · c) · W_UV_hᵀ). This is what the rollout engine runs.

Shape legend: B batch, S new tokens, T cached tokens, D model dim, H heads, C kv_lora_rank,
R rope dims, Q q_lora_rank, N no-position head dim, V value head dim, K = N + R.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import kernels
from models.config import ModelConfig
from models.layers import RMSNorm, apply_rope


@dataclass
class LatentCache:
    """Per-layer decode cache: the normalized latent and the rotated shared key of each token."""

    kv_BTC: torch.Tensor
    pe_BTR: torch.Tensor

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=torch.bfloat16,
              device=None) -> "LatentCache":
        return cls(torch.zeros(batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device))


def _cudnn_attention_usable(q: torch.Tensor) -> bool:
    """True where SDPA can pick cuDNN attention: enabled, cuDNN present, a Hopper GPU."""
    return (torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cudnn.is_available()
            and torch.cuda.get_device_capability(q.device)[0] == 9)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        H, D, K = self.n_heads, cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * K, bias=False)
        else:
            self.wq = nn.Linear(D, H * K, bias=False)
        self.wkv_a = nn.Linear(D, self.kv_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)

    def input_projections(self) -> list[nn.Module]:
        """The projections that read the attention's input x."""
        return [self.wq if hasattr(self, "wq") else self.wq_a, self.wkv_a]

    def norm_consumers(self) -> dict[str, list[nn.Module]]:
        """The modules each of the latent norms feeds (see Block.norm_consumers)."""
        latent = {"kv_norm": [self.wkv_b]}
        return {"q_norm": [self.wq_b], **latent} if hasattr(self, "q_norm") else latent

    def _query_heads(self, x_BSD) -> torch.Tensor:
        """The per-head queries [B, S, H, N+R], rope not yet applied."""
        if hasattr(self, "wq"):
            q = self.wq(x_BSD)
        else:
            q = self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        return q.unflatten(-1, (self.n_heads, -1))

    def _queries(self, x_BSD, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        q_nope_BSHN, q_pe_BSHR = self._query_heads(x_BSD).split([self.nope_dim, self.rope_dim],
                                                                dim=-1)
        return q_nope_BSHN, apply_rope(q_pe_BSHR, cos, sin)

    def _latent_unrotated(self, x_BSD) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalized latent [B, S, C] and the shared rope key [B, S, R], rope not yet
        applied."""
        c_BSC, k_pe_BSR = self.wkv_a(x_BSD).split([self.kv_rank, self.rope_dim], dim=-1)
        return self.kv_norm(c_BSC), k_pe_BSR

    def _latent(self, x_BSD, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        c_BSC, k_pe_BSR = self._latent_unrotated(x_BSD)
        return c_BSC, apply_rope(k_pe_BSR, cos, sin)

    def forward(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor):
        """Causal self-attention over the whole sequence (training and prefill)."""
        q_BSHK = self._query_heads(x_BSD)
        c_BSC, k_pe_BSR = self._latent_unrotated(x_BSD)
        kv_BSHX = self.wkv_b(c_BSC).unflatten(-1, (self.n_heads, -1))
        if kernels.fused(q_BSHK, "mla_qk"):
            q_BSHK, k_BSHK, v_BSHV = kernels.mla_qk(q_BSHK, kv_BSHX, k_pe_BSR, cos_SR, sin_SR,
                                                    self.nope_dim)
        else:
            q_BSHK, k_BSHK, v_BSHV = self._eager_qkv(q_BSHK, kv_BSHX, k_pe_BSR, cos_SR, sin_SR)
        o_BHSV = self._sdpa(q_BSHK.transpose(1, 2), k_BSHK.transpose(1, 2), v_BSHV.transpose(1, 2))
        return self.wo(o_BHSV.transpose(1, 2).flatten(2))

    def _eager_qkv(self, q_BSHK, kv_BSHX, k_pe_BSR, cos_SR, sin_SR):
        """Per-head q = [q_nope ; rope(q_pe)], k = [k_nope ; rope(k_pe) for every head], v: what
        kernels.mla_qk computes in one pass each way, in torch ops."""
        q_nope_BSHN, q_pe_BSHR = q_BSHK.split([self.nope_dim, self.rope_dim], dim=-1)
        k_nope_BSHN, v_BSHV = kv_BSHX.split([self.nope_dim, self.v_dim], dim=-1)
        k_pe_BSHR = apply_rope(k_pe_BSR, cos_SR, sin_SR)[:, :, None].expand(-1, -1, self.n_heads,
                                                                            -1)
        q_BSHK = torch.cat((q_nope_BSHN, apply_rope(q_pe_BSHR, cos_SR, sin_SR)), dim=-1)
        return q_BSHK, torch.cat((k_nope_BSHN, k_pe_BSHR), dim=-1), v_BSHV

    def _sdpa(self, q_BHSK, k_BHSK, v_BHSV):
        K, V = q_BHSK.shape[-1], v_BHSV.shape[-1]
        # cuDNN attention (PyTorch's choice on Hopper) takes a narrower V as it is, and is faster
        # that way; flash attention, the fallback, wants equal head dims: pad V, then drop the pad.
        pad = K - V if (q_BHSK.is_cuda and K > V and not _cudnn_attention_usable(q_BHSK)) else 0
        if pad:
            v_BHSV = F.pad(v_BHSV, (0, pad))
        o = F.scaled_dot_product_attention(q_BHSK, k_BHSK, v_BHSV, is_causal=True,
                                           scale=self.softmax_scale)
        return o[..., :V] if pad else o

    def decode(self, x_BSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor,
               cache: LatentCache, start_pos: int) -> torch.Tensor:
        """Absorbed attention for tokens at positions start_pos..start_pos+S-1.

        Writes their latent into `cache` and attends over every cached token up to each one.
        cos/sin are the tables of those S positions.
        """
        S = x_BSD.shape[1]
        end = start_pos + S
        if end > cache.kv_BTC.shape[1]:
            raise ValueError(f"decode past the cache: positions up to {end} but the cache holds "
                             f"{cache.kv_BTC.shape[1]}; allocate a longer LatentCache")
        q_nope_BSHN, q_pe_BSHR = self._queries(x_BSD, cos_SR, sin_SR)
        c_BSC, k_pe_BSR = self._latent(x_BSD, cos_SR, sin_SR)
        cache.kv_BTC[:, start_pos:end] = c_BSC.to(cache.kv_BTC.dtype)
        cache.pe_BTR[:, start_pos:end] = k_pe_BSR.to(cache.pe_BTR.dtype)
        kv_BTC, pe_BTR = cache.kv_BTC[:, :end], cache.pe_BTR[:, :end]

        w_HXC = self.wkv_b.weight.unflatten(0, (self.n_heads, -1))
        w_uk_HNC, w_uv_HVC = w_HXC.split([self.nope_dim, self.v_dim], dim=1)
        q_lat_BSHC = torch.einsum("bshn,hnc->bshc", q_nope_BSHN.float(), w_uk_HNC.float())
        scores_BSHT = (torch.einsum("bshc,btc->bsht", q_lat_BSHC, kv_BTC.float())
                       + torch.einsum("bshr,btr->bsht", q_pe_BSHR.float(), pe_BTR.float()))
        query_pos = torch.arange(start_pos, end, device=x_BSD.device)[:, None, None]
        key_pos = torch.arange(end, device=x_BSD.device)
        scores_BSHT = (scores_BSHT * self.softmax_scale).masked_fill(key_pos > query_pos,
                                                                     float("-inf"))
        p_BSHT = scores_BSHT.softmax(dim=-1)
        o_lat_BSHC = torch.einsum("bsht,btc->bshc", p_BSHT, kv_BTC.float())
        o_BSHV = torch.einsum("bshc,hvc->bshv", o_lat_BSHC, w_uv_HVC.float())
        return self.wo(o_BSHV.to(x_BSD.dtype).flatten(2))
