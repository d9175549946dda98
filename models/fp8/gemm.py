"""Dense block-scaled FP8 GEMMs: cuBLAS's blockwise path (through torch._scaled_mm) on sm90, the
fp32 reference elsewhere.

Both GEMMs are "NT": out[M, N] = a[M, K] @ b[N, K]^T, both operands K-major (the only layout
Hopper's FP8 WGMMA takes), FP32 accumulation with promotion at every 128 elements of K inside
cuBLAS (research/fp8.md 3.3: cuBLASLt >= 12.9, VEC128_32F / BLK128x128_32F scale modes).

    gemm_1x128_128x128(a, sa, b, sb, out_dtype)   Fprop (a = x, b = W) and Dgrad (a = dy, b = W^T)
    gemm_1x128_1x128(a, sa, b, sb, out_dtype)     Wgrad (a = dy^T, b = x^T, K = tokens)

Operands, exactly as models/fp8/quant.py writes them (Kb = K / 128):
    a   [M, K] e4m3 contiguous;  sa [M, Kb] fp32 MN-major (strides (1, M)), i.e. sa.t() contiguous
    b   [N, K] e4m3 contiguous;  sb [N/128, Kb] fp32 contiguous (128x128 blocks), or
                                 sb [N, Kb] fp32 MN-major (1x128, Wgrad)
so Fprop is gemm_1x128_128x128(*quantize_1x128(x), *quantize_128x128(W)); Dgrad takes the
transposed weight copy (qt, st) of quantize_128x128(W, transpose=True); Wgrad takes
(qt, st.t()) of quantize_dual for dy and for x (tokens padded to a multiple of 128 with zeros).

How torch expresses this (torch 2.9-2.11, aten/src/ATen/native/cuda/ScaledBlas.cpp,
PR #158037): `torch._scaled_mm(a, b_KN, scale_a, scale_b, out_dtype=...)` with b_KN column-major
(we pass b.t()); the recipe is inferred from the scale shapes and strides, no ScalingType
argument: scale_a [M, ceil(K/128)] with strides (1, M) is BlockWise1x128; scale_b is given for
b_KN, so its transpose must be [ceil(N/128), ceil(K/128)] row-major (BlockWise128x128) or
[N, ceil(K/128)] with strides (1, N) (BlockWise1x128): we pass sb.t() in both cases. out_dtype
must be explicit (PR #164844). Only sm90 has these kernels (Blackwell emulates via MXFP8 in TE).

Shape rules (checked, with the fix in the message): K % 128 == 0 (the reduction dimension must
arrive in whole 128-blocks: zero-padding K is correct only when the producer wrote the zeros,
as quantize_dual does for tokens); N % 16 == 0 (cuBLAS); M is free: when M % 4 != 0 the operand
and its scales are zero-padded to a multiple of 4 rows (cuBLAS needs 16-byte aligned scale
columns) and the result is sliced back; when K/128 is not a multiple of 4 both operands are
zero-padded along K (see `_pad_k4`). Both pads are exact and cost a copy only on such shapes.

Why cuBLAS rather than this project's own kernel: csrc/fp8_grouped's Fprop kernel with one expert
is a dense 1x128 x 128x128 GEMM. Against torch._scaled_mm (twenty-sixth session, H100, 16 shapes
of 2048-16384 rows, 5 interleaved rounds) its outputs were bitwise the same at every shape (both
promote every 128 elements of K with the same arithmetic), its time 0.90-1.26x cuBLAS's, median
1.02x (1.08x / 1.26x at the narrow 8192x4096x1024 / 2048x1024x4096, 0.90x at 16384x6144x4096),
and its host time a call 30 us against 40. Its Wgrad kernel with one expert ran 0.62-0.78x: a
dense dW has a few hundred 128 x 256 tiles, and their last round leaves most SMs idle. Nothing
there is faster on the shapes that matter, so the dense GEMMs stay on cuBLAS.
"""
from __future__ import annotations

import functools

import torch

from . import reference
from .reference import BLOCK, E4M3, ceil_div

OUT_DTYPES = (torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def has_blockwise_kernels(device: torch.device | str | None = None) -> bool:
    """True where cuBLAS blockwise FP8 GEMMs run: a CUDA device of compute capability 9.0 (Hopper)."""
    if device is None:
        if not torch.cuda.is_available():
            return False
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device()) == (9, 0)


def _check_operand(q: torch.Tensor, name: str) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.dtype != E4M3:
        raise TypeError(f"{name} must be a 2-D float8_e4m3fn tensor (from models.fp8.quant), got "
                        f"{getattr(q, 'dtype', type(q).__name__)} {tuple(getattr(q, 'shape', ()))}")
    if not q.is_contiguous():
        raise ValueError(f"{name} must be contiguous (K-major rows), got strides {q.stride()}; "
                         "use the transposed copy the quantization kernel writes, not a .t() view")


def _check_mn_major(s: torch.Tensor, rows: int, kb: int, name: str) -> None:
    ok = s.dtype == torch.float32 and tuple(s.shape) == (rows, kb) and (
        s.numel() == 0  # an empty tensor's strides carry no layout
        or ((rows <= 1 or s.stride(0) == 1) and (kb <= 1 or s.stride(1) == rows)))
    if not ok:
        raise ValueError(f"{name} must be float32 [{rows}, {kb}] MN-major (strides (1, {rows}), i.e. its "
                         f".t() contiguous), got {s.dtype} {tuple(s.shape)} strides {s.stride()}; "
                         "use the scales models.fp8.quant returns")


def _check_blocks(s: torch.Tensor, nb: int, kb: int, name: str) -> None:
    if s.dtype != torch.float32 or tuple(s.shape) != (nb, kb) or not s.is_contiguous():
        raise ValueError(f"{name} must be float32 [{nb}, {kb}] contiguous (128x128 block scales), got "
                         f"{s.dtype} {tuple(s.shape)} strides {s.stride()}")


def _check_shapes(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must share K (out = a @ b^T)")
    if a.shape[1] % BLOCK:
        raise ValueError(f"K={a.shape[1]} must be a multiple of 128 for block-scaled GEMMs; keep this "
                         "layer in bf16 or pad the reduction dimension with zeros before quantizing")
    if b.shape[0] % 16:
        raise ValueError(f"N={b.shape[0]} must be a multiple of 16 (cuBLAS FP8); keep this layer in bf16")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device} but b is on {b.device}")


def _check_operands(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> int:
    """What both GEMMs check of a, b and the output dtype; returns K / 128."""
    _check_operand(a, "a")
    _check_operand(b, "b")
    _check_shapes(a, b, out_dtype)
    return a.shape[1] // BLOCK


def _padded(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """q zero-padded to [rows, cols] (zeros contribute nothing to a product)."""
    out = torch.zeros(rows, cols, dtype=q.dtype, device=q.device)
    out[:q.shape[0], :q.shape[1]] = q
    return out


def _pad_rows4(a: torch.Tensor, sa: torch.Tensor):
    """a [M, K] and its MN-major scales with M rounded up to a multiple of 4 (cuBLAS aligns
    scale columns to 16 bytes)."""
    M, K = a.shape
    M4 = ceil_div(M, 4) * 4
    sa4 = torch.ones(sa.shape[1], M4, dtype=sa.dtype, device=sa.device)
    sa4[:, :M] = sa.t()
    return _padded(a, M4, K), sa4.t()


def _pad_k4(a, sa, b, sb, b_blocks: bool):
    """Zero-pad K to a multiple of 512 (K/128 to a multiple of 4).

    cuBLAS reads 128x128 scales with a leading dimension of round_up(K/128, 4) (its 16-byte
    alignment; torch's v2 API spells it "L4"), and torch versions disagree on how the legacy
    _scaled_mm call expresses that; with K/128 a multiple of 4 every version agrees. Without
    this, _scaled_mm's 1x128 x 128x128 result is silently wrong when K/128 is not a multiple of 4
    (pytorch/ao PR #4209: fine at K/128 = 1000, SQNR -71 dB at 1001 and 1002). The 1x128 x 1x128
    (Wgrad) GEMM gets the same padding as insurance: there K is the token count, and it costs a
    copy only when that is not a multiple of 512. Zero columns with scale 1 are exact.
    """
    (M, K), N = a.shape, b.shape[0]
    kb, kb4 = K // BLOCK, ceil_div(K // BLOCK, 4) * 4
    return (_padded(a, M, kb4 * BLOCK), _pad_mn_major(sa, kb4), _padded(b, N, kb4 * BLOCK),
            _pad_blocks(sb, kb4) if b_blocks else _pad_mn_major(sb, kb4))


def _pad_mn_major(s, kb4):
    """MN-major scales [R, Kb] (strides (1, R)) widened to [R, kb4] with ones."""
    out = torch.ones(kb4, s.shape[0], dtype=s.dtype, device=s.device)
    out[:s.shape[1]] = s.t()
    return out.t()


def _pad_blocks(s, kb4):
    """Contiguous 128x128 block scales [Nb, Kb] widened to [Nb, kb4] with ones."""
    out = torch.ones(s.shape[0], kb4, dtype=s.dtype, device=s.device)
    out[:, :s.shape[1]] = s
    return out


def _scaled_mm(a, sa, b, sb, out_dtype, blocks_128x128: bool):
    M = a.shape[0]
    if M == 0 or a.shape[1] == 0:  # no rows, or no tokens to reduce over (an empty Wgrad)
        return torch.zeros(M, b.shape[0], dtype=out_dtype, device=a.device)
    if not has_blockwise_kernels(a.device):
        raise RuntimeError(f"block-scaled FP8 GEMMs need an sm90 (Hopper) GPU; {a.device} is not one. "
                           "Use fp8.recipe=off, or CPU tensors for the reference path")
    if (a.shape[1] // BLOCK) % 4:
        a, sa, b, sb = _pad_k4(a, sa, b, sb, b_blocks=blocks_128x128)
    if M % 4:
        a, sa = _pad_rows4(a, sa)
    out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.t(), out_dtype=out_dtype)
    return out[:M] if out.shape[0] != M else out


def gemm_1x128_128x128(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16, check: bool = True) -> torch.Tensor:
    """out[M, N] = (a, 1x128 scales) @ (b, 128x128 scales)^T: Fprop and Dgrad.

    check=False skips the operand checks, for operands that come straight from models.fp8.quant
    (the FP8 modules' own calls): they cost about 17 us of host time a call on an H100 host,
    which a launch-bound step (a few thousand tokens) pays in full."""
    if check:
        kb = _check_operands(a, b, out_dtype)
        _check_mn_major(sa, a.shape[0], kb, "sa")
        _check_blocks(sb, ceil_div(b.shape[0], BLOCK), kb, "sb")
    if a.device.type == "cpu":
        return reference.gemm_1x128_128x128(a, sa, b, sb).to(out_dtype)
    return _scaled_mm(a, sa, b, sb, out_dtype, blocks_128x128=True)


def gemm_1x128_1x128(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                     out_dtype: torch.dtype = torch.float32, check: bool = True) -> torch.Tensor:
    """out[M, N] = (a, 1x128 scales) @ (b, 1x128 scales)^T: Wgrad, K = tokens. check: as above."""
    if check:
        kb = _check_operands(a, b, out_dtype)
        _check_mn_major(sa, a.shape[0], kb, "sa")
        _check_mn_major(sb, b.shape[0], kb, "sb")
    if a.device.type == "cpu":
        return reference.gemm_1x128_1x128(a, sa, b, sb).to(out_dtype)
    return _scaled_mm(a, sa, b, sb, out_dtype, blocks_128x128=False)
