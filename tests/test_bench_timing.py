"""The benchmarks' timing logic, with the GPU timer replaced by a scripted one.

scripts/timing.interleaved_ms decides which kernel and which baseline run first in each round,
and scripts/bench_fp8_grouped.sweep picks the kernel a row reports; a wrong order or a wrong
pick would skew every ratio gpu_check prints without failing anything on the GPU. Here the
timer returns figures fixed in advance, so the expected order and pick are worked out by hand.
bench_fp8's Transformer Engine steps are checked with a stand-in Linear: each of ours must meet
TE's step that treats the FP8 weight the same way.
"""
from __future__ import annotations

import math
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import timing  # noqa: E402


@pytest.fixture
def scripted_timer(monkeypatch):
    """time_ms replaced: runs fn once (so a failing fn raises), then returns the next figure of
    the script, in call order."""
    script = []

    def fake_time_ms(fn, reps=10, batches=5):
        fn()
        return script.pop(0)

    monkeypatch.setattr(timing, "time_ms", fake_time_ms)
    return script


def _logging(name: str, log: list, fail: bool = False):
    def fn():
        if fail:
            raise RuntimeError(f"{name} rejected\nsecond line")
        log.append(name)
    return fn


def test_interleaved_rounds_alternate_order_and_report_medians(scripted_timer):
    log = []
    # rounds: a b c | c b a | a b c
    scripted_timer.extend([3.0, 5.0, 7.0, 6.0, 4.0, 1.0, 2.0, 9.0, 7.5])
    ms = timing.interleaved_ms({n: _logging(n, log) for n in "abc"}, rounds=3)
    assert log == list("abccbaabc")
    assert ms == {"a": 2.0, "b": 5.0, "c": 7.0}


def test_interleaved_drops_a_failing_fn_after_its_first_failure(scripted_timer, capsys):
    log = []
    scripted_timer.extend([2.0, 4.0, 3.0])
    ms = timing.interleaved_ms({"ok": _logging("ok", log), "bad": _logging("bad", log, True)},
                               rounds=3)
    assert log == ["ok", "ok", "ok"]
    assert ms["ok"] == 3.0 and math.isnan(ms["bad"])
    assert "bad failed: RuntimeError: bad rejected" in capsys.readouterr().out


def test_steady_ms_times_the_last_part_of_a_back_to_back_run(monkeypatch):
    """steady_ms on a fake clock (a call takes 2 ms of it, the CUDA events and synchronize read and
    do nothing to it): 0.4 s of calls to reach steady state (200), then as many more as fill the
    remaining 0.6 s (300), timed as one stretch; interleaved_ms(steady_s=...) times with it."""
    clock = [0.0]
    calls = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.at = None

        def record(self):
            self.at = clock[0]

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return 1000.0 * (end.at - self.at)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def call():
        calls.append(clock[0])
        clock[0] += 0.002

    assert timing.steady_ms(call, 1.0) == pytest.approx(2.0)
    assert len(calls) == 500
    steady, power = {"a": [], "b": []}, {}
    monkeypatch.setattr(timing, "steady_ms",
                        lambda fn, seconds, watts: steady[fn()].append((seconds, watts)) or 1.0)
    ms = timing.interleaved_ms({"a": lambda: "a", "b": lambda: "b"}, rounds=2, steady_s=2.5)
    assert steady == {n: [(2.5, None)] * 2 for n in "ab"} and ms == {"a": 1.0, "b": 1.0}
    steady = {"a": [], "b": []}
    timing.interleaved_ms({"a": lambda: "a", "b": lambda: "b"}, rounds=2, steady_s=2.5,
                          power=power)
    assert steady == {n: [(2.5, power[n])] * 2 for n in "ab"} and set(power) == {"a", "b"}


def test_power_sampler_averages_nvidia_smi_samples_inside_the_block(monkeypatch):
    """PowerSampler with nvidia-smi replaced: a driver without power.draw.instant gets power.draw;
    the samples' means leave out the first two and the last (they may straddle the block)."""
    started = []

    class FakeSmi:
        def __init__(self, cmd):
            started.append(cmd)
            with open(cmd[cmd.index("-f") + 1], "w") as f:
                f.write("100.0, 1980\n300.0, 1500\n690.5, 1400\n[N/A], 1400\n"
                        "699.5, 1300\n50.0, 1980\n")

        def terminate(self):
            pass

        def wait(self):
            pass

    class Probe:
        returncode, stdout = 0, "Field \"power.draw.instant\" is not a valid field to query."

    monkeypatch.delattr(timing.PowerSampler, "_chosen", raising=False)
    monkeypatch.setattr(timing.subprocess, "run", lambda *a, **k: Probe)
    monkeypatch.setattr(timing.subprocess, "Popen", FakeSmi)
    with timing.PowerSampler(index=1, period_ms=20) as sampler:
        assert math.isnan(sampler.watts)
    assert sampler.watts == pytest.approx(695.0) and sampler.mhz == pytest.approx(1350.0)
    assert "--query-gpu=power.draw,clocks.sm" in started[0] and started[0][1:3] == ["-i", "1"]


def test_grouped_bench_picks_the_lowest_median_not_the_first_timing(scripted_timer):
    """The case behind the interleaved pick: the CUDA kernel's first timing is slow (as on the
    H100, 1.60 ms against 0.905 ms in the run before) and the Triton config's is faster, but
    over three rounds the CUDA kernel is."""
    import bench_fp8_grouped as bench
    from models.fp8.grouped import TileConfig
    cuda, tile = bench.CUDA, TileConfig(tma=True)
    ran = []
    # rounds: cuda tile | tile cuda | cuda tile
    scripted_timer.extend([1.60, 1.50, 1.40, 0.90, 0.95, 1.45])
    best_ms, best = bench.sweep("dgrad", ran.append, [cuda, tile])
    assert ran == [cuda, tile, tile, cuda, cuda, tile]
    assert best == cuda and best_ms == 0.95


def test_bench_train_mirrors_the_recipe_order():
    """bench_train runs a config's recipes A B B A (two rounds) and reports each recipe's mean step
    time, its rates rescaled to it and its largest peak; one round is a single pass in order."""
    import bench_train
    order = []
    step_ms = {"off": [100.0, 110.0], "blockwise": [80.0, 90.0]}

    def run(recipe):
        order.append(recipe)
        ms = step_ms[recipe][sum(r == recipe for r in order) - 1]
        return dict(recipe=recipe, step_ms=ms, tokens_per_s=1000.0 / ms, tflops=2.0 / ms,
                    mfu=0.5 / ms, peak_gib=ms / 10, held_gib=1.0, copies_gib=0.0, loss=3.0,
                    params=(2, 1), grad_accum=1, idle_ms=ms / 20)

    off, fp8 = bench_train.measure_mirrored(["off", "blockwise"], 2, run)
    assert order == ["off", "blockwise", "blockwise", "off"]
    assert off["step_ms"] == 105.0 and fp8["step_ms"] == 85.0
    assert math.isclose(off["tokens_per_s"], 1000.0 / 105.0)
    assert math.isclose(fp8["tflops"], 2.0 / 85.0) and math.isclose(fp8["mfu"], 0.5 / 85.0)
    assert off["peak_gib"] == 11.0 and off["runs_ms"] == [100.0, 110.0]
    assert math.isclose(off["idle_ms"], 5.25) and math.isclose(fp8["idle_ms"], 4.25)
    assert off["recipe"] == "off" and fp8["runs_ms"] == [80.0, 90.0]
    order.clear()
    single = bench_train.measure_mirrored(["off", "blockwise"], 1, run)
    assert order == ["off", "blockwise"] and [r["step_ms"] for r in single] == [100.0, 80.0]


def test_bench_train_gpu_busy_counts_kernels_not_gaps(monkeypatch):
    """bench_train's GPU busy time per step is the union of the GPU events of the profiled steps
    (overlaps once, host events and the gaps between kernels left out); the span runs from the
    first GPU event's start to the last one's end. Hand-made trace of two steps, times in us."""
    import bench_train
    trace = [dict(ph="X", cat="kernel", ts=0, dur=10), dict(ph="X", cat="kernel", ts=5, dur=10),
             dict(ph="X", cat="gpu_memcpy", ts=100, dur=20), dict(ph="X", cat="cpu_op", ts=0,
                                                                 dur=500),
             dict(ph="X", cat="kernel", ts=300, dur=30)]
    monkeypatch.setattr(bench_train, "profiled_trace", lambda step, calls: trace)
    busy, span = bench_train.gpu_busy_and_span_ms(lambda: None, steps=2)
    assert math.isclose(busy, (15 + 20 + 30) / 2 / 1e3) and math.isclose(span, 330 / 2 / 1e3)
    monkeypatch.setattr(bench_train, "profiled_trace", lambda step, calls: [])
    assert bench_train.gpu_busy_and_span_ms(lambda: None) == (0.0, 0.0)


def test_bench_train_recipe_settings():
    """--recipes entries: a recipe, optionally with FP8Config switches after a colon; anything
    else is refused with the fields it could have named."""
    import bench_train
    from models.fp8.config import FP8Config
    assert bench_train.fp8_config("blockwise") == FP8Config(recipe="blockwise")
    cfg = bench_train.fp8_config("blockwise:fuse_norms=false,skip_small=False")
    assert cfg == FP8Config(recipe="blockwise", fuse_norms=False, skip_small=False)
    cfg = bench_train.fp8_config("blockwise:linear_min_tokens=0,mlp_min_tokens=16384")
    assert cfg == FP8Config(recipe="blockwise", linear_min_tokens=0, mlp_min_tokens=16384)
    cfg = bench_train.fp8_config("blockwise:keep_bf16=layers.0+mtp.*,skip_small=false")
    assert cfg == FP8Config(recipe="blockwise", keep_bf16=["layers.0", "mtp.*"], skip_small=False)
    for bad in ("blockwise:fuse_norm=false", "blockwise:fuse_norms=0", "blockwise:recipe=true",
                "blockwise:linear_min_tokens=true", "blockwise:linear_min_tokens=-1",
                "blockwise:keep_bf16="):
        with pytest.raises(SystemExit, match="fuse_norms"):
            bench_train.fp8_config(bad)


def test_grouped_bench_times_the_kernel_grouped_py_runs():
    """Where the CUDA grouped kernels run, bench_fp8_grouped times them alone (what grouped.py
    runs there; --full adds the Triton configs beside them); elsewhere the Triton configs."""
    import bench_fp8_grouped as bench
    for configs in (bench.gemm_configs, bench.wgrad_configs):
        assert configs(full=False, cuda=True) == [bench.CUDA]
        triton = configs(full=False, cuda=False)
        assert len(triton) == 2 and bench.CUDA not in triton
        full = configs(full=True, cuda=True)
        assert full[0] == bench.CUDA and full[1:] == configs(full=True, cuda=False)
        assert len(full) > 3


class _FakeTELinear(torch.nn.Linear):
    """A Linear taking TE's is_first_microbatch, recording what each call passed."""

    def __init__(self, fail_caching: bool = False):
        super().__init__(4, 3, bias=False)
        self.calls, self.fail_caching = [], fail_caching

    def forward(self, inp, is_first_microbatch=None):
        if self.fail_caching and is_first_microbatch is not None:
            raise TypeError("unexpected keyword argument 'is_first_microbatch'")
        self.calls.append(is_first_microbatch)
        return super().forward(inp)


def test_te_linear_steps_compare_like_with_like():
    """bench_fp8 times TE's Linear twice: re-quantizing its weight every call (None) and reusing
    the FP8 weight cached by one first micro-batch (True once, then False); a TE without
    weight caching leaves only the first."""
    import contextlib
    import bench_fp8
    x, dy = torch.randn(5, 4, requires_grad=True), torch.randn(5, 3)
    layer = _FakeTELinear()
    steps = bench_fp8._te_steps(layer, contextlib.nullcontext, x, dy)
    assert layer.calls == [True] and set(steps) == {"te", "te cached"}
    steps["te cached"]()
    steps["te"]()
    assert layer.calls == [True, False, None]
    old = _FakeTELinear(fail_caching=True)
    assert set(bench_fp8._te_steps(old, contextlib.nullcontext, x, dy)) == {"te"}


def test_busy_us_counts_overlapping_gpu_work_once():
    """Two streams' kernels overlapping (0..150 and 100..200: 200 us), a memcpy alone (300..310),
    a memset inside a kernel (400..500 holds 420..430), host events ignored: 310 us."""
    def gpu(cat, ts, dur):
        return {"ph": "X", "cat": cat, "name": cat, "ts": ts, "dur": dur}
    events = [gpu("kernel", 100, 100), gpu("kernel", 0, 150), gpu("gpu_memcpy", 300, 10),
              gpu("kernel", 400, 100), gpu("gpu_memset", 420, 10),
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 600}]
    assert timing.busy_us(events) == 310.0
    assert timing.busy_us([]) == 0.0


def test_power_sampler_runs_a_sampling_process_and_stops_it(tmp_path, monkeypatch):
    """PowerSampler end to end with a stand-in `nvidia-smi` on PATH (a script that answers the
    field probe and, like the real one with -lms and -f, appends a sample to the file every 10 ms
    until it is terminated): the process starts, is stopped at the block's end, and its samples
    are averaged."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/bash\n"
        'for a in "$@"; do [ "$prev" = "-f" ] && out=$a; prev=$a; done\n'
        '[ -z "$out" ] && { echo 700.0; exit 0; }\n'
        'while true; do echo "700.0, 1400" >> "$out"; sleep 0.01; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delattr(timing.PowerSampler, "_chosen", raising=False)
    with timing.PowerSampler(period_ms=10) as sampler:
        time.sleep(0.3)
    assert sampler._smi.poll() is not None
    assert sampler.watts == pytest.approx(700.0) and sampler.mhz == pytest.approx(1400.0)
    assert timing.PowerSampler._chosen == "power.draw.instant"


def test_sweep_grouped_cuda_energy_figures_and_table(capsys):
    """scripts/sweep_grouped_cuda.py --power: the median round's watts and clock, the work per
    joule from them and the median time (hand-computed: 1.92 TFLOP in 1.8 ms at 700 W is 1.26 J,
    1.524 TFLOP/J), none for a variant that failed (nan time, maybe no samples), and the table's
    second part only when a row has energy figures."""
    import sweep_grouped_cuda as sweep
    watts, mhz, per_joule = sweep.energy_figures(1.92e12, 1.8, [(690, 1300), (700, 1400),
                                                                (710, 1500)])
    assert (watts, mhz) == (700, 1400) and per_joule == pytest.approx(1.92 / 1.26)
    samples = {"ok": [(700, 1400)], "failed first": [], "failed later": [(690, 1300)]}
    times = {"ok": 1.8, "failed first": math.nan, "failed later": math.nan}
    assert list(sweep.energy_table(1.92e12, times, samples)) == ["ok"]
    rows = [("dsv3-up E8x4096 4096x7168", "fwd", {"a": 1050.0, "b": 1080.0}, 1100.0, {})]
    sweep.print_table(rows, ["a", "b"])
    out = capsys.readouterr().out
    assert "0.95x" in out and "1.029" in out and "per joule" not in out
    rows[0][4].update(a=(700.0, 1400.0, 1.524), b=(695.0, 1330.0, 1.6), **{sweep.LOOP: (
        698.0, 1380.0, 1.55)})
    sweep.print_table(rows, ["a", "b"])
    out = capsys.readouterr().out
    assert "per joule" in out and "  1.524 700/1400" in out and "  1.550 698/1380" in out


def test_sweep_quant_cuda_bookkeeping_and_checks():
    """scripts/sweep_quant_cuda.py: the bytes each kernel must move, counted here by hand from its
    inputs and outputs; its shape parsing; its bitwise comparison (sweep_quant.same); its library
    switch."""
    import functools

    import sweep_quant_cuda as sweep
    # SwiGLU backward, h [128, 256] (F = 128): q_h 32768 + s_h 1024 + da 32768 read; q_dh 32768 +
    # s_dh 1024, qt_dh 256 x 128 + st_dh 1024, qt_a 128 x 128 + st_a 512 written
    reads = 32768 + 1024 + 32768
    writes = (32768 + 1024) + (32768 + 1024) + (16384 + 512)
    assert sweep.bytes_moved("swiglu", 128, 256) == reads + writes
    # RMSNorm -> dual, x [128, 256] bf16: 65536 read; q 32768 + s 1024 + qt 32768 + st 1024 written
    assert sweep.bytes_moved("norm", 128, 256) == 65536 + 2 * (32768 + 1024)
    assert sweep.parse_shapes("32768x7168,1x256") == [(32768, 7168), (1, 256)]
    for bad in ("1000x200", "x256", "0x256"):
        with pytest.raises(SystemExit, match="multiple of 256"):
            sweep.parse_shapes(bad)
    nan = torch.tensor([1.0, float("nan")])
    e4m3 = torch.randn(4, 8).to(torch.float8_e4m3fn)
    assert sweep.same((nan, (e4m3,)), (nan.clone(), (e4m3.clone(),)))
    assert not sweep.same((torch.tensor([0.0]),), (torch.tensor([-0.0]),))
    assert not sweep.same((e4m3,), (e4m3[:2],))
    assert not sweep.same((nan,), (nan, nan))

    class Module:  # the library-calling module's shape: _library and a cached max_tiles
        calls = 0

        @staticmethod
        @functools.lru_cache(maxsize=None)
        def max_tiles(index):
            Module.calls += 1
            return Module._library()

    lib_a, lib_b = object(), object()
    sweep.use_library(Module, lib_a)
    assert Module.max_tiles(0) is lib_a
    sweep.use_library(Module, lib_a)  # the same library again: the cache stays
    assert Module.max_tiles(0) is lib_a and Module.calls == 1
    sweep.use_library(Module, lib_b)
    assert Module._library() is lib_b and Module.max_tiles(0) is lib_b and Module.calls == 2


def test_bench_fp8_calls_crossover_and_module_shapes():
    """bench_fp8_calls: 'FP8 from' is the smallest token count from which FP8 is never slower
    (a dip above it, or a failed run, moves it up); the modules it measures are convert's FP8
    modules of the model, one per distinct shape, narrow Linears marked as kept bf16."""
    import bench_fp8_calls as calls

    T = [512, 1024, 2048, 4096]
    assert calls.fp8_from(T, [0.8, 1.1, 0.99, 1.2]) == 4096
    assert calls.fp8_from(T, [1.0, 1.1, 1.2, 1.3]) == 512
    assert calls.fp8_from(T, [1.2, 1.3, 1.1, float("nan")]) is None
    assert calls.fp8_from(T, [0.5, 0.6, 0.7, 0.9]) is None
    shapes = {s.label: s for s in calls.model_shapes("small")}
    assert set(shapes) == {"Linear 4096->1024", "Linear 1024->8192", "Linear 4096->640",
                           "Linear 512->8192", "Linear 4096->4096", "Linear 8192->4096",
                           "SwiGLU MLP 4096, F=10240", "SwiGLU MLP 4096, F=1536",
                           "experts E16 top-4 4096, F=1536"}
    assert {label for label, s in shapes.items() if s.kept_bf16} == {
        "Linear 4096->1024", "Linear 1024->8192", "Linear 4096->640", "Linear 512->8192"}
    assert len(shapes["Linear 4096->4096"].names) == 5, "wo in 4 layers and the MTP block"
    assert {label: s.default_min_tokens for label, s in shapes.items() if not s.kept_bf16} == {
        "Linear 4096->4096": 8192, "Linear 8192->4096": 4096, "SwiGLU MLP 4096, F=10240": 1229,
        "SwiGLU MLP 4096, F=1536": 8192, "experts E16 top-4 4096, F=1536": 1024}, \
        "the thresholds convert's defaults give them"
    assert shapes["Linear 8192->4096"].names == ["mtp.0.eh_proj"]
    assert len(shapes["experts E16 top-4 4096, F=1536"].names) == 4
    # suggestions: Linears and MLPs stated at 4096 x 4096 (8192 -> 4096 at 4096 tokens is 8192
    # there; the 4096 x 10240 MLP at 1024 is 2560), the larger of the two modes; a kind with a
    # module FP8 never caught up with is left out
    measured = [(shapes["Linear 4096->4096"], {"train": 8192, "infer": 4096}),
                (shapes["Linear 8192->4096"], {"train": 4096, "infer": 2048}),
                (shapes["SwiGLU MLP 4096, F=10240"], {"train": 1024, "infer": 512}),
                (shapes["SwiGLU MLP 4096, F=1536"], {"train": None, "infer": 16384}),
                (shapes["experts E16 top-4 4096, F=1536"], {"train": 512, "infer": 1024})]
    assert calls.suggest(measured) == {"linear_min_tokens": 8192, "experts_min_tokens": 1024}
    assert calls.suggest(measured[2:3]) == {"mlp_min_tokens": 2560}


def test_bench_fp8_calls_measures_every_module_kind(monkeypatch):
    """bench_fp8_calls.measure on CPU at tiny shapes (the timer replaced: each step run once,
    then fixed figures): forward + backward and forward-only steps of a Linear, an MLP and routed
    experts run through both the FP8 module and its bf16 twin; rows come back per mode and count."""
    import bench_fp8_calls as calls

    monkeypatch.setattr(calls, "DEVICE", "cpu")
    ran = []

    def one_call_each(steps, **_):
        for name, step in steps.items():
            step()
            ran.append(name)
        return {"fp8": 2.0, "bf16": 1.0}

    monkeypatch.setattr(calls, "interleaved_ms", one_call_each)
    for shape in (calls.Shape("linear", (128, 256)), calls.Shape("mlp", (128, 256)),
                  calls.Shape("experts", (4, 128, 128, 2))):
        ran.clear()
        rows = calls.measure(shape, [8, 16], ["train", "infer"], max_experts=2,
                             deadline=float("inf"))
        assert rows == {m: [(8, 2.0, 1.0), (16, 2.0, 1.0)] for m in ("train", "infer")}, shape
        assert ran == ["fp8", "bf16"] * 4, shape
