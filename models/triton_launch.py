"""Launch a Triton kernel that runs thousands of times a step without the JIT's per-call work.

`kernel[grid](*args, **constexprs)` works out, on every call, which compiled variant of the kernel
the arguments select: it classifies each argument the way Triton specializes on it, hashes the
result with the constexprs and options into a cache key, looks the variant up, builds launch
metadata for profiler hooks, and only then launches. For the FP8 quantizers (15 runtime arguments,
10 constexprs) that is most of a launch's host cost: on an H100 host 24 us through the JIT against
7 us for the same compiled kernel launched directly, with bitwise the same outputs. A step of
small micro-batches is bound by that host time (models/fp8/linear.py's docstring).

    quantize = CachedLauncher(quant_tile_kernel)
    quantize[grid](x, q, s, M, K, COLWISE=True, num_warps=4)   # = quant_tile_kernel[grid](...)

`CachedLauncher` keys the variant on what Triton 3.6 specializes on - each tensor's dtype and
whether its address is 16-byte aligned; each integer's being 1, a multiple of 16, and its width
(int32, int64 or uint64); the kind of any other value - plus the current device and every keyword
(constexprs and launch options). A key is at least as fine as Triton's own, so a hit is the variant
the JIT would have picked. The first call with a new key goes through the JIT (compiling if need
be, and launching) and keeps the CompiledKernel it returns; later calls launch it through its
`run`, the launcher Triton itself calls.

It takes the plain JIT launch instead:
  - when the environment says FP8MOE_DIRECT_LAUNCH=0 (for comparing, or ruling it out);
  - under the interpreter (TRITON_INTERPRET=1, the CPU test suite), which has no compiled kernels;
  - on a Triton other than 3.6: `CompiledKernel.run`'s arguments are Triton's internals, and this
    module was checked against 3.6 only (tests/test_triton_launch.py compares both launches);
  - while a launch hook is installed (triton.knobs.runtime.launch_enter_hook / _exit_hook, which
    profilers such as Proton add): hooks expect the launch metadata the JIT builds;
  - for a call whose keywords leave a constexpr to its default, or that passes an argument of a
    kind the key does not know (the JIT resolves those).
A variant, once kept, is not compiled again: Triton settings that change code generation
mid-run (triton.knobs.runtime.debug, say) reach only variants first seen after the change.
"""
from __future__ import annotations

import os

import torch

from models.triton_env import INTERPRET  # before triton: the interpreter on CPU-only machines
import triton  # noqa: E402
from triton import knobs  # noqa: E402

CHECKED_TRITON = ("3", "6")
"""The Triton release (major, minor) whose CompiledKernel.run calling convention this follows."""

ENABLED = (not INTERPRET and tuple(triton.__version__.split(".")[:2]) == CHECKED_TRITON
           and os.environ.get("FP8MOE_DIRECT_LAUNCH", "1") != "0")


def _int_class(v: int) -> tuple:
    """What Triton specializes an integer on: 1 (folded into the kernel), divisible by 16, and
    its width (int32 when it fits, uint64 from 2**63, int64 otherwise)."""
    width = 0 if -2 ** 31 <= v < 2 ** 31 else (2 if v >= 2 ** 63 else 1)
    return (v == 1, v % 16 == 0, width)


def specialization_key(args) -> tuple | None:
    """The properties of `args` a compiled variant depends on, or None for an argument kind this
    module does not classify (the caller then launches through the JIT)."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None:
            key.append(a)  # bool: not specialized (a u1), but cheap to key on
        elif isinstance(a, int):
            key.append(_int_class(a))
        elif isinstance(a, float):
            key.append(float)  # fp32, never specialized
        else:
            return None
    return tuple(key)


def _hooks_installed() -> bool:
    return bool(knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls)


class CachedLauncher:
    """`launcher[grid](*args, **keywords)` (or `launcher(grid, *args, **keywords)`) does what
    `kernel[grid](*args, **keywords)` does: args are the kernel's runtime arguments in order,
    keywords its constexprs (every one, by name) and launch options (num_warps, ...). See the
    module docstring."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self._variants: dict = {}  # key -> (CompiledKernel, the constexpr values in order)
        self.direct_launches = 0   # launches that skipped the JIT (for tests and curiosity)

    def __getitem__(self, grid: tuple):
        return lambda *args, **keywords: self(grid, *args, **keywords)

    def __call__(self, grid: tuple, *args, **keywords) -> None:
        if not ENABLED or _hooks_installed():
            self.kernel[grid](*args, **keywords)
            return
        args_key = specialization_key(args)
        device = torch.cuda.current_device()
        key = (device, args_key, tuple(keywords.items()))
        variant = self._variants.get(key) if args_key is not None else None
        if variant is None:
            compiled = self.kernel[grid](*args, **keywords)
            self._remember(key, args_key, len(args), keywords, compiled)
            return
        compiled, constexprs = variant
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        compiled.run(grid3[0], grid3[1], grid3[2], torch._C._cuda_getCurrentRawStream(device),
                     compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *constexprs)
        self.direct_launches += 1

    def _remember(self, key, args_key, n_args: int, keywords: dict, compiled) -> None:
        """Keep `compiled` for `key` when a direct launch can reproduce this call: every
        parameter after the runtime arguments given by keyword, and a CompiledKernel back."""
        names = self.kernel.arg_names[n_args:]
        if args_key is None or any(n not in keywords for n in names):
            return
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return
        self._variants[key] = (compiled, tuple(keywords[n] for n in names))
