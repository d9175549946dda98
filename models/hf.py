"""Import and export of the Hugging Face DeepSeek-V3 checkpoint layout.

A checkpoint directory holds `config.json` and one or more `*.safetensors` files whose keys are
those of the official release: `model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_a_proj.weight`,
..., `model.layers.{i}.mlp.experts.{e}.gate_proj.weight`, `model.layers.{i}.mlp.gate.e_score_correction_bias`,
`model.norm.weight`, `lm_head.weight`. The MTP modules are stored as extra decoder layers after
the main ones (`model.layers.{L+k}`) carrying `enorm`, `hnorm`, `eh_proj`, a full block, and a
`shared_head` (its final norm, plus copies of the shared embedding and head).

The module names here differ from Hugging Face's only by a fixed renaming (`_BLOCK_RENAMES`), and
the rotary dims are laid out in interleaved pairs on both sides (`rope_interleave`), so weights
map one to one; routed experts are stacked [E, ...] here and split per expert there. Checkpoints
stored in FP8 with 128x128 `weight_scale_inv` blocks (the official release) are dequantized on load.

`export_hf(..., fp8=True)` writes that FP8 layout itself, as DeepSeek-V3's release stores it and
vLLM / SGLang / transformers read it: the attention projections and every MLP and expert weight
of the decoder layers (the main ones and the MTP layers' blocks) as `float8_e4m3fn` with one fp32
`weight_scale_inv` per 128x128 block (a partial block scaled by the elements it has), and
`quantization_config` in config.json. The router, norms, embedding, output heads and the MTP
layers' `eh_proj` stay in `dtype`, as in the release. The blocks are models.fp8.reference's
quantize_128x128 of each parameter, which is what FP8 training's forward multiplies with (with
`pow2_scales`, as under `fp8.pow2_scales=true`: scales rounded up to powers of two, written as
`"scale_fmt": "ue8m0"` like DeepSeek-V3.1's release). Half the bytes of a bf16 export for those
weights; loading it back (here or in transformers) gives the dequantized weights.

    export_hf(model, "out/hf")                   # config.json + model*.safetensors
    export_hf(model, "out/hf8", fp8=True)        # the same with FP8 weight blocks
    model = load_hf("out/hf")                    # a Transformer with those weights
    cfg = config_from_hf(json.load(open(...)))   # the ModelConfig a config.json describes
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import ModelConfig
from models.fp8.reference import BLOCK, dequantize_128x128, quantize_128x128
from models.transformer import Transformer, build_model

_BLOCK_RENAMES = [  # ours (inside a block) -> Hugging Face (inside model.layers.{i})
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn.wq.weight", "self_attn.q_proj.weight"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"),
    ("attn.q_norm.weight", "self_attn.q_a_layernorm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"),
    ("attn.wkv_a.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attn.wkv_b.weight", "self_attn.kv_b_proj.weight"),
    ("attn.wo.weight", "self_attn.o_proj.weight"),
    ("ffn.router.weight", "mlp.gate.weight"),
    ("ffn.router.expert_bias", "mlp.gate.e_score_correction_bias"),
]
_MLP_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MTP_RENAMES = [("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"),
                ("eh_proj.weight", "eh_proj.weight"), ("norm.weight", "shared_head.norm.weight")]
_TOP_RENAMES = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
                ("head.weight", "lm_head.weight")]


# -- config.json ---------------------------------------------------------------------------------

def config_to_hf(cfg: ModelConfig) -> dict:
    rope_scaling = None
    if cfg.rope_scaling_factor > 1.0:
        rope_scaling = dict(type="yarn", factor=cfg.rope_scaling_factor,
                            original_max_position_embeddings=cfg.original_max_position_embeddings,
                            beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow, mscale=cfg.mscale,
                            mscale_all_dim=cfg.mscale_all_dim)
    return dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_nextn_predict_layers=cfg.num_mtp_modules,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank or None, qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, topk_method="noaux_tc",
        n_group=cfg.n_group, topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense, norm_topk_prob=True, scoring_func="sigmoid",
        hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling=rope_scaling,
        rope_interleave=True, attention_bias=False, tie_word_embeddings=False,
        initializer_range=cfg.init_std,
        fp8_moe=dict(balance_loss_alpha=cfg.balance_loss_alpha,
                     mtp_loss_weight=cfg.mtp_loss_weight),
    )


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig of a DeepSeek-V3 `config.json` (legacy `rope_scaling` or v5 `rope_parameters`)."""
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"config.json has scoring_func={hf['scoring_func']!r}; only DeepSeek-V3's "
                         "sigmoid router is implemented here")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    yarn = rope_type == "yarn"
    extra = hf.get("fp8_moe", {})
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        first_k_dense=hf.get("first_k_dense_replace", 0),
        intermediate_size=hf["intermediate_size"], num_attention_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"], n_routed_experts=hf.get("n_routed_experts") or 0,
        n_shared_experts=hf.get("n_shared_experts") or 0,
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"], n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
        num_mtp_modules=hf.get("num_nextn_predict_layers", 0),
        max_position_embeddings=hf["max_position_embeddings"],
        rope_theta=hf.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_scaling_factor=rope.get("factor", 1.0) if yarn else 1.0,
        original_max_position_embeddings=rope.get("original_max_position_embeddings", 4096),
        beta_fast=rope.get("beta_fast", 32.0), beta_slow=rope.get("beta_slow", 1.0),
        mscale=rope.get("mscale", 1.0), mscale_all_dim=rope.get("mscale_all_dim", 1.0),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), init_std=hf.get("initializer_range", 0.006),
        **extra,
    )


# -- key mapping ---------------------------------------------------------------------------------

def to_hf_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Our parameters and router biases under the Hugging Face names (experts split)."""
    ours = dict(model.named_parameters())
    ours.update((n, b) for n, b in model.named_buffers() if n.endswith("expert_bias"))
    n_main = len(model.layers)
    out = {}
    for name, tensor in ours.items():
        for hf_name, t in _hf_names(name, tensor.detach(), n_main):
            out[hf_name] = t
    return out


def _shared_copies(model: Transformer) -> dict[str, torch.Tensor]:
    """The release stores copies of the shared embedding and head inside each MTP layer."""
    out = {}
    for k in range(len(model.mtp)):
        prefix = f"model.layers.{len(model.layers) + k}"
        out[f"{prefix}.embed_tokens.weight"] = model.embed.weight.detach().clone()
        out[f"{prefix}.shared_head.head.weight"] = model.head.weight.detach().clone()
    return out


_SHARED_COPY = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight")


def _hf_names(name: str, tensor: torch.Tensor, n_main: int):
    for ours, hf in _TOP_RENAMES:
        if name == ours:
            return [(hf, tensor)]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        return _block_names(f"model.layers.{m[1]}", m[2], tensor)
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    if m:
        prefix, rest = f"model.layers.{n_main + int(m[1])}", m[2]
        for ours, hf in _MTP_RENAMES:
            if rest == ours:
                return [(f"{prefix}.{hf}", tensor)]
        if rest.startswith("block."):
            return _block_names(prefix, rest[len("block."):], tensor)
    raise KeyError(f"no Hugging Face name for parameter {name!r}")


def _block_names(prefix: str, rest: str, tensor: torch.Tensor):
    for ours, hf in _BLOCK_RENAMES:
        if rest == ours:
            return [(f"{prefix}.{hf}", tensor)]
    m = re.fullmatch(r"ffn\.(shared\.)?(w[123])\.weight", rest)
    if m:
        mlp = "mlp.shared_experts" if m[1] else "mlp"
        return [(f"{prefix}.{mlp}.{_MLP_NAMES[m[2]]}.weight", tensor)]
    m = re.fullmatch(r"ffn\.experts\.(w[123])", rest)
    if m:
        return [(f"{prefix}.mlp.experts.{e}.{_MLP_NAMES[m[1]]}.weight", w)
                for e, w in enumerate(tensor)]
    raise KeyError(f"no Hugging Face name for block parameter {rest!r}")


# -- export --------------------------------------------------------------------------------------

def export_hf(model: Transformer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
              max_shard_bytes: int = 4 << 30, fp8: bool = False,
              pow2_scales: bool = False) -> Path:
    """Write config.json and the weights (sharded with an index past max_shard_bytes); fp8: the
    release's FP8 weight blocks for the weights `FP8_WEIGHTS` names (module docstring)."""
    if pow2_scales and not fp8:
        raise ValueError("pow2_scales applies to FP8 exports only; pass fp8=True with it")
    state = dict(_exported({**to_hf_state(model), **_shared_copies(model)}, dtype, fp8,
                           pow2_scales))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _shard(state, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    hf_cfg = config_to_hf(model.cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    if fp8:
        hf_cfg["quantization_config"] = fp8_quantization_config(pow2_scales)
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return out_dir


def _export_dtype(key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.float() if key.endswith("e_score_correction_bias") else t.to(dtype)


FP8_WEIGHTS = re.compile(
    r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj"
    r"|o_proj)|mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj)\.weight")
"""The weights DeepSeek-V3's release stores as FP8 128x128 blocks: the decoder layers' attention
projections and MLP / shared / routed expert weights (not the router `mlp.gate`, the norms, the
embedding and heads, nor the MTP layers' `eh_proj`)."""


def fp8_quantization_config(pow2_scales: bool) -> dict:
    """config.json's `quantization_config` of an FP8 export (the release's, DeepSeek-V3.1's
    `scale_fmt` with power-of-two scales)."""
    config = dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                  weight_block_size=[BLOCK, BLOCK])
    return config | {"scale_fmt": "ue8m0"} if pow2_scales else config


def _exported(state: dict, dtype: torch.dtype, fp8: bool, pow2_scales: bool):
    """(name, CPU tensor) pairs to write, one tensor converted at a time (no second copy of the
    model on its device): each in `dtype`, or with fp8 each FP8_WEIGHTS tensor as e4m3 blocks
    and its `weight_scale_inv`, quantized from the parameter itself (not from a `dtype` copy)."""
    for k, t in state.items():
        if not (fp8 and FP8_WEIGHTS.fullmatch(k)):
            yield k, _export_dtype(k, t, dtype).contiguous().cpu()
            continue
        try:
            q, s = quantize_128x128(t, pow2_scales)
        except ValueError as e:
            raise ValueError(f"cannot export {k} in FP8: {e}") from e
        yield k, q.cpu()
        yield k.removesuffix(".weight") + ".weight_scale_inv", s.cpu()


def _shard(state: dict, max_bytes: int) -> list[dict]:
    shards, size = [{}], 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    return shards


# -- import --------------------------------------------------------------------------------------

def load_hf(path: str | Path, cfg: ModelConfig | None = None, device=None) -> Transformer:
    """Build a model from a Hugging Face DeepSeek-V3 directory; shapes and keys must match."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; point at a Hugging Face checkpoint "
                                "directory (config.json + *.safetensors)")
    cfg = cfg or config_from_hf(json.loads((path / "config.json").read_text()))
    model = build_model(cfg, device=device)
    load_hf_weights(model, path)
    return model


def load_hf_weights(model: Transformer, path: str | Path) -> None:
    """Copy a checkpoint's tensors into `model`, after checking every key and shape."""
    expected = to_hf_state(model)
    found = {k: v for k, v in _read_safetensors(Path(path)).items()
             if not _SHARED_COPY.fullmatch(k)}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in set(found) & set(expected) if found[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(_mismatch_message(path, missing, unexpected, wrong)
                         + _config_differences(Path(path), model.cfg))
    with torch.no_grad():
        for k, target in expected.items():
            target.copy_(found[k].to(target.dtype))


def _mismatch_message(path, missing, unexpected, wrong) -> str:
    def head(items):
        return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
    parts = [f"checkpoint {path} does not match the model configuration:"]
    if missing:
        parts.append(f"  {len(missing)} missing: {head(missing)}")
    if unexpected:
        parts.append(f"  {len(unexpected)} unexpected: {head(unexpected)}")
    if wrong:
        parts.append(f"  {len(wrong)} with other shapes: {head(wrong)}")
    parts.append("Build the model from this checkpoint's config.json (load_hf without cfg) or "
                 "export again from a model of this configuration.")
    return "\n".join(parts)


def _config_differences(path: Path, cfg: ModelConfig) -> str:
    if not (path / "config.json").exists():
        return ""
    theirs = config_from_hf(json.loads((path / "config.json").read_text()))
    diffs = [f"{f.name}: checkpoint {getattr(theirs, f.name)} vs model {getattr(cfg, f.name)}"
             for f in dataclasses.fields(cfg) if getattr(theirs, f.name) != getattr(cfg, f.name)]
    return "\nConfiguration fields that differ: " + "; ".join(diffs) if diffs else ""


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for k in handle.keys():
                    tensors[k] = handle.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ValueError(f"cannot read {f}: {e}. The file is damaged or not safetensors; "
                             "export or download it again") from e
    return _dequantize_fp8(tensors)


def _dequantize_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold 128x128 `weight_scale_inv` blocks of FP8 weights back into full-precision weights."""
    out = {}
    for k, t in tensors.items():
        if k.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(k.removesuffix(".weight") + ".weight_scale_inv")
        if scale is not None and t.dtype == torch.float8_e4m3fn:
            try:
                t = dequantize_128x128(t, scale.float())
            except ValueError as e:
                raise ValueError(f"{k}: {e}; the checkpoint's scales do not fit its weight") from e
        out[k] = t
    return out
