"""Time compile-time variants of the CUDA grouped FP8 kernels (csrc/fp8_grouped) against each other.

    python scripts/sweep_grouped_cuda.py                   # Fprop/Dgrad tile width 256 vs 192
    python scripts/sweep_grouped_cuda.py --variant base= --variant n128=FPROP_BN=128
    python scripts/sweep_grouped_cuda.py --cases 2 --ops fwd,wgrad
    python scripts/sweep_grouped_cuda.py --extra --ops fwd    # and the rest of the issue's grid
    python scripts/sweep_grouped_cuda.py --match 'E8x' --steady 2.5   # at the power cap
    python scripts/sweep_grouped_cuda.py --match 'E8x' --steady 3 --power   # and energy a call
    python scripts/sweep_grouped_cuda.py --diagnostic --variant a= --variant d=WGRAD_DIAG=1

grouped.cu keeps its design choices behind `#ifndef NAME` switches so that a choice is measured,
not guessed. Each variant (a name and its -D definitions) is built into its own library, loaded
with grouped_cuda.load_library, and timed on the operands of scripts/bench_fp8_grouped.py's
GEMM cases, one op at a time, every variant on the same operands in interleaved rounds (ROUNDS),
the per-expert cuBLAS blockwise loop timed in the same rounds. Every variant's output is first
checked against the loop (calc_diff < 1e-3); one that fails is reported and not timed, unless
--diagnostic asks for builds that leave out part of the work on purpose (to time that part). Not a
bench_* script: scripts/gpu_check.sh does not run it (bench_fp8_grouped.py reports the defaults).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_fp8_grouped as bench  # noqa: E402
from timing import interleaved_ms, tflops  # noqa: E402
from models.fp8 import grouped_cuda  # noqa: E402

DEFAULT_VARIANTS = ("n256=FPROP_BN=256", "n192=FPROP_BN=192")
ROUNDS = 3
LOOP = "cuBLAS loop"
"""Each variant, and the loop, is timed once per round, the rounds interleaved (every other one in
reverse order: timing.interleaved_ms), and the median kept."""


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """'name=DEF1=V1,DEF2=V2' -> (name, ('DEF1=V1', 'DEF2=V2')); 'name=' has no definitions."""
    name, _, defines = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=[DEFINE=VALUE,...]")
    return name, tuple(d for d in defines.split(",") if d)


def build_variants(variants, folder: str, build=None, load=None) -> dict:
    """{name: loaded library} of each (name, defines) variant, built into `folder` by `build` (a
    csrc/<folder>/build.py module; default csrc/fp8_grouped's) and loaded by `load` (default
    grouped_cuda.load_library). scripts/sweep_quant_cuda.py builds its kernels' variants here."""
    build = build or grouped_cuda.build_script()
    load = load or grouped_cuda.load_library
    libraries = {}
    for name, defines in variants:
        path, _ = build.build_library(os.path.join(folder, f"lib_{name}.so"), defines=defines)
        libraries[name] = load(path)
        print(f"built {name}: {' '.join('-D' + d for d in defines) or '(defaults)'}")
    return libraries


def use_library(lib) -> None:
    """Route grouped_cuda's calls to `lib` (its entry points look the library up on each call)."""
    grouped_cuda._library = lambda: lib


def sweep_case(case, ops, libraries, rounds: int = 3, diagnostic: bool = False,
               steady_s: float | None = None, power: bool = False) -> list[tuple]:
    """One case's rows (label, op, {variant: TFLOPS}, loop TFLOPS, {name: (W, MHz, TFLOP/kJ)}),
    the last empty unless `power` (steady timing only)."""
    T = case.experts * case.tokens
    flops = 2 * T * case.N * case.K
    operands = bench._operands(case)
    one = bench._cublas_one(operands)
    ours, loop = bench._ours(operands, T), bench._cublas_loop(one, case.experts)
    rows = []
    for op in ops:
        correct = {}
        for name, lib in libraries.items():
            use_library(lib)
            diff = bench._check_against_loop(ours, one, op, bench.CUDA, case.experts, case.tokens)
            correct[name] = diff < 1e-3 or diagnostic
            if diff >= 1e-3:
                print(f"  {case.label} {op} {name}: calc_diff {diff:.2e} against the loop: WRONG"
                      + (" (timed anyway: --diagnostic)" if diagnostic else ""))
        fns = {name: (lambda lib=libraries[name], run=ours[op]: (use_library(lib), run(bench.CUDA)))
               for name, ok in correct.items() if ok}
        fns[LOOP] = loop[op]
        samples = {} if power else None
        times = interleaved_ms(fns, rounds, steady_s=steady_s, power=samples)
        energy = energy_table(flops, times, samples) if power else {}
        loop_tf = tflops(flops, times.pop(LOOP))
        figures = {name: tflops(flops, times[name]) if name in times else float("nan")
                   for name in libraries}
        rows.append((case.label, op, figures, loop_tf, energy))
        print(f"  {case.label} {op}: " + "  ".join(f"{n} {v:.0f}" for n, v in figures.items())
              + f"  | loop {loop_tf:.0f} TFLOPS" + "".join(
                  f"; {n} {w:.0f} W {mhz:.0f} MHz {eff:.3f} TFLOP/J"
                  for n, (w, mhz, eff) in energy.items()), flush=True)
    del operands, one, ours, loop
    torch.cuda.empty_cache()
    return rows


def energy_table(flops: float, times: dict, samples: dict) -> dict:
    """{name: energy_figures} of each fn timed with power samples; a fn that failed
    (interleaved_ms: time nan, perhaps no samples) is left out, as its TFLOPS are nan."""
    return {name: energy_figures(flops, times[name], got) for name, got in samples.items()
            if got and not math.isnan(times[name])}


def energy_figures(flops: float, ms: float, samples: list) -> tuple[float, float, float]:
    """(W, MHz, TFLOP per joule) of one fn over its rounds: the median round's power and clock,
    and the work per joule at that power and the median time."""
    watts = statistics.median(w for w, _ in samples)
    mhz = statistics.median(m for _, m in samples)
    return watts, mhz, flops / 1e12 / (watts * ms / 1e3)


def print_table(rows, names) -> None:
    first = names[0]
    print(f"\n{'case':<38}{'op':<7}" + "".join(f"{n:>12}" for n in names) + f"{'loop':>8}"
          + "".join(f"{n + '/loop':>14}" for n in names) + f"  (TFLOPS; ratios of {first}: "
          + ", ".join(f"{n}/{first}" for n in names[1:]) + ")")
    for label, op, figures, loop_tf, _ in rows:
        print(f"{label:<38}{op:<7}" + "".join(f"{figures[n]:>12.0f}" for n in names)
              + f"{loop_tf:>8.0f}" + "".join(f"{figures[n] / loop_tf:>13.2f}x" for n in names)
              + "  " + " ".join(f"{figures[n] / figures[first]:.3f}" for n in names[1:]))
    if not any(energy for *_, energy in rows):
        return
    print(f"\n{'case':<38}{'op':<7}" + "".join(f"{n:>16}" for n in [*names, LOOP])
          + "  (TFLOP per joule at the W / MHz measured; at the power cap time follows energy)")
    for label, op, _, _, energy in rows:
        print(f"{label:<38}{op:<7}" + "".join(
            f"{energy[n][2]:>7.3f} {energy[n][0]:>3.0f}/{energy[n][1]:<4.0f}"
            if n in energy else f"{'-':>16}" for n in [*names, LOOP]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME=DEFINE=VALUE[,DEFINE=VALUE...] (repeat; default: "
                             + " ".join(DEFAULT_VARIANTS) + ")")
    parser.add_argument("--cases", type=int, default=len(bench.GEMM_CASES),
                        help="the first N of bench_fp8_grouped.GEMM_CASES")
    parser.add_argument("--extra", action="store_true",
                        help="also bench_fp8_grouped.EXTRA_GEMM_CASES (the rest of the issue's "
                             "grid)")
    parser.add_argument("--ops", default="fwd,dgrad,wgrad")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--match", default="",
                        help="only the cases whose label ('dsv3-up E8x4096 4096x7168') this "
                             "regular expression matches")
    parser.add_argument("--steady", type=float, default=None, metavar="SECONDS",
                        help="time each variant at steady state: back to back for SECONDS, the "
                             "last 60%% timed (timing.steady_ms), instead of short batches")
    parser.add_argument("--power", action="store_true",
                        help="with --steady: also the GPU's power and SM clock while each timing "
                             "runs (timing.PowerSampler, nvidia-smi) and the work per joule")
    parser.add_argument("--diagnostic", action="store_true",
                        help="time variants whose output is wrong too (builds that leave out part "
                             "of the work, to see what that part costs)")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("sweep_grouped_cuda.py needs an sm90 (Hopper) GPU: the kernels use "
                         "WGMMA and TMA")
    if args.power and args.steady is None:
        raise SystemExit("--power needs --steady SECONDS: power is sampled at steady state")
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    ops = [op for op in args.ops.split(",") if op]
    print(f"== CUDA grouped kernel variants on {torch.cuda.get_device_name()}")
    with tempfile.TemporaryDirectory() as folder:
        libraries = build_variants(variants, folder)
        rows = []
        cases = bench.GEMM_CASES[:args.cases] + (bench.EXTRA_GEMM_CASES if args.extra else [])
        for case in cases:
            if re.search(args.match, case.label):
                rows += sweep_case(case, ops, libraries, args.rounds, args.diagnostic,
                                   args.steady, args.power)
    print_table(rows, list(libraries))


if __name__ == "__main__":
    main()
