"""Laws, their log-space form, and compute-optimal allocation (published constants)."""
import math

import numpy as np
import pytest

from t5x_cpt.scaling import allocation, laws
from t5x_cpt.scaling.tables import ScalingInputError


def test_lse_form_equals_direct_formula():
    n = np.array([5e7, 1e9, 5e9])
    d = np.array([1e9, 2e10, 1e11])
    p = laws.PUBLISHED_CPT
    direct = p["E"] + p["A"] / n ** p["alpha"] + p["B"] / (d ** p["beta"] * n ** p["gamma"])
    np.testing.assert_allclose(laws.CPT.predict(p, N=n, D=d), direct, rtol=1e-13)
    s = laws.PUBLISHED_SCRATCH
    direct = s["E"] + s["A"] / n ** s["alpha"] + s["B"] / d ** s["beta"]
    np.testing.assert_allclose(laws.CHINCHILLA.predict(s, N=n, D=d), direct, rtol=1e-13)
    np.testing.assert_allclose(allocation.loss(s, n, d), direct, rtol=1e-13)


def test_param_names_and_round_trip():
    assert laws.CHINCHILLA.param_names == ("a", "b", "e", "alpha", "beta")
    assert laws.CPT.param_names == ("a", "b", "e", "alpha", "beta", "gamma")
    theta = laws.CPT.from_natural(laws.PUBLISHED_CPT)
    assert theta["e"] == pytest.approx(math.log(1.55))
    back = laws.CPT.to_natural(theta)
    for k, v in laws.PUBLISHED_CPT.items():
        assert back[k] == pytest.approx(v)
    with pytest.raises(ScalingInputError, match="needs parameter 'gamma'"):
        laws.CPT.from_natural(laws.PUBLISHED_SCRATCH)          # no gamma


def test_chinchilla_start_grid_has_4500_starts():
    names, starts = laws.CHINCHILLA.start_grid()
    assert starts.shape == (4500, 5)
    assert set(np.unique(starts[:, names.index("alpha")])) == {0.0, 0.5, 1.0, 1.5, 2.0}
    assert set(np.unique(starts[:, names.index("a")])) == {0.0, 5.0, 10.0, 15.0, 20.0, 25.0}
    assert set(np.unique(starts[:, names.index("e")])) == {-1.0, -0.5, 0.0, 0.5, 1.0}


def test_published_allocation_constants():
    """arXiv 2407.02118: its coefficient table (Table 2(a)) gives exactly its allocation constants."""
    s = allocation.constants(laws.PUBLISHED_SCRATCH)
    assert round(s["a"], 3) == 0.429 and round(s["b"], 3) == 0.571
    assert round(s["k_N"], 3) == 0.324 and round(s["k_D"], 3) == 0.514
    c = allocation.constants(laws.PUBLISHED_CPT)
    assert round(c["a"], 3) == 0.385 and round(c["b"], 3) == 0.615
    assert round(c["k_N"], 2) == 4.79 and round(c["k_D"], 3) == 0.035


def test_optimal_allocation_is_the_minimum_at_fixed_compute():
    for params in (laws.PUBLISHED_SCRATCH, laws.PUBLISHED_CPT):
        budget = 3e21
        opt = allocation.optimal(params, budget)
        assert 6 * opt["N_opt"] * opt["D_opt"] == pytest.approx(budget, rel=1e-12)
        ns = opt["N_opt"] * np.geomspace(0.5, 2.0, 41)
        losses = allocation.loss(params, ns, budget / (6 * ns))
        assert np.argmin(losses) == 20                          # the middle one is N_opt
        assert opt["L_opt"] == pytest.approx(losses[20], rel=1e-12)


def test_compute_for_loss_inverts_optimal_loss():
    c = allocation.compute_for_loss(laws.PUBLISHED_SCRATCH, allocation.optimal(
        laws.PUBLISHED_SCRATCH, 1e22)["L_opt"])
    assert c == pytest.approx(1e22, rel=1e-8)
    assert allocation.compute_for_loss(laws.PUBLISHED_SCRATCH, 1.5) == math.inf   # below E


def test_allocation_refuses_degenerate_cpt_law():
    bad = dict(laws.PUBLISHED_CPT, gamma=0.3)                   # beta' <= gamma
    with pytest.raises(ScalingInputError, match="beta'"):
        allocation.constants(bad)


def test_compute_convention_is_the_project_definition():
    from t5x_cpt import flops
    assert laws.scaling_compute is flops.scaling_compute  # one definition, re-exported
    assert flops.scaling_compute(1.4e9, 2.8e10) == pytest.approx(6 * 1.4e9 * 2.8e10, rel=1e-15)


def test_law_from_params():
    assert laws.law_from_params(laws.PUBLISHED_CPT) is laws.CPT
    assert laws.law_from_params(laws.PUBLISHED_SCRATCH) is laws.CHINCHILLA
    assert laws.law_from_params({"law": "frontier", "A": 1, "g": 0.1}) is laws.FRONTIER


def test_a_coefficient_run_off_to_infinity_is_reported_not_raised():
    """Fits to two sizes can drive a log-coefficient past float64's range (seen on the mini
    study's language sweep): the conversion gives inf, the fit warns, allocation refuses."""
    from t5x_cpt.scaling import fitting

    theta = {"a": 3123.0, "b": math.log(400.0), "e": math.log(1.5), "alpha": 3.0, "beta": 0.3}
    natural = laws.CHINCHILLA.to_natural(theta)
    assert natural["A"] == math.inf and natural["B"] == pytest.approx(400.0)
    columns = {"N": np.array([3e5, 3e5, 1e6, 1e6]), "D": np.array([1e5, 6e5, 1e5, 6e5])}
    warnings = fitting.diagnose(laws.CHINCHILLA, theta, columns, list(laws.CHINCHILLA.param_names), {})
    assert any("A ran off to infinity" in w for w in warnings)
    with pytest.raises(ScalingInputError, match="not finite"):
        allocation.constants(natural)
    # Finite parameters whose optimum over/underflows are refused too, not divided by zero.
    with pytest.raises(ScalingInputError, match="no finite compute-optimal allocation"):
        allocation.constants({"E": 1.0, "A": 1e-300, "alpha": 1e-3, "B": 1e300, "beta": 1e-3})


def test_a_coefficient_that_underflowed_to_zero_drops_its_term_in_predictions():
    """A fit whose E collapsed to exp(-1859) = 0.0 (the mini study's Russian sweep) still predicts
    (plots, savings), but cannot be frozen into a two-stage fit."""
    params = {"E": 0.0, "A": 20.0, "alpha": 0.3, "B": 400.0, "beta": 0.28}
    n, d = np.array([1e6, 1e8]), np.array([1e7, 1e9])
    np.testing.assert_allclose(laws.CHINCHILLA.predict(params, N=n, D=d),
                               20.0 / n ** 0.3 + 400.0 / d ** 0.28, rtol=1e-13)
    with pytest.raises(ScalingInputError, match="coefficient E must be positive"):
        laws.CHINCHILLA.from_natural(params)
