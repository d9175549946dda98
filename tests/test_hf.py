"""Hugging Face interop: exact round trip, parity with transformers' own DeepseekV3ForCausalLM in
both directions, and clear errors for checkpoints that do not fit."""
import json

import pytest
import torch

from models import build_model, model_config
from models.hf import config_from_hf, config_to_hf, export_hf, load_hf, load_hf_weights

transformers = pytest.importorskip("transformers")

TINY = [
    dict(),
    dict(q_lora_rank=0, n_group=1, topk_group=1, routed_scaling_factor=2.5),
    dict(rope_scaling_factor=4.0, original_max_position_embeddings=16, mscale_all_dim=1.0,
         num_experts_per_tok=3, topk_group=2),
]


def _tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = model_config("debug", vocab_size=512, num_hidden_layers=3, **overrides)
    model = build_model(cfg)
    for p in model.parameters():  # wider than the init so differences would show
        torch.nn.init.normal_(p, std=0.05)
    for r in model.routers():
        r.expert_bias.uniform_(-0.05, 0.05)
    return model


def _hf_logits(path, tokens):
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("overrides", TINY)
def test_export_then_load_is_exact(tmp_path, overrides):
    model = _tiny(**overrides)
    export_hf(model, tmp_path, dtype=torch.float32)
    back = load_hf(tmp_path)
    assert back.cfg == model.cfg
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("overrides", TINY)
def test_our_export_runs_in_transformers_with_equal_logits(tmp_path, overrides):
    model = _tiny(1, **overrides)
    export_hf(model, tmp_path, dtype=torch.float32)
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        ours = model(tokens)
    theirs = _hf_logits(tmp_path, tokens)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("overrides", TINY[:2])
def test_transformers_checkpoint_loads_with_equal_logits(tmp_path, overrides):
    cfg = model_config("debug", vocab_size=512, num_hidden_layers=3, num_mtp_modules=0,
                       **overrides)
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in config_to_hf(cfg).items()
                                              if k not in ("architectures", "fp8_moe")})
    torch.manual_seed(2)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(std=0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf.eval()(tokens).logits, atol=2e-4, rtol=1e-3)


def test_mtp_layer_is_stored_as_an_extra_decoder_layer(tmp_path):
    from safetensors import safe_open
    model = _tiny()
    export_hf(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    mtp = "model.layers.3."
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.e_score_correction_bias",
                   "mlp.experts.7.down_proj.weight", "self_attn.kv_b_proj.weight"):
        assert mtp + suffix in keys
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1


def test_sharded_export_loads(tmp_path):
    model = _tiny()
    export_hf(model, tmp_path, dtype=torch.float32, max_shard_bytes=200_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert (tmp_path / "model.safetensors.index.json").exists()
    back = load_hf(tmp_path)
    assert torch.equal(back.head.weight, model.head.weight)


def test_mismatched_checkpoint_lists_what_differs(tmp_path):
    export_hf(_tiny(), tmp_path)
    other = build_model(model_config("debug", vocab_size=512, num_hidden_layers=3,
                                     n_routed_experts=4, moe_intermediate_size=32))
    before = other.head.weight.clone()
    with pytest.raises(ValueError) as err:
        load_hf_weights(other, tmp_path)
    msg = str(err.value)
    # experts 4..7 of two main MoE layers and the MTP block, three weights each
    assert "36 unexpected" in msg and "mlp.experts.4.down_proj.weight" in msg
    assert "51 with other shapes" in msg and "checkpoint (64, 128) vs model (32, 128)" in msg
    assert "n_routed_experts: checkpoint 8 vs model 4" in msg
    assert torch.equal(other.head.weight, before)  # nothing was loaded


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    export_hf(_tiny(), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "nowhere")


def test_fp8_checkpoint_is_dequantized_on_load(tmp_path):
    from safetensors.torch import load_file, save_file
    model = _tiny(**TINY[1])
    export_hf(model, tmp_path, dtype=torch.float32)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.self_attn.o_proj.weight"
    w = state[key]
    scale = torch.rand((w.shape[0] + 127) // 128, (w.shape[1] + 127) // 128) * 1e-3 + 1e-4
    full_scale = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
    q = (w / full_scale).to(torch.float8_e4m3fn)
    state[key], state[key + "_scale_inv"] = q, scale
    save_file(state, str(tmp_path / "model.safetensors"))
    back = load_hf(tmp_path)
    torch.testing.assert_close(back.layers[0].attn.wo.weight, q.float() * full_scale)


def test_config_round_trip_and_v5_rope_parameters():
    cfg = model_config("671b")
    assert config_from_hf(config_to_hf(cfg)) == cfg
    hf = config_to_hf(cfg)
    hf["rope_parameters"] = dict(hf.pop("rope_scaling"), rope_type="yarn", rope_theta=10000.0)
    assert config_from_hf(hf) == cfg


def _release_fp8_key(key: str) -> bool:
    """Which weights DeepSeek-V3's release stores in FP8, spelled out independently of
    models.hf.FP8_WEIGHTS: the decoder layers' attention projections and MLP / expert weights
    (so not the router `mlp.gate`, nor the MTP layers' eh_proj, which is neither)."""
    attention = ".self_attn." in key and "_proj" in key and key.endswith(".weight")
    return attention or ".mlp." in key and key.endswith("_proj.weight")


def _block_amax(w: torch.Tensor) -> torch.Tensor:
    """Max |w| of every 128 x 128 block, the last ones partial, by plain slicing."""
    rows, cols = -(-w.shape[0] // 128), -(-w.shape[1] // 128)
    return torch.tensor([[w[128 * i:128 * (i + 1), 128 * j:128 * (j + 1)].abs().max().item()
                          for j in range(cols)] for i in range(rows)], dtype=torch.float32)


@pytest.mark.parametrize("pow2", [False, True])
def test_fp8_export_writes_the_release_layout(tmp_path, pow2):
    from safetensors import safe_open
    from models.hf import to_hf_state
    model = _tiny(3)
    originals = to_hf_state(model)
    export_hf(model, tmp_path, fp8=True, pow2_scales=pow2)
    config = json.loads((tmp_path / "config.json").read_text())
    expected_config = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [128, 128]} | ({"scale_fmt": "ue8m0"} if pow2 else {})
    assert config["quantization_config"] == expected_config
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    fp8_keys = [k for k in state if _release_fp8_key(k)]
    # 3 main layers + 1 MTP layer: 5 attention projections each, the dense layer's MLP, three MoE
    # layers' shared experts and 8 routed experts (3 weights each)
    assert len(fp8_keys) == 4 * 5 + 3 + 3 * (3 + 8 * 3)
    for k, t in state.items():
        scale_key = k.removesuffix(".weight") + ".weight_scale_inv"
        if k not in fp8_keys:
            assert t.dtype != torch.float8_e4m3fn and scale_key not in state, k
            continue
        w, s = originals[k].float(), state[scale_key]
        assert t.dtype == torch.float8_e4m3fn and t.shape == w.shape, k
        # the scale: the block's amax / 448 (rounded up to a power of two with pow2), exactly
        want = _block_amax(w) / torch.full_like(s, 448.0)
        if pow2:
            want = torch.exp2(torch.ceil(torch.log2(want)))
        assert s.dtype == torch.float32 and torch.equal(s, want), k
        # the values: w to e4m3's precision (3 mantissa bits; subnormal steps of 2^-9 scales)
        full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        err = (t.float() * full - w).abs()
        assert bool((err <= w.abs() * 2.0 ** -4 * (1 + 1e-6) + full * 2.0 ** -10).all()), k
    assert state["model.layers.3.eh_proj.weight"].dtype == torch.bfloat16
    assert state["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16


def test_fp8_export_loads_back_here_and_in_transformers(tmp_path):
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    from safetensors import safe_open
    model = _tiny(4, **TINY[1])
    export_hf(model, tmp_path, dtype=torch.float32, fp8=True)
    back = load_hf(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.o_proj.weight")
        s = f.get_tensor("model.layers.0.self_attn.o_proj.weight_scale_inv")
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: q.shape[0], : q.shape[1]]
    assert torch.equal(back.layers[0].attn.wo.weight, q.float() * full)
    tokens = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        ours, original = back(tokens), model(tokens)
        # FP8 weights move the logits by about e4m3's resolution, not more
        assert ((ours - original).norm() / original.norm()).item() < 0.03
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
            tmp_path, dtype=torch.float32,
            quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
        torch.testing.assert_close(ours, hf.eval()(tokens).logits, atol=2e-4, rtol=1e-3)


def test_fp8_export_refuses_what_it_cannot_write(tmp_path):
    model = _tiny()
    with pytest.raises(ValueError, match="fp8=True"):
        export_hf(model, tmp_path / "a", pow2_scales=True)
    with torch.no_grad():
        model.layers[1].ffn.shared.w2.weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.shared_experts\.down_proj.*NaN"):
        export_hf(model, tmp_path / "b", fp8=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_trainer_export_takes_pow2_scales_only_with_fp8(tmp_path):
    from trainer.checkpoint import export_hf as trainer_export
    trainer_export(_tiny(), tmp_path / "fp8", fp8=True, pow2_scales=True)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["scale_fmt"] == "ue8m0"
    trainer_export(_tiny(), tmp_path / "bf16", pow2_scales=True)  # fp8.pow2_scales, bf16 export
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
