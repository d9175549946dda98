"""models.fp8.convert on the debug model: which modules become FP8 (and which stay high precision,
with one log line each), shared parameters, the hardware check, and a converted model's loss and
gradients against the unconverted one (CPU: interpreted kernels, reference GEMMs)."""
import logging
import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import build_model, model_config
from models.fp8 import FP8Config, FP8Linear, convert
from models.fp8.convert import (EXPERTS_MIN_TOKENS, FP8_GEMM_SPEEDUP, LINEAR_MIN_TOKENS,
                                MLP_MIN_TOKENS, flop_shares, run_outlook, scaled_min_tokens)
from models.fp8.experts import FP8GroupedExperts
from models.fp8.linear import FP8MLP, FP8RMSNorm
from models.fp8.gemm import has_blockwise_kernels
from models.layers import RMSNorm
from models.moe import GroupedExperts, Router

BLOCKWISE = FP8Config(recipe="blockwise", skip_small=False)  # the debug model is all small
# every projection a multiple of 128, so that everything eligible is converted
ALL_ELIGIBLE = dict(num_hidden_layers=2, n_routed_experts=4, n_group=1, topk_group=1,
                    q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=128, qk_nope_head_dim=128,
                    v_head_dim=128, num_attention_heads=2, moe_intermediate_size=128)


def _expected_fp8(model):
    """Independently: every bias-free nn.Linear with both dims % 128 == 0 except the head, and
    every GroupedExperts whose dim and width are multiples of 128."""
    names = set()
    for name, m in model.named_modules():
        if type(m) is nn.Linear and name != "head" and m.in_features % 128 == 0 \
                and m.out_features % 128 == 0:
            names.add(name)
        if type(m) is GroupedExperts and m.w1.shape[1] % 128 == 0 and m.w1.shape[2] % 128 == 0:
            names.add(name)
    return names


def _fp8_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8GroupedExperts))}


def test_debug_model_conversion_picks_modules(caplog):
    model = build_model(model_config("debug"))
    expected = _expected_fp8(model)
    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear or type(m) is GroupedExperts}
    params_before = {n: id(p) for n, p in model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="models.fp8.convert"):
        assert convert(model, BLOCKWISE, emulate=True) is model
    assert _fp8_names(model) == expected
    assert {"layers.0.attn.wo", "layers.0.ffn.w1", "mtp.0.eh_proj", "mtp.0.block.attn.wo"} <= expected
    assert isinstance(model.layers[0].ffn, FP8MLP), "an all-eligible SwiGLU MLP is fused"
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding
    assert all(type(r) is Router for r in model.routers())
    kept = linears - expected - {"head"}
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "keeping" in m]) == len(kept) == len(messages) - 1
    assert all(any(k in m for m in messages) for k in kept)
    assert messages[-1].startswith("fp8: converted ") and " Linear, " in messages[-1]
    assert {n: id(p) for n, p in model.named_parameters()} == params_before, "parameters are shared"


def test_all_eligible_model_converts_every_projection():
    model = build_model(model_config("debug", **ALL_ELIGIBLE))
    convert(model, BLOCKWISE, emulate=True)
    for name, m in model.named_modules():
        if name.endswith(("wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "eh_proj")) or ".shared.w" in name:
            assert isinstance(m, FP8Linear), name
        if name.endswith((".shared", "layers.0.ffn")):
            assert isinstance(m, FP8MLP), name
        if name.endswith(".experts"):
            assert isinstance(m, FP8GroupedExperts), name
    assert type(model.head) is nn.Linear


def test_small_modules_stay_bf16_in_the_small_model(caplog):
    """skip_small (the default) keeps the narrow MLA projections in bf16, one log line each, and
    gives the other FP8 modules a token threshold (Linears and MLPs scaled by their size from
    4096 x 4096), said in one line; skip_small=False converts them all for every call."""
    model = build_model(model_config("small"), device="meta")  # shapes only
    with caplog.at_level(logging.INFO, logger="models.fp8.convert"):
        convert(model, FP8Config(recipe="blockwise"), emulate=True)
    small = {n for n, m in model.named_modules() if n.endswith(("wq_a", "wq_b", "wkv_a", "wkv_b"))}
    assert len(small) == 5 * 4  # 4 projections in 4 layers + the MTP block
    for name in small:
        assert type(model.get_submodule(name)) is nn.Linear, name
        assert sum(f"{name} in bf16" in r.getMessage() for r in caplog.records) == 1, name
    shared = {n: m for n, m in model.named_modules() if n.endswith(".shared")}
    assert len(shared) == 3 + 1  # the 3 MoE layers and the MTP block
    for name, mlp in shared.items():  # 4096 x 1536: 3072 * 4096^2 / (4096 * 1536) = 8192
        assert isinstance(mlp, FP8MLP) and mlp.min_tokens == MLP_MIN_TOKENS * 8 // 3 == 8192, name
    for name, min_tokens in (("layers.0.attn.wo", LINEAR_MIN_TOKENS),  # 4096 x 4096
                             ("mtp.0.eh_proj", LINEAR_MIN_TOKENS // 2)):  # 8192 -> 4096
        linear = model.get_submodule(name)
        assert isinstance(linear, FP8Linear) and linear.min_tokens == min_tokens, name
    lines = [r.getMessage() for r in caplog.records if "(skip_small)" in r.getMessage()]
    assert len(lines) == 1, "one line for the Linears', MLPs' and experts' thresholds"
    scaled = "tokens at 4096 x 4096 weights, scaled by 4096^2 over their size"
    for said in (f"Linears on calls of fewer than {LINEAR_MIN_TOKENS} {scaled} "
                 "(fp8.linear_min_tokens)",
                 f"MLPs on calls of fewer than {MLP_MIN_TOKENS} {scaled} (fp8.mlp_min_tokens)",
                 f"experts on calls of fewer than {EXPERTS_MIN_TOKENS} tokens "
                 "(fp8.experts_min_tokens)"):
        assert said in lines[0], said
    dense = model.layers[0].ffn
    assert isinstance(dense, FP8MLP) and dense.w1.out_features == 10240
    assert dense.min_tokens == 1229  # 3072 * 4096^2 / (4096 * 10240) = 1228.8
    experts = [m for m in model.modules() if isinstance(m, FP8GroupedExperts)]
    assert len(experts) == 4 and all(m.min_tokens == EXPERTS_MIN_TOKENS for m in experts)
    assert caplog.records[-1].getMessage() == ("fp8: converted 6 Linear, 5 SwiGLU MLP, "
                                               "4 routed-experts, 5 fused norm"), \
        "wo in 4 layers + MTP, eh_proj; the dense MLP and 4 shared experts; the FFN norms"
    assert isinstance(model.layers[1].ffn.experts, FP8GroupedExperts)
    model = build_model(model_config("small"), device="meta")
    convert(model, FP8Config(recipe="blockwise", skip_small=False), emulate=True)
    assert isinstance(model.layers[1].attn.wq_b, FP8Linear)
    assert model.layers[1].attn.wq_b.min_tokens == model.layers[0].attn.wo.min_tokens == 0
    shared = model.layers[1].ffn.shared
    assert isinstance(shared, FP8MLP) and shared.min_tokens == 0
    assert model.layers[0].ffn.min_tokens == model.layers[1].ffn.experts.min_tokens == 0


def test_token_thresholds_are_settings():
    """fp8.linear_min_tokens, mlp_min_tokens and experts_min_tokens reach the converted modules
    (Linears and MLPs scaled by their size; and the fused norms in front of the MLPs); 0 sends
    every call through FP8; a negative count is refused naming the setting."""
    for linear, mlp, experts in ((1024, 1536, 256), (0, 0, 0)):
        model = build_model(model_config("small"), device="meta")
        convert(model, FP8Config(recipe="blockwise", linear_min_tokens=linear, mlp_min_tokens=mlp,
                                 experts_min_tokens=experts), emulate=True)
        assert model.layers[0].attn.wo.min_tokens == 2 * model.mtp[0].eh_proj.min_tokens == linear
        dense = -(-mlp * 4096 // 10240)  # 4096 x 10240: 2.5x the weights of 4096 x 4096
        assert model.layers[0].ffn.min_tokens == model.layers[0].ffn_norm.min_tokens == dense
        shared = mlp * 8 // 3  # 4096 x 1536: 3/8 of them
        assert model.layers[1].ffn.shared.min_tokens == shared
        assert model.layers[1].ffn.experts.min_tokens == model.mtp[0].block.ffn.experts.min_tokens \
            == experts
        assert model.layers[1].ffn_norm.min_tokens == shared, "its one FP8 consumer: the shared MLP"
        assert type(model.layers[1].attn.wq_a) is nn.Linear, "the side rule does not move"
    # DeepSeek-V3's wide MLA projections wq_a and wq_b are FP8, from the same GEMM size a call
    # as a 4096 x 4096 Linear at linear_min_tokens (rounded up); the norms in front of them
    # quantize from their consumer's threshold, so below it no copy is made that no one reads
    block = build_model(model_config("671b"), device="meta").layers[3]
    convert(block, FP8Config(recipe="blockwise", linear_min_tokens=2048), emulate=True)
    attn = block.attn
    assert (attn.wq_a.in_features, attn.wq_a.out_features) == (7168, 1536)
    assert attn.wq_a.min_tokens == 3121  # 2048 * 4096^2 / (7168 * 1536) = 3120.8
    assert (attn.wq_b.in_features, attn.wq_b.out_features) == (1536, 24576)
    assert attn.wq_b.min_tokens == 911  # 2048 * 4096^2 / (1536 * 24576) = 910.2
    assert block.attn_norm.min_tokens == 3121 and attn.q_norm.min_tokens == 911
    assert type(attn.kv_norm) is RMSNorm, "wkv_b (512 wide) stays bf16, so its norm stays plain"
    for name in ("linear_min_tokens", "mlp_min_tokens", "experts_min_tokens"):
        with pytest.raises(ValueError, match=f"fp8.{name}=-1 must be a token count"):
            FP8Config(recipe="blockwise", **{name: -1})


def test_flop_shares_of_the_small_model_by_hand():
    """flop_shares against the FLOPs counted from the config: in 3 MoE layers + the MTP block the
    4 active of 16 routed experts (3 D F each) from EXPERTS_MIN_TOKENS tokens a call; the dense
    MLP (3 D I, 4096 x 10240) from 1229 (MLP_MIN_TOKENS scaled by 4096^2 / (D I)); eh_proj
    (2D -> D) from LINEAR_MIN_TOKENS / 2; wo (H x v_head -> D, 4096 x 4096) in 4 layers + the
    MTP block from LINEAR_MIN_TOKENS and, from 8192, the shared expert (3 D F, 4096 x 1536); the
    attention core as in Transformer.flops_per_token."""
    cfg = model_config("small")
    model = build_model(cfg, device="meta")
    convert(model, FP8Config(recipe="blockwise"), emulate=True)
    D, F, seq = cfg.hidden_size, cfg.moe_intermediate_size, 4096
    moe_blocks = cfg.num_hidden_layers - cfg.first_k_dense + cfg.num_mtp_modules
    wo = ((cfg.num_hidden_layers + cfg.num_mtp_modules) * cfg.num_attention_heads
          * cfg.v_head_dim * D)
    eh_proj = 2 * D * D
    dense = 3 * D * cfg.intermediate_size
    routed = moe_blocks * cfg.num_experts_per_tok * 3 * D * F
    shared = moe_blocks * cfg.n_shared_experts * 3 * D * F
    assert (EXPERTS_MIN_TOKENS, MLP_MIN_TOKENS, LINEAR_MIN_TOKENS) == (1024, 3072, 8192), \
        "the token counts below"
    total = model.flops_per_token(seq)
    attention = (3 * 2 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
                                                    + cfg.v_head_dim) * (seq + 1) / 2 * 5)
    for tokens, weights in ((1023, 0), (1024, routed), (1228, routed), (1229, routed + dense),
                            (4095, routed + dense), (4096, routed + dense + eh_proj),
                            (8191, routed + dense + eh_proj),
                            (8192, routed + dense + eh_proj + wo + shared)):
        shares = flop_shares(model, seq, tokens)
        assert shares.fp8 == pytest.approx(6 * weights / total, rel=1e-12), tokens
        assert shares.attention == pytest.approx(attention / total, rel=1e-12)
        assert shares.fp8 + shares.high_precision_matmul + shares.attention == pytest.approx(1)
    assert 0.5 < shares.fp8 < 0.6 and 0.3 < shares.high_precision_matmul  # the two heads: 24%
    assert shares.step_speedup_bound(1.0) == pytest.approx(1.0)
    assert shares.step_speedup_bound(2.0) == pytest.approx(1 / (1 - shares.fp8 / 2))
    with pytest.raises(ValueError, match="fp8_speedup must be positive"):
        shares.step_speedup_bound(0.0)


def test_run_outlook_states_the_fp8_share_and_warns_on_small_micro_batches():
    """The line a training run logs: the FP8 share of the FLOPs and its bound, and below
    MIN_MICRO_BATCH_TOKENS tokens a micro-batch a warning naming the micro-batch size that fixes
    it."""
    model = build_model(model_config("small"), device="meta")
    convert(model, FP8Config(recipe="blockwise"), emulate=True)
    big = run_outlook(model, 2048, 4)
    shares = flop_shares(model, 2048, 4 * 2048)
    assert f"{100 * shares.fp8:.1f}% of a step's FLOPs run in FP8" in big
    assert f"at most {shares.step_speedup_bound(FP8_GEMM_SPEEDUP):.2f}x" in big
    assert "Warning" not in big
    small = run_outlook(model, 2048, 1)
    assert "Warning: 2048 tokens a micro-batch is below 4096" in small
    assert small.endswith("set data.micro_batch_size=2 or more, or fp8=off")
    assert "data.micro_batch_size=3 or more" in run_outlook(model, 1500, 1)


def _norm_types(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if "norm" in n.rsplit(".", 1)[-1]}


def test_norms_feeding_fp8_consumers_are_fused():
    """fuse_norms (the default): a norm becomes an FP8RMSNorm exactly when a module it feeds
    directly became FP8, counting its FP8 consumers, from their smallest token threshold; the
    norms before the head and inside MTP's merge stay plain. fuse_norms=False: all plain."""
    model = build_model(model_config("small"), device="meta")
    convert(model, FP8Config(recipe="blockwise"), emulate=True)
    fused = {n for n, t in _norm_types(model).items() if t == "FP8RMSNorm"}
    ffn_norms = {f"layers.{i}.ffn_norm" for i in range(4)} | {"mtp.0.block.ffn_norm"}
    assert fused == ffn_norms, "small's MLA projections stay bf16: only the FFN norms"
    dense, moe = model.layers[0].ffn_norm, model.layers[1].ffn_norm
    assert (dense.consumers, dense.min_tokens) == (1, 1229), "the dense MLP's"
    assert (moe.consumers, moe.min_tokens) == (1, 8192), "the shared expert's"
    model = build_model(model_config("debug", **ALL_ELIGIBLE))
    keys = list(model.state_dict())
    convert(model, BLOCKWISE, emulate=True)
    assert list(model.state_dict()) == keys
    plain = {"norm", "mtp.0.enorm", "mtp.0.hnorm", "mtp.0.norm"}
    assert {n for n, t in _norm_types(model).items() if t == "RMSNorm"} == plain
    assert model.layers[0].attn_norm.consumers == 2, "wq_a and wkv_a"
    assert model.layers[0].attn.q_norm.consumers == 1
    model = build_model(model_config("debug", **ALL_ELIGIBLE))
    convert(model, FP8Config(recipe="blockwise", skip_small=False, fuse_norms=False), emulate=True)
    assert set(_norm_types(model).values()) == {"RMSNorm"}


def test_keep_bf16_names_modules_that_stay_high_precision(caplog):
    """fp8.keep_bf16: every module a pattern names, and everything inside it, stays as it was
    (norms with no FP8 consumer left stay plain); the rest converts as without it; a pattern that
    names nothing is an error before anything is converted."""
    model = build_model(model_config("debug", **ALL_ELIGIBLE))
    everything = _expected_fp8(model)
    with caplog.at_level(logging.INFO, logger="models.fp8.convert"):
        convert(model, FP8Config(recipe="blockwise", skip_small=False,
                                 keep_bf16=["layers.0", "mtp.*", "*.attn.wo"]), emulate=True)
    kept = {n for n in everything if n.startswith(("layers.0.", "mtp.")) or n.endswith(".attn.wo")}
    assert kept and _fp8_names(model) == everything - kept
    assert all(type(m) in (nn.Linear, GroupedExperts) for n, m in model.named_modules()
               if n in kept)
    assert type(model.layers[0].attn_norm) is RMSNorm and type(model.layers[0].ffn) is not FP8MLP
    assert isinstance(model.layers[1].attn_norm, FP8RMSNorm)
    assert any("fp8.keep_bf16): layers.0, layers.1.attn.wo" in r.getMessage()
               for r in caplog.records)
    model = build_model(model_config("debug", **ALL_ELIGIBLE))
    with pytest.raises(ValueError, match=r"'layer\.0' matches no module.*layers\.0\.attn\.wq_a"):
        convert(model, FP8Config(recipe="blockwise", keep_bf16=["layers.1", "layer.0"]),
                emulate=True)
    assert not _fp8_names(model), "nothing converted"


def test_off_leaves_the_model_alone():
    model = build_model(model_config("debug"))
    convert(model, FP8Config(recipe="off"))
    assert not _fp8_names(model)


@pytest.mark.skipif(has_blockwise_kernels(), reason="this machine has the sm90 kernels")
def test_blockwise_without_sm90_is_an_error():
    with pytest.raises(RuntimeError, match="sm90"):
        convert(build_model(model_config("debug")), BLOCKWISE)
    with pytest.raises(TypeError, match="FP8Config"):
        convert(build_model(model_config("debug")), {"recipe": "blockwise"})


def _cos(a, b):
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


class _RoutingTape:
    """Router.choose that records every router's top-k choices in call order, then replays them.

    The FP8 model then sends every token to the experts the reference sent it to, so a
    comparison of the two sees their arithmetic, not top-k flips: a token whose scores nearly tie
    flips under any perturbation (one bf16 ulp of every weight flips enough of `small`'s tokens to
    turn its whole gradient 0.4% away in cosine; FP8 turns it 1.6% away) and moves whole rows of
    the expert and router gradients, and through them every gradient upstream."""

    def __init__(self, monkeypatch):
        self.choices, self.replaying, self.next = [], False, 0
        original = Router.choose

        def choose(router, scores_TE):
            if not self.replaying:
                self.choices.append(original(router, scores_TE))
                return self.choices[-1]
            self.next += 1
            expert_TK = self.choices[self.next - 1]
            assert expert_TK.shape[0] == scores_TE.shape[0], "replayed on other tokens"
            return expert_TK

        monkeypatch.setattr(Router, "choose", choose)


def _loss_and_grads(cfg, fp8_cfg, device, dtype, monkeypatch, seed=0, shape=(2, 33)):
    """Loss and gradients of the model and of its FP8 conversion (routing replayed from the
    first), on the same weights and tokens."""
    torch.manual_seed(seed)
    ref = build_model(cfg).to(device=device, dtype=dtype)
    fp8 = build_model(cfg).to(device=device, dtype=dtype)
    fp8.load_state_dict(ref.state_dict())
    convert(fp8, fp8_cfg, emulate=device == "cpu")
    tokens = torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))
    tokens = tokens.to(device)
    tape = _RoutingTape(monkeypatch)
    out = []
    for model in (ref, fp8):
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        out.append((loss.item(), dict((n, p.grad) for n, p in model.named_parameters()
                                      if p.grad is not None)))
        tape.replaying = True
    assert tape.choices and tape.next == len(tape.choices)
    return out, _fp8_names(fp8)


def _check_close(results, fp8_modules, min_cos=0.99, max_norm_err=0.05):
    """Loss, the whole gradient and every parameter's gradient (converted Linears, experts,
    routers, norms, embedding and head alike) in direction (cosine >= `min_cos`) and in norm: a
    cosine cannot see a gradient, or an output, scaled by a constant; the norm ratio does. A
    failure lists every parameter's (cosine, norm ratio)."""
    (loss_ref, g_ref), (loss_fp8, g_fp8) = results
    assert g_ref.keys() == g_fp8.keys()
    flat = lambda g: torch.cat([t.flatten().double() for t in g.values()])  # noqa: E731
    off = {n: (_cos(g_fp8[n], g_ref[n]), _norm_ratio(g_fp8[n], g_ref[n])) for n in g_ref}
    linear_weights = [n for n in g_ref if n.rsplit(".", 1)[0] in fp8_modules]
    bad = [n for n, (c, r) in off.items() if c < min_cos or abs(r - 1) > max_norm_err]
    flat_cos = _cos(flat(g_fp8), flat(g_ref))
    table = ", ".join(f"{n} ({c:.4f}, {r:.4f})" for n, (c, r) in off.items())
    assert linear_weights
    assert abs(loss_fp8 - loss_ref) / loss_ref < 2e-3, (loss_fp8, loss_ref)
    assert flat_cos >= min_cos and not bad, (
        f"whole-gradient cosine {flat_cos:.4f}; off: {bad}; (cosine, norm ratio fp8/ref): {table}")


def _norm_ratio(a, b):
    return float(a.double().norm() / b.double().norm())


def test_converted_model_gradients_close_cpu(monkeypatch):
    results, fp8_modules = _loss_and_grads(model_config("debug", **ALL_ELIGIBLE), BLOCKWISE,
                                           "cpu", torch.float32, monkeypatch)
    assert any(".experts" in n for n in fp8_modules)
    _check_close(results, fp8_modules)


@pytest.mark.gpu
@pytest.mark.parametrize("pow2", [False, True])
def test_converted_model_gradients_close_gpu(pow2, monkeypatch):
    """On the real kernels, against the same model in bf16."""
    results, fp8_modules = _loss_and_grads(model_config("debug", **ALL_ELIGIBLE),
                                           FP8Config(recipe="blockwise", pow2_scales=pow2,
                                                     skip_small=False),
                                           "cuda", torch.bfloat16, monkeypatch, shape=(8, 257))
    _check_close(results, fp8_modules)


@pytest.mark.gpu
def test_small_model_gradients_close_gpu(monkeypatch):
    """The `small` model's own shapes (a dense block, a MoE block of 16 experts of width 1536, the
    MTP block; the default skip_small conversion, as bench_fp8_loss.py trains it) on the real
    kernels, four 2048-token sequences (the shared experts run FP8 too, from 8192 tokens):
    loss and every parameter's gradient direction and norm against the same model in bf16. What
    the 500-step loss comparison runs, checked one step deep."""
    assert 4 * 2048 >= scaled_min_tokens(MLP_MIN_TOKENS, 4096 * 1536)
    results, fp8_modules = _loss_and_grads(model_config("small", num_hidden_layers=2),
                                           FP8Config(recipe="blockwise"), "cuda", torch.bfloat16,
                                           monkeypatch, shape=(4, 2049))
    assert any(".experts" in n for n in fp8_modules) and "layers.0.ffn.w1" in fp8_modules
    _check_close(results, fp8_modules)


def _export_cfg():
    """The debug model widened so that the attention projections, MLPs and experts convert."""
    return model_config("debug", vocab_size=512, num_hidden_layers=2, hidden_size=256,
                        intermediate_size=512, moe_intermediate_size=128, q_lora_rank=128,
                        kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64)


def _exported_linears(model):
    """(Hugging Face key, FP8Linear) of each converted Linear the FP8 export writes as FP8 blocks
    (the MTP's eh_proj is FP8 in training, bf16 in the release's layout)."""
    from models.hf import _hf_names
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            [(key, _)] = _hf_names(f"{name}.weight", module.weight, len(model.layers))
            if not key.endswith("eh_proj.weight"):
                yield key, module


@pytest.mark.gpu
@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_export_holds_the_blocks_fp8_training_multiplies_with(tmp_path, pow2):
    """models.hf.export_hf(fp8=True) of a converted model on the GPU: every exported FP8 weight is
    bitwise the copy the model's Triton quantizer makes for its forward (FP8Linear.fp8_weight,
    FP8GroupedExperts.fp8_weights)."""
    from safetensors import safe_open
    from models.hf import _hf_names, export_hf
    torch.manual_seed(5)
    cfg = _export_cfg()
    model = build_model(cfg, device="cuda")
    convert(model, FP8Config(recipe="blockwise", pow2_scales=pow2, skip_small=False))
    export_hf(model, tmp_path, fp8=True, pow2_scales=pow2)
    with safe_open(str(tmp_path / "model.safetensors"), "pt", device="cuda") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}

    def assert_block(key, q, s):
        assert torch.equal(state[key].view(torch.uint8), q.view(torch.uint8)), key
        assert torch.equal(state[key.removesuffix(".weight") + ".weight_scale_inv"], s), key

    linears = experts = 0
    for key, module in _exported_linears(model):
        q, s, *_ = module.fp8_weight()
        assert_block(key, q, s)
        linears += 1
    for name, module in model.named_modules():
        if isinstance(module, FP8GroupedExperts):
            w, f = module.fp8_weights(), module.w1.shape[1] // 128
            for e, ((gate, _), (up, _), (down, _)) in enumerate(zip(*(
                    _hf_names(f"{name}.{p}", getattr(module, p), len(model.layers))
                    for p in ("w1", "w3", "w2")))):
                assert_block(gate, w.w13_q[e, :128 * f], w.w13_s[e, :f])
                assert_block(up, w.w13_q[e, 128 * f:], w.w13_s[e, f:])
                assert_block(down, w.w2_q[e], w.w2_s[e])
                experts += 1
    assert linears >= 10 and experts == 2 * cfg.n_routed_experts  # layer 1's and the MTP's


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_export_loads_back_into_the_same_fp8_weights(tmp_path, pow2):
    """Fine-tuning from an FP8 export (DeepSeek's release follows the same rule, s = amax / 448):
    after load_hf and convert, each converted Linear's own quantizer reproduces the exported
    blocks' values exactly, and their bytes without power-of-two scales (with them, a block whose
    largest element had rounded down to 224 comes back as twice the values at half the scale:
    the same numbers)."""
    from safetensors import safe_open
    from models.fp8.reference import dequantize_128x128
    from models.hf import export_hf, load_hf
    torch.manual_seed(6)
    cfg = _export_cfg()
    model = build_model(cfg)
    for p in model.parameters():
        nn.init.normal_(p, std=0.05)
    export_hf(model, tmp_path, fp8=True, pow2_scales=pow2)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    back = load_hf(tmp_path)
    convert(back, FP8Config(recipe="blockwise", skip_small=False, pow2_scales=pow2), emulate=True)
    checked = 0
    for key, module in _exported_linears(back):
        q, s, *_ = module.fp8_weight()
        q0, s0 = state[key], state[key.removesuffix(".weight") + ".weight_scale_inv"]
        assert torch.equal(dequantize_128x128(q, s), dequantize_128x128(q0, s0)), key
        if not pow2:
            assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
        checked += 1
    assert checked >= 10
