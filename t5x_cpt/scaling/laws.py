"""Scaling laws as small declarative objects: sums of power-law terms, written in log space.

Every law here is a sum of K positive terms, each a coefficient times powers of the inputs:

    L(x) = sum_k  exp(c_k) * prod_j  X_j ** (-s_j * theta_j)

and the fitter works on its log, a log-sum-exp of terms that are *linear* in the parameters:

    log L = LSE_k( c_k - sum_j s_j * theta_j * log X_j  [+ log O_k] )

(c_k the log-coefficient, theta_j an exponent, s_j = +1 for a decaying power and -1 for a growing
one, O_k an optional per-row offset column such as a run's step-0 loss). This is the paper's
form, LSE(a - alpha log N, b - beta log D, e), written once for all laws. Linearity is what makes
the vectorised fitter cheap: every derivative of a term is a constant, a column of the table, or 1.

Parameter names. The log-space (fitting) names are lower case: `e, a, b` for log E, log A, log B,
and the exponents by name (`alpha, beta, gamma, ...`). The natural names users see are `E, A, B`
(= exp of the log names) and the exponents unchanged. For the CPT law B and beta hold B' and
beta' (the paper's notation, arXiv 2407.02118), as the CLI's JSON does.

Laws (arXiv 2407.02118; docs/scaling.md):
  chinchilla  L = E + A/N^alpha + B/D^beta
  cpt         L = E + A/N^alpha + B'/(D^beta' N^gamma)
  frontier    L = A' C^-g   (+ E' with `frontier_e`)          C = compute
  forgetting  L_src = L0 + F * C_t^phi / ((1 + K r) N)^psi    (see `forgetting_law`)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

# The compute convention C = 6 N D has one definition, in t5x_cpt.flops (free of jax imports).
from t5x_cpt.flops import FLOPS_PER_PARAM_TOKEN, scaling_compute  # noqa: F401  (re-exported)
from t5x_cpt.scaling.tables import ScalingInputError


@dataclasses.dataclass(frozen=True)
class Power:
    """One factor X ** (-sign * exponent) of a term."""
    exponent: str          # log-space parameter name of the exponent, e.g. "alpha"
    variable: str          # table column, e.g. "N"
    sign: float = 1.0      # +1: X^-theta (decays with X); -1: X^+theta (grows with X)


@dataclasses.dataclass(frozen=True)
class Term:
    """exp(coef) * prod(powers) [* offset column]; coef None means no coefficient (a fixed term)."""
    coef: str | None
    powers: tuple[Power, ...] = ()
    offset: str | None = None   # column whose value multiplies the term (enters its log additively)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """A law that is a sum of power-law terms (module docstring), with its start grid.

    Attributes:
      name: short name used in JSON (`law` key) and on the command line.
      terms: the terms of the sum.
      grid: default starting points, one sequence of values per log-space parameter (their
        product is the start grid, as Hoffmann et al. approach 3).
      formula: human-readable formula for reports.
    """
    name: str
    terms: tuple[Term, ...]
    grid: Mapping[str, Sequence[float]]
    formula: str = ""

    @property
    def param_names(self) -> tuple[str, ...]:
        """Log-space parameter names in a fixed order: coefficients first, then exponents."""
        coefs = [t.coef for t in self.terms if t.coef is not None]
        exps: list[str] = []
        for t in self.terms:
            for p in t.powers:
                if p.exponent not in exps:
                    exps.append(p.exponent)
        return tuple(coefs + exps)

    @property
    def coef_names(self) -> tuple[str, ...]:
        return tuple(t.coef for t in self.terms if t.coef is not None)

    @property
    def variables(self) -> tuple[str, ...]:
        """Table columns the law reads (inputs and offsets)."""
        out: list[str] = []
        for t in self.terms:
            for p in t.powers:
                if p.variable not in out:
                    out.append(p.variable)
            if t.offset and t.offset not in out:
                out.append(t.offset)
        return tuple(out)

    def natural_names(self) -> tuple[str, ...]:
        return tuple(natural_name(p) for p in self.param_names)

    # ---- conversions between log-space vectors and natural dicts -------------------------
    def to_natural(self, theta: Mapping[str, float]) -> dict[str, float]:
        """Log-space dict (e, a, alpha, ...) -> natural dict (E, A, alpha, ...)."""
        return {natural_name(k): (_exp_or_inf(v) if k in self.coef_names else float(v))
                for k, v in theta.items() if k in self.param_names}

    def from_natural(self, params: Mapping[str, float], names: Sequence[str] | None = None, *,
                     allow_zero: bool = False) -> dict[str, float]:
        """Natural dict (E, A, alpha, ...) -> log-space dict of `names` (default: all parameters);
        a missing value or a non-positive coefficient raises ScalingInputError. With `allow_zero`
        (prediction only) a coefficient of 0 — a fitted term that underflowed — becomes log 0 = -inf,
        which drops the term exactly."""
        out = {}
        for k in (self.param_names if names is None else names):
            nat = natural_name(k)
            if nat not in params:
                raise ScalingInputError(f"law {self.name!r} needs parameter {nat!r}; got {sorted(params)}")
            v = float(params[nat])
            if k in self.coef_names:
                if allow_zero and v == 0.0:
                    v = -math.inf
                elif not v > 0:
                    raise ScalingInputError(f"coefficient {nat} must be positive, got {v}")
                else:
                    v = math.log(v)
            out[k] = v
        return out

    # ---- prediction --------------------------------------------------------------------
    def log_predict(self, theta: Mapping[str, float], columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """log L for log-space parameters `theta` at the rows of `columns` (stable LSE)."""
        terms = [self._log_term(t, theta, columns) for t in self.terms]
        n = max(np.size(x) for x in terms)
        stack = np.stack([np.broadcast_to(x, (n,)) for x in terms])
        m = stack.max(axis=0)
        return m + np.log(np.exp(stack - m).sum(axis=0))

    def predict(self, params: Mapping[str, float], **columns) -> np.ndarray:
        """Loss predicted from natural parameters (E, A, ...) at the given columns (N=..., D=...)."""
        cols = {k: np.atleast_1d(np.asarray(v, dtype=float)) for k, v in columns.items()}
        missing = [v for v in self.variables if v not in cols]
        if missing:
            raise KeyError(f"law {self.name!r} needs inputs {missing}")
        return np.exp(self.log_predict(self.from_natural(params, allow_zero=True), cols))

    def _log_term(self, term: Term, theta, columns) -> np.ndarray:
        x = np.asarray(theta[term.coef], dtype=float) if term.coef else np.zeros(())
        for p in term.powers:
            x = x - p.sign * theta[p.exponent] * np.log(columns[p.variable])
        if term.offset:
            x = x + np.log(columns[term.offset])
        return np.asarray(x, dtype=float)

    def start_grid(self, grid: Mapping[str, Sequence[float]] | None = None,
                   fixed: Sequence[str] = ()) -> tuple[tuple[str, ...], np.ndarray]:
        """(free parameter names, starts array (S, P)) from the product of per-parameter values."""
        grid = dict(self.grid if grid is None else grid)
        names = tuple(p for p in self.param_names if p not in fixed)
        missing = [p for p in names if p not in grid]
        if missing:
            raise KeyError(f"start grid of law {self.name!r} lacks values for {missing}")
        axes = [np.asarray(grid[p], dtype=float) for p in names]
        mesh = np.meshgrid(*axes, indexing="ij")
        return names, np.stack([m.ravel() for m in mesh], axis=1)


# The largest log-coefficient whose exponential is a finite float64.
MAX_LOG_COEF = math.log(np.finfo(np.float64).max)


def _exp_or_inf(log_value: float) -> float:
    """exp(log_value), inf past float64's range: a fit the data do not constrain can run a
    coefficient off to infinity, and that must be reported (fitting.diagnose), not crash."""
    return math.exp(log_value) if log_value < MAX_LOG_COEF else math.inf


def natural_name(log_name: str) -> str:
    """e -> E, a -> A, b -> B, f -> F; exponents keep their names."""
    return log_name.upper() if log_name in _COEF_NAMES else log_name


_COEF_NAMES = ("e", "a", "b", "f")

_STEP5 = [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
_EXP_GRID = [0.0, 0.5, 1.0, 1.5, 2.0]
_E_GRID = [-1.0, -0.5, 0.0, 0.5, 1.0]

# Chinchilla (Hoffmann et al. 2022, approach 3): 6 * 6 * 5 * 5 * 5 = 4,500 starts.
CHINCHILLA = PowerLaw(
    name="chinchilla",
    terms=(Term("a", (Power("alpha", "N"),)), Term("b", (Power("beta", "D"),)), Term("e")),
    grid={"a": _STEP5, "b": _STEP5, "e": _E_GRID, "alpha": _EXP_GRID, "beta": _EXP_GRID},
    formula="L = E + A/N^alpha + B/D^beta",
)

# CPT law (arXiv 2407.02118, the extended scaling law): the data term also decays with model size, B'/(D^beta' N^gamma).
# The gamma grid spans the published value (0.08) and the scratch-data value (-0.005) with room
# either side; gamma * log N ~ +-10 is absorbed by the b grid.
CPT_GAMMA_GRID = [-0.25, 0.0, 0.25]
CPT = PowerLaw(
    name="cpt",
    terms=(Term("a", (Power("alpha", "N"),)),
           Term("b", (Power("beta", "D"), Power("gamma", "N"))),
           Term("e")),
    grid={"a": _STEP5, "b": _STEP5, "e": _E_GRID, "alpha": _EXP_GRID, "beta": _EXP_GRID,
          "gamma": CPT_GAMMA_GRID},
    formula="L = E + A/N^alpha + B'/(D^beta' * N^gamma)   (B, beta hold B', beta')",
)

# Grid for the second stage of the two-stage CPT fit (E, A, alpha frozen): 6 * 5 * 5 = 150.
CPT_STAGE2_GRID = {"b": _STEP5, "beta": _EXP_GRID, "gamma": [-0.5, -0.25, 0.0, 0.25, 0.5]}

# Loss-compute frontier L = A' C^-g, C in FLOPs (~1e17..1e24, log C ~ 40..55). Published:
# scratch 33.69907 C^-0.0579, so a = log A' ~ 3.5 and g ~ 0.06.
FRONTIER = PowerLaw(
    name="frontier",
    terms=(Term("a", (Power("g", "C"),)),),
    grid={"a": [0.0, 2.0, 4.0, 6.0, 8.0], "g": [0.0, 0.025, 0.05, 0.1, 0.2, 0.4]},
    formula="L = A' C^-g",
)
FRONTIER_E = PowerLaw(
    name="frontier_e",
    terms=(Term("a", (Power("g", "C"),)), Term("e")),
    grid={"a": [0.0, 2.0, 4.0, 6.0, 8.0], "g": [0.0, 0.05, 0.1, 0.2, 0.4], "e": _E_GRID},
    formula="L = E' + A' C^-g",
)

LAWS = {law.name: law for law in (CHINCHILLA, CPT, FRONTIER, FRONTIER_E)}


def forgetting_law(with_baseline_column: bool) -> PowerLaw:
    """The law of forgetting, for a fixed replay efficiency K (the fitter profiles K).

        L_src = L0 + F * C_t^phi / ((1 + K r) N)^psi

    L_src is the source-language loss of a CPT run, C_t its target-language compute
    (column `C`), r its replay ratio, N its size; the column `M` holds (1 + K r) N.

    Why this form. The paper's observations (arXiv 2407.02118, the replay experiments) are that without replay the
    source loss of a CPT model climbs from its starting value as target training proceeds
    (2.40 -> 3.68 nats at 1.4B), and that a small replay ratio stops the climb. The form is that
    of Bethune et al. 2025 (forgetting during fine-tuning with pre-training data injection),
    written against per-language compute as the paper plots it: the forgetting grows as a power
    of the target compute and shrinks with the model's "effective size for the source
    language", (1 + K r) N, which a replay ratio r enlarges. At r = 0 it reduces to a power law in
    target compute. L0 is the run's source loss before CPT (column `loss0`, which `collect`
    fills from the step-0 eval) or, when absent, a fitted constant E. It can only describe loss
    at or above L0; runs whose source loss falls below L0 (heavy replay) are fitted with a
    vanishing forgetting term. Revisit the form when real replay runs exist (docs/scaling.md).
    """
    base = Term(None, (), offset="loss0") if with_baseline_column else Term("e")
    forget = Term("f", (Power("phi", "C", sign=-1.0), Power("psi", "M")))
    grid = {"f": [-20.0, -10.0, 0.0, 10.0], "phi": [0.0, 0.1, 0.25, 0.5, 1.0],
            "psi": [0.0, 0.25, 0.5, 1.0]}
    if not with_baseline_column:
        grid["e"] = [0.0, 0.5, 1.0, 1.5]
    return PowerLaw(
        name="forgetting",
        terms=(base, forget),
        grid=grid,
        formula="L_src = L0 + F * C_t^phi / ((1 + K r) N)^psi",
    )


def law_from_params(params: Mapping[str, float]) -> PowerLaw:
    """The law a parameter dict describes: `law` key if present, else CPT when it has gamma."""
    name = params.get("law")
    if isinstance(name, str):
        if name in LAWS:
            return LAWS[name]
        raise ScalingInputError(f"unknown law {name!r}; known: {sorted(LAWS)}")
    return CPT if "gamma" in params else CHINCHILLA


# Published coefficients (arXiv 2407.02118, Table 2(a)); the expected *shape*, not ground truth.
PUBLISHED_SCRATCH = {"E": 1.55, "A": 420.0, "B": 719.5, "alpha": 0.40, "beta": 0.30}
PUBLISHED_CPT = {"E": 1.55, "A": 420.0, "B": 433.3, "alpha": 0.40, "beta": 0.20, "gamma": 0.08}
