"""The optimizer and learning-rate schedule of the study, gin-configurable.

Defaults and their sources:
  peak learning rate 2e-4, 5% linear warm-up, cosine decay     arXiv 2407.02118 (experimental setup)
  final learning rate 10% of the peak                          LLaMA-2 (Touvron et al. 2023, sec. 2.2)
  AdamW beta1 0.9, beta2 0.95, eps 1e-8, weight decay 0.1      LLaMA-2 (eps: optax default)
  global-norm gradient clipping at 1.0                         LLaMA-2
Weight decay applies to matrices only (kernels and embeddings), not to norm scales or biases,
as in most open LLaMA reproductions (e.g. levanter, MaxText); `decay_every_parameter=True` decays
everything, as `torch.optim.AdamW(model.parameters())` does (a recipe option the study measures,
docs/study.md).
"""

from __future__ import annotations

import math

import gin
import jax
import optax

from t5x_cpt.errors import UserInputError


class OptimizerConfigError(UserInputError):
    """A learning-rate schedule or optimizer binding no run can use; the message names it."""


@gin.configurable
def learning_rate_schedule(total_steps: int, peak_learning_rate: float = 2e-4, warmup_fraction: float = 0.05,
                           final_learning_rate_fraction: float = 0.1) -> optax.Schedule:
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to the floor."""
    if total_steps <= 0:
        raise OptimizerConfigError(f"the learning-rate schedule needs a positive number of steps, got {total_steps}")
    if not 0 <= warmup_fraction < 1:
        raise OptimizerConfigError(f"learning_rate_schedule.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup = max(1, int(math.ceil(warmup_fraction * total_steps))) if warmup_fraction > 0 else 0
    decay_steps = max(1, total_steps - warmup)
    cosine = optax.cosine_decay_schedule(peak_learning_rate, decay_steps, alpha=final_learning_rate_fraction)
    if warmup == 0:
        return cosine
    # Warm-up starts at peak/warmup rather than 0 so that the first step already trains.
    ramp = optax.linear_schedule(peak_learning_rate / warmup, peak_learning_rate, warmup - 1) if warmup > 1 \
        else optax.constant_schedule(peak_learning_rate)
    return optax.join_schedules([ramp, cosine], [warmup])


def _decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) in ("kernel", "embedding"), params)


@gin.configurable
def make_optimizer(schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1, clip_norm: float | None = 1.0,
                   decay_every_parameter: bool = False) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; `schedule` gives the learning rate per step."""
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=None if decay_every_parameter else _decay_mask))
    return optax.chain(*parts)
