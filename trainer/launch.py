"""Hydra under torchrun: one output directory and one resolved config for every rank.

Each torchrun worker runs `@hydra.main` on its own, and `${now:...}` in `hydra.run.dir` resolves
per process, so ranks would otherwise create directories seconds apart (facebookresearch/hydra
#2070). Here rank 0 decides: `quiet_hydra_on_other_ranks()` (called before `@hydra.main`) makes
Hydra on ranks > 0 only compose the config (run dir ".", no .hydra/ files, no log files), and
after torch.distributed is up `share_config()` broadcasts rank 0's fully resolved config and run
directory, so every path (checkpoints, wandb) and every value is rank 0's. Multirun (`-m`)
sweeps are for single-process runs; under torchrun they are refused.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

QUIET_OVERRIDES = ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                   "hydra/hydra_logging=disabled"]


def quiet_hydra_on_other_ranks() -> None:
    """On torchrun ranks > 0, rewrite sys.argv so Hydra creates no directory and writes no files."""
    if int(os.environ.get("RANK", "0")) == 0:
        return
    sys.argv = [a for a in sys.argv if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    sys.argv += QUIET_OVERRIDES


def share_config(cfg: DictConfig, world_size: int) -> tuple[DictConfig, Path]:
    """Rank 0's resolved config and output directory, on every rank."""
    hydra_cfg = HydraConfig.get()
    if world_size > 1 and hydra_cfg.mode == RunMode.MULTIRUN:
        raise ValueError("multirun (-m) sweeps run one process per job; launch them with plain python, "
                         "not torchrun")
    payload = [OmegaConf.to_container(cfg, resolve=True), hydra_cfg.runtime.output_dir]
    if world_size > 1:
        dist.broadcast_object_list(payload, src=0)
    container, run_dir = payload
    return OmegaConf.create(container), Path(run_dir)
