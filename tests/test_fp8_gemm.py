"""Dense block-scaled GEMMs (models/fp8/gemm.py): operand mapping of Fprop, Dgrad and Wgrad, shape
and layout validation on CPU; on the GPU, cuBLAS blockwise against the fp32 reference on the same
quantized operands (calc_diff < 1e-3) over a shape grid with ragged token counts."""
import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest
import torch

from models.fp8 import quant
from models.fp8 import reference as R
from models.fp8.gemm import _pad_k4, _pad_rows4, gemm_1x128_128x128, gemm_1x128_1x128

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(shape, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.bfloat16).to(device)


def _fprop(T, N, K, pow2, out_dtype=torch.bfloat16):
    x, w = _rand((T, K), 1), _rand((N, K), 2)
    qx, sx = quant.quantize_1x128(x, pow2)
    qw, sw = quant.quantize_128x128(w, pow2)
    y = gemm_1x128_128x128(qx, sx, qw, sw, out_dtype=out_dtype)
    assert y.shape == (T, N) and y.dtype == out_dtype
    ref = R.gemm_1x128_128x128(qx, sx, qw, sw)
    assert R.calc_diff(y, ref) < 1e-3
    assert R.calc_diff(y, x.float() @ w.float().t()) < 2e-3


def _dgrad(T, N, K, pow2):
    dy, w = _rand((T, N), 3), _rand((N, K), 4)
    qdy, sdy = quant.quantize_1x128(dy, pow2)
    _, _, qwt, swt = quant.quantize_128x128(w, pow2, transpose=True)
    dx = gemm_1x128_128x128(qdy, sdy, qwt, swt)
    assert dx.shape == (T, K)
    ref = R.gemm_1x128_128x128(qdy, sdy, qwt, swt)
    assert R.calc_diff(dx, ref) < 1e-3
    assert R.calc_diff(dx, dy.float() @ w.float()) < 2e-3


def _wgrad(T, N, K, pow2):
    dy, x = _rand((T, N), 5), _rand((T, K), 6)
    *_, qt_dy, st_dy = quant.quantize_dual(dy, pow2)
    *_, qt_x, st_x = quant.quantize_dual(x, pow2)
    dw = gemm_1x128_1x128(qt_dy, st_dy.t(), qt_x, st_x.t())
    assert dw.shape == (N, K) and dw.dtype == torch.float32
    ref = R.gemm_1x128_1x128(qt_dy, st_dy.t(), qt_x, st_x.t())
    assert R.calc_diff(dw, ref) < 1e-3
    assert R.calc_diff(dw, dy.float().t() @ x.float()) < 2e-3


@pytest.mark.parametrize("T,N,K", [(1, 128, 128), (130, 256, 384), (64, 384, 256)])
@pytest.mark.parametrize("pow2", [False, True])
def test_three_gemms_cpu(T, N, K, pow2):
    _fprop(T, N, K, pow2)
    _dgrad(T, N, K, pow2)
    _wgrad(T, N, K, pow2)


def test_fp32_output():
    _fprop(3, 128, 256, False, out_dtype=torch.float32)


def test_bad_operands():
    qa, sa = quant.quantize_1x128(_rand((8, 256), 7))
    qb, sb = quant.quantize_128x128(_rand((128, 256), 8))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        gemm_1x128_128x128(qa.float(), sa, qb, sb)
    with pytest.raises(ValueError, match="contiguous"):
        gemm_1x128_128x128(qa, sa, qb.t().contiguous().t(), sb)
    with pytest.raises(ValueError, match="MN-major"):
        gemm_1x128_128x128(qa, sa.contiguous(), qb, sb)
    with pytest.raises(ValueError, match="128x128 block scales"):
        gemm_1x128_128x128(qa, sa, qb, sb.t())
    with pytest.raises(ValueError, match="share K"):
        gemm_1x128_128x128(qa, sa, qb[:, :128].contiguous(), sb[:, :1].contiguous())
    with pytest.raises(TypeError, match="out_dtype"):
        gemm_1x128_128x128(qa, sa, qb, sb, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="MN-major"):
        gemm_1x128_1x128(qa, sa, qb, sb)


def test_unchecked_calls_compute_the_same(monkeypatch):
    """check=False (the FP8 modules' own calls, on operands straight from the quantizers) runs
    none of the operand checks and computes exactly what the checked call computes."""
    from models.fp8 import gemm
    x, w, dy = _rand((130, 384), 13), _rand((256, 384), 14), _rand((130, 256), 15)
    qx, sx, qt_x, st_x = quant.quantize_dual(x)
    qw, sw, qwt, swt = quant.quantize_128x128(w, transpose=True)
    qdy, sdy, qt_dy, st_dy = quant.quantize_dual(dy)
    calls = [(gemm_1x128_128x128, (qx, sx, qw, sw)), (gemm_1x128_128x128, (qdy, sdy, qwt, swt)),
             (gemm_1x128_1x128, (qt_dy, st_dy.t(), qt_x, st_x.t()))]
    checked = [fn(*args) for fn, args in calls]

    def refuse(*args):
        raise AssertionError("a check ran")
    for name in ("_check_operand", "_check_shapes", "_check_mn_major", "_check_blocks"):
        monkeypatch.setattr(gemm, name, refuse)
    with pytest.raises(AssertionError, match="a check ran"):
        gemm_1x128_128x128(qx, sx, qw, sw)
    for (fn, args), want in zip(calls, checked):
        assert torch.equal(fn(*args, check=False), want)


def test_unsupported_shapes():
    qa, sa = quant.quantize_1x128(_rand((8, 200), 9))
    qb, sb = quant.quantize_128x128(_rand((128, 200), 10))
    with pytest.raises(ValueError, match="multiple of 128"):
        gemm_1x128_128x128(qa, sa, qb, sb)
    qa, sa = quant.quantize_1x128(_rand((8, 128), 11))
    qb, sb = quant.quantize_128x128(_rand((40, 128), 12))
    with pytest.raises(ValueError, match="multiple of 16"):
        gemm_1x128_128x128(qa, sa, qb, sb)


def test_alignment_padding_is_exact():
    """The zero padding the cuBLAS path applies (M to a multiple of 4, K/128 to a multiple of 4)
    leaves the product unchanged: checked with the reference GEMM on both."""
    x, w = _rand((7, 384), 14), _rand((256, 384), 15)
    qx, sx = quant.quantize_1x128(x)
    qw, sw = quant.quantize_128x128(w)
    want = R.gemm_1x128_128x128(qx, sx, qw, sw)
    a, sa, b, sb = _pad_k4(qx, sx, qw, sw, b_blocks=True)
    assert a.shape == (7, 512) and b.shape == (256, 512) and sa.stride() == (1, 7)
    a, sa = _pad_rows4(a, sa)
    assert a.shape == (8, 512) and sa.stride() == (1, 8)
    got = R.gemm_1x128_128x128(a, sa, b, sb)
    torch.testing.assert_close(got[:7], want, atol=1e-4, rtol=1e-5)  # fp32 sums, other order
    assert not bool(got[7].any())
    dy, x = _rand((130, 256), 16), _rand((130, 384), 17)  # Wgrad: K = 256 padded tokens
    *_, qt_dy, st_dy = quant.quantize_dual(dy)
    *_, qt_x, st_x = quant.quantize_dual(x)
    want = R.gemm_1x128_1x128(qt_dy, st_dy.t(), qt_x, st_x.t())
    a, sa, b, sb = _pad_k4(qt_dy, st_dy.t(), qt_x, st_x.t(), b_blocks=False)
    assert a.shape == (256, 512) and sa.stride() == (1, 256) and sb.stride() == (1, 384)
    torch.testing.assert_close(R.gemm_1x128_1x128(a, sa, b, sb), want, atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 3, 130, 4097, 8192])
@pytest.mark.parametrize("N,K", [(2048, 7168), (7168, 2048), (4096, 4096), (1536, 7168), (640, 384)])
def test_gpu_three_gemms(T, N, K):
    _fprop(T, N, K, pow2=False)
    _fprop(T, N, K, pow2=True, out_dtype=torch.float32)
    _dgrad(T, N, K, pow2=False)
    _wgrad(T, N, K, pow2=T % 2 == 0)


def test_empty_tokens():
    """No tokens: Fprop/Dgrad of zero rows (scales [0, Kb], whose strides carry no layout) and a
    Wgrad that reduces over zero tokens (exactly zero), on the reference (CPU) or cuBLAS path."""
    qa, sa, qta, sta = quant.quantize_dual(torch.empty(0, 256, dtype=torch.bfloat16, device=DEVICE))
    qb, sb = quant.quantize_128x128(_rand((384, 256), 13))
    y = gemm_1x128_128x128(qa, sa, qb, sb)
    assert y.shape == (0, 384) and y.device.type == qa.device.type
    qtd, std_ = quant.quantize_dual(torch.empty(0, 384, dtype=torch.bfloat16, device=DEVICE))[2:]
    dw = gemm_1x128_1x128(qtd, std_.t(), qta, sta.t())
    assert dw.shape == (384, 256) and not bool(dw.any())


@pytest.mark.gpu
def test_gpu_empty_tokens():
    test_empty_tokens()
