"""The law of forgetting: source-language loss of CPT/replay runs against per-language compute.

    L_src = L0 + F * C_t^phi / ((1 + K r) N)^psi            (laws.forgetting_law explains the form)

Rows: the source-language evaluation loss of CPT runs (`collect --loss_key=eval/<src>/loss`), with
N, D (target-language tokens), replay_ratio r and, if available, loss0 (the run's source loss at
step 0, i.e. the source model's). C_t = 6 N D is the run's target-language compute.

For a fixed replay efficiency K the law is a power-sum law (linear in its log parameters), fitted
by the usual vectorised Huber/L-BFGS fit; K enters non-linearly and is profiled: the fit is
repeated over a log grid of K and refined by a bounded scalar search around the best grid value.
With no replay in the data (all r = 0) K is meaningless and fixed at 0, with a warning.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from t5x_cpt.scaling import fitting, laws
from t5x_cpt.scaling.tables import ScalingInputError, Table

K_GRID_LOG10 = np.arange(-1.0, 4.01, 0.5)


def _columns(table: Table, k: float, with_baseline: bool) -> dict[str, np.ndarray]:
    r = table["replay_ratio"] if table.has("replay_ratio") else np.zeros(len(table))
    cols = {"C": table.compute(), "M": (1.0 + k * r) * table["N"]}
    if with_baseline:
        cols["loss0"] = table["loss0"]
    return cols


def fit_forgetting(table: Table, *, workers: int | None = None) -> fitting.Fit:
    """Fit the forgetting law to source-language losses of CPT runs (module docstring)."""
    with_baseline = table.has("loss0") and bool(np.all(np.isfinite(table["loss0"])) and
                                               np.all(table["loss0"] > 0))
    law = laws.forgetting_law(with_baseline)
    if len(table) <= len(law.param_names):
        raise ScalingInputError(f"{table.source}: forgetting fit has {len(table)} points for "
                                f"{len(law.param_names) + 1} parameters (with K)")
    r = table["replay_ratio"] if table.has("replay_ratio") else np.zeros(len(table))
    warnings = []
    if not table.has("replay_ratio"):
        warnings.append("no replay_ratio column: every run taken as r = 0")
    if not with_baseline:
        warnings.append("no loss0 column (source loss at step 0): the baseline L0 is fitted as a "
                        "constant E shared by all runs")

    def fit_at(k: float) -> fitting.Fit:
        return fitting.fit_law(law, _columns(table, k, with_baseline), table["loss"], workers=workers)

    if not np.any(r > 0):
        best_k, best = 0.0, fit_at(0.0)
        warnings.append("no replay runs (all r = 0): K is not identifiable and fixed at 0")
    else:
        trials = {float(lk): fit_at(10.0 ** lk) for lk in K_GRID_LOG10}
        lk0 = min(trials, key=lambda lk: trials[lk].huber_sum)
        step = float(K_GRID_LOG10[1] - K_GRID_LOG10[0])
        res = minimize_scalar(lambda lk: fit_at(10.0 ** lk).huber_sum, method="bounded",
                              bounds=(lk0 - step, lk0 + step), options={"xatol": 0.02})
        best_lk = float(res.x) if res.fun < trials[lk0].huber_sum else lk0
        best_k, best = 10.0 ** best_lk, fit_at(10.0 ** best_lk)
        if best_lk >= K_GRID_LOG10[-1] - 1e-9 or best_lk <= K_GRID_LOG10[0] + step - 1e-9:
            warnings.append(f"K = {best_k:.3g} is at the end of the searched range "
                            f"[1e{K_GRID_LOG10[0]:g}, 1e{K_GRID_LOG10[-1]:g}]")
    best.warnings.extend(warnings)
    best.info.update({"K": best_k, "baseline": "loss0 column" if with_baseline else "fitted E",
                      "compute": "C_t = 6 N D (target-language tokens)"})
    return best


def predict(fit_json: dict, N, D, replay_ratio, loss0=None) -> np.ndarray:
    """Source-language loss predicted by a forgetting fit (JSON from `Fit.to_json`)."""
    k = float(fit_json["K"])
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    r = np.asarray(replay_ratio, dtype=float)
    base = fit_json.get("E") if loss0 is None else loss0
    if base is None:
        raise ScalingInputError("this forgetting fit uses per-run loss0: pass loss0")
    c = laws.scaling_compute(N, D)
    return np.asarray(base) + float(fit_json["F"]) * c ** float(fit_json["phi"]) / (
        (1.0 + k * r) * N) ** float(fit_json["psi"])


def summary(table: Table, fit: fitting.Fit) -> dict:
    """Per replay ratio: first and last source loss and the rise, for the report."""
    r = table["replay_ratio"] if table.has("replay_ratio") else np.zeros(len(table))
    out = []
    runs = table.run_ids()
    for ratio in sorted(set(r.tolist())):
        rows = np.flatnonzero(r == ratio)
        per_run = []
        for run in sorted(set(runs[rows])):
            rr = rows[runs[rows] == run]
            rr = rr[np.argsort(table["D"][rr])]
            start = float(table["loss0"][rr[0]]) if table.has("loss0") and math.isfinite(
                table["loss0"][rr[0]]) else float(table["loss"][rr[0]])
            per_run.append({"run": str(run), "N": float(table["N"][rr[0]]),
                            "source_loss_start": start, "source_loss_end": float(table["loss"][rr[-1]]),
                            "rise": float(table["loss"][rr[-1]]) - start})
        out.append({"replay_ratio": float(ratio), "runs": per_run})
    return {"by_replay_ratio": out, "fit": fit.to_json()}
