"""Shared test set-up: GPU-marked tests skip themselves on machines without CUDA, the
`compiled_sm90` fixture runs a kernel-compiling script outside the Triton interpreter,
`built_csrc` builds one of the nvcc libraries of csrc/ into the test's folder, and
`saver_builder` is csrc/saver/build.py loaded as a module (it is a build script, not a package)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def saver_builder():
    spec = importlib.util.spec_from_file_location("saver_build", os.path.join(ROOT, "csrc/saver/build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def built_csrc(tmp_path):
    """build(folder, kernel, defines=()) -> (library path, ptxas' report from the line of
    `kernel`'s first mention on): the library of csrc/<folder> compiled by its build.py, with -D
    `defines`, into the test's folder. No GPU is needed, only nvcc; without nvcc the test is
    skipped."""
    from models.fp8 import cuda_lib

    def build(folder: str, kernel: str, defines: tuple[str, ...] = ()):
        script = cuda_lib.build_script(folder)
        try:
            script.find_nvcc()
        except script.BuildUnavailable as err:
            pytest.skip(str(err))
        out = tmp_path / f"lib{folder}{'_'.join(('',) + defines)}.so"
        lib, report = script.build_library(out, defines=defines)
        return lib, report[report.rfind("\n", 0, report.index(kernel)) + 1:]
    return build


@pytest.fixture
def compiled_sm90(tmp_path):
    """run(script, timeout=300) -> the JSON object the script prints on its last line.

    The script runs in a fresh interpreter with TRITON_INTERPRET=0 (so Triton compiles for real;
    sm90 needs no GPU, only Triton's bundled ptxas), the project on PYTHONPATH and a private
    Triton cache, and must exit cleanly."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(script: str, timeout: int = 300) -> dict:
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    return run


def pytest_collection_modifyitems(config, items):
    have_gpu = torch.cuda.is_available()
    gpu_count = torch.cuda.device_count() if have_gpu else 0
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; run scripts/gpu_check.sh"))
        if "multigpu" in item.keywords and gpu_count < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))
