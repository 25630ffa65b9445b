"""The D-CPT mixture-ratio law (Que et al., arXiv 2406.01375), its held-out comparison and the replay
recommendation, on runs generated from known laws."""
import json
import math

import numpy as np
import pytest

from t5x_cpt.scaling import cli, mixture, synthetic
from t5x_cpt.scaling.tables import ScalingInputError, from_rows

RATIOS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8)
SOURCE_TRUE = {"E": 1.2, "B": 40.0, "eta": 0.3, "beta": 0.35, "C": 0.05, "gamma": 0.4, "epsilon": 0.01}
TARGET_TRUE = {"E": 1.0, "B": 300.0, "eta": -0.45, "beta": 0.45, "C": 0.2, "gamma": 0.6, "epsilon": 0.01}


def _runs(law_params, role, *, n=4e6, ratios=RATIOS, points=10, noise=0.002, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes or (n,):
        for replay in ratios:
            for tokens in np.geomspace(1e5, 1.2e6, points):
                r = 1 - replay if role == "target" else replay
                clean = float(mixture.predict(law_params, size, tokens, r))
                rows.append({"N": size, "D": tokens * (1 - replay), "tokens": tokens, "replay_ratio": replay,
                             "loss": clean * (1 + noise * rng.standard_normal()), "run": f"{size:g}_r{replay}",
                             "run_kind": "cpt", "loss0": 2.0})
    return from_rows(rows, f"synthetic-{role}")


@pytest.mark.parametrize("role,true", [("source", SOURCE_TRUE), ("target", TARGET_TRUE)])
def test_fit_recovers_the_law_at_one_size(role, true):
    fit = mixture.fit_mixture(_runs(true, role), role, epsilon=0.01)
    for k in ("eta", "beta", "gamma"):
        assert fit[k] == pytest.approx(true[k], abs=0.06), k
    assert fit["E"] == pytest.approx(true["E"], rel=0.05)
    assert "A" not in fit and any("one model size" in w for w in fit["warnings"])
    assert fit["objective"]["rms_log_residual"] < 0.004  # the noise is 0.2%
    # Predictions away from the fitted ratios follow the true law.
    r = 0.15 if role == "source" else 0.85
    assert float(mixture.predict(fit, 4e6, 6e5, r)) == pytest.approx(float(mixture.predict(true, 4e6, 6e5, r)),
                                                                      rel=0.01)


def test_epsilon_is_chosen_by_the_objective():
    fit = mixture.fit_mixture(_runs({**SOURCE_TRUE, "epsilon": 0.03}, "source", noise=0.0005), "source")
    assert fit["epsilon"] == 0.03
    profile = fit["epsilon_profile"]
    assert profile["0.03"] == min(profile.values())


def test_fit_with_several_sizes_has_a_size_term():
    true = {**TARGET_TRUE, "A": 30.0, "alpha": 0.3}
    fit = mixture.fit_mixture(_runs(true, "target", sizes=(1e6, 4e6, 1.6e7), points=8), "target", epsilon=0.01)
    assert fit["alpha"] == pytest.approx(0.3, abs=0.08)
    assert float(mixture.predict(fit, 3e7, 1e6, 0.9)) == pytest.approx(float(mixture.predict(true, 3e7, 1e6, 0.9)),
                                                                       rel=0.02)


def test_one_size_fit_refuses_to_predict_elsewhere():
    fit = mixture.fit_mixture(_runs(SOURCE_TRUE, "source"), "source", epsilon=0.01)
    with pytest.raises(ScalingInputError, match="one size"):
        mixture.predict(fit, 8e6, 1e6, 0.1)


def test_objective_gradient_matches_finite_differences():
    t = _runs(SOURCE_TRUE, "source", points=4)
    r = mixture.language_ratio(t, "source")
    obj = mixture._Objective(t["N"] / 4e6, mixture.total_tokens(t) / 4e5, r, t["loss"], 0.01, with_size=True)
    p = np.array([0.1, -0.5, 0.4, 0.3, -3.0, 0.5, -2.0, 0.2])
    _, g = obj(p)
    for i in range(len(p)):
        h = np.zeros_like(p)
        h[i] = 1e-6
        numeric = (obj(p + h)[0] - obj(p - h)[0]) / 2e-6
        assert g[i] == pytest.approx(numeric, rel=1e-4, abs=1e-6), obj.names[i] if i < 6 else i


def test_bad_tables_are_refused():
    with pytest.raises(ScalingInputError, match="at least two replay ratios"):
        mixture.fit_mixture(_runs(SOURCE_TRUE, "source", ratios=(0.2,)), "source")
    with pytest.raises(ScalingInputError, match="needs more points"):
        mixture.fit_mixture(_runs(SOURCE_TRUE, "source", ratios=(0.1, 0.2), points=3), "source")
    with pytest.raises(ScalingInputError, match="role"):
        mixture.fit_mixture(_runs(SOURCE_TRUE, "source"), "english")


def _forgetting_runs(seed=0):
    """Source-language losses that follow the law of forgetting (synthetic.TRUE_FORGETTING)."""
    t = synthetic.forgetting_study(seed=seed, ratios=RATIOS)
    cols = dict(t.columns)
    cols["tokens"] = cols["D"] / (1 - cols["replay_ratio"])
    return type(t)(cols, t.source)


def test_held_out_comparison_picks_the_law_that_generated_the_data():
    # Target losses that depend on target tokens only (the project's reading of replay) and source
    # losses from the law of forgetting: the project's laws must win on the held-out ratio ...
    target = from_rows([{"N": 4e6, "D": tok * (1 - rep), "tokens": tok, "replay_ratio": rep, "run_kind": "cpt",
                         "loss": 1.0 + 300.0 / (tok * (1 - rep)) ** 0.45, "run": f"r{rep}"}
                        for rep in RATIOS for tok in np.geomspace(1e5, 1.2e6, 10)], "target")
    own = mixture.compare_held_out(target, _forgetting_runs(), 0.2)
    assert own["target"]["better_on_held_out"] == "own"
    assert own["source"]["better_on_held_out"] == "own"
    # ... and D-CPT must win on data it generated (its r^eta / D^beta coupling is not the forgetting law's).
    dcpt = mixture.compare_held_out(_runs(TARGET_TRUE, "target", noise=0.0005),
                                    _runs(SOURCE_TRUE, "source", noise=0.0005), 0.2)
    assert dcpt["source"]["better_on_held_out"] == "mixture"
    assert dcpt["source"]["mixture"]["held_out"]["rms_log_residual"] < 0.01


def test_recommendation_is_the_smallest_ratio_that_keeps_the_source_loss():
    # Source: L = E + C/(r + eps)^gamma (no data term), so the ratio that meets a limit has a closed
    # form; target: a CPT law in target tokens, which only gets worse with replay.
    source = {"law": "mixture", "role": "source", "E": 1.8, "B": 1e-12, "eta": 0.0, "beta": 0.0,
              "C": 0.05, "gamma": 0.5, "epsilon": 0.01, "sizes": [1e7]}
    target = {"law": "cpt", **synthetic.TRUE_CPT}
    loss0, tolerance = 2.0, 0.05
    exact = (0.05 / (loss0 + tolerance - 1.8)) ** (1 / 0.5) - 0.01
    rec = mixture.recommend_replay(target, source, N=1e7, tokens=2e8, source_loss0=loss0, tolerance=tolerance)
    assert rec["feasible"]
    assert rec["recommended_replay_ratio"] == pytest.approx(math.ceil(exact / 0.005) * 0.005, abs=1e-9)
    assert rec["predicted"]["source_loss"] <= loss0 + tolerance
    assert rec["target_loss_cost"] > 0 and rec["best_target"]["replay_ratio"] == 0.0


def test_recommendation_says_when_no_ratio_is_enough():
    source = {"law": "mixture", "role": "source", "E": 2.5, "B": 1e-12, "eta": 0.0, "beta": 0.0,
              "C": 0.05, "gamma": 0.5, "epsilon": 0.01, "sizes": [1e7]}
    rec = mixture.recommend_replay({"law": "cpt", **synthetic.TRUE_CPT}, source, N=1e7, tokens=2e8,
                                   source_loss0=2.0, tolerance=0.1)
    assert rec["feasible"] is False and rec["recommended_replay_ratio"] is None
    assert "no replay ratio" in rec["message"]


def test_cli_fit_and_recommend(tmp_path, capsys):
    from t5x_cpt.scaling.tables import write_table

    src, tgt = tmp_path / "source.csv", tmp_path / "target.csv"
    write_table(str(src), _runs(SOURCE_TRUE, "source"))
    write_table(str(tgt), _runs(TARGET_TRUE, "target"))
    assert cli.main(["fit", f"--runs={src}", "--law=mixture", "--mixture_role=source", "--epsilon=0.01",
                     f"--out={tmp_path / 'src.json'}"]) == 0
    assert cli.main(["fit", f"--runs={tgt}", "--law=mixture", "--mixture_role=target", "--epsilon=0.01",
                     f"--out={tmp_path / 'tgt.json'}"]) == 0
    capsys.readouterr()
    loss0 = float(mixture.predict(SOURCE_TRUE, 4e6, 1e5, 0.8))  # a source loss the runs reach with replay
    assert cli.main(["plan", "--recommend_replay", f"--fit_target={tmp_path / 'tgt.json'}",
                     f"--fit_source={tmp_path / 'src.json'}", "--N=4e6", "--tokens=1e6",
                     f"--source_loss0={loss0}", "--tolerance=0.02"]) == 0
    rec = json.loads(capsys.readouterr().out)
    # Brute force on the true laws: the smallest ratio on the grid whose true source loss meets the limit.
    grid = mixture.REPLAY_SEARCH
    true_ok = grid[mixture.predict(SOURCE_TRUE, 4e6, 1e6, grid) <= loss0 + 0.02]
    assert rec["recommended_replay_ratio"] == pytest.approx(float(true_ok.min()), abs=0.011)
    assert cli.main(["fit", f"--runs={src}", "--law=mixture"]) == 2
    assert "--mixture_role" in json.loads(capsys.readouterr().out)["error"]


def test_sweep_analysis_writes_the_mixture_section(tmp_path):
    """The replay sweep's analysis: both fits, the held-out comparison at the middle ratio, the
    recommendations, what the runs show, and the report's section."""
    from t5x_cpt.sweep import analyse, report, spec as sweep_spec

    spec = sweep_spec.read_sweep(["configs/sweeps/mini_replay.gin"])
    assert "mixture" in spec.analyses and analyse.held_out_ratio(spec) == 0.2
    target_rows = _runs(TARGET_TRUE, "target", noise=0.0005).rows()
    source = _runs(SOURCE_TRUE, "source", noise=0.0005)
    loss0 = float(mixture.predict(SOURCE_TRUE, 4e6, 1e5, 0.3))
    source_rows = [{**row, "loss0": loss0} for row in source.rows()]
    for row in target_rows + source_rows:
        row["variant"] = ""
    errors = {}
    result = analyse._run_mixture(target_rows, source_rows, str(tmp_path), spec, errors)
    assert errors == {}
    written = json.loads((tmp_path / "mixture.json").read_text())
    assert written["held_out"]["held_out_replay_ratio"] == 0.2
    assert written["held_out"]["source"]["better_on_held_out"] == "mixture"
    rec = written["recommendations"]["mixture"]
    # The runs' own final losses: every ratio from 0.3 up ends at or below loss0 on the true law.
    ends = {float(r): v["end"] for r, v in written["observed"]["by_ratio"].items()}
    truth = min(r for r in ends if float(mixture.predict(SOURCE_TRUE, 4e6, 1.2e6, r)) <= loss0)
    assert written["observed"]["smallest_ratio_within_tolerance"] == truth
    assert rec["feasible"] and rec["recommended_replay_ratio"] <= truth + 1e-9
    text = "\n".join(report._mixture_lines(result, errors))
    assert "Held out: replay ratio 0.2" in text and "D-CPT laws: r = " in text
