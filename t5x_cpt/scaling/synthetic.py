"""Synthetic run tables drawn from known laws: for tests, the fit benchmark and the docs.

A synthetic study mimics the paper's design: one run per size, D_final = 20 N target tokens,
`points` evaluations per run log-spaced from `start_fraction` * D_final to D_final. Noise is
multiplicative (log-normal, `noise` = std of log loss), optionally with a per-run offset
(`run_noise`: correlated errors along a run, which is why the bootstrap resamples runs), and a
fraction `outliers` of points is inflated by `outlier_scale` (what the Huber loss is for).

The generating parameters are *chosen*, not the paper's rounded fits (docs/scaling.md: those are a
shape, not ground truth; with its published scratch law the compute-optimal plan sits at ~1,500
tokens per parameter, where any CPT law with beta' < beta is worse than scratch). `TRUE_SCRATCH`
is Hoffmann et al.'s (2022) own approach-3 fit; `TRUE_CPT` keeps its E, A, alpha and takes the
paper's published CPT exponents (beta' = 0.20, gamma = 0.08), with B' set so that CPT saves 30% of
the compute at D = 20 N (about 70% early in a run), as in the paper's findings. `TRUE_FORGETTING`
reproduces the paper's 1.4B no-replay rise of the source loss (2.40 -> ~3.7 nats after 20 N
tokens) and makes 5% replay remove most of it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from t5x_cpt.scaling import laws
from t5x_cpt.scaling.tables import Table, from_rows

# The paper's ladder (millions of parameters), every third row: 49M .. 5.5B.
LADDER_M = (49, 86, 125, 194, 259, 368, 616, 806, 1085, 1542, 1963, 2791, 4016, 5534)

TRUE_SCRATCH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TRUE_CPT = {"E": 1.69, "A": 406.4, "B": 292.5, "alpha": 0.34, "beta": 0.20, "gamma": 0.08}
TRUE_FORGETTING = {"F": 32.5, "phi": 0.20, "psi": 0.60, "K": 1000.0}


def study(params: Mapping[str, float], *, run_kind: str, sizes_m: Sequence[float] = LADDER_M,
          points: int = 20, start_fraction: float = 0.05, tokens_per_param: float = 20.0,
          noise: float = 0.005, run_noise: float = 0.0, outliers: float = 0.0,
          outlier_scale: float = 1.10, seed: int = 0, language: str = "zh",
          replay_ratio: float = 0.0) -> Table:
    """Rows of runs of one kind generated from a chinchilla or cpt law (module docstring)."""
    rng = np.random.default_rng(seed)
    law = laws.law_from_params(params)
    rows = []
    for m in sizes_m:
        n = float(m) * 1e6
        d = np.geomspace(start_fraction, 1.0, points) * tokens_per_param * n
        clean = law.predict(params, N=np.full_like(d, n), D=d)
        offset = rng.normal(0.0, run_noise) if run_noise else 0.0
        loss = clean * np.exp(offset + rng.normal(0.0, noise, size=d.size))
        bad = rng.random(d.size) < outliers
        loss[bad] *= outlier_scale
        run = f"{run_kind}-{int(m)}m" + (f"-r{replay_ratio:g}" if replay_ratio else "")
        for di, li in zip(d, loss):
            rows.append({"N": n, "D": float(di), "loss": float(li), "run_kind": run_kind, "run": run,
                         "language": language, "replay_ratio": replay_ratio,
                         "flops": float(laws.scaling_compute(n, di / (1 - replay_ratio)))})
    return from_rows(rows, source=f"synthetic-{run_kind}")


def concat(*tables: Table) -> Table:
    """Row-wise concatenation (columns missing from a table become NaN / empty)."""
    names: list[str] = []
    for t in tables:
        names += [c for c in t.columns if c not in names]
    cols = {}
    for c in names:
        parts = []
        for t in tables:
            if t.has(c):
                parts.append(t.columns[c])
            else:
                text = any(s.has(c) and s.columns[c].dtype == object for s in tables)
                parts.append(np.full(len(t), "" if text else np.nan, dtype=object if text else float))
        cols[c] = np.concatenate(parts)
    return Table(cols, "+".join(t.source for t in tables))


def forgetting_study(params: Mapping[str, float] = TRUE_FORGETTING, *, n: float = 1.393e9,
                     ratios: Sequence[float] = (0.0, 0.01, 0.05, 0.2, 0.5), loss0: float = 2.40,
                     points: int = 15, noise: float = 0.004, seed: int = 0) -> Table:
    """Source-language losses of CPT runs of one size at several replay ratios."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in ratios:
        d = np.geomspace(0.02, 1.0, points) * 20 * n * (1 - r)
        c = laws.scaling_compute(n, d)
        clean = loss0 + params["F"] * c ** params["phi"] / ((1 + params["K"] * r) * n) ** params["psi"]
        loss = clean * np.exp(rng.normal(0, noise, d.size))
        for di, li in zip(d, loss):
            rows.append({"N": n, "D": float(di), "loss": float(li), "run_kind": "cpt",
                         "run": f"cpt-replay{r:g}", "language": "zh", "replay_ratio": r,
                         "loss0": loss0})
    return from_rows(rows, source="synthetic-forgetting")
