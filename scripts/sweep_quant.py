"""Sweep the launch variants (`models.fp8.quant.Tiling`) of every quantization kernel on the GPU.

    python scripts/sweep_quant.py                      # both shapes, every kernel (~3 min, H100)
    python scripts/sweep_quant.py --shapes 8192x4096 --kernels dual,rmsnorm

For each shape (bf16 [M, K]) it times a device-to-device copy of the input, then, kernel by
kernel, every variant at every shape, in this same run. Before a variant is timed its output is checked: the default variant
(DEFAULT_TILING) bitwise against models/fp8/reference.py (on the CPU, for a few sampled 128-row
blocks; SwiGLU and rmsnorm on the fp32 value they computed, itself checked against torch), every other variant bitwise against
the default's output, except rmsnorm's: they may add squares in another order (rstd may differ in
the last bit), so each is checked against the reference like the default. A variant that fails
is reported and not timed.

GB/s counts the bytes the operation must move: input read once, FP8 copies and scales written
(the bookkeeping of scripts/bench_fp8.py). The table shows each variant's GB/s and its fraction
of the copy's; the end lists the best variant per kernel, to be set in quant.DEFAULT_TILING. Not
a bench_* script: scripts/gpu_check.sh does not run it (scripts/bench_fp8.py reports the defaults).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import time_ms  # noqa: E402

def variants(kernel: str) -> list:
    """The launches tried for one kernel; the default comes first."""
    from models.fp8.quant import DEFAULT_TILING, Tiling
    if kernel in ("dual", "swiglu"):  # (warps, maxnreg, compact_scales, tiles, prefetch)
        grid = [Tiling(warps=w, maxnreg=r, compact_scales=c, tiles=t, prefetch=p)
                for w, r, c, t, p in [(4, 0, True, 1, False), (4, 0, False, 1, False),
                                      (4, 0, True, 2, False), (4, 0, True, 4, False),
                                      (8, 0, True, 1, False), (8, 128, True, 1, False),
                                      (8, 0, False, 1, False), (8, 128, False, 1, False),
                                      (16, 0, True, 1, False), (4, 168, True, 1, False)]]
    elif kernel in ("1x128", "swiglu 1x128"):
        grid = [Tiling(warps=w, block_m=b, compact_scales=c) for w, b in
                [(4, 32), (4, 64), (8, 64), (8, 128)] for c in (False, True)]
        grid += [Tiling(warps=4, block_m=b, tiles=4, prefetch=True) for b in (32, 64)]
    elif kernel == "rmsnorm":  # (warps, compact_scales, tiles per sum item, lag, l2_hints)
        grid = [Tiling(warps=w, compact_scales=c, tiles=t, lag=lag, l2_hints=h)
                for w, c, t, lag, h in [(8, False, 2, 256, True), (8, True, 2, 256, True),
                                        (8, True, 4, 256, True), (8, True, 1, 256, True),
                                        (8, True, 2, 256, False), (8, True, 2, 512, True),
                                        (8, True, 2, 128, True), (4, True, 2, 256, True),
                                        (4, True, 1, 256, True), (4, False, 2, 256, True)]]
        grid += [Tiling(fused=False, warps=8, compact_scales=True),
                 Tiling(fused=False, warps=4, compact_scales=True),
                 Tiling(cuda=True, cluster=16)]  # CUDA (sm90); the default picks 8 here
    else:
        grid = [Tiling(warps=w, hw_transpose=h) for w in (4, 8, 16) for h in (True, False)]
        grid += [Tiling(warps=w, tiles=2) for w in (4, 8, 16)]
    default = DEFAULT_TILING[kernel]
    return [default] + [v for v in grid if v != default]


def describe(t) -> str:
    from models.fp8.quant import Tiling
    base = Tiling()
    return " ".join(f"{f}={getattr(t, f)}" for f in t.__dataclass_fields__
                    if getattr(t, f) != getattr(base, f) or f == "warps")


def cases(M: int, K: int):
    """kernel -> (bytes moved, fn(tiling) -> outputs); inputs shared by all variants."""
    from models.fp8 import quant
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    gate, up = torch.randn_like(x), torch.randn_like(x)
    w_norm = (1 + 0.1 * torch.randn(K, device="cuda")).to(torch.bfloat16)
    n, scales = M * K, 4 * M * K // 128
    return {
        "1x128": (3 * n + scales, lambda t: quant.quantize_1x128(x, check_finite=False, tiling=t)),
        "dual": (4 * n + 2 * scales, lambda t: quant.quantize_dual(x, check_finite=False, tiling=t)),
        "128x128": (4 * n, lambda t: quant.quantize_128x128(x, transpose=True, check_finite=False,
                                                            tiling=t)),
        "swiglu": (6 * n + 2 * scales,
                   lambda t: quant.swiglu_quantize(gate, up, check_finite=False, tiling=t)),
        "swiglu 1x128": (5 * n + scales, lambda t: quant.swiglu_quantize(
            gate, up, colwise=False, check_finite=False, tiling=t)),
        "rmsnorm": (4 * n + 2 * scales,
                    lambda t: quant.rmsnorm_quantize(x, w_norm, check_finite=False, tiling=t)),
    }, (x, gate, up, w_norm)


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def flat_tensors(out) -> list[torch.Tensor]:
    """Every tensor of a (nested) tuple of outputs, in order."""
    if torch.is_tensor(out):
        return [out]
    return [t for part in out for t in flat_tensors(part)]


def same(a, b) -> bool:
    """Whether two (nested) tuples of outputs hold the same bits, tensor by tensor (compared as
    bytes: a NaN equals the same NaN, -0 differs from +0). scripts/sweep_quant_cuda.py uses it too."""
    xs, ys = flat_tensors(a), flat_tensors(b)
    return len(xs) == len(ys) and all(
        x.shape == y.shape and x.dtype == y.dtype
        and torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))
        for x, y in zip(xs, ys))


def sample_blocks(M: int) -> torch.Tensor:
    """Indices of a few 128-row blocks (first, middle, last): the rows the reference checks.
    reference.py runs on the CPU: on CUDA, PyTorch divides by a Python scalar as a multiplication
    by its reciprocal, which is not the correctly rounded amax / 448 the recipe specifies."""
    Mb = -(-M // 128)
    return torch.tensor(sorted({*range(min(4, Mb)), *range(Mb // 2, min(Mb, Mb // 2 + 4)),
                                *range(max(0, Mb - 4), Mb)}))


def _rows(blocks: torch.Tensor, M: int) -> torch.Tensor:
    rows = (blocks[:, None] * 128 + torch.arange(128)).flatten()
    return rows[rows < M]


def matches_reference(out, value: torch.Tensor, colwise: bool) -> bool:
    """(q, s[, qt, st]) bitwise reference.py's quantization of `value`, on sampled row blocks."""
    from models.fp8 import reference as R
    M = value.shape[0]
    blocks = sample_blocks(M)
    rows = _rows(blocks, M)
    v = value[rows.to(value.device)].cpu()
    rq, rs = R.quantize_1x128(v)
    ok = torch.equal(_raw(out[0][rows.to(value.device)].cpu()), _raw(rq))
    ok = ok and torch.equal(out[1][rows.to(value.device)].cpu(), rs)
    if colwise and ok:
        cq, cs = R.quantize_128x1(v)
        ok = torch.equal(_raw(out[2][:, rows.to(value.device)].cpu()), _raw(cq.t()))
        ok = ok and torch.equal(out[3][blocks.to(value.device)].cpu(), cs)
    return ok


def reference_ok(kernel: str, t, inputs) -> bool:
    """The variant's outputs against reference.py (sampled row blocks); SwiGLU and rmsnorm
    quantize the fp32 value they computed themselves (hp_out), checked against torch first."""
    from models.fp8 import quant
    from models.fp8 import reference as R
    x, gate, up, w_norm = inputs
    M, K = x.shape
    if kernel in ("1x128", "dual"):
        out = (quant.quantize_1x128 if kernel == "1x128" else quant.quantize_dual)(x, tiling=t)
        return matches_reference(out, x, kernel == "dual")
    if kernel == "128x128":
        q, s, qt, st = quant.quantize_128x128(x, transpose=True, tiling=t)
        blocks = sample_blocks(M)
        rows = _rows(blocks, M).to(x.device)
        rq, rs = R.quantize_128x128(x[rows].cpu())
        blocks = blocks.to(x.device)
        return (torch.equal(_raw(q[rows].cpu()), _raw(rq)) and torch.equal(s[blocks].cpu(), rs)
                and torch.equal(_raw(qt[:, rows].cpu()), _raw(rq.t()))
                and torch.equal(st[:, blocks].cpu(), rs.t()))
    hp = torch.empty(M, K, device="cuda")
    if kernel == "rmsnorm":
        out = quant.rmsnorm_quantize(x, w_norm, hp_out=hp, tiling=t)
        rstd = torch.rsqrt(x.float().pow(2).mean(-1) + 1e-6)
        want = x.float() * rstd[:, None] * w_norm.float()
        ok = bool(torch.allclose(out[-1], rstd, atol=0, rtol=1e-5))
    else:
        out = quant.swiglu_quantize(gate, up, colwise=kernel == "swiglu", hp_out=hp, tiling=t)
        want = torch.nn.functional.silu(gate.float()) * up.float()
        ok = True
    ok = ok and bool(torch.allclose(hp, want, atol=1e-5, rtol=1e-5))
    del want
    return ok and matches_reference(out, hp, kernel != "swiglu 1x128")


def sweep_kernel(kernel: str, shapes: dict, rows: list, deadline: float) -> None:
    """Every variant of one kernel at every shape; shapes: "MxK" -> (copy GB/s, cases, inputs)."""
    for shape, (copy, fns, inputs) in shapes.items():
        nbytes, fn = fns[kernel]
        want = None
        for t in variants(kernel):
            label = f"{kernel:<14}{shape:<12}{describe(t):<52}"
            if time.monotonic() > deadline:
                print(f"{label}  skipped (time budget spent; --budget to extend)")
                continue
            out = fn(t)
            if want is None or kernel == "rmsnorm":  # the default, and every rmsnorm variant
                ok = reference_ok(kernel, t, inputs)
            else:
                ok = same(out, want)
            want = out if want is None else want
            del out
            if not ok:
                print(f"{label}  WRONG OUTPUT: not timed")
                continue
            gbs = nbytes / time_ms(lambda: fn(t), reps=10, batches=3) / 1e6
            rows.append((shape, kernel, t, gbs, gbs / copy))
            print(f"{label}{gbs:>7.0f}{gbs / copy:>8.0%}", flush=True)
        del want
        torch.cuda.empty_cache()


def report_best(rows: list, header: bool = True) -> None:
    """Per kernel: the variant with the best worst-case fraction of copy over the shapes."""
    if header:
        print("\n== best variant per kernel (highest minimum fraction of copy over the shapes)")
    else:
        print("best: ", end="")
    shapes = sorted({r[0] for r in rows})
    for kernel in dict.fromkeys(r[1] for r in rows):
        frac = {}
        for shape, k, t, _, f in rows:
            if k == kernel:
                frac.setdefault(t, {})[shape] = f
        most = max(len(v) for v in frac.values())  # variants cut by the budget do not compete
        full = {t: min(v.values()) for t, v in frac.items() if len(v) == most}
        best = max(full, key=full.get)
        per = "  ".join(f"{s}: {frac[best][s]:.0%}" for s in shapes if s in frac[best])
        default = next(t for s, k, t, _, _ in rows if k == kernel)
        print(f"{kernel:<14}{describe(best):<58} {per}   (default: {min(frac[default].values()):.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32768x7168,8192x4096", help="MxK,... (bf16 inputs)")
    parser.add_argument("--kernels", default="dual,rmsnorm,swiglu,128x128,swiglu 1x128,1x128",
                        help="comma-separated, farthest from the copy's bandwidth first (the "
                             "budget may cut the last)")
    parser.add_argument("--budget", type=float, default=170.0,
                        help="seconds after which no new variant starts (default 170)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sweep_quant: no CUDA device; nothing to measure")
        return
    start = time.monotonic()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    shapes = {}
    for shape in args.shapes.split(","):
        M, K = (int(v) for v in shape.lower().split("x"))
        fns, inputs = cases(M, K)
        copy = 4 * M * K / time_ms(lambda: torch.empty_like(inputs[0]).copy_(inputs[0])) / 1e6
        print(f"[{M}, {K}] bf16: D2D copy {copy:.0f} GB/s")
        shapes[f"{M}x{K}"] = (copy, fns, inputs)
    print(f"\n{'kernel':<14}{'shape':<12}{'variant':<52}{'GB/s':>7}{'of copy':>9}")
    rows = []
    for kernel in (k.strip() for k in args.kernels.split(",")):
        sweep_kernel(kernel, shapes, rows, start + args.budget)
        report_best([r for r in rows if r[1] == kernel], header=False)
    report_best(rows)
    print(f"\nsweep_quant: {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
