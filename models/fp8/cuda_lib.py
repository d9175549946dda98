"""Loading the nvcc-built kernel libraries of csrc/ (csrc/nvcc_build.py says how they are built)
and calling their C ABI through ctypes: every entry point returns 0, or nonzero with a message in
a caller-provided buffer, which `call` raises as a RuntimeError naming the function."""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]
_ERR_LEN = 512


@functools.lru_cache(maxsize=None)
def build_script(folder: str):
    """csrc/<folder>/build.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location(f"{folder}_build",
                                                  _ROOT / "csrc" / folder / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable_reason(index: int, folder: str, library, smem_bytes=None) -> str | None:
    """Why device `index` cannot run the kernels of csrc/`folder` (None when it can): not an sm90
    GPU, the library (`library()`, built on first use) failing to build, or a CTA needing more
    shared memory (`smem_bytes(lib)`) than the device grants one. Callers cache it per device
    and fall back to Triton, saying why where they are asked."""
    if torch.cuda.get_device_capability(index) != (9, 0):
        return f"the CUDA kernels of csrc/{folder} need an sm90 (Hopper) GPU"
    try:
        lib = library()
    except Exception as err:  # no nvcc, or the build failed: say why, use Triton
        return f"building csrc/{folder} failed: {err}"
    limit = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    if smem_bytes is not None and smem_bytes(lib) > limit:
        return f"csrc/{folder} needs {smem_bytes(lib)} bytes of shared memory, device has {limit}"
    return None


def call(fn, *args) -> None:
    """fn(*args, err, err_len); raises RuntimeError with the library's message if it fails."""
    err = ctypes.create_string_buffer(_ERR_LEN)
    if fn(*args, err, _ERR_LEN) != 0:
        raise RuntimeError(f"{fn.__name__}: {err.value.decode()}")


def current_stream(device: torch.device) -> int:
    """The raw cudaStream_t of `device`'s current stream, for a launch. torch's private getter
    (the one Triton's launcher calls) skips building a torch.cuda.Stream object on every launch;
    the public API where a build lacks it."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        return torch.cuda.current_stream(device).cuda_stream
    return raw(device.index if device.index is not None else torch.cuda.current_device())


def aligned16(t) -> bool:
    """Whether tensor t's first element is 16-byte aligned (what TMA and vector loads need)."""
    return t.data_ptr() % 16 == 0
