"""FP8 Linear (models/fp8/linear.py): forward and both gradients against nn.Linear, FP8-only saved
activations, the per-step weight cache, fp32 gradient accumulation, bad input."""
import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest
import torch
from torch import nn

from models.fp8 import quant
from models.fp8.linear import FP8Linear, drop_input_copies, invalidate_weight_caches
from models.fp8.reference import calc_diff

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


def _close(a, b):
    """Same direction and the same norm (a gradient scaled by a constant keeps its cosine)."""
    return _cos(a, b) >= 0.99 and abs(float(a.double().norm() / b.double().norm()) - 1) < 0.03


def _pair(K, N, seed, dtype=torch.float32, pow2=False):
    torch.manual_seed(seed)
    ref = nn.Linear(K, N, bias=False, device=DEVICE, dtype=dtype)
    fp8 = FP8Linear(K, N, pow2_scales=pow2, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        fp8.weight.copy_(ref.weight)
    return ref, fp8


def _compare(shape, N, x_dtype, w_dtype, pow2=False, seed=0):
    ref, fp8 = _pair(shape[-1], N, seed, w_dtype, pow2)
    x = torch.randn(shape, device=DEVICE).to(x_dtype)
    x_ref, x_fp8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref if x_dtype == w_dtype else x_ref.to(w_dtype))
    y = fp8(x_fp8)
    assert y.shape == (*shape[:-1], N) and y.dtype == x_dtype
    dy = torch.randn_like(y)
    y_ref.backward(dy.to(y_ref.dtype))
    y.backward(dy)
    assert calc_diff(y.float(), y_ref.float()) < 2e-3
    assert _close(x_fp8.grad, x_ref.grad)
    assert _close(fp8.weight.grad, ref.weight.grad)
    assert fp8.weight.grad.dtype == w_dtype


@pytest.mark.parametrize("shape,N", [((2, 65, 256), 384), ((130, 128), 128)])
@pytest.mark.parametrize("pow2", [False, True])
def test_matches_linear_cpu(shape, N, pow2):
    _compare(shape, N, torch.float32, torch.float32, pow2)


def _activations(saved, fp8):
    """Saved tensors other than the module's own cached weight copies (no memory of their own)."""
    cached = {t.data_ptr() for t in fp8.fp8_weight()}
    return [t for t in saved if t.data_ptr() not in cached]


def test_saved_activations_are_fp8():
    _, fp8 = _pair(256, 128, 1)
    x = torch.randn(256, 256, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8(x)
    q_w, s_w, qt_w, st_w = fp8.fp8_weight()
    weights = [t for t in saved if t.data_ptr() in {q_w.data_ptr(), qt_w.data_ptr(), st_w.data_ptr()}]
    assert [t.data_ptr() for t in weights] == [qt_w.data_ptr(), st_w.data_ptr()], \
        "backward keeps only the transposed weight copy (Dgrad), never the forward one"
    saved = _activations(saved, fp8)
    assert saved, "the weight gradient needs saved activations"
    assert {t.dtype for t in saved} <= {torch.float8_e4m3fn, torch.float32}
    fp8_bytes = sum(t.numel() * t.element_size() for t in saved)
    assert fp8_bytes < x.numel() * 2 * 0.6, "must be about half of a bf16 copy, not a bf16 copy"
    y.sum().backward()


def test_no_weight_grad_saves_nothing():
    _, fp8 = _pair(256, 128, 2)
    fp8.weight.requires_grad_(False)
    x = torch.randn(4, 256, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8(x)
    assert not _activations(saved, fp8)
    y.sum().backward()
    assert x.grad is not None and fp8.weight.grad is None


def test_no_grad_writes_only_the_forward_copy(monkeypatch):
    monkeypatch.setattr(quant, "quantize_dual", None)  # any call would fail
    _, fp8 = _pair(256, 128, 2)
    with torch.no_grad():
        assert fp8(torch.randn(4, 256, device=DEVICE)).shape == (4, 128)
    _, mlp = _mlp_pair(128, 128, 3)
    with torch.no_grad():
        assert mlp(torch.randn(4, 128, device=DEVICE)).shape == (4, 128)


def test_weight_quantized_once_per_step(monkeypatch):
    calls = []
    real = quant.quantize_128x128
    monkeypatch.setattr(quant, "quantize_128x128", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, fp8 = _pair(128, 128, 3)
    opt = torch.optim.SGD(fp8.parameters(), lr=0.1)
    x = torch.randn(8, 128, device=DEVICE)
    for _ in range(3):  # three micro-batches, one step
        fp8(x).sum().backward()
    assert len(calls) == 1
    opt.step()  # in-place update bumps the version counter
    y_new = fp8(x)
    assert len(calls) == 2
    with torch.no_grad():  # what DeepSpeed does: bypasses the version counter
        fp8.weight.data.copy_(torch.randn(128, 128, device=DEVICE))
    assert torch.equal(fp8(x), y_new), "the documented contract: .data writes need invalidation"
    assert invalidate_weight_caches(nn.Sequential(fp8)) == 1
    assert not torch.equal(fp8(x), y_new) and len(calls) == 3


def test_weight_grad_accumulates_in_fp32():
    _, fp8 = _pair(256, 128, 4)
    xs = [torch.randn(64, 256, device=DEVICE) for _ in range(2)]
    grads = []
    for x in xs:
        fp8.weight.grad = None
        fp8(x).sum().backward()
        grads.append(fp8.weight.grad.clone())
    fp8.weight.grad = None
    for x in xs:
        fp8(x).sum().backward()
    assert fp8.weight.grad.dtype == torch.float32
    torch.testing.assert_close(fp8.weight.grad, grads[0] + grads[1], atol=0, rtol=0)


def test_from_linear_shares_the_parameter():
    lin = nn.Linear(256, 128, bias=False, device=DEVICE)
    fp8 = FP8Linear.from_linear(lin)
    assert fp8.weight is lin.weight
    assert list(fp8.state_dict()) == ["weight"]


def test_bad_input():
    with pytest.raises(ValueError, match="divisible by 128"):
        FP8Linear(200, 128)
    with pytest.raises(ValueError, match="bias"):
        FP8Linear(128, 128, bias=True)
    with pytest.raises(ValueError, match="bias"):
        FP8Linear.from_linear(nn.Linear(128, 128))
    fp8 = FP8Linear(128, 128, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[\.\.\., 128\]"):
        fp8(torch.randn(4, 256, device=DEVICE))
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        fp8(torch.randn(4, 128, device=DEVICE, dtype=torch.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("T,K,N", [(8192, 7168, 2048), (8192, 2048, 7168), (4097, 1536, 4096)])
def test_gpu_matches_linear(T, K, N):
    _compare((T, K), N, torch.bfloat16, torch.float32, seed=T)
    _compare((T, K), N, torch.bfloat16, torch.bfloat16, pow2=True, seed=T + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("T,D,F_", [(8192, 4096, 10240), (4097, 7168, 2048)])
def test_gpu_mlp_matches_swiglu_mlp(T, D, F_):
    _compare_mlp((T, D), F_, torch.bfloat16, torch.bfloat16, seed=T)
    _compare_mlp((T, D), F_, torch.bfloat16, torch.float32, pow2=True, seed=T + 1)


@pytest.mark.gpu
def test_gpu_cpu_contracts():
    """The CPU contract tests, on the compiled kernels."""
    test_saved_activations_are_fp8()
    test_no_weight_grad_saves_nothing()
    test_weight_grad_accumulates_in_fp32()
    test_mlp_matches_swiglu_mlp_cpu()


def test_shared_input_is_quantized_once(monkeypatch):
    """Two FP8 Linears reading one tensor (MLA's wq_a and wkv_a, an MLP's w1 and w3) quantize it once."""
    calls = []
    real = quant.quantize_dual
    monkeypatch.setattr(quant, "quantize_dual", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    (ref_a, a), (ref_b, b) = _pair(256, 128, 5), _pair(256, 384, 6)
    x = torch.randn(3, 40, 256, device=DEVICE, requires_grad=True)
    ya, yb = a(x), b(x)
    assert len(calls) == 1
    (ya.sum() + yb.sum()).backward()
    assert len(calls) == 3  # + one dy per layer
    x_ref = x.detach().clone().requires_grad_()
    (ref_a(x_ref).sum() + ref_b(x_ref).sum()).backward()
    assert _cos(x.grad, x_ref.grad) >= 0.99
    with torch.no_grad():
        x.mul_(2)  # an in-place change must not reuse stale copies
    a(x)
    assert len(calls) == 4
    b(x)
    assert len(calls) == 4, "unchanged x: its copies are reused"
    drop_input_copies(x.flatten(0, 1))  # through a same-rows view, as MoE passes it
    b(x)
    assert len(calls) == 5, "dropped: the next consumer quantizes again (benchmarks need this)"


def _mlp_pair(D, F_, seed, dtype=torch.float32, pow2=False):
    from models.layers import MLP
    from models.fp8.linear import FP8MLP
    torch.manual_seed(seed)
    ref = MLP(D, F_).to(device=DEVICE, dtype=dtype)
    fp8 = MLP(D, F_).to(device=DEVICE, dtype=dtype)
    fp8.load_state_dict(ref.state_dict())
    return ref, FP8MLP.from_mlp(fp8, pow2)


def _compare_mlp(shape, F_, x_dtype, w_dtype, pow2=False, seed=0):
    ref, fp8 = _mlp_pair(shape[-1], F_, seed, w_dtype, pow2)
    assert list(fp8.state_dict()) == list(ref.state_dict())
    x = torch.randn(shape, device=DEVICE).to(x_dtype)
    x_ref, x_fp8 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = ref(x_ref.to(w_dtype)), fp8(x_fp8)
    assert y.shape == shape and y.dtype == x_dtype
    dy = torch.randn_like(y)
    y_ref.backward(dy.to(y_ref.dtype))
    y.backward(dy)
    assert calc_diff(y.float(), y_ref.float()) < 3e-3
    assert _close(x_fp8.grad, x_ref.grad)
    for name in ("w1", "w3", "w2"):
        g, g_ref = getattr(fp8, name).weight.grad, getattr(ref, name).weight.grad
        assert g.dtype == w_dtype and _close(g, g_ref), name


def test_mlp_matches_swiglu_mlp_cpu():
    _compare_mlp((2, 33, 256), 256, torch.float32, torch.float32, pow2=True)


def _check_min_tokens_switch(monkeypatch, fp8, ref, x) -> None:
    """fp8 (min_tokens = x's tokens + 1) on x is ref's own computation, bit for bit in output and
    gradients (x's and the shared parameters'), with no quantization and no FP8 weight copy; with
    min_tokens lowered to x's tokens, the FP8 path (one dual quantization of x, the cache filled)."""
    calls = []
    real = quant.quantize_dual
    monkeypatch.setattr(quant, "quantize_dual", lambda *a, **k: calls.append(1) or real(*a, **k))
    x.requires_grad_(True)
    y = fp8(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *ref.parameters()], dy)
    y_ref = ref(x)
    grads_ref = torch.autograd.grad(y_ref, [x, *ref.parameters()], dy)
    assert torch.equal(y, y_ref) and all(map(torch.equal, grads, grads_ref))
    assert calls == [] and fp8.cached_fp8_tensors() == ()
    fp8.min_tokens -= 1
    y8 = fp8(x)
    assert calls == [1] and calc_diff(y8.float(), y_ref.float()) < 3e-3
    assert len(fp8.cached_fp8_tensors()) == 4


def test_mlp_below_min_tokens_is_the_high_precision_mlp(monkeypatch):
    """Fewer tokens than min_tokens: models.layers.MLP's own ops on the shared parameters, bit
    for bit in output and gradients, with no quantization and no FP8 weight copy; from
    min_tokens on, the FP8 path."""
    from models.layers import MLP
    from models.fp8.linear import FP8MLP
    torch.manual_seed(11)
    ref = MLP(128, 256).to(DEVICE)
    fp8 = FP8MLP.from_mlp(ref, min_tokens=2 * 33 + 1)
    assert fp8.w1.weight is ref.w1.weight and "min_tokens=67" in repr(fp8)
    _check_min_tokens_switch(monkeypatch, fp8, ref, torch.randn(2, 33, 128, device=DEVICE))
    assert fp8.w2.cached_fp8_tensors() != ()
    with pytest.raises(ValueError, match="min_tokens"):
        FP8MLP.from_mlp(ref, min_tokens=-1)


def test_linear_below_min_tokens_is_nn_linear(monkeypatch):
    """Fewer tokens than min_tokens: nn.Linear's own F.linear on the shared weight, bit for bit in
    output and gradients, with no quantization and no FP8 weight copy; from min_tokens on, the FP8
    path."""
    torch.manual_seed(12)
    ref = nn.Linear(256, 128, bias=False, device=DEVICE)
    fp8 = FP8Linear.from_linear(ref, min_tokens=3 * 21 + 1)
    assert fp8.weight is ref.weight and "min_tokens=64" in repr(fp8)
    _check_min_tokens_switch(monkeypatch, fp8, ref, torch.randn(3, 21, 256, device=DEVICE))
    for bad in (lambda: FP8Linear.from_linear(ref, min_tokens=-1),
                lambda: FP8Linear(256, 128, min_tokens=-2)):
        with pytest.raises(ValueError, match="min_tokens"):
            bad()


def test_mlp_saves_only_fp8(monkeypatch):
    """The SwiGLU output comes from swiglu_quantize (never a high-precision tensor) and backward
    keeps only FP8 copies: x 128x1 and h = [gate | up] 1x128 (plus their fp32 scales)."""
    calls = []
    real = quant.swiglu_quantize
    monkeypatch.setattr(quant, "swiglu_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, fp8 = _mlp_pair(128, 256, 7)
    x = torch.randn(256, 128, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8(x)
    assert calls == [1]
    weights = {t.data_ptr() for t in (*fp8.w13_fp8()[2:], *fp8.w2.fp8_weight()[2:])}
    assert len([t for t in saved if t.data_ptr() in weights]) == 4, "the transposed weight copies"
    saved = [t for t in saved if t.data_ptr() not in weights]
    fp8_shapes = sorted(tuple(t.shape) for t in saved if t.dtype == torch.float8_e4m3fn)
    assert fp8_shapes == [(128, 256), (256, 512)], "x^T 128x1 copy and h's 1x128 copy"
    assert all(t.dtype == torch.float32 and t.numel() <= 256 * 4 for t in saved
               if t.dtype != torch.float8_e4m3fn), "only scales besides the FP8 copies"
    y.sum().backward()


def _norm_pair(D, seed, dtype=torch.float32, consumers=1, min_tokens=0):
    from models.layers import RMSNorm
    from models.fp8.linear import FP8RMSNorm
    torch.manual_seed(seed)
    ref = RMSNorm(D).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.2 * torch.randn(D))
    return ref, FP8RMSNorm.from_norm(ref, consumers=consumers, min_tokens=min_tokens)


def _counting(monkeypatch, name):
    calls = []
    real = getattr(quant, name)
    monkeypatch.setattr(quant, name, lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


def _norm_then_linears(norm, linears, x, dy):
    """Outputs of the linears on norm(x), a MoE-style flattened view feeding the last one, and
    the gradients of x and the norm weight for the cotangents dy."""
    x = x.detach().clone().requires_grad_()
    h = norm(x)
    ys = [lin(h if i < len(linears) - 1 else h.flatten(0, 1)) for i, lin in enumerate(linears)]
    loss = sum((y.float() * d.float().view_as(y)).sum() for y, d in zip(ys, dy))
    grads = torch.autograd.grad(loss, [x, norm.weight])
    return h, ys, grads


def test_fp8_rmsnorm_feeds_its_consumers(monkeypatch):
    """FP8RMSNorm's fused kernel quantizes for its FP8 consumers: none of them quantizes its
    input (one reads it through a flattened view), the last one frees the copies, the output is
    the plain norm's, and the consumers' outputs and every gradient match the plain norm's path
    (same weights, fp32: only rstd's last bit may differ)."""
    ref, norm = _norm_pair(256, 21, consumers=2)
    assert norm.weight is ref.weight and "consumers=2" in repr(norm)
    (_, a), (_, b) = _pair(256, 128, 22), _pair(256, 384, 23)
    x = torch.randn(2, 65, 256, device=DEVICE)
    dy = [torch.randn(2, 65, 128, device=DEVICE), torch.randn(130, 384, device=DEVICE)]
    dual = _counting(monkeypatch, "quantize_dual")
    norms = _counting(monkeypatch, "rmsnorm_quantize")
    h, ys, grads = _norm_then_linears(norm, [a, b], x, dy)
    assert len(norms) == 1 and len(dual) == 2, "inputs from the norm; only the two dy quantized"
    assert getattr(h._base, "_fp8_copies", None) is None, "the second consumer frees the copies"
    h_ref, ys_ref, grads_ref = _norm_then_linears(ref, [a, b], x, dy)
    assert len(dual) == 2 + 3, "the plain norm: the consumers quantize h (once), then two dy"
    torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=1e-6)
    for y, y_ref in zip(ys, ys_ref):
        assert calc_diff(y, y_ref) < 1e-6
    for g, g_ref in zip(grads, grads_ref):
        assert _cos(g, g_ref) > 0.9999 and abs(float(g.norm() / g_ref.norm()) - 1) < 1e-4


def test_fp8_rmsnorm_below_min_tokens_is_the_plain_norm(monkeypatch):
    """Fewer tokens than min_tokens, or an input dtype the FP8 path does not take (fp16): the
    plain norm, bit for bit, no kernel of the fused path, no copies attached."""
    ref, norm = _norm_pair(128, 24, min_tokens=100)
    norms = _counting(monkeypatch, "rmsnorm_quantize")
    x = torch.randn(3, 33, 128, device=DEVICE)
    assert torch.equal(norm(x), ref(x)) and not norms
    assert getattr(norm(x), "_fp8_copies", None) is None
    norm.min_tokens = 99
    norm(x)
    assert len(norms) == 1
    assert torch.equal(norm(x.half()), ref(x.half())), "fp16 is not an FP8 input: the plain norm"
    with pytest.raises(ValueError, match="consumers"):
        type(norm).from_norm(ref, consumers=0)


def test_fp8_rmsnorm_copies_follow_in_place_changes(monkeypatch):
    """A consumer of a norm output changed in place after the norm re-quantizes it: the copies
    are keyed on the version counter. Without grad the norm writes only the row-wise copy."""
    _, norm = _norm_pair(128, 25)
    _, lin = _pair(128, 128, 26)
    dual = _counting(monkeypatch, "quantize_dual")
    rows = _counting(monkeypatch, "quantize_1x128")
    with torch.no_grad():
        h = norm(torch.randn(40, 128, device=DEVICE))
        assert h._base._fp8_copies.copies[2] is None
        h.mul_(2)
        assert calc_diff(lin(h), torch.nn.functional.linear(h, lin.weight)) < 2e-3
    assert len(rows) == 1 and not dual


@pytest.mark.gpu
def test_gpu_fp8_rmsnorm(monkeypatch):
    """The CPU contracts on the compiled kernels; then bf16 at `small`'s width through the CUDA
    norm kernel into an FP8MLP and an FP8Linear. Its output is the plain norm's to an ulp; the
    consumers' outputs and all gradients match the high-precision path (plain norm, bf16 MLP and
    Linear) as closely as the plain norm feeding the same FP8 modules does: the copies quantize
    y in fp32 rather than y rounded to bf16, which moves single FP8 roundings, nothing more."""
    from models.fp8 import norm_cuda
    test_fp8_rmsnorm_feeds_its_consumers(monkeypatch)
    test_fp8_rmsnorm_below_min_tokens_is_the_plain_norm(monkeypatch)
    test_fp8_rmsnorm_copies_follow_in_place_changes(monkeypatch)
    cuda_calls = []
    real = norm_cuda.rmsnorm_quantize
    monkeypatch.setattr(norm_cuda, "rmsnorm_quantize",
                        lambda *a, **k: cuda_calls.append(1) or real(*a, **k))
    ref, norm = _norm_pair(4096, 27, torch.bfloat16, consumers=2)
    mlp_hp, mlp = _mlp_pair(4096, 2048, 28, torch.bfloat16)
    lin_hp, lin = _pair(4096, 1024, 29, torch.bfloat16)
    x = torch.randn(2, 2048, 4096, device=DEVICE, dtype=torch.bfloat16)
    dy = [torch.randn(2, 2048, 4096, device=DEVICE), torch.randn(4096, 1024, device=DEVICE)]
    h, ys, grads = _norm_then_linears(norm, [mlp, lin], x, dy)
    assert cuda_calls == [1] and h.dtype == torch.bfloat16
    h_ref, ys_plain, grads_plain = _norm_then_linears(ref, [mlp, lin], x, dy)
    _, ys_hp, grads_hp = _norm_then_linears(ref, [mlp_hp, lin_hp], x, dy)
    assert bool(((h.float() - h_ref.float()).abs() <= h_ref.float().abs() * 2 ** -7).all()), \
        "one rounding instead of two: at most an ulp apart"
    for y, y_plain, y_hp in zip(ys, ys_plain, ys_hp):
        err = calc_diff(y.float(), y_hp.float())
        err_plain = calc_diff(y_plain.float(), y_hp.float())
        assert err < 3e-3 and err < 1.2 * err_plain, (err, err_plain)
    for g, g_plain, g_hp in zip(grads, grads_plain, grads_hp):
        assert _close(g, g_hp) and _cos(g, g_hp) >= _cos(g_plain, g_hp) - 1e-3
