"""trainer.optim: AdamW against torch.optim.AdamW, the schedules against hand-computed values."""
import math

import pytest
import torch
from torch import nn

from trainer.optim import AdamW, OptimConfig, Schedule, build_optimizer, build_schedule, param_groups


def _run(opt_cls, params0, grads, **kw):
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = opt_cls([dict(params=params[:1], weight_decay=0.1), dict(params=params[1:], weight_decay=0.0)],
                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt


def _fresh(seed=0, steps=6):
    gen = torch.Generator().manual_seed(seed)
    params0 = [torch.randn(17, 33, generator=gen), torch.randn(33, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) * 10 ** torch.empty(()).uniform_(-3, 1, generator=gen)
              for p in params0] for _ in range(steps)]
    return params0, grads


def test_fp32_moments_match_torch_adamw_bitwise():
    params0, grads = _fresh(seed=1)
    ours, _ = _run(AdamW, params0, grads, moment_dtype=torch.float32)
    ref, _ = _run(torch.optim.AdamW, params0, grads, foreach=False)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_bf16_moments_close_to_fp32_and_stored_in_bf16():
    params0, grads = _fresh(seed=2)
    ours, opt = _run(AdamW, params0, grads, moment_dtype=torch.bfloat16)
    ref, _ = _run(torch.optim.AdamW, params0, grads, foreach=False)
    for a, b, p0 in zip(ours, ref, params0):
        moved = (b - p0).abs().max()
        assert moved > 1e-3
        assert (a - b).abs().max() <= 0.02 * moved
        assert not torch.equal(a, b), "bf16 moments should round differently from fp32"
        state = opt.state[a]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16


def test_rejects_low_precision_master_and_bad_args():
    p = torch.zeros(4, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(TypeError, match="FP32 master"):
        AdamW([p]).step()
    with pytest.raises(ValueError, match="moment_dtype"):
        build_optimizer(nn.Linear(2, 2), OptimConfig(moment_dtype="float16"))
    with pytest.raises(ValueError, match="betas"):
        AdamW([torch.zeros(2, requires_grad=True)], betas=(0.9, 1.0))


class _WithBias(nn.Module):
    def __init__(self, as_param: bool):
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)
        self.norm = nn.LayerNorm(4, bias=False)
        if as_param:
            self.expert_bias = nn.Parameter(torch.zeros(4))
        else:
            self.register_buffer("expert_bias", torch.zeros(4))


def test_param_groups_split_by_rank_and_refuse_bias_parameter():
    model = _WithBias(as_param=False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [model.proj.weight] and decay["weight_decay"] == 0.1
    assert no_decay["params"] == [model.norm.weight] and no_decay["weight_decay"] == 0.0
    with pytest.raises(TypeError, match="expert_bias"):
        param_groups(_WithBias(as_param=True), 0.1)


def test_cosine_schedule_values():
    s = Schedule("cosine", total_steps=110, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.0)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))


def test_wsd_schedule_values():
    s = Schedule("wsd", total_steps=100, warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    assert [s(i) for i in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert s(50) == 1.0 and s(79) == 1.0
    assert s(80) == pytest.approx(1 - 1 / 20) and s(89) == pytest.approx(0.5)
    assert s(99) == pytest.approx(0.0)


def test_schedule_errors_and_lambdalr_round_trip():
    with pytest.raises(ValueError, match="optim.schedule"):
        build_schedule(OptimConfig(schedule="linear"), 10)
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, OptimConfig(lr=1.0, warmup_steps=4, schedule="wsd"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, build_schedule(OptimConfig(warmup_steps=4, schedule="wsd"), 20))
    for _ in range(3):
        opt.step()
        sched.step()
    restored = torch.optim.lr_scheduler.LambdaLR(opt, build_schedule(OptimConfig(warmup_steps=4, schedule="wsd"), 20))
    restored.load_state_dict(sched.state_dict())
    assert restored.last_epoch == 3 and restored.get_last_lr() == pytest.approx([1.0, 1.0])


def test_state_dict_round_trip_keeps_bf16_moments_and_continues_identically():
    params0, grads = _fresh(seed=4, steps=4)
    straight, _ = _run(AdamW, params0, grads, moment_dtype=torch.bfloat16)
    half, opt = _run(AdamW, params0, grads[:2], moment_dtype=torch.bfloat16)
    state = opt.state_dict()
    params = [p.detach().clone().requires_grad_(True) for p in half]
    fresh = AdamW([dict(params=params[:1], weight_decay=0.1), dict(params=params[1:], weight_decay=0.0)],
                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, moment_dtype=torch.bfloat16)
    fresh.load_state_dict(state)
    assert fresh.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    for step_grads in grads[2:]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        fresh.step()
    for a, b in zip(params, straight):
        assert torch.equal(a, b)


@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_chunked_update_is_bitwise_the_whole_tensor_update(monkeypatch, moment_dtype):
    import trainer.optim as optim_module
    params0, grads = _fresh(seed=5, steps=3)
    whole, _ = _run(AdamW, params0, grads, moment_dtype=moment_dtype)
    monkeypatch.setattr(optim_module, "UPDATE_CHUNK", 100)  # 17x33 = 561 elements -> 6 chunks
    chunked, _ = _run(AdamW, params0, grads, moment_dtype=moment_dtype)
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b)
    if moment_dtype == torch.float32:
        ref, _ = _run(torch.optim.AdamW, params0, grads, foreach=False)
        assert all(torch.equal(a, b) for a, b in zip(chunked, ref))
