"""Entry point: `python -m t5x_cpt.train --gin_file=F [--gin_file=G] [--gin.NAME=VALUE ...]`.

One run = one MODEL_DIR. The init mode follows from what exists:
  resume        MODEL_DIR already holds a checkpoint: everything is restored from it (params,
                optimizer, step, data position), whatever the other settings say;
  source        `train.source_checkpoint` names an imported LLM dir or another run's MODEL_DIR:
                weights only, strictly; fresh optimizer, step 0, a new warm-up;
  random        otherwise.
MODEL_DIR receives config.gin (the operative gin config), model_config.json, run_info.json,
metrics.jsonl, TensorBoard events and checkpoints/.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any, Sequence

import gin
import jax
import numpy as np

from t5x_cpt import checkpoints, flops, gin_cli, partitioning, trainer
from t5x_cpt.metrics import MetricsWriter
from t5x_cpt.model import Decoder, ModelConfig
from t5x_cpt.optim import learning_rate_schedule, make_optimizer

PREEMPTED_EXIT_CODE = 143
# ModelConfig fields that change the function the weights compute; the rest are numerics/layout.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                       "rms_norm_eps", "rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
                       "rope_high_freq_factor", "rope_original_max_position", "qkv_bias", "tie_embeddings")


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message names the cause."""


class NonFiniteLossError(TrainingError):
    pass


def _architecture_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in ARCHITECTURE_FIELDS if getattr(a, f) != getattr(b, f)]


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (then it saves and exits)."""

    def __init__(self):
        self.requested = False
        if hasattr(signal, "SIGTERM") and _is_main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        logging.warning("SIGTERM received: saving a checkpoint at the end of this step, then exiting")
        self.requested = True


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _global_batch(local: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k])) for k in trainer.INPUT_KEYS}


@gin.configurable
def train(model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          sequence_length: int = gin.REQUIRED, seed: int = 0, log_period: int = 10, eval_period: int = 100,
          checkpoint_period: int = 100, keep_checkpoints: int = 3, async_checkpoints: bool = True,
          source_checkpoint: str | None = None, eval_tasks: Sequence[str] = (), eval_batches: int | None = 4,
          eval_batch_size: int | None = None, accumulate_steps: int = 1, family: str = "scratch",
          language: str | None = None, replay_ratio: float = 0.0) -> dict[str, Any]:
    """Trains one run; returns the last metrics record. Bound from gin (configs/runs/*.gin)."""
    from t5x_cpt.data import pipeline as data_pipeline  # seqio/TF load here, not at import time
    from t5x_cpt.data import vocabularies

    if source_checkpoint in ("", "None"):
        source_checkpoint = None
    for name, value in (("train_steps", train_steps), ("batch_size", batch_size), ("sequence_length", sequence_length),
                        ("log_period", log_period), ("eval_period", eval_period),
                        ("checkpoint_period", checkpoint_period), ("accumulate_steps", accumulate_steps)):
        if not isinstance(value, int) or value <= 0:
            raise TrainingError(f"train.{name} must be a positive integer, got {value!r}")
    if batch_size % accumulate_steps:
        raise TrainingError(f"batch_size={batch_size} is not divisible by accumulate_steps={accumulate_steps}")
    if batch_size % jax.process_count():
        raise TrainingError(f"batch_size={batch_size} is not divisible by the {jax.process_count()} hosts")

    is_primary = jax.process_index() == 0
    model_dir = checkpoints.absolute(model_dir)
    config = ModelConfig()
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    model = Decoder(config)
    schedule = learning_rate_schedule(train_steps)
    optimizer = make_optimizer(schedule)
    os.makedirs(model_dir, exist_ok=True)

    stored_config = checkpoints.read_model_config(model_dir)
    if stored_config is not None and _architecture_differences(stored_config, config):
        raise TrainingError(f"MODEL_DIR {model_dir} belongs to a different model: "
                            + "; ".join(_architecture_differences(stored_config, config))
                            + ". Use a new MODEL_DIR or the matching model gin file.")

    resuming = bool(checkpoints.available_steps(os.path.join(model_dir, "checkpoints")))
    if source_checkpoint and not resuming:  # checked before the (slow) data pipeline is built
        if not checkpoints.path_exists(source_checkpoint):
            raise TrainingError(f"source checkpoint {source_checkpoint} does not exist")
        source_config = checkpoints.read_model_config(source_checkpoint)
        if source_config is not None and _architecture_differences(source_config, config):
            raise TrainingError(f"source checkpoint {source_checkpoint} has a different architecture: "
                                + "; ".join(_architecture_differences(source_config, config)))

    vocab_size = vocabularies.vocab_size()
    if vocab_size > config.vocab_size:
        raise TrainingError(f"the data's vocabulary has {vocab_size} ids but ModelConfig.vocab_size is "
                            f"{config.vocab_size}: set ModelConfig.vocab_size >= {vocab_size}")
    pipeline = data_pipeline.make_train_pipeline(sequence_length=sequence_length, batch_size=batch_size, seed=seed)
    task_names = list(pipeline.task_names)

    with partitioning.activation_sharding(mesh, rules):
        abstract, shardings = trainer.state_shardings(model, optimizer, mesh, rules)
        manager = checkpoints.TrainCheckpointManager(model_dir, keep=keep_checkpoints, async_save=async_checkpoints)
        host = {"tokens": 0.0, "tokens_per_task": {t: 0.0 for t in task_names}, "flops": 0.0}
        abstract_opt = jax.eval_shape(optimizer.init, abstract)
        with_sharding = lambda tree, sh: jax.tree.map(  # noqa: E731
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
        restored = manager.restore_latest(with_sharding(abstract, shardings.params),
                                          with_sharding(abstract_opt, shardings.opt_state))
        if restored is not None:
            step, params, opt_state, data_state, meta = restored
            init_mode = "resume"
            logging.info("resuming from %s step %d (other init settings are ignored)", manager.directory, step)
            state = trainer.TrainState(step=jax.device_put(np.int32(step), shardings.step), params=params,
                                       opt_state=opt_state,
                                       first_nonfinite_step=jax.device_put(np.int32(-1), shardings.step))
            pipeline.set_state(data_state)
            host = meta["host_counters"]
        elif source_checkpoint:
            init_mode = "source"
            try:
                params = checkpoints.load_params(source_checkpoint, abstract, shardings.params)
            except checkpoints.CheckpointError as e:
                raise TrainingError(str(e)) from e
            logging.info("initialised weights from %s (fresh optimizer, step 0)", source_checkpoint)
            state = trainer.init_state(params, optimizer, shardings)
        else:
            init_mode = "random"
            state = trainer.init_state(trainer.random_params(model, seed, shardings.params), optimizer, shardings)

        start_step = int(state.step)
        counts = flops.param_counts(config)
        flops_per_token = flops.train_flops_per_token(config, sequence_length)
        run_info = {"run": os.path.basename(model_dir), "family": "cpt" if source_checkpoint else family,
                    "language": language, "replay_ratio": replay_ratio, "init_mode": init_mode,
                    "source_checkpoint": checkpoints.absolute(source_checkpoint) if source_checkpoint else None,
                    "params": counts["params"], "non_embedding_params": counts["non_embedding_params"],
                    "train_flops_per_token": flops_per_token, "sequence_length": sequence_length,
                    "batch_size": batch_size, "train_steps": train_steps, "tasks": task_names,
                    "mesh": dict(mesh.shape)}
        if is_primary:
            checkpoints.write_model_config(model_dir, config)
            if init_mode != "resume" or not os.path.exists(os.path.join(model_dir, "run_info.json")):
                with open(os.path.join(model_dir, "run_info.json"), "w") as f:
                    json.dump(run_info, f, indent=2)

        writer = MetricsWriter(model_dir, train_steps, enabled=is_primary)
        # Drop what a killed run logged after its checkpoint (everything, if it had none).
        writer.truncate_after(start_step if start_step > 0 else -1)
        batch_sharding = partitioning.batch_sharding(mesh, rules)
        eval_sets = {task: [_global_batch(b, batch_sharding) for b in data_pipeline.make_eval_batches(
            task_name=task, sequence_length=sequence_length, batch_size=eval_batch_size or batch_size,
            num_batches=eval_batches)] for task in eval_tasks}
        train_step = jax.jit(trainer.make_train_step(model, optimizer, len(task_names), accumulate_steps),
                             donate_argnums=(0, 1))
        eval_step = jax.jit(trainer.make_eval_step(model))
        if is_primary:
            with open(os.path.join(model_dir, "config.gin"), "w") as f:
                f.write(gin.operative_config_str())

        def evaluate() -> dict[str, float]:
            results = {}
            for task, batches in eval_sets.items():
                sums = [eval_step(state.params, b) for b in batches]
                loss_sum, count = jax.device_get((sum(s[0] for s in sums), sum(s[1] for s in sums)))
                results[f"eval/{task}/loss"] = float(loss_sum / max(count, 1.0))
            return results

        def counters_record(step: int) -> dict[str, Any]:
            return {"step": step, "tokens": host["tokens"], "flops": host["flops"],
                    **{f"tokens/{t}": v for t, v in host["tokens_per_task"].items()}}

        if start_step == 0 and eval_sets:
            record = {**counters_record(0), **evaluate()}
            logging.info("step 0 eval (%s init): %s", init_mode,
                         ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("eval/")))
            writer.write(record)

        peak = flops.peak_flops_per_device(jax.devices()[0].device_kind, config.dtype) * jax.device_count()
        preemption = _Preemption()
        acc = jax.device_put(trainer.zero_accumulators(len(task_names)), partitioning.replicated(mesh))
        last_time, last_record = time.time(), {}

        def flush(step: int) -> dict[str, Any]:
            """Reads the device accumulators (a host sync: log and checkpoint steps only)."""
            nonlocal acc, last_time
            values, first_bad = jax.device_get((acc, state.first_nonfinite_step))
            if int(first_bad) >= 0:
                latest = manager.latest_step()
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at step {int(first_bad) + 1}; the state was not updated and "
                    f"nothing non-finite was saved. Last good checkpoint: "
                    + (f"step {latest} in {manager.directory}" if latest is not None else "none"))
            acc = jax.device_put(trainer.zero_accumulators(len(task_names)), partitioning.replicated(mesh))
            if values["steps"] == 0:
                return {}
            now = time.time()
            tokens = float(values["tokens"])
            host["tokens"] += tokens
            host["flops"] += tokens * flops_per_token
            for task, count in zip(task_names, values["tokens_per_task"]):
                host["tokens_per_task"][task] += float(count)
            rate = tokens / max(now - last_time, 1e-9)
            last_time = now
            return {**counters_record(step), "train/loss": float(values["loss_sum"] / max(tokens, 1.0)),
                    "grad_norm": float(values["grad_norm_sum"] / values["steps"]),
                    "learning_rate": float(schedule(step - 1)), "tokens_per_second": rate,
                    "mfu": rate * flops_per_token / peak}

        def save(step: int) -> None:
            data_state = {"hosts": checkpoints.gather_host_json(pipeline.get_state())}
            manager.save(step, state.params, state.opt_state, data_state,
                         {"step": step, "host_counters": host, "model_config": config.to_dict()})

        try:
            for step in range(start_step + 1, train_steps + 1):
                state, acc = train_step(state, acc, _global_batch(next(pipeline), batch_sharding))
                is_last = step == train_steps
                record = {}
                if step % log_period == 0 or is_last or step % checkpoint_period == 0 or preemption.requested:
                    record = flush(step)
                    if record and (step % log_period == 0 or is_last):
                        writer.progress(step, record["train/loss"], record["tokens_per_second"], record["mfu"])
                if step % eval_period == 0 or is_last:
                    record = {**(record or counters_record(step)), **evaluate()}
                if record:
                    writer.write(record)
                    last_record = record
                if step % checkpoint_period == 0 or is_last or preemption.requested:
                    save(step)
                if preemption.requested and not is_last:
                    manager.close()
                    logging.warning("preempted: checkpoint of step %d saved in %s", step, manager.directory)
                    sys.exit(PREEMPTED_EXIT_CODE)
        finally:
            manager.close()
            writer.close()
    return last_record


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (under seqio) is chatty on import
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from t5x_cpt.data import pipeline as _  # noqa: F401  registers the data configurables for gin
    try:
        rest = gin_cli.parse_argv(argv)
        if rest:
            raise gin_cli.GinConfigError(f"unknown arguments {rest}; use --gin_file=F and --gin.NAME=VALUE")
        train()
    except (gin_cli.GinConfigError, TrainingError, checkpoints.CheckpointError, ValueError, FileNotFoundError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        print(f"t5x_cpt.train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
