"""The GPU probes of csrc/probes compile (no GPU needed, only nvcc; skipped without it).

They are run by hand on a GPU, and they include the kernel sources they measure
(wgmma_fp32_contention.cu includes csrc/fp8_grouped/grouped.cu and calls its WGMMA wrappers), so a
change to those sources can break a probe without any other test noticing. Compiling it here
catches that; what it measures is the probe header's business.
"""
from __future__ import annotations

import subprocess

import pytest

from models.fp8 import cuda_lib

PROBES = ("wgmma_fp32_contention.cu",)


@pytest.mark.parametrize("probe", PROBES)
def test_probe_compiles(probe, tmp_path):
    build = cuda_lib.build_script("fp8_grouped").nvcc_build
    try:
        nvcc = build.find_nvcc()
    except build.BuildUnavailable as err:
        pytest.skip(str(err))
    source = build.ROOT / "csrc" / "probes" / probe
    out = tmp_path / "probe"
    result = subprocess.run(
        [nvcc, "-gencode", "arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-o", str(out),
         str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{probe} no longer compiles:\n{result.stderr[-4000:]}"
    assert out.exists()
