"""FP8 Linear (and the SwiGLU MLP built from three of them): y = x W^T with Fprop, Dgrad and Wgrad
all block-scaled FP8 GEMMs (DeepSeek-V3 3.3).

Per call, for x [..., K] (tokens T = prod of the leading dims) and W [N, K]:

    forward   x  -> quantize_dual   : q_x, s_x (1x128, Fprop operand)  and  qt_x, st_x (128x1, Wgrad)
                                      (once per input tensor: see `_quantize_input`)
              y  = gemm_1x128_128x128(q_x, s_x, q_W, s_W)                     [T, N] in x's dtype
              saved for backward: qt_x, st_x (FP8: 1 byte per element instead of bf16's 2)
              and the weight's transposed copy qt_W, st_W (the cache's own tensors, no new bytes)
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
are invisible to it, so the training loop must call `invalidate_weight_caches(model)` between
the step's last forward and the next one. That call is cheap (it drops references) and is the
explicit contract; it calls `invalidate_fp8_cache()` on every module that has one (the FP8
experts included). Where it is called decides the memory: backward reads only the transposed
copy, which autograd holds as a saved tensor and frees once the layer's backward has run, so
`trainer.engine.train_step` drops the caches right after the step's last forward. Then the
forward copies die at once and the transposed ones layer by layer during backward, and none is
alive at the end of backward and through the optimizer step (kept there, the `small` model's
copies are 2.7 GiB, as much as the FP8 run's peak exceeded bf16's on the H200).

The Wgrad GEMM accumulates in fp32 and writes the parameter's dtype: with fp32 parameters (how
`build_model` creates them) the gradient and its accumulation over micro-batches are fp32; a
bf16 parameter gets its gradient rounded to bf16 by the GEMM's epilogue (autograd requires the
parameter's dtype), with no separate cast pass.

`FP8MLP` replaces models.layers.MLP: gate and up in one GEMM, the SwiGLU output computed and
quantized in one kernel (`swiglu_quantize`) and its backward fused with the quantization of its
gradient (`swiglu_backward_quantize`, shared with the FP8 experts), so neither the down
projection's input nor the SwiGLU gradients ever exist in high precision. Its `min_tokens`
(0 unless convert.py sets it) sends calls with fewer tokens than that through the plain
high-precision SwiGLU instead, the same ops as models.layers.MLP on the same parameters: a narrow
MLP's FP8 GEMMs repay the quantization passes only from several thousand tokens a call. An
FP8Linear's `min_tokens` does the same with nn.Linear's F.linear: below several thousand tokens
a call (fewer, the larger the Linear: convert.scaled_min_tokens) even a wide Linear's FP8 GEMMs
save less GPU time than its quantizers and host path cost.

`FP8RMSNorm` replaces a models.layers.RMSNorm whose output goes straight into FP8 Linears or
MLPs: one kernel (quant.rmsnorm_quantize) reads x once and writes y for the high-precision
readers and y's FP8 copies for the FP8 ones. How the copies reach their consumers is the same
contract that lets two Linears share one input's copies: they hang on the tensor (or on the
tensor it is a same-rows view of) as `_fp8_copies`, keyed on its version counter, and a
consumer's `_quantize_input` uses them instead of quantizing (the norm's copies carry a use
count, so the last consumer drops them).

Host cost: a forward + backward issues two quantizer launches and three cuBLAS calls through
Python and autograd, about 0.35-0.65 ms of host time on the project's H100 hosts against 0.1-0.25
ms for nn.Linear, so a call whose kernels take less than that is bound by the host: at 8192
tokens, 4096 -> 1024, the FP8 layer keeps the GPU busy 274 us against bf16's 282 but its wall
time was 0.40x-0.89x bf16's on H100 hosts running the same code (bench_fp8's "GPU busy" rows),
which is one reason convert keeps such layers bf16. Where it goes (twenty-third session, one
host, 2048 tokens, 503 us a forward + backward; perf_counter around each piece): each
quantize_dual 88 us (its four output allocations 26, the Triton launch 41 of which 10 classify
the arguments), each torch._scaled_mm 40 us plus 14 in gemm.py, autograd's engine about 85 us
around the backward and the Function's apply about 35 around the forward. No one piece is large:
a much smaller figure needs fewer Python-level calls (a C++ autograd Function, a cuBLASLt binding
with its algorithm cached), not trimming. Backward on autograd's worker thread added 80-250 us a
layer more; the trainer runs it on its own thread (trainer.engine.ParallelConfig.threaded_backward).
Hosts differ by more than that (twenty-sixth session, host time to issue a forward + backward,
30 back-to-back calls): at 8192 tokens, 4096 -> 1024, 640 us on one H100 host against bf16's 155,
390 us on an H200 host; the SwiGLU MLP at 4096 tokens, D 4096, F 1536, 800 us there against
bf16's 550 (its GPU busy time 547 us). Under the torch profiler each of the MLP's six
torch._scaled_mm took 62 us of CPU time, about 30% of it in the transposes torch makes inside it
(~6.5 aten::t a call); this project's own GEMM kernel through ctypes takes 30 us a call against
_scaled_mm's 40 (models/fp8/gemm.py). Even 30 us saved on each of the three GEMMs would leave
that Linear's host time (390-640 us) above its GPU time (264 us).

Inputs: x must be bfloat16 or float32 (the GEMM output dtype follows x). Dimensions: K and N
multiples of 128 (`FP8Linear.supports(in, out)`); models/fp8/convert.py leaves other layers in
bf16. On CPU the same code runs the Triton kernels under the interpreter and the fp32 reference
GEMMs (slow; for tests).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import kernels
from models.layers import RMSNorm, swiglu

from . import quant
from .config import check_min_tokens, fewer_tokens
from .experts import swiglu_backward_quantize
from .gemm import OUT_DTYPES, gemm_1x128_128x128, gemm_1x128_1x128
from .reference import BLOCK

INPUT_DTYPES = (torch.bfloat16, torch.float32)


def _quantize_act(t2d: torch.Tensor, pow2_scales: bool, colwise: bool):
    if colwise:
        return quant.quantize_dual(t2d, pow2_scales, check_finite=False)
    q, s = quant.quantize_1x128(t2d, pow2_scales, check_finite=False)
    return q, s, None, None


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


@dataclass
class _InputCopies:
    """FP8 copies (q, s, qt, st) of a tensor, held as its `_fp8_copies` attribute."""

    key: tuple  # (the tensor's version counter when they were made, pow2_scales)
    copies: tuple
    uses_left: int | None  # consumers still to read them; None: kept while the tensor lives


def _copies_owner(x: torch.Tensor) -> torch.Tensor:
    """The tensor whose attribute holds x's copies: the tensor x is a reshaped view of when
    both are the same row-major [T, K] rows (MoE's x.flatten(0, 1) of a norm's output), else x."""
    base = x._base
    if (base is not None and base.shape[-1] == x.shape[-1] and base.numel() == x.numel()
            and base.data_ptr() == x.data_ptr() and base.is_contiguous() and x.is_contiguous()):
        return base
    return x


def attach_input_copies(x: torch.Tensor, copies: tuple, pow2_scales: bool, uses: int) -> None:
    """Give x FP8 copies made elsewhere (FP8RMSNorm's kernel), for its next `uses` FP8 consumers;
    the last one drops them from x (each consumer keeps what its backward needs)."""
    owner = _copies_owner(x)
    owner._fp8_copies = _InputCopies((owner._version, pow2_scales), copies, uses)


def drop_input_copies(x: torch.Tensor) -> None:
    """Forget the FP8 copies x carries, so that the next FP8 consumer quantizes it again.

    A benchmark that feeds the same tensor to a layer step after step needs this to time what a
    training step pays: there every micro-batch brings fresh activations, while an unchanged x
    would keep its copies from the first call (they are keyed on its version counter) and skip
    its quantization in every later one."""
    _copies_owner(x).__dict__.pop("_fp8_copies", None)


def _quantize_input(x: torch.Tensor, pow2_scales: bool, colwise: bool):
    """FP8 copies of a Linear's input, made once per input tensor.

    A tensor that feeds several FP8 Linears (MLA's normed x feeds wq_a and wkv_a; an MLP's x
    feeds w1 and w3) carries its copies as an attribute, keyed on its version counter, so the
    second consumer reuses them; they are freed with the tensor. A norm that made its output's
    copies in its own kernel (FP8RMSNorm) attaches them the same way before any consumer runs.
    """
    owner = _copies_owner(x)
    key = (owner._version, pow2_scales)
    cached = getattr(owner, "_fp8_copies", None)
    if cached is not None and cached.key == key and (cached.copies[2] is not None or not colwise):
        if cached.uses_left is not None:
            cached.uses_left -= 1
            if cached.uses_left <= 0:
                del owner._fp8_copies
        return cached.copies
    copies = _quantize_act(_rows(x), pow2_scales, colwise)
    owner._fp8_copies = _InputCopies(key, copies, None)
    return copies


def _fprop(q_x, s_x, w_fp8, out_dtype):
    """x W^T from x's 1x128 copy and W's 128x128 blocks."""
    return gemm_1x128_128x128(q_x, s_x, w_fp8[0], w_fp8[1], out_dtype=out_dtype, check=False)


def _dgrad_copy(w_fp8):
    """The part of a weight's FP8 copies that backward reads: the transposed blocks (qt_W, st_W).

    Saved with save_for_backward, never kept as a ctx attribute: autograd frees saved tensors as
    soon as the node's backward has run, so once the training loop drops the module caches
    (`invalidate_weight_caches`, before the step's last backward) each layer's copy dies with its
    backward instead of living through the optimizer step."""
    return w_fp8[2], w_fp8[3]


def _dgrad(q_dy, s_dy, qt_w, st_w, out_dtype):
    """dy W from dy's 1x128 copy and the transposed weight blocks."""
    return gemm_1x128_128x128(q_dy, s_dy, qt_w, st_w, out_dtype=out_dtype, check=False)


def _wgrad(qt_dy, st_dy, qt_x, st_x, w_dtype):
    """dy^T x over tokens from both 128x1 copies, written in the parameter's dtype."""
    out_dtype = w_dtype if w_dtype in OUT_DTYPES else torch.float32
    return gemm_1x128_1x128(qt_dy, st_dy.t(), qt_x, st_x.t(), out_dtype=out_dtype,
                            check=False).to(w_dtype)


class FP8LinearFunction(torch.autograd.Function):
    """apply(x, weight, w_fp8, pow2_scales, grad_enabled): w_fp8 = (q_W, s_W, qt_W, st_W) of `weight`.

    grad_enabled is torch.is_grad_enabled() at the call site (inside forward it is always False,
    and needs_input_grad ignores it): without it no_grad calls would write backward-only copies.
    """

    @staticmethod
    def forward(ctx, x, weight, w_fp8, pow2_scales, grad_enabled):
        need_wgrad = ctx.needs_input_grad[1] and grad_enabled
        q_x, s_x, qt_x, st_x = _quantize_input(x, pow2_scales, colwise=need_wgrad)
        y = _fprop(q_x, s_x, w_fp8, x.dtype)
        ctx.save_for_backward(*_dgrad_copy(w_fp8), qt_x, st_x)
        ctx.meta = (x.shape, weight.dtype, pow2_scales)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x_shape, w_dtype, pow2_scales = ctx.meta
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        qt_w, st_w, qt_x, st_x = ctx.saved_tensors
        q_dy, s_dy, qt_dy, st_dy = _quantize_act(_rows(dy), pow2_scales, colwise=need_dw)
        dx = _dgrad(q_dy, s_dy, qt_w, st_w, dy.dtype).view(x_shape) if need_dx else None
        dw = _wgrad(qt_dy, st_dy, qt_x, st_x, w_dtype) if need_dw else None
        return dx, dw, None, None, None


class FP8Linear(nn.Module):
    """Drop-in for nn.Linear(in_features, out_features, bias=False) with all three GEMMs in FP8.

    `weight` is the same [out, in] parameter as nn.Linear's, so state dicts and optimizers are
    unchanged; the FP8 copies of it are a cache, not state (see the module docstring).

    A call with fewer than `min_tokens` tokens (the product of x's leading dimensions) is
    nn.Linear's own F.linear on the same weight, with no FP8 copy made (FP8MLP's rule; convert.py
    sets it); 0, the default, sends every call through FP8.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 pow2_scales: bool = False, device=None, dtype=None, min_tokens: int = 0) -> None:
        super().__init__()
        check_min_tokens(min_tokens, "FP8Linear")
        if bias:
            raise ValueError("FP8Linear has no bias (the model's projections are bias-free); "
                             "keep a biased layer as nn.Linear")
        if not self.supports(in_features, out_features):
            raise ValueError(f"FP8Linear needs in_features and out_features divisible by 128, got "
                             f"{in_features} -> {out_features}; keep this layer as nn.Linear")
        self.in_features, self.out_features, self.pow2_scales = in_features, out_features, pow2_scales
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.min_tokens = min_tokens
        self._w_fp8 = None
        self._w_key = None

    @staticmethod
    def supports(in_features: int, out_features: int) -> bool:
        return in_features % BLOCK == 0 and out_features % BLOCK == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, pow2_scales: bool = False,
                    min_tokens: int = 0) -> "FP8Linear":
        """An FP8Linear sharing `linear.weight` (the very Parameter object, not a copy)."""
        if linear.bias is not None:
            raise ValueError("cannot convert an nn.Linear with a bias to FP8Linear")
        check_min_tokens(min_tokens, "FP8Linear")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.pow2_scales = (linear.in_features,
                                                              linear.out_features, pow2_scales)
        if not cls.supports(new.in_features, new.out_features):
            raise ValueError(f"FP8Linear needs in/out features divisible by 128, got "
                             f"{new.in_features} -> {new.out_features}")
        new.weight = linear.weight
        new.min_tokens = min_tokens
        new._w_fp8, new._w_key = None, None
        return new

    def invalidate_fp8_cache(self) -> None:
        """Drop the cached FP8 weight copies; the next forward re-quantizes."""
        self._w_fp8, self._w_key = None, None

    def cached_fp8_tensors(self) -> tuple:
        """The tensors the cache holds now (none made here)."""
        return self._w_fp8 or ()

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

    def check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear expects input [..., {self.in_features}], got {tuple(x.shape)}")
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(f"FP8Linear input must be bfloat16 or float32, got {x.dtype}")
        if x.device != self.weight.device:
            raise ValueError(f"input on {x.device} but weight on {self.weight.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if fewer_tokens(x, self.min_tokens):
            return F.linear(x, self.weight)
        return FP8LinearFunction.apply(x, self.weight, self.fp8_weight(), self.pow2_scales,
                                       torch.is_grad_enabled())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pow2_scales={self.pow2_scales}"
                + (f", min_tokens={self.min_tokens}" if self.min_tokens else ""))


class FP8MLPFunction(torch.autograd.Function):
    """apply(x, w1, w3, w2, w13_fp8, w2_fp8, pow2_scales, grad_enabled) = w2(silu(w1 x) * w3 x).

    The dense twin of models/fp8/experts.py's FP8ExpertsFunction (same SwiGLU kernels, cuBLAS
    dense GEMMs instead of grouped ones), DeepSeek-V3 3.3.3's recipe:

        forward   h  = x [w1; w3]^T                  one GEMM for gate | up, [T, 2F]
                  a  = swiglu_quantize(gate, up)     1x128 FP8 only: a never exists in bf16;
                                                     h's own 1x128 copy from the same read
                  y  = a w2^T
                  saved: x's 128x1 copy, h's 1x128 copy (FP8; the SwiGLU is recomputed)
        backward da = dy w2
                  swiglu_backward_quantize(h8, da)   dh = [dgate | dup] in both FP8 orientations
                                                     and a's 128x1 copy, in one pass
                  dx = dh [w1; w3],  dw2 = dy^T a,  [dw1; dw3] = dh^T x
    """

    @staticmethod
    def forward(ctx, x, w1, w3, w2, w13_fp8, w2_fp8, pow2_scales, grad_enabled):
        training = grad_enabled and any(ctx.needs_input_grad[:4])
        need_w13 = training and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        q_x, s_x, qt_x, st_x = _quantize_input(x, pow2_scales, colwise=need_w13)
        h = _fprop(q_x, s_x, w13_fp8, x.dtype)
        F = h.shape[1] // 2
        q_a, s_a, *h8 = quant.swiglu_quantize(h[:, :F], h[:, F:], pow2_scales, colwise=False,
                                              check_finite=False, input_copy=training)
        y = _fprop(q_a, s_a, w2_fp8, x.dtype)
        if training:
            q_h, s_h = h8
            ctx.save_for_backward(q_h, s_h, qt_x, st_x, *_dgrad_copy(w13_fp8), *_dgrad_copy(w2_fp8))
            ctx.meta = (x.shape, (w1.dtype, w3.dtype, w2.dtype), pow2_scales)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x_shape, (t1, t3, t2), pow2 = ctx.meta
        need_dx, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]
        q_h, s_h, qt_x, st_x, qt_w13, st_w13, qt_w2, st_w2 = ctx.saved_tensors
        q_dy, s_dy, qt_dy, st_dy = _quantize_act(_rows(dy), pow2, colwise=need_w2)
        da = _dgrad(q_dy, s_dy, qt_w2, st_w2, dy.dtype)
        (q_dh, s_dh, qt_dh, st_dh), (qt_a, st_a) = swiglu_backward_quantize(q_h, s_h, da, pow2)
        dx = _dgrad(q_dh, s_dh, qt_w13, st_w13, dy.dtype).view(x_shape) if need_dx else None
        dw2 = _wgrad(qt_dy, st_dy, qt_a, st_a, t2) if need_w2 else None
        dw1 = dw3 = None
        if need_w1 or need_w3:
            dw13 = _wgrad(qt_dh, st_dh, qt_x, st_x, t1)
            F = dw13.shape[0] // 2
            dw1, dw3 = dw13[:F], dw13[F:].to(t3)
        return dx, dw1, dw3, dw2, None, None, None, None


def swiglu_mlp(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
               w2: torch.Tensor) -> torch.Tensor:
    """models.layers.MLP's forward on bare weights, in high precision: w2(silu(w1 x) * w3 x)."""
    return F.linear(swiglu(F.linear(x, w1), F.linear(x, w3)), w2)


class FP8MLP(nn.Module):
    """Drop-in for models.layers.MLP (SwiGLU: w2(silu(w1 x) * w3 x)) with FP8 GEMMs and the
    SwiGLU fused with its quantization both ways; see FP8MLPFunction. Children w1, w3, w2 are
    FP8Linear sharing the MLP's parameters (same state-dict keys); the gate and up weights are
    quantized together, [w1; w3], into a cache of this module, keyed like FP8Linear's.

    A call with fewer than `min_tokens` tokens (the product of x's leading dimensions) runs the
    high-precision SwiGLU of models.layers.MLP instead, with the same parameters and no FP8 copy
    made; 0, the default, sends every call through FP8."""

    def __init__(self, w1: FP8Linear, w3: FP8Linear, w2: FP8Linear, min_tokens: int = 0) -> None:
        super().__init__()
        check_min_tokens(min_tokens, "FP8MLP")
        if w1.out_features != w3.out_features or w2.in_features != w1.out_features \
                or w1.in_features != w3.in_features:
            raise ValueError(f"inconsistent SwiGLU shapes: w1 {w1.in_features}->{w1.out_features}, "
                             f"w3 {w3.in_features}->{w3.out_features}, w2 {w2.in_features}->{w2.out_features}")
        self.w1, self.w3, self.w2 = w1, w3, w2
        self.min_tokens = min_tokens
        self._w13_fp8, self._w13_key = None, None

    @staticmethod
    def supports(mlp: nn.Module) -> bool:
        return all(l.bias is None and FP8Linear.supports(l.in_features, l.out_features)
                   for l in (mlp.w1, mlp.w3, mlp.w2))

    @classmethod
    def from_mlp(cls, mlp: nn.Module, pow2_scales: bool = False, min_tokens: int = 0) -> "FP8MLP":
        """FP8 version of an MLP with nn.Linear w1, w3, w2, sharing their parameters."""
        return cls(*(FP8Linear.from_linear(l, pow2_scales) for l in (mlp.w1, mlp.w3, mlp.w2)),
                   min_tokens=min_tokens)

    def invalidate_fp8_cache(self) -> None:
        self._w13_fp8, self._w13_key = None, None

    def cached_fp8_tensors(self) -> tuple:
        """The tensors the [w1; w3] cache holds now (w2's is its child FP8Linear's)."""
        return self._w13_fp8 or ()

    def w13_fp8(self):
        """Both orientations of [w1; w3] (2F x D), re-quantized only when w1 or w3 changed."""
        w1, w3 = self.w1.weight, self.w3.weight
        key = tuple((w._version, w.data_ptr(), w.device, w.dtype) for w in (w1, w3))
        if self._w13_fp8 is None or self._w13_key != key:
            with torch.no_grad():
                self._w13_fp8 = quant.quantize_128x128((w1.detach(), w3.detach()),
                                                       self.w1.pow2_scales, transpose=True,
                                                       check_finite=False)
            self._w13_key = key
        return self._w13_fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.w1.check_input(x)
        if fewer_tokens(x, self.min_tokens):
            return self.high_precision_forward(x)
        return FP8MLPFunction.apply(x, self.w1.weight, self.w3.weight, self.w2.weight,
                                    self.w13_fp8(), self.w2.fp8_weight(), self.w1.pow2_scales,
                                    torch.is_grad_enabled())

    def high_precision_forward(self, x: torch.Tensor) -> torch.Tensor:
        """models.layers.MLP's forward on these parameters (the path below `min_tokens`)."""
        return swiglu_mlp(x, self.w1.weight, self.w3.weight, self.w2.weight)

    def extra_repr(self) -> str:
        return f"min_tokens={self.min_tokens}" if self.min_tokens else ""


class RMSNormQuantFunction(torch.autograd.Function):
    """apply(x_MK, weight, eps, pow2_scales, colwise) -> (y_MK, q, s, qt, st).

    Forward is one kernel, quant.rmsnorm_quantize with a high-precision output: x is read once
    and y = x * rstd * weight (fp32) is written in high precision (the plain norm's dtype: x's
    and weight's promoted) for the consumers that read it so, and as the 1x128 [and 128x1] FP8
    copies the FP8 consumers read. The copies are outputs without a gradient. Backward is
    models.layers.RMSNorm's (models.kernels' kernel), from x and the rstd this forward computed.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, pow2_scales, colwise):
        y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        *copies, rstd = quant.rmsnorm_quantize(x, weight, eps, pow2_scales, colwise,
                                               check_finite=False, hp_out=y)
        ctx.save_for_backward(x, weight, rstd)
        copies = tuple(copies) if colwise else (*copies, None, None)
        ctx.mark_non_differentiable(*(c for c in copies if c is not None))
        return (y, *copies)

    @staticmethod
    def backward(ctx, dy, *_):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = kernels.rms_norm_backward(x, weight, rstd, dy.contiguous())
        return dx, dw, None, None, None


class FP8RMSNorm(RMSNorm):
    """models.layers.RMSNorm in front of FP8 consumers (models/fp8/convert.py puts it where a
    norm's output goes straight into FP8Linear or FP8MLP inputs): the same `weight` parameter and
    output, computed by the fused RMSNorm -> FP8 kernel, which also writes the output's FP8
    copies and attaches them to it, so the consumers skip their own quantization of it and the
    norm's output is never read back to be quantized (DeepSeek-V3 3.3's "RMSNorm -> quant").

    `consumers`: how many FP8 modules read the output (the last one frees the copies from it).
    `min_tokens`: calls with fewer tokens run the plain norm (the consumers' own threshold, so
    no copy is made that no consumer reads). The output is y rounded once from fp32, where the
    plain bf16 norm rounds x * rstd to bf16 before scaling by the weight: the two may differ by
    an ulp.
    """

    def __init__(self, dim: int, eps: float = 1e-6, pow2_scales: bool = False,
                 consumers: int = 1, min_tokens: int = 0) -> None:
        super().__init__(dim, eps)
        if consumers < 1 or min_tokens < 0:
            raise ValueError(f"FP8RMSNorm needs consumers >= 1 and min_tokens >= 0, got "
                             f"{consumers} and {min_tokens}")
        self.pow2_scales, self.consumers, self.min_tokens = pow2_scales, consumers, min_tokens

    @classmethod
    def from_norm(cls, norm: RMSNorm, pow2_scales: bool = False, consumers: int = 1,
                  min_tokens: int = 0) -> "FP8RMSNorm":
        """An FP8RMSNorm sharing `norm.weight` (the very Parameter object)."""
        new = cls(1, norm.eps, pow2_scales, consumers, min_tokens)
        new.weight = norm.weight
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype not in INPUT_DTYPES or x.shape[-1] != self.weight.numel()
                or fewer_tokens(x, max(self.min_tokens, 1))):
            return super().forward(x)
        y, *copies = RMSNormQuantFunction.apply(_rows(x), self.weight, self.eps, self.pow2_scales,
                                                torch.is_grad_enabled())
        attach_input_copies(y, tuple(copies), self.pow2_scales, self.consumers)
        return y.view(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.weight.numel()}, eps={self.eps}, pow2_scales={self.pow2_scales}, "
                f"consumers={self.consumers}" + (f", min_tokens={self.min_tokens}"
                                                 if self.min_tokens else ""))


def cached_weight_copies(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the FP8 weight caches in `model` hold now (benchmarks tell them apart from
    activations in what autograd saves)."""
    return [t for m in model.modules() if callable(getattr(m, "cached_fp8_tensors", None))
            for t in m.cached_fp8_tensors() if torch.is_tensor(t)]


def invalidate_weight_caches(model: nn.Module) -> int:
    """Drop every cached FP8 weight in `model` (call after each optimizer step). Returns how many."""
    n = 0
    for m in model.modules():
        if callable(getattr(m, "invalidate_fp8_cache", None)):
            m.invalidate_fp8_cache()
            n += 1
    return n
