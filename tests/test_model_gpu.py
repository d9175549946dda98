"""The model's GPU paths against its CPU-tested ones: torch._grouped_mm against the padded bmm,
flash attention (with V padded to the QK head dim) against the math path, absorbed decode."""
import pytest
import torch

from models import build_model, model_config
from models.moe import _padded_grouped_mm, grouped_mm

pytestmark = pytest.mark.gpu


def test_native_grouped_mm_matches_padded_bmm_bf16():
    torch.manual_seed(0)
    counts = torch.tensor([0, 300, 17, 1000, 5, 0, 64, 200], device="cuda")
    x = torch.randn(int(counts.sum()), 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16) * 0.05).requires_grad_()
    g = torch.randn(x.shape[0], 256, device="cuda", dtype=torch.bfloat16)
    y = grouped_mm(x, w, counts)
    gx, gw = torch.autograd.grad((y.float() * g.float()).sum(), [x, w])
    y_ref = _padded_grouped_mm(x, w, counts)
    rx, rw = torch.autograd.grad((y_ref.float() * g.float()).sum(), [x, w])
    torch.testing.assert_close(y, y_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gx, rx, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(gw, rw, atol=5e-1, rtol=2e-2)


def test_debug_model_gpu_bf16_matches_cpu_fp32():
    torch.manual_seed(1)
    cfg = model_config("debug")
    cpu = build_model(cfg)
    gpu = build_model(cfg, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to(torch.bfloat16)
    tok = torch.randint(0, cfg.vocab_size, (2, 65))
    ref = cpu(tok[:, :-1], tok[:, 1:])
    out = gpu(tok[:, :-1].cuda(), tok[:, 1:].cuda())
    assert abs(out.lm_loss.item() - ref.lm_loss.item()) < 0.02
    assert abs(out.mtp_loss.item() - ref.mtp_loss.item()) < 0.02
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def test_absorbed_decode_matches_training_path_on_gpu():
    torch.manual_seed(2)
    cfg = model_config("debug")
    model = build_model(cfg, device="cuda")
    tok = torch.randint(0, cfg.vocab_size, (2, 24), device="cuda")
    full = model(tok)
    caches = model.new_caches(2, 32, dtype=torch.float32, device="cuda")
    steps = [model.decode(tok[:, i:i + 4], caches, i)[0] for i in range(0, 24, 4)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-3, rtol=1e-3)
