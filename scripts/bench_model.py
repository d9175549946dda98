"""Forward + backward of a model size in bf16 on one GPU: time, tokens/s, MFU, peak memory.

The MFU baseline is measured in the same run: a large bf16 `torch.matmul` gives the dense peak
this card reaches (instead of the datasheet's 989 TFLOPS), and the model's FLOPs per token come
from `Transformer.flops_per_token` (activated weights + causal attention, MTP included).

    python scripts/bench_model.py                    # small, 4 x 4096 tokens
    python scripts/bench_model.py --size debug --batch 8 --seq 512
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import build_model, model_config  # noqa: E402
from summary import record  # noqa: E402
from timing import bf16_matmul_tflops, time_ms  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--iters", type=int, default=8)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py needs a CUDA GPU")
    torch.manual_seed(0)
    cfg = model_config(args.size, max_position_embeddings=max(args.seq, 4096))
    model = build_model(cfg, device="cuda").to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device="cuda")

    def step():
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    seconds = time_ms(step, reps=1, batches=args.iters) / 1e3
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    n_tok = args.batch * args.seq
    tflops = model.flops_per_token(args.seq) * n_tok / seconds / 1e12
    peak = bf16_matmul_tflops()
    total, act = model.param_counts(include_mtp=True)
    print(f"{torch.cuda.get_device_name()} | {args.size}: {total / 1e9:.2f}B params "
          f"({act / 1e9:.2f}B activated), batch {args.batch} x {args.seq}")
    print(f"fwd+bwd {seconds * 1e3:.1f} ms | {n_tok / seconds:,.0f} tokens/s | "
          f"{tflops:.0f} TFLOPS model | bf16 matmul peak {peak:.0f} TFLOPS | "
          f"MFU {tflops / peak:.1%} of measured, {tflops / 989:.1%} of 989 | "
          f"peak memory {peak_gib:.1f} GiB | wall {time.perf_counter() - t0:.0f}s")
    record("model", f"{args.size} bf16 fwd+bwd {args.batch}x{args.seq}", tflops, "TFLOPS",
           "bf16 matmul 8192^3", peak)
    record("model", f"{args.size} bf16 fwd+bwd peak memory (ratio: share of card)", peak_gib, "GiB",
           "card",
           torch.cuda.get_device_properties(0).total_memory / 2 ** 30)


if __name__ == "__main__":
    main()
