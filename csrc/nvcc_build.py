"""What the nvcc-built kernel libraries share: find nvcc, compile one .cu for sm_90a, name the
library by a digest of its sources, and build it on first use.

The kernels under csrc/fp8_grouped, csrc/fp8_norm and csrc/fp8_swiglu use sm_90a-only
instructions (WGMMA, TMA, thread-block clusters, FP8 conversions), so each is compiled for
exactly that target, on first use, by the CUDA toolkit's `nvcc`, like DeepGEMM's JIT builds: an
install needs no GPU and no compiler, and the GPU machine builds a library in a few seconds the
first time it is used. The libraries link only the static CUDA runtime (they reach the driver's
cuTensorMapEncodeTiled through cudaGetDriverEntryPoint), so they also compile on machines with
the toolkit but no driver: the CPU tests compile them and check that ptxas spills nothing. Each
folder's build.py is the script for its library (`python csrc/<folder>/build.py` builds it and
prints ptxas' report).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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
                           "CUDA kernels under csrc/ are compiled on first use; install the CUDA "
                           "toolkit or set CUDA_HOME (the Triton kernels need none of this)")


def compile_library(source: Path, out: Path, env=None,
                    defines: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Compile `source` to `out` (atomically) with extra `defines` ("NAME=VALUE"); returns the
    path and ptxas' resource report."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [find_nvcc(env), *NVCC_FLAGS, *(f"-D{d}" for d in defines), str(source), "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {Path(source).name} failed:\n{' '.join(cmd)}\n"
                           f"{result.stderr}")
    os.replace(tmp, out)
    return out, result.stderr


COMMON = ROOT / "csrc" / "common"
"""Headers the libraries include (host_tma.cuh, device_ptx.cuh, fp8_cast.cuh): all of them in
every library's digest."""


def digest_path(library_dir: Path, stem: str, *sources: Path) -> Path:
    """`library_dir/<stem>.<digest>.so`, the digest taken over `sources` (the .cu and the scripts
    that build it) and csrc/common's headers, not judged by timestamps: a library built from other
    sources (an earlier checkout, or a copy of the tree whose files got new modification times) is
    never loaded."""
    files = [*sources, *sorted(COMMON.glob("*.cuh"))]
    digest = hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest()[:16]
    return Path(library_dir) / f"{stem}.{digest}.so"


def ensure_built(path: Path, build) -> Path:
    """`path` (a digest_path), built now with build(path) unless it is there; libraries of other
    sources with the same stem are removed (a process that has one loaded keeps its mapping)."""
    if path.exists():
        return path
    stem = path.name.split(".")[0]
    for old in path.parent.glob(f"{stem}.*.so"):
        old.unlink(missing_ok=True)
    return build(path)[0]


def main(argv, description: str, build_library, default_library) -> None:
    """The command line of a folder's build.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-D", dest="defines", action="append", default=[],
                        help="NAME=VALUE for one of the source's compile-time switches")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: {default_library().relative_to(ROOT)}")
    args = parser.parse_args(argv)
    path, report = build_library(args.out or default_library(), defines=tuple(args.defines))
    print(report, file=sys.stderr)
    print(path)
