"""Properties of the pure-torch FP8 reference (models/fp8/reference.py), checked against
independent computations: per-tile loops, float64 triple sums, e4m3 error bounds."""
import pytest
import torch

from models.fp8 import reference as R

TILINGS = [  # (quantize, dequantize, tile rows, tile cols)
    (R.quantize_1x128, R.dequantize_1x128, 1, 128),
    (R.quantize_128x1, R.dequantize_128x1, 128, 1),
    (R.quantize_128x128, R.dequantize_128x128, 128, 128),
]
SHAPES = [(1, 128), (3, 200), (130, 260), (256, 384)]


def _rand(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g) * 2)
    return x.to(dtype)


@pytest.mark.parametrize("tiling", TILINGS, ids=["1x128", "128x1", "128x128"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pow2", [False, True])
def test_round_trip_within_e4m3_bound(tiling, shape, pow2):
    quant, dequant, tr, tc = tiling
    x = _rand(shape, seed=shape[0] * 7 + shape[1])
    q, s = quant(x, pow2)
    assert q.dtype == R.E4M3 and q.shape == x.shape
    assert s.shape == (R.ceil_div(shape[0], tr), R.ceil_div(shape[1], tc)) and s.dtype == torch.float32
    s_full = s.repeat_interleave(tr, 0).repeat_interleave(tc, 1)[: shape[0], : shape[1]]
    err = (dequant(q, s) - x).abs()
    # 3 mantissa bits: half an ulp is <= |x| 2^-4 for normals; subnormal step is s 2^-9
    bound = torch.maximum(x.abs() * 2.0 ** -4, s_full * 2.0 ** -10) * (1 + 1e-6)
    assert bool((err <= bound).all()), float((err / bound).max())


@pytest.mark.parametrize("pow2", [False, True])
def test_scales_match_per_tile_amax(pow2):
    x = _rand((260, 300), seed=1)
    _, s = R.quantize_1x128(x, pow2)
    for r in (0, 129, 259):
        for c in range(3):
            tile = x[r, c * 128:(c + 1) * 128]
            exact = tile.abs().max().item() / 448.0
            got = s[r, c].item()
            if pow2:
                m, _ = torch.frexp(torch.tensor(got))
                assert m.item() == 0.5, "a power-of-two scale has mantissa exactly 0.5 in frexp"
                assert exact <= got < 2 * exact * (1 + 1e-6)
            else:
                assert got == pytest.approx(exact, rel=1e-6)


def test_tile_max_maps_to_448():
    x = _rand((5, 256), seed=2)
    q, _ = R.quantize_1x128(x)
    assert torch.equal(q.float().abs().view(5, 2, 128).amax(-1), torch.full((5, 2), 448.0))


@pytest.mark.parametrize("tiling", TILINGS, ids=["1x128", "128x1", "128x128"])
def test_zero_tiles_are_exact(tiling):
    quant, dequant, tr, tc = tiling
    x = _rand((256, 256), seed=3)
    x[:128, :128] = 0
    q, s = quant(x)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert torch.equal(dequant(q, s)[:128, :128], torch.zeros(128, 128))
    q0, s0 = quant(torch.zeros(3, 5))
    assert torch.equal(dequant(q0, s0), torch.zeros(3, 5))


def test_pow2_scales_are_exact_under_transposition():
    """Re-tiling a 1x128-quantized tensor as 128x1 (DeepSeek's backward transpose) adds no error
    with power-of-two scales wherever the value stays an e4m3 normal; arbitrary scales do add error."""
    x = _rand((256, 256), seed=4)
    for pow2 in (True, False):
        d1 = R.dequantize_1x128(*R.quantize_1x128(x, pow2))
        q2, s2 = R.quantize_128x1(d1, pow2)
        d2 = R.dequantize_128x1(q2, s2)
        normal = (d1 / s2.repeat_interleave(128, 0)).abs() >= 2.0 ** -6
        if pow2:
            assert torch.equal(d2[normal], d1[normal])
        else:
            assert not torch.equal(d2[normal], d1[normal])
    w = _rand((256, 384), seed=5)
    q, s = R.quantize_128x128(w, True)
    qt, st = R.quantize_128x128(w.t().contiguous(), True)
    assert torch.equal(qt.view(torch.uint8), q.t().contiguous().view(torch.uint8))
    assert torch.equal(st, s.t())


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("quant", [R.quantize_1x128, R.quantize_128x1, R.quantize_128x128])
def test_non_finite_input_raises(bad, quant):
    x = _rand((130, 256), seed=6)
    x[129, 3] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        quant(x)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="2-D"):
        R.quantize_1x128(torch.randn(2, 3, 128))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        R.quantize_1x128(torch.ones(2, 128, dtype=torch.int32))
    q, s = R.quantize_1x128(torch.randn(4, 256))
    with pytest.raises(ValueError, match="scales"):
        R.dequantize_1x128(q, s.t())
    with pytest.raises(ValueError, match="same K"):
        R.gemm_1x128_1x128(q, s, q[:, :128], s[:, :1])


def test_bf16_input_matches_fp32_of_same_values():
    x = _rand((64, 384), seed=7, dtype=torch.bfloat16)
    a, b = R.quantize_1x128(x), R.quantize_1x128(x.float())
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def test_calc_diff_values():
    x = torch.randn(100, dtype=torch.float64)
    assert R.calc_diff(x, x) == pytest.approx(0.0, abs=1e-15)
    assert R.calc_diff(x, -x) == pytest.approx(2.0)
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0])
    assert R.calc_diff(a, b) == pytest.approx(1 - 2 * 7 / (1 + 4 + 1 + 9))
    assert R.calc_diff(torch.zeros(3), torch.zeros(3)) == 0.0


def _random_fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38  # drop the NaN codes
    return codes.view(R.E4M3)


def _loop_gemm(a, sa, tile_a, b, sb, tile_b):
    """float64 sum over k of a[m,k] sa[...] b[n,k] sb[...], scales looked up element by element."""
    M, K = a.shape
    N = b.shape[0]
    af, bf = a.double(), b.double()
    sa_full = torch.stack([sa[m // tile_a[0]].double()[torch.arange(K) // 128] for m in range(M)])
    sb_full = torch.stack([sb[n // tile_b[0]].double()[torch.arange(K) // tile_b[1]] for n in range(N)])
    return (af * sa_full) @ (bf * sb_full).t()


@pytest.mark.parametrize("M,N,K", [(3, 128, 256), (130, 200, 384), (1, 256, 128)])
def test_reference_gemms_against_float64_loops(M, N, K):
    g = torch.Generator().manual_seed(M + N + K)
    a, b = _random_fp8((M, K), 1), _random_fp8((N, K), 2)
    sa = torch.exp2(torch.randint(-8, 4, (M, K // 128), generator=g).float())
    sb_blk = torch.exp2(torch.randint(-8, 4, (R.ceil_div(N, 128), K // 128), generator=g).float())
    sb_row = torch.exp2(torch.randint(-8, 4, (N, K // 128), generator=g).float())
    want = _loop_gemm(a, sa, (1, 128), b, sb_blk, (128, 128))
    assert R.calc_diff(R.gemm_1x128_128x128(a, sa, b, sb_blk), want) < 1e-12
    want = _loop_gemm(a, sa, (1, 128), b, sb_row, (1, 128))
    assert R.calc_diff(R.gemm_1x128_1x128(a, sa, b, sb_row), want) < 1e-12
