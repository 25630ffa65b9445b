"""Train and eval steps on a sharded TrainState.

The step never syncs with the host: losses, token counts per task and gradient norms are summed
into device-side accumulators that the loop reads only at log and checkpoint steps. A step whose
loss or gradient is not finite leaves the state untouched and records its number in
`first_nonfinite_step`, so a non-finite state can never be checkpointed; the loop stops the run
when it sees the flag.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from t5x_cpt import partitioning
from t5x_cpt.model import Decoder, abstract_params

Batch = dict[str, jax.Array]
INPUT_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
              "decoder_segment_ids", "decoder_positions", "task_ids")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    first_nonfinite_step: jax.Array  # -1 while every step so far was finite


def state_shardings(model: Decoder, optimizer: optax.GradientTransformation, mesh, rules=None):
    """(abstract unboxed params, TrainState of NamedShardings) for this model on this mesh."""
    param_shardings = partitioning.logical_to_shardings(abstract_params(model, boxed=True), mesh, rules)
    params = abstract_params(model)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    replicated = partitioning.replicated(mesh)
    opt_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                           first_nonfinite_step=replicated)
    return params, shardings


def init_state(params, optimizer, shardings: TrainState) -> TrainState:
    """A fresh TrainState (step 0, new optimizer) around existing params, placed on the mesh."""
    def build(p):
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                          first_nonfinite_step=jnp.full((), -1, jnp.int32))
    return jax.jit(build, out_shardings=shardings)(params)


def random_params(model: Decoder, seed: int, param_shardings):
    """Randomly initialised params, created directly in their shards."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    init = jax.jit(lambda rng: nn.unbox(model.init(rng, tokens)["params"]), out_shardings=param_shardings)
    return init(jax.random.key(seed))


def token_losses(model: Decoder, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy (nats) and loss weights, float32 [batch, length]."""
    logits = model.apply({"params": params}, batch["decoder_input_tokens"],
                         positions=batch["decoder_positions"], segment_ids=batch["decoder_segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
    return losses, batch["decoder_loss_weights"].astype(jnp.float32)


def zero_accumulators(num_tasks: int) -> dict[str, jax.Array]:
    return {"loss_sum": jnp.zeros((), jnp.float32), "tokens": jnp.zeros((), jnp.float32),
            "tokens_per_task": jnp.zeros((num_tasks,), jnp.float32), "grad_norm_sum": jnp.zeros((), jnp.float32),
            "steps": jnp.zeros((), jnp.float32)}


def make_train_step(model: Decoder, optimizer: optax.GradientTransformation, num_tasks: int,
                    accumulate_steps: int = 1) -> Callable:
    """(state, accumulators, batch) -> (state, accumulators), gradient accumulation inside the step.

    The loss is the mean over all non-padding tokens of the global batch, whatever the number of
    micro-batches: micro-batch gradients of the *summed* loss are added, then divided once.
    """

    def summed_loss(params, micro):
        losses, weights = token_losses(model, params, micro)
        per_task = jax.ops.segment_sum(weights.reshape(-1), micro["task_ids"].reshape(-1).clip(0, num_tasks - 1),
                                       num_segments=num_tasks)
        return jnp.sum(losses * weights), (jnp.sum(weights), per_task)

    grad_fn = jax.value_and_grad(summed_loss, has_aux=True)

    def step(state: TrainState, acc: dict, batch: Batch):
        if accumulate_steps == 1:
            (loss_sum, (count, per_task)), grads = grad_fn(state.params, batch)
        else:
            micro_batches = jax.tree.map(
                lambda x: x.reshape((accumulate_steps, x.shape[0] // accumulate_steps) + x.shape[1:]), batch)

            def body(carry, micro):
                (loss_sum, (count, per_task)), grads = grad_fn(state.params, micro)
                return jax.tree.map(jnp.add, carry, (loss_sum, count, per_task, grads)), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jnp.zeros((num_tasks,)),
                     jax.tree.map(jnp.zeros_like, state.params))
            (loss_sum, count, per_task, grads), _ = jax.lax.scan(body, zeros, micro_batches)
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss = loss_sum / denominator
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        first_bad = jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step)
        new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                               opt_state=keep(new_opt_state, state.opt_state), first_nonfinite_step=first_bad)
        safe = lambda x: jnp.where(finite, x, 0.0)  # noqa: E731
        acc = {"loss_sum": acc["loss_sum"] + safe(loss_sum), "tokens": acc["tokens"] + count,
               "tokens_per_task": acc["tokens_per_task"] + per_task,
               "grad_norm_sum": acc["grad_norm_sum"] + safe(grad_norm), "steps": acc["steps"] + 1.0}
        return new_state, acc

    return step


def make_eval_step(model: Decoder) -> Callable:
    """(params, batch) -> (summed loss, token count) of one eval batch."""

    def step(params, batch):
        losses, weights = token_losses(model, params, batch)
        return jnp.sum(losses * weights), jnp.sum(weights)

    return step
