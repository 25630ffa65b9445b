"""What every converter shares: the error type, atomic output directories and the imported-DIR files.

An imported DIR (see `t5x_cpt.checkpoints`) holds
  params/             orbax StandardSave item, unscanned layer layout
  model_config.json   the full ModelConfig
  model.gin           the architecture as ModelConfig bindings (`--gin_file=DIR/model.gin`)
  hf_config.json      the source's Hugging Face config (synthesised for GGUF); export starts from it
  import_info.json    where the weights came from and what was read
  tokenizer files     tokenizer.json / tokenizer.model / tokenizer_config.json ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np
import sentencepiece as spm

from t5x_cpt import checkpoints
from t5x_cpt.errors import UserInputError

log = logging.getLogger(__name__)

HF_CONFIG_FILE = "hf_config.json"
IMPORT_INFO_FILE = "import_info.json"
MODEL_GIN_FILE = "model.gin"

# Files that make up a Hugging Face tokenizer; copied verbatim when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


class ConversionError(UserInputError):
    """A source or target checkpoint cannot be converted; the message names the cause."""


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory beside `out` that becomes `out` only if the block succeeds.

    On any failure the temporary directory is deleted, so no partial output is ever left behind.
    With `overwrite`, an existing `out` is replaced only after the new one is complete.
    """
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise ConversionError(f"output {out} already exists; choose a new --out or pass --overwrite")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ConversionError(f"missing file {path}") from e
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from e


def write_model_gin(directory: str, config, header: str) -> None:
    """model.gin: ModelConfig bindings of the architecture fields, so a run can `--gin_file` it."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines.append("# Architecture only; dtype, remat and layer scanning are left to the run's gin files.")
    for name in config.ARCHITECTURE_FIELDS:
        lines.append(f"ModelConfig.{name} = {_gin_literal(getattr(config, name))}")
    with open(os.path.join(directory, MODEL_GIN_FILE), "w") as f:
        f.write("\n".join(lines) + "\n")


def _gin_literal(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        return repr(float(value))
    return str(value)


def write_imported_dir(directory: str, config, params: Mapping[str, Any], hf_config: Mapping[str, Any],
                       info: Mapping[str, Any], header: str) -> None:
    """Writes params, model_config.json, model.gin, hf_config.json and import_info.json."""
    checkpoints.save_params(directory, params)
    checkpoints.write_model_config(directory, config)
    write_model_gin(directory, config, header)
    write_json(os.path.join(directory, HF_CONFIG_FILE), dict(hf_config))
    write_json(os.path.join(directory, IMPORT_INFO_FILE), dict(info))


def tokenizer_size(directory: str) -> int | None:
    """Number of token ids a tokenizer in `directory` can produce (highest id + 1), or None if none.

    Reads tokenizer.json when present (the fast tokenizer transformers uses), else a SentencePiece
    tokenizer.model or vocab.json, plus added tokens declared in tokenizer_config.json/added_tokens.json.
    """
    ids: list[int] = []
    tj = os.path.join(directory, "tokenizer.json")
    if os.path.exists(tj):
        data = read_json(tj)
        vocab = (data.get("model") or {}).get("vocab") or {}
        if isinstance(vocab, dict):
            ids.extend(vocab.values())
        else:  # Unigram: a list of [piece, score]
            ids.append(len(vocab) - 1)
        ids.extend(t["id"] for t in data.get("added_tokens") or [])
    elif os.path.exists(os.path.join(directory, "tokenizer.model")):
        processor = spm.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model"))
        ids.append(processor.GetPieceSize() - 1)
    elif os.path.exists(os.path.join(directory, "vocab.json")):
        ids.extend(read_json(os.path.join(directory, "vocab.json")).values())
    else:
        return None
    tc = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(tc):
        ids.extend(int(k) for k in (read_json(tc).get("added_tokens_decoder") or {}))
    at = os.path.join(directory, "added_tokens.json")
    if os.path.exists(at):
        ids.extend(read_json(at).values())
    return max(ids) + 1 if ids else None


def copy_tokenizer(src_dir: str, dst_dir: str, vocab_size: int, required: bool = True) -> dict[str, Any]:
    """Copies tokenizer files and checks them against the model's vocabulary.

    A tokenizer that can emit an id >= vocab_size would index past the embedding: that is an error.
    A smaller tokenizer is normal (embeddings padded to a multiple of 64/128) and is reported.
    """
    copied = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, name))]
    size = tokenizer_size(src_dir)
    if size is None:
        if required:
            raise ConversionError(
                f"no tokenizer found in {src_dir} (looked for tokenizer.json, tokenizer.model, vocab.json); "
                "pass --tokenizer=PATH naming a directory with the source's tokenizer files")
        return {"tokenizer_files": [], "tokenizer_size": None}
    if size > vocab_size:
        raise ConversionError(
            f"vocab size mismatch: the tokenizer in {src_dir} has {size} token ids but the model's embedding "
            f"has {vocab_size} rows; tokens {vocab_size}..{size - 1} would index past it. "
            "Use the tokenizer that belongs to this checkpoint")
    for name in copied:
        shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
    if size < vocab_size:
        log.info("tokenizer has %d ids; embedding rows %d..%d are padding", size, size, vocab_size - 1)
    return {"tokenizer_files": copied, "tokenizer_size": size, "padding_rows": vocab_size - size}


def as_dtype(name: str | None):
    """numpy dtype for 'float32' | 'bfloat16' | 'float16' (bfloat16 through ml_dtypes, as jax uses)."""
    if name is None:
        return None
    table = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    if name not in table:
        raise ConversionError(f"unsupported dtype {name!r}; expected one of {sorted(table)}")
    return np.dtype(table[name])
