"""The pretraining config: one dataclass per component, registered as Hydra ConfigStore schemas.

Each component owns its settings (`models.ModelConfig`, `models.fp8.config.FP8Config`,
`trainer.optim.OptimConfig`, `trainer.data.DataConfig`, `trainer.tracking.LoggerConfig`,
`trainer.engine.ParallelConfig`); this module only assembles them into `PretrainConfig` and
registers them, so that Hydra checks every YAML file in `conf/` and every command-line override
against a typed schema: an unknown key or a value of the wrong type fails at composition with
the key's full name, instead of being silently ignored.

Schemas: `base_pretrain` (the root, named first in `conf/pretrain.yaml`'s defaults) and, per
group, `<group>/base_<group>`, named first in each group file's defaults.

`to_dataclasses(cfg)` turns the composed DictConfig into the dataclasses themselves, which runs
each one's own `__post_init__` validation (e.g. ModelConfig's routing checks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from models.config import ModelConfig
from models.fp8.config import FP8Config
from trainer.data import DataConfig
from trainer.engine import ParallelConfig
from trainer.optim import OptimConfig
from trainer.tracking import LoggerConfig


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps of the run (the LR schedule spans them)."""
    seed: int = 0
    """Seed of the model init and of every RNG the run uses."""
    eval_every: int = 50
    """Evaluate on the validation rows every this many steps (and after the last)."""
    eval_rows: int = 128
    """Validation rows (sequences) per evaluation, split over the ranks."""


@dataclass
class CheckpointConfig:
    dir: str = "${hydra:runtime.output_dir}/checkpoints"
    """Where this run's checkpoints go (default: inside the run directory)."""
    every: int = 100
    """Save every this many optimizer steps (and after the last); 0 saves only at the end."""
    keep: int = 2
    """Complete checkpoints kept (older ones are deleted after a newer one is complete)."""
    resume: bool = True
    """Continue from the latest complete checkpoint in `dir` (or `load_dir`) when there is one."""
    load_dir: Optional[str] = None
    """Start from the latest checkpoint of another checkpoint directory instead of `dir`."""
    export_hf: bool = True
    """Write a Hugging Face DeepSeek-V3-layout export to <run dir>/hf at the end."""
    export_fp8: bool = False
    """That export's attention, MLP and expert weights as DeepSeek-V3's release stores them:
    e4m3 128x128 blocks with `weight_scale_inv` (power-of-two scales under fp8.pow2_scales), the
    blocks FP8 training's forward multiplies with, ready for vLLM / SGLang's FP8 path; the rest in
    bf16 (models/hf.py)."""

    def __post_init__(self) -> None:
        if self.export_fp8 and not self.export_hf:
            raise ValueError("checkpoint.export_fp8=true sets how the Hugging Face export stores "
                             "its weights, and checkpoint.export_hf=false turns that export off; "
                             "drop one of the two")


@dataclass
class PretrainConfig:
    model: ModelConfig = MISSING
    fp8: FP8Config = MISSING
    optim: OptimConfig = MISSING
    data: DataConfig = MISSING
    logger: LoggerConfig = MISSING
    parallel: ParallelConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


GROUP_SCHEMAS = {"model": ModelConfig, "fp8": FP8Config, "optim": OptimConfig, "data": DataConfig,
                 "logger": LoggerConfig, "parallel": ParallelConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_pretrain", node=PretrainConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)


def to_dataclasses(cfg: DictConfig) -> PretrainConfig:
    """The config as dataclasses (each validates itself), typed against the schema first."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"config value(s) {missing} must be given (they are ??? in conf/), e.g. "
                         f"`python -m trainer.pretrain {missing[0]}=...`")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PretrainConfig), cfg))
