"""gs:// run directories against a real GCS JSON API on localhost (fake-gcs-server, tests/gcs_emulator.py).

Every test goes through the clients a TPU run uses — etils.epath (TensorFlow's GCS filesystem),
orbax with tensorstore's gcs kvstore, google-cloud-storage, TensorBoard's event writer — and
checks what reached the server through the emulator's own API. docs/storage.md says what this
covers and what only real GCS can show.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gcs_emulator import gcs_dir, gcs_emulator  # noqa: F401  (pytest fixtures)
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from t5x_cpt import checkpoints
from t5x_cpt.run_dir import MetricsLog, RunDir, as_path, read_metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMIT_MARKER = "commit_success.txt"  # orbax's sign that a step on an object store is complete


def _relative_names(emulator, gs_path):
    prefix = gs_path.removeprefix("gs://").partition("/")[2] + "/"
    return [name.removeprefix(prefix) for name in emulator.object_names(gs_path)]


def _mesh():
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))


def _params(scale: float = 1.0):
    mesh = _mesh()
    return {
        "embed": jax.device_put(jnp.arange(32.0).reshape(8, 4) * scale, NamedSharding(mesh, P("data", "model"))),
        "norm": {"scale": jax.device_put(jnp.full((6,), 2.0 * scale), NamedSharding(mesh, P()))},
        "count": jax.device_put(jnp.arange(4, dtype=jnp.int32), NamedSharding(mesh, P("data"))),
    }


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _assert_trees_equal(expected, found):
    assert jax.tree.structure(expected) == jax.tree.structure(found)
    for want, got in zip(jax.tree.leaves(expected), jax.tree.leaves(found)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_epath_write_read_list_rename_delete(gcs_emulator, gcs_dir):
    root = as_path(gcs_dir)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "a.json").write_text('{"x": 1}')
    (root / "sub" / "deeper" / "b.bin").write_bytes(bytes(range(256)) * 40)

    assert root.is_dir() and (root / "sub").is_dir() and not (root / "sub" / "a.json").is_dir()
    assert json.loads((root / "sub" / "a.json").read_text()) == {"x": 1}
    assert (root / "sub" / "deeper" / "b.bin").read_bytes() == bytes(range(256)) * 40
    assert sorted(p.name for p in (root / "sub").iterdir()) == ["a.json", "deeper"]
    assert "sub/a.json" in _relative_names(gcs_emulator, gcs_dir)

    (root / "sub" / "a.json").rename(root / "sub" / "renamed.json")
    assert not (root / "sub" / "a.json").exists()
    assert json.loads((root / "sub" / "renamed.json").read_text()) == {"x": 1}

    # A whole directory moves too (the corrupt-step fallback moves a step directory aside).
    (root / "sub" / "deeper").rename(root / "moved")
    assert (root / "moved" / "b.bin").read_bytes() == bytes(range(256)) * 40
    assert not (root / "sub" / "deeper").exists()

    (root / "sub" / "renamed.json").unlink()
    assert not (root / "sub" / "renamed.json").exists()
    root.rmtree()
    assert not root.exists()
    assert _relative_names(gcs_emulator, gcs_dir) == []


def test_run_dir_small_files_and_atomic_rewrite(gcs_emulator, gcs_dir):
    run = RunDir(gcs_dir)
    run.prepare()
    run.write_run_info({"run_kind": "cpt", "replay_ratio": 0.25})
    run.write_run_info({"run_kind": "cpt", "replay_ratio": 0.5})  # a rewrite replaces the object whole
    run.write_config_gin("MODEL_DIR = 'x'\n")

    assert run.read_run_info() == {"run_kind": "cpt", "replay_ratio": 0.5}
    assert (run.root / "config.gin").read_text() == "MODEL_DIR = 'x'\n"
    names = _relative_names(gcs_emulator, gcs_dir)
    assert "run_info.json" in names and "config.gin" in names
    assert not [n for n in names if ".tmp-" in n or ".t5x_cpt_probe-" in n], names


def test_standard_checkpointer_round_trip_of_sharded_arrays(gcs_emulator, gcs_dir):
    import orbax.checkpoint as ocp

    params = _params()
    target = as_path(gcs_dir) / "state"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, params)
        checkpointer.wait_until_finished()
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(target, _abstract(params))

    _assert_trees_equal(params, restored)
    assert restored["embed"].sharding == params["embed"].sharding
    names = _relative_names(gcs_emulator, gcs_dir)
    assert f"state/{COMMIT_MARKER}" in names
    # The arrays went through tensorstore's gcs kvstore (OCDBT), not through a local disk.
    assert any(n.startswith("state/d/") for n in names), names


def test_save_params_and_load_params(gcs_emulator, gcs_dir):
    params = _params(scale=3.0)
    written = checkpoints.save_params(gcs_dir, params)
    assert written == f"{gcs_dir}/params"

    loaded = checkpoints.load_params(gcs_dir, _abstract(params), shardings=jax.tree.map(lambda a: a.sharding, params))
    _assert_trees_equal(params, loaded)

    wrong_shape = dict(_abstract(params), embed=jax.ShapeDtypeStruct((8, 5), jnp.float32))
    with pytest.raises(checkpoints.CheckpointError, match="embed"):
        checkpoints.load_params(gcs_dir, wrong_shape)


def _save_steps(manager, steps):
    for step in steps:
        manager.save(step, _params(scale=step), {"mu": _params(scale=-step)["embed"]},
                     {"position": 100 * step}, {"step": step})
    manager.close()


def test_checkpoint_manager_keeps_newest_steps_and_restores_latest(gcs_emulator, gcs_dir):
    checkpoints_dir = f"{gcs_dir}/checkpoints"
    _save_steps(checkpoints.TrainCheckpointManager(checkpoints_dir, keep=1), [1, 2])

    manager = checkpoints.TrainCheckpointManager(checkpoints_dir, keep=1)
    steps = manager.all_steps()
    assert steps == [2]  # keep=1 deleted step 1 from the bucket
    step, params, opt_state, data_state, meta = manager.restore_newest_readable(
        steps, _abstract(_params()), {"mu": _abstract(_params())["embed"]})
    manager.close()

    assert (step, data_state, meta) == (2, {"position": 200}, {"step": 2})
    _assert_trees_equal(_params(scale=2), params)
    _assert_trees_equal(_params(scale=-2)["embed"], opt_state["mu"])
    step_dirs = {n.split("/")[0] for n in _relative_names(gcs_emulator, checkpoints_dir) if n}
    assert step_dirs == {"2"}


def test_a_step_counts_only_with_its_commit_marker(gcs_emulator, gcs_dir):
    checkpoints_dir = f"{gcs_dir}/checkpoints"
    _save_steps(checkpoints.TrainCheckpointManager(checkpoints_dir, keep=3), [1])
    # What a host killed mid-save leaves on an object store: step files, no commit marker.
    unfinished = as_path(checkpoints_dir) / "5"
    (unfinished / "params").mkdir(parents=True)
    (unfinished / "params" / "_METADATA").write_text("{}")
    assert "5/params/_METADATA" in _relative_names(gcs_emulator, checkpoints_dir)

    manager = checkpoints.TrainCheckpointManager(checkpoints_dir, keep=3)
    assert manager.all_steps() == [1]
    manager.close()
    assert checkpoints.available_steps(checkpoints_dir) == [1]
    assert checkpoints.find_params_dir(gcs_dir) == f"{checkpoints_dir}/1/params"

    # The marker, and nothing else, is what makes orbax count a step on GCS.
    (unfinished / COMMIT_MARKER).write_text("")
    assert checkpoints.available_steps(checkpoints_dir) == [1, 5]


def test_metrics_and_tensorboard_events(gcs_emulator, gcs_dir):
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    run = RunDir(gcs_dir)
    run.prepare()
    log = MetricsLog(run, flush_interval_s=0)
    log.open(resume_step=-1)
    for step in (10, 20):
        log.write({"step": step, "train/loss": 5.0 / step, "tokens": 1000 * step})
    log.close()

    assert read_metrics(gcs_dir) == [{"step": 10, "train/loss": 0.5, "tokens": 10000},
                                     {"step": 20, "train/loss": 0.25, "tokens": 20000}]
    event_files = [n for n in _relative_names(gcs_emulator, gcs_dir) if n.startswith("events/events.out.tfevents.")]
    assert len(event_files) == 1, event_files
    losses = {}
    for event in LegacyEventFileLoader(f"{gcs_dir}/{event_files[0]}").Load():
        for value in event.summary.value:
            if value.tag == "train/loss":
                losses[event.step] = value.simple_value
    assert losses == pytest.approx({10: 0.5, 20: 0.25})


def test_subprocess_uses_the_emulator_and_a_missing_bucket_is_a_run_dir_error(gcs_emulator):
    # A subprocess reaches the emulator through `gcs_emulator.env` alone. The missing bucket runs
    # there too: TensorFlow's recursive mkdir loops forever on a bucket that does not exist, and
    # such a hang must fail this test, not the session.
    good_dir = gcs_emulator.new_dir("subprocess")
    code = ("import sys\n"
            "from t5x_cpt.run_dir import RunDir, RunDirError\n"
            "run = RunDir(sys.argv[1])\n"
            "run.prepare()\n"
            "run.write_run_info({'written_by': 'subprocess'})\n"
            "print('wrote', flush=True)\n"
            "try:\n"
            "    RunDir('gs://no-such-bucket-t5x-cpt/run').prepare()\n"
            "except RunDirError as e:\n"
            "    print('RunDirError:', e)\n")
    env = dict(os.environ, **gcs_emulator.env)
    try:
        result = subprocess.run([sys.executable, "-c", code, good_dir], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"RunDir.prepare() on a missing bucket did not return within 120 s (stdout: {e.stdout!r})")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "run_info.json" in _relative_names(gcs_emulator, good_dir)
    assert "RunDirError:" in result.stdout and "no-such-bucket-t5x-cpt" in result.stdout, result.stdout


def test_missing_bucket_errors_from_epath(gcs_dir):
    import tensorflow as tf

    missing = as_path("gs://no-such-bucket-t5x-cpt/run")
    assert not missing.exists() and not as_path("gs://no-such-bucket-t5x-cpt").exists()
    with pytest.raises(tf.errors.NotFoundError, match="404"):
        (missing / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError):
        (missing / "a.txt").read_text()
