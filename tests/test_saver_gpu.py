"""GPU tests of the memory saver, each scenario in a fresh process.

The saver's state is per process (one registry, PyTorch pools bound to it), and what these tests
measure, `cudaMemGetInfo` free bytes and RSS, is per process too, so every scenario below runs as
`python tests/test_saver_gpu.py <scenario>` and the pytest function checks its exit status and
that the library printed no error. The library is built first if it is missing or stale.

A scenario that crashes says where: each child runs with Python's faulthandler (the Python stack)
and FP8MOE_SAVER_DEBUG=1 (the library's last driver calls and a native backtrace, csrc/saver/
trace.h), and prints a line per step, so the failure message below shows the step, the Python
line and the driver call that died.

Checked against the issue: pause returns >= 99% of the tag's bytes to the driver and leaves
untagged memory alone; data_ptr() is stable; contents survive with cpu_backup=True (bitwise);
tags pause and resume independently; allocation and free while another tag is paused; CUDA graph
replay after resume; 1,000 cycles leak neither device memory nor RSS; a 10+ GiB tensor; resume
out of memory leaves the tag paused and intact; the LD_PRELOAD mode pauses raw cudaMalloc memory
and a CUDA graph's private pool; a second GPU when there is one; a clean exit with paused tags.
"""
import ctypes
import faulthandler
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture(scope="module")
def library(saver_builder):
    return saver_builder.ensure_built()


def run_scenario(name: str, library: Path, env: dict | None = None, timeout: int = 600):
    env = dict(os.environ, FP8MOE_SAVER_DEBUG="1", PYTHONUNBUFFERED="1", **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        result = subprocess.run([sys.executable, __file__, name], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout
        raise AssertionError(f"{name} timed out after {timeout} s; its output:\n{(out or '')[-4000:]}")
    assert result.returncode == 0, (f"{name} failed (exit status {result.returncode}):\n--- stdout\n"
                                    f"{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-12000:]}")
    assert "[fp8moe saver]" not in result.stderr, result.stderr[-4000:]
    return result


def step(what: str) -> None:
    """Progress of a scenario, so a crash's output says how far it got."""
    print(f"step: {what}", flush=True)


# ---------------------------------------------------------------------------------------------
# scenarios (run in the child process)


def _free():
    import torch
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def _held(saver, tag):
    return saver.report()["tags"][tag]["held_bytes"]


def scenario_freed_bytes_and_stable_addresses():
    import torch
    from trainer import saver
    outside = torch.randn(GiB // 4, device="cuda")
    outside_sum = outside.double().sum().item()
    step("first allocation in a region")
    with saver.region("kv"):
        first = torch.randn(5 * MiB // 4, device="cuda")
        step(f"allocated at {first.data_ptr():#x}; 200 more and a 2 GiB tensor")
        tensors = [first] + [torch.randn(5 * MiB // 4, device="cuda") for _ in range(199)]
        tensors.append(torch.empty(2 * GiB, dtype=torch.uint8, device="cuda"))
    ptrs = [t.data_ptr() for t in tensors]
    tagged = sum(t.nbytes for t in tensors)
    step("report")
    held = _held(saver, "kv")
    print(saver.report(), flush=True)
    assert held >= tagged, (held, tagged)
    free0 = _free()
    step("pause")
    stats = saver.pause("kv")
    free1 = _free()
    print(f"held {held / GiB:.3f} GiB, freed {(free1 - free0) / GiB:.3f} GiB, {stats}")
    assert free1 - free0 >= 0.99 * held and stats.released_bytes == held
    outside.mul_(2)  # untagged memory is untouched and usable
    assert abs(outside.double().sum().item() - 2 * outside_sum) <= 1e-6 * abs(outside_sum) + 1e-3
    step("resume")
    saver.resume("kv")
    step("check")
    assert abs(_free() - free0) <= 2 * MiB
    assert [t.data_ptr() for t in tensors] == ptrs
    for i, t in enumerate(tensors):
        t.fill_(i % 7)
    assert all(bool((t == i % 7).all()) for i, t in enumerate(tensors))


def scenario_cpu_backup_keeps_contents():
    import torch
    from trainer import saver
    g = torch.Generator(device="cuda").manual_seed(0)
    step("allocate")
    with saver.region("weights", cpu_backup=True):
        tensors = [torch.randn(n, device="cuda", generator=g) for n in (1, 32, 1728, 3 * MiB + 1, 64 * MiB)]
        tensors += [torch.randint(0, 255, (6912,), dtype=torch.uint8, device="cuda", generator=g)]
        tensors += [torch.randn(4096, 1000, device="cuda", generator=g).to(torch.bfloat16)]
    view = tensors[-1][7:900, 3:500]
    want = [t.cpu() for t in tensors]
    want_view = view.cpu()
    with saver.region("scratch"):
        scratch = torch.ones(256 * MiB, device="cuda")
    for cycle in range(3):
        step(f"cycle {cycle}")
        saver.pause("weights")
        saver.pause("scratch")
        saver.resume("weights")
        saver.resume("scratch")
        assert all(torch.equal(t.cpu(), w) for t, w in zip(tensors, want))
        assert torch.equal(view.cpu(), want_view)
        scratch.fill_(3)  # no backup: usable, contents were not kept
        assert bool((scratch == 3).all())


def scenario_tags_are_independent():
    import torch
    from trainer import saver
    with saver.region("a", cpu_backup=True):
        a = torch.randn(300 * MiB // 4, device="cuda")
    with saver.region("b", cpu_backup=True):
        b = torch.randn(500 * MiB // 4, device="cuda")
    want_a, want_b = a.cpu(), b.cpu()
    step("pause a")
    saver.pause("a")
    assert torch.equal(b.cpu(), want_b)
    b.add_(1)
    want_b += 1
    saver.pause("b")
    saver.resume("a")
    assert torch.equal(a.cpu(), want_a)
    report = saver.report()["tags"]
    assert report["b"]["paused"] and not report["a"]["paused"]
    assert report["b"]["backed_up_bytes"] >= b.nbytes and report["b"]["held_bytes"] == 0
    saver.resume("b")
    assert torch.equal(b.cpu(), want_b)
    saver.pause("b")
    step("swap")
    saver.swap(pause="a", resume="b")
    assert torch.equal(b.cpu(), want_b)
    saver.resume("a")
    assert torch.equal(a.cpu(), want_a)


def scenario_alloc_and_free_while_another_tag_is_paused():
    import torch
    from trainer import saver
    with saver.region("a", cpu_backup=True):
        keep = torch.randn(64 * MiB, device="cuda")
        drop = torch.randn(64 * MiB, device="cuda")
        raw = saver.default_saver().raw_alloc(32 * MiB)
    want = keep.cpu()
    step("pause a")
    saver.pause("a")
    del drop  # freed while paused: back to its (paused) pool
    saver.default_saver().raw_free(raw)  # released while paused: nothing mapped to give back
    step("allocate in b while a is paused")
    for i in range(50):
        with saver.region("b"):
            x = torch.randn(1 + i * 97 * 1024, device="cuda")
            y = (x * 2).sum()
        z = torch.randn(3 * MiB, device="cuda")
        assert torch.allclose(y, x.sum() * 2, rtol=1e-4, atol=1e-2)
        del x, z
    step("resume a")
    saver.resume("a")
    assert torch.equal(keep.cpu(), want)
    with saver.region("a", cpu_backup=True):
        again = torch.full((64 * MiB,), 5.0, device="cuda")
    assert bool((again == 5).all()) and torch.equal(keep.cpu(), want)


def scenario_cuda_graph_replays_after_resume():
    import torch
    from trainer import saver
    with saver.region("kv"):
        x = torch.randn(1024, 1024, device="cuda")
        w = torch.randn(1024, 1024, device="cuda")
        y = torch.empty(1024, 1024, device="cuda")
    with saver.region("kept", cpu_backup=True):
        u = torch.randn(4 * MiB, device="cuda")
        v = torch.empty_like(u)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.addmm(torch.ones(1, device="cuda"), x, w, out=y)
        torch.mul(u, 3, out=v)
    torch.cuda.current_stream().wait_stream(side)
    step("capture")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.addmm(torch.ones(1, device="cuda"), x, w, out=y)
        torch.mul(u, 3, out=v)
    for cycle in range(2):
        step(f"cycle {cycle}")
        saver.pause("kv")
        saver.pause("kept")
        saver.resume("kept")
        saver.resume("kv")
        x.copy_(torch.randn_like(x))  # no backup: refill
        w.copy_(torch.randn_like(w))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, torch.addmm(torch.ones(1, device="cuda"), x, w))
        assert torch.equal(v, u * 3)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def scenario_thousand_cycles_leak_nothing():
    import torch
    from trainer import saver
    with saver.region("state", cpu_backup=True):
        state = [torch.randn(16 * MiB // 4, device="cuda") for _ in range(4)]
    with saver.region("cache"):
        cache = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    want = [s.cpu() for s in state]
    for _ in range(5):
        saver.pause("state")
        saver.resume("state")
    free0, rss0 = _free(), _rss()
    step("1000 cycles")
    for i in range(1000):
        if i % 2:
            saver.pause("cache")
            saver.swap(pause="state", resume="cache")
            saver.resume("state")
        else:
            saver.pause("state")
            saver.pause("cache")
            saver.resume("state")
            saver.resume("cache")
    free1, rss1 = _free(), _rss()
    print(f"free {free0 / MiB:.1f} -> {free1 / MiB:.1f} MiB, rss {rss0 / MiB:.1f} -> {rss1 / MiB:.1f} MiB")
    assert abs(free1 - free0) <= 2 * MiB
    assert rss1 - rss0 <= 32 * MiB
    assert all(torch.equal(s.cpu(), w) for s, w in zip(state, want))
    cache.fill_(1)


def scenario_tensor_over_10_gib():
    import torch
    from trainer import saver
    n = 10 * GiB + 512 * MiB

    def pattern():
        g = torch.Generator(device="cuda").manual_seed(1234)
        return torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda", generator=g)

    step("allocate 10.5 GiB")
    with saver.region("big", cpu_backup=True):
        big = pattern()
    free0 = _free()
    step("pause")
    stats = saver.pause("big")
    freed = _free() - free0
    print(f"freed {freed / GiB:.2f} GiB of {n / GiB:.2f}, {stats}")
    assert freed >= 0.99 * n and stats.to_host_bytes >= n
    step("resume")
    saver.resume("big")
    assert torch.equal(big, pattern())


def scenario_resume_out_of_memory_keeps_the_tag_paused():
    import torch
    from trainer import saver
    g = torch.Generator(device="cuda").manual_seed(7)
    with saver.region("a", cpu_backup=True):
        a = torch.randint(0, 256, (8 * GiB,), dtype=torch.uint8, device="cuda", generator=g)
    want = a[::4096].cpu()
    step("pause")
    saver.pause("a")
    filler = torch.empty(_free() - 4 * GiB, dtype=torch.uint8, device="cuda")
    free0 = _free()
    step("resume with 4 GiB free")
    try:
        saver.resume("a")
    except saver.SaverOutOfMemoryError as err:
        message = str(err)
    else:
        raise AssertionError("resume should have run out of memory")
    print(message)
    missing = int(re.search(r"missing, (\d+) bytes", message).group(1))
    assert 3 * GiB <= missing <= 5 * GiB, missing
    assert abs(_free() - free0) <= 2 * MiB  # nothing half-mapped
    row = saver.report()["tags"]["a"]
    assert row["paused"] and row["held_bytes"] == 0 and row["backed_up_bytes"] >= 8 * GiB
    try:
        with saver.region("too_big"):
            torch.empty(6 * GiB, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as err:
        assert "cuMemCreate failed" in "".join(getattr(err, "__notes__", [])), err
    else:
        raise AssertionError("allocating 6 GiB with 4 GiB free should fail")
    del filler
    torch.cuda.empty_cache()
    saver.resume("a")
    assert torch.equal(a[::4096].cpu(), want)


def _cudart():
    """(global, runtime): cudaMalloc/cudaFree as any library linked to libcudart resolves them
    (the global scope, where the preloaded saver comes first), and the runtime library itself."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    assert paths, "libcudart is not loaded"
    runtime = ctypes.CDLL(sorted(paths)[0])
    runtime.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    runtime.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    hooked = ctypes.CDLL(None)
    hooked.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    hooked.cudaFree.argtypes = [ctypes.c_void_p]
    return hooked, runtime


def scenario_preload_pauses_raw_cudamalloc_and_graph_pools():
    import torch
    from trainer import saver
    assert saver.default_saver().mode == "preload" and saver.default_saver().enabled
    torch.cuda.init()
    hooked, cudart = _cudart()
    ptr = ctypes.c_void_p()
    step("hooked cudaMalloc in a region")
    with saver.region("raw", cpu_backup=True):
        assert hooked.cudaMalloc(ctypes.byref(ptr), GiB + 6912) == 0
        t = torch.randn(256 * MiB // 4, device="cuda")
    assert cudart.cudaMemset(ptr, 7, GiB + 6912) == 0
    want = t.cpu()
    free0 = _free()
    saver.pause("raw")
    assert _free() - free0 >= 0.99 * (GiB + 256 * MiB)
    saver.resume("raw")
    host = (ctypes.c_uint8 * 4096)()
    tail = ctypes.c_void_p(ptr.value + GiB + 6912 - 4096)
    assert cudart.cudaMemcpy(ctypes.cast(host, ctypes.c_void_p), tail, 4096, 2) == 0  # device to host
    assert set(host) == {7} and torch.equal(t.cpu(), want)
    segments = saver.report()["tags"]["raw"]["segments"]
    assert hooked.cudaFree(ptr) == 0  # reaches the saver, not the runtime
    assert saver.report()["tags"]["raw"]["segments"] == segments - 1

    step("graph pool in a region")
    x = torch.randn(128 * MiB, device="cuda")
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with saver.region("graph"):
        with torch.cuda.graph(graph):
            y = (x * 2 + 1).sum()  # the 512 MiB intermediate lives in the graph's private pool
    graph_bytes = _held(saver.default_saver(), "graph")
    assert graph_bytes >= 512 * MiB, graph_bytes
    free0 = _free()
    saver.pause("graph")
    assert _free() - free0 >= 0.99 * graph_bytes
    saver.resume("graph")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, (x * 2 + 1).sum(), rtol=1e-4, atol=1.0)


def scenario_two_devices():
    import torch
    from trainer import saver
    tensors, want = [], []
    for dev in (0, 1):
        with torch.cuda.device(dev), saver.region("w", cpu_backup=True):
            tensors.append(torch.randn(256 * MiB, device=f"cuda:{dev}"))
        want.append(tensors[-1].cpu())
    free0 = [torch.cuda.mem_get_info(d)[0] for d in (0, 1)]
    saver.pause("w")
    freed = [torch.cuda.mem_get_info(d)[0] - f for d, f in zip((0, 1), free0)]
    assert all(f >= 0.99 * GiB for f in freed), freed
    saver.resume("w")
    assert all(torch.equal(t.cpu(), w) for t, w in zip(tensors, want))


def scenario_exit_with_paused_and_live_tags():
    import torch
    from trainer import saver
    with saver.region("paused", cpu_backup=True):
        a = torch.randn(64 * MiB, device="cuda")
    with saver.region("live"):
        b = torch.randn(64 * MiB, device="cuda")
    with saver.region("freed"):
        c = torch.randn(64 * MiB, device="cuda")
    del c
    step("pause")
    saver.pause("paused")
    print("exiting with", a.data_ptr(), b.data_ptr(), flush=True)


# ---------------------------------------------------------------------------------------------
# pytest entry points
# (cheap scenarios first, so a time-limited run still covers the most ground)


@pytest.mark.gpu
def test_exit_with_paused_and_live_tags(library):
    run_scenario("exit_with_paused_and_live_tags", library)


@pytest.mark.gpu
def test_freed_bytes_and_stable_addresses(library):
    run_scenario("freed_bytes_and_stable_addresses", library)


@pytest.mark.gpu
def test_cpu_backup_keeps_contents(library):
    run_scenario("cpu_backup_keeps_contents", library)


@pytest.mark.gpu
def test_tags_are_independent(library):
    run_scenario("tags_are_independent", library)


@pytest.mark.gpu
def test_alloc_and_free_while_another_tag_is_paused(library):
    run_scenario("alloc_and_free_while_another_tag_is_paused", library)


@pytest.mark.gpu
def test_cuda_graph_replays_after_resume(library):
    run_scenario("cuda_graph_replays_after_resume", library)


@pytest.mark.gpu
def test_preload_pauses_raw_cudamalloc_and_graph_pools(library):
    run_scenario("preload_pauses_raw_cudamalloc_and_graph_pools", library,
                 env={"LD_PRELOAD": str(library), "FP8MOE_SAVER_MODE": "preload"})


@pytest.mark.gpu
@pytest.mark.multigpu
def test_two_devices(library):
    run_scenario("two_devices", library)


@pytest.mark.gpu
def test_resume_out_of_memory_keeps_the_tag_paused(library):
    run_scenario("resume_out_of_memory_keeps_the_tag_paused", library)


@pytest.mark.gpu
def test_tensor_over_10_gib(library):
    run_scenario("tensor_over_10_gib", library)


@pytest.mark.gpu
def test_thousand_cycles_leak_nothing(library):
    run_scenario("thousand_cycles_leak_nothing", library)


if __name__ == "__main__":
    faulthandler.enable()
    step(f"scenario {sys.argv[1]}")
    globals()["scenario_" + sys.argv[1]]()
    step("scenario done; interpreter exit follows")
