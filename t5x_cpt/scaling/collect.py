"""Build a run table from training MODEL_DIRs.

Each MODEL_DIR (a local path or gs://...) holds what the trainer writes (t5x_cpt/run_dir.py, which
also reads it here):
  run_info.json   {"params": N, "non_embedding_params": ..., "run_kind": "scratch"|"cpt"|"source",
                   "language": ..., "replay_ratio": ..., "run": name, ...}
  metrics.jsonl   one JSON object per line: step, tokens, flops, train/loss and, on eval steps,
                  eval/<task>/loss (optionally tokens/<task>: tokens seen per task)

One row per metrics line that carries the chosen loss key and has seen tokens (> 0):
  N = run_info[params_key]; D = target-language tokens: the sum of the trainer's realised per-task
  counters `tokens/<task>` over tasks of the run's language (task names are <corpus>_<lang>),
  else tokens * (1 - replay_ratio); loss = that loss;
  flops = the line's `flops` (cumulative training FLOPs, all languages); loss0 = the same key's
  value at tokens == 0 (the step-0 eval of the loaded weights), when present.

Required fields: run_info `run_kind` (runs of older versions wrote it as `family`) and the params key; every metrics line used needs `tokens`.
Optional: `run` (defaults to the directory name), `language` (defaults to ""), `replay_ratio`
(defaults to 0; a CPT run without it is reported on stderr).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from typing import Sequence

import numpy as np

from t5x_cpt import run_dir
from t5x_cpt.scaling.tables import ScalingInputError, Table, from_rows

log = logging.getLogger(__name__)

EVAL_LOSS = re.compile(r"^eval/(.+)/loss$")


def expand_model_dirs(spec: str | Sequence[str]) -> list[str]:
    """Directories from a comma list of paths and/or globs (local or gs://...); each pattern must
    match something."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    if not parts:
        raise ScalingInputError("--model_dirs is empty")
    out: list[str] = []
    for p in parts:
        hits = sorted(h for h in _glob(p) if run_dir.as_path(h).is_dir())
        if not hits:
            raise ScalingInputError(f"--model_dirs: {p!r} matches no directory")
        out.extend(h for h in hits if h not in out)
    return out


def _glob(pattern: str) -> list[str]:
    if run_dir.is_local(pattern):
        return glob.glob(pattern)
    # An URL: glob below the last component without a wildcard (epath globs gs:// too).
    parts = pattern.split("/")
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    if fixed == len(parts):
        return [pattern] if run_dir.as_path(pattern).exists() else []
    base = run_dir.as_path("/".join(parts[:fixed]))
    return [str(p) for p in base.glob("/".join(parts[fixed:]))] if base.exists() else []


def read_json_object(path: str, what: str | None = None) -> dict:
    """A JSON object from `path`; missing, unparsable or non-object files raise ScalingInputError
    naming `what` (e.g. the flag it came from) and the path."""
    label = f"{what}: {path!r}" if what else path
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ScalingInputError(f"{label} does not exist") from None
    except json.JSONDecodeError as e:
        raise ScalingInputError(f"{label} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ScalingInputError(f"{label} must hold a JSON object")
    return data


def read_metrics(model_dir: str) -> list[dict]:
    """The records of MODEL_DIR/metrics.jsonl (t5x_cpt.run_dir's reader); none at all is an error."""
    try:
        rows = run_dir.read_metrics(model_dir)
    except run_dir.RunDirError as e:
        raise ScalingInputError(str(e)) from None
    if not rows:
        raise ScalingInputError(f"{model_dir}: no metrics records in {run_dir.METRICS} (the trainer writes them "
                                "into MODEL_DIR)")
    return rows


def task_language_is(task: str, language: str) -> bool:
    """True when the task's language (its last `_` component) is `language`."""
    return task.rpartition("_")[2] == language


def task_mentions(task: str, language: str) -> bool:
    """True when any alphanumeric component of the task name is `language`."""
    return language in re.split(r"[^A-Za-z0-9]+", task)


def target_tokens(m: dict, language: str) -> float | None:
    """Tokens of the target language from the trainer's per-task counters tokens/<task>
    (realised after packing), or None when the line has no counter for that language."""
    if not language:
        return None
    vals = [float(v) for k, v in m.items() if k.startswith("tokens/") and v is not None
            and task_language_is(k[len("tokens/"):], language)]
    return sum(vals) if vals else None


def choose_loss_key(metrics: list[dict], language: str | None, loss_key: str | None, where: str) -> str:
    """The explicit key, else the first eval/<task>/loss key whose task is in `language`."""
    keys: list[str] = []
    for m in metrics:
        for k in m:
            if EVAL_LOSS.match(k) and k not in keys:
                keys.append(k)
    if loss_key:
        if not any(loss_key in m for m in metrics):
            raise ScalingInputError(f"{where}: no metrics line has {loss_key!r} (eval loss keys "
                                    f"present: {keys})")
        return loss_key
    if language:
        # Task names are <corpus>_<lang> (t5x_cpt.data.tasks): match the last component first,
        # so a language code that is also a corpus word (lo_help_zh vs "lo") is not mistaken.
        for match in (task_language_is, task_mentions):
            for k in keys:
                if match(EVAL_LOSS.match(k).group(1), language):
                    return k
        raise ScalingInputError(f"{where}: no eval loss key for language {language!r} (present: "
                                f"{keys}); pass --loss_key")
    if len(keys) == 1:
        return keys[0]
    raise ScalingInputError(f"{where}: {len(keys)} eval loss keys {keys}; pass --loss_key or --language")


def collect_dir(model_dir: str, *, language: str | None = None, loss_key: str | None = None,
                params_key: str = "params") -> list[dict]:
    """Table rows of one MODEL_DIR (module docstring)."""
    where = f"{model_dir}/{run_dir.RUN_INFO}"
    try:
        info = run_dir.read_run_info(model_dir)
    except run_dir.RunDirError as e:
        raise ScalingInputError(str(e)) from None
    if info is None:
        raise ScalingInputError(f"{where} does not exist (the trainer writes it into MODEL_DIR)")
    if "run_kind" not in info and "family" in info:  # written by versions before the rename
        info["run_kind"] = info["family"]
    for field in (params_key, "run_kind"):
        if field not in info or info[field] in (None, ""):
            raise ScalingInputError(f"{where}: required field {field!r} is missing "
                                    f"(fields present: {sorted(info)})")
    run_kind = str(info["run_kind"])
    if run_kind not in run_dir.RUN_KINDS:
        raise ScalingInputError(f"{where}: run_kind {run_kind!r} is not one of {list(run_dir.RUN_KINDS)}")
    try:
        n = float(info[params_key])
    except (TypeError, ValueError):
        raise ScalingInputError(f"{where}: {params_key}={info[params_key]!r} is not a number") from None
    if not n > 0:
        raise ScalingInputError(f"{where}: {params_key} must be positive, got {n:g}")
    run = str(info.get("run") or os.path.basename(os.path.normpath(model_dir)))
    run_language = str(info.get("language") or "")
    if "replay_ratio" in info and info["replay_ratio"] is not None:
        replay = float(info["replay_ratio"])
    else:
        replay = 0.0
        if run_kind == "cpt":
            log.warning("%s: no replay_ratio; taking 0", where)
    metrics = read_metrics(model_dir)
    key = choose_loss_key(metrics, language, loss_key, model_dir)
    rows, loss0 = [], math.nan
    for lineno, m in enumerate(metrics, 1):
        if key not in m or m[key] is None:
            continue
        if "tokens" not in m:
            raise ScalingInputError(f"{model_dir}/metrics.jsonl line {lineno}: has {key} but no "
                                    f"'tokens'")
        tokens = float(m["tokens"])
        if tokens <= 0:
            loss0 = float(m[key])
            continue
        realised = target_tokens(m, run_language)
        d = realised if realised is not None else tokens * (1.0 - replay)
        if d <= 0:
            continue
        rows.append({"N": n, "D": d, "loss": float(m[key]), "run_kind": run_kind, "run": run,
                     "language": run_language, "replay_ratio": replay,
                     "flops": float(m["flops"]) if m.get("flops") is not None else math.nan,
                     "loss_key": key, "step": float(m.get("step", math.nan)), "tokens": tokens})
    if not rows:
        raise ScalingInputError(f"{model_dir}: no evaluated points with {key!r} after step 0")
    for r in rows:
        r["loss0"] = loss0
    return rows


def collect(model_dirs: str | Sequence[str], *, language: str | None = None,
            loss_key: str | None = None, params_key: str = "params") -> Table:
    """A validated Table from many MODEL_DIRs (glob or comma list)."""
    rows: list[dict] = []
    for d in expand_model_dirs(model_dirs):
        rows.extend(collect_dir(d, language=language, loss_key=loss_key, params_key=params_key))
    table = from_rows(rows, source="collect")
    if not np.any(np.isfinite(table["loss0"])):
        del table.columns["loss0"]
    if not np.any(np.isfinite(table["flops"])):
        del table.columns["flops"]
    return table
