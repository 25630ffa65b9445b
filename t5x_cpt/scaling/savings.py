"""Savings of CPT over training from scratch, measured on runs.

For every evaluation point of every CPT run (size N, target tokens D_cpt, target loss L), find the
tokens D_scratch a scratch run of the same size needed to reach the same loss, by interpolating
the scratch run's curve log D against log L (on its lower envelope, so a noisy uptick cannot make
the inverse ambiguous). Then

    saved fraction        1 - C_cpt / C_scratch   (= 1 - D_cpt / D_scratch with C = 6 N D)
    transferred tokens    D_scratch - D_cpt       (the paper's "effectively transferred data")

and, per CPT run, `at_scratch_end` and `at_scratch_quarter`: the saving at the scratch run's final
loss and at its loss a quarter into its tokens, read off the two curves without a law
(saving_at_scratch_point) — the robust figures when the scratch fit is weak.

Compute convention: C = 6 N D with D the *target-language* tokens, as the paper ("CPT compute
counts the target-language tokens only"); with `compute="flops"` the trainer-logged FLOPs are used
instead (scaled by 1 - replay_ratio for CPT runs so replayed source tokens are not counted).

Points outside the scratch curve's loss range are either left out (method "out_of_range") or,
when a scratch fit is given, obtained by inverting the fitted law (method "law", flagged).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from t5x_cpt.scaling import allocation
from t5x_cpt.scaling.tables import ScalingInputError, Table

SIZE_RTOL = 1e-3


def _envelope(d: np.ndarray, loss: np.ndarray, c: np.ndarray):
    """A run's (D, loss, C), sorted by D, reduced to its strictly decreasing envelope."""
    d, loss, c = (np.asarray(x, dtype=float) for x in (d, loss, c))
    keep = loss < np.minimum.accumulate(np.concatenate([[np.inf], loss[:-1]]))
    return d[keep], loss[keep], c[keep]


def _curve(table: Table, rows: np.ndarray, compute: np.ndarray):
    """(D, loss, C) of one run sorted by D and reduced to its strictly decreasing envelope."""
    return _envelope(*run_curve(table, rows, compute))


def _run_compute(table: Table, how: str) -> np.ndarray:
    if how == "6nd":
        return table.compute()
    if how == "flops":
        table.require(["flops"], "savings with --compute=flops")
        fl = table["flops"]
        if np.any(~np.isfinite(fl)):
            raise ScalingInputError(f"{table.source}: --compute=flops but some rows have no flops")
        r = table["replay_ratio"] if table.has("replay_ratio") else np.zeros(len(table))
        r = np.where(np.isfinite(r), r, 0.0)
        kind = table["run_kind"]
        return np.where(kind == "cpt", fl * (1.0 - r), fl)
    raise ScalingInputError(f"unknown compute convention {how!r}; use 6nd or flops")


def invert_scratch_law(params: Mapping[str, float], N: float, target: float) -> float:
    """Tokens at which the scratch law reaches `target` loss at size N (inf if it never does)."""
    gap = target - (params["E"] + params["A"] * N ** -params["alpha"])
    if gap <= 0:
        return math.inf
    return (params["B"] / gap) ** (1.0 / params["beta"])


def savings(table: Table, *, scratch_params: Mapping[str, float] | None = None,
            compute: str = "6nd") -> dict:
    """Savings of every CPT run against the scratch run of the same size (module docstring)."""
    table.require(["run_kind"], "savings (it pairs cpt runs with scratch runs)")
    kind = table["run_kind"]
    if not np.any(kind == "cpt") or not np.any(kind == "scratch"):
        raise ScalingInputError(f"{table.source}: savings needs both scratch and cpt rows; "
                                f"run kinds present: {sorted(set(kind))}")
    comp = _run_compute(table, compute)
    runs = table.run_ids()
    scratch_runs = {}
    for run in sorted(set(runs[kind == "scratch"])):
        rows = np.flatnonzero((runs == run) & (kind == "scratch"))
        scratch_runs[run] = (float(table["N"][rows[0]]), rows)
    out_runs = []
    cpt_runs = set(runs[kind == "cpt"])
    size_of = {r: float(table["N"][np.flatnonzero((runs == r) & (kind == "cpt"))[0]]) for r in cpt_runs}
    for run in sorted(cpt_runs, key=lambda r: (size_of[r], r)):       # by size, then name
        rows = np.flatnonzero((runs == run) & (kind == "cpt"))
        n = float(table["N"][rows[0]])
        same = [(r, rs) for r, (ns, rs) in scratch_runs.items() if abs(ns - n) <= SIZE_RTOL * n]
        entry = {"run": str(run), "N": n,
                 "replay_ratio": float(table["replay_ratio"][rows[0]]) if table.has("replay_ratio") else 0.0}
        if not same and scratch_params is None:
            entry["error"] = f"no scratch run of size {n:.4g} and no scratch fit to fall back on"
            out_runs.append(entry)
            continue
        curve = None
        if same:
            # The longest scratch run of that size covers the widest loss range.
            s_run, s_rows = max(same, key=lambda x: table["D"][x[1]].max())
            curve = _curve(table, s_rows, comp)
            entry["scratch_run"] = str(s_run)
        rows = rows[np.argsort(table["D"][rows])]
        points = []
        for i in rows:
            points.append(_point(table, i, comp[i], n, curve, scratch_params))
        entry["points"] = points
        if curve is not None:
            s_curve, c_curve = run_curve(table, s_rows, comp), run_curve(table, rows, comp)
            entry["at_scratch_end"] = saving_at_scratch_point(s_curve, c_curve)
            entry["at_scratch_quarter"] = saving_at_scratch_point(s_curve, c_curve, fraction=0.25)
        good = [p for p in points if p["saved_fraction"] is not None]
        if good:
            last = good[-1]
            entry["final"] = last
            d = np.array([p["D"] for p in good])
            tr = np.array([p["transferred_tokens"] for p in good])
            if len(good) >= 2:
                slope, icpt = np.polyfit(d, tr, 1)
                pred = slope * d + icpt
                ss = float(np.sum((tr - tr.mean()) ** 2))
                entry["transferred_vs_tokens"] = {
                    "slope": float(slope), "intercept": float(icpt),
                    "r2": float(1 - np.sum((tr - pred) ** 2) / ss) if ss > 0 else None}
        out_runs.append(entry)
    finals = [r["final"]["saved_fraction"] for r in out_runs if "final" in r]
    return {
        "compute": "C = 6 N D, target-language tokens" if compute == "6nd" else
                   "trainer FLOPs (x (1 - replay_ratio) for cpt)",
        "runs": out_runs,
        "summary": {
            "n_cpt_runs": len(out_runs),
            "final_saved_fraction": {"min": min(finals), "max": max(finals)} if finals else None,
        },
    }


def run_curve(table: Table, rows: np.ndarray, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, loss, compute) of one run's rows, sorted by tokens: what saving_at_scratch_point reads."""
    rows = rows[np.argsort(table["D"][rows])]
    return table["D"][rows], table["loss"][rows], compute[rows]


def saving_at_scratch_point(scratch: tuple, cpt: tuple, fraction: float = 1.0) -> dict:
    """The saving read off two runs' curves without any law: the compute CPT needed to reach the
    scratch run's loss at `fraction` of its tokens (its first evaluation at or past it; 1 = its
    final loss) against the scratch run's compute there.

    `scratch` and `cpt` are (tokens, loss, compute) arrays of one run each, sorted by tokens, with
    positive tokens and compute (run_curve builds them from a table; the demo from its metrics).
    When the CPT run never gets there, the other way round at the same fraction of the CPT run:
    the compute the scratch run needed to reach that CPT loss against the CPT run's compute (a
    negative saving). Curves are interpolated linearly in log compute against log loss between
    evaluations, on their decreasing envelopes; where the goal lies before a curve's first
    evaluation, that evaluation bounds the saving ("at_least" / "at_most").
    """
    def at_fraction(curve):
        d, loss, c = (np.asarray(x, dtype=float) for x in curve)
        k = int(np.argmax(d >= fraction * d[-1] * (1 - 1e-12)))
        return float(loss[k]), float(c[k])

    def compute_to_reach(curve, goal):
        _, loss, c = _envelope(*curve)
        if loss[0] <= goal:
            return float(c[0]), True
        return float(np.exp(np.interp(-math.log(goal), -np.log(loss), np.log(c)))), False

    goal, c_scratch = at_fraction(scratch)
    out = {"fraction": fraction, "scratch_loss": goal, "C_scratch": c_scratch}
    if float(np.min(cpt[1])) <= goal:
        c_cpt, bound = compute_to_reach(cpt, goal)
        return {**out, "C_cpt": c_cpt, "saved_fraction": 1.0 - c_cpt / c_scratch,
                "method": "at_least" if bound else "cpt_reaches_scratch"}
    cpt_loss, c_cpt = at_fraction(cpt)
    c_scratch, bound = compute_to_reach(scratch, cpt_loss)
    return {**out, "cpt_loss": cpt_loss, "C_cpt": c_cpt, "C_scratch": c_scratch,
            "saved_fraction": 1.0 - c_cpt / c_scratch, "method": "at_most" if bound else "scratch_reaches_cpt"}


def _point(table: Table, i: int, c_cpt: float, n: float, curve, scratch_params) -> dict:
    d_cpt, loss = float(table["D"][i]), float(table["loss"][i])
    p = {"D": d_cpt, "loss": loss, "C": float(c_cpt), "D_scratch": None, "C_scratch": None,
         "saved_fraction": None, "transferred_tokens": None, "method": "out_of_range"}
    if curve is not None:
        d_s, l_s, c_s = curve
        if l_s.size >= 2 and l_s[-1] <= loss <= l_s[0]:
            # x must increase for np.interp: -log L increases along the envelope.
            x = -np.log(l_s)
            p["D_scratch"] = float(np.exp(np.interp(-math.log(loss), x, np.log(d_s))))
            p["C_scratch"] = float(np.exp(np.interp(-math.log(loss), x, np.log(c_s))))
            p["method"] = "interpolated"
    if p["D_scratch"] is None and scratch_params is not None:
        d_law = invert_scratch_law(scratch_params, n, loss)
        if math.isfinite(d_law):
            p["D_scratch"] = d_law
            p["C_scratch"] = float(c_cpt * d_law / d_cpt)   # same N: compute scales with tokens
            p["method"] = "law"
    if p["D_scratch"] is not None:
        p["saved_fraction"] = 1.0 - c_cpt / p["C_scratch"]
        p["transferred_tokens"] = p["D_scratch"] - d_cpt
    return p


def savings_from_laws(scratch_params: Mapping[str, float], cpt_params: Mapping[str, float],
                      N: float, tokens) -> dict:
    """Saving predicted by the two laws for a CPT run of size N at the given target tokens."""
    tokens = np.atleast_1d(np.asarray(tokens, dtype=float))
    loss = allocation.loss(cpt_params, N, tokens)
    d_s = np.array([invert_scratch_law(scratch_params, N, l) for l in loss])
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"D": tokens.tolist(), "loss": loss.tolist(), "D_scratch": d_s.tolist(),
                "saved_fraction": (1 - tokens / d_s).tolist(),
                "transferred_tokens": (d_s - tokens).tolist()}
