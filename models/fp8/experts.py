"""FP8 routed experts: the SwiGLU experts of models.moe.GroupedExperts with every GEMM in FP8.

For tokens sorted by expert, x_TD with counts_E rows per expert, and per-expert weights
w1 (gate) and w3 (up) [E, F, D], w2 (down) [E, D, F]:

    forward   x   -> quantize_dual     q_x 1x128 (Fprop operand), qt_x 128x1 (saved for Wgrad)
              h   = grouped_gemm(q_x, w13)              [T, 2F]   gate | up, one GEMM for both
              a   = swiglu_quantize(gate, up)           1x128, silu(gate) * up never stored in bf16
              y   = grouped_gemm(q_a, w2)               [T, D]    in x's dtype
              saved: qt_x (FP8), h as FP8 1x128 tiles (DeepSeek-V3 3.3.3 caches the SwiGLU input
              in FP8 and recomputes its output in backward), counts_E
    backward  dy  -> quantize_dual     q_dy (Dgrad operand), qt_dy (Wgrad operand)
              da  = grouped_gemm(q_dy, w2^T)            [T, F]
              a, dh = SwiGLU and its derivative, recomputed from the FP8 copy of h
              dw2 = grouped_wgrad(qt_dy, qt_a)          [E, D, F] fp32
              dx  = grouped_gemm(q_dh, w13^T)           [T, D]
              dw13= grouped_wgrad(qt_dh, qt_x)          [E, 2F, D] fp32 -> dw1, dw3

Every GEMM is a grouped kernel of models/fp8/grouped.py driven by counts_E on the GPU, so the
layer never synchronizes with the host. Weight gradients come out of the Wgrad kernel in fp32
(accumulated over all of an expert's tokens in fp32); with fp32 parameters autograd accumulates
micro-batches in fp32 too.

Weights are quantized once per optimizer step: `FP8GroupedExperts` keeps w13 = [w1; w3] and w2
in both orientations (Fprop and Dgrad operands from one `quantize_128x128(transpose=True)` pass
each) and reuses them while the parameters are unchanged, keyed on their version counters and
storage. Writes that bypass the version counter (`param.data.copy_`, as DeepSpeed does) are
invisible to that key: the training loop calls `models.fp8.linear.invalidate_weight_caches(model)`
after every optimizer step, which reaches `invalidate_fp8_cache()` here.

Shape legend: T tokens (sorted by expert), D model dim, F expert width, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.moe import GroupedExperts

from . import quant
from .grouped import grouped_gemm, grouped_wgrad
from .reference import BLOCK

INPUT_DTYPES = (torch.bfloat16, torch.float32)


@dataclass
class ExpertWeightsFP8:
    """Both orientations of the quantized expert weights (128x128 blocks)."""

    w13_q: torch.Tensor   # [E, 2F, D] e4m3: Fprop of gate|up
    w13_s: torch.Tensor   # [E, 2F/128, D/128]
    w13t_q: torch.Tensor  # [E, D, 2F]: Dgrad of gate|up
    w13t_s: torch.Tensor  # [E, D/128, 2F/128]
    w2_q: torch.Tensor    # [E, D, F]: Fprop of down
    w2_s: torch.Tensor
    w2t_q: torch.Tensor   # [E, F, D]: Dgrad of down
    w2t_s: torch.Tensor

    @classmethod
    def quantize(cls, w1_EFD, w3_EFD, w2_EDF, pow2_scales: bool) -> "ExpertWeightsFP8":
        with torch.no_grad():
            w13 = quant.quantize_128x128(torch.cat([w1_EFD, w3_EFD], dim=1), pow2_scales,
                                         transpose=True, check_finite=False)
            w2 = quant.quantize_128x128(w2_EDF, pow2_scales, transpose=True, check_finite=False)
        return cls(*w13, *w2)


def _token_major(qt_KMp: torch.Tensor, rows: int) -> torch.Tensor:
    """quantize_dual's transposed copy [K, Mp] as the logical [T, K] token-major Wgrad operand."""
    return qt_KMp[:, :rows].t()


def _dequantize_rows(q_TK: torch.Tensor, s_TKb: torch.Tensor) -> torch.Tensor:
    T, K = q_TK.shape
    return (q_TK.float().view(T, K // BLOCK, BLOCK) * s_TKb[:, :, None]).view(T, K)


def _swiglu_backward(h_T2F: torch.Tensor, da_TF: torch.Tensor):
    """(a = silu(g) * u, dh = [dg | du]) in fp32 from h = [g | u] and da = dL/da."""
    g, u = h_T2F.chunk(2, dim=1)
    sig = torch.sigmoid(g)
    silu = g * sig
    da = da_TF.float()
    dg = da * u * sig * (1 + g * (1 - sig))
    return silu * u, torch.cat([dg, da * silu], dim=1)


class FP8ExpertsFunction(torch.autograd.Function):
    """apply(x_TD, counts_E, w1, w3, w2, weights_fp8, pow2_scales) -> y_TD."""

    @staticmethod
    def forward(ctx, x_TD, counts_E, w1, w3, w2, wq: ExpertWeightsFP8, pow2_scales: bool):
        need_wgrad = any(ctx.needs_input_grad[2:5])
        T, n_inter = x_TD.shape[0], w1.shape[1]
        if need_wgrad:
            q_x, s_x, qt_x, st_x = quant.quantize_dual(x_TD, pow2_scales, check_finite=False)
        else:
            q_x, s_x = quant.quantize_1x128(x_TD, pow2_scales, check_finite=False)
            qt_x, st_x = None, None
        h_T2F = grouped_gemm(q_x, s_x, wq.w13_q, wq.w13_s, counts_E, out_dtype=torch.bfloat16)
        q_a, s_a = quant.swiglu_quantize(h_T2F[:, :n_inter], h_T2F[:, n_inter:], pow2_scales,
                                         colwise=False, check_finite=False)
        y_TD = grouped_gemm(q_a, s_a, wq.w2_q, wq.w2_s, counts_E, out_dtype=x_TD.dtype)
        q_h, s_h = quant.quantize_1x128(h_T2F, pow2_scales, check_finite=False)
        ctx.save_for_backward(counts_E, q_h, s_h, qt_x, st_x)
        ctx.wq, ctx.pow2_scales, ctx.rows = wq, pow2_scales, T
        ctx.dtypes = (x_TD.dtype, w1.dtype, w3.dtype, w2.dtype)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        counts_E, q_h, s_h, qt_x, st_x = ctx.saved_tensors
        wq, pow2, T = ctx.wq, ctx.pow2_scales, ctx.rows
        x_dtype, w1_dtype, w3_dtype, w2_dtype = ctx.dtypes
        need_dx, need_wgrad = ctx.needs_input_grad[0], any(ctx.needs_input_grad[2:5])
        if need_wgrad:
            q_dy, s_dy, qt_dy, st_dy = quant.quantize_dual(dy_TD.contiguous(), pow2,
                                                           check_finite=False)
        else:
            q_dy, s_dy = quant.quantize_1x128(dy_TD.contiguous(), pow2, check_finite=False)
        da_TF = grouped_gemm(q_dy, s_dy, wq.w2t_q, wq.w2t_s, counts_E, out_dtype=torch.float32)
        a_TF, dh_T2F = _swiglu_backward(_dequantize_rows(q_h, s_h), da_TF)
        q_dh, s_dh, qt_dh, st_dh = quant.quantize_dual(dh_T2F, pow2, check_finite=False)
        dx = dw1 = dw3 = dw2 = None
        if need_dx:
            dx = grouped_gemm(q_dh, s_dh, wq.w13t_q, wq.w13t_s, counts_E, out_dtype=x_dtype)
        if need_wgrad:
            _, _, qt_a, st_a = quant.quantize_dual(a_TF, pow2, check_finite=False)
            dw2 = grouped_wgrad(_token_major(qt_dy, T), st_dy, _token_major(qt_a, T), st_a,
                                counts_E).to(w2_dtype)
            dw13 = grouped_wgrad(_token_major(qt_dh, T), st_dh, _token_major(qt_x, T), st_x,
                                 counts_E)
            dw1, dw3 = dw13.chunk(2, dim=1)
            dw1, dw3 = dw1.to(w1_dtype), dw3.to(w3_dtype)
        return dx, None, dw1, dw3, dw2, None, None


class FP8GroupedExperts(GroupedExperts):
    """Drop-in for models.moe.GroupedExperts (same parameters w1, w3, w2) with FP8 GEMMs.

    forward(x_TD, counts_E) -> y_TD on tokens sorted by expert. The FP8 weight copies are a
    cache, not state: state dicts and optimizers see exactly GroupedExperts' parameters.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, pow2_scales: bool = False):
        if not self.supports(dim, inter_dim):
            raise ValueError(f"FP8GroupedExperts needs dim and inter_dim divisible by {BLOCK}, "
                             f"got {dim} and {inter_dim}; keep these experts as GroupedExperts")
        super().__init__(n_experts, dim, inter_dim)
        self.pow2_scales = pow2_scales
        self._fp8, self._fp8_key = None, None

    @staticmethod
    def supports(dim: int, inter_dim: int) -> bool:
        return dim % BLOCK == 0 and inter_dim % BLOCK == 0

    @classmethod
    def from_grouped(cls, experts: GroupedExperts, pow2_scales: bool = False) -> "FP8GroupedExperts":
        """FP8 experts sharing `experts`' Parameter objects (no copy: optimizers keep working)."""
        n_experts, inter_dim, dim = experts.w1.shape
        if not cls.supports(dim, inter_dim):
            raise ValueError(f"FP8GroupedExperts needs dim and inter_dim divisible by {BLOCK}, "
                             f"got {dim} and {inter_dim}; keep these experts as GroupedExperts")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.w1, new.w3, new.w2 = experts.w1, experts.w3, experts.w2
        new.pow2_scales = pow2_scales
        new._fp8, new._fp8_key = None, None
        return new

    def invalidate_fp8_cache(self) -> None:
        """Drop the cached FP8 weights; the next forward re-quantizes."""
        self._fp8, self._fp8_key = None, None

    def fp8_weights(self) -> ExpertWeightsFP8:
        """Both orientations of w13 and w2, re-quantized only when a weight changed."""
        key = tuple((w._version, w.data_ptr(), w.dtype) for w in (self.w1, self.w3, self.w2))
        if self._fp8 is None or self._fp8_key != key:
            self._fp8 = ExpertWeightsFP8.quantize(self.w1.detach(), self.w3.detach(),
                                                  self.w2.detach(), self.pow2_scales)
            self._fp8_key = key
        return self._fp8

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        dim = self.w1.shape[2]
        if x_TD.dim() != 2 or x_TD.shape[1] != dim:
            raise ValueError(f"FP8GroupedExperts expects x_TD [tokens, {dim}], got "
                             f"{tuple(x_TD.shape)}")
        if x_TD.dtype not in INPUT_DTYPES:
            raise TypeError(f"FP8GroupedExperts input must be bfloat16 or float32, got {x_TD.dtype}")
        if not x_TD.is_contiguous():
            x_TD = x_TD.contiguous()
        return FP8ExpertsFunction.apply(x_TD, counts_E, self.w1, self.w3, self.w2,
                                        self.fp8_weights(), self.pow2_scales)

    def extra_repr(self) -> str:
        E, F_, D = self.w1.shape
        return f"experts={E}, dim={D}, inter_dim={F_}, pow2_scales={self.pow2_scales}"
