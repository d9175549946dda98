"""The DeepSpeed engine and the one training step that pretraining and RL share.

Every run, one process or many, goes through a DeepSpeed engine, so the code path on a laptop is
the code path on a node:

- `init_distributed()` starts torch.distributed from torchrun's environment (RANK, WORLD_SIZE,
  MASTER_ADDR, ...), or fabricates a one-process environment when launched with plain `python`.
  NCCL on GPUs; on a CPU-only machine DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) with gloo.
- `build_engine()` wraps the model with our AdamW as a client optimizer and the LR schedule as a
  LambdaLR. ZeRO stage 1 by default: each rank keeps the FP32 master weights and AdamW moments of
  1/N of the parameters; the client optimizer sees those flat FP32 partitions, which is why it
  needs `zero_allow_untested_optimizer` (only torch's own Adam variants are on DeepSpeed's list).
  Precision `auto` is BF16 on GPU (params and gradients BF16, FP32 masters inside ZeRO) and FP32
  on CPU. Every buffer that was FP32 before wrapping (the routers' correction biases, rotary
  tables) is FP32 after it: DeepSpeed before 0.19.2 cast buffers along with parameters, and a
  BF16 bias could no longer absorb 1e-3 updates. With `fused_grad_clip` (ParallelConfig, on by
  default) the ZeRO optimizer's gradient norm, overflow check and clipping are replaced by
  multi-tensor versions with the clip folded into AdamW (trainer/zero_clip.py: `engine.step()` of
  `small` 56.8 -> 27.8 ms on an H100); with `fused_zero_step` (on by default) AdamW also reads
  ZeRO's bf16 gradients where they lie and writes the bf16 weights itself, instead of ZeRO
  flattening the gradients into an FP32 copy and casting the new weights back, and a one-rank
  job skips the gradient reduction's two copies of every gradient (trainer/zero_step.py).
- `train_step()` is the whole optimizer step: for each micro-batch forward (through `loss_fn`),
  backward, token counts into the balancer, `engine.step()` (DeepSpeed only steps at the
  accumulation boundary); before the last one, the router-bias update from the all-reduced
  counts and the metrics averaged over micro-batches and ranks. RL reuses it with its own
  `loss_fn`. The FP8 layers' cached weight quantizations are dropped after the step's last
  forward, before its backward: the backward keeps only each layer's transposed copy, freed as
  soon as that layer's gradient is done, so no FP8 copy lives through the end of backward and
  the optimizer step, where the step's memory peaks (the `small` model's copies are 2.7 GiB).
  They are dropped again after the step: ZeRO writes the new weights through `.data`, which
  bumps no version counter, so a copy made in between (none is, today) could not notice by
  itself. Backward runs on the loop's own thread unless `parallel.threaded_backward=true` (see
  ParallelConfig).
  The step's metrics (losses averaged over micro-batches and ranks, the balancer's loads and
  moved biases) are computed on the GPU after the last backward and copied to pinned host memory
  without waiting (`HostCopies`); `engine.step()` is queued behind them, and only then does the
  host wait, for those copies alone. trainer/zero_step.py reads the gradient norm before it
  queues AdamW. So the host queues the optimizer step's first kernels while the backward still
  runs, and train_step returns while AdamW runs: the next step's forward is queued behind it
  instead of launched after it (its batch copied from pinned memory, which waits for nothing; the
  rotary tables too, whose pageable copy synced every forward until the eighteenth session;
  DeepSpeed's throughput timer, which synchronized the device at every forward and every
  engine.step() until the twenty-second, is off in `deepspeed_config`).
  `scripts/profile_step.py --gaps` shows what GPU idle time is left and which code it waits on.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from models.fp8.linear import invalidate_weight_caches
from trainer import zero_clip, zero_step
from trainer.balance import LoadBalancer, all_reduce_sum, balance_metrics, max_vio

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class ParallelConfig:
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel; DeepSpeed then reports no gradient norm),
    1 (optimizer state sharded) or 2 (+ gradients)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    precision: str = "auto"
    """'bf16', 'fp32', or 'auto' (bf16 on GPU, fp32 on CPU)."""
    threaded_backward: bool = False
    """Run each backward on PyTorch's autograd worker thread for the GPU (true: PyTorch's
    default) instead of on the training loop's own thread (false). The model's FP8 layers and
    fused kernels have their backward in Python, and every such node pays for the hand-off to the
    worker thread in host time; with one GPU per process the worker thread buys no overlap."""
    fused_grad_clip: bool = True
    """ZeRO stage 1/2: take the gradient norm with multi-tensor kernels (float64 sums, as
    DeepSpeed's, read from the gradients as they lie) and fold clipping into AdamW's kernel (true),
    or leave norm, overflow check and clipping to DeepSpeed (false: a float64 copy of every
    gradient and a multiply pass of their own). See trainer/zero_clip.py."""
    fused_zero_step: bool = True
    """ZeRO stage 1/2 with bf16 weights and fused_grad_clip: AdamW reads the partition's bf16
    gradients and writes the bf16 weights along with the FP32 masters (true), or ZeRO makes an
    FP32 copy of the gradients and casts the new weights back in passes of their own (false).
    Also, for a one-rank ZeRO-1 job: no gradient reduction (true), or ZeRO's all-reduce over the
    one rank with two copies of every gradient (false). The same results bit for bit. See
    trainer/zero_step.py."""


@dataclass
class Job:
    """Where this process sits in the job."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_deepspeed():
    """Import DeepSpeed with its accelerator chosen from what this machine has (one place)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def init_distributed() -> Job:
    """Start (or join) the process group: torchrun's env, or a fabricated 1-process env."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed = _import_deepspeed()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return Job(dist.get_rank(), dist.get_world_size(), local_rank, device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"parallel.precision={precision!r} is unknown; use one of {PRECISIONS}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def deepspeed_config(parallel: ParallelConfig, grad_clip: float, micro_batch_size: int, world_size: int,
                     precision: str) -> dict:
    if parallel.zero_stage not in (0, 1, 2):
        raise ValueError(f"parallel.zero_stage={parallel.zero_stage} is not supported; use 0, 1 or 2 "
                         "(stage 3 partitions the expert weights, which the grouped GEMM needs whole)")
    if parallel.grad_accum < 1 or micro_batch_size < 1:
        raise ValueError("parallel.grad_accum and data.micro_batch_size must be >= 1")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": parallel.grad_accum,
        "train_batch_size": micro_batch_size * parallel.grad_accum * world_size,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default, for its samples/s log line, which
        # steps_per_print silences anyway) synchronizes the device at every forward's start and
        # at every engine.step() from the third step on: the host could not queue the next
        # forward while AdamW ran, nor a micro-batch's first kernels while the last backward
        # ran. trainer/pretrain.py reports throughput itself.
        "timers": {"throughput": {"enabled": False}},
    }


def keep_fp32_buffers(module: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back, bit for bit, every buffer that was FP32 before the engine cast the module."""
    for name, value in saved.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        current = owner._buffers[leaf]
        if current.dtype != torch.float32:
            owner._buffers[leaf] = value.to(current.device)


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float],
                 ds_config: dict, fused_grad_clip: bool = True, fused_zero_step: bool = True):
    """Wrap model + client optimizer + LambdaLR(schedule) in a DeepSpeed engine.
    fused_grad_clip, fused_zero_step: ParallelConfig's."""
    deepspeed = _import_deepspeed()
    saved = {n: b.detach().clone() for n, b in model.named_buffers() if b.dtype == torch.float32}
    if fused_zero_step:
        ds_config = zero_step.one_rank_config(ds_config)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    keep_fp32_buffers(engine.module, saved)
    if fused_grad_clip:
        zero_clip.install(engine)
    if fused_zero_step:
        zero_step.install(engine)
    return engine


class LossTerms(NamedTuple):
    """What a loss function hands the step: the loss to backpropagate, the routed-token counts
    [n_routers, n_experts] of this forward (None for a model without routers), scalar metrics."""
    loss: torch.Tensor
    expert_counts: Optional[torch.Tensor]
    metrics: dict[str, torch.Tensor]


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> LossTerms:
    """Pretraining: next-token loss plus MTP and balance terms, as the model's LossOutput defines."""
    out = model(batch["tokens"], batch["labels"])
    metrics = {"loss/total": out.loss, "loss/lm": out.lm_loss, "loss/mtp": out.mtp_loss,
               "loss/balance": out.aux_loss}
    for depth, loss in enumerate(out.mtp_losses, 1):
        metrics[f"loss/mtp_depth{depth}"] = loss
    return LossTerms(out.loss, out.expert_counts, metrics)


def _means_over_ranks(sums: dict[str, torch.Tensor], count: int) -> torch.Tensor:
    """The metric sums (sorted by key) averaged over micro-batches and ranks, on the device."""
    stacked = all_reduce_sum(torch.stack([sums[k].float() for k in sorted(sums)]))
    world = dist.get_world_size() if dist.is_initialized() else 1
    return stacked / (count * world)


class HostCopies:
    """Device tensors copied to host memory behind everything queued so far, without waiting:
    `get()` waits for these copies only (a CUDA event recorded after them), not for the work
    queued after them, such as the optimizer step."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.event = None
        if not any(t.is_cuda for t in tensors.values()):
            self.host = dict(tensors)
            return
        self.host = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
            t, non_blocking=True) for k, t in tensors.items()}
        self.event = torch.cuda.Event()
        self.event.record()

    def get(self) -> dict[str, torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.host


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`; CPU tensors bound for a GPU go through pinned memory, laid out
    contiguously first (a strided view, such as rows[:, :-1], would otherwise be staged through
    pageable memory by the copy), so the copy waits for nothing queued before it."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in batch.items()}
    return {k: (v.contiguous().pin_memory() if v.device.type == "cpu" else v).to(
        device, non_blocking=True) for k, v in batch.items()}


def backward(engine, loss: torch.Tensor, threaded_backward: bool = False) -> None:
    """engine.backward(loss) where ParallelConfig.threaded_backward puts it: on this thread
    (false) or on autograd's worker thread (true)."""
    with torch.autograd.set_multithreading_enabled(threaded_backward):
        engine.backward(loss)


def train_step(engine, micro_batches: list[dict[str, torch.Tensor]],
               loss_fn: Callable[[nn.Module, dict], LossTerms], balancer: LoadBalancer,
               threaded_backward: bool = False) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns metrics averaged over all ranks.
    threaded_backward: ParallelConfig.threaded_backward."""
    if len(micro_batches) != engine.gradient_accumulation_steps():
        raise ValueError(f"got {len(micro_batches)} micro-batches for an engine that accumulates "
                         f"{engine.gradient_accumulation_steps()}; pass exactly one optimizer step's worth")
    lr = engine.get_lr()[0]
    steps_before = engine.global_steps
    sums: dict[str, torch.Tensor] = {}
    engine.train()
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        terms = loss_fn(engine, _to_device(batch, engine.device))
        if last:  # the FP8 weight copies' last use before the weights change
            invalidate_weight_caches(engine.module)
        backward(engine, terms.loss, threaded_backward)
        if terms.expert_counts is not None:
            balancer.accumulate(terms.expert_counts)
        for key, value in terms.metrics.items():
            sums[key] = sums.get(key, 0) + value.detach().float()
        if last:  # on their way to the host while the optimizer's kernels are queued
            loads = balancer.update()
            on_device = {"means": _means_over_ranks(sums, len(micro_batches))}
            if loads is not None:
                on_device.update(zip(("counts", "bias"), loads))
            figures = HostCopies(on_device)
        engine.step()
    assert engine.global_steps == steps_before + 1, "DeepSpeed did not step at the accumulation boundary"
    invalidate_weight_caches(engine.module)
    host = figures.get()
    metrics = dict(zip(sorted(sums), host["means"].tolist()))
    if loads is not None:
        metrics.update(balance_metrics(host["counts"], host["bias"]))
    grad_norm = engine.get_global_grad_norm()
    metrics["optim/lr"] = lr
    if grad_norm is not None:
        metrics["optim/grad_norm"] = float(grad_norm)
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, float]:
    """Mean validation LM loss over all ranks' shares, and MaxVio_global from the summed loads."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts_LE = None
    for batch in batches:
        batch = _to_device(batch, device)
        out = model(batch["tokens"], batch["labels"])
        loss_sum += out.lm_loss.double()
        if out.expert_counts is not None:
            counts_LE = out.expert_counts.long() if counts_LE is None else counts_LE + out.expert_counts
    model.train(was_training)
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(len(batches)), dtype=torch.float64,
                                                                 device=device)]))
    metrics = {"val/loss": (totals[0] / totals[1]).item()}
    if counts_LE is not None:
        vio_L = max_vio(all_reduce_sum(counts_LE))
        metrics["val/maxvio_global"] = vio_L.mean().item()
        metrics.update({f"val/maxvio_global/layer{i}": v for i, v in enumerate(vio_L.tolist())})
    return metrics
