"""Bootstrap over runs: resampling unit, coverage of the truth, failure accounting."""
import numpy as np
import pytest

from t5x_cpt.scaling import bootstrap, fitting, laws, procedures, synthetic, tables
from t5x_cpt.scaling.tables import ScalingInputError

G_TRUE, A_TRUE = 0.06, 30.0
SMALL_GRID = {"a": [2.0, 4.0], "g": [0.02, 0.1]}


def _study(seed):
    """12 runs whose points share a per-run offset (correlated errors), L = 30 C^-0.06."""
    rng = np.random.default_rng(seed)
    rows, cs = [], []
    for r in range(12):
        lo = rng.uniform(18, 21)
        c = np.geomspace(10 ** lo, 10 ** (lo + 2), 8)
        loss = A_TRUE * c ** -G_TRUE * np.exp(rng.normal(0, 0.02) + rng.normal(0, 0.002, 8))
        rows += [{"N": 1.0, "D": 1.0, "loss": v, "run": f"r{r}"} for v in loss]
        cs.append(c)
    t = tables.from_rows(rows)
    t.columns["C"] = np.concatenate(cs)
    return t


def _frontier_stat(t, i):
    return fitting.fit_law(laws.FRONTIER, {"C": t["C"]}, t["loss"], grid=SMALL_GRID, workers=1).params


def test_resample_keeps_runs_whole_and_run_kinds_separate():
    s = synthetic.study(synthetic.TRUE_SCRATCH, run_kind="scratch", sizes_m=(49, 125, 368), points=5)
    c = synthetic.study(synthetic.TRUE_CPT, run_kind="cpt", sizes_m=(49, 125), points=5)
    t = synthetic.concat(s, c)
    b = bootstrap.resample_runs(t, np.random.default_rng(0))
    assert len(b) == len(t)                                  # every run has 5 points
    assert sum(f == "scratch" for f in b["run_kind"]) == 15 and sum(f == "cpt" for f in b["run_kind"]) == 10
    for run in set(b["run"]):
        rows = b["run"] == run
        assert rows.sum() == 5 and len(set(b["N"][rows])) == 1   # a whole run, one size


def test_run_bootstrap_covers_truth_and_is_wider_than_point_bootstrap():
    covered_g = covered_a = 0
    k = 12
    for seed in range(k):
        t = _study(seed)
        b = bootstrap.bootstrap(t, _frontier_stat, n=25, seed=seed, level=0.9, strata=None)
        lo, hi = b["intervals"]["g"]
        covered_g += lo <= G_TRUE <= hi
        lo, hi = b["intervals"]["A"]
        covered_a += lo <= A_TRUE <= hi
        if seed < 3:
            # Same data, each point its own "run": the point bootstrap ignores the per-run
            # correlation and its interval is too narrow.
            tp = tables.Table(dict(t.columns))
            tp.columns["run"] = np.array([f"p{i}" for i in range(len(t))], dtype=object)
            bp = bootstrap.bootstrap(tp, _frontier_stat, n=25, seed=seed, level=0.9, strata=None)
            assert np.diff(b["intervals"]["g"])[0] > 1.3 * np.diff(bp["intervals"]["g"])[0]
    assert covered_g >= 9 and covered_a >= 9, (covered_g, covered_a)


def test_chinchilla_bootstrap_intervals_cover_truth():
    """The simple case: 6 sizes x 3 replicate runs (different seeds), 8 points each, per-run
    offsets and point noise of 0.2%. (With ONE run per size, each run is a high-leverage design
    point and run-level percentile intervals under-cover: about 75% for a nominal 95% in our
    simulations; docs/scaling.md says so.)"""
    sizes = (49, 125, 368, 1085, 2791, 5534)
    parts = []
    for k in range(3):
        p = synthetic.study(synthetic.TRUE_SCRATCH, run_kind="scratch", sizes_m=sizes, points=8,
                            run_noise=0.002, noise=0.002, seed=k)
        p.columns["run"] = np.array([f"{r}-seed{k}" for r in p["run"]], dtype=object)
        parts.append(p)
    t = synthetic.concat(*parts)
    fit = procedures.fit_table(laws.CHINCHILLA, t, grid="coarse")
    boot = procedures.attach_bootstrap(fit, t, procedures.coarse_refit(laws.CHINCHILLA, fit),
                                       n=30, seed=0, level=0.95, budgets=[1e21])
    assert boot["n"] + boot["n_failed"] == 30 and boot["unit"] == "run"
    assert boot["n_runs"] == {"scratch": 18}
    truth = dict(synthetic.TRUE_SCRATCH)
    from t5x_cpt.scaling import allocation
    truth.update(allocation.derived_quantities(synthetic.TRUE_SCRATCH, [1e21]))
    for k in ("E", "alpha", "beta", "a", "b", "N_opt@1e+21"):
        lo, hi = boot["intervals"][k]
        assert lo <= truth[k] <= hi, (k, lo, truth[k], hi)
    assert set(boot["samples"]) == {"A", "B", "E", "alpha", "beta"}
    assert len(boot["samples"]["E"]) == boot["n"]


def test_failed_replicates_are_counted_and_too_few_runs_refused():
    t = _study(0)
    calls = {"n": 0}

    def flaky(tb, i):
        calls["n"] += 1
        if i % 4 == 0:
            raise ScalingInputError("no optimum")
        return {"x": 1.0}

    b = bootstrap.bootstrap(t, flaky, n=8, seed=0, strata=None)
    assert b["n"] == 6 and b["n_failed"] == 2 and calls["n"] == 8
    one_run = t.select(t["run"] == "r0")
    with pytest.raises(ScalingInputError, match="at least 2 runs"):
        bootstrap.bootstrap(one_run, flaky, n=4, strata=None)
