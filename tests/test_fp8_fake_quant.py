"""models/fp8/fake_quant.py: each switch rounds exactly its operands (checked against products
composed by hand from the reference's quantizers), all three together compute what FP8Linear and
the grouped FP8 references compute, and fake_convert puts its layers where convert puts FP8 ones."""
import dataclasses
import os
import sys

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest
import torch
from torch import nn

from models import build_model, model_config
from models.fp8 import reference as ref
from models.fp8.config import FP8Config
from models.fp8.convert import convert
from models.fp8.experts import FP8GroupedExperts
from models.fp8.fake_quant import (PARTS, FakeFP8GroupedExperts, FakeFP8GroupedMatmulFunction,
                                   FakeFP8Linear, FakeFP8MLP, fake_convert, parse_parts)
from models.fp8.linear import FP8Linear, FP8MLP
from models.layers import MLP
from models.moe import GroupedExperts, sort_by_expert
from test_fp8_convert import ALL_ELIGIBLE, BLOCKWISE

ALL = frozenset(PARTS)
EVERYTHING = dataclasses.replace(BLOCKWISE, fuse_norms=False)
"""test_fp8_convert's recipe for the all-small debug model, without the fused norms (which
fake_convert does not make)."""


def _rt(t, quantize, dequantize):
    """The reference round trip, written out here rather than taken from fake_quant."""
    return dequantize(*quantize(t))


def _linear_grads(parts, x, w, dy):
    """(y, dx, dW) of a FakeFP8Linear with weight w on input x and output gradient dy."""
    layer = FakeFP8Linear(nn.Parameter(w.clone()), parts)
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad


def _random(T=192, K=256, N=384, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen)
    w = torch.randn(N, K, generator=gen) * 0.05
    dy = torch.randn(T, N, generator=gen)
    return x, w, dy


@pytest.mark.parametrize("parts", [frozenset(), frozenset({"weights"}), frozenset({"inputs"}),
                                   frozenset({"grads"}), ALL])
def test_each_part_rounds_only_its_operands(parts):
    x, w, dy = _random(seed=len(parts))
    y, dx, dw = _linear_grads(parts, x, w, dy)
    w_fwd = _rt(w, ref.quantize_128x128, ref.dequantize_128x128) if "weights" in parts else w
    x_rows = _rt(x, ref.quantize_1x128, ref.dequantize_1x128) if "inputs" in parts else x
    x_cols = _rt(x, ref.quantize_128x1, ref.dequantize_128x1) if "inputs" in parts else x
    dy_rows = _rt(dy, ref.quantize_1x128, ref.dequantize_1x128) if "grads" in parts else dy
    dy_cols = _rt(dy, ref.quantize_128x1, ref.dequantize_128x1) if "grads" in parts else dy
    torch.testing.assert_close(y, x_rows @ w_fwd.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dy_rows @ w_fwd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dy_cols.t() @ x_cols, rtol=1e-5, atol=1e-4)
    if parts:  # the rounding is visible: not the plain product
        plain = (x @ w.t(), dy @ w, dy.t() @ x)
        assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-4)
                   for a, b in zip((y, dx, dw), plain))


def test_all_parts_compute_what_fp8linear_computes():
    x, w, dy = _random(T=130, K=256, N=128, seed=3)
    real = FP8Linear(256, 128)
    with torch.no_grad():
        real.weight.copy_(w)
    x_real = x.clone().requires_grad_()
    y_real = real(x_real)
    y_real.backward(dy)
    y, dx, dw = _linear_grads(ALL, x, w, dy)
    assert ref.calc_diff(y, y_real) < 1e-9
    assert ref.calc_diff(dx, x_real.grad) < 1e-9
    assert ref.calc_diff(dw, real.weight.grad) < 1e-9


@pytest.mark.parametrize("counts", [[64, 0, 200, 36], [0, 0, 300, 0], [1, 130, 0, 127]])
def test_grouped_all_parts_match_the_grouped_references(counts):
    gen = torch.Generator().manual_seed(sum(counts))
    counts_E = torch.tensor(counts)
    T, E, N, K = sum(counts), len(counts), 256, 384
    x = torch.randn(T, K, generator=gen).requires_grad_()
    w = (torch.randn(E, N, K, generator=gen) * 0.05).requires_grad_()
    dy = torch.randn(T, N, generator=gen)
    y = FakeFP8GroupedMatmulFunction.apply(x, w, counts_E, ALL)
    y.backward(dy)
    q_w = [ref.quantize_128x128(w[e].detach()) for e in range(E)]
    q_wt = [ref.quantize_128x128(w[e].detach().t().contiguous()) for e in range(E)]
    y_ref = ref.grouped_gemm_1x128_128x128(*ref.quantize_1x128(x.detach()),
                                           torch.stack([q for q, _ in q_w]),
                                           torch.stack([s for _, s in q_w]), counts_E)
    dx_ref = ref.grouped_gemm_1x128_128x128(*ref.quantize_1x128(dy),
                                            torch.stack([q for q, _ in q_wt]),
                                            torch.stack([s for _, s in q_wt]), counts_E)
    dw_ref = ref.grouped_gemm_128x1_128x1(*ref.quantize_128x1(dy), *ref.quantize_128x1(x.detach()),
                                          counts_E)
    assert ref.calc_diff(y, y_ref) < 1e-9
    assert ref.calc_diff(x.grad, dx_ref) < 1e-9
    assert ref.calc_diff(w.grad, dw_ref) < 1e-9
    for e, c in enumerate(counts):
        if c == 0:
            assert not w.grad[e].any(), "an expert without tokens gets a zero gradient"


def _outputs_and_grads(module, x, *args):
    """(y, dx, every parameter's gradient) of `module` on x with a fixed random output gradient."""
    x = x.clone().requires_grad_()
    y = module(x, *args)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    grads = [p.grad.clone() for p in module.parameters()]
    for p in module.parameters():
        p.grad = None
    return [y.detach(), x.grad, *grads]


def test_fake_mlp_with_all_parts_computes_what_fp8mlp_computes():
    torch.manual_seed(5)
    mlp = MLP(256, 256)
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 100, 256)
    fake = FakeFP8MLP(*(FakeFP8Linear(l.weight, ALL) for l in (mlp.w1, mlp.w3, mlp.w2)))
    got = _outputs_and_grads(fake, x)
    want = _outputs_and_grads(FP8MLP.from_mlp(mlp), x)
    assert all(ref.calc_diff(a, b) < 1e-9 for a, b in zip(got, want))


def test_fake_experts_with_all_parts_track_fp8_experts():
    """The FP8 experts round h and dSwiGLU's input to bf16 even for an fp32 model, so not to the
    last bit: the fake is still ten times nearer to them than the plain experts are."""
    torch.manual_seed(6)
    experts = GroupedExperts(4, 256, 128)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.05)
    counts, x = torch.tensor([100, 0, 60, 96]), torch.randn(256, 256)
    want = _outputs_and_grads(FP8GroupedExperts.from_grouped(experts), x, counts)
    fake = _outputs_and_grads(FakeFP8GroupedExperts(experts, ALL), x, counts)
    plain = _outputs_and_grads(experts, x, counts)
    for f, p, w in zip(fake, plain, want):
        assert ref.calc_diff(f, w) < 0.2 * ref.calc_diff(p, w)


def test_fake_convert_puts_twins_where_convert_puts_fp8():
    torch.manual_seed(0)
    cfg = model_config("debug", **ALL_ELIGIBLE)
    fp8_model, fake_model = build_model(cfg), build_model(cfg)
    fake_model.load_state_dict(fp8_model.state_dict())
    params_before = {n: p for n, p in fake_model.named_parameters()}
    convert(fp8_model, EVERYTHING, emulate=True)
    fake_convert(fake_model, frozenset({"weights"}), EVERYTHING)
    twins = {FP8Linear: FakeFP8Linear, FP8MLP: FakeFP8MLP, FP8GroupedExperts: FakeFP8GroupedExperts}
    fp8_kinds = {n: type(m) for n, m in fp8_model.named_modules() if type(m) in twins}
    fake_kinds = {n: type(m) for n, m in fake_model.named_modules() if type(m) in twins.values()}
    assert set(fp8_kinds.values()) == set(twins), "the debug model has all three kinds"
    top = {n: k for n, k in fp8_kinds.items()
           if not any(n.startswith(p + ".") for p in fp8_kinds if p != n)}
    assert {n: twins[k] for n, k in top.items()} == {n: k for n, k in fake_kinds.items()
                                                      if n in top}
    assert all(p is params_before[n] for n, p in fake_model.named_parameters()), \
        "the fake layers share the model's Parameter objects"


def test_fake_model_with_all_parts_tracks_the_fp8_model():
    torch.manual_seed(1)
    cfg = model_config("debug", **ALL_ELIGIBLE)
    fp8_model, fake_model, plain = build_model(cfg), build_model(cfg), build_model(cfg)
    for m in (fake_model, plain):
        m.load_state_dict(fp8_model.state_dict())
    convert(fp8_model, EVERYTHING, emulate=True)
    fake_convert(fake_model, ALL, EVERYTHING)
    fake_none = fake_convert(build_model(cfg), frozenset(), EVERYTHING)
    fake_none.load_state_dict(plain.state_dict())
    tok = torch.randint(0, cfg.vocab_size, (2, 129))
    losses = {}
    models = (("fp8", fp8_model), ("fake", fake_model), ("plain", plain), ("none", fake_none))
    for name, m in models:
        out = m(tok[:, :-1], tok[:, 1:])
        out.loss.backward()
        losses[name] = out.loss.item()
    assert abs(losses["none"] - losses["plain"]) < 1e-5  # nothing rounded: the plain model
    assert abs(losses["fake"] - losses["fp8"]) < 1e-3 * losses["fp8"]
    for (n, p), q in zip(fake_model.named_parameters(), fp8_model.parameters()):
        if p.grad is not None and p.grad.any():
            cos = torch.nn.functional.cosine_similarity(p.grad.flatten().double(),
                                                        q.grad.flatten().double(), 0)
            assert cos > 0.99, f"{n}: gradient cosine {float(cos):.4f} to the FP8 model's"


def test_fake_mlp_below_min_tokens_is_the_plain_mlp():
    torch.manual_seed(4)
    w1, w3, w2 = (nn.Parameter(torch.randn(*shape) * 0.05)
                  for shape in ((256, 128), (256, 128), (128, 256)))
    mlp = FakeFP8MLP(*(FakeFP8Linear(w, ALL) for w in (w1, w3, w2)), min_tokens=64)
    x = torch.randn(2, 31, 128)  # 62 tokens: under the threshold
    plain = torch.nn.functional.linear(
        torch.nn.functional.silu(x @ w1.t()) * (x @ w3.t()), w2)
    torch.testing.assert_close(mlp(x), plain, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 32, 128)  # 64 tokens: rounded
    plain = torch.nn.functional.linear(
        torch.nn.functional.silu(x @ w1.t()) * (x @ w3.t()), w2)
    rounded_y = mlp(x)
    assert not torch.allclose(rounded_y, plain, rtol=1e-4, atol=1e-5)
    assert ref.calc_diff(rounded_y, plain) < 1e-2


def test_fake_linear_keeps_the_fp8_linears_token_threshold():
    """Under skip_small a converted Linear runs F.linear below its min_tokens; its fake twin carries
    the same threshold (and is the plain product there), so a fake run matches convert's."""
    torch.manual_seed(5)
    fp8_model, fake_model = (nn.Sequential(nn.Linear(2048, 2048, bias=False)) for _ in range(2))
    skip_small = dataclasses.replace(EVERYTHING, skip_small=True)  # 2048 wide: converted
    convert(fp8_model, skip_small, emulate=True)
    fake_convert(fake_model, ALL, skip_small)
    fp8_linear, fake_linear = fp8_model[0], fake_model[0]
    assert isinstance(fp8_linear, FP8Linear) and isinstance(fake_linear, FakeFP8Linear)
    assert fake_linear.min_tokens == fp8_linear.min_tokens > 64
    x = torch.randn(2, 32, 2048)
    plain = torch.nn.functional.linear(x, fake_linear.weight)
    torch.testing.assert_close(fake_linear(x), plain, rtol=0, atol=0)
    fake_linear.min_tokens = 64
    rounded = fake_linear(x)
    assert not torch.allclose(rounded, plain, rtol=1e-4, atol=1e-5)
    assert ref.calc_diff(rounded, plain) < 1e-2


def test_fake_experts_keep_the_fp8_experts_token_threshold():
    """Under skip_small convert gives the routed experts a token threshold; the fake twin carries
    it: below it (tokens before top-k) the plain grouped GEMMs exactly, from it the rounded ones."""
    torch.manual_seed(6)
    fp8_model, fake_model = (nn.Sequential(GroupedExperts(3, 128, 128)) for _ in range(2))
    for model in (fp8_model, fake_model):
        for w in model[0].parameters():
            nn.init.normal_(w, std=0.05)
    skip_small = dataclasses.replace(EVERYTHING, skip_small=True, experts_min_tokens=33)
    original = fake_model[0]  # replaced by its twin, which shares its parameters
    convert(fp8_model, skip_small, emulate=True)
    fake_convert(fake_model, ALL, skip_small)
    fake = fake_model[0]
    assert isinstance(fake, FakeFP8GroupedExperts) and fake.w1 is original.w1
    assert fake.min_tokens == fp8_model[0].min_tokens == 33
    x = torch.randn(32, 128)  # 32 tokens, 2 experts each: 64 slots
    expert_TK = torch.stack([torch.randperm(3)[:2] for _ in range(32)])
    slot_to_pick, pick_to_slot = sort_by_expert(expert_TK)
    counts_E = torch.bincount(expert_TK.flatten(), minlength=3)
    routed = lambda: fake.forward_tokens(x, counts_E, slot_to_pick, pick_to_slot, 2)  # noqa: E731
    plain = original.forward_tokens(x, counts_E, slot_to_pick, pick_to_slot, 2)
    torch.testing.assert_close(routed(), plain, rtol=0, atol=0)
    fake.min_tokens = 32
    rounded = routed()
    assert not torch.allclose(rounded, plain, rtol=1e-4, atol=1e-5)
    assert ref.calc_diff(rounded, plain) < 1e-2


def test_parse_parts_and_bad_specs():
    assert parse_parts("weights+grads") == frozenset({"weights", "grads"})
    assert parse_parts("all") == ALL and parse_parts("none") == frozenset()
    for bad in ("weight", "weights+weights", "inputs+", ""):
        with pytest.raises(ValueError, match="join distinct names"):
            parse_parts(bad)
    with pytest.raises(ValueError, match="pow2_scales=False"):
        fake_convert(build_model(model_config("debug")), ALL,
                     FP8Config(recipe="blockwise", pow2_scales=True))


@pytest.fixture
def bench_fp8_loss():
    """scripts/bench_fp8_loss.py as a module."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
    import bench_fp8_loss
    return bench_fp8_loss


def test_loss_bench_takes_fake_runs_and_refuses_bad_ones(bench_fp8_loss):
    bench_fp8_loss.check_runs("off,blockwise,control,fake:weights+inputs,fake:all")
    for bad, says in [("off", "use 'off,blockwise'"),
                      ("off,blockwise,fake:weight", "join distinct"),
                      ("off,blockwise,control,control", "use 'off,blockwise'"),
                      ("off,blockwise,bf16", "fake:PARTS")]:
        with pytest.raises(SystemExit, match=says):
            bench_fp8_loss.check_runs(bad)


def test_loss_bench_reports_fake_runs_beside_the_others(bench_fp8_loss, tmp_path, monkeypatch,
                                                         capsys):
    """report() and report_seeds() on made-up runs (bf16, FP8, control, two ablations): every run
    gets its row and its gaps, the control is found by name, the summary rows name it."""
    import json
    from argparse import Namespace
    bench = bench_fp8_loss
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test GPU")
    monkeypatch.setenv("FP8MOE_SUMMARY", str(tmp_path / "summary.jsonl"))
    names = ["off", "blockwise", "fake:weights", "control", "fake:inputs+grads"]
    gen = torch.Generator().manual_seed(9)

    def made_up(name, seed):
        curve = (torch.linspace(8, 5, 120) + 0.1 * torch.randn(120, generator=gen)).tolist()
        return dict(run=name, curves={"loss/total": curve, "loss/lm": curve, "loss/mtp": curve,
                                      bench.GRAD_NORM: [5.0 + i % 7 for i in range(120)]},
                    step_s=0.1 + 0.01 * names.index(name), held_out=4.0 + 0.01 * seed
                    + 0.02 * names.index(name), peak_gib=30.0, at_step_gib=20.0)

    args = Namespace(size="small", steps=120, micro_batch=1, seq_len=2048, seeds="0,1",
                     runs=",".join(names), out=str(tmp_path))
    by_seed = {}
    for seed in (0, 1):
        args.seed = seed
        by_seed[seed] = [made_up(n, seed) for n in names]
        bench.report(args, by_seed[seed])
    bench.report_seeds(args, by_seed)
    out = capsys.readouterr().out
    for name in names[1:]:
        assert out.count(f"  {name} ") >= 2, f"{name} has no gap rows"
    assert "fake:inputs+grads 4.0" in out and "grad norm median" in out
    curves = json.loads((tmp_path / "fp8_loss_curves_seed1.json").read_text())
    assert sorted(curves) == sorted(names)
    rows = [json.loads(line) for line in (tmp_path / "summary.jsonl").read_text().splitlines()]
    control_rows = [r for r in rows if "(ratio: control/fp8)" in r["case"]]
    assert len(control_rows) == 4  # final EMA and held-out gaps, two seeds
    assert all(r["baseline_name"] == "bf16 control |gap|" for r in control_rows)
    held_out = [r for r in control_rows if "held-out" in r["case"]][-1]  # seed 1's
    bf16_loss, control_loss = 4.01, 4.01 + 0.02 * names.index("control")
    assert held_out["baseline"] == pytest.approx(100 * abs(control_loss / bf16_loss - 1))
    over_seeds = [r["case"] for r in rows if "mean over seeds" in r["case"]]
    assert [c.split(": ")[1].split(" ")[0] for c in over_seeds] == names[1:]


def test_loss_bench_keeps_finished_runs_and_resumes_only_the_same_settings(
        bench_fp8_loss, tmp_path, monkeypatch):
    """finished_run writes each run's result as it ends; --resume reads it back instead of
    training again, and refuses a file trained with other settings."""
    from argparse import Namespace
    bench = bench_fp8_loss
    trained = []

    def fake_train(fn, args, run):
        trained.append(run)
        gen = torch.Generator().manual_seed(len(trained))
        return dict(run=run, curves={"loss/total": torch.rand(20, generator=gen).tolist()},
                    held_out=4.0 + torch.rand(1, generator=gen).item())
    monkeypatch.setattr(bench, "in_fresh_process", fake_train)
    args = Namespace(size="small", layers=0, steps=20, micro_batch=1, seq_len=2048, lr=1e-4,
                     seed=3, out=str(tmp_path), resume=False)
    first = bench.finished_run(args, "fake:weights+grads")
    assert (tmp_path / "fp8_loss_run_seed3_fake-weights+grads.json").exists()
    assert bench.finished_run(args, "fake:weights+grads") != first  # no --resume: trained again
    second = bench.finished_run(args, "off")
    args.resume = True
    assert bench.finished_run(args, "off") == second
    assert trained == ["fake:weights+grads", "fake:weights+grads", "off"]
    args.lr = 3e-4
    with pytest.raises(SystemExit, match="pass another --out or delete the file"):
        bench.finished_run(args, "off")
    args.seed = 4  # another seed's run is not there yet: trained
    bench.finished_run(args, "off")
    assert trained[-1] == "off" and len(trained) == 4
