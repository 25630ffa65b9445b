"""Training runs whose MODEL_DIR and SOURCE_CHECKPOINT are gs:// URLs, against a real GCS JSON API on
localhost (fake-gcs-server, tests/gcs_emulator.py): the user's command, in subprocesses."""

import json
import os
import subprocess
import sys
import time

import pytest
from gcs_emulator import gcs_dir, gcs_emulator  # noqa: F401  (pytest fixtures)

from t5x_cpt import run_dir
from t5x_cpt.scaling import collect

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "configs/experiments/tiny_pretrain.gin"
CPT = "configs/experiments/tiny_cpt.gin"


def train(gin_file, model_dir, emulator, *bindings, timeout=600):
    command = [sys.executable, "-m", "t5x_cpt.train", f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'",
               *[f"--gin.{b}" for b in bindings]]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **emulator.env}, capture_output=True, text=True,
                          timeout=timeout)


def ok(result):
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def test_a_run_directory_on_gcs_trains_resumes_and_feeds_cpt_and_scaling(gcs_emulator, gcs_dir):
    source, cpt = f"{gcs_dir}/source", f"{gcs_dir}/cpt"
    ok(train(PRETRAIN, source, gcs_emulator, "TRAIN_STEPS=4", "CHECKPOINT_PERIOD=2", "EVAL_PERIOD=4",
             "LOG_PERIOD=1"))
    names = set(gcs_emulator.object_names(source))
    prefix = source.removeprefix("gs://").partition("/")[2]
    for expected in ("config.gin", "run_info.json", "metrics.jsonl", "model_config.json",
                     "checkpoints/2/commit_success.txt", "checkpoints/4/commit_success.txt"):
        assert f"{prefix}/{expected}" in names, sorted(names)[:40]
    assert any(n.startswith(f"{prefix}/events/") for n in names)

    # The same command with a longer budget resumes from the gs:// checkpoint.
    resumed = ok(train(PRETRAIN, source, gcs_emulator, "TRAIN_STEPS=6", "CHECKPOINT_PERIOD=2", "EVAL_PERIOD=6",
                       "LOG_PERIOD=1"))
    assert "init resume from step 4" in resumed.stderr
    records = run_dir.read_metrics(source)
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]

    # CPT from a gs:// source: the step-0 eval equals the source's final eval (same weights, same data).
    ok(train(CPT, cpt, gcs_emulator, f"SOURCE_CHECKPOINT='{source}'", "TRAIN_STEPS=2", "CHECKPOINT_PERIOD=2",
             "LOG_PERIOD=1"))
    final = [r for r in records if r["step"] == 6][0]
    step0 = [r for r in run_dir.read_metrics(cpt) if r["step"] == 0][0]
    assert step0["eval/lo_help_zh/loss"] == pytest.approx(final["eval/lo_help_zh/loss"], abs=1e-5)
    info = run_dir.read_run_info(cpt)
    assert info["run_kind"] == "cpt" and info["source_checkpoint"] == source

    # The scaling tools read gs:// run directories too (a glob below the bucket).
    table = collect.collect(f"{gcs_dir}/c*", language="zh")
    assert set(table["run_kind"]) == {"cpt"} and len(table["D"]) == 1


def test_a_missing_bucket_is_refused_quickly_and_writes_nothing(gcs_emulator):
    start = time.time()
    result = train(PRETRAIN, "gs://no-such-bucket-t5x/run", gcs_emulator, "TRAIN_STEPS=2", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "bucket gs://no-such-bucket-t5x does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.time() - start < 120


def test_metrics_on_gcs_are_whole_objects_never_appended(gcs_emulator, gcs_dir):
    """What the trainer flushes is one object; a resumed run's rewrite drops the killed run's tail."""
    directory = run_dir.RunDir(gcs_dir)
    directory.prepare()
    log = run_dir.MetricsLog(directory)
    log.open(resume_step=-1)
    for step in (1, 2, 3):
        log.write({"step": step})
    log.close()
    log = run_dir.MetricsLog(directory)
    log.open(resume_step=2)
    log.close()
    assert [r["step"] for r in run_dir.read_metrics(gcs_dir)] == [1, 2]
    assert not [n for n in gcs_emulator.object_names(gcs_dir) if ".tmp-" in n]
    assert json.loads(run_dir.as_path(f"{gcs_dir}/metrics.jsonl").read_text().splitlines()[-1]) == {"step": 2}
