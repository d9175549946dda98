"""Settings of the FP8 conversion (the `fp8` config group).

`recipe="off"` leaves the model in high precision; `recipe="blockwise"` is DeepSeek-V3's
fine-grained scheme: activations and gradients in 1x128 tiles, weights in 128x128 blocks, E4M3,
FP32 scales and FP32 accumulation. `models.fp8.convert(model, cfg)` consumes these.

The *_min_tokens settings become each FP8 module's own `min_tokens`; `fewer_tokens(x, n)` is the
one test every module applies to a call (below: the module's high-precision ops), kept here so
that linear.py and experts.py (which linear.py imports) share it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

RECIPES = ("off", "blockwise")


@dataclass
class FP8Config:
    recipe: str = "off"
    """'off' (high precision everywhere) or 'blockwise' (DeepSeek-V3 1x128 / 128x128 scaling)."""
    pow2_scales: bool = False
    """Round every scale up to a power of two (DeepSeek's UE8M0), exact under transposition."""
    skip_small: bool = True
    """Keep in bf16 what FP8 measurably slows down on the H100 (models/fp8/convert.py): a Linear
    with a side of at most 1024, and on calls of too few tokens the other Linears, the SwiGLU MLPs
    (`linear_min_tokens`, `mlp_min_tokens`, scaled to each one's size) and the routed experts
    (`experts_min_tokens`); False converts everything the kernels can take, for every call.
    scripts/bench_fp8_calls.py measures where FP8 starts to pay for each module on the machine at
    hand."""
    linear_min_tokens: int = 8192
    """Under skip_small, a converted 4096 x 4096 Linear runs F.linear in high precision on calls
    of fewer tokens than this, and a Linear of in x out weights on calls of fewer than this times
    4096^2 / (in x out): the same GEMM size (0: every call in FP8). Where FP8 starts to pay
    depends on the host's speed as much as on the GPU (convert.py's LINEAR_MIN_TOKENS has the
    H100 figures)."""
    mlp_min_tokens: int = 3072
    """Under skip_small, the same for a SwiGLU MLP of dim x width 4096 x 4096, scaled by 4096^2 /
    (dim x width) for the others (convert.py's MLP_MIN_TOKENS): `small`'s dense MLP (4096 x
    10240) runs FP8 from 1229 tokens a call, its shared experts (4096 x 1536) from 8192."""
    experts_min_tokens: int = 1024
    """Under skip_small, the routed experts run their bf16 grouped GEMMs on calls of fewer tokens
    than this (the tokens entering the MoE layer, before top-k; convert.py's
    EXPERTS_MIN_TOKENS)."""
    keep_bf16: list[str] = field(default_factory=list)
    """Modules kept in high precision whatever else says, by name: glob patterns (fnmatch) over
    the model's module names, e.g. ["layers.0", "mtp.*"] (a block and everything in it) or
    ["*.attn.wo"]; a matched module's children stay too. How Megatron-Core's
    first/last-layers-in-bf16 option and torchao's module filter are used: to find which layers
    an FP8 loss gap comes from, or to keep the first and last blocks bf16. A pattern matching no
    module is an error (a typo would otherwise change nothing)."""
    fuse_norms: bool = True
    """A norm whose output goes into FP8 Linears or MLPs computes their FP8 input copies in its
    own kernel (models.fp8.linear.FP8RMSNorm: the output is not read back to be quantized);
    False keeps the plain norm, and each consumer quantizes its input itself."""

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"fp8.recipe={self.recipe!r} is not a recipe; use one of {RECIPES}")
        for name in ("linear_min_tokens", "mlp_min_tokens", "experts_min_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"fp8.{name}={value!r} must be a token count >= 0 (0: every "
                                 "call in FP8)")

        if isinstance(self.keep_bf16, str) or not all(
                isinstance(p, str) and p for p in self.keep_bf16):
            raise ValueError(f"fp8.keep_bf16={self.keep_bf16!r} must be a list of module-name "
                             "patterns, e.g. fp8.keep_bf16='[layers.0,mtp.*]'")

    @property
    def enabled(self) -> bool:
        return self.recipe != "off"


def fewer_tokens(x, min_tokens: int) -> bool:
    """Whether the tensor x holds fewer than `min_tokens` tokens (the product of its leading
    dimensions): the calls an FP8 module with that `min_tokens` runs in high precision."""
    return x.numel() < min_tokens * x.shape[-1]


def check_min_tokens(min_tokens: int, owner: str) -> None:
    """A module's `min_tokens` argument: a token count >= 0 (0: every call in FP8)."""
    if min_tokens < 0:
        raise ValueError(f"{owner} min_tokens must be >= 0 (0: always FP8), got {min_tokens}")
