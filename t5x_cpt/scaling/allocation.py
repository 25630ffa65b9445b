"""Compute-optimal allocation (N_opt, D_opt) under C = 6 N D, and the loss-compute frontier.

For the Chinchilla law L = E + A/N^alpha + B/D^beta, minimising over N at fixed C (D = C/6N):

    N_opt = G (C/6)^a,  D_opt = G^-1 (C/6)^b,
    G = (alpha A / (beta B))^(1/(alpha+beta)),  a = beta/(alpha+beta),  b = alpha/(alpha+beta).

For the CPT law L = E + A/N^alpha + B'/(D^beta' N^gamma) the data term is B'(C/6)^-beta' N^(beta'-gamma),
so the same steps give

    G = (alpha A / ((beta'-gamma) B'))^(1/(alpha+beta'-gamma)),
    a = beta'/(alpha+beta'-gamma),  b = (alpha-gamma)/(alpha+beta'-gamma),

which needs beta' > gamma (otherwise the loss keeps falling as N grows at fixed C: no optimum).
Written as N_opt = k_N C^a, D_opt = k_D C^b: k_N = G 6^-a and k_D = G^-1 6^-b (the paper's
published 0.324/0.429, 0.514/0.571, 4.79/0.385, 0.035/0.615 are these numbers; arXiv 2407.02118,
compute-optimal allocation).

The frontier ("lowest loss at each compute", Chinchilla approach 1 style) is the lower envelope
of every (C, loss) point of every run; `fit_frontier` fits L = A' C^-g (+ E') to it.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import brentq

from t5x_cpt.scaling import fitting, laws
from t5x_cpt.scaling.laws import FLOPS_PER_PARAM_TOKEN
from t5x_cpt.scaling.tables import ScalingInputError, Table


def _law_params(params: Mapping[str, float]) -> tuple[str, dict[str, float]]:
    law = laws.law_from_params(params)
    if law.name not in ("chinchilla", "cpt"):
        raise ScalingInputError(f"allocation needs a chinchilla or cpt fit, not {law.name!r}")
    missing = [k for k in law.natural_names() if k not in params]
    if missing:
        raise ScalingInputError(f"{law.name} parameters lack {missing} (have {sorted(params)})")
    vals = {}
    for k in law.natural_names():
        try:
            vals[k] = float(params[k])
        except (TypeError, ValueError):
            raise ScalingInputError(f"parameter {k}={params[k]!r} is not a number") from None
        if not math.isfinite(vals[k]):
            raise ScalingInputError(f"parameter {k} is not finite")
    return law.name, vals


def constants(params: Mapping[str, float]) -> dict[str, float]:
    """G, a, b and the coefficients k_N, k_D of N_opt = k_N C^a, D_opt = k_D C^b."""
    name, p = _law_params(params)
    alpha, A, B, beta = p["alpha"], p["A"], p["B"], p["beta"]
    gamma = p.get("gamma", 0.0) if name == "cpt" else 0.0
    eff = beta - gamma
    if alpha <= 0 or beta <= 0:
        raise ScalingInputError(f"no compute-optimal allocation: alpha={alpha:g} and beta={beta:g} "
                                f"must be positive")
    if eff <= 0:
        raise ScalingInputError(f"no compute-optimal allocation: beta'={beta:g} <= gamma={gamma:g}, "
                                f"so the loss falls without bound as N grows at fixed compute")
    s = alpha + eff
    G = (alpha * A / (eff * B)) ** (1.0 / s)
    a = beta / s
    b = (alpha - gamma) / s
    k6 = FLOPS_PER_PARAM_TOKEN
    if not 0 < G < math.inf or not all(math.isfinite(x) for x in (a, b, k6 ** -a, k6 ** -b)):
        raise ScalingInputError(f"no finite compute-optimal allocation from these parameters (G = {G:g}, "
                                f"a = {a:g}, b = {b:g}): a degenerate fit")
    return {"G": G, "a": a, "b": b, "k_N": G * k6 ** -a, "k_D": k6 ** -b / G,
            "law": name}


def loss(params: Mapping[str, float], N, D) -> np.ndarray:
    """The law's predicted loss at (N, D)."""
    name, p = _law_params(params)
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    gamma = p.get("gamma", 0.0)
    return p["E"] + p["A"] * N ** -p["alpha"] + p["B"] * D ** -p["beta"] * N ** -gamma


def optimal(params: Mapping[str, float], flops) -> dict:
    """N_opt, D_opt, the optimal loss and tokens per parameter at compute `flops` (scalar or array)."""
    c = constants(params)
    C = np.asarray(flops, dtype=float)
    if np.any(~(C > 0)):
        raise ScalingInputError("compute budgets must be positive")
    n_opt = c["k_N"] * C ** c["a"]
    d_opt = c["k_D"] * C ** c["b"]
    out = {"flops": C, "N_opt": n_opt, "D_opt": d_opt, "L_opt": loss(params, n_opt, d_opt),
           "tokens_per_param": d_opt / n_opt}
    if C.ndim == 0:
        out = {k: float(v) for k, v in out.items()}
    return out


def compute_for_loss(params: Mapping[str, float], target: float) -> float:
    """Least compute at which the compute-optimal model reaches `target` loss (inf if never)."""
    name, p = _law_params(params)
    floor = p["E"]
    if not target > floor:
        return math.inf
    f = lambda logc: float(np.log(optimal(params, math.exp(logc))["L_opt"]) - math.log(target))
    lo, hi = math.log(1e6), math.log(1e30)
    while f(hi) > 0:
        hi += math.log(1e10)
        if hi > math.log(1e300):
            return math.inf
    while f(lo) < 0:
        lo -= math.log(1e10)
        if lo < math.log(1e-30):
            return 0.0
    return math.exp(brentq(f, lo, hi, xtol=1e-12, rtol=1e-12))


def frontier_points(compute: np.ndarray, loss_values: np.ndarray) -> np.ndarray:
    """Indices of the lower envelope: points with lower loss than every point of less compute."""
    order = np.lexsort((loss_values, compute))
    keep = []
    best = math.inf
    for i in order:
        if loss_values[i] < best:
            keep.append(i)
            best = loss_values[i]
    return np.asarray(keep, dtype=int)


def fit_frontier(table: Table, *, with_floor: bool = False, compute: np.ndarray | None = None,
                 workers: int | None = None) -> fitting.Fit:
    """Fit L = A' C^-g (+ E') to the lowest loss at each compute over all runs of `table`.

    `compute` defaults to 6 N D (target-language tokens only for CPT runs, as the paper).
    """
    c = table.compute() if compute is None else np.asarray(compute, dtype=float)
    idx = frontier_points(c, table["loss"])
    law = laws.FRONTIER_E if with_floor else laws.FRONTIER
    if idx.size < len(law.param_names) + 1:
        raise ScalingInputError(f"{table.source}: the loss-compute frontier has {idx.size} points; "
                                f"need more than {len(law.param_names)} to fit {law.formula}")
    fit = fitting.fit_law(law, {"C": c[idx]}, table["loss"][idx], workers=workers)
    fit.info["frontier_points"] = {"C": c[idx].tolist(), "loss": table["loss"][idx].tolist()}
    return fit


def allocation_report(params: Mapping[str, float], budgets: Sequence[float]) -> dict:
    """Constants plus N_opt, D_opt, L_opt at each budget, for the CLI and the planner."""
    c = constants(params)
    rows = [optimal(params, b) for b in budgets]
    law = c.pop("law")
    out = {"law": law, **c,
           "N_opt_formula": f"N_opt = {c['k_N']:.4g} * C^{c['a']:.4g}",
           "D_opt_formula": f"D_opt = {c['k_D']:.4g} * C^{c['b']:.4g}",
           "at": rows}
    if len(rows) == 1:
        out.update({k: rows[0][k] for k in ("flops", "N_opt", "D_opt", "L_opt", "tokens_per_param")})
    return out


def derived_quantities(params: Mapping[str, float], budgets: Sequence[float] = ()) -> dict[str, float]:
    """Flat dict of allocation quantities (for bootstrap intervals): G, a, b, k_N, k_D and, per
    budget C, N_opt@C, D_opt@C, L_opt@C. Missing (no optimum) quantities are NaN."""
    try:
        c = constants(params)
    except ScalingInputError:
        nan = {k: math.nan for k in ("G", "a", "b", "k_N", "k_D")}
        for b in budgets:
            nan.update({f"N_opt@{b:g}": math.nan, f"D_opt@{b:g}": math.nan, f"L_opt@{b:g}": math.nan})
        return nan
    out = {k: c[k] for k in ("G", "a", "b", "k_N", "k_D")}
    for b in budgets:
        o = optimal(params, b)
        out.update({f"N_opt@{b:g}": o["N_opt"], f"D_opt@{b:g}": o["D_opt"], f"L_opt@{b:g}": o["L_opt"]})
    return out
