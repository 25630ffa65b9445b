"""Mistral architecture (Mistral 7B v0.1-v0.3, Mistral NeMo, ...): `model_type: mistral`, MistralForCausalLM.

Same tensors as Llama, no biases. Mistral's `sliding_window` limits attention to the last W
tokens; the t5x_cpt model attends to the whole (packed) sequence, so the two agree exactly for
sequences of at most W tokens. The window is kept in hf_config.json and written back on export,
and import_info.json records it; the importer warns when it is shorter than the source's maximum
position count.
"""

from __future__ import annotations

from typing import Any, Mapping

from t5x_cpt.convert import hf_config

MODEL_TYPES = ("mistral",)
HF_CLASS = "MistralForCausalLM"  # the `architectures` entry of config.json
MODEL_TYPE = "mistral"

# transformers.MistralConfig defaults (note the 8 KV heads and the 4096-token window).
DEFAULTS = {
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "num_key_value_heads": 8, "sliding_window": 4096, "max_position_embeddings": 4096 * 32,
}


def config_from_hf(hf: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ModelConfig fields, notes for import_info) from a Mistral config.json."""
    fields = hf_config.common_fields(hf, DEFAULTS, MODEL_TYPE)
    fields["qkv_bias"] = False
    window = hf["sliding_window"] if "sliding_window" in hf else DEFAULTS["sliding_window"]
    notes = {}
    if window is not None:
        notes["sliding_window"] = int(window)
        notes["exact_up_to_length"] = int(window)
    return fields, notes


def config_to_hf(config, base: Mapping[str, Any] | None) -> dict[str, Any]:
    """A MistralForCausalLM config.json; `sliding_window` comes from `base` (None if unknown)."""
    out = hf_config.common_to_hf(config, base)
    out.setdefault("sliding_window", None)
    out.update(architectures=[HF_CLASS], model_type=MODEL_TYPE)
    return out
