"""FP8's roundings without FP8 kernels, each switchable: which rounding changes how a model trains?

An FP8 Linear (models/fp8/linear.py) rounds three kinds of GEMM operand to E4M3 with fine-grained
scales (models/fp8/reference.py has the recipe):

    part     operand           Fprop y = x W^T   Dgrad dx = dy W   Wgrad dW = dy^T x
    weights  W                 W, 128x128        W, 128x128
    inputs   the input x       x, 1x128                            x, 128x1 (along tokens)
    grads    the gradient dy                     dy, 1x128         dy, 128x1 (along tokens)

Here each of the three is a switch. A fake-quantized GEMM rounds the operands whose part is on
(quantize, then dequantize to fp32 with the reference's own functions), leaves the others as
they are, and multiplies in fp32; the result is cast back to the operand's dtype as the FP8
kernels' outputs are. With all three on it computes what the FP8 kernels compute, to fp32
summation order (tests/test_fp8_fake_quant.py checks it against FP8Linear, FP8MLP and the grouped
references; the FP8 experts write h and the SwiGLU's output gradient in bf16 whatever the model's
dtype, as the fake does in a bf16 model); with none on, the layer's plain product in fp32.

`fake_convert(model, parts)` puts such layers exactly where `models.fp8.convert` would put FP8
ones (it runs convert's own decisions, then swaps each FP8 module for its fake twin sharing the
same Parameters): FP8Linear -> FakeFP8Linear, FP8MLP -> FakeFP8MLP, FP8GroupedExperts ->
FakeFP8GroupedExperts, each with the same min_tokens (calls below it stay plain). The fused
norms are not made (their numerics are the plain norm's followed by the consumer's own input
rounding, which is here).

The SwiGLU between an MLP's (or the experts') GEMMs follows the FP8 path too: with `inputs`
on, its backward reads h = [gate | up] rounded in 1x128 tiles (the FP8 path saves only h's FP8
copy) and the down projection's Wgrad reads the SwiGLU recomputed from that rounded h, not the
forward's output. What is left: the SwiGLU output and its input gradients pass through bf16
before their FP8 rounding here, where the FP8 kernels round from fp32 (2^-9 under E4M3's 2^-4).

It is slow (fp32 GEMMs, host syncs for the experts' row bounds and the reference's finiteness
checks) and meant for ablations: scripts/bench_fp8_loss.py `--runs off,blockwise,fake:weights`.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from models.layers import swiglu
from models.moe import DispatchTokens, GroupedExperts, grouped_mm

from . import reference
from .config import FP8Config, fewer_tokens
from .convert import convert
from .experts import FP8GroupedExperts
from .linear import FP8Linear, FP8MLP, swiglu_mlp

PARTS = ("weights", "inputs", "grads")
"""The three roundings of the FP8 recipe that can be switched (module docstring)."""

_TILES = {"1x128": (reference.quantize_1x128, reference.dequantize_1x128),
          "128x1": (reference.quantize_128x1, reference.dequantize_128x1),
          "128x128": (reference.quantize_128x128, reference.dequantize_128x128)}


def parse_parts(spec: str) -> frozenset[str]:
    """'weights+grads' -> frozenset({'weights', 'grads'}); 'all' -> all three; 'none' -> none."""
    if spec == "all":
        return frozenset(PARTS)
    if spec == "none":
        return frozenset()
    parts = spec.split("+")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or len(set(parts)) != len(parts):
        raise ValueError(f"fake-quantization parts {spec!r}: join distinct names from {PARTS} "
                         f"with '+' (or say 'all' / 'none'), e.g. 'weights+inputs'")
    return frozenset(parts)


def rounded(t: torch.Tensor, tiles: str, on: bool) -> torch.Tensor:
    """fp32 `t` after an E4M3 round trip in `tiles` tiles if `on`, else just fp32 `t`."""
    if not on:
        return t.float()
    quantize, dequantize = _TILES[tiles]
    return dequantize(*quantize(t))


def _rounded_experts(w_ENK: torch.Tensor, on: bool) -> torch.Tensor:
    """Each expert's [N, K] matrix rounded in its own 128x128 blocks."""
    return torch.stack([rounded(w, "128x128", on) for w in w_ENK]) if on else w_ENK.float()


class FakeFP8MatmulFunction(torch.autograd.Function):
    """apply(x_TK, w_NK, parts, x_wgrad=None) -> y_TN = x w^T with the roundings in `parts`.

    x_wgrad, if given, is what the Wgrad reads in x's place (no gradient flows to it): the SwiGLU
    recomputed from the saved rounded h, for a down projection (module docstring)."""

    @staticmethod
    def forward(ctx, x, w, parts, x_wgrad=None):
        ctx.save_for_backward(x if x_wgrad is None else x_wgrad, w)
        ctx.x_dtype, ctx.parts = x.dtype, parts
        return (rounded(x, "1x128", "inputs" in parts)
                @ rounded(w, "128x128", "weights" in parts).t()).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        parts = ctx.parts
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (rounded(dy, "1x128", "grads" in parts)
                  @ rounded(w, "128x128", "weights" in parts)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dw = (rounded(dy, "128x1", "grads" in parts).t()
                  @ rounded(x, "128x1", "inputs" in parts)).to(w.dtype)
        return dx, dw, None, None


class FakeFP8GroupedMatmulFunction(torch.autograd.Function):
    """apply(x_TK, w_ENK, counts_E, parts, x_wgrad=None) -> y_TN, rows of expert e times w[e]^T,
    with the roundings in `parts`. Rows are sorted by expert, counts_E per expert; the Wgrad
    operands are rounded in 128-row tiles of the sorted rows (a tile may hold two experts' rows),
    as the FP8 experts' dual quantization does. x_wgrad: as FakeFP8MatmulFunction's."""

    @staticmethod
    def forward(ctx, x, w, counts_E, parts, x_wgrad=None):
        ctx.save_for_backward(x if x_wgrad is None else x_wgrad, w, counts_E)
        ctx.x_dtype, ctx.parts = x.dtype, parts
        xr, wr = rounded(x, "1x128", "inputs" in parts), _rounded_experts(w, "weights" in parts)
        y = xr.new_zeros(x.shape[0], w.shape[1])
        for e, (lo, hi) in enumerate(reference._expert_rows(counts_E, x.shape[0])):
            y[lo:hi] = xr[lo:hi] @ wr[e].t()
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, counts_E = ctx.saved_tensors
        parts = ctx.parts
        bounds = reference._expert_rows(counts_E, x.shape[0])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dyr = rounded(dy, "1x128", "grads" in parts)
            wr = _rounded_experts(w, "weights" in parts)
            dx = dyr.new_zeros(x.shape)
            for e, (lo, hi) in enumerate(bounds):
                dx[lo:hi] = dyr[lo:hi] @ wr[e]
            dx = dx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            dyt, xt = rounded(dy, "128x1", "grads" in parts), rounded(x, "128x1", "inputs" in parts)
            dw = torch.stack([dyt[lo:hi].t() @ xt[lo:hi] for lo, hi in bounds]).to(w.dtype)
        return dx, dw, None, None, None


class FakeSwiGLUFunction(torch.autograd.Function):
    """apply(gate, up, gate_saved, up_saved) -> silu(gate) * up, whose backward differentiates at
    (gate_saved, up_saved) (fp32; the rounded h when `inputs` is on) instead of (gate, up)."""

    @staticmethod
    def forward(ctx, gate, up, gate_saved, up_saved):
        ctx.save_for_backward(gate_saved, up_saved)
        ctx.dtypes = gate.dtype, up.dtype
        return (F.silu(gate.float()) * up.float()).to(gate.dtype)

    @staticmethod
    def backward(ctx, da):
        g, u = ctx.saved_tensors
        sig, da = torch.sigmoid(g), da.float()
        dgate = da * u * sig * (1 + g * (1 - sig))
        dup = da * g * sig
        return dgate.to(ctx.dtypes[0]), dup.to(ctx.dtypes[1]), None, None


def fake_swiglu(gate: torch.Tensor, up: torch.Tensor,
                parts: frozenset[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a, a for the down projection's Wgrad or None): the SwiGLU as the FP8 path computes it
    (module docstring) when `inputs` is on, the plain one otherwise."""
    if "inputs" not in parts:
        return swiglu(gate, up), None
    with torch.no_grad():
        g = rounded(gate.reshape(-1, gate.shape[-1]), "1x128", True).view(gate.shape)
        u = rounded(up.reshape(-1, up.shape[-1]), "1x128", True).view(up.shape)
        a_wgrad = F.silu(g) * u
    return FakeSwiGLUFunction.apply(gate, up, g, u), a_wgrad


def _rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with its leading dimensions flattened into rows (None stays None)."""
    return None if t is None else t.reshape(-1, t.shape[-1])


class FakeFP8Linear(nn.Module):
    """A bias-free Linear on a shared `weight` whose three GEMMs round the operands in `parts`;
    calls of fewer than `min_tokens` tokens are the plain F.linear, as FP8Linear's are."""

    def __init__(self, weight: nn.Parameter, parts: frozenset[str], min_tokens: int = 0) -> None:
        super().__init__()
        self.weight, self.parts, self.min_tokens = weight, frozenset(parts), min_tokens
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor, x_wgrad: torch.Tensor | None = None) -> torch.Tensor:
        if fewer_tokens(x, self.min_tokens):
            return F.linear(x, self.weight)
        y = FakeFP8MatmulFunction.apply(_rows(x), self.weight, self.parts, _rows(x_wgrad))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, parts={'+'.join(sorted(self.parts))}"


class FakeFP8MLP(nn.Module):
    """models.layers.MLP's SwiGLU with FakeFP8Linear projections; calls of fewer than `min_tokens`
    tokens run the plain MLP, as FP8MLP's do."""

    def __init__(self, w1: FakeFP8Linear, w3: FakeFP8Linear, w2: FakeFP8Linear,
                 min_tokens: int = 0) -> None:
        super().__init__()
        self.w1, self.w3, self.w2, self.min_tokens = w1, w3, w2, min_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fewer_tokens(x, self.min_tokens):
            return swiglu_mlp(x, self.w1.weight, self.w3.weight, self.w2.weight)
        return self.w2(*fake_swiglu(self.w1(x), self.w3(x), self.w1.parts))


class FakeFP8GroupedExperts(GroupedExperts):
    """models.moe.GroupedExperts on shared w1, w3, w2 whose grouped GEMMs round `parts`; calls of
    fewer than `min_tokens` tokens run the plain grouped GEMMs, as FP8GroupedExperts' do."""

    def __init__(self, experts: GroupedExperts, parts: frozenset[str], min_tokens: int = 0) -> None:
        nn.Module.__init__(self)
        self.w1, self.w3, self.w2 = experts.w1, experts.w3, experts.w2
        self.parts, self.min_tokens = frozenset(parts), min_tokens

    def grouped_mm(self, x_TK, w_ENK, counts_E, x_wgrad=None):
        return FakeFP8GroupedMatmulFunction.apply(x_TK, w_ENK, counts_E, self.parts, x_wgrad)

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if fewer_tokens(x_TD, self.min_tokens):
            return self._plain(x_TD, counts_E)
        a, a_wgrad = fake_swiglu(self.grouped_mm(x_TD, self.w1, counts_E),
                                 self.grouped_mm(x_TD, self.w3, counts_E), self.parts)
        return self.grouped_mm(a, self.w2, counts_E, a_wgrad)

    def forward_tokens(self, x_TD: torch.Tensor, counts_E: torch.Tensor,
                       slot_to_pick: torch.Tensor, pick_to_slot: torch.Tensor,
                       top_k: int) -> torch.Tensor:
        """As FP8GroupedExperts: the threshold counts the tokens before top-k."""
        if fewer_tokens(x_TD, self.min_tokens):
            x_slots = DispatchTokens.apply(x_TD, slot_to_pick, pick_to_slot, top_k)
            return self._plain(x_slots, counts_E)
        return super().forward_tokens(x_TD, counts_E, slot_to_pick, pick_to_slot, top_k)

    def _plain(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return grouped_mm(swiglu(grouped_mm(x_TD, self.w1, counts_E),
                                 grouped_mm(x_TD, self.w3, counts_E)), self.w2, counts_E)

    def extra_repr(self) -> str:
        return f"parts={'+'.join(sorted(self.parts))}, min_tokens={self.min_tokens}"


def fake_convert(model: nn.Module, parts: frozenset[str],
                 fp8_cfg: FP8Config | None = None) -> nn.Module:
    """Fake-quantized layers wherever `models.fp8.convert(model, fp8_cfg)` puts FP8 ones (in
    place; the same Parameter objects). fp8_cfg defaults to the blockwise recipe's defaults;
    power-of-two scales are not emulated."""
    cfg = dataclasses.replace(fp8_cfg or FP8Config(recipe="blockwise"), fuse_norms=False)
    if cfg.pow2_scales:
        raise ValueError("fake_convert rounds with amax / 448 scales only; use pow2_scales=False")
    convert(model, cfg, emulate=True)
    parts = frozenset(parts)

    def twin(module: nn.Module) -> nn.Module | None:
        if isinstance(module, FP8MLP):
            return FakeFP8MLP(*(FakeFP8Linear(l.weight, parts)
                                for l in (module.w1, module.w3, module.w2)), module.min_tokens)
        if isinstance(module, FP8Linear):
            return FakeFP8Linear(module.weight, parts, module.min_tokens)
        if isinstance(module, FP8GroupedExperts):
            return FakeFP8GroupedExperts(module, parts, module.min_tokens)
        return None

    def swap(parent: nn.Module) -> None:
        for attr, child in list(parent.named_children()):
            new = twin(child)
            if new is not None:
                setattr(parent, attr, new)
            else:
                swap(child)

    swap(model)
    return model
