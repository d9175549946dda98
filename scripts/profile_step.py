"""Where a training step's GPU time goes: phase timings and a kernel table, for bf16 and FP8.

A step is `trainer.engine.train_step` on the same DeepSpeed ZeRO-1 engine `bench_train.py` builds.
Two views of it:

- phases: CUDA events around the forward, the backward (on this thread, as train_step runs it:
  trainer.engine.backward) and `engine.step()` (the optimizer, the gradient norm and clipping,
  ZeRO's copies between BF16 and FP32), over a few steps;
- kernels: torch.profiler over two steps, kernels summed by name and grouped into families
  (attention, GEMMs, our fused Triton and CUDA kernels, elementwise and reductions, copies,
  communication), top kernels listed with their share of GPU time.

This is a diagnostic for developers, not a benchmark of record (it records nothing in the summary
table): use it to decide what to fuse next.

    python scripts/profile_step.py                     # small, 4 x 2048, bf16 then fp8
    python scripts/profile_step.py --recipes off --seq-len 4096 --top 40
    python scripts/profile_step.py --recipes off --seq-len 4096 --copies   # who launches the copies
    python scripts/profile_step.py --syncs      # every host sync of a step, with its source line
    python scripts/profile_step.py --gaps       # where the GPU waits for the host, and for what

--syncs runs one step under torch.cuda.set_sync_debug_mode("warn"), which warns at every CUDA
call that makes the host wait for the GPU (an .item(), a copy to the host, a copy from pageable
host memory): a sync after the optimizer step is queued keeps the next forward from being queued
behind it (trainer/engine.py).

--gaps sums the intervals of a step in which the GPU ran nothing (no kernel, copy or memset on any
stream), then profiles again with Python stacks to group them by the code whose launch ended each
one: the time a step loses to the host (launch-bound stretches, syncs, Python between kernels),
which the kernel table cannot show.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import os
import re
import sys
import traceback
import warnings
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import add_engine_flags, build, fp8_available  # noqa: E402
from isolate import in_fresh_process  # noqa: E402
from timing import idle_gaps, idle_ms, profiled_trace  # noqa: E402
from models.fp8.linear import invalidate_weight_caches  # noqa: E402
from trainer import engine as eng  # noqa: E402

FAMILIES = [  # first match wins: cuDNN's attention kernels carry "wgmma" in their names too
    ("attention", r"flash|fmha|attention|sdpa"),
    ("gemm", r"gemm|sm90_xmma|nvjet|cutlass|cublas|_scaled_mm|wgmma|grouped_fprop|grouped_wgrad"),
    ("fused", r"^triton_|_kernel$|_kernel\("),  # ours: Triton, and the CUDA ones (name(args))
    ("copy", r"memcpy|memset|copy|cat|fill"),
    ("comm", r"nccl|all_reduce|allreduce|gloo"),
    ("reduce", r"reduce|sum|norm|max|softmax|topk|sort|scan|cumsum|bincount|histogram"),
    ("index", r"index|gather|scatter|embedding"),
    ("elementwise", r"elementwise|vectorized|unrolled|foreach|multi_tensor"),
]


def family(name: str) -> str:
    low = name.lower()
    for label, pattern in FAMILIES:
        if re.search(pattern, low):
            return label
    return "other"


def phase_times(engine, batch, steps: int) -> dict[str, float]:
    """Mean ms of forward, backward and engine.step over `steps` single-micro-batch steps."""
    totals = defaultdict(float)
    for _ in range(steps):
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        marks[0].record()
        terms = eng.lm_loss(engine, {k: v.cuda() for k, v in batch.items()})
        marks[1].record()
        eng.backward(engine, terms.loss)
        marks[2].record()
        engine.step()
        marks[3].record()
        torch.cuda.synchronize()
        invalidate_weight_caches(engine.module)
        for name, (a, b) in zip(("forward", "backward", "engine.step"), zip(marks, marks[1:])):
            totals[name] += a.elapsed_time(b)
    return {k: v / steps for k, v in totals.items()}


def kernel_table(engine, batch, balancer, top: int) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            eng.train_step(engine, [batch], eng.lm_loss, balancer)
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_name[evt.name][0] += evt.device_time_total / 2e3  # us over two steps -> ms per step
            per_name[evt.name][1] += 1
    total = sum(t for t, _ in per_name.values())
    by_family = defaultdict(float)
    for name, (ms, _) in per_name.items():
        by_family[family(name)] += ms
    lines = [f"GPU kernel time per step: {total:.1f} ms"]
    for label, ms in sorted(by_family.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {label:<12} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
    lines.append(f"top {top} kernels (ms per step, calls per step, family):")
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    for name, (ms, calls) in ranked:
        lines.append(f"  {ms:8.2f} ms {calls // 2:5d}x  {family(name):<11} {name[:110]}")
    return lines


def op_table(engine, batch, top: int) -> str:
    """Forward+backward only, GPU time per aten op and input shapes: which code the time is in."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        terms = eng.lm_loss(engine, {k: v.cuda() for k, v in batch.items()})
        eng.backward(engine, terms.loss)
        torch.cuda.synchronize()
    averages = prof.key_averages(group_by_input_shape=True)
    return averages.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=48,
                          max_shapes_column_width=70)


COPY_OPS = ("aten::copy_", "aten::cat")
"""The aten ops whose kernels make up the "copy" family (besides DeepSpeed's memcpys)."""


def copy_table(engine, batch, top: int) -> list[str]:
    """Forward+backward only: the copy ops by GPU time, grouped by input shapes and by the ops
    that called them (forward: the module code's ops; backward: autograd's node, such as
    `evaluate_function: CatBackward0`), which says where each copy comes from."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=True) as prof:
        terms = eng.lm_loss(engine, {k: v.cuda() for k, v in batch.items()})
        eng.backward(engine, terms.loss)
        torch.cuda.synchronize()
    groups = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        if evt.name in COPY_OPS:
            callers, parent = [], evt.cpu_parent
            while parent is not None and len(callers) < 3:
                callers.append(parent.name.replace("autograd::engine::", ""))
                parent = parent.cpu_parent
            key = (evt.name, str(evt.input_shapes)[:90], " < ".join(callers)[:150])
            groups[key][0] += evt.device_time_total / 1e3
            groups[key][1] += 1
    lines = ["copy ops of one forward+backward (ms, calls, op, input shapes, called from):"]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    for (name, shapes, callers), (ms, calls) in ranked:
        lines.append(f"  {ms:7.2f} ms {calls:4d}x  {name} {shapes}\n        < {callers}")
    return lines


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SyncRecorder:
    """Collects, inside the `with` block, the host-sync warnings of CUDA's sync debug mode and
    every explicit `torch.cuda.synchronize()` (which that mode does not report: DeepSpeed's
    throughput timer made two a step that way until the twenty-second session), each under the
    innermost frames of this project's code (and DeepSpeed's) that led to it."""

    MARK = "synchronizing CUDA operation"

    def __init__(self, frames: int = 4):
        self.frames = frames
        self.sites: collections.Counter = collections.Counter()

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        self._synchronize = torch.cuda.synchronize

        def recorded_synchronize(*args, **kwargs):
            self._count("torch.cuda.synchronize: ")
            return self._synchronize(*args, **kwargs)
        torch.cuda.synchronize = recorded_synchronize
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize = self._synchronize
        self._catch.__exit__(*exc)

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if self.MARK in str(message):
            self._count("")

    def _count(self, kind: str) -> None:
        ours = [f for f in traceback.extract_stack()[:-2] if _is_ours(f.filename)]
        self.sites[kind + " < ".join(f"{_short(f.filename)}:{f.lineno} ({f.name})"
                                     for f in reversed(ours[-self.frames:]))] += 1

    def lines(self) -> list[str]:
        out = [f"host syncs of one step: {sum(self.sites.values())}"]
        out += [f"  {n:3d}x  {site}" for site, n in self.sites.most_common()]
        return out


def _short(filename: str) -> str:
    if filename.startswith(ROOT):
        return os.path.relpath(filename, ROOT)
    if "deepspeed" in filename:
        return "deepspeed" + filename.split("deepspeed", 1)[-1]
    return filename


def sync_table(engine, batch, balancer) -> list[str]:
    """One training step under CUDA's sync debug mode: where the host waited for the GPU."""
    torch.cuda.synchronize()
    with SyncRecorder() as recorder:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            eng.train_step(engine, [batch], eng.lm_loss, balancer)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return recorder.lines()


LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


class HostStacks:
    """The Python frames (profiler `with_stack` events) open on the launching thread at a host
    time: which code a kernel launch came from."""

    def __init__(self, trace_events: list[dict]):
        by_thread = defaultdict(list)
        self.by_id = {}
        for e in trace_events:
            if e.get("ph") == "X" and e.get("cat") == "python_function":
                by_thread[e["tid"]].append(e)
                self.by_id[e["args"].get("Python id")] = e
        self.frames = {tid: sorted(es, key=lambda e: e["ts"]) for tid, es in by_thread.items()}
        self.starts = {tid: [e["ts"] for e in es] for tid, es in self.frames.items()}

    def at(self, tid, ts: float, depth: int) -> str:
        """The innermost `depth` frames of project or DeepSpeed code open at ts, innermost first."""
        frames = self.frames.get(tid, [])
        i = bisect.bisect_right(self.starts.get(tid, []), ts) - 1
        while i >= 0 and frames[i]["ts"] + frames[i]["dur"] < ts:
            i -= 1  # frames nest: the latest-started one still open is the innermost
        chain, frame = [], frames[i] if i >= 0 else None
        while frame is not None and len(chain) < depth:
            if _is_ours(frame["name"].split("(", 1)[0]):
                chain.append(_short_frame(frame["name"]))
            frame = self.by_id.get(frame["args"].get("Python parent id"))
        return " < ".join(chain) or "(no project frame)"


def _is_ours(path: str) -> bool:
    """Whether a source path (absolute, or relative to the project as the profiler's Python
    frames name it) is this project's code or DeepSpeed's."""
    return path.startswith(ROOT) or "deepspeed" in path or path.startswith(
        ("models/", "trainer/", "scripts/"))


def _short_frame(frame_name: str) -> str:
    path, _, rest = frame_name.partition("(")
    return f"{_short(path)}({rest}"


def gap_lines(trace_events: list[dict], steps: int, top: int, min_us: float = 20.0,
              depth: int = 3) -> list[str]:
    """The idle stretches of `steps` profiled steps, summed by the code that launched the work
    ending each one (ms per step)."""
    launches = {e["args"]["correlation"]: e for e in trace_events
                if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATEGORIES
                and "correlation" in e.get("args", {})}
    stacks = HostStacks(trace_events)
    sites = defaultdict(lambda: [0.0, 0, ""])
    gaps = idle_gaps(trace_events, min_us)
    for _, length, ended_by in gaps:
        launch = launches.get(ended_by.get("args", {}).get("correlation"))
        site = ("(launched from no traced call)" if launch is None
                else stacks.at(launch["tid"], launch["ts"], depth))
        entry = sites[site]
        entry[0] += length / 1e3 / steps
        entry[1] += 1
        entry[2] = entry[2] or ended_by["name"][:60]
    lines = [f"GPU idle per step: {idle_ms(gaps, steps):.2f} ms in {len(gaps) / steps:.0f} "
             f"stretches of >= {min_us:.0f} us (ms per step, stretches per step, launched from; "
             "first kernel after)"]
    for site, (ms, n, kernel) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {ms:7.2f} ms {n / steps:6.1f}x  {site}\n        then {kernel}")
    return lines


def gap_table(engine, batch, balancer, top: int) -> list[str]:
    """Where the GPU sat idle in a training step. Two profiles of two steps each: the kernel
    timeline alone (little host overhead: the idle time as it is), then with Python stacks to
    name the code each wait ended on (the stacks slow the host, so there the waits grow; read
    that table for where, not for how much)."""
    plain = idle_gaps(_step_trace(engine, batch, balancer, with_stack=False), min_us=20.0)
    lines = [f"GPU idle per step, kernel timeline only: {idle_ms(plain, 2):.2f} ms in "
             f"{len(plain) / 2:.0f} stretches of >= 20 us"]
    stacked = _step_trace(engine, batch, balancer, with_stack=True)
    return lines + ["with Python stacks (which slow the host severalfold: read this table for "
                    "where the GPU waits, the figure above for how long):"] + gap_lines(
        stacked, steps=2, top=top)


def _step_trace(engine, batch, balancer, with_stack: bool) -> list[dict]:
    """The Chrome-trace events of two training steps."""
    return profiled_trace(lambda: eng.train_step(engine, [batch], eng.lm_loss, balancer),
                          with_stack, calls=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--layers", type=int, default=0)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--recipes", nargs="+", default=["off", "blockwise"])
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--ops", action="store_true", help="also a per-op table of forward+backward")
    p.add_argument("--copies", action="store_true",
                   help="also the copy ops of forward+backward: shapes, calling ops")
    p.add_argument("--syncs", action="store_true",
                   help="also every host sync of one step, with the code that made it")
    p.add_argument("--gaps", action="store_true",
                   help="also where the GPU sat idle in a step, by the code that ended each wait")
    add_engine_flags(p)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA GPU")
    for recipe in args.recipes:
        if recipe != "off" and not fp8_available():
            print(f"fp8={recipe} skipped: needs models.fp8 and an sm90 GPU")
            continue
        in_fresh_process(profile_recipe, args, recipe)


def profile_recipe(args, recipe: str) -> None:
    """Phases, memory and kernels of one recipe's step, printed; run in its own process."""
    job = eng.init_distributed()
    cfg, engine, balancer = build(args, recipe, job)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
    batch = {"tokens": rows[:, :-1], "labels": rows[:, 1:]}
    for _ in range(3):
        eng.train_step(engine, [batch], eng.lm_loss, balancer)
    resident = torch.cuda.memory_allocated() / 2 ** 30
    torch.cuda.reset_peak_memory_stats()
    phases = phase_times(engine, batch, steps=4)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    print(f"\n=== {args.size} fp8={recipe} {args.micro_batch}x{args.seq_len}: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in phases.items())
          + f"; memory between steps {resident:.1f} GiB, peak {peak:.1f} GiB")
    print("\n".join(kernel_table(engine, batch, balancer, args.top)))
    if args.ops:
        print(op_table(engine, batch, args.top), flush=True)
    if args.copies:
        print("\n".join(copy_table(engine, batch, args.top)), flush=True)
    if args.syncs:
        print("\n".join(sync_table(engine, batch, balancer)), flush=True)
    if args.gaps:
        print("\n".join(gap_table(engine, batch, balancer, args.top)), flush=True)


if __name__ == "__main__":
    main()
