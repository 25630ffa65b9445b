"""MODEL_DIR: the one owner of a run directory's file names, record formats and I/O.

A run directory may be a local path or any `etils.epath` URL (`gs://bucket/runs/name`); every
file in it is read and written here, through epath, and never appended to (object stores have
no append). Layout:

    MODEL_DIR/
      config.gin          the operative gin config (written once training starts)
      model_config.json   the ModelConfig (t5x_cpt.checkpoints reads/writes it: imported models have it too)
      run_info.json       what the run is: run_kind, language, replay ratio, sizes, init mode, mesh
      metrics.jsonl       one JSON record per line, each with `step`; rewritten whole, atomically
      events/             TensorBoard events
      checkpoints/<step>/ orbax checkpoints (t5x_cpt.checkpoints)

Only process 0 writes; every host may read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from typing import Any, Mapping

from t5x_cpt.errors import UserInputError

log = logging.getLogger(__name__)

CONFIG_GIN = "config.gin"
RUN_INFO = "run_info.json"
METRICS = "metrics.jsonl"
EVENTS = "events"
CHECKPOINTS = "checkpoints"
_PROBE_PREFIX = ".t5x_cpt_probe-"
# run_info.json's `run_kind`: what the run is, set by its run file (configs/runs/*.gin) and read
# by the scaling tools. 'source': a source-language model from random weights; 'scratch': a
# target-language model from random weights; 'cpt': continued from a source model.
RUN_KINDS = ("source", "scratch", "cpt")


class RunDirError(UserInputError):
    """A run directory cannot be used or read: the message names the path and the cause."""


def as_path(path):
    """An epath.Path for a local path (made absolute) or a URL such as gs://bucket/dir."""
    from etils import epath  # orbax's path layer: local files and gs:// alike

    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def is_local(path) -> bool:
    return "://" not in os.fspath(path)


def write_atomically(path, text: str) -> None:
    """Writes a whole file so that readers see the old content or the new, never a part.

    A local file is written beside its target and renamed over it; an object store writes an
    object in one request, so the same write-then-rename keeps one code path for both.
    """
    target = as_path(path)
    temporary = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    temporary.write_text(text)
    temporary.replace(target)


def _bucket_root(path: str) -> str | None:
    """'gs://bucket' for 'gs://bucket/a/b' (any scheme://bucket/...); None for a local path."""
    if is_local(path):
        return None
    scheme, _, rest = path.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, model_dir):
        self.root = as_path(model_dir)

    def __str__(self) -> str:
        return os.fspath(self.root)

    @property
    def checkpoints(self):
        return self.root / CHECKPOINTS

    @property
    def events(self):
        return self.root / EVENTS

    @property
    def metrics_path(self):
        return self.root / METRICS

    # -- creation -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Creates the directory and proves it writable, or raises RunDirError naming the cause.

        Catches the mistakes a user makes: a path that is a file, a bucket that does not exist
        or that this machine's credentials cannot write.
        """
        try:
            bucket = _bucket_root(os.fspath(self.root))
            # TensorFlow's gs:// makedirs climbs to the bucket and retries forever when it is missing.
            if bucket is not None and not as_path(bucket).exists():
                raise RunDirError(f"MODEL_DIR {self}: bucket {bucket} does not exist (or these credentials cannot "
                                  "see it); create it or fix the path")
            if self.root.exists() and not self.root.is_dir():
                raise RunDirError(f"MODEL_DIR {self} is an existing file, not a directory; choose another path")
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_PROBE_PREFIX}{uuid.uuid4().hex}"
            probe.write_text("t5x_cpt")
            probe.unlink()
        except RunDirError:
            raise
        except Exception as e:  # epath backends raise OSError, gcsfs/tf errors, google.api_core errors
            raise RunDirError(f"MODEL_DIR {self} cannot be created or written ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); check the path, that the bucket "
                              "exists and that this machine may write to it") from e

    def write_probe(self, token: str) -> None:
        """A marker file other hosts look for to prove they see the same storage."""
        (self.root / f"{_PROBE_PREFIX}{token}").write_text(token)

    def sees_probe(self, token: str) -> bool:
        return (self.root / f"{_PROBE_PREFIX}{token}").exists()

    def remove_probe(self, token: str) -> None:
        path = self.root / f"{_PROBE_PREFIX}{token}"
        if path.exists():
            path.unlink()

    # -- small files ----------------------------------------------------------------------------

    def read_run_info(self) -> dict[str, Any] | None:
        """run_info.json as a dict, or None when the run has not written it yet."""
        return _read_json_object(self.root / RUN_INFO)

    def write_run_info(self, info: Mapping[str, Any]) -> None:
        write_atomically(self.root / RUN_INFO, json.dumps(dict(info), indent=2) + "\n")

    def write_config_gin(self, text: str) -> None:
        write_atomically(self.root / CONFIG_GIN, text)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.root)


def _read_json_object(path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} must hold a JSON object")
    return data


def read_run_info(model_dir) -> dict[str, Any] | None:
    """MODEL_DIR/run_info.json as a dict, or None when there is none."""
    return RunDir(model_dir).read_run_info()


def read_metrics(model_dir) -> list[dict[str, Any]]:
    """The records of MODEL_DIR/metrics.jsonl in order ([] when there is no file yet).

    The file is written atomically, so a damaged line is real damage and raises RunDirError
    naming the line — except a last line cut short, which a run of an older version killed
    mid-append could leave: it is skipped with a warning.
    """
    path = as_path(model_dir) / METRICS
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                log.warning("%s: skipping a cut-off last line (%s)", path, e)
                continue
            raise RunDirError(f"{path}:{number}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or "step" not in record:
            raise RunDirError(f"{path}:{number}: expected a JSON object with a 'step'")
        records.append(record)
    return records


def eval_curve(model_dir, task: str) -> list[tuple[float, float]]:
    """(training FLOPs, eval loss on `task`) at each evaluation of a run, step 0 included."""
    key = f"eval/{task}/loss"
    return [(float(r["flops"]), float(r[key])) for r in read_metrics(model_dir)
            if r.get(key) is not None and "flops" in r]


class MetricsLog:
    """metrics.jsonl and TensorBoard events of a run, written by process 0.

    Records are kept in memory and the whole file is rewritten atomically on `flush` — at every
    checkpoint and eval, at the end, and otherwise at most every `flush_interval_s` (0 on local
    disks; 30 s on object stores, which limit how often one object may be rewritten). A resumed
    run first drops what a killed run logged after the checkpoint it resumes from.
    """

    def __init__(self, run_dir: RunDir, enabled: bool = True, flush_interval_s: float | None = None):
        self._run_dir = run_dir
        self.enabled = enabled
        self._interval = (0.0 if is_local(run_dir.root) else 30.0) if flush_interval_s is None else flush_interval_s
        self._records: list[dict[str, Any]] = []
        self._dirty = False
        self._last_flush = 0.0
        self._events = None

    def open(self, resume_step: int) -> None:
        """Loads existing records, keeping those at or before `resume_step` (-1: none)."""
        if not self.enabled:
            return
        existing = read_metrics(self._run_dir.root)
        self._records = [r for r in existing if r.get("step", 0) <= resume_step]
        if len(self._records) != len(existing):
            log.info("metrics: dropped %d records logged after step %d by an interrupted run",
                     len(existing) - len(self._records), resume_step)
            self._dirty = True
            self.flush()
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._events = EventFileWriter(os.fspath(self._run_dir.events), flush_secs=max(self._interval, 5.0))

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = dict(record)
        self._records.append(record)
        self._dirty = True
        if self._events is not None:
            self._events.add_event(_event(record))
        if time.time() - self._last_flush >= self._interval:
            self.flush()

    def flush(self) -> None:
        """Makes everything written so far durable (a whole-file atomic rewrite)."""
        if not self.enabled:
            return
        if self._dirty:
            write_atomically(self._run_dir.metrics_path, "".join(json.dumps(r) + "\n" for r in self._records))
            self._dirty = False
        if self._events is not None:
            self._events.flush()
        self._last_flush = time.time()

    def close(self) -> None:
        self.flush()
        if self._events is not None:
            self._events.close()
            self._events = None


def _event(record: Mapping[str, Any]):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
              if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))]
    return event_pb2.Event(wall_time=time.time(), step=int(record["step"]), summary=summary_pb2.Summary(value=values))

