"""Pure-torch reference for DeepSeek-V3's fine-grained FP8 numerics: every kernel is tested against this.

What it computes
----------------
FP8 E4M3 (`torch.float8_e4m3fn`, largest finite value 448) with one FP32 scale per tile:

    quantize_1x128   x_MK -> q_MK, s [M, ceil(K/128)]             1 row x 128 columns per scale
    quantize_128x1   x_MK -> q_MK, s [ceil(M/128), K]             128 rows x 1 column per scale
    quantize_128x128 w_NK -> q_NK, s [ceil(N/128), ceil(K/128)]   128 x 128 block per scale

and `dequantize_*` (q, s) -> float32 inverts each one. A scale is a *dequantization* scale
(DeepSeek-V3 inference/kernel.py, DeepGEMM): x ~= q * s. The recipe for one tile is

    amax = max(|x|) over the tile, floored at AMAX_EPS   (an all-zero tile is then exact: q = 0)
    s    = amax / 448                                     (fp32, IEEE round-to-nearest division)
    s    = 2^ceil(log2(s))  if pow2_scales                (DeepSeek's UE8M0: round *up*, so no overflow)
    q    = e4m3(clamp(x * (1 / s), -448, 448))            (fp32, round-to-nearest-even cast)

x is multiplied by the tile's reciprocal scale rather than divided by the scale: one correctly
rounded division per tile instead of one per element keeps the quantization kernels memory-bound
(with power-of-two scales both are exact and equal; otherwise they differ by at most one extra
fp32 rounding, far below e4m3's resolution). Every step is done in fp32 with correctly rounded
operations, so a Triton kernel that performs the same operations (`div_rn` for the reciprocal,
the same bit trick for the power of two) produces bitwise the same
q and s; that is what tests/test_fp8_quant.py checks. Power-of-two rounding is done on the bits
(add 2^23 - 1 to the fp32 pattern, clear the mantissa), which is exact and identical everywhere.

Where each tiling is used (one Linear, y = x W^T, x: [T, K], W: [N, K]; research/fp8.md 1.9):

    Fprop  y  = x  W^T   x 1x128 along K,           W 128x128          -> gemm_1x128_128x128
    Dgrad  dx = dy W     dy 1x128 along N,          W^T 128x128        -> gemm_1x128_128x128
    Wgrad  dW = dy^T x   dy 128x1 and x 128x1 (both along tokens T)   -> gemm_1x128_1x128

A 128x1 tile of x is a 1x128 tile of x^T, so Wgrad is the NT GEMM of dy^T [N, T] and x^T [K, T],
both quantized 1x128 along T: `gemm_1x128_1x128(q_dy.t(), s_dy.t(), q_x.t(), s_x.t())` with the
outputs of `quantize_128x1`. Activation gradients are never quantized in 128x128 blocks:
DeepSeek-V3 saw that diverge (Appendix B.2).

Shapes: the tiled dimension need not be a multiple of 128; the last tile is partial (its amax
covers the elements that exist), which is exact for quantization and for the GEMM references.
Whether a GEMM *kernel* takes such a shape is the kernel's business (models/fp8/gemm.py).

The reference GEMMs dequantize both operands to fp32 and multiply in fp32: the value a
block-scaled FP8 GEMM with FP32 promotion should approach. Accuracy is measured DeepGEMM's way,
`calc_diff(x, y) = 1 - 2 sum(xy) / sum(x^2 + y^2)` in float64, expected below 1e-3.

Non-finite input (inf or NaN) raises ValueError: a scale cannot represent it.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
BLOCK = 128
"""Quantization tile length (and 128x128 weight block side)."""
E4M3 = torch.float8_e4m3fn
AMAX_EPS = 1e-12
"""Floor of a tile's amax, so an all-zero tile gets a finite, nonzero scale and quantizes to 0."""


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_quantizable(x: torch.Tensor, name: str = "x") -> None:
    """Raise a clear error unless `x` is a finite 2-D floating tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {tuple(x.shape)}; reshape it first")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains inf or NaN; FP8 scales cannot represent it "
                         "(find where the non-finite values come from, e.g. a diverged loss)")


def scale_from_amax(amax: torch.Tensor, pow2_scales: bool = False) -> torch.Tensor:
    """fp32 dequantization scale of a tile with max-abs `amax`: amax/448, optionally rounded up to 2^k."""
    amax = amax.float().clamp_min(AMAX_EPS)
    # Divide by a tensor, not a Python number: CUDA turns division by a scalar into a multiply by
    # its reciprocal, which is not the correctly rounded amax/448 the kernels compute.
    s = amax / torch.full_like(amax, FP8_MAX)
    if pow2_scales:
        s = round_up_pow2(s)
    return s


def round_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s, for positive normal fp32 s (exact: done on the bit pattern)."""
    bits = s.float().contiguous().view(torch.int32)
    bits = (bits + 0x7FFFFF) & ~0x7FFFFF
    return bits.view(torch.float32)


def _cast(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x * (1/s))) with s broadcastable to x; both fp32."""
    return (x * (1.0 / s)).clamp(-FP8_MAX, FP8_MAX).to(E4M3)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def _quantize_tiles(x: torch.Tensor, tile_r: int, tile_c: int, pow2_scales: bool):
    """Quantize 2-D x in tile_r x tile_c tiles; returns (q like x, s [ceil(R/tile_r), ceil(C/tile_c)])."""
    rows, cols = x.shape
    nr, nc = ceil_div(rows, tile_r), ceil_div(cols, tile_c)
    xp = _pad_to(x.float(), nr * tile_r, nc * tile_c)
    tiles = xp.view(nr, tile_r, nc, tile_c)
    amax = tiles.abs().amax(dim=(1, 3))
    s = scale_from_amax(amax, pow2_scales)
    q = _cast(tiles, s[:, None, :, None]).view(nr * tile_r, nc * tile_c)
    return q[:rows, :cols].contiguous(), s


def quantize_1x128(x_MK: torch.Tensor, pow2_scales: bool = False):
    """Per row, per 128 columns: (q_MK e4m3, s [M, ceil(K/128)] fp32). Activations and gradients."""
    check_quantizable(x_MK, "x_MK")
    return _quantize_tiles(x_MK, 1, BLOCK, pow2_scales)


def quantize_128x1(x_MK: torch.Tensor, pow2_scales: bool = False):
    """Per column, per 128 rows: (q_MK e4m3, s [ceil(M/128), K] fp32). The Wgrad operand (tokens = M)."""
    check_quantizable(x_MK, "x_MK")
    return _quantize_tiles(x_MK, BLOCK, 1, pow2_scales)


def quantize_128x128(w_NK: torch.Tensor, pow2_scales: bool = False):
    """Per 128x128 block: (q_NK e4m3, s [ceil(N/128), ceil(K/128)] fp32). Weights."""
    check_quantizable(w_NK, "w_NK")
    return _quantize_tiles(w_NK, BLOCK, BLOCK, pow2_scales)


def _expand(s: torch.Tensor, tile_r: int, tile_c: int, rows: int, cols: int) -> torch.Tensor:
    return s.float().repeat_interleave(tile_r, 0).repeat_interleave(tile_c, 1)[:rows, :cols]


def _check_pair(q: torch.Tensor, s: torch.Tensor, tile_r: int, tile_c: int, name: str) -> None:
    if q.dim() != 2 or q.dtype != E4M3:
        raise TypeError(f"{name}: q must be a 2-D float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}")
    want = (ceil_div(q.shape[0], tile_r), ceil_div(q.shape[1], tile_c))
    if tuple(s.shape) != want or s.dtype != torch.float32:
        raise ValueError(f"{name}: scales for q {tuple(q.shape)} in {tile_r}x{tile_c} tiles must be "
                         f"float32 {want}, got {s.dtype} {tuple(s.shape)}")


def dequantize_1x128(q_MK: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_1x128: float32 [M, K]."""
    _check_pair(q_MK, s, 1, BLOCK, "dequantize_1x128")
    return q_MK.float() * _expand(s, 1, BLOCK, *q_MK.shape)


def dequantize_128x1(q_MK: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_128x1: float32 [M, K]."""
    _check_pair(q_MK, s, BLOCK, 1, "dequantize_128x1")
    return q_MK.float() * _expand(s, BLOCK, 1, *q_MK.shape)


def dequantize_128x128(q_NK: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_128x128: float32 [N, K]."""
    _check_pair(q_NK, s, BLOCK, BLOCK, "dequantize_128x128")
    return q_NK.float() * _expand(s, BLOCK, BLOCK, *q_NK.shape)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's global dissimilarity 1 - 2 sum(xy) / sum(x^2 + y^2), in float64 (0 = identical)."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def gemm_1x128_128x128(a_MK: torch.Tensor, sa: torch.Tensor, b_NK: torch.Tensor,
                       sb: torch.Tensor) -> torch.Tensor:
    """Fprop/Dgrad reference: fp32 [M, N] = deq(a, 1x128 scales [M, K/128]) @ deq(b, 128x128 scales)^T.

    Fprop: a = x [T, K], b = W [N, K]. Dgrad: a = dy [T, N], b = W^T [K, N] (quantized as its
    own 128x128 blocks, which are the transposes of W's blocks).
    """
    _check_k(a_MK, b_NK)
    return dequantize_1x128(a_MK, sa) @ dequantize_128x128(b_NK, sb).t()


def gemm_1x128_1x128(a_MK: torch.Tensor, sa: torch.Tensor, b_NK: torch.Tensor,
                     sb: torch.Tensor) -> torch.Tensor:
    """Wgrad reference: fp32 [M, N] = deq(a, 1x128 scales [M, K/128]) @ deq(b, 1x128 scales [N, K/128])^T.

    For dW = dy^T x, K is the token dimension: a = dy^T [N_out, T], b = x^T [K_in, T], i.e. the
    transposes of quantize_128x1's outputs: gemm_1x128_1x128(q_dy.t(), s_dy.t(), q_x.t(), s_x.t()).
    """
    _check_k(a_MK, b_NK)
    return dequantize_1x128(a_MK, sa) @ dequantize_1x128(b_NK, sb).t()


def _check_k(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"NT GEMM needs a [M, K] and b [N, K] with the same K, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


# ---------------------------------------------------------------------------------------------
# Grouped GEMMs of the routed experts (models/fp8/grouped.py), rows sorted by expert


def _expert_rows(counts_E: torch.Tensor, rows: int) -> list[tuple[int, int]]:
    counts = [int(c) for c in counts_E.tolist()]
    if any(c < 0 for c in counts) or sum(counts) != rows:
        raise ValueError(f"counts_E must be non-negative and sum to the {rows} rows, got {counts}")
    bounds = torch.tensor([0] + counts).cumsum(0).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def grouped_gemm_1x128_128x128(a_TK: torch.Tensor, sa: torch.Tensor, b_ENK: torch.Tensor,
                               sb: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Grouped Fprop/Dgrad reference: fp32 [T, N], rows of expert e times deq(b[e])^T.

    a [T, K] with 1x128 scales [T, K/128]; b [E, N, K] with 128x128 scales [E, N/128, K/128];
    counts_E [E] rows per expert, in order.
    """
    a = dequantize_1x128(a_TK, sa)
    out = a.new_zeros(a.shape[0], b_ENK.shape[1])
    for e, (lo, hi) in enumerate(_expert_rows(counts_E, a.shape[0])):
        out[lo:hi] = a[lo:hi] @ dequantize_128x128(b_ENK[e], sb[e]).t()
    return out


def grouped_gemm_128x1_128x1(a_TN: torch.Tensor, sa: torch.Tensor, b_TK: torch.Tensor,
                             sb: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Grouped Wgrad reference: fp32 [E, N, K], per expert deq(a)[rows]^T deq(b)[rows].

    a [T, N] and b [T, K] with 128x1 scales [ceil(T/128), N] and [ceil(T/128), K] (tiles of the
    sorted rows; a tile may hold two experts' rows), the outputs of quantize_128x1 (dW = dy^T x).
    """
    a, b = dequantize_128x1(a_TN, sa), dequantize_128x1(b_TK, sb)
    return torch.stack([a[lo:hi].t() @ b[lo:hi]
                        for lo, hi in _expert_rows(counts_E, a.shape[0])])
