"""Everything a run decides before its first step, taken the same way on every process.

`prepare_run(settings)` checks the settings, builds the mesh and the per-host data layout, proves
MODEL_DIR usable (and shared, with several processes), compares what every host sees (data and
vocabulary fingerprints), estimates the step's memory, chooses the init mode — resume, source
weights or random — and returns a `PreparedRun` holding the initial state. Decisions read from
storage are taken by process 0 and broadcast (`t5x_cpt.distributed`), so the hosts can never
disagree on whether to resume or from which step; a refusal happens on every process with the
same message, before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax

from t5x_cpt import checkpoints, distributed, flops, host_malloc, partitioning, trainer
from t5x_cpt.data.logical_shards import LogicalShards
from t5x_cpt.errors import UserInputError
from t5x_cpt.model import Decoder, ModelConfig
from t5x_cpt.optim import learning_rate_schedule, make_optimizer
from t5x_cpt.run_dir import RUN_KINDS, RunDir, as_path

log = logging.getLogger(__name__)

class TrainingError(UserInputError):
    """A run cannot start or continue; the message names the cause."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The `train` configurable's arguments (configs/runs/*.gin), validated by `check`."""

    model_dir: str
    train_steps: int
    batch_size: int
    sequence_length: int
    seed: int = 0
    log_period: int = 10
    eval_period: int = 100
    checkpoint_period: int = 100
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    source_checkpoint: str | None = None
    eval_tasks: Sequence[str] = ()
    eval_batches: int | None = 4
    eval_batch_size: int | None = None
    accumulate_steps: int = 1
    run_kind: str = "scratch"
    language: str | None = None
    replay_ratio: float = 0.0
    data_shards: int | None = None

    def check(self) -> None:
        for name in ("train_steps", "batch_size", "sequence_length", "log_period", "eval_period",
                     "checkpoint_period", "accumulate_steps", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrainingError(f"train.{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.accumulate_steps:
            raise TrainingError(f"batch_size={self.batch_size} is not divisible by "
                                f"accumulate_steps={self.accumulate_steps}")
        if self.run_kind not in RUN_KINDS:
            raise TrainingError(f"train.run_kind must be one of {RUN_KINDS}, got {self.run_kind!r}")
        if (self.run_kind == "cpt") != bool(self.source_checkpoint):
            raise TrainingError(
                f"train.run_kind={self.run_kind!r} with source_checkpoint={self.source_checkpoint!r}: a 'cpt' run "
                "starts from SOURCE_CHECKPOINT and only a 'cpt' run does (use configs/runs/cpt.gin for CPT, "
                "pretrain.gin or scratch.gin for random init)")
        if self.data_shards is not None and (not isinstance(self.data_shards, int) or self.data_shards <= 0
                                             or self.batch_size % self.data_shards):
            raise TrainingError(f"train.data_shards must be a positive integer dividing batch_size="
                                f"{self.batch_size}, got {self.data_shards!r}")
        if not 0.0 <= float(self.replay_ratio) < 1.0:
            raise TrainingError(f"train.replay_ratio must be in [0, 1), got {self.replay_ratio!r}")


@dataclasses.dataclass
class PreparedRun:
    """What the training loop needs; built by `prepare_run`."""

    settings: TrainSettings
    config: ModelConfig
    model: Decoder
    optimizer: optax.GradientTransformation
    schedule: Callable[[int], Any]
    mesh: Any
    rules: Any
    batch_sharding: Any
    global_batch_shape: tuple[int, int]
    pipeline: LogicalShards
    task_names: list[str]
    eval_sets: dict[str, list[dict[str, jax.Array]]]
    run_dir: RunDir
    manager: checkpoints.TrainCheckpointManager
    state: trainer.TrainState
    counters: dict[str, Any]
    init_mode: str
    start_step: int
    flops_per_token: float


def global_batch(local: dict[str, np.ndarray], sharding, global_shape: tuple[int, int]) -> dict[str, jax.Array]:
    """The global batch from this host's rows, with the global shape stated (never inferred)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]), global_shape)
            for k in trainer.INPUT_KEYS}


def primary_decides(decide: Callable[[], Any]) -> Any:
    """Runs `decide` on process 0 only and returns its result on every process.

    A UserInputError raised there is raised on every process with the same message, so a
    refusal never leaves some hosts running.
    """
    outcome = None
    if distributed.is_primary():
        try:
            outcome = {"value": decide()}
        except UserInputError as e:
            outcome = {"error": str(e)}
    outcome = distributed.broadcast_json(outcome)
    if "error" in outcome:
        raise TrainingError(outcome["error"])
    return outcome["value"]


def _check_shared_storage(run_dir: RunDir) -> None:
    """With several processes, proves that every host sees the files process 0 writes."""
    if jax.process_count() == 1:
        return
    token = distributed.broadcast_json(uuid.uuid4().hex if distributed.is_primary() else None)
    if distributed.is_primary():
        run_dir.write_probe(token)
    distributed.sync("t5x_cpt.preflight.probe_written")
    seen = distributed.allgather_json(run_dir.sees_probe(token))
    distributed.sync("t5x_cpt.preflight.probe_read")
    if distributed.is_primary():
        run_dir.remove_probe(token)
    blind = [i for i, ok in enumerate(seen) if not ok]
    if blind:
        raise TrainingError(f"MODEL_DIR {run_dir} is not shared storage: processes {blind} do not see the file "
                            "process 0 wrote there. With several hosts MODEL_DIR must be one place all of them "
                            "reach (a gs:// bucket, or a shared file system), not each host's local disk")


def _check_same_data_everywhere(task_names: Sequence[str]) -> None:
    """Every host must have prepared the same corpora and vocabulary (compared by content)."""
    from t5x_cpt.data.fingerprint import data_fingerprint

    mine = data_fingerprint(list(task_names))
    everyone = distributed.allgather_json(mine)
    differing = [i for i, f in enumerate(everyone) if f != everyone[0]]
    if differing:
        raise TrainingError(f"processes {differing} see other data than process 0 (fingerprints "
                            f"{sorted(set(everyone))}): prepare the same corpora and vocabulary on every host")


def _architecture_differences(config: ModelConfig, directory: str) -> str:
    """'; '-joined differences between `config` and the model config stored in `directory` ('' if none)."""
    stored = checkpoints.read_model_config(directory)
    return "; ".join(config.architecture_differences(stored)) if stored is not None else ""


def _check_model_dir_holds_this_model(config: ModelConfig, model_dir: str) -> None:
    differences = _architecture_differences(config, model_dir)
    if differences:
        raise TrainingError(f"MODEL_DIR {model_dir} belongs to a different model: {differences}. "
                            "Use a new MODEL_DIR or the matching model gin file.")


def _check_source(config: ModelConfig, source: str) -> None:
    if not checkpoints.path_exists(source):
        raise TrainingError(f"source checkpoint {source} does not exist")
    differences = _architecture_differences(config, source)
    if differences:
        raise TrainingError(f"source checkpoint {source} has a different architecture: {differences}")


def _with_attention_chosen(config: ModelConfig, sequence_length: int) -> ModelConfig:
    """The config with its attention implementation fixed for this platform, and the choice logged."""
    from t5x_cpt import attention

    chosen = config.resolved_attention_impl
    how = "set by ModelConfig.attention_impl" if config.attention_impl else \
        f"the fastest for {jax.default_backend()} / {config.dtype}; override with ModelConfig.attention_impl"
    runs = attention.runs_as(chosen, sequence_length)
    if runs != chosen:
        how += f"; at sequence length {sequence_length}, not a multiple of its block, {runs} runs instead"
    log.info("attention: %s (%s)", chosen, how)
    return config.replace(attention_impl=chosen)


def _check_memory(config: ModelConfig, settings: TrainSettings, mesh) -> None:
    from t5x_cpt import memory

    estimate = memory.estimate_train_memory(config, global_batch=settings.batch_size,
                                            sequence_length=settings.sequence_length,
                                            accumulate_steps=settings.accumulate_steps,
                                            mesh_shape=dict(mesh.shape))
    log.info("memory estimate per device: %s", estimate.summary())
    memory.check_fits(estimate, jax.local_devices()[0])


def prepare_run(settings: TrainSettings) -> PreparedRun:
    """The checks and decisions before the first step (module docstring); every process calls it."""
    from t5x_cpt.data import pipeline as data_pipeline  # seqio/TF load here, not at import time
    from t5x_cpt.data import vocabularies
    from t5x_cpt.data.tfutil import seqio

    settings.check()
    config = _with_attention_chosen(ModelConfig(), settings.sequence_length)
    log.info("host malloc: %s", host_malloc.status)
    mesh = partitioning.make_mesh()
    rules = partitioning.logical_axis_rules()
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    global_shape = (settings.batch_size, settings.sequence_length)
    partitioning.check_global_batch(settings.batch_size, mesh, rules, jax.process_count())
    if settings.eval_tasks and settings.eval_batch_size:
        partitioning.check_global_batch(settings.eval_batch_size, mesh, rules, jax.process_count())
    data_shard = partitioning.batch_shard_of_process(batch_sharding, global_shape)
    _check_memory(config, settings, mesh)

    run_dir = RunDir(settings.model_dir)
    primary_decides(run_dir.prepare)
    _check_shared_storage(run_dir)
    primary_decides(lambda: _check_model_dir_holds_this_model(config, str(run_dir)))
    manager = checkpoints.TrainCheckpointManager(run_dir.checkpoints, keep=settings.keep_checkpoints,
                                                 async_save=settings.async_checkpoints)
    steps = manager.all_steps()  # process 0's listing, broadcast
    source = settings.source_checkpoint
    if source and not steps:  # checked before the (slow) data pipeline is built
        primary_decides(lambda: _check_source(config, source))

    vocab_size = vocabularies.vocab_size()
    if vocab_size > config.vocab_size:
        raise TrainingError(f"the data's vocabulary has {vocab_size} ids but ModelConfig.vocab_size is "
                            f"{config.vocab_size}: set ModelConfig.vocab_size >= {vocab_size}")
    num_shards = _logical_data_shards(settings, manager, steps, data_shard)
    pipeline = LogicalShards(
        lambda index, count: data_pipeline.make_train_pipeline(
            sequence_length=settings.sequence_length, batch_size=settings.batch_size, seed=settings.seed,
            shard_info=seqio().ShardInfo(index=index, num_shards=count)),
        num_shards, data_shard)
    task_names = list(pipeline.task_names)
    _check_same_data_everywhere(sorted(set(task_names) | set(settings.eval_tasks)))

    model = Decoder(config)
    schedule = learning_rate_schedule(settings.train_steps)
    optimizer = make_optimizer(schedule)
    counters = {"tokens": 0.0, "tokens_per_task": {t: 0.0 for t in task_names}, "flops": 0.0}
    with partitioning.activation_sharding(mesh, rules):
        abstract, shardings = trainer.state_shardings(model, optimizer, mesh, rules)
        restored = None
        if steps:
            placed = lambda tree, sh: jax.tree.map(  # noqa: E731
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
            restored = manager.restore_newest_readable(steps, placed(abstract, shardings.params),
                                                       placed(jax.eval_shape(optimizer.init, abstract),
                                                              shardings.opt_state))
        if restored is not None:
            step, params, opt_state, data_state, meta = restored
            init_mode = "resume"
            log.info("resuming from %s step %d (other init settings are ignored)", manager.directory, step)
            state = trainer.TrainState(step=jax.device_put(np.int32(step), shardings.step), params=params,
                                       opt_state=opt_state,
                                       first_nonfinite_step=jax.device_put(np.int32(-1), shardings.step))
            pipeline.set_state(data_state["shards"])
            counters = meta["counters"]
        elif source:
            init_mode = "source"
            params = checkpoints.load_params(source, abstract, shardings.params)
            log.info("initialised weights from %s (fresh optimizer, step 0)", source)
            state = trainer.init_state(params, optimizer, shardings)
        else:
            init_mode = "random"
            state = trainer.init_state(trainer.random_params(model, settings.seed, shardings.params), optimizer,
                                       shardings)
        eval_sets = {task: [global_batch(b, batch_sharding, (settings.eval_batch_size or settings.batch_size,
                                                             settings.sequence_length))
                            for b in data_pipeline.make_eval_batches(
                                task_name=task, sequence_length=settings.sequence_length,
                                batch_size=settings.eval_batch_size or settings.batch_size,
                                num_batches=settings.eval_batches,
                                shard_info=seqio().ShardInfo(index=data_shard[0], num_shards=data_shard[1]))]
                     for task in settings.eval_tasks}

    start_step = int(state.step)
    run = PreparedRun(settings=settings, config=config, model=model, optimizer=optimizer, schedule=schedule,
                      mesh=mesh, rules=rules, batch_sharding=batch_sharding, global_batch_shape=global_shape,
                      pipeline=pipeline, task_names=task_names, eval_sets=eval_sets,
                      run_dir=run_dir, manager=manager, state=state, counters=counters, init_mode=init_mode,
                      start_step=start_step,
                      flops_per_token=flops.train_flops_per_token(config, settings.sequence_length))
    if distributed.is_primary():
        _write_run_files(run)
    log.info("%s; %s; host data shard %d/%d reads logical shards %s of %d; init %s from step %d",
             distributed.process_summary(), partitioning.describe_mesh(mesh), data_shard[0], data_shard[1],
             pipeline.shard_indices, num_shards, init_mode, start_step)
    return run


def _logical_data_shards(settings: TrainSettings, manager, steps: list[int], host_shard: tuple[int, int]) -> int:
    """The run's number of logical data shards (t5x_cpt/data/logical_shards.py).

    A fresh run takes `train.data_shards`, else one per host data shard; a resumed run keeps the
    number its checkpoint holds, and is refused — before the model is restored — on a host
    count that does not divide it.
    """
    hosts = host_shard[1]
    if not steps:
        count = settings.data_shards or hosts
    else:
        saved = None
        for step in reversed(steps):  # the newest step whose data item reads; all of a run's agree
            try:
                saved = manager.read_data_state(step)
                break
            except Exception:  # noqa: BLE001  an unreadable step is reported by the full restore
                continue
        if saved is None or not isinstance(saved.get("shards"), list):
            raise TrainingError(f"the checkpoints in {manager.directory} hold no readable data position "
                                "(written by an older version?); start a new MODEL_DIR with SOURCE_CHECKPOINT")
        count = len(saved["shards"])
        if settings.data_shards is not None and settings.data_shards != count:
            raise TrainingError(f"train.data_shards={settings.data_shards} but the run in {manager.directory} "
                                f"was started with {count} data shard(s); a run keeps its data sharding")
    if count % hosts or settings.batch_size % count:
        raise TrainingError(
            f"the run's data is {count} logical shard(s) but this mesh reads the batch on {hosts} host data "
            f"shard(s) (batch_size {settings.batch_size}): the host data shards must divide the logical ones, "
            f"and the logical ones the batch. {'Resume with a host count that divides ' + str(count) if steps else 'Set train.data_shards to a multiple of ' + str(hosts)}")
    return count


def _write_run_files(run: PreparedRun) -> None:
    """model_config.json, run_info.json (kept from the first start on resume) and config.gin."""
    import gin

    settings, counts = run.settings, flops.param_counts(run.config)
    checkpoints.write_model_config(str(run.run_dir), run.config)
    if run.init_mode != "resume" or run.run_dir.read_run_info() is None:
        run.run_dir.write_run_info({
            "run": run.run_dir.root.name, "run_kind": settings.run_kind, "language": settings.language,
            "replay_ratio": settings.replay_ratio, "init_mode": run.init_mode,
            "source_checkpoint": os.fspath(as_path(settings.source_checkpoint))
            if settings.source_checkpoint else None,
            "params": counts["params"], "non_embedding_params": counts["non_embedding_params"],
            "train_flops_per_token": run.flops_per_token, "sequence_length": settings.sequence_length,
            "batch_size": settings.batch_size, "train_steps": settings.train_steps, "tasks": run.task_names,
            "mesh": dict(run.mesh.shape), "process_count": jax.process_count()})
    run.run_dir.write_config_gin(gin.operative_config_str())
