"""A sweep's results: the run table, the scaling toolkit's analyses, plots and a markdown report.

Written to ANALYSIS_DIR (default OUTPUT_DIR/analysis/<sweep name>; runs/sweeps/<sweep name>/analysis
in the working directory when OUTPUT_DIR is a bucket):

    runs.csv             the run table (t5x_cpt.scaling.tables): one row per evaluation point of every
                         run with metrics — N, D = target-language tokens seen, loss = the run's
                         target-language eval loss (a source run's: its own language's), run_kind,
                         run, language, replay_ratio, flops, loss0, step, tokens, plus `variant`
    source_loss.csv      the same for the source-language eval loss of CPT runs (forgetting)
    <lang>/fit_runs.csv  the rows the scaling laws are fitted to: scratch runs and CPT runs at the
                         sweep's base replay ratio (0 if the sweep has it, else its smallest), plain recipe
    <lang>/scaling.json  `python -m t5x_cpt.scaling report` on fit_runs.csv (fits of both laws,
                         allocation, frontier, Table-3 comparison, savings, plans, checks) + its PNGs
    <lang>/forgetting.json, forgetting.png   the law of forgetting on the CPT runs' source loss
    <lang>/mixture.json  (analysis 'mixture') the D-CPT mixture law for both languages, scored against the
                         project's laws on a held-out replay ratio, and the replay ratio each pair of
                         laws recommends at the runs' size and budget (t5x_cpt.scaling.mixture)
    <lang>/curves.png    every run's target loss against training FLOPs, and the CPT runs' source loss
    <lang>/replay_cost.json, replay.png   (CPT runs at several replay ratios) each ratio's target loss at
                         equal target-language tokens and at equal total tokens: is replay free for the
                         target language when compute is counted per language?
    languages.json, languages.png   (analysis 'languages') per target language its distance from the
                         source language (t5x_cpt.data.distance, in bytes) against the compute its CPT runs
                         saved at each size, and the rank correlation of the two
    report.md            all of the above in words and tables, with the plots

An analysis the runs cannot support (too few sizes or points for a fit, no scratch run to compare
with) is reported in report.md with the toolkit's reason, not skipped silently.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from typing import Any, Mapping, Sequence

from t5x_cpt import run_dir
from t5x_cpt.errors import UserInputError, one_line
from t5x_cpt.sweep.configure import ConfiguredRun
from t5x_cpt.sweep.spec import SweepSpec

log = logging.getLogger("t5x_cpt.sweep")


def default_analysis_dir(spec: SweepSpec) -> str:
    """OUTPUT_DIR/analysis/NAME (sweeps sharing an output directory keep their reports apart);
    runs/sweeps/NAME/analysis here when OUTPUT_DIR is a bucket."""
    if "://" in spec.output_dir:
        return os.path.abspath(os.path.join("runs", "sweeps", spec.name, "analysis"))
    return os.path.join(os.path.abspath(spec.output_dir), "analysis", spec.name)


def _rows(run: ConfiguredRun, task: str) -> list[dict]:
    from t5x_cpt.scaling import collect

    rows = collect.collect_dir(run.model_dir, loss_key=f"eval/{task}/loss")
    for row in rows:
        row["variant"] = run.run.variant or ""
    return rows


def _has_metrics(run: ConfiguredRun) -> bool:
    return bool(run_dir.read_metrics(run.model_dir))


def base_replay_ratio(spec: SweepSpec) -> float | None:
    """The replay ratio of the CPT runs the laws are fitted to: 0 if present, else the smallest constant one."""
    constant = sorted(r.ratio for r in spec.replay if not r.points)
    return constant[0] if constant else None


class AnalysisBug(Exception):
    """The scaling toolkit crashed (not bad input): recorded in the report, and the sweep exits 1."""


def _scaling_cli(argv: Sequence[str]) -> None:
    """One `python -m t5x_cpt.scaling` command in-process; its JSON goes to --out, not to our stdout.

    Bad input (too few points, ...) raises UserInputError; anything else is logged with its traceback
    and raised as AnalysisBug, so the other analyses and the report are still written.
    """
    from t5x_cpt.scaling import cli

    args = cli.parser().parse_args(list(argv))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli.run(args)
    except UserInputError:
        raise
    except Exception as e:  # noqa: BLE001  reported below, and the sweep's exit code says so
        log.exception("python -m t5x_cpt.scaling %s failed", " ".join(argv))
        raise AnalysisBug(f"the scaling toolkit failed with {type(e).__name__}: {e} (a bug; the traceback is in "
                          "the sweep's log)") from e


def analyse(spec: SweepSpec, runs: Sequence[ConfiguredRun], analysis_dir: str, command: str) -> tuple[str, bool]:
    """Writes the tables, analyses, plots and report.md (module docstring).

    Returns report.md's path and whether every analysis ran without a bug (AnalysisBug).
    """
    from t5x_cpt.scaling import tables

    os.makedirs(analysis_dir, exist_ok=True)
    with_metrics = [r for r in runs if _has_metrics(r)]
    target_rows, source_rows, notes = [], [], []
    for run in with_metrics:
        own_task = run.run.target_task or spec.source_task
        try:
            target_rows += _rows(run, own_task)
            if run.run.is_cpt:
                source_rows += _rows(run, spec.source_task)
        except UserInputError as e:  # e.g. a run killed before its first evaluation
            notes.append(f"{run.name}: left out of the tables ({one_line(e)})")
    sections: dict[str, dict] = {}
    if target_rows:
        tables.write_table(os.path.join(analysis_dir, "runs.csv"), tables.from_rows(target_rows, "runs"))
    if source_rows:
        tables.write_table(os.path.join(analysis_dir, "source_loss.csv"), tables.from_rows(source_rows, "source_loss"))
    base = base_replay_ratio(spec)
    for language, task in spec.targets.items():
        directory = os.path.join(analysis_dir, language)
        os.makedirs(directory, exist_ok=True)
        mine = [r for r in target_rows if r["language"] == language and r["run_kind"] in ("scratch", "cpt")]
        section: dict[str, Any] = {"task": task, "curves": None, "scaling": None, "forgetting": None, "errors": {}}
        runs_here = [r for r in with_metrics if r.run.language == language and r.run.run_kind != "source"]
        if runs_here:
            section["curves"] = _plot_curves(runs_here, task, spec.source_task, os.path.join(directory, "curves.png"))
        fit_rows = [r for r in mine if r["run_kind"] == "scratch"
                    or (not r["variant"] and base is not None and r["replay_ratio"] == base)]
        if "scaling" in spec.analyses:
            section["scaling"] = _run_scaling(fit_rows, directory, spec, section["errors"])
        forget_rows = [r for r in source_rows if r["language"] == language and not r["variant"]]
        if "forgetting" in spec.analyses and "cpt" in spec.run_kinds:
            section["forgetting"] = _run_forgetting(forget_rows, directory, section["errors"])
        cpt_rows = [r for r in mine if r["run_kind"] == "cpt" and not r["variant"]]
        if len({r["replay_ratio"] for r in cpt_rows}) > 1:
            section["replay_cost"] = replay_at_equal_compute(cpt_rows, os.path.join(directory, "replay.png"))
            _write_json(os.path.join(directory, "replay_cost.json"), section["replay_cost"])
        if "mixture" in spec.analyses and "cpt" in spec.run_kinds:
            section["mixture"] = _run_mixture(cpt_rows, forget_rows, directory, spec, section["errors"],
                                              forgetting_fit=section["forgetting"])
        sections[language] = section
    languages = compare_languages(spec, sections, target_rows, analysis_dir) if "languages" in spec.analyses else None
    from t5x_cpt.sweep import report

    path = os.path.join(analysis_dir, "report.md")
    with open(path, "w") as f:
        f.write(report.markdown(spec, runs, sections, notes, base, command, analysis_dir, languages))
    return path, not any(section["errors"].get("bug") for section in sections.values())


def _run_scaling(rows: list[dict], directory: str, spec: SweepSpec, errors: dict) -> dict | None:
    from t5x_cpt.scaling import tables

    if not rows:
        errors["scaling"] = "no evaluated scratch or CPT runs yet"
        return None
    csv_path = os.path.join(directory, "fit_runs.csv")
    tables.write_table(csv_path, tables.from_rows(rows, csv_path))
    out = os.path.join(directory, "scaling.json")
    argv = ["report", f"--runs={csv_path}", f"--out={out}", f"--plots_dir={directory}", f"--grid={spec.fit_grid}",
            f"--bootstrap={spec.bootstrap}", "--flops=" + ",".join(f"{c:g}" for c in spec.analysis_flops)]
    try:
        _scaling_cli(argv)
    except UserInputError as e:
        errors["scaling"] = one_line(e)
        return None
    except AnalysisBug as e:
        errors["scaling"] = str(e)
        errors["bug"] = True
        return None
    with open(out) as f:
        return json.load(f)


def _run_forgetting(rows: list[dict], directory: str, errors: dict) -> dict | None:
    from t5x_cpt.scaling import plots, tables

    if not rows:
        errors["forgetting"] = "no evaluated CPT runs yet"
        return None
    csv_path = os.path.join(directory, "forgetting_runs.csv")
    table = tables.from_rows(rows, csv_path)
    tables.write_table(csv_path, table)
    out = os.path.join(directory, "forgetting.json")
    try:
        _scaling_cli(["fit", f"--runs={csv_path}", "--law=forgetting", f"--out={out}"])
    except UserInputError as e:
        errors["forgetting"] = one_line(e)
        fit = None
    except AnalysisBug as e:
        errors["forgetting"] = str(e)
        errors["bug"] = True
        fit = None
    else:
        with open(out) as f:
            fit = json.load(f)
    plots.forgetting_curves(tables.read_table(csv_path), fit, os.path.join(directory, "forgetting.png"))
    return fit


def compare_languages(spec: SweepSpec, sections: Mapping[str, dict], target_rows: list[dict],
                      analysis_dir: str) -> dict:
    """Finding F4 of docs/study.md: each language's CPT saving against its distance from the source.

    Distances are measured in bytes (the mini study's vocabulary) on the corpus of the target tasks
    (`<corpus>_<lang>`); a saving is read off the curves of each CPT run at the base replay ratio and
    the scratch run of its size, without a law (savings.saving_at_scratch_point: the compute CPT
    needed to reach scratch's loss a quarter into its run and at its end) — with two or three sizes
    a scratch law is too weak to place losses beyond the scratch run; loss0 is the source model's
    loss on the language before CPT.
    """
    from scipy.stats import spearmanr

    from t5x_cpt.data import distance, vocabularies

    corpora = sorted({task.rpartition("_")[0] for task in spec.targets.values()})
    measures = distance.language_distances(vocabularies.vocabulary_from_spec("byte"), corpora,
                                           spec.source_language, list(spec.targets))
    out: dict[str, Any] = {"corpora": corpora, "vocabulary": "byte", "languages": {}}
    for language, section in sections.items():
        savings = ((section.get("scaling") or {}).get("savings") or {}).get("runs", [])
        start = {r["run"]: r["loss0"] for r in target_rows if r["language"] == language and r["run_kind"] == "cpt"}
        out["languages"][language] = {
            **measures[language],
            "cpt_runs": [{"run": r["run"], "N": r["N"],
                          "saved_fraction": (r.get("at_scratch_end") or {}).get("saved_fraction"),
                          "saved_method": (r.get("at_scratch_end") or {}).get("method"),
                          "saved_fraction_early": (r.get("at_scratch_quarter") or {}).get("saved_fraction"),
                          "saved_early_method": (r.get("at_scratch_quarter") or {}).get("method"),
                          "source_model_loss": start.get(r["run"])} for r in savings],
        }
    sizes = sorted({run["N"] for entry in out["languages"].values() for run in entry["cpt_runs"]})
    out["rank_correlation"] = {}
    for size in sizes:
        pairs = [(entry["unseen_bigram_share"], run["saved_fraction"]) for entry in out["languages"].values()
                 for run in entry["cpt_runs"] if run["N"] == size and run["saved_fraction"] is not None]
        if len(pairs) >= 3:
            rho, p_value = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
            out["rank_correlation"][f"{size:g}"] = {"spearman_rho": float(rho), "p_value": float(p_value),
                                                    "languages": len(pairs)}
    out["plot"] = _plot_languages(out, os.path.join(analysis_dir, "languages.png"))
    return _write_json(os.path.join(analysis_dir, "languages.json"), out)


def _plot_languages(result: Mapping, path: str) -> str | None:
    from t5x_cpt.scaling.plots import pyplot, save_figure

    plt = pyplot()

    points = [(language, entry["unseen_bigram_share"], run["N"], 100 * run["saved_fraction"])
              for language, entry in result["languages"].items() for run in entry["cpt_runs"]
              if run["saved_fraction"] is not None]
    if not points:
        return None
    sizes = sorted({n for _, _, n, _ in points})
    fig, ax = plt.subplots(figsize=(6, 4))
    for language, distance_from_source, n, saved in points:
        ax.scatter(distance_from_source, saved, color=f"C{sizes.index(n)}")
        ax.annotate(language, (distance_from_source, saved), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("share of target byte bigrams never seen in English training text")
    ax.set_ylabel("compute saved by CPT at scratch's final loss (%)")
    ax.set_title("Transfer against distance (colour: model size, smallest first)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def held_out_ratio(spec: SweepSpec) -> float | None:
    """`Sweep.held_out_replay`, else the middle of the sweep's constant ratios (an interpolation)."""
    if spec.held_out_replay is not None:
        return spec.held_out_replay
    constant = sorted(r.ratio for r in spec.replay if not r.points)
    return constant[len(constant) // 2] if len(constant) >= 4 else None


def _run_mixture(target_rows: list[dict], source_rows: list[dict], directory: str, spec: SweepSpec,
                 errors: dict, forgetting_fit: Mapping | None = None) -> dict | None:
    """The D-CPT law per language, the held-out comparison and the recommendations -> mixture.json.

    `forgetting_fit` is the law of forgetting the 'forgetting' analysis already fitted to the same
    rows; without it (that analysis not chosen, or it failed) the law is fitted here."""
    from t5x_cpt.scaling import forgetting, mixture, tables

    if not target_rows or not source_rows:
        errors["mixture"] = "no evaluated CPT runs yet"
        return None
    target = tables.from_rows(target_rows, "CPT runs' target losses")
    source = tables.from_rows(source_rows, "CPT runs' source losses")
    out: dict[str, Any] = {"tolerance": spec.replay_tolerance}
    try:
        out["target_fit"] = mixture.fit_mixture(target, "target")
        out["source_fit"] = mixture.fit_mixture(source, "source")
    except UserInputError as e:
        errors["mixture"] = one_line(e)
        return None
    except Exception as e:  # noqa: BLE001  a bug: recorded, the other analyses still run
        log.exception("mixture fit failed")
        errors["mixture"], errors["bug"] = f"the mixture fit failed with {type(e).__name__}: {e} (a bug)", True
        return None
    held_out = held_out_ratio(spec)
    if held_out is None:
        out["held_out"] = {"error": "fewer than four constant replay ratios: nothing to hold out"}
    else:
        try:
            out["held_out"] = mixture.compare_held_out(target, source, held_out)
        except UserInputError as e:
            out["held_out"] = {"error": one_line(e)}
    # The recommendation at the runs' own size and budget, from the D-CPT pair and from the project's.
    largest = max(source_rows, key=lambda r: (r["N"], r["tokens"]))
    loss0 = largest.get("loss0")
    n, tokens, loss0 = float(largest["N"]), float(largest["tokens"]), float("nan") if loss0 is None else float(loss0)
    out["recommendation_at"] = {"N": n, "tokens": tokens, "source_loss0": loss0}
    if not math.isfinite(loss0):
        out["recommendations"] = {"error": "the CPT runs have no step-0 source-language evaluation (loss0)"}
        out["observed"] = None
        return _write_json(os.path.join(directory, "mixture.json"), out)
    own_target = mixture.fit_target_tokens(target.select(target["N"] == n)).to_json()
    own_source = forgetting_fit
    if own_source is None:
        try:
            own_source = forgetting.fit_forgetting(source).to_json()
        except UserInputError as e:
            out["own_source_error"] = one_line(e)
    pairs = {"mixture": (out["target_fit"], out["source_fit"]), "own": (own_target, own_source)}
    out["recommendations"] = {}
    for name, (target_fit, source_fit) in pairs.items():
        if source_fit is None:
            continue
        try:
            out["recommendations"][name] = mixture.recommend_replay(
                target_fit, source_fit, N=n, tokens=tokens, source_loss0=loss0, tolerance=spec.replay_tolerance)
        except UserInputError as e:
            out["recommendations"][name] = {"error": one_line(e)}
    out["observed"] = observed_replay_needed(source_rows, spec.replay_tolerance)
    return _write_json(os.path.join(directory, "mixture.json"), out)


def replay_at_equal_compute(cpt_rows: Sequence[Mapping], plot_path: str | None = None) -> dict:
    """Is replay free for the target language? (arXiv 2407.02118, Sec. 5 and Fig. 5.)

    Per model size, each replay ratio's target loss interpolated (linearly in tokens, the step-0
    loss as the point at 0) at the largest target-token count D every ratio reached, and at the
    largest total-token count every ratio reached; and each ratio's final loss against the
    smallest ratio's run at the same target tokens (what replay cost per target token; that run is
    mid-schedule there, so its learning rate has not decayed yet). The paper finds the target
    curves coincide at equal target-language compute, so the spread across ratios should be small
    there and large at equal total compute (where replay displaces target tokens). At one size,
    target-language compute is proportional to D.
    """
    import numpy as np

    by_run: dict[str, list] = {}
    for row in cpt_rows:
        points = by_run.setdefault(row["run"], [])
        points.append((float(row["D"]), float(row["tokens"]), float(row["loss"]), float(row["flops"])))
        loss0 = row.get("loss0")
        if loss0 is not None and math.isfinite(float(loss0)) and not any(p[0] == 0.0 for p in points):
            points.append((0.0, 0.0, float(loss0), 0.0))
    key = {row["run"]: (float(row["N"]), float(row["replay_ratio"])) for row in cpt_rows}
    # (N, ratio) -> points of its run; where budgets differ, the longest run.
    curves: dict[float, dict[float, list]] = {}
    for run, points in sorted(by_run.items(), key=lambda kv: max(p[1] for p in kv[1])):
        n, ratio = key[run]
        curves.setdefault(n, {})[ratio] = points
    out: dict[str, Any] = {"sizes": {}}
    for n, by_ratio in sorted(curves.items()):
        if len(by_ratio) < 2:
            continue
        for points in by_ratio.values():
            points.sort()
        at_target = min(max(p[0] for p in points) for points in by_ratio.values())
        at_total = min(max(p[1] for p in points) for points in by_ratio.values())
        table = {}
        base_ratio = min(by_ratio)
        base_tokens, base_losses = (np.array([p[i] for p in by_ratio[base_ratio]]) for i in (0, 2))
        for ratio, points in sorted(by_ratio.items()):
            target_tokens, total_tokens, losses = (np.array([p[i] for p in points]) for i in range(3))
            order = np.argsort(total_tokens)
            # The base ratio's run at this run's final target tokens: what replay cost per target token.
            base_there = float(np.interp(target_tokens[-1], base_tokens, base_losses))
            table[f"{ratio:g}"] = {
                "loss_at_equal_target_tokens": float(np.interp(at_target, target_tokens, losses)),
                "loss_at_equal_total_tokens": float(np.interp(at_total, total_tokens[order], losses[order])),
                "final_loss": float(losses[-1]), "final_target_tokens": float(target_tokens[-1]),
                "base_loss_at_final_target_tokens": base_there, "final_minus_base": float(losses[-1]) - base_there}
        spread = {key: float(np.ptp([v[key] for v in table.values()]))
                  for key in ("loss_at_equal_target_tokens", "loss_at_equal_total_tokens")}
        out["sizes"][f"{n:g}"] = {"equal_target_tokens": at_target, "equal_total_tokens": at_total,
                                  "base_replay_ratio": base_ratio,
                                  "by_replay_ratio": table,
                                  "spread_at_equal_target_tokens": spread["loss_at_equal_target_tokens"],
                                  "spread_at_equal_total_tokens": spread["loss_at_equal_total_tokens"]}
    if plot_path and out["sizes"]:
        out["plot"] = _plot_replay(curves, plot_path)
    return out


def _plot_replay(curves: Mapping[float, Mapping[float, list]], path: str) -> str:
    from t5x_cpt.scaling.plots import pyplot, save_figure

    plt = pyplot()

    sizes = [n for n, by_ratio in sorted(curves.items()) if len(by_ratio) > 1]
    fig, axes = plt.subplots(len(sizes), 2, figsize=(12, 4.4 * len(sizes)), squeeze=False)
    colours = plt.get_cmap("plasma")
    for row_axes, n in zip(axes, sizes):
        ratios = sorted(curves[n])
        for i, ratio in enumerate(ratios):
            points = [p for p in curves[n][ratio] if p[0] > 0]
            colour = colours(0.85 * i / max(1, len(ratios) - 1))
            # Per-language compute: the run's FLOPs times the target share of its tokens.
            row_axes[0].plot([p[3] * p[0] / p[1] for p in points], [p[2] for p in points], "-", marker=".",
                             color=colour, label=f"replay {100 * ratio:g}%")
            row_axes[1].plot([p[3] for p in points], [p[2] for p in points], "-", marker=".", color=colour,
                             label=f"replay {100 * ratio:g}%")
        for axis, xlabel in zip(row_axes, ("target-language training FLOPs", "total training FLOPs")):
            axis.set_xscale("log")
            axis.set_xlabel(xlabel)
            axis.set_ylabel("target-language validation loss")
            axis.set_title(f"N = {n:,.0f}")
            axis.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def _write_json(path: str, obj: dict) -> dict:
    from t5x_cpt.scaling.cli import json_safe

    with open(path, "w") as f:
        json.dump(json_safe(obj), f, indent=2)
    return obj


def observed_replay_needed(source_rows: list[dict], tolerance: float) -> dict:
    """From the runs themselves: each ratio's source loss at the end against its start, and the
    smallest ratio whose final source loss is within `tolerance` of the start."""
    final: dict[float, dict] = {}
    for row in source_rows:
        ratio = float(row["replay_ratio"])
        if ratio not in final or row["tokens"] > final[ratio]["tokens"]:
            final[ratio] = {"tokens": float(row["tokens"]), "start": float(row["loss0"]), "end": float(row["loss"])}
    ok = sorted(r for r, v in final.items() if v["end"] <= v["start"] + tolerance)
    return {"by_ratio": {f"{r:g}": final[r] for r in sorted(final)}, "smallest_ratio_within_tolerance":
            ok[0] if ok else None}


def _plot_curves(runs: Sequence[ConfiguredRun], task: str, source_task: str | None, path: str) -> str:
    from t5x_cpt.scaling.plots import pyplot, save_figure

    plt = pyplot()

    cpt_runs = [r for r in runs if r.run.is_cpt]
    columns = 2 if cpt_runs and source_task else 1
    fig, axes = plt.subplots(1, columns, figsize=(6.5 * columns, 4.6), squeeze=False)
    sizes = sorted({r.params for r in runs})
    # Colour by size when there are several, else one colour per run.
    by_size, cycle = plt.get_cmap("viridis"), plt.get_cmap("tab10")
    for index, run in enumerate(runs):
        colour = (by_size(sizes.index(run.params) / (len(sizes) - 1) * 0.9) if len(sizes) > 1
                  else cycle(index % 10))
        style = "--" if run.run.run_kind == "scratch" else "-"
        label = run.name
        curve = [(f, loss) for f, loss in run_dir.eval_curve(run.model_dir, task) if f > 0]
        if curve:
            axes[0][0].plot([f for f, _ in curve], [loss for _, loss in curve], style, color=colour, marker=".",
                            label=label, alpha=0.85)
        if run.run.is_cpt and columns == 2:
            source = run_dir.eval_curve(run.model_dir, source_task)
            ratio = run.run.replay.ratio if run.run.replay else 0.0
            target_flops = [f * (1.0 - ratio) for f, _ in source]
            axes[0][1].plot(target_flops, [loss for _, loss in source], "-", color=colour, marker=".", label=label,
                            alpha=0.85)
    axes[0][0].set_xscale("log")
    axes[0][0].set_xlabel("training FLOPs")
    axes[0][0].set_ylabel(f"{task} validation loss (nats/token)")
    axes[0][0].set_title("target language: scratch dashed, CPT solid")
    axes[0][0].legend(fontsize=6)
    if columns == 2:
        axes[0][1].set_xlabel("target-language FLOPs (training FLOPs x (1 - replay ratio))")
        axes[0][1].set_ylabel(f"{source_task} validation loss (nats/token)")
        axes[0][1].set_title("source language during CPT (forgetting)")
        axes[0][1].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def final_loss(model_dir: str, key: str) -> float | None:
    """The last evaluated value of `key` in a run's metrics (None before its first evaluation)."""
    values = [r[key] for r in run_dir.read_metrics(model_dir) if r.get(key) is not None]
    return float(values[-1]) if values and math.isfinite(float(values[-1])) else None


def loss_table(runs: Sequence[ConfiguredRun], source_task: str | None) -> list[Mapping[str, Any]]:
    """Per run: final target-language loss and, for CPT, the source loss at start and end."""
    out = []
    for run in runs:
        task = run.run.target_task or source_task
        entry: dict[str, Any] = {"run": run, "final": final_loss(run.model_dir, f"eval/{task}/loss")}
        if run.run.is_cpt and source_task:
            curve = [loss for _, loss in run_dir.eval_curve(run.model_dir, source_task)]
            entry["source_start"], entry["source_end"] = (curve[0], curve[-1]) if curve else (None, None)
        out.append(entry)
    return out
