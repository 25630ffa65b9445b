"""The sweep file: one gin-configurable `Sweep` naming a grid of runs, and its validation.

A sweep file is a gin file binding `Sweep.*` (docs/study.md lists every field):

    Sweep.sizes = ['models/tiny.gin', {'name': 'd32', 'model': 'models/tiny.gin',
                                       'bindings': {'ModelConfig.d_model': 32}}]
    Sweep.budgets = [{'steps': 20}, {'tokens_per_param': 20}, {'tokens': 1e9}]
    Sweep.run_kinds = ['scratch', 'cpt']
    Sweep.source_task = 'lo_help_en'
    Sweep.targets = {'zh': 'lo_help_zh'}
    Sweep.replay = [0.0, 0.25, {'name': 'decay', 'points': [(0.0, 0.5), (1.0, 0.05)]}]
    Sweep.source_budget = {'steps': 40}
    Sweep.run_files = ['experiments/tiny_budget.gin']

`read_sweep` parses the file(s) and bindings, builds the `Sweep` and checks every field's type and
range; a bad value raises `SweepError` naming the field. Everything about runs (names, commands,
configs) is in `t5x_cpt.sweep.plan` and `t5x_cpt.sweep.configure`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping, Sequence

import gin

from t5x_cpt import gin_cli
from t5x_cpt.errors import UserInputError

TARGET_RUN_KINDS = ("scratch", "cpt")
BUDGET_KINDS = ("steps", "tokens", "tokens_per_param")
ANALYSES = ("scaling", "forgetting", "mixture", "languages")
DEFAULT_ANALYSES = ("scaling", "forgetting")
FIT_GRIDS = ("coarse", "full")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SweepError(UserInputError):
    """A sweep file, a run it plans or a directory it would write cannot be used; names the cause."""


@dataclasses.dataclass(frozen=True)
class Size:
    """One model size: a model gin file plus optional bindings, under a name used in run names."""

    name: str
    model_file: str
    bindings: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Budget:
    """A training length: `steps`, absolute `tokens`, or `tokens_per_param` (x N of the run's model)."""

    kind: str
    value: float

    @property
    def tag(self) -> str:
        """The budget's part of a run name: 300steps, 2Mtok, 20xN."""
        if self.kind == "steps":
            return f"{int(self.value)}steps"
        if self.kind == "tokens":
            return f"{compact_number(self.value)}tok"
        return f"{self.value:g}xN"

    def train_steps(self, params: int, batch_size: int, sequence_length: int) -> int:
        """Optimizer steps of this budget for a model of `params` at the given batch shape."""
        if self.kind == "steps":
            return int(self.value)
        tokens = self.value if self.kind == "tokens" else self.value * params
        return max(1, int(round(tokens / (batch_size * sequence_length))))


@dataclasses.dataclass(frozen=True)
class Replay:
    """The replay of a CPT run: a constant ratio, or a named schedule of (fraction of training, ratio)."""

    ratio: float
    name: str | None = None
    points: tuple[tuple[float, float], ...] = ()

    @property
    def tag(self) -> str:
        """The replay's part of a run name: r0, r5, r12.5, r-decay."""
        return f"r-{self.name}" if self.name else f"r{100 * self.ratio:g}"

    def schedule_steps(self, train_steps: int) -> tuple[tuple[int, float], ...]:
        """The schedule as (step, ratio) points of a run of `train_steps` (t5x_cpt.data.mixtures)."""
        steps = [(int(round(fraction * train_steps)), ratio) for fraction, ratio in self.points]
        for (a, _), (b, _) in zip(steps, steps[1:]):
            if b <= a:
                raise SweepError(f"replay schedule {self.name!r}: points {self.points} collapse onto the same "
                                 f"step for a run of {train_steps} steps; space them further apart")
        return tuple(steps)

    @staticmethod
    def mean_ratio(points: Sequence[tuple[float, float]]) -> float:
        """Token fraction replayed over the whole run of a piecewise-linear schedule (flat ends)."""
        xs = [0.0] + [p for p, _ in points] + [1.0]
        ys = [points[0][1]] + [r for _, r in points] + [points[-1][1]]
        return sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]))


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Sweep:
    """The grid of a study (module docstring; docs/study.md explains each field)."""

    name: str | None = None
    output_dir: str | None = None
    sizes: Sequence[Any] = ()
    budgets: Sequence[Mapping[str, float]] = ()
    run_kinds: Sequence[str] = TARGET_RUN_KINDS
    source_language: str = "en"
    source_task: str | None = None
    targets: Mapping[str, str] = dataclasses.field(default_factory=dict)
    replay: Sequence[Any] = (0.0,)
    source_budget: Mapping[str, float] | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    run_files: Sequence[str] = ()
    run_bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source_bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cpt_bindings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    variants: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    batch_size_by_params: Sequence[Sequence[Any]] = ()
    eval_points: int | None = None
    check_ladder: bool = True
    analyses: Sequence[str] = DEFAULT_ANALYSES
    analysis_flops: Sequence[float] = (1e20, 1e21, 1e22)
    bootstrap: int = 0
    fit_grid: str = "full"
    held_out_replay: float | None = None
    replay_tolerance: float = 0.0


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: the `Sweep` fields in typed form."""

    name: str
    output_dir: str
    sizes: tuple[Size, ...]
    budgets: tuple[Budget, ...]
    run_kinds: tuple[str, ...]
    source_language: str
    source_task: str | None
    targets: Mapping[str, str]
    replay: tuple[Replay, ...]
    source_budget: Budget | None
    sources: Mapping[str, str]
    run_files: tuple[str, ...]
    run_bindings: Mapping[str, Any]
    source_bindings: Mapping[str, Any]
    cpt_bindings: Mapping[str, Any]
    variants: Mapping[str, Mapping[str, Any]]
    batch_size_by_params: tuple[tuple[float, int], ...]
    eval_points: int | None
    check_ladder: bool
    analyses: tuple[str, ...]
    analysis_flops: tuple[float, ...]
    bootstrap: int
    fit_grid: str
    files: tuple[str, ...]
    held_out_replay: float | None = None
    replay_tolerance: float = 0.0

    def batch_size_for(self, params: int) -> int | None:
        """The batch size (sequences) the size rule gives a model of `params`, or None without a rule."""
        for bound, batch in self.batch_size_by_params:
            if params < bound:
                return batch
        if self.batch_size_by_params:
            raise SweepError(f"Sweep.batch_size_by_params {list(self.batch_size_by_params)} has no entry for "
                             f"N = {params:,}; end it with (None, BATCH) to cover every size")
        return None


def compact_number(x: float) -> str:
    """1500000 -> '1.5M' (for run names)."""
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def read_sweep(files: Sequence[str], bindings: Sequence[str] = (), output_dir: str | None = None) -> SweepSpec:
    """Parses sweep gin files (+ `--gin.` bindings) and returns the validated spec.

    The gin config is cleared before and after: runs are configured in their own gin states.
    """
    if not files:
        raise SweepError("no --gin_file given: name a sweep file, e.g. --gin_file=configs/sweeps/tiny_sweep.gin")
    gin.clear_config()
    try:
        gin_cli.parse(files, bindings)
        raw = Sweep()
    finally:
        gin.clear_config()
    default_name = os.path.splitext(os.path.basename(files[0]))[0]
    return validate(raw, tuple(files), default_name, output_dir)


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise SweepError(message)


def _name(text: Any, field: str) -> str:
    _need(isinstance(text, str) and bool(_NAME.match(text)),
          f"{field}={text!r}: a name must be letters, digits, '_', '.' or '-' (it becomes a directory name)")
    return text


def _bindings(value: Any, field: str) -> dict[str, Any]:
    _need(isinstance(value, Mapping) and all(isinstance(k, str) and k for k in value),
          f"{field} must be a dict of gin names to values, e.g. {{'ModelConfig.d_model': 128}}; got {value!r}")
    return dict(value)


def _size(entry: Any, index: int) -> Size:
    field = f"Sweep.sizes[{index}]"
    if isinstance(entry, str):
        return Size(_name(os.path.splitext(os.path.basename(entry))[0], field), entry, {})
    _need(isinstance(entry, Mapping) and isinstance(entry.get("model"), str)
          and set(entry) <= {"name", "model", "bindings"},
          f"{field}={entry!r}: a size is a model gin file, or a dict with 'model' (a gin file) and optional "
          "'name' and 'bindings'")
    name = entry.get("name") or os.path.splitext(os.path.basename(entry["model"]))[0]
    return Size(_name(name, f"{field}.name"), entry["model"], _bindings(entry.get("bindings", {}), f"{field}.bindings"))


def _budget(entry: Any, field: str) -> Budget:
    _need(isinstance(entry, Mapping) and len(entry) == 1 and next(iter(entry)) in BUDGET_KINDS,
          f"{field}={entry!r}: a budget is a one-key dict, one of {{'steps': S}}, {{'tokens': T}} or "
          "{'tokens_per_param': K}")
    kind, value = next(iter(entry.items()))
    _need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
          f"{field}: {kind} must be a positive number, got {value!r}")
    _need(kind != "steps" or float(value).is_integer(), f"{field}: steps must be an integer, got {value!r}")
    return Budget(kind, float(value))


def _ratio(value: Any, field: str) -> float:
    _need(isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0,
          f"{field}: a replay ratio is a fraction of training tokens in [0, 1), got {value!r}")
    return float(value)


def _replay(entry: Any, index: int) -> Replay:
    field = f"Sweep.replay[{index}]"
    if not isinstance(entry, Mapping):
        return Replay(_ratio(entry, field))
    _need(set(entry) == {"name", "points"} and isinstance(entry["points"], (list, tuple)) and entry["points"],
          f"{field}={entry!r}: a replay schedule is {{'name': NAME, 'points': [(FRACTION_OF_TRAINING, RATIO), ...]}}")
    points = []
    for point in entry["points"]:
        _need(isinstance(point, (list, tuple)) and len(point) == 2, f"{field}: point {point!r} is not (fraction, ratio)")
        fraction, ratio = point
        _need(isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0,
              f"{field}: point {point!r}: the fraction of training must be in [0, 1]")
        points.append((float(fraction), _ratio(ratio, field)))
    _need([p for p, _ in points] == sorted({p for p, _ in points}),
          f"{field}: the fractions of training must increase strictly, got {[p for p, _ in points]}")
    return Replay(Replay.mean_ratio(points), _name(entry["name"], f"{field}.name"), tuple(points))


def _batch_rule(rule: Any) -> tuple[tuple[float, int], ...]:
    out = []
    for entry in rule:
        _need(isinstance(entry, (list, tuple)) and len(entry) == 2,
              f"Sweep.batch_size_by_params: {entry!r} is not (PARAMS_BELOW, BATCH_SIZE)")
        bound, batch = entry
        _need(bound is None or (isinstance(bound, (int, float)) and bound > 0),
              f"Sweep.batch_size_by_params: bound {bound!r} must be a positive number or None (no bound)")
        _need(isinstance(batch, int) and not isinstance(batch, bool) and batch > 0,
              f"Sweep.batch_size_by_params: batch size {batch!r} must be a positive integer")
        out.append((math.inf if bound is None else float(bound), batch))
    _need([b for b, _ in out] == sorted({b for b, _ in out}),
          f"Sweep.batch_size_by_params: the bounds must increase strictly, got {[b for b, _ in out]}")
    return tuple(out)


def validate(raw: Sweep, files: tuple[str, ...], default_name: str, output_dir: str | None) -> SweepSpec:
    """The typed spec of a `Sweep`, or a SweepError naming the first bad field."""
    name = _name(raw.name or default_name, "Sweep.name")
    _need(isinstance(raw.sizes, (list, tuple)) and len(raw.sizes) > 0,
          "Sweep.sizes is empty: list the model gin files of the sweep, e.g. ['models/tiny.gin']")
    sizes = tuple(_size(entry, i) for i, entry in enumerate(raw.sizes))
    run_kinds = tuple(raw.run_kinds)
    _need(bool(run_kinds) and set(run_kinds) <= set(TARGET_RUN_KINDS),
          f"Sweep.run_kinds={list(run_kinds)}: choose from {list(TARGET_RUN_KINDS)}")
    _need(isinstance(raw.budgets, (list, tuple)) and len(raw.budgets) > 0,
          "Sweep.budgets is empty: give at least one, e.g. [{'steps': 100}] or [{'tokens_per_param': 20}]")
    budgets = tuple(_budget(b, f"Sweep.budgets[{i}]") for i, b in enumerate(raw.budgets))
    _need(isinstance(raw.targets, Mapping) and len(raw.targets) > 0,
          "Sweep.targets is empty: map each target language to its task, e.g. {'zh': 'lo_help_zh'}")
    for language, task in raw.targets.items():
        _name(language, "Sweep.targets (language)")
        _need(isinstance(task, str) and task, f"Sweep.targets[{language!r}] must name a task, got {task!r}")
    _name(raw.source_language, "Sweep.source_language")
    _need(raw.source_language not in raw.targets,
          f"Sweep.targets includes the source language {raw.source_language!r}")
    _need("cpt" not in run_kinds or (isinstance(raw.source_task, str) and bool(raw.source_task)),
          "Sweep.source_task is required with CPT runs (the source language's task, replayed and evaluated)")
    _need(isinstance(raw.replay, (list, tuple)) and len(raw.replay) > 0,
          "Sweep.replay is empty: give at least one ratio (0.0 for no replay)")
    replay = tuple(_replay(entry, i) for i, entry in enumerate(raw.replay))
    sources = dict(raw.sources or {})
    size_names = {s.name for s in sizes}
    for size_name, directory in sources.items():
        _need(size_name in size_names, f"Sweep.sources names size {size_name!r}, which is not in Sweep.sizes "
                                       f"({sorted(size_names)})")
        _need(isinstance(directory, str) and directory, f"Sweep.sources[{size_name!r}] must be a directory path")
    trains_sources = "cpt" in run_kinds and any(s.name not in sources for s in sizes)
    _need(not trains_sources or raw.source_budget is not None,
          "Sweep.source_budget is required: CPT runs start from source runs trained in this sweep (or list "
          "existing source directories per size in Sweep.sources)")
    source_budget = _budget(raw.source_budget, "Sweep.source_budget") if raw.source_budget is not None else None
    variants = {}
    for variant, bindings in dict(raw.variants or {}).items():
        variants[_name(variant, "Sweep.variants (name)")] = _bindings(bindings, f"Sweep.variants[{variant!r}]")
    _need(raw.eval_points is None or (isinstance(raw.eval_points, int) and raw.eval_points > 0),
          f"Sweep.eval_points must be a positive integer or None, got {raw.eval_points!r}")
    _need(set(raw.analyses) <= set(ANALYSES), f"Sweep.analyses={list(raw.analyses)}: choose from {list(ANALYSES)}")
    _need(raw.fit_grid in FIT_GRIDS, f"Sweep.fit_grid={raw.fit_grid!r}: choose from {list(FIT_GRIDS)}")
    _need(isinstance(raw.bootstrap, int) and raw.bootstrap >= 0,
          f"Sweep.bootstrap must be a non-negative integer, got {raw.bootstrap!r}")
    _need(all(isinstance(c, (int, float)) and c > 0 for c in raw.analysis_flops) and len(raw.analysis_flops) > 0,
          f"Sweep.analysis_flops must be positive FLOP budgets, got {list(raw.analysis_flops)}")
    _need(all(isinstance(f, str) and f for f in raw.run_files), "Sweep.run_files must be a list of gin files")
    constant_ratios = [r.ratio for r in replay if not r.points]
    _need(raw.held_out_replay is None or any(abs(raw.held_out_replay - r) < 1e-9 for r in constant_ratios),
          f"Sweep.held_out_replay={raw.held_out_replay!r} is not one of the sweep's replay ratios {constant_ratios}")
    _need(isinstance(raw.replay_tolerance, (int, float)) and raw.replay_tolerance >= 0,
          f"Sweep.replay_tolerance must be >= 0 nats, got {raw.replay_tolerance!r}")
    chosen_dir = output_dir or raw.output_dir or os.path.join("runs", "sweeps", name)
    return SweepSpec(
        name=name, output_dir=chosen_dir, sizes=sizes, budgets=budgets, run_kinds=run_kinds,
        source_language=raw.source_language, source_task=raw.source_task, targets=dict(raw.targets),
        replay=replay, source_budget=source_budget, sources=sources, run_files=tuple(raw.run_files),
        run_bindings=_bindings(raw.run_bindings or {}, "Sweep.run_bindings"),
        source_bindings=_bindings(raw.source_bindings or {}, "Sweep.source_bindings"),
        cpt_bindings=_bindings(raw.cpt_bindings or {}, "Sweep.cpt_bindings"),
        variants=variants, batch_size_by_params=_batch_rule(raw.batch_size_by_params),
        eval_points=raw.eval_points, check_ladder=bool(raw.check_ladder), analyses=tuple(raw.analyses),
        analysis_flops=tuple(float(c) for c in raw.analysis_flops), bootstrap=raw.bootstrap,
        fit_grid=raw.fit_grid, files=files, held_out_replay=raw.held_out_replay,
        replay_tolerance=float(raw.replay_tolerance))
