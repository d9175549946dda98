"""`convert(model, fp8_cfg)`: the one place FP8 enters a model (torchtitan's converter pattern).

The model is written once, in high precision. With `fp8_cfg.recipe == "blockwise"` this swaps,
in place and sharing the very Parameter objects (optimizers, state dicts and checkpoints do not
notice):

    models.layers.MLP (dense MLPs, shared experts)  -> FP8MLP (SwiGLU fused with its quantization)
    every other nn.Linear except the output head   -> FP8Linear
        (MLA projections wq_a, wq_b / wq, wkv_a, wkv_b, wo; MTP eh_proj and the MTP blocks')
    models.moe.GroupedExperts                       -> models.fp8.experts.FP8GroupedExperts
    a models.layers.RMSNorm whose output feeds      -> FP8RMSNorm (`fp8_cfg.fuse_norms`): the
      FP8 Linears or MLPs directly                     norm's kernel writes their FP8 input
                                                       copies (the modules that own norms say
                                                       what each feeds: `norm_consumers()`)

and keeps in high precision what DeepSeek-V3 keeps there (section 3.3.1): the embedding, the
output head, the router (a models.moe.Router, not an nn.Linear), the norms' arithmetic (an
FP8RMSNorm computes in fp32 like the plain norm; it only also writes its FP8 consumers' copies)
and the attention core (softmax(QK^T)V and the absorbed decode math), plus whatever
`fp8_cfg.keep_bf16` names (module-name patterns, one log line). A module whose dimensions
the FP8 kernels cannot take (a dimension not divisible by 128, a bias) stays as it is, with one
log line saying why; an MLP with such a projection is converted Linear by Linear instead.

Small modules stay in bf16 too (`fp8_cfg.skip_small`, on by default; torchtitan filters the same
way, its auto_filter_small_kn), one log line each: FP8 pays a fixed quantization pass over each
activation and gradient, and where one side of the GEMM is narrow the GEMM is too short for the
faster FP8 math to repay it. Measured on the H100 (scripts/bench_fp8.py, forward + backward with
all quantization, against bf16): a Linear 4096 -> 1024 ran at 0.75x (0.44x with the weight
re-quantized), while 2048 <-> 7168 and 4096 -> 4096 ran at 1.12-1.46x. The SwiGLU MLP at
D=4096 and width F=1536 (the `small` model's shared expert) depends on the tokens per call more
than on its width (later H100 runs, interleaved rounds, four repeats): 0.64-0.89x bf16 at 4096
tokens, 0.97-1.13x at 8192, 1.25-1.27x at 16384 (F=10240: 1.36-1.38x at 16384). A size rule
cannot see the token count, so for the other modules the decision is made per call (each FP8
module's `min_tokens`: a call with fewer tokens runs the module's own bf16 ops on the same
parameters).
Those are wall times of the layer alone, and there it is bound by its host: on the GPU the F=1536
MLP is 1.25x bf16 already at 4096 tokens, and 4096 -> 1024 about 1.05x (twenty-third session,
bench_fp8's "GPU busy" rows). The step keeps the verdict: `small` at 2 x 2048 tokens x 2 ran
119.3 ms with skip_small and 126.8 ms without it (bf16 128.8), its GPU idle 9.7 against 39.4 ms.
Larger calls do not reverse it (twenty-sixth session, H100, `bench_train.py --recipes off blockwise
blockwise:skip_small=false`): at 4 x 4096 tokens x 4 (16384 a call, where MLA's narrow
projections also run FP8 without skip_small: 64.5% of the FLOPs in FP8 against 55.8%) 802.3 ms
a step without skip_small against 803.3 with it (bf16 912.8); at 4 x 2048 x 1, 112.7 against 109.4
(bf16 119.6). What the narrow GEMMs gain, their inputs' and gradients' quantization costs back.

So under skip_small:
  - a Linear with min(in, out) <= SMALL_LINEAR_SIDE stays bf16;
  - the other Linears and the SwiGLU MLPs run FP8 from a GEMM size a call: from
    LINEAR_MIN_TOKENS (MLP_MIN_TOKENS) tokens at 4096 x 4096 weights, from that count times
    4096^2 / (in x out) (MLP: / (dim x width)) at any other size (`scaled_min_tokens`), since
    what FP8 must repay is mostly fixed per call: the host path of its quantizers and GEMMs,
    about 0.65 ms for a Linear's forward + backward on the H100's host at any size below ~8192
    tokens. Below it even a wide module is slower than bf16: a micro-batch of one 2048-token
    sequence, an evaluation or decoding batch, 16b's 2048 x 2048 Linears until 32768 tokens;
  - the routed experts run FP8 from EXPERTS_MIN_TOKENS tokens a call.
In `small` that keeps the MLA down/up projections (wq_a, wq_b, wkv_a, wkv_b) in bf16; wo runs FP8
from 8192 tokens a call and the MTP projection (8192 -> 4096) from 4096, the dense MLP (4096 x
10240) from 1229, the shared experts (4096 x 1536) from 8192 and the routed experts from 1024.
The counts are host-dependent, so they are settings (`fp8.linear_min_tokens`,
`fp8.mlp_min_tokens`, `fp8.experts_min_tokens`; these constants are their defaults), and
scripts/bench_fp8_calls.py measures each module's crossover on the machine at hand.

How much a converted model can gain: `flop_shares(model, seq_len, tokens_per_call)` splits a
training step's FLOPs (`Transformer.flops_per_token`) into the FP8 GEMMs, the GEMMs kept in high
precision and the attention core, and `FlopShares.step_speedup_bound(r)` is what the whole step
could gain were the FP8 GEMMs r times faster than bf16 with all else as in bf16 and every FLOP
costing the same time (optimistic for the bf16 side: attention runs below the GEMMs' rate). At
4096-token sequences and 16384 tokens a call `small` runs 56% of its FLOPs in FP8 (its two 32k
output heads, bf16 by design, are 24%; attention 11%): about 1.23x at r = 1.5 (the dense FP8 GEMMs
against bf16 on the H100), and 1.39x even at the tensor cores' 2x. DeepSeek-V3 (671b) runs 80% in
FP8: 1.37x at r = 1.5.

Hardware: the blockwise recipe needs an sm90 GPU (cuBLAS blockwise GEMMs); without one `convert`
raises. `emulate=True` skips that check for tests: the converted model then runs the Triton
kernels under the interpreter and the fp32 reference GEMMs on CPU (slow, exact in semantics).
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

from torch import nn

from models.layers import MLP, RMSNorm
from models.moe import GroupedExperts

from .config import FP8Config
from .experts import FP8GroupedExperts
from .gemm import has_blockwise_kernels
from .linear import FP8Linear, FP8MLP, FP8RMSNorm

log = logging.getLogger(__name__)

SMALL_LINEAR_SIDE = 1024
"""A Linear with in_features or out_features <= this stays bf16 under skip_small."""
LINEAR_MIN_TOKENS = FP8Config.linear_min_tokens
"""fp8.linear_min_tokens's default: under skip_small a 4096 x 4096 FP8 Linear runs nn.Linear's
F.linear on calls of fewer tokens, an in -> out one below `scaled_min_tokens(this, in * out)`.
Each Linear alone against bf16 (twenty-seventh session, H100, scripts/bench_fp8_calls.py, forward
+ backward), the first count from which FP8 was never slower, and that count times in x out /
4096^2: 16b's 2048 x 2048 not by 16384 (0.75x there; so > 4096), 2048 -> 3072 16384 (6144),
DeepSeek-V3's 7168 -> 1536 16384 (10752), `small`'s 4096 x 4096 8192 (0.41-0.68x at 4096; 8192),
8192 -> 4096 4096 (8192), DeepSeek-V3's 1536 -> 24576 4096 (9216), 16384 -> 7168 4096 (28672;
0.98x at 2048, 1.18x at 1024), 14336 -> 7168 1024 (6272). A flat 4096 tokens (before that
session) ran 16b's attention projections in FP8 at 0.28-0.56x of bf16's speed from 4096 tokens.
In a step the GPU's other work can hide that host time: 16b with 4 layers at 2 x 4096 tokens
(bench_train, same session) took 87.3 ms with them in bf16 against 87.2 ms in FP8 (an earlier
call 85.5 against 88.8, one run at 92.2): no difference beyond the noise there. In `small`'s step
at 1 x 2048 tokens (twenty-sixth session, H100, bench_train, 4 rounds of 20 steps each way)
running wo and eh_proj in bf16 took FP8 from 56.1 ms a step (0.83x bf16's 46.5; GPU idle 14.1 ms)
to 48.4 ms (0.96x bf16's 46.3; GPU idle 6.2 ms)."""
MLP_MIN_TOKENS = FP8Config.mlp_min_tokens
"""fp8.mlp_min_tokens's default: under skip_small a SwiGLU MLP of dim x width 4096 x 4096 runs the
bf16 SwiGLU on calls of fewer tokens, one of dim x width below `scaled_min_tokens(this, dim *
width)`. The MLPs alone against bf16 (twenty-seventh session, H100, bench_fp8_calls, forward +
backward), the first count from which FP8 was never slower, and that count times dim x width /
4096^2: `small`'s dense 4096 x 10240 1024 (1.10-1.11x; 0.66-0.75x at 512; 2560), its shared expert
4096 x 1536 8192-16384 (0.93x and 1.26x at 8192 in two runs; 3072-6144), 16b's dense 2048 x 11264
2048 (1.05x; 2816) and shared 2048 x 2816 16384 (0.93x at 8192; 5632), DeepSeek-V3's dense 7168 x
18432 1024 or fewer (1.32x at 1024; <= 8064) and shared 7168 x 2048 4096 (1.18x; 0.69x at 2048;
3584). 3072 keeps `small`'s shared expert at the 8192 tokens that earlier step measurements chose
(at 8192 the F=1536 MLP measured 0.97-1.13x bf16 in FP8, at 4096 0.64-0.89x, at 16384
1.25-1.27x, and FP8 keeps for backward about a third of the activation bytes bf16 keeps). Before
that session an MLP narrower than 2048 ran FP8 from 8192 tokens and any other at every call
(later from 1024), which ran 16b's shared experts (2816 wide) and DeepSeek-V3's (2048) in FP8 at
0.38-0.69x from 1024-2048 tokens."""
REFERENCE_WEIGHTS = 4096 * 4096
"""The weight-matrix size (in x out; an MLP's dim x width) the two counts above are stated for."""


def scaled_min_tokens(reference_tokens: int, weights: int) -> int:
    """The token count from which a GEMM over `weights` (in x out) makes as large a call as one
    over a 4096 x 4096 weight at `reference_tokens` (rounded up)."""
    return -(-reference_tokens * REFERENCE_WEIGHTS // weights)


EXPERTS_MIN_TOKENS = FP8Config.experts_min_tokens
"""fp8.experts_min_tokens's default: the routed experts run their bf16 grouped GEMMs on calls of
fewer tokens (entering the MoE layer) under skip_small. `small`'s experts (16 of width 1536,
top-4) against bf16 on the same H100 run: forward + backward 0.89x / 1.14x / 1.14x / 1.15x at 256
/ 512 / 1024 / 2048 tokens; forward alone 0.97x / 0.90x / 1.05x / 1.30x."""

FP8_GEMM_SPEEDUP = 1.5
"""FP8 GEMMs against bf16 for the FLOP-share bound (`FlopShares.step_speedup_bound`): the dense
blockwise GEMMs' 1.46-1.50x over bf16 matmul on the H100 (scripts/bench_fp8.py)."""
MIN_MICRO_BATCH_TOKENS = 4096
"""Below this many tokens a micro-batch FP8 measured slower than bf16 (`small` on the H100:
1 x 2048 tokens 0.88-0.97x, with the same GPU time as bf16's, 42 ms a step, and more host
time; 2 x 2048 1.08x, 4 x 2048 1.10x; since the Linears run F.linear there, LINEAR_MIN_TOKENS,
0.96x): `run_outlook` warns."""


def convert(model: nn.Module, fp8_cfg: FP8Config, emulate: bool = False) -> nn.Module:
    """Swap eligible modules of `model` for FP8 ones (in place) and return it. See the module doc."""
    if not isinstance(fp8_cfg, FP8Config):
        raise TypeError(f"fp8_cfg must be a models.fp8.config.FP8Config, got {type(fp8_cfg).__name__}")
    if not fp8_cfg.enabled:
        return model
    if not emulate and not has_blockwise_kernels():
        raise RuntimeError(f"fp8.recipe={fp8_cfg.recipe} needs an sm90 (Hopper) GPU for its "
                           "block-scaled GEMMs and none is visible; use fp8=off on this machine")
    keep = _high_precision(model) + _kept_by_name(model, fp8_cfg.keep_bf16)
    _convert_children(model, "", {id(m) for m in keep}, fp8_cfg)
    _log_token_thresholds(model, fp8_cfg)
    if fp8_cfg.fuse_norms:
        _fuse_norms(model, fp8_cfg)
    log.info("fp8: converted %s", summary(model))
    return model


_KINDS = {FP8Linear: "Linear", FP8MLP: "SwiGLU MLP", FP8GroupedExperts: "routed-experts",
          FP8RMSNorm: "fused norm"}


def _log_token_thresholds(model: nn.Module, fp8_cfg: FP8Config) -> None:
    """One line for the token thresholds of the converted Linears, MLPs and routed experts (each
    module's own count is in its repr: min_tokens=...)."""
    scaled = " at 4096 x 4096 weights, scaled by 4096^2 over their size"
    kinds = {"Linears": (lambda m: type(m) is FP8Linear, "linear_min_tokens", scaled),
             "SwiGLU MLPs": (lambda m: isinstance(m, FP8MLP), "mlp_min_tokens", scaled),
             "routed experts": (lambda m: isinstance(m, FP8GroupedExperts), "experts_min_tokens",
                                "")}
    parts = [f"{kind} on calls of fewer than {getattr(fp8_cfg, setting)} tokens{how} "
             f"(fp8.{setting})" for kind, (is_kind, setting, how) in kinds.items()
             if any(is_kind(m) and m.min_tokens for m in model.modules())]
    if parts:
        log.info("fp8: bf16 for the FP8 %s (skip_small)", "; ".join(parts))


def summary(model: nn.Module) -> str:
    """What `model` runs in FP8, a count per kind ('6 Linear, 5 SwiGLU MLP, ...'); an MLP's own
    three projections count as the MLP."""
    inside_mlp = _mlp_projections(model)
    counts = dict.fromkeys(_KINDS.values(), 0)
    for m in model.modules():
        if type(m) in _KINDS and id(m) not in inside_mlp:
            counts[_KINDS[type(m)]] += 1
    return ", ".join(f"{n} {kind}" for kind, n in counts.items())


def _mlp_projections(model: nn.Module) -> set[int]:
    """ids of the FP8Linears that are an FP8MLP's own projections."""
    return {id(m) for mlp in model.modules() if isinstance(mlp, FP8MLP)
            for m in (mlp.w1, mlp.w3, mlp.w2)}


def _fuse_norms(model: nn.Module, fp8_cfg: FP8Config) -> None:
    """Make each plain RMSNorm with FP8 consumers an FP8RMSNorm (after the consumers were
    converted). It quantizes from the smallest token count any FP8 consumer runs FP8 at."""
    for owner in list(model.modules()):
        if not callable(getattr(owner, "norm_consumers", None)):
            continue
        for attr, consumers in owner.norm_consumers().items():
            norm = getattr(owner, attr)
            fp8 = [c for c in consumers if isinstance(c, (FP8Linear, FP8MLP))]
            if type(norm) is RMSNorm and fp8:
                min_tokens = min(getattr(c, "min_tokens", 0) for c in fp8)
                setattr(owner, attr, FP8RMSNorm.from_norm(norm, fp8_cfg.pow2_scales, len(fp8),
                                                          min_tokens))


def _convert_children(parent: nn.Module, prefix: str, keep: set, fp8_cfg: FP8Config) -> None:
    """Replace convertible children of `parent`; recurse into the others."""
    for attr, child in list(parent.named_children()):
        name = f"{prefix}{attr}"
        if id(child) in keep or (fp8_cfg.skip_small and _too_small(name, child)):
            continue
        new = _fp8_version(name, child, fp8_cfg)
        if new is not None:
            setattr(parent, attr, new)
        else:
            _convert_children(child, name + ".", keep, fp8_cfg)


def _too_small(name: str, module: nn.Module) -> bool:
    """True (with a log line) for a Linear FP8 would slow down; see the module docstring."""
    if type(module) is nn.Linear and min(module.in_features, module.out_features) <= SMALL_LINEAR_SIDE:
        log.info("fp8: keeping %s in bf16: %d -> %d has a side <= %d, faster in bf16", name,
                 module.in_features, module.out_features, SMALL_LINEAR_SIDE)
        return True
    return False


def _high_precision(model: nn.Module) -> list[nn.Module]:
    """Modules that stay in high precision even where the kernels could take them."""
    head = getattr(model, "head", None)
    return [head] if isinstance(head, nn.Module) else []


def _kept_by_name(model: nn.Module, patterns: list[str]) -> list[nn.Module]:
    """The modules `fp8.keep_bf16`'s patterns name (one log line); a pattern that names none is
    an error listing a few of the names there are."""
    if not patterns:
        return []
    named = [(name, m) for name, m in model.named_modules() if name]
    kept = [(name, m) for name, m in named if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    for p in patterns:
        if not any(fnmatch.fnmatchcase(name, p) for name, _ in kept):
            examples = ", ".join(name for name, m in named if isinstance(m, nn.Linear))
            examples = examples if len(examples) <= 200 else examples[:200] + "..."
            raise ValueError(f"fp8.keep_bf16 pattern {p!r} matches no module of this model; "
                             f"names look like {examples} (glob patterns: 'layers.0', 'mtp.*', "
                             "'*.attn.wo')")
    log.info("fp8: keeping in high precision (fp8.keep_bf16): %s",
             ", ".join(name for name, _ in kept if not any(
                 name.startswith(outer + ".") for outer, _ in kept)))
    return [m for _, m in kept]


def _fp8_version(name: str, module: nn.Module, fp8_cfg: FP8Config) -> nn.Module | None:
    pow2_scales = fp8_cfg.pow2_scales
    skip = fp8_cfg.skip_small
    if type(module) is MLP and FP8MLP.supports(module):
        dim, width = module.w1.in_features, module.w1.out_features
        return FP8MLP.from_mlp(module, pow2_scales, scaled_min_tokens(fp8_cfg.mlp_min_tokens,
                                                                      dim * width) if skip else 0)
    if type(module) is nn.Linear:
        if module.bias is not None:
            log.info("fp8: keeping %s in high precision: it has a bias", name)
            return None
        if not FP8Linear.supports(module.in_features, module.out_features):
            log.info("fp8: keeping %s in high precision: %d -> %d is not a multiple of 128",
                     name, module.in_features, module.out_features)
            return None
        weights = module.in_features * module.out_features
        return FP8Linear.from_linear(module, pow2_scales, scaled_min_tokens(
            fp8_cfg.linear_min_tokens, weights) if skip else 0)
    if type(module) is GroupedExperts:
        n_experts, inter_dim, dim = module.w1.shape
        if not FP8GroupedExperts.supports(dim, inter_dim):
            log.info("fp8: keeping %s in high precision: dim %d / expert width %d is not a "
                     "multiple of 128", name, dim, inter_dim)
            return None
        return FP8GroupedExperts.from_grouped(module, pow2_scales,
                                              fp8_cfg.experts_min_tokens if skip else 0)
    return None


@dataclass(frozen=True)
class FlopShares:
    """A training step's FLOPs split three ways (fractions of `Transformer.flops_per_token`)."""

    fp8: float  # GEMMs of FP8 modules, at the given tokens per call
    high_precision_matmul: float  # the other GEMMs: output heads, router, layers kept bf16
    attention: float  # the attention core, softmax(QK^T)V

    def step_speedup_bound(self, fp8_speedup: float) -> float:
        """The step's speedup over bf16 if its FP8 GEMMs ran `fp8_speedup` times faster than in
        bf16 (quantization included) and everything else as fast as before, every FLOP taking the
        same time (Amdahl's law over FLOP shares)."""
        if fp8_speedup <= 0:
            raise ValueError(f"fp8_speedup must be positive, got {fp8_speedup}")
        return 1.0 / (1.0 - self.fp8 + self.fp8 / fp8_speedup)


def flop_shares(model: nn.Module, seq_len: int, tokens_per_call: int) -> FlopShares:
    """Where a converted `model`'s training FLOPs go at `seq_len`-token sequences, with
    `tokens_per_call` tokens a forward (an FP8MLP or FP8Linear runs bf16 below its min_tokens).

    `model` is a models.transformer.Transformer after `convert` (on any device, meta included);
    routed experts count their activated share, num_experts_per_tok of n_routed_experts."""
    total = model.flops_per_token(seq_len)
    cfg = model.cfg
    active = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 0.0
    fp8_weights = 0.0
    inside_mlp = _mlp_projections(model)
    for m in model.modules():
        if isinstance(m, FP8MLP) and tokens_per_call >= m.min_tokens:
            fp8_weights += sum(w.weight.numel() for w in (m.w1, m.w3, m.w2))
        elif type(m) is FP8Linear and id(m) not in inside_mlp and tokens_per_call >= m.min_tokens:
            fp8_weights += m.weight.numel()
        elif isinstance(m, FP8GroupedExperts) and tokens_per_call >= m.min_tokens:
            fp8_weights += active * sum(p.numel() for p in m.parameters())
    fp8 = 6.0 * fp8_weights / total
    attention = model.attention_flops_per_token(seq_len) / total
    return FlopShares(fp8, 1.0 - fp8 - attention, attention)


def run_outlook(model: nn.Module, seq_len: int, micro_batch_size: int) -> str:
    """One line for a training run's log: how much of a converted model's step runs in FP8, the
    most FP8 can then gain (FLOP-share bound at FP8_GEMM_SPEEDUP), and a warning with the fix
    when the micro-batch is below MIN_MICRO_BATCH_TOKENS."""
    tokens = seq_len * micro_batch_size
    shares = flop_shares(model, seq_len, tokens)
    line = (f"fp8: {100 * shares.fp8:.1f}% of a step's FLOPs run in FP8 (high-precision GEMMs "
            f"{100 * shares.high_precision_matmul:.1f}%, attention {100 * shares.attention:.1f}%), "
            f"so the step gains at most {shares.step_speedup_bound(FP8_GEMM_SPEEDUP):.2f}x over "
            f"bf16 with FP8 GEMMs {FP8_GEMM_SPEEDUP}x bf16's")
    if tokens < MIN_MICRO_BATCH_TOKENS:
        rows = -(-MIN_MICRO_BATCH_TOKENS // seq_len)
        line += (f". Warning: {tokens} tokens a micro-batch is below {MIN_MICRO_BATCH_TOKENS}, "
                 "where FP8 ran slower than bf16 (its GEMMs too short to repay the quantization, "
                 f"its host time longer): set data.micro_batch_size={rows} or more, or fp8=off")
    return line
