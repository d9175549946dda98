"""Compile csrc/fp8_swiglu/swiglu_backward.cu (SwiGLU's backward -> FP8) into a ctypes library.

Built with nvcc for sm_90a on first use by `models.fp8.swiglu_cuda`; csrc/nvcc_build.py (shared
with csrc/fp8_grouped and csrc/fp8_norm) says how and why.

    python csrc/fp8_swiglu/build.py    # models/fp8/libfp8moe_swiglu.<digest>.so; ptxas -v
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "nvcc_build", Path(__file__).resolve().parents[1] / "nvcc_build.py")
nvcc_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nvcc_build)

SOURCE = nvcc_build.ROOT / "csrc" / "fp8_swiglu" / "swiglu_backward.cu"
BuildUnavailable = nvcc_build.BuildUnavailable
find_nvcc = nvcc_build.find_nvcc


def build_library(out: Path, env=None, defines: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Compile to `out`; returns the path and ptxas' resource report."""
    return nvcc_build.compile_library(SOURCE, out, env, defines)


def default_library() -> Path:
    return nvcc_build.digest_path(nvcc_build.LIBRARY_DIR, "libfp8moe_swiglu", SOURCE,
                                  Path(__file__), Path(nvcc_build.__file__))


def ensure_built() -> Path:
    return nvcc_build.ensure_built(default_library(), build_library)


if __name__ == "__main__":
    nvcc_build.main(None, __doc__.splitlines()[0], build_library, default_library)
