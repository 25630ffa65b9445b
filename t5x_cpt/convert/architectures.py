"""The registry of supported architectures, keyed by Hugging Face `model_type`.

Each architecture is a module (llama, mistral, qwen2) with MODEL_TYPES, MODEL_TYPE, HF_CLASS,
DEFAULTS, `config_from_hf` and `config_to_hf`.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping

from t5x_cpt.convert import llama, mistral, qwen2
from t5x_cpt.convert.common import ConversionError
from t5x_cpt.model import ModelConfig, ModelConfigError

ARCHITECTURES: dict[str, ModuleType] = {t: m for m in (llama, mistral, qwen2) for t in m.MODEL_TYPES}


def architecture_for(hf: Mapping[str, Any], where: str = "config.json") -> ModuleType:
    """The architecture module for a config.json, or a ConversionError listing what is supported."""
    model_type = hf.get("model_type")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    archs = hf.get("architectures")
    raise ConversionError(
        f"unsupported architecture in {where}: model_type={model_type!r} architectures={archs!r}; "
        f"supported model types: {', '.join(sorted(ARCHITECTURES))}")


def architecture_by_name(name: str) -> ModuleType:
    """The architecture module for a model type named on the command line (export --architecture)."""
    if name not in ARCHITECTURES:
        raise ConversionError(f"unknown architecture {name!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]


def model_config_from_hf(hf: Mapping[str, Any], where: str = "config.json"):
    """(architecture module, ModelConfig, notes) for a Hugging Face config dict; every field read, none assumed."""
    architecture = architecture_for(hf, where)
    fields, notes = architecture.config_from_hf(hf)
    try:
        config = ModelConfig(**fields, dtype="float32", param_dtype="float32")
    except ModelConfigError as e:
        raise ConversionError(f"{where}: {e}") from e
    return architecture, config, notes
