"""Pause and resume tagged GPU memory at fixed virtual addresses: the Python face of csrc/saver.

In colocated RL one GPU alternates between rollout and training. Between the phases the memory of
the idle side (optimizer state while rolling out, the KV cache while training) goes back to the
driver, and comes back later at the *same* virtual addresses, so tensors, views and captured CUDA
graphs that point into it stay valid and nothing is rebuilt:

    from trainer import saver

    with saver.region("kv_cache"):                  # allocations inside are pausable under the tag
        kv = torch.empty(n, device="cuda")
    with saver.region("optim", cpu_backup=True):    # contents survive a pause (pinned host copy)
        state = torch.zeros(m, device="cuda")

    saver.pause("kv_cache")       # physical memory released; kv.data_ptr() unchanged
    saver.swap(pause="optim", resume="kv_cache")    # backup and restore copies overlap
    saver.resume()                # None: every paused tag
    saver.report()                # bytes held / paused / backed up, per tag

How allocations reach the saver (`mode`, set by FP8MOE_SAVER_MODE or `configure(mode=...)`):
  * "torch" (default): `region()` routes PyTorch's allocations to a `torch.cuda.MemPool` per
    (tag, device) whose allocator is the saver library (`CUDAPluggableAllocator`). Tensors freed
    later return to the right pool wherever they are freed. Graph-private pools are not pausable.
  * "preload": the library, put in LD_PRELOAD, replaces cudaMalloc/cudaFree, so every runtime
    allocation made inside `region()` on this thread is pausable, including memory allocated
    outside PyTorch's allocator and CUDA-graph pools captured inside a region. `region()` still
    uses a plain MemPool per (tag, device) so cached blocks never mix between tags.

Where the time goes (csrc/saver/core.h has the details): many small tensors share a few large
VMM mappings, so pause/resume cost is per mapping, not per tensor; CPU backups go to pinned
shadows made once and reused across cycles, copied in chunks on dedicated streams.

The saver turns itself off, and says once why, when it cannot work: no built library (build it
with `pip install -e .` or `python csrc/saver/build.py` where nvcc/CUDA headers exist), no CUDA
driver or device, or FP8MOE_SAVER=off. Turned off, `region()` is a plain context, `pause()` and
`resume()` only run the tag state machine (so misuse still raises), and `report()` gives the
reason. FP8MOE_SAVER_LIB names another library file; FP8MOE_SAVER_LIBCUDA another driver library
(the CPU tests load a fake driver that way, and then CUDA availability is not asked of torch).
FP8MOE_SAVER_DEBUG=1 makes a crash (SIGSEGV ...) print the library's last driver calls and a
native backtrace before Python's faulthandler, if enabled, prints the Python stack
(csrc/saver/trace.h); the GPU tests and scripts/bench_saver.py run their children that way.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

LIBRARY = Path(__file__).with_name("libfp8moe_saver.so")
MODES = ("torch", "preload")


class SaverError(RuntimeError):
    """A saver operation failed; the message names the driver call, file:line and CUDA's error."""


class SaverOutOfMemoryError(SaverError):
    """The device had too little free memory; the tags involved are left as they were."""


class SaverDisabledWarning(UserWarning):
    """Emitted once when the saver turns itself off."""


class _Stats(ctypes.Structure):
    _fields_ = [("released_bytes", ctypes.c_uint64), ("restored_bytes", ctypes.c_uint64),
                ("to_host_bytes", ctypes.c_uint64), ("to_device_bytes", ctypes.c_uint64),
                ("pin_seconds", ctypes.c_double)]


_c_str, _c_int, _c_size = ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t
_STATS_P = ctypes.POINTER(_Stats)
# The whole C ABI: name -> (return type, argument types).
_SIGNATURES = {
    "saver_version": (_c_str, []),
    "saver_last_error": (_c_str, []),
    "saver_init": (_c_int, []),
    "saver_open_tag": (_c_int, [_c_str, _c_int]),
    "saver_set_thread_tag": (_c_int, [_c_str]),
    "saver_set_chunk_bytes": (_c_int, [ctypes.c_uint64]),
    "saver_pause": (_c_int, [_c_str, _STATS_P]),
    "saver_resume": (_c_int, [_c_str, _STATS_P]),
    "saver_swap": (_c_int, [_c_str, _c_str, _STATS_P]),
    "saver_report": (_c_size, [ctypes.c_char_p, _c_size]),
    "saver_alloc": (_c_int, [ctypes.c_uint64, _c_int, ctypes.POINTER(ctypes.c_void_p)]),
    "saver_free": (_c_int, [ctypes.c_void_p]),
    "saver_preload_active": (_c_int, []),
}
_ERRORS = {1: SaverOutOfMemoryError, 2: SaverError, 3: SaverError, 4: SaverError}


def _encode(name: str | None) -> bytes | None:
    return None if name is None else name.encode()


class _Library:
    """The loaded shared library with its signatures declared; `call` raises on a failure code."""

    def __init__(self, path: Path):
        self.path = path
        self.dll = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.dll, name)
            fn.restype, fn.argtypes = restype, argtypes

    def call(self, name: str, *args) -> None:
        code = getattr(self.dll, name)(*args)
        if code != 0:
            message = self.dll.saver_last_error().decode(errors="replace")
            raise _ERRORS.get(code, SaverError)(f"{name}: {message}")

    def report(self) -> dict:
        size = self.dll.saver_report(None, 0)
        while True:
            buf = ctypes.create_string_buffer(size)
            needed = self.dll.saver_report(buf, size)
            if needed <= size:
                return json.loads(buf.value.decode())
            size = needed


@dataclass
class TransitionStats:
    """What one pause/resume/swap did. `enabled=False` (with `reason`) when the saver is off."""
    released_bytes: int = 0
    restored_bytes: int = 0
    to_host_bytes: int = 0
    to_device_bytes: int = 0
    pin_seconds: float = 0.0
    seconds: float = 0.0
    enabled: bool = True
    reason: str | None = None


@dataclass
class _TagState:
    cpu_backup: bool
    paused: bool = False
    open_regions: int = 0  # regions open on any thread


def _check_tag(tag, what: str) -> None:
    if not isinstance(tag, str) or not tag:
        raise TypeError(f"{what}: tag must be a non-empty str, got {tag!r}")


class Saver:
    """One process-wide saver (the C library holds one registry per process)."""

    def __init__(self, mode: str | None = None, chunk_bytes: int | None = None,
                 library: str | os.PathLike | None = None):
        mode = mode if mode is not None else os.environ.get("FP8MOE_SAVER_MODE", "torch")
        if mode not in MODES:
            raise ValueError(f"saver mode must be one of {MODES}, got {mode!r} (FP8MOE_SAVER_MODE)")
        if chunk_bytes is not None and (not isinstance(chunk_bytes, int) or chunk_bytes <= 0):
            raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
        self.mode = mode
        self.chunk_bytes = chunk_bytes
        self.library_path = Path(library or os.environ.get("FP8MOE_SAVER_LIB") or LIBRARY)
        self._lib: _Library | None = None
        self._reason: str | None = None
        self._initialized = False
        self._lock = threading.RLock()
        self._tags: dict[str, _TagState] = {}
        self._pools: dict[tuple[str, int], object] = {}
        self._allocator = None
        self._local = threading.local()

    # ---- lazy start ----

    def _disabled_reason(self) -> str | None:
        if os.environ.get("FP8MOE_SAVER", "").lower() in ("0", "off", "false"):
            return "turned off by FP8MOE_SAVER=off"
        if not os.environ.get("FP8MOE_SAVER_LIBCUDA") and not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        if not self.library_path.is_file():
            return (f"library {self.library_path} is not built: run `pip install -e .` or "
                    "`python csrc/saver/build.py` on a machine with a C++ compiler and the CUDA headers")
        return None

    def _open_library(self) -> _Library | None:
        try:
            lib = _Library(self.library_path)
        except (OSError, AttributeError) as err:
            self._reason = f"cannot load {self.library_path}: {err}"
            return None
        try:
            lib.call("saver_init")
        except SaverError as err:
            self._reason = str(err)
            return None
        return lib

    def _check_mode(self, lib: _Library) -> None:
        if self.mode != "preload":
            return
        if not lib.dll.saver_preload_active():
            raise RuntimeError(
                f"saver mode 'preload' needs the library in LD_PRELOAD: start the process with "
                f"LD_PRELOAD={lib.path} (or use mode 'torch')")
        if "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
            raise RuntimeError("saver mode 'preload' cannot see memory PyTorch maps itself: remove "
                               "expandable_segments:True from PYTORCH_CUDA_ALLOC_CONF")

    def _backend(self) -> _Library | None:
        """The library, loading it on first use; None (and one warning) when the saver is off."""
        with self._lock:
            if not self._initialized:
                self._reason = self._disabled_reason()
                lib = None if self._reason else self._open_library()
                if lib is not None:
                    self._check_mode(lib)
                    if self.chunk_bytes is not None:
                        lib.call("saver_set_chunk_bytes", self.chunk_bytes)
                self._lib, self._initialized = lib, True
                if lib is None:
                    warnings.warn(f"fp8-moe memory saver disabled: {self._reason}",
                                  SaverDisabledWarning, stacklevel=4)
            return self._lib

    @property
    def enabled(self) -> bool:
        return self._backend() is not None

    @property
    def disabled_reason(self) -> str | None:
        self._backend()
        return self._reason

    # ---- regions ----

    def _stack(self) -> list[str]:
        if not hasattr(self._local, "tags"):
            self._local.tags = []
        return self._local.tags

    def _enter_tag(self, tag: str, cpu_backup: bool) -> _TagState:
        with self._lock:
            state = self._tags.get(tag)
            if state is None:
                state = self._tags[tag] = _TagState(cpu_backup)
            elif state.cpu_backup != cpu_backup:
                raise ValueError(f"region({tag!r}, cpu_backup={cpu_backup}): the tag was opened with "
                                 f"cpu_backup={state.cpu_backup}; a tag keeps one setting, use another name")
            if state.paused:
                raise RuntimeError(f"region({tag!r}): the tag is paused; call resume({tag!r}) "
                                   "before allocating in it")
            state.open_regions += 1
            return state

    def _pool(self, lib: _Library, tag: str):
        """The MemPool of (tag, current device); None without a CUDA allocator (fake driver)."""
        if not torch.cuda.is_available():
            return None
        key = (tag, torch.cuda.current_device())
        if key not in self._pools:
            if self.mode == "torch":
                if self._allocator is None:
                    self._allocator = torch.cuda.memory.CUDAPluggableAllocator(
                        str(lib.path), "saver_torch_malloc", "saver_torch_free")
                    # Never freed: a MemPool keeps only a raw pointer to its allocator and frees
                    # its blocks through it, possibly during interpreter teardown.
                    ctypes.pythonapi.Py_IncRef(ctypes.py_object(self._allocator.allocator()))
                self._pools[key] = torch.cuda.MemPool(allocator=self._allocator.allocator())
            else:
                self._pools[key] = torch.cuda.MemPool()
        return self._pools[key]

    @contextlib.contextmanager
    def _tagged(self, lib: _Library, tag: str, cpu_backup: bool):
        lib.call("saver_open_tag", tag.encode(), int(cpu_backup))
        stack = self._stack()
        lib.call("saver_set_thread_tag", tag.encode())
        stack.append(tag)
        try:
            pool = self._pool(lib, tag)
            with torch.cuda.use_mem_pool(pool) if pool is not None else contextlib.nullcontext():
                yield
        except RuntimeError as err:  # PyTorch's out-of-memory error does not say what the saver saw
            note = lib.dll.saver_last_error().decode(errors="replace")
            if note:
                err.add_note(f"fp8-moe memory saver, region {tag!r}: {note}")
            raise
        finally:
            stack.pop()
            lib.call("saver_set_thread_tag", _encode(stack[-1] if stack else None))

    @contextlib.contextmanager
    def region(self, tag: str, cpu_backup: bool = False):
        """Make every CUDA allocation of this thread inside the block pausable under `tag`.

        cpu_backup=True keeps the contents across pause/resume (pinned host copy); a tag keeps
        the setting it was first opened with. Regions nest; the innermost tag wins.
        """
        _check_tag(tag, "region")
        if not isinstance(cpu_backup, bool):
            raise TypeError(f"region({tag!r}): cpu_backup must be a bool, got {cpu_backup!r}")
        lib = self._backend()
        state = self._enter_tag(tag, cpu_backup)
        try:
            with self._tagged(lib, tag, cpu_backup) if lib else contextlib.nullcontext():
                yield
        finally:
            with self._lock:
                state.open_regions -= 1

    # ---- raw memory (outside PyTorch's allocator) ----

    def raw_alloc(self, nbytes: int, device: int | None = None) -> int:
        """Allocate `nbytes` in the current region's tag; returns the device address."""
        if not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"raw_alloc: nbytes must be a positive int, got {nbytes!r}")
        lib = self._require("raw_alloc")
        if not self._stack():
            raise RuntimeError("raw_alloc outside `with saver.region(tag)`: open a region first")
        if device is None:
            device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        ptr = ctypes.c_void_p()
        lib.call("saver_alloc", nbytes, device, ctypes.byref(ptr))
        return int(ptr.value)

    def raw_free(self, ptr: int) -> None:
        """Free an address from raw_alloc (waits for the device, as cudaFree does)."""
        self._require("raw_free").call("saver_free", ctypes.c_void_p(ptr))

    def _require(self, what: str) -> _Library:
        lib = self._backend()
        if lib is None:
            raise RuntimeError(f"{what} needs the memory saver, which is disabled: {self._reason}")
        return lib

    # ---- pause / resume ----

    def _known(self, tag: str, what: str) -> _TagState:
        _check_tag(tag, what)
        state = self._tags.get(tag)
        if state is None:
            known = ", ".join(repr(t) for t in sorted(self._tags)) or "none"
            raise ValueError(f"{what}: unknown tag {tag!r} (known: {known}); a tag is created by "
                             f"`with saver.region({tag!r})`")
        return state

    def _check_pausable(self, tag: str) -> None:
        state = self._known(tag, f"pause({tag!r})")
        if state.paused:
            raise RuntimeError(f"pause({tag!r}): the tag is already paused; call resume({tag!r}) first")
        if state.open_regions:
            raise RuntimeError(f"pause({tag!r}) inside `with region({tag!r})`: leave the region "
                               "first (it may still be allocating)")

    def _check_resumable(self, tag: str) -> None:
        state = self._known(tag, f"resume({tag!r})")
        if not state.paused:
            raise RuntimeError(f"resume({tag!r}): the tag is not paused; call pause({tag!r}) first")

    def _transition(self, fn: str, args: tuple, pause: list[str], resume: list[str]) -> TransitionStats:
        lib = self._backend()
        start = time.perf_counter()
        if lib is None:
            for tag in pause:
                self._tags[tag].paused = True
            for tag in resume:
                self._tags[tag].paused = False
            return TransitionStats(enabled=False, reason=self._reason)
        stats = _Stats()
        try:
            lib.call(fn, *args, ctypes.byref(stats))
        finally:
            self._sync_states(lib)
        return TransitionStats(stats.released_bytes, stats.restored_bytes, stats.to_host_bytes,
                               stats.to_device_bytes, stats.pin_seconds,
                               time.perf_counter() - start)

    def _sync_states(self, lib: _Library) -> None:
        for row in lib.report()["tags"]:
            if row["name"] in self._tags:
                self._tags[row["name"]].paused = row["paused"]

    def pause(self, tag: str | None = None) -> TransitionStats:
        """Return the physical memory of `tag` (None: every active tag) to the driver."""
        with self._lock:
            names = [tag] if tag is not None else [t for t, s in self._tags.items() if not s.paused]
            for name in names:
                self._check_pausable(name)
            return self._transition("saver_pause", (_encode(tag),), names, [])

    def resume(self, tag: str | None = None) -> TransitionStats:
        """Map fresh memory for `tag` (None: every paused tag) at its old addresses."""
        with self._lock:
            names = [tag] if tag is not None else [t for t, s in self._tags.items() if s.paused]
            for name in names:
                self._check_resumable(name)
            return self._transition("saver_resume", (_encode(tag),), [], names)

    def swap(self, pause: str, resume: str) -> TransitionStats:
        """Pause one tag and resume another in one pass, overlapping their backup copies."""
        with self._lock:
            if pause == resume:
                raise ValueError(f"swap: cannot pause and resume the same tag {pause!r}")
            self._check_pausable(pause)
            self._check_resumable(resume)
            return self._transition("saver_swap", (pause.encode(), resume.encode()), [pause], [resume])

    def report(self) -> dict:
        """{"enabled", "reason", "mode", "tags": {tag: {...}}}; byte counts when enabled:
        held_bytes (mapped now), paused_bytes (released), live_bytes (handed to PyTorch),
        backed_up_bytes (held in host backups), host_bytes (pinned), chunks, segments, devices."""
        lib = self._backend()
        with self._lock:
            out = {"enabled": lib is not None, "reason": self._reason, "mode": self.mode}
            if lib is None:
                out["tags"] = {t: {"cpu_backup": s.cpu_backup, "paused": s.paused}
                               for t, s in self._tags.items()}
                return out
            raw = lib.report()
            out["chunk_bytes"] = raw["chunk_bytes"]
            out["tags"] = {row.pop("name"): row for row in raw["tags"]}
            return out


_default: Saver | None = None
_default_lock = threading.Lock()


def default_saver() -> Saver:
    """The process-wide saver used by the module-level functions."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Saver()
        return _default


def configure(mode: str | None = None, chunk_bytes: int | None = None) -> Saver:
    """Choose the mode / chunk size before the saver is first used."""
    global _default
    with _default_lock:
        if _default is not None and _default._initialized:
            raise RuntimeError("saver.configure() after the saver was first used: call it at start-up")
        _default = Saver(mode=mode, chunk_bytes=chunk_bytes)
        return _default


def region(tag: str, cpu_backup: bool = False):
    return default_saver().region(tag, cpu_backup=cpu_backup)


def pause(tag: str | None = None) -> TransitionStats:
    return default_saver().pause(tag)


def resume(tag: str | None = None) -> TransitionStats:
    return default_saver().resume(tag)


def swap(pause: str, resume: str) -> TransitionStats:
    return default_saver().swap(pause, resume)


def report() -> dict:
    return default_saver().report()
