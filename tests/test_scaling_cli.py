"""The command line, end to end through subprocesses, from MODEL_DIRs in the trainer's format."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from t5x_cpt.scaling import laws, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES_M = (49, 125, 368, 1085, 2791)
BATCH = {49: 2 ** 19, 125: 2 ** 19, 368: 2 ** 20, 1085: 2 ** 21, 2791: 2 ** 22}


def run_cli(*args, expect=0):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "t5x_cpt.scaling", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, (proc.returncode, proc.stderr[-3000:])
    out = json.loads(proc.stdout)          # exactly one JSON object, nothing else on stdout
    assert isinstance(out, dict)
    return out, proc.stderr


def _write_model_dir(root, name, info, lines):
    d = root / name
    d.mkdir()
    (d / "run_info.json").write_text(json.dumps(info))
    (d / "config.gin").write_text("# operative config\ntrain.num_steps = %d\n" % lines[-1]["step"])
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    return d


def _lines(n, run_kind, replay=0.0, seed=0):
    """Metrics of one run: train lines every step block, evals every 4th, a step-0 eval."""
    rng = np.random.default_rng(seed)
    batch = BATCH[int(round(n / 1e6))]
    total = 20 * n / (1 - replay)
    steps = int(total // batch)
    law = synthetic.TRUE_CPT if run_kind == "cpt" else synthetic.TRUE_SCRATCH
    out = []
    for i, step in enumerate(np.linspace(0, steps, 49).astype(int)):
        tokens = float(step * batch)
        target = tokens * (1 - replay)
        m = {"step": int(step), "tokens": tokens, "flops": 6.0 * n * tokens,
             "tokens/lo_help_zh": target, "tokens/lo_help_en": tokens - target}
        if step > 0:
            m["train/loss"] = float(law["E"] + 1.0)
        if i % 4 == 0:
            if target > 0:
                m["eval/lo_help_zh/loss"] = float(
                    laws.CHINCHILLA.predict(law, N=n, D=target)[0] if run_kind != "cpt" else
                    laws.CPT.predict(law, N=n, D=target)[0]) * math.exp(rng.normal(0, 0.003))
            else:
                m["eval/lo_help_zh/loss"] = 10.4
            if run_kind == "cpt":
                tf = synthetic.TRUE_FORGETTING
                rise = tf["F"] * (6 * n * max(target, 1.0)) ** tf["phi"] / ((1 + tf["K"] * replay) * n) ** tf["psi"]
                m["eval/lo_help_en/loss"] = 2.40 + (rise if target > 0 else 0.0)
        out.append(m)
    return out


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for k, m in enumerate(SIZES_M):
        n = m * 1e6 + 12345
        for kind in ("scratch", "cpt"):
            _write_model_dir(root, f"{kind}_{m}m", {
                "params": n, "non_embedding_params": n * 0.8, "run_kind": kind, "language": "zh",
                "replay_ratio": 0.0, "run": f"{kind}-{m}m"}, _lines(n, kind, seed=10 * k + (kind == "cpt")))
    for j, r in enumerate((0.01, 0.05, 0.2)):
        n = 1085e6 + 12345
        _write_model_dir(root, f"replay_{j}", {"params": n, "run_kind": "cpt", "language": "zh",
                                                "replay_ratio": r}, _lines(n, "cpt", replay=r, seed=99 + j))
    return root


@pytest.fixture(scope="module")
def table(model_dirs, tmp_path_factory):
    csv = tmp_path_factory.mktemp("tables") / "runs.csv"
    out, _ = run_cli("collect", f"--model_dirs={model_dirs}/scratch_*,{model_dirs}/cpt_*",
                     "--language=zh", f"--csv={csv}")
    assert out["loss_keys"] == ["eval/lo_help_zh/loss"]
    assert out["run_kinds"] == ["cpt", "scratch"] and out["rows"] == 10 * 12
    return csv


def test_collect_writes_the_table_columns(table):
    import csv as csv_mod
    with open(table) as fh:
        rows = list(csv_mod.DictReader(fh))
    assert list(rows[0])[:8] == ["N", "D", "loss", "run_kind", "run", "language", "replay_ratio", "flops"]
    r = next(x for x in rows if x["run"] == "scratch-49m")
    assert float(r["N"]) == 49e6 + 12345 and r["language"] == "zh" and r["run_kind"] == "scratch"
    assert float(r["loss0"]) == 10.4                          # the step-0 eval
    assert all(float(x["D"]) > 0 for x in rows)               # step 0 is not a point
    # D is the realised target-language counter tokens/<corpus>_<lang>.
    assert all(float(x["D"]) <= float(x["tokens"]) for x in rows)


def test_fit_allocate_plan_savings_round_trip(table, tmp_path):
    scratch_json = tmp_path / "scratch.json"
    out, err = run_cli("fit", f"--runs={table}", "--law=chinchilla", "--grid=coarse",
                       "--bootstrap=8", "--flops=1e21", f"--out={scratch_json}")
    assert "using --run_kind=scratch" in err                    # logs go to stderr
    assert json.loads(scratch_json.read_text()) == out         # --out holds the same object
    for k in ("E", "A", "B", "alpha", "beta"):
        assert k in out
    assert out["alpha"] == pytest.approx(synthetic.TRUE_SCRATCH["alpha"], rel=0.15)
    assert out["beta"] == pytest.approx(synthetic.TRUE_SCRATCH["beta"], rel=0.1)
    assert out["bootstrap"]["n"] + out["bootstrap"]["n_failed"] == 8
    cpt_json = tmp_path / "cpt.json"
    out, _ = run_cli("fit", f"--runs={table}", "--law=cpt", f"--frozen={scratch_json}",
                     "--bootstrap=8", f"--out={cpt_json}")
    assert out["frozen"] == ["e", "a", "alpha"] and "gamma" in out
    assert out["gamma"] == pytest.approx(synthetic.TRUE_CPT["gamma"], abs=0.03)
    assert out["E"] == json.loads(scratch_json.read_text())["E"]
    alloc, _ = run_cli("allocate", f"--fit={cpt_json}", "--flops=1e21")
    for k in ("N_opt", "D_opt", "a", "b", "G"):
        assert k in alloc
    assert alloc["N_opt"] * alloc["D_opt"] * 6 == pytest.approx(1e21)
    assert alloc["intervals"]["a"][0] <= alloc["a"] <= alloc["intervals"]["a"][1]
    plan, _ = run_cli("plan", f"--fit_scratch={scratch_json}", f"--fit_cpt={cpt_json}", "--flops=1e21")
    assert plan["cpt"]["N"] > plan["scratch"]["N"] and 0 < plan["saved_fraction"] < 1
    assert plan["intervals"]["saved_fraction"][0] <= plan["intervals"]["saved_fraction"][1]
    sav, _ = run_cli("savings", f"--runs={table}", f"--fit_scratch={scratch_json}")
    finals = [r["final"]["saved_fraction"] for r in sav["runs"]]
    assert len(finals) == 5 and all(0.15 < f < 0.5 for f in finals)


def test_allocate_accepts_hand_written_published_values(tmp_path):
    f = tmp_path / "pub.json"
    f.write_text(json.dumps(laws.PUBLISHED_SCRATCH))
    out, _ = run_cli("allocate", f"--fit={f}", "--flops=1e21")
    assert out["N_opt_formula"] == "N_opt = 0.3244 * C^0.4286"
    f.write_text(json.dumps(laws.PUBLISHED_CPT))
    out, _ = run_cli("allocate", f"--fit={f}", "--flops=1e21,1e22")
    assert out["law"] == "cpt" and round(out["k_N"], 2) == 4.79 and len(out["at"]) == 2


def test_forgetting_from_collected_source_losses(model_dirs, tmp_path):
    csv = tmp_path / "en.csv"
    out, _ = run_cli("collect", f"--model_dirs={model_dirs}/replay_*,{model_dirs}/cpt_1085m",
                     "--loss_key=eval/lo_help_en/loss", f"--csv={csv}")
    assert out["rows"] == 4 * 12
    fit, _ = run_cli("fit", f"--runs={csv}", "--law=forgetting")
    assert fit["baseline"] == "loss0 column"
    assert fit["phi"] == pytest.approx(synthetic.TRUE_FORGETTING["phi"], abs=0.05)
    rises = {b["replay_ratio"]: b["runs"][0]["rise"] for b in fit["by_replay_ratio"]}
    assert rises[0.0] > 1.0 and rises[0.05] < 0.3 * rises[0.0]


def test_report_with_plots(table, model_dirs, tmp_path):
    en = tmp_path / "en.csv"
    run_cli("collect", f"--model_dirs={model_dirs}/replay_*,{model_dirs}/cpt_1085m",
            "--language=en", f"--csv={en}")
    plots = tmp_path / "plots"
    out, _ = run_cli("report", f"--runs={table}", f"--forgetting_runs={en}", "--grid=coarse",
                     "--flops=1e20,1e21", f"--plots_dir={plots}")
    for key in ("scratch_fit", "cpt_fit", "cpt_fit_unfrozen", "allocation", "frontier", "compare",
                "savings", "plans", "forgetting", "checks", "plots"):
        assert key in out, key
    assert all(out["checks"].values()), out["checks"]
    assert len(out["plots"]) == 5
    for p in out["plots"]:
        assert os.path.getsize(p) > 10_000 and open(p, "rb").read(4) == b"\x89PNG"


def _csv(path, header, rows):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("case", ["few_points", "nonpositive_N", "nan_loss", "missing_column",
                                  "cpt_without_frozen", "allocate_incomplete_fit",
                                  "collect_missing_field", "family_column"])
def test_bad_input_gives_one_clear_message(case, tmp_path):
    good = [f"{n},{d},{3.0 - 0.1 * i}" for i, (n, d) in enumerate(
        [(1e8, 1e9), (1e8, 2e9), (2e8, 1e9), (2e8, 4e9), (4e8, 8e9), (4e8, 1.6e10), (8e8, 1e10)])]
    if case == "few_points":
        args = ["fit", f"--runs={_csv(tmp_path / 't.csv', 'N,D,loss', good[:4])}", "--law=chinchilla"]
        expect = "4 points for 5 free parameters"
    elif case == "nonpositive_N":
        args = ["fit", f"--runs={_csv(tmp_path / 't.csv', 'N,D,loss', good + ['0,1e9,3.0'])}",
                "--law=chinchilla"]
        expect = "N must be positive"
    elif case == "nan_loss":
        args = ["fit", f"--runs={_csv(tmp_path / 't.csv', 'N,D,loss', good + ['1e8,3e9,nan'])}",
                "--law=chinchilla"]
        expect = "NaN"
    elif case == "missing_column":
        args = ["fit", f"--runs={_csv(tmp_path / 't.csv', 'N,loss', ['1e8,3.0'] * 8)}",
                "--law=chinchilla"]
        expect = "missing column(s) ['D']"
    elif case == "cpt_without_frozen":
        args = ["fit", f"--runs={_csv(tmp_path / 't.csv', 'N,D,loss', good)}", "--law=cpt"]
        expect = "--frozen=<scratch fit JSON>"
    elif case == "family_column":  # a table written before the column was renamed run_kind
        args = ["fit", f"--runs={_csv(tmp_path / 't.csv', 'N,D,loss,family', [r + ',scratch' for r in good])}",
                "--law=chinchilla"]
        expect = "column 'family' is now called 'run_kind'"
    elif case == "allocate_incomplete_fit":
        f = tmp_path / "f.json"
        f.write_text(json.dumps({"E": 1.6, "A": 400, "B": 400, "alpha": 0.3}))
        args = ["allocate", f"--fit={f}", "--flops=1e21"]
        expect = "lack ['beta']"
    else:
        d = tmp_path / "run"
        d.mkdir()
        (d / "run_info.json").write_text(json.dumps({"run_kind": "scratch"}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 10, "eval/zh/loss": 3}) + "\n")
        args = ["collect", f"--model_dirs={d}", f"--csv={tmp_path / 'x.csv'}"]
        expect = "required field 'params' is missing"
    out, err = run_cli(*args, expect=2)
    assert expect in out["error"] and out["command"] == args[0]
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and expect in lines[0], err


def test_loss_key_matches_the_task_language_not_a_corpus_word():
    from t5x_cpt.scaling import collect
    metrics = [{"step": 0, "tokens": 0, "eval/lo_help_zh/loss": 3.0, "eval/lo_help_lo/loss": 3.1}]
    assert collect.choose_loss_key(metrics, "lo", None, "d") == "eval/lo_help_lo/loss"
    assert collect.choose_loss_key(metrics, "zh", None, "d") == "eval/lo_help_zh/loss"
    line = {"tokens": 100.0, "tokens/lo_help_zh": 80.0, "tokens/lo_help_en": 20.0}
    assert collect.target_tokens(line, "zh") == 80.0 and collect.target_tokens(line, "ru") is None
