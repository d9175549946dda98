"""trainer.engine: the DeepSpeed-wrapped train step on CPU (gloo, one process).

Checks against independent recomputation: gradient accumulation over two micro-batches equals one
step on their concatenation; the router biases move once per optimizer step by gamma*sign computed
from the counts of both micro-batches; bf16 wrapping leaves FP32 buffers FP32 and bit-identical;
trainer/zero_clip.py's gradient norm and clip, and trainer/zero_step.py's step with the FP32
copies folded into AdamW, give DeepSpeed's own step bit for bit, skip a step with a NaN gradient
as it does, and leave what they do not cover (ZeRO stage 0; FP32 weights) to DeepSpeed, saying so.
"""
import copy
import gc
import logging
import os

import pytest
import torch

from models import build_model, model_config
from trainer import engine as eng, zero_clip, zero_step
from trainer.balance import LoadBalancer, bias_delta, max_vio
from trainer.optim import OptimConfig, build_optimizer, build_schedule

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, first_k_dense=1, intermediate_size=128,
            num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
            topk_group=1, max_position_embeddings=64)


ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def job():
    """One-process group for the whole session (DeepSpeed cannot re-initialize after a destroy); the
    torchrun-style variables DeepSpeed reads exist only during each test, so no later test sees them."""
    saved = {key: os.environ.pop(key) for key in ENV if key in os.environ}
    yield eng.init_distributed()
    for key in ENV:
        os.environ.pop(key, None)
    os.environ.update(saved)


def _engine(grad_accum=1, micro=2, precision="fp32", seed=0, zero_stage=1, grad_clip=1.0,
            fused_grad_clip=True, fused_zero_step=True):
    torch.manual_seed(seed)
    model = build_model(model_config("debug", **TINY))
    optim = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=grad_clip)
    ds = eng.deepspeed_config(eng.ParallelConfig(zero_stage=zero_stage, grad_accum=grad_accum), optim.grad_clip,
                              micro, 1, precision)
    engine = eng.build_engine(model, build_optimizer(model, optim), build_schedule(optim, 10), ds,
                              fused_grad_clip, fused_zero_step)
    return engine, LoadBalancer(engine.module.routers(), 1e-3)


def _batch(n, seed, seq=16):
    rows = torch.randint(0, 256, (n, seq + 1), generator=torch.Generator().manual_seed(seed))
    return {"tokens": rows[:, :-1], "labels": rows[:, 1:]}


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_accumulating_two_micro_batches_equals_one_step_on_both(job, zero_stage):
    a, b = _batch(2, 1), _batch(2, 2)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    eng_acc, bal_acc = _engine(grad_accum=2, micro=2, zero_stage=zero_stage)
    eng_one, bal_one = _engine(grad_accum=1, micro=4, zero_stage=zero_stage)
    m_acc = eng.train_step(eng_acc, [a, b], eng.lm_loss, bal_acc)
    m_one = eng.train_step(eng_one, [both], eng.lm_loss, bal_one)
    assert eng_acc.global_steps == eng_one.global_steps == 1
    assert m_acc["loss/total"] == pytest.approx(m_one["loss/total"], rel=1e-5)
    if zero_stage > 0:  # DeepSpeed's stage-0 path clips without reporting the norm
        assert m_acc["optim/grad_norm"] == pytest.approx(m_one["optim/grad_norm"], rel=1e-4)
    for (name, p), q in zip(eng_acc.module.named_parameters(), eng_one.module.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)  # lr 1e-2: 0.1% of a step
    for r, s in zip(eng_acc.module.routers(), eng_one.module.routers()):
        assert torch.equal(r.expert_bias, s.expert_bias)


def test_bias_moves_once_per_step_from_the_summed_counts(job):
    engine, balancer = _engine(grad_accum=2, micro=2, seed=3)
    a, b = _batch(2, 5), _batch(2, 6)
    before = copy.deepcopy(engine.module)
    with torch.no_grad():
        counts = before(a["tokens"], a["labels"]).expert_counts + before(b["tokens"], b["labels"]).expert_counts
    metrics = eng.train_step(engine, [a, b], eng.lm_loss, balancer)
    for layer, (r, r0) in enumerate(zip(engine.module.routers(), before.routers())):
        expected = r0.expert_bias + bias_delta(counts[layer], 1e-3)
        assert torch.equal(r.expert_bias, expected)
        assert r.expert_bias.dtype == torch.float32
    assert metrics["balance/maxvio_batch"] == pytest.approx(max_vio(counts).mean().item())
    assert counts.sum().item() == 2 * 2 * 16 * 2 * len(balancer.routers)  # tokens x top-k x routers
    assert metrics["optim/lr"] == pytest.approx(1e-2)


class _RecordThreading(torch.autograd.Function):
    """Identity whose backward notes whether multithreaded backward was on where it ran."""
    seen: list = []

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _RecordThreading.seen.append(torch._C._is_multithreading_enabled())
        return g


@pytest.mark.parametrize("threaded", [False, True])
def test_backward_threading_follows_the_setting(job, threaded):
    """parallel.threaded_backward reaches the backward (off: the loop's own thread), and the
    caller's setting is back as it was afterwards."""
    engine, balancer = _engine()

    def loss_fn(model, batch):
        terms = eng.lm_loss(model, batch)
        return terms._replace(loss=_RecordThreading.apply(terms.loss))
    _RecordThreading.seen.clear()
    before = torch._C._is_multithreading_enabled()
    eng.train_step(engine, [_batch(2, 4)], loss_fn, balancer, threaded_backward=threaded)
    assert _RecordThreading.seen == [threaded]
    assert torch._C._is_multithreading_enabled() == before


def _fp32_masters(engine) -> list[torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param  # after trainer.engine picked a device
    return [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]


@pytest.mark.parametrize("zero_stage,precision,grad_clip,fold_copies",
                         [(1, "bf16", 0.05, False), (2, "bf16", 1.0, False),
                          (1, "fp32", 1.0, False), (2, "fp32", 0.0, False),
                          (1, "bf16", 0.05, True), (2, "bf16", 1.0, True), (1, "bf16", 0.0, True)])
def test_fused_step_is_deepspeeds_step_bit_for_bit(job, zero_stage, precision, grad_clip,
                                                   fold_copies):
    """trainer/zero_clip.py's norm (float64 norms read from the gradients as they lie) and clip
    (folded into AdamW's read of the gradient), alone and with trainer/zero_step.py (AdamW reading
    the bf16 gradients where they lie and writing the bf16 weights; under ZeRO-1 no reduction on
    this one rank), against DeepSpeed's own code: after three steps the same FP32 masters, the
    same bf16 weights and the same logged norms, bit for bit, with clipping on every step (0.05),
    on some (1.0) and off."""
    _fused_step_against_deepspeed(zero_stage, precision, grad_clip, fold_copies, steps=3,
                                  exact=True)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_fused_step_accumulating_two_micro_batches_is_deepspeeds_bit_for_bit(job, zero_stage):
    """The same with two micro-batches a step (bf16 gradients accumulated by autograd; under
    ZeRO-1 on one rank without DeepSpeed's bucket copies and reduction)."""
    _fused_step_against_deepspeed(zero_stage, "bf16", 0.05, True, steps=2, exact=True,
                                  grad_accum=2)


@pytest.mark.gpu
def test_gpu_fused_step_matches_deepspeed(job):
    """The same on the GPU, bf16 ZeRO-1 with clipping on every step, one step: CUDA's float64 norm
    kernels may sum in another order than DeepSpeed's, so the norms agree to 1e-6 and the masters to
    1e-4 of a step (lr 1e-2)."""
    _fused_step_against_deepspeed(1, "bf16", 0.05, True, steps=1, exact=False)


@pytest.mark.gpu
def test_gpu_train_step_returns_while_the_optimizer_step_runs(job):
    """train_step copies everything it reports to the host ahead of the optimizer's kernels and
    waits for those copies only: with the AdamW step held up on the GPU (a 0.1 s sleep kernel
    queued ahead of it), train_step has returned its metrics while the GPU is still busy with that
    step. Then the next step's batch goes up from pinned memory without waiting either."""
    engine, balancer = _engine(precision="bf16")
    assert engine.device.type == "cuda" and zero_step.installed(engine)
    adamw = engine.optimizer.optimizer
    step = adamw.step

    def held_up_step(*args, **kwargs):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles ahead of AdamW's kernels
        return step(*args, **kwargs)
    adamw.step = held_up_step
    for seed in (38, 39, 40):  # warm-up past the third step, where DeepSpeed's timers begin
        eng.train_step(engine, [_batch(2, seed)], eng.lm_loss, balancer)
    torch.cuda.synchronize()
    metrics = eng.train_step(engine, [_batch(2, 41)], eng.lm_loss, balancer)
    assert not torch.cuda.current_stream().query(), "train_step waited for the optimizer step"
    batch = eng._to_device(_batch(2, 42), engine.device)
    assert not torch.cuda.current_stream().query(), "the batch upload waited for the GPU"
    torch.cuda.synchronize()
    assert 0 < metrics["optim/grad_norm"] < float("inf") and metrics["loss/total"] > 0
    assert batch["tokens"].is_cuda


def test_train_steps_never_ask_the_accelerator_to_synchronize(job, monkeypatch):
    """DeepSpeed's throughput timer synchronized the device at every forward and every
    engine.step() from the third step on, so the host never ran ahead of the GPU there
    (eng.deepspeed_config turns the timer off). Counted through the accelerator object DeepSpeed
    calls, over steps past the timer's start, with and without accumulation: no call. Engines
    left unreachable (the loop's previous one, earlier tests') are collected before counting:
    a DeepSpeed engine's __del__ destroys its ZeRO optimizer, which synchronizes, and the garbage
    collector may otherwise run it inside the counted steps (it did, once in a CI run)."""
    from deepspeed.accelerator import get_accelerator
    for grad_accum in (1, 2):
        engine, balancer = _engine(grad_accum=grad_accum)
        gc.collect()
        calls = []
        monkeypatch.setattr(get_accelerator(), "synchronize", lambda *a, **k: calls.append(a))
        for step in range(4):
            batches = [_batch(2, 60 + 2 * step + i) for i in range(grad_accum)]
            eng.train_step(engine, batches, eng.lm_loss, balancer)
        monkeypatch.undo()
        assert engine.global_steps == 4
        assert not calls, f"{len(calls)} synchronizations in 4 steps, grad_accum={grad_accum}"


@pytest.mark.gpu
def test_gpu_host_copies_wait_for_themselves_only():
    """HostCopies hands back the values computed before it (behind a sleep kernel, so not yet
    when it is made) while a sleep kernel queued after it still runs."""
    torch.cuda._sleep(20_000_000)
    values = torch.randn(3, 5, device="cuda") * 2
    copies = eng.HostCopies({"v": values, "n": values.sum(dim=1).long()})
    torch.cuda._sleep(400_000_000)  # ~0.2 s queued behind the copies
    host = copies.get()
    assert not torch.cuda.current_stream().query(), "get() waited for work queued after it"
    assert host["v"].device.type == "cpu" and host["v"].is_pinned()
    torch.cuda.synchronize()
    assert torch.equal(host["v"], values.cpu())
    assert torch.equal(host["n"], values.sum(dim=1).long().cpu())


@pytest.mark.gpu
def test_gpu_forward_and_backward_make_no_host_sync(job, monkeypatch):
    """A micro-batch's forward and backward (bf16, one rank) make no call that waits for the GPU
    (CUDA's sync debug mode raises at the first) and call no torch.cuda.synchronize() (which that
    mode lets through: DeepSpeed's throughput timer did, from the third step on), so train_step's
    only waits are for its metrics' copies and the gradient norm, both ahead of AdamW. The rotary
    tables' pageable copy was one until the eighteenth session; profile_step.py --syncs lists a
    whole step's."""
    engine, balancer = _engine(precision="bf16")
    batch = eng._to_device(_batch(2, 50), engine.device)
    for seed in range(3):  # first calls compile and tune kernels, which may wait
        eng.train_step(engine, [_batch(2, 51 + seed)], eng.lm_loss, balancer)
    torch.cuda.synchronize()
    explicit = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: explicit.append(a))
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = eng.lm_loss(engine, batch)
        eng.backward(engine, terms.loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()
    torch.cuda.synchronize()
    assert not explicit, f"{len(explicit)} torch.cuda.synchronize() calls in forward + backward"
    assert torch.isfinite(terms.loss)


def _fused_step_against_deepspeed(zero_stage, precision, grad_clip, fold_copies, steps, exact,
                                  grad_accum=1):
    runs = {}
    for fused in (True, False):
        engine, balancer = _engine(precision=precision, zero_stage=zero_stage, grad_clip=grad_clip,
                                   fused_grad_clip=fused, fused_zero_step=fused and fold_copies,
                                   seed=11, grad_accum=grad_accum)
        assert zero_clip.installed(engine) is fused
        assert zero_step.installed(engine) is (fused and fold_copies and precision == "bf16")
        assert zero_step.reduction_skipped(engine) is (fused and fold_copies and zero_stage == 1)
        metrics = [eng.train_step(engine, [_batch(2, 20 + 2 * i + j) for j in range(grad_accum)],
                                  eng.lm_loss, balancer) for i in range(steps)]
        norms = [m["optim/grad_norm"] for m in metrics]
        weights = [p.detach().clone() for p in engine.module.parameters()]
        runs[fused] = norms, _fp32_masters(engine), weights
    (norms, masters, weights), (ds_norms, ds_masters, ds_weights) = runs[True], runs[False]
    assert norms == (ds_norms if exact else pytest.approx(ds_norms, rel=1e-6))
    if grad_clip:
        assert any(n > grad_clip for n in norms), f"clipping never acted: {norms}"
    for ours, theirs in zip(masters + weights, ds_masters + ds_weights):
        if exact:
            assert torch.equal(ours, theirs)
        else:
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    for weight, master in zip(weights, masters):  # the model reads its masters, rounded
        assert torch.equal(weight, master.to(weight.dtype))


_TWO_RANKS = r'''
import json, sys
import torch
from deepspeed.utils import safe_get_full_fp32_param
from models import build_model, model_config
from trainer import engine as eng, zero_step
from trainer.balance import LoadBalancer
from trainer import optim as optim_module
from trainer.optim import OptimConfig, build_optimizer, build_schedule

tiny, stage, kernels = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "kernels"
job = eng.init_distributed()
one_launches = []
step_pieces = optim_module._launch_pieces  # AdamW's one launch for ZeRO's gradient pieces
optim_module._launch_pieces = lambda *a, **k: one_launches.append(1) or step_pieces(*a, **k)
runs = []
for fold in (True, False):
    torch.manual_seed(11)
    model = build_model(model_config("debug", **tiny))
    optim = OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=0.05)
    ds = eng.deepspeed_config(eng.ParallelConfig(zero_stage=stage), optim.grad_clip, 2,
                              job.world_size, "bf16")
    adamw = build_optimizer(model, optim)
    adamw.fused = True if kernels else None  # the Triton kernels, under the CPU's interpreter
    engine = eng.build_engine(model, adamw, build_schedule(optim, 10), ds, True, fold)
    assert zero_step.installed(engine) is fold
    balancer = LoadBalancer(engine.module.routers(), 1e-3)
    norms = []
    for i in range(3):
        seed = torch.Generator().manual_seed(job.rank * 10 + i)
        rows = torch.randint(0, 256, (2, 17), generator=seed)
        batch = {"tokens": rows[:, :-1], "labels": rows[:, 1:]}
        norms.append(eng.train_step(engine, [batch], eng.lm_loss, balancer)["optim/grad_norm"])
    assert len(one_launches) == (3 * len(adamw.param_groups) if fold and kernels else 0)
    one_launches.clear()
    runs.append((norms, [safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()],
                 [p.detach().clone() for p in engine.module.parameters()]))
(norms, masters, weights), (ds_norms, ds_masters, ds_weights) = runs
assert norms == ds_norms, (norms, ds_norms)
assert all(torch.equal(a, b) for a, b in zip(masters + weights, ds_masters + ds_weights))
assert all(torch.equal(w, m.to(w.dtype)) for w, m in zip(weights, masters))
print(f"rank {job.rank} of {job.world_size}: same as DeepSpeed's step, norms {norms}")
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # a rank leaving without it may abort the other
'''


@pytest.mark.parametrize("zero_stage,adamw", [(1, "torch"), (2, "torch"), (1, "kernels"),
                                              (2, "kernels")])
def test_fused_zero_step_on_two_ranks_is_deepspeeds_step_bit_for_bit(tmp_path, zero_stage, adamw):
    """Two gloo ranks under torchrun, bf16: each rank's partition (the first flattened as it is,
    the last padded to the partition size) stepped by AdamW from the bf16 gradient gives the same
    masters, weights and norms as DeepSpeed's own step, bit for bit, after three steps. With
    `kernels` AdamW runs its Triton kernels (the interpreter): ours steps ZeRO's pieces, parameters
    cut at the partition boundary and the padding's zeros among them, in one launch of
    adamw_pieces_kernel, DeepSpeed's step its flat FP32 copy with adamw_kernel."""
    import json
    import subprocess
    import sys
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), json.dumps(TINY), str(zero_stage),
                           adamw],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("same as DeepSpeed's step") == 2, proc.stdout[-3000:]


def test_fused_grad_clip_skips_a_step_with_a_nan_gradient(job):
    """A NaN in one gradient: the norm is inf, the step is skipped (masters untouched, DeepSpeed
    counts it), and the next clean step updates again."""
    engine, balancer = _engine(precision="bf16")
    assert zero_clip.installed(engine) and zero_step.installed(engine)
    first = next(engine.module.parameters())
    hook = first.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), float("nan")))
    before = _fp32_masters(engine)
    metrics = eng.train_step(engine, [_batch(2, 30)], eng.lm_loss, balancer)
    assert metrics["optim/grad_norm"] == float("inf") and engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(_fp32_masters(engine), before))
    hook.remove()
    metrics = eng.train_step(engine, [_batch(2, 31)], eng.lm_loss, balancer)
    assert 0 < metrics["optim/grad_norm"] < float("inf") and engine.skipped_steps == 1
    assert not torch.equal(_fp32_masters(engine)[0], before[0])


def test_fused_grad_clip_leaves_stage_0_to_deepspeed_and_says_so(job, caplog):
    with caplog.at_level(logging.INFO, logger="trainer"):
        engine, _ = _engine(zero_stage=0, precision="bf16")
    assert not zero_clip.installed(engine) and not zero_step.installed(engine)
    assert "left to DeepSpeed" in caplog.text and "not the ZeRO-1/2 optimizer" in caplog.text
    assert "zero_clip.py's norm and clip are not installed" in caplog.text


@pytest.mark.parametrize("precision,fused_grad_clip,why", [
    ("fp32", True, "weights are torch.float32, not bf16"),
    ("bf16", False, "zero_clip.py's norm and clip are not installed")])
def test_fused_zero_step_says_why_it_is_not_installed(job, caplog, precision, fused_grad_clip,
                                                      why):
    with caplog.at_level(logging.INFO, logger="trainer.zero_step"):
        engine, _ = _engine(precision=precision, fused_grad_clip=fused_grad_clip)
    assert not zero_step.installed(engine)
    assert "left to DeepSpeed" in caplog.text and why in caplog.text


def test_bf16_engine_keeps_fp32_buffers_bit_identical_and_trains(job):
    torch.manual_seed(0)
    reference = build_model(model_config("debug", **TINY))
    for r in reference.routers():
        r.expert_bias.normal_(0, 0.3)
    model = copy.deepcopy(reference)
    optim = OptimConfig(lr=1e-2)
    ds = eng.deepspeed_config(eng.ParallelConfig(), optim.grad_clip, 2, 1, "bf16")
    engine = eng.build_engine(model, build_optimizer(model, optim), build_schedule(optim, 10), ds)
    assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    for r, r0 in zip(engine.module.routers(), reference.routers()):
        assert r.expert_bias.dtype == torch.float32 and torch.equal(r.expert_bias, r0.expert_bias)
    metrics = eng.train_step(engine, [_batch(2, 9)], eng.lm_loss, LoadBalancer(engine.module.routers(), 1e-3))
    assert torch.isfinite(torch.tensor(metrics["loss/total"]))
    assert all(r.expert_bias.dtype == torch.float32 for r in engine.module.routers())


def test_keep_fp32_buffers_restores_a_cast_buffer():
    module = torch.nn.Module()
    module.sub = torch.nn.Module()
    module.sub.register_buffer("expert_bias", torch.tensor([0.3001, -1.25e-3]))
    saved = {"sub.expert_bias": module.sub.expert_bias.clone()}
    module.sub.to(torch.bfloat16)
    assert module.sub.expert_bias.dtype == torch.bfloat16
    eng.keep_fp32_buffers(module, saved)
    assert module.sub.expert_bias.dtype == torch.float32 and torch.equal(module.sub.expert_bias, saved["sub.expert_bias"])


def test_evaluate_matches_direct_forward(job):
    engine, _ = _engine(seed=4)
    batches = [_batch(2, 11), _batch(2, 12)]
    metrics = eng.evaluate(engine.module, batches, job.device)
    with torch.no_grad():
        outs = [engine.module(b["tokens"], b["labels"]) for b in batches]
    expected = sum(o.lm_loss.item() for o in outs) / 2
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-6)
    counts = outs[0].expert_counts + outs[1].expert_counts
    assert metrics["val/maxvio_global"] == pytest.approx(max_vio(counts).mean().item())


def test_bad_engine_settings_are_refused(job):
    with pytest.raises(ValueError, match="zero_stage"):
        eng.deepspeed_config(eng.ParallelConfig(zero_stage=3), 1.0, 2, 1, "fp32")
    with pytest.raises(ValueError, match="parallel.precision"):
        eng.resolve_precision("fp16", torch.device("cpu"))
    assert eng.resolve_precision("auto", torch.device("cpu")) == "fp32"
    engine, balancer = _engine(grad_accum=2)
    with pytest.raises(ValueError, match="micro-batches"):
        eng.train_step(engine, [_batch(2, 1)], eng.lm_loss, balancer)
