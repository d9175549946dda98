"""Summarize Nsight Compute's per-instruction source view of one kernel: where its warps stall,
and what one iteration of its main loop issues.

ncu samples every warp's state at a fixed interval and, with the SourceCounters section (in
`--set full`), attributes the samples and the execution counts to each SASS instruction. Exported
as CSV, that view answers the questions a kernel comparison comes down to:

    # on the GPU machine (profile_grouped_cuda.py runs one of our grouped kernels)
    ncu --set full -k regex:grouped_wgrad --launch-skip 2 --launch-count 1 -o ours \
        python scripts/profile_grouped_cuda.py --op wgrad
    ncu -i ours.ncu-rep --page source --csv --print-source sass > ours.csv
    # anywhere
    python scripts/ncu_source.py ours.csv                # hottest instructions, stall totals
    python scripts/ncu_source.py ours.csv --loop          # one main-loop iteration's mix

The main loop is found from the warpgroup MMAs (HGMMA/QGMMA/...GMMA): the iteration count is the
execution count of the most executed one, and an instruction belongs to the loop when it ran
between 0.9 and 2.1 times that often (once or twice an iteration: a loop body with two inlined
halves runs some of its bookkeeping twice). Counts are per warp, as ncu counts them. The same
export of a cuBLAS kernel (its SASS is not readable any other way: cuobjdump finds no nvjet
kernel in libcublasLt) gives the comparison csrc/fp8_grouped/EXPERIMENTS.md quotes.
"""
from __future__ import annotations

import argparse
import csv
import re
from collections import Counter
from dataclasses import dataclass, field

MMA = re.compile(r"^[A-Z]?GMMA$")  # HGMMA (16-bit), QGMMA (FP8), IGMMA (int8)


@dataclass
class Instruction:
    source: str
    executed: int
    samples: int
    stalls: dict[str, int] = field(default_factory=dict)

    @property
    def opcode(self) -> str:
        """The mnemonic without its predicate and modifiers: '@!P0 BRA 0x10' -> 'BRA'."""
        words = self.source.split()
        word = words[1] if words and words[0].startswith("@") and len(words) > 1 else words[0]
        return word.split(".")[0]


def read_source_csv(path: str) -> tuple[str, list[Instruction]]:
    """The kernel's name and its instructions, in address order, from ncu's
    `--page source --csv --print-source sass` export."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or not rows[0] or rows[0][0] != "Kernel Name":
        raise SystemExit(f"{path}: not an ncu source-page CSV (expected a 'Kernel Name' row "
                         "first: ncu -i REPORT --page source --csv --print-source sass)")
    kernel, header = rows[0][1], rows[1]
    column = {name: i for i, name in enumerate(header)}
    for needed in ("Source", "Instructions Executed", "# Samples"):
        if needed not in column:
            raise SystemExit(f"{path}: no '{needed}' column; profile with the SourceCounters "
                             "section (ncu --set full)")
    stall_columns = [name for name in header
                     if name.startswith("stall_") and "Not Issued" not in name]

    def number(row, name):
        text = row[column[name]].replace(",", "")
        return int(text) if text.isdigit() else 0

    instructions = [
        Instruction(row[column["Source"]].strip(), number(row, "Instructions Executed"),
                    number(row, "# Samples"),
                    {name[len("stall_"):]: number(row, name) for name in stall_columns})
        for row in rows[2:] if len(row) == len(header) and row[column["Source"]].strip()]
    return kernel, instructions


def loop_iterations(instructions: list[Instruction]) -> int:
    """How often the main loop ran (per warp, summed over warps): the execution count of the most
    executed warpgroup MMA."""
    counts = [i.executed for i in instructions if MMA.match(i.opcode)]
    if not counts:
        raise SystemExit("no warpgroup MMA (HGMMA/QGMMA) in this kernel: --loop needs one")
    return max(counts)


def loop_body(instructions: list[Instruction], iterations: int) -> list[Instruction]:
    return [i for i in instructions if 0.9 * iterations <= i.executed <= 2.1 * iterations]


def opcode_mix(body: list[Instruction], iterations: int) -> Counter:
    """Instructions issued per loop iteration, by opcode."""
    mix = Counter()
    for i in body:
        mix[i.opcode] += i.executed / iterations
    return mix


def stall_totals(instructions: list[Instruction]) -> Counter:
    totals = Counter()
    for i in instructions:
        totals.update(i.stalls)
    return totals


def top_stalls(i: Instruction, n: int = 2) -> str:
    ranked = sorted(((v, k) for k, v in i.stalls.items() if v), reverse=True)[:n]
    return " ".join(f"{k}:{v}" for v, k in ranked)


def report(kernel: str, instructions: list[Instruction], loop: bool, top: int) -> None:
    samples = sum(i.samples for i in instructions)
    print(f"{kernel}\n{len(instructions)} instructions, {samples} samples")
    scope = instructions
    if loop:
        iterations = loop_iterations(instructions)
        scope = loop_body(instructions, iterations)
        mix = opcode_mix(scope, iterations)
        in_loop = sum(i.samples for i in scope)
        print(f"main loop: {iterations} iterations, {sum(mix.values()):.1f} instructions an "
              f"iteration, {in_loop} samples ({100 * in_loop / max(samples, 1):.1f}%)")
        print("  " + ", ".join(f"{op} {n:.1f}" for op, n in mix.most_common()))
    totals = stall_totals(scope)
    scope_samples = max(sum(totals.values()), 1)
    print("stalls: " + ", ".join(f"{k} {100 * v / scope_samples:.1f}%"
                                 for k, v in totals.most_common(8)))
    print(f"\nhottest {top} instructions{' of the loop' if loop else ''}:")
    for i in sorted(scope, key=lambda i: -i.samples)[:top]:
        print(f"{i.samples:7d} {i.executed:10d}  {i.source[:80]:80s} {top_stalls(i)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass output")
    parser.add_argument("--loop", action="store_true",
                        help="restrict to the main loop and print its per-iteration mix")
    parser.add_argument("--top", type=int, default=25, help="how many hot instructions to list")
    args = parser.parse_args()
    kernel, instructions = read_source_csv(args.csv)
    report(kernel, instructions, args.loop, args.top)


if __name__ == "__main__":
    main()
