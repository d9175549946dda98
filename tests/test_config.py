"""conf/ against the schemas: every group option composes, YAML mirrors the dataclasses, bad overrides fail."""
import dataclasses
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException

from models.config import NAMED_SIZES, model_config
from models.fp8.config import FP8Config
from models.fp8.gemm import has_blockwise_kernels
from trainer import launch
from trainer.config import GROUP_SCHEMAS, register_configs, to_dataclasses
from trainer.data import Corpus, DataConfig
from trainer.engine import ParallelConfig
from trainer.optim import OptimConfig
from trainer.tracking import LoggerConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
FIXED = ["checkpoint.dir=/tmp/unused-checkpoints"]


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def _compose(*overrides):
    return compose("pretrain", overrides=[*FIXED, *overrides])


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_composes_to_the_debug_model_on_the_stdlib_corpus():
    c = to_dataclasses(_compose())
    assert c.model == model_config("debug")
    assert c.fp8 == FP8Config() and not c.fp8.enabled
    assert c.data.vocab_size == c.model.vocab_size and c.data.paths == []
    assert c.logger.mode == "offline" and c.parallel.zero_stage == 1


@pytest.mark.parametrize("group", sorted(GROUP_SCHEMAS))
def test_every_option_of_every_group_composes(group):
    options = _options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        extra = ["data.paths=[a.txt]"] if (group, option) == ("data", "files") else []
        cfg = _compose(f"{group}={option}", *extra)
        c = to_dataclasses(cfg)
        assert isinstance(getattr(c, group), GROUP_SCHEMAS[group])


@pytest.mark.parametrize("name", sorted(NAMED_SIZES))
def test_model_yaml_mirrors_the_named_size(name):
    c = to_dataclasses(_compose(f"model={name}"))
    assert dataclasses.asdict(c.model) == dataclasses.asdict(model_config(name))


def test_group_defaults_mirror_the_dataclass_defaults():
    c = to_dataclasses(_compose())
    assert c.optim == OptimConfig()
    assert c.parallel == ParallelConfig()
    assert c.logger == LoggerConfig()
    assert dataclasses.replace(c.data, vocab_size=DataConfig.vocab_size) == DataConfig()
    assert to_dataclasses(_compose("fp8=blockwise")).fp8 == FP8Config(recipe="blockwise")


@pytest.mark.skipif(has_blockwise_kernels(), reason="this machine has the sm90 kernels")
def test_fp8_blockwise_without_sm90_stops_the_trainer_naming_the_gpu():
    """The trainer's model builder (what `python -m trainer.pretrain fp8=blockwise` runs) turns
    the FP8 request on a machine without Hopper kernels into convert's error, which names sm90."""
    from trainer.pretrain import build_training_model
    with pytest.raises(RuntimeError, match="sm90"):
        build_training_model(to_dataclasses(_compose("fp8=blockwise")))


@pytest.mark.parametrize("group, schema", [("fp8", FP8Config), ("optim", OptimConfig), ("data", DataConfig),
                                           ("logger", LoggerConfig), ("parallel", ParallelConfig)])
def test_group_files_list_every_field(group, schema):
    """Each group's base file spells out every field of its dataclass (so the YAML is the full picture)."""
    base = {"fp8": "off", "optim": "adamw", "data": "stdlib", "logger": "wandb", "parallel": "default"}[group]
    text = (CONF / group / f"{base}.yaml").read_text()
    missing = [f.name for f in dataclasses.fields(schema) if f"\n{f.name}:" not in text]
    assert not missing, f"conf/{group}/{base}.yaml lacks {missing}"


def test_overrides_reach_the_dataclasses():
    c = to_dataclasses(_compose("model=small", "model.num_hidden_layers=2", "optim.lr=1e-4",
                                "optim=adamw_wsd", "parallel=zero2", "logger=off",
                                "fp8.linear_min_tokens=16384", "fp8.experts_min_tokens=0",
                                "checkpoint.export_fp8=true"))
    assert c.model == model_config("small", num_hidden_layers=2)
    assert c.fp8.linear_min_tokens == 16384 and c.fp8.mlp_min_tokens == 3072
    assert c.fp8.experts_min_tokens == 0
    assert c.optim.lr == 1e-4 and c.optim.schedule == "wsd"
    assert c.parallel.zero_stage == 2 and c.logger.mode == "disabled"
    assert c.data.vocab_size == 32768
    assert c.checkpoint.export_fp8 and c.checkpoint.export_hf


@pytest.mark.parametrize("override, patterns", [
    ("fp8.keep_bf16=[layers.0,mtp.*]", ["layers.0", "mtp.*"]),
    ("fp8.keep_bf16=[*.attn.wo]", ["*.attn.wo"]),
])
def test_keep_bf16_patterns_reach_the_fp8_config(override, patterns):
    assert to_dataclasses(_compose("fp8=blockwise", override)).fp8.keep_bf16 == patterns


@pytest.mark.parametrize("override, error, words", [
    ("optim.lrr=1", ConfigCompositionException, "optim.lrr"),
    ("model.hiden_size=64", ConfigCompositionException, "model.hiden_size"),
    ("optim.lr=fast", ConfigCompositionException, "optim.lr"),
    ("train.steps=1.5", ConfigCompositionException, "train.steps"),
    ("model=huge", MissingConfigException, "model/huge"),
    ("fp8.narrow_mlp_min_tokens=8192", ConfigCompositionException, "narrow_mlp_min_tokens"),
    ("fp8.keep_bf16=layers.0", ConfigCompositionException, "fp8.keep_bf16"),
])
def test_bad_overrides_fail_at_composition_naming_the_key(override, error, words):
    with pytest.raises(error) as info:
        _compose(override)
    chain = str(info.value) + str(info.value.__cause__)
    assert words in chain


@pytest.mark.parametrize("overrides, words", [
    (["fp8.recipe=fp4"], "fp8.recipe"),
    (["fp8=blockwise", "fp8.linear_min_tokens=-1"], "fp8.linear_min_tokens"),
    (["fp8=blockwise", "fp8.mlp_min_tokens=-1"], "fp8.mlp_min_tokens"),
    (["fp8=blockwise", "fp8.experts_min_tokens=-512"], "fp8.experts_min_tokens"),
    (["model.n_group=3"], "n_group"),
    (["checkpoint.export_hf=false", "checkpoint.export_fp8=true"], "checkpoint.export_fp8"),
    (["fp8=blockwise", "fp8.keep_bf16=[layers.0,'']"], "fp8.keep_bf16"),
])
def test_bad_values_fail_in_the_owning_dataclass(overrides, words):
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        to_dataclasses(_compose(*overrides))


def test_files_corpus_needs_paths():
    c = to_dataclasses(_compose("data=files"))
    with pytest.raises(ValueError, match=r"data\.paths"):
        Corpus(c.data)


def test_other_ranks_compose_quietly(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pretrain", "optim.lr=1", "hydra.run.dir=/x"])
    monkeypatch.setenv("RANK", "0")
    launch.quiet_hydra_on_other_ranks()
    assert sys.argv == ["pretrain", "optim.lr=1", "hydra.run.dir=/x"]
    monkeypatch.setenv("RANK", "1")
    launch.quiet_hydra_on_other_ranks()
    assert sys.argv == ["pretrain", "optim.lr=1", *launch.QUIET_OVERRIDES]
    cfg = compose("pretrain", overrides=[*FIXED, *launch.QUIET_OVERRIDES], return_hydra_config=True)
    assert cfg.hydra.output_subdir is None
    assert cfg.hydra.job_logging.root.level == "ERROR" and cfg.hydra.run.dir == "."
