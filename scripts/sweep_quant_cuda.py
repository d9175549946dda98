"""Time compile-time variants of the CUDA quantization kernels against each other and a copy.

    python scripts/sweep_quant_cuda.py --kernel swiglu --variant base= --variant x=SOME_SWITCH=1
    python scripts/sweep_quant_cuda.py --kernel norm --shapes 32768x7168,16384x4096 --variant ...
    python scripts/sweep_quant_cuda.py --kernel swiglu --diagnostic --variant base= --variant ...

The kernels are csrc/fp8_swiglu's SwiGLU backward (`--kernel swiglu`, shapes are h = [gate | up]
[M, 2F]) and csrc/fp8_norm's RMSNorm -> FP8 (`--kernel norm`, x [M, K]). As in
scripts/sweep_grouped_cuda.py, each variant (a name and -D definitions for the .cu's `#ifndef`
switches; `name=` builds the source as it is) is built into its own library and loaded beside the
others, and the kernel's module is pointed at one library at a time.

Every variant's outputs are first compared bitwise with the first variant's, on ragged shapes
(a last row block of one row, a single row with power-of-two scales) and on every timed shape; a
variant that differs is reported and not timed, unless --diagnostic asks for builds that leave out
part of the work on purpose (to time that part; also the way to time an RMSNorm variant that adds
the squares in another order, whose rstd may then differ in a last bit: the GPU tests judge it
against the reference). Then, per shape, a device-to-device copy of the
input and every variant are timed in interleaved rounds (timing.interleaved_ms) and each figure is
given as the share of the copy's bandwidth, counting the bytes the operation must move
(scripts/bench_fp8.py's bookkeeping: dual_bytes, swiglu_backward_bytes). Not a bench_* script:
scripts/gpu_check.sh does not run it (bench_fp8.py reports the defaults).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_fp8 import dual_bytes, swiglu_backward_bytes  # noqa: E402
from sweep_grouped_cuda import build_variants, parse_variant  # noqa: E402
from sweep_quant import same  # noqa: E402
from timing import interleaved_ms  # noqa: E402

KERNELS = {"swiglu": "fp8_swiglu", "norm": "fp8_norm"}
"""--kernel: the csrc/ folder its source is built from."""
CHECK_SHAPES = ((4097, 3072), (1, 256), (300, 7168))
"""Ragged shapes every variant is compared on before any timing (the 1-row one with power-of-two
scales), besides the timed shapes."""
ROUNDS = 5


def bytes_moved(kernel: str, M: int, K: int) -> int:
    return swiglu_backward_bytes(M, K) if kernel == "swiglu" else dual_bytes(M, K)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'32768x7168,16384x4096' -> [(32768, 7168), (16384, 4096)]."""
    shapes = []
    for part in (p for p in text.split(",") if p):
        m, _, k = part.partition("x")
        if not (m.isdigit() and k.isdigit()) or int(m) < 1 or int(k) % 256:
            raise SystemExit(f"--shapes {part!r}: expected MxK with K a multiple of 256 (the "
                             "SwiGLU backward's h = [gate | up] needs F = K / 2 in 128-wide tiles)")
        shapes.append((int(m), int(k)))
    return shapes


def kernel_module(kernel: str):
    """The module that calls the kernel's library (models.fp8.swiglu_cuda / norm_cuda)."""
    from models.fp8 import norm_cuda, swiglu_cuda
    return swiglu_cuda if kernel == "swiglu" else norm_cuda


def use_library(module, lib) -> None:
    """Route `module`'s calls to `lib`. The norm module caches how many tiles a CTA holds, which
    depends on the library's shared-memory layout: recomputed when the library changes."""
    if getattr(module, "_sweep_library", None) is lib:
        return
    module._library = lambda: lib
    module._sweep_library = lib
    if hasattr(module, "max_tiles"):
        module.max_tiles.cache_clear()


def make_call(kernel: str, M: int, K: int, pow2: bool = False):
    """(the call on fresh random inputs, the input a copy of which is the baseline)."""
    from models.fp8 import quant
    from models.fp8.experts import swiglu_backward_quantize
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 2
    if kernel == "swiglu":
        q_h, s_h = quant.quantize_1x128(x, check_finite=False)
        da = torch.randn(M, K // 2, device="cuda", dtype=torch.bfloat16)
        return (lambda: swiglu_backward_quantize(q_h, s_h, da, pow2_scales=pow2)), x
    w = torch.randn(K, device="cuda", dtype=torch.bfloat16)
    return (lambda: quant.rmsnorm_quantize(x, w, pow2_scales=pow2, check_finite=False)), x


def check_variants(kernel: str, libraries: dict, shapes, diagnostic: bool) -> dict:
    """{name: library} of the variants whose outputs equal the first's on every shape."""
    module, names = kernel_module(kernel), list(libraries)
    kept = dict(libraries)
    for M, K in (*CHECK_SHAPES, *shapes):
        call, _ = make_call(kernel, M, K, pow2=M == 1)
        use_library(module, libraries[names[0]])
        expected = call()
        for name in names[1:]:
            use_library(module, libraries[name])
            if name in kept and not same(call(), expected):
                print(f"  {name} differs from {names[0]} at {M}x{K}"
                      + (" (timed anyway: --diagnostic)" if diagnostic else ": not timed"))
                if not diagnostic:
                    del kept[name]
        del call, expected
    torch.cuda.synchronize()
    return kept


def sweep_shape(kernel: str, libraries: dict, M: int, K: int, rounds: int) -> dict:
    """{name: share of the copy's bandwidth} at one shape."""
    module = kernel_module(kernel)
    call, x = make_call(kernel, M, K)
    copy_out = torch.empty_like(x)
    fns = {"copy": lambda: copy_out.copy_(x)}
    for name, lib in libraries.items():
        fns[name] = lambda lib=lib: (use_library(module, lib), call())
    ms = interleaved_ms(fns, rounds)
    copy_gbs = 4 * x.numel() / ms.pop("copy") / 1e6
    nbytes = bytes_moved(kernel, M, K)
    shares = {name: nbytes / ms[name] / 1e6 / copy_gbs for name in libraries}
    print(f"  {M}x{K}: copy {copy_gbs:.0f} GB/s; "
          + "; ".join(f"{n} {ms[n] * 1e3:.0f} us ({s:.1%})" for n, s in shares.items()), flush=True)
    return shares


def print_table(kernel: str, rows: list, names: list) -> None:
    first = names[0]
    print(f"\n{kernel}: share of a D2D copy's bandwidth (ratios to {first} on the right)")
    print(f"{'shape':<14}" + "".join(f"{n:>10}" for n in names)
          + "".join(f"{n + '/' + first:>16}" for n in names[1:]))
    for (M, K), shares in rows:
        print(f"{f'{M}x{K}':<14}" + "".join(f"{shares.get(n, float('nan')):>10.1%}" for n in names)
              + "".join(f"{shares.get(n, float('nan')) / shares[first]:>16.3f}"
                        for n in names[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=sorted(KERNELS), required=True)
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME=[DEFINE=VALUE,...] (repeat; the first is the reference)")
    parser.add_argument("--shapes", default="32768x7168,65536x3072,16384x4096,8192x3072")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--diagnostic", action="store_true",
                        help="time variants whose outputs differ too")
    args = parser.parse_args()
    shapes = parse_shapes(args.shapes)
    variants = [parse_variant(v) for v in args.variant]
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("sweep_quant_cuda.py needs an sm90 (Hopper) GPU: the kernels use TMA, "
                         "clusters and FP8 conversions")
    from models.fp8 import cuda_lib
    module = kernel_module(args.kernel)
    print(f"== CUDA {args.kernel} kernel variants on {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as folder:
        libraries = build_variants(variants, folder, cuda_lib.build_script(KERNELS[args.kernel]),
                                   module.load_library)
        kept = check_variants(args.kernel, libraries, shapes, args.diagnostic)
        rows = [((M, K), sweep_shape(args.kernel, kept, M, K, args.rounds)) for M, K in shapes]
    print_table(args.kernel, rows, list(libraries))


if __name__ == "__main__":
    main()
