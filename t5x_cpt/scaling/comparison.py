"""Model comparison: which law describes which run kind, in-sample and out of sample.

  fit_errors(table)        the paper's Table 3: the Chinchilla law and the CPT (extended) law
                           fitted to scratch runs and to CPT runs, with their fit errors
  extrapolation(table)     leave-largest-sizes-out: fit on the smaller sizes, predict the held-out
                           largest ones, report the prediction error of each law

The CPT law on CPT data is reported both ways: two-stage (E, A, alpha frozen at the scratch fit,
the paper's procedure) and unfrozen (all six free). The fit error is the mean Huber loss
(delta 1e-3) of log-loss residuals, plus the RMS log residual which is easier to read
(0.01 = 1% loss error).
"""

from __future__ import annotations

import numpy as np

from t5x_cpt.scaling import fitting, laws, procedures
from t5x_cpt.scaling.tables import ScalingInputError, Table

# Extrapolation errors within this relative distance of each other are called a tie.
TIE_RTOL = 0.05


def _errors(fit: fitting.Fit) -> dict:
    out = {"huber_mean": fit.huber_mean, "huber_sum": fit.huber_sum, "rms_log_residual": fit.rms,
           "n_points": fit.n_points, "params": fit.params}
    if fit.warnings:
        out["warnings"] = fit.warnings
    return out


def fit_errors(table: Table, *, grid: str = "full", workers: int | None = None) -> dict:
    """Table 3: fit errors of both laws on both run kinds present in `table`."""
    table.require(["run_kind"], "compare (it fits each run kind separately)")
    out: dict = {}
    scratch_fit = None
    if np.any(table["run_kind"] == "scratch"):
        t = table.filter(run_kind="scratch")
        scratch_fit = procedures.fit_table(laws.CHINCHILLA, t, grid=grid, workers=workers)
        ext = procedures.fit_table(laws.CPT, t, grid=grid, workers=workers)
        out["scratch"] = {"chinchilla": _errors(scratch_fit), "cpt_law": _errors(ext)}
    if np.any(table["run_kind"] == "cpt"):
        t = table.filter(run_kind="cpt")
        chin = procedures.fit_table(laws.CHINCHILLA, t, grid=grid, workers=workers)
        ext = procedures.fit_table(laws.CPT, t, grid=grid, workers=workers)
        out["cpt"] = {"chinchilla": _errors(chin), "cpt_law_unfrozen": _errors(ext)}
        if scratch_fit is not None:
            two = procedures.fit_cpt_two_stage(t, scratch_fit.params, grid=grid, workers=workers)
            out["cpt"]["cpt_law_two_stage"] = _errors(two)
    if not out:
        raise ScalingInputError(f"{table.source}: no scratch or cpt rows to compare")
    return out


def _holdout_split(t: Table, k: int):
    sizes = np.unique(t["N"])
    if sizes.size - k < 3:
        raise ScalingInputError(f"{t.source}: leaving out the {k} largest of {sizes.size} sizes "
                                f"leaves fewer than 3 sizes to fit")
    held = sizes[-k:]
    test = np.isin(t["N"], held)
    return t.select(~test), t.select(test), held


def _prediction_errors(law: laws.PowerLaw, fit: fitting.Fit, test: Table) -> dict:
    pred = law.predict(fit.params, **{v: test[v] for v in law.variables})
    r = np.log(pred) - np.log(test["loss"])
    rel = pred / test["loss"] - 1
    return {"rms_log_residual": float(np.sqrt(np.mean(r * r))),
            "mean_abs_rel_error": float(np.mean(np.abs(rel))),
            "max_abs_rel_error": float(np.max(np.abs(rel))),
            "huber_mean": float(np.mean(fitting.huber(r))),
            "bias_log_residual": float(np.mean(r)), "n_points": int(len(test))}


def extrapolation(table: Table, *, holdout: int = 1, grid: str = "full",
                  workers: int | None = None) -> dict:
    """Leave the `holdout` largest sizes out of each run kind, fit the rest, predict them."""
    table.require(["run_kind"], "compare (it fits each run kind separately)")
    out: dict = {}
    scratch_fit = None
    if np.any(table["run_kind"] == "scratch"):
        train, test, held = _holdout_split(table.filter(run_kind="scratch"), holdout)
        scratch_fit = procedures.fit_table(laws.CHINCHILLA, train, grid=grid, workers=workers)
        ext = procedures.fit_table(laws.CPT, train, grid=grid, workers=workers)
        out["scratch"] = {"held_out_sizes": held.tolist(),
                          "chinchilla": _prediction_errors(laws.CHINCHILLA, scratch_fit, test),
                          "cpt_law": _prediction_errors(laws.CPT, ext, test)}
    if np.any(table["run_kind"] == "cpt"):
        train, test, held = _holdout_split(table.filter(run_kind="cpt"), holdout)
        chin = procedures.fit_table(laws.CHINCHILLA, train, grid=grid, workers=workers)
        ext = procedures.fit_table(laws.CPT, train, grid=grid, workers=workers)
        entry = {"held_out_sizes": held.tolist(),
                 "chinchilla": _prediction_errors(laws.CHINCHILLA, chin, test),
                 "cpt_law_unfrozen": _prediction_errors(laws.CPT, ext, test)}
        if scratch_fit is not None:
            # Freeze from the scratch fit on the held-in sizes only, so nothing about the
            # held-out sizes leaks into the prediction.
            two = procedures.fit_cpt_two_stage(train, scratch_fit.params, grid=grid, workers=workers)
            entry["cpt_law_two_stage"] = _prediction_errors(laws.CPT, two, test)
        out["cpt"] = entry
    return out


def compare(table: Table, *, holdout: int = 1, grid: str = "full", workers: int | None = None) -> dict:
    """Fit errors (Table 3) and extrapolation errors, with a one-line verdict per run kind."""
    errors = fit_errors(table, grid=grid, workers=workers)
    extra = extrapolation(table, holdout=holdout, grid=grid, workers=workers)
    verdict = {}
    for kind, entry in extra.items():
        ranked = sorted((k for k in entry if k != "held_out_sizes"),
                        key=lambda k: entry[k]["mean_abs_rel_error"])
        best, second = ranked[0], ranked[1]
        e1, e2 = entry[best]["mean_abs_rel_error"], entry[second]["mean_abs_rel_error"]
        if e2 - e1 <= TIE_RTOL * e2:
            verdict[kind] = (f"tie on the held-out largest sizes: {best} and {second} predict within "
                            f"{TIE_RTOL:.0%} of each other (mean |relative error| {e1:.2%} vs {e2:.2%})")
        else:
            verdict[kind] = (f"lowest extrapolation error on the held-out largest sizes: {best} "
                            f"(mean |relative error| {e1:.2%}; next {second}: {e2:.2%})")
    return {"fit_errors": errors, "extrapolation": extra, "holdout": holdout, "verdict": verdict}
