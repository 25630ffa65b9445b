"""Running a sweep's runs one after another on this machine: what is done, what is left, progress.

A run is **finished** when MODEL_DIR/checkpoints holds a committed checkpoint at its TRAIN_STEPS.
The trainer flushes metrics.jsonl before it saves a checkpoint and saves one at the last step, so a
finished run's metrics are complete; a sweep skips it without opening anything else. Any other
state — no directory, a directory without checkpoints, checkpoints short of TRAIN_STEPS — is
**unfinished**, and the same training command continues it: the trainer resumes from the newest
checkpoint by itself. So a sweep killed at any moment continues where it stopped when re-run.

Before anything trains, every existing MODEL_DIR is compared with its planned run
(`t5x_cpt.sweep.configure`, "identity") and every CPT run's source must be a run of the sweep or
an existing directory; a mismatch stops the sweep with a SweepError and nothing is written.

Runs execute in this process through `t5x_cpt.train.main` with the very arguments
`--print_commands` prints (so the cluster commands are the ones every local sweep runs). In one
process rather than one subprocess per run because a SIGKILL of the sweep then takes its current
run with it — a child trainer would survive its parent and keep writing into a MODEL_DIR that
the re-run resumes — and because JAX, TensorFlow and seqio start once per sweep instead of once
per run. gin is cleared around every run, so no run sees another's bindings.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from typing import Sequence

from t5x_cpt import checkpoints, run_dir
from t5x_cpt.sweep.configure import ConfiguredRun, identity_differences, stored_identity
from t5x_cpt.sweep.spec import SweepError

log = logging.getLogger("t5x_cpt.sweep")

PREEMPTED_EXIT_CODE = 143


@dataclasses.dataclass(frozen=True)
class RunState:
    """Where a run stands on storage."""

    finished: bool
    last_checkpoint: int | None
    done_flops: float  # training FLOPs already spent (the run's total when finished)


def run_state(run: ConfiguredRun) -> RunState:
    """The run's state (module docstring: what 'finished' means)."""
    root = run_dir.as_path(run.model_dir)
    ckpt_root = root / run_dir.CHECKPOINTS
    steps = checkpoints.available_steps(str(ckpt_root)) if ckpt_root.exists() else []
    if run.train_steps in steps:
        return RunState(True, run.train_steps, run.train_flops)
    last = steps[-1] if steps else None
    done = 0.0
    if last is not None:
        records = [r for r in run_dir.read_metrics(run.model_dir) if r["step"] <= last and "flops" in r]
        done = float(records[-1]["flops"]) if records else 0.0
    return RunState(False, last, done)


def check_directory(run: ConfiguredRun) -> None:
    """Refuses a MODEL_DIR that holds something other than this run (SweepError, nothing written)."""
    root = run_dir.as_path(run.model_dir)
    if not root.exists():
        return
    if not root.is_dir():
        raise SweepError(f"run {run.name}: MODEL_DIR {run.model_dir} is a file, not a directory")
    stored = stored_identity(run.model_dir)
    if stored is None:
        if (root / run_dir.CHECKPOINTS).exists() and any((root / run_dir.CHECKPOINTS).iterdir()):
            raise SweepError(f"run {run.name}: MODEL_DIR {run.model_dir} holds checkpoints but no "
                             f"{run_dir.CONFIG_GIN}, so it cannot be shown to be this run; move it away or "
                             "choose another --output_dir")
        return
    differences = identity_differences(stored, run.identity)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise SweepError(f"run {run.name}: MODEL_DIR {run.model_dir} holds a run of another configuration "
                         f"({shown}). Nothing was changed: choose another --output_dir, or delete that directory "
                         "to train this run there")


def check_source(run: ConfiguredRun, in_sweep: set[str]) -> None:
    """A CPT run's source is a run of this sweep, or a directory that exists (SweepError otherwise)."""
    planned = run.run
    if not planned.is_cpt or planned.source_run in in_sweep:
        return
    if planned.source_run is None and checkpoints.path_exists(planned.source_dir):
        return
    raise SweepError(f"run {run.name}: its source {planned.source_dir} is neither a run of this sweep nor an existing "
                     "directory (Sweep.sources names the source of each size, or leave the size out of it to "
                     "train its source in the sweep)")


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    """Runs done out of total and an ETA from FLOPs: (FLOPs left) / (FLOPs per second so far)."""

    def __init__(self, runs: Sequence[ConfiguredRun], states: Sequence[RunState]):
        self.total_runs = len(runs)
        self.total_flops = sum(r.train_flops for r in runs)
        self.done = {r.name: s.done_flops for r, s in zip(runs, states)}
        self.finished = {r.name for r, s in zip(runs, states) if s.finished}
        self._start_flops = sum(self.done.values())
        self._start_time = time.time()

    def mark_finished(self, run: ConfiguredRun) -> None:
        self.finished.add(run.name)
        self.done[run.name] = run.train_flops

    def line(self) -> str:
        done = sum(self.done.values())
        fraction = done / self.total_flops if self.total_flops else 1.0
        text = f"sweep: {len(self.finished)}/{self.total_runs} runs finished, {100 * fraction:.1f}% of the FLOPs"
        spent, elapsed = done - self._start_flops, time.time() - self._start_time
        if len(self.finished) < self.total_runs and spent > 0 and elapsed > 0:
            rate = spent / elapsed
            text += (f", ETA {format_seconds((self.total_flops - done) / rate)} "
                     f"(at {rate:.3g} FLOP/s measured since this sweep started)")
        elif len(self.finished) < self.total_runs:
            text += ", ETA after the first run of this session"
        return text


class _StopRequest:
    """SIGTERM between runs: finish nothing new, exit 143 (a run in progress handles its own SIGTERM)."""

    def __init__(self):
        self.requested = False

    def install(self) -> None:
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def _handle(self, signum, frame):
        del signum, frame
        log.warning("SIGTERM received: the sweep stops before its next run")
        self.requested = True


def train_in_process(run: ConfiguredRun) -> int:
    """One run through the trainer's own entry point; returns its exit code (0, 2 or 143)."""
    import gin

    from t5x_cpt import train

    gin.clear_config()
    try:
        return int(train.main(run.argv()))
    except SystemExit as e:  # the trainer leaves with 143 after saving a checkpoint on SIGTERM
        return int(e.code) if isinstance(e.code, int) else 1
    finally:
        gin.clear_config()
        import jax

        jax.clear_caches()  # a long sweep keeps no run's compiled steps in memory


def execute(runs: Sequence[ConfiguredRun], states: Sequence[RunState]) -> int:
    """Trains the unfinished runs in order; returns 0, or the exit code of the run that stopped it."""
    progress = Progress(runs, states)
    skipped = [r.name for r, s in zip(runs, states) if s.finished]
    if skipped:
        log.info("sweep: %d finished run(s) skipped: %s", len(skipped), ", ".join(skipped))
    log.info("%s", progress.line())
    stop = _StopRequest()
    for index, (run, state) in enumerate(zip(runs, states), 1):
        if state.finished:
            continue
        if run.run.is_cpt and run.run.source_run and run.run.source_run not in progress.finished:
            raise SweepError(f"run {run.name}: its source run {run.run.source_run} is not finished")
        stop.install()
        if stop.requested:
            return PREEMPTED_EXIT_CODE
        how = f"resuming from step {state.last_checkpoint}" if state.last_checkpoint else "new"
        log.info("sweep: run %d/%d %s (%s, %d steps, %.3g FLOPs) in %s", index, len(runs), run.name, how,
                 run.train_steps, run.train_flops, run.model_dir)
        started = time.time()
        code = train_in_process(run)
        stop.install()
        if code != 0:
            what = "was preempted after saving a checkpoint" if code == PREEMPTED_EXIT_CODE else "failed"
            log.error("sweep: run %s %s (exit %d); re-run the same sweep command to continue", run.name, what, code)
            return code
        if not run_state(run).finished:
            raise RuntimeError(f"run {run.name}: the trainer returned 0 but {run.model_dir} has no checkpoint at step "
                               f"{run.train_steps}")
        progress.mark_finished(run)
        log.info("sweep: run %s done in %s; %s", run.name, format_seconds(time.time() - started), progress.line())
        if stop.requested:
            return PREEMPTED_EXIT_CODE
    return 0
