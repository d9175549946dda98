"""trainer.balance: the sign update against a hand-written loop, MaxVio, and global (all-reduced) loads."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainer.balance import LoadBalancer, bias_delta, max_vio


class _Router(nn.Module):
    def __init__(self, n_experts: int, dtype=torch.float32):
        super().__init__()
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=dtype))


def _reference_update(bias, counts, rate):
    mean = sum(counts) / len(counts)
    out = []
    for b, c in zip(bias, counts):
        sign = 1.0 if mean > c else (-1.0 if mean < c else 0.0)
        out.append(b + rate * sign)
    return out


def test_bias_update_matches_hand_loop_over_micro_batches():
    gen = torch.Generator().manual_seed(3)
    routers = [_Router(8), _Router(8)]
    for r in routers:
        r.expert_bias.copy_(torch.randn(8, generator=gen) * 0.01)
    before = [r.expert_bias.tolist() for r in routers]
    micro = [torch.randint(0, 50, (2, 8), generator=gen) for _ in range(3)]
    micro[0][0, :2] = 0  # an expert with ties/zeros must not break anything
    balancer = LoadBalancer(routers, update_rate=1e-3)
    for counts in micro:
        balancer.accumulate(counts)
    metrics = balancer.step()
    total = sum(micro)
    for layer, r in enumerate(routers):
        expected = _reference_update(before[layer], total[layer].tolist(), 1e-3)
        assert r.expert_bias.tolist() == pytest.approx(expected, abs=1e-9)
        assert r.expert_bias.dtype == torch.float32
    assert metrics["balance/maxvio_batch"] == pytest.approx(max_vio(total).mean().item())
    assert balancer.counts_LE is None, "counts must be reset after the optimizer step"


def test_zero_rate_disables_and_bf16_bias_is_refused():
    router = _Router(4)
    balancer = LoadBalancer([router], update_rate=0.0)
    balancer.accumulate(torch.tensor([[9, 1, 1, 1]]))
    balancer.step()
    assert torch.equal(router.expert_bias, torch.zeros(4))
    bad = LoadBalancer([_Router(4, torch.bfloat16)], update_rate=1e-3)
    bad.accumulate(torch.tensor([[9, 1, 1, 1]]))
    with pytest.raises(AssertionError, match="FP32"):
        bad.step()
    with pytest.raises(ValueError, match="routers"):
        LoadBalancer([router], 1e-3).accumulate(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="gamma"):
        LoadBalancer([router], -1.0)


def test_max_vio_hand_values():
    counts = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0], [15, 5, 10, 10], [0, 0, 0, 0]])
    assert max_vio(counts).tolist() == pytest.approx([0.0, 3.0, 0.5, 0.0])
    assert bias_delta(torch.tensor([15, 5, 10, 10]), 0.5).tolist() == [-0.5, 0.5, 0.0, 0.0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank routes differently
    routers = [_Router(6), _Router(6)]
    balancer = LoadBalancer(routers, update_rate=1e-3)
    local = []
    for _ in range(2):
        counts = torch.randint(0, 30, (2, 6), generator=gen)
        local.append(counts)
        balancer.accumulate(counts)
    balancer.step()
    queue.put((rank, sum(local).tolist(), [r.expert_bias.tolist() for r in routers]))
    dist.destroy_process_group()


def test_two_ranks_with_different_loads_end_with_identical_biases():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((rank, (counts, biases)) for rank, counts, biases in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    (c0, b0), (c1, b1) = results[0], results[1]
    c0, c1 = torch.tensor(c0), torch.tensor(c1)
    assert not torch.equal(c0, c1)
    global_counts = c0 + c1
    local_differs = False
    for layer in range(2):
        assert b0[layer] == b1[layer]
        expected = _reference_update([0.0] * 6, global_counts[layer].tolist(), 1e-3)
        assert b0[layer] == pytest.approx(expected, abs=1e-9)
        local_only = _reference_update([0.0] * 6, c0[layer].tolist(), 1e-3)
        local_differs |= local_only != pytest.approx(expected, abs=1e-9)
    assert local_differs, "the rank-local loads must give a different update, or this test proves nothing"
