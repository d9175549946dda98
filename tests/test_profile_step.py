"""scripts/profile_step.py: each kernel name of an H200 profile of a `small` step (fourteenth
session) lands in the family it belongs to; the --copies table names who called each copy; the
--syncs recorder counts the sync warnings and the explicit synchronizations by the code that
made them."""
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import profile_step  # noqa: E402


@pytest.mark.parametrize("name, family", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x256_1x4x1_cga1x1x1"
     "_kernel0_0", "attention"),
    ("nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_coopA_algo2_Ablk128_Bvec128_TNN", "gemm"),
    ("(anonymous namespace)::grouped_fprop_kernel(CUtensorMap_st, CUtensorMap_st)", "gemm"),
    ("(anonymous namespace)::grouped_wgrad_kernel(CUtensorMap_st, CUtensorMap_st)", "gemm"),
    ("(anonymous namespace)::swiglu_backward_kernel((anonymous namespace)::Args)", "fused"),
    ("quant_tile_kernel", "fused"),
    ("moe_combine_backward_kernel", "fused"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous "
     "namespace)::OpaqueType<2u>, unsigned int, 4, 64, 64>", "copy"),
    ("void at::native::vectorized_gather_kernel<16, long>(char*, char*, long*, int)", "index"),
])
def test_kernel_families(name, family):
    assert profile_step.family(name) == family


def test_copy_table_names_who_called_each_copy(monkeypatch):
    """--copies: each copy op with its shapes and the ops that called it (a .contiguous() of a
    transpose: clone < contiguous), on the CPU profiler (no GPU times there)."""
    x = torch.randn(64, 48, requires_grad=True)

    class Terms:
        loss = None

    class Engine:
        def backward(self, loss):
            loss.backward()

    def lm_loss(engine, batch):
        terms = Terms()
        terms.loss = torch.cat((x.t().contiguous(), x.t()), 0).sum()
        return terms
    monkeypatch.setattr(profile_step.eng, "lm_loss", lm_loss)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    lines = profile_step.copy_table(Engine(), {}, top=10)
    assert lines[0].startswith("copy ops of one forward+backward")
    text = "\n".join(lines)
    assert "aten::copy_ [[48, 64], [48, 64], []]\n        < aten::clone < aten::contiguous" in text
    assert "aten::cat" in text


def _sync_here():
    warnings.warn("called a synchronizing CUDA operation", UserWarning)


def test_sync_recorder_counts_sync_warnings_by_their_call_site():
    """Sync debug mode's warnings, two from one line and one from another, are counted by the
    code that raised them; other warnings are left out; warnings are as before afterwards."""
    with profile_step.SyncRecorder(frames=2) as recorder:
        for _ in range(2):
            _sync_here()
        _sync_here()
        warnings.warn("something else")
    lines = recorder.lines()
    assert lines[0] == "host syncs of one step: 3"
    counts = sorted(int(line.split("x")[0]) for line in lines[1:])
    assert counts == [1, 2]
    assert all("tests/test_profile_step.py" in line and "(_sync_here)" in line
               for line in lines[1:])
    with pytest.warns(UserWarning, match="after"):
        warnings.warn("after", UserWarning)


def test_sync_recorder_counts_explicit_synchronize_calls(monkeypatch):
    """torch.cuda.synchronize() raises no sync warning; the recorder counts it by its caller all
    the same, still calls through, and puts torch.cuda.synchronize back afterwards."""
    through = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: through.append(device))
    before = torch.cuda.synchronize
    with profile_step.SyncRecorder(frames=1) as recorder:
        torch.cuda.synchronize(0)
        _sync_here()
    assert torch.cuda.synchronize is before and through == [0]
    lines = recorder.lines()
    assert lines[0] == "host syncs of one step: 2"
    explicit = [line for line in lines[1:] if "torch.cuda.synchronize: " in line]
    assert len(explicit) == 1
    assert "(test_sync_recorder_counts_explicit_synchronize_calls)" in explicit[0]


def _frame(pid, parent, name, ts, dur):
    return {"ph": "X", "cat": "python_function", "name": name, "tid": 7, "ts": ts, "dur": dur,
            "args": {"Python id": pid, "Python parent id": parent}}


def _gpu(cat, name, ts, dur, corr):
    return {"ph": "X", "cat": cat, "name": name, "tid": 9, "ts": ts, "dur": dur,
            "args": {"correlation": corr}}


def _launch(ts, corr):
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 7, "ts": ts,
            "dur": 5, "args": {"correlation": corr}}


def test_gap_lines_sum_idle_stretches_by_the_code_that_ended_them():
    """A hand-made trace of one step: kernels on two streams overlap (no gap), a 100 us and a
    300 us stretch end with launches from the forward (the torch frame between is skipped), a
    600 us one with a copy launched from train_step itself, a 10 us one is below the threshold."""
    events = [
        _frame(1, None, "trainer/engine.py(240): train_step", 0, 5000),
        _frame(2, 1, "models/block.py(50): forward", 200, 1000),
        _frame(3, 2, "torch/nn/modules/module.py(1): _call_impl", 210, 900),
        _gpu("kernel", "k1", 0, 100, 1), _gpu("kernel", "k2", 50, 150, 2),  # busy until 200
        _gpu("kernel", "k3", 300, 100, 3), _launch(250, 3),  # idle 200..300
        _gpu("kernel", "k4", 700, 50, 4), _launch(650, 4),  # idle 400..700
        _gpu("gpu_memcpy", "Memcpy HtoD", 1350, 10, 5), _launch(1300, 5),  # idle 750..1350
        _gpu("kernel", "k6", 1370, 10, 6), _launch(1320, 6),  # 10 us: not counted
    ]
    lines = profile_step.gap_lines(events, steps=1, top=5, min_us=20)
    assert lines[0].startswith("GPU idle per step: 1.00 ms in 3 stretches")
    assert ("0.60 ms    1.0x  trainer/engine.py(240): train_step\n        then Memcpy HtoD"
            in lines[1])
    assert ("0.40 ms    2.0x  models/block.py(50): forward < trainer/engine.py(240): train_step"
            "\n        then k3") in lines[2]
    assert len(lines) == 3
