"""ctypes binding of the Hopper grouped FP8 GEMMs in csrc/fp8_grouped/grouped.cu.

Same operands and layouts as the Triton kernels in models/fp8/grouped.py, which validates them
and calls `gemm` / `wgrad` here when `available()` (an sm90 GPU and a CUDA toolkit to build the
library with). What the CUDA kernels add over the Triton ones, and why: see grouped.cu's header.

Extra conditions of this path (grouped.py falls back to Triton when one fails, see `fits_*`):
operand bases and row strides 16-byte aligned (TMA); Fprop/Dgrad: N and K multiples of 128 (any
shape grouped_gemm takes; a last 128 x 256 tile may cover N only in part); Wgrad: 128 x 256
tiles, N a multiple of 128 and K of 256 (DeepSeek-V3's and `small`'s expert shapes all are) and
scales with unit stride along N / K; at most 1024 experts.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_lib import aligned16

MAX_EXPERTS = 1024


def build_script():
    """csrc/fp8_grouped/build.py as a module (it is a script, not part of a package)."""
    return cuda_lib.build_script("fp8_grouped")


def load_library(path) -> ctypes.CDLL:
    """The built library at `path`, with its C ABI declared."""
    lib = ctypes.CDLL(str(path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.fp8moe_grouped_fprop.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64, i64,
                                         ptr, i64, i32, ptr, i32, i32, i32, i32, i32, i32, i32,
                                         ptr, ctypes.c_char_p, i32]
    lib.fp8moe_grouped_wgrad.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, i64, i64,
                                         i32, i32, ptr, i32, i32, i32, i32, i32, i32, i32, ptr,
                                         ctypes.c_char_p, i32]
    lib.fp8moe_grouped_smem_bytes.restype = ctypes.c_size_t
    lib.fp8moe_grouped_persistent_clusters.argtypes = [i32, i32]
    lib.fp8moe_grouped_fprop_tile.argtypes = [i32, i32, i32, i32, ctypes.POINTER(i32),
                                              ctypes.POINTER(i32)]
    lib.fp8moe_grouped_fprop_tile.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    return load_library(build_script().ensure_built())


@functools.lru_cache(maxsize=None)
def unavailable_reason(index: int) -> str | None:
    """None when device `index` can run the CUDA kernels, else why not (cached per device)."""
    return cuda_lib.unavailable_reason(index, "fp8_grouped", _library,
                                       lambda lib: lib.fp8moe_grouped_smem_bytes())


def available(device: torch.device) -> bool:
    return device.type == "cuda" and unavailable_reason(device.index or 0) is None


def fits_gemm(a_q: torch.Tensor, b_q: torch.Tensor) -> bool:
    E, N, K = b_q.shape
    return (aligned16(a_q) and aligned16(b_q) and a_q.stride(0) % 16 == 0
            and b_q.stride(1) % 16 == 0 and b_q.stride(0) == N * b_q.stride(1)
            and N % 128 == 0 and K % 128 == 0 and 1 <= E <= MAX_EXPERTS)


def fits_wgrad(a_q, a_s, b_q, b_s, n_experts: int) -> bool:
    (_, N), (_, K) = a_q.shape, b_q.shape
    return (aligned16(a_q) and aligned16(b_q) and a_q.stride(1) % 16 == 0
            and b_q.stride(1) % 16 == 0 and N % 128 == 0 and K % 256 == 0
            and 1 <= n_experts <= MAX_EXPERTS
            and all(s.stride(1) == 1 and s.stride(0) % 4 == 0 and aligned16(s) for s in (a_s, b_s)))


CLUSTER = 1
"""CTAs per cluster. 2 pairs CTAs that share the `a` tile through TMA multicast (grouped.cu): it
is correct (the GPU tests pass with it) but measured 5-10% slower on an H100, so it is off. Wgrad
alone, measured again (tenth session, six bench cases, interleaved): 0.91-1.00x the kernel
without it, 0.90-0.96x with 128-wide tiles, although cuBLAS's Wgrad kernel runs in pairs. Fprop /
Dgrad at the power cap (thirtieth session, 2.5 s of back-to-back calls each): 0.88-0.95x on the
8-expert DeepSeek-V3 cells, fewer FLOPs a cycle at a higher clock (see
csrc/fp8_grouped/EXPERIMENTS.md)."""


def _mn_major(a_s: torch.Tensor) -> torch.Tensor:
    """The [T, K/128] scales as the kernel's TMA reads them: unit stride along T and a 16-byte
    aligned stride between K blocks (what the quantizers write; anything else is copied)."""
    if a_s.stride(0) == 1 and a_s.stride(1) % 4 == 0 and aligned16(a_s):
        return a_s
    T, kb = a_s.shape
    padded = torch.empty(kb, -(-T // 4) * 4, dtype=a_s.dtype, device=a_s.device)
    padded[:, :T] = a_s.t()
    return padded[:, :T].t()


def gemm(a_q, a_s, b_q, b_s, counts_E, out, m_tiles_bound: int) -> torch.Tensor:
    """out[t] = deq(a)[t] . deq(b[e(t)])^T into `out` [T, N] (bf16 or fp32); operands validated
    by grouped.grouped_gemm."""
    (T, K), (E, N, _) = a_q.shape, b_q.shape
    a_s = _mn_major(a_s)
    stream = cuda_lib.current_stream(a_q.device)
    cuda_lib.call(_library().fp8moe_grouped_fprop,
                  a_q.data_ptr(), a_q.stride(0), a_s.data_ptr(), a_s.stride(1),
                  b_q.data_ptr(), b_q.stride(1), b_s.data_ptr(), b_s.stride(0), b_s.stride(1),
                  b_s.stride(2), out.data_ptr(), out.stride(0),
                  int(out.dtype == torch.float32), counts_E.data_ptr(),
                  int(counts_E.dtype == torch.int64), T, N, K, E, m_tiles_bound, CLUSTER, stream)
    return out


def wgrad(a_q, a_s, b_q, b_s, counts_E, out, accumulate: bool) -> torch.Tensor:
    """out[e] (+)= deq(a)[rows of e]^T . deq(b)[rows of e] into `out` [E, N, K] (fp32 or bf16);
    operands (token-major) validated by grouped.grouped_wgrad."""
    (T, N), (_, K), E = a_q.shape, b_q.shape, counts_E.shape[0]
    padded_T = -(-T // 128) * 128
    stream = cuda_lib.current_stream(a_q.device)
    cuda_lib.call(_library().fp8moe_grouped_wgrad,
                  a_q.data_ptr(), a_q.stride(1), a_s.data_ptr(), a_s.stride(0), b_q.data_ptr(),
                  b_q.stride(1), b_s.data_ptr(), b_s.stride(0), out.data_ptr(), out.stride(0),
                  out.stride(1), int(out.dtype == torch.bfloat16), int(accumulate),
                  counts_E.data_ptr(), int(counts_E.dtype == torch.int64), T, padded_T, N, K, E,
                  CLUSTER, stream)
    return out
