"""FP8 dense path on the GPU: GEMM TFLOPS, quantization GB/s, one Linear layer forward + backward.

    python scripts/bench_fp8.py            # default run, under a minute on an H100
    python scripts/bench_fp8.py --quick    # one shape per section

No new shape starts once the time budget (--budget seconds, default 50) is spent; skipped shapes
are named, so scripts/gpu_check.sh can give the script a fixed slot.

Every figure is measured next to its baseline in this same run and recorded through
scripts/summary.py:
  gemm     our wrappers (gemm_1x128_128x128 for Fprop, gemm_1x128_1x128 for Wgrad) against bf16
           torch.matmul and against a bare torch._scaled_mm call on the same operands (the cuBLAS
           blockwise kernel without our validation: the ratio shows the wrapper's overhead);
  quant    each quantization kernel's GB/s (bytes the operation must move: input read once,
           FP8 copies and scales written) against a device-to-device copy of the same input, with
           the default launch of each (scripts/sweep_quant.py times the alternatives);
  linear   FP8Linear forward + backward (all quantization included; the FP8 weight cached as in a
           step with several micro-batches, and again re-quantized every call as with one), against
           bf16 nn.Linear and Transformer Engine's Linear under Float8BlockScaling when TE imports
           (like against like: ours cached against TE's weight cached with is_first_microbatch,
           ours re-quantized against TE quantizing its weight every call), and the GPU's busy
           time a call of ours (cached) and of bf16 (timing.gpu_busy_ms): at the narrow shapes the
           FP8 layer's wall time is its host's (Python, autograd, five launches), which varies
           from host to host, and its busy time says what the GPU spends;
  mlp      FP8MLP (SwiGLU fused with its quantization) forward + backward against the bf16 MLP at
           the `small` model's dense-MLP and shared-expert shapes (the latter at 4096, 8192 and
           16384 tokens: convert.py's MLP_MIN_TOKENS puts it at 8192), with the GPU's busy time a
           call;
  dispatch the routed experts' input: quantize_dual reading the tokens through MoE's dispatch
           index against gathering the sorted bf16 copies, then quantizing (ms);
  norm     a norm feeding FP8 consumers: the fused kernel FP8RMSNorm runs (bf16 y and both FP8
           copies) against the bf16 norm, then quantize_dual (ms);
  swiglu   an FP8 SwiGLU's forward quantization: a's 1x128 copy and h = [gate | up]'s own from one
           read of h, against the SwiGLU quantizer, then quantize_1x128(h) (ms);
  memory   bytes autograd saves for backward (FP8 copies vs bf16 activations), Linear and MLP.
Timing: each figure and its baselines in three interleaved rounds (scripts/timing.interleaved_ms:
every other round reversed, the median kept; timed one after another, whatever runs first meets a
cooler GPU, and an H100 under FP8 load slows by up to 19% within a minute), random normal data.
Layer steps (linear, mlp) quantize their input afresh every call, run their backward on the
calling thread and write dx rather than add it to the last step's, as in a training step
(_fwd_bwd).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from summary import record  # noqa: E402
from timing import gpu_busy_ms, interleaved_ms, tflops, train_backward  # noqa: E402

BENCH = "fp8"
DEVICE = "cuda"
DEADLINE = [float("inf")]
"""time.monotonic() after which no new shape starts (set from --budget in main)."""


def over_budget(case: str) -> bool:
    if time.monotonic() <= DEADLINE[0]:
        return False
    print(f"{case}: skipped (time budget spent; --budget to extend)")
    return True


def bench_gemm(shapes) -> None:
    from models.fp8 import quant
    from models.fp8.gemm import gemm_1x128_128x128, gemm_1x128_1x128

    print("\n== dense GEMM, TFLOPS (Fprop: x[M,K] @ W[N,K]^T; Wgrad: dy^T x over M tokens)")
    print(f"{'case':<26}{'ours':>9}{'cuBLAS bw':>11}{'bf16':>9}{'ours/bf16':>11}")
    for M, N, K in shapes:
        if over_budget(f"gemm {M}x{N}x{K}"):
            continue
        x, w = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16), torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16)
        qx, sx = quant.quantize_1x128(x)
        qw, sw = quant.quantize_128x128(w)
        flops = 2 * M * N * K
        _report_gemm(f"fprop {M}x{N}x{K}", flops, interleaved_ms({
            "ours": lambda: gemm_1x128_128x128(qx, sx, qw, sw),
            "raw": lambda: torch._scaled_mm(qx, qw.t(), sx, sw.t(), out_dtype=torch.bfloat16),
            "bf16": lambda: torch.matmul(x, w.t())}))
        dy = torch.randn(M, N, device=DEVICE, dtype=torch.bfloat16)
        *_, qt_dy, st_dy = quant.quantize_dual(dy)
        *_, qt_x, st_x = quant.quantize_dual(x)
        _report_gemm(f"wgrad {N}x{K} over {M}", flops, interleaved_ms({
            "ours": lambda: gemm_1x128_1x128(qt_dy, st_dy.t(), qt_x, st_x.t()),
            "raw": lambda: torch._scaled_mm(qt_dy, qt_x.t(), st_dy.t(), st_x,
                                            out_dtype=torch.float32),
            "bf16": lambda: torch.matmul(dy.t(), x)}))
        del x, w, qx, sx, qw, sw, dy, qt_dy, st_dy, qt_x, st_x
        torch.cuda.empty_cache()


def _report_gemm(case: str, flops: int, ms: dict) -> None:
    ours, raw, bf16 = (tflops(flops, ms[k]) for k in ("ours", "raw", "bf16"))
    print(f"{case:<26}{ours:>9.0f}{raw:>11.0f}{bf16:>9.0f}{ours / bf16:>10.2f}x")
    record(BENCH, f"gemm {case}", ours, "TFLOPS", "bf16 matmul", bf16)
    record(BENCH, f"gemm {case}", ours, "TFLOPS", "cuBLAS blockwise _scaled_mm", raw)


def dual_bytes(M: int, K: int) -> int:
    """Bytes a bf16 [M, K] -> both FP8 copies (1x128 and 128x1) must move: x read, the two copies
    and their fp32 scales written (RMSNorm -> dual moves the same, its weight aside)."""
    n = M * K
    return 2 * n + 2 * n + 2 * (4 * n // 128)


def swiglu_backward_bytes(M: int, K: int) -> int:
    """Bytes SwiGLU's fused backward must move with h = [gate | up] of K = 2F columns: h's 1x128
    FP8 copy and its scales and da [M, F] bf16 read; dh's two FP8 copies and a's 128x1 copy
    written with their scales."""
    n = M * K
    return n + n + n + n + n // 2 + (4 * n // 128) * 7 // 2


def bench_quant(M: int, K: int) -> None:
    from models.fp8 import quant

    print(f"\n== quantization of a [{M}, {K}] bf16 tensor, GB/s (bytes the operation must move)")
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    n = M * K
    copy_out = torch.empty_like(x)
    scales = 4 * n // 128
    gate, up = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16), torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
    w_norm = torch.ones(K, device=DEVICE, dtype=torch.bfloat16)
    # the default runs the CUDA cluster kernel on sm90; the Triton kernel beside it for comparison
    triton_norm = dataclasses.replace(quant.DEFAULT_TILING["rmsnorm"], cuda=False)
    cases = [
        ("1x128", 2 * n + n + scales, lambda: quant.quantize_1x128(x, check_finite=False)),
        ("dual 1x128+128x1", dual_bytes(M, K), lambda: quant.quantize_dual(x, check_finite=False)),
        ("128x128 + transpose", 2 * n + 2 * n, lambda: quant.quantize_128x128(x, transpose=True, check_finite=False)),
        ("swiglu -> dual", 4 * n + 2 * n + 2 * scales, lambda: quant.swiglu_quantize(gate, up, check_finite=False)),
        ("swiglu -> 1x128", 4 * n + n + scales,
         lambda: quant.swiglu_quantize(gate, up, colwise=False, check_finite=False)),
        ("rmsnorm -> dual", dual_bytes(M, K), lambda: quant.rmsnorm_quantize(x, w_norm, check_finite=False)),
        ("rmsnorm -> dual Triton", dual_bytes(M, K),
         lambda: quant.rmsnorm_quantize(x, w_norm, check_finite=False, tiling=triton_norm)),
    ]
    # SwiGLU's backward (models/fp8/experts.py), x's 1x128 copy read as h = [gate | up] with
    # F = K / 2: reads h and da [M, F] (bf16), writes dh both ways and a's 128x1 copy
    from models.fp8.experts import swiglu_backward_quantize
    q_h, s_h = quant.quantize_1x128(x, check_finite=False)
    da = torch.randn(M, K // 2, device=DEVICE, dtype=torch.bfloat16)
    swiglu_bytes = swiglu_backward_bytes(M, K)
    cases.append(("swiglu backward", swiglu_bytes, lambda: swiglu_backward_quantize(q_h, s_h, da)))
    # the default runs the CUDA kernel on sm90 (csrc/fp8_swiglu); the Triton kernel beside it
    cases.append(("swiglu backward Triton", swiglu_bytes,
                  lambda: swiglu_backward_quantize(q_h, s_h, da, cuda=False)))
    print(f"{'kernel':<24}{'GB/s':>9}{'copy GB/s':>11}{'of copy':>9}")
    for name, nbytes, fn in cases:  # each beside the copy (its own rounds), x read + written
        ms = interleaved_ms({"copy": lambda: copy_out.copy_(x), name: fn})
        gbs, copy_gbs = nbytes / ms[name] / 1e6, 4 * n / ms["copy"] / 1e6
        print(f"{name:<24}{gbs:>9.0f}{copy_gbs:>11.0f}{gbs / copy_gbs:>8.0%}")
        record(BENCH, f"quant {name} {M}x{K}", gbs, "GB/s", "D2D copy", copy_gbs)


def dispatch_rows(T: int, K: int, n_experts: int, device) -> torch.Tensor:
    """MoE's token_of_slot for T tokens each routed to K random experts: the slots sorted by
    expert (models.moe.sort_by_expert), each holding its token's row."""
    from models.moe import sort_by_expert
    expert_TK = torch.rand(T, n_experts, device=device).topk(K, dim=1).indices
    return sort_by_expert(expert_TK)[0] // K


def bench_dispatch_quant(cases) -> None:
    """The routed experts' input: quantize_dual reading the tokens through the dispatch index
    (what FP8GroupedExperts.forward_tokens runs) against gathering the sorted bf16 copies first."""
    from models.fp8 import quant

    print("\n== MoE dispatch into the experts' FP8 copies, ms (lower is better)")
    for T, D, K, E in cases:
        x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
        rows = dispatch_rows(T, K, E, DEVICE)
        ms = interleaved_ms({
            "through index": lambda: quant.quantize_dual(x, check_finite=False, rows=rows),
            "gather, then dual": lambda: quant.quantize_dual(x[rows], check_finite=False)})
        case = f"{T}x{D} top-{K} of {E}"
        print(f"{case:<28}{ms['through index']:>8.3f}{ms['gather, then dual']:>8.3f}")
        record(BENCH, f"dispatch->dual {case}", ms["through index"], "ms", "gather, then dual",
               ms["gather, then dual"], higher_is_better=False)
        del x, rows


def bench_norm_fusion(cases) -> None:
    """A norm feeding FP8 consumers: FP8RMSNorm's one kernel (x read once; y written in bf16 for
    the high-precision readers and as both FP8 copies) against the plain norm, then quantize_dual
    reading y back (what the model runs with fp8.fuse_norms=false)."""
    from models import kernels
    from models.fp8 import quant

    print("\n== RMSNorm feeding FP8 consumers, ms (lower is better)")
    for M, K in cases:
        x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
        w = (1 + 0.1 * torch.randn(K, device=DEVICE)).to(torch.bfloat16)
        y = torch.empty_like(x)
        ms = interleaved_ms({
            "fused": lambda: quant.rmsnorm_quantize(x, w, check_finite=False, hp_out=y),
            "norm, then dual": lambda: quant.quantize_dual(kernels.rms_norm(x, w, 1e-6),
                                                           check_finite=False)})
        print(f"{M}x{K:<22}{ms['fused']:>8.3f}{ms['norm, then dual']:>8.3f}")
        record(BENCH, f"rmsnorm->dual+bf16 y {M}x{K}", ms["fused"], "ms", "norm, then dual",
               ms["norm, then dual"], higher_is_better=False)
        del x, y


def bench_swiglu_input_copy(cases) -> None:
    """An FP8 SwiGLU's forward: the down projection's input a = silu(gate) * up and the 1x128
    copy of h = [gate | up] the backward recomputes from, both from one read of h
    (swiglu_quantize(input_copy=True), what FP8MLP and the FP8 experts run) against the SwiGLU
    quantizer, then quantize_1x128 reading h again."""
    from models.fp8 import quant

    print("\n== SwiGLU -> a's 1x128 copy and h's own, ms (lower is better)")
    for M, F in cases:
        h = torch.randn(M, 2 * F, device=DEVICE, dtype=torch.bfloat16)
        gate, up = h[:, :F], h[:, F:]
        ms = interleaved_ms({
            "one read": lambda: quant.swiglu_quantize(gate, up, colwise=False, check_finite=False,
                                                      input_copy=True),
            "two reads": lambda: (quant.swiglu_quantize(gate, up, colwise=False,
                                                        check_finite=False),
                                  quant.quantize_1x128(h, check_finite=False))})
        print(f"{M}x{2 * F:<22}{ms['one read']:>8.3f}{ms['two reads']:>8.3f}")
        record(BENCH, f"swiglu->1x128 + h's copy {M}x{2 * F}", ms["one read"], "ms",
               "swiglu, then quantize_1x128(h)", ms["two reads"], higher_is_better=False)
        del h, gate, up


def _te_linear(K: int, N: int):
    """TE Linear + a context factory for Float8BlockScaling, or (None, reason)."""
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import Float8BlockScaling
    except Exception as e:  # TE is optional: any import failure means "absent"
        return None, f"transformer_engine does not import ({type(e).__name__}: {e})"
    layer = te.Linear(K, N, bias=False, params_dtype=torch.bfloat16, device=DEVICE)
    recipe = Float8BlockScaling()
    if hasattr(te, "autocast"):
        return (layer, lambda: te.autocast(enabled=True, recipe=recipe)), None
    return (layer, lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)), None


def _fwd_bwd(layer, x, dy, ctx=None):
    """One forward + backward of `layer` on x. x is the same tensor every step, so the FP8 copies
    our layers hang on it are dropped first: each step quantizes its input, as a training step
    with fresh activations does (before the sixteenth session they were kept, and the linear
    and mlp rows left the input's quantization out after the first call: 5% to 50% too fast).
    Backward on this thread, as the trainer runs it (timing.train_backward), and dx written, not
    accumulated: each step starts with x.grad cleared (accumulating would add a pass over [T, K]
    to every recipe's time, 120 us at 8192 x 7168 on an H100)."""
    from models.fp8.linear import drop_input_copies

    def step():
        drop_input_copies(x)
        x.grad = None  # dx goes upstream in a model, not added into a leaf's .grad
        if ctx is None:
            y = layer(x)
        else:
            with ctx():
                y = layer(x)
        train_backward(y, dy)
    return step


def _te_steps(layer, ctx, x, dy) -> dict:
    """TE Linear forward + backward steps: "te" quantizes the weight every call (like ours with
    the cache dropped); "te cached" reuses the FP8 weight TE cached on a first micro-batch
    (`is_first_microbatch`, TE's weight caching across micro-batches, like ours kept)."""
    steps = {"te": _fwd_bwd(layer, x, dy, ctx)}
    try:
        with ctx():
            layer(x, is_first_microbatch=True).backward(dy)
    except Exception as e:  # an older TE without weight caching: the re-quantizing step only
        print(f"TE Linear(is_first_microbatch=True) failed ({type(e).__name__}: {e})")
        return steps
    steps["te cached"] = _fwd_bwd(lambda inp: layer(inp, is_first_microbatch=False), x, dy, ctx)
    return steps


def bench_linear(shapes) -> None:
    from models.fp8.linear import FP8Linear

    print("\n== one Linear, forward + backward (dx and dW), TFLOPS = 6 T K N / time; GPU us: the"
          " GPU's busy time per call (a wall time well above it is the host's)")
    print(f"{'T x K -> N':<22}{'fp8 cached W':>13}{'fp8 requant W':>14}{'bf16':>8}"
          f"{'TE cached W':>12}{'TE requant W':>13}{'ours/bf16':>10}{'GPU us fp8':>11}"
          f"{'bf16':>7}")
    te_note = None
    for T, K, N in shapes:
        if over_budget(f"linear {T}x{K}->{N}"):
            continue
        base = torch.nn.Linear(K, N, bias=False, device=DEVICE, dtype=torch.bfloat16)
        ours = FP8Linear.from_linear(torch.nn.Linear(K, N, bias=False, device=DEVICE, dtype=torch.bfloat16))
        x = torch.randn(T, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(T, N, device=DEVICE, dtype=torch.bfloat16)
        flops = 6 * T * K * N

        def requant_step(step=_fwd_bwd(ours, x, dy)):
            ours.invalidate_fp8_cache()
            step()
        te, te_note = _te_linear(K, N)
        steps = {"cached": _fwd_bwd(ours, x, dy), "requant": requant_step,
                 "bf16": _fwd_bwd(base, x, dy)}
        if te:
            steps.update(_te_steps(*te, x, dy))
        ms = interleaved_ms(steps, reps=3)
        tf = {k: tflops(flops, ms[k]) if k in ms else float("nan")
              for k in ("cached", "requant", "bf16", "te cached", "te")}
        busy = {k: gpu_busy_ms(steps[k]) for k in ("cached", "bf16")}
        case = f"{T}x{K}->{N}"
        print(f"{case:<22}{tf['cached']:>13.0f}{tf['requant']:>14.0f}{tf['bf16']:>8.0f}"
              f"{tf['te cached']:>12.0f}{tf['te']:>13.0f}{tf['cached'] / tf['bf16']:>9.2f}x"
              f"{busy['cached'] * 1e3:>11.0f}{busy['bf16'] * 1e3:>7.0f}")
        record(BENCH, f"linear {case}", tf["cached"], "TFLOPS", "bf16 nn.Linear", tf["bf16"])
        record(BENCH, f"linear {case} requant W", tf["requant"], "TFLOPS", "bf16 nn.Linear",
               tf["bf16"])
        record(BENCH, f"linear {case} GPU busy a call", busy["cached"] * 1e3, "us",
               "bf16 nn.Linear", busy["bf16"] * 1e3, higher_is_better=False)
        # like against like: TE caching its FP8 weight as ours does, and both re-quantizing it;
        # nan where TE is absent or failed (interleaved_ms reports a failure, then nan)
        for ours_key, te_key, label in (("cached", "te cached", "linear {}"),
                                        ("requant", "te", "linear {} requant W")):
            if tf[te_key] == tf[te_key]:
                record(BENCH, label.format(case), tf[ours_key], "TFLOPS",
                       f"TE Float8BlockScaling Linear{' cached W' if te_key != 'te' else ''}",
                       tf[te_key])
        del base, ours, te, x, dy
        torch.cuda.empty_cache()
    if te_note:
        print(f"Transformer Engine absent: {te_note}")


def saved_bytes(layer, x) -> int:
    """Bytes autograd keeps for the backward of one forward of `layer`: activations, not weights
    or their FP8 copies (backward saves the transposed copy, but it is the weight's, held once for
    the step however many micro-batches run)."""
    from models.fp8.linear import cached_weight_copies
    seen = {}

    def pack(t):
        seen[t.data_ptr()] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    for t in [*layer.parameters(), *cached_weight_copies(layer)]:
        seen.pop(t.data_ptr(), None)
    return sum(seen.values())


def bench_saved_memory(T: int, D: int, F_: int) -> None:
    from models.fp8.linear import FP8Linear, FP8MLP
    from models.layers import MLP

    print(f"\n== activation memory saved for backward, T={T} (MB; lower is better)")
    x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    lin = torch.nn.Linear(D, F_, bias=False, device=DEVICE, dtype=torch.bfloat16)
    mlp = MLP(D, F_).to(device=DEVICE, dtype=torch.bfloat16)
    for name, base, ours in [(f"linear {D}->{F_}", lin, FP8Linear.from_linear(lin)),
                             (f"mlp {D}, F={F_}", mlp, FP8MLP.from_mlp(mlp))]:
        b, o = saved_bytes(base, x) / 2**20, saved_bytes(ours, x) / 2**20
        print(f"{name:<22} fp8 {o:8.1f}   bf16 {b:8.1f}   ({o / b:.2f}x)")
        record(BENCH, f"saved activations {name} T={T}", o, "MB", "bf16", b, higher_is_better=False)


def bench_mlp(shapes) -> None:
    from models.fp8.linear import FP8MLP
    from models.layers import MLP

    print("\n== SwiGLU MLP w2(silu(w1 x) * w3 x), forward + backward, TFLOPS = 18 T D F / time;"
          " GPU us: as for the Linear")
    print(f"{'T x D, F':<22}{'fp8 fused':>10}{'bf16':>8}{'ours/bf16':>10}{'GPU us fp8':>11}"
          f"{'bf16':>7}")
    for T, D, F_ in shapes:
        if over_budget(f"mlp {T}x{D}, F={F_}"):
            continue
        base = MLP(D, F_).to(device=DEVICE, dtype=torch.bfloat16)
        ours = FP8MLP.from_mlp(MLP(D, F_).to(device=DEVICE, dtype=torch.bfloat16))
        x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
        flops = 18 * T * D * F_
        steps = {"fp8": _fwd_bwd(ours, x, dy), "bf16": _fwd_bwd(base, x, dy)}
        ms = interleaved_ms(steps, reps=3)
        fp8, bf16 = tflops(flops, ms["fp8"]), tflops(flops, ms["bf16"])
        busy = {k: gpu_busy_ms(step) * 1e3 for k, step in steps.items()}
        case = f"{T}x{D}, F={F_}"
        print(f"{case:<22}{fp8:>10.0f}{bf16:>8.0f}{fp8 / bf16:>9.2f}x{busy['fp8']:>11.0f}"
              f"{busy['bf16']:>7.0f}")
        record(BENCH, f"mlp {case}", fp8, "TFLOPS", "bf16 MLP", bf16)
        record(BENCH, f"mlp {case} GPU busy a call", busy["fp8"], "us", "bf16 MLP",
               busy["bf16"], higher_is_better=False)
        del base, ours, x, dy
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape per section")
    parser.add_argument("--budget", type=float, default=50.0,
                        help="seconds after which no new shape starts (default 50)")
    args = parser.parse_args()
    start = time.monotonic()
    DEADLINE[0] = start + args.budget
    if not torch.cuda.is_available():
        print("bench_fp8: no CUDA device; nothing to measure")
        return
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    gemm_shapes = [(8192, 7168, 2048), (8192, 2048, 7168), (8192, 8192, 8192), (8192, 24576, 1536),
                   (8192, 1536, 7168), (16384, 4096, 4096)]
    linear_shapes = [(8192, 7168, 2048), (8192, 2048, 7168), (16384, 4096, 4096), (8192, 4096, 1024),
                     (8192, 1024, 8192)]  # the last two: convert's skip_small evidence
    # `small`: dense MLP, shared expert; the shared expert's three token counts are the evidence
    # for convert's MLP_MIN_TOKENS (every row here runs FP8 whatever the count)
    mlp_shapes = [(8192, 4096, 10240), (4096, 4096, 1536), (8192, 4096, 1536), (16384, 4096, 1536)]
    if args.quick:
        gemm_shapes, linear_shapes, mlp_shapes = gemm_shapes[:1], linear_shapes[:1], mlp_shapes[:1]
    bench_gemm(gemm_shapes)
    bench_quant(32768, 7168)
    bench_linear(linear_shapes)
    bench_mlp(mlp_shapes)
    bench_dispatch_quant([(16384, 4096, 4, 16), (8192, 7168, 8, 256)])  # `small`, DeepSeek-V3
    bench_norm_fusion([(16384, 4096), (8192, 7168)])
    bench_swiglu_input_copy([(16384, 10240), (65536, 1536)])  # `small`'s dense MLP, its experts
    bench_saved_memory(8192, 4096, 10240)
    print(f"\nbench_fp8: {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
