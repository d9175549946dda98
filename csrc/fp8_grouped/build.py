"""Compile csrc/fp8_grouped/grouped.cu (the Hopper grouped FP8 GEMMs) into a ctypes library.

The kernels use sm_90a-only instructions (WGMMA, TMA, setmaxnreg), so they are compiled for
exactly that target, on first use, by the CUDA toolkit's `nvcc`, like DeepGEMM's JIT builds:
an install needs no GPU and no compiler, and the GPU machine builds the library in a few
seconds the first time `models.fp8.grouped_cuda` is used. The library links only the static
CUDA runtime (it reaches the driver's cuTensorMapEncodeTiled through cudaGetDriverEntryPoint),
so it also compiles on machines with the toolkit but no driver: the CPU tests compile it and
check that ptxas spills nothing.

    python csrc/fp8_grouped/build.py    # models/fp8/libfp8moe_grouped.<digest>.so; ptxas -v
    python csrc/fp8_grouped/build.py -DFPROP_BN=192 --out /tmp/variant.so   # a variant

The kernel's compile-time switches (`#ifndef NAME` in grouped.cu) take -D definitions here;
scripts/sweep_grouped_cuda.py times such variants against each other on the GPU.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "csrc" / "fp8_grouped" / "grouped.cu"
LIBRARY_DIR = ROOT / "models" / "fp8"
NVCC_FLAGS = ("-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared",
              "-Xcompiler", "-fPIC", "-Xptxas", "-v", "--cudart", "static")


class BuildUnavailable(RuntimeError):
    """No nvcc on this machine."""


def find_nvcc(env=None) -> str:
    env = os.environ if env is None else env
    candidates = [shutil.which("nvcc", path=env.get("PATH"))]
    roots = (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda")
    candidates += [str(Path(r) / "bin" / "nvcc") for r in roots if r]
    for nvcc in candidates:
        if nvcc and os.access(nvcc, os.X_OK):
            return nvcc
    raise BuildUnavailable("nvcc not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin: the "
                           "CUDA grouped FP8 kernels are compiled on first use; install the CUDA "
                           "toolkit or set CUDA_HOME (the Triton kernels need none of this)")


def build_library(out: Path, env=None, defines: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Compile to `out` (atomically) with extra `defines` ("NAME=VALUE"); returns the path and
    ptxas' resource report."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [find_nvcc(env), *NVCC_FLAGS, *(f"-D{d}" for d in defines), str(SOURCE), "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{' '.join(cmd)}\n{result.stderr}")
    os.replace(tmp, out)
    return out, result.stderr


def default_library() -> Path:
    """Where the library of the current sources lives. It is named by a digest of grouped.cu and
    this script, not judged by timestamps: a library built from other sources (an earlier
    checkout, or a copy of the tree whose files got new modification times) is never loaded."""
    digest = hashlib.sha256(SOURCE.read_bytes() + Path(__file__).read_bytes()).hexdigest()[:16]
    return LIBRARY_DIR / f"libfp8moe_grouped.{digest}.so"


def ensure_built() -> Path:
    """The library of the current sources, built now unless it is there; libraries of other
    sources are removed (a process that has one loaded keeps its mapping)."""
    out = default_library()
    if out.exists():
        return out
    for old in LIBRARY_DIR.glob("libfp8moe_grouped.*.so"):
        old.unlink(missing_ok=True)
    return build_library(out)[0]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-D", dest="defines", action="append", default=[],
                        help="NAME=VALUE for one of grouped.cu's compile-time switches")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: models/fp8/libfp8moe_grouped.<source digest>.so")
    args = parser.parse_args(argv)
    path, report = build_library(args.out or default_library(), defines=tuple(args.defines))
    print(report, file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
