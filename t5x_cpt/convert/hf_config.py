"""Reading and writing Hugging Face `config.json` fields shared by the LLaMA-like architectures.

Each architecture module (llama, mistral, qwen2) passes its own table of defaults: a field absent from
config.json takes the default of the matching transformers config class, exactly as
`from_pretrained` would, and the fields no sensible default exists for are required. Nothing is
guessed from tensor shapes.

Rotary scaling comes in two spellings: transformers >= 5 writes `rope_parameters`
({"rope_type", "rope_theta", "factor", ...}); older files have top-level `rope_theta` and a
`rope_scaling` dict keyed "type" or "rope_type". Both are read. Export writes the older spelling,
which every transformers version reads (v5 converts it on load).
"""

from __future__ import annotations

from typing import Any, Mapping

from t5x_cpt.convert.common import ConversionError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED = object()


def get_field(hf: Mapping[str, Any], name: str, defaults: Mapping[str, Any], architecture: str):
    """hf[name], else the architecture's default, else a ConversionError naming the missing field."""
    if name in hf and hf[name] is not None:
        return hf[name]
    default = defaults.get(name, REQUIRED)
    if default is REQUIRED:
        raise ConversionError(f"{architecture} config.json has no {name!r}; it cannot be inferred")
    return default


def rope_from_hf(hf: Mapping[str, Any], default_theta: float, architecture: str) -> dict[str, Any]:
    """ModelConfig rope fields from either spelling; unsupported scaling types raise."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params and "rope_type" not in params:
        raise ConversionError(f"{architecture}: per-layer-type rope_parameters are not supported")
    if not isinstance(params, Mapping) or not params:
        params = dict(hf.get("rope_scaling") or {})
    else:
        params = dict(params)
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConversionError(
            f"{architecture}: rope scaling type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"{architecture}: partial_rotary_factor={partial} is not supported "
                              "(rotary on all dims only)")
    fields: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": "none"}
    if rope_type == "linear":
        fields.update(rope_scaling="linear", rope_scaling_factor=float(_need(params, "factor", architecture)))
    elif rope_type == "llama3":
        fields.update(
            rope_scaling="llama3",
            rope_scaling_factor=float(_need(params, "factor", architecture)),
            rope_low_freq_factor=float(_need(params, "low_freq_factor", architecture)),
            rope_high_freq_factor=float(_need(params, "high_freq_factor", architecture)),
            rope_original_max_position=int(_need(params, "original_max_position_embeddings", architecture)),
        )
    return fields


def _need(params: Mapping[str, Any], key: str, architecture: str):
    if params.get(key) is None:
        raise ConversionError(f"{architecture}: rope scaling is missing {key!r}")
    return params[key]


def rope_to_hf(config) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` (legacy spelling, read by every transformers version)."""
    out: dict[str, Any] = {"rope_theta": float(config.rope_theta), "rope_scaling": None}
    if config.rope_scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "type": "linear", "factor": float(config.rope_scaling_factor)}
    elif config.rope_scaling == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3", "factor": float(config.rope_scaling_factor),
            "low_freq_factor": float(config.rope_low_freq_factor),
            "high_freq_factor": float(config.rope_high_freq_factor),
            "original_max_position_embeddings": int(config.rope_original_max_position),
        }
    return out


def common_fields(hf: Mapping[str, Any], defaults: Mapping[str, Any], architecture: str) -> dict[str, Any]:
    """The ModelConfig fields every LLaMA-like config.json spells the same way."""
    act = get_field(hf, "hidden_act", defaults, architecture)
    if act not in ("silu", "swish"):
        raise ConversionError(f"{architecture}: hidden_act={act!r} is not supported (SwiGLU with silu only)")
    d_model = int(get_field(hf, "hidden_size", defaults, architecture))
    heads = int(get_field(hf, "num_attention_heads", defaults, architecture))
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads is None:
        kv_heads = defaults.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or d_model // heads
    if hf.get("head_dim") is None and d_model % heads:
        raise ConversionError(f"{architecture}: hidden_size={d_model} not divisible by num_attention_heads={heads}")
    fields = {
        "vocab_size": int(get_field(hf, "vocab_size", defaults, architecture)),
        "d_model": d_model,
        "num_layers": int(get_field(hf, "num_hidden_layers", defaults, architecture)),
        "num_heads": heads,
        "num_kv_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "d_ff": int(get_field(hf, "intermediate_size", defaults, architecture)),
        "rms_norm_eps": float(get_field(hf, "rms_norm_eps", defaults, architecture)),
        "tie_embeddings": bool(get_field(hf, "tie_word_embeddings", defaults, architecture)),
    }
    fields.update(rope_from_hf(hf, float(defaults.get("rope_theta", 10000.0)), architecture))
    return fields


def common_to_hf(config, base: Mapping[str, Any] | None) -> dict[str, Any]:
    """config.json fields from a ModelConfig, over `base` (the source's config.json, if known).

    `base` keeps what ModelConfig does not model (token ids, max positions, sliding window); every
    architecture field is overwritten from `config`, which is authoritative after training or a
    vocabulary extension. New-style `rope_parameters` in `base` are dropped for the legacy spelling.
    """
    out = {k: v for k, v in (base or {}).items()
           if k not in ("rope_parameters", "rope_scaling", "rope_theta", "transformers_version", "torch_dtype",
                        "dtype", "_name_or_path", "architectures", "model_type", "layer_types", "auto_map")}
    out.update({
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.resolved_num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "intermediate_size": config.resolved_d_ff,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
    })
    out.update(rope_to_hf(config))
    # Unknown without a base config (it does not change the weights' function); llama3 scaling
    # says which context it was stretched to.
    default_positions = 2048
    if config.rope_scaling == "llama3":
        default_positions = int(config.rope_original_max_position * config.rope_scaling_factor)
    out.setdefault("max_position_embeddings", default_positions)
    return out
