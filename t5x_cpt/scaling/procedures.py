"""The study's fit procedures on run tables: scratch, two-stage CPT, unfrozen, with bootstrap.

  fit_table(law, table)                       one law on one table (any law of laws.LAWS)
  fit_cpt_two_stage(table, scratch_params)    the paper's CPT fit: E, A, alpha frozen at the
                                              scratch fit, only B', beta', gamma fitted
  attach_bootstrap(fit, table, refit, ...)    run-level bootstrap intervals on a fit

Start grids: "full" is each law's default grid (4,500 starts for Chinchilla); "coarse" keeps the
ends and middle of every axis (243 for Chinchilla) for quick looks and tests.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import numpy as np

from t5x_cpt.scaling import allocation, bootstrap, fitting, laws
from t5x_cpt.scaling.laws import PowerLaw
from t5x_cpt.scaling.tables import ScalingInputError, Table

log = logging.getLogger(__name__)

GRID_CHOICES = ("full", "coarse")
CPT_FROZEN = ("e", "a", "alpha")


def law_grid(law: PowerLaw, grid: str | Mapping = "full", frozen: Sequence[str] = ()) -> dict:
    """Start values per free parameter for a grid choice ("full" | "coarse" | explicit dict)."""
    if isinstance(grid, Mapping):
        return dict(grid)
    if grid not in GRID_CHOICES:
        raise ScalingInputError(f"unknown grid {grid!r}; choose from {GRID_CHOICES}")
    base = dict(law.grid)
    if law.name == "cpt" and set(CPT_FROZEN) <= set(frozen):
        base = dict(laws.CPT_STAGE2_GRID)
    base = {k: v for k, v in base.items() if k not in frozen}
    return base if grid == "full" else bootstrap.coarse_grid(base)


def law_columns(law: PowerLaw, table: Table) -> dict[str, np.ndarray]:
    """The columns a law reads from a table (C is 6 N D when the table has no C column)."""
    cols = {}
    for v in law.variables:
        if v == "C" and not table.has("C"):
            cols["C"] = table.compute()
        else:
            table.require([v], f"the {law.name} law")
            cols[v] = table[v]
    return cols


def fit_table(law: PowerLaw, table: Table, *, frozen_params: Mapping[str, float] | None = None,
              freeze: Sequence[str] = (), grid: str | Mapping = "full",
              extra_starts: np.ndarray | None = None, workers: int | None = None,
              bounds: Mapping[str, tuple[float, float]] | None = None,
              max_iter: int = 1000, prune: bool = True) -> fitting.Fit:
    """Fit `law` to the table's N, D, loss; `freeze` names log-space parameters taken from
    `frozen_params` (natural values, e.g. a scratch fit's E, A, alpha). `prune`: see
    fitting.fit_law (screening of large start grids)."""
    frozen = {}
    if freeze:
        if frozen_params is None:
            raise ScalingInputError(f"{law.name} fit: parameters {list(freeze)} are to be frozen "
                                    f"but no fit to freeze them from was given")
        full = _log_values(law, frozen_params, freeze)
        frozen = {k: full[k] for k in freeze}
    fit = fitting.fit_law(law, law_columns(law, table), table["loss"], frozen=frozen,
                          grid=law_grid(law, grid, tuple(frozen)), extra_starts=extra_starts,
                          workers=workers, bounds=bounds, max_iter=max_iter, prune=prune)
    fit.info["n_runs"] = int(len(set(table.run_ids())))
    return fit


def _log_values(law: PowerLaw, params: Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    try:
        return law.from_natural(params, names)
    except ScalingInputError as e:  # say which input: the fit whose parameters are frozen
        raise ScalingInputError(f"the fit to freeze from: {e}") from None


def fit_cpt_two_stage(table: Table, scratch_params: Mapping[str, float], *,
                      grid: str | Mapping = "full", workers: int | None = None) -> fitting.Fit:
    """Stage 2 of the paper's CPT fit: E, A, alpha from the scratch fit; B', beta', gamma fitted."""
    fit = fit_table(laws.CPT, table, frozen_params=scratch_params, freeze=CPT_FROZEN, grid=grid,
                    workers=workers)
    fit.info["stage"] = "two-stage: E, A, alpha frozen at the scratch fit"
    return fit


def point_start(fit: fitting.Fit) -> np.ndarray:
    """The fit's optimum as an extra start row (free parameters, log space)."""
    return np.array([[fit.log_params[p] for p in fit.law.param_names if p not in fit.frozen]])


def attach_bootstrap(fit: fitting.Fit, table: Table, refit: Callable[[Table, int], fitting.Fit], *,
                     n: int, seed: int = 0, level: float = 0.9,
                     budgets: Sequence[float] = ()) -> dict:
    """Bootstrap `refit` over runs; store intervals of parameters and derived quantities in
    `fit.info["bootstrap"]` (with per-replicate parameter samples for later propagation)."""
    names = list(fit.law.natural_names())

    def statistic(t: Table, i: int) -> dict[str, float]:
        f = refit(t, i)
        values = dict(f.params)
        if fit.law.name in ("chinchilla", "cpt"):
            values.update(allocation.derived_quantities(f.params, budgets))
        values["huber_mean"] = f.huber_mean
        return values

    boot = bootstrap.bootstrap(table, statistic, n=n, seed=seed, level=level, keep_samples=names)
    fit.info["bootstrap"] = boot
    return boot


BOOTSTRAP_MAX_ITER = 100


def coarse_refit(law: PowerLaw, fit: fitting.Fit, *, frozen_for: Callable[[int], Mapping] | None = None,
                 freeze: Sequence[str] = (), workers: int | None = 1):
    """A refit function for bootstrap replicates: coarse grid plus the full-data optimum.

    Iterations are capped at BOOTSTRAP_MAX_ITER: the full-data optimum converges in a few dozen,
    and the grid starts are there to catch a replicate whose optimum jumped to another basin,
    not to be chased across plateaus (a capped start is simply not the best one)."""
    start = point_start(fit)

    def refit(t: Table, i: int) -> fitting.Fit:
        frozen_params = frozen_for(i) if frozen_for else None
        return fit_table(law, t, frozen_params=frozen_params, freeze=freeze, grid="coarse",
                         extra_starts=start, workers=workers, max_iter=BOOTSTRAP_MAX_ITER)

    return refit


def scratch_sample_provider(scratch_json: Mapping) -> Callable[[int], Mapping] | None:
    """Per-replicate scratch parameters from a scratch fit's stored bootstrap samples, so a
    two-stage CPT bootstrap carries the scratch fit's uncertainty (None when absent)."""
    samples = bootstrap.samples_as_dicts(scratch_json.get("bootstrap", {}), ["E", "A", "alpha"])
    if not samples:
        return None
    return lambda i: samples[i % len(samples)]
