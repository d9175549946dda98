"""FP8 block-scaled numerics (DeepSeek-V3 recipe), applied to a model by `convert`, never by `if fp8:`.

reference.py (pure torch, the truth every kernel is tested against), quant.py (Triton
quantization), gemm.py (dense block-scaled GEMMs through cuBLAS), grouped.py (grouped GEMMs of
the routed experts), linear.py (FP8Linear, FP8MLP, FP8RMSNorm), experts.py (FP8GroupedExperts),
convert.py (the module swap), fake_quant.py (FP8's roundings emulated in fp32, each switchable,
for loss ablations). On a machine without CUDA the Triton kernels run under Triton's
interpreter (models/triton_env.py decides, before any kernel is defined): that is what lets the
CPU test suite run the real kernels.
"""
from models.triton_env import INTERPRET  # noqa: F401  (before any kernel module imports triton)

from .config import FP8Config  # noqa: E402
from .convert import convert  # noqa: E402
from .linear import FP8Linear, invalidate_weight_caches  # noqa: E402

__all__ = ["FP8Config", "FP8Linear", "convert", "invalidate_weight_caches"]
