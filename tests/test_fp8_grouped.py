"""Grouped FP8 GEMMs (models/fp8/grouped.py) against the fp32 references on the same quantized
operands: ragged and empty experts, several tile configs, Wgrad accumulation, bad input.

On CPU the Triton kernels run under TRITON_INTERPRET=1 on tiny shapes; the `gpu` tests repeat the
checks at DeepSeek-V3 / `small` expert shapes.
"""
import ctypes
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from models.fp8 import grouped_cuda  # noqa: E402
from models.fp8 import reference as ref  # noqa: E402
from models.fp8.grouped import (TileConfig, grouped_gemm, grouped_wgrad,  # noqa: E402
                                m_tiles_bound, token_major)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _acts(rows, cols, gen):
    """Activation-like data: rows of very different magnitude, a few outliers."""
    x = torch.randn(rows, cols, generator=gen) * torch.rand(rows, 1, generator=gen).mul(4).exp()
    x[torch.rand(rows, cols, generator=gen) < 0.001] *= 30
    return x.to(torch.bfloat16)


def _operands(counts, N, K, seed):
    gen = torch.Generator().manual_seed(seed)
    counts_E = torch.tensor(counts, device=DEVICE)
    x = _acts(sum(counts), K, gen).to(DEVICE)
    w = (torch.randn(len(counts) * N, K, generator=gen) * 0.02).to(DEVICE, torch.bfloat16)
    a_q, a_s = ref.quantize_1x128(x)
    b_q, b_s = ref.quantize_128x128(w)
    b_q, b_s = b_q.view(len(counts), N, K), b_s.view(len(counts), N // 128, K // 128)
    return a_q, a_s.t().contiguous().t(), b_q, b_s, counts_E


GEMM_CASES = [  # counts per expert (ragged, empty experts, one expert), N, K, tile config
    ([37, 0, 130, 5], 256, 256, TileConfig(block_m=64, block_n=128, num_warps=4)),
    ([0, 200, 0], 384, 128, TileConfig(block_m=128, block_n=256)),
    ([129], 128, 384, TileConfig(block_m=128, block_n=128, group_m=1)),
    ([37, 0, 130, 5], 256, 256, TileConfig(block_m=64, block_n=128, tma=True)),
    ([0, 200, 0, 3], 384, 128, TileConfig(block_m=64, block_n=256, persistent=True)),
    ([70, 1, 0, 99], 256, 256, TileConfig(block_m=64, block_n=128, tma=True, persistent=True)),
    ([70, 1, 0, 99], 256, 512, TileConfig(block_m=64, block_n=256, k_groups=2)),
    ([3, 60], 128, 384, TileConfig(block_m=64, block_n=128, tma=True, k_groups=2)),
]


@pytest.mark.parametrize("counts,N,K,cfg", GEMM_CASES)
def test_grouped_gemm_matches_reference(counts, N, K, cfg):
    a_q, a_s, b_q, b_s, counts_E = _operands(counts, N, K, seed=sum(counts) + N)
    out = grouped_gemm(a_q, a_s, b_q, b_s, counts_E, out_dtype=torch.float32, config=cfg)
    expect = ref.grouped_gemm_1x128_128x128(a_q.cpu(), a_s.cpu(), b_q.cpu(), b_s.cpu(), counts_E.cpu())
    assert ref.calc_diff(out.cpu(), expect) < 1e-3
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-4, atol=1e-3 * expect.abs().max().item())


def test_grouped_gemm_bf16_output_and_dgrad_orientation():
    """Dgrad is the same kernel on the transposed weight copy: dx = dy . W."""
    counts = [50, 0, 77]
    gen = torch.Generator().manual_seed(7)
    E, N, K = 3, 256, 128
    dy = _acts(sum(counts), N, gen)
    w = (torch.randn(E * N, K, generator=gen) * 0.02).to(torch.bfloat16)
    w_q, w_s = ref.quantize_128x128(w)
    wT_q = w_q.view(E, N, K).transpose(1, 2).contiguous()
    wT_s = w_s.view(E, N // 128, K // 128).transpose(1, 2).contiguous()
    dy_q, dy_s = ref.quantize_1x128(dy)
    counts_E = torch.tensor(counts, dtype=torch.int32)
    out = grouped_gemm(*(t.to(DEVICE) for t in (dy_q, dy_s, wT_q, wT_s, counts_E)))
    assert out.dtype == torch.bfloat16 and out.shape == (sum(counts), K)
    deq_w = ref.dequantize_128x128(w_q, w_s).view(E, N, K)
    deq_dy = ref.dequantize_1x128(dy_q, dy_s)
    expect = torch.cat([deq_dy[:50] @ deq_w[0], deq_dy[50:] @ deq_w[2]])
    assert ref.calc_diff(out.cpu().float(), expect) < 1e-3


def _wgrad_operands(counts, N, K, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    a_q, a_s = ref.quantize_128x1(_acts(rows, N, gen).to(DEVICE))
    b_q, b_s = ref.quantize_128x1(_acts(rows, K, gen).to(DEVICE))
    return token_major(a_q), a_s, token_major(b_q), b_s, torch.tensor(counts, device=DEVICE)


WGRAD_CASES = [
    ([37, 0, 130, 5], 128, 256, TileConfig(block_m=64, block_n=128, num_warps=4)),
    ([300, 0], 256, 128, TileConfig(block_m=128, block_n=128)),
    ([1, 255, 2], 192, 128, TileConfig(block_m=128, block_n=64, group_m=1)),
    ([10, 40, 78, 0], 128, 128, TileConfig(block_m=64, block_n=64, num_warps=4)),
    ([37, 0, 130, 5], 192, 256, TileConfig(block_m=128, block_n=128, tma=True)),
    ([300, 5, 390, 0, 257], 128, 128, TileConfig(block_m=64, block_n=128, k_groups=2)),
    ([37, 0, 130, 5], 128, 256, TileConfig(block_m=64, block_n=128, tma=True, k_groups=2)),
]


@pytest.mark.parametrize("counts,N,K,cfg", WGRAD_CASES)
def test_grouped_wgrad_matches_reference(counts, N, K, cfg):
    a_q, a_s, b_q, b_s, counts_E = _wgrad_operands(counts, N, K, seed=sum(counts) + K)
    out = grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, config=cfg)
    expect = ref.grouped_gemm_128x1_128x1(*(t.cpu() for t in (a_q, a_s, b_q, b_s, counts_E)))
    assert out.shape == expect.shape and out.dtype == torch.float32
    assert ref.calc_diff(out.cpu(), expect) < 1e-3
    for e, c in enumerate(counts):  # every expert on its own, empty ones exactly zero
        if c == 0:
            assert bool((out[e] == 0).all())
        else:
            assert ref.calc_diff(out[e].cpu(), expect[e]) < 1e-3


def test_grouped_wgrad_writes_bf16_and_accumulates_into_bf16():
    """bf16 parameters get their gradient rounded once from the fp32 accumulator."""
    a_q, a_s, b_q, b_s, counts_E = _wgrad_operands([40, 0, 90], 128, 128, seed=8)
    expect = ref.grouped_gemm_128x1_128x1(*(t.cpu() for t in (a_q, a_s, b_q, b_s, counts_E)))
    out = grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu().float(), expect, rtol=1e-2,  # one bf16 rounding
                               atol=1e-3 * expect.abs().max().item())
    grad = torch.randn(3, 128, 128, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    grad = grad.to(DEVICE)
    summed = grad.cpu().float() + expect
    grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, out=grad)
    assert ref.calc_diff(grad.cpu().float(), summed) < 1e-4
    with pytest.raises(ValueError, match="out_dtype"):
        grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, out_dtype=torch.float16)


def test_grouped_wgrad_accumulates_into_out():
    a_q, a_s, b_q, b_s, counts_E = _wgrad_operands([40, 90], 128, 128, seed=3)
    main_grad = torch.randn(2, 128, 128, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    before = main_grad.clone()
    got = grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, out=main_grad)
    assert got is main_grad
    expect = before.cpu() + ref.grouped_gemm_128x1_128x1(*(t.cpu() for t in (a_q, a_s, b_q, b_s,
                                                                         counts_E)))
    assert ref.calc_diff(main_grad.cpu(), expect) < 1e-5


def test_tile_bound_covers_every_split():
    for counts in ([0, 0, 1], [127, 1, 128], [64] * 5, [1] * 9):
        tiles = sum(-(-c // 64) for c in counts)
        assert tiles <= m_tiles_bound(sum(counts), len(counts), 64)


def test_bad_input_is_a_clear_error():
    a_q, a_s, b_q, b_s, counts_E = _operands([10, 20], 128, 256, seed=1)
    with pytest.raises(TypeError, match="a_q must be a float8_e4m3fn"):
        grouped_gemm(a_q.float(), a_s, b_q, b_s, counts_E)
    with pytest.raises(ValueError, match="K-major"):
        grouped_gemm(a_q.t().contiguous().t(), a_s, b_q, b_s, counts_E)
    with pytest.raises(ValueError, match="multiples of 128"):
        grouped_gemm(a_q[:, :200].contiguous(), a_s[:, :2], b_q[..., :200].contiguous(),
                     b_s[..., :2], counts_E)
    with pytest.raises(ValueError, match="sum to the 30 rows"):
        grouped_gemm(a_q, a_s, b_q, b_s, torch.tensor([10, 19]))
    with pytest.raises(ValueError, match=r"counts_E must have shape \(2,\)"):
        grouped_gemm(a_q, a_s, b_q, b_s, torch.tensor([30]))
    with pytest.raises(TypeError, match="counts_E must be an int32/int64"):
        grouped_gemm(a_q, a_s, b_q, b_s, counts_E.float())
    with pytest.raises(ValueError, match="a_s must have shape"):
        grouped_gemm(a_q, a_s[:, :1], b_q, b_s, counts_E)
    wa_q, wa_s, wb_q, wb_s, wc = _wgrad_operands([10, 20], 128, 128, seed=2)
    with pytest.raises(ValueError, match="token-major"):
        grouped_wgrad(wa_q.contiguous(), wa_s, wb_q, wb_s, wc)
    with pytest.raises(ValueError, match="sum to the 30 rows"):
        grouped_wgrad(wa_q, wa_s, wb_q, wb_s, torch.tensor([30, 1]))


def test_counts_are_checked_once_per_version():
    """A counts tensor's values are checked once (an experts layer's seven GEMMs share it), again
    after an in-place change (its version moves) or against another row count; a write that
    bypasses the version counter (.data) is not seen, as with every version-keyed cache here."""
    from models.fp8.grouped import _check_counts
    counts = torch.tensor([10, 20])
    _check_counts(counts, 2, 30)
    with pytest.raises(ValueError, match="sum to the 31 rows"):
        _check_counts(counts, 2, 31)
    counts.data[0] = 11  # not a version change: the remembered check stands
    _check_counts(counts, 2, 30)
    counts[0] = 12  # in place: checked again
    with pytest.raises(ValueError, match="sum to the 30 rows"):
        _check_counts(counts, 2, 30)


# ---------------------------------------------------------------------------------------------
# The same checks at real expert shapes (DeepSeek-V3: D=7168, F=2048; `small`: D=4096, F=1536),
# with the kernel variants the benchmark sweeps; references computed in fp32 on the GPU


GPU_CONFIGS = [None, TileConfig(128, 128, 8, 8, 4, tma=True),
               TileConfig(128, 128, 8, 8, 4, tma=True, persistent=True),
               TileConfig(128, 128, 8, 8, 3, tma=True, k_groups=2),
               TileConfig(128, 256, 8, 16, 3, tma=True), TileConfig(64, 128, 8, 4, 4)]


def _ragged_counts(E, m, seed, empty):
    counts = (torch.rand(E, generator=torch.Generator().manual_seed(seed)) * 2 * m).long()
    counts[empty] = 0
    return counts.tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GPU_CONFIGS)
@pytest.mark.parametrize("E,m,N,K", [(8, 512, 4096, 7168), (8, 512, 7168, 2048),
                                     (16, 300, 3072, 4096), (16, 300, 4096, 1536)])
def test_grouped_gemm_real_shapes(E, m, N, K, cfg):
    a_q, a_s, b_q, b_s, counts_E = _operands(_ragged_counts(E, m, E * m, 1), N, K, seed=N + K)
    out = grouped_gemm(a_q, a_s, b_q, b_s, counts_E, config=cfg)
    expect = ref.grouped_gemm_1x128_128x128(a_q, a_s, b_q, b_s, counts_E)
    assert ref.calc_diff(out.float(), expect) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [None, TileConfig(128, 128, 8, 8, 4, tma=True),
                                 TileConfig(128, 128, 8, 8, 3, tma=True, k_groups=2),
                                 TileConfig(128, 256, 8, 16, 3, tma=True)])
@pytest.mark.parametrize("E,m,N,K", [(8, 512, 4096, 7168), (16, 300, 7168, 2048)])
def test_grouped_wgrad_real_shapes(E, m, N, K, cfg):
    a_q, a_s, b_q, b_s, counts_E = _wgrad_operands(_ragged_counts(E, m, E + m, -1), N, K, seed=N)
    out = grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, config=cfg)
    expect = ref.grouped_gemm_128x1_128x1(a_q, a_s, b_q, b_s, counts_E)
    assert ref.calc_diff(out, expect) < 1e-3


CUDA_COUNTS = [  # ragged, empty first/last experts, experts inside one 128-row group, one expert
    [0, 1, 127, 128, 129, 0, 300, 5, 0],
    [700, 0, 0, 3, 64, 64, 500],
    [2000],
    [4000, 0, 2100, 2300],  # 16+ tile rows an expert on average: Fprop's tall bands, one partial
]


@pytest.mark.gpu
@pytest.mark.parametrize("counts", CUDA_COUNTS)
@pytest.mark.parametrize("N,K", [(128, 256), (384, 128), (512, 384), (2048, 7168), (7168, 2048)])
def test_cuda_grouped_gemm_matches_reference(counts, N, K):
    """The CUDA kernels (csrc/fp8_grouped) on ragged splits, both output dtypes, int32 and
    int64 counts. With the default 256-column tiles, N = 128 and 384 end in a partial tile;
    built with FPROP_BN=192 (scripts/sweep_grouped_cuda.py), 128, 512, 2048 and 7168 do, and
    every other tile starts in the middle of a 128x128 weight block, taking its columns' scales
    from two blocks."""
    a_q, a_s, b_q, b_s, counts_E = _operands(counts, N, K, seed=len(counts) + N)
    expect = ref.grouped_gemm_1x128_128x128(a_q, a_s, b_q, b_s, counts_E)
    for out_dtype, counts_dtype in ((torch.float32, torch.int64), (torch.bfloat16, torch.int32)):
        out = grouped_gemm(a_q, a_s, b_q, b_s, counts_E.to(counts_dtype), out_dtype=out_dtype,
                           backend="cuda")
        assert out.dtype == out_dtype
        assert ref.calc_diff(out.float(), expect) < 1e-3
        torch.testing.assert_close(out.float(), expect, rtol=2e-2,
                                   atol=2e-2 * expect.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("counts", CUDA_COUNTS)
@pytest.mark.parametrize("N,K", [(384, 512), (2048, 7168)])
def test_cuda_grouped_wgrad_matches_reference(counts, N, K):
    a_q, a_s, b_q, b_s, counts_E = _wgrad_operands(counts, N, K, seed=len(counts) + K)
    expect = ref.grouped_gemm_128x1_128x1(a_q, a_s, b_q, b_s, counts_E)
    out = grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, backend="cuda")
    assert ref.calc_diff(out, expect) < 1e-3
    for e, c in enumerate(counts):  # every expert on its own, empty ones exactly zero
        if c == 0:
            assert bool((out[e] == 0).all())
        else:
            assert ref.calc_diff(out[e], expect[e]) < 1e-3
    main_grad = torch.randn_like(out)
    before = main_grad.clone()
    grouped_wgrad(a_q, a_s, b_q, b_s, counts_E.int(), out=main_grad, backend="cuda")
    assert ref.calc_diff(main_grad, before + expect) < 1e-5
    bf16 = grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, backend="cuda", out_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and ref.calc_diff(bf16.float(), expect) < 1e-3
    grad = torch.randn_like(bf16)
    summed = grad.float() + expect
    grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, out=grad, backend="cuda")
    assert ref.calc_diff(grad.float(), summed) < 1e-3


@pytest.mark.gpu
def test_auto_backend_falls_back_to_triton_where_the_cuda_kernels_do_not_fit():
    """An `a` that TMA cannot read (its base 8 bytes off a 16-byte boundary) and a Wgrad K that
    is not a whole number of 256-column tiles: `auto` runs Triton, still correct; `cuda` says
    why it cannot."""
    a_q, a_s, b_q, b_s, counts_E = _operands([100, 0, 300], 384, 256, seed=5)
    padded = torch.empty(a_q.shape[0], a_q.shape[1] + 16, dtype=a_q.dtype, device=a_q.device)
    padded[:, 8:8 + a_q.shape[1]] = a_q
    a_view = padded[:, 8:8 + a_q.shape[1]]
    out = grouped_gemm(a_view, a_s, b_q, b_s, counts_E, out_dtype=torch.float32)
    expect = ref.grouped_gemm_1x128_128x128(a_q, a_s, b_q, b_s, counts_E)
    assert ref.calc_diff(out, expect) < 1e-3
    with pytest.raises(ValueError, match="16-byte aligned"):
        grouped_gemm(a_view, a_s, b_q, b_s, counts_E, backend="cuda")
    a_q, a_s, b_q, b_s, counts_E = _wgrad_operands([100, 0, 300], 128, 384, seed=6)
    expect = ref.grouped_gemm_128x1_128x1(a_q, a_s, b_q, b_s, counts_E)
    assert ref.calc_diff(grouped_wgrad(a_q, a_s, b_q, b_s, counts_E), expect) < 1e-3
    with pytest.raises(ValueError, match="128 x 256"):
        grouped_wgrad(a_q, a_s, b_q, b_s, counts_E, backend="cuda")


def test_launches_take_the_raw_current_stream(monkeypatch):
    """cuda_lib.current_stream: torch's raw-stream getter for the device's index where torch has
    it, the public torch.cuda API where it does not (both replaced by recorders here)."""
    from models.fp8 import cuda_lib
    asked = []
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream",
                        lambda index: asked.append(index) or 1000 + index, raising=False)
    assert cuda_lib.current_stream(torch.device("cuda", 3)) == 1003 and asked == [3]
    monkeypatch.delattr(torch._C, "_cuda_getCurrentRawStream")

    class Stream:
        cuda_stream = 77
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: asked.append(device) or Stream)
    assert cuda_lib.current_stream(torch.device("cuda", 1)) == 77
    assert asked == [3, torch.device("cuda", 1)]


def test_cuda_library_is_named_by_its_sources(tmp_path, monkeypatch):
    """ensure_built loads the library of the current grouped.cu whatever the file times say: it
    is named by a digest of the sources (csrc/common's headers included), built when missing,
    kept when present, and libraries of other sources are removed (nvcc is replaced by a stub
    that records its builds)."""
    from models.fp8.grouped_cuda import build_script
    build = build_script()
    source = tmp_path / "grouped.cu"
    source.write_text("// version 1\n")
    common = tmp_path / "common"
    common.mkdir()
    (common / "shared.cuh").write_text("// header 1\n")
    monkeypatch.setattr(build, "SOURCE", source)
    monkeypatch.setattr(build, "LIBRARY_DIR", tmp_path)
    monkeypatch.setattr(build.nvcc_build, "COMMON", common)
    built = []

    def fake_build(out, env=None, defines=()):
        out.write_bytes(source.read_bytes())
        built.append(out.name)
        return out, ""

    monkeypatch.setattr(build, "build_library", fake_build)
    stale = tmp_path / "libfp8moe_grouped.0123456789abcdef.so"
    stale.write_bytes(b"old")
    first = build.ensure_built()
    assert first.name.startswith("libfp8moe_grouped.") and first != stale and not stale.exists()
    assert build.ensure_built() == first and built == [first.name]
    source.write_text("// version 2\n")
    second = build.ensure_built()
    assert second != first and not first.exists() and second.read_text() == "// version 2\n"
    (common / "shared.cuh").write_text("// header 2\n")  # an included header changed
    third = build.ensure_built()
    assert third != second and not second.exists() and len(built) == 3


def test_cuda_kernels_compile_for_sm90a(built_csrc):
    """csrc/fp8_grouped builds with nvcc on any machine with the toolkit (no GPU needed), and
    the Fprop/Dgrad kernel's consumers keep their accumulators and scratch in registers."""
    lib, fprop = built_csrc("fp8_grouped", "grouped_fprop_kernel")
    assert lib.exists() and lib.stat().st_size > 0
    assert "0 bytes spill stores" in fprop.splitlines()[2], fprop[:400]
    library = grouped_cuda.load_library(lib)
    _check_balanced_grid(library.fp8moe_grouped_persistent_clusters)
    _check_fprop_walk(library.fp8moe_grouped_fprop_tile)


def _check_balanced_grid(clusters_for):
    """The persistent grid (grouped.cu, BALANCED_GRID) runs a walk in as few rounds as the room
    allows, on the fewest clusters that keep that many rounds, so that no cluster idles through
    the last one: hand-computed cases (3584 Wgrad tiles of DeepSeek-V3's down projection at 8
    experts on 132 SMs: 128 CTAs of 28; the 4096 Fprop tiles of its up projection, which the
    Fprop kernel deals itself with the same function, FPROP_BALANCE: 128 of 32; an empty walk gets
    one), then the two properties on random walks."""
    cases = {(3584, 132): 128, (7168, 132): 131, (57344, 132): 132, (5, 132): 5, (133, 132): 67,
             (1, 1): 1, (264, 132): 132, (0, 132): 1, (4096, 132): 128}
    assert {key: clusters_for(*key) for key in cases} == cases
    gen = torch.Generator().manual_seed(7)
    for walks, room in torch.randint(1, 5000, (200, 2), generator=gen).tolist():
        n = clusters_for(walks, room)
        rounds = -(-walks // min(room, walks))
        assert 1 <= n <= room and -(-walks // n) == rounds, (walks, room, n)
        assert n == 1 or -(-walks // (n - 1)) > rounds, (walks, room, n)


def _check_fprop_walk(tile_of):
    """Fprop/Dgrad's walk (grouped.cu, band_order and fprop_band) visits every tile once, column
    by column through bands of 16 tile rows where the experts average 16 rows or more and of 8
    otherwise, the last band holding what is left."""
    def walk(m_tiles, n_tiles, experts):
        m, n = ctypes.c_int(), ctypes.c_int()
        order = []
        for t in range(m_tiles * n_tiles):
            tile_of(t, m_tiles, n_tiles, experts, ctypes.byref(m), ctypes.byref(n))
            order.append((m.value, n.value))
        return order

    # DeepSeek-V3's up projection at 2 experts x 2048 tokens: 32 tile rows, 16 columns of 256
    tall = walk(32, 16, 2)
    assert tall[:17] == [(m, 0) for m in range(16)] + [(0, 1)] and tall[256] == (16, 0)
    short = walk(32, 16, 3)  # 32 rows over 3 experts: under 16 an expert, bands of 8
    assert short[:9] == [(m, 0) for m in range(8)] + [(0, 1)] and short[128] == (8, 0)
    ragged = walk(37, 5, 2)  # a last band of 5 rows
    assert ragged[160:166] == [(32, 0), (33, 0), (34, 0), (35, 0), (36, 0), (32, 1)]
    gen = torch.Generator().manual_seed(11)
    for m_tiles, n_tiles, experts in torch.randint(1, 60, (40, 3), generator=gen).tolist():
        order = walk(m_tiles, n_tiles, experts)
        assert sorted(order) == [(m, n) for m in range(m_tiles) for n in range(n_tiles)]


@pytest.mark.parametrize("defines", [(), ("WGRAD_CYCLES=1",), ("WGRAD_CYCLES=3",)])
def test_wgrad_builds_keep_their_mmas_asynchronous(built_csrc, defines):
    """ptxas serializes every WGMMA of a kernel that makes a call (a device printf, say) and says
    so (C7510). Neither the default Wgrad kernel nor its cycle-counting builds may pay that, or
    the cycles they count belong to another kernel: the tenth session's did."""
    _, report = built_csrc("fp8_grouped", "grouped_wgrad_kernel", defines)
    assert "serialized" not in report, report[:600]
    assert "C751" not in report, report[:600]


def test_cuda_backend_without_a_hopper_gpu_is_a_clear_error():
    a_q, a_s, b_q, b_s, counts_E = _operands([3, 5], 128, 128, seed=1)
    if DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("this machine can run the CUDA kernels")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here"):
        grouped_gemm(a_q, a_s, b_q, b_s, counts_E, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_gemm(a_q, a_s, b_q, b_s, counts_E, backend="cutlass")


def test_grouped_references_agree_with_dense_ones_and_reject_bad_counts():
    a_q, a_s, b_q, b_s, counts_E = _operands([5, 0, 9], 128, 256, seed=11)
    got = ref.grouped_gemm_1x128_128x128(a_q, a_s, b_q, b_s, counts_E)
    assert bool((got[:5] == ref.gemm_1x128_128x128(a_q[:5], a_s[:5], b_q[0], b_s[0])).all())
    assert bool((got[5:] == ref.gemm_1x128_128x128(a_q[5:], a_s[5:], b_q[2], b_s[2])).all())
    with pytest.raises(ValueError, match="sum to the 14 rows"):
        ref.grouped_gemm_1x128_128x128(a_q, a_s, b_q, b_s, torch.tensor([5, 0, 8]))


# ---------------------------------------------------------------------------------------------
# Compile for Hopper without a GPU: the interpreter runs the kernels' Python, not Triton's
# compiler, so this is what catches code the compiler rejects (and register spills) on CPU.

_SM90_COMPILE = r'''
import json, os, subprocess, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from models.fp8 import experts, grouped

def desc(block):
    return f"tensordesc<fp8e4nv[{block}, 128]>"

RUNTIME = ("rows", "n_experts", "m_tiles_bound", "M", "Mp")  # values that need not be 16-aligned

def compile_one(fn, types, consts, warps, stages):
    assert set(types) | set(consts) == set(fn.arg_names), sorted(set(fn.arg_names) ^ (set(types) | set(consts)))
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    # like a launch with real shapes: pointers and model dimensions / strides divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in types and n not in RUNTIME and not types[n].startswith("tensordesc")}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return int(usage.split("STACK:")[1].split()[0]), k.metadata.shared

ints = lambda *names: {n: "i32" for n in names}
gemm_ints = ints("rows", "N", "K", "n_experts", "m_tiles_bound", "stride_am", "stride_asm", "stride_ask",
                 "stride_be", "stride_bn", "stride_bse", "stride_bsn", "stride_bsk", "stride_cm")
wgrad_ints = ints("rows", "N", "K", "n_experts", "stride_an", "stride_asg", "stride_asn", "stride_bk",
                  "stride_bsg", "stride_bsk", "stride_oe", "stride_on")
out = {}
for name, cfg, persistent in (("gemm", grouped.DEFAULT_GEMM_CONFIG, False),
                              ("gemm persistent", grouped.DEFAULT_GEMM_CONFIG, True)):
    types = dict(gemm_ints, a_ptr=desc(cfg.block_m), as_ptr="*fp32", b_ptr=desc(cfg.block_n),
                 bs_ptr="*fp32", c_ptr="*bf16", counts_ptr="*i64")
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=128, GROUP_M=cfg.group_m,
                  E_POW2=64, USE_TMA=cfg.tma, K_GROUPS=cfg.k_groups, NUM_SMS=132 if persistent else 0)
    out[name] = compile_one(grouped.grouped_gemm_kernel, types, consts, cfg.num_warps, cfg.num_stages)
cfg = grouped.DEFAULT_WGRAD_CONFIG
types = dict(wgrad_ints, a_ptr=desc(cfg.block_m), as_ptr="*fp32", b_ptr=desc(cfg.block_n),
             bs_ptr="*fp32", out_ptr="*fp32", counts_ptr="*i64")
for name, accumulate in (("wgrad", False), ("wgrad accumulate", True)):
    consts = dict(ACCUMULATE=accumulate, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=128,
                  GROUP_M=cfg.group_m, E_POW2=64, USE_TMA=cfg.tma, K_GROUPS=cfg.k_groups)
    out[name] = compile_one(grouped.grouped_wgrad_kernel, types, consts, cfg.num_warps,
                            cfg.num_stages)
types = dict(ints("M", "F", "Mp", "stride_shm", "stride_shk", "stride_dam"), qh_ptr="*fp8e4nv",
             sh_ptr="*fp32", da_ptr="*bf16", qdh_ptr="*fp8e4nv", sdh_ptr="*fp32", qtdh_ptr="*fp8e4nv",
             stdh_ptr="*fp32", qta_ptr="*fp8e4nv", sta_ptr="*fp32")
out["swiglu backward"] = compile_one(experts.swiglu_backward_kernel, types,
                                     dict(POW2=False, EXACT=False), experts.SWIGLU_BACKWARD_WARPS,
                                     3)
print(json.dumps(out))
'''


def test_default_kernels_compile_for_sm90_without_spills(compiled_sm90):
    import triton
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(tools, "cuobjdump")):
        pytest.skip("this Triton build ships no NVIDIA toolchain (ptxas, cuobjdump)")
    usage = compiled_sm90(_SM90_COMPILE, timeout=600)
    for kernel, (stack_bytes, smem) in usage.items():
        assert smem <= 227 * 1024, f"{kernel} needs {smem} bytes of shared memory"
        if kernel not in ("gemm persistent", "wgrad accumulate"):  # these only have to compile
            assert stack_bytes == 0, f"{kernel} spills {stack_bytes} bytes of registers on sm90"
