"""The benchmarks' timing logic, with the GPU timer replaced by a scripted one.

scripts/timing.interleaved_ms decides which kernel and which baseline run first in each round,
and scripts/bench_fp8_grouped.sweep picks the kernel a row reports; a wrong order or a wrong
pick would skew every ratio gpu_check prints without failing anything on the GPU. Here the
timer returns figures fixed in advance, so the expected order and pick are worked out by hand.
"""
from __future__ import annotations

import math
import os
import sys

import pytest

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
