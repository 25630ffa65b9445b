"""Replay mixtures whose ratio is a fraction of training *tokens*, and their names.

A mixture is written as a string that gin can carry directly (and that `make_train_pipeline`
parses and registers on the fly):

    lo_help_zh                                   one task (scratch, or pre-training on the source)
    replay:lo_help_zh+lo_help_en@0.3             targets + source @ replay ratio r in [0, 1)
    replay:lo_help_zh,lo_help_fr+lo_help_en@0.05 several targets share 1 - r equally
    replay:lo_help_zh+lo_help_en@0:0.5,1000:0.1  a ratio schedule: (step:ratio) points, piecewise
                                                 linear in the training step, constant outside
    mix:lo_help_zh@0.35,lo_help_fr@0.35,lo_help_en@0.3   any token-weighted mixture (weights sum to 1)

In gin, `replay_mixture()` builds the replay string from its parts, so run files can write
    make_train_pipeline.mixture_or_task_name = @replay_mixture()
    replay_mixture.target = 'lo_help_zh'
    replay_mixture.source = 'lo_help_en'
    replay_mixture.ratio = %REPLAY_RATIO

seqio mixes *examples* by rate, so documents of different lengths skew token shares. Here the
TrainPipeline interleaves document pieces by token deficit (it always draws from the task furthest
below its token share), so the realised token share after packing equals the weight up to one piece
(<= sequence_length tokens) over the whole run. The seqio.Mixture registered alongside (rates =
token weights at step 0) is for seqio tooling only.
"""

from __future__ import annotations

import dataclasses
import math
import re

import gin

from t5x_cpt.data.errors import DataError

_SEQIO_NAME = re.compile(r"[^\w.:#]")


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
    """Tasks in a fixed order (task_ids index into it) and their token weights over steps."""

    name: str
    task_names: tuple[str, ...]
    # Either constant weights, or a replay schedule: ((step, ratio), ...) with the source last.
    weights: tuple[float, ...] | None = None
    schedule: tuple[tuple[int, float], ...] | None = None
    target_weights: tuple[float, ...] | None = None

    def weights_at(self, step: int) -> tuple[float, ...]:
        if self.schedule is None:
            return self.weights
        r = ratio_at(self.schedule, step)
        return tuple((1.0 - r) * w for w in self.target_weights) + (r,)

    @property
    def seqio_name(self) -> str:
        return _SEQIO_NAME.sub("_", self.name)


def check_ratio(r, what: str = "replay ratio") -> float:
    try:
        r = float(r)
    except (TypeError, ValueError):
        raise DataError(f"{what} {r!r} is not a number") from None
    if not (0.0 <= r < 1.0) or math.isnan(r):
        raise DataError(f"{what} {r} is outside [0, 1): it is the fraction of training tokens from the source")
    return r


def ratio_at(schedule, step: int) -> float:
    """Piecewise-linear interpolation of ((step, ratio), ...) at `step`, constant outside."""
    if step <= schedule[0][0]:
        return schedule[0][1]
    for (s0, r0), (s1, r1) in zip(schedule, schedule[1:]):
        if step <= s1:
            return r0 + (r1 - r0) * (step - s0) / (s1 - s0)
    return schedule[-1][1]


def _parse_schedule(text: str) -> tuple[tuple[int, float], ...]:
    points = []
    for part in text.split(","):
        step, sep, ratio = part.partition(":")
        if not sep:
            raise DataError(f"ratio schedule point {part!r} is not STEP:RATIO")
        try:
            points.append((int(step), check_ratio(ratio)))
        except ValueError:
            raise DataError(f"ratio schedule point {part!r}: step is not an integer") from None
    steps = [s for s, _ in points]
    if steps != sorted(set(steps)):
        raise DataError(f"ratio schedule steps must increase strictly: {steps}")
    return tuple(points)


def format_replay(targets, source: str, ratio=None, schedule=None) -> str:
    targets = [targets] if isinstance(targets, str) else list(targets)
    if schedule:
        rhs = ",".join(f"{int(s)}:{check_ratio(r)!r}" for s, r in schedule)
    else:
        rhs = repr(check_ratio(ratio))
    return f"replay:{','.join(targets)}+{source}@{rhs}"


def parse(name: str) -> MixtureSpec:
    """A mixture/task name string -> MixtureSpec (a plain task name gives a one-task spec)."""
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"mixture_or_task_name must be a non-empty string, got {name!r}")
    name = name.strip()
    if name.startswith("replay:"):
        body = name[len("replay:"):]
        lhs, at, rhs = body.rpartition("@")
        targets_part, plus, source = lhs.rpartition("+")
        if not at or not plus or not targets_part or not source:
            raise DataError(f"replay mixture {name!r} is not 'replay:TARGET[,TARGET...]+SOURCE@RATIO'")
        targets = tuple(t.strip() for t in targets_part.split(",") if t.strip())
        source = source.strip()
        if source in targets or len(set(targets)) != len(targets):
            raise DataError(f"replay mixture {name!r}: a task appears twice")
        schedule = _parse_schedule(rhs) if ":" in rhs else ((0, check_ratio(rhs)),)
        tw = tuple(1.0 / len(targets) for _ in targets)
        return MixtureSpec(name, targets + (source,), schedule=schedule, target_weights=tw)
    if name.startswith("mix:"):
        tasks, weights = [], []
        for part in name[len("mix:"):].split(","):
            task, at, w = part.rpartition("@")
            if not at or not task:
                raise DataError(f"mixture {name!r}: part {part!r} is not TASK@WEIGHT")
            try:
                w = float(w)
            except ValueError:
                raise DataError(f"mixture {name!r}: weight {w!r} is not a number") from None
            if not w >= 0:
                raise DataError(f"mixture {name!r}: weight {w} is negative")
            tasks.append(task.strip())
            weights.append(w)
        if len(set(tasks)) != len(tasks):
            raise DataError(f"mixture {name!r}: a task appears twice")
        if abs(sum(weights) - 1.0) > 1e-6:
            raise DataError(f"mixture {name!r}: weights sum to {sum(weights)}, not 1")
        return MixtureSpec(name, tuple(tasks), weights=tuple(weights))
    if _REGISTERED.get(name) is not None:
        return _REGISTERED[name]
    return MixtureSpec(name, (name,), weights=(1.0,))


_REGISTERED: dict[str, MixtureSpec] = {}


def register_replay_mixture(name: str, target_tasks, source_task: str, replay_ratio: float | None = None,
                            schedule=None, target_weights=None, vocabulary=None,
                            data_dir: str | None = None) -> MixtureSpec:
    """Registers a named replay mixture (its tasks too) as a seqio.Mixture; re-registering replaces.

    replay_ratio: fraction of training tokens from `source_task`, in [0, 1). schedule: optional
    ((step, ratio), ...) instead. target_weights: shares of the targets in the rest (default equal).
    """
    targets = (target_tasks,) if isinstance(target_tasks, str) else tuple(target_tasks)
    if schedule is None:
        if replay_ratio is None:
            raise DataError("register_replay_mixture needs replay_ratio or schedule")
        schedule = ((0, check_ratio(replay_ratio)),)
    else:
        schedule = _parse_schedule(",".join(f"{s}:{r}" for s, r in schedule))
    tw = tuple(target_weights) if target_weights else tuple(1.0 / len(targets) for _ in targets)
    if len(tw) != len(targets) or any(w < 0 for w in tw) or abs(sum(tw) - 1) > 1e-6:
        raise DataError(f"target_weights {tw} must be {len(targets)} non-negative numbers summing to 1")
    spec = MixtureSpec(name, targets + (source_task,), schedule=schedule, target_weights=tw)
    if source_task in targets:
        raise DataError(f"replay mixture {name!r}: source {source_task!r} is also a target")
    _REGISTERED[name] = spec
    register_spec(spec, vocabulary, data_dir)
    return spec


def register_spec(spec: MixtureSpec, vocabulary=None, data_dir: str | None = None) -> MixtureSpec:
    """Registers the spec's tasks and (for more than one task) a seqio.Mixture of them."""
    from t5x_cpt.data import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
    from t5x_cpt.data.tfutil import seqio  # pylint: disable=g-import-not-at-top

    for t in spec.task_names:
        tasks_lib.register_task(t, vocabulary, data_dir)
    if len(spec.task_names) > 1:
        sq = seqio()
        if spec.seqio_name in sq.MixtureRegistry.names():
            sq.MixtureRegistry.remove(spec.seqio_name)
        w0 = spec.weights_at(0)
        # seqio rejects all-zero rates; a zero weight stays zero in our interleaving anyway.
        sq.MixtureRegistry.add(spec.seqio_name, [(t, max(w, 1e-12)) for t, w in zip(spec.task_names, w0)])
    return spec


@gin.configurable
def replay_mixture(target="lo_help_zh", source: str = "lo_help_en", ratio: float = 0.0,
                   schedule=None) -> str:
    """Gin helper: the replay mixture name for target task(s) + source task at `ratio`.

    `@replay_mixture()` as make_train_pipeline.mixture_or_task_name; ratio is usually %REPLAY_RATIO.
    """
    return format_replay(target, source, ratio=ratio, schedule=schedule)
