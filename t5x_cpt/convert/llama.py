"""Llama architecture (Llama 1/2/3/3.x, SmolLM, TinyLlama, ...): `model_type: llama`, LlamaForCausalLM.

Rotary scaling 'default', 'linear' and 'llama3' are supported; any other (dynamic, yarn, longrope)
is refused rather than approximated. `attention_bias` (which in Llama also puts a bias on o_proj)
and `mlp_bias` have no counterpart in the t5x_cpt model and are refused.
"""

from __future__ import annotations

from typing import Any, Mapping

from t5x_cpt.convert import hf_config
from t5x_cpt.convert.common import ConversionError

MODEL_TYPES = ("llama",)
HF_CLASS = "LlamaForCausalLM"  # the `architectures` entry of config.json
MODEL_TYPE = "llama"

# transformers.LlamaConfig defaults for fields a config.json may leave out.
DEFAULTS = {
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "num_key_value_heads": None,
}


def config_from_hf(hf: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ModelConfig fields, notes for import_info) from a Llama config.json."""
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ConversionError(f"{MODEL_TYPE}: {flag}=true is not supported (the t5x_cpt model has no such biases)")
    fields = hf_config.common_fields(hf, DEFAULTS, MODEL_TYPE)
    fields["qkv_bias"] = False
    return fields, {}


def config_to_hf(config, base: Mapping[str, Any] | None) -> dict[str, Any]:
    """A LlamaForCausalLM config.json for `config`."""
    if config.qkv_bias:
        raise ConversionError("llama has no QKV-only bias; export a qkv_bias model as qwen2")
    out = hf_config.common_to_hf(config, base)
    out.update(architectures=[HF_CLASS], model_type=MODEL_TYPE, attention_bias=False, mlp_bias=False)
    out.pop("pretraining_tp", None)
    return out
