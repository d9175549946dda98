"""DeepSpeed's ZeRO-1/2 without its full-size copies: of the gradients into reduction buckets on a
single rank, of the gradients to FP32 and of the weights back to bf16 in the optimizer step.

## The gradient reduction of a one-rank job

At the end of a step's backward ZeRO-1 all-reduces the gradients over the data-parallel group.
With `contiguous_gradients` (DeepSpeed's default) every gradient is first copied into a bucket,
the bucket all-reduced, and each gradient then copied into a flat partition buffer; without it the
bucket is flattened, all-reduced and copied back. Either way two full copies of every gradient
(5.3 ms of copy kernels a step for `small` on an H100, 177 of them, and the hooks' host time:
the backward took 76.0 ms with them, 66.2 ms without), which a group of one rank does for
nothing: its all-reduce, a division by the world size of 1, returns what it was given.
So for a one-rank ZeRO-1 job `one_rank_config` turns `contiguous_gradients` off (DeepSpeed then
registers no gradient hooks at all) and `install` makes the reduction itself a no-op
(`buffered_reduce_fallback`, the one place that path reduces). Gradients, accumulation over
micro-batches and everything after are DeepSpeed's.

## The optimizer step

With bf16 weights, DeepSpeed's `DeepSpeedZeroOptimizer.step()` does, for each parameter group of
this rank:

  1. flatten the partition's bf16 gradients into one flat tensor (a copy);
  2. cast that to an FP32 tensor, the `.grad` of the flat FP32 master partition (a second copy,
     twice the bytes);
  3. the client optimizer's step on the FP32 master partition;
  4. copy the FP32 masters back into the bf16 partition the model reads (a cast);
  5. all-gather the bf16 partitions across the data-parallel group.

Steps 1, 2 and 4 only move bytes or change precision, and our AdamW kernel already reads and
writes every element once, so they can ride along: `install(engine)` replaces `step` on that one
optimizer object with the same sequence in which AdamW reads the bf16 gradients where they lie
(the partition's list of tensors, all stepped by one launch of `adamw_pieces_kernel`, each
widened exactly as `.float()` does) and writes the new weight rounded to bf16 (round to nearest
even, as `copy_` does) into the bf16 partition beside the FP32 master (`AdamW.use_for_next_step`).
The results are DeepSpeed's bit for bit (tests/test_engine.py compares masters, bf16 weights and
norms with DeepSpeed's own step under ZeRO-1 and 2, on one rank and on two).

The rest is DeepSpeed's own code called in DeepSpeed's order: the overflow check and the norm
(trainer/zero_clip.py's, which this needs: DeepSpeed's clip would multiply the bf16 gradient in
place), the loss-scale update, the skip on an inf/NaN norm, freeing the gradients, the
all-gather and the re-pointing of the model's weights into the flat buffers. It mirrors
DeepSpeed 0.19's `step()` for that configuration, so it installs only on DeepSpeed 0.19 and only
where that configuration holds (bf16, no CPU offload: see `_unsupported`); anything else keeps
DeepSpeed's step, with one log line saying why.

`parallel.fused_zero_step=false` keeps DeepSpeed's reduction and step (the A/B of
scripts/bench_train.py and scripts/profile_step.py).

Measured on an H100 (`small`, 4 x 2048 tokens, one micro-batch a step, one rank, A/B with
`--deepspeed-zero-step` in the same session): `engine.step()` 28.2 -> 18.5 ms in bf16
(scripts/profile_step.py; the FP32 cast was 6.0 ms of it, the cast back 3.7 ms); with the
one-rank reduction skipped as well, a whole step 139.1 -> 124.5 ms in bf16 (+12% tokens/s) and
130.7 -> 119.3 ms in FP8 (+10%), and the peak memory 31.8 -> 27.7 GiB: the FP32 gradient copy
and the reduction's buffers are no longer allocated (scripts/bench_train.py).
"""
from __future__ import annotations

import logging
import types

import torch
import torch.distributed as dist

from trainer import zero_clip

log = logging.getLogger(__name__)

TESTED_DEEPSPEED = (0, 19)
"""Major and minor version of the DeepSpeed whose ZeRO step `_step_without_copies` mirrors."""
NEEDED = ("check_overflow", "scaled_global_norm", "_update_scale", "zero_grad", "_optimizer_step",
          "free_grad_in_param_list", "_get_preflattened_grad_partition",
          "_release_preflattened_grad_buffers", "_update_model_bit16_weights",
          "unscale_and_clip_grads")


def one_rank_config(ds_config: dict) -> dict:
    """`ds_config` with `contiguous_gradients` off for a one-rank ZeRO-1 job that does not set it
    (see the module docstring); otherwise `ds_config` as it is."""
    zero = ds_config.get("zero_optimization", {})
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != 1 or zero.get("stage") != 1 or "contiguous_gradients" in zero:
        return ds_config
    return {**ds_config, "zero_optimization": {**zero, "contiguous_gradients": False}}


def install(engine) -> None:
    """Skip a one-rank job's gradient reduction and replace `step` on `engine.optimizer`, each
    where it applies (a log line says why where it does not)."""
    reason = _reduction_needed(engine)
    if reason:
        log.info("ZeRO's gradient reduction left as it is: %s", reason)
    else:
        engine.optimizer.buffered_reduce_fallback = types.MethodType(_one_rank_reduces_nothing,
                                                                     engine.optimizer)
    reason = _unsupported(engine)
    if reason:
        log.info("ZeRO's FP32 gradient copy and bf16 weight copy left to DeepSpeed: %s", reason)
    else:
        engine.optimizer.step = types.MethodType(_step_without_copies, engine.optimizer)


def installed(engine) -> bool:
    """Whether `step` is this module's."""
    return zero_clip.swapped_in(engine.optimizer, "step", _step_without_copies)


def reduction_skipped(engine) -> bool:
    """Whether the one-rank gradient reduction is skipped."""
    return zero_clip.swapped_in(engine.optimizer, "buffered_reduce_fallback",
                                _one_rank_reduces_nothing)


def _reduction_needed(engine) -> str:
    reason = zero_clip.not_zero_optimizer(engine)
    if reason:
        return reason
    zero = engine.optimizer
    if dist.get_world_size(group=zero.dp_process_group) != 1:
        return "the data-parallel group has more than one rank"
    if zero.partition_gradients or zero.contiguous_gradients or zero.overlap_comm:
        return "ZeRO-2, contiguous_gradients or overlap_comm is on"
    if getattr(zero, "cpu_offload", False) or not callable(
            getattr(zero, "buffered_reduce_fallback", None)):
        return "optimizer offload is on, or this DeepSpeed reduces elsewhere"
    return ""


def _one_rank_reduces_nothing(zero, *args, **kwargs) -> None:
    """The all-reduce (and its flatten and copy back) of a data-parallel group of one: nothing."""


def _unsupported(engine) -> str:
    import deepspeed
    version = tuple(int(part) for part in deepspeed.__version__.split(".")[:2])
    if version != TESTED_DEEPSPEED:
        return (f"DeepSpeed {deepspeed.__version__} is not the {TESTED_DEEPSPEED[0]}."
                f"{TESTED_DEEPSPEED[1]} whose step this mirrors")
    if not zero_clip.installed(engine):
        return "trainer/zero_clip.py's norm and clip are not installed (parallel.fused_grad_clip)"
    zero = engine.optimizer
    if zero.dtype != torch.bfloat16:
        return f"the model's weights are {zero.dtype}, not bf16 (nothing to fold)"
    missing = [name for name in NEEDED if not callable(getattr(zero, name, None))]
    if missing:
        return f"this DeepSpeed's ZeRO optimizer lacks {missing}"
    if getattr(zero, "torch_autocast_gradscaler", None) or getattr(zero, "zenflow", False):
        return "torch autocast's grad scaler or ZenFlow is on"
    return ""


def _step_without_copies(zero, closure=None):
    """DeepSpeed's ZeRO step (bf16, no offload), with AdamW reading the bf16 gradient and writing
    the bf16 weights itself."""
    from deepspeed.runtime.utils import all_gather_dp_groups, is_invalid_grad_norm
    from deepspeed.runtime.zero import stage_1_and_2 as ds

    zero.micro_step_id = ds.INITIAL_MICRO_STEP_ID
    zero.overflow = False
    if zero.check_grad_overflow:
        zero.check_overflow(partition_gradients=zero.partition_gradients)
    norm = norm_on_host = None
    if not zero.overflow:  # zero_clip requires compute_grad_norm
        norm = zero.scaled_global_norm()
        # The host needs it now to step or skip (DeepSpeed's check syncs here too); kept as a
        # float, so that nobody reads it from the GPU after AdamW is queued (trainer/engine.py).
        norm_on_host = float(norm)
        if is_invalid_grad_norm(norm_on_host):  # bf16 skips on it only when checking overflow
            zero.overflow = zero.check_grad_overflow
    prev_scale = zero.loss_scale
    zero._update_scale(zero.overflow)
    if zero.overflow:
        _skip(zero, ds.OPTIMIZER_TIMERS)
        return
    zero._global_grad_norm = norm_on_host / prev_scale
    for i in range(len(zero.bit16_groups)):
        _step_group(zero, i, norm, ds)
    zero.timers(ds.OPTIMIZER_ALLGATHER_TIMER).start()
    all_gather_dp_groups(groups_flat=zero.bit16_groups_flat,
                         partitioned_param_groups=zero.parallel_partitioned_bit16_groups,
                         dp_process_group=zero.real_dp_process_group,
                         start_alignment_factor=zero.nccl_start_alignment_factor,
                         allgather_bucket_size=zero.allgather_bucket_size)
    zero.timers(ds.OPTIMIZER_ALLGATHER_TIMER).stop()
    for i in range(len(zero.bit16_groups)):
        zero._update_model_bit16_weights(i)
    zero.timers.log(ds.OPTIMIZER_TIMERS)


def _step_group(zero, i: int, norm, ds) -> None:
    """One parameter group: hand AdamW this rank's bf16 gradients, the pieces that make up the
    partition (DeepSpeed's list: tensors, or parts of the first and last, and zeros for the last
    rank's padding) as they lie, to update the FP32 masters and write the bf16 weights."""
    zero.timers(ds.OPTIMIZER_GRADIENTS_TIMER).start()
    partition_id = dist.get_rank(group=zero.real_dp_process_group[i])
    zero.free_grad_in_param_list(zero.params_not_in_partition[i])
    flat_grad = zero._get_preflattened_grad_partition(i)
    pieces = [flat_grad] if flat_grad is not None else list(zero.averaged_gradients[i])
    held = sum(piece.numel() for piece in pieces)
    if held != zero.partition_size[i]:
        raise RuntimeError(f"ZeRO group {i}: the gradient pieces hold {held} elements, the "
                           f"partition {zero.partition_size[i]}; run with "
                           "parallel.fused_zero_step=false and report this DeepSpeed version")
    zero.free_grad_in_param_list(zero.params_in_partition[i])
    zero._release_preflattened_grad_buffers(i)
    zero.averaged_gradients[i] = None
    zero.all_grad_tensors[i] = None
    zero.unscale_and_clip_grads(pieces, norm)  # zero_clip's: a factor for AdamW to apply
    zero.timers(ds.OPTIMIZER_GRADIENTS_TIMER).stop()

    zero.timers(ds.OPTIMIZER_STEP_TIMER).start()
    master = zero.single_partition_of_fp32_groups[i]
    weights = zero.parallel_partitioned_bit16_groups[i][partition_id]
    zero.optimizer.use_for_next_step(master, pieces, weights.data)
    zero._optimizer_step(i)
    zero.timers(ds.OPTIMIZER_STEP_TIMER).stop()


def _skip(zero, timers) -> None:
    """DeepSpeed's handling of a step with an inf/NaN gradient: drop the gradients, report the
    norm as inf, leave the weights."""
    zero._global_grad_norm = float("inf")
    zero.zero_grad(set_to_none=True)
    zero._release_preflattened_grad_buffers()
    for k in zero.averaged_gradients.keys():
        zero.averaged_gradients[k] = None
        zero.all_grad_tensors[k] = None
    for timer in timers:
        zero.timers(timer).start()
        zero.timers(timer).stop()
