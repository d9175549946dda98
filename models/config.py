"""Every hyperparameter of a DeepSeek-V3-style model, in one dataclass, with named sizes.

Field names follow the Hugging Face DeepSeek-V3 `config.json` where one exists (so `models/hf.py`
maps almost one to one); the few that differ are documented on the field. A configuration is
checked for consistency when it is built: each inconsistent field raises `ValueError` naming the
field and the fix.

Named sizes (`model_config(name, **overrides)`):

- `debug`: CPU-sized (dim 128, 4 layers of which 1 dense, 8 routed experts top-2 in 2 groups,
  1 shared expert, one MTP module): forward+backward in well under a second on a laptop core.
- `small`: ~1.9B parameters (1.5B without the MTP module), hidden 4096, 16 routed experts of
  width 1536, every GEMM dimension a multiple of 128: the FP8 and throughput benchmark model,
  trainable with its optimizer state on one 80 GB H100.
- `16b`: the Moonlight-16B-A3B / DeepSeek-V2-Lite shape (64 routed + 2 shared experts, top-6).
- `671b`: the published DeepSeek-V3 configuration (build it on the meta device to count).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    """Vocabulary size of the embedding and the output head."""
    hidden_size: int = 128
    """Model width d: the residual stream."""
    num_hidden_layers: int = 4
    """Transformer blocks of the main model (MTP blocks not included)."""
    first_k_dense: int = 1
    """The first k blocks use a dense SwiGLU MLP, the rest MoE (HF: first_k_dense_replace)."""
    intermediate_size: int = 384
    """Width of the dense MLP of the first_k_dense blocks."""
    num_attention_heads: int = 4
    """Attention heads n_h."""
    q_lora_rank: int = 64
    """Rank of the query compression; 0 projects queries directly from the hidden state."""
    kv_lora_rank: int = 64
    """Rank d_c of the compressed key/value latent (what the decode cache stores per token)."""
    qk_nope_head_dim: int = 32
    """Per-head query/key dims that carry no position (the part absorbed at decode time)."""
    qk_rope_head_dim: int = 16
    """Per-head query dims with RoPE; the key's RoPE part is one vector shared by all heads."""
    v_head_dim: int = 32
    """Per-head value dims."""
    n_routed_experts: int = 8
    """Routed experts per MoE layer."""
    n_shared_experts: int = 1
    """Shared experts per MoE layer, run as one MLP of width n_shared * moe_intermediate_size."""
    num_experts_per_tok: int = 2
    """Routed experts chosen per token (top-k)."""
    moe_intermediate_size: int = 64
    """Width of each routed and shared expert."""
    n_group: int = 2
    """Expert groups for group-limited routing (1 disables the limit)."""
    topk_group: int = 1
    """Groups kept per token, ranked by the sum of each group's top-2 biased scores."""
    routed_scaling_factor: float = 1.0
    """Gate weights (normalized to sum to 1) are multiplied by this."""
    balance_loss_alpha: float = 1e-4
    """Weight alpha of the sequence-wise balance loss (DeepSeek-V3 eqs. 17-20); 0 disables it."""
    num_mtp_modules: int = 1
    """Multi-token-prediction depth D (HF: num_nextn_predict_layers); 0 disables MTP."""
    mtp_loss_weight: float = 0.3
    """Weight lambda of the mean MTP cross-entropy in the total loss."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary tables cover."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling_factor: float = 1.0
    """YaRN context-extension factor s; 1.0 means no rope scaling."""
    original_max_position_embeddings: int = 4096
    """Context length the model was pretrained at (YaRN's reference length)."""
    beta_fast: float = 32.0
    """YaRN: rotations above which a frequency is left unscaled."""
    beta_slow: float = 1.0
    """YaRN: rotations below which a frequency is fully interpolated."""
    mscale: float = 1.0
    """YaRN mscale of the rotary amplitude."""
    mscale_all_dim: float = 1.0
    """YaRN mscale of the softmax temperature (squared into the softmax scale)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    init_std: float = 0.006
    """Standard deviation of the normal init of every weight matrix (DeepSeek-V3)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings"):
            _require(getattr(self, name) > 0, name, "must be positive")
        for name in ("first_k_dense", "q_lora_rank", "n_shared_experts", "num_mtp_modules"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 f"is {self.qk_rope_head_dim}; RoPE rotates pairs, use an even number")
        _require(self.first_k_dense <= self.num_hidden_layers, "first_k_dense",
                 f"is {self.first_k_dense} > num_hidden_layers={self.num_hidden_layers}; lower it")
        _require(self.rope_scaling_factor >= 1.0, "rope_scaling_factor",
                 "must be >= 1.0 (1.0 disables YaRN)")
        _require(self.n_routed_experts >= 0, "n_routed_experts", "must be >= 0 (0: a dense model)")
        if self.has_moe:
            self._check_routing()

    def _check_routing(self) -> None:
        E, G = self.n_routed_experts, self.n_group
        _require(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
        _require(G > 0 and E % G == 0, "n_group",
                 f"={G} must divide n_routed_experts={E}; pick a divisor of {E}")
        _require(1 <= self.topk_group <= G, "topk_group",
                 f"={self.topk_group} must be between 1 and n_group={G}")
        per_group = E // G
        _require(G == 1 or per_group >= 2, "n_group",
                 f"={G} leaves {per_group} expert per group; groups are ranked by their top-2 "
                 "scores, so use at most n_routed_experts/2 groups")
        reachable = self.topk_group * per_group
        _require(1 <= self.num_experts_per_tok <= reachable, "num_experts_per_tok",
                 f"={self.num_experts_per_tok} but the {self.topk_group} kept groups hold only "
                 f"{reachable} experts; lower it or raise topk_group")

    # Derived sizes -----------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        """Whether any block (main or MTP) is an MoE block."""
        return self.n_routed_experts > 0 and (
            self.num_hidden_layers > self.first_k_dense or self.num_mtp_modules > 0)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Blocks 0..first_k_dense-1 are dense; later ones (MTP blocks, numbered after the main
        ones, included) are MoE unless the model has no routed experts."""
        return self.n_routed_experts > 0 and layer_id >= self.first_k_dense

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(s, mscale_all_dim)^2 when YaRN is on."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_scaling_factor > 1.0:
            m = yarn_mscale(self.rope_scaling_factor, self.mscale_all_dim)
            scale *= m * m
        return scale


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN's attention-temperature correction 0.1·m·ln(s) + 1 (1 without scaling)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1.0 else 1.0


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field} {message}")


NAMED_SIZES: dict[str, dict] = {
    "debug": dict(),
    "small": dict(
        vocab_size=32768, hidden_size=4096, num_hidden_layers=4, first_k_dense=1,
        intermediate_size=10240, num_attention_heads=32, q_lora_rank=1024, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=128, v_head_dim=128, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=1536, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, num_mtp_modules=1, mtp_loss_weight=0.3,
        max_position_embeddings=4096,
    ),
    "16b": dict(
        vocab_size=163840, hidden_size=2048, num_hidden_layers=27, first_k_dense=1,
        intermediate_size=11264, num_attention_heads=16, q_lora_rank=0, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408, n_group=1,
        topk_group=1, routed_scaling_factor=2.446, num_mtp_modules=0,
        max_position_embeddings=8192, rope_theta=50000.0,
    ),
    "671b": dict(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, first_k_dense=3,
        intermediate_size=18432, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, num_mtp_modules=1, mtp_loss_weight=0.3,
        max_position_embeddings=163840, rope_scaling_factor=40.0,
        original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
        mscale_all_dim=1.0,
    ),
}


def model_config(name: str = "debug", **overrides) -> ModelConfig:
    """A named size with field overrides; an unknown size or field is a ValueError."""
    if name not in NAMED_SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(NAMED_SIZES)}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {unknown}; valid fields: {sorted(fields)}")
    return ModelConfig(**{**NAMED_SIZES[name], **overrides})
