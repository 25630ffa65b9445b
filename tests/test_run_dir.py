"""The run directory's files: atomic rewrites, one strict reader, resume truncation, bad paths."""

import json
import os

import pytest

from t5x_cpt import run_dir


def test_write_atomically_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "f.txt"
    run_dir.write_atomically(str(path), "one\n")
    run_dir.write_atomically(str(path), "two\n")
    assert path.read_text() == "two\n"
    assert sorted(os.listdir(tmp_path)) == ["f.txt"]


def test_read_metrics_is_strict_except_for_a_cut_off_last_line(tmp_path):
    path = tmp_path / run_dir.METRICS
    path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x"')
    assert run_dir.read_metrics(str(tmp_path)) == [{"step": 1, "x": 1}]  # a legacy kill mid-append
    path.write_text('{"step": 1}\n{"step": 2, "x"\n{"step": 3}\n')
    with pytest.raises(run_dir.RunDirError, match=r"metrics.jsonl:2: not valid JSON"):
        run_dir.read_metrics(str(tmp_path))
    path.write_text('{"nostep": 1}\n')
    with pytest.raises(run_dir.RunDirError, match=r"metrics.jsonl:1: expected a JSON object with a 'step'"):
        run_dir.read_metrics(str(tmp_path))
    assert run_dir.read_metrics(str(tmp_path / "missing")) == []


def test_metrics_log_drops_records_after_the_resume_step_and_rewrites(tmp_path):
    directory = run_dir.RunDir(str(tmp_path))
    directory.prepare()
    first = run_dir.MetricsLog(directory)
    first.open(resume_step=-1)
    for step in range(1, 6):
        first.write({"step": step, "train/loss": 1.0 / step})
    first.close()
    assert [r["step"] for r in run_dir.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
    resumed = run_dir.MetricsLog(directory)
    resumed.open(resume_step=3)  # the checkpoint the run resumes from
    assert [r["step"] for r in run_dir.read_metrics(str(tmp_path))] == [1, 2, 3]
    resumed.write({"step": 4, "train/loss": 0.1})
    resumed.close()
    lines = (tmp_path / run_dir.METRICS).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads(lines[-1])["train/loss"] == 0.1
    assert os.listdir(tmp_path / run_dir.EVENTS)  # TensorBoard events beside it


def test_metrics_log_on_an_object_store_waits_between_rewrites(tmp_path):
    """flush_interval_s > 0 (the object-store default): records reach the file at flush() only."""
    directory = run_dir.RunDir(str(tmp_path))
    log = run_dir.MetricsLog(directory, flush_interval_s=3600)
    log.open(resume_step=-1)
    log.flush()
    log.write({"step": 1})
    assert run_dir.read_metrics(str(tmp_path)) == []
    log.flush()
    assert run_dir.read_metrics(str(tmp_path)) == [{"step": 1}]
    log.close()


def test_prepare_refuses_a_file_and_an_unwritable_place(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(run_dir.RunDirError, match="is an existing file, not a directory"):
        run_dir.RunDir(str(afile)).prepare()
    with pytest.raises(run_dir.RunDirError, match="cannot be created or written"):
        run_dir.RunDir(str(afile / "below")).prepare()


def test_run_info_round_trip_and_damage(tmp_path):
    directory = run_dir.RunDir(str(tmp_path))
    assert directory.read_run_info() is None
    directory.write_run_info({"run_kind": "cpt", "params": 5})
    assert run_dir.read_run_info(str(tmp_path)) == {"run_kind": "cpt", "params": 5}
    (tmp_path / run_dir.RUN_INFO).write_text("[1]")
    with pytest.raises(run_dir.RunDirError, match="must hold a JSON object"):
        directory.read_run_info()
