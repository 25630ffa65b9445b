"""The training loop of a prepared run: steps, metrics, evaluation, checkpoints, preemption.

The step never syncs with the host; the loop reads the device-side accumulators only at log,
eval and checkpoint steps, and otherwise only waits for the step MAX_STEPS_AHEAD behind the one it
dispatches. Only process 0 writes metrics; every process takes part in saves,
evaluations and the preemption agreement, at the same steps.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import jax

from t5x_cpt import distributed, flops, partitioning, trainer
from t5x_cpt.preflight import PreparedRun, TrainingError, global_batch
from t5x_cpt.run_dir import MetricsLog

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143
# How many steps the host may dispatch before the device has finished them. Left alone, JAX lets
# the loop run ahead to the next log step; a SIGTERM is acted on at the step the host has reached
# and the save waits for every step dispatched before it, so at large sizes a lead of LOG_PERIOD
# steps could outlast a preemption notice (about 30 s on Spot TPU VMs). Two keeps the device fed.
MAX_STEPS_AHEAD = 2


class NonFiniteLossError(TrainingError):
    """A step's loss or gradient was not finite; nothing non-finite was applied or saved."""


class _Progress:
    """One console line per log step: step, loss, throughput, MFU and an ETA."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self._start: tuple[int, float] | None = None

    def show(self, step: int, loss: float, tokens_per_second: float, mfu: float) -> None:
        now = time.time()
        if self._start is None:
            self._start, eta = (step, now), "?"
        else:
            rate = (step - self._start[0]) / max(now - self._start[1], 1e-9)
            eta = _format_seconds((self.total_steps - step) / rate) if rate > 0 else "?"
        log.info("step %d/%d | loss %.4f | %s tok/s | mfu %.2f%% | eta %s", step, self.total_steps, loss,
                 _format_count(tokens_per_second), 100 * mfu, eta)


def _format_count(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class TrainLoop:
    """Runs a PreparedRun to its last step (or to a preemption); see the module docstring."""

    def __init__(self, run: PreparedRun):
        self.run = run
        settings = run.settings
        self.metrics = MetricsLog(run.run_dir, enabled=distributed.is_primary())
        self.progress = _Progress(settings.train_steps)
        self.train_step = jax.jit(trainer.make_train_step(run.model, run.optimizer, len(run.task_names),
                                                          settings.accumulate_steps), donate_argnums=(0, 1))
        self.eval_step = jax.jit(trainer.make_eval_step(run.model))
        self.peak_flops = flops.peak_flops_per_device(jax.devices()[0].device_kind, run.config.dtype) * \
            jax.device_count()
        self.replicated = partitioning.replicated(run.mesh)
        self.accumulators = self._zero_accumulators()
        # Training time since the last read of the accumulators; eval and checkpoint time are kept
        # out of it (and reported as eval_seconds / checkpoint_seconds), so tokens_per_second is
        # the training rate.
        self.last_flush_time = time.time()
        self.checkpoint_seconds: float | None = None

    def _zero_accumulators(self):
        return jax.device_put(trainer.zero_accumulators(len(self.run.task_names)), self.replicated)

    def evaluate(self) -> dict[str, float]:
        results = {}
        for task, batches in self.run.eval_sets.items():
            sums = [self.eval_step(self.run.state.params, b) for b in batches]
            loss_sum, count = jax.device_get((sum(s[0] for s in sums), sum(s[1] for s in sums)))
            results[f"eval/{task}/loss"] = float(loss_sum / max(count, 1.0))
        return results

    def counters_record(self, step: int) -> dict[str, Any]:
        counters = self.run.counters
        return {"step": step, "tokens": counters["tokens"], "flops": counters["flops"],
                **{f"tokens/{t}": v for t, v in counters["tokens_per_task"].items()}}

    def read_accumulators(self, step: int) -> dict[str, Any]:
        """Folds the device accumulators into the counters (a host sync: log and save steps only)."""
        values, first_bad = jax.device_get((self.accumulators, self.run.state.first_nonfinite_step))
        if int(first_bad) >= 0:
            latest = self.run.manager.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {int(first_bad) + 1}; the state was not updated and "
                f"nothing non-finite was saved. Last good checkpoint: "
                + (f"step {latest} in {self.run.manager.directory}" if latest is not None else "none"))
        self.accumulators = self._zero_accumulators()
        if values["steps"] == 0:
            return {}
        now = time.time()
        tokens = float(values["tokens"])
        counters = self.run.counters
        counters["tokens"] += tokens
        counters["flops"] += tokens * self.run.flops_per_token
        for task, count in zip(self.run.task_names, values["tokens_per_task"]):
            counters["tokens_per_task"][task] += float(count)
        rate = tokens / max(now - self.last_flush_time, 1e-9)
        self.last_flush_time = now
        return {**self.counters_record(step), "train/loss": float(values["loss_sum"] / max(tokens, 1.0)),
                "grad_norm": float(values["grad_norm_sum"] / values["steps"]),
                "learning_rate": float(self.run.schedule(step - 1)), "tokens_per_second": rate,
                "mfu": rate * self.run.flops_per_token / self.peak_flops}

    def save(self, step: int) -> None:
        """Metrics first, then the checkpoint: what a resume keeps is always on storage."""
        self.metrics.flush()
        run = self.run
        by_shard = {}
        for host_states in distributed.allgather_json(run.pipeline.get_state()):
            by_shard.update(host_states)  # hosts sharing shards hold the same states
        run.manager.save(step, run.state.params, run.state.opt_state,
                         {"shards": [by_shard[str(i)] for i in range(run.pipeline.num_shards)]},
                         {"step": step, "counters": run.counters, "model_config": run.config.to_dict()})

    def __call__(self) -> dict[str, Any]:
        run, settings = self.run, self.run.settings
        self.metrics.open(run.start_step if run.start_step > 0 else -1)
        preemption = distributed.PreemptionWatch()
        last_record: dict[str, Any] = {}
        in_flight: collections.deque = collections.deque()
        try:
            if run.start_step == 0 and run.eval_sets:
                record = {**self.counters_record(0), **self.evaluate()}
                log.info("step 0 eval (%s init): %s", run.init_mode,
                         ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("eval/")))
                self.metrics.write(record)
            for step in range(run.start_step + 1, settings.train_steps + 1):
                batch = global_batch(next(run.pipeline), run.batch_sharding, run.global_batch_shape)
                run.state, self.accumulators = self.train_step(run.state, self.accumulators, batch)
                in_flight.append(self.accumulators["steps"] + 0)  # a copy: the next step donates the original
                if len(in_flight) > MAX_STEPS_AHEAD:
                    in_flight.popleft().block_until_ready()
                is_last = step == settings.train_steps
                preempted = preemption.reached(step) and not is_last
                is_log = step % settings.log_period == 0 or is_last
                is_save = step % settings.checkpoint_period == 0 or is_last or preempted
                is_eval = step % settings.eval_period == 0 or is_last
                record = {}
                if is_log or is_save or is_eval:  # every record's tokens and FLOPs are current
                    record = self.read_accumulators(step)
                    if record and is_log and distributed.is_primary():
                        self.progress.show(step, record["train/loss"], record["tokens_per_second"], record["mfu"])
                if is_eval:
                    started = time.time()
                    record = {**(record or self.counters_record(step)), **self.evaluate()}
                    record["eval_seconds"] = time.time() - started
                if record:
                    if self.checkpoint_seconds is not None:  # how long the previous save blocked the loop
                        record["checkpoint_seconds"], self.checkpoint_seconds = self.checkpoint_seconds, None
                    self.metrics.write(record)
                    last_record = record
                if is_eval and not is_save:
                    self.metrics.flush()
                if is_save:
                    started = time.time()
                    self.save(step)
                    self.checkpoint_seconds = time.time() - started
                if is_eval or is_save:
                    self.last_flush_time = time.time()
                if preempted:
                    log.warning("preempted: checkpoint of step %d saved in %s", step, run.manager.directory)
                    raise SystemExit(PREEMPTED_EXIT_CODE)
        finally:
            run.manager.close()
            self.metrics.close()
        return last_record
