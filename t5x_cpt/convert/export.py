"""Export a t5x_cpt checkpoint to a Hugging Face directory that transformers loads.

    python -m t5x_cpt.convert export --checkpoint=DIR_OR_MODEL_DIR [--step=N] --out=HF_DIR \
        [--tokenizer=DIR] [--architecture=llama|mistral|qwen2] [--dtype=float32|bfloat16|float16]

The checkpoint is an imported DIR or a training MODEL_DIR (latest step unless --step). Its
model_config.json is the authority on the architecture. What ModelConfig does not model (token ids,
max positions, Mistral's sliding window) and the tokenizer come from the *origin*: the imported
DIR itself, or for a MODEL_DIR the `source_checkpoint` in its run_info.json, followed through
chains of CPT runs (t5x_cpt/convert/checkpoint_dir.py). `--tokenizer` overrides the tokenizer.
Parameters are read in the checkpoint's param_dtype and cast tensor by tensor to `--dtype`. Weights
are written as safetensors shards with an index when larger than --max_shard_gb; the directory
appears only when complete.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from t5x_cpt.convert import architectures, checkpoint_dir, common, hf_layout
from t5x_cpt.convert.common import ConversionError

log = logging.getLogger(__name__)


def export_checkpoint(checkpoint: str, out: str, step: int | None = None, tokenizer: str | None = None,
                      architecture: str | None = None, dtype: str = "float32", overwrite: bool = False,
                      max_shard_gb: float = 5.0) -> str:
    """Writes `checkpoint` as a Hugging Face model directory at `out`; returns its path."""
    opened = checkpoint_dir.open_checkpoint(checkpoint, tokenizer)
    if opened.tokenizer_dir is None:
        raise ConversionError(f"cannot find the tokenizer of {opened.path}: it is not an imported DIR and its "
                              "run_info.json names no source_checkpoint; pass --tokenizer=DIR")
    config = opened.config
    base = opened.hf_config()
    chosen = _choose_architecture(architecture, base, config)
    hf = chosen.config_to_hf(config, base)
    out_dtype = common.as_dtype(dtype)
    hf["torch_dtype"] = dtype

    params = opened.read_params(step)
    with common.atomic_output_dir(out, overwrite) as tmp:
        tokenizer_facts = common.copy_tokenizer(opened.tokenizer_dir, tmp, config.vocab_size)
        common.write_json(os.path.join(tmp, "config.json"), hf)
        files = _write_safetensors(tmp, hf_layout.iter_hf_tensors(params, config, out_dtype), int(max_shard_gb * 2**30))
        common.write_json(os.path.join(tmp, "t5x_cpt_export.json"), {
            "checkpoint": opened.path, "step": step, "origin": opened.origin, "architecture": chosen.MODEL_TYPE,
            "dtype": dtype, "files": files, "tokenizer": tokenizer_facts,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    log.info("exported %s as %s to %s", opened.path, chosen.HF_CLASS, out)
    return os.path.abspath(out)


def _choose_architecture(architecture: str | None, base: dict | None, config):
    """The architecture module to export as: the flag, else the origin's (qwen2 only with QKV bias)."""
    if architecture:
        return architectures.architecture_by_name(architecture)
    if base and base.get("model_type") in architectures.ARCHITECTURES:
        chosen = architectures.ARCHITECTURES[base["model_type"]]
        if chosen.MODEL_TYPE == "qwen2" and not config.qkv_bias:
            return architectures.ARCHITECTURES["llama"]
        return chosen
    return architectures.ARCHITECTURES["qwen2" if config.qkv_bias else "llama"]


def _write_safetensors(directory: str, tensors, max_shard_bytes: int) -> list[str]:
    """Writes (name, array) pairs into shards of at most max_shard_bytes (one file if it fits)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = 0
    temp_names = []
    for name, array in tensors:
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            temp_names.append(_flush(directory, shards[-1], len(temp_names), save_file))
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
        total += array.nbytes
    temp_names.append(_flush(directory, shards[-1], len(temp_names), save_file))
    if len(temp_names) == 1:
        final = ["model.safetensors"]
    else:
        final = [f"model-{i + 1:05d}-of-{len(temp_names):05d}.safetensors" for i in range(len(temp_names))]
    weight_map: dict[str, str] = {}
    for (temp, names), name in zip(temp_names, final):
        os.rename(os.path.join(directory, temp), os.path.join(directory, name))
        weight_map.update({n: name for n in names})
    if len(final) > 1:
        common.write_json(os.path.join(directory, "model.safetensors.index.json"),
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    return final


def _flush(directory: str, shard: dict[str, Any], index: int, save_file) -> tuple[str, list[str]]:
    name = f"shard-{index}.tmp"
    save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
    names = list(shard)
    shard.clear()  # free the shard's arrays before the next one is built
    return name, names
