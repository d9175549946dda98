"""A full training step of `small` on one GPU through the real engine: tokens/s, MFU, peak memory.

"Step" is exactly what `python -m trainer.pretrain` runs per optimizer step: `trainer.engine.train_step`
on a DeepSpeed ZeRO-1 bf16 engine (forward, backward, gradient clipping, our AdamW with bf16
moments on FP32 masters, router-bias update, metric all-reduce). Inputs are random tokens, so
nothing is read from disk.

MFU = model FLOPs per token (`Transformer.flops_per_token`: activated weights + causal attention,
MTP included) x tokens/s / 989 TFLOP/s (H100 dense BF16). The achieved model TFLOP/s is also set
against a bf16 8192^3 matmul measured in the same run. With `models.fp8.convert` present (and an
sm90 GPU), the same step runs with fp8=blockwise and the FP8/bf16 tokens/s ratio is reported.

    python scripts/bench_train.py                       # small, 4 x 2048 tokens per step
    python scripts/bench_train.py --micro-batch 2 --seq-len 4096 --layers 2 --steps 6
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import build_model, model_config  # noqa: E402
from models.fp8.config import FP8Config  # noqa: E402
from summary import record  # noqa: E402
from timing import bf16_matmul_tflops  # noqa: E402
from trainer import engine as eng  # noqa: E402
from trainer.balance import LoadBalancer  # noqa: E402
from trainer.optim import OptimConfig, build_optimizer, build_schedule  # noqa: E402
from trainer.tracking import PEAK_BF16_FLOPS  # noqa: E402

H100_PEAK = PEAK_BF16_FLOPS["H100"]


def build(args, recipe: str, job: eng.Job):
    torch.manual_seed(0)
    cfg = model_config(args.size, **({"num_hidden_layers": args.layers} if args.layers else {}))
    model = build_model(cfg, device=job.device)
    if recipe != "off":
        from models.fp8 import convert
        model = convert(model, FP8Config(recipe=recipe))
    optim = OptimConfig(lr=1e-4, warmup_steps=0)
    ds = eng.deepspeed_config(eng.ParallelConfig(), optim.grad_clip, args.micro_batch, 1, "bf16")
    engine = eng.build_engine(model, build_optimizer(model, optim), build_schedule(optim, 10 ** 6), ds)
    return cfg, engine, LoadBalancer(engine.module.routers(), optim.bias_update_rate)


def measure(args, recipe: str, job: eng.Job) -> dict:
    cfg, engine, balancer = build(args, recipe, job)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
    batch = [{"tokens": rows[:, :-1], "labels": rows[:, 1:]}]
    for _ in range(args.warmup):
        eng.train_step(engine, batch, eng.lm_loss, balancer)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = eng.train_step(engine, batch, eng.lm_loss, balancer)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.micro_batch * args.seq_len / seconds
    flops = engine.module.flops_per_token(args.seq_len) * tokens_per_s
    result = dict(recipe=recipe, step_ms=seconds * 1e3, tokens_per_s=tokens_per_s, tflops=flops / 1e12,
                  mfu=flops / H100_PEAK, peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                  loss=metrics["loss/total"], params=engine.module.param_counts())
    del engine, balancer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def fp8_available() -> bool:
    try:
        from models.fp8 import convert  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the size's own)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train.py needs a CUDA GPU")
    job = eng.init_distributed()
    card = torch.cuda.get_device_name()
    matmul = bf16_matmul_tflops()
    results = [measure(args, "off", job)]
    if fp8_available():
        results.append(measure(args, "blockwise", job))
    else:
        print("fp8=blockwise not measured: models.fp8.convert is missing or the GPU is not sm90")
    print(f"{card}: {args.size} ({results[0]['params']}), {args.micro_batch} x {args.seq_len} tokens per step; "
          f"bf16 8192^3 matmul {matmul:.0f} TFLOP/s")
    for r in results:
        print(f"  fp8={r['recipe']:<9} step {r['step_ms']:8.1f} ms  {r['tokens_per_s']:10,.0f} tok/s  "
              f"{r['tflops']:6.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  peak {r['peak_gib']:5.1f} GiB  "
              f"loss {r['loss']:.3f}")
    report(args, results, matmul)


def report(args, results: list[dict], matmul: float) -> None:
    bf16 = results[0]
    case = f"{args.size} step {args.micro_batch}x{args.seq_len}"
    record("train", f"{case} bf16 MFU", bf16["tflops"], "TFLOP/s", "H100 dense bf16 peak", H100_PEAK / 1e12)
    record("train", f"{case} bf16 model FLOP/s", bf16["tflops"], "TFLOP/s", "bf16 8192^3 matmul", matmul)
    if len(results) > 1:
        fp8 = results[1]
        record("train", f"{case} fp8 tokens/s", fp8["tokens_per_s"], "tok/s", "bf16 tokens/s", bf16["tokens_per_s"])
        record("train", f"{case} fp8 peak memory", fp8["peak_gib"], "GiB", "bf16 peak memory", bf16["peak_gib"],
               higher_is_better=False)


if __name__ == "__main__":
    main()
