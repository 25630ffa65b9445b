"""Each planned run's full gin config, built without training: steps, size, FLOPs and identity.

`configure(run, spec)` parses the run's gin files and bindings exactly as the trainer will (with
`t5x_cpt.gin_cli`), so every typo, unknown configurable or unset REQUIRED value of any run is
found before the first run starts. It parses twice: once to learn the model's size and the batch
shape, to turn the budget into TRAIN_STEPS (and the size rule into BATCH_SIZE), then with the
final bindings, finalized.

A run's *identity* is what decides what the run learns (docs/study.md, "Same configuration"): every
gin parameter of the config, with defaults filled in, except those that only say where or how it
runs — paths (MODEL_DIR, data and TFDS directories), logging, evaluation and checkpoint periods,
evaluation sets, the mesh and sharding rules, gradient accumulation, and the model's compute dtype,
rematerialisation, layer scanning and attention kernel. The source checkpoint is compared by
its last path component (the source run's name), so a sweep directory can be moved or copied to a
bucket. `stored_identity(model_dir)` reads the same from a run's `config.gin`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
from typing import Any, Mapping

import gin

from t5x_cpt import flops, gin_cli
from t5x_cpt.errors import UserInputError, one_line
from t5x_cpt.sweep.plan import PlannedRun, binding, train_argv
from t5x_cpt.sweep.spec import SweepError, SweepSpec

# (configurable, parameter); "*" = every parameter of that configurable. Not part of a run's identity.
NOT_IDENTITY = {
    ("train", "model_dir"), ("train", "log_period"), ("train", "eval_period"), ("train", "checkpoint_period"),
    ("train", "keep_checkpoints"), ("train", "async_checkpoints"), ("train", "eval_tasks"),
    ("train", "eval_batches"), ("train", "eval_batch_size"), ("train", "accumulate_steps"),
    ("train", "data_shards"), ("train", "source_checkpoint"),
    ("ModelConfig", "dtype"), ("ModelConfig", "param_dtype"), ("ModelConfig", "remat"),
    ("ModelConfig", "scan_layers"), ("ModelConfig", "attention_impl"),
    ("make_train_pipeline", "shard_info"), ("make_train_pipeline", "log_every"), ("make_train_pipeline", "data_dir"),
    # The trainer passes train's values for these explicitly, so config.gin never records them (train.* is compared).
    ("make_train_pipeline", "sequence_length"), ("make_train_pipeline", "batch_size"), ("make_train_pipeline", "seed"),
    ("get_vocabulary", "data_dir"), ("make_eval_batches", "*"), ("resolve_data_dir", "*"), ("tfds_data_dir", "*"),
    ("make_mesh", "*"), ("logical_axis_rules", "*"),
}
LADDER_FILE = re.compile(r"(^|/)ladder_(\d+)m\.gin$")
LADDER_TOLERANCE = 0.01
_CONFIGURED = re.compile(r"^# Parameters for (\S+):$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class ConfiguredRun:
    """A planned run with its final bindings and the numbers its config implies."""

    run: PlannedRun
    bindings: tuple[str, ...]
    params: int
    train_steps: int
    batch_size: int
    sequence_length: int
    flops_per_token: float
    identity: Mapping[str, Any]
    model_config: Any  # the run's t5x_cpt.model.ModelConfig
    listed_params: int | None = None  # the ladder's N for ladder sizes (16 L d^2 + 32000 d)

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def model_dir(self) -> str:
        return self.run.model_dir

    @property
    def tokens(self) -> int:
        """Training tokens of the whole run (all languages; padding included)."""
        return self.train_steps * self.batch_size * self.sequence_length

    @property
    def train_flops(self) -> float:
        """Training FLOPs of the whole run (t5x_cpt.flops: 6N + attention, per token)."""
        return self.tokens * self.flops_per_token

    def argv(self) -> list[str]:
        """Arguments of `python -m t5x_cpt.train` for this run."""
        return train_argv(self.run.files, self.bindings)


def register_configurables() -> None:
    """Imports what the trainer imports before parsing, so run files parse here as they do there."""
    from t5x_cpt import partitioning, train  # noqa: F401
    from t5x_cpt.data import pipeline  # noqa: F401


def _parse(run: PlannedRun, bindings: list[str], finalize: bool) -> None:
    gin.clear_config()
    try:
        gin_cli.parse(run.files, bindings, finalize=finalize)
    except gin_cli.GinConfigError as e:
        raise SweepError(f"run {run.name}: {e}") from None


def _train_value(name: str) -> Any:
    bound = gin.get_bindings("train")
    return bound[name] if name in bound else _default("train", name)


def _default(selector: str, param: str) -> Any:
    signature = inspect.signature(gin.get_configurable(selector))
    default = signature.parameters[param].default
    return None if default is inspect.Parameter.empty else default


def configure(run: PlannedRun, spec: SweepSpec) -> ConfiguredRun:
    """The run's final bindings and numbers (module docstring); bad config raises SweepError naming the run."""
    try:
        return _configure(run, spec)
    except SweepError:
        raise
    except UserInputError as e:  # e.g. a ModelConfig binding no model can be built with
        raise SweepError(f"run {run.name}: {one_line(e)}") from None
    finally:
        gin.clear_config()


def _configure(run: PlannedRun, spec: SweepSpec) -> ConfiguredRun:
    from t5x_cpt.model import ModelConfig

    probe = [*run.bindings, binding("TRAIN_STEPS", 1)]
    _parse(run, probe, finalize=False)
    params = flops.param_counts(ModelConfig())["params"]
    batch_size = spec.batch_size_for(params) or int(_train_value("batch_size"))
    sequence_length = int(_train_value("sequence_length"))
    steps = run.budget.train_steps(params, batch_size, sequence_length)
    extra = [binding("TRAIN_STEPS", steps)]
    if spec.batch_size_by_params:
        extra.append(binding("BATCH_SIZE", batch_size))
    log_period = int(_train_value("log_period"))
    if spec.eval_points:
        # A multiple of LOG_PERIOD: the trainer brings its token counters up to date at log steps only,
        # so an evaluation between two log steps would be recorded with the tokens of the previous one.
        period = max(1, math.ceil(steps / spec.eval_points))
        extra.append(binding("EVAL_PERIOD", math.ceil(period / log_period) * log_period))
    if run.replay is not None and run.replay.points:
        extra.append(binding("replay_mixture.schedule", run.replay.schedule_steps(steps)))
    bindings = [*run.bindings, *extra]
    _parse(run, bindings, finalize=True)
    config = ModelConfig()
    eval_period = int(_train_value("eval_period"))
    if eval_period % log_period and eval_period < steps:
        raise SweepError(f"run {run.name}: EVAL_PERIOD={eval_period} is not a multiple of LOG_PERIOD={log_period}; the "
                         "trainer updates its token counters at log steps, so evaluations between them would be "
                         "recorded with stale token counts (D in the run table). Make EVAL_PERIOD a multiple of "
                         "LOG_PERIOD, or set Sweep.eval_points")
    final_batch = int(_train_value("batch_size"))
    if final_batch != batch_size or int(_train_value("train_steps")) != steps:
        raise SweepError(f"run {run.name}: a gin file overrides BATCH_SIZE or TRAIN_STEPS after the sweep set them")
    configured = ConfiguredRun(
        run=run, bindings=tuple(bindings), params=flops.param_counts(config)["params"], train_steps=steps,
        batch_size=batch_size, sequence_length=sequence_length,
        flops_per_token=flops.train_flops_per_token(config, sequence_length), identity=current_identity(),
        model_config=config, listed_params=_listed_ladder_params(run) if spec.check_ladder else None)
    gin.clear_config()
    if configured.listed_params is not None:
        _check_ladder(configured)
    return configured


def _listed_ladder_params(run: PlannedRun) -> int | None:
    """The paper's N for a ladder model file: 16 L d^2 + 32000 d (arXiv 2407.02118, model table)."""
    from t5x_cpt.model import ModelConfig

    if not LADDER_FILE.search(run.size.model_file.replace(os.sep, "/")):
        return None
    gin.clear_config()
    gin_cli.parse([run.files[0]], [], finalize=False)
    shape = ModelConfig()
    gin.clear_config()
    return 16 * shape.num_layers * shape.d_model ** 2 + 32000 * shape.d_model


def _check_ladder(configured: ConfiguredRun) -> None:
    listed, actual = configured.listed_params, configured.params
    if abs(actual - listed) > LADDER_TOLERANCE * listed:
        raise SweepError(
            f"run {configured.name}: its model has N = {actual:,} parameters but the ladder row "
            f"{configured.run.size.model_file} lists {listed:,} (16 L d^2 + 32000 d), off by "
            f"{100 * (actual / listed - 1):+.1f}% (more than {100 * LADDER_TOLERANCE:g}%): a binding of the sweep "
            "changes the ladder's model (vocabulary size, untied embeddings, d_ff?). Use a model file of its own, "
            "or set Sweep.check_ladder = False")


# ---- identity ---------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """Tuples as lists, recursively, so a value reads the same from a file and from a binding."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def current_identity() -> dict[str, Any]:
    """The identity (module docstring) of the config now parsed in gin, as {'selector.param': value}."""
    from t5x_cpt.model import ModelConfig

    identity: dict[str, Any] = {}
    for selector in sorted(set(_CONFIGURED.findall(gin.config_str()))):
        short = selector.rsplit(".", 1)[-1]
        if (short, "*") in NOT_IDENTITY:
            continue
        try:
            bound = gin.get_bindings(selector)
        except Exception:  # noqa: BLE001  a stored config may name configurables this version lacks
            continue
        for param, value in bound.items():
            if (short, param) not in NOT_IDENTITY and short != "ModelConfig":
                identity[f"{short}.{param}"] = _plain(value)
    for param, value in _with_defaults("train").items():
        if ("train", param) not in NOT_IDENTITY:
            identity[f"train.{param}"] = _plain(value)
    source = gin.get_bindings("train").get("source_checkpoint")
    identity["train.source_checkpoint (name)"] = os.path.basename(str(source).rstrip("/")) if source else None
    config = ModelConfig()
    for field in (*ModelConfig.ARCHITECTURE_FIELDS, "init_std"):
        value = getattr(config, f"resolved_{field}") if hasattr(config, f"resolved_{field}") else getattr(config, field)
        identity[f"ModelConfig.{field}"] = value
    return identity


def _with_defaults(selector: str) -> dict[str, Any]:
    signature = inspect.signature(gin.get_configurable(selector))
    values = {p.name: p.default for p in signature.parameters.values() if p.default is not inspect.Parameter.empty}
    values.update(gin.get_bindings(selector))
    return values


def stored_identity(model_dir: str) -> dict[str, Any] | None:
    """The identity of the run recorded in MODEL_DIR/config.gin, or None when there is no config.gin."""
    from t5x_cpt import run_dir

    path = run_dir.as_path(model_dir) / run_dir.CONFIG_GIN
    if not path.exists():
        return None
    text = path.read_text()
    gin.clear_config()
    try:
        with gin.unlock_config():
            gin.parse_config(text, skip_unknown=True)
        return current_identity()
    except Exception as e:  # noqa: BLE001  a damaged or foreign file: say so rather than guess
        raise SweepError(f"{path} cannot be read as a gin config ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "this directory does not hold a run of this sweep: use another --output_dir") from e
    finally:
        gin.clear_config()


def identity_differences(stored: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """'name: stored X, planned Y' for every identity entry on which two configs differ.

    An entry one side lacks (a parameter left at its default there) takes the configurable's default.
    """
    out = []
    for key in sorted(set(stored) | set(planned)):
        old, new = stored.get(key, _MISSING), planned.get(key, _MISSING)
        if old is _MISSING or new is _MISSING:
            default = _default_of(key)
            old, new = (default if old is _MISSING else old), (default if new is _MISSING else new)
        if old is not _MISSING and new is not _MISSING and _plain(old) != _plain(new):
            out.append(f"{key}: stored {old!r}, planned {new!r}")
    return out


_MISSING = object()


def _default_of(key: str) -> Any:
    selector, _, param = key.partition(".")
    try:
        parameter = inspect.signature(gin.get_configurable(selector)).parameters[param]
    except (ValueError, KeyError, TypeError):  # a configurable or parameter this version lacks
        return _MISSING
    return _MISSING if parameter.default is inspect.Parameter.empty else parameter.default
