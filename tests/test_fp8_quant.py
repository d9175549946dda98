"""Triton quantization kernels (models/fp8/quant.py) against the pure-torch reference: bitwise on
identical input. CPU runs the kernels under TRITON_INTERPRET=1 on small shapes; the `gpu` tests run
the compiled kernels at real shapes."""
import math
import os
import threading
import time

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest
import torch

from models.fp8 import norm_cuda, quant
from models.fp8 import reference as R

CPU_SHAPES = [(1, 128), (3, 200), (130, 260)]
GPU_SHAPES = [(1, 7168), (4097, 2048), (2048, 7168), (16384, 1536)]  # CPU references: keep them small
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rand(shape, seed, dtype=torch.bfloat16, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[0], 1, generator=g))
    return x.to(dtype).to(device)


def _bits(q):
    return q.view(torch.uint8)


def _same(a, b):
    return a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def _check_row(q, s, x, pow2):
    rq, rs = R.quantize_1x128(x.cpu(), pow2)
    assert s.stride() == (1, x.shape[0]) or x.shape[0] == 1, "scales must be MN-major"
    assert _same(_bits(q), _bits(rq)) and _same(s, rs)


def _check_col(qt, st, x, pow2):
    M = x.shape[0]
    cq, cs = R.quantize_128x1(x.cpu(), pow2)
    assert qt.shape == (x.shape[1], R.ceil_div(M, 128) * 128) and qt.is_contiguous()
    assert _same(_bits(qt[:, :M]), _bits(cq.t()))
    assert not bool(qt[:, M:].float().any()), "token padding must be zeros"
    assert _same(st, cs)


def _quant_1x128(shape, dtype, pow2, tiling=None):
    x = _rand(shape, shape[0] + shape[1], dtype)
    _check_row(*quant.quantize_1x128(x, pow2, tiling=tiling), x, pow2)


def _quant_dual(shape, dtype, pow2, tiling=None):
    x = _rand(shape, shape[0] * 3 + shape[1], dtype)
    q, s, qt, st = quant.quantize_dual(x, pow2, tiling=tiling)
    _check_row(q, s, x, pow2)
    _check_col(qt, st, x, pow2)


def _quant_weight(shape, pow2, dtype=torch.bfloat16, tiling=None):
    w = _rand(shape, 11, dtype)
    q, s, qt, st = quant.quantize_128x128(w, pow2, transpose=True, tiling=tiling)
    rq, rs = R.quantize_128x128(w.cpu(), pow2)
    assert _same(_bits(q), _bits(rq)) and _same(s, rs)
    assert _same(_bits(qt), _bits(rq.t().contiguous())) and _same(st, rs.t().contiguous())


@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_1x128_bitwise(shape, dtype, pow2):
    _quant_1x128(shape, dtype, pow2)


@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_dual_bitwise(shape, pow2):
    _quant_dual(shape, torch.bfloat16, pow2)


@pytest.mark.parametrize("shape", [(128, 128), (300, 260)])
@pytest.mark.parametrize("pow2,dtype", [(False, torch.bfloat16), (True, torch.bfloat16),
                                        (False, torch.float32)])
def test_quantize_128x128_bitwise(shape, pow2, dtype):
    _quant_weight(shape, pow2, dtype)


def test_quantize_128x128_stacked_experts():
    w = _rand((3 * 256, 200), 12).view(3, 256, 200)
    q, s, qt, st = quant.quantize_128x128(w, transpose=True)
    for e in range(3):
        rq, rs = R.quantize_128x128(w[e].cpu())
        assert _same(_bits(q[e]), _bits(rq)) and _same(s[e], rs)
        assert _same(_bits(qt[e]), _bits(rq.t().contiguous())) and _same(st[e], rs.t().contiguous())
    with pytest.raises(ValueError, match="straddle"):
        quant.quantize_128x128(_rand((2 * 100, 128), 1).view(2, 100, 128))


def _quant_joined(shapes, pow2):
    parts = [_rand((math.prod(shape[:-1]), shape[-1]), 20 + i).view(shape)
             for i, shape in enumerate(shapes)]
    got = quant.quantize_128x128(parts, pow2, transpose=True)
    joined = torch.cat(parts, dim=-2).cpu()
    for e, w in enumerate(joined if joined.dim() == 3 else [joined]):
        rq, rs = R.quantize_128x128(w, pow2)
        q, s, qt, st = (t[e] if joined.dim() == 3 else t for t in got)
        assert _same(_bits(q), _bits(rq)) and _same(s, rs)
        assert _same(_bits(qt), _bits(rq.t().contiguous())) and _same(st, rs.t().contiguous())
    q, s = quant.quantize_128x128(tuple(parts), pow2)  # no transpose: (q, s) only
    assert _same(_bits(q), _bits(got[0])) and _same(s, got[1])


@pytest.mark.parametrize("shapes,pow2", [([(2, 128, 200), (2, 256, 200)], False),
                                         ([(256, 130), (128, 130), (70, 130)], True)])
def test_quantize_128x128_joined_along_n(shapes, pow2):
    """Parts joined along N (FP8MLP's and the experts' gate|up) quantize into their rows of the
    joined outputs: bitwise the quantization of their torch.cat, which the reference gives
    (a ragged last part included)."""
    _quant_joined(shapes, pow2)


def test_quantize_128x128_join_refuses_what_it_cannot_join():
    w = _rand((256, 128), 1)
    with pytest.raises(ValueError, match="straddle two parts"):
        quant.quantize_128x128([w[:100], w[100:]])
    with pytest.raises(ValueError, match="same E, K, dtype"):
        quant.quantize_128x128([w, _rand((128, 256), 2)])
    with pytest.raises(ValueError, match="same E, K, dtype"):
        quant.quantize_128x128([w, w.float()])
    with pytest.raises(ValueError, match="empty sequence"):
        quant.quantize_128x128([])


def test_cast_rounds_to_nearest_even():
    """A tile whose amax is 448 has scale 1: the kernel's cast must equal torch's on every e4m3
    value and every midpoint between two (the ties)."""
    vals = torch.arange(256, dtype=torch.uint8).view(R.E4M3).float()
    vals = vals[torch.isfinite(vals)].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    x = torch.cat([vals, mids])
    x = torch.cat([x, torch.zeros(-len(x) % 128)]).view(-1, 128).to(DEVICE)
    x[:, 0] = 448.0
    q, s = quant.quantize_1x128(x)
    assert bool((s == 1.0).all())
    assert _same(_bits(q), _bits(x.cpu().to(R.E4M3)))


def test_cast_saturates():
    """Tiles whose amax times the rounded reciprocal of its scale exceeds 448 in fp32: the
    reference clamps before the cast; the GPU leaves that to the conversion's satfinite. Every
    tiling class must give +-448 there, in both orientations."""
    g = torch.Generator().manual_seed(71)
    amax = torch.rand(4096, generator=g) * 1000 + 1
    over = amax[amax * (1.0 / (amax / R.FP8_MAX)) > R.FP8_MAX][:128]
    assert len(over) == 128
    x = torch.randn(128, 128, generator=g).clamp(-1, 1) * over[:, None] / 2
    x[:, 0] = -over  # row r's amax: over[r], at column 0
    xt = x.t().contiguous()  # the same for the columns of x.t()
    x, xt = x.to(DEVICE), xt.to(DEVICE)
    for tiling in (quant.Tiling(), quant.Tiling(compact_scales=True)):
        q, s, qt, st = quant.quantize_dual(x, tiling=tiling)
        _check_row(q, s, x, False)
        _check_col(qt, st, x, False)
        assert bool((q.view(torch.uint8)[:, 0] == 0xFE).all())
        q, s, qt, st = quant.quantize_dual(xt, tiling=tiling)
        _check_col(qt, st, xt, False)
        assert bool((qt.view(torch.uint8)[:, 0] == 0xFE).all())


def _swiglu(shape, pow2, colwise, tiling=None):
    M, F = shape
    h = _rand((M, 2 * F), 21)  # a fused up-projection output: gate and up are column slices
    gate, up = h[:, :F], h[:, F:]
    hp = torch.empty(M, F, device=DEVICE)
    out = quant.swiglu_quantize(gate, up, pow2, colwise=colwise, hp_out=hp, tiling=tiling)
    want = torch.nn.functional.silu(gate.float()) * up.float()
    torch.testing.assert_close(hp, want, atol=1e-5, rtol=1e-5)
    _check_row(out[0], out[1], hp, pow2)
    if colwise:
        _check_col(out[2], out[3], hp, pow2)
    if F % 128 == 0:  # with the inputs' own 1x128 copy (what an FP8 SwiGLU saves for backward)
        both = quant.swiglu_quantize(gate, up, pow2, colwise=colwise, tiling=tiling,
                                     input_copy=True)
        assert len(both) == len(out) + 2
        assert all(_same(_bits(a) if a.dtype == R.E4M3 else a, _bits(b) if b.dtype == R.E4M3 else b)
                   for a, b in zip(both, out)), "the SwiGLU's own copies must not change"
        _check_row(both[-2], both[-1], h, pow2)


def _rmsnorm(shape, pow2, colwise, tiling=None):
    """rstd against torch; y (hp_out, fp32) against torch; the copies bitwise against the
    reference quantization of that y. Then the same call with a bf16 hp_out: the copies are the
    same bits, hp_out is y rounded to bf16 (y recomputed from the returned rstd: bitwise)."""
    x = _rand(shape, 31)
    w = (1 + 0.1 * torch.randn(shape[1])).to(torch.bfloat16).to(DEVICE)
    hp = torch.empty(shape, device=DEVICE)
    out = quant.rmsnorm_quantize(x, w, 1e-6, pow2, colwise=colwise, hp_out=hp, tiling=tiling)
    rstd_want = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    torch.testing.assert_close(out[-1], rstd_want, atol=0, rtol=1e-5)
    torch.testing.assert_close(hp, x.float() * rstd_want[:, None] * w.float(), atol=1e-5, rtol=1e-5)
    _check_row(out[0], out[1], hp, pow2)
    if colwise:
        _check_col(out[2], out[3], hp, pow2)
    hp16 = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE)
    out16 = quant.rmsnorm_quantize(x, w, 1e-6, pow2, colwise=colwise, hp_out=hp16, tiling=tiling)
    assert all(_same(a.view(torch.uint8) if a.dtype == R.E4M3 else a,
                     b.view(torch.uint8) if b.dtype == R.E4M3 else b) for a, b in zip(out, out16))
    y = x.float() * out16[-1][:, None] * w.float()
    assert _same(hp16, y.to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(3, 128), (130, 256)])
@pytest.mark.parametrize("pow2,colwise", [(False, True), (True, True), (False, False)])
def test_swiglu_quantize(shape, pow2, colwise):
    _swiglu(shape, pow2, colwise)


@pytest.mark.parametrize("shape", [(3, 128), (130, 200)])
@pytest.mark.parametrize("pow2,colwise", [(False, True), (True, False)])
def test_rmsnorm_quantize(shape, pow2, colwise):
    _rmsnorm(shape, pow2, colwise)


# Every class of launch a Tiling selects (a Tiling never changes a result): several tiles per
# program, with and without prefetching the next one, a partial last group (K = 5 tiles here), row
# blocks of the row-wise kernel, the fused rmsnorm with the shortest and the longest lag and the
# two-pass form, the weight kernel's two transposed casts.
TILE_VARIANTS = [quant.Tiling(tiles=2), quant.Tiling(tiles=3, prefetch=True, compact_scales=True),
                 quant.Tiling(warps=4, stages=2, tiles=4, prefetch=True)]
ROW_VARIANTS = [quant.Tiling(warps=4, block_m=32, tiles=2, compact_scales=True),
                quant.Tiling(block_m=128, prefetch=True, tiles=3)]
NORM_VARIANTS = [quant.Tiling(warps=16, lag=1, compact_scales=True, persistent=True),
                 quant.Tiling(lag=10 ** 6, tiles=3),
                 quant.Tiling(fused=False, warps=4, tiles=2, prefetch=True, compact_scales=True)]
WEIGHT_VARIANTS = [quant.Tiling(hw_transpose=False), quant.Tiling(warps=4, tiles=4)]


@pytest.mark.parametrize("tiling", TILE_VARIANTS)
def test_tile_variants_bitwise(tiling):
    _quant_dual((130, 520), torch.bfloat16, False, tiling)
    _swiglu((3, 640), True, True, tiling)


@pytest.mark.parametrize("tiling", ROW_VARIANTS)
def test_rowwise_variants_bitwise(tiling):
    _quant_1x128((130, 520), torch.float32, True, tiling)
    _swiglu((67, 384), False, False, tiling)


@pytest.mark.parametrize("tiling", NORM_VARIANTS)
def test_rmsnorm_variants(tiling):
    _rmsnorm((300, 520), False, True, tiling)
    _rmsnorm((5, 128), True, False, tiling)


@pytest.mark.parametrize("tiling", WEIGHT_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_variants_bitwise(tiling, dtype):
    _quant_weight((300, 650), False, dtype, tiling)


def test_bad_tiling():
    with pytest.raises(ValueError, match="warps"):
        quant.Tiling(warps=3)
    with pytest.raises(ValueError, match="block_m"):
        quant.Tiling(block_m=100)
    with pytest.raises(ValueError, match="tiles"):
        quant.Tiling(tiles=0)
    with pytest.raises(ValueError, match="maxnreg"):
        quant.Tiling(maxnreg=8)
    with pytest.raises(TypeError, match="Tiling"):
        quant.quantize_dual(_rand((4, 128), 1), tiling={"warps": 4})


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_input(bad):
    x = _rand((130, 256), 41)
    x[129, 200] = bad
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize_dual(x)
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize_1x128(x)
    q, s, qt, st = quant.quantize_dual(x, check_finite=False)
    s, st = s.cpu(), st.cpu()
    assert bool(s[129, 1].isnan()) and bool(torch.isfinite(s[:129]).all()) and bool(torch.isfinite(s[129, 0]))
    assert bool(st[1, 200].isnan()) and int(torch.isnan(st).sum()) == 1
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.quantize_128x128(x)


def test_bad_input():
    x = _rand((4, 256), 51)
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_1x128(x.view(2, 2, 256))
    with pytest.raises(TypeError, match="bfloat16"):
        quant.quantize_dual(x.to(torch.int32))
    with pytest.raises(ValueError, match="unit column stride"):
        quant.quantize_dual(_rand((256, 4), 52).t())
    with pytest.raises(ValueError, match="same shape"):
        quant.swiglu_quantize(x, x[:, :128])
    with pytest.raises(ValueError, match="weight_K"):
        quant.rmsnorm_quantize(x, torch.ones(128, device=DEVICE))
    with pytest.raises(ValueError, match="hp_out"):
        quant.swiglu_quantize(x, x, hp_out=torch.empty(4, 256, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="multiple of 128"):
        quant.swiglu_quantize(x[:, :200], x[:, 56:], input_copy=True)
    with pytest.raises(ValueError, match="non-contiguous"):
        quant.rmsnorm_quantize(x, torch.ones(256, device=DEVICE),
                               hp_out=torch.empty(256, 4, device=DEVICE).t())


def _gathered(shape, rows_count, seed, pow2, tiling=None):
    """quantize_1x128 / quantize_dual with rows=idx against the same on x[idx]: bitwise (the
    kernel reads the same values in the same order), for an index with repeats and any order."""
    x = _rand(shape, seed)
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.randint(0, shape[0], (rows_count,), generator=g).to(DEVICE)
    for fn in (quant.quantize_1x128, quant.quantize_dual):
        got = fn(x, pow2, tiling=tiling, rows=idx)
        want = fn(x[idx], pow2, tiling=tiling)
        assert len(got) == len(want) and all(
            _same(_bits(a) if a.dtype == torch.float8_e4m3fn else a,
                  _bits(b) if b.dtype == torch.float8_e4m3fn else b) for a, b in zip(got, want))


@pytest.mark.parametrize("shape,rows_count,pow2", [((70, 256), 200, False), ((5, 130), 3, True)])
def test_gathered_rows_bitwise(shape, rows_count, pow2):
    _gathered(shape, rows_count, 61, pow2)


def test_gathered_rows_bad_index():
    x = _rand((4, 256), 62)
    with pytest.raises(TypeError, match="rows must be a 1-D int32/int64"):
        quant.quantize_dual(x, rows=torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="rows must be a 1-D"):
        quant.quantize_dual(x, rows=torch.zeros(2, 2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(RuntimeError, match="outside x_MK's rows"):
        quant.quantize_dual(x, rows=torch.tensor([0, 4], device=DEVICE))
        torch.cuda.synchronize() if DEVICE == "cuda" else None
    q, s, qt, st = quant.quantize_dual(x, rows=torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert q.shape == (0, 256) and qt.shape == (256, 0)


def test_empty_input():
    q, s, qt, st = quant.quantize_dual(torch.empty(0, 256, dtype=torch.bfloat16, device=DEVICE))
    assert q.shape == (0, 256) and s.shape == (0, 2) and qt.shape == (256, 0) and st.shape == (0, 256)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("pow2", [False, True])
def test_gpu_real_shapes(shape, pow2):
    _quant_1x128(shape, torch.bfloat16, pow2)
    _quant_dual(shape, torch.bfloat16, pow2)
    _quant_dual(shape, torch.float32, pow2)
    _swiglu((shape[0], 2048), pow2, True)
    _rmsnorm(shape, pow2, True)


@pytest.mark.gpu
def test_gpu_gathered_rows():
    """The default launches reading rows through an index (MoE's dispatch), compiled, at a real
    shape: 5000 rows gathered from 4097 with repeats."""
    _gathered((4097, 2048), 5000, 63, False)
    _gathered((4097, 7168), 300, 64, True)


@pytest.mark.gpu
def test_gpu_variants(shape=(4097, 2048)):
    """Every class of launch the sweep (scripts/sweep_quant.py) can pick, compiled, at a real shape
    (ragged M; K = 16 tiles, so tiles=3 leaves a partial group)."""
    for tiling in TILE_VARIANTS + [quant.Tiling(warps=16, tiles=4, prefetch=True),
                                   quant.Tiling(warps=16, compact_scales=True),
                                   quant.Tiling(maxnreg=128, compact_scales=True, tiles=2, prefetch=True)]:
        _quant_dual(shape, torch.bfloat16, False, tiling)
        _swiglu((shape[0], 1536), True, True, tiling)
    for tiling in ROW_VARIANTS + [quant.Tiling(warps=4, block_m=64, compact_scales=True)]:
        _quant_1x128(shape, torch.bfloat16, False, tiling)
        _swiglu((shape[0], 1536), False, False, tiling)
    for tiling in NORM_VARIANTS + [quant.Tiling(warps=8, ctas_per_sm=2, tiles=8, lag=1,
                                                persistent=True),
                                   quant.Tiling(warps=4, tiles=8, lag=1, compact_scales=True)]:
        _rmsnorm(shape, False, True, tiling)
        _rmsnorm(shape, True, False, tiling)
    for tiling in WEIGHT_VARIANTS:
        _quant_weight(shape, False, torch.bfloat16, tiling)
        _quant_weight(shape, False, torch.float32, tiling)


@pytest.mark.gpu
def test_gpu_rmsnorm_fused_at_scale():
    """The persistent rmsnorm kernel with every SM busy (thousands of items, spinning quant items):
    three runs bitwise equal (rstd's partial sums are added in a fixed order, whoever finishes
    last), and the copies bitwise the reference quantization of the normalized value it wrote,
    on 128-row blocks from the start, the middle and the end. (The reference runs on the CPU:
    on CUDA, PyTorch divides by a Python scalar as a multiplication by its reciprocal, which is
    not the correctly rounded amax / 448.)"""
    M, K = 16384, 7168
    x = _rand((M, K), 61)
    w = (1 + 0.1 * torch.randn(K)).to(torch.bfloat16).to(DEVICE)
    hp = torch.empty(M, K, device=DEVICE)
    runs = [quant.rmsnorm_quantize(x, w, hp_out=hp if i == 0 else None) for i in range(3)]
    for out in runs[1:]:
        assert all(torch.equal(a.view(torch.uint8) if a.dtype == R.E4M3 else a,
                               b.view(torch.uint8) if b.dtype == R.E4M3 else b)
                   for a, b in zip(runs[0], out))
    q, s, qt, st, rstd = runs[0]
    rstd_want = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
    torch.testing.assert_close(rstd, rstd_want, atol=0, rtol=1e-5)
    torch.testing.assert_close(hp, x.float() * rstd_want[:, None] * w.float(), atol=1e-5, rtol=1e-5)
    for block in (0, 1, M // 256, M // 128 - 1):
        rows = slice(block * 128, block * 128 + 128)
        rq, rs = R.quantize_1x128(hp[rows].cpu())
        cq, cs = R.quantize_128x1(hp[rows].cpu())
        assert _same(_bits(q[rows]), _bits(rq)) and _same(s[rows], rs)
        assert _same(_bits(qt[:, rows]), _bits(cq.t())) and _same(st[block:block + 1], cs)


def test_cuda_rmsnorm_plan():
    """How the CUDA rmsnorm kernel splits a row block's column tiles over a cluster's CTAs (7
    tiles fit an H100 CTA): the fewest power-of-two CTAs by default, or the cluster asked for."""
    assert norm_cuda.plan(56, 7) == (8, 7)    # K = 7168
    assert norm_cuda.plan(32, 7) == (8, 4)    # K = 4096
    assert norm_cuda.plan(16, 7) == (4, 4)
    assert norm_cuda.plan(5, 7) == (1, 5)
    assert norm_cuda.plan(112, 7) == (16, 7)  # K = 14336, the largest
    assert norm_cuda.plan(113, 7) is None
    assert norm_cuda.plan(56, 7, cluster=16) == (16, 4)
    assert norm_cuda.plan(56, 7, cluster=4) is None  # 14 tiles per CTA do not fit
    assert norm_cuda.plan(3, 7, cluster=8) == (8, 1)  # CTAs 3..7 only take part in the exchange
    with pytest.raises(ValueError, match="cluster"):
        quant.Tiling(cluster=3)


def test_cuda_rmsnorm_compiles_for_sm90a(built_csrc):
    """csrc/fp8_norm builds with nvcc on any machine with the toolkit (no GPU needed), both
    instances of the kernel (holding a tile in registers or not) keep everything in registers,
    and 7 tiles plus its scratch fit an H100 CTA's 227 KB."""
    lib, kernel = built_csrc("fp8_norm", "rmsnorm_quant_kernel")
    frames = [line for line in kernel.splitlines() if "bytes stack frame" in line]
    assert len(frames) == 2, kernel[:800]
    assert all("0 bytes stack frame, 0 bytes spill stores" in f for f in frames), kernel[:800]
    smem = norm_cuda.load_library(lib).fp8moe_rmsnorm_smem_bytes
    assert smem(7) <= 232448 < smem(8)


@pytest.mark.gpu
@pytest.mark.parametrize("shape,tiling", [
    ((4097, 7168), quant.Tiling(cuda=True)),                # ragged M, 8 CTAs x 7 tiles
    ((17000, 4096), quant.Tiling(cuda=True)),               # 8 x 4, 9 rounds, ragged
    ((20000, 3584), quant.Tiling(cuda=True)),               # 4 x 7, a tile held over ~6 rounds
    ((3000, 1792), quant.Tiling(cuda=True)),                # 2 x 7, held too
    ((300, 520), quant.Tiling(cuda=True)),                  # ragged K: a last tile of 8 columns
    ((1000, 1024), quant.Tiling(cuda=True, cluster=2)),     # 4 tiles per CTA
    ((129, 1024), quant.Tiling(cuda=True, cluster=16)),     # CTAs without tiles
    ((8192, 4096), quant.Tiling(cuda=True, cluster=16)),    # 2 tiles per CTA, 3 CTAs per SM
])
def test_gpu_rmsnorm_cuda(shape, tiling):
    """The CUDA cluster kernel (not Triton: checked) bitwise against the reference quantization
    of the value it normalized, with and without power-of-two scales and the 128x1 copy."""
    x = _rand(shape, 33)
    assert norm_cuda.available(x.device) and norm_cuda.fits(x, None, tiling.cluster)
    for pow2, colwise in [(False, True), (True, True), (False, False)]:
        _rmsnorm(shape, pow2, colwise, tiling)


@pytest.mark.gpu
def test_gpu_rmsnorm_cuda_streams():
    """Launches of the CUDA kernel back to back and on two streams at once write the same bits
    as the first launch of each input: the ticket counter its clusters take the leftover row
    blocks from (9000 rows: 71 blocks on 15 clusters, 11 left over) is each stream's own, and
    every launch leaves it zeroed for the next (one that did not would leave the next launch's
    leftover blocks unwritten)."""
    xs = [_rand((9000, 7168), 50 + n) for n in range(2)]  # 71 row blocks, 5 rounds
    w = (1 + 0.1 * torch.randn(7168)).to(torch.bfloat16).to(DEVICE)
    want = [quant.rmsnorm_quantize(x, w, check_finite=False) for x in xs]
    streams = [torch.cuda.Stream() for _ in xs]
    got = []
    for _ in range(8):
        for n, (x, stream) in enumerate(zip(xs, streams)):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                got.append((n, quant.rmsnorm_quantize(x, w, check_finite=False)))
    torch.cuda.synchronize()
    bits = lambda t: t.view(torch.uint8) if t.dtype == R.E4M3 else t
    for n, out in got:
        assert all(_same(bits(a), bits(b)) for a, b in zip(out, want[n]))
    if norm_cuda._library().resets_claims:
        slots = {norm_cuda.claims_counter(xs[0].device, s.cuda_stream) for s in streams}
        assert len(slots) == 2 and all(tensor is None for _, tensor in slots)


def test_rmsnorm_claim_slots(monkeypatch):
    """The CUDA norm's ticket counters: each (device, stream) keeps one slot of the library's,
    the same on every call; past the library's slots, during graph capture, or with a library
    whose launches do not zero it again, every launch gets a freshly zeroed counter."""
    class Library:
        resets_claims, claim_slots = True, 2
    lib = Library()
    monkeypatch.setattr(norm_cuda, "_library", lambda: lib)
    monkeypatch.setattr(norm_cuda, "_slot_address", lambda _, index, slot: 1000 * index + slot)
    monkeypatch.setattr(norm_cuda, "_STREAM_CLAIMS", {})
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cpu = torch.device("cpu", 3)
    got = [norm_cuda.claims_counter(cpu, stream) for stream in (11, 12, 11, 12)]
    assert got == [(3000, None), (3001, None), (3000, None), (3001, None)]
    address, fresh = norm_cuda.claims_counter(cpu, 13)  # past the two slots
    assert fresh is not None and fresh.tolist() == [0] and address == fresh.data_ptr()
    capturing[0] = True
    assert norm_cuda.claims_counter(cpu, 11)[1] is not None
    capturing[0], lib.resets_claims = False, False
    assert norm_cuda.claims_counter(cpu, 11)[1] is not None


def test_rmsnorm_claim_slots_threads(monkeypatch):
    """Streams first seen by several threads at once still get one slot each (the slot lookup
    releases the GIL, as its ctypes call does)."""
    class Library:
        resets_claims, claim_slots = True, 64
    monkeypatch.setattr(norm_cuda, "_library", lambda: Library())
    monkeypatch.setattr(norm_cuda, "_slot_address",
                        lambda _, index, slot: time.sleep(0.01) or 1000 * index + slot)
    monkeypatch.setattr(norm_cuda, "_STREAM_CLAIMS", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cpu, got = torch.device("cpu", 0), {}
    def first_call(stream):
        got[stream] = norm_cuda.claims_counter(cpu, stream)
    threads = [threading.Thread(target=first_call, args=(stream,)) for stream in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(address for address, _ in got.values()) == list(range(8))


@pytest.mark.gpu
def test_gpu_rmsnorm_cuda_graph():
    """Launches captured in a CUDA graph (each with its own ticket counter, zeroed by a node of
    the graph) and replayed, between eager launches on the capture stream, write the eager
    launches' bits."""
    xs = [_rand((9000, 7168), 60 + n) for n in range(2)]
    w = (1 + 0.1 * torch.randn(7168)).to(torch.bfloat16).to(DEVICE)
    want = [quant.rmsnorm_quantize(x, w, check_finite=False) for x in xs]
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        quant.rmsnorm_quantize(xs[0], w, check_finite=False)  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            outs = [quant.rmsnorm_quantize(x, w, check_finite=False) for x in xs]
    bits = lambda t: t.view(torch.uint8) if t.dtype == R.E4M3 else t
    for _ in range(3):
        with torch.cuda.stream(stream):
            for out in outs:
                for t in out:
                    bits(t).zero_()
            graph.replay()
            eager = quant.rmsnorm_quantize(xs[1], w, check_finite=False)
        torch.cuda.synchronize()
        for n, out in enumerate(outs):
            assert all(_same(bits(a), bits(b)) for a, b in zip(out, want[n]))
        assert all(_same(bits(a), bits(b)) for a, b in zip(eager, want[1]))


@pytest.mark.gpu
def test_gpu_rmsnorm_takes_the_cuda_path(monkeypatch):
    """On an sm90 GPU the default launch runs the CUDA kernel; fp32 weights too (read as they
    are). Input it does not take (fp32 x; K not a multiple of 8) and cuda=False run Triton."""
    calls = []
    real = norm_cuda.rmsnorm_quantize
    monkeypatch.setattr(norm_cuda, "rmsnorm_quantize",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.cuda.get_device_capability() == (9, 0), "these GPU tests expect a Hopper GPU"
    _rmsnorm((2048, 7168), False, True)
    assert calls == [1, 1], "with an fp32 and with a bf16 hp_out"
    x, w = _rand((256, 2048), 34), torch.rand(2048, device=DEVICE) + 0.5
    q, s, qt, st, rstd = quant.rmsnorm_quantize(x, w)
    ref = quant.rmsnorm_quantize(x, w, tiling=quant.Tiling(warps=4, compact_scales=True))
    assert len(calls) == 3 and torch.allclose(rstd, ref[-1], atol=0, rtol=1e-6)
    _rmsnorm((256, 260), False, True)
    x32 = _rand((256, 1024), 35, torch.float32)
    quant.rmsnorm_quantize(x32, torch.ones(1024, device=DEVICE))
    _rmsnorm((256, 1024), False, True, quant.Tiling())
    assert len(calls) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_gpu_rmsnorm_cuda_non_finite(bad):
    """inf in x makes its row's rstd 0 and its own y NaN (inf * 0); NaN makes the whole row NaN.
    Either way the scales of the tiles holding NaN are NaN, so check_finite raises."""
    x = _rand((300, 1024), 42)
    x[129, 200] = bad
    w = torch.ones(1024, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="inf or NaN"):
        quant.rmsnorm_quantize(x, w)
    q, s, qt, st, rstd = quant.rmsnorm_quantize(x, w, check_finite=False)
    s, st = s.cpu(), st.cpu()
    if bad == float("inf"):
        assert float(rstd[129]) == 0.0
        assert bool(s[129, 1].isnan()) and int(s.isnan().sum()) == 1
        assert bool(st[1, 200].isnan()) and int(st.isnan().sum()) == 1
    else:
        assert bool(s[129].isnan().all()) and int(s.isnan().sum()) == s.shape[1]
        assert bool(st[1].isnan().all()) and int(st.isnan().sum()) == st.shape[1]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(7168, 2048), (2048, 7168), (576, 7168)])
def test_gpu_weights(shape):
    """Both orientations bitwise, from bf16 and from fp32 weights (the master weights of training
    are fp32: run 1 on the H100 found the fp32 transposed copy corrupted, NaN in every Dgrad)."""
    for dtype in (torch.bfloat16, torch.float32):
        _quant_weight(shape, False, dtype)
        _quant_weight(shape, True, dtype)


@pytest.mark.gpu
def test_gpu_weights_joined():
    """gate|up joined at the `small` model's expert and dense MLP shapes."""
    _quant_joined([(4, 1536, 4096)] * 2, False)
    _quant_joined([(10240, 4096)] * 2, True)


@pytest.mark.gpu
def test_gpu_cast_and_non_finite():
    """The hardware e4m3 conversion (not the interpreter's integer rounding) and the NaN-scale
    propagation of the compiled kernels."""
    test_cast_rounds_to_nearest_even()
    test_cast_saturates()
    test_non_finite_input(float("inf"))
    test_non_finite_input(float("nan"))


_COMPILE_SM90 = r'''
import json, os, re
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from models.fp8 import quant

def cast_stored_and_shuffled(ttgir):
    # Names of hardware-cast fp8 values that are stored as they are AND layout-converted
    # (through shared memory) for a second store: the pattern ptxas 12.x miscompiles
    # (triton-lang/triton#11111: the converted copy gets foreign bytes, NaN in e4m3).
    casts = re.findall(r"(%[\w.]+) = tt.fp_to_fp", ttgir)
    return [c for c in casts if re.search(rf"tt.store %[\w.]+, {re.escape(c)}[ ,]", ttgir)
            and re.search(rf"ttg.convert_layout {re.escape(c)} : tensor<\w+xf8E4M3FN", ttgir)]

def build(fn, sig, consts, warps, hw_casts=None):
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)  # what the JIT infers
             if sig[n] != "constexpr" and n not in ("eps", "lag")}        # for aligned tensors
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    ptx = k.asm["ptx"]
    cvts = ptx.count("cvt.rn.satfinite.e4m3x2.f32")
    return dict(hw_cast=cvts > 0, vector_loads="ld.global.v4" in ptx,
                cast_stored_and_shuffled=cast_stored_and_shuffled(k.asm["ttgir"]),
                casts_kept_apart=hw_casts is None or cvts == hw_casts)

p = lambda n: "*" + n
out = {}
for dt in ("bf16", "fp32"):  # activations arrive in either; master weights are fp32
    tile = dict(x_ptr=p(dt), u_ptr=p(dt), w_ptr=p("bf16"), rstd_ptr=p("fp32"), hp_ptr=p("fp32"),
                q_ptr=p("fp8e4nv"), s_ptr=p("fp32"), qt_ptr=p("fp8e4nv"), st_ptr=p("fp32"),
                qi_ptr=p("fp8e4nv"), si_ptr=p("fp32"),
                rows_ptr=p("i64"), M="i32", K="i32", Mp="i32", stride_xm="i32", stride_um="i32",
                PROLOGUE="constexpr", COLWISE="constexpr", STORE_HP="constexpr", POW2="constexpr",
                EXACT_CAST="constexpr", BLOCK_M="constexpr", TILES="constexpr", PREFETCH="constexpr",
                COMPACT="constexpr", GATHER="constexpr", INPUT_COPY="constexpr")
    weight = dict(w_ptr=p(dt), q_ptr=p("fp8e4nv"), s_ptr=p("fp32"), qt_ptr=p("fp8e4nv"),
                  st_ptr=p("fp32"), N="i32", K="i32", Nb="i32", Kb="i32", row0="i32", NJ="i32",
                  NJb="i32", TRANSPOSE="constexpr",
                  POW2="constexpr", EXACT_CAST="constexpr", HW_TRANSPOSE="constexpr",
                  TILES="constexpr")
    norm = dict(x_ptr=p(dt), w_ptr=p("bf16"), rstd_ptr=p("fp32"), part_ptr=p("fp32"),
                sync_ptr=p("i32"), hp_ptr=p("fp32"), q_ptr=p("fp8e4nv"), s_ptr=p("fp32"),
                qt_ptr=p("fp8e4nv"), st_ptr=p("fp32"), M="i32", K="i32", Mp="i32",
                stride_xm="i32", eps="fp32", lag="i32", COLWISE="constexpr", STORE_HP="constexpr",
                POW2="constexpr", EXACT_CAST="constexpr", COMPACT="constexpr",
                SUM_TILES="constexpr", PARTS="constexpr", PERSISTENT="constexpr",
                L2_HINTS="constexpr")
    for pro, col, pow2, tiles, pre, cmp, warps, gather, copy in [
            (0, True, False, 1, False, False, 8, False, False),
            (0, True, False, 1, False, True, 4, False, False),
            (0, False, True, 4, True, False, 4, False, False),
            (1, True, False, 4, True, True, 8, False, False),
            (1, False, False, 1, False, False, 4, False, True),  # the FP8 SwiGLU's forward
            (2, True, True, 1, False, False, 8, False, False),
            (0, True, False, 1, False, True, 4, True, False),
            (0, False, False, 4, True, False, 4, True, False)]:
        consts = dict(PROLOGUE=pro, COLWISE=col, STORE_HP=False, POW2=pow2, EXACT_CAST=False,
                      BLOCK_M=128 if col else 64, TILES=tiles, PREFETCH=pre, COMPACT=cmp,
                      GATHER=gather, INPUT_COPY=copy)
        out[f"tile{pro}{col}{pow2}{tiles}{pre}{cmp}{warps}{gather}{copy} {dt}"] = build(
            quant.quant_tile_kernel, tile, consts, warps)
    for col, tiles in ((True, 4), (False, 1)):
        out[f"norm{col}{tiles} {dt}"] = build(quant.rmsnorm_quant_kernel, norm, dict(
            COLWISE=col, STORE_HP=False, POW2=False, EXACT_CAST=False, COMPACT=col,
            SUM_TILES=tiles, PARTS=64, PERSISTENT=col, L2_HINTS=col), 16 if col else 8)
    for hw in (True, False):  # the wrapper never asks fp32 weights for the hardware transpose
        if hw and dt == "fp32":
            continue
        out[f"weight hw={hw} {dt}"] = build(
            quant.quant_128x128_kernel, weight, dict(TRANSPOSE=True, POW2=False, EXACT_CAST=False,
                                                     HW_TRANSPOSE=hw, TILES=1), 8,
            hw_casts=(2 if hw else 1) * 128 * 128 // (2 * 32 * 8))  # e4m3x2: two values each
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90(compiled_sm90):
    """Compile the real (non-interpreted) kernels for sm90 on this machine, no GPU needed: they
    must build, use the hardware e4m3 conversion, load with 16-byte vectors, and never hand one
    hardware-cast value to both a direct store and a layout conversion (the ptxas miscompile
    behind run 1's NaN Dgrad: quantize_128x128's transposed copy of fp32 weights), neither in
    the TTGIR nor after LLVM (the weight kernel's two casts must stay two sets of conversions)."""
    for name, info in compiled_sm90(_COMPILE_SM90).items():
        assert info == dict(hw_cast=True, vector_loads=True, cast_stored_and_shuffled=[],
                            casts_kept_apart=True), (name, info)
