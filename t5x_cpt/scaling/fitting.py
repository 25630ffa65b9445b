"""Robust fits of power-sum laws: Huber loss on log-loss residuals, L-BFGS from a grid of starts.

This is Hoffmann et al. (2022) approach 3 and the paper's procedure (arXiv 2407.02118, the fitting of its laws):

    minimise  sum_i Huber_delta( LSE_k(term_k(theta; x_i)) - log L_i ),   delta = 1e-3

from every point of a start grid (4,500 for the Chinchilla law), keeping the best. All starts are
optimised together by `lbfgs.minimize_batched` with analytic gradients in float64.

Two things make the batched fit fast without changing the problem:
  * Centring. Internally each term's log-coefficient is re-expressed at the centre of the data,
    c' = c - sum_j s_j theta_j mean(log X_j), so that  c - s theta log X = c' - s theta (log X - mean).
    This is an exact, invertible linear change of variables (every start maps to the same
    point, every optimum to the same optimum) that removes the strong coupling between a
    coefficient and its exponent (log N ~ 20) which otherwise makes L-BFGS zig-zag.
  * Scaling. The optimiser sees sum(Huber)/delta, which is O(number of points) instead of
    O(1e-3 * points), so its relative stopping tests mean the same thing on every table.
Reported objectives are in the original units.

A large grid is pruned (PRUNE_* below): all starts run a few iterations, then only the most
promising few percent run to convergence. Most of a 4,500-start grid ends at poor local optima or
plateaus and is recognisable early, so this cuts the work ~5x without changing the optimum
(tested against the unpruned fit); `prune=False` runs every start to convergence.

A fit reports: natural and log-space parameters, the objective (sum and mean Huber), the RMS and
mean absolute log-residual, how many starts reached the best objective (among the starts not
pruned), and warnings (a parameter at a bound, a direction in which the predictions are flat, an
implausible sign, starts that did not converge).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
from typing import Mapping, Sequence

import numpy as np

from t5x_cpt.scaling import lbfgs
from t5x_cpt.scaling.laws import MAX_LOG_COEF, PowerLaw, natural_name
from t5x_cpt.scaling.tables import ScalingInputError

HUBER_DELTA = 1e-3
# Two phases. Every start runs to a screening tolerance (the relative meaning of scipy
# L-BFGS-B's default factr, 1e7 * eps ~ 2e-9, rounded to 1e-8); then the best few distinct
# end points are polished at a tight tolerance, so the reported optimum is accurate to ~1e-12
# relative while the thousands of starts that end elsewhere are not chased to 12 digits.
SCREEN_FTOL, SCREEN_GTOL = 1e-8, 1e-5
POLISH_FTOL, POLISH_GTOL = 1e-14, 1e-10
POLISH_STARTS = 8
# Start pruning (large grids only). Most of a 4,500-start grid heads for poor local optima or
# plateaus, and that is visible early. Every start runs PRUNE_AFTER iterations; then only the
# best PRUNE_KEEP fraction (at least PRUNE_KEEP_MIN starts), plus any start within PRUNE_MARGIN
# (relative) of the best current objective, continue to convergence; the rest stop there
# (status "pruned"). Why these values (measured, not guessed): on 9 noisy synthetic tables with
# outliers (Chinchilla, 4,500 starts) the 10 best-ranked starts after even 3 iterations all went
# on to the best optimum, and on 4 more, keeping only 2% after 5 iterations still reached it; for
# the unfrozen CPT law (13,500 starts, 4 tables) the best-ranked such start was at rank <= 18
# and the 10th at <= 59 after 5 iterations. Keeping 5% (225 / 675 starts) at 5
# iterations leaves a margin of >10x over the worst case seen, at ~1/5 of the unpruned work.
# Grids smaller than PRUNE_MIN_STARTS (the coarse grid, bootstrap refits) are run in full.
PRUNE_MIN_STARTS = 1000
PRUNE_AFTER = 5
PRUNE_KEEP = 0.05
PRUNE_KEEP_MIN = 100
PRUNE_MARGIN = 0.1
# A start "reached the best objective" when within this relative distance of the best.
BEST_RTOL = 1e-6


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Huber loss: r^2/2 for |r| <= delta, delta(|r| - delta/2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


class Objective:
    """Vectorised scaled Huber objective of one law on one table, in internal coordinates.

    `__call__(X)` takes (S, P) free parameters in internal coordinates and returns
    sum(Huber)/delta per row and its gradient. `to_internal` / `to_log` convert log-space
    parameter rows to and from internal coordinates.

    Internal coordinates (module docstring): coefficients centred at the data's mean log
    inputs, exponents multiplied by the spread (std) of their log input, so every free
    coordinate moves the predictions by a comparable amount.

    Evaluation. The log of every term with powers is linear in [X, 1], so all of a block's
    log-terms come from one small matrix product with a fixed feature matrix, and all gradient
    sums from another; what remains per point is one exp per term, one log and a few in-place
    passes. Rows are processed in blocks sized to stay in cache, with preallocated buffers, on
    a thread pool (numpy releases the GIL inside these loops). Huber/delta is computed as
    (c r - c^2/2)/delta with c = clip(r, -delta, delta), equal to the two-branch definition.
    """

    def __init__(self, law: PowerLaw, columns: Mapping[str, np.ndarray], loss: np.ndarray,
                 frozen: Mapping[str, float] | None = None, delta: float = HUBER_DELTA,
                 block_rows: int = 256, pool=None):
        self.law = law
        self.delta = float(delta)
        self.frozen = dict(frozen or {})
        unknown = set(self.frozen) - set(law.param_names)
        if unknown:
            raise ValueError(f"cannot freeze {sorted(unknown)}: law {law.name!r} has {law.param_names}")
        self.free = tuple(p for p in law.param_names if p not in self.frozen)
        self.y = np.log(np.asarray(loss, dtype=float))
        self.n = self.y.size
        self.block_rows = int(block_rows)
        self.pool = pool
        self._local = threading.local()
        nf = len(self.free)
        index = {p: i for i, p in enumerate(self.free)}
        logs = {v: np.log(np.asarray(columns[v], dtype=float)) for v in law.variables}
        # Exponent scale: spread of the log input the exponent multiplies (1 if it is constant).
        self.scale = np.ones(nf)
        for term in law.terms:
            for pw in term.powers:
                if pw.exponent in index:
                    sd = float(logs[pw.variable].std())
                    self.scale[index[pw.exponent]] = sd if sd > 1e-12 else 1.0
        # Per term: feature matrix F (nf + 1, n) such that log term = [X, 1] @ F, plus the
        # bookkeeping to undo the centring. Constant terms are kept apart (one value per row).
        self._features = []          # list of (F (nf+1, n), F[:nf].T (n, nf))
        self._const_free = []        # free coefficient indices of terms without powers/offsets
        self._const_rowwise = np.zeros(self.n)   # sum of exp of fully frozen row-wise terms
        self._centres = []           # (coef index, [(exponent index, sign*mean)])
        for term in law.terms:
            coef_i = index.get(term.coef) if term.coef is not None else None
            const = np.zeros(self.n)
            if term.coef is not None and coef_i is None:
                const += self.frozen[term.coef]
            if term.offset:
                const += logs[term.offset]
            free_powers = [pw for pw in term.powers if pw.exponent in index]
            for pw in term.powers:
                if pw.exponent not in index:
                    const -= pw.sign * self.frozen[pw.exponent] * logs[pw.variable]
            if not free_powers:
                if coef_i is None:
                    self._const_rowwise += np.exp(const)       # fully frozen: a fixed addend
                elif term.offset or any(pw.exponent not in index for pw in term.powers):
                    feats = np.zeros((nf + 1, self.n))
                    feats[coef_i], feats[nf] = 1.0, const
                    self._features.append((feats, feats[:nf].T.copy()))
                else:
                    self._const_free.append((coef_i, float(const[0])))
                continue
            feats = np.zeros((nf + 1, self.n))
            centres = []
            if coef_i is not None:
                feats[coef_i] = 1.0
            for pw in free_powers:
                lx = logs[pw.variable]
                # Centre only where the term's coefficient is free to absorb the shift.
                mu = float(lx.mean()) if coef_i is not None else 0.0
                j = index[pw.exponent]
                feats[j] += -pw.sign * (lx - mu) / self.scale[j]
                centres.append((j, pw.sign * mu))
            feats[nf] = const
            self._features.append((feats, feats[:nf].T.copy()))
            self._centres.append((coef_i, centres))
        self._has_rowwise = bool(np.any(self._const_rowwise))

    # ---- coordinates -------------------------------------------------------------------
    def to_internal(self, theta: np.ndarray) -> np.ndarray:
        """(S, P) log-space free parameters (order `self.free`) -> internal coordinates."""
        x = np.array(theta, dtype=float, ndmin=2, copy=True)
        for coef_i, centres in self._centres:
            if coef_i is None:
                continue
            for exp_i, s_mu in centres:
                x[:, coef_i] -= x[:, exp_i] * s_mu
        return x * self.scale

    def to_log(self, x: np.ndarray) -> np.ndarray:
        """Inverse of `to_internal`."""
        theta = np.array(x, dtype=float, ndmin=2, copy=True) / self.scale
        for coef_i, centres in self._centres:
            if coef_i is None:
                continue
            for exp_i, s_mu in centres:
                theta[:, coef_i] += theta[:, exp_i] * s_mu
        return theta

    def log_params(self, x_row: np.ndarray) -> dict[str, float]:
        """Full log-space dict (free and frozen) of one internal row."""
        theta = self.to_log(x_row)[0]
        out = dict(self.frozen)
        out.update({p: float(v) for p, v in zip(self.free, theta)})
        return {p: out[p] for p in self.law.param_names}

    # ---- evaluation --------------------------------------------------------------------
    def __call__(self, x: np.ndarray):
        x = np.asarray(x, dtype=float)
        s_rows = x.shape[0]
        f = np.empty(s_rows)
        g = np.empty((s_rows, len(self.free)))
        blocks = [slice(i, min(i + self.block_rows, s_rows)) for i in range(0, s_rows, self.block_rows)]
        if self.pool is None or len(blocks) < 2:
            for b in blocks:
                self._block(x[b], f[b], g[b])
        else:
            list(self.pool.map(lambda b: self._block(x[b], f[b], g[b]), blocks))
        return f, g

    def _buffers(self, rows: int):
        buf = getattr(self._local, "buf", None)
        if buf is None or buf[0].shape[0] < rows:
            k = len(self._features)
            buf = [np.empty((rows, self.n)) for _ in range(3 + max(k, 1))]
            self._local.buf = buf
        return [b[:rows] for b in buf]

    def _block(self, x, f_out, g_out):
        # errstate is thread-local: set it here, where the pool threads run. Overflow and log(0)
        # at trial points are expected and turn into an infinite objective, rejected by the
        # line search.
        with np.errstate(all="ignore"):
            self._block_unguarded(x, f_out, g_out)

    def _block_unguarded(self, x, f_out, g_out):
        rows, nf = x.shape
        total, r, c, *terms = self._buffers(rows)
        x_aug = np.empty((rows, nf + 1))
        x_aug[:, :nf] = x
        x_aug[:, nf] = 1.0
        # Sum of the terms, in exp space, in as few passes over (rows, n) as possible: the first
        # two terms are added straight into `total`, and all constant terms (one value per row)
        # are summed per row before their single broadcast pass.
        k = len(self._features)
        for (feats, _), et in zip(self._features, terms):
            np.matmul(x_aug, feats, out=et)
            np.exp(et, out=et)
        if k >= 2:
            np.add(terms[0], terms[1], out=total)
            for et in terms[2:k]:
                total += et
        elif k == 1:
            np.copyto(total, terms[0])
        else:
            total.fill(0.0)
        if self._has_rowwise:
            total += self._const_rowwise
        const_vals = [np.exp(x[:, coef_i] + cst) for coef_i, cst in self._const_free]
        if const_vals:
            total += sum(const_vals)[:, None]
        # Residuals and the Huber sum.
        np.log(total, out=r)
        r -= self.y
        np.clip(r, -self.delta, self.delta, out=c)
        f_out[:] = (np.einsum("ij,ij->i", c, r) - 0.5 * np.einsum("ij,ij->i", c, c)) / self.delta
        # Gradient: d f / d log-term_k = c / (delta * total) * exp(term_k).
        np.divide(c, total, out=c)
        g_out[:] = 0.0
        for (_, feats_t), et in zip(self._features, terms):
            et *= c
            g_out += et @ feats_t
        if const_vals:
            c_sum = c.sum(axis=1)
            for (coef_i, _), ev in zip(self._const_free, const_vals):
                g_out[:, coef_i] += ev * c_sum
        g_out /= self.delta
        bad = ~np.isfinite(f_out)
        if bad.any():
            f_out[bad] = np.inf

    def residuals(self, log_params: Mapping[str, float], columns) -> np.ndarray:
        return self.law.log_predict(log_params, columns) - self.y


@dataclasses.dataclass
class Fit:
    """A fitted law: parameters, quality, start statistics and warnings (module docstring)."""
    law: PowerLaw
    log_params: dict[str, float]
    frozen: tuple[str, ...]
    huber_sum: float
    huber_mean: float
    rms: float
    mae: float
    n_points: int
    n_starts: int
    n_best: int
    warnings: list[str]
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def params(self) -> dict[str, float]:
        """Natural parameters (E, A, B, alpha, ...)."""
        return self.law.to_natural(self.log_params)

    def predict(self, **columns) -> np.ndarray:
        return self.law.predict(self.params, **columns)

    def to_json(self) -> dict:
        out = {"law": self.law.name, "formula": self.law.formula}
        out.update(self.params)
        out.update({
            "log_params": dict(self.log_params),
            "frozen": list(self.frozen),
            "objective": {"huber_sum": self.huber_sum, "huber_mean": self.huber_mean,
                          "huber_delta": HUBER_DELTA, "rms_log_residual": self.rms,
                          "mean_abs_log_residual": self.mae},
            "n_points": self.n_points, "n_starts": self.n_starts, "n_best": self.n_best,
            "warnings": list(self.warnings),
        })
        out.update(self.info)
        return out


def fit_law(law: PowerLaw, columns: Mapping[str, np.ndarray], loss: np.ndarray, *,
            frozen: Mapping[str, float] | None = None,
            grid: Mapping[str, Sequence[float]] | None = None,
            extra_starts: np.ndarray | None = None,
            bounds: Mapping[str, tuple[float, float]] | None = None,
            delta: float = HUBER_DELTA, workers: int | None = None,
            max_iter: int = 1000, prune: bool = True) -> Fit:
    """Fit `law` to rows (`columns[var]`, `loss`) from a grid of starts; keep the best.

    Args:
      law: the law.
      columns: the law's input columns (N, D, C, ...), each (n,), all positive.
      loss: (n,) observed losses, positive.
      frozen: log-space values held fixed (e.g. {"e":..., "a":..., "alpha":...} for stage 2 of
        the CPT fit); the grid then covers only the free parameters.
      grid: per-parameter start values (log space); default the law's grid.
      extra_starts: (k, P_free) additional starts in log space (e.g. a previous optimum).
      bounds: optional {log-space name: (low, high)}; a fitted value at a bound is warned about.
      delta: Huber delta.
      workers: threads evaluating the objective (default: CPUs, at most 4).
      max_iter: L-BFGS iterations per start.
      prune: screen the starts of a large grid (PRUNE_* above); False runs every start to
        convergence. With pruning, `n_best` counts the starts that reached the best objective
        among those not pruned (pruned starts stopped early, so they never count).
    """
    frozen = dict(frozen or {})
    loss = np.asarray(loss, dtype=float)
    n_free = len([p for p in law.param_names if p not in frozen])
    if loss.size < n_free:
        raise ScalingInputError(
            f"{law.name} fit: {loss.size} points for {n_free} free parameters; need at least "
            f"as many points as parameters")
    names, starts = law.start_grid(grid, fixed=tuple(frozen))
    if extra_starts is not None and len(extra_starts):
        starts = np.concatenate([starts, np.array(extra_starts, dtype=float, ndmin=2)])
    lower = np.full(len(names), -np.inf)
    upper = np.full(len(names), np.inf)
    for p, (lo_b, hi_b) in (bounds or {}).items():
        if p not in names:
            raise ScalingInputError(f"bound on {p!r}: not a free parameter of {law.name} ({names})")
        lower[names.index(p)], upper[names.index(p)] = lo_b, hi_b
    workers = default_workers() if workers is None else max(1, int(workers))
    pool = concurrent.futures.ThreadPoolExecutor(workers) if workers > 1 and len(starts) > 256 else None
    try:
        obj = Objective(law, columns, loss, frozen=frozen, delta=delta, pool=pool)
        lo_i, hi_i = _internal_bounds(obj, lower, upper)
        x0 = obj.to_internal(np.clip(starts, lower, upper))
        pruning = prune and len(x0) >= PRUNE_MIN_STARTS
        res = lbfgs.minimize_batched(obj, x0, lower=lo_i, upper=hi_i, max_iter=max_iter,
                                     ftol=SCREEN_FTOL, gtol=SCREEN_GTOL,
                                     screen_iter=PRUNE_AFTER if pruning else None,
                                     keep=_keep_competitive if pruning else None)
        _polish(obj, res, lo_i, hi_i, max_iter)
    finally:
        if pool is not None:
            pool.shutdown()
    finite = np.isfinite(res.fun)
    if not finite.any():
        raise ScalingInputError(f"{law.name} fit: the objective is not finite at any start")
    best = int(np.argmin(np.where(finite, res.fun, np.inf)))
    f_best = res.fun[best]
    n_best = int(np.sum(res.fun <= f_best + BEST_RTOL * max(abs(f_best), 1e-300)))
    log_params = obj.log_params(res.x[best])
    r = obj.residuals(log_params, columns)
    h = huber(r, delta)
    warnings = diagnose(law, log_params, columns, names, bounds or {})
    if res.status[best] == 3:
        warnings.append(f"the best start stopped at max_iter={max_iter} before converging")
    capped = int(np.sum(res.status == 3))
    skipped = int(np.sum(res.status == 4))
    if skipped:
        warnings.append(f"{skipped} starts skipped: objective not finite there")
    info = {"optimizer": {"nfev_rows": int(res.nfev), "max_iter": max_iter, "stopped_at_max_iter": capped,
                          "pruned": int(np.sum(res.status == 5)),
                          "status_counts": {lbfgs.STATUS[k]: int(np.sum(res.status == k))
                                            for k in lbfgs.STATUS if np.any(res.status == k)},
                          "best_status": lbfgs.STATUS[int(res.status[best])]}}
    return Fit(law=law, log_params=log_params, frozen=tuple(frozen), huber_sum=float(h.sum()),
               huber_mean=float(h.mean()), rms=float(np.sqrt(np.mean(r * r))),
               mae=float(np.mean(np.abs(r))), n_points=int(loss.size), n_starts=int(len(starts)),
               n_best=n_best, warnings=warnings, info=info)


def _keep_competitive(current: np.ndarray) -> np.ndarray:
    """Pruning rule (PRUNE_* above): which starts continue, from every start's current
    objective (inf where skipped). The objective is a sum of Huber losses, >= 0, so a
    relative margin is meaningful."""
    finite = np.isfinite(current)
    if not finite.any():
        return finite
    n_keep = max(PRUNE_KEEP_MIN, int(np.ceil(PRUNE_KEEP * current.size)))
    keep = np.zeros(current.size, dtype=bool)
    keep[np.argsort(current)[:n_keep]] = True           # infs sort last
    keep |= current <= current[finite].min() * (1.0 + PRUNE_MARGIN)
    return keep & finite


def _polish(obj: Objective, res: lbfgs.BatchResult, lo, hi, max_iter: int) -> None:
    """Re-run the best few distinct end points at tight tolerance; update `res` in place."""
    finite = np.flatnonzero(np.isfinite(res.fun))
    order = finite[np.argsort(res.fun[finite])]
    picked: list[int] = []
    for i in order:
        if all(np.max(np.abs(res.x[i] - res.x[j])) > 1e-6 for j in picked):
            picked.append(int(i))
        if len(picked) == POLISH_STARTS:
            break
    if not picked:
        return
    pol = lbfgs.minimize_batched(obj, res.x[picked], lower=lo, upper=hi, max_iter=max_iter,
                                 ftol=POLISH_FTOL, gtol=POLISH_GTOL)
    for k, i in enumerate(picked):
        if pol.fun[k] <= res.fun[i]:
            res.x[i], res.fun[i] = pol.x[k], pol.fun[k]
            if pol.status[k] != 3:
                res.status[i] = pol.status[k]
    res.nfev += pol.nfev


def _internal_bounds(obj: Objective, lower, upper):
    """Bounds in internal coordinates. Exponents are only scaled; a centred coefficient mixes
    with its exponents, so a box on it cannot be expressed and is refused."""
    for coef_i, centres in obj._centres:
        if coef_i is not None and centres and (np.isfinite(lower[coef_i]) or np.isfinite(upper[coef_i])):
            raise ScalingInputError(f"bounds on coefficient {natural_name(obj.free[coef_i])} are not "
                                    f"supported (bound exponents, or a constant term such as E)")
    return lower * obj.scale, upper * obj.scale


def default_workers() -> int:
    """Threads for the objective: the CPUs this process may use, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def diagnose(law: PowerLaw, log_params: Mapping[str, float], columns, free: Sequence[str],
             bounds: Mapping[str, tuple[float, float]]) -> list[str]:
    """Warnings about a fitted point: bounds, flat directions, implausible signs."""
    out = []
    for p in law.coef_names:
        if p in log_params and log_params[p] >= MAX_LOG_COEF:
            out.append(f"{natural_name(p)} ran off to infinity (log {natural_name(p)} = {log_params[p]:.4g}): "
                       "the data do not constrain it (too few sizes or budgets for this law?)")
    for p in free:
        if p in bounds:
            lo_b, hi_b = bounds[p]
            v = log_params[p]
            for b, side in ((lo_b, "lower"), (hi_b, "upper")):
                if np.isfinite(b) and abs(v - b) <= 1e-6 * (1 + abs(b)):
                    out.append(f"{natural_name(p)} is at its {side} bound {b:g}")
    # Sensitivity of the predicted log-loss to each free parameter, by central differences of
    # the exact prediction. Columns near zero: a parameter without effect; a tiny singular value
    # of the column-normalised matrix: a combination of parameters the data cannot pin down.
    jac = np.empty((np.size(columns[law.variables[0]]), len(free)))
    for j, p in enumerate(free):
        h = 1e-6 * max(1.0, abs(log_params[p]))
        up, dn = dict(log_params), dict(log_params)
        up[p] += h
        dn[p] -= h
        jac[:, j] = (law.log_predict(up, columns) - law.log_predict(dn, columns)) / (2 * h)
    norms = np.linalg.norm(jac, axis=0)
    scale = norms.max() if norms.size else 0.0
    dead = [free[j] for j in range(len(free)) if norms[j] <= 1e-8 * max(scale, 1e-300)]
    for p in dead:
        what = "collapsed to 0" if p in law.coef_names else "has no effect"
        out.append(f"flat direction: {natural_name(p)} {what}; the predictions do not depend on it")
    live = [j for j in range(len(free)) if free[j] not in dead]
    if len(live) >= 2:
        sv_mat = jac[:, live] / norms[live]
        _, sv, vt = np.linalg.svd(sv_mat, full_matrices=False)
        if sv[-1] < 1e-6 * sv[0]:
            combo = ", ".join(f"{vt[-1, k]:+.2f}*{natural_name(free[j])}" for k, j in enumerate(live)
                              if abs(vt[-1, k]) > 0.05)
            out.append(f"flat direction: the predictions barely change along ({combo}); "
                       f"relative singular value {sv[-1] / sv[0]:.1e}")
    # Exponents of decaying powers should come out positive (gamma may be either sign: it is ~0
    # on scratch data); a non-positive one means the term does not do what the law assumes.
    decaying = {pw.exponent for t in law.terms for pw in t.powers if pw.sign > 0} - {"gamma"}
    for p in free:
        v = log_params[p]
        if p in decaying and v <= 0:
            out.append(f"{p} = {v:.4g} <= 0: the fitted term does not decay; check the data range")
    return out
