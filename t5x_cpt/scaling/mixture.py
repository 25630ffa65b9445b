"""The mixture-ratio law of D-CPT (Que et al., arXiv 2406.01375), and the replay ratio it recommends.

For each language l of a CPT run that mixes a target language with replayed source language:

    L_l(N, D, r) = E + A/N^alpha + B r^eta / D^beta + C / (r + eps)^gamma

N the model size, D every training token of the run (both languages), r the fraction of those
tokens in language l: r = 1 - replay for the target language's loss, r = replay for the source
language's (the D-CPT paper's domain and general corpora). eps keeps the last term finite at
r = 0; the paper treats it as a small constant. Here it is chosen from EPSILON_GRID by the fit's
objective (profiled, as the forgetting law's K is), or fixed by the caller.

Why a module of its own and not a `laws.PowerLaw`: the source-language rows of runs without
replay have r = 0, where r^eta is 0 and its log is -inf, which the log-linear power-law fitter
cannot hold. The objective is the same as everywhere in the toolkit (Huber, delta 1e-3, on the log
of the loss), minimised by L-BFGS-B from the best points of a start grid.

With runs of one model size (a replay sweep) A/N^alpha cannot be told apart from E: the fit then
has E alone (it absorbs A/N^alpha) and predicts at that size only.

Two uses besides the fit itself:
  * `compare_held_out`: leave one replay ratio out, fit D-CPT and the project's own laws (the law
    of forgetting for the source language, and a law in target-language tokens only for the
    target, since the study finds replay costs the target nothing at equal target compute) on the
    rest, and score both on the ratio left out.
  * `recommend_replay`: at a model size and a token budget, the replay ratio that keeps the source
    language's loss within a tolerance of its loss before CPT at the least cost in target loss.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

from t5x_cpt.scaling import fitting, forgetting, laws
from t5x_cpt.scaling.tables import ScalingInputError, Table

LAW_NAME = "mixture"
FORMULA = "L = E + A/N^alpha + B r^eta / D^beta + C/(r + eps)^gamma   (Que et al., arXiv 2406.01375)"
ROLES = ("target", "source")
EPSILON_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
EXPONENT_MAX = 3.0
POLISHED_STARTS = 8
# Profiling eps: a short fit from the best few starts per candidate, then the full fit at the best.
PROFILE_STARTS, PROFILE_ITERATIONS = 2, 200
# Replay ratios the recommendation searches (a ratio of 1 would train no target language at all).
REPLAY_SEARCH = np.round(np.arange(0.0, 0.9501, 0.005), 4)


def language_ratio(table: Table, role: str) -> np.ndarray:
    """r of each row: the share of the run's tokens in the language whose loss the table holds."""
    if role not in ROLES:
        raise ScalingInputError(f"mixture role must be one of {ROLES}, got {role!r}")
    replay = table["replay_ratio"] if table.has("replay_ratio") else np.zeros(len(table))
    return 1.0 - replay if role == "target" else np.asarray(replay, dtype=float)


def total_tokens(table: Table) -> np.ndarray:
    """Every training token of each row's run: the `tokens` column, else D / (1 - replay)."""
    if table.has("tokens"):
        return np.asarray(table["tokens"], dtype=float)
    replay = table["replay_ratio"] if table.has("replay_ratio") else np.zeros(len(table))
    return np.asarray(table["D"], dtype=float) / (1.0 - replay)


class _Objective:
    """Huber on log-residuals and its gradient, in normalised units (N/N_ref, D/D_ref)."""

    def __init__(self, n, d, r, loss, eps, with_size):
        self.with_size = with_size
        self.log_n = np.log(n)
        self.log_d = np.log(d)
        self.log_r = np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), 0.0)
        self.r_zero = r <= 0
        self.log_re = np.log(r + eps)
        self.y = np.log(loss)
        self.names = ("e", "b", "eta", "beta", "c", "gamma") + (("a", "alpha") if with_size else ())

    def log_terms(self, p):
        e, b, eta, beta, c, gamma = p[:6]
        terms = [np.full_like(self.y, e),
                 np.where(self.r_zero, -np.inf, b + eta * self.log_r - beta * self.log_d),
                 c - gamma * self.log_re]
        if self.with_size:
            a, alpha = p[6:8]
            terms.append(a - alpha * self.log_n)
        return np.stack(terms)

    def __call__(self, p):
        terms = self.log_terms(p)
        top = terms.max(axis=0)
        weights = np.exp(terms - top)
        total = weights.sum(axis=0)
        weights /= total
        res = top + np.log(total) - self.y
        clipped = np.clip(res, -fitting.HUBER_DELTA, fitting.HUBER_DELTA)
        value = float(np.sum(clipped * res - 0.5 * clipped * clipped) / fitting.HUBER_DELTA)
        slope = clipped / fitting.HUBER_DELTA
        w_e, w_b, w_c = weights[0] * slope, weights[1] * slope, weights[2] * slope
        grad = [w_e.sum(), w_b.sum(), (w_b * self.log_r).sum(), -(w_b * self.log_d).sum(),
                w_c.sum(), -(w_c * self.log_re).sum()]
        if self.with_size:
            w_a = weights[3] * slope
            grad += [w_a.sum(), -(w_a * self.log_n).sum()]
        return value, np.asarray(grad)

    def residuals(self, p):
        terms = self.log_terms(p)
        top = terms.max(axis=0)
        return top + np.log(np.exp(terms - top).sum(axis=0)) - self.y


def _starts(loss_min: float, eta_values, with_size: bool) -> np.ndarray:
    axes = [np.log(loss_min * np.array([0.3, 0.6, 0.9])),       # e
            np.log([0.03, 0.3, 3.0]),                            # b
            np.asarray(eta_values, dtype=float),                 # eta
            np.array([0.1, 0.4, 1.0]),                           # beta
            np.log([0.003, 0.03, 0.3]),                          # c
            np.array([0.1, 0.5, 1.0])]                           # gamma
    if with_size:
        axes += [np.log([0.1, 1.0]), np.array([0.2, 0.6])]        # a, alpha
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _fit_at(n, d, r, loss, eps, with_size, polished=POLISHED_STARTS, max_iter=1000):
    obj = _Objective(n, d, r, loss, eps, with_size)
    # At r = 0 the B term is 0 only for eta > 0; with no such rows eta may take either sign
    # (a target language's loss falls with its own share of the tokens).
    eta_low = 0.0 if np.any(r <= 0) else -EXPONENT_MAX
    eta_values = [0.0, 0.5, 1.0] if eta_low == 0.0 else [-1.0, -0.5, 0.0, 0.5, 1.0]
    starts = _starts(float(loss.min()), eta_values, with_size)
    screened = np.array([obj(s)[0] for s in starts])
    order = np.argsort(np.where(np.isfinite(screened), screened, np.inf))[:polished]
    bounds = [(None, None), (None, None), (eta_low, EXPONENT_MAX), (0.0, EXPONENT_MAX),
              (None, None), (0.0, EXPONENT_MAX)]
    if with_size:
        bounds += [(None, None), (0.0, EXPONENT_MAX)]
    best = None
    for i in order:
        with np.errstate(all="ignore"):
            res = minimize(obj, starts[i], jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": max_iter, "ftol": 1e-12, "gtol": 1e-8})
        if np.isfinite(res.fun) and (best is None or res.fun < best.fun):
            best = res
    if best is None:
        raise ScalingInputError("mixture fit: the objective is not finite at any start")
    return obj, best


def fit_mixture(table: Table, role: str, *, epsilon: float | None = None) -> dict:
    """Fit the D-CPT law to one language's losses of CPT runs with several replay ratios.

    Args:
      table: rows of CPT runs (columns N, D, loss, replay_ratio and `tokens`, the run's tokens
        of both languages at the row; without `tokens`, D / (1 - replay) is used).
      role: 'target' when the losses are the target language's (r = 1 - replay), 'source' when
        they are the replayed source language's (r = replay).
      epsilon: the eps of the law; None chooses it from EPSILON_GRID by the objective.

    Returns the fit as a JSON-ready dict: natural parameters (E, A, alpha, B, eta, beta, C, gamma,
    epsilon), the reference units, the sizes it was fitted on, its errors and warnings.
    """
    if len(table) == 0:
        raise ScalingInputError(f"{table.source}: no rows to fit the mixture law to")
    r = language_ratio(table, role)
    n = np.asarray(table["N"], dtype=float)
    d = total_tokens(table)
    loss = np.asarray(table["loss"], dtype=float)
    sizes = sorted(set(n.tolist()))
    with_size = len(sizes) > 1
    n_params = 8 if with_size else 6
    if len(loss) <= n_params:
        raise ScalingInputError(f"{table.source}: the mixture law has {n_params} parameters (+ eps) "
                                f"and needs more points; got {len(loss)}")
    if len(set(np.round(r, 9).tolist())) < 2:
        raise ScalingInputError(f"{table.source}: the mixture law needs runs with at least two replay "
                                "ratios (r is constant in the table)")
    n_ref, d_ref = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
    candidates = [float(epsilon)] if epsilon is not None else list(EPSILON_GRID)
    if any(not e > 0 for e in candidates):
        raise ScalingInputError(f"mixture law: epsilon must be positive, got {epsilon}")
    columns = (n / n_ref, d / d_ref, r, loss)
    if len(candidates) == 1:
        trials = {candidates[0]: _fit_at(*columns, candidates[0], with_size)}
    else:
        trials = {e: _fit_at(*columns, e, with_size, PROFILE_STARTS, PROFILE_ITERATIONS) for e in candidates}
    eps = min(trials, key=lambda e: trials[e][1].fun)
    obj, res = _fit_at(*columns, eps, with_size) if len(candidates) > 1 else trials[eps]
    e, b, eta, beta, c, gamma = (float(v) for v in res.x[:6])
    params = {"E": math.exp(e), "B": math.exp(b) * d_ref ** beta, "eta": eta, "beta": beta,
              "C": math.exp(c), "gamma": gamma, "epsilon": eps}
    if with_size:
        a, alpha = (float(v) for v in res.x[6:8])
        params.update({"A": math.exp(a) * n_ref ** alpha, "alpha": alpha})
    residual = obj.residuals(res.x)
    warnings = []
    if epsilon is None and eps in (EPSILON_GRID[0], EPSILON_GRID[-1]):
        warnings.append(f"epsilon = {eps:g} is at the end of the searched grid {list(EPSILON_GRID)}")
    for name in ("eta", "beta", "gamma", "alpha"):
        if name in params and abs(abs(params[name]) - EXPONENT_MAX) < 1e-6:
            warnings.append(f"{name} = {params[name]:.3g} is at its bound {EXPONENT_MAX:g}")
    if not with_size:
        warnings.append(f"one model size ({sizes[0]:.4g}): E absorbs A/N^alpha and the fit predicts at "
                        "that size only")
    return {"law": LAW_NAME, "formula": FORMULA, "role": role, **params,
            "sizes": sizes, "reference": {"N": n_ref, "D": d_ref},
            "objective": {"huber_sum": float(res.fun), "huber_delta": fitting.HUBER_DELTA,
                          "rms_log_residual": float(np.sqrt(np.mean(residual ** 2))),
                          "mean_abs_log_residual": float(np.mean(np.abs(residual)))},
            "epsilon_profile": {f"{k:g}": float(v[1].fun) for k, v in trials.items()},
            "n_points": int(len(loss)), "replay_ratios": sorted(set(np.round(1 - r if role == "target" else r,
                                                                              9).tolist())),
            "warnings": warnings}


def predict(fit: Mapping, N, D, r) -> np.ndarray:
    """Loss a mixture fit predicts at size N, total tokens D and language share r."""
    N = np.asarray(N, dtype=float)
    D = np.asarray(D, dtype=float)
    r = np.asarray(r, dtype=float)
    for key in ("E", "B", "eta", "beta", "C", "gamma", "epsilon"):
        if key not in fit:
            raise ScalingInputError(f"the mixture fit lacks {key!r}; pass a fit made with --law=mixture")
    if "A" in fit:
        size_term = float(fit["A"]) / N ** float(fit["alpha"])
    else:
        sizes = fit.get("sizes") or []
        if sizes and not np.allclose(N, sizes[0], rtol=1e-3):
            raise ScalingInputError(f"this mixture fit was made at one size ({sizes[0]:.4g} parameters) "
                                    f"and predicts there only, not at N = {np.unique(N)}")
        size_term = 0.0
    with np.errstate(divide="ignore"):
        data_term = np.where(r > 0, float(fit["B"]) * np.where(r > 0, r, 1.0) ** float(fit["eta"])
                             / D ** float(fit["beta"]), 0.0)
    return float(fit["E"]) + size_term + data_term + float(fit["C"]) / (r + float(fit["epsilon"])) ** float(
        fit["gamma"])


# ---- the project's own laws for the same rows ----------------------------------------------
TARGET_TOKENS_LAW = laws.PowerLaw(
    name="target_tokens",
    terms=(laws.Term("b", (laws.Power("beta", "D"),)), laws.Term("e")),
    grid={"b": [0.0, 5.0, 10.0, 15.0], "beta": [0.0, 0.25, 0.5, 1.0], "e": [-1.0, 0.0, 0.5, 1.0]},
    formula="L = E + B/D_target^beta   (one size: the target loss depends on target tokens only)",
)


def fit_target_tokens(table: Table) -> fitting.Fit:
    """The project's reading of replay for the target language (arXiv 2407.02118, the replay
    experiments): its loss is a function of target-language tokens, whatever the ratio."""
    n = table["N"]
    if len(set(n.tolist())) > 1:
        return fitting.fit_law(laws.CHINCHILLA, {"N": n, "D": table["D"]}, table["loss"])
    return fitting.fit_law(TARGET_TOKENS_LAW, {"D": table["D"]}, table["loss"])


def _scores(predicted: np.ndarray, loss: np.ndarray) -> dict:
    r = np.log(predicted) - np.log(loss)
    return {"rms_log_residual": float(np.sqrt(np.mean(r ** 2))),
            "mean_abs_error": float(np.mean(np.abs(predicted - loss))),
            "max_abs_error": float(np.max(np.abs(predicted - loss))), "points": int(len(loss))}


def compare_held_out(target: Table, source: Table, held_out_ratio: float) -> dict:
    """Fit on every replay ratio but one and score both laws, per language, on that ratio.

    Args:
      target: the CPT runs' target-language losses (the sweep's runs.csv rows of CPT runs).
      source: the same runs' source-language losses (source_loss.csv), with `loss0`.
      held_out_ratio: the replay ratio left out of the fits.
    """
    out = {"held_out_replay_ratio": held_out_ratio}
    for language, table, role in (("target", target, "target"), ("source", source, "source")):
        replay = table["replay_ratio"]
        test = np.isclose(replay, held_out_ratio)
        if not test.any():
            raise ScalingInputError(f"{table.source}: no rows at replay ratio {held_out_ratio:g} to hold out "
                                    f"(ratios: {sorted(set(replay.tolist()))})")
        train, held = table.select(~test), table.select(test)
        mixture_fit = fit_mixture(train, role)
        mixture_pred = predict(mixture_fit, held["N"], total_tokens(held), language_ratio(held, role))
        if role == "target":
            own_fit = fit_target_tokens(train)
            own_pred = own_fit.predict(**{v: held[v] for v in own_fit.law.variables})
            own = {"law": own_fit.law.name, "formula": own_fit.law.formula, "params": own_fit.params}
        else:
            own_json = forgetting.fit_forgetting(train).to_json()
            loss0 = held["loss0"] if own_json.get("baseline") == "loss0 column" else None
            own_pred = forgetting.predict(own_json, held["N"], held["D"], held["replay_ratio"], loss0=loss0)
            own = {"law": "forgetting", "formula": own_json["formula"],
                   "params": {k: own_json[k] for k in ("F", "phi", "psi", "K", "E") if k in own_json}}
        out[language] = {
            "mixture": {"held_out": _scores(mixture_pred, held["loss"]),
                        "in_sample_rms_log_residual": mixture_fit["objective"]["rms_log_residual"],
                        "params": {k: mixture_fit[k] for k in ("E", "A", "alpha", "B", "eta", "beta", "C",
                                                              "gamma", "epsilon") if k in mixture_fit}},
            "own": {**own, "held_out": _scores(own_pred, held["loss"])},
        }
        better = ("mixture" if out[language]["mixture"]["held_out"]["rms_log_residual"]
                  < out[language]["own"]["held_out"]["rms_log_residual"] else "own")
        out[language]["better_on_held_out"] = better
    return out


# ---- the recommendation -------------------------------------------------------------------
def _target_loss(fit: Mapping, N: float, tokens: float, replay: np.ndarray) -> np.ndarray:
    if fit.get("law") == LAW_NAME:
        return predict(fit, N, tokens, 1.0 - replay)
    law = laws.law_from_params(fit) if fit.get("law") in (None, *laws.LAWS) else None
    if law is laws.CPT or law is laws.CHINCHILLA:
        return law.predict(fit, N=np.full_like(replay, N), D=(1.0 - replay) * tokens)
    if fit.get("law") == TARGET_TOKENS_LAW.name:
        return TARGET_TOKENS_LAW.predict(fit, D=(1.0 - replay) * tokens)
    raise ScalingInputError(f"the target fit is a {fit.get('law')!r} fit; pass a mixture fit (role target), "
                            "a CPT or a Chinchilla fit")


def _source_loss(fit: Mapping, N: float, tokens: float, replay: np.ndarray, loss0: float) -> np.ndarray:
    if fit.get("law") == LAW_NAME:
        if fit.get("role") != "source":
            raise ScalingInputError("the source fit is a mixture fit of the target language (role target); "
                                    "fit the source language's losses with --mixture_role=source")
        return predict(fit, N, tokens, replay)
    if fit.get("law") == "forgetting":
        base = loss0 if fit.get("baseline") == "loss0 column" else None
        return forgetting.predict(fit, np.full_like(replay, N), (1.0 - replay) * tokens, replay,
                                  loss0=None if base is None else np.full_like(replay, base))
    raise ScalingInputError(f"the source fit is a {fit.get('law')!r} fit; pass a mixture fit (role source) "
                            "or a forgetting fit")


def recommend_replay(target_fit: Mapping, source_fit: Mapping, *, N: float, tokens: float,
                     source_loss0: float, tolerance: float,
                     ratios: Sequence[float] = tuple(REPLAY_SEARCH)) -> dict:
    """The replay ratio that keeps the source language's loss at most `tolerance` nats above its
    loss before CPT (`source_loss0`), at the least cost in target-language loss.

    At a fixed budget of `tokens` (both languages) for a model of N parameters, every ratio r of
    `ratios` is scored with the target fit (a mixture fit, or a CPT/Chinchilla law at (1 - r)
    tokens) and the source fit (a mixture fit of the source language, or the law of forgetting);
    the recommendation is the feasible ratio with the lowest predicted target loss, and its cost
    is that loss minus the lowest target loss at any ratio searched.
    """
    if not (N > 0 and tokens > 0):
        raise ScalingInputError(f"N and tokens must be positive, got N={N}, tokens={tokens}")
    if not tolerance >= 0:
        raise ScalingInputError(f"the tolerance must be >= 0 nats, got {tolerance}")
    grid = np.asarray(sorted(set(float(r) for r in ratios)), dtype=float)
    if grid.size == 0 or grid.min() < 0 or grid.max() >= 1:
        raise ScalingInputError("replay ratios to search must lie in [0, 1)")
    target = _target_loss(target_fit, N, tokens, grid)
    source = _source_loss(source_fit, N, tokens, grid, source_loss0)
    limit = source_loss0 + tolerance
    feasible = source <= limit
    best_any = int(np.argmin(target))
    curve = [{"replay_ratio": float(r), "source_loss": float(s), "target_loss": float(t)}
             for r, s, t in zip(grid, source, target) if round(r * 100, 6) % 5 == 0 or r in (0.01,)]
    out = {"N": N, "tokens": tokens, "source_loss0": source_loss0, "tolerance": tolerance,
           "source_loss_limit": limit, "searched": [float(grid.min()), float(grid.max()), int(grid.size)],
           "curve": curve}
    if not feasible.any():
        j = int(np.argmin(source))
        return {**out, "feasible": False, "recommended_replay_ratio": None,
                "message": (f"no replay ratio up to {grid.max():g} keeps the source loss within {tolerance:g} nats "
                            f"of {source_loss0:g}; the lowest predicted is {source[j]:.4g} at r = {grid[j]:g}"),
                "lowest_source_loss": {"replay_ratio": float(grid[j]), "source_loss": float(source[j])}}
    idx = np.flatnonzero(feasible)
    k = int(idx[np.argmin(target[idx])])
    return {**out, "feasible": True, "recommended_replay_ratio": float(grid[k]),
            "predicted": {"source_loss": float(source[k]), "target_loss": float(target[k])},
            "target_loss_cost": float(target[k] - target[best_any]),
            "best_target": {"replay_ratio": float(grid[best_any]), "target_loss": float(target[best_any]),
                            "source_loss": float(source[best_any])}}
