"""A full training step of `small` on one GPU through the real engine: tokens/s, MFU, peak memory.

"Step" is exactly what `python -m trainer.pretrain` runs per optimizer step: `trainer.engine.train_step`
on a DeepSpeed ZeRO-1 bf16 engine (forward and backward of each micro-batch, gradient clipping, our
AdamW with bf16 moments on FP32 masters, router-bias update, metric all-reduce). Inputs are random
tokens, so nothing is read from disk.

Two configurations by default, each in bf16 and FP8: 4 x 2048 tokens with one micro-batch per
step (the optimizer's share of the step is largest here), and 4 x 4096 tokens with four
micro-batches per optimizer step (64k tokens per step, still far below the ~1M-token batches
MoE pretraining uses, so the optimizer's share is if anything overstated).

MFU = model FLOPs per token (`Transformer.flops_per_token`: activated weights + causal attention,
MTP included) x tokens/s / 989 TFLOP/s (H100 dense BF16). The achieved model TFLOP/s is also set
against a bf16 8192^3 matmul measured in the same run. With `models.fp8.convert` present (and an
sm90 GPU), the same step runs with fp8=blockwise and the FP8/bf16 tokens/s ratio is reported.
Memory: the step's peak, and what one micro-batch's forward holds for its backward, with the part
that is the weights' transposed FP8 copies (where FP8's saving shows; the peak of a one-GPU run
is the optimizer step's). GPU busy: the milliseconds per step in which the GPU ran something (the
union of the kernels', copies' and memsets' intervals over two more steps under the profiler),
reported as a share of the step; GPU idle is the step's time less that (the step waiting for the
host: launches, syncs; `scripts/profile_step.py --gaps` names the code). The profiled steps' own
gaps would overstate it: the profiler's cost per launch stretches them (the printed "profiled
span" is those steps' first kernel start to last kernel end, a step's worth).

Bound: the FP8/bf16 tokens/s ratio is set against what the FP8 step could reach at most were its
FP8 GEMMs FP8_GEMM_SPEEDUP times bf16's (quantization free) and all else as in bf16, every FLOP
taking the same time (`models.fp8.convert.flop_shares` and `FP8_GEMM_SPEEDUP`; the output heads,
the layers kept bf16 and the attention core are the rest). In `small` FP8 takes 56% of the FLOPs
at 16384 tokens a micro-batch (49% below 8192, where the narrow shared experts run bf16), so the
bound is ~1.23x.

Order: the recipes of a config run as A B ... B A (`--rounds 2`, the default: each measured twice,
the second time in reverse order) and each recipe's step time is the mean of its runs. An H100
under load slows by up to a fifth within a minute, so a recipe measured second meets a hotter GPU;
the mirrored order gives every recipe the same average position (`--rounds 1`: one pass, half
the time, the later recipes disadvantaged).

    python scripts/bench_train.py                       # small: 4x2048 x1 and 4x4096 x4, bf16 and fp8
    python scripts/bench_train.py --configs 2x4096x1 --layers 2 --steps 6 --recipes off --rounds 1
    python scripts/bench_train.py --configs 4x2048x1 --deepspeed-grad-clip   # A/B of zero_clip.py
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import build_model, model_config  # noqa: E402
from models.fp8.config import FP8Config  # noqa: E402
from models.fp8.convert import FP8_GEMM_SPEEDUP, flop_shares  # noqa: E402
from models.fp8.linear import cached_weight_copies  # noqa: E402
from isolate import in_fresh_process  # noqa: E402
from summary import record  # noqa: E402
from timing import (alternating_rounds, bf16_matmul_tflops, busy_us,  # noqa: E402
                    profiled_trace, span_us)
from trainer import engine as eng  # noqa: E402
from trainer.balance import LoadBalancer  # noqa: E402
from trainer.optim import OptimConfig, build_optimizer, build_schedule  # noqa: E402
from trainer.tracking import PEAK_BF16_FLOPS  # noqa: E402

H100_PEAK = PEAK_BF16_FLOPS["H100"]


def fp8_config(recipe: str) -> FP8Config:
    """FP8Config of a --recipes entry: a recipe, optionally with settings after a colon,
    e.g. "blockwise:fuse_norms=false,skip_small=false", "blockwise:linear_min_tokens=0" or
    "blockwise:keep_bf16=layers.0+mtp.*" (keep_bf16's patterns joined by +)."""
    name, _, settings = recipe.partition(":")
    kinds = {f.name: f.type for f in dataclasses.fields(FP8Config) if f.name != "recipe"}
    kwargs = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if kinds.get(key) == "bool" and value.lower() in ("true", "false"):
            kwargs[key] = value.lower() == "true"
        elif kinds.get(key) == "int" and value.isdigit():
            kwargs[key] = int(value)
        elif kinds.get(key) == "list[str]" and value:
            kwargs[key] = value.split("+")
        else:
            raise SystemExit(f"--recipes {recipe}: {item!r} is not a setting; give "
                             f"<field>=true|false, <field>=<count> or keep_bf16=<pattern>+... "
                             f"with a field of {sorted(kinds)}")
    return FP8Config(recipe=name, **kwargs)


def build(args, recipe: str, job: eng.Job, grad_accum: int = 1):
    torch.manual_seed(0)
    cfg = model_config(args.size, **({"num_hidden_layers": args.layers} if args.layers else {}))
    model = build_model(cfg, device=job.device)
    if recipe != "off":
        from models.fp8 import convert
        model = convert(model, fp8_config(recipe))
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    ds = eng.deepspeed_config(eng.ParallelConfig(grad_accum=grad_accum), optim.grad_clip, args.micro_batch,
                              1, "bf16")
    engine = eng.build_engine(model, build_optimizer(model, optim), build_schedule(optim, 10 ** 6),
                              ds, fused_grad_clip=not args.deepspeed_grad_clip,
                              fused_zero_step=not args.deepspeed_zero_step)
    return cfg, engine, LoadBalancer(engine.module.routers(), optim.bias_update_rate)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The A/B switches of the engine `build` makes (this script's and profile_step.py's)."""
    p.add_argument("--deepspeed-grad-clip", action="store_true",
                   help="DeepSpeed's own gradient norm and clipping "
                        "(parallel.fused_grad_clip=false)")
    p.add_argument("--deepspeed-zero-step", action="store_true",
                   help="DeepSpeed's FP32 gradient copy, bf16 weight cast-back and one-rank "
                        "gradient reduction (parallel.fused_zero_step=false)")


def measure(args, recipe: str, grad_accum: int) -> dict:
    """One configuration's step time and peak memory; run in its own process (scripts/isolate.py)."""
    job = eng.init_distributed()
    cfg, engine, balancer = build(args, recipe, job, grad_accum)
    gen = torch.Generator().manual_seed(1)
    batch = []
    for _ in range(grad_accum):
        rows = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
        batch.append({"tokens": rows[:, :-1], "labels": rows[:, 1:]})
    for _ in range(args.warmup):
        eng.train_step(engine, batch, eng.lm_loss, balancer, args.threaded_backward)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = eng.train_step(engine, batch, eng.lm_loss, balancer, args.threaded_backward)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.micro_batch * args.seq_len * grad_accum / seconds
    flops = engine.module.flops_per_token(args.seq_len) * tokens_per_s
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    busy_ms, span_ms = gpu_busy_and_span_ms(lambda: eng.train_step(engine, batch, eng.lm_loss, balancer,
                                                          args.threaded_backward))
    result = dict(recipe=recipe, grad_accum=grad_accum, step_ms=seconds * 1e3, tokens_per_s=tokens_per_s,
                  idle_ms=max(0.0, seconds * 1e3 - busy_ms), span_ms=span_ms,
                  tflops=flops / 1e12, mfu=flops / H100_PEAK, peak_gib=peak_gib,
                  **dict(zip(("held_gib", "copies_gib"), forward_held_gib(engine, batch[0]))),
                  loss=metrics["loss/total"], params=tuple(engine.module.param_counts()),
                  shares=flop_shares(engine.module, args.seq_len, args.micro_batch * args.seq_len))
    return result


def gpu_busy_and_span_ms(step, steps: int = 2) -> tuple[float, float]:
    """(busy, span) in milliseconds per step over `steps` profiled steps: busy, the union of the
    GPU's kernels, copies and memsets (what a step costs the GPU, however fast the host is); span,
    the first one's start to the last one's end, which the profiler's cost per launch stretches
    wherever the host is the bound."""
    trace = profiled_trace(step, calls=steps)
    return busy_us(trace) / 1e3 / steps, span_us(trace) / 1e3 / steps


def forward_held_gib(engine, micro_batch: dict) -> tuple[float, float]:
    """(GiB one micro-batch's forward leaves allocated for its backward, GiB of that in FP8
    weight copies). Measured as training has it at the step's last backward: the weight caches
    dropped (trainer.engine.train_step does so after the last forward), so what remains is the
    saved activations (FP8 copies under fp8=blockwise) plus the weights' transposed FP8 copies,
    which backward reads (1 byte per converted parameter, once per step however many
    micro-batches run). The step's peak is usually set elsewhere (the optimizer step's fp32 state
    and gradient buffers). The graph is dropped unused: no optimizer state changes."""
    saved = {}

    def keep(t):
        saved[t.data_ptr()] = t
        return t
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    engine.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        terms = eng.lm_loss(engine, {k: v.to(engine.device) for k, v in micro_batch.items()})
    copies = {t.data_ptr() for t in cached_weight_copies(engine.module)}
    eng.invalidate_weight_caches(engine.module)
    held = torch.cuda.memory_allocated() - before
    copy_bytes = sum(t.numel() * t.element_size() for ptr, t in saved.items() if ptr in copies)
    del terms, saved
    return held / 2 ** 30, copy_bytes / 2 ** 30


def fp8_available() -> bool:
    try:
        from models.fp8 import convert  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


def parse_config(text: str) -> tuple[int, int, int]:
    """'4x2048x1' -> (micro_batch, seq_len, grad_accum)."""
    try:
        micro, seq, accum = (int(v) for v in text.split("x"))
    except ValueError:
        raise SystemExit(f"--configs entry {text!r} is not MICROxSEQxACCUM, e.g. 4x2048x1") from None
    return micro, seq, accum


def measure_mirrored(recipes: list[str], rounds: int, run) -> list[dict]:
    """run(recipe) for every recipe, `rounds` passes, every other pass in reverse order (A B B A
    for two recipes and two rounds); one result per recipe, in `recipes` order, whose step time
    is the mean over its runs (tokens/s, TFLOP/s and MFU scaled to match; the GPU's idle time
    the mean too; the peak memory the largest) with every run's step time in runs_ms."""
    runs = {recipe: [] for recipe in recipes}
    for order in alternating_rounds(recipes, rounds):
        for recipe in order:
            runs[recipe].append(run(recipe))
    return [_combine(runs[recipe]) for recipe in recipes]


def _combine(results: list[dict]) -> dict:
    step_ms = sum(r["step_ms"] for r in results) / len(results)
    first = results[0]
    speed = first["step_ms"] / step_ms  # first's rates rescaled to the mean step time
    return dict(first, step_ms=step_ms, tokens_per_s=first["tokens_per_s"] * speed,
                tflops=first["tflops"] * speed, mfu=first["mfu"] * speed,
                peak_gib=max(r["peak_gib"] for r in results),
                idle_ms=sum(r["idle_ms"] for r in results) / len(results),
                runs_ms=[r["step_ms"] for r in results])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the size's own)")
    p.add_argument("--configs", nargs="+", default=["4x2048x1", "4x4096x4"],
                   help="micro-batch x sequence length x micro-batches per optimizer step")
    p.add_argument("--recipes", nargs="+", default=["off", "blockwise"],
                   help="fp8 recipes, each measured on every config; FP8Config settings after a "
                        "colon: blockwise:fuse_norms=false")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2,
                   help="passes over the recipes, every other one reversed (see Order above)")
    p.add_argument("--threaded-backward", action="store_true",
                   help="backward on autograd's worker thread (parallel.threaded_backward=true)")
    add_engine_flags(p)
    args = p.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: at least 1")
    for recipe in args.recipes:  # a bad entry fails here, not after the first measurements
        fp8_config(recipe)
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    card = torch.cuda.get_device_name()
    matmul = bf16_matmul_tflops()
    torch.cuda.empty_cache()  # the children below need the whole card
    where = "autograd's worker thread" if args.threaded_backward else "the training loop's thread"
    clip = "DeepSpeed's" if args.deepspeed_grad_clip else "trainer/zero_clip.py's"
    copies = "ZeRO's own" if args.deepspeed_zero_step else "trainer/zero_step.py's"
    print(f"{card}: {args.size}; bf16 8192^3 matmul {matmul:.0f} TFLOP/s; each engine in its own "
          f"process; backward on {where}; {clip} gradient norm and clipping; {copies} "
          "FP32 gradient copy, bf16 weight cast and one-rank gradient reduction")
    for config in args.configs:
        args.micro_batch, args.seq_len, grad_accum = parse_config(config)
        recipes = [r for r in args.recipes if r == "off" or fp8_available()]
        for skipped in sorted(set(args.recipes) - set(recipes)):
            print(f"fp8={skipped} not measured: models.fp8.convert is missing or the GPU is not "
                  "sm90")
        if not recipes:
            continue
        results = measure_mirrored(
            recipes, args.rounds, lambda recipe: in_fresh_process(measure, args, recipe, grad_accum))
        total, activated = results[0]["params"]
        print(f"{args.micro_batch} x {args.seq_len} tokens x {grad_accum} micro-batches per step "
              f"({total / 1e9:.2f}B parameters, {activated / 1e9:.2f}B activated)")
        for r in results:
            print(f"  fp8={r['recipe']:<9} step {r['step_ms']:8.1f} ms  {r['tokens_per_s']:10,.0f} tok/s  "
                  f"{r['tflops']:6.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  peak {r['peak_gib']:5.1f} GiB  "
                  f"held by a forward {r['held_gib']:5.2f} GiB (FP8 weight copies "
                  f"{r['copies_gib']:4.2f})  GPU idle {r['idle_ms']:4.1f} ms (profiled span "
                  f"{r['span_ms']:.1f} ms)  "
                  f"loss {r['loss']:.3f}  (runs: "
                  + " / ".join(f"{ms:.1f}" for ms in r["runs_ms"]) + " ms)")
        report(args, results, matmul)


def report(args, results: list[dict], matmul: float) -> None:
    bf16 = results[0]
    case = f"{args.size} step {args.micro_batch}x{args.seq_len}x{bf16['grad_accum']}"
    record("train", f"{case} bf16 MFU", bf16["tflops"], "TFLOP/s", "H100 dense bf16 peak", H100_PEAK / 1e12)
    record("train", f"{case} bf16 model FLOP/s", bf16["tflops"], "TFLOP/s", "bf16 8192^3 matmul", matmul)
    for r in results:
        record("train", f"{case} {'bf16' if r['recipe'] == 'off' else r['recipe']} GPU busy share "
               "of the step", r["step_ms"] - r["idle_ms"], "ms", "step time", r["step_ms"])
    for fp8 in results[1:]:
        settings = fp8["recipe"].partition(":")[2]
        case = f"{args.size} step {args.micro_batch}x{args.seq_len}x{bf16['grad_accum']}" + (
            f" ({settings})" if settings else "")
        record("train", f"{case} fp8 tokens/s", fp8["tokens_per_s"], "tok/s", "bf16 tokens/s", bf16["tokens_per_s"])
        shares, ratio = fp8["shares"], fp8["tokens_per_s"] / bf16["tokens_per_s"]
        bound = shares.step_speedup_bound(FP8_GEMM_SPEEDUP)
        print(f"  {fp8['recipe']}: FP8 runs {100 * shares.fp8:.1f}% of the step's FLOPs (high-"
              f"precision GEMMs {100 * shares.high_precision_matmul:.1f}%, attention "
              f"{100 * shares.attention:.1f}%): FP8/bf16 {ratio:.3f}x against a FLOP-share bound "
              f"of {bound:.3f}x with FP8 GEMMs {FP8_GEMM_SPEEDUP}x bf16 "
              f"({shares.step_speedup_bound(2.0):.3f}x at 2x)")
        record("train", f"{case} fp8/bf16 step speed", ratio, "x",
               f"FLOP-share bound, FP8 GEMMs {FP8_GEMM_SPEEDUP}x", bound)
        record("train", f"{case} fp8 peak memory", fp8["peak_gib"], "GiB", "bf16 peak memory", bf16["peak_gib"],
               higher_is_better=False)
        record("train", f"{case} fp8 memory held by a micro-batch's forward", fp8["held_gib"], "GiB",
               "bf16", bf16["held_gib"], higher_is_better=False)
        record("train", f"{case} fp8 activations held (less the FP8 weight copies)",
               fp8["held_gib"] - fp8["copies_gib"], "GiB", "bf16", bf16["held_gib"],
               higher_is_better=False)


if __name__ == "__main__":
    main()
