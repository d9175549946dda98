"""Timing helpers shared by the benchmarks: CUDA-event medians and a bf16 matmul reference.

    ms = time_ms(fn)              # median ms per call; reps calls per timed batch, after a warm-up
    interleaved_ms({"a": f, "b": g})  # the same for several, timed in alternating rounds
    steady_ms(fn, seconds)        # ms per call once the GPU has run fn back to back a while
    interleaved_ms(fns, steady_s=2.5) # steady_ms in alternating rounds
    with PowerSampler() as p: ...     # the GPU's mean power and SM clock meanwhile (nvidia-smi)
    alternating_rounds(names, rounds) # those rounds' orders (bench_train runs its recipes so)
    tflops(flops, ms)             # FLOPs over milliseconds, in TFLOP/s
    train_backward(y, dy)         # y.backward(dy) on this thread, as the trainer runs it
    bf16_matmul_tflops()          # the dense bf16 rate this card reaches, measured now
    events = profiled_trace(fn, calls=2)  # the Chrome-trace events of fn's calls under the profiler
    idle_gaps(events, min_us)     # the stretches in which the GPU ran nothing
    busy_us(events), span_us(events)  # the GPU's busy microseconds; first start to last end
    idle_ms(gaps, steps)          # their milliseconds per step
    gpu_busy_ms(fn)               # the GPU's busy milliseconds per call of fn (profiled)
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile


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


class PowerSampler:
    """`with PowerSampler(): ...`: nvidia-smi samples the GPU's power draw and SM clock every
    `period_ms` while the block runs; afterwards .watts and .mhz are their means (the first two
    samples and the last left out: they may straddle the block's edges), nan without samples. At
    the power cap the time a kernel takes is its energy over the cap, so the energy of a call
    (watts x ms) is what two kernels are compared by there (csrc/fp8_grouped/EXPERIMENTS.md).
    `index` is nvidia-smi's numbering of the GPUs (which CUDA_VISIBLE_DEVICES does not remap)."""

    FIELDS = ("power.draw.instant", "power.draw")  # the first where the driver has it

    def __init__(self, index: int = 0, period_ms: int = 20):
        self.index, self.period_ms = index, period_ms
        self.watts = self.mhz = float("nan")

    @classmethod
    def _field(cls) -> str:
        if not hasattr(cls, "_chosen"):
            probe = subprocess.run(["nvidia-smi", f"--query-gpu={cls.FIELDS[0]}",
                                    "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True)
            ok = probe.returncode == 0 and "Field" not in probe.stdout
            cls._chosen = cls.FIELDS[0] if ok else cls.FIELDS[1]
        return cls._chosen

    def __enter__(self):
        self._log = tempfile.NamedTemporaryFile(suffix=".csv", delete=False).name
        self._smi = subprocess.Popen(
            ["nvidia-smi", "-i", str(self.index), f"--query-gpu={self._field()},clocks.sm",
             "--format=csv,noheader,nounits", "-lms", str(self.period_ms), "-f", self._log])
        return self

    def __exit__(self, *exc):
        self._smi.terminate()
        self._smi.wait()
        with open(self._log) as f:
            rows = [line.split(",") for line in f.read().split("\n") if line.strip()][2:-1]
        os.unlink(self._log)
        samples = [(float(r[0]), float(r[1])) for r in rows
                   if len(r) == 2 and _is_number(r[0]) and _is_number(r[1])]
        if samples:
            self.watts = statistics.fmean(w for w, _ in samples)
            self.mhz = statistics.fmean(m for _, m in samples)
        return False


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def steady_ms(fn, seconds: float, power: list | None = None) -> float:
    """Milliseconds per call of fn at steady state: called back to back for `seconds`, the last
    60% timed. A GEMM at full rate brings an H100 to its power cap within a fraction of a second
    and the clock follows how busy the SMs are, so two kernels differing by a percent or two are
    compared here, where a training step runs them, rather than by time_ms's short batches (whose
    figures moved by 5-8% between rounds in csrc/fp8_grouped's sweeps). `power`: a list that gets
    the timed stretch's (watts, MHz) appended (PowerSampler)."""
    torch.cuda.synchronize()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.4 * seconds:
        fn()
        calls += 1
        if calls % 8 == 0:  # the host waits now and then, so that the wall clock tracks the GPU
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    timed = max(1, round(0.6 * seconds * calls / (time.perf_counter() - start)))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with contextlib.nullcontext() if power is None else PowerSampler() as sampler:
        begin.record()
        for _ in range(timed):
            fn()
        end.record()
        end.synchronize()
    if power is not None:
        power.append((sampler.watts, sampler.mhz))
    return begin.elapsed_time(end) / timed


def alternating_rounds(names: list, rounds: int):
    """Each round's order: `names`, then reversed, and so on (A B C, C B A, A B C), so that over
    an even number of rounds every name has the same average position."""
    for r in range(rounds):
        yield list(names) if r % 2 == 0 else list(names)[::-1]


def interleaved_ms(fns: dict, rounds: int = 3, reps: int = 5, batches: int = 3,
                   steady_s: float | None = None, power: dict | None = None) -> dict:
    """{name: median ms per call} of each fn, timed once per round over `rounds` rounds, every
    other round in reverse order. Timed one after another, whatever runs first meets a cooler GPU:
    an FP8 GEMM at full rate draws enough power to lower the clocks, and on an H100 that moved a
    kernel's figure by up to 15% against the one timed next. With `steady_s`, each timing is
    steady_ms(fn, steady_s) instead of time_ms's batches, and `power` (a dict) gets each name's
    (watts, MHz) per round. A fn that raises is reported, then left out, its figure nan."""
    times = {name: [] for name in fns}
    for order in alternating_rounds(list(fns), rounds):
        for name in order:
            if times[name] is None:
                continue
            try:
                if steady_s is None:
                    times[name].append(time_ms(fns[name], reps, batches))
                else:
                    watts = None if power is None else power.setdefault(name, [])
                    times[name].append(steady_ms(fns[name], steady_s, watts))
            except Exception as e:  # a baseline a library rejects is absent, not fatal
                print(f"    {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                times[name] = None
    return {name: statistics.median(v) if v else float("nan") for name, v in times.items()}


def train_backward(y: torch.Tensor, dy: torch.Tensor) -> None:
    """y.backward(dy) on the calling thread, as trainer.engine.train_step runs every backward
    (parallel.threaded_backward=false), so that a layer benchmark times what a training step pays.
    On autograd's worker thread (PyTorch's default) an H100 host spent ~100-250 us more per
    Python-backward layer: FP8Linear at 8192x1024->8192 ran at 391 TFLOP/s there, 576 here."""
    with torch.autograd.set_multithreading_enabled(False):
        y.backward(dy)


def tflops(flops: float, ms: float) -> float:
    return flops / ms / 1e9


def bf16_matmul_tflops(n: int = 8192) -> float:
    """TFLOP/s of an n^3 bf16 matmul on random data: the measured dense peak to compare against."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return tflops(2 * n ** 3, time_ms(lambda: a @ b))


GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
"""Chrome-trace categories of work on the GPU (any stream)."""


def profiled_trace(fn, with_stack: bool = False, calls: int = 1) -> list[dict]:
    """fn() `calls` times under torch.profiler, then a synchronize: the trace's events. CUDA
    activity only (little host overhead), or with the host's ops and Python stacks (with_stack,
    which slows the host several-fold)."""
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if with_stack else [])
    with warnings.catch_warnings():  # torch 2.11 warns that each profile keeps only its own events
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with profile(activities=activities, with_stack=with_stack) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def gpu_events(trace_events: list[dict]) -> list[dict]:
    """The GPU's work in a Chrome trace (kernels, copies, memsets on any stream), by start."""
    return sorted((e for e in trace_events
                   if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES),
                  key=lambda e: e["ts"])


def idle_gaps(trace_events: list[dict], min_us: float) -> list[tuple[float, float, dict]]:
    """(start us, length us, the GPU event that ended it) for every stretch of at least `min_us`
    between the first and the last GPU event of a Chrome trace in which no stream ran anything."""
    gpu = gpu_events(trace_events)
    gaps, busy_until = [], None
    for e in gpu:
        if busy_until is not None and e["ts"] - busy_until >= min_us:
            gaps.append((busy_until, e["ts"] - busy_until, e))
        end = e["ts"] + e.get("dur", 0)
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def busy_us(trace_events: list[dict]) -> float:
    """Microseconds in which the GPU ran something (kernel, copy or memset on any stream) in a
    Chrome trace: the union of its GPU events, overlaps counted once."""
    total, start, end = 0.0, None, None
    for lo, hi in ((e["ts"], e["ts"] + e.get("dur", 0)) for e in gpu_events(trace_events)):
        if end is None or lo > end:  # a new busy stretch: close the one before
            total += 0.0 if end is None else end - start
            start, end = lo, hi
        else:
            end = max(end, hi)
    return total + (0.0 if end is None else end - start)


def span_us(trace_events: list[dict]) -> float:
    """Microseconds from the first GPU event's start to the last one's end (0 with none)."""
    gpu = gpu_events(trace_events)
    return max(e["ts"] + e.get("dur", 0) for e in gpu) - gpu[0]["ts"] if gpu else 0.0


def gpu_busy_ms(fn, calls: int = 5) -> float:
    """Milliseconds of GPU work per call of fn (busy_us of `calls` profiled calls): what a call
    costs the GPU, whether or not the host keeps it fed. Beside a wall-clock time it shows a
    host-bound call: wall well above busy."""
    fn()
    return busy_us(profiled_trace(fn, calls=calls)) / 1e3 / calls


def idle_ms(gaps: list[tuple[float, float, dict]], steps: int) -> float:
    """Milliseconds per step of idle_gaps' stretches over `steps` steps."""
    return sum(length for _, length, _ in gaps) / 1e3 / steps
