"""End-to-end trainer tests: real gin files, real seqio data, real orbax checkpoints, real processes.

Runs go through `python -m t5x_cpt.train` in subprocesses (8 fake CPU devices inherited from
conftest), so kills, exit codes and messages are the ones a user gets.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from t5x_cpt import flops
from t5x_cpt.model import ModelConfig

PRETRAIN = "configs/experiments/tiny_pretrain.gin"
CPT = "configs/experiments/tiny_cpt.gin"
SCRATCH = "configs/experiments/tiny_scratch.gin"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_cmd(gin_file, model_dir, *bindings):
    return [sys.executable, "-m", "t5x_cpt.train", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
            *[f"--gin.{b}" for b in bindings]]


def run_train(gin_file, model_dir, *bindings, env=None, timeout=600):
    return subprocess.run(train_cmd(gin_file, model_dir, *bindings), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def records(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(model_dir):
    return {r["step"]: r["train/loss"] for r in records(model_dir) if "train/loss" in r}


def checkpoint_steps(model_dir):
    root = os.path.join(model_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("source"))
    ok(run_train(PRETRAIN, model_dir, "TRAIN_STEPS=6", "CHECKPOINT_PERIOD=6", "EVAL_PERIOD=6"))
    return model_dir


@pytest.mark.parametrize("gin_file", [PRETRAIN, SCRATCH, CPT])
def test_each_run_file_trains_three_steps(gin_file, source_dir, tmp_path):
    model_dir = str(tmp_path / "run")
    extra = [f"SOURCE_CHECKPOINT='{source_dir}'"] if gin_file == CPT else []
    ok(run_train(gin_file, model_dir, "TRAIN_STEPS=3", "LOG_PERIOD=1", *extra))
    logged = [r for r in records(model_dir) if "train/loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in logged)
    # Tokens are counted from the loss weights and FLOPs use the one definition in t5x_cpt.flops.
    config = ModelConfig(d_model=64, num_heads=4, num_kv_heads=2, num_layers=2, d_ff=128, tie_embeddings=False,
                         vocab_size=264)
    per_token = flops.train_flops_per_token(config, 64)
    last = logged[-1]
    assert 0 < last["tokens"] <= 3 * 8 * 64
    assert last["flops"] == pytest.approx(last["tokens"] * per_token, rel=1e-9)
    assert sum(v for k, v in last.items() if k.startswith("tokens/")) == pytest.approx(last["tokens"])
    for key in ("learning_rate", "tokens_per_second", "mfu"):
        assert key in last
    assert os.path.exists(os.path.join(model_dir, "config.gin"))
    assert os.path.isdir(os.path.join(model_dir, "events"))
    info = json.load(open(os.path.join(model_dir, "run_info.json")))
    assert info["run_kind"] == {PRETRAIN: "source", SCRATCH: "scratch", CPT: "cpt"}[gin_file]
    assert checkpoint_steps(model_dir) == [3]


def test_weights_only_init_starts_from_source_and_resets_optimizer(source_dir, tmp_path):
    model_dir = str(tmp_path / "cpt")
    ok(run_train(CPT, model_dir, f"SOURCE_CHECKPOINT='{source_dir}'", "TRAIN_STEPS=2", "LOG_PERIOD=1",
                 "CHECKPOINT_PERIOD=1", "EVAL_PERIOD=100"))
    source_final = [r for r in records(source_dir) if r["step"] == 6 and "eval/lo_help_en/loss" in r][0]
    step0 = [r for r in records(model_dir) if r["step"] == 0][0]
    # Same eval batches, same weights: the step-0 loss is the source model's final eval loss.
    for task in ("lo_help_en", "lo_help_zh"):
        assert step0[f"eval/{task}/loss"] == pytest.approx(source_final[f"eval/{task}/loss"], abs=1e-5)
    # A fresh optimizer: Adam's step count restarts at 1 and the learning rate at the warm-up's first value.
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckpt:
        opt_state = ckpt.restore(os.path.join(model_dir, "checkpoints", "1", "opt_state"))
    counts = [int(np.asarray(v)) for path, v in _leaves_with_path(opt_state) if path.endswith("count")]
    assert counts and set(counts) == {1}
    # ... and a new schedule: step 1 logs the schedule's first value for this run's TRAIN_STEPS.
    from t5x_cpt.optim import learning_rate_schedule
    first = [r for r in records(model_dir) if r["step"] == 1][0]
    assert first["learning_rate"] == pytest.approx(float(learning_rate_schedule(2, peak_learning_rate=3e-3)(0)))


def _leaves_with_path(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves_with_path(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves_with_path(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def test_resume_after_sigkill_is_exact(tmp_path):
    steps = ["TRAIN_STEPS=60", "LOG_PERIOD=1", "EVAL_PERIOD=1000", "CHECKPOINT_PERIOD=10"]
    reference = str(tmp_path / "reference")
    ok(run_train(PRETRAIN, reference, *steps))

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(train_cmd(PRETRAIN, killed, *steps), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint_steps(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps_before_restart = max(train_losses(killed))
    assert checkpoint_steps(killed) and steps_before_restart < 60, "the kill must land mid-run"

    ok(run_train(PRETRAIN, killed, *steps))
    expected, got = train_losses(reference), train_losses(killed)
    assert sorted(got) == list(range(1, 61))
    mismatched = {s: (expected[s], got[s]) for s in expected if got[s] != expected[s]}
    assert not mismatched, f"losses differ after resume at steps {sorted(mismatched)[:10]}"


def test_sigterm_saves_and_resume_completes(tmp_path):
    model_dir = str(tmp_path / "preempted")
    steps = ["TRAIN_STEPS=80", "LOG_PERIOD=1", "EVAL_PERIOD=1000", "CHECKPOINT_PERIOD=50"]
    proc = subprocess.Popen(train_cmd(PRETRAIN, model_dir, *steps), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(model_dir, "metrics.jsonl")) and len(train_losses(model_dir)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    saved = checkpoint_steps(model_dir)
    assert saved and saved[-1] not in (50, 80), saved  # saved at the preemption step, not a periodic one
    ok(run_train(PRETRAIN, model_dir, *steps))
    assert max(train_losses(model_dir)) == 80


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    model_dir = str(tmp_path / "corrupt")
    ok(run_train(PRETRAIN, model_dir, "TRAIN_STEPS=20", "CHECKPOINT_PERIOD=10", "LOG_PERIOD=1"))
    assert checkpoint_steps(model_dir) == [10, 20]
    params_dir = os.path.join(model_dir, "checkpoints", "20", "params")
    for root, _, files in os.walk(params_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    # Resumed on another mesh than the one that wrote the checkpoint: restore reshards.
    result = ok(run_train(PRETRAIN, model_dir, "TRAIN_STEPS=25", "CHECKPOINT_PERIOD=10", "LOG_PERIOD=1",
                          "make_mesh.data=2", "make_mesh.tensor=2"))
    assert "checkpoint step 20" in result.stderr and "unreadable" in result.stderr
    assert "step 10" in result.stderr
    assert max(train_losses(model_dir)) == 25


def test_nonfinite_loss_stops_and_names_step_and_checkpoint(tmp_path):
    model_dir = str(tmp_path / "nan")
    result = run_train(PRETRAIN, model_dir, "TRAIN_STEPS=20", "LOG_PERIOD=1", "CHECKPOINT_PERIOD=1",
                       "learning_rate_schedule.peak_learning_rate=1e30", "learning_rate_schedule.warmup_fraction=0.0")
    assert result.returncode != 0
    import re
    match = re.search(r"non-finite loss or gradient at step (\d+).*Last good checkpoint: step (\d+)", result.stderr)
    assert match, result.stderr[-3000:]
    bad_step, good = int(match.group(1)), int(match.group(2))
    assert good < bad_step and all(s < bad_step for s in checkpoint_steps(model_dir))
    import orbax.checkpoint as ocp
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore(os.path.join(model_dir, "checkpoints", str(good), "params"))
    assert all(np.isfinite(np.asarray(v)).all() for _, v in _leaves_with_path(params))


def test_mesh_2x2x2_matches_single_device(tmp_path):
    common = ["TRAIN_STEPS=4", "LOG_PERIOD=1", "EVAL_PERIOD=1000", "CHECKPOINT_PERIOD=1000"]
    sharded = str(tmp_path / "sharded")
    ok(run_train(PRETRAIN, sharded, *common, "make_mesh.data=2", "make_mesh.fsdp=2", "make_mesh.tensor=2"))
    single = str(tmp_path / "single")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    ok(run_train(PRETRAIN, single, *common, env=env))
    a, b = train_losses(sharded), train_losses(single)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # float32 reductions in a different order: agreement to ~1e-5 relative
        assert a[step] == pytest.approx(b[step], rel=1e-4), (step, a[step], b[step])


def test_help_lists_flags_macros_and_an_example():
    result = subprocess.run([sys.executable, "-m", "t5x_cpt.train", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for expected in ("--gin_file", "--coordinator_address", "--process_count", "--process_index",
                     "--initialization_timeout", "TRAIN_STEPS", "REQUIRED", "SOURCE_CHECKPOINT",
                     "REPLAY_RATIO", "configs/runs/cpt.gin", "tiny_pretrain.gin", "143"):
        assert expected in result.stdout, expected


def test_model_dir_that_is_a_file_is_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = run_train(PRETRAIN, str(afile), "TRAIN_STEPS=2")
    assert result.returncode == 2
    assert "is an existing file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_mistyped_macro_is_refused_naming_the_closest(tmp_path):
    result = run_train(PRETRAIN, str(tmp_path / "x"), "TRAIN_STEPZ=3")
    assert result.returncode == 2
    assert "TRAIN_STEPZ" in result.stderr and "TRAIN_STEPS" in result.stderr
    assert not os.path.exists(tmp_path / "x")


def test_a_step_that_cannot_fit_in_memory_is_refused_before_compiling(tmp_path):
    start = time.time()
    result = run_train(PRETRAIN, str(tmp_path / "x"), "SEQUENCE_LENGTH=100000")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the train step needs an estimated" in result.stderr and "GiB" in result.stderr
    assert not os.path.exists(tmp_path / "x")  # refused before anything is written
    assert time.time() - start < 120


def test_run_kind_and_source_checkpoint_must_agree(tmp_path):
    result = run_train(PRETRAIN, str(tmp_path / "x"), "TRAIN_STEPS=2", f"train.source_checkpoint='{tmp_path}'")
    assert result.returncode == 2
    assert "run_kind='source'" in result.stderr and "configs/runs/cpt.gin" in result.stderr


def test_bad_binding_names_it(tmp_path):
    result = run_train(PRETRAIN, str(tmp_path / "x"), "ModelConfig.not_a_field=3")
    assert result.returncode != 0
    assert "ModelConfig.not_a_field" in result.stderr


def test_missing_source_checkpoint_is_named(tmp_path):
    missing = str(tmp_path / "does_not_exist")
    result = run_train(CPT, str(tmp_path / "x"), f"SOURCE_CHECKPOINT='{missing}'")
    assert result.returncode != 0
    assert missing in result.stderr and "does not exist" in result.stderr


def test_model_dir_of_another_model_is_refused(tmp_path):
    model_dir = str(tmp_path / "other")
    ok(run_train(PRETRAIN, model_dir, "TRAIN_STEPS=2", "CHECKPOINT_PERIOD=2"))
    result = run_train(PRETRAIN, model_dir, "TRAIN_STEPS=4", "ModelConfig.d_ff=96")
    assert result.returncode != 0
    assert "belongs to a different model" in result.stderr and "d_ff" in result.stderr


def test_source_with_other_architecture_is_refused(source_dir, tmp_path):
    result = run_train(CPT, str(tmp_path / "x"), f"SOURCE_CHECKPOINT='{source_dir}'", "ModelConfig.num_layers=3")
    assert result.returncode != 0
    assert "different architecture" in result.stderr and "num_layers" in result.stderr
