"""Compile csrc/fp8_grouped/grouped.cu (the Hopper grouped FP8 GEMMs) into a ctypes library.

Built with nvcc for sm_90a on first use by `models.fp8.grouped_cuda`; csrc/nvcc_build.py (shared
with csrc/fp8_norm) says how and why.

    python csrc/fp8_grouped/build.py    # models/fp8/libfp8moe_grouped.<digest>.so; ptxas -v
    python csrc/fp8_grouped/build.py -DFPROP_BN=192 --out /tmp/variant.so   # a variant

The kernel's compile-time switches (`#ifndef NAME` in grouped.cu) take -D definitions here;
scripts/sweep_grouped_cuda.py times such variants against each other on the GPU.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "nvcc_build", Path(__file__).resolve().parents[1] / "nvcc_build.py")
nvcc_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nvcc_build)

ROOT = nvcc_build.ROOT
SOURCE = ROOT / "csrc" / "fp8_grouped" / "grouped.cu"
LIBRARY_DIR = nvcc_build.LIBRARY_DIR
NVCC_FLAGS = nvcc_build.NVCC_FLAGS
BuildUnavailable = nvcc_build.BuildUnavailable
find_nvcc = nvcc_build.find_nvcc


def build_library(out: Path, env=None, defines: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Compile to `out` (atomically) with extra `defines` ("NAME=VALUE"); returns the path and
    ptxas' resource report."""
    return nvcc_build.compile_library(SOURCE, out, env, defines)


def default_library() -> Path:
    """Where the library of the current sources lives (named by their digest)."""
    return nvcc_build.digest_path(LIBRARY_DIR, "libfp8moe_grouped", SOURCE, Path(__file__),
                                  Path(nvcc_build.__file__))


def ensure_built() -> Path:
    """The library of the current sources, built now unless it is there."""
    return nvcc_build.ensure_built(default_library(), build_library)


def main(argv=None) -> None:
    nvcc_build.main(argv, __doc__.splitlines()[0], build_library, default_library)


if __name__ == "__main__":
    main()
