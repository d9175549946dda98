"""`python -m trainer.pretrain` end to end, in subprocesses as a user runs it (CPU, gloo).

The main job on a few steps; a run killed mid-way and resumed gives bitwise the losses of the
uninterrupted run; 2 torchrun ranks give the losses of 1 rank with twice the accumulation; a
diverging run stops naming the step and the last good checkpoint; a corrupt checkpoint is refused
with nothing overwritten; multirun sweeps; a mistyped override.
"""
import json
import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["model.vocab_size=512", "model.hidden_size=64", "model.num_hidden_layers=2",
              "model.intermediate_size=128", "model.num_attention_heads=2", "model.q_lora_rank=32",
              "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
              "model.v_head_dim=16", "model.n_routed_experts=4", "model.moe_intermediate_size=32",
              "model.max_position_embeddings=64"]
QUIET = ["logger.mode=disabled", "logger.progress=false", "logger.log_every=1", "checkpoint.export_hf=false"]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("TORCHELASTIC")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    return env


def _pretrain(args, cwd, launcher=(sys.executable, "-m")):
    return subprocess.run([*launcher, "trainer.pretrain", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(run_dir: Path) -> dict[int, dict]:
    """step -> merged metrics; a step logged again after a resume replaces the earlier row."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], {}).update(row)
    return rows


def _listing(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Sizes and mtimes of the checkpoints and metrics (Hydra rewrites its own .hydra/ files each launch)."""
    files = [run_dir / "metrics.jsonl", *(run_dir / "checkpoints").rglob("*")]
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Overrides for a tiny model on a small JSONL corpus cut from a few stdlib modules."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in ("argparse.py", "functools.py", "textwrap.py", "shlex.py", "string.py"):
        text = (stdlib / name).read_text()
        docs += [text[i:i + 1500] for i in range(0, len(text), 1500)]
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return [*TINY_MODEL, "data=files", f"data.paths=[{corpus}]", f"data.cache_dir={root / 'cache'}",
            "data.seq_len=32", "data.micro_batch_size=2", "data.val_fraction=0.1", "train.eval_rows=16",
            *QUIET]


@pytest.fixture(scope="module")
def reference_run(tiny, tmp_path_factory):
    """An uninterrupted 8-step run, checkpoints every 2 steps."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _ok(_pretrain([*tiny, "train.steps=8", "train.eval_every=4", "checkpoint.every=2",
                   f"hydra.run.dir={run_dir}"], cwd=ROOT))
    return run_dir


def test_default_job_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    proc = _ok(_pretrain(["train.steps=4", "train.eval_every=2", "checkpoint.every=2", "train.eval_rows=32",
                          "logger.progress=false", f"hydra.run.dir={run_dir}"], cwd=tmp_path))
    rows = _metrics(run_dir)
    assert rows[4]["val/loss"] < rows[0]["val/loss"], proc.stdout
    assert {"loss/lm", "loss/mtp", "loss/balance", "optim/lr", "optim/grad_norm", "perf/tokens_per_s",
            "balance/maxvio_batch", "balance/bias_std/layer0", "load/layer0/expert0"} <= set(rows[1])
    assert [p.name for p in sorted((run_dir / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]
    assert (run_dir / "hf" / "config.json").is_file() and (run_dir / "hf" / "model.safetensors").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_killed_run_resumes_bitwise(tiny, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    args = [*tiny, "train.steps=8", "train.eval_every=4", "checkpoint.every=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer.pretrain", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "saved checkpoint" in line:
            break
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _ok(_pretrain(args, cwd=ROOT))
    assert "resumed at step" in resumed.stdout
    ours, reference = _metrics(run_dir), _metrics(reference_run)
    assert sorted(ours) == sorted(reference)
    for step, row in reference.items():
        for key in ("loss/total", "loss/lm", "loss/mtp", "val/loss", "balance/maxvio_batch"):
            assert ours[step].get(key) == row.get(key), (step, key)


def test_two_torchrun_ranks_match_one_rank_with_twice_the_accumulation(tiny, tmp_path):
    common = [*tiny, "train.steps=4", "train.eval_every=2", "checkpoint.every=4"]
    one = tmp_path / "one"
    _ok(_pretrain([*common, "parallel.grad_accum=2", f"hydra.run.dir={one}"], cwd=ROOT))
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m")
    _ok(_pretrain([*common, "parallel.grad_accum=1"], cwd=tmp_path, launcher=torchrun))
    runs = list((tmp_path / "outputs" / "pretrain").iterdir())
    assert len(runs) == 1, f"ranks must share one run dir, got {runs}"
    two = runs[0]
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= {p.name for p in (two / "checkpoints" / "step_00000004").iterdir()}
    m1, m2 = _metrics(one), _metrics(two)
    for step in (1, 2, 3, 4):
        for key in ("loss/total", "loss/lm", "loss/mtp"):
            if key in m1[step]:
                assert m2[step][key] == pytest.approx(m1[step][key], rel=2e-5, abs=1e-6), (step, key)
        # each rank's ZeRO-1 partition holds half the gradient: its norm is summed over the ranks
        norm, one_rank_norm = m2[step]["optim/grad_norm"], m1[step]["optim/grad_norm"]
        assert norm == pytest.approx(one_rank_norm, rel=1e-4), step
    for step in (0, 2, 4):
        assert m2[step]["val/loss"] == pytest.approx(m1[step]["val/loss"], rel=2e-5)


def test_diverging_run_stops_naming_step_and_last_checkpoint(tiny, tmp_path):
    run_dir = tmp_path / "run"
    proc = _pretrain([*tiny, "optim.lr=1e36", "optim.warmup_steps=0", "optim.grad_clip=0", "train.steps=20",
                      "checkpoint.every=1", f"hydra.run.dir={run_dir}"], cwd=ROOT)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "NonFiniteLoss" in out and "Last good checkpoint" in out, out[-2000:]
    step = int(re.search(r"is (?:nan|inf) at step (\d+);", out).group(1))
    assert 1 < step < 20 and f"step_{step - 1:08d}" in out
    assert not (run_dir / "checkpoints" / f"step_{step:08d}").exists()


def test_corrupt_checkpoint_is_refused_untouched(tiny, reference_run, tmp_path):
    """(A checkpoint of another model shape takes the same path: tests/test_checkpoint.py.)"""
    corrupt = tmp_path / "corrupt"
    subprocess.run(["cp", "-r", str(reference_run), str(corrupt)], check=True)
    latest = sorted((corrupt / "checkpoints").iterdir())[-1]
    state = latest / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = _listing(corrupt)
    proc = _pretrain([*tiny, "train.steps=12", f"hydra.run.dir={corrupt}"], cwd=ROOT)
    assert proc.returncode != 0 and "is corrupt" in proc.stderr and latest.name in proc.stderr, proc.stderr
    assert _listing(corrupt) == before


def test_multirun_sweep_runs_each_job(tiny, tmp_path):
    sweep = tmp_path / "sweep"
    _ok(_pretrain(["-m", *tiny, "train.steps=2", "train.eval_every=2", "checkpoint.every=0",
                   "optim.lr=1e-3,1e-2", "optim.warmup_steps=0", f"hydra.sweep.dir={sweep}"], cwd=ROOT))
    finals = [_metrics(sweep / str(job))[2]["loss/total"] for job in (0, 1)]
    assert finals[0] != finals[1]
    assert (sweep / "1" / "checkpoints" / "step_00000002" / "meta.json").is_file()


def test_mistyped_override_names_the_key(tmp_path):
    proc = _pretrain(["optim.lrr=1e-3"], cwd=tmp_path)
    assert proc.returncode != 0 and "optim.lrr" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_any_saved_step_exports_like_the_end_of_the_run(tiny, tmp_path):
    """`python -m trainer.checkpoint`: the latest step of a finished run exports bitwise what the
    run itself exported at its end (here its FP8 blocks, with the run's power-of-two scales); an
    earlier step exports too; a step that is not there is named with the ones that are."""
    from safetensors.torch import load_file
    from trainer.checkpoint import CheckpointError, main as export_checkpoint
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny if not o.startswith("checkpoint.export_hf")]
    _ok(_pretrain([*overrides, "train.steps=4", "train.eval_every=4", "checkpoint.every=2",
                   "checkpoint.export_fp8=true", "fp8.pow2_scales=true",
                   f"hydra.run.dir={run_dir}"], cwd=ROOT))
    out = export_checkpoint([str(run_dir / "checkpoints"), str(tmp_path / "hf"), "--fp8"])
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(
        str(run_dir / "hf" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert any(t.dtype == torch.float8_e4m3fn for t in ours.values())
    assert all(torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8))
               if ours[k].dtype == torch.float8_e4m3fn else torch.equal(ours[k], theirs[k])
               for k in ours)
    assert (out / "config.json").read_text() == (run_dir / "hf" / "config.json").read_text()
    early = export_checkpoint([str(run_dir / "checkpoints"), str(tmp_path / "hf2"), "--step", "2"])
    assert not torch.equal(load_file(str(early / "model.safetensors"))["lm_head.weight"],
                           theirs["lm_head.weight"].to(torch.bfloat16))
    with pytest.raises(CheckpointError, match=r"no complete checkpoint of step 3.*\[2, 4\]"):
        export_checkpoint([str(run_dir / "checkpoints"), str(tmp_path / "x"), "--step", "3"])
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        export_checkpoint([str(tmp_path), str(tmp_path / "y")])
