"""`report`: every analysis of the toolkit on one run table, as one JSON object, plus figures.

Sections (each present when the table supports it):
  scratch_fit       Chinchilla law on scratch runs (+ bootstrap)
  cpt_fit           CPT law, two-stage from the scratch fit (+ bootstrap carrying the scratch
                    fit's replicates); cpt_fit_unfrozen with all six parameters free
  allocation        N_opt, D_opt, L_opt at the budgets, both laws (+ intervals)
  frontier          lowest loss at each compute, fitted L = A' C^-g, per run kind
  compare           Table 3 fit errors and leave-largest-sizes-out errors
  savings           per CPT run, along training (summary + final points)
  plans             the planner at each budget
  forgetting        the law of forgetting on --forgetting_runs
  checks            the paper's qualitative findings, tested on these fits
  plots             paths of the PNG figures written to --plots_dir
"""

from __future__ import annotations

import logging
import os

from t5x_cpt.scaling import (allocation, comparison, forgetting, laws, planner, plots,
                             procedures, savings)
from t5x_cpt.scaling.tables import ScalingInputError, read_table

log = logging.getLogger(__name__)


def build(args, budgets: list[float]) -> dict:
    """Run every applicable analysis (module docstring) for the CLI's `report` command.

    `budgets` are the compute budgets (FLOPs) for allocation and plans, parsed from --flops.
    """
    table = read_table(args.runs)
    if args.language:
        table = table.filter(language=args.language)
    table.require(["run_kind"], "report")
    kinds = table.run_kinds()
    out: dict = {"table": os.path.abspath(args.runs), "rows": len(table), "run_kinds": kinds,
                 "budgets": budgets}
    figs: list[str] = []
    scratch = cpt = None
    if "scratch" in kinds:
        t = table.filter(run_kind="scratch")
        log.info("fitting the Chinchilla law to %d scratch points", len(t))
        scratch = procedures.fit_table(laws.CHINCHILLA, t, grid=args.grid, workers=args.workers)
        if args.bootstrap:
            _bootstrap_or_note(out, "scratch_fit", lambda: procedures.attach_bootstrap(
                scratch, t, procedures.coarse_refit(laws.CHINCHILLA, scratch), n=args.bootstrap, seed=args.seed,
                level=args.level, budgets=budgets))
        out["scratch_fit"] = scratch.to_json()
    if "cpt" in kinds:
        t = table.filter(run_kind="cpt")
        log.info("fitting the CPT law to %d cpt points", len(t))
        unfrozen = procedures.fit_table(laws.CPT, t, grid=args.grid, workers=args.workers)
        out["cpt_fit_unfrozen"] = unfrozen.to_json()
        cpt = unfrozen
        if scratch is not None:
            try:
                cpt = procedures.fit_cpt_two_stage(t, scratch.params, grid=args.grid, workers=args.workers)
            except ScalingInputError as e:  # e.g. the scratch fit's E collapsed to 0: nothing to freeze
                out["cpt_fit_error"] = f"no two-stage CPT fit ({e}); cpt_fit is the fit with every parameter free"
        if scratch is not None and "cpt_fit_error" not in out and args.bootstrap:
            def attach_cpt_bootstrap():
                provider = procedures.scratch_sample_provider(out["scratch_fit"])
                refit = procedures.coarse_refit(laws.CPT, cpt, frozen_for=provider, freeze=procedures.CPT_FROZEN)
                procedures.attach_bootstrap(cpt, t, refit, n=args.bootstrap, seed=args.seed + 1, level=args.level,
                                            budgets=budgets)
            _bootstrap_or_note(out, "cpt_fit", attach_cpt_bootstrap)
        out["cpt_fit"] = cpt.to_json()
    out["allocation"] = {}
    for name, fit in (("scratch", scratch), ("cpt", cpt)):
        if fit is not None:
            try:
                out["allocation"][name] = allocation.allocation_report(fit.params, budgets)
            except ScalingInputError as e:
                out["allocation"][name] = {"error": str(e)}
    out["frontier"] = {}
    for kind in kinds:
        try:
            out["frontier"][kind] = allocation.fit_frontier(table.filter(run_kind=kind),
                                                           workers=args.workers).to_json()
        except ScalingInputError as e:
            out["frontier"][kind] = {"error": str(e)}
    try:
        out["compare"] = comparison.compare(table, holdout=args.holdout, grid=args.grid,
                                            workers=args.workers)
    except ScalingInputError as e:
        out["compare"] = {"error": str(e)}
    sav = None
    if "scratch" in kinds and "cpt" in kinds:
        # Read off the runs; the scratch law only places CPT losses beyond the scratch run's range.
        sav = savings.savings(table, scratch_params=scratch.params if scratch is not None else None)
        # Each run's points cut to what the savings are read from (the saving along training).
        out["savings"] = {"summary": sav["summary"], "compute": sav["compute"],
                          "runs": [{**{k: v for k, v in r.items() if k != "points"},
                                    "along": [{k: p[k] for k in ("D", "saved_fraction", "transferred_tokens", "method")}
                                              for p in r.get("points", [])]} for r in sav["runs"]]}
        try:
            if scratch is None or cpt is None:
                raise ScalingInputError("plans need both a scratch fit and a CPT fit")
            out["plans"] = [planner.plan(out["scratch_fit"], out["cpt_fit"], c) for c in budgets]
        except ScalingInputError as e:
            out["plans"] = {"error": str(e)}
    fg = None
    if args.forgetting_runs:
        ft = read_table(args.forgetting_runs)
        fg_fit = forgetting.fit_forgetting(ft, workers=args.workers)
        fg = fg_fit.to_json()
        out["forgetting"] = forgetting.summary(ft, fg_fit)
    out["checks"] = _checks(scratch, cpt, out)
    if args.plots_dir:
        d = args.plots_dir
        fits = {}
        if scratch is not None:
            fits["scratch"] = scratch.params
        if cpt is not None:
            fits["cpt"] = cpt.params
        figs.append(plots.loss_vs_compute(table, fits, os.path.join(d, "scaling_loss_vs_compute.png")))
        for name, fit in (("scratch", scratch), ("cpt", cpt)):
            if fit is not None:
                try:
                    figs.append(plots.isoloss(fit.params, os.path.join(d, f"scaling_isoloss_{name}.png"),
                                              table=table.filter(run_kind=name), title=f"{name} law"))
                except ScalingInputError as e:
                    log.warning("no IsoLoss plot for %s: %s", name, e)
        if sav is not None:
            figs.append(plots.savings(sav, os.path.join(d, "scaling_savings.png")))
        if fg is not None:
            figs.append(plots.forgetting_curves(read_table(args.forgetting_runs), fg,
                                                os.path.join(d, "scaling_forgetting.png")))
        out["plots"] = [os.path.abspath(f) for f in figs]
    return out


def _bootstrap_or_note(out: dict, fit_name: str, attach) -> None:
    """Run `attach` (a bootstrap); if the replicates cannot be fitted, say so instead of failing the report."""
    try:
        attach()
    except ScalingInputError as e:
        out[f"{fit_name}_bootstrap_error"] = str(e)


def _checks(scratch, cpt, out) -> dict:
    """The paper's qualitative findings, evaluated on these fits (True/False/None)."""
    checks: dict = {}
    if cpt is not None and "gamma" in cpt.params:
        checks["gamma_positive (joint data-parameter term)"] = cpt.params["gamma"] > 0
        if scratch is not None:
            checks["beta_cpt_below_beta_scratch"] = cpt.params["beta"] < scratch.params["beta"]
    alloc = out.get("allocation", {})
    if "at" in alloc.get("scratch", {}) and "at" in alloc.get("cpt", {}):
        checks["cpt_optimum_at_larger_N (every budget)"] = all(
            c["N_opt"] > s["N_opt"] for s, c in zip(alloc["scratch"]["at"], alloc["cpt"]["at"]))
    sav = out.get("savings", {}).get("summary", {}).get("final_saved_fraction")
    if sav:
        checks["cpt_saves_compute (every run, final point)"] = sav["min"] > 0
    return checks
