"""Timing helpers shared by the benchmarks: CUDA-event medians and a bf16 matmul reference.

    ms = time_ms(fn)              # median ms per call; reps calls per timed batch, after a warm-up
    tflops(flops, ms)             # FLOPs over milliseconds, in TFLOP/s
    bf16_matmul_tflops()          # the dense bf16 rate this card reaches, measured now
"""
from __future__ import annotations

import statistics

import torch


def time_ms(fn, reps: int = 10, batches: int = 5) -> float:
    """Median milliseconds per call of fn (reps calls per timed batch, after a warm-up batch)."""
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        per_call.append(start.elapsed_time(end) / reps)
    return statistics.median(per_call)


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def bf16_matmul_tflops(n: int = 8192) -> float:
    """TFLOP/s of an n^3 bf16 matmul on random data: the measured dense peak to compare against."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return tflops(2 * n ** 3, time_ms(lambda: a @ b))
