"""ctypes binding of SwiGLU's fused backward -> FP8 kernel, csrc/fp8_swiglu/swiglu_backward.cu.

Same contract as the Triton kernel of `models.fp8.experts.swiglu_backward_quantize` (that
docstring has the layouts; the .cu header has how the kernel makes all three outputs of a tile in
one CTA: the tile's amaxes first, then the tile recomputed from shared memory and stored).
swiglu_backward_quantize calls `swiglu_backward` here when `available(device)` (an sm90 GPU and
nvcc to build the library on first use) and `fits(...)`, and otherwise runs Triton:

  * q_h contiguous (validated by the caller) and 16-byte aligned;
  * da bf16 with unit column stride, its base and row stride 16-byte aligned (16-byte cp.async);
  * at least one row.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_lib
from .cuda_lib import aligned16


def load_library(path) -> ctypes.CDLL:
    """The built library at `path`, with its C ABI declared."""
    lib = ctypes.CDLL(str(path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.fp8moe_swiglu_backward.argtypes = [ptr, ptr, i64, i64, ptr, i64, i32, i32, i32,
                                           ptr, ptr, ptr, ptr, ptr, ptr, i32, i32,
                                           ptr, ctypes.c_char_p, i32]
    lib.fp8moe_swiglu_backward_smem_bytes.restype = ctypes.c_size_t
    return lib


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    return load_library(cuda_lib.build_script("fp8_swiglu").ensure_built())


@functools.lru_cache(maxsize=None)
def unavailable_reason(index: int) -> str | None:
    """None when device `index` can run the kernel, else why not (cached per device)."""
    return cuda_lib.unavailable_reason(index, "fp8_swiglu", _library,
                                       lambda lib: lib.fp8moe_swiglu_backward_smem_bytes())


def available(device: torch.device) -> bool:
    return device.type == "cuda" and unavailable_reason(device.index or 0) is None


def fits(q_h: torch.Tensor, da: torch.Tensor) -> bool:
    """Whether the kernel takes these (validated) inputs; see the module docstring."""
    return (q_h.shape[0] > 0 and aligned16(q_h) and da.dtype == torch.bfloat16
            and aligned16(da) and da.stride(0) % 8 == 0)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def swiglu_backward(q_h, s_h, da, pow2_scales: bool, dh, a) -> None:
    """Run the kernel into dh = (q_dh, s_dh, qt_dh, st_dh) and a = (qt_a, st_a), allocated by
    swiglu_backward_quantize; the caller checked `fits`."""
    (M, F2), (q_dh, s_dh, qt_dh, st_dh), (qt_a, st_a) = q_h.shape, dh, a
    index = q_h.device.index or 0
    cuda_lib.call(_library().fp8moe_swiglu_backward,
                  q_h.data_ptr(), s_h.data_ptr(), s_h.stride(0), s_h.stride(1),
                  da.data_ptr(), da.stride(0), M, F2 // 2, int(pow2_scales),
                  q_dh.data_ptr(), s_dh.data_ptr(), qt_dh.data_ptr(), st_dh.data_ptr(),
                  qt_a.data_ptr(), st_a.data_ptr(), qt_dh.shape[1], _sm_count(index),
                  cuda_lib.current_stream(q_h.device))
