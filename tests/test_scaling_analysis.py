"""Savings from runs, model comparison, the law of forgetting, the planner, the frontier."""
import math

import numpy as np
import pytest

from t5x_cpt.scaling import allocation, comparison, forgetting, planner, savings, synthetic
from t5x_cpt.scaling.tables import ScalingInputError

S, C = synthetic.TRUE_SCRATCH, synthetic.TRUE_CPT
SIZES = (49, 125, 368, 1085, 2791)


@pytest.fixture(scope="module")
def both():
    s = synthetic.study(S, run_kind="scratch", sizes_m=SIZES, points=25, noise=0.0, seed=1)
    c = synthetic.study(C, run_kind="cpt", sizes_m=SIZES, points=25, noise=0.0, seed=2)
    return synthetic.concat(s, c)


def test_savings_match_the_laws_on_noise_free_runs(both):
    res = savings.savings(both, scratch_params=S)
    assert res["summary"]["n_cpt_runs"] == len(SIZES)
    for run in res["runs"]:
        n = run["N"]
        pts = [p for p in run["points"] if p["method"] == "interpolated"]
        assert len(pts) >= 10
        expect = savings.savings_from_laws(S, C, n, [p["D"] for p in pts])
        got = np.array([p["saved_fraction"] for p in pts])
        # Interpolating 25 log-spaced points of the scratch curve: ~1e-3 accuracy.
        np.testing.assert_allclose(got, expect["saved_fraction"], atol=5e-3)
        # The paper's pattern: the relative saving shrinks along training while the effectively
        # transferred tokens grow (about linearly).
        assert got[0] > got[-1] > 0
        tr = np.array([p["transferred_tokens"] for p in pts])
        assert np.all(np.diff(tr) > 0)
        # "About linearly": under this law D_scratch grows like D^(beta'/beta), slightly sub-linear.
        assert run["transferred_vs_tokens"]["r2"] > 0.8
    finals = [r["final"]["transferred_tokens"] for r in res["runs"]]
    assert np.all(np.diff(finals) > 0)                       # grows with model size too


def test_savings_out_of_range_points_use_the_law_or_are_flagged(both):
    """Late CPT losses lie below the scratch run's final loss: only the law can place them."""
    without = savings.savings(both)
    with_law = savings.savings(both, scratch_params=S)
    methods_without = {p["method"] for r in without["runs"] for p in r["points"]}
    methods_with = {p["method"] for r in with_law["runs"] for p in r["points"]}
    assert "out_of_range" in methods_without and "law" not in methods_without
    assert "law" in methods_with
    for r in without["runs"]:
        for p in r["points"]:
            if p["method"] == "out_of_range":
                assert p["saved_fraction"] is None


def test_savings_need_both_run_kinds(both):
    with pytest.raises(ScalingInputError, match="both scratch and cpt"):
        savings.savings(both.filter(run_kind="cpt"))


def test_compare_prefers_cpt_law_on_cpt_runs():
    s = synthetic.study(S, run_kind="scratch", sizes_m=SIZES + (5534,), points=10, noise=0.003, seed=3)
    c = synthetic.study(C, run_kind="cpt", sizes_m=SIZES + (5534,), points=10, noise=0.003, seed=4)
    res = comparison.compare(synthetic.concat(s, c), holdout=1, grid="coarse")
    fe = res["fit_errors"]
    # Table 3: the extended law fits CPT data better than the Chinchilla law; on scratch data it
    # fits no better than noise allows and its gamma is ~0.
    assert fe["cpt"]["cpt_law_two_stage"]["huber_mean"] < fe["cpt"]["chinchilla"]["huber_mean"]
    assert abs(fe["scratch"]["cpt_law"]["params"]["gamma"]) < 0.03
    ex = res["extrapolation"]
    assert ex["cpt"]["held_out_sizes"] == [5534e6]
    assert ex["cpt"]["cpt_law_two_stage"]["rms_log_residual"] < ex["cpt"]["chinchilla"]["rms_log_residual"]
    assert ex["scratch"]["chinchilla"]["rms_log_residual"] < 0.01


def test_forgetting_law_recovers_replay_effect():
    t = synthetic.forgetting_study(seed=0)
    fit = forgetting.fit_forgetting(t, workers=1)
    js = fit.to_json()
    assert js["baseline"] == "loss0 column"
    tf = synthetic.TRUE_FORGETTING
    assert js["phi"] == pytest.approx(tf["phi"], abs=0.05)
    assert math.log10(js["K"]) == pytest.approx(math.log10(tf["K"]), abs=0.5)
    # Prediction: the no-replay run forgets most; 5% replay removes most of the forgetting.
    n, d = 1.393e9, 20 * 1.393e9
    rise = {r: float(forgetting.predict(js, n, d * (1 - r), r, loss0=2.40)) - 2.40 for r in (0, 0.05)}
    assert rise[0.0] > 0.5 and rise[0.05] < 0.5 * rise[0.0]
    true_rise0 = tf["F"] * (6 * n * d) ** tf["phi"] / n ** tf["psi"]
    assert rise[0.0] == pytest.approx(true_rise0, rel=0.1)


def test_forgetting_without_replay_warns():
    t = synthetic.forgetting_study(ratios=(0.0,), seed=1)
    fit = forgetting.fit_forgetting(t, workers=1)
    assert fit.info["K"] == 0.0
    assert any("not identifiable" in w for w in fit.warnings)


def test_planner_consistent_with_allocation_and_savings():
    p = planner.plan(S, C, 1e21)
    s_opt, c_opt = allocation.optimal(S, 1e21), allocation.optimal(C, 1e21)
    assert p["scratch"]["N"] == pytest.approx(s_opt["N_opt"])
    assert p["cpt"]["N"] == pytest.approx(c_opt["N_opt"])
    assert p["cpt"]["N"] > p["scratch"]["N"]                # CPT: larger model, fewer tokens
    assert p["cpt"]["tokens_per_param"] < p["scratch"]["tokens_per_param"]
    # Saving: scratch needs C_s to reach the CPT loss.
    c_s = allocation.compute_for_loss(S, p["cpt"]["loss"])
    assert p["saved_fraction"] == pytest.approx(1 - 1e21 / c_s)
    assert 0 < p["saved_fraction"] < 1
    assert p["intervals"] is None


def test_planner_replay_and_source_sizes():
    base = planner.plan(S, C, 1e21)
    rep = planner.plan(S, C, 1e21, replay_ratio=0.2)
    assert rep["cpt"]["loss"] > base["cpt"]["loss"]         # 20% of the budget goes to replay
    assert rep["cpt"]["D_replay"] == pytest.approx(rep["cpt"]["D_target"] * 0.25)
    sized = planner.plan(S, C, 1e21, source_sizes=[1.2e8, 3.7e8, 1.4e9])
    assert sized["cpt"]["N"] in (1.2e8, 3.7e8, 1.4e9)
    assert sized["cpt"]["loss"] >= base["cpt"]["loss"] - 1e-12


def test_planner_intervals_from_bootstrap_samples():
    rng = np.random.default_rng(0)
    jitter = lambda p, names: {"samples": {k: list(p[k] * np.exp(rng.normal(0, 0.01, 40)))
                                           for k in names}, "level": 0.9}
    s_json = dict(S, bootstrap=jitter(S, planner.SCRATCH_NAMES))
    c_json = dict(C, bootstrap=jitter(C, planner.CPT_NAMES))
    p = planner.plan(s_json, c_json, 1e21)
    lo, hi = p["intervals"]["cpt.N"]
    assert lo < p["cpt"]["N"] < hi
    lo, hi = p["intervals"]["saved_fraction"]
    assert lo <= p["saved_fraction"] <= hi
    assert p["interval_info"]["replicates"] == 40


def test_frontier_from_runs(both):
    fit = allocation.fit_frontier(both.filter(run_kind="scratch"))
    pts = fit.info["frontier_points"]
    assert len(pts["C"]) >= 5
    assert np.all(np.diff(pts["loss"]) < 0) and np.all(np.diff(pts["C"]) > 0)
    assert 0 < fit.params["g"] < 0.3


@pytest.mark.parametrize("cpt_shift, method, saved, quarter_method, quarter_saved", [
    # CPT at D is scratch at 2D: half the compute, at every point.
    (2.0, "cpt_reaches_scratch", 0.5, "cpt_reaches_scratch", 0.5),
    # CPT at D is scratch at D/2: twice the compute; CPT never reaches scratch's final loss.
    (0.5, "scratch_reaches_cpt", -1.0, "cpt_reaches_scratch", -1.0),
    # CPT's first evaluation (1e3 tokens) is already past scratch's loss at 1e5 and at 3.16e4 tokens.
    (1000.0, "at_least", 1 - 1e3 / 1e5, "at_least", 1 - 1e3 / 10 ** 4.5),
])
def test_saving_at_scratch_points_reads_the_curves_without_a_law(cpt_shift, method, saved, quarter_method,
                                                                 quarter_saved):
    """Power-law curves are straight in log-log, so the interpolation is exact."""
    from t5x_cpt.scaling.tables import from_rows

    tokens = np.geomspace(1e3, 1e5, 9)  # a quarter of 1e5 falls between 1.78e4 and 3.16e4: the latter
    rows = [{"N": 1e6, "D": d, "loss": 10 * d ** -0.2, "run_kind": "scratch", "run": "s"} for d in tokens]
    rows += [{"N": 1e6, "D": d, "loss": 10 * (cpt_shift * d) ** -0.2, "run_kind": "cpt", "run": "c"} for d in tokens]
    run = savings.savings(from_rows(rows))["runs"][0]
    assert (run["at_scratch_end"]["method"], run["at_scratch_quarter"]["method"]) == (method, quarter_method)
    assert run["at_scratch_end"]["saved_fraction"] == pytest.approx(saved, rel=1e-9)
    assert run["at_scratch_quarter"]["saved_fraction"] == pytest.approx(quarter_saved, rel=1e-9)


def test_saving_when_cpt_never_reaches_even_the_early_scratch_loss():
    """CPT far behind: both figures come from the scratch curve, at the matching fraction of the CPT run."""
    from t5x_cpt.scaling.tables import from_rows

    tokens = np.geomspace(1e3, 1e5, 9)
    rows = [{"N": 1e6, "D": d, "loss": 10 * d ** -0.2, "run_kind": "scratch", "run": "s"} for d in tokens]
    rows += [{"N": 1e6, "D": d, "loss": 10 * (d / 10) ** -0.2, "run_kind": "cpt", "run": "c"} for d in tokens]
    run = savings.savings(from_rows(rows))["runs"][0]
    for key in ("at_scratch_end", "at_scratch_quarter"):
        assert run[key]["method"] == "scratch_reaches_cpt"
        assert run[key]["saved_fraction"] == pytest.approx(1 - 10, rel=1e-9)  # scratch needs a tenth
