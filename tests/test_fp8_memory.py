"""What FP8 training keeps alive: the cached FP8 weight copies must not outlive their last use.

FP8 layers cache both orientations of their quantized weights for the whole optimizer step (the
forward copy for Fprop, the transposed one for Dgrad). Backward reads only the transposed copy,
so after the step's last forward the forward copy is dead weight, and each transposed copy is dead
once its layer's backward has run. On the H200 the `small` model's FP8 run peaked 2.7 GiB above
bf16 (34.5 vs 31.8 GiB), exactly the size of its cached copies, alive through the end of backward
and the optimizer step because autograd nodes held them as ctx attributes (which autograd never
frees while the graph is referenced) and the modules held them until after the step.

Checked here with weak references (the reference: a tensor is freed when nothing refers to it):
after `invalidate_weight_caches` the forward copy is gone at once and the transposed copy goes
with its layer's backward, even while the graph's output is still referenced; `train_step` drops
the caches after the step's last forward, so nothing cached is alive at the optimizer step, yet
micro-batches before the last still share one quantization; and dropping them changes no number.
"""
import gc
import os
import weakref

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.fp8 import quant  # noqa: E402
from models.fp8.experts import FP8GroupedExperts  # noqa: E402
from models.fp8.linear import FP8Linear, FP8MLP, invalidate_weight_caches  # noqa: E402
from models.layers import MLP  # noqa: E402
from models.moe import GroupedExperts  # noqa: E402
from trainer import engine as eng  # noqa: E402
from trainer.balance import LoadBalancer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _refs(tensors):
    return [weakref.ref(t) for t in tensors]


def _alive(refs):
    gc.collect()
    return [r() is not None for r in refs]


def _linear(seed=0):
    torch.manual_seed(seed)
    return FP8Linear(256, 128, device=DEVICE)


def test_linear_copies_die_with_their_last_use():
    fp8 = _linear()
    x = torch.randn(64, 256, device=DEVICE, requires_grad=True)
    y = fp8(x)
    fwd, dgrad = _refs(fp8.fp8_weight()[:2]), _refs(fp8.fp8_weight()[2:])
    invalidate_weight_caches(fp8)
    assert _alive(fwd) == [False, False], "the forward copy is not needed by backward"
    assert _alive(dgrad) == [True, True], "backward still needs the transposed copy"
    y.sum().backward()
    assert _alive(dgrad) == [False, False], "freed by its backward while y is still referenced"
    assert y.grad_fn is not None and x.grad is not None and fp8.weight.grad is not None


def test_dropping_the_cache_before_backward_changes_no_number():
    grads = []
    for drop in (False, True):
        fp8 = _linear(seed=1)
        torch.manual_seed(2)
        x = torch.randn(96, 256, device=DEVICE, requires_grad=True)
        y = fp8(x)
        if drop:
            invalidate_weight_caches(fp8)
        y.backward(torch.ones_like(y))
        grads.append((x.grad, fp8.weight.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_mlp_copies_die_with_their_last_use():
    torch.manual_seed(3)
    fp8 = FP8MLP.from_mlp(MLP(128, 256).to(DEVICE))
    x = torch.randn(64, 128, device=DEVICE, requires_grad=True)
    y = fp8(x)
    w13, w2 = fp8.w13_fp8(), fp8.w2.fp8_weight()
    fwd, dgrad = _refs([*w13[:2], *w2[:2]]), _refs([*w13[2:], *w2[2:]])
    del w13, w2
    invalidate_weight_caches(fp8)
    assert not any(_alive(fwd)) and all(_alive(dgrad))
    y.sum().backward()
    assert not any(_alive(dgrad))


def test_expert_copies_die_with_their_last_use():
    torch.manual_seed(4)
    ref = GroupedExperts(2, 128, 128).to(DEVICE)
    with torch.no_grad():
        for w in (ref.w1, ref.w3, ref.w2):
            w.normal_(std=0.05)
    fp8 = FP8GroupedExperts.from_grouped(ref)
    x = torch.randn(70, 128, device=DEVICE, requires_grad=True)
    y = fp8(x, torch.tensor([30, 40], device=DEVICE))
    wq = fp8.fp8_weights()
    fwd = _refs([wq.w13_q, wq.w13_s, wq.w2_q, wq.w2_s])
    dgrad = _refs([wq.w13t_q, wq.w13t_s, wq.w2t_q, wq.w2t_s])
    del wq
    invalidate_weight_caches(fp8)
    assert not any(_alive(fwd)) and all(_alive(dgrad))
    y.sum().backward()
    assert not any(_alive(dgrad))


class _Engine:
    """The slice of a DeepSpeed engine train_step uses; step() records which cached FP8 weight
    copies are still alive when the weights would change."""

    def __init__(self, module: nn.Module, micro_batches: int):
        self.module, self.device, self.global_steps = module, torch.device(DEVICE), 0
        self.micro, self.calls, self.cached, self.alive_at_step = micro_batches, 0, [], None
        self.opt = torch.optim.SGD(module.parameters(), lr=0.1)

    def __call__(self, x):
        y = self.module(x)
        self.cached += _refs(self.module.fp8_weight())
        return y

    def gradient_accumulation_steps(self):
        return self.micro

    def get_lr(self):
        return [0.1]

    def train(self):
        self.module.train()

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.calls += 1
        if self.calls % self.micro == 0:
            self.alive_at_step = sum(_alive(self.cached))
            self.opt.step()
            self.opt.zero_grad()
            self.global_steps += 1

    def get_global_grad_norm(self):
        return None


def _loss(engine, batch):
    loss = engine(batch["x"]).float().pow(2).mean()
    return eng.LossTerms(loss, None, {"loss/total": loss})


def test_train_step_frees_the_copies_before_the_optimizer_step(monkeypatch):
    calls = []
    real = quant.quantize_128x128
    monkeypatch.setattr(quant, "quantize_128x128", lambda *a, **k: calls.append(1) or real(*a, **k))
    engine = _Engine(_linear(seed=5), micro_batches=3)
    batches = [{"x": torch.randn(32, 256)} for _ in range(3)]
    eng.train_step(engine, batches, _loss, LoadBalancer([], 0.0))
    assert len(calls) == 1, "the step's micro-batches share one weight quantization"
    assert engine.alive_at_step == 0, "no cached FP8 copy may live through the optimizer step"
    eng.train_step(engine, batches, _loss, LoadBalancer([], 0.0))
    assert len(calls) == 2, "the next step quantizes the updated weights"
