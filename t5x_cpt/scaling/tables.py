"""Run tables: the CSV files every scaling command reads, and their validation.

A table has one row per (run, evaluation point) and at least the columns

    N      model size, parameters (the project's convention: every parameter, t5x_cpt.flops)
    D      target-language training tokens seen at that point (CPT: target tokens only)
    loss   the evaluated loss, mean nats/token

and optionally `run_kind` (scratch | cpt | source: how the run started, and on what), `run` (a
run's name: the unit of bootstrap resampling), `language` (the run's target language),
`replay_ratio` (fraction of source-language tokens), `flops` (training FLOPs logged by the
trainer, all languages), `loss0` (the run's loss on this loss key at step 0), `loss_key`, `step`,
`tokens`. Other columns are kept and ignored.

Bad input is refused with one `ScalingInputError` naming the cause (missing columns, NaN or
non-numeric cells, non-positive N/D/loss, a `family` column: the name `run_kind` had before it
was renamed), never patched silently.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from t5x_cpt.errors import UserInputError
from t5x_cpt.flops import scaling_compute
from t5x_cpt.run_dir import RUN_KINDS

REQUIRED = ("N", "D", "loss")
NUMERIC = ("N", "D", "loss", "replay_ratio", "flops", "loss0", "step", "tokens")
# Column order `write_table` uses for the known columns.
ORDER = ("N", "D", "loss", "run_kind", "run", "language", "replay_ratio", "flops", "loss0",
         "loss_key", "step", "tokens")


class ScalingInputError(UserInputError):
    """Input the scaling tools cannot use; the message names the cause."""


@dataclasses.dataclass
class Table:
    """Columns of a run table: float arrays for numeric columns, str arrays for text."""
    columns: dict[str, np.ndarray]
    source: str = "<memory>"

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def has(self, name: str) -> bool:
        return name in self.columns

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.columns:
            raise ScalingInputError(f"{self.source}: no column {name!r} (columns: {sorted(self.columns)})")
        return self.columns[name]

    def select(self, mask) -> "Table":
        mask = np.asarray(mask)
        return Table({k: v[mask] for k, v in self.columns.items()}, self.source)

    def filter(self, run_kind: str | None = None, language: str | None = None) -> "Table":
        """Rows of one run kind and/or language; refuses when the column needed is absent."""
        t = self
        for column, value in (("run_kind", run_kind), ("language", language)):
            if value is None:
                continue
            if not t.has(column):
                raise ScalingInputError(f"{self.source}: --{column}={value} given but the table has "
                                        f"no {column!r} column")
            t = t.select(t[column] == value)
            if len(t) == 0:
                present = sorted(set(self[column]))
                raise ScalingInputError(f"{self.source}: no rows with {column} {value!r} "
                                        f"(present: {present})")
        return t

    def run_kinds(self) -> list[str]:
        return sorted(set(self["run_kind"])) if self.has("run_kind") else []

    def run_ids(self) -> np.ndarray:
        """Run of each row: the `run` column, else run kind and size (one run per size)."""
        if self.has("run"):
            return self["run"]
        kind = self["run_kind"] if self.has("run_kind") else np.full(len(self), "")
        return np.array([f"{f}:{n:.6g}" for f, n in zip(kind, self["N"])])

    def compute(self) -> np.ndarray:
        """C = 6 N D (the scaling-law convention, target-language tokens only)."""
        return scaling_compute(self["N"], self["D"])

    def require(self, names: Iterable[str], context: str) -> None:
        missing = [n for n in names if not self.has(n)]
        if missing:
            raise ScalingInputError(f"{self.source}: {context} needs column(s) {missing}; the table "
                                    f"has {sorted(self.columns)}")

    def rows(self) -> list[dict]:
        names = list(self.columns)
        return [{k: _py(self.columns[k][i]) for k in names} for i in range(len(self))]


def _py(v):
    if isinstance(v, (np.floating, float)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    return str(v)


def from_rows(rows: Sequence[Mapping], source: str = "<memory>") -> Table:
    """Build and validate a Table from dict rows (used by `collect` and tests)."""
    if not rows:
        raise ScalingInputError(f"{source}: no rows")
    names = []
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    raw = {k: [r.get(k, "") for r in rows] for k in names}
    return _validate(raw, source)


def read_table(path: str, required: Sequence[str] = REQUIRED) -> Table:
    """Read and validate a CSV run table (module docstring)."""
    if not os.path.isfile(path):
        raise ScalingInputError(f"table {path!r} does not exist")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise ScalingInputError(f"{path}: empty file (expected a CSV header with {list(required)})")
        header = [h.strip() for h in reader.fieldnames]
        rows = [{h.strip(): (v or "").strip() for h, v in r.items() if h is not None} for r in reader]
    missing = [c for c in required if c not in header]
    if missing:
        raise ScalingInputError(f"{path}: missing column(s) {missing}; a run table needs "
                                f"{list(REQUIRED)} (header: {header})")
    if not rows:
        raise ScalingInputError(f"{path}: header only, no rows")
    raw = {h: [r.get(h, "") for r in rows] for h in header}
    return _validate(raw, path)


def _validate(raw: dict[str, list], source: str) -> Table:
    if "family" in raw:  # the run_kind column's name in tables written before it was renamed
        raise ScalingInputError(f"{source}: column 'family' is now called 'run_kind' (same values: "
                                f"{', '.join(RUN_KINDS)}); rename it in the table's header")
    cols: dict[str, np.ndarray] = {}
    for name, values in raw.items():
        if name in NUMERIC:
            arr = np.empty(len(values))
            for i, v in enumerate(values):
                if v is None or (isinstance(v, str) and v.strip() == ""):
                    arr[i] = np.nan
                    continue
                try:
                    arr[i] = float(v)
                except (TypeError, ValueError):
                    raise ScalingInputError(f"{source}: row {i + 1}: column {name!r} is not a "
                                            f"number: {v!r}") from None
            cols[name] = arr
        else:
            cols[name] = np.array(["" if v is None else str(v) for v in values], dtype=object)
    for name in REQUIRED:
        if name not in cols:
            continue
        bad_nan = np.flatnonzero(~np.isfinite(cols[name]))
        if bad_nan.size:
            raise ScalingInputError(f"{source}: {bad_nan.size} row(s) with NaN/empty/inf {name} "
                                    f"(first: row {bad_nan[0] + 1}); remove or fix them")
        bad = np.flatnonzero(cols[name] <= 0)
        if bad.size:
            raise ScalingInputError(f"{source}: {name} must be positive; {bad.size} row(s) are not "
                                    f"(first: row {bad[0] + 1}, {name}={cols[name][bad[0]]:g})")
    if "run_kind" in cols:
        odd = sorted(set(cols["run_kind"]) - set(RUN_KINDS))
        if odd:
            raise ScalingInputError(f"{source}: unknown run_kind {odd}; expected one of {list(RUN_KINDS)}")
    if "replay_ratio" in cols:
        r = cols["replay_ratio"]
        bad = np.flatnonzero(np.isfinite(r) & ((r < 0) | (r >= 1)))
        if bad.size:
            raise ScalingInputError(f"{source}: replay_ratio must be in [0, 1); row {bad[0] + 1} has "
                                    f"{r[bad[0]]:g}")
    return Table(cols, source)


def write_table(path: str, table: Table) -> None:
    """Write a Table as CSV, known columns first in a fixed order."""
    names = [c for c in ORDER if table.has(c)] + [c for c in table.columns if c not in ORDER]
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        for i in range(len(table)):
            w.writerow([_cell(table.columns[c][i]) for c in names])


def _cell(v) -> str:
    if isinstance(v, (float, np.floating)):
        return "" if math.isnan(v) else repr(float(v))
    return str(v)

