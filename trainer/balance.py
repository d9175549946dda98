"""Auxiliary-loss-free load balancing: the router-bias update and the MaxVio metrics.

DeepSeek-V3 (after Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts")
keeps each MoE layer balanced without a loss term: every routed expert e has a bias b_e that is
added to its affinity only when choosing the top-k experts (never when weighting their outputs),
and after each optimizer step

    b_e <- b_e + gamma * sign(mean_load - load_e)

so an overloaded expert becomes less attractive and an idle one more. `load_e` is the number of
tokens routed to e during that step: summed over all micro-batches of the gradient-accumulation
window and all-reduced over every data-parallel rank, so each rank applies the identical update
and the biases (buffers, which DeepSpeed never broadcasts) stay equal everywhere. gamma = 0 turns
balancing off; the paper's and DeepSeek-V3's gamma is 1e-3.

The biases are FP32 buffers whatever the engine's compute dtype: a BF16 bias could not absorb
1e-3 steps once it grows past ~0.25, so the update refuses any other dtype.

MaxVio (the paper's imbalance measure) for one layer is (max_e load_e - mean load) / mean load:
0 when perfectly balanced, E - 1 when one expert takes every token. MaxVio_batch uses one
training step's global loads; MaxVio_global uses the loads summed over the whole validation set.

Shapes: L routers (MoE layers, then MTP blocks' MoE layers, as `model.routers()` lists them),
E routed experts; counts_LE is a LongTensor of routed-token counts.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (a no-op for a single process); returns the same tensor."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_vio(counts_LE: torch.Tensor) -> torch.Tensor:
    """Per-layer MaxVio = (max load - mean load) / mean load, as float [L]; 0 for a layer with no tokens."""
    loads_LE = counts_LE.double()
    mean_L = loads_LE.mean(dim=-1)
    vio_L = (loads_LE.max(dim=-1).values - mean_L) / mean_L.clamp_min(1e-12)
    return torch.where(mean_L > 0, vio_L, torch.zeros_like(vio_L)).float()


def bias_delta(counts_E: torch.Tensor, update_rate: float) -> torch.Tensor:
    """gamma * sign(mean load - load), as FP32 [E]."""
    loads_E = counts_E.double()
    return (update_rate * torch.sign(loads_E.mean() - loads_E)).float()


class LoadBalancer:
    """Sums routed-token counts over one optimizer step, then all-reduces them and moves the biases.

    Call `accumulate(out.expert_counts)` after every micro-batch forward and `step()` once per
    optimizer step (at the gradient-accumulation boundary); `step()` returns that step's metrics.
    `update()` is the same step leaving its figures on the device, for a caller that reads them
    back later (trainer.engine.train_step: after the optimizer step is queued).
    """

    def __init__(self, routers: list[torch.nn.Module], update_rate: float):
        if update_rate < 0:
            raise ValueError(f"balance update rate gamma={update_rate} must be >= 0 (0 disables balancing)")
        self.routers = list(routers)
        self.update_rate = update_rate
        self.counts_LE: torch.Tensor | None = None

    def accumulate(self, counts_LE: torch.Tensor) -> None:
        if counts_LE.shape[0] != len(self.routers):
            raise ValueError(f"expert counts have {counts_LE.shape[0]} rows but the model has "
                             f"{len(self.routers)} routers; pass the LossOutput.expert_counts of this model")
        counts_LE = counts_LE.detach().long()
        self.counts_LE = counts_LE.clone() if self.counts_LE is None else self.counts_LE + counts_LE

    def step(self) -> dict[str, float]:
        """All-reduce this step's loads, move every bias by gamma*sign(mean - load), reset, report."""
        loads = self.update()
        return {} if loads is None else balance_metrics(*(t.cpu() for t in loads))

    def update(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """step() without the report, reading nothing back to the host: the all-reduced loads
        [L, E] and the moved biases [L, E] (a copy), on the routers' device, for balance_metrics;
        None for a model without routers."""
        if not self.routers:
            return None
        if self.counts_LE is None:
            raise RuntimeError("LoadBalancer.step() before any accumulate(): no expert counts this step")
        counts_LE = all_reduce_sum(self.counts_LE)
        self.counts_LE = None
        if self.update_rate > 0:
            with torch.no_grad():
                for layer, router in enumerate(self.routers):
                    bias_E = router.expert_bias
                    assert bias_E.dtype == torch.float32, (
                        f"router {layer} expert_bias is {bias_E.dtype}; it must stay FP32 (see engine.keep_fp32_buffers)")
                    bias_E.add_(bias_delta(counts_LE[layer], self.update_rate).to(bias_E.device))
        return counts_LE, torch.stack([r.expert_bias.detach().float() for r in self.routers])


def balance_metrics(counts_LE: torch.Tensor, bias_LE: torch.Tensor) -> dict[str, float]:
    """MaxVio_batch per layer and mean, expert-load fractions, and router-bias statistics, from
    host tensors: the step's loads and the biases after its update, [L, E] each."""
    n_layers = counts_LE.shape[0]
    vio_L = max_vio(counts_LE)
    frac_LE = counts_LE.double() / counts_LE.sum(dim=-1, keepdim=True).clamp_min(1)
    std_L = bias_LE.std(dim=-1) if bias_LE.shape[-1] > 1 else torch.zeros(n_layers)
    metrics = {"balance/maxvio_batch": vio_L.mean().item()}
    for layer in range(n_layers):
        metrics[f"balance/maxvio_batch/layer{layer}"] = vio_L[layer].item()
        metrics[f"balance/bias_min/layer{layer}"] = bias_LE[layer].min().item()
        metrics[f"balance/bias_max/layer{layer}"] = bias_LE[layer].max().item()
        metrics[f"balance/bias_std/layer{layer}"] = std_L[layer].item()
        for e, frac in enumerate(frac_LE[layer].tolist()):
            metrics[f"load/layer{layer}/expert{e}"] = frac
    return metrics
