"""Command line: `python -m t5x_cpt.scaling <command> [flags]` (docs/scaling.md).

Every command prints exactly one JSON object on stdout (and writes it to --out when given); logs
go to stderr. Bad input prints one message on stderr, a JSON object {"error": ...} on stdout and
exits with status 2; anything else is a bug and ends in a traceback (docs/errors.md).

  collect   MODEL_DIRs (metrics.jsonl + run_info.json) -> run table CSV
  fit       one law on a run table (chinchilla | cpt | frontier | frontier_e | forgetting | mixture)
  allocate  compute-optimal N, D (and loss) at budgets from a fit
  savings   per CPT run: compute saved and tokens transferred against same-size scratch runs
  plan      recommended N, D for CPT and scratch at a budget, predicted losses and saving;
            with --recommend_replay: the replay ratio that keeps the source language within a
            tolerance at the least cost in target loss
  compare   fit errors of both laws on both run kinds, and leave-largest-sizes-out errors;
            with --held_out_replay: the mixture law against the project's laws on a left-out ratio
  report    all of the above on one table, plus plots
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Sequence

import numpy as np

from t5x_cpt.errors import UserInputError, one_line, run_command
from t5x_cpt.scaling import (allocation, bootstrap, collect, comparison, forgetting, laws, mixture, planner,
                             procedures, report, savings as savings_mod)
from t5x_cpt.scaling.tables import ScalingInputError, Table, read_table, write_table

log = logging.getLogger("t5x_cpt.scaling")

FIT_LAWS = ("chinchilla", "cpt", "frontier", "frontier_e", "forgetting", "mixture")
DEFAULT_RUN_KIND = {"chinchilla": "scratch", "cpt": "cpt", "forgetting": "cpt", "mixture": "cpt"}


# ---- helpers -----------------------------------------------------------------------------
def _floats(text: str, flag: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ScalingInputError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise ScalingInputError(f"{flag}: no values")
    return vals


def _read_json(path: str, flag: str) -> dict:
    if not path:
        raise ScalingInputError(f"{flag} is required")
    return collect.read_json_object(path, flag)


def _bounds(text: str | None) -> dict[str, tuple[float, float]] | None:
    """"alpha=0:5,beta=0:5" -> {"alpha": (0, 5), ...} (log-space names; empty side = unbounded)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        try:
            name, rng = part.split("=")
            lo, hi = rng.split(":")
            out[name.strip()] = (float(lo) if lo.strip() else -math.inf,
                                 float(hi) if hi.strip() else math.inf)
        except ValueError:
            raise ScalingInputError(f"--bounds: cannot parse {part!r}; use name=low:high") from None
    return out


def json_safe(obj):
    """JSON-safe copy: numpy -> python, NaN/inf -> None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _table(args, run_kind_default: str | None = None) -> Table:
    t = read_table(args.runs)
    if getattr(args, "language", None):
        t = t.filter(language=args.language)
    run_kind = getattr(args, "run_kind", None)
    if run_kind is None and run_kind_default and t.has("run_kind") and len(t.run_kinds()) > 1:
        run_kind = run_kind_default
        log.info("table holds run kinds %s: using --run_kind=%s", t.run_kinds(), run_kind)
    if run_kind:
        t = t.filter(run_kind=run_kind)
    return t


# ---- commands ----------------------------------------------------------------------------
def cmd_collect(args) -> dict:
    table = collect.collect(args.model_dirs, language=args.language, loss_key=args.loss_key,
                            params_key=args.params_key)
    write_table(args.csv, table)
    runs = sorted(set(table["run"]))
    return {"csv": os.path.abspath(args.csv), "rows": len(table), "runs": runs,
            "run_kinds": table.run_kinds(), "loss_keys": sorted(set(table["loss_key"])),
            "columns": list(table.columns)}


def cmd_fit(args) -> dict:
    law_name = args.law
    budgets = _floats(args.flops, "--flops") if args.flops else []
    if law_name == "cpt" and not args.frozen and not args.unfrozen:
        raise ScalingInputError("a CPT fit freezes E, A, alpha at a scratch fit: pass "
                                "--frozen=<scratch fit JSON> (the paper's two-stage fit), or "
                                "--unfrozen to fit all six parameters")
    if args.frozen and law_name != "cpt":
        raise ScalingInputError("--frozen applies to --law=cpt only")
    if law_name == "mixture" and not args.mixture_role:
        raise ScalingInputError("--law=mixture needs --mixture_role=target (the table holds the target "
                                "language's losses) or --mixture_role=source (the replayed language's)")
    table = _table(args, DEFAULT_RUN_KIND.get(law_name))
    t0 = time.perf_counter()
    if law_name == "mixture":
        if args.bootstrap:
            raise ScalingInputError("--bootstrap is not supported for --law=mixture")
        out = mixture.fit_mixture(table, args.mixture_role, epsilon=args.epsilon)
        out["run_kind"] = getattr(args, "run_kind", None)
        out["table"] = os.path.abspath(args.runs)
        out["seconds"] = time.perf_counter() - t0
        return out
    if law_name == "forgetting":
        fit = forgetting.fit_forgetting(table, workers=args.workers)
        if args.bootstrap:
            raise ScalingInputError("--bootstrap is not supported for --law=forgetting")
        out = forgetting.summary(table, fit)
        out = {**out["fit"], "by_replay_ratio": out["by_replay_ratio"]}
    elif law_name in ("frontier", "frontier_e"):
        fit = allocation.fit_frontier(table, with_floor=law_name == "frontier_e", workers=args.workers)
        out = fit.to_json()
    else:
        law = laws.LAWS[law_name]
        frozen_json = _read_json(args.frozen, "--frozen") if args.frozen else None
        freeze = procedures.CPT_FROZEN if frozen_json else ()
        fit = procedures.fit_table(law, table, frozen_params=frozen_json, freeze=freeze,
                                   grid=args.grid, workers=args.workers, bounds=_bounds(args.bounds))
        if frozen_json:
            fit.info["frozen_from"] = os.path.abspath(args.frozen)
        if args.bootstrap:
            provider = procedures.scratch_sample_provider(frozen_json) if frozen_json else None
            if frozen_json and provider is None:
                fit.warnings.append("the scratch fit has no bootstrap samples: the intervals hold "
                                    "E, A, alpha fixed and understate the uncertainty (fit the "
                                    "scratch law with --bootstrap too)")
            frozen_for = provider or ((lambda i: frozen_json) if frozen_json else None)
            refit = procedures.coarse_refit(law, fit, frozen_for=frozen_for, freeze=freeze,
                                            workers=1)
            procedures.attach_bootstrap(fit, table, refit, n=args.bootstrap, seed=args.seed,
                                        level=args.level, budgets=budgets)
        out = fit.to_json()
        if law_name in ("chinchilla", "cpt"):
            try:
                out["allocation"] = allocation.allocation_report(fit.params, budgets or [1e21])
            except ScalingInputError as e:
                out["allocation"] = {"error": str(e)}
    out["run_kind"] = getattr(args, "run_kind", None) or (table.run_kinds()[0] if len(table.run_kinds()) == 1 else None)
    out["table"] = os.path.abspath(args.runs)
    out["seconds"] = time.perf_counter() - t0
    log.info("%s", " ".join(f"{k}={out[k]:.4g}" for k in fit.law.natural_names()))
    return out


def cmd_allocate(args) -> dict:
    fit = _read_json(args.fit, "--fit")
    budgets = _floats(args.flops, "--flops")
    out = allocation.allocation_report(fit, budgets)
    boot = fit.get("bootstrap")
    if boot:
        names = list(laws.law_from_params(fit).natural_names())
        samples = bootstrap.samples_as_dicts(boot, names)
        if samples:
            level = float(boot.get("level", 0.9))
            vals: dict[str, list[float]] = {}
            for s in samples:
                for k, v in allocation.derived_quantities(s, budgets).items():
                    vals.setdefault(k, []).append(v)
            out["intervals"] = {k: bootstrap.percentile_interval(v, level) for k, v in vals.items()}
            out["interval_level"] = level
    return out


def cmd_savings(args) -> dict:
    table = read_table(args.runs)
    if args.language:
        table = table.filter(language=args.language)
    scratch = _read_json(args.fit_scratch, "--fit_scratch") if args.fit_scratch else None
    return savings_mod.savings(table, scratch_params=scratch, compute=args.compute)


def cmd_plan(args) -> dict:
    if args.recommend_replay:
        return _recommend_replay(args)
    scratch = _read_json(args.fit_scratch, "--fit_scratch")
    cpt = _read_json(args.fit_cpt, "--fit_cpt")
    if not args.flops:
        raise ScalingInputError("--flops is required")
    flops = _floats(args.flops, "--flops")
    sizes = _floats(args.source_sizes, "--source_sizes") if args.source_sizes else None
    plans = [planner.plan(scratch, cpt, c, replay_ratio=args.replay_ratio, source_sizes=sizes,
                          level=args.level) for c in flops]
    return plans[0] if len(plans) == 1 else {"plans": plans}


def _recommend_replay(args) -> dict:
    missing = [f for f, v in (("--fit_target", args.fit_target), ("--fit_source", args.fit_source),
                              ("--N", args.N), ("--source_loss0", args.source_loss0),
                              ("--tolerance", args.tolerance)) if v is None]
    if (args.tokens is None) == (args.flops is None):
        missing.append("exactly one of --tokens and --flops")
    if missing:
        raise ScalingInputError(f"--recommend_replay needs {', '.join(missing)}")
    if args.flops is not None and len(_floats(args.flops, "--flops")) != 1:
        raise ScalingInputError("--recommend_replay takes one budget: pass one value to --flops")
    tokens = args.tokens if args.tokens is not None else _floats(args.flops, "--flops")[0] / (
        laws.FLOPS_PER_PARAM_TOKEN * args.N)
    return mixture.recommend_replay(_read_json(args.fit_target, "--fit_target"),
                                    _read_json(args.fit_source, "--fit_source"), N=args.N, tokens=tokens,
                                    source_loss0=args.source_loss0, tolerance=args.tolerance)


def cmd_compare(args) -> dict:
    table = read_table(args.runs)
    if args.language:
        table = table.filter(language=args.language)
    if args.held_out_replay is not None:
        if not args.source_runs:
            raise ScalingInputError("--held_out_replay needs --source_runs (the CPT runs' source-language losses)")
        source = read_table(args.source_runs)
        if args.language:
            source = source.filter(language=args.language)
        return mixture.compare_held_out(table.filter(run_kind="cpt") if table.has("run_kind") else table,
                                        source, args.held_out_replay)
    return comparison.compare(table, holdout=args.holdout, grid=args.grid, workers=args.workers)


def cmd_report(args) -> dict:
    return report.build(args, budgets=_floats(args.flops, "--flops"))


COMMANDS = {"collect": cmd_collect, "fit": cmd_fit, "allocate": cmd_allocate,
            "savings": cmd_savings, "plan": cmd_plan, "compare": cmd_compare, "report": cmd_report}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m t5x_cpt.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, runs=True):
        sp.add_argument("--out", help="also write the JSON result to this file")
        sp.add_argument("--workers", type=int, default=None, help="threads for fits (default: CPUs, max 4)")
        sp.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
        if runs:
            sp.add_argument("--runs", required=True, help="run table CSV (columns N, D, loss, ...)")
            sp.add_argument("--language", help="keep rows of this language only")

    sp = sub.add_parser("collect", help="build a run table from MODEL_DIRs")
    common(sp, runs=False)
    sp.add_argument("--model_dirs", required=True, help="comma list of directories and/or globs")
    sp.add_argument("--csv", required=True, help="where to write the run table")
    sp.add_argument("--language", help="pick the first eval/<task>/loss whose task names this language")
    sp.add_argument("--loss_key", help="metrics key of the loss, e.g. eval/zh/loss")
    sp.add_argument("--params_key", default="params", choices=("params", "non_embedding_params"),
                    help="run_info.json field used as N")

    sp = sub.add_parser("fit", help="fit a law to a run table")
    common(sp)
    sp.add_argument("--law", required=True, choices=FIT_LAWS)
    sp.add_argument("--run_kind", choices=("scratch", "cpt", "source"))
    sp.add_argument("--frozen", help="scratch fit JSON: freeze E, A, alpha (two-stage CPT fit)")
    sp.add_argument("--unfrozen", action="store_true", help="CPT fit with all six parameters free")
    sp.add_argument("--grid", default="full", choices=procedures.GRID_CHOICES)
    sp.add_argument("--bounds", help="log-space bounds, e.g. alpha=0:5,beta=0:5")
    sp.add_argument("--bootstrap", type=int, default=0, help="bootstrap replicates over runs")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--level", type=float, default=0.9, help="interval level")
    sp.add_argument("--flops", help="budgets (comma list) for derived quantities (N_opt@C, ...)")
    sp.add_argument("--mixture_role", choices=mixture.ROLES,
                    help="--law=mixture: whose loss the table holds (target: r = 1 - replay; source: r = replay)")
    sp.add_argument("--epsilon", type=float, default=None,
                    help="--law=mixture: fix eps (default: chosen from %s)" % (list(mixture.EPSILON_GRID),))

    sp = sub.add_parser("allocate", help="compute-optimal N, D at budgets")
    common(sp, runs=False)
    sp.add_argument("--fit", required=True, help="fit JSON (or hand-written E, A, B, alpha, beta[, gamma])")
    sp.add_argument("--flops", required=True, help="budget(s) C in FLOPs, comma list")

    sp = sub.add_parser("savings", help="compute saved by CPT runs against scratch runs")
    common(sp)
    sp.add_argument("--fit_scratch", help="scratch fit JSON for points outside the scratch curves")
    sp.add_argument("--compute", default="6nd", choices=("6nd", "flops"))

    sp = sub.add_parser("plan", help="plan a budget: N, D, losses and saving for CPT and scratch")
    common(sp, runs=False)
    sp.add_argument("--fit_scratch", help="scratch fit JSON (required unless --recommend_replay)")
    sp.add_argument("--fit_cpt", help="CPT fit JSON (required unless --recommend_replay)")
    sp.add_argument("--flops", help="budget(s) C in FLOPs, comma list")
    sp.add_argument("--replay_ratio", type=float, default=0.0)
    sp.add_argument("--source_sizes", help="sizes of available source models (comma list)")
    sp.add_argument("--level", type=float, default=None)
    sp.add_argument("--recommend_replay", action="store_true",
                    help="recommend the replay ratio instead (--fit_target, --fit_source, --N, --tokens or "
                         "--flops, --source_loss0, --tolerance)")
    sp.add_argument("--fit_target", help="target-language fit: mixture (role target), CPT or Chinchilla")
    sp.add_argument("--fit_source", help="source-language fit: mixture (role source) or forgetting")
    sp.add_argument("--N", type=float, help="model size, parameters")
    sp.add_argument("--tokens", type=float, help="CPT budget in tokens of both languages")
    sp.add_argument("--source_loss0", type=float, help="the source language's loss before CPT")
    sp.add_argument("--tolerance", type=float, help="nats the source loss may rise above --source_loss0")

    sp = sub.add_parser("compare", help="fit errors and extrapolation errors of both laws")
    common(sp)
    sp.add_argument("--holdout", type=int, default=1, help="largest sizes left out")
    sp.add_argument("--grid", default="full", choices=procedures.GRID_CHOICES)
    sp.add_argument("--held_out_replay", type=float, default=None,
                    help="instead: leave this replay ratio out and score the mixture law against the "
                         "project's laws on it (--runs: target losses of CPT runs; --source_runs too)")
    sp.add_argument("--source_runs", help="with --held_out_replay: the CPT runs' source-language losses")

    sp = sub.add_parser("report", help="everything on one table, plus plots")
    common(sp)
    sp.add_argument("--forgetting_runs", help="table of source-language losses of CPT runs")
    sp.add_argument("--flops", default="1e20,1e21,1e22", help="budgets for allocation and plans")
    sp.add_argument("--grid", default="full", choices=procedures.GRID_CHOICES)
    sp.add_argument("--bootstrap", type=int, default=0)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--level", type=float, default=0.9)
    sp.add_argument("--holdout", type=int, default=1)
    sp.add_argument("--plots_dir", help="write PNG figures here")
    return p


def run(args: argparse.Namespace) -> int:
    """Runs one parsed command and prints its JSON; bad input raises a UserInputError."""
    try:
        result = COMMANDS[args.command](args)
    except UserInputError as e:
        # Stdout stays one JSON object even on failure, for scripts that parse it.
        print(json.dumps({"error": one_line(e), "command": args.command}))
        raise
    text = json.dumps(json_safe(result), indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """0 when done; 2 with one line on stderr for bad input (docs/errors.md)."""
    args = parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(f"t5x_cpt.scaling {args.command}", lambda _: run(args))
