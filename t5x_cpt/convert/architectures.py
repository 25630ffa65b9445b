"""The registry of supported architecture families, keyed by Hugging Face `model_type`."""

from __future__ import annotations

from types import ModuleType
from typing import Any, Mapping

from t5x_cpt.convert import llama, mistral, qwen2
from t5x_cpt.convert.common import ConversionError

FAMILIES: dict[str, ModuleType] = {t: m for m in (llama, mistral, qwen2) for t in m.MODEL_TYPES}


def family_for(hf: Mapping[str, Any], where: str = "config.json") -> ModuleType:
    """The family module for a config.json, or a ConversionError listing what is supported."""
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    archs = hf.get("architectures")
    raise ConversionError(
        f"unsupported architecture in {where}: model_type={model_type!r} architectures={archs!r}; "
        f"supported model types: {', '.join(sorted(FAMILIES))}")


def family_by_name(name: str) -> ModuleType:
    """The family module for a model type named on the command line (export --architecture)."""
    if name not in FAMILIES:
        raise ConversionError(f"unknown architecture {name!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def model_config_from_hf(hf: Mapping[str, Any], where: str = "config.json"):
    """(family module, ModelConfig, notes) for a Hugging Face config dict; every field read, none assumed."""
    from t5x_cpt.model import ModelConfig

    family = family_for(hf, where)
    fields, notes = family.config_from_hf(hf)
    try:
        config = ModelConfig(**fields, dtype="float32", param_dtype="float32")
    except ValueError as e:
        raise ConversionError(f"{where}: {e}") from e
    return family, config, notes
