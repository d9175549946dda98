"""FP8 block-scaled numerics (DeepSeek-V3 recipe), applied to a model by `convert`, never by `if fp8:`.

reference.py (pure torch, the truth every kernel is tested against), quant.py (Triton
quantization), gemm.py (dense block-scaled GEMMs through cuBLAS), grouped.py (grouped GEMMs of
the routed experts), linear.py (FP8Linear, FP8MLP), experts.py (FP8GroupedExperts), convert.py
(the module swap). On a machine without CUDA the Triton kernels can only run under Triton's interpreter, so
importing this package there sets TRITON_INTERPRET=1 (before any kernel is defined) unless the
environment already says otherwise: that is what lets the CPU test suite run the real kernels.
Under the interpreter it also applies `allow_runtime_loop_bounds_in_interpreter` (Triton 3.6's
interpreter with NumPy 2 cannot otherwise run a loop to a runtime bound, which every GEMM has).
"""
import os

import torch


def allow_runtime_loop_bounds_in_interpreter() -> None:
    """Triton 3.6's interpreter turns a loop bound into int() of a 1-element array, which NumPy 2
    rejects; the kernels loop to runtime bounds (K, an expert's token range), so give the
    interpreter's tensors an __index__ that takes the element. No effect on compiled kernels;
    a no-op where NumPy still converts such arrays, and idempotent."""
    import numpy as np
    import triton.runtime.interpreter as interp
    try:
        int(np.array([1]))
        return
    except TypeError:
        pass
    original = interp._patch_lang_tensor
    if getattr(original, "numpy2_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    patched.numpy2_fixed = True
    interp._patch_lang_tensor = patched


if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    allow_runtime_loop_bounds_in_interpreter()

from .config import FP8Config  # noqa: E402
from .convert import convert  # noqa: E402
from .linear import FP8Linear, invalidate_weight_caches  # noqa: E402

__all__ = ["FP8Config", "FP8Linear", "convert", "invalidate_weight_caches"]
