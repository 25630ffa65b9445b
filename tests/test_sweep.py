"""The sweep runner: every sweep file's dry run, the tiny sweep end to end, a SIGKILL mid-sweep and
the re-run that continues it, --print_commands, and the bad inputs refused before any training.

Sweeps that train run in subprocesses (`python -m t5x_cpt.sweep`), so kills and exit codes are a
user's. They run on one fake CPU device (sharding is tested elsewhere; one device compiles several
times faster) with a persistent JAX compilation cache shared by this module's sweeps, so the second
copy of the tiny sweep reuses the first one's compiled steps. Dry runs, --print_commands and bad
inputs run in-process through `t5x_cpt.sweep.cli.main`.
"""

import csv
import glob
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from t5x_cpt import checkpoints, run_dir
from t5x_cpt.sweep import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/sweeps/tiny_sweep.gin"
SWEEP_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "configs", "sweeps", "*.gin")))
# The tiny sweep's runs (configs/sweeps/tiny_sweep.gin), in launch order, with their TRAIN_STEPS.
TINY_RUNS = {"source_en_tiny_16steps": 16, "scratch_zh_tiny_8steps": 8, "cpt_zh_tiny_8steps_r25": 8,
             "scratch_zh_tiny_16steps": 16, "cpt_zh_tiny_16steps_r25": 16}


@pytest.fixture(scope="module")
def sweep_env(tmp_path_factory):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                + ["--xla_force_host_platform_device_count=1"])
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def sweep_cmd(output_dir, *flags):
    return [sys.executable, "-m", "t5x_cpt.sweep", f"--gin_file={TINY}", f"--output_dir={output_dir}", *flags]


def finished_steps(model_dir):
    root = os.path.join(model_dir, "checkpoints")
    return checkpoints.available_steps(root) if os.path.isdir(root) else []


def eval_records(model_dir):
    return [r for r in run_dir.read_metrics(model_dir) if any(k.startswith("eval/") for k in r)]


def file_digests(directory):
    """{relative path: (sha256, mtime)} of every file under `directory`."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sweep_env):
    """The tiny sweep run end to end, uninterrupted: (output dir, the sweep's log)."""
    output_dir = str(tmp_path_factory.mktemp("reference"))
    started = time.time()
    result = ok(subprocess.run(sweep_cmd(output_dir), cwd=REPO, env=sweep_env, capture_output=True, text=True,
                               timeout=900))
    print(f"reference tiny sweep: {time.time() - started:.0f}s")
    return output_dir, result.stderr + result.stdout


def test_tiny_sweep_trains_every_run_and_writes_the_analysis(reference):
    output_dir, log = reference
    for name, steps in TINY_RUNS.items():
        assert finished_steps(os.path.join(output_dir, name))[-1] == steps, name
    info = run_dir.read_run_info(os.path.join(output_dir, "cpt_zh_tiny_16steps_r25"))
    assert (info["run_kind"], info["language"], info["replay_ratio"], info["train_steps"]) == ("cpt", "zh", 0.25, 16)
    assert info["source_checkpoint"].rstrip("/").endswith("source_en_tiny_16steps")
    # Progress lines count runs and give an ETA once a run of this session has finished.
    assert "sweep: 5/5 runs finished, 100.0% of the FLOPs" in log
    assert re.search(r"sweep: 2/5 runs finished, [0-9.]+% of the FLOPs, ETA \d+m\d\ds", log)

    analysis = os.path.join(output_dir, "analysis", "tiny_sweep")
    with open(os.path.join(analysis, "runs.csv")) as f:
        rows = list(csv.DictReader(f))
    by_run = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    assert set(by_run) == set(TINY_RUNS)
    # Each target run contributes its intermediate evaluations: its target-language loss at each
    # evaluated step after 0, with D = target tokens only (a quarter of CPT r25's tokens are English).
    for name in TINY_RUNS:
        if name.startswith("source"):
            continue
        metrics = {r["step"]: r for r in eval_records(os.path.join(output_dir, name)) if r["step"] > 0}
        got = by_run[name]
        assert sorted(int(float(r["step"])) for r in got) == sorted(metrics), name
        for row in got:
            record = metrics[int(float(row["step"]))]
            assert float(row["loss"]) == pytest.approx(record["eval/lo_help_zh/loss"], rel=1e-12)
            assert float(row["D"]) == pytest.approx(record["tokens/lo_help_zh"], rel=1e-12)
            assert row["language"] == "zh" and row["run_kind"] == name.split("_")[0]
    r25 = by_run["cpt_zh_tiny_16steps_r25"][-1]
    assert 0.6 < float(r25["D"]) / float(r25["tokens"]) < 0.9
    with open(os.path.join(analysis, "source_loss.csv")) as f:
        english = [r for r in csv.DictReader(f) if r["run"] == "cpt_zh_tiny_16steps_r25"]
    final_en = eval_records(os.path.join(output_dir, "cpt_zh_tiny_16steps_r25"))[-1]["eval/lo_help_en/loss"]
    assert float(english[-1]["loss"]) == pytest.approx(final_en, rel=1e-12)

    report = open(os.path.join(analysis, "report.md")).read()
    for name in TINY_RUNS:
        assert f"| {name} |" in report
    assert "python -m t5x_cpt.sweep --gin_file=configs/sweeps/tiny_sweep.gin" in report and "--analyse_only" in report
    assert os.path.getsize(os.path.join(analysis, "zh", "curves.png")) > 10_000
    # Fits the runs support are written; the ones they do not are reported with the toolkit's reason.
    assert "### Scaling laws" in report and "### Forgetting" in report
    scaling = os.path.join(analysis, "zh", "scaling.json")
    assert os.path.exists(scaling) or "Not available: " in report
    if os.path.exists(scaling):
        assert json.load(open(scaling))["scratch_fit"]["n_points"] > 0


def test_print_commands(tmp_path, capsys):
    assert cli.main([f"--gin_file={TINY}", f"--output_dir={tmp_path}", "--print_commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert lines[0].startswith("# stage 1: source runs") and lines[2].startswith("# stage 2")
    dirs = []
    for argv in commands:
        assert argv[:3] == ["python", "-m", "t5x_cpt.train"]
        files = [a.split("=", 1)[1] for a in argv if a.startswith("--gin_file=")]
        assert files[0] == "configs/models/tiny.gin" and files[-1] == "configs/experiments/tiny_budget.gin"
        model_dir = next(a for a in argv if a.startswith("--gin.MODEL_DIR="))
        dirs.append(json.loads(model_dir.split("=", 1)[1]))
    assert [os.path.basename(d) for d in dirs] == list(TINY_RUNS)
    assert all(os.path.dirname(d) == str(tmp_path) for d in dirs)
    assert not os.listdir(tmp_path), "--print_commands must not create anything"
    cpt = commands[list(TINY_RUNS).index("cpt_zh_tiny_16steps_r25")]
    assert f'--gin.SOURCE_CHECKPOINT="{tmp_path}/source_en_tiny_16steps"' in cpt
    assert "--gin.REPLAY_RATIO=0.25" in cpt and "--gin.TRAIN_STEPS=16" in cpt
    # The same sweep prints the same commands; --only keeps the runs named and the source they need.
    assert cli.main([f"--gin_file={TINY}", f"--output_dir={tmp_path}", "--print_commands"]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    assert cli.main([f"--gin_file={TINY}", f"--output_dir={tmp_path}", "--print_commands", "--only=8steps_r25$"]) == 0
    only = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert [os.path.basename(json.loads(next(a for a in c if "MODEL_DIR" in a).split("=", 1)[1])) for c in only] == \
        ["source_en_tiny_16steps", "cpt_zh_tiny_8steps_r25"]
    # The CPT recipe's own bindings reach CPT runs only, before a variant's (which win).
    sweep = _sweep_file(tmp_path, "Sweep.cpt_bindings = {'learning_rate_schedule.peak_learning_rate': 5e-4}",
                        "Sweep.variants = {'hot': {'learning_rate_schedule.peak_learning_rate': 2e-3}}")
    assert cli.main([f"--gin_file={sweep}", f"--output_dir={tmp_path / 'out'}", "--print_commands"]) == 0
    printed = {os.path.basename(json.loads(next(a for a in c if "MODEL_DIR" in a).split("=", 1)[1])): c
               for c in (shlex.split(l) for l in capsys.readouterr().out.splitlines() if not l.startswith("#"))}
    lr = lambda argv: [a for a in argv if "peak_learning_rate" in a]  # noqa: E731
    assert lr(printed["cpt_zh_tiny_8steps_r25"]) == ["--gin.learning_rate_schedule.peak_learning_rate=0.0005"]
    assert lr(printed["cpt_zh_tiny_8steps_r25_hot"])[-1] == "--gin.learning_rate_schedule.peak_learning_rate=0.002"
    assert lr(printed["scratch_zh_tiny_8steps"]) == [] and lr(printed["source_en_tiny_16steps"]) == []


def test_killed_sweep_continues_where_it_stopped(reference, tmp_path, sweep_env, capsys):
    reference_dir, _ = reference
    output_dir = str(tmp_path / "sweep")
    # The source run is trained by the command --print_commands prints, as on a cluster; the sweep must
    # then recognise it as its own finished run.
    assert cli.main([f"--gin_file={TINY}", f"--output_dir={output_dir}", "--print_commands"]) == 0
    source_line = capsys.readouterr().out.splitlines()[1]
    argv = shlex.split(source_line)
    ok(subprocess.run([sys.executable, *argv[1:]], cwd=REPO, env=sweep_env, capture_output=True, text=True,
                      timeout=600))

    proc = subprocess.Popen(sweep_cmd(output_dir), cwd=REPO, env=sweep_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    targets = [n for n in TINY_RUNS if not n.startswith("source")]
    deadline = time.time() + 600
    interrupted = None
    while time.time() < deadline and proc.poll() is None:
        states = {n: finished_steps(os.path.join(output_dir, n)) for n in targets}
        done = [n for n in targets if states[n] and states[n][-1] == TINY_RUNS[n]]
        partial = [n for n in targets if states[n] and states[n][-1] < TINY_RUNS[n]]
        if done and partial:
            proc.send_signal(signal.SIGKILL)
            interrupted = partial[0]
            break
        time.sleep(0.02)
    proc.wait()
    assert interrupted is not None, "the kill must land while a run is between checkpoints"
    finished = ["source_en_tiny_16steps"] + [n for n in targets if finished_steps(os.path.join(output_dir, n))[-1:]
                                              == [TINY_RUNS[n]]]
    kept = {n: file_digests(os.path.join(output_dir, n)) for n in finished}
    kept_metrics = {n: kept[n]["metrics.jsonl"] for n in finished}
    resume_step = finished_steps(os.path.join(output_dir, interrupted))[-1]

    # Without the fits (the reference tests them): this re-run is about continuing.
    rerun = ok(subprocess.run(sweep_cmd(output_dir, "--gin.Sweep.analyses=[]"), cwd=REPO, env=sweep_env,
                              capture_output=True, text=True, timeout=900))
    log = rerun.stderr
    for name in finished:  # not retrained: their metrics, checkpoints and config are untouched
        assert file_digests(os.path.join(output_dir, name))["metrics.jsonl"] == kept_metrics[name], name
        after = file_digests(os.path.join(output_dir, name))
        assert {k: v for k, v in after.items() if not k.startswith("events")} == \
            {k: v for k, v in kept[name].items() if not k.startswith("events")}, name
    assert re.search(rf"run \d/5 {interrupted} \(resuming from step {resume_step},", log), log[-3000:]
    assert f"resuming from {os.path.join(output_dir, interrupted, 'checkpoints')} step {resume_step}" in log
    # Everything ends as in the uninterrupted sweep: resumption is exact.
    for name in TINY_RUNS:
        assert finished_steps(os.path.join(output_dir, name))[-1] == TINY_RUNS[name]
        mine, theirs = eval_records(os.path.join(output_dir, name)), eval_records(os.path.join(reference_dir, name))
        assert [r["step"] for r in mine] == [r["step"] for r in theirs], name
        for a, b in zip(mine, theirs):
            for key in (k for k in a if k.startswith("eval/")):
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (name, a["step"], key)


@pytest.mark.parametrize("path", SWEEP_FILES)
def test_dry_run_builds_and_checks_every_run(path, tmp_path, capsys):
    assert cli.main([f"--gin_file={path}", f"--output_dir={tmp_path}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines()
            if len(line.split("|")) == 10 and not line.startswith(("| run ", "| ---"))]
    assert rows, out
    assert not os.listdir(tmp_path), "--dry_run must not create anything"
    for name, kind, n, listed, steps, shape, tokens, run_flops in ([c.strip() for c in row] for row in rows):
        n, steps, tokens, run_flops = int(n.replace(",", "")), int(steps.replace(",", "")), int(tokens.replace(",", "")), float(run_flops)
        batch, length = (int(x) for x in shape.split(" x "))
        assert tokens == steps * batch * length and run_flops > 6 * n * tokens
        if listed:  # a ladder size: the paper's listed N = 16 L d^2 + 32000 d, independently from the file
            millions = int(re.search(r"ladder_(\d+)m", name).group(1))
            assert abs(n - int(listed.replace(",", ""))) <= 0.01 * int(listed.replace(",", ""))
            assert abs(n - millions * 1e6) <= max(0.01 * millions * 1e6, 1e6)
        if os.path.basename(path).startswith("paper_"):
            # The paper's recipe: context 2048, 20 N tokens, 1M/2M/4M-token batches by size.
            assert length == 2048 and abs(tokens - 20 * n) <= batch * length / 2
            assert batch * length == (2 ** 20 if n < 1e9 else 2 ** 21 if n < 2.6e9 else 2 ** 22)
    names = [row[0].strip() for row in rows]
    assert len(names) == len(set(names))
    if path.endswith("paper_ladder.gin"):
        assert len(rows) == 126 and sum(1 for r in rows if r[3].strip()) == 126
    if path.endswith("paper_replay.gin"):
        assert sorted(re.search(r"_r([0-9.]+)$", n).group(1) for n in names if n.startswith("cpt")) == \
            sorted(["0", "1", "5", "10", "20", "50", "80"])


def _sweep_file(tmp_path, *lines):
    path = tmp_path / "sweep.gin"
    path.write_text("\n".join(["include 'sweeps/tiny_sweep.gin'", *lines]) + "\n")
    return str(path)


def _refused(capsys, argv, *expected):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("t5x_cpt.sweep: error: ") and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_unknown_size_is_refused(tmp_path, capsys):
    sweep = _sweep_file(tmp_path, "Sweep.sizes = ['models/tiny.gin', 'models/no_such_size.gin']")
    _refused(capsys, [f"--gin_file={sweep}", f"--output_dir={tmp_path / 'out'}"], "no_such_size.gin", "not found")
    assert not (tmp_path / "out").exists()


def test_cpt_source_neither_in_sweep_nor_on_disk_is_refused(tmp_path, capsys):
    missing = tmp_path / "no_source_here"
    sweep = _sweep_file(tmp_path, f"Sweep.sources = {{'tiny': '{missing}'}}")
    _refused(capsys, [f"--gin_file={sweep}", f"--output_dir={tmp_path / 'out'}"], str(missing),
             "neither a run of this sweep nor an existing directory")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line", ["Sweep.replay = [0.25, 0.25]",
                                  "Sweep.sizes = ['models/tiny.gin', 'configs/models/tiny.gin']"])
def test_duplicate_run_names_are_refused(line, tmp_path, capsys):
    sweep = _sweep_file(tmp_path, line)
    _refused(capsys, [f"--gin_file={sweep}", f"--output_dir={tmp_path / 'out'}", "--dry_run"], "duplicate run name")


def test_bad_sweep_values_are_named(tmp_path, capsys):
    sweep = _sweep_file(tmp_path, "Sweep.replay = [1.5]")
    _refused(capsys, [f"--gin_file={sweep}", "--dry_run"], "Sweep.replay[0]", "[0, 1)")
    sweep = _sweep_file(tmp_path, "Sweep.budgets = [{'epochs': 3}]")
    _refused(capsys, [f"--gin_file={sweep}", "--dry_run"], "Sweep.budgets[0]")
    _refused(capsys, [f"--gin_file={TINY}", "--dry_run", "--gin.Sweep.sizez=[]"], "sizez", "did you mean sizes")
    sweep = _sweep_file(tmp_path, "Sweep.held_out_replay = 0.3")
    _refused(capsys, [f"--gin_file={sweep}", "--dry_run"], "Sweep.held_out_replay=0.3", "[0.25]")
    sweep = _sweep_file(tmp_path, "Sweep.replay_tolerance = -0.1")
    _refused(capsys, [f"--gin_file={sweep}", "--dry_run"], "Sweep.replay_tolerance")
    sweep = _sweep_file(tmp_path, "Sweep.analyses = ['mixtures']")
    _refused(capsys, [f"--gin_file={sweep}", "--dry_run"], "'mixture'")


def test_model_dir_of_another_configuration_is_refused_and_left_alone(reference, tmp_path, capsys):
    reference_dir, _ = reference
    before = file_digests(reference_dir)
    err = _refused(capsys, [f"--gin_file={TINY}", f"--output_dir={reference_dir}",
                            "--gin.Sweep.run_bindings={'LOG_PERIOD': 4, 'CHECKPOINT_PERIOD': 4, "
                            "'make_optimizer.weight_decay': 0.0}"],
                   "source_en_tiny_16steps", "holds a run of another configuration",
                   "make_optimizer.weight_decay: stored 0.1, planned 0.0")
    assert "Nothing was changed" in err
    assert file_digests(reference_dir) == before
    # Logging and checkpoint periods are not the run's identity: the same sweep with others is accepted.
    assert cli.main([f"--gin_file={TINY}", f"--output_dir={reference_dir}", "--dry_run",
                     "--gin.Sweep.run_bindings={'LOG_PERIOD': 2, 'CHECKPOINT_PERIOD': 8}"]) == 0


def test_run_dir_with_checkpoints_but_no_config_is_refused(tmp_path, capsys):
    os.makedirs(tmp_path / "out" / "source_en_tiny_16steps" / "checkpoints" / "4")
    _refused(capsys, [f"--gin_file={TINY}", f"--output_dir={tmp_path / 'out'}", "--dry_run"],
             "source_en_tiny_16steps", "holds checkpoints but no config.gin")


def test_ladder_check_refuses_a_binding_that_changes_n(tmp_path, capsys):
    sweep = tmp_path / "ladder.gin"
    sweep.write_text("include 'sweeps/paper_replay.gin'\n"
                     "Sweep.run_bindings = {'get_vocabulary.name': 'byte', 'ModelConfig.tie_embeddings': False}\n")
    _refused(capsys, [f"--gin_file={sweep}", f"--output_dir={tmp_path / 'out'}", "--dry_run"],
             "ladder_1393m", "lists 1,393,")


def test_dry_run_sizes_slices_and_hours_at_the_assumed_mfu(tmp_path, capsys):
    assert cli.main(["--gin_file=configs/sweeps/paper_replay.gin", f"--output_dir={tmp_path}", "--dry_run",
                     "--chip=v5p", "--assumed_mfu=0.5"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| ladder_1393m |"))
    size, n, runs, run_flops, slice_, hours, chip_hours = [c.strip() for c in row.split("|")[1:-1]]
    chips = int(re.fullmatch(r"v5p-(\d+) \((\d+)\)", slice_).group(2))
    assert int(re.fullmatch(r"v5p-(\d+) \((\d+)\)", slice_).group(1)) == 2 * chips  # v5p names count TensorCores
    assert chips & (chips - 1) == 0 and int(runs) == 8
    expected = float(run_flops) / (chips * 459e12 * 0.5) / 3600
    assert float(hours) == pytest.approx(expected, rel=0.006, abs=0.051)  # FLOPs printed to 3 digits
    assert float(chip_hours.replace(",", "")) == pytest.approx(expected * chips, rel=0.01)
    assert "ASSUMED MFU of 50%" in out


def test_language_comparison_sets_savings_against_distance(tmp_path):
    """F4's table: distances measured on the corpus, savings taken from each language's analysis."""
    from t5x_cpt.sweep import analyse, report, spec as sweep_spec

    sweep = _sweep_file(tmp_path, "Sweep.targets = {'fr': 'lo_help_fr', 'zh': 'lo_help_zh'}",
                        "Sweep.analyses = ['scaling', 'languages']")
    spec = sweep_spec.read_sweep([sweep])
    saved = {"fr": 0.6, "zh": -0.1}
    sections = {lang: {"scaling": {"savings": {"runs": [
        {"run": f"cpt_{lang}_tiny", "N": 1000.0, "final": {"saved_fraction": 0.95},
         "at_scratch_end": {"saved_fraction": saved[lang], "method": "cpt_reaches_scratch"},
         **({"at_scratch_quarter": {"saved_fraction": 0.7, "method": "at_least"}} if lang == "fr" else {})}]}}}
        for lang in saved}
    rows = [{"run": f"cpt_{lang}_tiny", "language": lang, "run_kind": "cpt", "loss0": 3.0 + len(lang)}
            for lang in saved]
    result = analyse.compare_languages(spec, sections, rows, str(tmp_path))
    by_lang = result["languages"]
    assert by_lang["fr"]["unseen_bigram_share"] < 0.15 < 0.6 < by_lang["zh"]["unseen_bigram_share"]
    assert result["rank_correlation"] == {}  # two languages: no correlation to speak of
    written = json.loads((tmp_path / "languages.json").read_text())
    assert written["languages"]["zh"]["cpt_runs"][0] == {"run": "cpt_zh_tiny", "N": 1000.0, "saved_fraction": -0.1,
                                                         "saved_method": "cpt_reaches_scratch",
                                                         "saved_fraction_early": None, "saved_early_method": None,
                                                         "source_model_loss": 5.0}
    assert written["languages"]["fr"]["cpt_runs"][0]["saved_fraction_early"] == 0.7
    text = "\n".join(report._languages_lines(result, spec, str(tmp_path)))
    assert text.index("| fr |") < text.index("| zh |") and "| n/a | -10.0% | CPT reached" in text and "| >= 70.0% | 60.0% |" in text
    assert os.path.exists(tmp_path / "languages.png")


def test_replay_cost_compares_ratios_at_equal_target_and_equal_total_tokens(tmp_path):
    """F5's 'replay is free at equal target compute': a loss that depends only on target tokens D
    gives one value per ratio at equal D and the displaced tokens' cost at equal total tokens."""
    from t5x_cpt.sweep import analyse, report

    def loss(d):
        return 5.0 - d / 10_000.0  # linear in D, so interpolation between evals is exact

    rows = []
    for ratio in (0.0, 0.5, 0.8):
        for step in range(1, 11):
            tokens = 1000.0 * step
            d = tokens * (1 - ratio)
            rows.append({"run": f"cpt_r{ratio}", "N": 5e5, "replay_ratio": ratio, "D": d, "tokens": tokens,
                         "flops": 6 * 5e5 * tokens, "loss": loss(d), "loss0": 5.0})
    # A second size with a single ratio has nothing to compare and is left out.
    rows.append({"run": "cpt_other", "N": 1e6, "replay_ratio": 0.0, "D": 10.0, "tokens": 10.0, "flops": 1.0,
                 "loss": 4.0, "loss0": 5.0})
    result = analyse.replay_at_equal_compute(rows, str(tmp_path / "replay.png"))
    assert list(result["sizes"]) == ["500000"]
    size = result["sizes"]["500000"]
    assert size["equal_target_tokens"] == pytest.approx(2000.0) and size["equal_total_tokens"] == 10_000.0
    for ratio, entry in size["by_replay_ratio"].items():
        assert entry["loss_at_equal_target_tokens"] == pytest.approx(loss(2000.0))
        assert entry["loss_at_equal_total_tokens"] == pytest.approx(loss(10_000.0 * (1 - float(ratio))))
        # Replay cost nothing per target token: the 0% run at the same D has the same loss.
        assert entry["base_loss_at_final_target_tokens"] == pytest.approx(loss(10_000.0 * (1 - float(ratio))))
        assert entry["final_minus_base"] == pytest.approx(0.0, abs=1e-12)
    assert size["spread_at_equal_target_tokens"] == pytest.approx(0.0, abs=1e-12)
    assert size["spread_at_equal_total_tokens"] == pytest.approx(0.8)
    # Between evaluations, and before the first one (the step-0 loss is the point at 0 tokens).
    early = analyse.replay_at_equal_compute([r for r in rows if r["run"] != "cpt_r0.8" and r["tokens"] != 1000.0
                                             or r["run"] == "cpt_r0.8" and r["tokens"] == 1000.0])
    assert early["sizes"]["500000"]["equal_target_tokens"] == pytest.approx(200.0)
    assert early["sizes"]["500000"]["by_replay_ratio"]["0"]["loss_at_equal_target_tokens"] == pytest.approx(loss(200.0))
    text = "\n".join(report._replay_cost_lines(result, str(tmp_path)))
    assert "| 0 | 4.8 | 4 | 4 | 1e+04 | 4 | 0 |" in text and "| 0.8 | 4.8 | 4.8 | 4.8 | 2000 | 4.8 | 0 |" in text and os.path.exists(tmp_path / "replay.png")


def _law_free_saving() -> dict:
    """savings.saving_at_scratch_point's entry for a CPT run that is a scratch run at twice its tokens."""
    from t5x_cpt.scaling import savings
    from t5x_cpt.scaling.tables import from_rows

    rows = [{"N": 1e6, "D": d, "loss": 10 * (shift * d) ** -0.2, "run_kind": kind, "run": kind}
            for kind, shift in (("scratch", 1.0), ("cpt", 2.0)) for d in (1e3, 1e4, 1e5)]
    return savings.savings(from_rows(rows))["runs"][0]["at_scratch_end"]


def test_scaling_section_shows_table_3_and_allocation_intervals():
    """F2 and F3 read off report.md: both laws' in-sample and held-out errors, and the bootstrap
    intervals of the allocation exponents."""
    from t5x_cpt.sweep import report

    result = {
        "scratch_fit": {"E": 1.0, "bootstrap": {"level": 0.9, "n": 180, "intervals": {"a": [0.41, 0.62],
                                                                                       "b": [0.38, 0.59]}}},
        "allocation": {"scratch": {"N_opt_formula": "N_opt = 0.1 * C^0.5", "D_opt_formula": "D_opt = 1.6 * C^0.5"},
                       "cpt": {"error": "beta >= alpha"}},
        "compare": {"holdout": 1, "verdict": {"cpt": "lowest extrapolation error on the held-out largest sizes: x"},
                    "fit_errors": {"cpt": {"chinchilla": {"rms_log_residual": 0.031, "huber_mean": 2e-4},
                                           "cpt_law_two_stage": {"rms_log_residual": 0.012, "huber_mean": 5e-5}}},
                    "extrapolation": {"cpt": {"held_out_sizes": [4e6],
                                              "chinchilla": {"mean_abs_rel_error": 0.05, "rms_log_residual": 0.06},
                                              "cpt_law_two_stage": {"mean_abs_rel_error": 0.02,
                                                                    "rms_log_residual": 0.025}}}},
    }
    result["savings"] = {"runs": [{"run": "cpt_zh_d64", "final": {"saved_fraction": 0.2, "transferred_tokens": 5e4,
                                                                 "D": 6e5},
                                   "along": [{"D": 5e4, "saved_fraction": 0.5, "method": "interpolated"},
                                             {"D": 1e5, "saved_fraction": None, "method": "out_of_range"},
                                             {"D": 6e5, "saved_fraction": 0.2, "method": "law"}],
                                   "at_scratch_end": _law_free_saving(),
                                   "transferred_vs_tokens": {"slope": 0.05, "r2": 0.9}}]}
    text = "\n".join(report._scaling_lines(result, "/nonexistent"))
    assert ("  - cpt_zh_d64: saved 50.0% at the scratch run's final loss 1 (CPT reached scratch's loss; "
            "no law involved)") in text
    assert ("  - cpt_zh_d64: saved 0.2 of the compute, 5e+04 tokens transferred at D = 6e+05; along training saved "
            "0.5, 0.2 (D = 5e+04 to 6e+05; points past the scratch run's final loss from the scratch law); "
            "transferred tokens against D: slope 0.05, R^2 0.9") in text
    assert ("- allocation (scratch): N_opt = 0.1 * C^0.5, D_opt = 1.6 * C^0.5; 90% bootstrap intervals over runs "
            "(180 replicates): a in [0.41, 0.62], b in [0.38, 0.59]") in text
    assert "- allocation (cpt): beta >= alpha" in text
    assert "| cpt | chinchilla | 0.031 | 0.0002 | 0.05 | 0.06 |" in text
    assert "| cpt | cpt_law_two_stage | 0.012 | 5e-05 | 0.02 | 0.025 |" in text
    assert "- cpt runs: lowest extrapolation error" in text
