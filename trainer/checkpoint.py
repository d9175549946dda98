"""Checkpoints: save and resume through DeepSpeed, plus what DeepSpeed does not hold; HF export.

A checkpoint is one directory `<checkpoint.dir>/step_00000100/`:

    deepspeed/               engine.save_checkpoint: module weights (and buffers), the ZeRO
                             optimizer partitions (FP32 masters, AdamW moments), LR scheduler
    trainer_state.pt         step, data-loader position, the routers' FP32 correction biases
    rng_rank<r>.pt           every RNG state of rank r (torch CPU/CUDA, python, numpy)
    config.yaml              the run's resolved config
    meta.json                written last: step, world size, the model config and every
                             parameter/buffer shape

It is written aside, as `.tmp_step_00000100/`, and renamed into place only when every rank has
finished writing and meta.json is on disk: a crash at any moment leaves either the previous
complete checkpoint or the new one, never a half-written "latest". Resuming picks the highest
step directory that has a meta.json; stray `.tmp_*` directories are ignored and cleared on the
next save. Only `keep` complete checkpoints are kept.

Refusals, before anything is trained or written: a checkpoint whose shapes differ from the model
being built (the message names the config fields that differ), one taken with another number of
ranks, and one that cannot be read (named as corrupt, with what to do).

Any saved step exports to the Hugging Face layout without a GPU or the run's config, as the end
of a run does (`checkpoint.export_hf`), in bf16 or with FP8 weight blocks:

    python -m trainer.checkpoint <run dir>/checkpoints out/hf [--fp8] [--step 500]

It reads the module weights DeepSpeed saved and the routers' FP32 biases into the model
meta.json describes (on the CPU) and calls models.hf.export_hf; `--fp8` quantizes with the run's
own `fp8.pow2_scales` (config.yaml), so the blocks are the ones its FP8 forward used.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer.data import TrainLoader
from trainer.engine import Job

STEP_DIR = re.compile(r"^step_(\d{8})$")
DS_TAG = "deepspeed"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says why and what to do."""


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def model_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


class Checkpointer:
    """Saves into `directory`; resumes from its latest complete checkpoint (or another directory's)."""

    def __init__(self, directory: Path, keep: int, job: Job):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1")
        self.directory, self.keep, self.job = directory, keep, job
        self.last_saved: Optional[Path] = None

    def save(self, engine, step: int, loader: TrainLoader, model: nn.Module, model_cfg, config_yaml: str) -> Path:
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".tmp_step_{step:08d}"
        if self.job.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        torch.save(rng_state(), tmp / f"rng_rank{self.job.rank}.pt")
        _barrier()
        if self.job.is_main:
            self._write_trainer_state(tmp, step, loader, model, model_cfg, config_yaml)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        _barrier()
        self.last_saved = final
        return final

    def _write_trainer_state(self, tmp: Path, step: int, loader: TrainLoader, model: nn.Module, model_cfg,
                             config_yaml: str) -> None:
        biases = [r.expert_bias.detach().cpu().clone() for r in model.routers()]
        torch.save({"step": step, "loader": loader.state_dict(), "router_biases": biases}, tmp / "trainer_state.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        meta = {"step": step, "world_size": self.job.world_size, "model": dataclasses.asdict(model_cfg),
                "shapes": model_shapes(model)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    def _prune(self) -> None:
        for old in complete_checkpoints(self.directory)[:-self.keep]:
            shutil.rmtree(old)
        for stray in self.directory.glob(".tmp_step_*"):
            shutil.rmtree(stray, ignore_errors=True)

    def latest(self, directory: Optional[Path] = None) -> Optional[Path]:
        found = complete_checkpoints(directory or self.directory)
        return found[-1] if found else None

    def load(self, path: Path, engine, loader: TrainLoader, model: nn.Module, model_cfg) -> int:
        """Restore everything from checkpoint `path`; returns the number of steps it had done."""
        meta = _read_meta(path)
        check_compatible(path, meta, model, model_cfg, self.job.world_size)
        try:
            load_path, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint under {path / DS_TAG}")
            state = torch.load(path / "trainer_state.pt", weights_only=True)
            rng = torch.load(path / f"rng_rank{self.job.rank}.pt", weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
                                  "delete that directory to resume from the one before it, or start a new run "
                                  "(a new hydra.run.dir, or checkpoint.resume=false in an empty directory)") from exc
        set_router_biases(model, state["router_biases"])
        loader.load_state_dict(state["loader"])
        set_rng_state(rng)
        return state["step"]


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has an unreadable meta.json ({exc}); it is corrupt: delete "
                              "that directory to resume from the one before it") from exc


def check_compatible(path: Path, meta: dict, model: nn.Module, model_cfg, world_size: int) -> None:
    """Refuse a checkpoint of another model shape or rank count, naming what differs."""
    theirs, ours = meta["shapes"], model_shapes(model)
    if theirs != ours:
        fields = {k: (v, getattr(model_cfg, k, None)) for k, v in meta["model"].items()
                  if getattr(model_cfg, k, None) != v}
        diff = ", ".join(f"model.{k}: checkpoint {a} vs this run {b}" for k, (a, b) in sorted(fields.items()))
        bad = sorted(set(theirs) ^ set(ours)) or [k for k in ours if theirs.get(k) != ours[k]]
        raise CheckpointError(f"checkpoint {path} holds a different model shape ({diff or 'same config fields'}; "
                              f"first differing tensors: {bad[:3]}); resume with the checkpoint's model config "
                              "or start a new run directory")
    if meta["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {path} was written by {meta['world_size']} ranks and this job has "
                              f"{world_size}; resume with --nproc_per_node={meta['world_size']}")


def set_router_biases(model: nn.Module, biases: list[torch.Tensor]) -> None:
    """The routers' FP32 correction biases as trainer_state.pt holds them, onto the model."""
    with torch.no_grad():
        for router, bias in zip(model.routers(), biases):
            router.expert_bias.copy_(bias.to(router.expert_bias.device))


def model_from_checkpoint(path: Path) -> nn.Module:
    """The model checkpoint `path` (a step directory) holds, on the CPU in fp32: the module
    weights and buffers DeepSpeed saved, then the routers' FP32 correction biases."""
    from models import ModelConfig, build_model
    meta = _read_meta(path)
    model = build_model(ModelConfig(**meta["model"]))
    states = path / DS_TAG / "mp_rank_00_model_states.pt"
    try:
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        biases = torch.load(path / "trainer_state.pt", weights_only=True)["router_biases"]
        model.load_state_dict(module)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: "
                              f"{exc}); export another step (--step) or the one before it") from exc
    set_router_biases(model, biases)
    return model


def pick_step(directory: Path, step: Optional[int]) -> Path:
    """A step directory itself, or the checkpoints directory's `step` (its latest complete one
    when None); a clear error when there is none."""
    if (directory / "meta.json").exists() and step is None:
        return directory
    found = {int(STEP_DIR.match(p.name)[1]): p for p in complete_checkpoints(directory)}
    if not found:
        raise CheckpointError(f"{directory} holds no complete checkpoint (a step_XXXXXXXX "
                              "directory with a meta.json); point at <run dir>/checkpoints or one "
                              "step in it")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise CheckpointError(f"{directory} has no complete checkpoint of step {step}; it has "
                              f"steps {sorted(found)}")
    return found[step]


def export_hf(model: nn.Module, out_dir: Path, fp8: bool = False,
              pow2_scales: bool = False) -> Path:
    """Write the model in the Hugging Face DeepSeek-V3 layout (safetensors + config.json) via
    models/hf.py; fp8: its FP8 weight blocks (models.hf.export_hf)."""
    try:
        from models.hf import export_hf as export
    except ImportError as exc:
        raise RuntimeError("models/hf.py (export_hf) is not available in this checkout; run with "
                           "checkpoint.export_hf=false") from exc
    export(model, out_dir, fp8=fp8, pow2_scales=pow2_scales and fp8)
    return out_dir


def _run_pow2_scales(path: Path) -> bool:
    """The run's fp8.pow2_scales, from the checkpoint's config.yaml (False if it has none)."""
    from omegaconf import OmegaConf
    config = OmegaConf.load(path / "config.yaml") if (path / "config.yaml").exists() else {}
    return bool(OmegaConf.select(OmegaConf.create(config), "fp8.pow2_scales", default=False))


def main(argv: Optional[list[str]] = None) -> Path:
    """`python -m trainer.checkpoint CHECKPOINT OUT [--fp8] [--step N]`: see the module doc."""
    import argparse
    p = argparse.ArgumentParser(prog="python -m trainer.checkpoint",
                                description="Export a saved step in the Hugging Face layout.")
    p.add_argument("checkpoint", type=Path,
                   help="<run dir>/checkpoints, or one step_XXXXXXXX in it")
    p.add_argument("out", type=Path, help="the export's directory (config.json + safetensors)")
    p.add_argument("--step", type=int, default=None, help="which step (default: the latest)")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 weight blocks as DeepSeek-V3's release stores them (the run's scales)")
    args = p.parse_args(argv)
    path = pick_step(args.checkpoint, args.step)
    model = model_from_checkpoint(path)
    out = export_hf(model, args.out, fp8=args.fp8, pow2_scales=_run_pow2_scales(path))
    print(f"exported {path} to {out}{' (FP8 weights)' if args.fp8 else ''}")
    return out


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
