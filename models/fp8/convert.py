"""`convert(model, fp8_cfg)`: the one place FP8 enters a model (torchtitan's converter pattern).

The model is written once, in high precision. With `fp8_cfg.recipe == "blockwise"` this swaps,
in place and sharing the very Parameter objects (optimizers, state dicts and checkpoints do not
notice):

    models.layers.MLP (dense MLPs, shared experts)  -> FP8MLP (SwiGLU fused with its quantization)
    every other nn.Linear except the output head   -> FP8Linear
        (MLA projections wq_a, wq_b / wq, wkv_a, wkv_b, wo; MTP eh_proj and the MTP blocks')
    models.moe.GroupedExperts                       -> models.fp8.experts.FP8GroupedExperts

and keeps in high precision what DeepSeek-V3 keeps there (section 3.3.1): the embedding, the
output head, the router (a models.moe.Router, not an nn.Linear), the norms and the attention core
(softmax(QK^T)V and the absorbed decode math). A module whose dimensions the FP8 kernels cannot
take (a dimension not divisible by 128, a bias) stays as it is, with one log line saying why; an
MLP with such a projection is converted Linear by Linear instead.

Hardware: the blockwise recipe needs an sm90 GPU (cuBLAS blockwise GEMMs); without one `convert`
raises. `emulate=True` skips that check for tests: the converted model then runs the Triton
kernels under the interpreter and the fp32 reference GEMMs on CPU (slow, exact in semantics).
"""
from __future__ import annotations

import logging

from torch import nn

from models.layers import MLP
from models.moe import GroupedExperts

from .config import FP8Config
from .experts import FP8GroupedExperts
from .gemm import has_blockwise_kernels
from .linear import FP8Linear, FP8MLP

log = logging.getLogger(__name__)


def convert(model: nn.Module, fp8_cfg: FP8Config, emulate: bool = False) -> nn.Module:
    """Swap eligible modules of `model` for FP8 ones (in place) and return it. See the module doc."""
    if not isinstance(fp8_cfg, FP8Config):
        raise TypeError(f"fp8_cfg must be a models.fp8.config.FP8Config, got {type(fp8_cfg).__name__}")
    if not fp8_cfg.enabled:
        return model
    if not emulate and not has_blockwise_kernels():
        raise RuntimeError(f"fp8.recipe={fp8_cfg.recipe} needs an sm90 (Hopper) GPU for its "
                           "block-scaled GEMMs and none is visible; use fp8=off on this machine")
    _convert_children(model, "", {id(m) for m in _high_precision(model)}, fp8_cfg.pow2_scales)
    return model


def _convert_children(parent: nn.Module, prefix: str, keep: set, pow2_scales: bool) -> None:
    """Replace convertible children of `parent`; recurse into the others."""
    for attr, child in list(parent.named_children()):
        name = f"{prefix}{attr}"
        new = None if id(child) in keep else _fp8_version(name, child, pow2_scales)
        if new is not None:
            setattr(parent, attr, new)
        elif id(child) not in keep:
            _convert_children(child, name + ".", keep, pow2_scales)


def _high_precision(model: nn.Module) -> list[nn.Module]:
    """Modules that stay in high precision even where the kernels could take them."""
    head = getattr(model, "head", None)
    return [head] if isinstance(head, nn.Module) else []


def _fp8_version(name: str, module: nn.Module, pow2_scales: bool) -> nn.Module | None:
    if type(module) is MLP and FP8MLP.supports(module):
        return FP8MLP.from_mlp(module, pow2_scales)
    if type(module) is nn.Linear:
        if module.bias is not None:
            log.info("fp8: keeping %s in high precision: it has a bias", name)
            return None
        if not FP8Linear.supports(module.in_features, module.out_features):
            log.info("fp8: keeping %s in high precision: %d -> %d is not a multiple of 128",
                     name, module.in_features, module.out_features)
            return None
        return FP8Linear.from_linear(module, pow2_scales)
    if type(module) is GroupedExperts:
        n_experts, inter_dim, dim = module.w1.shape
        if not FP8GroupedExperts.supports(dim, inter_dim):
            log.info("fp8: keeping %s in high precision: dim %d / expert width %d is not a "
                     "multiple of 128", name, dim, inter_dim)
            return None
        return FP8GroupedExperts.from_grouped(module, pow2_scales)
    return None
