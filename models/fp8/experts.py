"""FP8 routed experts: the SwiGLU experts of models.moe.GroupedExperts with every GEMM in FP8.

For tokens sorted by expert, x_TD with counts_E rows per expert, and per-expert weights
w1 (gate) and w3 (up) [E, F, D], w2 (down) [E, D, F]:

    forward   x   -> quantize_dual     q_x 1x128 (Fprop operand), qt_x 128x1 (saved for Wgrad);
                                       from MoE (forward_tokens) x's rows are read through the
                                       dispatch index, so the sorted bf16 copy is never made
              h   = grouped_gemm(q_x, w13)              [T, 2F]   gate | up, one GEMM for both
              a   = swiglu_quantize(gate, up)           1x128, silu(gate) * up never stored in bf16;
                                                        with h's own 1x128 copy from the same read
              y   = grouped_gemm(q_a, w2)               [T, D]    in x's dtype
              saved: qt_x (FP8), h as FP8 1x128 tiles (DeepSeek-V3 3.3.3 caches the SwiGLU input
              in FP8 and recomputes its output in backward), counts_E
    backward  dy  -> quantize_dual     q_dy (Dgrad operand), qt_dy (Wgrad operand)
              da  = grouped_gemm(q_dy, w2^T)            [T, F] bf16
              swiglu_backward_quantize(h8, da): one pass from the FP8 copy of h to q_dh, qt_dh
                    (dh = [dgate | dup], both copies) and qt_a (a = silu(gate) * up recomputed,
                    128x1 copy): neither dh nor a ever exists in bf16
              dw2 = grouped_wgrad(qt_dy, qt_a)          [E, D, F] fp32
              dx  = grouped_gemm(q_dh, w13^T)           [T, D]  (summed per token after a dispatch)
              dw1 = grouped_wgrad(qt_dgate, qt_x), dw3 = grouped_wgrad(qt_dup, qt_x)
                                                        [E, F, D] fp32 each, written in place

Every GEMM is a grouped kernel of models/fp8/grouped.py driven by counts_E on the GPU, so the
layer never synchronizes with the host. Weight gradients are accumulated over all of an expert's
tokens in fp32 inside the Wgrad kernel, which writes the parameter's dtype (bf16 parameters: one
rounding at the end); with fp32 parameters autograd accumulates micro-batches in fp32 too.

Weights are quantized once per optimizer step: `FP8GroupedExperts` keeps w13 = [w1; w3] and w2
in both orientations (Fprop and Dgrad operands, each weight read once by
`quantize_128x128(transpose=True)`, which writes gate and up into their rows of w13 directly)
and reuses them while the parameters are unchanged, keyed on their version counters and
storage. Writes that bypass the version counter (`param.data.copy_`, as DeepSpeed does) are
invisible to that key: the training loop calls `models.fp8.linear.invalidate_weight_caches(model)`
after each step's last forward, which reaches `invalidate_fp8_cache()` here. Backward holds only
the transposed copies, as saved tensors, so they are freed as soon as this layer's backward has
run (models/fp8/linear.py).

Shape legend: T tokens (sorted by expert), D model dim, F expert width, E experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from models.moe import DispatchTokens, GroupedExperts, undispatch

from . import quant, swiglu_cuda
from .config import check_min_tokens, fewer_tokens
from .grouped import grouped_gemm, grouped_wgrad
from .quant import _INTERPRET, store_colwise_compact, store_rowwise_compact  # quant.py's steps
from .reference import BLOCK, E4M3, ceil_div

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
        with torch.no_grad():  # gate and up written straight into their rows of w13
            w13 = quant.quantize_128x128((w1_EFD, w3_EFD), pow2_scales, transpose=True,
                                         check_finite=False)
            w2 = quant.quantize_128x128(w2_EDF, pow2_scales, transpose=True, check_finite=False)
        return cls(*w13, *w2)


def _wgrad_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """What the Wgrad kernel writes for a parameter of this dtype: bf16 parameters get their
    gradient rounded once from the fp32 accumulator, without an fp32 copy; others get fp32."""
    return torch.bfloat16 if param_dtype == torch.bfloat16 else torch.float32


def _token_major(qt_KMp: torch.Tensor, rows: int) -> torch.Tensor:
    """quantize_dual's transposed copy [K, Mp] as the logical [T, K] token-major Wgrad operand."""
    return qt_KMp[:, :rows].t()


@triton.jit
def _swiglu_grad(qh_ptr, sh_ptr, da_ptr, rm, cols, col_block, M, F, stride_shm, stride_shk,
                 stride_dam, WHICH: tl.constexpr):
    """One of SwiGLU's backward quantities on rows rm and the 128 columns `cols` of one F block,
    in fp32 from the dequantized h: WHICH 0 dgate, 1 dup, 2 a = silu(gate) * up (recomputed for
    the down projection's Wgrad). Only that quantity's inputs are read."""
    ok = (rm < M)[:, None]
    rows = rm.to(tl.int64)[:, None]
    s_g = tl.load(sh_ptr + rm * stride_shm + col_block * stride_shk, mask=rm < M, other=0.0)
    g = tl.load(qh_ptr + rows * (2 * F) + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    g = g * s_g[:, None]
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    u = g
    da = g
    if WHICH != 1:
        s_u = tl.load(sh_ptr + rm * stride_shm + (F // 128 + col_block) * stride_shk, mask=rm < M,
                      other=0.0)
        u = tl.load(qh_ptr + rows * (2 * F) + F + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        u = u * s_u[:, None]
    if WHICH != 2:
        da = tl.load(da_ptr + rows * stride_dam + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if WHICH == 0:
        out = da * u * sig * (1.0 + g * (1.0 - sig))
    elif WHICH == 1:
        out = da * silu
    else:
        out = silu * u
    return out


@triton.jit
def _store_dual(x, q_ptr, s_ptr, qt_ptr, st_ptr, rm, row_block, M, Mp, K, group,
                POW2: tl.constexpr, EXACT: tl.constexpr):
    """x [128 rows, 128 cols], the 1x128 group `group` of each row of an [M, K] tensor: both
    of its FP8 copies (quantize_dual's layout)."""
    cols = group * 128 + tl.arange(0, 128)
    store_rowwise_compact(x, q_ptr, s_ptr, rm, cols, group, M, K, POW2, EXACT, "")
    store_colwise_compact(x, qt_ptr, st_ptr, rm, cols, row_block, Mp, K, POW2, EXACT, "")


@triton.jit
def swiglu_backward_kernel(qh_ptr, sh_ptr, da_ptr, qdh_ptr, sdh_ptr, qtdh_ptr, stdh_ptr,
                           qta_ptr, sta_ptr, M, F, Mp, stride_shm, stride_shk, stride_dam,
                           POW2: tl.constexpr, EXACT: tl.constexpr):
    # A program makes one 128 x 128 tile of one output: dgate or dup (both copies: each of the
    # tile's rows is one 1x128 group, each column one 128x1 group) or a (128x1 only), in one pass
    # from its inputs, like quant.py's dual quantizer. Program -> (row block, F block, output),
    # the output fastest: the three programs of a block read the same tiles of h and da, and the
    # second and third find them in L2.
    pid = tl.program_id(0)
    blocks = F // 128
    which = pid % 3
    col_block = (pid // 3) % blocks
    row_block = pid // (3 * blocks)
    rm = row_block * 128 + tl.arange(0, 128)
    cols = col_block * 128 + tl.arange(0, 128)
    grads = (qh_ptr, sh_ptr, da_ptr, rm, cols, col_block, M, F, stride_shm, stride_shk, stride_dam)
    dh = (qdh_ptr, sdh_ptr, qtdh_ptr, stdh_ptr, rm, row_block, M, Mp, 2 * F)
    if which == 0:
        _store_dual(_swiglu_grad(*grads, 0), *dh, col_block, POW2, EXACT)
    elif which == 1:
        _store_dual(_swiglu_grad(*grads, 1), *dh, blocks + col_block, POW2, EXACT)
    else:
        store_colwise_compact(_swiglu_grad(*grads, 2), qta_ptr, sta_ptr, rm, cols, row_block, Mp,
                              F, POW2, EXACT, "")


SWIGLU_BACKWARD_WARPS = 8
"""Warps of swiglu_backward_kernel (Triton) on the GPU. On an sm90 GPU the CUDA kernel
(csrc/fp8_swiglu) runs instead wherever it takes the input; this one runs elsewhere and in the CPU
tests. Measured on the H100 at T = 32768-65536, F = 1536-3584, bytes moved against a
device-to-device copy: 0.50-0.51 (16 warps 0.29-0.30; 4 spill registers); the CUDA kernel 0.83-0.86
in the same runs. An ncu profile at 32768 x 3584 (8 warps, 128 registers, two programs per SM):
110 instructions per element over the three programs of a tile, 2.2 issued per cycle, DRAM 45%
busy: instruction-bound, each input read and each sigmoid computed once per output.
The kernel before it, two passes over 128 x 16-column slices of a block (row amaxes, then the
row-wise copies recomputed) with a division per element, reached 0.22-0.23.
Measured and not kept: programs making two or all three outputs of a tile, each input read and
g's sigmoid computed once: 0.32-0.38 (dgate and dup | a; dgate | dup and a) and 0.25 (all three)
at 8 warps, all spilling (three 128 x 128 fp32 tiles live); 0.41-0.42 for an earlier all-three
variant ordered so that fewer tiles were live."""


def swiglu_backward_quantize(q_h: torch.Tensor, s_h: torch.Tensor, da_TF: torch.Tensor,
                             pow2_scales: bool = False, cuda: bool = True):
    """SwiGLU's backward from the FP8 copy of h = [gate | up], straight into FP8, in one pass.

    With a = silu(gate) * up and da = dL/da (bf16/fp32 [T, F]), returns
    dh = [dgate | dup] as quantize_dual lays it out (q [T, 2F], s MN-major, qt [2F, Tp], st) and
    the 128x1 copy of the recomputed a (qt_a [F, Tp], st_a [Tb, F]) for the down projection's
    Wgrad. All math in fp32 on the dequantized h; neither dh nor a is ever stored in bf16.
    cuda: on an sm90 GPU, run the CUDA kernel (csrc/fp8_swiglu, models/fp8/swiglu_cuda.py: all
    three outputs of a tile in one CTA) where it takes the input; the Triton kernel otherwise.
    """
    if q_h.dtype != E4M3 or q_h.dim() != 2 or not q_h.is_contiguous():
        raise TypeError(f"q_h must be a contiguous 2-D float8_e4m3fn [T, 2F] tensor, got "
                        f"{q_h.dtype} {tuple(q_h.shape)}")
    M, F2 = q_h.shape
    if F2 % (2 * BLOCK) or tuple(s_h.shape) != (M, F2 // BLOCK) or s_h.dtype != torch.float32:
        raise ValueError(f"q_h [T, 2F] needs F % 128 == 0 and s_h float32 [T, 2F/128]; got "
                         f"q_h {tuple(q_h.shape)}, s_h {s_h.dtype} {tuple(s_h.shape)}")
    if tuple(da_TF.shape) != (M, F2 // 2) or da_TF.stride(1) != 1:
        raise ValueError(f"da_TF must be [{M}, {F2 // 2}] with unit column stride, got "
                         f"{tuple(da_TF.shape)} strides {da_TF.stride()}")
    F, Mb = F2 // 2, ceil_div(M, BLOCK)
    dev = q_h.device
    q_dh = torch.empty(M, F2, dtype=E4M3, device=dev)
    s_dh = torch.empty(F2 // BLOCK, M, dtype=torch.float32, device=dev).t()
    qt_dh = torch.empty(F2, Mb * BLOCK, dtype=E4M3, device=dev)
    st_dh = torch.empty(Mb, F2, dtype=torch.float32, device=dev)
    qt_a = torch.empty(F, Mb * BLOCK, dtype=E4M3, device=dev)
    st_a = torch.empty(Mb, F, dtype=torch.float32, device=dev)
    dh, a = (q_dh, s_dh, qt_dh, st_dh), (qt_a, st_a)
    if cuda and swiglu_cuda.available(dev) and swiglu_cuda.fits(q_h, da_TF):
        swiglu_cuda.swiglu_backward(q_h, s_h, da_TF, pow2_scales, dh, a)
    elif M:
        swiglu_backward_kernel[(Mb * (F // BLOCK) * 3,)](
            q_h, s_h, da_TF, q_dh, s_dh, qt_dh, st_dh, qt_a, st_a, M, F, Mb * BLOCK,
            s_h.stride(0), s_h.stride(1), da_TF.stride(0), POW2=pow2_scales, EXACT=_INTERPRET,
            num_warps=SWIGLU_BACKWARD_WARPS)
    return dh, a


@dataclass
class Dispatch:
    """How MoE sends tokens to the expert slots (models.moe.DispatchTokens' indices): slot s holds
    token token_of_slot[s]; pick_to_slot and top_k un-sort and sum the slots' gradients."""

    token_of_slot: torch.Tensor
    pick_to_slot: torch.Tensor
    top_k: int


class FP8ExpertsFunction(torch.autograd.Function):
    """apply(x, counts_E, w1, w3, w2, weights_fp8, pow2_scales, grad_enabled, dispatch) -> y_TD.

    x is the tokens sorted by expert (dispatch None), or the unsorted tokens with the `Dispatch`
    that sorts them: then the FP8 copies are made from x's rows through the index (the gathered
    bf16 tensor never exists) and backward returns x's gradient, each token's slots summed.
    grad_enabled is torch.is_grad_enabled() at the call (forward itself runs without grad):
    without it nothing is saved for backward and no column-wise copy is made."""

    @staticmethod
    def forward(ctx, x, counts_E, w1, w3, w2, wq: ExpertWeightsFP8, pow2_scales: bool,
                grad_enabled: bool, dispatch: Dispatch | None = None):
        training = grad_enabled and any(ctx.needs_input_grad)
        need_wgrad = training and any(ctx.needs_input_grad[2:5])
        rows = None if dispatch is None else dispatch.token_of_slot
        T, n_inter = x.shape[0] if rows is None else rows.numel(), w1.shape[1]
        if need_wgrad:
            q_x, s_x, qt_x, st_x = quant.quantize_dual(x, pow2_scales, check_finite=False,
                                                       rows=rows)
        else:
            q_x, s_x = quant.quantize_1x128(x, pow2_scales, check_finite=False, rows=rows)
            qt_x, st_x = None, None
        h_T2F = grouped_gemm(q_x, s_x, wq.w13_q, wq.w13_s, counts_E, out_dtype=torch.bfloat16)
        q_a, s_a, *h8 = quant.swiglu_quantize(h_T2F[:, :n_inter], h_T2F[:, n_inter:], pow2_scales,
                                              colwise=False, check_finite=False,
                                              input_copy=training)
        y_TD = grouped_gemm(q_a, s_a, wq.w2_q, wq.w2_s, counts_E, out_dtype=x.dtype)
        if not training:  # inference: nothing to save for a backward
            return y_TD
        q_h, s_h = h8
        # Only the transposed weight copies go to backward, as saved tensors (freed once this
        # backward has run, unlike a ctx attribute): see models/fp8/linear.py `_dgrad_copy`.
        ctx.save_for_backward(counts_E, q_h, s_h, qt_x, st_x, wq.w13t_q, wq.w13t_s, wq.w2t_q,
                              wq.w2t_s, None if dispatch is None else dispatch.pick_to_slot)
        ctx.pow2_scales, ctx.rows, ctx.x_rows = pow2_scales, T, x.shape[0]
        ctx.top_k = None if dispatch is None else dispatch.top_k
        ctx.dtypes = (x.dtype, w1.dtype, w3.dtype, w2.dtype)
        ctx.w_shapes = (w1.shape, w3.shape, w2.shape)
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        (counts_E, q_h, s_h, qt_x, st_x, w13t_q, w13t_s, w2t_q, w2t_s,
         pick_to_slot) = ctx.saved_tensors
        pow2, T = ctx.pow2_scales, ctx.rows
        x_dtype, w1_dtype, w3_dtype, w2_dtype = ctx.dtypes
        need_dx, need_wgrad = ctx.needs_input_grad[0], any(ctx.needs_input_grad[2:5])
        if T == 0:  # no tokens reached these experts: nothing to multiply
            dw1, dw3, dw2 = (torch.zeros(shape, dtype=dt, device=dy_TD.device)
                             for shape, dt in zip(ctx.w_shapes, (w1_dtype, w3_dtype, w2_dtype)))
            dx = dy_TD.new_zeros(ctx.x_rows, ctx.w_shapes[0][2], dtype=x_dtype)
            return dx, None, dw1, dw3, dw2, None, None, None, None
        if need_wgrad:
            q_dy, s_dy, qt_dy, st_dy = quant.quantize_dual(dy_TD.contiguous(), pow2,
                                                           check_finite=False)
        else:
            q_dy, s_dy = quant.quantize_1x128(dy_TD.contiguous(), pow2, check_finite=False)
        da_TF = grouped_gemm(q_dy, s_dy, w2t_q, w2t_s, counts_E, out_dtype=torch.bfloat16)
        (q_dh, s_dh, qt_dh, st_dh), (qt_a, st_a) = swiglu_backward_quantize(q_h, s_h, da_TF, pow2)
        dx = dw1 = dw3 = dw2 = None
        if need_dx:
            dx = grouped_gemm(q_dh, s_dh, w13t_q, w13t_s, counts_E, out_dtype=x_dtype)
            if pick_to_slot is not None:  # the slots' gradients back to the unsorted tokens
                dx = undispatch(dx, pick_to_slot, ctx.top_k)
        if need_wgrad:
            dw2 = grouped_wgrad(_token_major(qt_dy, T), st_dy, _token_major(qt_a, T), st_a,
                                counts_E, out_dtype=_wgrad_dtype(w2_dtype)).to(w2_dtype)
            x_tm, F = _token_major(qt_x, T), qt_dh.shape[0] // 2
            dw1 = grouped_wgrad(_token_major(qt_dh[:F], T), st_dh[:, :F], x_tm, st_x,
                                counts_E, out_dtype=_wgrad_dtype(w1_dtype)).to(w1_dtype)
            dw3 = grouped_wgrad(_token_major(qt_dh[F:], T), st_dh[:, F:], x_tm, st_x,
                                counts_E, out_dtype=_wgrad_dtype(w3_dtype)).to(w3_dtype)
        return dx, None, dw1, dw3, dw2, None, None, None, None


class FP8GroupedExperts(GroupedExperts):
    """Drop-in for models.moe.GroupedExperts (same parameters w1, w3, w2) with FP8 GEMMs.

    forward(x_TD, counts_E) -> y_TD on tokens sorted by expert. The FP8 weight copies are a
    cache, not state: state dicts and optimizers see exactly GroupedExperts' parameters.

    A call of fewer than `min_tokens` tokens (x_TD's rows: the tokens entering the MoE layer in
    forward_tokens, before top-k) runs GroupedExperts' own high-precision grouped GEMMs on the
    same parameters, with no FP8 copy made; 0, the default, sends every call through FP8.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, pow2_scales: bool = False,
                 min_tokens: int = 0):
        if not self.supports(dim, inter_dim):
            raise ValueError(f"FP8GroupedExperts needs dim and inter_dim divisible by {BLOCK}, "
                             f"got {dim} and {inter_dim}; keep these experts as GroupedExperts")
        check_min_tokens(min_tokens, "FP8GroupedExperts")
        super().__init__(n_experts, dim, inter_dim)
        self.pow2_scales, self.min_tokens = pow2_scales, min_tokens
        self._fp8, self._fp8_key = None, None

    @staticmethod
    def supports(dim: int, inter_dim: int) -> bool:
        return dim % BLOCK == 0 and inter_dim % BLOCK == 0

    @classmethod
    def from_grouped(cls, experts: GroupedExperts, pow2_scales: bool = False,
                     min_tokens: int = 0) -> "FP8GroupedExperts":
        """FP8 experts sharing `experts`' Parameter objects (no copy: optimizers keep working)."""
        n_experts, inter_dim, dim = experts.w1.shape
        if not cls.supports(dim, inter_dim):
            raise ValueError(f"FP8GroupedExperts needs dim and inter_dim divisible by {BLOCK}, "
                             f"got {dim} and {inter_dim}; keep these experts as GroupedExperts")
        check_min_tokens(min_tokens, "FP8GroupedExperts")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.w1, new.w3, new.w2 = experts.w1, experts.w3, experts.w2
        new.pow2_scales, new.min_tokens = pow2_scales, min_tokens
        new._fp8, new._fp8_key = None, None
        return new

    def invalidate_fp8_cache(self) -> None:
        """Drop the cached FP8 weights; the next forward re-quantizes."""
        self._fp8, self._fp8_key = None, None

    def cached_fp8_tensors(self) -> tuple:
        """The tensors the cache holds now (none made here)."""
        return tuple(vars(self._fp8).values()) if self._fp8 is not None else ()

    def fp8_weights(self) -> ExpertWeightsFP8:
        """Both orientations of w13 and w2, re-quantized only when a weight changed."""
        key = tuple((w._version, w.data_ptr(), w.dtype) for w in (self.w1, self.w3, self.w2))
        if self._fp8 is None or self._fp8_key != key:
            self._fp8 = ExpertWeightsFP8.quantize(self.w1.detach(), self.w3.detach(),
                                                  self.w2.detach(), self.pow2_scales)
            self._fp8_key = key
        return self._fp8

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if fewer_tokens(x_TD, self.min_tokens):
            return super().forward(x_TD, counts_E)
        return FP8ExpertsFunction.apply(self._checked(x_TD), counts_E, self.w1, self.w3, self.w2,
                                        self.fp8_weights(), self.pow2_scales,
                                        torch.is_grad_enabled())

    def forward_tokens(self, x_TD: torch.Tensor, counts_E: torch.Tensor,
                       slot_to_pick: torch.Tensor, pick_to_slot: torch.Tensor,
                       top_k: int) -> torch.Tensor:
        """GroupedExperts.forward_tokens without the sorted bf16 copy of the tokens: the FP8
        copies are quantized from x_TD's rows through the dispatch index (bitwise the copies of
        the sorted tokens), and backward sums each token's slots as DispatchTokens does."""
        if fewer_tokens(x_TD, self.min_tokens):  # GroupedExperts' path (self() would go by slots)
            x_slots = DispatchTokens.apply(x_TD, slot_to_pick, pick_to_slot, top_k)
            return GroupedExperts.forward(self, x_slots, counts_E)
        dispatch = Dispatch(slot_to_pick // top_k, pick_to_slot, top_k)
        return FP8ExpertsFunction.apply(self._checked(x_TD), counts_E, self.w1, self.w3, self.w2,
                                        self.fp8_weights(), self.pow2_scales,
                                        torch.is_grad_enabled(), dispatch)

    def _checked(self, x_TD: torch.Tensor) -> torch.Tensor:
        dim = self.w1.shape[2]
        if x_TD.dim() != 2 or x_TD.shape[1] != dim:
            raise ValueError(f"FP8GroupedExperts expects x_TD [tokens, {dim}], got "
                             f"{tuple(x_TD.shape)}")
        if x_TD.dtype not in INPUT_DTYPES:
            raise TypeError(f"FP8GroupedExperts input must be bfloat16 or float32, got {x_TD.dtype}")
        return x_TD if x_TD.is_contiguous() else x_TD.contiguous()

    def extra_repr(self) -> str:
        E, F_, D = self.w1.shape
        return (f"experts={E}, dim={D}, inter_dim={F_}, pow2_scales={self.pow2_scales}, "
                f"min_tokens={self.min_tokens}")
