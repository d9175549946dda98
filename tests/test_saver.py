"""CPU tests of the memory saver: the build, the Python state machine and argument errors, the
disabled mode, and the C++ library itself running on a fake CUDA driver.

The fake driver (csrc/saver/fake_driver/fake_cuda.cpp) backs "device" memory with memfd mappings
and enforces the virtual-memory rules (a reservation is inaccessible until mapped and granted;
fresh physical memory is zero; capacity is finite), so these tests see the saver's real effects:
addresses that stay valid, contents that survive only through the backup, bytes returned to the
"device", one unmap per chunk rather than per tensor, and a resume that rolls back cleanly. Each
test loads private copies of both libraries, so every test starts with an empty registry.
What needs a real GPU (PyTorch's allocator, CUDA graphs, copy speed) is in test_saver_gpu.py.
"""
import ctypes
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from trainer.saver import (_SIGNATURES, Saver, SaverDisabledWarning, SaverError,
                           SaverOutOfMemoryError)

ROOT = Path(__file__).resolve().parents[1]
GRAN = 1 << 16  # the fake driver's allocation granularity


@pytest.fixture(scope="session")
def built(tmp_path_factory, saver_builder):
    out = tmp_path_factory.mktemp("saver_build")
    return (saver_builder.build_library(out / "libsaver.so"),
            saver_builder.build_fake_driver(out / "libfakecuda.so"))


class Fake:
    """A saver on a private copy of the library and of the fake driver."""

    def __init__(self, built, tmp_path, monkeypatch):
        self.lib = tmp_path / "libsaver.so"
        self.driver = tmp_path / "libfakecuda.so"
        shutil.copy(built[0], self.lib)
        shutil.copy(built[1], self.driver)
        monkeypatch.setenv("FP8MOE_SAVER_LIBCUDA", str(self.driver))
        monkeypatch.delenv("FP8MOE_SAVER", raising=False)
        self.dll = ctypes.CDLL(str(self.driver))
        self.dll.fake_cuda_stat.restype = ctypes.c_longlong
        self.dll.fake_cuda_stat.argtypes = [ctypes.c_char_p]
        self.dll.fake_cuda_config.argtypes = [ctypes.c_char_p, ctypes.c_longlong]

    def saver(self, **kw) -> Saver:
        return Saver(library=self.lib, **kw)

    def stat(self, name: str) -> int:
        return self.dll.fake_cuda_stat(name.encode())

    def config(self, name: str, value: int) -> None:
        assert self.dll.fake_cuda_config(name.encode(), value) == 0, name


@pytest.fixture
def fake(built, tmp_path, monkeypatch):
    return Fake(built, tmp_path, monkeypatch)


def fill(ptrs_sizes, seed):
    """Writes fresh random bytes into each (ptr, size); returns what was written."""
    rng = random.Random(seed)
    data = []
    for ptr, size in ptrs_sizes:
        blob = rng.randbytes(size)
        ctypes.memmove(ptr, blob, size)
        data.append(blob)
    return data


def read(ptrs_sizes):
    return [ctypes.string_at(ptr, size) for ptr, size in ptrs_sizes]


def alloc_many(saver, tag, sizes, cpu_backup=True, device=None):
    with saver.region(tag, cpu_backup=cpu_backup):
        return [(saver.raw_alloc(n, device), n) for n in sizes]


# ---------------------------------------------------------------------------------------------
# build


ABI = set(_SIGNATURES) | {"saver_torch_malloc", "saver_torch_free", "cudaMalloc", "cudaFree"}


def _exported(library: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_library_exports_the_abi_only_and_links_no_cuda_library(built):
    dll = ctypes.CDLL(str(built[0]))
    for name in ABI:
        assert hasattr(dll, name), name
    if shutil.which("nm"):
        assert _exported(built[0]) == ABI
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", str(built[0])], capture_output=True, text=True).stdout
        assert "NEEDED" in needed and "libcuda" not in needed and "libcudart" not in needed


_STATIC_RUNTIME_CHILD = """
import json, sys
import torch  # the process's own libstdc++ comes first, as in a training job
from trainer.saver import Saver
saver = Saver(library=sys.argv[1])
sizes = [3 << 20, 5 << 20]
with saver.region("kv"):
    for n in sizes:
        saver.raw_alloc(n)
row = saver.report()["tags"]["kv"]
saver.pause("kv")
saver.resume("kv")
print(json.dumps(row))
"""


def test_a_static_cxx_runtime_stays_inside_the_library(tmp_path, built, saver_builder):
    """The H100 image's toolchain links libstdc++ statically. Exported, that copy mixed with the
    process's own and the report's number formatting crashed (or printed garbage); the version
    script keeps it private. Here the same build runs next to torch's libstdc++."""
    archive = subprocess.run([saver_builder.find_compiler(), "-print-file-name=libstdc++.a"],
                             capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive):
        pytest.skip("no static libstdc++ on this machine")
    library = saver_builder.build_library(tmp_path / "libstatic.so", static_cxx_runtime=True)
    readelf = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
    assert "libstdc++" not in readelf
    if shutil.which("nm"):
        assert _exported(library) == ABI
    env = dict(os.environ, FP8MOE_SAVER_LIBCUDA=str(built[1]), PYTHONPATH=str(ROOT))
    env.pop("FP8MOE_SAVER", None)
    child = subprocess.run([sys.executable, "-c", _STATIC_RUNTIME_CHILD, str(library)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-3000:]
    row = json.loads(child.stdout.splitlines()[-1])
    assert row["live_bytes"] == (3 << 20) + (5 << 20) and row["segments"] == 2
    assert row["held_bytes"] % GRAN == 0 and row["held_bytes"] >= row["live_bytes"]


def test_setup_py_builds_the_library_and_installs_without_cuda_headers(tmp_path):
    def build_ext(out, extra_env):
        env = dict(os.environ, **extra_env)
        return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out),
                               "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env,
                              capture_output=True, text=True)

    ok = build_ext(tmp_path / "with", {})
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "with/trainer/libfp8moe_saver.so").is_file()
    without = build_ext(tmp_path / "without", {"FP8MOE_SAVER_CUDA_HOME": str(tmp_path / "nowhere")})
    assert without.returncode == 0, without.stderr
    assert not (tmp_path / "without/trainer/libfp8moe_saver.so").exists()
    assert "trainer.saver will be disabled" in without.stdout + without.stderr


def test_library_is_rebuilt_by_source_digest_not_file_times(tmp_path, monkeypatch, saver_builder):
    """ensure_built keeps a library whose stamp names the current sources' digest whatever its
    file time, rebuilds when the digest moves on, and without a compiler keeps a stale library but
    refuses a missing one (the compiler is a stub that records its builds)."""
    b = saver_builder
    digest = ["v1"]
    built = []

    def fake_compile(out, sources, include, env=None, flags=()):
        Path(out).write_text(digest[0])
        built.append(digest[0])
        return Path(out)

    monkeypatch.setattr(b, "source_digest", lambda: digest[0])
    monkeypatch.setattr(b, "find_cuda_include", lambda env=None: tmp_path)
    monkeypatch.setattr(b, "_compile", fake_compile)
    lib = tmp_path / "libsaver.so"
    assert b.ensure_built(lib) == lib and built == ["v1"]
    os.utime(lib, (1, 1))  # older than every source: must not matter
    assert b.ensure_built(lib) == lib and built == ["v1"]
    digest[0] = "v2"
    assert b.is_stale(lib)
    b.ensure_built(lib)
    assert built == ["v1", "v2"] and lib.read_text() == "v2" and not b.is_stale(lib)

    def unavailable(*args, **kwargs):
        raise b.BuildUnavailable("no compiler here")

    monkeypatch.setattr(b, "_compile", unavailable)
    digest[0] = "v3"
    assert b.ensure_built(lib) == lib and lib.read_text() == "v2"
    with pytest.raises(b.BuildUnavailable, match="no compiler"):
        b.ensure_built(tmp_path / "missing.so")


def test_source_digest_follows_every_source_and_header(tmp_path, monkeypatch, saver_builder):
    """An edit to any source, header, the export map or build.py changes the digest."""
    for name in saver_builder.SOURCES + saver_builder.HEADERS + ("csrc/saver/build.py",):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(saver_builder, "ROOT", tmp_path)
    seen = {saver_builder.source_digest()}
    for name in ("csrc/saver/core.cpp", "csrc/saver/core.h", "csrc/saver/exports.map",
                 "csrc/saver/build.py"):
        with open(tmp_path / name, "a") as f:
            f.write("\n")
        seen.add(saver_builder.source_digest())
    assert len(seen) == 5


def test_find_cuda_include_names_where_it_looked(tmp_path, saver_builder):
    with pytest.raises(saver_builder.BuildUnavailable, match="nowhere"):
        saver_builder.find_cuda_include({"FP8MOE_SAVER_CUDA_HOME": str(tmp_path / "nowhere")})


# ---------------------------------------------------------------------------------------------
# disabled mode and argument errors (no library involved)


def test_disabled_saver_says_why_once_and_keeps_the_state_machine(tmp_path, monkeypatch):
    monkeypatch.delenv("FP8MOE_SAVER_LIBCUDA", raising=False)
    monkeypatch.setenv("FP8MOE_SAVER", "off")
    saver = Saver(library=tmp_path / "missing.so")
    with pytest.warns(SaverDisabledWarning, match="FP8MOE_SAVER=off"):
        with saver.region("kv"):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = saver.pause("kv")
        assert not stats.enabled and "FP8MOE_SAVER=off" in stats.reason
        assert saver.report() == {"enabled": False, "reason": "turned off by FP8MOE_SAVER=off",
                                  "mode": "torch", "tags": {"kv": {"cpu_backup": False, "paused": True}}}
        with pytest.raises(RuntimeError, match=r"already paused; call resume\('kv'\)"):
            saver.pause("kv")
        saver.resume("kv")
        assert saver.report()["tags"]["kv"]["paused"] is False


def test_disabled_reasons_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("FP8MOE_SAVER", raising=False)
    monkeypatch.setenv("FP8MOE_SAVER_LIBCUDA", str(tmp_path / "driver.so"))
    with pytest.warns(SaverDisabledWarning):
        assert "pip install -e ." in Saver(library=tmp_path / "missing.so").disabled_reason
    monkeypatch.delenv("FP8MOE_SAVER_LIBCUDA")
    if not __import__("torch").cuda.is_available():
        with pytest.warns(SaverDisabledWarning):
            assert "no CUDA device" in Saver(library=tmp_path / "missing.so").disabled_reason


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="mode must be one of"):
        Saver(mode="hook")
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int"):
        Saver(chunk_bytes=0)


@pytest.fixture(params=["disabled", "fake"])
def any_saver(request, tmp_path, monkeypatch):
    if request.param == "fake":
        return Fake(request.getfixturevalue("built"), tmp_path, monkeypatch).saver()
    monkeypatch.setenv("FP8MOE_SAVER", "off")
    with pytest.warns(SaverDisabledWarning):
        saver = Saver(library=tmp_path / "missing.so")
        saver.enabled
    return saver


def test_misuse_raises_with_the_fix(any_saver):
    saver = any_saver
    with pytest.raises(TypeError, match="non-empty str"):
        saver.region("").__enter__()
    with pytest.raises(TypeError, match="cpu_backup must be a bool"):
        saver.region("kv", cpu_backup=1).__enter__()
    with saver.region("kv"):
        with pytest.raises(RuntimeError, match=r"inside `with region\('kv'\)`: leave the region"):
            saver.pause("kv")
    with pytest.raises(ValueError, match=r"unknown tag 'nope' \(known: 'kv'\)"):
        saver.pause("nope")
    with pytest.raises(RuntimeError, match=r"not paused; call pause\('kv'\) first"):
        saver.resume("kv")
    with pytest.raises(ValueError, match="opened with cpu_backup=False"):
        saver.region("kv", cpu_backup=True).__enter__()
    saver.pause("kv")
    with pytest.raises(RuntimeError, match=r"the tag is paused; call resume\('kv'\)"):
        saver.region("kv").__enter__()
    with pytest.raises(ValueError, match="same tag"):
        saver.swap("kv", "kv")
    with saver.region("other"):
        pass
    with pytest.raises(RuntimeError, match=r"pause\('kv'\): the tag is already paused"):
        saver.swap(pause="kv", resume="other")
    saver.swap(pause="other", resume="kv")
    saver.resume()
    assert not any(row["paused"] for row in saver.report()["tags"].values())


# ---------------------------------------------------------------------------------------------
# the library on the fake driver


def test_pause_returns_memory_keeps_addresses_and_backup_restores_contents(fake):
    saver = fake.saver(chunk_bytes=8 * GRAN)
    sizes = [random.Random(0).randrange(1, 3 * GRAN) for _ in range(200)] + [6912, 128]
    backed = alloc_many(saver, "weights", sizes, cpu_backup=True)
    plain = alloc_many(saver, "kv", [GRAN] * 4, cpu_backup=False)
    want = fill(backed, seed=1)
    fill(plain, seed=2)
    held = saver.report()["tags"]["weights"]["held_bytes"]
    chunks = saver.report()["tags"]["weights"]["chunks"]
    before, unmaps = fake.stat("physical_bytes"), fake.stat("unmap_calls")

    stats = saver.pause("weights")
    row = saver.report()["tags"]["weights"]
    assert stats.released_bytes == held == row["paused_bytes"] and row["held_bytes"] == 0
    assert fake.stat("physical_bytes") == before - held
    assert fake.stat("unmap_calls") - unmaps == chunks < len(sizes) // 4
    assert row["backed_up_bytes"] == row["live_bytes"] >= sum(sizes)

    saver.resume("weights")
    saver.pause("kv")
    saver.resume("kv")
    assert read(backed) == want
    assert read(plain) == [bytes(GRAN)] * 4  # no backup: fresh (zeroed) memory at the same place
    assert fake.stat("physical_bytes") == before


def test_other_tags_stay_usable_while_one_is_paused(fake):
    saver = fake.saver()
    a = alloc_many(saver, "a", [3 * GRAN, 100])
    b = alloc_many(saver, "b", [5000] * 10)
    want_a = fill(a, seed=3)
    saver.pause("a")
    want_b = fill(b, seed=4)
    c = alloc_many(saver, "b", [7 * GRAN])
    fill(c, seed=5)
    saver.raw_free(c[0][0])
    assert read(b) == want_b
    saver.resume("a")
    assert read(a) == want_a and read(b) == want_b


def reference_chunk_sizes(requests, cap):
    """The growth rule of csrc/saver/core.h: a new chunk is as large as the tag so far (at least
    one granule, at most `cap`), or exactly the request rounded to granules when that is larger."""
    chunks = []  # [size, used]
    for r in requests:
        r = -(-r // 512) * 512
        fit = next((c for c in chunks if c[0] - c[1] >= r), None)
        if fit is None:
            grow = min(cap, max(sum(c[0] for c in chunks), GRAN))
            fit = [max(-(-r // GRAN) * GRAN, grow), 0]
            chunks.append(fit)
        fit[1] += r
    return [c[0] for c in chunks]


def test_chunks_grow_geometrically_and_respect_granularity(fake):
    requests = [GRAN] * 64 + [40 * GRAN] + [1]
    saver = fake.saver(chunk_bytes=16 * GRAN)
    ptrs = alloc_many(saver, "t", requests)
    row = saver.report()["tags"]["t"]
    want = reference_chunk_sizes(requests, 16 * GRAN)
    assert (row["chunks"], row["held_bytes"]) == (len(want), sum(want)) == (10, 120 * GRAN)
    assert all(p % 512 == 0 for p, _ in ptrs)
    for p, _ in ptrs:
        saver.raw_free(p)
    assert saver.report()["tags"]["t"]["chunks"] == 0 and fake.stat("physical_bytes") == 0


def test_resume_out_of_memory_keeps_the_tag_paused_and_says_what_is_missing(fake):
    fake.config("capacity", 64 * GRAN)
    saver = fake.saver(chunk_bytes=8 * GRAN)
    a = alloc_many(saver, "a", [GRAN] * 24)
    want = fill(a, seed=6)
    need = saver.report()["tags"]["a"]["held_bytes"]
    saver.pause("a")
    squatter = alloc_many(saver, "b", [50 * GRAN], cpu_backup=False)
    free = 64 * GRAN - saver.report()["tags"]["b"]["held_bytes"]
    mapped = fake.stat("mapped_bytes")

    with pytest.raises(SaverOutOfMemoryError, match=f"{need - free} bytes\\); the tag stays paused"):
        saver.resume("a")
    assert fake.stat("mapped_bytes") == mapped  # nothing half-mapped left behind
    row = saver.report()["tags"]["a"]
    assert row["paused"] and row["held_bytes"] == 0 and row["backed_up_bytes"] >= 24 * GRAN

    saver.raw_free(squatter[0][0])
    saver.resume("a")
    assert read(a) == want


@pytest.mark.parametrize("knob", ["fail_map_in", "fail_access_in"])
def test_failed_map_rolls_back_every_chunk(fake, knob):
    saver = fake.saver(chunk_bytes=2 * GRAN)
    a = alloc_many(saver, "a", [2 * GRAN] * 5)
    want = fill(a, seed=7)
    saver.pause("a")
    physical = fake.stat("physical_bytes")
    fake.config(knob, 2)
    call = "cuMemMap" if knob == "fail_map_in" else "cuMemSetAccess"
    with pytest.raises(SaverError, match=call + r" failed at csrc/saver/core\.cpp:\d+: CUDA_ERROR_INVALID_VALUE"):
        saver.resume("a")
    assert fake.stat("mapped_bytes") == 0 and fake.stat("physical_bytes") == physical
    assert saver.report()["tags"]["a"]["paused"]
    saver.resume("a")
    assert read(a) == want


def test_free_while_paused_releases_only_what_is_left(fake):
    saver = fake.saver(chunk_bytes=4 * GRAN)
    a = alloc_many(saver, "a", [GRAN] * 12)
    want = fill(a, seed=8)
    saver.pause("a")
    for ptr, _ in a[:8]:
        saver.raw_free(ptr)
    row = saver.report()["tags"]["a"]
    assert row["segments"] == 4 and fake.stat("physical_bytes") == 0
    assert fake.stat("registered_bytes") == row["host_bytes"]
    saver.resume("a")
    assert read(a[8:]) == want[8:]
    for ptr, _ in a[8:]:
        saver.raw_free(ptr)
    assert fake.stat("physical_bytes") == fake.stat("registered_bytes") == 0


def test_host_backups_are_pinned_once_and_reused(fake):
    saver = fake.saver(chunk_bytes=4 * GRAN)
    a = alloc_many(saver, "a", [GRAN] * 10)
    chunks = saver.report()["tags"]["a"]["chunks"]
    for cycle in range(5):
        want = fill(a, seed=10 + cycle)
        stats = saver.pause("a")
        assert stats.to_host_bytes == 10 * GRAN
        saver.resume("a")
        assert read(a) == want
    assert fake.stat("register_calls") == chunks


def test_swap_overlaps_and_makes_room_when_the_device_is_full(fake):
    fake.config("capacity", 40 * GRAN)
    saver = fake.saver(chunk_bytes=8 * GRAN)
    b = alloc_many(saver, "b", [GRAN] * 24)
    want_b = fill(b, seed=20)
    saver.pause("b")
    a = alloc_many(saver, "a", [GRAN] * 24)
    want_a = fill(a, seed=21)
    stats = saver.swap(pause="a", resume="b")  # b fits only once a's chunks are unmapped
    assert stats.to_host_bytes == stats.to_device_bytes == 24 * GRAN
    assert read(b) == want_b
    saver.swap(pause="b", resume="a")
    assert read(a) == want_a


def test_pause_all_and_resume_all(fake):
    saver = fake.saver()
    tags = {t: alloc_many(saver, t, [GRAN, 300]) for t in ("x", "y", "z")}
    want = {t: fill(p, seed=i) for i, (t, p) in enumerate(tags.items())}
    saver.pause()
    assert all(r["paused"] for r in saver.report()["tags"].values())
    assert fake.stat("physical_bytes") == 0
    saver.resume()
    assert {t: read(p) for t, p in tags.items()} == want


def test_devices_are_kept_apart(fake):
    fake.config("capacity", 8 * GRAN)
    saver = fake.saver()
    zero = alloc_many(saver, "t", [6 * GRAN], device=0)
    one = alloc_many(saver, "t", [6 * GRAN], device=1)  # would not fit on device 0
    want = fill(zero + one, seed=30)
    assert saver.report()["tags"]["t"]["devices"] == [0, 1]
    saver.pause("t")
    saver.resume("t")
    assert read(zero + one) == want


def test_library_refuses_allocating_in_a_paused_tag(fake):
    saver = fake.saver()
    alloc_many(saver, "a", [GRAN])
    saver.pause("a")
    lib = saver._backend()
    lib.call("saver_set_thread_tag", b"a")
    try:
        with pytest.raises(SaverError, match="'a' is paused: resume it"):
            lib.call("saver_alloc", GRAN, 0, ctypes.byref(ctypes.c_void_p()))
    finally:
        lib.call("saver_set_thread_tag", None)


def test_concurrent_allocation_and_free_from_threads(fake):
    saver = fake.saver(chunk_bytes=8 * GRAN)
    errors = []

    def work(i):
        try:
            rng = random.Random(i)
            for _ in range(30):
                got = alloc_many(saver, f"t{i % 2}", [rng.randrange(1, 2 * GRAN) for _ in range(5)])
                want = fill(got, seed=rng.random())
                assert read(got) == want
                for ptr, _ in got:
                    saver.raw_free(ptr)
        except Exception as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(r["segments"] == 0 for r in saver.report()["tags"].values())
    assert fake.stat("physical_bytes") == 0


def test_preload_mode_is_detected_and_required(fake, built):
    probe = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).saver_preload_active())"
    plain = subprocess.run([sys.executable, "-c", probe, str(fake.lib)], capture_output=True, text=True)
    preloaded = subprocess.run([sys.executable, "-c", probe, str(fake.lib)], capture_output=True, text=True,
                               env=dict(os.environ, LD_PRELOAD=str(fake.lib)))
    assert (plain.stdout.strip(), preloaded.stdout.strip()) == ("0", "1"), plain.stderr + preloaded.stderr
    with pytest.raises(RuntimeError, match=f"LD_PRELOAD={fake.lib}"):
        fake.saver(mode="preload").enabled


def test_regions_nest_and_restore_the_outer_tag(fake):
    saver = fake.saver()
    with saver.region("outer"):
        saver.raw_alloc(100)
        with saver.region("inner", cpu_backup=True):
            saver.raw_alloc(200)
            saver.raw_alloc(300)
        saver.raw_alloc(400)
    tags = saver.report()["tags"]
    assert (tags["outer"]["segments"], tags["inner"]["segments"]) == (2, 2)
    with pytest.raises(RuntimeError, match="outside `with saver.region"):
        saver.raw_alloc(100)


def test_configure_only_before_first_use(monkeypatch, tmp_path):
    from trainer import saver as module
    monkeypatch.setattr(module, "_default", None)
    monkeypatch.setenv("FP8MOE_SAVER", "off")
    configured = module.configure(mode="preload", chunk_bytes=1 << 20)
    assert module.default_saver() is configured and configured.mode == "preload"
    with pytest.warns(SaverDisabledWarning):
        with module.region("kv"):
            pass
    module.pause("kv")
    assert module.report()["tags"] == {"kv": {"cpu_backup": False, "paused": True}}
    with pytest.raises(RuntimeError, match=r"configure\(\) after the saver was first used"):
        module.configure(mode="torch")


def test_growth_falls_back_to_the_exact_size_when_the_device_is_nearly_full(fake):
    fake.config("capacity", 12 * GRAN)
    saver = fake.saver()
    with saver.region("t"):
        ptrs = [saver.raw_alloc(GRAN) for _ in range(12)]  # the last chunks cannot grow, only fit
        with pytest.raises(SaverOutOfMemoryError, match=r"cuMemCreate failed at csrc/saver/core\.cpp:\d+"):
            saver.raw_alloc(GRAN)
    assert len(set(ptrs)) == 12 and fake.stat("physical_bytes") == 12 * GRAN


def test_backup_copies_only_live_bytes_in_pieces(fake):
    saver = fake.saver(chunk_bytes=256 << 20)
    a, hole, c = alloc_many(saver, "t", [100 << 20, 5 << 20, 30 << 20])  # a spans two 64 MiB pieces
    want = fill([a, c], seed=40)
    saver.raw_free(hole[0])
    stats = saver.pause("t")
    assert stats.to_host_bytes == (100 << 20) + (30 << 20)
    saver.resume("t")
    assert read([a, c]) == want
