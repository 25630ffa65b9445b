"""Checkpoints with orbax: the training manager (save, resume, corrupt-latest fallback) and params I/O.

Layout. A training run writes `MODEL_DIR/checkpoints/<step>/` with the items
  params     the model parameters (StandardSave; the same item an imported model has)
  opt_state  the optimizer state
  data       the input pipeline's position (JSON)
  meta       step, model config and run facts (JSON)
An imported source LLM (`t5x_cpt.convert import`) is a directory with `params/` (the same
StandardSave item, unscanned layer layout), `model_config.json`, `model.gin` and tokenizer files.
A weights-only load therefore reads one item, `params`, from either kind of directory.

Orbax writes each step to a temporary directory and renames it when complete, so a step that is
listed is whole; a step whose files were damaged afterwards fails to restore, and `restore_latest`
then reports it and falls back to the previous step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

PARAMS_ITEM = "params"
MODEL_CONFIG_FILE = "model_config.json"


def absolute(path: str) -> str:
    """An absolute local path, or a URL (gs://...) unchanged."""
    return path if "://" in path else os.path.abspath(path)


def _epath(path: str):
    from etils import epath  # orbax's path layer: local files and gs:// alike

    return epath.Path(absolute(path))


def path_exists(path: str) -> bool:
    return _epath(path).exists()


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: orbax pulls in tensorstore
    return ocp


def save_params(directory: str, params: Mapping[str, Any]) -> str:
    """Writes `params` as the `params` item under `directory` and waits until it is on disk."""
    ocp = _ocp()
    path = os.path.join(absolute(directory), PARAMS_ITEM)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def find_params_dir(path: str, step: int | None = None) -> str:
    """The `params` item directory of an imported model dir, a MODEL_DIR, or one checkpoint step dir.

    For a MODEL_DIR the latest complete step is used unless `step` is given.
    """
    path = absolute(path)
    if not path_exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if step is None and _epath(os.path.join(path, PARAMS_ITEM)).is_dir():
        return os.path.join(path, PARAMS_ITEM)
    root = os.path.join(path, "checkpoints") if _epath(os.path.join(path, "checkpoints")).is_dir() else path
    steps = available_steps(root)
    if not steps:
        raise CheckpointError(f"no parameters found under {path}: expected {PARAMS_ITEM}/ or checkpoints/<step>/")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"step {step} not found under {root}; available steps: {steps}")
    return os.path.join(root, str(step), PARAMS_ITEM)


def available_steps(checkpoints_dir: str) -> list[int]:
    """Completed steps under a checkpoints directory (orbax's temporary directories excluded)."""
    root = _epath(checkpoints_dir)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def _flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_tree_matches(expected: Mapping[str, Any], found: Mapping[str, Any], where: str) -> None:
    """Strict comparison of two param trees by path and shape; raises naming every difference."""
    want, got = _flatten(expected), _flatten(found)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    mismatched = [f"{k}: checkpoint {tuple(np.shape(got[k]))} vs model {tuple(np.shape(want[k]))}"
                  for k in sorted(set(want) & set(got)) if tuple(np.shape(got[k])) != tuple(np.shape(want[k]))]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched[:8]}{' ...' if len(mismatched) > 8 else ''}")
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))


def read_params_metadata(params_dir: str) -> dict[str, Any]:
    """The tree of shapes/dtypes stored in a params item, without reading the arrays."""
    ocp = _ocp()
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(params_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_params(path: str, abstract_params: Mapping[str, Any], shardings: Any = None,
                step: int | None = None) -> dict[str, Any]:
    """Weights-only load, strict: every tensor present and every shape equal, else CheckpointError.

    `abstract_params` is the model's params tree (arrays or ShapeDtypeStructs); `shardings`, a tree
    of the same structure, places each tensor directly on the current mesh. Layer layouts
    (scanned or not) are converted to the model's. Stored dtypes are cast to the model's.
    """
    from t5x_cpt.model import stack_layer_params, unstack_layer_params

    ocp = _ocp()
    params_dir = find_params_dir(path, step)
    stored = read_params_metadata(params_dir)
    model_scanned = "layers" in abstract_params
    stored_scanned = "layers" in stored
    num_layers = _num_layers(abstract_params if not model_scanned else stored)
    if stored_scanned != model_scanned:
        # Read in the stored layout, on the host, then restack to the model's layout.
        with ocp.StandardCheckpointer() as checkpointer:
            raw = checkpointer.restore(params_dir, jax.tree.map(
                lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), stored))
        raw = jax.tree.map(np.asarray, raw)
        raw = stack_layer_params(raw, num_layers) if model_scanned else unstack_layer_params(raw, _num_layers(raw))
        check_tree_matches(abstract_params, raw, f"checkpoint {params_dir}")
        cast = jax.tree.map(lambda x, a: np.asarray(x, dtype=a.dtype), raw, abstract_params)
        if shardings is None:
            return jax.tree.map(jax.numpy.asarray, cast)
        return jax.tree.map(jax.device_put, cast, shardings)
    check_tree_matches(abstract_params, stored, f"checkpoint {params_dir}")
    if shardings is None:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params, shardings)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(params_dir, target)
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(f"could not read parameters from {params_dir}: {e}") from e


def _num_layers(params: Mapping[str, Any]) -> int:
    if "layers" in params:
        return int(jax.tree.leaves(params["layers"])[0].shape[0])
    return sum(1 for k in params if k.startswith("layers_"))


def write_model_config(directory: str, config) -> None:
    """Stores the ModelConfig next to a checkpoint, so tools can rebuild the model without gin."""
    _epath(os.path.join(directory, MODEL_CONFIG_FILE)).write_text(
        json.dumps(config.to_dict(), indent=2, sort_keys=True))


def read_model_config(directory: str):
    """The ModelConfig stored by `write_model_config` in `directory` (or None if there is none)."""
    from t5x_cpt.model import ModelConfig

    path = _epath(os.path.join(directory, MODEL_CONFIG_FILE))
    if not path.exists():
        return None
    fields = json.loads(path.read_text())
    known = set(ModelConfig.__dataclass_fields__)
    unknown = set(fields) - known
    if unknown:
        logging.warning("%s: ignoring unknown model config fields %s", path, sorted(unknown))
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


class TrainCheckpointManager:
    """Orbax CheckpointManager for training: async saves, keep-last-n, newest-readable restore."""

    ITEMS = ("params", "opt_state", "data", "meta")

    def __init__(self, model_dir: str, keep: int = 3, async_save: bool = True):
        ocp = _ocp()
        self.directory = os.path.join(absolute(model_dir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, params: Any, opt_state: Any, data_state: Mapping[str, Any],
             meta: Mapping[str, Any]) -> None:
        """Starts an asynchronous save of `step`; it becomes visible only once complete."""
        ocp = _ocp()
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(dict(data_state)),
            meta=ocp.args.JsonSave(dict(meta)))
        self._manager.save(step, args=args, force=True)

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any):
        """(step, params, opt_state, data_state, meta) of the newest step that reads back, or None.

        The abstract trees carry the target shardings, so a checkpoint written on one mesh is
        restored onto whatever mesh this run has. A step that fails to read is reported and the
        previous one is tried.
        """
        ocp = _ocp()
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # orbax raises many types for damaged files
                aside = os.path.join(self.directory, f"{step}.unreadable-{int(time.time())}")
                logging.error("checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and trying "
                              "the previous one", step, self.directory, type(e).__name__, str(e)[:500], aside)
                if jax.process_index() == 0:
                    _epath(os.path.join(self.directory, str(step))).rename(aside)
                self._manager.reload()
                continue
            return step, restored.params, restored.opt_state, restored.data, restored.meta
        if self.all_steps():
            raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {self.all_steps()} all failed)")
        return None

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def gather_host_json(obj: Any) -> list[Any]:
    """Every process's JSON-able `obj`, in process order (a collective: call it on all hosts).

    Used at checkpoint time only, for the data pipeline's per-host position.
    """
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:payload.size] = payload
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(gathered[i, :lengths[i]]).decode("utf-8")) for i in range(len(lengths))]
