"""Fused RMSNorm, SwiGLU, rotary and MoE-combine kernels (models/kernels.py) against independent
pure-torch formulas, on fresh random data in bf16, fp16 and fp32.

What "equal" means here, and why:
- forward vs the eager formula of models/layers.py: rope is the same fp32 products rounded once, so
  bitwise (on CPU; on the GPU an FMA may move the last fp32 bit, so at most one ulp there);
  rms_norm differs only in the summation order of mean(x^2): at least 99% of the elements bitwise,
  the rest within the rounding of one ulp of the normalized value; swiglu rounds silu(a) * b once
  where eager rounds silu(a) first, so it is checked against the exact (fp64) value instead; so
  is the MoE combine (fp32 sums of unrounded products, where eager rounds each product first),
  and sum_picks is also bitwise torch's sum of the gathered rows.
- gradients vs torch.autograd of the eager formula run in fp64 on the same inputs (the exact
  gradient; for rms_norm with the normalized values rounded exactly as the kernel's forward
  rounded them, see _exact_rms_norm): within one rounding to the output dtype plus fp32
  arithmetic, and never further from it than eager autograd in the input dtype is.
Importing models.kernels on a machine without CUDA switches Triton to its interpreter, so the CPU
tests run the real kernels on small shapes (ragged widths, strided views, empty inputs); the `gpu`
tests repeat them at the `small` model's sizes, and test_kernels_compile_for_sm90 builds the
compiled kernels for Hopper on any machine.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from models import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}
ARITHMETIC = {torch.bfloat16: 2.0 ** -12, torch.float16: 2.0 ** -15, torch.float32: 2.0 ** -20}
"""Allowance for the kernels' fp32 arithmetic (sums, cancellation), relative to the largest value"""


def _rand(shape, dtype, seed, device=DEVICE):
    """Normal data with rows of very different scale (activation-like)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(*shape[:-1], 1, generator=g)) if len(shape) > 1 else 1.0
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(device)


def _eager_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _exact_rms_norm(x, weight, eps):
    """The eager formula for fp64 inputs, with the normalized values rounded to x's dtype exactly
    as the kernel's forward rounded them (fp32 x times the kernel's fp32 rstd): the gradient of the
    function the kernel computed. Rounding from the fp64 product instead flips about one element
    in 1e4 by an ulp (the GPU's rsqrt is approximate), and each flip moves a term of the weight
    gradient by |dy| ulp(n): more than a whole fp32 reduction's error (the H200 run saw 0.01-0.08
    on sums of 4096-16384 rows). The gradient passes the rounding straight through, as autograd
    does for a cast, without rounding the gradient on the way."""
    rstd = kernels.rms_norm_forward(x.reshape(-1, x.shape[-1]), weight, eps)[1]
    used = (x.float() * rstd.view(*x.shape[:-1], 1)).to(x.dtype).double()

    def fn(x64, weight64):
        normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        return weight64 * (normed + (used - normed).detach())
    return fn


def _eager_rope(x, cos, sin):
    pairs = x.float().unflatten(-1, (-1, 2))
    if x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2).to(x.dtype)


def _exact_grads(fn, inputs, dy):
    """torch.autograd of fn on the inputs and dy upcast to fp64: the exact gradient."""
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs64), inputs64, dy.double())


def _grads(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs), inputs, dy)


def _error(ours, exact):
    return (ours.double() - exact).abs()


def _assert_rounded(ours, exact, dtype, what):
    """ours is exact rounded once to dtype, up to the fp32 arithmetic that produced it."""
    bound = UNIT_ROUNDOFF[dtype] * exact.abs() + ARITHMETIC[dtype] * exact.abs().max()
    excess = (_error(ours, exact) - bound).max().item()
    assert excess <= 0, f"{what}: beyond one rounding to {dtype} by {excess:.3g}"


def _assert_grads_exact(exact_fn, eager_fn, ours, inputs, dy, names):
    """Our gradients are within one rounding of the exact ones (exact_fn's in fp64), and no
    further from them than eager autograd's (eager_fn's in the inputs' dtype) beyond fp32 noise."""
    exact = _exact_grads(exact_fn, inputs, dy)
    eager = _grads(eager_fn, inputs, dy)
    for name, g, e, x, ref in zip(names, ours, exact, inputs, eager):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        _assert_rounded(g, e, x.dtype, name)
        noise = ARITHMETIC[x.dtype] * e.abs().max()
        assert _error(g, e).max() <= max(_error(ref, e).max() * 1.001, noise), \
            f"{name}: further from the exact gradient than eager autograd in {x.dtype}"


def _assert_bitwise_mostly(ours, ref, share, max_rel, what):
    """At least `share` of the elements bitwise equal, all within max_rel (plus fp32 arithmetic
    noise where a result cancels to near zero, as a fused multiply-add does differently)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    if not ours.numel():
        return
    same = (ours == ref).float().mean().item()
    assert same >= share, f"{what}: only {same:.4f} of the elements bitwise equal"
    atol = ARITHMETIC[ref.dtype] * ref.abs().max().item()
    diff = (ours.double() - ref.double()).abs()
    rel = torch.where(diff <= atol, 0.0, diff / ref.double().abs())
    assert rel.max() <= max_rel, (f"{what}: {same:.5f} bitwise equal, but relative difference up "
                                  f"to {rel.max().item():.3g} (> {max_rel:.3g}) at "
                                  f"{(rel > max_rel).sum().item()} elements")


# -- RMSNorm -------------------------------------------------------------------------------------

NORM_CASES = [(torch.bfloat16, torch.bfloat16, 576), (torch.bfloat16, torch.float32, 1536),
              (torch.float32, torch.float32, 576), (torch.float16, torch.float32, 100),
              (torch.bfloat16, torch.bfloat16, 7)]


def _check_rms_norm(shape, x_dtype, w_dtype, seed):
    D, eps = shape[-1], 1e-6
    x = _rand(shape, x_dtype, seed)
    w = (1 + 0.3 * _rand((D,), torch.float32, seed + 1)).to(w_dtype)
    y = kernels.rms_norm(x, w, eps)
    # fp32: every element carries rstd's last-bit difference; lower precision mostly rounds it
    # away, and where not, one ulp of the normalized value then the product's rounding: 4u and
    # a hair (the rounded product can sit below the exact one), so 5u
    share, rel = (0.0, 2e-6) if x_dtype == torch.float32 else (0.99, 5 * UNIT_ROUNDOFF[x_dtype])
    _assert_bitwise_mostly(y, _eager_rms_norm(x, w, eps), share, rel, "rms_norm forward")
    dy = _rand(y.shape, y.dtype, seed + 2)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours = torch.autograd.grad(kernels.rms_norm(xg, wg, eps), (xg, wg), dy)
    _assert_grads_exact(_exact_rms_norm(x, w, eps), lambda a, b: _eager_rms_norm(a, b, eps),
                        ours, (x, w), dy, ("dx", "dw"))


@pytest.mark.parametrize("x_dtype,w_dtype,D", NORM_CASES)
def test_rms_norm_matches_eager_forward_and_exact_gradients(x_dtype, w_dtype, D):
    _check_rms_norm((3, 5, D), x_dtype, w_dtype, seed=D)


def test_rms_norm_weight_gradient_over_many_programs(monkeypatch):
    """Several row tiles per program (the weight gradient's partial sums), ragged last tile."""
    monkeypatch.setattr(kernels, "NORM_BWD_PROGRAMS", 3)
    _check_rms_norm((50, 576), torch.bfloat16, torch.float32, seed=11)


def _check_rms_norm_slice(lead, D, full, seed):
    """A column slice [..., :D] of a [..., full] tensor, as MLA normalizes wkv_a's latent part."""
    whole = _rand((*lead, full), torch.bfloat16, seed).requires_grad_()
    w = (1 + 0.3 * _rand((D,), torch.float32, seed + 1)).requires_grad_()
    y = kernels.rms_norm(whole[..., :D], w, 1e-6)
    _assert_bitwise_mostly(y, _eager_rms_norm(whole[..., :D].detach(), w.detach(), 1e-6), 0.99,
                           5 * UNIT_ROUNDOFF[torch.bfloat16], "rms_norm of a slice")
    dy = _rand(y.shape, y.dtype, seed + 2)
    dwhole, dw = torch.autograd.grad(y, (whole, w), dy)
    assert not dwhole[..., D:].any()
    c = whole[..., :D].detach()
    exact = _exact_grads(_exact_rms_norm(c, w.detach(), 1e-6), (c, w), dy)
    _assert_rounded(dwhole[..., :D], exact[0], torch.bfloat16, "dx of a slice")
    _assert_rounded(dw, exact[1], torch.float32, "dw of a slice")


def test_rms_norm_strided_input_and_empty_rows():
    _check_rms_norm_slice((2, 6), 512, 600, seed=3)
    w = torch.ones(512, device=DEVICE, requires_grad=True)
    empty = torch.empty(0, 4, 512, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    out = kernels.rms_norm(empty, w, 1e-6)
    assert out.shape == (0, 4, 512) and out.dtype == torch.float32
    dx, dw = torch.autograd.grad(out.sum(), (empty, w))
    assert dx.shape == empty.shape and torch.equal(dw, torch.zeros_like(w))


def test_rms_norm_rejects_bad_input():
    x = _rand((4, 64), torch.bfloat16, 5)
    with pytest.raises(ValueError, match="weight has shape"):
        kernels.rms_norm(x, torch.ones(32, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="last dim of 1..16384"):
        wide = torch.ones(1, 16385, device=DEVICE)
        kernels.rms_norm(wide, torch.ones(16385, device=DEVICE), 1e-6)
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        kernels.rms_norm(x.to(torch.int32), torch.ones(64, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="move it to the input's device"):
        kernels.rms_norm(x, torch.ones(64, device="meta"), 1e-6)


# -- SwiGLU --------------------------------------------------------------------------------------

def _eager_swiglu(a, b):
    return F.silu(a) * b


def _check_swiglu(shape, dtype, seed):
    a, b = _rand(shape, dtype, seed), _rand(shape, dtype, seed + 1)
    y = kernels.swiglu(a, b)
    assert y.dtype == dtype and y.shape == a.shape
    _assert_rounded(y, _eager_swiglu(a.double(), b.double()), dtype, "swiglu forward")
    torch.testing.assert_close(y, _eager_swiglu(a, b), rtol=2 * UNIT_ROUNDOFF[dtype],
                               atol=UNIT_ROUNDOFF[dtype] * float(y.abs().max()))
    dy = _rand(shape, dtype, seed + 2)
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
    ours = torch.autograd.grad(kernels.swiglu(ag, bg), (ag, bg), dy)
    _assert_grads_exact(_eager_swiglu, _eager_swiglu, ours, (a, b), dy, ("da", "db"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_swiglu_exact_forward_and_gradients(dtype):
    _check_swiglu((37, 1536), dtype, seed=1)


def test_swiglu_ragged_strided_and_empty():
    """Size not a multiple of the block, non-contiguous inputs (made contiguous), zero tokens."""
    _check_swiglu((3, 1001), torch.bfloat16, seed=2)
    a = _rand((64, 40), torch.bfloat16, 3).t()
    b = _rand((40, 64), torch.bfloat16, 4)
    _assert_rounded(kernels.swiglu(a, b), _eager_swiglu(a.double(), b.double()), torch.bfloat16,
                    "transposed gate")
    a0 = torch.empty(0, 1536, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    y0 = kernels.swiglu(a0, a0)
    assert y0.shape == (0, 1536)
    assert torch.autograd.grad(y0.sum(), a0)[0].shape == (0, 1536)


def test_swiglu_rejects_mismatched_inputs():
    a = _rand((4, 64), torch.bfloat16, 5)
    with pytest.raises(ValueError, match="same shape and dtype"):
        kernels.swiglu(a, a[:, :32])
    with pytest.raises(ValueError, match="same shape and dtype"):
        kernels.swiglu(a, a.float())


# -- Rotary embedding ----------------------------------------------------------------------------

def _tables(S, R, seed):
    angles = _rand((S, R // 2), torch.float32, seed).abs() * 10
    return angles.cos(), angles.sin()


def _check_rope(x, seed, share):
    """Forward and backward against the eager rotation in x's dtype: bitwise on the CPU."""
    cos, sin = _tables(x.shape[1], x.shape[-1], seed)
    y = kernels.rope(x, cos, sin)
    rel = 2 * UNIT_ROUNDOFF[x.dtype] if x.dtype != torch.float32 else 1e-6
    _assert_bitwise_mostly(y, _eager_rope(x, cos, sin), share, rel, "rope forward")
    dy = _rand(y.shape, y.dtype, seed + 1)
    xg = x.detach().clone().requires_grad_()
    (ours,) = torch.autograd.grad(kernels.rope(xg, cos, sin), xg, dy)
    (eager,) = _grads(lambda t: _eager_rope(t, cos, sin), (x,), dy)
    _assert_bitwise_mostly(ours, eager, share, rel, "rope backward")


FULL_SHARE = 1.0 if DEVICE == "cpu" else 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_matches_eager_queries_and_keys(dtype):
    """Queries [B, S, H, R] as MLA makes them (rope slice of [B, S, H, N + R]), keys [B, S, R]."""
    q = _rand((2, 7, 3, 48 + 64), dtype, 1)[..., 48:]
    _check_rope(q, seed=2, share=FULL_SHARE)
    _check_rope(_rand((2, 7, 64), dtype, 3), seed=4, share=FULL_SHARE)


def test_rope_ragged_pairs_and_empty():
    """R/2 not a power of two, and empty batch / sequence."""
    _check_rope(_rand((1, 5, 2, 24), torch.bfloat16, 5), seed=6, share=FULL_SHARE)
    for shape in [(0, 4, 2, 64), (2, 0, 64)]:
        x = torch.empty(shape, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        cos, sin = _tables(shape[1], 64, 7)
        y = kernels.rope(x, cos, sin)
        assert y.shape == shape and torch.autograd.grad(y.sum(), x)[0].shape == shape


def test_rope_rejects_bad_tables():
    x = _rand((2, 5, 64), torch.bfloat16, 8)
    cos, sin = _tables(5, 64, 9)
    with pytest.raises(ValueError, match=r"tables must be \[S, R/2\]"):
        kernels.rope(x, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="R even"):
        kernels.rope(x[..., :63], cos, sin)


# -- MLA query and key assembly ------------------------------------------------------------------

def _mla_inputs(B, S, H, N, R, V, dtype, seed):
    """wq_b's per-head queries, wkv_b's per-head keys/values, wkv_a's rope key, rope tables."""
    cos, sin = _tables(S, R, seed + 3)
    return (_rand((B, S, H, N + R), dtype, seed), _rand((B, S, H, N + V), dtype, seed + 1),
            _rand((B, S, R), dtype, seed + 2), cos, sin)


def _eager_mla_qk(q, kv, k_pe, cos, sin, N):
    """MLA.forward's eager assembly: rotated rope parts concatenated to the no-position parts,
    the one rope key repeated for every head; v the rest of kv."""
    heads = q.shape[2]
    k_pe_rot = _eager_rope(k_pe, cos, sin)[:, :, None].expand(-1, -1, heads, -1)
    return (torch.cat((q[..., :N], _eager_rope(q[..., N:], cos, sin)), -1),
            torch.cat((kv[..., :N], k_pe_rot), -1), kv[..., N:])


def _check_mla_qk(B, S, H, N, R, V, dtype, seed, share):
    """Forward against the eager assembly (bitwise on the CPU); gradients within one rounding of
    the exact fp64 ones and no further than eager autograd (the rope key's gradient, a sum over
    heads, is summed in fp32 and rounded once; eager rounds the sum, then the rotation)."""
    q, kv, k_pe, cos, sin = _mla_inputs(B, S, H, N, R, V, dtype, seed)
    ours = kernels.mla_qk(q, kv, k_pe, cos, sin, N)
    eager = _eager_mla_qk(q, kv, k_pe, cos, sin, N)
    rel = 2 * UNIT_ROUNDOFF[dtype] if dtype != torch.float32 else 1e-6
    for name, o, e in zip("qkv", ours, eager):
        _assert_bitwise_mostly(o, e.contiguous(), share, rel, f"mla_qk {name}")
    assert ours[2].data_ptr() == kv[..., N:].data_ptr(), "v is not a view of kv"
    flat = lambda *ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    dy = _rand((sum(t.numel() for t in ours),), dtype, seed + 4)
    inputs = (q, kv, k_pe)
    grads = _grads(lambda *t: flat(*kernels.mla_qk(*t, cos, sin, N)), inputs, dy)
    _assert_grads_exact(lambda *t: flat(*_eager_mla_qk(*t, cos.double(), sin.double(), N)),
                        lambda *t: flat(*_eager_mla_qk(*t, cos, sin, N)), grads, inputs, dy,
                        ("dq", "dkv", "dk_pe"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mla_qk_matches_eager_and_exact_gradients(dtype):
    """Ragged widths (no-position 48, values 40: not powers of two), 3 heads."""
    _check_mla_qk(2, 7, 3, 48, 64, 40, dtype, seed=11, share=FULL_SHARE)


def test_mla_qk_ragged_pairs_one_head_and_empty():
    _check_mla_qk(1, 5, 1, 16, 24, 16, torch.bfloat16, seed=12, share=FULL_SHARE)
    for B, S in ((0, 4), (2, 0)):
        q, kv, k_pe, cos, sin = _mla_inputs(B, S, 2, 16, 8, 16, torch.bfloat16, 13)
        inputs = [t.requires_grad_() for t in (q, kv, k_pe)]
        out = kernels.mla_qk(*inputs, cos, sin, 16)
        assert [tuple(t.shape) for t in out] == [(B, S, 2, 24), (B, S, 2, 24), (B, S, 2, 16)]
        loss = sum(t.sum() for t in out)
        assert [g.shape for g in torch.autograd.grad(loss, inputs)] == [t.shape for t in inputs]


def test_mla_qk_rejects_bad_input():
    q, kv, k_pe, cos, sin = _mla_inputs(2, 5, 3, 16, 8, 16, torch.bfloat16, 14)
    with pytest.raises(ValueError, match=r"k_pe \(2, 5, 6\) must be \[B, S, R\]"):
        kernels.mla_qk(q, kv, k_pe[..., :6], cos, sin, 16)
    with pytest.raises(ValueError, match="even rope part"):
        kernels.mla_qk(q, kv, k_pe, cos, sin, 15)
    with pytest.raises(ValueError, match=r"kv \(2, 5, 2, 32\) must be"):
        kernels.mla_qk(q, kv[:, :, :2], k_pe, cos, sin, 16)
    with pytest.raises(ValueError, match=r"tables must be \[S, R/2\]"):
        kernels.mla_qk(q, kv, k_pe, cos[:4], sin[:4], 16)
    with pytest.raises(TypeError, match="MLA rope key has dtype torch.int64"):
        kernels.mla_qk(q, kv, k_pe.long(), cos, sin, 16)


def test_mla_forward_fused_matches_eager(monkeypatch):
    """MLA.forward through mla_qk (forced on the CPU through the interpreter) against its eager
    assembly: output and every parameter gradient (rope key's gradient summed in fp32: close, not
    bitwise)."""
    from models import model_config
    from models.attention import MLA
    from models.layers import rope_tables
    torch.manual_seed(0)
    cfg = model_config("debug")
    attn = MLA(cfg)
    x = torch.randn(2, 9, cfg.hidden_size, requires_grad=True)
    cos, sin = rope_tables(cfg, 9)
    runs = []
    for dispatch in (False, True):
        monkeypatch.setattr(kernels, "fused",
                            lambda t, kernel, on=dispatch: on and kernel == "mla_qk")
        attn.zero_grad()
        y = attn(x, cos, sin)
        dx, = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)
        y.backward(torch.ones_like(y))
        runs.append((y.detach(), dx, [p.grad.clone() for p in attn.parameters()]))
    (y0, dx0, g0), (y1, dx1, g1) = runs
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dx1, dx0, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(attn.named_parameters(), g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# -- MoE combine ---------------------------------------------------------------------------------

def _routing(T, K, E, seed):
    """pick_to_slot of a random routing of T tokens to K of E experts each (models.moe's
    sort_by_expert) and positive fp32 gates."""
    from models.moe import sort_by_expert
    g = torch.Generator().manual_seed(seed)
    expert_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else \
        torch.empty(0, K, dtype=torch.int64)
    _, pick_to_slot = sort_by_expert(expert_TK)
    gate_TK = torch.rand(T, K, generator=g) * 2.5 / K + 0.01
    return pick_to_slot.to(DEVICE), gate_TK.to(DEVICE)


def _check_combine(T, K, D, dtype, seed, extra=0):
    """Forward and both gradients against the exact (fp64) weighted sum on the same inputs: the
    output and d y_slots within one rounding to dtype plus fp32 arithmetic, the gates' fp32
    gradient within fp32 summation of its D products; padding slots get zero gradient."""
    pick_to_slot, gate = _routing(T, K, max(K, 8), seed)
    y = _rand((T * K + extra, D), dtype, seed + 1).requires_grad_()
    gate = gate.requires_grad_()
    out = kernels.moe_combine(y, pick_to_slot, gate)
    y64, gate64 = y.detach().double(), gate.detach().double()
    picked = y64[pick_to_slot].view(T, K, D)
    exact = (picked * gate64[:, :, None]).sum(1)
    scale = exact.abs().amax() if exact.numel() else 0.0
    err = (out.double() - exact).abs()
    assert out.dtype == dtype and out.shape == (T, D)
    assert (err <= UNIT_ROUNDOFF[dtype] * exact.abs() + ARITHMETIC[dtype] * scale).all()
    dout = _rand((T, D), dtype, seed + 2)
    dy, dgate = torch.autograd.grad(out, (y, gate), dout)
    g64 = dout.double()
    dy_exact = torch.zeros_like(y64)
    dy_exact[pick_to_slot] = (gate64[:, :, None] * g64[:, None, :]).reshape(T * K, D)
    dy_err = (dy.double() - dy_exact).abs()
    # gate * g rounded to fp32, then to dtype: one rounding to dtype plus the fp32 product's
    assert (dy_err <= (UNIT_ROUNDOFF[dtype] + 2.0 ** -23) * dy_exact.abs()).all(), "combine dy"
    assert not dy[T * K:].any(), "padding slots got a gradient"
    dgate_exact = (picked * g64[:, None, :]).sum(-1)
    bound = 2.0 ** -20 * (picked.abs() * g64.abs()[:, None, :]).sum(-1)
    assert dgate.dtype == torch.float32
    assert ((dgate.double() - dgate_exact).abs() <= bound + 1e-30).all(), "combine d gate"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_moe_combine_exact_forward_and_gradients(dtype):
    _check_combine(T=37, K=4, D=96, dtype=dtype, seed=11)


def test_moe_combine_odd_k_ragged_width_padding_and_empty():
    """K not a power of two, one expert per token, D past one column block and not a power of
    two, padding slots after the picks, and no tokens at all."""
    _check_combine(T=9, K=6, D=1100, dtype=torch.bfloat16, seed=12, extra=5)
    _check_combine(T=5, K=1, D=40, dtype=torch.bfloat16, seed=13)
    _check_combine(T=0, K=4, D=64, dtype=torch.bfloat16, seed=14)


def test_moe_combine_matches_the_eager_moe_path():
    """The kernel against MoE._routed's own eager gather, multiply and sum in fp32."""
    from models.moe import PermuteRows
    T, K, D = 23, 4, 80
    pick_to_slot, gate = _routing(T, K, 8, 15)
    slot_to_pick = torch.empty_like(pick_to_slot)
    slot_to_pick[pick_to_slot] = torch.arange(T * K, device=DEVICE)
    y = _rand((T * K, D), torch.float32, 16)
    eager = (PermuteRows.apply(y, pick_to_slot, slot_to_pick).view(T, K, D)
             * gate[:, :, None]).sum(1)
    torch.testing.assert_close(kernels.moe_combine(y, pick_to_slot, gate), eager,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sum_picks_is_the_eager_undispatch(dtype):
    """Each token's K slot rows summed (the dispatch's backward): the exact sum rounded once, as
    torch's fp32-accumulated sum of the gathered rows (models.moe.undispatch's eager code)."""
    from models.moe import undispatch
    T, K, D = 19, 4, 72
    pick_to_slot, _ = _routing(T, K, 8, 19)
    rows = _rand((T * K + 3, D), dtype, 20)
    ours = kernels.sum_picks(rows, pick_to_slot, K)
    picked = rows.double()[pick_to_slot].view(T, K, D)
    exact, fp32_sums = picked.sum(1), K * 2.0 ** -24 * picked.abs().sum(1)
    assert ours.dtype == dtype and ours.shape == (T, D)
    assert ((ours.double() - exact).abs() <= UNIT_ROUNDOFF[dtype] * exact.abs() + fp32_sums).all()
    torch.testing.assert_close(ours, undispatch(rows, pick_to_slot, K), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pick_to_slot \[T \* 3\]"):
        kernels.sum_picks(rows, pick_to_slot, 3)


def test_moe_combine_rejects_bad_input():
    pick_to_slot, gate = _routing(6, 2, 8, 17)
    y = _rand((12, 32), torch.bfloat16, 18)
    with pytest.raises(TypeError, match="fp32 weights"):
        kernels.moe_combine(y, pick_to_slot, gate.bfloat16())
    with pytest.raises(ValueError, match="only 11 slots"):
        kernels.moe_combine(y[:11], pick_to_slot, gate)
    with pytest.raises(ValueError, match=r"pick_to_slot \[T \* K\]"):
        kernels.moe_combine(y, pick_to_slot[:5], gate)
    with pytest.raises(TypeError, match="int64"):
        kernels.moe_combine(y, pick_to_slot.float(), gate)


# -- Dispatch in the model -----------------------------------------------------------------------

def test_fused_only_for_compiled_cuda_tensors():
    assert not kernels.fused(torch.ones(2), "rms_norm")
    if torch.cuda.is_available():
        assert kernels.fused(torch.ones(2, device="cuda"), "rope") == (not kernels.INTERPRET)
        assert not kernels.fused(torch.ones(2, device="cuda", dtype=torch.float64), "rope")
    with pytest.raises(ValueError, match="no fused kernel 'rmsnorm'"):
        kernels.fused(torch.ones(2), "rmsnorm")


def test_environment_switch_picks_the_kernels():
    """FP8MOE_FUSED_KERNELS (read once, at import: a fresh interpreter each) turns all kernels off
    (0), all on (1, the usual rule), or only those it lists; a name it does not know is an error
    that lists the names."""
    import subprocess
    import sys
    probe = ("import torch; from models import kernels; x = torch.ones(1, device="
             f"{DEVICE!r}); print(sorted(kernels.ENABLED), kernels.fused(x, 'rope'), "
             "kernels.fused(x, 'moe_combine'))")
    usual = str(DEVICE == "cuda" and not kernels.INTERPRET)
    cases = (("0", ["[]", "False", "False"]),
             ("1", [str(sorted(kernels.KERNELS)).replace(" ", ""), usual, usual]),
             ("rope, swiglu", ["['rope','swiglu']", usual, "False"]))
    for value, expected in cases:
        env = dict(os.environ, FP8MOE_FUSED_KERNELS=value)
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, check=True).stdout.replace(", ", ",").split()
        assert out == expected, (value, out)
    with pytest.raises(ValueError, match="names no kernel \\['combine'\\].*rms_norm,swiglu"):
        kernels.enabled_kernels("rope,combine")


def test_eager_turns_every_kernel_off_for_its_block():
    before = kernels.ENABLED
    x = torch.ones(1, device=DEVICE)
    with kernels.eager():
        assert kernels.ENABLED == frozenset()
        assert not any(kernels.fused(x, k) for k in kernels.KERNELS)
    assert kernels.ENABLED == before
    with pytest.raises(RuntimeError), kernels.eager():
        raise RuntimeError("the switch is restored on the way out of an error too")
    assert kernels.ENABLED == before


def _model_loss_and_grads(model, tokens):
    model.zero_grad()
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.loss.backward()
    return out.loss.detach().float(), [p.grad.float() for p in model.parameters()]


def _count_calls(monkeypatch, names):
    calls = []
    for name in names:
        def counted(*args, _kernel=getattr(kernels, name), _name=name):
            calls.append(_name)
            return _kernel(*args)
        monkeypatch.setattr(kernels, name, counted)
    return calls


def test_model_runs_the_kernels_when_dispatched(monkeypatch):
    """The debug model with every norm, query/key assembly and SwiGLU on the kernels (forced on CPU
    through the interpreter) gives the eager model's loss and gradients."""
    from models import build_model, model_config
    torch.manual_seed(0)
    cfg = model_config("debug", num_hidden_layers=2)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    eager_loss, eager_grads = _model_loss_and_grads(model, tokens)
    names = ("rms_norm", "swiglu", "mla_qk", "moe_combine", "sum_picks")
    calls = _count_calls(monkeypatch, names)
    monkeypatch.setattr(kernels, "fused", lambda x, kernel: True)
    fused_loss, fused_grads = _model_loss_and_grads(model, tokens)
    assert set(calls) == set(names)
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-5, atol=0)
    for (name, _), f, e in zip(model.named_parameters(), fused_grads, eager_grads):
        torch.testing.assert_close(f, e, rtol=1e-4, atol=1e-6, msg=name)


# -- Compiled kernels ----------------------------------------------------------------------------

_COMPILE_SM90 = r'''
import json, os, re, subprocess, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from models import kernels

ALIGNED = ("D", "N", "V", "HALF")  # besides pointers and strides: what a launch at model shapes has
BYTES = {"bf16": 2, "f16": 2, "f32": 4}

def narrow_accesses(ttgir):
    # global loads/stores of 1024+ elements whose layout gives a thread under 16 contiguous
    # bytes, or spreads a warp's lanes across rows before columns (uncoalesced)
    layouts = dict(re.findall(r"^(#\w+) = #ttg.blocked<\{(.*)\}>", ttgir, re.M))
    narrow = []
    for shape, dtype, layout in re.findall(
            r"tt\.(?:load|store) .*: tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#\w+)>", ttgir):
        if eval("*".join(shape.split("x"))) < 1024:
            continue
        fields = dict(re.findall(r"(\w+) = \[([\d, ]+)\]", layouts[layout]))
        per_thread, lanes, order = ([int(v) for v in fields[k].split(",")]
                                    for k in ("sizePerThread", "threadsPerWarp", "order"))
        inner = order[0]
        if per_thread[inner] * BYTES[dtype] < 16 or (lanes[inner] == 1 and per_thread[inner] < 64):
            narrow.append(f"{shape}x{dtype} {layouts[layout]}")
    return narrow

def build(fn, sig, consts, warps):
    sig = dict(sig, **{n: "constexpr" for n in consts})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or n.startswith("stride") or n in ALIGNED}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                           text=True).stdout
    return dict(stack=int(usage.split("STACK:")[1].split()[0]),
                narrow=narrow_accesses(k.asm["ttgir"]))

p = lambda n: "*" + n
out = {}
for D in (512, 1536, 4096, 8192, 16384):
    bm, bd = kernels._norm_tiles(D)
    warps = kernels._warps(bm * bd)
    for x, w in (("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")):
        y = "fp32" if "fp32" in (x, w) else x
        out[f"rms_norm D{D} {x}/{w}"] = build(kernels.rms_norm_kernel, dict(
            x_ptr=p(x), w_ptr=p(w), y_ptr=p(y), rstd_ptr=p("fp32"), M="i32", D="i32",
            stride_xm="i32", eps="fp32"), dict(BLOCK_M=bm, BLOCK_D=bd), warps)
        out[f"rms_norm_backward D{D} {x}/{w}"] = build(kernels.rms_norm_backward_kernel, dict(
            x_ptr=p(x), w_ptr=p(w), rstd_ptr=p("fp32"), dy_ptr=p(y), dx_ptr=p(x),
            dw_ptr=p("fp32"), M="i32", D="i32", stride_xm="i32"),
            dict(TILES=32, BLOCK_M=bm, BLOCK_D=bd), warps)
for dt in ("bf16", "fp32"):
    elem = dict(a_ptr=p(dt), b_ptr=p(dt), N="i32")
    block = dict(BLOCK=kernels.ELEM_BLOCK)
    out[f"swiglu {dt}"] = build(kernels.swiglu_kernel, dict(elem, y_ptr=p(dt)), block,
                                kernels.ELEM_WARPS)
    out[f"swiglu_backward {dt}"] = build(kernels.swiglu_backward_kernel, dict(
        elem, dy_ptr=p(dt), da_ptr=p(dt), db_ptr=p(dt)), block, kernels.ELEM_WARPS)
    block_rows = kernels.ROPE_TILE_ELEMS // 64
    for inverse in (False, True):
        out[f"rope {dt} inverse={inverse}"] = build(kernels.rope_kernel, dict(
            x_ptr=p(dt), cos_ptr=p("fp32"), sin_ptr=p("fp32"), y_ptr=p(dt), n_rows="i32",
            S="i32", H="i32", stride_xb="i32", stride_xs="i32", stride_xh="i32", stride_cs="i32",
            HALF="i32"), dict(INVERSE=inverse, BLOCK_ROWS=block_rows, BLOCK_HALF=32),
            kernels._warps(block_rows * 64))
    tables = dict(cos_ptr=p("fp32"), sin_ptr=p("fp32"))
    dims = dict(n_rows="i32", S="i32", H="i32")
    for R in (128, 64):  # the `small` model's rope dims, DeepSeek-V3's
        rows = kernels.ROPE_TILE_ELEMS // 128
        strides = {f"stride_{t}{d}": "i32" for t in "ap" for d in "bsh"}
        for inverse in (False, True):
            out[f"rope_concat {dt} R{R} inverse={inverse}"] = build(
                kernels.rope_concat_kernel, dict(
                    a_ptr=p(dt), p_ptr=p(dt), **tables, y_ptr=p(dt), **dims, **strides,
                    stride_cs="i32", N="i32", HALF="i32"),
                dict(INVERSE=inverse, BLOCK_ROWS=rows, BLOCK_N=128, BLOCK_HALF=R // 2),
                kernels._warps(rows * (128 + R)))
        strides = {f"stride_{t}{d}": "i32" for t in "kv" for d in "bsh"}
        out[f"mla_keys_backward {dt} R{R}"] = build(kernels.mla_keys_backward_kernel, dict(
            dk_ptr=p(dt), dv_ptr=p(dt), **tables, dkv_ptr=p(dt), dpe_ptr=p(dt), **dims,
            **strides, stride_cs="i32", N="i32", V="i32", HALF="i32"), dict(
            BLOCK_ROWS=rows, BLOCK_N=128, BLOCK_V=128, BLOCK_HALF=R // 2),
            kernels._warps(rows * 128))
    for D in (4096, 7168):
        for K in (4, 8):
            bt, bd = kernels._combine_tiles(D)
            rows = dict(y_ptr=p(dt), pick_to_slot_ptr=p("i64"), gate_ptr=p("fp32"))
            out[f"moe_combine {dt} D{D} K{K}"] = build(kernels.moe_combine_kernel, dict(
                rows, out_ptr=p(dt), T="i32", D="i32"), dict(K=K, BLOCK_T=bt, BLOCK_D=bd),
                kernels._warps(bt * bd))
            bt, bd = kernels._combine_tiles(D, widest=512)
            out[f"moe_combine_backward {dt} D{D} K{K}"] = build(
                kernels.moe_combine_backward_kernel, dict(
                    g_ptr=p(dt), **rows, dy_ptr=p(dt), dgate_ptr=p("fp32"), T="i32", D="i32"),
                dict(K=K, BLOCK_K=K, BLOCK_T=bt, BLOCK_D=bd), kernels._warps(bt * bd))
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90(compiled_sm90):
    """The compiled (not interpreted) kernels build for Hopper without a GPU, at the launch
    configurations the wrappers pick: every large global load and store coalesced in 16-byte
    vectors per thread (the first rope kernel spread a warp over 32 rows: 14% of HBM bandwidth on
    the H100), and no register spills (stack 0) up to rows of 8192 (DeepSeek-V3's 7168); the
    16384-wide backward spills a few registers."""
    import triton
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(tools, "cuobjdump")):
        pytest.skip("this Triton build ships no NVIDIA toolchain (ptxas, cuobjdump)")
    for name, info in compiled_sm90(_COMPILE_SM90).items():
        assert not info["narrow"], (name, info)
        assert info["stack"] == 0 or "D16384" in name, (name, info)


# -- GPU, at the `small` model's sizes -----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("D", [4096, 1536, 1024, 7168])
def test_gpu_rms_norm_small_model_sizes(D):
    _check_rms_norm((16384, D), torch.bfloat16, torch.bfloat16, seed=D)
    _check_rms_norm((4, 1024, D), torch.bfloat16, torch.float32, seed=D + 1)


@pytest.mark.gpu
def test_gpu_rms_norm_latent_slice_and_widest_rows():
    _check_rms_norm_slice((4, 4096), 512, 512 + 128, seed=5)
    _check_rms_norm((64, 16384), torch.bfloat16, torch.bfloat16, seed=6)


@pytest.mark.gpu
def test_gpu_rms_norm_backward_is_deterministic():
    """The weight gradient is reduced from fixed per-program partials, never atomics."""
    x = _rand((16384, 4096), torch.bfloat16, 7).requires_grad_()
    w = torch.ones(4096, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    dy = _rand((16384, 4096), torch.bfloat16, 8)
    first = torch.autograd.grad(kernels.rms_norm(x, w, 1e-6), (x, w), dy)
    for _ in range(3):
        again = torch.autograd.grad(kernels.rms_norm(x, w, 1e-6), (x, w), dy)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
def test_gpu_swiglu_expert_sizes():
    _check_swiglu((65536, 1536), torch.bfloat16, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("R", [128, 64])
def test_gpu_rope_attention_sizes(R):
    """The `small` model's (R = 128) and DeepSeek-V3's (R = 64) rope slices of q and of wkv_a's
    output, 4 x 4096 tokens, 32 heads."""
    q = _rand((4, 4096, 32, 128 + R), torch.bfloat16, 1)[..., 128:]
    _check_rope(q, seed=2, share=0.99)
    _check_rope(_rand((4, 4096, 512 + R), torch.bfloat16, 3)[..., 512:], seed=4, share=0.99)


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, R", [(4, 32, 128), (1, 128, 64)])
def test_gpu_mla_qk_attention_sizes(B, H, R):
    """The `small` model's queries and keys (4 x 4096 tokens, 32 heads, rope 128) and DeepSeek-V3's
    (128 heads, rope 64), no-position and value heads of 128."""
    _check_mla_qk(B, 4096, H, 128, R, 128, torch.bfloat16, seed=R, share=0.99)


@pytest.mark.gpu
@pytest.mark.parametrize("T, K, D", [(16384, 4, 4096), (4096, 8, 7168)])
def test_gpu_moe_combine_model_sizes(T, K, D):
    """The `small` model's combine (4 x 4096 tokens, top-4 of hidden 4096) and DeepSeek-V3's
    (top-8 of 7168), with padding slots after the picks; the dispatch's backward (sum_picks)
    against torch's sum of the gathered rows."""
    _check_combine(T=T, K=K, D=D, dtype=torch.bfloat16, seed=K, extra=128)
    pick_to_slot, _ = _routing(T, K, 2 * K, K + 1)
    rows = _rand((T * K, D), torch.bfloat16, K + 2)
    eager = rows[pick_to_slot].view(T, K, D).sum(1)
    torch.testing.assert_close(kernels.sum_picks(rows, pick_to_slot, K), eager,
                               rtol=2 * UNIT_ROUNDOFF[torch.bfloat16], atol=0)  # an ulp


@pytest.mark.gpu
def test_gpu_model_dispatches_to_kernels():
    """The debug model on the GPU, fused (the default there) against eager (dispatch off): fp32
    tight (bf16 rounding differences could flip near-tied routing choices), bf16 loosely."""
    from models import build_model, model_config
    assert kernels.fused(torch.ones(1, device="cuda"), "rms_norm")
    torch.manual_seed(0)
    cfg = model_config("debug")
    model = build_model(cfg).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (2, 257), device="cuda")
    fused = _model_loss_and_grads(model, tokens)
    model_bf16 = build_model(cfg).cuda().bfloat16()
    model_bf16.load_state_dict(model.state_dict())
    fused_bf16 = _model_loss_and_grads(model_bf16, tokens)
    with kernels.eager():
        eager = _model_loss_and_grads(model, tokens)
        eager_bf16 = _model_loss_and_grads(model_bf16, tokens)
    torch.testing.assert_close(fused[0], eager[0], rtol=1e-5, atol=0)
    for f, e in zip(fused[1], eager[1]):
        torch.testing.assert_close(f, e, rtol=1e-3, atol=1e-4 * e.abs().max().item())
    torch.testing.assert_close(fused_bf16[0], eager_bf16[0], rtol=2e-2, atol=0)
    assert all(torch.isfinite(g).all() for g in fused_bf16[1])
