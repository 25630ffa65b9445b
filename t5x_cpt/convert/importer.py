"""Import a source LLM (Hugging Face directory or GGUF file) and the `load_pretrained` Python API.

    python -m t5x_cpt.convert import --source=PATH --out=DIR [--tokenizer=DIR] [--dtype=bfloat16]

The architecture is read from the source's config (config.json, or the GGUF metadata turned into
the same fields) by its architecture module; weights are streamed one tensor at a time into an
unscanned params tree (peak memory: about one copy of the model) and checked strictly against the
config before any is read. The output is written to a temporary directory next to DIR and renamed
only when complete.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import jax.numpy as jnp

from t5x_cpt import checkpoints, param_paths
from t5x_cpt.convert import architectures, checkpoint_dir, common, hf_files, hf_layout
from t5x_cpt.convert.common import ConversionError
from t5x_cpt.convert.gguf import GGUFFile
from t5x_cpt.convert.gguf_tokenizer import write_gguf_tokenizer
from t5x_cpt.model import Decoder, ModelConfig, abstract_params, convert_layer_layout

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def source_kind(path: str) -> str:
    """'hf' (a directory with config.json), 'gguf' (a GGUF file) or 'imported' (a t5x_cpt checkpoint)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"source {path} does not exist")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return "gguf"
        raise ConversionError(f"{path} is a file but not a GGUF (no GGUF magic); a Hugging Face source is a directory")
    if any(os.path.isfile(os.path.join(path, name)) for name in (common.HF_CONFIG_FILE, checkpoints.MODEL_CONFIG_FILE)):
        return "imported"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    ggufs = [n for n in os.listdir(path) if n.endswith(".gguf")]
    hint = f"; it holds {ggufs}: pass the .gguf file itself" if ggufs else ""
    raise ConversionError(f"{path} is neither a Hugging Face model directory (no config.json) nor a t5x_cpt "
                          f"checkpoint (no model_config.json){hint}")


class Source:
    """A source checkpoint opened for conversion: its config, its tensors and how to get its tokenizer."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.kind = source_kind(self.path)
        self.gguf = None
        if self.kind == "imported":
            raise ConversionError(f"{self.path} is already a t5x_cpt checkpoint; load it with load_pretrained")
        if self.kind == "hf":
            self.hf_config = common.read_json(os.path.join(self.path, "config.json"))
            where = os.path.join(self.path, "config.json")
        else:
            self.gguf = GGUFFile(self.path)
            self.hf_config = self.gguf.hf_config()
            where = self.path
        self.architecture, self.config, self.notes = architectures.model_config_from_hf(self.hf_config, where)
        window = self.notes.get("sliding_window")
        if window is not None and window < int(self.hf_config.get("max_position_embeddings") or 0):
            log.warning("%s: sliding_window=%d; the imported model attends to the whole sequence, which matches "
                        "the source exactly for sequences of at most %d tokens", self.path, window, window)

    def tensors(self) -> hf_files.TensorSource:
        if self.gguf is not None:
            return self.gguf.tensor_source(self.config.num_heads, self.config.resolved_num_kv_heads)
        return hf_files.open_hf_dir(self.path)

    def read_params(self, dtype=None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(unscanned params tree of numpy arrays, facts about what was read)."""
        source = self.tensors()
        try:
            params, facts = hf_layout.read_params(source, self.config, dtype, where=self.path)
        finally:
            source.close()
        return params, {**source.description, **facts}

    def write_tokenizer(self, directory: str, tokenizer: str | None) -> dict[str, Any]:
        """Puts the tokenizer into `directory` and checks it against the vocabulary size."""
        if tokenizer is not None:
            return {"tokenizer_from": os.path.abspath(tokenizer),
                    **common.copy_tokenizer(checkpoint_dir.tokenizer_dir(tokenizer), directory, self.config.vocab_size)}
        if self.gguf is None:
            return {"tokenizer_from": self.path, **common.copy_tokenizer(self.path, directory, self.config.vocab_size)}
        facts = write_gguf_tokenizer(self.gguf.tokenizer_metadata(), directory,
                                     model_max_length=self.hf_config["max_position_embeddings"])
        size = common.tokenizer_size(directory)
        if size > self.config.vocab_size:
            raise ConversionError(f"vocab size mismatch: the GGUF tokenizer has {size} tokens but the embedding has "
                                  f"{self.config.vocab_size} rows")
        return {"tokenizer_from": self.path, "tokenizer_size": size, **facts,
                "tokenizer_files": ["tokenizer.json", "tokenizer_config.json"]}


def import_checkpoint(source: str, out: str, tokenizer: str | None = None, dtype: str | None = None,
                      overwrite: bool = False) -> str:
    """Converts `source` (HF dir or .gguf) into a t5x_cpt imported DIR at `out`; returns its path.

    `dtype` ('float32' | 'bfloat16' | 'float16') casts the stored weights; None keeps the source's
    (GGUF weights are dequantized to float32). `tokenizer` names a directory (or file within one)
    to take tokenizer files from instead of the source.
    """
    src = Source(source)
    with common.atomic_output_dir(out, overwrite) as tmp:
        tokenizer_facts = src.write_tokenizer(tmp, tokenizer)  # cheap checks before the weights
        params, facts = src.read_params(common.as_dtype(dtype))
        info = {
            "source": src.path,
            "source_format": facts.pop("format"),
            "architecture": src.architecture.MODEL_TYPE,
            "source_architectures": src.hf_config.get("architectures"),
            "stored_dtype": dtype or "/".join(facts.get("stored_dtypes", [])),
            "read": facts,
            "notes": src.notes,
            "tokenizer": tokenizer_facts,
            "model_config": src.config.to_dict(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "created_by": "python -m t5x_cpt.convert import",
        }
        if src.gguf is not None:
            info["gguf_name"] = src.gguf.value("general.name", None)
        header = f"{src.architecture.MODEL_TYPE} model imported from {src.path}\nby python -m t5x_cpt.convert import"
        common.write_imported_dir(tmp, src.config, params, src.hf_config, info, header)
        del params
    log.info("imported %s (%s) into %s", src.path, src.architecture.MODEL_TYPE, out)
    return os.path.abspath(out)


def load_pretrained(path: str, step: int | None = None, param_dtype: str | None = None, **config_overrides):
    """(Decoder, params) for a Hugging Face dir, a .gguf, an imported DIR or a training MODEL_DIR.

    `model.apply({"params": params}, token_ids)` returns float32 logits [batch, length, vocab];
    positions and segment_ids are optional keywords (defaults: 0..length-1, one document).
    HF and GGUF sources are converted in memory (nothing is written). `step` picks a MODEL_DIR step
    (default: latest). `param_dtype` defaults to the checkpoint's model_config.json (float32 for a
    conversion); `config_overrides` replace ModelConfig fields that do not change the weights'
    shapes (dtype, scan_layers, remat, attention_impl).
    """
    bad = sorted(set(config_overrides) & set(ModelConfig.ARCHITECTURE_FIELDS))
    if bad:
        raise ConversionError(f"load_pretrained cannot override architecture fields {bad}")
    if param_dtype:
        config_overrides["param_dtype"] = param_dtype
    path = os.path.abspath(path)
    if source_kind(path) == "imported":
        config = checkpoint_dir.read_checkpoint_config(path).replace(**config_overrides)
        model = Decoder(config)
        return model, checkpoints.load_params(path, abstract_params(model), step=step)
    src = Source(path)
    config = src.config.replace(**config_overrides)
    params, _ = src.read_params(common.as_dtype(config.param_dtype))
    params = param_paths.flatten(convert_layer_layout(params, config))
    for key in list(params):  # one tensor at a time, so host copies are freed as device copies appear
        params[key] = jnp.asarray(params.pop(key))
    return Decoder(config), param_paths.unflatten(params)
