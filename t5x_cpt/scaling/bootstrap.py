"""Bootstrap over runs: percentile intervals for fitted parameters and derived quantities.

The unit of resampling is the *run*, not the point: the points of one training curve share one
model, one data order and one schedule, so their errors are correlated, and resampling points
would treat 20 correlated evaluations as 20 independent facts and give intervals that are far too
narrow. Each replicate draws as many runs as the table has, with replacement, within each run kind
(stratified, so a replicate never loses a run kind), refits, and records every named quantity; the
interval is the (1-level)/2 and (1+level)/2 percentiles of the replicates.

Refits start from the full-data optimum plus a coarse grid (3 values per parameter, the ends
and middle of the law's grid) rather than the full 4,500 starts: a replicate's optimum lies near
the full-data one, and the coarse grid still guards against a replicate whose optimum jumped.
Replicates whose fit fails (too few distinct runs, no optimum) are counted and reported, never
silently dropped.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from t5x_cpt.scaling.tables import ScalingInputError, Table

log = logging.getLogger(__name__)

Statistic = Callable[[Table, int], Mapping[str, float]]


def coarse_grid(grid: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """First, middle and last value of each parameter's start values."""
    out = {}
    for k, v in grid.items():
        v = list(v)
        out[k] = sorted({v[0], v[len(v) // 2], v[-1]})
    return out


def resample_runs(table: Table, rng: np.random.Generator, strata: str | None = "run_kind") -> Table:
    """One bootstrap table: runs drawn with replacement (within strata); duplicates renamed."""
    runs = table.run_ids()
    groups = table[strata] if strata and table.has(strata) else np.full(len(table), "")
    pieces, names = [], []
    for g in sorted(set(groups)):
        in_g = groups == g
        uniq = sorted(set(runs[in_g]))
        draw = rng.integers(0, len(uniq), size=len(uniq))
        for k, j in enumerate(draw):
            rows = np.flatnonzero(in_g & (runs == uniq[j]))
            pieces.append(rows)
            names.append(np.full(rows.size, f"{uniq[j]}#{g}{k}", dtype=object))
    idx = np.concatenate(pieces)
    out = table.select(idx)
    out.columns["run"] = np.concatenate(names)
    return out


def bootstrap(table: Table, statistic: Statistic, *, n: int = 200, seed: int = 0,
              level: float = 0.9, strata: str | None = "run_kind",
              keep_samples: Sequence[str] | None = None) -> dict:
    """Run `statistic(resampled_table, replicate_index)` on `n` run-level resamples.

    Returns a JSON-ready dict: n (successful replicates), n_failed, level, unit, the number of
    runs per stratum, `intervals` {name: [low, high]}, `median` {name: value}, and `samples`
    {name: [...]} for the names in `keep_samples` (all names if None) so that later commands
    (allocate, plan) can propagate the uncertainty.
    """
    if not 0 < level < 1:
        raise ScalingInputError(f"--level must be in (0, 1), got {level}")
    if n < 2:
        raise ScalingInputError(f"bootstrap needs at least 2 replicates, got {n}")
    runs = table.run_ids()
    groups = table[strata] if strata and table.has(strata) else np.full(len(table), "")
    n_runs = {str(g) or "all": len(set(runs[groups == g])) for g in sorted(set(groups))}
    if min(n_runs.values()) < 2:
        raise ScalingInputError(f"{table.source}: bootstrap over runs needs at least 2 runs per "
                                f"run kind; have {n_runs}")
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    failures: list[str] = []
    for i in range(n):
        t = resample_runs(table, rng, strata)
        try:
            values = statistic(t, i)
        except ScalingInputError as e:
            failures.append(str(e))
            continue
        for k, v in values.items():
            samples.setdefault(k, []).append(float(v))
    ok = n - len(failures)
    if ok < 2:
        raise ScalingInputError(f"bootstrap: only {ok} of {n} replicates could be fitted "
                                f"(first failure: {failures[0] if failures else 'none'})")
    if failures:
        log.warning("bootstrap: %d of %d replicates failed (first: %s)", len(failures), n, failures[0])
    out = {
        "n": ok, "n_failed": len(failures), "level": level, "unit": "run", "seed": seed,
        "n_runs": n_runs,
        "intervals": {k: percentile_interval(v, level) for k, v in samples.items()},
        "median": {k: _nanmedian(v) for k, v in samples.items()},
    }
    names = list(samples) if keep_samples is None else [k for k in keep_samples if k in samples]
    out["samples"] = {k: samples[k] for k in names}
    if failures:
        out["failures"] = sorted(set(failures))[:5]
    return out


def percentile_interval(values: Sequence[float], level: float) -> list[float | None]:
    """[low, high] percentile interval of the finite values (None if fewer than 2)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return [None, None]
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def _nanmedian(values: Sequence[float]) -> float | None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else None


def samples_as_dicts(boot: Mapping, names: Sequence[str]) -> list[dict[str, float]]:
    """Replicate-wise parameter dicts from a stored bootstrap (for allocate/plan intervals)."""
    s = boot.get("samples", {}) if boot else {}
    if not s or any(k not in s for k in names):
        return []
    n = min(len(s[k]) for k in names)
    out = []
    for i in range(n):
        d = {k: s[k][i] for k in names}
        if all(math.isfinite(v) for v in d.values()):
            out.append(d)
    return out
