"""DeepSeekMoE: sigmoid router with an aux-loss-free correction bias, grouped routed experts,
shared experts, and the sequence-wise balance loss.

Routing, per token (DeepSeek-V3 eqs. 12-16):

1. affinities s = sigmoid(x · W_gateᵀ), computed in fp32;
2. the correction bias b (an fp32 buffer, moved by the trainer's balance update, never by the
   optimizer) is added for *selection only*: s + b;
3. group limit: experts are split into n_group groups, each group is ranked by the sum of its two
   best biased scores, and only the topk_group best groups stay eligible (others get -inf);
4. the top-k eligible experts are chosen; their gate weights are the *unbiased* affinities,
   normalized to sum to 1, times routed_scaling_factor.

The routed experts run as grouped GEMMs over the token copies sorted by expert: one GEMM per
projection for all experts, never a Python loop over experts. MoE hands them the unsorted tokens
and the sort (`GroupedExperts.forward_tokens`): the bf16 experts gather the sorted copies
(`DispatchTokens`), the FP8 experts of models/fp8, which replace the whole module, quantize
straight from the unsorted rows. The experts' outputs come back in slot order; each token's K of
them are weighted by its gate weights and summed: in eager torch a gather into [T, K, D], a
multiply and a sum (three passes over the T·K·D copies forward and more backward), on the GPU one
kernel each way (models.kernels.moe_combine, fp32 arithmetic, the gate weights unrounded).

Sequence-wise balance loss (eqs. 17-20), per sequence of T tokens:
f_i = E/(k·T) · #{t routed to i},  P_i = mean_t s_it / Σ_j s_jt,  L = Σ_i f_i P_i,
averaged over sequences. It is ~1 when balanced; the model sums it over MoE layers and weights it
by alpha.

Shape legend: B batch, S sequence, T tokens (B·S), D model dim, E routed experts, F expert width,
K experts per token, G groups.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models import kernels
from models.config import ModelConfig
from models.layers import MLP, swiglu


@dataclass
class Routing:
    """One router call's decision for T tokens."""

    expert_TK: torch.Tensor   # chosen experts (int64)
    weight_TK: torch.Tensor   # gate weights (fp32): unbiased, normalized, scaled
    scores_TE: torch.Tensor   # sigmoid affinities (fp32, with grad): for the balance loss
    counts_E: torch.Tensor    # tokens routed to each expert (int64)


class RouterLogits(torch.autograd.Function):
    """apply(x_TD, weight_ED) = F.linear(x.float(), W.float()), holding no fp32 copy of x for the
    backward.

    The router scores tokens in fp32 (step 1 above). Written as plain torch, autograd keeps
    x.float() until the backward for W's gradient: 4 bytes per element of the layer's input,
    1.0 GiB over the `small` model's four routers at 16384 tokens a micro-batch, 6.3 GiB over
    DeepSeek-V3's 58 at 4096. Here only x itself is kept (the bf16 tensor the layer's norm made,
    which bf16 shared experts hold anyway; FP8 ones hold FP8 copies, so there x costs 2 bytes an
    element instead of 4), and the backward widens it again for W's gradient. Forward and
    backward are the operations autograd runs for the plain expression (mm with W transposed;
    MmBackward's two mm's in the operand order it picks for these layouts, ToCopyBackward's
    casts), so the results are bitwise the same; the cost is one more cast of x, in the backward.
    (A bf16 GEMM with an fp32 result, torch.mm's out_dtype, would save the forward's cast too but
    changes the sums' order and leaves the reduction to cuBLAS's choice: a 500-step run with it
    ended 0.78% from bf16 against 0.12-0.23% in five runs before, scripts/MEASURED.md.)"""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        return F.linear(x_TD.float(), weight_ED.float())

    @staticmethod
    def backward(ctx, dlogits_TE: torch.Tensor):
        x_TD, weight_ED = ctx.saved_tensors
        d2 = dlogits_TE.reshape(-1, dlogits_TE.shape[-1])
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = d2.mm(weight_ED.float()).to(x_TD.dtype).view_as(x_TD)
        if ctx.needs_input_grad[1]:
            # MmBackward gives the column-major mat2 W.t() the grad (dlogits^T x).t(); the
            # transpose's backward undoes the .t(): one mm, dlogits^T x
            dw = d2.t().mm(x_TD.reshape(-1, x_TD.shape[-1]).float()).to(weight_ED.dtype)
        return dx, dw


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.scale = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # Module-wide dtype casts (model.bfloat16(), an engine's cast) must not touch the bias: in
        # bf16 it could no longer absorb 1e-3 updates once |b| exceeds ~0.25. Device moves apply.
        bias_fp32 = self.expert_bias
        super()._apply(fn, recurse)
        moved = self.expert_bias
        if moved.dtype != torch.float32:
            self.expert_bias = moved.float() if bias_fp32.is_meta else bias_fp32.to(moved.device)
        return self

    def forward(self, x_TD: torch.Tensor) -> Routing:
        scores_TE = torch.sigmoid(RouterLogits.apply(x_TD, self.weight))
        return self.route(scores_TE, self.choose(scores_TE.detach()))

    def choose(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """The top-k experts of each token (the discrete decision, no gradient): by score plus
        balancing bias, within the best `topk_group` groups."""
        choice_TE = scores_TE + self.expert_bias
        if self.n_group > 1:
            choice_TE = self._mask_groups(choice_TE)
        return choice_TE.topk(self.top_k, dim=-1).indices

    def route(self, scores_TE: torch.Tensor, expert_TK: torch.Tensor) -> Routing:
        """The chosen experts' gate weights (their scores, normalized and scaled) and counts."""
        weight_TK = scores_TE.gather(1, expert_TK)
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True) * self.scale
        counts_E = count_per_expert(expert_TK, self.n_experts)
        return Routing(expert_TK, weight_TK, scores_TE, counts_E)

    def _mask_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        choice_TGX = choice_TE.unflatten(-1, (self.n_group, -1))
        group_score_TG = choice_TGX.topk(2, dim=-1).values.sum(-1)
        keep_TG = group_score_TG.topk(self.topk_group, dim=-1).indices
        mask_TG = torch.ones_like(group_score_TG, dtype=torch.bool).scatter_(1, keep_TG, False)
        return choice_TGX.masked_fill(mask_TG[..., None], float("-inf")).flatten(1)


def count_per_expert(expert_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many of the chosen experts are each expert (int64 [n_experts]), `torch.bincount`'s
    result, without its device-to-host sync: on CUDA bincount reads the input's largest value back
    to the host to size its output, which in every MoE layer's forward stopped the host until the
    GPU caught up and then left the GPU waiting for the next launches. H100, `small` at 4 x 2048
    tokens a step: 4 such syncs a forward (5.5 ms of host stall in the profiler); without them
    the step took 141.2 / 134.5 ms against 142.8 / 136.9 (bf16 / FP8, two interleaved A/B rounds
    of scripts/bench_train.py, faster in all four pairs). Integer atomic adds are exact, so the
    counts are the same bits in any order."""
    ids = expert_TK.flatten()
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=ids.device)
    return counts_E.scatter_add_(0, ids, torch.ones_like(ids))


def grouped_mm(x_TK: torch.Tensor, w_ENK: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """y[t] = x[t] · w[e(t)]ᵀ for rows sorted by expert, `counts_E` rows per expert.

    On a Hopper GPU in bf16 this is one `torch._grouped_mm` call; elsewhere the rows are scattered
    into an [E, max_count, K] batch and multiplied with one `bmm` (correct anywhere, wasteful only
    when the counts are very uneven).
    """
    if _native_grouped_mm_ok(x_TK, w_ENK):
        offsets = counts_E.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x_TK, w_ENK.transpose(-2, -1), offs=offsets)
    return _padded_grouped_mm(x_TK, w_ENK, counts_E)


def _native_grouped_mm_ok(x_TK: torch.Tensor, w_ENK: torch.Tensor) -> bool:
    return (x_TK.is_cuda and x_TK.dtype == torch.bfloat16 and w_ENK.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x_TK.device)[0] >= 9)


def _padded_grouped_mm(x_TK, w_ENK, counts_E):
    E, T = w_ENK.shape[0], x_TK.shape[0]
    starts_E = counts_E.cumsum(0) - counts_E
    expert_T = torch.repeat_interleave(torch.arange(E, device=x_TK.device), counts_E,
                                       output_size=T)
    slot_T = torch.arange(T, device=x_TK.device) - starts_E[expert_T]
    width = int(counts_E.max()) if T else 0
    x_EMK = x_TK.new_zeros(E, width, x_TK.shape[1])
    x_EMK[expert_T, slot_T] = x_TK
    # w · xᵀ rather than x · wᵀ: the weight gradient then comes out contiguous, like the weight.
    y_ENM = torch.bmm(w_ENK, x_EMK.transpose(1, 2))
    return y_ENM.transpose(1, 2)[expert_T, slot_T]


class GroupedExperts(nn.Module):
    """E SwiGLU experts applied to tokens already sorted by expert (`counts_E` per expert)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))

    def grouped_mm(self, x_TK, w_ENK, counts_E):
        return grouped_mm(x_TK, w_ENK, counts_E)

    def forward_tokens(self, x_TD: torch.Tensor, counts_E: torch.Tensor,
                       slot_to_pick: torch.Tensor, pick_to_slot: torch.Tensor,
                       top_k: int) -> torch.Tensor:
        """The experts' output for every slot, from the unsorted tokens: forward() on the token
        copies DispatchTokens sorts by expert (FP8 experts quantize straight from x_TD instead)."""
        return self(DispatchTokens.apply(x_TD, slot_to_pick, pick_to_slot, top_k), counts_E)

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        gate_TF = self.grouped_mm(x_TD, self.w1, counts_E)
        up_TF = self.grouped_mm(x_TD, self.w3, counts_E)
        return self.grouped_mm(swiglu(gate_TF, up_TF), self.w2, counts_E)


class MoE(nn.Module):
    """Routed experts (grouped GEMMs) plus shared experts; records this forward's routing."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size,
                                      cfg.moe_intermediate_size)
        self.shared = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                       if cfg.n_shared_experts else None)
        self.last_routing: Routing | None = None

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BSD.flatten(0, 1)
        routing = self.router(x_TD)
        self.last_routing = routing
        y_TD = self._routed(x_TD, routing)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.view_as(x_BSD)

    def _routed(self, x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        K = routing.expert_TK.shape[1]
        slot_to_pick, pick_to_slot = sort_by_expert(routing.expert_TK)
        y_slots = self.experts.forward_tokens(x_TD, routing.counts_E, slot_to_pick, pick_to_slot, K)
        return combine(y_slots, routing.weight_TK, slot_to_pick, pick_to_slot)


def combine(y_slots: torch.Tensor, weight_TK: torch.Tensor, slot_to_pick: torch.Tensor,
            pick_to_slot: torch.Tensor) -> torch.Tensor:
    """Each token's K expert outputs (rows of y_slots, in slot order) weighted by its gate weights
    and summed: [T, D]. One kernel each way on the GPU (models.kernels.moe_combine)."""
    if kernels.fused(y_slots, "moe_combine"):
        return kernels.moe_combine(y_slots, pick_to_slot, weight_TK.float())
    T, K = weight_TK.shape
    y_TKD = PermuteRows.apply(y_slots, pick_to_slot, slot_to_pick).view(T, K, -1)
    # A weighted sum over K: elementwise, since a batched [1, K] x [K, D] GEMM per token runs
    # at a few percent of the GPU's bandwidth.
    gate_TK1 = weight_TK.to(y_TKD.dtype)[:, :, None]
    return (y_TKD * gate_TK1).sum(1)


def sort_by_expert(expert_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_to_pick, pick_to_slot) for the picks expert_TK (pick t*K + k is token t's k-th
    expert): the picks in expert order (stable: a token's slots keep token order within an
    expert) and its inverse."""
    slot_to_pick = expert_TK.flatten().argsort(stable=True)
    pick_to_slot = torch.empty_like(slot_to_pick)
    pick_to_slot[slot_to_pick] = torch.arange(slot_to_pick.numel(), device=expert_TK.device)
    return slot_to_pick, pick_to_slot


class DispatchTokens(torch.autograd.Function):
    """Copies of the tokens sorted by expert: slot s holds token slot_to_pick[s] // K.

    A pick is one (token, k) pair, numbered t*K + k; slot_to_pick sorts the picks by expert and
    pick_to_slot is its inverse. Backward un-sorts the slots' gradients with that inverse (a
    gather, not an atomic scatter) and sums each token's K copies: deterministic, no atomics.
    """

    @staticmethod
    def forward(ctx, x_TD, slot_to_pick, pick_to_slot, top_k: int):
        ctx.save_for_backward(pick_to_slot)
        ctx.top_k = top_k
        return x_TD[slot_to_pick // top_k]

    @staticmethod
    def backward(ctx, grad_slots):
        (pick_to_slot,) = ctx.saved_tensors
        return undispatch(grad_slots, pick_to_slot, ctx.top_k), None, None, None


def undispatch(grad_slots: torch.Tensor, pick_to_slot: torch.Tensor, top_k: int) -> torch.Tensor:
    """The tokens' gradient from their slots': un-sorted by a gather, each token's K copies
    summed (DispatchTokens' backward, also run by the FP8 experts, which dispatch themselves).
    One kernel on the GPU (models.kernels.sum_picks)."""
    if kernels.fused(grad_slots, "moe_combine"):
        return kernels.sum_picks(grad_slots, pick_to_slot, top_k)
    return grad_slots[pick_to_slot].unflatten(0, (-1, top_k)).sum(1)


class PermuteRows(torch.autograd.Function):
    """x[index] for a permutation `index` whose inverse is `inverse`; backward is grad[inverse]."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def sequence_balance_loss(routing: Routing, batch: int, top_k: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over the batch."""
    scores_BSE = routing.scores_TE.unflatten(0, (batch, -1))
    n_experts, seq = scores_BSE.shape[-1], scores_BSE.shape[1]
    chosen_BSK = routing.expert_TK.unflatten(0, (batch, -1))
    counts_BE = torch.zeros(batch, n_experts, device=scores_BSE.device)
    counts_BE.scatter_add_(1, chosen_BSK.flatten(1), torch.ones_like(chosen_BSK.flatten(1),
                                                                     dtype=counts_BE.dtype))
    f_BE = counts_BE * (n_experts / (top_k * seq))
    p_BE = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()
