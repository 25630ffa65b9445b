"""Where a run's numbers go: MODEL_DIR/metrics.jsonl, TensorBoard events, and a console progress line.

Only process 0 writes (multi-host runs would otherwise write every record once per host).
Every record carries `step`, so a resumed run can drop what a killed run logged after its
last checkpoint (`truncate_after`) and the file stays one consistent history.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"


def read_records(model_dir: str) -> list[dict[str, Any]]:
    """All records of MODEL_DIR/metrics.jsonl (an empty list if there are none yet)."""
    path = os.path.join(model_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    logging.warning("%s: skipping a damaged line (a run killed mid-write)", path)
    return records


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard; prints progress lines."""

    def __init__(self, model_dir: str, total_steps: int, enabled: bool = True):
        self.model_dir = model_dir
        self.total_steps = total_steps
        self.enabled = enabled
        self._events = None
        self._start_time = time.time()
        self._start_step: int | None = None
        if enabled:
            os.makedirs(model_dir, exist_ok=True)
            try:
                from tensorboard.summary.writer.event_file_writer import EventFileWriter
                self._events = EventFileWriter(os.path.join(model_dir, "events"))
            except ImportError:  # TensorBoard is a dependency; keep training if it is broken
                logging.warning("tensorboard is not importable: metrics go to metrics.jsonl only")

    def truncate_after(self, step: int) -> None:
        """Drops records with a step beyond `step` (what a killed run logged after its checkpoint)."""
        if not self.enabled:
            return
        records = read_records(self.model_dir)
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records):
            path = os.path.join(self.model_dir, METRICS_FILE)
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(path + ".tmp", path)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.model_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(dict(record)) + "\n")
        if self._events is not None:
            self._write_events(record)

    def _write_events(self, record: Mapping[str, Any]) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
                  if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))]
        event = event_pb2.Event(wall_time=time.time(), step=int(record["step"]),
                                summary=summary_pb2.Summary(value=values))
        self._events.add_event(event)
        self._events.flush()

    def progress(self, step: int, loss: float, tokens_per_second: float, mfu: float | None) -> None:
        """One console line: step, loss, throughput, MFU and an ETA from the rate since start."""
        if not self.enabled:
            return
        if self._start_step is None:
            self._start_step, self._start_time = step, time.time()
            eta = "?"
        else:
            rate = (step - self._start_step) / max(time.time() - self._start_time, 1e-9)
            eta = _format_seconds((self.total_steps - step) / rate) if rate > 0 else "?"
        mfu_text = f" | mfu {100 * mfu:.2f}%" if mfu is not None else ""
        logging.info("step %d/%d | loss %.4f | %s tok/s%s | eta %s", step, self.total_steps, loss,
                     _format_count(tokens_per_second), mfu_text, eta)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def _format_count(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
