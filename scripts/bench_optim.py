"""One AdamW step over the `small` model's 1.9e9 FP32 master weights: our fused kernel against our
torch-ops path and torch's own fused AdamW, all measured in this run.

The parameters are laid out the way DeepSpeed ZeRO-1 hands them to the client optimizer on one GPU:
one flat FP32 partition per parameter group (matrices with weight decay: nearly all of them; vectors
without), each with an FP32 .grad. The update is memory-bound, so besides milliseconds each case
reports the bandwidth of the bytes it must move per parameter (read p, grad, both moments; write p
and the moments): 20 B with BF16 moments, 28 B with FP32 moments, and a device-to-device copy of
the same tensor is timed as the card's achievable HBM bandwidth.

Cases (one optimizer.step() each, CUDA-event median over 25 steps after 5 warm-up steps):
  fused bf16    trainer.optim.AdamW, bf16 moments, the default on CUDA (adamw_kernel)
  torch-ops     the same optimizer with fused=False: the torch elementwise ops of _update_chunk
  fused fp32    our kernel with FP32 moments (same bytes as torch's fused AdamW)
  torch fused   torch.optim.AdamW(fused=True), FP32 moments: the public baseline
then a sweep of the kernel's BLOCK x num_warps (bf16 moments) to show the chosen default holds,
and the step trainer/zero_step.py takes: one flat partition whose bf16 gradient comes in 83 pieces
(one per parameter, as ZeRO holds them) and whose bf16 weights AdamW writes too, stepped by
`adamw_pieces_kernel` in one launch against a launch per piece: GPU time (CUDA events) and the
host's time to queue a step (no synchronization).

    python scripts/bench_optim.py                    # 1.9e9 parameters (~31 GB at the peak), < 60 s
    python scripts/bench_optim.py --params 2e8 --no-sweep
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
from summary import record  # noqa: E402
from timing import time_ms  # noqa: E402
from trainer import optim  # noqa: E402

VECTOR_PARAMS = 2_000_000  # norm weights of `small`: the no-decay partition
BYTES = {torch.bfloat16: 20, torch.float32: 28}  # per parameter: p r/w 8, grad 4, two moments r/w
HYPER = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
SWEEP = [(1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8)]


def partitions(n: int) -> list[torch.Tensor]:
    sizes = [n - VECTOR_PARAMS, VECTOR_PARAMS]
    params = [torch.empty(s, device="cuda").normal_() for s in sizes]
    for p in params:
        p.grad = torch.empty_like(p).normal_().mul_(1e-3)
    return params


def groups(params: list[torch.Tensor]) -> list[dict]:
    return [dict(params=params[:1], weight_decay=0.1), dict(params=params[1:], weight_decay=0.0)]


def time_step(opt: torch.optim.Optimizer) -> float:
    return time_ms(opt.step, reps=5, batches=5)


def case(name: str, make, params, n: int, moment_dtype) -> float:
    opt = make(groups(params))
    ms = time_step(opt)
    print(f"{name:<14} {ms:8.2f} ms  {BYTES[moment_dtype] * n / ms / 1e6:7.0f} GB/s "
          f"({BYTES[moment_dtype]} B/param)", flush=True)
    del opt
    gc.collect()
    torch.cuda.empty_cache()
    return ms


def copy_gbps(params) -> float:
    src = params[0]
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=5, batches=5)
    return 2 * src.numel() * 4 / ms / 1e6


def sweep(params, n: int) -> None:
    default = (optim.FUSED_BLOCK, optim.FUSED_WARPS)
    print("\nadamw_kernel BLOCK x num_warps (bf16 moments):", flush=True)
    opt = optim.AdamW(groups(params), **HYPER, moment_dtype=torch.bfloat16)
    try:
        for block, warps in SWEEP:
            optim.FUSED_BLOCK, optim.FUSED_WARPS = block, warps
            ms = time_step(opt)
            mark = "  <- default" if (block, warps) == default else ""
            print(f"  {block:5d} x {warps}  {ms:8.2f} ms  {20 * n / ms / 1e6:7.0f} GB/s{mark}", flush=True)
    finally:
        optim.FUSED_BLOCK, optim.FUSED_WARPS = default


PIECES = 83  # `small`'s parameters: ZeRO's gradient pieces of one partition on one rank


def piece_sizes(n: int, count: int) -> list[int]:
    """`count` sizes that add up to n, multiples of 128 as `small`'s parameters are (so both
    forms run the vectorized kernel): a third of them norm-sized (512-4096), the rest matrices of
    uneven sizes."""
    norms = [512 * (1 + i % 8) for i in range(count // 3)]
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(count - len(norms), generator=gen) ** 2 + 0.05
    matrices = [int(w) // 128 * 128 for w in weights / weights.sum() * (n - sum(norms))]
    matrices[0] += n - sum(norms) - sum(matrices)
    return [size for pair in zip(matrices, norms) for size in pair] + matrices[len(norms):]


def pieces_case(n: int) -> tuple[float, float, float, float]:
    """(GPU ms, host ms) of one launch, then of a launch per piece, for a partition of n."""
    p = torch.empty(n, device="cuda").normal_()
    grad = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_().mul_(1e-3)
    pieces, p_bf16 = list(grad.split(piece_sizes(n, PIECES))), torch.empty_like(grad)
    opt = optim.AdamW([p], **HYPER, moment_dtype=torch.bfloat16)

    def step():
        opt.use_for_next_step(p, pieces, p_bf16)
        opt.step()
    one_launch = optim.pieces_take_one_launch
    figures = []
    try:
        for takes_one in (True, False):
            optim.pieces_take_one_launch = one_launch if takes_one else (lambda *args: False)
            gpu_ms = time_ms(step, reps=5, batches=5)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):  # 5 x 83 launches stay inside CUDA's launch queue
                step()
            host_ms = (time.perf_counter() - start) / 5 * 1e3
            torch.cuda.synchronize()
            figures += [gpu_ms, host_ms]
    finally:
        optim.pieces_take_one_launch = one_launch
    return tuple(figures)


def report_pieces(n: int) -> None:
    one_gpu, one_host, each_gpu, each_host = pieces_case(n)
    print(f"\nbf16 gradient in {PIECES} pieces, bf16 weights written (trainer/zero_step.py's step):"
          f"\n  one launch         {one_gpu:8.2f} ms GPU  {one_host:6.2f} ms host to queue it"
          f"\n  a launch per piece {each_gpu:8.2f} ms GPU  {each_host:6.2f} ms host", flush=True)
    size = f"{n / 1e9:.2f}B params"
    record("optim", f"AdamW step {size} from {PIECES} bf16 gradient pieces: one launch, GPU",
           one_gpu, "ms", "a launch per piece", each_gpu, higher_is_better=False)
    record("optim", f"AdamW step {size} from {PIECES} bf16 gradient pieces: one launch, host",
           one_host, "ms", "a launch per piece", each_host, higher_is_better=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1.9e9, help="FP32 parameters in all partitions")
    ap.add_argument("--no-sweep", action="store_true", help="skip the BLOCK x num_warps sweep")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_optim.py needs a CUDA GPU")
    n = int(args.params)
    free = torch.cuda.mem_get_info()[0]
    if 16 * n > free - (4 << 30):  # p + grad + FP32 moments, 4 GiB of headroom
        n = (free - (4 << 30)) // 16
        print(f"only {free / 2**30:.0f} GiB free: measuring {n / 1e9:.2f}B parameters instead")
    print(f"{torch.cuda.get_device_name()}: one AdamW step over {n / 1e9:.2f}B FP32 parameters "
          "(2 flat partitions)\n", flush=True)
    params = partitions(n)
    copy = copy_gbps(params)
    torch.cuda.empty_cache()
    print(f"{'D2D copy':<14} {'':8}    {copy:7.0f} GB/s (8 B/element)", flush=True)
    fused = case("fused bf16", lambda g: optim.AdamW(g, **HYPER, moment_dtype=torch.bfloat16),
                 params, n, torch.bfloat16)
    plain = case("torch-ops", lambda g: optim.AdamW(g, **HYPER, moment_dtype=torch.bfloat16, fused=False),
                 params, n, torch.bfloat16)
    fused32 = case("fused fp32", lambda g: optim.AdamW(g, **HYPER, moment_dtype=torch.float32),
                   params, n, torch.float32)
    torch_fused = case("torch fused", lambda g: torch.optim.AdamW(g, **HYPER, fused=True),
                       params, n, torch.float32)
    print(f"\nfused bf16 is {plain / fused:.2f}x the torch-ops path, {torch_fused / fused:.2f}x torch fused "
          f"AdamW (fp32 moments); fused fp32 is {torch_fused / fused32:.2f}x torch fused; the kernel "
          f"moves {20 * n / fused / 1e6 / copy:.0%} of copy bandwidth", flush=True)
    size = f"{n / 1e9:.2f}B params"
    record("optim", f"AdamW step {size}, bf16 moments: fused vs torch ops", fused, "ms",
           "torch-ops path", plain, higher_is_better=False)
    record("optim", f"AdamW step {size}: fused bf16 vs torch fused fp32", fused, "ms",
           "torch.optim.AdamW(fused)", torch_fused, higher_is_better=False)
    record("optim", f"AdamW step {size}, fp32 moments: fused vs torch fused", fused32, "ms",
           "torch.optim.AdamW(fused)", torch_fused, higher_is_better=False)
    record("optim", "fused bf16 AdamW bandwidth vs D2D copy", 20 * n / fused / 1e6, "GB/s",
           "copy", copy)
    if not args.no_sweep:
        sweep(params, n)
    del params
    gc.collect()
    torch.cuda.empty_cache()
    report_pieces(n)


if __name__ == "__main__":
    main()
