"""Grouped FP8 GEMMs and the FP8 grouped experts layer on the GPU, against their baselines.

    python scripts/bench_fp8_grouped.py            # default run, about a minute on an H100
    python scripts/bench_fp8_grouped.py --quick    # one case per section, first configs only
    python scripts/bench_fp8_grouped.py --full     # more cases and the whole tile-config sweep
    python scripts/bench_fp8_grouped.py --extra    # the default run plus the extra cases (the
                                                   # rest of the E x m grid), default kernels only

The default run stops starting new cases once its time budget (--budget seconds, default 90) is
spent, and says which it skipped, so scripts/gpu_check.sh can give it a fixed slot.

Sections (every figure next to a baseline measured in this run, recorded via scripts/summary.py):
  gemm    grouped Fprop, Dgrad (models/fp8/grouped.grouped_gemm) and Wgrad (grouped_wgrad) in
          TFLOPS, of the kernel grouped.py runs: on sm90 the CUDA kernels of csrc/fp8_grouped
          (on the H100 the best Triton config took 1.3-1.6x their time in every op of every
          case, so Triton is timed there only with --full), elsewhere the best of the Triton tile
          configs (the defaults of grouped.py and the runner-up of the full sweep; --full sweeps
          them all and prints which won most often, to set the defaults from); the table names
          it. Against
            - a per-expert loop of cuBLAS blockwise FP8 calls (models/fp8/gemm.py, torch._scaled_mm)
              with its split sizes already on the host, and the same loop reading them from the
              router's counts on the GPU first ("+sync": a device-to-host copy per call, as a
              training step would pay it per layer; standalone, that costs only the GPU's idle
              time while the host launches the first GEMM after the copy returns; in a step the
              host also stops running ahead of the GPU, which this does not show), and
            - bf16 torch._grouped_mm on the same shapes.
          Every output is bf16, dW included (what FP8GroupedExperts asks grouped_wgrad for, and
          what _grouped_mm writes).
          Cases: DeepSeek-V3 experts (hidden 7168, width 2048: up 4096x7168 with gate|up fused,
          down 7168x2048) and the `small` model's (hidden 4096, width 1536: up 3072x4096, down
          4096x1536), 8-64 experts, 512-8192 tokens per expert.
  layer   FP8GroupedExperts forward + backward (all quantization included) against bf16
          models.moe.GroupedExperts and against Transformer Engine's GroupedLinear pair under
          Float8BlockScaling when transformer_engine imports; FLOPs = 18 T D F. Two FP8 rows: FP8
          weights cached (several micro-batches per optimizer step) and re-quantized every call.
Timing: each kernel and its baselines in three interleaved rounds (scripts/timing.interleaved_ms:
timed one after another, the first meets a cooler GPU), per round the median of 3 batches of
back-to-back calls between CUDA events; the median round is reported. Random normal data. Layer
steps run their backward on the calling thread, as the trainer does (timing.train_backward), and
start with x.grad cleared (dx is written, not added to the last step's).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from summary import record  # noqa: E402
from timing import interleaved_ms, tflops, train_backward  # noqa: E402

BENCH = "fp8_grouped"
DEVICE = "cuda"


@dataclass(frozen=True)
class Case:
    name: str
    experts: int
    tokens: int   # per expert
    N: int        # output features of the Fprop GEMM
    K: int        # input features

    @property
    def label(self) -> str:
        return f"{self.name} E{self.experts}x{self.tokens} {self.N}x{self.K}"


GEMM_CASES = [  # DeepSeek-V3 experts: hidden 7168, width 2048; `small`: hidden 4096, width 1536
    Case("dsv3-up", 8, 4096, 4096, 7168),
    Case("dsv3-down", 8, 4096, 7168, 2048),
    Case("dsv3-up", 64, 512, 4096, 7168),
    Case("small-up", 16, 2048, 3072, 4096),
    Case("small-down", 16, 2048, 4096, 1536),
    Case("dsv3-down", 8, 8192, 7168, 2048),
]
EXTRA_GEMM_CASES = [  # the rest of the grid: 8-64 experts, 512-8192 tokens an expert
    Case("dsv3-down", 64, 512, 7168, 2048),
    Case("dsv3-up", 32, 1024, 4096, 7168),
    Case("dsv3-down", 32, 1024, 7168, 2048),
    Case("dsv3-up", 8, 8192, 4096, 7168),
    Case("small-up", 16, 512, 3072, 4096),
    Case("small-down", 16, 512, 4096, 1536),
    Case("small-up", 64, 512, 3072, 4096),
    Case("small-down", 8, 8192, 4096, 1536),
    Case("16b-up", 64, 1024, 2816, 2048),
]
LAYER_CASES = [  # (name, experts, tokens per expert, hidden D, width F)
    ("dsv3", 8, 4096, 7168, 2048),
    ("small", 16, 2048, 4096, 1536),
    ("dsv3", 32, 1024, 7168, 2048),
]
EXTRA_LAYER_CASES = [("16b", 64, 512, 2048, 1408)]


CUDA = "cuda"
"""The sweep's name for the CUDA kernels of csrc/fp8_grouped (grouped.py's backend='cuda')."""


def _backend(cfg) -> dict:
    return dict(config=None, backend="cuda") if cfg == CUDA else dict(config=cfg, backend="triton")


def _with_cuda(triton_configs: list, full: bool, cuda: bool) -> list:
    """The configs a sweep times: where the CUDA kernels run (cuda), they alone unless `full`
    adds the Triton ones beside them; elsewhere the Triton ones."""
    if not cuda:
        return triton_configs
    return [CUDA] + (triton_configs if full else [])


def gemm_configs(full: bool, cuda: bool = True):
    """Configs the grouped Fprop/Dgrad sweep tries (see _with_cuda). Triton tiles (BLOCK_K is
    always 128: one scale group): the default (the H100 winner) and the runner-up within 3-7%;
    --full adds the rest."""
    from models.fp8.grouped import TileConfig as C
    configs = [C(128, 128, 8, 8, 4, tma=True), C(128, 128, 8, 8, 3, tma=True, k_groups=2)]
    if full:
        configs += [C(128, 128, 8, 8, 4), C(128, 128, 8, 8, 4, tma=True, persistent=True),
                    C(128, 256, 8, 8, 3, tma=True),  # two 128-column accumulators; spills a little
                    C(64, 128, 8, 4, 4, tma=True), C(128, 128, 8, 8, 2, tma=True, k_groups=2),
                    C(128, 128, 8, 8, 3, tma=True, persistent=True, k_groups=2),
                    C(128, 128, 16, 8, 5, tma=True, persistent=True), C(128, 128, 8, 8, 3),
                    C(128, 256, 8, 8, 3, tma=True, persistent=True),
                    C(128, 256, 8, 16, 3, tma=True), C(256, 128, 8, 16, 3, tma=True)]
    return _with_cuda(configs, full, cuda)


def wgrad_configs(full: bool, cuda: bool = True):
    """Configs the grouped Wgrad sweep tries (see _with_cuda). Triton tiles (rows = N of dW,
    columns = K of dW): the default (the H100 winner) and the runner-up; --full adds the rest."""
    from models.fp8.grouped import TileConfig as C
    configs = [C(64, 128, 8, 4, 4, tma=True), C(128, 128, 8, 8, 3, tma=True)]
    if full:
        configs += [C(128, 128, 8, 8, 4, tma=True), C(128, 128, 8, 8, 3),
                    C(128, 128, 8, 8, 3, tma=True, k_groups=2), C(128, 128, 16, 8, 5, tma=True),
                    C(128, 256, 8, 16, 3, tma=True), C(256, 128, 8, 16, 3, tma=True)]
    return _with_cuda(configs, full, cuda)


def _short(cfg) -> str:
    if cfg == CUDA:
        return "CUDA (csrc/fp8_grouped)"
    return (f"BM{cfg.block_m} BN{cfg.block_n} G{cfg.group_m} w{cfg.num_warps} s{cfg.num_stages}"
            + (" tma" if cfg.tma else "") + (" pers" if cfg.persistent else "")
            + (f" k{cfg.k_groups}" if cfg.k_groups > 1 else ""))


def sweep(name: str, run, configs) -> tuple[float, object]:
    """Time run(config) for every config in interleaved rounds (timing.interleaved_ms; a single
    timing each once picked the wrong winner on the H100: the CUDA Dgrad measured 1.60 ms against
    0.94 ms in the run before); print each; return (best ms, best config)."""
    by_label = {_short(cfg): cfg for cfg in configs}
    ms = interleaved_ms({label: (lambda cfg=cfg: run(cfg)) for label, cfg in by_label.items()})
    best = (float("inf"), None)
    for label, cfg in by_label.items():
        if ms[label] != ms[label]:  # the config failed (interleaved_ms said why): skipped
            continue
        print(f"    {name} {label}: {ms[label]:.3f} ms")
        best = min(best, (ms[label], cfg), key=lambda t: t[0])
    return best


# ---------------------------------------------------------------------------------------------
# Grouped GEMMs


def _operands(case: Case):
    """bf16 data, its FP8 copies as the layer makes them, and per-expert copies for the loop."""
    from models.fp8 import quant
    E, m, N, K = case.experts, case.tokens, case.N, case.K
    T = E * m
    x = torch.randn(T, K, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn(T, N, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device=DEVICE, dtype=torch.bfloat16) * 0.02
    ops = dict(x=x, dy=dy, w=w, counts=torch.full((E,), m, device=DEVICE, dtype=torch.int64))
    ops["x8"] = quant.quantize_dual(x)
    ops["dy8"] = quant.quantize_dual(dy)
    ops["w8"] = quant.quantize_128x128(w, transpose=True)
    ops["x8_e"] = [quant.quantize_dual(x[e * m:(e + 1) * m].contiguous()) for e in range(E)]
    ops["dy8_e"] = [quant.quantize_dual(dy[e * m:(e + 1) * m].contiguous()) for e in range(E)]
    return ops


def _ours(ops, T: int):
    from models.fp8.grouped import grouped_gemm, grouped_wgrad
    q_x, s_x, qt_x, st_x = ops["x8"]
    q_dy, s_dy, qt_dy, st_dy = ops["dy8"]
    w_q, w_s, wt_q, wt_s = ops["w8"]
    c = ops["counts"]
    return dict(
        fwd=lambda cfg: grouped_gemm(q_x, s_x, w_q, w_s, c, **_backend(cfg)),
        dgrad=lambda cfg: grouped_gemm(q_dy, s_dy, wt_q, wt_s, c, **_backend(cfg)),
        wgrad=lambda cfg: grouped_wgrad(qt_dy[:, :T].t(), st_dy, qt_x[:, :T].t(), st_x, c,
                                        out_dtype=torch.bfloat16, **_backend(cfg)))


def _cublas_one(ops):
    """Per op, expert e's cuBLAS blockwise call: the loop's body."""
    from models.fp8.gemm import gemm_1x128_128x128, gemm_1x128_1x128
    w_q, w_s, wt_q, wt_s = ops["w8"]
    xe, dye = ops["x8_e"], ops["dy8_e"]
    return dict(
        fwd=lambda e: gemm_1x128_128x128(xe[e][0], xe[e][1], w_q[e], w_s[e]),
        dgrad=lambda e: gemm_1x128_128x128(dye[e][0], dye[e][1], wt_q[e], wt_s[e]),
        wgrad=lambda e: gemm_1x128_1x128(dye[e][2], dye[e][3].t(), xe[e][2], xe[e][3].t(),
                                         out_dtype=torch.bfloat16))


def _cublas_loop(one, E: int):
    return {op: (lambda f=f: [f(e) for e in range(E)]) for op, f in one.items()}


def _cublas_loop_synced(loop, counts_E: torch.Tensor):
    """The loop as training would run it: the split sizes read from the router's counts on the
    GPU first (a device-to-host copy, which waits for all queued work), then the calls."""
    def synced(f):
        def call():
            counts_E.tolist()
            return f()
        return call
    return {op: synced(f) for op, f in loop.items()}


def _bf16_grouped(ops):
    x, dy, w = ops["x"], ops["dy"], ops["w"]
    offs = ops["counts"].cumsum(0).to(torch.int32)
    return dict(
        fwd=lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs),
        dgrad=lambda: torch._grouped_mm(dy, w, offs=offs),
        wgrad=lambda: torch._grouped_mm(dy.t(), x, offs=offs))


def _check_against_loop(ours, one, op: str, cfg, E: int, m: int) -> float:
    """calc_diff of our output against the cuBLAS loop's, accumulated one expert at a time in
    float64 (the whole [E, N, K] Wgrad pair in float64 would not fit next to the operands)."""
    got = ours[op](cfg)
    dot = norm = 0.0
    for e in range(E):
        x = (got[e] if op == "wgrad" else got[e * m:(e + 1) * m]).double()
        y = one[op](e).double()
        dot += float((x * y).sum())
        norm += float((x * x).sum() + (y * y).sum())
        del x, y
    del got
    return 0.0 if norm == 0 else 1 - 2 * dot / norm


def bench_gemm(cases, full: bool, quick: bool = False, deadline: float = float("inf")) -> None:
    print("\n== grouped GEMMs, TFLOPS (T = E x m tokens; Fprop [T,K]x[E,N,K]; Dgrad [T,N]x[E,K,N];"
          " Wgrad [E,N,K] over tokens)")
    from models.fp8 import grouped_cuda
    cuda = grouped_cuda.available(torch.device(DEVICE))
    configs = {"fwd": gemm_configs(full, cuda), "dgrad": gemm_configs(full, cuda),
               "wgrad": wgrad_configs(full, cuda)}
    if quick:
        configs = {op: c[:2] for op, c in configs.items()}
    rows = []
    for case in cases:
        if time.monotonic() > deadline:
            print(f"  {case.label}: skipped (time budget spent; --budget to extend)")
            continue
        T = case.experts * case.tokens
        flops = 2 * T * case.N * case.K
        print(f"  {case.label}")
        ops = _operands(case)
        one = _cublas_one(ops)
        ours, loop, bf16 = _ours(ops, T), _cublas_loop(one, case.experts), _bf16_grouped(ops)
        synced = _cublas_loop_synced(loop, ops["counts"])
        for op in ("fwd", "dgrad", "wgrad"):
            # one config: nothing to pick (the timing below is its figure)
            cfg = sweep(op, ours[op], configs[op])[1] if len(configs[op]) > 1 else configs[op][0]
            if cfg is None:
                print(f"    {op}: every config failed")
                continue
            diff = _check_against_loop(ours, one, op, cfg, case.experts, case.tokens)
            ms = interleaved_ms({"ours": lambda run=ours[op], cfg=cfg: run(cfg), "loop": loop[op],
                                 "loop+sync": synced[op], "bf16": bf16[op]})
            mine, base_loop, base_sync, base_bf16 = (tflops(flops, ms[k]) for k in
                                                     ("ours", "loop", "loop+sync", "bf16"))
            rows.append((case.label, op, mine, base_loop, base_sync, base_bf16, cfg, diff))
            record(BENCH, f"{op} {case.label}", mine, "TFLOPS", "cuBLAS blockwise loop", base_loop)
            record(BENCH, f"{op} {case.label}", mine, "TFLOPS",
                   "cuBLAS loop + split-size sync", base_sync)
            record(BENCH, f"{op} {case.label}", mine, "TFLOPS", "bf16 _grouped_mm", base_bf16)
        del ops, one, ours, loop, bf16
        torch.cuda.empty_cache()
    print(f"\n{'case':<38}{'op':<7}{'ours':>7}{'loop':>7}{'+sync':>7}{'bf16':>7}{'/loop':>7}"
          f"{'/+sync':>7}{'/bf16':>7}  {'best config':<28}calc_diff vs loop")
    for label, op, mine, lp, ls, bf, cfg, diff in rows:
        print(f"{label:<38}{op:<7}{mine:>7.0f}{lp:>7.0f}{ls:>7.0f}{bf:>7.0f}{mine / lp:>6.2f}x"
              f"{mine / ls:>6.2f}x{mine / bf:>6.2f}x  {_short(cfg):<28}{diff:.1e}")
    if full:
        _suggest_defaults(rows)


def _suggest_defaults(rows) -> None:
    """Per kernel, the config that won the most cases: the DEFAULT_*_CONFIG to set in grouped.py."""
    import collections
    wins = collections.Counter(("wgrad" if op == "wgrad" else "gemm", cfg)
                               for _label, op, _m, _l, _s, _b, cfg, _d in rows)
    for kernel in ("gemm", "wgrad"):
        counts = [(n, cfg) for (k, cfg), n in wins.items() if k == kernel]
        if counts:
            n, cfg = max(counts, key=lambda t: t[0])
            print(f"most frequent winner, {kernel}: {cfg} ({n} of {sum(c for c, _ in counts)})")


# ---------------------------------------------------------------------------------------------
# The whole experts layer


def _te_experts(E: int, D: int, F: int):
    """TE GroupedLinear up (D -> 2F) and down (F -> D) plus a Float8BlockScaling context, or a reason."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import Float8BlockScaling
    except Exception as e:  # TE is optional: any import failure means "absent"
        return None, f"transformer_engine does not import ({type(e).__name__}: {e})"
    kw = dict(bias=False, params_dtype=torch.bfloat16, device=DEVICE)
    up, down = te.GroupedLinear(E, D, 2 * F, **kw), te.GroupedLinear(E, F, D, **kw)
    recipe = Float8BlockScaling()
    if hasattr(te, "autocast"):
        ctx = lambda: te.autocast(enabled=True, recipe=recipe)  # noqa: E731
    else:
        ctx = lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)  # noqa: E731
    return (up, down, ctx), None


def _te_step(te_mods, x, dy, splits):
    up, down, ctx = te_mods

    def step():
        x.grad = None  # as in _layer_step
        with ctx():
            gate, upv = up(x, splits).chunk(2, dim=-1)
            y = down(torch.nn.functional.silu(gate) * upv, splits)
        train_backward(y, dy)
    return step


def _layer_step(layer, x, counts, dy, before=None):
    def step():
        if before is not None:
            before()
        x.grad = None  # dx goes upstream in a model, not added into a leaf's .grad
        train_backward(layer(x, counts), dy)
    return step


def bench_layer(cases, deadline: float = float("inf")) -> None:
    from models.fp8.experts import FP8GroupedExperts
    from models.moe import GroupedExperts

    print("\n== experts layer forward + backward (dx, dw1, dw3, dw2), TFLOPS = 18 T D F / time")
    print(f"{'case':<30}{'fp8 cached W':>13}{'fp8 requant W':>14}{'bf16':>7}{'TE fp8':>8}"
          f"{'cached/bf16':>12}{'requant/TE':>11}")
    te_note = None
    for name, E, m, D, F in cases:
        if time.monotonic() > deadline:
            print(f"{name} E{E}x{m} D{D} F{F}: skipped (time budget spent; --budget to extend)")
            continue
        T = E * m
        base = GroupedExperts(E, D, F).to(DEVICE, torch.bfloat16)
        with torch.no_grad():
            for w in (base.w1, base.w3, base.w2):
                w.normal_(std=0.02)
        ours = FP8GroupedExperts.from_grouped(base)
        x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
        counts = torch.full((E,), m, device=DEVICE, dtype=torch.int64)
        flops = 18 * T * D * F
        steps = {"cached": _layer_step(ours, x, counts, dy),
                 "requant": _layer_step(ours, x, counts, dy, ours.invalidate_fp8_cache),
                 "bf16": _layer_step(base, x, counts, dy)}
        te, te_note = _te_experts(E, D, F)
        if te:
            steps["te"] = _te_step(te, x, dy, [m] * E)
        ms = interleaved_ms(steps, reps=3)
        if te and ms["te"] != ms["te"]:
            te_note = "TE GroupedLinear failed (above)"
        cached, requant, bf16, te_tf = (tflops(flops, ms.get(k, float("nan")))
                                        for k in ("cached", "requant", "bf16", "te"))
        case = f"{name} E{E}x{m} D{D} F{F}"
        print(f"{case:<30}{cached:>13.0f}{requant:>14.0f}{bf16:>7.0f}{te_tf:>8.0f}"
              f"{cached / bf16:>11.2f}x{requant / te_tf:>10.2f}x")
        record(BENCH, f"layer {case}", cached, "TFLOPS", "bf16 GroupedExperts", bf16)
        record(BENCH, f"layer {case} requant W", requant, "TFLOPS", "bf16 GroupedExperts", bf16)
        if te_tf == te_tf:
            record(BENCH, f"layer {case} requant W", requant, "TFLOPS",
                   "TE Float8BlockScaling GroupedLinear", te_tf)
        del base, ours, te, x, dy
        torch.cuda.empty_cache()
    if te_note:
        print(f"Transformer Engine absent: {te_note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one case per section, at most two configs")
    parser.add_argument("--full", action="store_true", help="more cases and tile configs")
    parser.add_argument("--extra", action="store_true",
                        help="more cases with the default kernels (no tile-config sweep)")
    parser.add_argument("--budget", type=float, default=90.0,
                        help="seconds after which no new case starts "
                             "(default 90; inf with --full or --extra)")
    args = parser.parse_args()
    start = time.monotonic()
    budget = float("inf") if args.full or args.extra else args.budget
    if not torch.cuda.is_available():
        print("bench_fp8_grouped: no CUDA device; nothing to measure")
        return
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    gemm_cases, layer_cases = GEMM_CASES, LAYER_CASES
    if args.full or args.extra:
        gemm_cases, layer_cases = gemm_cases + EXTRA_GEMM_CASES, layer_cases + EXTRA_LAYER_CASES
    if args.quick:
        gemm_cases, layer_cases = gemm_cases[:1], layer_cases[:1]
    bench_gemm(gemm_cases, args.full, args.quick, deadline=start + 0.6 * budget)
    bench_layer(layer_cases, deadline=start + budget)
    print(f"\nbench_fp8_grouped: {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
