"""Pretrain a DeepSeek-V3-style MoE: Hydra config, DeepSpeed engine, aux-loss-free balancing.

    python -m trainer.pretrain                                   # debug model, stdlib corpus, CPU ok
    python -m trainer.pretrain model=small fp8=blockwise optim.lr=1e-3 train.steps=2000
    torchrun --standalone --nproc_per_node=8 -m trainer.pretrain model=small parallel.grad_accum=4
    python -m trainer.pretrain -m optim.lr=1e-3,3e-3             # a sweep, one job after another

Each run lives in one directory (`outputs/pretrain/<time>/`, or `hydra.run.dir=...`): the
Hydra config, `metrics.jsonl`, the offline wandb run, `checkpoints/`, and the Hugging Face export
`hf/`. Starting the same command with the same `hydra.run.dir` resumes from the latest complete
checkpoint there.

The loop: global batch -> `engine.train_step` (forward/backward per micro-batch, optimizer step,
router-bias update from the all-reduced loads) -> metrics -> periodic validation (loss and
MaxVio_global) and checkpoint. A NaN/inf loss (or gradient norm) stops the run, naming the step
and the last good checkpoint.
"""
from __future__ import annotations

import math
import random
import resource
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from models import build_model
from trainer import engine as eng
from trainer.balance import LoadBalancer
from trainer.checkpoint import Checkpointer, export_hf
from trainer.config import PretrainConfig, register_configs, to_dataclasses
from trainer.data import Corpus, PreparedData, TrainLoader, val_batches
from trainer.launch import quiet_hydra_on_other_ranks, share_config
from trainer.optim import build_optimizer, build_schedule
from trainer.tracking import NullTracker, make_tracker, peak_flops


class NonFiniteLoss(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_data(c: PretrainConfig, job: eng.Job) -> PreparedData:
    """Rank 0 tokenizes (or finds the cache), the others wait, then all read the cached rows."""
    corpus = Corpus(c.data)
    if job.is_main:
        corpus.prepare()
    if job.world_size > 1:
        dist.barrier()
    data = corpus.load()
    if data.vocab_size > c.model.vocab_size:
        raise ValueError(f"the tokenizer has {data.vocab_size} tokens but model.vocab_size={c.model.vocab_size}; "
                         f"set model.vocab_size={data.vocab_size} or use a smaller tokenizer")
    if c.data.seq_len > c.model.max_position_embeddings:
        raise ValueError(f"data.seq_len={c.data.seq_len} exceeds model.max_position_embeddings="
                         f"{c.model.max_position_embeddings}; shorten the sequences or raise the limit")
    return data


def build_training_model(c: PretrainConfig) -> torch.nn.Module:
    model = build_model(c.model)
    if c.fp8.enabled:
        from models.fp8 import convert
        model = convert(model, c.fp8)
    return model


def resume_point(c: PretrainConfig, ckpt: Checkpointer) -> Path | None:
    """The checkpoint to start from, or None; refuses to write over another run's checkpoints."""
    own = ckpt.latest()
    if c.checkpoint.load_dir is not None:
        source = ckpt.latest(Path(c.checkpoint.load_dir))
        if source is None:
            raise ValueError(f"checkpoint.load_dir={c.checkpoint.load_dir} holds no complete checkpoint")
        return own or source
    if own is not None and not c.checkpoint.resume:
        raise ValueError(f"{ckpt.directory} already holds checkpoints (latest {own.name}) and checkpoint.resume="
                         "false; resume them, or give a new run directory (hydra.run.dir=...)")
    return own if c.checkpoint.resume else None


def throughput(metrics: dict, seconds: float, tokens: int, flops_per_token: float, job: eng.Job) -> None:
    metrics["perf/tokens_per_s"] = tokens / seconds
    metrics["perf/step_s"] = seconds
    peak = peak_flops(job.device)
    if peak is not None:
        metrics["perf/mfu"] = flops_per_token * tokens / seconds / (peak * job.world_size)
        metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(job.device) / 2 ** 30
    else:
        metrics["memory/peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def check_finite(metrics: dict, step: int, ckpt: Checkpointer) -> None:
    """Stop on a NaN/inf loss, or gradient norm (DeepSpeed would silently skip such a step)."""
    for key in ("loss/total", "optim/grad_norm"):
        value = metrics.get(key, 0.0)
        if not math.isfinite(value):
            last = ckpt.last_saved or ckpt.latest()
            raise NonFiniteLoss(f"{key.split('/')[1].replace('_', ' ')} is {value} at step {step}; stopping. "
                                f"Last good checkpoint: {last if last else 'none (nothing saved yet)'}. Resume "
                                "from it with a lower optim.lr or a stronger optim.grad_clip")


def due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> float:
    job = eng.init_distributed()
    cfg, run_dir = share_config(cfg, job.world_size)
    c = to_dataclasses(cfg)
    seed_everything(c.train.seed)
    data = prepare_data(c, job)

    model = build_training_model(c)
    optimizer = build_optimizer(model, c.optim)
    precision = eng.resolve_precision(c.parallel.precision, job.device)
    ds_config = eng.deepspeed_config(c.parallel, c.optim.grad_clip, c.data.micro_batch_size, job.world_size,
                                     precision)
    engine = eng.build_engine(model, optimizer, build_schedule(c.optim, c.train.steps), ds_config,
                              c.parallel.fused_grad_clip, c.parallel.fused_zero_step)
    model = engine.module
    balancer = LoadBalancer(model.routers(), c.optim.bias_update_rate)
    loader = TrainLoader(data.train_rows, c.data.micro_batch_size, c.parallel.grad_accum, job.rank,
                         job.world_size, c.data.seed)
    val = val_batches(data.val_rows, c.data.micro_batch_size, job.rank, job.world_size, c.train.eval_rows)

    ckpt = Checkpointer(Path(c.checkpoint.dir), c.checkpoint.keep, job)
    start = resume_point(c, ckpt)
    step = ckpt.load(start, engine, loader, model, c.model) if start else 0
    config_yaml = OmegaConf.to_yaml(cfg)
    tracker = make_tracker(c.logger, job.rank, run_dir, OmegaConf.to_container(cfg), c.train.steps, step)
    tracker.print(f"run dir {run_dir} | {job.world_size} rank(s) on {job.device} ({precision}) | "
                  f"params {model.param_counts()} | {'resumed at step ' + str(step) if start else 'from scratch'}")
    if c.fp8.enabled:
        from models.fp8.convert import run_outlook
        tracker.print(run_outlook(model, c.data.seq_len, c.data.micro_batch_size))
    tokens_per_step = c.data.micro_batch_size * c.data.seq_len * c.parallel.grad_accum * job.world_size
    flops_per_token = model.flops_per_token(c.data.seq_len)

    val_loss = float("nan")
    if step == 0:
        val_loss = log_eval(model, val, job, tracker, step)
    while step < c.train.steps:
        t0 = time.perf_counter()
        metrics = eng.train_step(engine, loader.micro_batches(step), eng.lm_loss, balancer,
                                 c.parallel.threaded_backward)
        step += 1
        loader.step = step
        check_finite(metrics, step, ckpt)
        throughput(metrics, time.perf_counter() - t0, tokens_per_step, flops_per_token, job)
        if due(step, c.logger.log_every, c.train.steps) or step == 1:
            tracker.log(metrics, step)
        tracker.progress(step, metrics["loss/total"], metrics["perf/tokens_per_s"])
        if due(step, c.train.eval_every, c.train.steps):
            val_loss = log_eval(model, val, job, tracker, step)
        if due(step, c.checkpoint.every, c.train.steps):
            path = ckpt.save(engine, step, loader, model, c.model, config_yaml)
            tracker.print(f"step {step}: saved checkpoint {path}")

    finish(c, model, job, tracker, run_dir)
    return val_loss


def log_eval(model, val, job: eng.Job, tracker: NullTracker, step: int) -> float:
    metrics = eng.evaluate(model, val, job.device)
    tracker.log(metrics, step)
    tracker.print(f"step {step}: val loss {metrics['val/loss']:.4f} | MaxVio_global "
                  f"{metrics.get('val/maxvio_global', float('nan')):.3f}")
    return metrics["val/loss"]


def finish(c: PretrainConfig, model, job: eng.Job, tracker: NullTracker, run_dir: Path) -> None:
    if c.checkpoint.export_hf and job.is_main:
        fp8 = c.checkpoint.export_fp8
        out = export_hf(model, run_dir / "hf", fp8=fp8, pow2_scales=c.fp8.pow2_scales)
        tracker.print(f"exported Hugging Face checkpoint{' (FP8 weights)' if fp8 else ''} to {out}")
    tracker.finish()
    if job.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    register_configs()
    quiet_hydra_on_other_ranks()
    main()
