"""Compile the memory saver's shared library (and, for the CPU tests, a fake CUDA driver).

The library needs only a C++17 compiler and the CUDA headers (cuda.h, cuda_runtime_api.h): it
links neither libcuda nor libcudart and reaches the driver at run time, so it builds on machines
without a GPU or a driver. setup.py calls `build_library` from its build_ext step; the GPU tests
and scripts/bench_saver.py call `ensure_built`, which rebuilds unless the library's digest stamp
(`<library>.digest`, written by every build) names the current sources. File times would not do:
a copied tree (the GPU machine gets one per command, next to the build outputs it kept) can make
an old library look newer than the sources. `BuildUnavailable` means "no compiler or no CUDA
headers here", which an install turns into a disabled saver rather than a failed install.

    python csrc/saver/build.py              # build trainer/libfp8moe_saver.so
    python csrc/saver/build.py --fake OUT   # build the fake driver the CPU tests load

Where the headers are looked for, first hit wins: $FP8MOE_SAVER_CUDA_HOME (if set, the only
place), $CUDA_HOME, $CUDA_PATH, the toolkit next to `nvcc` on PATH, /usr/local/cuda, and the copy
of the headers that Triton's NVIDIA backend ships (which is all the library needs).
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("csrc/saver/trace.cpp", "csrc/saver/driver.cpp", "csrc/saver/host.cpp", "csrc/saver/core.cpp",
           "csrc/saver/abi.cpp")
HEADERS = ("csrc/saver/trace.h", "csrc/saver/driver.h", "csrc/saver/host.h", "csrc/saver/core.h",
           "csrc/saver/exports.map")
# The library exports its C ABI and nothing else (see exports.map for why).
EXPORTS = "csrc/saver/exports.map"
FAKE_SOURCES = ("csrc/saver/fake_driver/fake_cuda.cpp",)
LIBRARY = ROOT / "trainer" / "libfp8moe_saver.so"
_NEEDED_HEADERS = ("cuda.h", "cuda_runtime_api.h")


class BuildUnavailable(RuntimeError):
    """No C++ compiler or no CUDA headers on this machine."""


def _has_headers(include: Path) -> bool:
    return all((include / h).is_file() for h in _NEEDED_HEADERS)


def _toolkit_includes(env) -> list[Path]:
    roots = [env.get("CUDA_HOME"), env.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        roots.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    roots += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return [Path(r) / "include" for r in roots if r]


def _triton_include() -> list[Path]:
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) / "backends" / "nvidia" / "include" for p in spec.submodule_search_locations]


def find_cuda_include(env=None) -> Path:
    """The first directory holding cuda.h and cuda_runtime_api.h; BuildUnavailable if none."""
    env = os.environ if env is None else env
    pinned = env.get("FP8MOE_SAVER_CUDA_HOME")
    candidates = [Path(pinned) / "include"] if pinned else _toolkit_includes(env) + _triton_include()
    for include in candidates:
        if _has_headers(include):
            return include
    raise BuildUnavailable(
        "CUDA headers (cuda.h, cuda_runtime_api.h) not found in "
        + ", ".join(str(c) for c in candidates)
        + "; install the CUDA toolkit or set CUDA_HOME (FP8MOE_SAVER_CUDA_HOME pins one location)")


def find_compiler(env=None) -> str:
    env = os.environ if env is None else env
    for name in (env.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name, path=env.get("PATH")):
            return name
    raise BuildUnavailable("no C++ compiler found (set CXX)")


def _compile(out: Path, sources, include: Path, env=None, flags=()) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [find_compiler(env), "-std=c++17", "-O2", "-g", "-fPIC", "-shared", "-Wall",
           "-Wl,-z,defs", f"-I{include}", *flags, *sources, "-o", str(tmp), "-ldl", "-lpthread"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {out.name} failed:\n{' '.join(cmd)}\n{result.stderr}")
    os.replace(tmp, out)  # atomic: a process loading the old library never sees a partial file
    return out


def build_library(out: Path = LIBRARY, env=None, static_cxx_runtime: bool = False) -> Path:
    """Compile the saver library to `out`; BuildUnavailable without compiler or headers.

    The C++ runtime is linked the toolchain's way (shared libstdc++ where the toolchain has it;
    the H100 image's links it statically). static_cxx_runtime=True forces the static case, which
    the CPU tests use to check that such a build stays self-contained."""
    flags = [f"-Wl,--version-script={ROOT / EXPORTS}"] + (["-static-libstdc++"] if static_cxx_runtime else [])
    digest = source_digest()
    out = _compile(out, SOURCES, find_cuda_include(env), env, flags)
    _stamp(out).write_text(digest + "\n")
    return out


def build_fake_driver(out: Path, env=None) -> Path:
    """Compile the fake libcuda the CPU tests point FP8MOE_SAVER_LIBCUDA at."""
    return _compile(out, FAKE_SOURCES, find_cuda_include(env), env)


def source_digest() -> str:
    """sha256 of the library's sources, headers and this script, with their names."""
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS + ("csrc/saver/build.py",):
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()


def _stamp(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".digest")


def is_stale(out: Path = LIBRARY) -> bool:
    """True unless `out` exists and its stamp names the current sources' digest."""
    stamp = _stamp(out)
    return not (Path(out).exists() and stamp.exists()
                and stamp.read_text().strip() == source_digest())


def ensure_built(out: Path = LIBRARY) -> Path:
    """Build the library unless one of the current sources is already there. A stale one is used
    as it is where nothing can build a new one (no compiler or headers), with a warning."""
    if not is_stale(out):
        return out
    try:
        return build_library(out)
    except BuildUnavailable as err:
        if not out.exists():
            raise
        print(f"saver build: using the existing {out} ({err})", file=sys.stderr)
        return out


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[1] == "--fake":
        print(build_fake_driver(Path(argv[2])))
    elif len(argv) == 1:
        print(build_library())
    else:
        raise SystemExit("usage: python csrc/saver/build.py [--fake OUT]")


if __name__ == "__main__":
    main(sys.argv)
