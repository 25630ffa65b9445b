"""Streaming readers of Hugging Face weight files: one tensor in memory at a time.

Supported layouts of a model directory:
  model.safetensors                                     one file
  model.safetensors.index.json + model-0000k-of-n...   sharded (any index named *.safetensors.index.json)
  pytorch_model.bin                                     one pickle (needs torch)
  pytorch_model.bin.index.json + shards                 sharded pickles (needs torch)

safetensors are read with `safe_open`; bfloat16 tensors through the flax framework (numpy has no
bfloat16, and torch is only a test dependency), everything else through numpy. `.bin` files are
opened with `torch.load(mmap=True, weights_only=True)`, so a shard is mapped, not read, and no
pickled code runs. Every file problem (missing shard, truncated file, unreadable tensor) becomes a
ConversionError naming the file.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from t5x_cpt.convert.common import ConversionError, read_json


class TensorSource:
    """Read-only name -> array access in Hugging Face layout ([out, in] for linear weights)."""

    description: dict[str, Any]

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class WeightFilesSource(TensorSource):
    """Tensors spread over the weight files of one format, found by `from_dir`.

    Subclasses name their format and file patterns and say how to list the tensors of one file.
    """

    FORMAT: str
    INDEX_PATTERN: str   # glob of the index json that maps tensor names to files
    FILE_PATTERN: str    # glob of the weight files themselves

    def __init__(self, files: dict[str, str], description: dict[str, Any]):
        self._file_of = files
        self.description = description

    def _tensor_names(self, path: str) -> list[str]:
        raise NotImplementedError

    @classmethod
    def from_dir(cls, directory: str) -> "WeightFilesSource | None":
        """The source for `directory`'s files of this format, or None when it has none."""
        indexes = sorted(glob.glob(os.path.join(directory, cls.INDEX_PATTERN)))
        if indexes:
            mapping = _index_map(indexes[0])
            return cls(mapping, {"format": cls.FORMAT, "files": _basenames(mapping)})
        files = sorted(glob.glob(os.path.join(directory, cls.FILE_PATTERN)))
        if not files:
            return None
        if len(files) > 1:
            raise ConversionError(f"{directory} has several {cls.FILE_PATTERN} files "
                                  f"{[os.path.basename(f) for f in files]} but no {cls.INDEX_PATTERN} saying "
                                  "which tensor is where")
        source = cls({}, {"format": cls.FORMAT, "files": [os.path.basename(files[0])]})
        source._file_of = {name: files[0] for name in source._tensor_names(files[0])}
        return source

    def names(self) -> list[str]:
        return list(self._file_of)


def _index_map(index_path: str) -> dict[str, str]:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index_path} has no weight_map")
    directory = os.path.dirname(index_path)
    missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(directory, f))})
    if missing:
        raise ConversionError(f"{index_path} names weight files that are missing: {missing}")
    return {name: os.path.join(directory, f) for name, f in weight_map.items()}


def _basenames(mapping: dict[str, str]) -> list[str]:
    return sorted({os.path.basename(f) for f in mapping.values()})


class SafetensorsSource(WeightFilesSource):
    """One or more .safetensors files; file handles are opened lazily and kept open."""

    FORMAT = "safetensors"
    INDEX_PATTERN = "*.safetensors.index.json"
    FILE_PATTERN = "*.safetensors"

    def __init__(self, files: dict[str, str], description: dict[str, Any]):
        super().__init__(files, description)
        self._handles: dict[str, Any] = {}

    def _tensor_names(self, path: str) -> list[str]:
        return list(self._open(path).keys())

    def _open(self, path: str):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(path, framework="numpy")
            except Exception as e:  # SafetensorError for truncated or corrupt headers
                raise ConversionError(f"cannot read weight file {path}: {e}") from e
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        path = self._file_of[name]
        handle = self._open(path)
        try:
            if name not in handle.keys():
                raise ConversionError(f"tensor {name} is not in {path} although the index says so")
            if handle.get_slice(name).get_dtype() == "BF16":
                return _read_bf16(path, name)
            return handle.get_tensor(name)
        except ConversionError:
            raise
        except Exception as e:
            raise ConversionError(f"cannot read tensor {name} from {path}: {e}") from e

    def close(self) -> None:
        self._handles.clear()


def _read_bf16(path: str, name: str) -> np.ndarray:
    # Kept on the host CPU: on an accelerator machine the default device would be the chip.
    with jax.default_device(jax.devices("cpu")[0]):
        with safe_open(path, framework="flax") as f:
            return np.asarray(f.get_tensor(name))


class TorchBinSource(WeightFilesSource):
    """pytorch_model*.bin files, memory-mapped one shard at a time."""

    FORMAT = "pytorch_bin"
    INDEX_PATTERN = "*.bin.index.json"
    FILE_PATTERN = "pytorch_model*.bin"

    def __init__(self, files: dict[str, str], description: dict[str, Any]):
        super().__init__(files, description)
        self._loaded_path: str | None = None
        self._state: dict[str, Any] = {}

    def _tensor_names(self, path: str) -> list[str]:
        return list(self._load(path))

    def _load(self, path: str) -> dict[str, Any]:
        if self._loaded_path != path:
            try:
                import torch  # imported here: torch is optional (the 'oracle' extra), needed for .bin only
            except ImportError as e:
                raise ConversionError(f"reading {path} needs torch (pip install torch), "
                                      "or convert it to safetensors") from e
            self._state = {}
            try:
                self._state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise ConversionError(f"cannot read weight file {path}: {e}") from e
            self._loaded_path = path
        return self._state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._load(self._file_of[name])[name].shape)

    def get(self, name: str) -> np.ndarray:
        import torch  # optional, as in _load (which has imported it by now)

        tensor = self._load(self._file_of[name]).get(name)
        if tensor is None:
            raise ConversionError(f"tensor {name} is not in {self._file_of[name]} although the index says so")
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return tensor.numpy().copy()

    def close(self) -> None:
        self._state, self._loaded_path = {}, None


def open_hf_dir(directory: str) -> TensorSource:
    """The weights of a Hugging Face model directory, preferring safetensors over .bin."""
    source = SafetensorsSource.from_dir(directory) or TorchBinSource.from_dir(directory)
    if source is None:
        raise ConversionError(f"no weight files in {directory} (expected model.safetensors, a sharded "
                              "*.safetensors.index.json, or pytorch_model*.bin)")
    return source
