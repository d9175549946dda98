"""trainer.checkpoint: bitwise continuation after save/load, refusals, write-aside and pruning (CPU, 1 rank)."""
import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models import build_model, model_config
from test_engine import TINY, job  # noqa: F401  (job: the module-scoped process-group fixture)
from trainer import engine as eng
from trainer.balance import LoadBalancer
from trainer.checkpoint import CheckpointError, Checkpointer, complete_checkpoints
from trainer.config import CheckpointConfig
from trainer.data import TrainLoader
from trainer.optim import OptimConfig, build_optimizer, build_schedule
from trainer.pretrain import resume_point

ROWS = np.random.default_rng(0).integers(0, 256, size=(64, 17)).astype(np.uint16)


def _setup(seed, **model_overrides):
    torch.manual_seed(seed)
    cfg = model_config("debug", **{**TINY, **model_overrides})
    model = build_model(cfg)
    optim = OptimConfig(lr=3e-3, warmup_steps=2)
    ds = eng.deepspeed_config(eng.ParallelConfig(grad_accum=2), optim.grad_clip, 2, 1, "fp32")
    engine = eng.build_engine(model, build_optimizer(model, optim), build_schedule(optim, 8), ds)
    loader = TrainLoader(ROWS, micro_batch_size=2, grad_accum=2, rank=0, world_size=1, seed=0)
    return cfg, engine, LoadBalancer(engine.module.routers(), 1e-2), loader


def _steps(engine, balancer, loader, n):
    losses = []
    for _ in range(n):
        losses.append(eng.train_step(engine, loader.micro_batches(loader.step), eng.lm_loss, balancer)["loss/total"])
        loader.step += 1
    return losses


def test_resumed_engine_continues_bit_for_bit(job, tmp_path):
    cfg, engine, balancer, loader = _setup(seed=0)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, job=job)
    _steps(engine, balancer, loader, 2)
    saved = ckpt.save(engine, 2, loader, engine.module, cfg, "config: yes\n")
    torch.manual_seed(1234)  # the RNG state must come back from the checkpoint
    expected = _steps(engine, balancer, loader, 3)
    expected_params = copy.deepcopy(engine.module.state_dict())

    cfg2, fresh, balancer2, loader2 = _setup(seed=99)
    assert not torch.equal(next(fresh.module.parameters()), next(engine.module.parameters()))
    assert ckpt.latest() == saved
    assert ckpt.load(saved, fresh, loader2, fresh.module, cfg2) == 2
    assert loader2.step == 2
    moments = [s["exp_avg"].dtype for s in fresh.optimizer.optimizer.state.values()]
    assert moments and all(d == torch.bfloat16 for d in moments)
    assert _steps(fresh, balancer2, loader2, 3) == expected
    for name, value in fresh.module.state_dict().items():
        assert torch.equal(value, expected_params[name]), name


def test_refuses_other_shapes_and_corrupt_files_without_touching_them(job, tmp_path):
    cfg, engine, balancer, loader = _setup(seed=0)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, job=job)
    _steps(engine, balancer, loader, 1)
    path = ckpt.save(engine, 1, loader, engine.module, cfg, "")

    cfg_b, other, _, loader_b = _setup(seed=0, hidden_size=32)
    with pytest.raises(CheckpointError, match=r"model\.hidden_size: checkpoint 64 vs this run 32"):
        ckpt.load(path, other, loader_b, other.module, cfg_b)

    before = {p.name: p.stat().st_size for p in path.rglob("*") if p.is_file()}
    model_states = next(path.rglob("mp_rank_00_model_states.pt"))
    model_states.write_bytes(model_states.read_bytes()[:1000])
    cfg_c, again, _, loader_c = _setup(seed=0)
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load(path, again, loader_c, again.module, cfg_c)
    after = {p.name: p.stat().st_size for p in path.rglob("*") if p.is_file()}
    assert after == {**before, model_states.name: 1000}


def test_incomplete_saves_are_ignored_and_old_ones_pruned(job, tmp_path):
    cfg, engine, balancer, loader = _setup(seed=0)
    directory = tmp_path / "ckpt"
    ckpt = Checkpointer(directory, keep=2, job=job)
    for step in (1, 2, 3):
        _steps(engine, balancer, loader, 1)
        ckpt.save(engine, step, loader, engine.module, cfg, "")
    (directory / ".tmp_step_00000009").mkdir()
    (directory / "step_00000008").mkdir()  # renamed without meta.json cannot happen, but must not win
    assert [p.name for p in complete_checkpoints(directory)] == ["step_00000002", "step_00000003"]
    assert ckpt.latest().name == "step_00000003"
    assert (directory / "step_00000003" / "meta.json").is_file()
    assert {"config.yaml", "deepspeed", "meta.json", "rng_rank0.pt", "trainer_state.pt"} <= {
        p.name for p in (directory / "step_00000003").iterdir()}


def test_other_rank_count_is_refused(job, tmp_path):
    cfg, engine, balancer, loader = _setup(seed=0)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2, job=job)
    path = ckpt.save(engine, 0, loader, engine.module, cfg, "")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "world_size": 4}))
    with pytest.raises(CheckpointError, match="--nproc_per_node=4"):
        ckpt.load(path, engine, loader, engine.module, cfg)


def _fake_checkpoint(directory, step):
    path = directory / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "meta.json").write_text("{}")
    return path


def test_resume_point_rules(job, tmp_path):
    own, other = tmp_path / "own", tmp_path / "other"
    ckpt = Checkpointer(own, keep=2, job=job)

    def point(**kw):
        return resume_point(SimpleNamespace(checkpoint=CheckpointConfig(dir=str(own), **kw)), ckpt)

    assert point() is None and point(resume=False) is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        point(load_dir=str(other))
    theirs = _fake_checkpoint(other, 6)
    assert point(load_dir=str(other)) == theirs
    mine = _fake_checkpoint(own, 2)
    assert point() == mine and point(load_dir=str(other)) == mine, "own progress wins over the starting point"
    with pytest.raises(ValueError, match="already holds checkpoints"):
        point(resume=False)
