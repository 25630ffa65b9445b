"""A sweep's grid expanded into ordinary training runs: names, MODEL_DIRs, gin files and bindings.

Every run is what `python -m t5x_cpt.train` takes: gin files (model, run kind, the sweep's run
files) and `--gin.NAME=VALUE` bindings. Names are deterministic, so a re-run finds its directories:

    source_<src>_<size>_<source budget>                   e.g. source_en_ladder_1393m_20xN
    scratch_<lang>_<size>_<budget>                        e.g. scratch_zh_ladder_1393m_20xN
    cpt_<lang>_<size>_<budget>_<replay>[_<variant>]       e.g. cpt_zh_ladder_1393m_20xN_r5

Source runs come first and are shared by every CPT run of their size (and by other sweep files
writing to the same output directory). The budget-dependent bindings (TRAIN_STEPS, BATCH_SIZE,
EVAL_PERIOD, a replay schedule's steps) need the model's size, so `t5x_cpt.sweep.configure` adds
them; `expand` gives everything else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import shlex
from typing import Any, Mapping, Sequence

from t5x_cpt import gin_cli
from t5x_cpt.sweep.spec import Budget, Replay, Size, SweepError, SweepSpec

RUN_FILES = {"source": "runs/pretrain.gin", "scratch": "runs/scratch.gin", "cpt": "runs/cpt.gin"}
TRAIN_MODULE = "t5x_cpt.train"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One training run of a sweep, before its budget is turned into steps."""

    name: str
    run_kind: str  # source | scratch | cpt
    language: str
    size: Size
    budget: Budget
    model_dir: str
    files: tuple[str, ...]
    bindings: tuple[str, ...]
    source_run: str | None = None  # name of the source run in this sweep (CPT only)
    source_dir: str | None = None  # its MODEL_DIR, or an existing directory (CPT only)
    replay: Replay | None = None
    variant: str | None = None
    target_task: str | None = None

    @property
    def is_cpt(self) -> bool:
        return self.run_kind == "cpt"


def join(directory: str, name: str) -> str:
    """`directory/name` for local paths and URLs (gs://...) alike."""
    return posixpath.join(directory, name) if "://" in directory else os.path.join(directory, name)


def absolute_dir(path: str) -> str:
    """Local paths made absolute (commands may run elsewhere); URLs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def resolve_gin_file(path: str, what: str) -> str:
    """The gin file as commands name it: relative to the repository when inside it, else absolute.

    Looked up as the trainer does (working directory, repository root, configs/); a missing file
    raises SweepError naming `what`.
    """
    candidates = [path] if os.path.isabs(path) else [path] + [os.path.join(r, path) for r in gin_cli.CONFIG_SEARCH_PATHS]
    for candidate in candidates:
        if os.path.isfile(candidate):
            full = os.path.abspath(candidate)
            inside = os.path.commonpath([full, gin_cli.REPO_ROOT]) == gin_cli.REPO_ROOT
            return os.path.relpath(full, gin_cli.REPO_ROOT) if inside else full
    raise SweepError(f"{what}: gin file {path!r} not found (looked in the working directory, "
                     f"{gin_cli.REPO_ROOT} and its configs/)")


def binding(name: str, value: Any) -> str:
    """A gin binding `NAME=VALUE` with VALUE written as a Python literal gin parses back."""
    return f"{name}={_literal(value)}"


def _literal(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_literal(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):  # double quotes: the shell commands then quote them without escapes
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _mapping_bindings(bindings: Mapping[str, Any]) -> list[str]:
    return [binding(name, value) for name, value in bindings.items()]


def expand(spec: SweepSpec) -> list[PlannedRun]:
    """Every run of the sweep in launch order (sources first); checks names and sizes' files."""
    output_dir = absolute_dir(spec.output_dir)
    run_files = [resolve_gin_file(f, "Sweep.run_files") for f in spec.run_files]
    model_files = {size.name: resolve_gin_file(size.model_file, f"size {size.name!r} (Sweep.sizes)")
                   for size in spec.sizes}
    common = _mapping_bindings(spec.run_bindings)
    runs: list[PlannedRun] = []

    def add(kind: str, language: str, size: Size, budget: Budget, name: str, bindings: list[str], **extra) -> None:
        files = (model_files[size.name], resolve_gin_file(RUN_FILES[kind], "run file"), *run_files)
        model_dir = join(output_dir, name)
        runs.append(PlannedRun(
            name=name, run_kind=kind, language=language, size=size, budget=budget, model_dir=model_dir,
            # General to specific, later wins: the sweep's, the size's, the run kind's (and variant's), the run's own.
            files=files, bindings=(*common, *_mapping_bindings(size.bindings), *bindings,
                                   binding("MODEL_DIR", model_dir), binding("train.language", language)),
            **extra))

    source_dirs: dict[str, tuple[str | None, str]] = {}
    if "cpt" in spec.run_kinds:
        for size in spec.sizes:
            if size.name in spec.sources:
                source_dirs[size.name] = (None, absolute_dir(spec.sources[size.name]))
                continue
            name = f"source_{spec.source_language}_{size.name}_{spec.source_budget.tag}"
            add("source", spec.source_language, size, spec.source_budget, name,
                [binding("SOURCE_TASK", spec.source_task), binding("EVAL_TASKS", [spec.source_task]),
                 *_mapping_bindings(spec.source_bindings)])
            source_dirs[size.name] = (name, runs[-1].model_dir)
    for language, task in spec.targets.items():
        for size in spec.sizes:
            for budget in spec.budgets:
                stem = f"{language}_{size.name}_{budget.tag}"
                if "scratch" in spec.run_kinds:
                    add("scratch", language, size, budget, f"scratch_{stem}",
                        [binding("TARGET_TASK", task), binding("EVAL_TASKS", [task])], target_task=task)
                if "cpt" not in spec.run_kinds:
                    continue
                source_run, source_dir = source_dirs[size.name]
                for replay in spec.replay:
                    for variant, variant_bindings in [(None, {}), *spec.variants.items()]:
                        name = f"cpt_{stem}_{replay.tag}" + (f"_{variant}" if variant else "")
                        add("cpt", language, size, budget, name,
                            [binding("SOURCE_TASK", spec.source_task), binding("TARGET_TASK", task),
                             binding("REPLAY_RATIO", replay.ratio), binding("SOURCE_CHECKPOINT", source_dir),
                             binding("EVAL_TASKS", [spec.source_task, task]),
                             *_mapping_bindings(spec.cpt_bindings), *_mapping_bindings(variant_bindings)],
                            source_run=source_run, source_dir=source_dir, replay=replay, variant=variant,
                            target_task=task)
    _refuse_duplicates(runs)
    return runs


def _refuse_duplicates(runs: Sequence[PlannedRun]) -> None:
    seen: dict[str, PlannedRun] = {}
    for run in runs:
        if run.name in seen:
            raise SweepError(f"duplicate run name {run.name!r}: two entries of the grid map to the same run "
                             "(a size, budget, replay ratio or target listed twice, or two sizes with the same "
                             "name: give sizes distinct 'name's)")
        seen[run.name] = run


def select(runs: Sequence[PlannedRun], pattern: str | None) -> list[PlannedRun]:
    """Runs whose name matches `pattern` (re.search), plus the in-sweep sources their CPT runs need."""
    import re

    if not pattern:
        return list(runs)
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise SweepError(f"--only={pattern!r} is not a regular expression ({e})") from None
    chosen = {run.name for run in runs if regex.search(run.name)}
    if not chosen:
        raise SweepError(f"--only={pattern!r} matches none of the sweep's {len(runs)} runs "
                         f"(e.g. {', '.join(r.name for r in runs[:3])})")
    chosen |= {run.source_run for run in runs if run.name in chosen and run.source_run}
    return [run for run in runs if run.name in chosen]


def train_argv(files: Sequence[str], bindings: Sequence[str]) -> list[str]:
    """The arguments of `python -m t5x_cpt.train` for these gin files and bindings."""
    return [*(f"--gin_file={f}" for f in files), *(f"--gin.{b}" for b in bindings)]


def shell_command(argv: Sequence[str], python: str = "python") -> str:
    """One shell-quoted launch command (`python -m t5x_cpt.train ...`)."""
    return shlex.join([python, "-m", TRAIN_MODULE, *argv])


