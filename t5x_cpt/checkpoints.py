"""Checkpoints with orbax: the training manager (save, resume, corrupt-latest fallback) and params I/O.

Layout. A training run writes `MODEL_DIR/checkpoints/<step>/` with the items
  params     the model parameters (StandardSave; the same item an imported model has)
  opt_state  the optimizer state
  data       the input pipeline's position (JSON)
  meta       step, model config and run facts (JSON)
An imported source LLM (`t5x_cpt.convert import`) is a directory with `params/` (the same
StandardSave item, unscanned layer layout), `model_config.json`, `model.gin` and tokenizer files.
A weights-only load therefore reads one item, `params`, from either kind of directory.

A step counts only once orbax has committed it (a rename on local disks, a commit_success.txt
marker on object stores); a step whose files were damaged afterwards fails to restore, and
`TrainCheckpointManager.restore_newest_readable` then reports it and falls back to the previous
step. Paths may be local or any etils.epath URL (gs://...).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

from t5x_cpt import distributed, param_paths
from t5x_cpt.errors import UserInputError
from t5x_cpt.run_dir import as_path, write_atomically

PARAMS_ITEM = "params"
MODEL_CONFIG_FILE = "model_config.json"
COMMIT_MARKER = "commit_success.txt"  # orbax's completion marker where rename is not atomic


def path_exists(path: str) -> bool:
    return as_path(path).exists()


class CheckpointError(UserInputError):
    """A checkpoint is missing, unreadable, or does not match the model it is loaded into."""


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: orbax pulls in tensorstore
    return ocp


def save_params(directory: str, params: Mapping[str, Any]) -> str:
    """Writes `params` as the `params` item under `directory` and waits until it is on disk."""
    ocp = _ocp()
    path = os.fspath(as_path(directory) / PARAMS_ITEM)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return path


def find_params_dir(path: str, step: int | None = None) -> str:
    """The `params` item directory of an imported model dir, a MODEL_DIR, or one checkpoint step dir.

    For a MODEL_DIR the latest complete step is used unless `step` is given.
    """
    path = os.fspath(as_path(path))
    if not path_exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if step is None and as_path(os.path.join(path, PARAMS_ITEM)).is_dir():
        return os.path.join(path, PARAMS_ITEM)
    root = os.path.join(path, "checkpoints") if as_path(os.path.join(path, "checkpoints")).is_dir() else path
    steps = available_steps(root)
    if not steps:
        raise CheckpointError(f"no parameters found under {path}: expected {PARAMS_ITEM}/ or checkpoints/<step>/")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"step {step} not found under {root}; available steps: {steps}")
    return os.path.join(root, str(step), PARAMS_ITEM)


def available_steps(checkpoints_dir: str) -> list[int]:
    """Steps under a checkpoints directory that orbax considers committed.

    Orbax commits a step by renaming its temporary directory on local disks and by writing a
    commit_success.txt marker on object stores (where rename is not atomic); a directory that
    merely has a numeric name is not a checkpoint.
    """
    return sorted(_ocp().path.step.checkpoint_steps(as_path(checkpoints_dir)))


def check_tree_matches(expected: Mapping[str, Any], found: Mapping[str, Any], where: str) -> None:
    """Strict comparison of two param trees by path and shape; raises naming every difference."""
    shapes = lambda tree: {k: np.shape(v) for k, v in param_paths.flatten(tree).items()}  # noqa: E731
    problems = param_paths.shape_differences(shapes(expected), shapes(found), "checkpoint", "model")
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
    # Atomic: a kill mid-write must not leave a truncated file that a resume then cannot parse.
    write_atomically(os.path.join(directory, MODEL_CONFIG_FILE), json.dumps(config.to_dict(), indent=2, sort_keys=True))


def read_model_config(directory: str):
    """The ModelConfig stored by `write_model_config` in `directory` (or None if there is none)."""
    from t5x_cpt.model import ModelConfig

    path = as_path(os.path.join(directory, MODEL_CONFIG_FILE))
    if not path.exists():
        return None
    fields = json.loads(path.read_text())
    known = set(ModelConfig.__dataclass_fields__)
    unknown = set(fields) - known
    if unknown:
        logging.warning("%s: ignoring unknown model config fields %s", path, sorted(unknown))
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


class TrainCheckpointManager:
    """Orbax CheckpointManager for training: async saves, keep-last-n, newest-readable restore.

    Every decision read from storage (which steps exist, which one to restore, whether a step is
    unreadable) is taken the same way on every process: the listing is process 0's, broadcast;
    a step counts as readable only when it restored on every process.
    """

    ITEMS = ("params", "opt_state", "data", "meta")

    def __init__(self, checkpoints_dir, keep: int = 3, async_save: bool = True):
        ocp = _ocp()
        self.directory = os.fspath(as_path(checkpoints_dir))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

    def all_steps(self) -> list[int]:
        """Committed steps, as process 0 sees them (a collective with several processes)."""
        return distributed.broadcast_json(sorted(int(s) for s in self._manager.all_steps()))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, params: Any, opt_state: Any, data_state: Mapping[str, Any],
             meta: Mapping[str, Any]) -> None:
        """Starts an asynchronous save of `step`; it becomes visible only once committed."""
        ocp = _ocp()
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(dict(data_state)),
            meta=ocp.args.JsonSave(dict(meta)))
        self._manager.save(step, args=args, force=True)

    def read_data_state(self, step: int) -> dict[str, Any]:
        """The `data` item of one step (small JSON), without touching the arrays."""
        ocp = _ocp()
        return self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

    def restore_newest_readable(self, steps: list[int], abstract_params: Any, abstract_opt_state: Any):
        """(step, params, opt_state, data_state, meta) of the newest of `steps` that reads back.

        The abstract trees carry the target shardings, so a checkpoint written on one mesh is
        restored onto this run's. A step that fails to read on any process is reported, moved
        aside by process 0, and the previous one is tried, on every process alike.
        """
        ocp = _ocp()
        for step in reversed(steps):
            error = None
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_params),
                    opt_state=ocp.args.StandardRestore(abstract_opt_state),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # orbax raises many types for damaged files  # noqa: BLE001
                error = f"{type(e).__name__}: {str(e)[:500]}"
            errors = distributed.allgather_json(error)
            if not any(errors):
                return step, restored.params, restored.opt_state, restored.data, restored.meta
            reason = next(e for e in errors if e)
            aside = f"{step}.unreadable-{int(time.time())}"
            logging.error("checkpoint step %d in %s is unreadable (%s); moved it to %s and trying the previous "
                          "one", step, self.directory, reason, aside)
            if distributed.is_primary():
                step_dir = as_path(self.directory) / str(step)
                marker = step_dir / COMMIT_MARKER
                if marker.exists():  # object stores: the step stops counting at once, before the slow copy
                    marker.unlink()
                step_dir.rename(as_path(self.directory) / aside)
            distributed.sync(f"t5x_cpt.checkpoints.aside.{step}")
            self._manager.reload()
        if steps:
            raise CheckpointError(f"no readable checkpoint in {self.directory} (steps {steps} all failed)")
        return None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
