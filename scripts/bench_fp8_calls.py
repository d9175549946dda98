"""Where FP8 starts to pay, by tokens a call: every kind of module `models.fp8.convert` makes FP8
in a model, at that model's shapes, against its bf16 original, over a range of tokens per call.

    python scripts/bench_fp8_calls.py                      # `small`, training and inference
    python scripts/bench_fp8_calls.py --model 16b --tokens 512 1024 2048 4096 --modes infer

Why: FP8 pays a fixed cost per call (quantizing each activation and gradient, a longer host
path) that only long enough GEMMs repay, so convert runs a module in bf16 below a token count
(`fp8.linear_min_tokens` and `fp8.mlp_min_tokens`, each scaled to the module's size,
`fp8.experts_min_tokens`; models/fp8/convert.py). Where that count lies depends on the GPU and
on the host that launches the kernels: this measures it on the machine at hand and prints the
settings it suggests.

Modules: the model is built on the meta device and converted with every threshold off and
skip_small off, so each module convert could make FP8 is listed once per distinct shape (a
Linear kept bf16 under skip_small for its narrow side is listed so and not measured: no token
count changes that).
Each is then built on the GPU twice, bf16 and FP8 sharing the same weights, and timed per call:
  train   forward + backward (dx and the weights' gradients), the input's FP8 copies dropped
          before each call (fresh activations), the FP8 weights quantized once and reused, as over
          the micro-batches of one optimizer step; backward on the calling thread like the trainer;
  infer   forward under torch.no_grad() (evaluation, generation), FP8 weights cached.
The routed experts get each token's top-k experts drawn at random (uniform load, the model's E
and k; above --max-experts experts, E is cut and the tokens with it so that each expert still
sees T k / E of them). Tokens are the call's, T: the product of x's leading dimensions.

Output: per module and mode, FP8 and bf16 milliseconds and their ratio at each T, then the
smallest measured T from which FP8 is at least as fast at every larger T ("FP8 from"), and the
fp8.* settings those crossovers suggest. The summary table (scripts/summary.py) gets, per module
and mode, FP8's time against bf16's at the first measured T its default threshold sends through
FP8 (does the default pay where it starts?). Timing as scripts/timing.py's interleaved_ms
(three rounds in alternating order, medians: a small call's time varies with its host).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from summary import record  # noqa: E402
from timing import interleaved_ms, train_backward  # noqa: E402

BENCH = "fp8_calls"
DEVICE = "cuda"
DEFAULT_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
MODES = ("train", "infer")


@dataclass
class Shape:
    """One distinct FP8 module shape of a model: kind 'linear' (dims = in, out), 'mlp' (dim,
    width) or 'experts' (experts, dim, width, top_k); `names` are the model's modules of it."""
    kind: str
    dims: tuple
    names: list = field(default_factory=list)
    default_min_tokens: int | None = None  # convert's defaults; None: kept bf16 (a narrow Linear)

    @property
    def kept_bf16(self) -> bool:
        """Whether convert's defaults keep it bf16 whatever the token count (skip_small's side
        rule for Linears)."""
        return self.default_min_tokens is None

    @property
    def label(self) -> str:
        if self.kind == "linear":
            return f"Linear {self.dims[0]}->{self.dims[1]}"
        if self.kind == "mlp":
            return f"SwiGLU MLP {self.dims[0]}, F={self.dims[1]}"
        E, D, F, k = self.dims
        return f"experts E{E} top-{k} {D}, F={F}"


def model_shapes(model_name: str) -> list[Shape]:
    """The distinct shapes of the modules convert makes FP8 in `model_name` (built on meta), each
    with the min_tokens convert's defaults give it (read from a second, default conversion)."""
    from models.config import model_config
    from models.fp8.config import FP8Config
    from models.fp8.convert import convert
    from models.transformer import build_model

    cfg = model_config(model_name)
    every_call = FP8Config(recipe="blockwise", skip_small=False, fuse_norms=False,
                           linear_min_tokens=0, mlp_min_tokens=0, experts_min_tokens=0)
    default_min_tokens = {name: min_tokens for name, _, _, min_tokens in _fp8_modules(
        convert(build_model(cfg, device="meta"), FP8Config(recipe="blockwise"), emulate=True), cfg)}
    shapes: dict[tuple, Shape] = {}
    for name, kind, dims, _ in _fp8_modules(
            convert(build_model(cfg, device="meta"), every_call, emulate=True), cfg):
        shape = shapes.setdefault((kind, dims), Shape(kind, dims))
        shape.names.append(name)
        shape.default_min_tokens = default_min_tokens.get(name)
    return list(shapes.values())


def _fp8_modules(model: nn.Module, cfg) -> list:
    """(name, kind, dims, min_tokens) for each FP8 Linear (not an MLP's own), MLP and routed
    experts module of a converted model."""
    from models.fp8.experts import FP8GroupedExperts
    from models.fp8.linear import FP8Linear, FP8MLP

    in_mlp = {id(l) for m in model.modules() if isinstance(m, FP8MLP) for l in (m.w1, m.w3, m.w2)}
    found = []
    for name, m in model.named_modules():
        if isinstance(m, FP8MLP):
            kind, dims = "mlp", (m.w1.in_features, m.w1.out_features)
        elif type(m) is FP8Linear and id(m) not in in_mlp:
            kind, dims = "linear", (m.in_features, m.out_features)
        elif isinstance(m, FP8GroupedExperts):
            E, F, D = m.w1.shape
            kind, dims = "experts", (E, D, F, cfg.num_experts_per_tok)
        else:
            continue
        found.append((name, kind, dims, m.min_tokens))
    return found


def fp8_from(tokens: list[int], ratios: list[float]) -> int | None:
    """The smallest of `tokens` (ascending) from which every ratio (bf16 time / FP8 time) is at
    least 1, or None when FP8 is slower at the largest; a nan (a failed run) counts as slower."""
    start = None
    for t, r in zip(tokens, ratios):
        if r >= 1.0:
            start = t if start is None else start
        else:
            start = None
    return start


def _bf16_and_fp8(shape: Shape, max_experts: int):
    """(bf16 module, FP8 module sharing its weights, token scale) on the GPU."""
    from models.fp8.experts import FP8GroupedExperts
    from models.fp8.linear import FP8Linear, FP8MLP
    from models.layers import MLP
    from models.moe import GroupedExperts

    kw = dict(device=DEVICE, dtype=torch.bfloat16)
    if shape.kind == "linear":
        base = nn.Linear(*shape.dims, bias=False, **kw)
        return base, FP8Linear.from_linear(base), 1.0
    if shape.kind == "mlp":
        base = MLP(*shape.dims).to(**kw)
        return base, FP8MLP.from_mlp(base), 1.0
    E, D, F, _ = shape.dims
    used = min(E, max_experts)
    base = GroupedExperts(used, D, F).to(**kw)
    with torch.no_grad():
        for w in (base.w1, base.w3, base.w2):
            w.normal_(std=0.02)
    return base, FP8GroupedExperts.from_grouped(base), used / E


def _calls(base, fp8, shape: Shape, T: int) -> dict:
    """{"fp8": fn, "bf16": fn}, fn(x) -> y one call of each module on T tokens (the experts: one
    uniform random routing, the same for both)."""
    if shape.kind != "experts":
        return {"fp8": fp8, "bf16": base}
    from models.moe import count_per_expert, sort_by_expert

    E, k = base.w1.shape[0], shape.dims[3]
    expert_TK = torch.rand(T, E, device=DEVICE).topk(k, dim=1).indices
    counts_E = count_per_expert(expert_TK, E)
    slot_to_pick, pick_to_slot = sort_by_expert(expert_TK)
    return {name: (lambda x, m=m: m.forward_tokens(x, counts_E, slot_to_pick, pick_to_slot, k))
            for name, m in (("fp8", fp8), ("bf16", base))}


def _step(fn, x: torch.Tensor, dy: torch.Tensor | None):
    from models.fp8.linear import drop_input_copies

    if dy is None:
        def infer():
            with torch.no_grad():
                fn(x)
        return infer

    def train():
        drop_input_copies(x)
        x.grad = None
        train_backward(fn(x), dy)
    return train


def measure(shape: Shape, tokens: list[int], modes: list[str], max_experts: int,
            deadline: float) -> dict:
    """{mode: [(T, fp8 ms, bf16 ms)]} for `shape` at each token count (until `deadline`)."""
    base, fp8, scale = _bf16_and_fp8(shape, max_experts)
    dim = shape.dims[1] if shape.kind == "experts" else shape.dims[0]
    rows = {mode: [] for mode in modes}
    for T in tokens:
        if time.monotonic() > deadline:
            print(f"  {T} tokens and more: skipped (time budget spent; --budget to extend)")
            break
        t = max(1, round(T * scale))
        x = torch.randn(t, dim, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
        calls = _calls(base, fp8, shape, t)
        with torch.no_grad():  # the output's shape (the experts': one row per routed slot)
            dy = torch.randn_like(calls["bf16"](x))
        for mode in modes:
            steps = {name: _step(fn, x, dy if mode == "train" else None)
                     for name, fn in calls.items()}
            ms = interleaved_ms(steps, rounds=3, reps=5, batches=3)
            rows[mode].append((T, ms["fp8"], ms["bf16"]))
        del x, dy, calls
    del base, fp8
    torch.cuda.empty_cache()
    return rows


def report(shape: Shape, rows: dict) -> dict:
    """Print one module's table; {mode: FP8-from token count or None}."""
    where = ", ".join(shape.names[:3]) + (f" (+{len(shape.names) - 3})" if len(shape.names) > 3
                                         else "")
    note = "  [kept bf16 by skip_small: a side <= 1024]" if shape.kept_bf16 else ""
    print(f"\n{shape.label}: {where}{note}")
    print(f"{'tokens':>8}" + "".join(f"{m + ' fp8':>12}{'bf16':>8}{'ratio':>7}" for m in rows))
    starts = {}
    for i, (T, *_rest) in enumerate(next(iter(rows.values()))):
        line = f"{T:>8}"
        for mode, r in rows.items():
            if i < len(r):
                _, f, b = r[i]
                line += f"{f:>12.3f}{b:>8.3f}{b / f:>6.2f}x"
        print(line)
    for mode, r in rows.items():
        starts[mode] = fp8_from([t for t, _, _ in r], [b / f for _, f, b in r])
        said = (f"from {starts[mode]} tokens on" if starts[mode]
                else "not at the largest count measured")
        print(f"  {mode}: FP8 as fast as bf16 or faster {said}")
        at = [(T, f, b) for T, f, b in r if T >= shape.default_min_tokens]
        if at:  # the first call FP8 takes by default: does the default pay there?
            T, f, b = at[0]
            record(BENCH, f"{mode} {shape.label} at {T} tokens (default from "
                   f"{shape.default_min_tokens})", f, "ms", "bf16", b, higher_is_better=False)
    return starts


def suggest(results: list[tuple[Shape, dict]]) -> dict:
    """The fp8.* token thresholds the crossovers point to, printed and returned ({setting: count}
    for those every module of the kind reached): per setting, the largest crossover of its modules
    in each mode measured, and the larger of those (FP8 then pays in both). A Linear's or MLP's
    crossover is stated at 4096 x 4096 weights, as fp8.linear_min_tokens and fp8.mlp_min_tokens
    are (times in x out / 4096^2: the same GEMM size a call)."""
    from models.fp8.convert import REFERENCE_WEIGHTS

    def at_reference(shape: Shape, start: int | None) -> int | None:
        if shape.kind == "experts" or start is None:
            return start
        return -(-start * shape.dims[0] * shape.dims[1] // REFERENCE_WEIGHTS)

    settings = {
        "linear_min_tokens": lambda s: s.kind == "linear" and not s.kept_bf16,
        "mlp_min_tokens": lambda s: s.kind == "mlp",
        "experts_min_tokens": lambda s: s.kind == "experts",
    }
    print("\nSettings these crossovers suggest (each module timed alone, so its host time is"
          " exposed; in a step whose GPU work hides the host, lower ones may pay: check with"
          " scripts/bench_train.py --recipes blockwise blockwise:<setting>=<count>):")
    chosen = {}
    for setting, of_kind in settings.items():
        starts = [{mode: at_reference(shape, v) for mode, v in s.items()}
                  for shape, s in results if of_kind(shape)]
        if not starts:
            continue
        per_mode = {}
        for mode in starts[0]:
            found = [s[mode] for s in starts]
            per_mode[mode] = None if None in found else max(found)
        said = ", ".join(f"{m} {v if v is not None else 'never'}" for m, v in per_mode.items())
        if None in per_mode.values():
            print(f"  fp8.{setting}: FP8 slower at the largest count for one of them: keep those "
                  f"in bf16 (a larger count) or measure larger calls   ({said})")
            continue
        chosen[setting] = max(per_mode.values())
        print(f"  fp8.{setting}={chosen[setting]}   ({said})")
    if chosen:
        print("As overrides: " + " ".join(f"fp8.{k}={v}" for k, v in chosen.items()))
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", help="a named size (models/config.py)")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--max-experts", type=int, default=64,
                        help="cut a larger expert count to this, tokens with it (default 64)")
    parser.add_argument("--budget", type=float, default=120.0,
                        help="seconds after which no new measurement starts (default 120)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_fp8_calls: no CUDA device; nothing to measure")
        return
    start = time.monotonic()
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  model {args.model}")
    tokens = sorted(set(args.tokens))
    results = []
    for shape in model_shapes(args.model):
        if shape.kept_bf16:
            print(f"\n{shape.label}: kept bf16 by skip_small (a side <= 1024), not measured")
            continue
        rows = measure(shape, tokens, args.modes, args.max_experts, start + args.budget)
        results.append((shape, report(shape, rows)))
    suggest(results)
    print(f"\nbench_fp8_calls: {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
