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
             base_ratio: float | None, command: str, analysis_dir: str) -> str:
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
    return "\n".join(lines) + "\n"


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
    return lines


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
    for kind, alloc in (result.get("allocation") or {}).items():
        if "error" in alloc:
            lines.append(f"- allocation ({kind}): {alloc['error']}")
        else:
            lines.append(f"- allocation ({kind}): {alloc.get('N_opt_formula')}, {alloc.get('D_opt_formula')}")
    savings = (result.get("savings") or {}).get("summary") or {}
    final = savings.get("final_saved_fraction")
    if final:
        lines.append(f"- compute saved by CPT at the end of each run (against same-size scratch): "
                     f"{100 * final['min']:.1f}% to {100 * final['max']:.1f}% over {savings.get('n_cpt_runs')} run(s)")
    for run in (result.get("savings") or {}).get("runs", []):
        if "final" in run:
            point = run["final"]
            lines.append(f"  - {run['run']}: saved {_num(point.get('saved_fraction'))} of the compute, "
                         f"{_num(point.get('transferred_tokens'))} tokens transferred at D = {_num(point.get('D'))}")
        elif "error" in run:
            lines.append(f"  - {run['run']}: {run['error']}")
    compare = result.get("compare") or {}
    if "error" in compare:
        lines.append(f"- fit errors (Table 3): {compare['error']}")
    checks = result.get("checks") or {}
    for name, value in checks.items():
        lines.append(f"- check: {name}: {_num(value)}")
    lines.append("")
    for plot in result.get("plots") or []:
        lines += _image(plot, analysis_dir, os.path.basename(plot))
    return lines
