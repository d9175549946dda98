"""How close each GPU precision path's gradients are to an fp32 reference, per parameter family.

When two training runs part ways (FP8 against bf16, a kernel change against the last commit), the
first question is whether one of them computes a wrong gradient. This script answers it on one
batch: the same weights go into the model once in fp32 running its eager torch code (no Triton
kernels, no torch._grouped_mm, TF32 off: the reference), then into each variant below; every
variant's loss and every parameter's gradient are compared with the reference's.

    bf16        the model as it trains in bf16 on the GPU (Triton kernels, torch._grouped_mm)
    bf16 again  the same once more: equal to `bf16` unless something in it is nondeterministic
    bf16 eager  the Triton kernels off (models/kernels.py `fused` false: the eager torch code)
    bf16 bmm    the routed experts through the padded bmm instead of torch._grouped_mm
    fp8         models.fp8.convert(blockwise), as scripts/bench_fp8_loss.py trains it
    fake:PARTS  FP8's roundings emulated in fp32 for PARTS only (models/fp8/fake_quant.py:
                `weights`, `inputs`, `grads` joined by '+', `all`, or `none` for the same layers'
                plain products in fp32), in the layers FP8 converts: which rounding makes FP8's
                gradient differ, and whether the emulation (`fake:all`) lands where `fp8` does

Per family of parameters (named alike in every layer, e.g. layers.*.ffn.experts.w1), two numbers:
rel = |g - ref| / |ref|, how far the gradient is, and bias = <g - ref, ref> / |ref|^2, how much
of that is a systematic shrink (< 0) or growth (> 0) along the reference rather than noise.

At initialization every gradient is tiny and routing is near uniform, which is not where
training spends its time, so after the first audit the bf16 model trains --steps steps with the
project's engine (DeepSpeed ZeRO-1 bf16, AdamW, bias balancing: bench_fp8_loss.py's run) and the
audit is repeated on its weights and the next batch.

Measured on the H100 (thirteenth session, `small`, seed 0, 1 x 2048 tokens, 300 steps at lr
3e-4): every variant's loss within 0.05% of fp32's. At init rel 1.4-4.6% for bf16 (routers the
highest) against 8.9-22.5% for FP8, whose routed experts' gradients also came out ~4% short
(bias -0.037); after 300 steps bf16 0.3-2.7%, FP8 0.5-5.3%, biases within +-0.01 but for FP8's
MTP router (-0.035). `bf16 eager` and `bf16 bmm` matched `bf16` to within 0.7 points of rel
everywhere (`bf16 again` differed from `bf16` in the fourth digit of a few families at init: the
bf16 path is not bitwise repeatable). No bf16 GPU path is defective, and bf16 is 2-4x closer to
fp32 than FP8 in every family.

Fourteenth session, H200, same settings, with the fake variants: `fake:all` lands on `fp8` in
every family (rel within 0.008 of it at init and after training), so the emulation computes FP8's
arithmetic at the scale of the model too, and `fake:none` on `bf16` (within 0.003). The weights'
128x128 rounding alone makes most of FP8's distance: at init rel 0.03-0.26 (`fp8` 0.03-0.23)
and the routed experts' shrink (bias -0.028 of `fp8`'s -0.037; inputs -0.014, grads -0.003);
after 300 steps it alone moves the routers' gradients by 13% as FP8 does (the routers stay
bf16: their gradient is a small difference of expert outputs, which the rounded weights change),
against inputs 0.4-2.1% and grads 0.3-1.5% (bf16 0.3-1.2%).

    python scripts/grad_fidelity.py                   # small, seed 0: at init and after 300 steps
    python scripts/grad_fidelity.py --steps 0         # the init audit only
    python scripts/grad_fidelity.py --size debug --seq-len 512 --steps 20
    python scripts/grad_fidelity.py --variants bf16,fp8,fake:all,fake:weights,fake:inputs,fake:grads
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models.kernels as kernels  # noqa: E402
import models.moe as moe  # noqa: E402
from models import build_model, model_config  # noqa: E402
from models.fp8.config import FP8Config  # noqa: E402
from models.fp8.fake_quant import fake_convert, parse_parts  # noqa: E402
from trainer import engine as eng  # noqa: E402
from trainer.balance import LoadBalancer  # noqa: E402
from trainer.data import Corpus, DataConfig, TrainLoader  # noqa: E402
from trainer.optim import OptimConfig, build_optimizer, build_schedule  # noqa: E402

VARIANTS = {"bf16": {}, "bf16 again": {}, "bf16 eager": dict(fused=False),
            "bf16 bmm": dict(native=False), "fp8": dict(fp8=True)}
"""Name -> how it differs from the model as it trains in bf16 (keywords of `gradients`); a
`fake:PARTS` name is one more (`variant`)."""
DEFAULT_VARIANTS = ",".join(VARIANTS)
NATIVE = moe._native_grouped_mm_ok


def family(name: str) -> str:
    """The parameter's name with layer indices starred: one row per kind of parameter."""
    return re.sub(r"\.\d+\.", ".*.", name)


def variant(name: str) -> dict:
    """The keywords of `gradients` for variant `name` (VARIANTS, or fake:PARTS)."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name.startswith("fake:"):
        return dict(fake=parse_parts(name[len("fake:"):]))
    raise ValueError(f"unknown variant {name!r}: name some of {sorted(VARIANTS)} or "
                     f"'fake:PARTS' (PARTS: weights, inputs, grads joined by '+', all or none)")


def build(cfg, state: dict, dtype: torch.dtype, fp8: bool,
          fake: frozenset[str] | None = None) -> torch.nn.Module:
    """A model holding `state`, converted to FP8 (or its fake twin with the `fake` parts) if
    asked, cast as the engine casts (fp32 buffers such as the router bias stay fp32)."""
    model = build_model(cfg, device="cuda")
    model.load_state_dict(state)
    if fp8:
        from models.fp8 import convert
        model = convert(model, FP8Config(recipe="blockwise"))
    if fake is not None:
        model = fake_convert(model, fake)
    if dtype != torch.float32:
        fp32_buffers = {n: b.detach().clone() for n, b in model.named_buffers()
                        if b.dtype == torch.float32}
        model = model.to(dtype)
        eng.keep_fp32_buffers(model, fp32_buffers)
    return model


def gradients(cfg, state, batch, dtype, fp8=False, fused=True, native=True, fake=None):
    """({parameter name: fp32 gradient}, (lm loss, mtp loss)) of one forward and backward."""
    moe._native_grouped_mm_ok = NATIVE if native else (lambda *a: False)
    try:
        with contextlib.nullcontext() if fused else kernels.eager():
            model = build(cfg, state, dtype, fp8, fake)
            out = model(batch["tokens"].cuda(), batch["labels"].cuda())
            out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        return grads, (out.lm_loss.item(), out.mtp_loss.item())
    finally:
        moe._native_grouped_mm_ok = NATIVE


def by_family(grads: dict, ref: dict) -> dict[str, tuple[float, float]]:
    """{family: (rel, bias)} of `grads` against `ref` (see the module docstring)."""
    sums: dict[str, list[float]] = {}
    for name, r in ref.items():
        d = grads[name] - r
        acc = sums.setdefault(family(name), [0.0, 0.0, 0.0])
        acc[0] += float((d * d).sum())
        acc[1] += float((r * r).sum())
        acc[2] += float((d * r).sum())
    return {f: ((dd / rr) ** 0.5, dr / rr) if rr else (0.0, 0.0)
            for f, (dd, rr, dr) in sums.items()}


def audit(title: str, cfg, state: dict, batch: dict, variants: dict[str, dict]) -> None:
    """Each of `variants` ({name: keywords of `gradients`}) against the fp32 eager reference."""
    print(f"\n== {title}", flush=True)
    t0 = time.time()
    torch.set_float32_matmul_precision("highest")
    ref, ref_loss = gradients(cfg, state, batch, torch.float32, fused=False)
    print(f"  {'fp32 eager':<11} loss lm {ref_loss[0]:.5f}  mtp {ref_loss[1]:.5f}")
    table = {}
    for name, how in variants.items():
        grads, loss = gradients(cfg, state, batch, torch.bfloat16, **how)
        print(f"  {name:<11} loss lm {loss[0]:.5f} ({loss[0] / ref_loss[0] - 1:+.3%})  mtp "
              f"{loss[1]:.5f} ({loss[1] / ref_loss[1] - 1:+.3%})", flush=True)
        table[name] = by_family(grads, ref)
        del grads
    families = next(iter(table.values()))
    width = max(map(len, families)) + 2
    print("  rel | bias per family".ljust(width) + "".join(f"{n:>17}" for n in table))
    for fam in families:
        print(f"  {fam:<{width - 2}}" + "".join(
            f"{t[fam][0]:>9.4f} {t[fam][1]:+.4f}" for t in table.values()))
    print(f"  ({time.time() - t0:.0f} s)", flush=True)


SCHEDULE_STEPS = 500
"""The run whose learning-rate schedule the training follows: bench_fp8_loss.py's default."""


def train_bf16(args, cfg, state: dict, rows, steps: int) -> dict:
    """`state` after the first `steps` bf16 steps of bench_fp8_loss.py's run (its warm-up, a
    tenth of SCHEDULE_STEPS, and its schedule): the engine's bf16 weights, as fp32."""
    model = build_model(cfg, device="cuda")
    model.load_state_dict(state)
    optim = OptimConfig(lr=args.lr, warmup_steps=SCHEDULE_STEPS // 10)
    ds = eng.deepspeed_config(eng.ParallelConfig(), optim.grad_clip, 1, 1, "bf16")
    engine = eng.build_engine(model, build_optimizer(model, optim),
                              build_schedule(optim, SCHEDULE_STEPS), ds)
    balancer = LoadBalancer(engine.module.routers(), optim.bias_update_rate)
    loader = TrainLoader(rows, 1, 1, 0, 1, seed=args.seed)
    for step in range(steps):
        metrics = eng.train_step(engine, loader.micro_batches(step), eng.lm_loss, balancer)
        if step % 50 == 0:
            print(f"  bf16 step {step}: loss {metrics['loss/total']:.4f}", flush=True)
    state = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    del engine, model  # what the engine still holds stays allocated; the audits fit beside it
    torch.cuda.empty_cache()
    return state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="small")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="bf16 steps before the second audit")
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate of those steps")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help="comma-separated, compared in this order (module docstring)")
    args = p.parse_args()
    try:
        variants = {name: variant(name) for name in args.variants.split(",")}
    except ValueError as err:
        p.error(str(err))
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        raise SystemExit("grad_fidelity.py needs an sm90 GPU (H100/H200): the paths it compares "
                         "are the GPU's")
    eng.init_distributed()
    cfg = model_config(args.size, max_position_embeddings=max(args.seq_len, 4096))
    corpus = Corpus(DataConfig(seq_len=args.seq_len, micro_batch_size=1, vocab_size=cfg.vocab_size))
    corpus.prepare()
    rows = corpus.load().train_rows
    loader = TrainLoader(rows, 1, 1, 0, 1, seed=args.seed)
    torch.manual_seed(args.seed)
    state = {k: v.clone() for k, v in build_model(cfg, device="cuda").state_dict().items()}
    print(f"{torch.cuda.get_device_name()}: {args.size}, 1 x {args.seq_len} tokens, "
          f"seed {args.seed}")
    audit("at initialization, batch 0", cfg, state, loader.micro_batches(0)[0], variants)
    if args.steps:
        state = train_bf16(args, cfg, state, rows, args.steps)
        audit(f"after {args.steps} bf16 steps at lr {args.lr:g}, batch {args.steps}", cfg, state,
              loader.micro_batches(args.steps)[0], variants)


if __name__ == "__main__":
    main()
