"""Several processes, one run: real `python -m t5x_cpt.train` processes joined by JAX's distributed
runtime on localhost (gloo CPU collectives, 2 CPU devices each).

Reference: one process with 4 devices and the same logical data sharding (train.data_shards=2),
so the global batches are identical (t5x_cpt/data/logical_shards.py). Tolerance: the per-step
train losses agree to 1e-5 relative — the only difference is the order in which the cross-device
sums are taken (gloo across processes against XLA's in-process all-reduce).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "configs/experiments/tiny_pretrain.gin"
STEPS = ["TRAIN_STEPS=24", "LOG_PERIOD=1", "EVAL_PERIOD=12", "CHECKPOINT_PERIOD=4", "train.data_shards=2",
         "make_mesh.data=2", "make_mesh.fsdp=2", "make_mesh.tensor=1", "train.async_checkpoints=False"]
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env_with_devices(count: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def command(model_dir, bindings, distributed_flags=()):
    return [sys.executable, "-m", "t5x_cpt.train", f"--gin_file={PRETRAIN}", f"--gin.MODEL_DIR='{model_dir}'",
            *[f"--gin.{b}" for b in bindings], *distributed_flags]


def launch(model_dirs, bindings, log_dir, tag, extra_flags=()):
    """One process per entry of model_dirs (normally the same dir), 2 devices each."""
    port = free_port()
    procs = []
    for index, model_dir in enumerate(model_dirs):
        flags = [f"--coordinator_address=localhost:{port}", f"--process_count={len(model_dirs)}",
                 f"--process_index={index}", "--initialization_timeout=120", *extra_flags]
        log = open(os.path.join(log_dir, f"{tag}.{index}.log"), "w")
        procs.append(subprocess.Popen(command(model_dir, bindings, flags), cwd=REPO, env=env_with_devices(2),
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_all(procs, timeout=600):
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(deadline - time.time(), 1))
    return [p.returncode for p in procs]


def logs(log_dir, tag, count):
    return [open(os.path.join(log_dir, f"{tag}.{i}.log")).read() for i in range(count)]


def records(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_losses(model_dir):
    return {r["step"]: r["train/loss"] for r in records(model_dir) if "train/loss" in r}


def eval_losses(model_dir):
    return {(r["step"], k): v for r in records(model_dir) for k, v in r.items() if k.startswith("eval/")}


def checkpoint_steps(model_dir):
    root = os.path.join(model_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def assert_close(got, expected):
    assert sorted(got) == sorted(expected)
    bad = {k: (got[k], expected[k]) for k in expected if got[k] != pytest.approx(expected[k], rel=RTOL)}
    assert not bad, f"differ beyond {RTOL} relative: {bad}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 4 devices, the same mesh and logical data shards."""
    model_dir = str(tmp_path_factory.mktemp("reference") / "run")
    result = subprocess.run(command(model_dir, STEPS), cwd=REPO, env=env_with_devices(4), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return model_dir


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """Two processes killed with SIGKILL after their first checkpoint (step 4 of 24)."""
    base = tmp_path_factory.mktemp("interrupted")
    model_dir = str(base / "run")
    procs = launch([model_dir] * 2, STEPS, str(base), "first")
    deadline = time.time() + 400
    while time.time() < deadline and not checkpoint_steps(model_dir) and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    for signum in (signal.SIGSTOP, signal.SIGKILL):  # freeze both at once, then kill
        for p in procs:
            p.send_signal(signum)
    wait_all(procs)
    saved = checkpoint_steps(model_dir)
    assert saved and saved[-1] < 24, (saved, logs(str(base), "first", 2)[0][-3000:])
    return model_dir, base


def test_two_processes_match_one_process_with_four_devices(reference, tmp_path):
    model_dir = str(tmp_path / "run")
    start = time.time()
    codes = wait_all(launch([model_dir] * 2, STEPS, str(tmp_path), "two"))
    elapsed = time.time() - start
    out = logs(str(tmp_path), "two", 2)
    assert codes == [0, 0], out[0][-3000:] + out[1][-3000:]
    assert_close(train_losses(model_dir), train_losses(reference))
    assert_close(eval_losses(model_dir), eval_losses(reference))  # the global eval set, whatever the hosts
    for i, text in enumerate(out):  # the one line every process logs before the first step
        assert f"process {i}/2: local devices 2, global devices 4, kind cpu" in text
        assert "data=2 fsdp=2 tensor=1" in text
    print(f"two-process run of 24 steps: {elapsed:.1f}s")


def test_both_killed_then_restarted_continue_exactly(reference, interrupted, tmp_path):
    source, _ = interrupted
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    resumed_from = checkpoint_steps(model_dir)[-1]
    codes = wait_all(launch([model_dir] * 2, STEPS, str(tmp_path), "again"))
    out = logs(str(tmp_path), "again", 2)
    assert codes == [0, 0], out[0][-3000:] + out[1][-3000:]
    assert f"init resume from step {resumed_from}" in out[0]
    assert_close(train_losses(model_dir), train_losses(reference))


def test_restart_on_one_process_carries_the_data_position_over(reference, interrupted, tmp_path):
    """2 -> 1 process: the one host reads both logical data shards from their saved positions."""
    source, _ = interrupted
    model_dir = str(tmp_path / "run")
    shutil.copytree(source, model_dir)
    result = subprocess.run(command(model_dir, STEPS), cwd=REPO, env=env_with_devices(4), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "reads logical shards [0, 1] of 2" in result.stderr
    assert_close(train_losses(model_dir), train_losses(reference))


def test_resume_on_a_host_count_that_does_not_divide_the_data_is_refused(tmp_path):
    """A run started on one host (one logical data shard) cannot continue on two."""
    model_dir = str(tmp_path / "run")
    single = [b for b in STEPS if b != "train.data_shards=2"]
    result = subprocess.run(command(model_dir, single + ["TRAIN_STEPS=4"]), cwd=REPO, env=env_with_devices(4),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    codes = wait_all(launch([model_dir] * 2, single, str(tmp_path), "grow"))
    out = logs(str(tmp_path), "grow", 2)
    assert codes == [2, 2], out[0][-3000:]
    for text in out:
        assert "1 logical shard(s)" in text and "2 host data shard(s)" in text, text[-2000:]
    assert checkpoint_steps(model_dir) == [4]


def test_a_killed_peer_ends_the_other_process_naming_it(tmp_path):
    model_dir = str(tmp_path / "run")
    procs = launch([model_dir] * 2, STEPS + ["TRAIN_STEPS=100000", "CHECKPOINT_PERIOD=100000"], str(tmp_path), "peer",
                   extra_flags=["--heartbeat_timeout=10"])
    deadline = time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(os.path.join(model_dir, "metrics.jsonl")) and len(train_losses(model_dir)) >= 2:
            break
        time.sleep(0.1)
    assert all(p.poll() is None for p in procs), logs(str(tmp_path), "peer", 2)[0][-3000:]
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    procs[0].wait(timeout=90)
    waited = time.time() - killed_at
    survivor = logs(str(tmp_path), "peer", 2)[0]
    assert procs[0].returncode != 0
    assert waited < 60, f"the survivor took {waited:.0f}s to stop"
    # Named by the trainer (a failed collective, then the coordination service's list of live
    # processes) or by the coordination service itself, whichever speaks first.
    assert "lost peer process(es) [1]" in survivor or "stopped sending heartbeats):\n1" in survivor, survivor[-2000:]
    print(f"survivor exited {procs[0].returncode} {waited:.1f}s after its peer was killed")


def test_sigterm_on_one_host_saves_the_same_step_on_every_host(tmp_path):
    """JAX's preemption service turns a notice on any host into one step at which all hosts save."""
    model_dir = str(tmp_path / "run")
    bindings = STEPS + ["TRAIN_STEPS=100000", "CHECKPOINT_PERIOD=100000", "EVAL_PERIOD=100000"]
    procs = launch([model_dir] * 2, bindings, str(tmp_path), "preempt")
    deadline = time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(os.path.join(model_dir, "metrics.jsonl")) and len(train_losses(model_dir)) >= 3:
            break
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    codes = wait_all(procs, timeout=300)
    out = logs(str(tmp_path), "preempt", 2)
    assert codes == [143, 143], out[0][-3000:] + out[1][-3000:]
    saved = checkpoint_steps(model_dir)
    assert len(saved) == 1, saved  # one step, saved by both hosts together
    for text in out:
        assert f"every process saves step {saved[0]} and stops" in text


def test_model_dir_that_hosts_do_not_share_is_refused_on_every_process(tmp_path):
    dirs = [str(tmp_path / "host0" / "run"), str(tmp_path / "host1" / "run")]
    codes = wait_all(launch(dirs, STEPS, str(tmp_path), "unshared"))
    out = logs(str(tmp_path), "unshared", 2)
    assert codes == [2, 2], out[0][-3000:]
    for text in out:
        assert "not shared storage" in text
    assert not checkpoint_steps(dirs[0]) and not os.path.exists(os.path.join(dirs[0], "metrics.jsonl"))


@pytest.mark.parametrize("index", [0, 1])
def test_unreachable_coordinator_or_missing_peer_fails_in_bounded_time(index, tmp_path):
    """Process 1 alone: nothing listens at the address. Process 0 alone: the count says 2, one came."""
    flags = [f"--coordinator_address=localhost:{free_port()}", "--process_count=2", f"--process_index={index}",
             "--initialization_timeout=5"]
    start = time.time()
    result = subprocess.run(command(str(tmp_path / "run"), STEPS, flags), cwd=REPO, env=env_with_devices(2),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "could not join the run through the coordinator at localhost:" in result.stderr
    assert f"this is process {index} of 2" in result.stderr
    assert time.time() - start < 90
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("flags, message", [
    (["--process_count=2", "--process_index=0"], "--coordinator_address missing"),
    (["--coordinator_address=localhost:1234", "--process_count=2", "--process_index=2"], "not in 0..1"),
    (["--coordinator_address=nohostport", "--process_count=2", "--process_index=0"], "is not HOST:PORT"),
])
def test_bad_distributed_flags_are_named(flags, message, tmp_path):
    result = subprocess.run(command(str(tmp_path / "run"), STEPS, flags), cwd=REPO, env=env_with_devices(2),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
