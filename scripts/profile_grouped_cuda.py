"""Run one CUDA grouped FP8 GEMM a few times so a profiler can look inside it.

    ncu --clock-control none -k regex:grouped_ --launch-skip 2 --launch-count 1 --set full \
        -o grouped python scripts/profile_grouped_cuda.py --case 0 --op fwd

The case index picks a row of scripts/bench_fp8_grouped.py's GEMM_CASES (its operands are made the
same way); --op is fwd, dgrad or wgrad. The first calls build the library and warm up, so skip
them in the profiler (--launch-skip). Prints the op's time per call as a sanity check, under the
profiler's overhead when one is attached.

    python scripts/profile_grouped_cuda.py --op wgrad --define WGRAD_DIAG=2   # a variant build
    python scripts/profile_grouped_cuda.py --op wgrad --fill 0x38   # constant operands

--define (repeatable) builds grouped.cu with those switches (the `#ifndef NAME` ones, as
scripts/sweep_grouped_cuda.py does) into a temporary library and profiles that instead of the
default build; a diagnostic build's output is wrong on purpose, only its timing means anything.

With `--set full` the report holds ncu's per-instruction source view; scripts/ncu_source.py
summarizes its CSV export (hottest instructions, one main-loop iteration's instruction mix).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_fp8_grouped as bench  # noqa: E402
import sweep_grouped_cuda as sweep  # noqa: E402


def fill_byte(text: str) -> int:
    """--fill's value: a byte (decimal or 0x..) that is not E4M3's NaN (0x7f or 0xff)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give a byte such as 0x38")
    if not 0 <= value <= 255 or value & 0x7F == 0x7F:
        raise argparse.ArgumentTypeError(f"{text}: pick a byte 0..0xff other than E4M3's NaN "
                                         "(0x7f, 0xff)")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", type=int, default=0, help="index into GEMM_CASES")
    parser.add_argument("--op", choices=("fwd", "dgrad", "wgrad"), default="fwd")
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--fill", type=fill_byte, default=None, metavar="BYTE",
                        help="overwrite the FP8 operands with this byte (e.g. 0x38, 1.0 in "
                        "E4M3): constant data, to see what the data's bits cost (timing only)")
    parser.add_argument("--define", action="append", default=[], metavar="NAME=VALUE",
                        help="build grouped.cu with -DNAME=VALUE (repeat for several)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("profile_grouped_cuda.py needs an sm90 (Hopper) GPU: the kernels use "
                         "WGMMA and TMA")
    if not 0 <= args.case < len(bench.GEMM_CASES):
        raise SystemExit(f"--case {args.case}: pick 0..{len(bench.GEMM_CASES) - 1} of "
                         + ", ".join(c.label for c in bench.GEMM_CASES))
    case = bench.GEMM_CASES[args.case]
    with tempfile.TemporaryDirectory() as folder:
        if args.define:
            library = sweep.build_variants([("variant", tuple(args.define))], folder)["variant"]
            sweep.use_library(library)
        profile(case, args.op, args.calls, args.fill)


def profile(case, op: str, calls: int, fill: int | None = None) -> None:
    ops = bench._operands(case)
    if fill is not None:
        for key in ("x8", "dy8"):  # the row-wise and the token-major copies, not their scales
            q, _, qt, _ = ops[key]
            q.view(torch.uint8).fill_(fill)
            qt.view(torch.uint8).fill_(fill)
    run = bench._ours(ops, case.experts * case.tokens)[op]
    cfg = bench.CUDA
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(calls):
        start.record()
        run(cfg)
        stop.record()
        torch.cuda.synchronize()
    print(f"{case.label} {op}: {start.elapsed_time(stop):.3f} ms (last call)")


if __name__ == "__main__":
    main()
