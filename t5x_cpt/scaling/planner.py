"""Planner: for a compute budget, the recommended N and D for CPT and for scratch, the predicted
target-language losses, the predicted saving, and bootstrap intervals.

Conventions (arXiv 2407.02118; docs/scaling.md):
  * C = 6 N D counts target-language tokens. With a replay ratio r, a CPT run of total budget C
    spends (1 - r) C on the target language; the paper finds replay almost free for the target
    at equal target compute, so the CPT prediction uses the CPT law at (1 - r) C.
  * The source model's own pre-training is not charged to CPT (it is assumed to exist).
  * Saving: the compute a compute-optimal scratch run needs to reach the CPT run's predicted loss,
    C_scratch(L_cpt), against the CPT budget C:  saved_fraction = 1 - C / C_scratch(L_cpt).

With `source_sizes` (sizes of the source models you have) the CPT plan picks, among those sizes,
the one with the lowest predicted loss at the budget, instead of the unconstrained N_opt.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from t5x_cpt import param_paths
from t5x_cpt.scaling import allocation, bootstrap
from t5x_cpt.scaling.laws import FLOPS_PER_PARAM_TOKEN
from t5x_cpt.scaling.tables import ScalingInputError

SCRATCH_NAMES = ("E", "A", "B", "alpha", "beta")
CPT_NAMES = ("E", "A", "B", "alpha", "beta", "gamma")


def _check(params: Mapping, names, what: str) -> dict[str, float]:
    missing = [k for k in names if k not in params]
    if missing:
        raise ScalingInputError(f"{what} lacks {missing}; it needs {list(names)}")
    return {k: float(params[k]) for k in names}


def plan_point(scratch: Mapping[str, float], cpt: Mapping[str, float], flops: float, *,
               replay_ratio: float = 0.0, source_sizes: Sequence[float] | None = None) -> dict:
    """The plan for one set of parameters (no intervals)."""
    s_opt = allocation.optimal(scratch, flops)
    c_target = (1.0 - replay_ratio) * flops
    if source_sizes:
        sizes = np.asarray(sorted(source_sizes), dtype=float)
        d = c_target / (FLOPS_PER_PARAM_TOKEN * sizes)
        losses = allocation.loss(cpt, sizes, d)
        j = int(np.argmin(losses))
        c_opt = {"flops": flops, "N_opt": float(sizes[j]), "D_opt": float(d[j]),
                 "L_opt": float(losses[j]), "tokens_per_param": float(d[j] / sizes[j])}
    else:
        c_opt = allocation.optimal(cpt, c_target)
        c_opt["flops"] = flops
    c_scr = allocation.compute_for_loss(scratch, c_opt["L_opt"])
    if not math.isfinite(c_scr):
        saved = 1.0  # scratch never reaches CPT's loss
    elif c_scr <= 0.0:
        saved = -math.inf  # scratch reaches it at no compute to speak of: CPT saves nothing
    else:
        saved = 1.0 - flops / c_scr
    return {
        "scratch": {"N": s_opt["N_opt"], "D": s_opt["D_opt"], "loss": s_opt["L_opt"],
                    "tokens_per_param": s_opt["tokens_per_param"]},
        "cpt": {"N": c_opt["N_opt"], "D_target": c_opt["D_opt"], "loss": c_opt["L_opt"],
                "tokens_per_param": c_opt["tokens_per_param"],
                "D_replay": c_opt["D_opt"] * replay_ratio / (1.0 - replay_ratio)},
        "scratch_flops_for_cpt_loss": c_scr,
        "saved_fraction": saved,
        "loss_gap": s_opt["L_opt"] - c_opt["L_opt"],
    }


def plan(scratch_json: Mapping, cpt_json: Mapping, flops: float, *, replay_ratio: float = 0.0,
         source_sizes: Sequence[float] | None = None, level: float | None = None) -> dict:
    """Plan a budget from a scratch fit and a CPT fit (JSON dicts as `fit` writes them, or
    hand-written parameters). Intervals come from the fits' stored bootstrap samples, paired
    replicate by replicate (the two fits' replicates are independent resamples of independent
    run sets, so pairing them is a valid joint resample)."""
    if not flops > 0:
        raise ScalingInputError("--flops must be positive")
    if not 0 <= replay_ratio < 1:
        raise ScalingInputError(f"--replay_ratio must be in [0, 1), got {replay_ratio}")
    if "gamma" not in cpt_json:
        raise ScalingInputError("the CPT fit has no gamma: pass a fit made with --law=cpt")
    scratch = _check(scratch_json, SCRATCH_NAMES, "the scratch fit")
    cpt = _check(cpt_json, CPT_NAMES, "the CPT fit")
    point = plan_point(scratch, cpt, flops, replay_ratio=replay_ratio, source_sizes=source_sizes)
    out = {"flops": flops, "replay_ratio": replay_ratio, **point,
           "conventions": "C = 6 N D on target-language tokens; CPT uses (1 - replay_ratio) C on "
                          "the target; source pre-training not charged"}
    if source_sizes:
        out["source_sizes"] = sorted(float(s) for s in source_sizes)
    s_samples = bootstrap.samples_as_dicts(scratch_json.get("bootstrap", {}), SCRATCH_NAMES)
    c_samples = bootstrap.samples_as_dicts(cpt_json.get("bootstrap", {}), CPT_NAMES)
    if s_samples and c_samples:
        lvl = level if level is not None else float(cpt_json["bootstrap"].get("level", 0.9))
        m = min(len(s_samples), len(c_samples))
        flat: dict[str, list[float]] = {}
        failed = 0
        for i in range(m):
            try:
                p = plan_point(s_samples[i], c_samples[i], flops, replay_ratio=replay_ratio,
                               source_sizes=source_sizes)
            except ScalingInputError:
                failed += 1
                continue
            for k, v in param_paths.flatten(p, separator=".").items():  # {"cpt": {"N": x}} -> "cpt.N"
                flat.setdefault(k, []).append(float(v))
        out["intervals"] = {k: bootstrap.percentile_interval(v, lvl) for k, v in flat.items()}
        out["interval_info"] = {"level": lvl, "replicates": m - failed, "failed": failed}
    else:
        out["intervals"] = None
        out["interval_info"] = ("no intervals: fit both laws with --bootstrap=N to get them "
                                "(the fits given carry no bootstrap samples)")
    return out
