"""The model against independent references: naive attention, a per-token router, a per-expert
loop, hand-computed balance loss, explicit MTP targets, published parameter counts."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import build_model, model_config
from models.attention import MLA
from models.layers import apply_rope, rope_tables
from models.moe import (GroupedExperts, Router, Routing, count_per_expert, grouped_mm,
                        sequence_balance_loss)
from models.transformer import cross_entropy


def _seed(s=0):
    torch.manual_seed(s)


def _tokens(cfg, batch=2, seq=24):
    return torch.randint(0, cfg.vocab_size, (batch, seq))


# -- sizes ---------------------------------------------------------------------------------------

def test_debug_forward_backward_shapes_and_finite_grads():
    _seed()
    cfg = model_config("debug")
    model = build_model(cfg)
    tok = _tokens(cfg, 2, 33)
    assert model(tok[:, :-1]).shape == (2, 32, cfg.vocab_size)
    out = model(tok[:, :-1], tok[:, 1:])
    out.loss.backward()
    n_routers = cfg.num_hidden_layers - cfg.first_k_dense + cfg.num_mtp_modules
    assert out.expert_counts.shape == (n_routers, cfg.n_routed_experts)
    assert (out.expert_counts.sum(1) == 2 * 32 * cfg.num_experts_per_tok).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert math.isclose(out.loss.item(), (out.lm_loss + cfg.mtp_loss_weight * out.mtp_loss
                                          + cfg.balance_loss_alpha * out.aux_loss).item(),
                        rel_tol=1e-6)
    assert out.lm_loss.item() == pytest.approx(math.log(cfg.vocab_size), rel=0.05)


@pytest.mark.parametrize("name", ["small", "16b"])
def test_large_sizes_run_at_full_width_with_fewer_layers(name):
    _seed()
    cfg = model_config(name, num_hidden_layers=2, num_mtp_modules=0, vocab_size=512,
                       max_position_embeddings=64)
    model = build_model(cfg)
    tok = _tokens(cfg, 1, 9)
    out = model(tok[:, :-1], tok[:, 1:])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_small_gemm_dims_are_multiples_of_128():
    model = build_model(model_config("small"), device="meta")
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("head"):
            assert mod.in_features % 128 == 0 and mod.out_features % 128 == 0, name
        if isinstance(mod, GroupedExperts):
            assert all(d % 128 == 0 for d in mod.w1.shape[1:]), name


def test_param_counts_match_published_sizes():
    total, activated = build_model(model_config("671b"), device="meta").param_counts()
    assert abs(total / 671e9 - 1) < 0.01
    # DeepSeek counts activated parameters without the unread embedding rows; "37B" is that
    # 36.63B rounded (the same count gives V2-Lite's published 2.4B as 2.45B).
    assert round(activated / 1e9) == 37 and abs(activated / 37e9 - 1) < 0.015
    small_total, _ = build_model(model_config("small"), device="meta").param_counts(True)
    assert 1e9 <= small_total <= 2e9
    total16, act16 = build_model(model_config("16b"), device="meta").param_counts()
    assert abs(total16 / 16e9 - 1) < 0.03 and abs(act16 / 3e9 - 1) < 0.15


def test_router_bias_stays_fp32_through_dtype_casts():
    model = build_model(model_config("debug"))
    model.routers()[0].expert_bias.add_(0.3001)
    model.bfloat16()
    bias = model.routers()[0].expert_bias
    assert bias.dtype == torch.float32 and torch.all(bias == torch.tensor(0.3001))
    assert "routers" not in dict(model.named_parameters())
    assert all("expert_bias" not in n for n, _ in model.named_parameters())


# -- configuration errors ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(n_group=3), "n_group"),
    (dict(topk_group=3), "topk_group"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(first_k_dense=9), "first_k_dense"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_inconsistent_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        model_config("debug", **overrides)


def test_unknown_size_or_field_is_an_error():
    with pytest.raises(ValueError, match="unknown model size"):
        model_config("huge")
    with pytest.raises(ValueError, match="hiden_size"):
        model_config("debug", hiden_size=3)


# -- attention -----------------------------------------------------------------------------------

def _naive_mla(attn: MLA, cfg, x_BSD):
    """Per-head attention with explicit matrices and an explicit causal mask."""
    B, S, _ = x_BSD.shape
    cos, sin = rope_tables(cfg, S)
    if cfg.q_lora_rank:
        q = attn.wq_b(attn.q_norm(attn.wq_a(x_BSD)))
    else:
        q = attn.wq(x_BSD)
    q = q.view(B, S, cfg.num_attention_heads, cfg.qk_head_dim)
    latent = attn.wkv_a(x_BSD)
    c, k_pe = latent[..., :cfg.kv_lora_rank], latent[..., cfg.kv_lora_rank:]
    kv = attn.wkv_b(attn.kv_norm(c)).view(B, S, cfg.num_attention_heads, -1)
    k_pe = apply_rope(k_pe, cos, sin)
    outs = []
    for h in range(cfg.num_attention_heads):
        q_h = torch.cat([q[:, :, h, :cfg.qk_nope_head_dim],
                         apply_rope(q[:, :, h, cfg.qk_nope_head_dim:], cos, sin)], -1)
        k_h = torch.cat([kv[:, :, h, :cfg.qk_nope_head_dim], k_pe], -1)
        v_h = kv[:, :, h, cfg.qk_nope_head_dim:]
        scores = q_h @ k_h.transpose(1, 2) * cfg.softmax_scale
        mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
        outs.append(scores.masked_fill(mask, -math.inf).softmax(-1) @ v_h)
    return attn.wo(torch.cat(outs, -1))


@pytest.mark.parametrize("overrides", [dict(), dict(q_lora_rank=0),
                                       dict(rope_scaling_factor=40.0, mscale_all_dim=1.0,
                                            original_max_position_embeddings=16)])
def test_mla_matches_naive_attention(overrides):
    _seed(1)
    cfg = model_config("debug", **overrides)
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 20, cfg.hidden_size)
    cos, sin = rope_tables(cfg, 20)
    torch.testing.assert_close(attn(x, cos, sin), _naive_mla(attn, cfg, x), atol=1e-5, rtol=1e-4)


def test_yarn_softmax_scale_has_mscale_correction():
    cfg = model_config("671b")
    mscale = 0.1 * math.log(40.0) + 1.0
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2)
    assert model_config("debug").softmax_scale == pytest.approx(48 ** -0.5)


@pytest.mark.parametrize("chunks", [[1] * 12, [5, 1, 3, 3]])
def test_absorbed_decode_equals_training_path(chunks):
    _seed(2)
    cfg = model_config("debug")
    model = build_model(cfg)
    for p in model.parameters():  # larger weights than init, so attention is far from uniform
        torch.nn.init.normal_(p, std=0.05)
    tok = _tokens(cfg, 2, sum(chunks))
    full = model(tok)
    caches = model.new_caches(2, 16, dtype=torch.float32)
    pos, pieces = 0, []
    for n in chunks:
        logits, _ = model.decode(tok[:, pos:pos + n], caches, pos)
        pieces.append(logits)
        pos += n
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)


def test_decode_past_cache_is_an_error():
    cfg = model_config("debug")
    model = build_model(cfg)
    caches = model.new_caches(1, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="LatentCache"):
        model.decode(_tokens(cfg, 1, 5), caches, 0)


# -- routing -------------------------------------------------------------------------------------

def _router(cfg, seed=3):
    _seed(seed)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.5)
    return r


def _reference_route(r: Router, x_TD):
    """Per-token routing written from the DeepSeek-V3 equations, loop by loop."""
    E, G = r.n_experts, r.n_group
    experts, weights = [], []
    for x in x_TD:
        s = torch.sigmoid(x.float() @ r.weight.float().T)
        biased = s + r.expert_bias
        groups = biased.view(G, E // G)
        group_score = torch.stack([g.sort(descending=True).values[:2].sum() for g in groups])
        kept = group_score.argsort(descending=True)[:r.topk_group].tolist()
        eligible = [e for e in range(E) if e // (E // G) in kept]
        chosen = sorted(eligible, key=lambda e: -biased[e].item())[:r.top_k]
        w = s[chosen] / s[chosen].sum() * r.scale
        experts.append(sorted(chosen))
        weights.append(dict(zip(chosen, w.tolist())))
    return experts, weights


def test_router_matches_per_token_reference_with_group_limit():
    cfg = model_config("debug", n_routed_experts=16, n_group=4, topk_group=2,
                       num_experts_per_tok=3, routed_scaling_factor=2.5)
    r = _router(cfg)
    r.expert_bias.normal_(std=0.2)
    x = torch.randn(40, cfg.hidden_size)
    routing = r(x)
    experts, weights = _reference_route(r, x)
    for t in range(40):
        got = routing.expert_TK[t].tolist()
        assert sorted(got) == experts[t]
        assert len({e // 4 for e in got}) <= cfg.topk_group
        for e, w in zip(got, routing.weight_TK[t].tolist()):
            assert w == pytest.approx(weights[t][e], rel=1e-5)
    torch.testing.assert_close(routing.weight_TK.sum(-1), torch.full((40,), 2.5))
    assert routing.counts_E.tolist() == torch.bincount(routing.expert_TK.flatten(), minlength=16).tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("x_shape", [(300, 256), (3, 100, 256)])
def test_router_logits_are_fp32_linear_without_an_fp32_copy_saved(device, w_dtype, x_shape):
    """The router's fp32 scores and both gradients bitwise those of autograd through
    F.linear(x.float(), W.float()), with nothing fp32 of x's size kept for the backward."""
    from models.moe import RouterLogits
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(x_shape, generator=g) * 2).bfloat16().to(device).requires_grad_()
    w = (torch.randn(16, 256, generator=g) * 0.1).to(w_dtype).to(device).requires_grad_()
    d = torch.randn(*x_shape[:-1], 16, generator=g).to(device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        got = RouterLogits.apply(x, w)
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]
    got_dx, got_dw = torch.autograd.grad(got, (x, w), d)
    want = F.linear(x.float(), w.float())
    want_dx, want_dw = torch.autograd.grad(want, (x, w), d)
    for a, b in ((got, want), (got_dx, want_dx), (got_dw, want_dw)):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_count_per_expert_is_bincount(device):
    """Random choices over 64 experts, some never chosen, one chosen by every token: bincount's
    int64 counts, bit for bit (on the GPU from atomic adds, without bincount's host sync)."""
    gen = torch.Generator().manual_seed(7)
    expert_TK = torch.randint(0, 48, (5000, 6), generator=gen)
    expert_TK[:, 0] = 50
    counts_E = count_per_expert(expert_TK.to(device), 64)
    assert counts_E.dtype == torch.int64 and counts_E.device.type == device
    assert torch.equal(counts_E.cpu(), torch.bincount(expert_TK.flatten(), minlength=64))


def test_bias_changes_selection_but_not_weights():
    cfg = model_config("debug", routed_scaling_factor=1.0, n_group=1, topk_group=1)
    r = _router(cfg)
    x = torch.randn(30, cfg.hidden_size)
    before = r(x)
    r.expert_bias[5] = 10.0  # every token now picks expert 5
    after = r(x)
    assert (after.expert_TK == 5).any(-1).all()
    assert not torch.equal(before.expert_TK, after.expert_TK)
    scores = torch.sigmoid(x @ r.weight.T)
    chosen = scores.gather(1, after.expert_TK)
    torch.testing.assert_close(after.weight_TK, chosen / chosen.sum(-1, keepdim=True))


# -- grouped experts -----------------------------------------------------------------------------

def _loop_experts(experts: GroupedExperts, x_TD, counts):
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x_TD[start:start + n]
        h = F.silu(xe @ experts.w1[e].T) * (xe @ experts.w3[e].T)
        out.append(h @ experts.w2[e].T)
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 9, 0], [2, 2, 2, 2]])
def test_grouped_experts_match_per_expert_loop_forward_and_backward(counts):
    _seed(4)
    experts = GroupedExperts(4, 16, 24)
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.3)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    g = torch.randn(int(counts.sum()), 16)
    y = experts(x, counts)
    grads = torch.autograd.grad((y * g).sum(), [x, *experts.parameters()])
    y_ref = _loop_experts(experts, x, counts)
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x, *experts.parameters()])
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_grouped_mm_with_empty_input():
    w = torch.randn(3, 5, 4)
    assert grouped_mm(torch.randn(0, 4), w, torch.zeros(3, dtype=torch.long)).shape == (0, 5)


# -- balance loss --------------------------------------------------------------------------------

def test_sequence_balance_loss_hand_computed():
    # one sequence, 2 tokens, 4 experts, top-1: token 0 -> expert 0, token 1 -> expert 2
    scores = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])
    routing = Routing(torch.tensor([[0], [2]]), torch.ones(2, 1), scores, torch.tensor([1, 0, 1, 0]))
    # f = E/(K T) * counts = 4/2 * [1,0,1,0] = [2,0,2,0]; P = mean of normalized rows
    p = (torch.tensor([0.5, 0.25, 0.125, 0.125]) + torch.tensor([0.25] * 4)) / 2
    expected = 2 * p[0] + 2 * p[2]
    assert sequence_balance_loss(routing, batch=1, top_k=1).item() == pytest.approx(expected.item())


def test_balance_loss_is_per_sequence():
    _seed(5)
    scores = torch.rand(2 * 6, 4)
    experts = torch.randint(0, 4, (12, 2))
    routing = Routing(experts, torch.ones(12, 2), scores, torch.zeros(4))
    per_seq = [sequence_balance_loss(Routing(experts[i * 6:(i + 1) * 6], None, scores[i * 6:(i + 1) * 6], None), 1, 2)
               for i in range(2)]
    assert sequence_balance_loss(routing, 2, 2).item() == pytest.approx(sum(per_seq).item() / 2)


def test_balance_alpha_zero_disables_aux_term():
    cfg = model_config("debug", balance_loss_alpha=0.0, num_mtp_modules=0)
    model = build_model(cfg)
    tok = _tokens(cfg, 2, 17)
    out = model(tok[:, :-1], tok[:, 1:])
    assert out.aux_loss.item() == 0.0 and out.mtp_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(out.lm_loss.item())


# -- multi-token prediction ----------------------------------------------------------------------

def test_mtp_loss_uses_token_i_plus_k_and_target_i_plus_k_plus_1():
    _seed(6)
    cfg = model_config("debug", num_mtp_modules=2)
    model = build_model(cfg)
    seq = _tokens(cfg, 2, 13)
    tokens, labels = seq[:, :-1], seq[:, 1:]
    out = model(tokens, labels)
    S = tokens.shape[1]
    hidden = {}
    model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o))
    model(tokens)
    h = hidden["h"]
    for k in (1, 2):
        # depth k reads token i+k of the packed sequence (= seq[:, i+k]) ...
        nxt = torch.zeros_like(tokens)
        nxt[:, :S - k + 1] = seq[:, k:S + 1]
        logits, h = model.mtp_step(k, h, nxt)
        # ... and predicts token i+k+1 (= seq[:, i+k+1]) where it exists
        n_valid = S - k
        expected = F.cross_entropy(logits[:, :n_valid].flatten(0, 1),
                                   seq[:, k + 1:k + 1 + n_valid].flatten())
        assert out.mtp_losses[k - 1].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.mtp_loss.item() == pytest.approx(sum(l.item() for l in out.mtp_losses) / 2)


def test_mtp_decode_matches_mtp_step():
    _seed(7)
    cfg = model_config("debug")
    model = build_model(cfg)
    h = torch.randn(1, 6, cfg.hidden_size)
    nxt = _tokens(cfg, 1, 6)
    full, _ = model.mtp_step(1, h, nxt)
    caches = model.new_caches(1, 8, dtype=torch.float32)
    steps = [model.mtp_decode(1, h[:, i:i + 1], nxt[:, i:i + 1], caches, i)[0] for i in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="num_mtp_modules"):
        model.mtp_step(2, h, nxt)


def test_cross_entropy_ignores_minus_100():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[1, -100, 3, -100]])
    ref = F.cross_entropy(logits[0, [0, 2]], torch.tensor([1, 3]))
    assert cross_entropy(logits, labels).item() == pytest.approx(ref.item())


def test_flops_per_token_counts_activated_weights_and_attention():
    cfg = model_config("debug", num_mtp_modules=0)
    model = build_model(cfg, device="meta")
    _, act = model.param_counts()
    attn = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (64 + 1) / 2
    expected = 6 * (act - cfg.hidden_size) + 3 * attn * cfg.num_hidden_layers
    assert model.flops_per_token(64) == pytest.approx(expected)
