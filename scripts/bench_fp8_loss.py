"""FP8 against bf16 end to end: the same training run twice, once per precision.

Both runs build the model from the same seed, read the same batches of the embedded corpus
(the interpreter's standard library, BPE-tokenized) in the same order, and step the real engine
(`trainer.engine.train_step`: DeepSpeed ZeRO-1 bf16, our AdamW, aux-loss-free bias updates).
The only difference is `models.fp8.convert(model, FP8Config("blockwise"))` in the second.

Reported: training tokens/s of each (the FP8/bf16 ratio), peak memory of each, and the loss
curves compared as DeepSeek-V3 does: EMA(0.9)-smoothed training loss, first and last value of
each run and the relative gap at the end (aim: within 0.25%).

On an H100 the bf16 run of the default took about 115 s with 2 x 2048 tokens per step (tokenizer
preparation and engine set-up included); the default is now 1 x 2048, so allow gpu_check.sh about
four minutes for this script (BENCH_TIMEOUT unset or >= 240).

    python scripts/bench_fp8_loss.py                          # small, 500 steps of 1 x 2048 tokens
    python scripts/bench_fp8_loss.py --steps 50 --layers 2    # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import build_model, model_config  # noqa: E402
from models.fp8.config import FP8Config  # noqa: E402
from isolate import in_fresh_process  # noqa: E402
from summary import record  # noqa: E402
from trainer import engine as eng  # noqa: E402
from trainer.balance import LoadBalancer  # noqa: E402
from trainer.data import Corpus, DataConfig, TrainLoader  # noqa: E402
from trainer.optim import OptimConfig, build_optimizer, build_schedule  # noqa: E402


def ema(values: list[float], decay: float = 0.9) -> list[float]:
    out, acc = [], values[0]
    for v in values:
        acc = decay * acc + (1 - decay) * v
        out.append(acc)
    return out


def corpus_of(args) -> Corpus:
    vocab = model_config(args.size).vocab_size
    return Corpus(DataConfig(seq_len=args.seq_len, micro_batch_size=args.micro_batch, vocab_size=vocab))


def train(args, recipe: str) -> dict:
    """One whole run, in its own process (scripts/isolate.py) so its peak memory is its own."""
    job = eng.init_distributed()
    rows = corpus_of(args).load().train_rows
    torch.manual_seed(args.seed)
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    cfg = model_config(args.size, max_position_embeddings=max(args.seq_len, 4096), **overrides)
    model = build_model(cfg, device=job.device)
    if recipe != "off":
        from models.fp8 import convert
        model = convert(model, FP8Config(recipe=recipe))
    optim = OptimConfig(lr=args.lr, warmup_steps=args.steps // 10)
    ds = eng.deepspeed_config(eng.ParallelConfig(), optim.grad_clip, args.micro_batch, 1, "bf16")
    engine = eng.build_engine(model, build_optimizer(model, optim), build_schedule(optim, args.steps), ds)
    balancer = LoadBalancer(engine.module.routers(), optim.bias_update_rate)
    loader = TrainLoader(rows, args.micro_batch, 1, 0, 1, seed=args.seed)
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        if step % 100 == 0:
            print(f"  fp8={recipe}: step {step}/{args.steps}", flush=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = eng.train_step(engine, loader.micro_batches(step), eng.lm_loss, balancer)
        times.append(time.perf_counter() - t0)
        losses.append(metrics["loss/total"])
    steady = sorted(times[5:] or times)
    return dict(recipe=recipe, losses=losses, step_s=steady[len(steady) // 2],
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the size's own)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where losses.json goes")
    args = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("bench_fp8_loss.py needs an sm90 GPU (H100/H200)")
    corpus_of(args).prepare()  # tokenizer and token rows cached on disk for both runs
    runs = [in_fresh_process(train, args, recipe) for recipe in ("off", "blockwise")]
    report(args, runs)


def report(args, runs: list[dict]) -> None:
    bf16, fp8 = runs
    tokens = args.micro_batch * args.seq_len
    e_bf16, e_fp8 = ema(bf16["losses"]), ema(fp8["losses"])
    gap = e_fp8[-1] / e_bf16[-1] - 1
    print(f"{torch.cuda.get_device_name()}: {args.size}, {args.steps} steps of {args.micro_batch} x "
          f"{args.seq_len} tokens, same seed and batches")
    for r, e in ((bf16, e_bf16), (fp8, e_fp8)):
        print(f"  fp8={r['recipe']:<9} {tokens / r['step_s']:9,.0f} tok/s  peak {r['peak_gib']:5.1f} GiB  "
              f"EMA loss first {e[0]:.4f} last {e[-1]:.4f}")
    print(f"  FP8/bf16 tokens/s {bf16['step_s'] / fp8['step_s']:.2f}x | final EMA loss gap {gap:+.3%} "
          f"(aim within 0.25%) | max |gap| over the last 100 steps "
          f"{max(abs(a / b - 1) for a, b in zip(e_fp8[-100:], e_bf16[-100:])):.3%}")
    with open(os.path.join(args.out, "fp8_loss_curves.json"), "w") as f:
        json.dump({"bf16": bf16["losses"], "fp8": fp8["losses"]}, f)
    case = f"{args.size} {args.steps} steps {args.micro_batch}x{args.seq_len}"
    record("fp8_loss", f"{case}: fp8 train tokens/s", tokens / fp8["step_s"], "tok/s",
           "bf16 train tokens/s", tokens / bf16["step_s"])
    record("fp8_loss", f"{case}: final EMA loss (ratio: bf16/fp8)", e_fp8[-1], "nats",
           "bf16 final EMA loss", e_bf16[-1], higher_is_better=False)


if __name__ == "__main__":
    main()
