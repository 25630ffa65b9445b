"""Qwen2 architecture (Qwen1.5, Qwen2, Qwen2.5): `model_type: qwen2`, Qwen2ForCausalLM.

Qwen2 puts a bias on the Q, K and V projections (not on the output projection): `qkv_bias=True`.
Its head size is hidden_size / num_attention_heads unless config.json says `head_dim`.
`use_sliding_window: true` (unused by released checkpoints) has no counterpart and is refused.
Note the different default of num_key_value_heads (32) in transformers.Qwen2Config.
"""

from __future__ import annotations

from typing import Any, Mapping

from t5x_cpt.convert import hf_config
from t5x_cpt.convert.common import ConversionError

MODEL_TYPES = ("qwen2",)
HF_CLASS = "Qwen2ForCausalLM"  # the `architectures` entry of config.json
MODEL_TYPE = "qwen2"

# transformers.Qwen2Config defaults.
DEFAULTS = {
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "num_key_value_heads": 32,
}


def config_from_hf(hf: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ModelConfig fields, notes for import_info) from a Qwen2 config.json."""
    if hf.get("use_sliding_window"):
        raise ConversionError("qwen2: use_sliding_window=true is not supported (full attention only)")
    fields = hf_config.common_fields(hf, DEFAULTS, MODEL_TYPE)
    fields["qkv_bias"] = True
    return fields, {}


def config_to_hf(config, base: Mapping[str, Any] | None) -> dict[str, Any]:
    """A Qwen2ForCausalLM config.json for `config` (which must have QKV bias)."""
    if not config.qkv_bias:
        raise ConversionError("qwen2 always has QKV bias; export a model without it as llama")
    out = hf_config.common_to_hf(config, base)
    if config.resolved_head_dim == config.d_model // config.num_heads:
        out.pop("head_dim", None)  # Qwen2Config has no such field; only write it when it matters
    out.update(architectures=[HF_CLASS], model_type=MODEL_TYPE, use_sliding_window=False)
    out.setdefault("max_window_layers", config.num_layers)
    return out
