"""Where this project's Triton kernels run: compiled on a CUDA machine, interpreted elsewhere.

Triton compiles kernels for GPUs only; on a CPU-only machine its interpreter runs the very same
kernel code on CPU tensors (slowly), which is how the CPU test suite checks every kernel. The
interpreter is chosen by TRITON_INTERPRET=1, which must be set before `triton` is imported, so
every module that defines a kernel imports this one first:

    from models.triton_env import INTERPRET   # before `import triton`

On a machine without CUDA that sets TRITON_INTERPRET=1 unless the environment already says
otherwise. Under the interpreter it also applies `allow_runtime_loop_bounds_in_interpreter`
(Triton 3.6's interpreter with NumPy 2 cannot otherwise run a loop to a runtime bound, which every
GEMM has). `INTERPRET` is the one place the rest of the code asks which of the two it is.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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


if INTERPRET:
    allow_runtime_loop_bounds_in_interpreter()
