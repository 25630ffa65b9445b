"""Opening a t5x_cpt checkpoint for conversion: an imported DIR or a training MODEL_DIR.

Export, vocabulary extension and `load_pretrained` all start here. A checkpoint's own
model_config.json is the authority on the architecture. What ModelConfig does not model (token
ids, max positions, Mistral's sliding window: the Hugging Face config) and the tokenizer come from
the checkpoint's *origin*: the imported DIR itself, or for a MODEL_DIR the `source_checkpoint` its
run_info.json names, followed through chains of CPT runs.

Parameters are read on the host, unscanned, in the dtype the checkpoint's model_config.json
declares (`param_dtype`). One rule for every converter, chosen because it is lossless — every
writer in this project stores parameters at that precision or below (training stores
`param_dtype`; an import with `--dtype` stores that dtype under a float32 config) — and costs no
more host memory than the checkpoint needs. Writers choose their output dtype per tensor: export
casts to `--dtype`, vocabulary extension keeps the dtype it read.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from t5x_cpt import checkpoints, run_dir
from t5x_cpt.convert import common
from t5x_cpt.convert.common import ConversionError
from t5x_cpt.model import ModelConfig, abstract_params

# A chain of CPT runs longer than this is taken for a loop in the run_info.json files.
MAX_ORIGIN_DEPTH = 16


def read_checkpoint_config(checkpoint: str) -> ModelConfig:
    """The ModelConfig a checkpoint stores (model_config.json), or a ConversionError saying it has none."""
    config = checkpoints.read_model_config(checkpoint)
    if config is None:
        raise ConversionError(f"{checkpoint} has no model_config.json; expected an imported DIR or a MODEL_DIR")
    return config


def origin_dir(checkpoint: str) -> str | None:
    """The imported DIR a checkpoint descends from (itself if it is one), or None."""
    path = os.path.abspath(checkpoint)
    for _ in range(MAX_ORIGIN_DEPTH):
        if os.path.isfile(os.path.join(path, common.HF_CONFIG_FILE)):
            return path
        info = run_dir.read_run_info(path)
        parent = (info or {}).get("source_checkpoint")
        if not parent:
            return None
        if not os.path.isdir(parent):
            raise ConversionError(f"{os.path.join(path, run_dir.RUN_INFO)} names source_checkpoint {parent}, "
                                  "which does not exist; pass --tokenizer=DIR (and --architecture) explicitly")
        path = os.path.abspath(parent)
    return None


def tokenizer_dir(path: str) -> str:
    """The directory holding tokenizer files named by `path` (a directory, or a file within one)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise ConversionError(f"tokenizer path {path} does not exist")
    return path if os.path.isdir(path) else os.path.dirname(path)


@dataclasses.dataclass(frozen=True)
class CheckpointDir:
    """A t5x_cpt checkpoint opened for conversion (module docstring)."""

    path: str                    # absolute
    config: ModelConfig          # from the checkpoint's model_config.json
    origin: str | None           # the imported DIR it descends from
    tokenizer_dir: str | None    # --tokenizer if given, else the origin

    def hf_config(self) -> dict[str, Any] | None:
        """The origin's Hugging Face config (hf_config.json), or None without an origin."""
        if self.origin is None:
            return None
        return common.read_json(os.path.join(self.origin, common.HF_CONFIG_FILE))

    def import_info(self) -> dict[str, Any]:
        """The origin's import_info.json ({} when there is none)."""
        path = os.path.join(self.origin, common.IMPORT_INFO_FILE) if self.origin else None
        return common.read_json(path) if path and os.path.isfile(path) else {}

    def read_params(self, step: int | None = None) -> dict[str, Any]:
        """The parameters of `step` (default: latest), unscanned, in the config's param_dtype."""
        host_config = self.config.replace(scan_layers=False, remat="none")
        return checkpoints.load_params(self.path, abstract_params(host_config), step=step)


def open_checkpoint(checkpoint: str, tokenizer: str | None = None) -> CheckpointDir:
    """Opens an imported DIR or a MODEL_DIR: its config, origin and tokenizer directory."""
    path = os.path.abspath(checkpoint)
    config = read_checkpoint_config(path)
    origin = origin_dir(path)
    return CheckpointDir(path=path, config=config, origin=origin,
                         tokenizer_dir=tokenizer_dir(tokenizer) if tokenizer else origin)
