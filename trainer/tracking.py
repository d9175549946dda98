"""Metrics out of a run: wandb and a progress bar on rank 0, no-op twins on every other rank.

`make_tracker(cfg, ...)` returns a `Tracker` on rank 0 and a `NullTracker` elsewhere, so the
training loop calls `tracker.log(...)` unconditionally and never asks which rank it is on
(nanochat's DummyWandb). The rank-0 tracker

- opens a wandb run (offline by default, its files inside the run's output directory, so a run
  needs no account; `wandb sync <run_dir>/wandb/offline-run-*` uploads it later), with the resolved
  config attached; the run id is kept in `<run_dir>/wandb_id` and reused on resume;
- appends every logged row to `<run_dir>/metrics.jsonl` (exact floats, also with wandb disabled:
  it is what the resume and equivalence tests compare);
- drives a tqdm bar showing loss and tokens/s;
- reports events (evaluations, checkpoints) through the `trainer` logger, which Hydra's job logging
  sends to the console and to `<run dir>/pretrain.log` (routed around the bar while it is shown).

MFU = achieved model FLOP/s / the card's dense BF16 peak. The model's training FLOPs per token
(6 x activated parameters plus attention) come from `model.flops_per_token(seq_len)`; the peak is
known for H100/H200 (989 TFLOP/s dense BF16) and MFU is not reported on other devices.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

MODES = ("offline", "online", "disabled")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
log = logging.getLogger("trainer")


@dataclass
class LoggerConfig:
    mode: str = "offline"
    """wandb mode: 'offline' (files in the run dir, sync later), 'online', or 'disabled'."""
    project: str = "fp8-moe"
    """wandb project."""
    name: Optional[str] = None
    """wandb run name (default: the run directory's name)."""
    log_every: int = 10
    """Log training metrics every this many optimizer steps."""
    progress: bool = True
    """Show a progress bar on rank 0."""


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense BF16 peak FLOP/s of the device, or None when unknown (CPU, other cards)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


class NullTracker:
    """The tracker of ranks other than 0: accepts everything, does nothing."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        pass

    def print(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    """Rank 0: wandb run + metrics.jsonl + progress bar."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, total_steps: int, start_step: int):
        if cfg.mode not in MODES:
            raise ValueError(f"logger.mode={cfg.mode!r} is unknown; use one of {MODES}")
        self.metrics_file = open(run_dir / "metrics.jsonl", "a")
        self.wandb_run = _open_wandb(cfg, run_dir, config)
        self.bar, self.redirect = None, None
        if cfg.progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self.redirect = logging_redirect_tqdm()
            self.redirect.__enter__()
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="pretrain")

    def log(self, metrics: dict, step: int) -> None:
        self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics_file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=True)

    def print(self, message: str) -> None:
        log.info(message)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.redirect.__exit__(None, None, None)
        self.metrics_file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _open_wandb(cfg: LoggerConfig, run_dir: Path, config: dict):
    if cfg.mode == "disabled":
        return None
    import wandb
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.project, name=cfg.name or run_dir.name, dir=str(run_dir), mode=cfg.mode,
                      id=run_id, resume="allow", config=config)


def make_tracker(cfg: LoggerConfig, rank: int, run_dir: Path, config: dict, total_steps: int,
                 start_step: int) -> NullTracker:
    return Tracker(cfg, run_dir, config, total_steps, start_step) if rank == 0 else NullTracker()
