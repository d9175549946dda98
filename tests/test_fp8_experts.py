"""FP8 grouped experts (models/fp8/experts.py) against the high-precision GroupedExperts:
outputs and all gradients (cosine >= 0.99), ragged and empty experts, the weight cache, bad input.

The reference is models.moe.GroupedExperts in fp32 on the same weights and tokens. On CPU every
Triton kernel runs under TRITON_INTERPRET=1 on tiny shapes; `gpu` tests use real expert shapes.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from models.fp8 import quant, swiglu_cuda  # noqa: E402
from models.fp8 import reference as ref  # noqa: E402
from models.fp8.experts import FP8GroupedExperts, swiglu_backward_quantize  # noqa: E402
from models.moe import GroupedExperts, sort_by_expert  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _experts(E, D, F, seed):
    torch.manual_seed(seed)
    ref = GroupedExperts(E, D, F).to(DEVICE)
    with torch.no_grad():
        for w in (ref.w1, ref.w3, ref.w2):
            w.normal_(std=0.06)
    return ref


def _tokens(counts, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), D, generator=gen) * torch.rand(sum(counts), 1, generator=gen).add(0.5)
    return x.to(DEVICE, dtype), torch.tensor(counts, device=DEVICE)


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()


def _forward_backward(module, x, counts, dy):
    x = x.detach().clone().requires_grad_(True)
    y = module(x, counts)
    y.backward(dy)
    return y, x.grad, module.w1.grad, module.w3.grad, module.w2.grad


def _compare(E, D, F, counts, x_dtype, seed, cos_min=0.99):
    ref = _experts(E, D, F, seed)
    fp8 = FP8GroupedExperts.from_grouped(_experts(E, D, F, seed))
    x, counts_E = _tokens(counts, D, x_dtype, seed + 1)
    dy = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(seed + 2))
    dy = dy.to(DEVICE, x_dtype)
    expect = _forward_backward(ref, x.float(), counts_E, dy.float())
    got = _forward_backward(fp8, x, counts_E, dy)
    assert got[0].dtype == x_dtype and got[1].dtype == x_dtype
    for name, g, e in zip(("y", "dx", "dw1", "dw3", "dw2"), got, expect):
        assert g.shape == e.shape, name
        assert _cosine(g, e) >= cos_min, f"{name}: cosine {_cosine(g, e):.5f}"
        ratio = float(g.double().norm() / e.double().norm())  # a scale error keeps the cosine
        assert abs(ratio - 1) < 0.03, f"{name}: norm ratio fp8/ref {ratio:.4f}"
    for i, c in enumerate(counts):  # an expert without tokens gets exactly zero gradient
        if c == 0:
            for w in (fp8.w1, fp8.w3, fp8.w2):
                assert bool((w.grad[i] == 0).all())


@pytest.mark.parametrize("counts,x_dtype", [([37, 0, 90, 5], torch.bfloat16),
                                            ([130, 1], torch.float32)])
def test_fp8_experts_match_high_precision(counts, x_dtype):
    _compare(len(counts), 256, 128, counts, x_dtype, seed=len(counts))


def _check_swiglu_backward(T, F, pow2, seed, cuda=True, rowmajor_scales=False):
    """swiglu_backward_quantize's FP8 outputs against the reference quantizers applied to fp32
    math on the same dequantized h; returns the outputs."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, 2 * F, generator=gen) * 2).to(DEVICE, torch.bfloat16)
    da = torch.randn(T, F, generator=gen).to(DEVICE, torch.bfloat16)
    q_h, s_h = ref.quantize_1x128(h)
    if rowmajor_scales:  # the kernels take s_h at any strides, not only MN-major
        s_h = s_h.contiguous()
    out = swiglu_backward_quantize(q_h, s_h, da, pow2, cuda=cuda)
    (q_dh, s_dh, qt_dh, st_dh), (qt_a, st_a) = out

    g, u = ref.dequantize_1x128(q_h, s_h).chunk(2, dim=1)
    sig = torch.sigmoid(g)
    dh = torch.cat([da.float() * u * sig * (1 + g * (1 - sig)), da.float() * g * sig], dim=1)
    a = g * sig * u
    for (q, s), (q_ref, s_ref), deq in (
            ((q_dh, s_dh), ref.quantize_1x128(dh, pow2), ref.dequantize_1x128),
            ((qt_dh[:, :T].t(), st_dh), ref.quantize_128x1(dh, pow2), ref.dequantize_128x1),
            ((qt_a[:, :T].t(), st_a), ref.quantize_128x1(a, pow2), ref.dequantize_128x1)):
        torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
        assert ref.calc_diff(deq(q.contiguous(), s), deq(q_ref, s_ref)) < 1e-6
        mismatched = (q.float() != q_ref.float()).float().mean().item()
        assert mismatched < 1e-3  # only last-bit ties of exp() may round the other way
    assert bool((qt_dh[:, T:].float() == 0).all()) and bool((qt_a[:, T:].float() == 0).all())
    return out


@pytest.mark.parametrize("T,F,pow2", [(200, 128, False), (77, 256, True)])
def test_swiglu_backward_quantize_matches_reference(T, F, pow2):
    """The fused kernel's FP8 outputs equal the reference quantizers applied to fp32 math."""
    _check_swiglu_backward(T, F, pow2, seed=T + F)


def test_cuda_swiglu_backward_compiles_for_sm90a(built_csrc):
    """csrc/fp8_swiglu builds with nvcc on any machine with the toolkit (no GPU needed), and the
    kernel keeps everything in registers."""
    lib, kernel = built_csrc("fp8_swiglu", "swiglu_backward_kernel")
    assert "0 bytes stack frame, 0 bytes spill stores" in kernel.splitlines()[2], kernel[:400]
    assert swiglu_cuda.load_library(lib).fp8moe_swiglu_backward_smem_bytes() <= 232448


@pytest.mark.gpu
@pytest.mark.parametrize("T,F,pow2,rowmajor", [
    (4097, 1536, False, False),   # ragged T: a last row block of one row
    (1, 128, True, False),
    (3000, 2048, True, True),     # row-major s_h
    (300, 7168 // 2, False, False)])
def test_gpu_swiglu_backward_cuda(T, F, pow2, rowmajor, monkeypatch):
    """The CUDA kernel (checked to run) against the reference, and against the Triton kernel:
    the two sigmoids may differ in a last bit (swiglu_backward.cu's sigmoid()), so a value or a
    scale that bit decides may differ by one step."""
    calls = []
    real = swiglu_cuda.swiglu_backward
    monkeypatch.setattr(swiglu_cuda, "swiglu_backward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    got = _check_swiglu_backward(T, F, pow2, seed=T, rowmajor_scales=rowmajor)
    assert calls == [1], "the CUDA kernel did not run"
    other = _check_swiglu_backward(T, F, pow2, seed=T, cuda=False, rowmajor_scales=rowmajor)
    for x, y in zip((*got[0], *got[1]), (*other[0], *other[1])):
        if x.dtype == torch.float32:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
        else:
            assert (x.float() != y.float()).float().mean().item() < 1e-4


@pytest.mark.gpu
def test_gpu_swiglu_backward_cuda_non_finite():
    """NaN or inf in da reaches the scales of the tiles holding it (and only those), so the
    caller's finiteness checks see it; fp32 da runs the Triton kernel."""
    T, F = 300, 256
    q_h, s_h = ref.quantize_1x128(torch.randn(T, 2 * F, device=DEVICE).bfloat16())
    da = torch.randn(T, F, device=DEVICE, dtype=torch.bfloat16)
    da[129, 200] = float("nan")
    (q_dh, s_dh, qt_dh, st_dh), (qt_a, st_a) = swiglu_backward_quantize(q_h, s_h, da)
    s_dh, st_dh = s_dh.cpu(), st_dh.cpu()
    assert bool(s_dh[129, 1].isnan()) and bool(s_dh[129, 3].isnan())  # dgate and dup groups
    assert int(s_dh.isnan().sum()) == 2
    assert bool(st_dh[1, 200].isnan()) and bool(st_dh[1, F + 200].isnan())
    assert int(st_dh.isnan().sum()) == 2 and not bool(st_a.isnan().any())
    assert not swiglu_cuda.fits(q_h, da.float())


def test_from_grouped_shares_parameters_and_caches_weights():
    ref = _experts(2, 128, 128, seed=5)
    fp8 = FP8GroupedExperts.from_grouped(ref)
    assert fp8.w1 is ref.w1 and fp8.w3 is ref.w3 and fp8.w2 is ref.w2
    assert isinstance(fp8, GroupedExperts)
    first = fp8.fp8_weights()
    assert fp8.fp8_weights() is first                      # reused while unchanged
    with torch.no_grad():
        ref.w2.mul_(2.0)                                     # an optimizer-style in-place step
    second = fp8.fp8_weights()
    assert second is not first
    torch.testing.assert_close(second.w2_s, first.w2_s * 2)  # re-quantized from the new weight
    fp8.invalidate_fp8_cache()
    assert fp8.fp8_weights() is not second


def test_inference_without_weight_grads():
    fp8 = FP8GroupedExperts.from_grouped(_experts(2, 128, 128, seed=6))
    ref = _experts(2, 128, 128, seed=6)
    x, counts = _tokens([20, 44], 128, torch.bfloat16, seed=7)
    with torch.no_grad():
        y = fp8(x, counts)
        expect = ref(x.float(), counts)
    assert _cosine(y, expect) >= 0.99


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible by 128"):
        FP8GroupedExperts(2, 200, 128)
    with pytest.raises(ValueError, match="divisible by 128"):
        FP8GroupedExperts.from_grouped(GroupedExperts(2, 128, 96))
    fp8 = FP8GroupedExperts.from_grouped(_experts(2, 128, 128, seed=8))
    x, counts = _tokens([3, 4], 128, torch.bfloat16, seed=9)
    with pytest.raises(TypeError, match="bfloat16 or float32"):
        fp8(x.half(), counts)
    with pytest.raises(ValueError, match=r"x_TD \[tokens, 128\]"):
        fp8(x[:, :64], counts)
    with pytest.raises(ValueError, match="sum to the 7 rows"):
        fp8(x, torch.tensor([3, 5], device=DEVICE))


def test_below_min_tokens_is_the_plain_grouped_experts(monkeypatch):
    """Fewer rows than min_tokens (forward: the sorted rows; forward_tokens: the tokens before
    top-k): GroupedExperts' own grouped GEMMs on the shared parameters, bit for bit in output and
    gradients, with no quantization and no FP8 weight copy; from min_tokens on, the FP8 path."""
    calls = []
    real = quant.quantize_dual
    monkeypatch.setattr(quant, "quantize_dual", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = _experts(3, 128, 128, seed=21)
    T, K = 40, 2
    fp8 = FP8GroupedExperts.from_grouped(plain, min_tokens=T + 1)
    assert fp8.w1 is plain.w1 and "min_tokens=41" in repr(fp8)
    x, _ = _tokens([T], 128, torch.float32, seed=22)
    slot_to_pick, pick_to_slot, counts_E = _dispatch(T, 3, K, seed=23)
    dy = torch.randn(T * K, 128, generator=torch.Generator().manual_seed(24)).to(DEVICE)
    routed = lambda m, x: m.forward_tokens(x, counts_E, slot_to_pick, pick_to_slot, K)  # noqa: E731
    assert all(map(torch.equal, _grads(fp8, x, dy, routed), _grads(plain, x, dy, routed)))
    rows, counts = _tokens([10, 12, 8], 128, torch.float32, seed=25)  # 30 sorted rows
    on_rows = lambda m, x: m(x, counts)  # noqa: E731
    assert all(map(torch.equal, _grads(fp8, rows, dy[:30], on_rows),
                   _grads(plain, rows, dy[:30], on_rows)))
    assert calls == [] and fp8.cached_fp8_tensors() == ()
    fp8.min_tokens = T
    y8 = routed(fp8, x)
    assert calls == [1] and _cosine(y8, routed(plain, x)) > 0.99
    assert fp8.cached_fp8_tensors() != ()
    for bad in (lambda: FP8GroupedExperts.from_grouped(plain, min_tokens=-1),
                lambda: FP8GroupedExperts(2, 128, 128, min_tokens=-1)):
        with pytest.raises(ValueError, match="min_tokens"):
            bad()


def _grads(module, x, dy, run):
    """run(module, x) and the gradients of x and of module's weights (cleared first)."""
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = run(module, x)
    y.backward(dy)
    return y, x.grad, module.w1.grad, module.w3.grad, module.w2.grad


def _dispatch(T, E, K, seed):
    """MoE's slot indices for T tokens routed to K distinct experts each."""
    gen = torch.Generator().manual_seed(seed)
    expert_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(DEVICE)
    return (*sort_by_expert(expert_TK), torch.bincount(expert_TK.flatten(), minlength=E))


def _check_forward_tokens(E, D, F, T, K, seed):
    """forward_tokens (copies quantized through the dispatch index) against forward on
    DispatchTokens' sorted copy: output and every gradient bitwise equal."""
    from models.moe import DispatchTokens
    fp8 = FP8GroupedExperts.from_grouped(_experts(E, D, F, seed))
    x, _ = _tokens([T], D, torch.bfloat16, seed + 1)
    slot_to_pick, pick_to_slot, counts_E = _dispatch(T, E, K, seed + 2)
    dy = torch.randn(T * K, D, generator=torch.Generator().manual_seed(seed + 3)).to(DEVICE,
                                                                                     x.dtype)
    results = []
    for fused in (False, True):
        fp8.zero_grad()
        xg = x.detach().clone().requires_grad_(True)
        if fused:
            y = fp8.forward_tokens(xg, counts_E, slot_to_pick, pick_to_slot, K)
        else:
            y = fp8(DispatchTokens.apply(xg, slot_to_pick, pick_to_slot, K), counts_E)
        y.backward(dy)
        results.append((y, xg.grad, fp8.w1.grad, fp8.w3.grad, fp8.w2.grad))
    for name, a, b in zip(("y", "dx", "dw1", "dw3", "dw2"), *results):
        assert torch.equal(a, b), name


def test_forward_tokens_equals_dispatch_then_forward():
    _check_forward_tokens(E=4, D=128, F=128, T=50, K=2, seed=12)


@pytest.mark.gpu
def test_forward_tokens_real_shapes():
    _check_forward_tokens(E=16, D=4096, F=1536, T=3000, K=4, seed=13)


@pytest.mark.gpu
@pytest.mark.parametrize("E,D,F,m", [(16, 4096, 1536, 256), (4, 7168, 2048, 256)])
def test_fp8_experts_real_shapes(E, D, F, m):
    gen = torch.Generator().manual_seed(E)
    counts = (torch.rand(E, generator=gen) * 2 * m).long().tolist()
    counts[1] = 0
    _compare(E, D, F, counts, torch.bfloat16, seed=D)


def test_no_tokens_gives_empty_output_and_zero_weight_grads():
    fp8 = FP8GroupedExperts.from_grouped(_experts(2, 128, 128, seed=10))
    x = torch.zeros(0, 128, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y = fp8(x, torch.zeros(2, dtype=torch.int64, device=DEVICE))
    assert y.shape == (0, 128)
    y.sum().backward()
    for w in (fp8.w1, fp8.w3, fp8.w2):
        assert w.grad is not None and bool((w.grad == 0).all())
