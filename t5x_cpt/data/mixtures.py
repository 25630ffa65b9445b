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

Naming a mixture is the only way to define one: `register(name)` parses it, registers its tasks
and (for several tasks) a seqio.Mixture of them, and returns what it registered.

Two consumers, one meaning — each task's share of the training *tokens*:
  * the trainer's TrainPipeline interleaves document pieces by token deficit (it always draws from
    the task furthest below its token share), so the realised share after packing equals the
    weight up to one piece (<= sequence_length tokens) over the whole run (pipeline.py);
  * the seqio.Mixture registered under `MixtureSpec.seqio_name` (seqio names allow no '+' or '@')
    is for seqio's own tooling (`seqio.get_mixture_or_task(name).get_dataset(...)`, as t5x draws
    from a mixture): its tasks cut documents into pieces of the feature length and its example
    rates are weight / mean tokens per example at that length, so seqio's example mixing gives the
    same token shares in expectation (seqio_mixture.py). A ratio schedule is applied as its value
    at step 0 there: seqio has no notion of the training step.
"""

from __future__ import annotations

import dataclasses
import math
import re

import gin

from t5x_cpt.data import tasks as tasks_lib
from t5x_cpt.data.errors import DataError
from t5x_cpt.data.vocabularies import get_vocabulary

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
        """Each task's token weight at training step `step` (they sum to 1)."""
        if self.schedule is None:
            return self.weights
        r = ratio_at(self.schedule, step)
        return tuple((1.0 - r) * w for w in self.target_weights) + (r,)

    @property
    def seqio_name(self) -> str:
        """The name seqio's registry knows the mixture by ('+' and '@' become '_')."""
        return _SEQIO_NAME.sub("_", self.name)


def check_ratio(r, what: str = "replay ratio") -> float:
    """`r` as a float in [0, 1), or a DataError naming it."""
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
            step = int(step)
        except ValueError:
            raise DataError(f"ratio schedule point {part!r}: step is not an integer") from None
        points.append((step, check_ratio(ratio)))
    steps = [s for s, _ in points]
    if steps != sorted(set(steps)):
        raise DataError(f"ratio schedule steps must increase strictly: {steps}")
    return tuple(points)


def format_replay(targets, source: str, ratio=None, schedule=None) -> str:
    """The replay mixture name of target task(s) + source task at `ratio` (or a ((step, ratio), ...) schedule)."""
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
    return MixtureSpec(name, (name,), weights=(1.0,))


@dataclasses.dataclass(frozen=True)
class RegisteredMixture:
    """What `register` registered: the parsed name and its tasks, in `spec.task_names` order."""

    spec: MixtureSpec
    tasks: tuple[tasks_lib.TaskInfo, ...]


def register(name: str, vocabulary=None, data_dir: str | None = None) -> RegisteredMixture:
    """Parses a mixture/task name and registers its seqio Tasks (and, for several, the seqio.Mixture
    under `spec.seqio_name`) with the given (default: gin-selected) vocabulary; re-registering replaces."""
    spec = parse(name)
    vocabulary = vocabulary if vocabulary is not None else get_vocabulary()
    infos = tuple(tasks_lib.register_task(t, vocabulary, data_dir) for t in spec.task_names)
    if len(infos) > 1:
        from t5x_cpt.data import seqio_mixture  # pylint: disable=g-import-not-at-top  (imports seqio/TF)

        seqio_mixture.register(spec.seqio_name, infos, spec.weights_at(0))
    return RegisteredMixture(spec, infos)


@gin.configurable
def replay_mixture(target="lo_help_zh", source: str = "lo_help_en", ratio: float = 0.0,
                   schedule=None) -> str:
    """Gin helper: the replay mixture name for target task(s) + source task at `ratio`.

    `@replay_mixture()` as make_train_pipeline.mixture_or_task_name; ratio is usually %REPLAY_RATIO.
    """
    return format_replay(target, source, ratio=ratio, schedule=schedule)
