"""trainer.optim: AdamW against torch.optim.AdamW, the fused kernel against a float64-per-op
reference (bitwise) and against the torch path (within stated roundings), the schedules against
hand-computed values.

The fused kernel runs under Triton's interpreter on the CPU (importing trainer.optim without CUDA
sets TRITON_INTERPRET=1) and compiled on a GPU; `gpu` tests repeat the checks at 10M elements.
"""
import math
import os

import pytest
import torch
from torch import nn

from trainer.optim import (AdamW, OptimConfig, Schedule, adamw_update, adamw_update_pieces,
                           build_optimizer, build_schedule, param_groups)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RAGGED = 4133  # not a multiple of the kernel's block


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


# ---------------------------------------------------------------------------------------------
# the fused kernel


def reference_step(p, grad, exp_avg, exp_avg_sq, *, lr, betas, eps, weight_decay, step):
    """The fused kernel's arithmetic in torch: each operation done in float64 on FP32 values and rounded
    to FP32, which is exactly the correctly rounded FP32 operation (53 >= 2 * 24 + 2 bits; Figueroa
    1995), scalars rounded to FP32 like kernel arguments, moments stored with torch's bf16 rounding.
    CPU only (CUDA divides by a CPU scalar through its reciprocal). Returns new (p, exp_avg, exp_avg_sq)."""
    beta1, beta2 = betas
    c = lambda x: torch.tensor(x, dtype=torch.float32).double()  # noqa: E731
    r = lambda x: x.float().double()  # noqa: E731
    moment_dtype = exp_avg.dtype
    p, grad, m, v = (t.double() for t in (p, grad, exp_avg, exp_avg_sq))
    p = r(p * c(1 - lr * weight_decay))
    m = r(m + r(c(1 - beta1) * r(grad - m)))
    v = r(r(v * c(beta2)) + r(r(c(1 - beta2) * grad) * grad))
    denom = r(r(r(v.sqrt()) / c((1 - beta2 ** step) ** 0.5)) + c(eps))
    p = r(p + r(r(c(-lr / (1 - beta1 ** step)) * m) / denom))
    return p.float(), m.to(moment_dtype), v.to(moment_dtype)


def _state(n, moment_dtype, seed, device="cpu"):
    """Random p, grad and moments (grad and moments over several decades, v >= 0), as after a few steps."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10 ** torch.empty(n).uniform_(-4, 1, generator=gen)
    p = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen) * scale
    m = (0.3 * torch.randn(n, generator=gen) * scale).to(moment_dtype)
    v = (torch.rand(n, generator=gen) * scale ** 2).to(moment_dtype)
    return [t.to(device) for t in (p, grad, m, v)]


HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def _grads(n, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) * 10 ** torch.empty(n).uniform_(-4, 1, generator=gen)
            for _ in range(steps)]


def _fused_matches_reference(n, moment_dtype, weight_decay, steps=3):
    """`steps` kernel calls on DEVICE, the reference beside them on the CPU: bitwise equal after each."""
    ref = _state(n, moment_dtype, seed=n + 10)
    p, grad, m, v = (t.to(DEVICE) for t in ref)
    ref = (ref[0], ref[2], ref[3])
    for step, grad in enumerate(_grads(n, steps, seed=n + 11), start=1):
        ref = reference_step(ref[0], grad, *ref[1:], **HYPER, weight_decay=weight_decay, step=step)
        adamw_update(p, grad.to(DEVICE), m, v, **HYPER, weight_decay=weight_decay, step=step)
        for name, ours, want in zip(("p", "exp_avg", "exp_avg_sq"), (p, m, v), ref):
            assert ours.dtype == want.dtype, name
            assert torch.equal(ours.cpu(), want), f"{name} differs at step {step}"


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_is_bitwise_the_reference(moment_dtype, weight_decay):
    _fused_matches_reference(RAGGED, moment_dtype, weight_decay)


def _bits(t):
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32).long()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets inf and NaN
def test_fused_bf16_rounding_is_torchs_round_to_nearest_even():
    """beta1 = beta2 = 0 from zero moments makes the new moments g and g*g exactly, so the stored bf16
    values must be torch's own rounding of them: ties to even both ways, carries into the exponent,
    overflow to inf, subnormals, inf and NaN, then random bit patterns."""
    special = torch.tensor([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x3FFFFFFF, 0x7F7FFFFF,
                            0xBF808000, 0xBF818000, 0x00008000, 0x00018000, 0x00017FFF, 0x00800000,
                            0x7F800000, 0xFF800000, 0x7FC00000, 0x3F800000], dtype=torch.int64)
    gen = torch.Generator().manual_seed(12)
    random_bits = torch.randint(0, 1 << 32, (RAGGED,), generator=gen, dtype=torch.int64)
    bits = torch.cat([special, random_bits])
    grad = (bits - (bits >= 1 << 31).long() * (1 << 32)).int().view(torch.float32)
    grad = torch.where(grad == 0, 1.0, grad)  # -0.0 - 0 + 0 is +0.0: keep the signed zero out
    p, m, v = (torch.zeros(grad.numel(), device=DEVICE, dtype=dt)
               for dt in (torch.float32, torch.bfloat16, torch.bfloat16))
    adamw_update(p, grad.to(DEVICE), m, v, lr=0.0, betas=(0.0, 0.0), eps=1e-8, weight_decay=0.0, step=1)
    for ours, want in ((m.cpu(), grad.to(torch.bfloat16)), (v.cpu(), (grad * grad).to(torch.bfloat16))):
        nan = want.isnan()
        assert torch.equal(ours.isnan(), nan)
        assert torch.equal(_bits(ours)[~nan], _bits(want)[~nan])


def _params_and_grads(seed, steps=6, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    params0 = [torch.randn(61, 67, generator=gen), torch.randn(RAGGED, generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen) * 10 ** torch.empty(()).uniform_(-3, 1, generator=gen)
              for p in params0] for _ in range(steps)]
    return [p.to(device) for p in params0], [[g.to(device) for g in gs] for gs in grads]


def test_fused_fp32_moments_close_to_torch_adamw():
    """Six steps, weight decay on one group and off on the other: every value within ~1e-6 of
    torch.optim.AdamW (torch fuses two multiply-adds and its CPU sqrt is not correctly rounded)."""
    params0, grads = _params_and_grads(seed=20)
    ours, opt = _run(AdamW, params0, grads, moment_dtype=torch.float32, fused=True)
    ref, ref_opt = _run(torch.optim.AdamW, params0, grads, foreach=False)
    for a, b, p0 in zip(ours, ref, params0):
        assert (b - p0).abs().max() > 1e-2
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            want = ref_opt.state[b][key]
            torch.testing.assert_close(opt.state[a][key], want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def _one_step(state, moment_dtype, fused):
    p0, grad, m, v = (t.to(DEVICE) for t in state)
    p = p0.clone().requires_grad_(True)
    p.grad = grad
    opt = AdamW([p], **HYPER, weight_decay=0.1, moment_dtype=moment_dtype, fused=fused)
    opt.state[p] = dict(step=3, exp_avg=m.clone(), exp_avg_sq=v.clone())
    opt.step()
    return p.detach().cpu(), opt.state[p]["exp_avg"].cpu(), opt.state[p]["exp_avg_sq"].cpu()


def _bf16_ulp(x):
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), torch.frexp(x.float())[1] - 8)


def _fused_one_step_close_to_torch_path(n):
    """From one random state, one step fused and one through torch ops. Before the bf16 rounding the
    FP32 moments differ by FP32 roundings of their terms (torch's lerp is a fused multiply-add, the
    kernel rounds the product): exp_avg_sq, a sum of positive terms, ends at most one bf16 ulp away;
    exp_avg also, except where 0.9 m + 0.1 g nearly cancels and the product's rounding, 2^-24 of
    0.1 |g - m|, is more than a bf16 ulp of the result. p within ~2 FP32 ulps or 1e-5 of a step."""
    state = _state(n, torch.bfloat16, seed=30)
    (p, m, v), (p_ref, m_ref, v_ref) = (_one_step(state, torch.bfloat16, fused) for fused in (True, False))
    v_apart = (_bits(v) - _bits(v_ref)).abs()
    assert v_apart.max() <= 1 and v_apart.float().mean() < 1e-2
    grad, m_old = state[1], state[2].float()
    m_bound = _bf16_ulp(torch.maximum(m.abs(), m_ref.abs())) + 2 ** -22 * (grad.abs() + m_old.abs())
    assert ((m.float() - m_ref.float()).abs() <= m_bound).all()
    assert (m != m_ref).float().mean() < 1e-2
    torch.testing.assert_close(p, p_ref, rtol=5e-7, atol=1e-5 * HYPER["lr"])


def test_fused_bf16_one_step_within_one_bf16_ulp_of_torch_path():
    _fused_one_step_close_to_torch_path(RAGGED)


def test_fused_bf16_several_steps_close_to_torch_path():
    """Over six steps a moment one bf16 ulp apart moves that element's update by ~0.4%: p stays
    within 1% of one step's learning rate per step of the torch path."""
    params0, grads = _params_and_grads(seed=21)
    ours, _ = _run(AdamW, params0, grads, moment_dtype=torch.bfloat16, fused=True)
    ref, _ = _run(AdamW, params0, grads, moment_dtype=torch.bfloat16, fused=False)
    for a, b in zip(ours, ref):
        assert (a - b).abs().max() <= 0.01 * 1e-2 * len(grads)


def test_default_is_fused_on_cuda_only_and_non_contiguous_falls_back():
    params0, grads = _params_and_grads(seed=22, steps=2)
    default, _ = _run(AdamW, params0, grads, moment_dtype=torch.float32)
    fused, _ = _run(AdamW, params0, grads, moment_dtype=torch.float32, fused=True)
    plain, _ = _run(AdamW, params0, grads, moment_dtype=torch.float32, fused=False)
    same_as = fused if DEVICE == "cuda" else plain
    other = plain if DEVICE == "cuda" else fused
    assert all(torch.equal(a, b) for a, b in zip(default, same_as))
    assert not all(torch.equal(a, b) for a, b in zip(default, other))
    transposed0 = [params0[0].t(), params0[1]]  # a non-contiguous leaf: the torch path takes it
    transposed_grads = [[gs[0].t(), gs[1]] for gs in grads]
    t_fused, _ = _run(AdamW, transposed0, transposed_grads, moment_dtype=torch.float32, fused=True)
    t_plain, _ = _run(AdamW, transposed0, transposed_grads, moment_dtype=torch.float32, fused=False)
    assert not t_fused[0].is_contiguous() and torch.equal(t_fused[0], t_plain[0])


def test_fused_state_dict_round_trip_and_same_format_as_torch_path():
    params0, grads = _params_and_grads(seed=23, steps=4)
    straight, _ = _run(AdamW, params0, grads, moment_dtype=torch.bfloat16, fused=True)
    half, opt = _run(AdamW, params0, grads[:2], moment_dtype=torch.bfloat16, fused=True)
    _, torch_path = _run(AdamW, params0, grads[:2], moment_dtype=torch.bfloat16, fused=False)
    state, plain_state = opt.state_dict(), torch_path.state_dict()
    assert state["param_groups"] == plain_state["param_groups"]
    for s, t in zip(state["state"].values(), plain_state["state"].values()):
        assert s.keys() == t.keys() and s["step"] == t["step"] == 2
        assert all(s[k].dtype == t[k].dtype == torch.bfloat16 for k in ("exp_avg", "exp_avg_sq"))
    params = [p.detach().clone().requires_grad_(True) for p in half]
    fresh = AdamW([dict(params=params[:1], weight_decay=0.1), dict(params=params[1:], weight_decay=0.0)],
                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, moment_dtype=torch.bfloat16, fused=True)
    fresh.load_state_dict(state)
    for step_grads in grads[2:]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        fresh.step()
    assert all(torch.equal(a, b) for a, b in zip(params, straight))


@pytest.mark.parametrize("fused", [False, True])
def test_scaled_grads_step_as_if_the_gradients_were_multiplied(fused):
    """scale_next_grads(f): the next step reads grad * f (the FP32 multiply gradient clipping would
    do in place), bitwise, on the torch path and in the kernel; the gradients stay as they are, and
    the factor is used by one step only."""
    params0, grads = _fresh(seed=21, steps=3)
    params0 = [p.to(DEVICE) for p in params0]
    grads = [[g.to(DEVICE) for g in step] for step in grads]
    factors = [torch.tensor([f], device=DEVICE) for f in (0.37, 1.0, 2.5e-3)]
    premultiplied = [[g * f for g in step] for step, f in zip(grads, factors)]
    want, _ = _run(AdamW, params0, premultiplied, fused=fused)
    params = [p.clone().requires_grad_(True) for p in params0]
    groups = [dict(params=params[:1], weight_decay=0.1), dict(params=params[1:], weight_decay=0.0)]
    opt = AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    for step_grads, factor in zip(grads, factors):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.scale_next_grads(factor)
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, step_grads))
    for a, b in zip(params, want):
        assert torch.equal(a, b)
    opt.step()  # no factor pending: the raw gradients
    again, _ = _run(AdamW, params0, [*premultiplied, grads[-1]], fused=fused)
    assert all(torch.equal(a, b) for a, b in zip(params, again))


def _pieces(g: torch.Tensor) -> list[torch.Tensor]:
    """g's elements in order, cut into uneven pieces of several shapes (ZeRO's gradient list)."""
    flat, half = g.reshape(-1), g.numel() // 2
    return [flat[:1], flat[1:half].view(-1, 1), flat[half:]]


@pytest.mark.parametrize("fused,in_pieces", [(False, False), (True, False), (False, True),
                                             (True, True)])
def test_bf16_grads_and_bf16_weight_copies_step_as_widened_and_cast(fused, in_pieces):
    """use_for_next_step(p, grad_bf16, p_bf16), as trainer/zero_step.py hands ZeRO's partitions
    over: the step equals one on grad_bf16.float() (the widening is exact) and p_bf16 receives
    p.to(bfloat16), bitwise, on the torch path and in the kernel, with the gradient whole or in
    pieces; p.grad is not read, and the hand-over lasts one step."""
    params0, grads = _fresh(seed=23, steps=3)
    params0 = [p.to(DEVICE) for p in params0]
    grads16 = [[g.to(DEVICE, torch.bfloat16) for g in step] for step in grads]
    want, _ = _run(AdamW, params0, [[g.float() for g in step] for step in grads16], fused=fused)
    params = [p.clone().requires_grad_(True) for p in params0]
    groups = [dict(params=params[:1], weight_decay=0.1), dict(params=params[1:], weight_decay=0.0)]
    opt = AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    copies = [torch.randn(p.shape, device=DEVICE).bfloat16() for p in params]
    for step_grads in grads16:
        for p, g, copy in zip(params, step_grads, copies):
            p.grad = torch.randn_like(p)  # must not be read
            opt.use_for_next_step(p, _pieces(g) if in_pieces else g, copy)
        opt.step()
        for p, copy in zip(params, copies):
            assert torch.equal(copy, p.detach().bfloat16())
    for a, b in zip(params, want):
        assert torch.equal(a, b)
    stale = [c.clone() for c in copies]
    opt.step()  # nothing handed over: p.grad, and the copies stay as they are
    assert all(torch.equal(a, b) for a, b in zip(copies, stale))
    assert not torch.equal(params[0], want[0])


def _one_launch_against_piece_by_piece(sizes, grad_dtype, device, scale=True, seed=5):
    """adamw_update_pieces on pieces of `sizes` against adamw_update piece by piece: masters,
    moments and the bf16 copy, bitwise."""
    n = sum(sizes)
    p, grad, m, v = _state(n, torch.bfloat16, seed=seed, device=device)
    gen = torch.Generator().manual_seed(seed + 1)
    pieces = [g.to(grad_dtype).reshape(-1, 1) if i % 2 else g.to(grad_dtype)  # shapes vary
              for i, g in enumerate(grad.split(sizes))]
    grad_scale = torch.rand(1, generator=gen).to(device) + 0.5 if scale else None
    ours = [t.clone() for t in (p, m, v)] + [torch.empty_like(p, dtype=torch.bfloat16)]
    adamw_update_pieces(ours[0], pieces, ours[1], ours[2], **HYPER, weight_decay=0.1, step=4,
                        grad_scale=grad_scale, p_bf16=ours[3])
    want = [t.clone() for t in (p, m, v)] + [torch.empty_like(p, dtype=torch.bfloat16)]
    offset = 0
    for piece in pieces:
        k = piece.numel()
        if k:
            adamw_update(*(t.narrow(0, offset, k) for t in (want[0],)), piece.reshape(-1),
                         *(t.narrow(0, offset, k) for t in want[1:3]), **HYPER, weight_decay=0.1,
                         step=4, grad_scale=grad_scale, p_bf16=want[3].narrow(0, offset, k))
        offset += k
    for a, b in zip(ours, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_one_launch_over_pieces_is_the_piece_by_piece_step(grad_dtype):
    """One launch over ZeRO's gradient pieces (each program finds its piece by binary search in
    the launch's table): pieces smaller and larger than a program's block, an empty one, starts
    off the 16-byte grid (so the kernel's unaligned form) and on it, with the clip factor."""
    _one_launch_against_piece_by_piece([5, 2048, 0, 3000, 1, 4100], grad_dtype, DEVICE)
    _one_launch_against_piece_by_piece([8, 2048, 4096, 16], grad_dtype, DEVICE, scale=False)


def test_one_launch_over_pieces_refuses_what_it_cannot_take():
    p, grad, m, v = _state(20, torch.bfloat16, seed=1, device=DEVICE)
    with pytest.raises(ValueError, match="one dtype"):
        adamw_update_pieces(p, [grad[:10], grad[10:].bfloat16()], m, v, **HYPER,
                            weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="pass all of p's gradient"):
        adamw_update_pieces(p, [grad[:10]], m, v, **HYPER, weight_decay=0.0, step=1)


def test_use_for_next_step_refuses_what_it_cannot_use():
    p = torch.randn(10, requires_grad=True)
    opt = AdamW([p])
    with pytest.raises(TypeError, match="FP32 or bf16"):
        opt.use_for_next_step(p, torch.randn(10).half())
    with pytest.raises(ValueError, match="grad has shape"):
        opt.use_for_next_step(p, torch.randn(9))
    with pytest.raises(ValueError, match="p_bf16 has shape"):
        opt.use_for_next_step(p, torch.randn(10), torch.randn(9).bfloat16())
    with pytest.raises(TypeError, match="must be bfloat16"):
        opt.use_for_next_step(p, torch.randn(10), torch.randn(10))
    with pytest.raises(ValueError, match="hold 9 elements, the parameter 10"):
        opt.use_for_next_step(p, [torch.randn(4), torch.randn(5)])
    with pytest.raises(TypeError, match="FP32 or bf16"):
        opt.use_for_next_step(p, [torch.randn(4), torch.randn(6).half()])
    q = torch.randn(4, 5).t().requires_grad_(True)
    with pytest.raises(ValueError, match="needs a contiguous parameter"):
        AdamW([q]).use_for_next_step(q, [torch.randn(20)])
    opt.use_for_next_step(torch.randn(10), torch.randn(10))  # not one of opt's parameters
    with pytest.raises(ValueError, match="not parameters of this step"):
        opt.step()


def test_grad_scale_must_be_one_fp32_value_beside_the_parameters():
    p, grad, m, v = _state(300, torch.bfloat16, seed=41, device=DEVICE)
    kw = dict(**HYPER, weight_decay=0.0, step=1)
    for bad in (torch.tensor([0.5, 0.5], device=DEVICE),
                torch.tensor([0.5], dtype=torch.float64, device=DEVICE), 0.5):
        with pytest.raises(TypeError, match="one-element FP32 tensor"):
            adamw_update(p, grad, m, v, **kw, grad_scale=bad)
    if DEVICE == "cpu":
        return
    with pytest.raises(ValueError, match="parameters' device"):
        adamw_update(p, grad, m, v, **kw, grad_scale=torch.tensor([0.5]))


def test_fused_rejects_bad_operands(monkeypatch):
    p, grad, m, v = _state(300, torch.bfloat16, seed=40, device=DEVICE)
    kw = dict(**HYPER, weight_decay=0.0, step=1)
    with pytest.raises(TypeError, match="an FP32 p and an FP32 or bf16 grad"):
        adamw_update(p.bfloat16(), grad, m, v, **kw)
    with pytest.raises(TypeError, match="p_bf16 is torch.float32"):
        adamw_update(p, grad, m, v, **kw, p_bf16=p.clone())
    with pytest.raises(TypeError, match="both moments"):
        adamw_update(p, grad, m, v.float(), **kw)
    with pytest.raises(ValueError, match="grad has shape"):
        adamw_update(p, grad[:299], m, v, **kw)
    with pytest.raises(ValueError, match="exp_avg is not contiguous"):
        adamw_update(p.view(15, 20), grad.view(15, 20), m.view(20, 15).t(), v.view(15, 20), **kw)
    with pytest.raises(ValueError, match="step=0"):
        adamw_update(p, grad, m, v, **{**kw, "step": 0})
    with pytest.raises(TypeError, match="fused="):
        AdamW([p.requires_grad_(True)], fused="yes")
    monkeypatch.setattr("trainer.optim.INTERPRET", False)  # as on a CPU machine without the interpreter
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        adamw_update(*(t.cpu() for t in (p, grad, m, v)), **kw)


_COMPILE_SM90 = r'''
import json, os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from trainer import optim

out = {}
for fusion in (False, True):
    for moments, scaled, bf16_io in (("bf16", False, False), ("fp32", False, False),
                                     ("bf16", True, False), ("bf16", True, True)):
        sig = dict(p_ptr="*fp32", grad_ptr="*bf16" if bf16_io else "*fp32",
                   exp_avg_ptr="*" + moments, exp_avg_sq_ptr="*" + moments,
                   grad_scale_ptr="*fp32", p_bf16_ptr="*bf16" if bf16_io else "*fp32", n="i32",
                   decay="fp32", one_minus_beta1="fp32", beta2="fp32", one_minus_beta2="fp32",
                   bias_correction2_sqrt="fp32", eps="fp32", step_size="fp32",
                   MOMENTS_BF16="constexpr", SCALE_GRAD="constexpr", GRAD_BF16="constexpr",
                   WRITE_BF16="constexpr", BLOCK="constexpr")
        # aligned tensor pointers and n % 16 == 0 (the scale is one float anywhere)
        attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 5, 6)}
        src = ASTSource(fn=optim.adamw_kernel, signature=sig, attrs=attrs,
                        constexprs=dict(MOMENTS_BF16=moments == "bf16", SCALE_GRAD=scaled,
                                        GRAD_BF16=bf16_io, WRITE_BF16=bf16_io,
                                        BLOCK=optim.FUSED_BLOCK))
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=optim.FUSED_WARPS, enable_fp_fusion=fusion)).asm["ptx"]
        out[f"{moments} scaled={scaled} bf16_io={bf16_io} fusion={fusion}"] = dict(
            fma="fma.rn.f32" in ptx, div_rn="div.rn.f32" in ptx, sqrt_rn="sqrt.rn.f32" in ptx,
            v4="ld.global.v4" in ptx)
print(json.dumps(out))
'''


_COMPILE_PIECES_SM90 = r'''
import json, os
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from trainer import optim

out = {}
for aligned in (True, False):
    sig = dict(p_ptr="*fp32", table_ptr="*i64", n_pieces="i32", exp_avg_ptr="*bf16",
               exp_avg_sq_ptr="*bf16", grad_scale_ptr="*fp32", p_bf16_ptr="*bf16",
               decay="fp32", one_minus_beta1="fp32", beta2="fp32", one_minus_beta2="fp32",
               bias_correction2_sqrt="fp32", eps="fp32", step_size="fp32",
               MOMENTS_BF16="constexpr", SCALE_GRAD="constexpr", GRAD_BF16="constexpr",
               WRITE_BF16="constexpr", ALIGNED="constexpr", SEARCH_STEPS="constexpr",
               BLOCK="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 3, 4, 6)}
    src = ASTSource(fn=optim.adamw_pieces_kernel, signature=sig, attrs=attrs,
                    constexprs=dict(MOMENTS_BF16=True, SCALE_GRAD=True, GRAD_BF16=True,
                                    WRITE_BF16=True, ALIGNED=aligned, SEARCH_STEPS=7,
                                    BLOCK=optim.FUSED_BLOCK))
    options = dict(num_warps=optim.FUSED_WARPS, enable_fp_fusion=False)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    out[f"aligned={aligned}"] = dict(fma="fma.rn.f32" in ptx, div_rn="div.rn.f32" in ptx,
                                     sqrt_rn="sqrt.rn.f32" in ptx, v4="ld.global.v4" in ptx)
print(json.dumps(out))
'''


def test_pieces_kernel_compiles_for_sm90_and_vectorizes_when_aligned(compiled_sm90):
    """The one-launch kernel over gradient pieces compiles for sm90 with the same rounding (no
    FMA, correctly rounded division and sqrt); with every piece on the 16-byte grid (ALIGNED) its
    loads are 16 bytes wide, as the whole-tensor kernel's are; off it they need not be."""
    out = compiled_sm90(_COMPILE_PIECES_SM90)
    assert out["aligned=True"] == dict(fma=False, div_rn=True, sqrt_rn=True, v4=True), out
    assert {k: v for k, v in out["aligned=False"].items() if k != "v4"} == dict(
        fma=False, div_rn=True, sqrt_rn=True), out


def test_kernel_compiles_for_sm90_without_fma(compiled_sm90):
    """The compiled kernel (sm90 PTX, built here without a GPU) rounds every operation once: no fused
    multiply-add (which it would have with Triton's default enable_fp_fusion=True: checked too),
    correctly rounded division and sqrt, 16-byte vector loads."""
    for name, info in compiled_sm90(_COMPILE_SM90).items():
        fusion = name.endswith("True")
        assert info == dict(fma=fusion, div_rn=True, sqrt_rn=True, v4=True), (name, info)


@pytest.mark.gpu
@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_bitwise_reference_10m(moment_dtype):
    _fused_matches_reference(10_000_000 + 123, moment_dtype, weight_decay=0.1, steps=2)


@pytest.mark.gpu
def test_gpu_bf16_grad_and_weight_copy_are_the_widened_step_10m():
    """The kernel reading a bf16 gradient and writing a bf16 copy of p (trainer/zero_step.py's
    step) against the same kernel on grad.float(), then p.to(bfloat16): bitwise, 10M elements."""
    p, grad, m, v = _state(10_000_000 + 123, torch.bfloat16, seed=42, device="cuda")
    grad16 = grad.bfloat16()
    want = [t.clone() for t in (p, m, v)]
    adamw_update(want[0], grad16.float(), want[1], want[2], **HYPER, weight_decay=0.1, step=3)
    copy = torch.empty_like(p, dtype=torch.bfloat16)
    adamw_update(p, grad16, m, v, **HYPER, weight_decay=0.1, step=3, p_bf16=copy)
    for got, expected in zip((p, m, v, copy), (*want, want[0].bfloat16())):
        assert torch.equal(got, expected)


@pytest.mark.gpu
def test_gpu_one_launch_over_83_pieces_is_the_piece_by_piece_step():
    """The same at `small`'s scale on the GPU: 83 pieces of ZeRO-like sizes (10M elements),
    starts on the 16-byte grid (the vectorized form), then one piece off it."""
    gen = torch.Generator().manual_seed(0)
    sizes = [int(s) * 128 for s in torch.randint(1, 2000, (83,), generator=gen)]
    _one_launch_against_piece_by_piece(sizes, torch.bfloat16, "cuda")
    _one_launch_against_piece_by_piece([3] + sizes[:20], torch.bfloat16, "cuda", scale=False)


@pytest.mark.gpu
def test_gpu_direct_launch_is_the_jit_launch(monkeypatch):
    """adamw_update's launch without the JIT's per-call work (models/triton_launch.py) gives
    bitwise the JIT launch's step, bf16 gradient and bf16 weight copy included."""
    from models import triton_launch
    from trainer import optim
    if not triton_launch.ENABLED:
        pytest.skip("the launcher passes through on this Triton")
    p, grad, m, v = _state(1_000_003, torch.bfloat16, seed=7, device="cuda")
    runs = {}
    for direct in (False, True, True):  # the first direct call may compile; the second is direct
        monkeypatch.setattr(triton_launch, "ENABLED", direct)
        state = [t.clone() for t in (p, m, v)] + [torch.empty_like(p, dtype=torch.bfloat16)]
        before = optim._launch_adamw.direct_launches
        adamw_update(state[0], grad.bfloat16(), state[1], state[2], **HYPER, weight_decay=0.1,
                     step=2, p_bf16=state[3])
        runs[direct] = state, optim._launch_adamw.direct_launches - before
    (jit, jit_direct), (direct, launched) = runs[False], runs[True]
    assert jit_direct == 0 and launched == 1
    for a, b in zip(jit, direct):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_fused_close_to_torch_cuda_path_10m():
    _fused_one_step_close_to_torch_path(10_000_000 + 123)


# ---------------------------------------------------------------------------------------------
# inside DeepSpeed ZeRO-1: the client optimizer sees flat FP32 partitions

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, first_k_dense=1, intermediate_size=128,
            num_attention_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=2,
            topk_group=1, max_position_embeddings=64)


@pytest.fixture
def job():
    """One process group for the session (as tests/test_engine.py); torchrun's variables only during the test."""
    from trainer import engine as eng
    saved = {key: os.environ.pop(key) for key in ENV if key in os.environ}
    yield eng.init_distributed()
    for key in ENV:
        os.environ.pop(key, None)
    os.environ.update(saved)


def _zero1_run(job, fused, precision):
    """One ZeRO-1 optimizer step of a tiny model; returns the client optimizer's FP32 partitions."""
    from models import build_model, model_config
    from trainer import engine as eng
    from trainer.balance import LoadBalancer
    torch.manual_seed(0)
    model = build_model(model_config("debug", **TINY), device=job.device)
    optim_cfg = OptimConfig(lr=1e-2, warmup_steps=0)
    opt = AdamW(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr, betas=(0.9, 0.95),
                weight_decay=optim_cfg.weight_decay, fused=fused)
    ds = eng.deepspeed_config(eng.ParallelConfig(zero_stage=1), optim_cfg.grad_clip, 2, 1, precision)
    engine = eng.build_engine(model, opt, build_schedule(optim_cfg, 10), ds)
    balancer = LoadBalancer(engine.module.routers(), 1e-3)
    rows = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    eng.train_step(engine, [{"tokens": rows[:, :-1], "labels": rows[:, 1:]}], eng.lm_loss, balancer)
    return [p.detach().cpu() for group in opt.param_groups for p in group["params"]]


def test_fused_under_deepspeed_zero1_matches_torch_path(job, monkeypatch):
    """A ZeRO-1 step of a tiny model (bf16 engine on CUDA, fp32 on the CPU) with the kernel and with
    torch ops: the kernels ran on the flat FP32 partitions, and the FP32 masters agree to an FP32
    rounding on the CPU, to 0.1% of a step (lr 1e-2) on the GPU, whose gradients may differ in
    their last bits between two runs."""
    import trainer.optim as optim_module
    calls = []

    def spy(kernel):
        def spied(p, *args, **kw):
            calls.append((p.dim(), p.dtype, p.device.type))
            return kernel(p, *args, **kw)
        return spied
    monkeypatch.setattr(optim_module, "adamw_update", spy(adamw_update))
    # on CUDA trainer/zero_step.py hands the gradients over in pieces: one launch for them all
    monkeypatch.setattr(optim_module, "_launch_pieces", spy(optim_module._launch_pieces))
    precision = "bf16" if DEVICE == "cuda" else "fp32"
    fused = _zero1_run(job, None if DEVICE == "cuda" else True, precision)
    assert calls and all(c == (1, torch.float32, DEVICE) for c in calls), calls
    plain = _zero1_run(job, False, precision)
    tolerance = dict(atol=1e-5, rtol=1e-4) if DEVICE == "cuda" else dict(atol=1e-7, rtol=1e-6)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.gpu
def test_gpu_small_cases_compiled(job, monkeypatch):
    """The CPU tests above, on the compiled kernel: ragged length, both moment dtypes, weight decay on
    and off, bf16 rounding edge cases (subnormals too: no flush to zero), torch AdamW closeness,
    the default routing, the state round trip, and the ZeRO-1 engine with a bf16 model."""
    for moment_dtype in (torch.float32, torch.bfloat16):
        for weight_decay in (0.0, 0.1):
            test_fused_kernel_is_bitwise_the_reference(moment_dtype, weight_decay)
    test_fused_bf16_rounding_is_torchs_round_to_nearest_even()
    test_fused_fp32_moments_close_to_torch_adamw()
    test_fused_bf16_one_step_within_one_bf16_ulp_of_torch_path()
    test_default_is_fused_on_cuda_only_and_non_contiguous_falls_back()
    test_fused_state_dict_round_trip_and_same_format_as_torch_path()
    test_fused_under_deepspeed_zero1_matches_torch_path(job, monkeypatch)
    for fused in (False, True):
        test_scaled_grads_step_as_if_the_gradients_were_multiplied(fused)
    test_grad_scale_must_be_one_fp32_value_beside_the_parameters()
