"""FP8 Linear: y = x W^T with Fprop, Dgrad and Wgrad all block-scaled FP8 GEMMs (DeepSeek-V3 3.3).

Per call, for x [..., K] (tokens T = prod of the leading dims) and W [N, K]:

    forward   x  -> quantize_dual   : q_x, s_x (1x128, Fprop operand)  and  qt_x, st_x (128x1, Wgrad)
                                      (once per input tensor: see `_quantize_input`)
              y  = gemm_1x128_128x128(q_x, s_x, q_W, s_W)                     [T, N] in x's dtype
              saved for backward: qt_x, st_x only (FP8: 1 byte per element instead of bf16's 2)
    backward  dy -> quantize_dual   : q_dy, s_dy and qt_dy, st_dy
              dx = gemm_1x128_128x128(q_dy, s_dy, qt_W, st_W)                 [T, K] (W^T blocks)
              dW = gemm_1x128_1x128(qt_dy, st_dy^T, qt_x, st_x^T)            [N, K] fp32, K = tokens

When W needs no gradient (frozen weights, inference, no_grad) the forward writes only the
row-wise copy and saves nothing; when x needs none, Dgrad is skipped.

Weights are quantized once per optimizer step, not once per micro-batch: `FP8Linear` keeps both
orientations of its weight (q_W, s_W, qt_W, st_W from one `quantize_128x128(transpose=True)`
pass) and reuses them while the weight is unchanged. "Unchanged" is keyed on the parameter's
autograd version counter and storage pointer, which every in-place update through the parameter
bumps (a torch optimizer's step, `with no_grad(): w.add_()`). Updates that bypass the version
counter - `param.data.copy_(...)`, which is how DeepSpeed writes its bf16/fp32 master copy back -
are invisible to it, so the training loop must call `invalidate_weight_caches(model)` once after
every optimizer step. That call is cheap (it drops references) and is the explicit contract;
it calls `invalidate_fp8_cache()` on every module that has one (the FP8 experts included).

The Wgrad GEMM accumulates in fp32 and writes the parameter's dtype: with fp32 parameters (how
`build_model` creates them) the gradient and its accumulation over micro-batches are fp32; a
bf16 parameter gets its gradient rounded to bf16 by the GEMM's epilogue (autograd requires the
parameter's dtype), with no separate cast pass.

Inputs: x must be bfloat16 or float32 (the GEMM output dtype follows x). Dimensions: K and N
multiples of 128 (`FP8Linear.supports(in, out)`); models/fp8/convert.py leaves other layers in
bf16. On CPU the same code runs the Triton kernels under the interpreter and the fp32 reference
GEMMs (slow; for tests).
"""
from __future__ import annotations

import torch
from torch import nn

from . import quant
from .gemm import OUT_DTYPES, gemm_1x128_128x128, gemm_1x128_1x128
from .reference import BLOCK

INPUT_DTYPES = (torch.bfloat16, torch.float32)


def _quantize_act(t2d: torch.Tensor, pow2_scales: bool, colwise: bool):
    if colwise:
        return quant.quantize_dual(t2d, pow2_scales, check_finite=False)
    q, s = quant.quantize_1x128(t2d, pow2_scales, check_finite=False)
    return q, s, None, None


def _quantize_input(x: torch.Tensor, pow2_scales: bool, colwise: bool):
    """FP8 copies of a Linear's input, made once per input tensor.

    A tensor that feeds several FP8 Linears (MLA's normed x feeds wq_a and wkv_a; an MLP's x
    feeds w1 and w3) carries its copies as an attribute, keyed on its version counter, so the
    second consumer reuses them; they are freed with the tensor.
    """
    key = (x._version, pow2_scales)
    cached = getattr(x, "_fp8_copies", None)
    if cached is not None and cached[0] == key and (cached[1][2] is not None or not colwise):
        return cached[1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    copies = _quantize_act(x2, pow2_scales, colwise)
    x._fp8_copies = (key, copies)
    return copies


class FP8LinearFunction(torch.autograd.Function):
    """apply(x, weight, w_fp8, pow2_scales): w_fp8 = (q_W, s_W, qt_W, st_W) of `weight`."""

    @staticmethod
    def forward(ctx, x, weight, w_fp8, pow2_scales):
        q_w, s_w, qt_w, st_w = w_fp8
        need_wgrad = ctx.needs_input_grad[1]
        q_x, s_x, qt_x, st_x = _quantize_input(x, pow2_scales, colwise=need_wgrad)
        y = gemm_1x128_128x128(q_x, s_x, q_w, s_w, out_dtype=x.dtype)
        if need_wgrad:
            ctx.save_for_backward(qt_x, st_x)
        ctx.w_t = (qt_w, st_w)
        ctx.meta = (x.shape, weight.dtype, pow2_scales)
        return y.view(*x.shape[:-1], q_w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x_shape, w_dtype, pow2_scales = ctx.meta
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        q_dy, s_dy, qt_dy, st_dy = _quantize_act(dy2, pow2_scales, colwise=need_dw)
        dx = dw = None
        if need_dx:
            qt_w, st_w = ctx.w_t
            dx = gemm_1x128_128x128(q_dy, s_dy, qt_w, st_w, out_dtype=dy.dtype).view(x_shape)
        if need_dw:
            qt_x, st_x = ctx.saved_tensors
            out_dtype = w_dtype if w_dtype in OUT_DTYPES else torch.float32
            dw = gemm_1x128_1x128(qt_dy, st_dy.t(), qt_x, st_x.t(), out_dtype=out_dtype).to(w_dtype)
        return dx, dw, None, None


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear(in_features, out_features, bias=False) with all three GEMMs in FP8.

    `weight` is the same [out, in] parameter as nn.Linear's, so state dicts and optimizers are
    unchanged; the FP8 copies of it are a cache, not state (see the module docstring).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 pow2_scales: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if bias:
            raise ValueError("FP8Linear has no bias (the model's projections are bias-free); "
                             "keep a biased layer as nn.Linear")
        if not self.supports(in_features, out_features):
            raise ValueError(f"FP8Linear needs in_features and out_features divisible by 128, got "
                             f"{in_features} -> {out_features}; keep this layer as nn.Linear")
        self.in_features, self.out_features, self.pow2_scales = in_features, out_features, pow2_scales
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self._w_fp8 = None
        self._w_key = None

    @staticmethod
    def supports(in_features: int, out_features: int) -> bool:
        return in_features % BLOCK == 0 and out_features % BLOCK == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2_scales: bool = False) -> "FP8Linear":
        """An FP8Linear sharing `linear.weight` (the very Parameter object, not a copy)."""
        if linear.bias is not None:
            raise ValueError("cannot convert an nn.Linear with a bias to FP8Linear")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.pow2_scales = (linear.in_features,
                                                              linear.out_features, pow2_scales)
        if not cls.supports(new.in_features, new.out_features):
            raise ValueError(f"FP8Linear needs in/out features divisible by 128, got "
                             f"{new.in_features} -> {new.out_features}")
        new.weight = linear.weight
        new._w_fp8, new._w_key = None, None
        return new

    def invalidate_fp8_cache(self) -> None:
        """Drop the cached FP8 weight copies; the next forward re-quantizes."""
        self._w_fp8, self._w_key = None, None

    def fp8_weight(self):
        """(q_W, s_W, qt_W, st_W), re-quantized only when the weight changed since the last call."""
        w = self.weight
        key = (w._version, w.data_ptr(), w.device, w.dtype)
        if self._w_fp8 is None or self._w_key != key:
            with torch.no_grad():
                self._w_fp8 = quant.quantize_128x128(w.detach(), self.pow2_scales, transpose=True,
                                                     check_finite=False)
            self._w_key = key
        return self._w_fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(f"FP8Linear input must be bfloat16 or float32, got {x.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"input on {x.device} but weight on {self.weight.device}")
        return FP8LinearFunction.apply(x, self.weight, self.fp8_weight(), self.pow2_scales)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pow2_scales={self.pow2_scales}")


def invalidate_weight_caches(model: nn.Module) -> int:
    """Drop every cached FP8 weight in `model` (call after each optimizer step). Returns how many."""
    n = 0
    for m in model.modules():
        if callable(getattr(m, "invalidate_fp8_cache", None)):
            m.invalidate_fp8_cache()
            n += 1
    return n
