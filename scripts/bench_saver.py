"""Memory saver benchmark: ours against torch-memory-saver and plain pinned copies, in one run.

    python scripts/bench_saver.py                      # the full run (about 1.5 min on an H100)
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


def case_nobackup(impl, layout: str, sizes_gib: list[int]) -> dict:
    """Grow one tag through the sizes; at each, time pause and resume three times."""
    import torch
    piece = LAYOUTS[layout]
    tensors, out = [], {}
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
        out[str(size)] = {"gib": actual / GiB, "tensors": len(tensors), "freed_gib": freed / GiB,
                          "pause_ms": 1e3 * statistics.median(t[0] for t in times),
                          "resume_ms": 1e3 * statistics.median(t[1] for t in times),
                          "total_ms": 1e3 * statistics.median(t[0] + t[1] for t in times)}
    return out


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


def child(impl_name: str, case: str, args: list[str]) -> dict:
    impl = Ours() if impl_name == "ours" else Tms()
    if case == "nobackup":
        return case_nobackup(impl, args[0], [int(s) for s in args[1].split(",")])
    gib = int(args[0])
    out = {"backup": case_backup(impl, gib, cycles=3 if impl_name == "ours" else 1),
           "alloc": case_alloc(impl)}
    if impl_name == "ours":
        out["swap"] = case_swap(impl, gib // 2)
        out["pinned"] = case_pinned_copies(gib)
    return out


# ---------------------------------------------------------------------------------------------
# parent: run the children, print, record


def run_child(impl: str, case: str, *args: str) -> dict | None:
    cmd = [sys.executable, __file__, "--child", impl, case, *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
        print(f"  {impl} {case} {' '.join(args)}: no result (rc={proc.returncode})\n    " + "\n    ".join(tail))
        return None
    result = json.loads(lines[-1][len("RESULT "):])
    if "error" in result:
        print(f"  {impl} {case}: {result['error']}")
        return None
    return result


def tms_available() -> str | None:
    if importlib.util.find_spec("torch_memory_saver") is None:
        return ("torch-memory-saver is not installed: `python3 -m pip install -q --no-index --no-deps "
                "--no-compile --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site:$PWD` "
                "(the wheel is downloaded into .whl/ on a machine with internet); its column is skipped")
    return None


def report_nobackup(ours: dict, tms: dict | None, layout: str) -> None:
    from summary import record
    for size, row in ours.items():
        other = (tms or {}).get(size)
        print(f"  {layout:5s} {row['gib']:5.1f} GiB in {row['tensors']:6d} tensors: ours pause "
              f"{row['pause_ms']:7.2f} ms resume {row['resume_ms']:7.2f} ms (freed {row['freed_gib']:.2f} GiB)"
              + (f" | tms pause {other['pause_ms']:7.2f} ms resume {other['resume_ms']:7.2f} ms "
                 f"(freed {other['freed_gib']:.2f} GiB)" if other else ""))
        if row["gib"] != float(size):
            print(f"    ({size} GiB case scaled to {row['gib']:.0f} GiB: the card has too little free memory)")
        if other:
            record("saver", f"pause+resume {row['gib']:.0f} GiB {layout} tensors, no backup",
                   row["total_ms"], "ms", "torch-memory-saver", other["total_ms"], higher_is_better=False)


def report_backup(ours: dict, tms: dict | None) -> None:
    from summary import record
    b, p, s, a = ours["backup"], ours["pinned"], ours["swap"], ours["alloc"]
    gib = b["gib"]
    print(f"  backup {gib} GiB: ours pause {b['pause_gibs']:.1f} GiB/s (first, pinning: "
          f"{b['first_pause_gibs']:.1f}), resume {b['resume_gibs']:.1f} GiB/s | pinned copy D2H "
          f"{p['d2h_gibs']:.1f}, H2D {p['h2d_gibs']:.1f}, both {p['duplex_gibs']:.1f} GiB/s")
    print(f"  swap 2 x {s['gib_each']} GiB: {s['aggregate_gibs']:.1f} GiB/s aggregate")
    record("saver", f"backup pause {gib} GiB", b["pause_gibs"], "GiB/s", "pinned D2H copy", p["d2h_gibs"])
    record("saver", f"backup resume {gib} GiB", b["resume_gibs"], "GiB/s", "pinned H2D copy", p["h2d_gibs"])
    record("saver", f"swap 2x{s['gib_each']} GiB (D2H+H2D)", s["aggregate_gibs"], "GiB/s",
           "pinned D2H+H2D, two streams", p["duplex_gibs"])
    print(f"  alloc: 64 MiB fresh {a['cold_us']:.1f} us (caching allocator {a['plain_cold_us']:.1f}), "
          f"1 MiB cached {a['warm_us']:.2f} us (caching allocator {a['plain_warm_us']:.2f})")
    record("saver", "alloc 64 MiB fresh, in region", a["cold_us"], "us", "PyTorch caching allocator",
           a["plain_cold_us"], higher_is_better=False)
    record("saver", "alloc+free 1 MiB cached, in region", a["warm_us"], "us", "PyTorch caching allocator",
           a["plain_warm_us"], higher_is_better=False)
    if tms:
        t, ta = tms["backup"], tms["alloc"]
        print(f"  tms backup {gib} GiB: pause {t['pause_gibs']:.2f} GiB/s, resume {t['resume_gibs']:.2f} GiB/s; "
              f"alloc 64 MiB fresh {ta['cold_us']:.1f} us, 1 MiB cached {ta['warm_us']:.2f} us")
        record("saver", f"backup pause {gib} GiB vs tms", b["pause_gibs"], "GiB/s", "torch-memory-saver", t["pause_gibs"])
        record("saver", f"backup first pause {gib} GiB (pins host)", b["first_pause_gibs"], "GiB/s",
               "torch-memory-saver", t["first_pause_gibs"])
        record("saver", f"backup resume {gib} GiB vs tms", b["resume_gibs"], "GiB/s", "torch-memory-saver", t["resume_gibs"])
        record("saver", "alloc 64 MiB fresh, in region vs tms", a["cold_us"], "us", "torch-memory-saver",
               ta["cold_us"], higher_is_better=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,64", help="GiB held in the no-backup cases")
    parser.add_argument("--backup-gib", type=int, default=8, help="GiB in the backup case (even)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            result = child(args.child[0], args.child[1], args.child[2:])
        except Exception as err:  # reported by the parent, which goes on with the other cases
            result = {"error": f"{type(err).__name__}: {err}"}
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # skip interpreter teardown: torch-memory-saver can abort in its free hook there

    spec = importlib.util.spec_from_file_location("saver_build", ROOT / "csrc/saver/build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build.ensure_built()
    missing_tms = tms_available()
    if missing_tms:
        print(missing_tms)
    start, failed = time.perf_counter(), False
    for layout in LAYOUTS:
        print(f"== no backup, {layout} tensors (aim: pause+resume <= 10 ms per 16 GiB)")
        ours = run_child("ours", "nobackup", layout, args.sizes)
        tms = None if missing_tms else run_child("tms", "nobackup", layout, args.sizes)
        if ours:
            report_nobackup(ours, tms, layout)
        failed |= ours is None
    print(f"== cpu backup {args.backup_gib} GiB (aim: >= 90% of a pinned copy), swap, allocation cost")
    ours = run_child("ours", "backup", str(args.backup_gib))
    tms = None if missing_tms else run_child("tms", "backup", str(args.backup_gib))
    if ours:
        report_backup(ours, tms)
    failed |= ours is None
    print(f"(bench_saver took {time.perf_counter() - start:.0f} s)")
    if failed:
        raise SystemExit("bench_saver: a case of our saver failed (see above)")


if __name__ == "__main__":
    main()
