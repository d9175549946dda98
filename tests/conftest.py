"""Shared test set-up: GPU-marked tests skip themselves on machines without CUDA."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    have_gpu = torch.cuda.is_available()
    gpu_count = torch.cuda.device_count() if have_gpu else 0
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; run scripts/gpu_check.sh"))
        if "multigpu" in item.keywords and gpu_count < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))
