"""report.md of a sweep: the runs, and per target language the fits, savings, allocation and forgetting."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from t5x_cpt.sweep.analyse import loss_table
from t5x_cpt.sweep.configure import ConfiguredRun
from t5x_cpt.sweep.spec import SweepSpec


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}g}"
    return str(value)


def _image(path: str | None, analysis_dir: str, alt: str) -> list[str]:
    return [f"![{alt}]({os.path.relpath(path, analysis_dir)})", ""] if path and os.path.exists(path) else []


def markdown(spec: SweepSpec, runs: Sequence[ConfiguredRun], sections: Mapping[str, Mapping], notes: Sequence[str],
             base_ratio: float | None, command: str, analysis_dir: str, languages: Mapping | None = None) -> str:
    """The report's text (module docstring)."""
    from t5x_cpt.sweep.execute import run_state

    lines = [f"# Sweep `{spec.name}`", "",
             f"Sweep file(s): {', '.join(f'`{f}`' for f in spec.files)}; runs in `{spec.output_dir}`. "
             f"Regenerate this report with:", "", "```", command, "```", "",
             "## Runs", "",
             "| run | kind | language | N | steps | tokens | FLOPs | state | final target loss | source loss start -> end |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |"]
    for entry in loss_table(runs, spec.source_task):
        run: ConfiguredRun = entry["run"]
        state = run_state(run)
        where = "finished" if state.finished else (f"checkpoint {state.last_checkpoint}" if state.last_checkpoint
                                                   else "not started")
        forgetting = (f"{_num(entry['source_start'])} -> {_num(entry['source_end'])}"
                      if entry.get("source_start") is not None else "")
        lines.append(f"| {run.name} | {run.run.run_kind} | {run.run.language} | {run.params:,} | {run.train_steps:,} | "
                     f"{run.tokens:,} | {run.train_flops:.3g} | {where} | {_num(entry['final'])} | {forgetting} |")
    lines.append("")
    for note in notes:
        lines.append(f"- {note}")
    if notes:
        lines.append("")
    for language, section in sections.items():
        lines += _language_section(language, section, spec, base_ratio, analysis_dir)
    if languages is not None:
        lines += _languages_lines(languages, spec, analysis_dir)
    return "\n".join(lines) + "\n"


# How savings.saving_at_scratch_point obtained a saving, in words.
SAVING_METHODS = {"cpt_reaches_scratch": "CPT reached scratch's loss",
                  "scratch_reaches_cpt": "CPT never did; scratch's compute to CPT's loss",
                  "at_least": "at least (CPT's first evaluation was already below)",
                  "at_most": "at most (scratch's first evaluation was already below CPT's)"}


def _percent(fraction: float | None, method: str | None) -> str:
    """A saving in percent, marked as a bound where the curves only bound it."""
    if fraction is None:
        return "n/a"
    return {"at_least": ">= ", "at_most": "<= "}.get(method or "", "") + f"{100 * fraction:.1f}%"


def _languages_lines(result: Mapping, spec: SweepSpec, analysis_dir: str) -> list[str]:
    lines = [f"## Transfer against distance from `{spec.source_language}`", "",
             f"Distances in {result['vocabulary']} tokens on {', '.join(result['corpora'])} (t5x_cpt.data.distance): "
             "unseen bigrams = share of the language's token transitions never seen in the source text; "
             "JS = Jensen-Shannon divergence of the unigram distributions (bits).", "",
             "| language | unseen bigrams | unseen tokens | JS (bits) | CPT run | source model's loss | saved "
             "(a quarter in) | saved at scratch's final loss | how |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    ordered = sorted(result["languages"].items(), key=lambda kv: kv[1]["unseen_bigram_share"])
    for language, entry in ordered:
        for run in entry["cpt_runs"] or [{"run": "-", "saved_fraction": None, "source_model_loss": None}]:
            saved = [_percent(run.get(key), run.get(method)) for key, method in
                     (("saved_fraction_early", "saved_early_method"), ("saved_fraction", "saved_method"))]
            lines.append(f"| {language} | {_num(entry['unseen_bigram_share'], 3)} | {_num(entry['unseen_token_share'], 3)} | "
                         f"{_num(entry['unigram_js_bits'], 3)} | {run['run']} | {_num(run['source_model_loss'])} | "
                         + " | ".join(saved)
                         + f" | {SAVING_METHODS.get(run.get('saved_method'), '')} |")
    lines.append("")
    for size, corr in result.get("rank_correlation", {}).items():
        lines.append(f"- N = {size}: Spearman rank correlation of saving and unseen bigrams, rho = "
                     f"{_num(corr['spearman_rho'], 3)} (p = {_num(corr['p_value'], 2)}, {corr['languages']} languages)")
    lines.append("")
    return lines + _image(result.get("plot"), analysis_dir, "saving against distance")


def _language_section(language: str, section: Mapping, spec: SweepSpec, base_ratio: float | None,
                      analysis_dir: str) -> list[str]:
    lines = [f"## Target language `{language}` (task `{section['task']}`)", ""]
    lines += _image(section.get("curves"), analysis_dir, f"{language} curves")
    errors = section.get("errors", {})
    if "scaling" in spec.analyses:
        lines += [f"### Scaling laws (scratch runs and CPT runs at replay ratio {_num(base_ratio)}, plain recipe)", ""]
        scaling = section.get("scaling")
        if scaling is None:
            lines += [f"Not available: {errors.get('scaling', 'no result')}.", ""]
        else:
            lines += _scaling_lines(scaling, analysis_dir)
    if "forgetting" in spec.analyses and "cpt" in spec.run_kinds:
        lines += ["### Forgetting (source-language loss of the CPT runs)", ""]
        fit = section.get("forgetting")
        lines += _image(os.path.join(analysis_dir, language, "forgetting.png"), analysis_dir, "forgetting")
        if fit is None:
            lines += [f"Law of forgetting not fitted: {errors.get('forgetting', 'no result')}.", ""]
        else:
            lines += [f"L_src = L0 + F C_t^phi / ((1 + K r) N)^psi: F = {_num(fit.get('F'))}, phi = {_num(fit.get('phi'))}, "
                      f"psi = {_num(fit.get('psi'))}, K = {_num(fit.get('K'))} "
                      f"({fit.get('n_points', '?')} points; warnings: {'; '.join(fit.get('warnings', [])) or 'none'}).", ""]
            by_ratio = fit.get("by_replay_ratio") or []
            if by_ratio:
                lines += ["| replay ratio | run | source loss start | end | rise |", "| ---: | --- | ---: | ---: | ---: |"]
                for group in by_ratio:
                    for run in group.get("runs", []):
                        lines.append(f"| {_num(group.get('replay_ratio'))} | {run['run']} | {_num(run['source_loss_start'])} | "
                                     f"{_num(run['source_loss_end'])} | {_num(run['rise'])} |")
                lines.append("")
    if section.get("replay_cost"):
        lines += _replay_cost_lines(section["replay_cost"], analysis_dir)
    if "mixture" in spec.analyses and "cpt" in spec.run_kinds:
        lines += _mixture_lines(section.get("mixture"), errors)
    return lines


def _replay_cost_lines(result: Mapping, analysis_dir: str) -> list[str]:
    lines = ["### Replay's cost to the target language (at equal target-language compute and at equal total compute)",
             ""]
    for size, entry in result["sizes"].items():
        lines += [f"N = {size}: losses interpolated at {_num(entry['equal_target_tokens'])} target-language tokens "
                  f"(the most every ratio reached) and at {_num(entry['equal_total_tokens'])} tokens in all.", "",
                  f"| replay ratio | target loss at equal target tokens | at equal total tokens | final | its target "
                  f"tokens | ratio {_num(entry['base_replay_ratio'])} at those tokens | final minus that |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for ratio, row in entry["by_replay_ratio"].items():
            lines.append(f"| {ratio} | {_num(row['loss_at_equal_target_tokens'])} | "
                         f"{_num(row['loss_at_equal_total_tokens'])} | {_num(row['final_loss'])} | "
                         f"{_num(row['final_target_tokens'])} | {_num(row['base_loss_at_final_target_tokens'])} | "
                         f"{_num(row['final_minus_base'], 3)} |")
        lines += ["", f"Spread across ratios (max - min): {_num(entry['spread_at_equal_target_tokens'], 3)} nats at "
                      f"equal target tokens, {_num(entry['spread_at_equal_total_tokens'], 3)} at equal total tokens.",
                  ""]
    return lines + _image(result.get("plot"), analysis_dir, "target loss against per-language and total compute")


def _mixture_lines(result: Mapping | None, errors: Mapping) -> list[str]:
    lines = ["### Replay ratio: the D-CPT mixture law (Que et al., arXiv 2406.01375) and the project's laws", ""]
    if result is None:
        return lines + [f"Not available: {errors.get('mixture', 'no result')}.", ""]
    for role in ("target", "source"):
        fit = result[f"{role}_fit"]
        values = ", ".join(f"{k} = {_num(fit[k])}" for k in ("E", "A", "alpha", "B", "eta", "beta", "C", "gamma",
                                                             "epsilon") if k in fit)
        lines.append(f"- {role} language, L = E + A/N^alpha + B r^eta/D^beta + C/(r + eps)^gamma: {values} "
                     f"(RMS log residual {_num(fit['objective']['rms_log_residual'])}, {fit['n_points']} points"
                     + (f"; warnings: {'; '.join(fit['warnings'])}" if fit.get("warnings") else "") + ")")
    held = result.get("held_out") or {}
    if "error" in held:
        lines += ["", f"Held-out comparison: {held['error']}."]
    else:
        lines += ["", f"Held out: replay ratio {_num(held['held_out_replay_ratio'])}, fitted on the others.", "",
                  "| language | mixture law: RMS log residual / mean abs error | project's law | its RMS log residual / "
                  "mean abs error | better |", "| --- | --- | --- | --- | --- |"]
        for role in ("target", "source"):
            entry = held[role]
            mix, own = entry["mixture"]["held_out"], entry["own"]["held_out"]
            lines.append(f"| {role} | {_num(mix['rms_log_residual'])} / {_num(mix['mean_abs_error'])} | "
                         f"{entry['own']['law']} | {_num(own['rms_log_residual'])} / {_num(own['mean_abs_error'])} | "
                         f"{entry['better_on_held_out']} |")
    at = result.get("recommendation_at") or {}
    lines += ["", f"Recommended replay ratio at N = {_num(at.get('N'))}, {_num(at.get('tokens'))} tokens, keeping the "
                  f"source loss within {_num(result.get('tolerance'))} nats of {_num(at.get('source_loss0'))}:"]
    recs = result.get("recommendations") or {}
    if "error" in recs:
        lines.append(f"- {recs['error']}")
    for name, rec in recs.items() if "error" not in recs else ():
        label = "D-CPT laws" if name == "mixture" else "project's laws (target-token law + law of forgetting)"
        if "error" in rec:
            lines.append(f"- {label}: {rec['error']}")
        elif not rec["feasible"]:
            lines.append(f"- {label}: {rec['message']}")
        else:
            lines.append(f"- {label}: r = {_num(rec['recommended_replay_ratio'])} (predicted source loss "
                         f"{_num(rec['predicted']['source_loss'])}, target loss {_num(rec['predicted']['target_loss'])}, "
                         f"{_num(rec['target_loss_cost'])} nats above the best target loss)")
    observed = result.get("observed")
    if observed:
        lines.append(f"- observed in the runs: the smallest ratio whose final source loss is within the tolerance: "
                     f"{_num(observed['smallest_ratio_within_tolerance'])}")
    return lines + [""]


def _fit_line(name: str, fit: Mapping | None) -> str:
    if not fit:
        return f"- {name}: not fitted"
    keys = [k for k in ("E", "A", "alpha", "B", "beta", "gamma") if k in fit]
    values = ", ".join(f"{k} = {_num(fit[k])}" for k in keys)
    objective = fit.get("objective", {})
    warnings = fit.get("warnings") or []
    return (f"- {name}: {values} (Huber mean {_num(objective.get('huber_mean'))}, {fit.get('n_points', '?')} points"
            + (f"; warnings: {'; '.join(warnings)}" if warnings else "") + ")")


def _scaling_lines(result: Mapping, analysis_dir: str) -> list[str]:
    lines = [_fit_line("Chinchilla law on scratch runs", result.get("scratch_fit")),
             _fit_line("CPT law, two-stage (E, A, alpha frozen at the scratch fit)", result.get("cpt_fit")),
             _fit_line("CPT law, all parameters free", result.get("cpt_fit_unfrozen"))]
    lines += [f"- {result[key]}" if key == "cpt_fit_error" else f"- {key.replace('_', ' ')}: {result[key]}"
              for key in ("cpt_fit_error", "scratch_fit_bootstrap_error", "cpt_fit_bootstrap_error") if key in result]
    for kind, alloc in (result.get("allocation") or {}).items():
        if "error" in alloc:
            lines.append(f"- allocation ({kind}): {alloc['error']}")
            continue
        line = f"- allocation ({kind}): {alloc.get('N_opt_formula')}, {alloc.get('D_opt_formula')}"
        boot = (result.get(f"{kind}_fit") or {}).get("bootstrap") or {}
        intervals = boot.get("intervals") or {}
        if "a" in intervals and "b" in intervals:
            line += (f"; {100 * boot['level']:g}% bootstrap intervals over runs ({boot['n']} replicates): "
                     f"a in [{_num(intervals['a'][0], 3)}, {_num(intervals['a'][1], 3)}], "
                     f"b in [{_num(intervals['b'][0], 3)}, {_num(intervals['b'][1], 3)}]")
        lines.append(line)
    savings = (result.get("savings") or {}).get("summary") or {}
    final = savings.get("final_saved_fraction")
    if final:
        lines.append(f"- compute saved by CPT at the end of each run (against same-size scratch): "
                     f"{100 * final['min']:.1f}% to {100 * final['max']:.1f}% over {savings.get('n_cpt_runs')} run(s)")
    for run in (result.get("savings") or {}).get("runs", []):
        at_end = run.get("at_scratch_end")
        if at_end:
            lines.append(f"  - {run['run']}: saved {100 * at_end['saved_fraction']:.1f}% at the scratch run's final loss "
                         f"{_num(at_end['scratch_loss'])} ({SAVING_METHODS[at_end['method']]}; no law involved)")
        if "final" in run:
            point = run["final"]
            along = [p for p in run.get("along", []) if p.get("saved_fraction") is not None]
            line = (f"  - {run['run']}: saved {_num(point.get('saved_fraction'))} of the compute, "
                    f"{_num(point.get('transferred_tokens'))} tokens transferred at D = {_num(point.get('D'))}")
            if len(along) >= 2:
                line += (f"; along training saved {', '.join(_num(p['saved_fraction'], 2) for p in along)} "
                         f"(D = {_num(along[0]['D'], 3)} to {_num(along[-1]['D'], 3)}")
                if any(p.get("method") == "law" for p in along):
                    line += "; points past the scratch run's final loss from the scratch law"
                line += ")"
            trend = run.get("transferred_vs_tokens")
            if trend:
                line += (f"; transferred tokens against D: slope {_num(trend['slope'], 3)}, "
                         f"R^2 {_num(trend.get('r2'), 3)}")
            lines.append(line)
        elif "error" in run:
            lines.append(f"  - {run['run']}: {run['error']}")
    compare = result.get("compare") or {}
    if "error" in compare:
        lines.append(f"- fit errors (Table 3): {compare['error']}")
    checks = result.get("checks") or {}
    for name, value in checks.items():
        lines.append(f"- check: {name}: {_num(value)}")
    lines.append("")
    if "error" not in compare and compare:
        lines += _compare_lines(compare)
    for plot in result.get("plots") or []:
        lines += _image(plot, analysis_dir, os.path.basename(plot))
    return lines


def _compare_lines(compare: Mapping) -> list[str]:
    """The paper's Table 3 (in-sample fit errors) next to the error on the held-out largest sizes."""
    lines = ["#### Which law fits which runs (arXiv 2407.02118, Table 3), in sample and on the held-out largest "
             f"{compare.get('holdout', 1)} size(s)", "",
             "| runs | law | in-sample RMS log residual | Huber mean | held-out mean abs relative error | "
             "held-out RMS log residual |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    fit_errors, extrapolation = compare.get("fit_errors") or {}, compare.get("extrapolation") or {}
    for kind in ("scratch", "cpt"):
        for law, entry in (fit_errors.get(kind) or {}).items():
            held = (extrapolation.get(kind) or {}).get(law) or {}
            lines.append(f"| {kind} | {law} | {_num(entry.get('rms_log_residual'))} | {_num(entry.get('huber_mean'))} | "
                         f"{_num(held.get('mean_abs_rel_error'))} | {_num(held.get('rms_log_residual'))} |")
    lines.append("")
    for kind, verdict in (compare.get("verdict") or {}).items():
        lines.append(f"- {kind} runs: {verdict}")
    return lines + [""]
