"""The one summary table of scripts/gpu_check.sh.

Every benchmark reports its headline figures through `record()`: one row per case, each row a
figure of ours next to a baseline measured in the same run, so the table is always a ratio against
something real. Rows go to the JSON-lines file named by the environment variable FP8MOE_SUMMARY
(nothing is written when it is unset, so a benchmark run by hand just prints its own table).

    python scripts/summary.py table summary.jsonl    # print the table gpu_check.sh ends with
"""
from __future__ import annotations

import json
import os
import sys


def record(bench: str, case: str, ours: float, unit: str, baseline_name: str, baseline: float,
           higher_is_better: bool = True) -> None:
    """Append one row; `ratio` is ours/baseline when higher is better, baseline/ours otherwise."""
    if baseline and ours:
        ratio = ours / baseline if higher_is_better else baseline / ours
    else:
        ratio = float("nan")
    row = dict(bench=bench, case=case, ours=ours, unit=unit, baseline_name=baseline_name,
               baseline=baseline, ratio=ratio)
    path = os.environ.get("FP8MOE_SUMMARY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def format_table(rows: list[dict]) -> str:
    header = ("bench", "case", "ours", "baseline", "ratio")
    lines = [[r["bench"], r["case"], f'{r["ours"]:.4g} {r["unit"]}',
              f'{r["baseline_name"]} {r["baseline"]:.4g}', f'{r["ratio"]:.2f}x'] for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), "-+-".join("-" * w for w in widths)]
    out += [fmt.format(*l) for l in lines]
    return "\n".join(out)


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[1] != "table":
        raise SystemExit("usage: python scripts/summary.py table SUMMARY.jsonl")
    rows = []
    if os.path.exists(argv[2]):
        with open(argv[2]) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    print(format_table(rows) if rows else "(no benchmark rows were recorded)")


if __name__ == "__main__":
    main(sys.argv)
