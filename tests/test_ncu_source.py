"""scripts/ncu_source.py on a hand-written export in ncu's source-page CSV layout: the loop found
from the MMA's execution count, the per-iteration mix worked out by hand, a foreign file refused."""
from __future__ import annotations

import csv
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import ncu_source  # noqa: E402

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "# Samples",
          "Instructions Executed", "stall_barrier", "stall_short_sb",
          "stall_barrier (Not Issued)"]
# (source, executed, samples, barrier, short_sb): a prologue, a loop of 1000 iterations whose
# bookkeeping runs twice an iteration, and an epilogue
ROWS = [
    ("MOV R1, c[0x0][0x28]", 8, 1, 0, 1),
    ("QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR20], RZ, !UPT", 1000, 10, 0, 2),
    ("WARPGROUP.DEPBAR.LE gsb0, 0x0", 1000, 50, 48, 0),
    ("FFMA R88, R24, R5, R88", 1000, 6, 0, 5),
    ("@!P0  BRA 0x7f00", 2000, 3, 0, 0),
    ("UIADD3 UR16, UR16, 0x2, URZ", 1900, 2, 0, 0),
    ("STG.E.128 [R2], R4", 8, 4, 0, 0),
]


def write_export(path, rows=ROWS, first=("Kernel Name", "my_kernel", "")):
    with open(path, "w", newline="") as f:
        out = csv.writer(f, quoting=csv.QUOTE_ALL)
        out.writerow(first)
        out.writerow(HEADER)
        for n, (source, executed, samples, barrier, short_sb) in enumerate(rows):
            out.writerow([hex(16 * n), f"      {source}", samples, samples, f"{executed:,}",
                          barrier, short_sb, 0])


def test_loop_mix_and_stalls(tmp_path):
    path = tmp_path / "k.csv"
    write_export(path)
    kernel, instructions = ncu_source.read_source_csv(str(path))
    assert kernel == "my_kernel"
    assert [i.opcode for i in instructions] == ["MOV", "QGMMA", "WARPGROUP", "FFMA", "BRA",
                                                "UIADD3", "STG"]
    assert instructions[4].executed == 2000  # written "2,000": a thousands separator is read too
    iterations = ncu_source.loop_iterations(instructions)
    assert iterations == 1000
    body = ncu_source.loop_body(instructions, iterations)
    assert [i.opcode for i in body] == ["QGMMA", "WARPGROUP", "FFMA", "BRA", "UIADD3"]
    mix = ncu_source.opcode_mix(body, iterations)
    assert mix == {"QGMMA": 1.0, "WARPGROUP": 1.0, "FFMA": 1.0, "BRA": 2.0, "UIADD3": 1.9}
    assert ncu_source.stall_totals(body) == {"barrier": 48, "short_sb": 7}
    assert ncu_source.top_stalls(instructions[2]) == "barrier:48"


def test_report_prints_the_loop(tmp_path, capsys):
    path = tmp_path / "k.csv"
    write_export(path)
    kernel, instructions = ncu_source.read_source_csv(str(path))
    ncu_source.report(kernel, instructions, loop=True, top=2)
    out = capsys.readouterr().out
    assert "main loop: 1000 iterations, 6.9 instructions an iteration, 71 samples" in out
    assert "WARPGROUP.DEPBAR.LE" in out.splitlines()[-2]  # the hottest instruction first


def test_foreign_csv_and_no_mma_are_refused(tmp_path):
    path = tmp_path / "other.csv"
    write_export(path, first=("ID", "Kernel", "Metric"))
    with pytest.raises(SystemExit, match="not an ncu source-page CSV"):
        ncu_source.read_source_csv(str(path))
    write_export(path, rows=[r for r in ROWS if "GMMA" not in r[0]])
    _, instructions = ncu_source.read_source_csv(str(path))
    with pytest.raises(SystemExit, match="no warpgroup MMA"):
        ncu_source.loop_iterations(instructions)
