"""L-BFGS over many independent starting points at once, in numpy (float64).

`minimize_batched(fun, x0)` minimises S independent problems of P variables, where
`fun(X) -> (f, g)` takes an (S, P) array and returns every row's objective (S,) and gradient
(S, P). Rows never interact: each keeps its own curvature history, step length and stopping
test, and a row that has stopped is dropped from the active set so it costs nothing more.

Algorithm (per row): limited-memory BFGS (Nocedal & Wright ch. 7; memory m, initial inverse
Hessian gamma*I with gamma = s.y/y.y of the newest pair, two-loop recursion) with a backtracking
Armijo line search (safeguarded quadratic interpolation) that also extrapolates when a full step
still descends steeply. A curvature pair is kept
only when s.y > 0, so the inverse Hessian stays positive definite without a Wolfe search. Box
bounds are handled by projection: the step is clipped to the box and coordinates held at a bound
with the gradient pushing outwards are frozen for that iteration (a projected L-BFGS; enough for
the simple bounds a scaling-law fit needs, not a full L-BFGS-B Cauchy-point search).

Why numpy and not JAX. The fitter's inner loop is a handful of elementwise passes over an
(S, n) array followed by small reductions; numpy runs those at memory speed, and dropping
converged rows (a dynamic shape) is free in numpy but would force recompiles or masked (wasted)
work under `jax.jit`. numpy is always float64, whereas JAX would need the process-global
`jax_enable_x64` flag flipped under the trainer's feet (and, measured on a 2-core CPU, a jitted
float64 evaluation of the same objective was no faster than the numpy one). The objective may
split rows over threads (see fitting.Objective); the optimiser itself is one loop.

Stopping tests (per row, scale-aware like scipy's L-BFGS-B):
  gtol:  max |projected gradient| <= gtol * max(1, |f|)
  ftol:  f_old - f_new <= ftol * max(1, |f_old|, |f_new|)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

STATUS = {
    0: "converged: projected gradient below gtol",
    1: "converged: relative reduction of f below ftol",
    2: "stopped: line search found no decrease (precision limit)",
    3: "stopped: max_iter reached",
    4: "skipped: objective not finite at the start",
    5: "pruned: objective not competitive at the screening iteration",
}

Objective = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]
# keep(current objectives of all rows (S,), inf where skipped) -> (S,) bool: rows to continue.
KeepRule = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class BatchResult:
    """Per-row results of `minimize_batched`."""
    x: np.ndarray        # (S, P) final points
    fun: np.ndarray      # (S,) final objectives (inf for skipped rows)
    status: np.ndarray   # (S,) keys of STATUS
    nit: np.ndarray      # (S,) iterations per row
    nfev: int            # row-evaluations of `fun`, summed over rows


def minimize_batched(fun: Objective, x0: np.ndarray, *, lower=None, upper=None, memory: int = 10,
                     max_iter: int = 1000, gtol: float = 1e-9, ftol: float = 1e-12,
                     max_backtracks: int = 40, max_extrapolations: int = 10,
                     screen_iter: int | None = None, keep: KeepRule | None = None) -> BatchResult:
    """Minimise every row of `x0` independently (module docstring).

    Args:
      fun: vectorised objective, (S, P) -> ((S,), (S, P)); must accept any S. Parallelism, if
        any, lives inside `fun` (the fitter's objective splits rows over threads).
      x0: (S, P) starting points.
      lower, upper: optional (P,) bounds (use +-inf for none).
      memory: number of curvature pairs kept per row.
      max_iter, gtol, ftol: stopping rules (module docstring).
      max_backtracks: line-search trials before a row is declared stuck.
      max_extrapolations: step-growing trials (x4 each) when a full step still descends steeply.
      screen_iter, keep: optional pruning. After `screen_iter` iterations, `keep` sees every
        row's current objective (final for rows already stopped) and returns which rows to
        continue; active rows it rejects stop there with status 5. Their curvature history is
        not lost for the rows that go on (pruning happens inside the loop, not by a restart).
    """
    x0 = np.array(x0, dtype=float, ndmin=2)
    p = x0.shape[1]
    lo = np.full(p, -np.inf) if lower is None else np.asarray(lower, dtype=float)
    hi = np.full(p, np.inf) if upper is None else np.asarray(upper, dtype=float)
    return _run(fun, np.clip(x0, lo, hi), lo=lo, hi=hi, memory=memory, max_iter=max_iter,
                gtol=gtol, ftol=ftol, max_backtracks=max_backtracks,
                max_extrapolations=max_extrapolations, screen_iter=screen_iter, keep_rule=keep)


def _run(fun, x0, *, lo, hi, memory, max_iter, gtol, ftol, max_backtracks,
         max_extrapolations, screen_iter, keep_rule) -> BatchResult:
    s_rows, p = x0.shape
    out_x, out_f = x0.copy(), np.full(s_rows, np.inf)
    out_status = np.full(s_rows, 3)
    out_nit = np.zeros(s_rows, dtype=int)
    with np.errstate(all="ignore"):
        f, g = fun(x0)
    nfev = s_rows
    ok = np.isfinite(f) & np.all(np.isfinite(g), axis=1)
    out_status[~ok] = 4
    out_f[ok] = f[ok]
    idx = np.flatnonzero(ok)                      # rows still active
    x, f, g = x0[ok], f[ok], g[ok]
    # Curvature pairs: a ring buffer over the memory axis, with a per-row validity mask (a pair
    # that failed the curvature test is not used).
    hist_s = np.zeros((memory, idx.size, p))
    hist_y = np.zeros((memory, idx.size, p))
    rho = np.zeros((memory, idx.size))
    valid = np.zeros((memory, idx.size), dtype=bool)
    gamma = np.zeros(idx.size)                    # 0 = no pair yet: use 1/|g| (unit first step)
    c1, c2 = 1e-4, 0.9
    bounded = bool(np.isfinite(lo).any() or np.isfinite(hi).any())

    for it in range(max_iter):
        if idx.size == 0:
            break
        # Coordinates at a bound with the gradient pushing outwards are held this iteration.
        if bounded:
            held = ((x <= lo) & (g > 0)) | ((x >= hi) & (g < 0))
            gp = np.where(held, 0.0, g)
        else:
            held, gp = None, g
        fscale = np.maximum(1.0, np.abs(f))
        done = np.max(np.abs(gp), axis=1) <= gtol * fscale
        gnorm = np.sqrt(np.einsum("ij,ij->i", gp, gp))
        h0 = np.where(gamma > 0, gamma, 1.0 / np.maximum(gnorm, 1e-300))
        d = -_two_loop(gp, hist_s, hist_y, rho, valid, h0, newest=(it - 1) % memory)
        if bounded:
            d[held] = 0.0
        gd = np.einsum("ij,ij->i", g, d)
        # A direction that is not downhill means the memory went stale: restart from -h0*g.
        bad = ~(gd < 0) & ~done
        if bad.any():
            valid[:, bad] = False
            gamma[bad] = 0.0
            h0[bad] = 1.0 / np.maximum(gnorm[bad], 1e-300)
            d[bad] = -h0[bad, None] * gp[bad]
            gd[bad] = np.einsum("ij,ij->i", g[bad], d[bad])

        # Backtracking Armijo line search on the rows still moving.
        step = np.ones(idx.size)
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        pending = np.flatnonzero(~done)
        for _ in range(max_backtracks):
            if pending.size == 0:
                break
            xt = x[pending] + step[pending, None] * d[pending]
            if bounded:
                xt = np.clip(xt, lo, hi)
            with np.errstate(all="ignore"):
                ft, gt = fun(xt)
            nfev += pending.size
            moved = np.einsum("ij,ij->i", g[pending], xt - x[pending])
            accept = (ft <= f[pending] + c1 * moved) & np.isfinite(ft)
            acc = pending[accept]
            x_new[acc], f_new[acc], g_new[acc] = xt[accept], ft[accept], gt[accept]
            rej = ~accept
            if not rej.any():
                pending = pending[:0]
                break
            # Safeguarded quadratic interpolation of phi(t) = f(x + t d) from phi(0), phi'(0), phi(t).
            pr = pending[rej]
            t = step[pr]
            slope = gd[pr]
            with np.errstate(all="ignore"):
                curv = ft[rej] - f[pr] - slope * t
                t_q = -slope * t * t / (2.0 * curv)
            t_q = np.where(np.isfinite(t_q), t_q, 0.1 * t)
            step[pr] = np.clip(t_q, 0.1 * t, 0.5 * t)
            pending = pr
        stuck = np.zeros(idx.size, dtype=bool)
        stuck[pending] = True
        # Extrapolation: a full step that is accepted but still descends steeply (the curvature
        # condition of Wolfe fails) means the model is too short-sighted, typically on the
        # near-flat plateaus of a log-sum-exp (a term that has died out). Grow the step while
        # the objective keeps falling, as a Wolfe line search would.
        grow = np.flatnonzero(~done & ~stuck & (step == 1.0))
        if grow.size:
            grow = grow[np.einsum("ij,ij->i", g_new[grow], d[grow]) < c2 * gd[grow]]
        t_grow = 1.0
        for _ in range(max_extrapolations):
            if grow.size == 0:
                break
            t_grow *= 4.0
            xt = x[grow] + t_grow * d[grow]
            if bounded:
                xt = np.clip(xt, lo, hi)
            with np.errstate(all="ignore"):
                ft, gt = fun(xt)
            nfev += grow.size
            better = np.isfinite(ft) & (ft < f_new[grow])
            b_rows = grow[better]
            x_new[b_rows], f_new[b_rows], g_new[b_rows] = xt[better], ft[better], gt[better]
            # Keep growing only where the objective fell and the slope is still steep.
            steep = np.einsum("ij,ij->i", gt[better], d[b_rows]) < c2 * gd[b_rows]
            grow = b_rows[steep]

        status = np.where(done, 0, np.where(stuck, 2, -1))
        moving = status < 0
        s_vec = x_new - x
        y_vec = g_new - g
        sy = np.einsum("ij,ij->i", s_vec, y_vec)
        yy = np.einsum("ij,ij->i", y_vec, y_vec)
        keep = moving & (sy > 1e-12 * yy) & (sy > 0)
        slot = it % memory
        hist_s[slot], hist_y[slot] = s_vec, y_vec
        rho[slot] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)
        valid[slot] = keep
        gamma = np.where(keep, sy / np.where(keep, yy, 1.0), gamma)
        small = moving & (f - f_new <= ftol * np.maximum(fscale, np.abs(f_new)))
        status[small] = 1
        x, f, g = x_new, f_new, g_new          # rows that did not move kept their old values
        out_nit[idx] += 1

        finished = status >= 0
        if finished.any():
            rows = idx[finished]
            out_x[rows], out_f[rows], out_status[rows] = x[finished], f[finished], status[finished]
            live = ~finished
            idx, x, f, g = idx[live], x[live], f[live], g[live]
            hist_s, hist_y = hist_s[:, live], hist_y[:, live]
            rho, valid, gamma = rho[:, live], valid[:, live], gamma[live]
        if keep_rule is not None and it + 1 == screen_iter and idx.size:
            current = out_f.copy()
            current[idx] = f
            drop = ~np.asarray(keep_rule(current), dtype=bool)[idx]
            if drop.any():
                rows = idx[drop]
                out_x[rows], out_f[rows], out_status[rows] = x[drop], f[drop], 5
                live = ~drop
                idx, x, f, g = idx[live], x[live], f[live], g[live]
                hist_s, hist_y = hist_s[:, live], hist_y[:, live]
                rho, valid, gamma = rho[:, live], valid[:, live], gamma[live]
    # Rows still active hit max_iter (status 3 preset).
    out_x[idx], out_f[idx] = x, f
    return BatchResult(x=out_x, fun=out_f, status=out_status, nit=out_nit, nfev=nfev)


def _two_loop(g, hist_s, hist_y, rho, valid, h0, newest):
    """H g for every row by the two-loop recursion (Nocedal & Wright alg. 7.4), skipping
    invalid pairs. (The compact representation of Byrd, Nocedal & Schnabel was tried: its
    batched 10x10 solves cost 30x more than these 4m vector operations in numpy.)"""
    memory = hist_s.shape[0]
    q = g.copy()
    alphas = np.zeros((memory, g.shape[0]))
    order = [(newest - i) % memory for i in range(memory)]       # newest first
    used = [j for j in order if valid[j].any()]
    for j in used:
        a = rho[j] * np.einsum("ij,ij->i", hist_s[j], q)
        alphas[j] = a
        q -= a[:, None] * hist_y[j]
    r = h0[:, None] * q
    for j in reversed(used):                                       # oldest first
        b = rho[j] * np.einsum("ij,ij->i", hist_y[j], r)
        r += hist_s[j] * (alphas[j] - b)[:, None]
    return r
