"""Memory saver benchmark: ours against torch-memory-saver and plain pinned copies, in one run.

    python scripts/bench_saver.py                      # the full run (at most 95 s: --budget)
    python scripts/bench_saver.py --sizes 1,16 --backup-gib 4

What is measured (issue 4, item 7), each case in a fresh process so memory and timings of one
case never leak into the next:
  * pause+resume without backup for 1, 16 and 64 GiB held as 2 MiB tensors ("small") and as
    1 GiB tensors ("large"), ours and torch-memory-saver (hook mode "torch"), median of 3. The
    64 GiB case shrinks to what the card has free (minus 4 GiB) and says so.
  * with CPU backup, 8 GiB as 1 GiB tensors: pause and resume GiB/s against a plain pinned
    cudaMemcpyAsync of the same bytes (torch pinned tensor, copy_ non_blocking) measured in the
    same process; the first pause, which pins our host shadows, separately; a swap (pause one
    4 GiB tag, resume another) against pinned D2H and H2D running together on two streams; and
    torch-memory-saver's pause/resume on the same data.
  * the cost of allocating inside a region: 64 MiB tensors on fresh memory, and a 1 MiB
    alloc+free on cached memory, against PyTorch's caching allocator outside any region.

torch-memory-saver is the PyPI wheel (0.0.10): the GPU machine has no internet, so it is installed
from .whl/ beforehand (`pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and
PYTHONPATH=/tmp/site:$PWD). Without it its column is skipped with a message. Headline rows go to
scripts/summary.py's record().

Each child prints every measurement as soon as it has it, so a child that dies later loses
nothing, and the parent prints the table with whatever both savers produced ("-" where one did
not). Children run with faulthandler and FP8MOE_SAVER_DEBUG=1, so a crash shows the Python line,
the saver's last driver calls and a native backtrace. The whole run keeps to --budget seconds:
a child still running when it is spent is stopped, and cases that no longer fit are skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
GiB, MiB = 1 << 30, 1 << 20
LAYOUTS = {"small": 2 * MiB, "large": GiB}
MARGIN = 4 * GiB  # left free on the card by the largest no-backup case


# ---------------------------------------------------------------------------------------------
# the two savers behind one small interface (used inside child processes)


class Ours:
    name = "ours"

    def __init__(self):
        from trainer import saver
        self.saver = saver

    def region(self, tag, backup):
        return self.saver.region(tag, cpu_backup=backup)

    def pause(self, tag):
        self.saver.pause(tag)

    def resume(self, tag):
        self.saver.resume(tag)


class Tms:
    name = "torch-memory-saver"

    def __init__(self):
        from torch_memory_saver import torch_memory_saver
        torch_memory_saver.hook_mode = "torch"
        self.tms = torch_memory_saver

    def region(self, tag, backup):
        return self.tms.region(tag=tag, enable_cpu_backup=backup)

    def pause(self, tag):
        self.tms.pause(tag)

    def resume(self, tag):
        self.tms.resume(tag)


def _sync_time(fn) -> float:
    import torch
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# child cases


def case_nobackup(impl, layout: str, sizes_gib: list[int]):
    """Grow one tag through the sizes; at each, time pause and resume three times. Yields
    (size, row) as each size finishes."""
    import torch
    piece = LAYOUTS[layout]
    tensors = []
    for size in sizes_gib:
        free = torch.cuda.mem_get_info()[0] + len(tensors) * piece
        actual = min(size * GiB, (free - MARGIN) // GiB * GiB)
        with impl.region("bench", False):
            while len(tensors) * piece < actual:
                tensors.append(torch.empty(piece, dtype=torch.uint8, device="cuda"))
        free0 = torch.cuda.mem_get_info()[0]
        times = []
        for _ in range(3):
            pause = _sync_time(lambda: impl.pause("bench"))
            freed = torch.cuda.mem_get_info()[0] - free0
            times.append((pause, _sync_time(lambda: impl.resume("bench"))))
        yield str(size), {"gib": actual / GiB, "tensors": len(tensors), "freed_gib": freed / GiB,
                          "pause_ms": 1e3 * statistics.median(t[0] for t in times),
                          "resume_ms": 1e3 * statistics.median(t[1] for t in times),
                          "total_ms": 1e3 * statistics.median(t[0] + t[1] for t in times)}


def _backed_tag(impl, tag: str, gib: int):
    import torch
    with impl.region(tag, True):
        tensors = [torch.randint(0, 256, (GiB,), dtype=torch.uint8, device="cuda") for _ in range(gib)]
    return tensors, [t[:: 1 << 16].cpu() for t in tensors]


def _check(tensors, samples) -> None:
    import torch
    assert all(torch.equal(t[:: 1 << 16].cpu(), s) for t, s in zip(tensors, samples)), "backup lost data"


def case_backup(impl, gib: int, cycles: int) -> dict:
    """First pause (ours pins here), then steady pause/resume cycles; contents are checked."""
    tensors, samples = _backed_tag(impl, "backup", gib)
    first = _sync_time(lambda: impl.pause("backup"))
    first_resume = _sync_time(lambda: impl.resume("backup"))
    pauses, resumes = [first], [first_resume]
    for _ in range(cycles):
        pauses.append(_sync_time(lambda: impl.pause("backup")))
        resumes.append(_sync_time(lambda: impl.resume("backup")))
    _check(tensors, samples)
    steady_p = statistics.median(pauses[1:]) if cycles else first
    steady_r = statistics.median(resumes[1:]) if cycles else first_resume
    return {"gib": gib, "first_pause_gibs": gib / first, "pause_gibs": gib / steady_p,
            "resume_gibs": gib / steady_r}


def case_swap(impl, gib: int) -> dict:
    """Pause one backed-up tag while resuming another (after one warm-up cycle of each)."""
    a, a_samples = _backed_tag(impl, "swap_a", gib)
    b, b_samples = _backed_tag(impl, "swap_b", gib)
    for tag in ("swap_a", "swap_b"):
        impl.pause(tag)
        impl.resume(tag)
    impl.pause("swap_b")
    seconds = []
    for pause, resume in (("swap_a", "swap_b"), ("swap_b", "swap_a")) * 2:
        seconds.append(_sync_time(lambda: impl.saver.swap(pause=pause, resume=resume)))
    impl.resume("swap_b")
    _check(a + b, a_samples + b_samples)
    return {"gib_each": gib, "aggregate_gibs": 2 * gib / statistics.median(seconds)}


def case_pinned_copies(gib: int) -> dict:
    """Plain pinned cudaMemcpyAsync: D2H, H2D, and both at once on two streams."""
    import torch
    dev = torch.empty(gib * GiB, dtype=torch.uint8, device="cuda")
    host = torch.empty(gib * GiB, dtype=torch.uint8, pin_memory=True)
    half = gib * GiB // 2
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        with torch.cuda.stream(s1):
            host[:half].copy_(dev[:half], non_blocking=True)
        with torch.cuda.stream(s2):
            dev[half:].copy_(host[half:], non_blocking=True)

    host.copy_(dev, non_blocking=True)
    d2h = min(_sync_time(lambda: host.copy_(dev, non_blocking=True)) for _ in range(3))
    h2d = min(_sync_time(lambda: dev.copy_(host, non_blocking=True)) for _ in range(3))
    duplex = min(_sync_time(both) for _ in range(3))
    return {"d2h_gibs": gib / d2h, "h2d_gibs": gib / h2d, "duplex_gibs": gib / duplex}


def case_alloc(impl) -> dict:
    """Fresh 64 MiB allocations and cached 1 MiB alloc+free, in a region and outside any."""
    import torch

    def cold():
        torch.cuda.synchronize()
        start = time.perf_counter()
        kept = [torch.empty(64 * MiB, dtype=torch.uint8, device="cuda") for _ in range(128)]
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(kept) * 1e6, kept

    def warm(n=20000):
        torch.empty(MiB, dtype=torch.uint8, device="cuda")
        start = time.perf_counter()
        for _ in range(n):
            x = torch.empty(MiB, dtype=torch.uint8, device="cuda")
            del x
        return (time.perf_counter() - start) / n * 1e6

    plain_cold, kept = cold()
    del kept
    torch.cuda.empty_cache()
    plain_warm = warm()
    with impl.region("alloc", False):
        region_cold, kept = cold()
        region_warm = warm()
    return {"cold_us": region_cold, "warm_us": region_warm, "plain_cold_us": plain_cold,
            "plain_warm_us": plain_warm}


def emit(key: str, value) -> None:
    """One finished measurement, printed at once: a later crash in the same child loses nothing."""
    print("PART " + json.dumps({key: value}), flush=True)


def child(impl_name: str, case: str, args: list[str]) -> None:
    impl = Ours() if impl_name == "ours" else Tms()
    if case == "nobackup":
        for size, row in case_nobackup(impl, args[0], [int(s) for s in args[1].split(",")]):
            emit(size, row)
        return
    gib = int(args[0])
    if impl_name == "ours":
        import torch
        emit("pinned", case_pinned_copies(gib))  # the baseline first, so it exists whatever follows
        torch.cuda.empty_cache()
    emit("backup", case_backup(impl, gib, cycles=3 if impl_name == "ours" else 1))
    emit("alloc", case_alloc(impl))
    if impl_name == "ours":
        emit("swap", case_swap(impl, gib // 2))


# ---------------------------------------------------------------------------------------------
# parent: run the children against a time budget, print, record


class Budget:
    """The whole run's time limit (gpu_check.sh runs every benchmark; this one stays short)."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_child(impl: str, case: str, *args: str, budget: Budget, min_seconds: float = 10) -> dict:
    """The child's measurements (whatever it finished); {"failed": why} is added when it did not
    finish. Children run with faulthandler and the saver's crash trace, so a crash says where."""
    label = f"{impl} {case} {' '.join(args)}"
    if budget.left() < min_seconds:
        print(f"  {label}: skipped (time budget spent)")
        return {"failed": "skipped: time budget spent"}
    cmd = [sys.executable, "-X", "faulthandler", __file__, "--child", impl, case, *args]
    env = dict(os.environ, FP8MOE_SAVER_DEBUG="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget.left())
        out, err, why = proc.stdout, proc.stderr, f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired as timeout:
        out, err, why = _text(timeout.stdout), _text(timeout.stderr), "stopped: time budget spent"
    result = {}
    for line in out.splitlines():
        if line.startswith("PART "):
            result.update(json.loads(line[len("PART "):]))
    if "DONE" not in out.splitlines():
        result.setdefault("failed", why)
    if "failed" in result:
        tail = (out + err).strip().splitlines()[-60:]
        print(f"  {label}: {result['failed']}\n    " + "\n    ".join(tail))
    return result


def tms_available() -> str | None:
    if importlib.util.find_spec("torch_memory_saver") is None:
        return ("torch-memory-saver is not installed: `python3 -m pip install -q --no-index --no-deps "
                "--no-compile --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD` "
                "(the wheel is downloaded into .whl/ on a machine with internet); its column is skipped")
    return None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report_nobackup(layout: str, ours: dict, tms: dict, sizes: list[str]) -> None:
    from summary import record
    print(f"  {'layout':6s} {'GiB':>5s} {'tensors':>7s} | {'ours pause':>10s} {'resume':>8s} {'freed':>6s} | "
          f"{'tms pause':>10s} {'resume':>8s} {'freed':>6s}   (ms, GiB)")
    for size in sizes:
        o, t = ours.get(size), tms.get(size)
        row = o or t
        if row is None:
            print(f"  {layout:6s} {size:>5s}: no result from either saver")
            continue
        print(f"  {layout:6s} {row['gib']:5.1f} {row['tensors']:7d} | "
              f"{_fmt(o and o['pause_ms'], '10.2f')} {_fmt(o and o['resume_ms'], '8.2f')} "
              f"{_fmt(o and o['freed_gib'], '6.2f')} | {_fmt(t and t['pause_ms'], '10.2f')} "
              f"{_fmt(t and t['resume_ms'], '8.2f')} {_fmt(t and t['freed_gib'], '6.2f')}")
        if row["gib"] != float(size):
            print(f"    ({size} GiB case scaled to {row['gib']:.0f} GiB: the card has too little free memory)")
        if o and t:
            record("saver", f"pause+resume {o['gib']:.0f} GiB {layout} tensors, no backup",
                   o["total_ms"], "ms", "torch-memory-saver", t["total_ms"], higher_is_better=False)


def report_backup(ours: dict, tms: dict) -> None:
    from summary import record
    b, p, s, a = (ours.get(k) for k in ("backup", "pinned", "swap", "alloc"))
    tb, ta = tms.get("backup"), tms.get("alloc")
    if p:
        print(f"  pinned cudaMemcpyAsync: D2H {p['d2h_gibs']:.1f}, H2D {p['h2d_gibs']:.1f}, "
              f"both directions {p['duplex_gibs']:.1f} GiB/s")
    for name, row in (("ours", b), ("tms", tb)):
        if row:
            print(f"  {name:4s} backup {row['gib']} GiB: pause {row['pause_gibs']:.2f} GiB/s (first, pinning: "
                  f"{row['first_pause_gibs']:.2f}), resume {row['resume_gibs']:.2f} GiB/s")
    if s:
        print(f"  ours swap 2 x {s['gib_each']} GiB: {s['aggregate_gibs']:.1f} GiB/s aggregate")
    for name, row in (("ours", a), ("tms", ta)):
        if row:
            print(f"  {name:4s} alloc: 64 MiB fresh {row['cold_us']:.1f} us (caching allocator "
                  f"{row['plain_cold_us']:.1f}), 1 MiB cached {row['warm_us']:.2f} us (caching allocator "
                  f"{row['plain_warm_us']:.2f})")
    if b and p:
        gib = b["gib"]
        record("saver", f"backup pause {gib} GiB", b["pause_gibs"], "GiB/s", "pinned D2H copy", p["d2h_gibs"])
        record("saver", f"backup resume {gib} GiB", b["resume_gibs"], "GiB/s", "pinned H2D copy", p["h2d_gibs"])
    if s and p:
        record("saver", f"swap 2x{s['gib_each']} GiB (D2H+H2D)", s["aggregate_gibs"], "GiB/s",
               "pinned D2H+H2D, two streams", p["duplex_gibs"])
    if a:
        record("saver", "alloc 64 MiB fresh, in region", a["cold_us"], "us", "PyTorch caching allocator",
               a["plain_cold_us"], higher_is_better=False)
        record("saver", "alloc+free 1 MiB cached, in region", a["warm_us"], "us", "PyTorch caching allocator",
               a["plain_warm_us"], higher_is_better=False)
    if b and tb:
        gib = b["gib"]
        record("saver", f"backup pause {gib} GiB vs tms", b["pause_gibs"], "GiB/s", "torch-memory-saver",
               tb["pause_gibs"])
        record("saver", f"backup first pause {gib} GiB (pins host)", b["first_pause_gibs"], "GiB/s",
               "torch-memory-saver", tb["first_pause_gibs"])
        record("saver", f"backup resume {gib} GiB vs tms", b["resume_gibs"], "GiB/s", "torch-memory-saver",
               tb["resume_gibs"])
    if a and ta:
        record("saver", "alloc 64 MiB fresh, in region vs tms", a["cold_us"], "us", "torch-memory-saver",
               ta["cold_us"], higher_is_better=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,64", help="GiB held in the no-backup cases")
    parser.add_argument("--backup-gib", type=int, default=8, help="GiB in the backup case (even)")
    parser.add_argument("--budget", type=float, default=95.0,
                        help="seconds for the whole run; cases that no longer fit are skipped")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            child(args.child[0], args.child[1], args.child[2:])
            print("DONE", flush=True)
        except Exception as err:  # reported by the parent, which goes on with the other cases
            traceback.print_exc()
            emit("failed", f"{type(err).__name__}: {err}")
        os._exit(0)  # skip interpreter teardown: torch-memory-saver can abort in its free hook there

    budget = Budget(args.budget)
    spec = importlib.util.spec_from_file_location("saver_build", ROOT / "csrc/saver/build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.ensure_built()
    missing_tms = tms_available()
    if missing_tms:
        print(missing_tms)
    sizes = args.sizes.split(",")
    results = {}
    for layout in LAYOUTS:
        print(f"== no backup, {layout} tensors (aim: pause+resume <= 10 ms per 16 GiB)")
        results[layout] = (run_child("ours", "nobackup", layout, args.sizes, budget=budget),
                           {} if missing_tms else run_child("tms", "nobackup", layout, args.sizes, budget=budget))
        report_nobackup(layout, *results[layout], sizes)
    print(f"== cpu backup {args.backup_gib} GiB (aim: >= 90% of a pinned copy), swap, allocation cost")
    results["backup"] = (run_child("ours", "backup", str(args.backup_gib), budget=budget),
                         {} if missing_tms else run_child("tms", "backup", str(args.backup_gib), budget=budget))
    report_backup(*results["backup"])
    print(f"(bench_saver took {args.budget - budget.left():.0f} s of its {args.budget:.0f} s budget)")
    failed = [key for key, (ours, _) in results.items() if "failed" in ours]
    if failed:
        raise SystemExit(f"bench_saver: our saver did not finish the {', '.join(failed)} case(s) (see above)")


if __name__ == "__main__":
    main()
