"""The jitted train step on synthetic batches: accumulation, the non-finite guard, token accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_cpt import optim, partitioning, trainer
from t5x_cpt.model import Decoder, ModelConfig

CONFIG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)


def make_batch(seed, batch=8, length=16, num_tasks=2):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(1, CONFIG.vocab_size, (batch, length + 1)).astype(np.int32)
    weights = np.ones((batch, length), np.int32)
    weights[:, -3:] = 0  # padding
    segments = np.where(np.arange(length) < length // 2, 1, 2)[None].repeat(batch, 0).astype(np.int32) * weights
    positions = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)])[None].repeat(batch, 0)
    return {"decoder_input_tokens": tokens[:, :-1], "decoder_target_tokens": tokens[:, 1:],
            "decoder_loss_weights": weights, "decoder_segment_ids": segments,
            "decoder_positions": positions.astype(np.int32),
            "task_ids": (np.arange(batch)[:, None] % num_tasks * np.ones((1, length))).astype(np.int32)}


def setup(lr=1e-2, mesh_shape=(1, -1, 1)):
    model = Decoder(CONFIG)
    optimizer = optim.make_optimizer(optim.learning_rate_schedule(10, peak_learning_rate=lr))
    mesh = partitioning.make_mesh(*mesh_shape)
    with partitioning.activation_sharding(mesh):
        _, shardings = trainer.state_shardings(model, optimizer, mesh)
        state = trainer.init_state(trainer.random_params(model, 0, shardings.params), optimizer, shardings)
    return model, optimizer, mesh, state


def test_accumulation_matches_one_big_batch():
    model, optimizer, mesh, state = setup()
    batch = make_batch(0)
    results = []
    for accumulate in (1, 4):
        step = jax.jit(trainer.make_train_step(model, optimizer, 2, accumulate))
        with partitioning.activation_sharding(mesh):
            new_state, acc = step(state, trainer.zero_accumulators(2), batch)
        results.append((new_state, acc))
    (s1, a1), (s4, a4) = results
    assert float(a1["loss_sum"]) == pytest.approx(float(a4["loss_sum"]), rel=1e-5)
    assert float(a1["grad_norm_sum"]) == pytest.approx(float(a4["grad_norm_sum"]), rel=1e-4)
    for x, y in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_token_accounting_per_task():
    model, optimizer, mesh, state = setup()
    batch = make_batch(1)
    step = jax.jit(trainer.make_train_step(model, optimizer, 2))
    with partitioning.activation_sharding(mesh):
        _, acc = step(state, trainer.zero_accumulators(2), batch)
    weights = batch["decoder_loss_weights"]
    expected = [weights[batch["task_ids"][:, 0] == t].sum() for t in (0, 1)]
    np.testing.assert_array_equal(np.asarray(acc["tokens_per_task"]), expected)
    assert float(acc["tokens"]) == weights.sum()


def test_nonfinite_step_leaves_state_untouched_and_records_step():
    model, optimizer, mesh, state = setup()
    step = jax.jit(trainer.make_train_step(model, optimizer, 2))
    with partitioning.activation_sharding(mesh):
        state, acc = step(state, trainer.zero_accumulators(2), make_batch(2))
        poisoned = jax.tree.map(lambda x: x, state)
        bad_params = jax.tree.map(lambda x: x, poisoned.params)
        bad_params["final_norm"]["scale"] = bad_params["final_norm"]["scale"] * jnp.nan
        poisoned = poisoned.replace(params=bad_params)
        after, _ = step(poisoned, acc, make_batch(3))
    assert int(after.first_nonfinite_step) == 1  # zero-based step number of the bad step
    assert int(after.step) == 2
    # The update was skipped: params are exactly the (poisoned) inputs, the optimizer state unchanged.
    for x, y in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(poisoned.opt_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_learning_rate_schedule_shape():
    schedule = optim.learning_rate_schedule(200, peak_learning_rate=2e-4, warmup_fraction=0.05,
                                            final_learning_rate_fraction=0.1)
    values = np.array([float(schedule(s)) for s in range(200)])
    assert values.argmax() == 9  # 5% of 200 steps = 10 warm-up steps (0-based index 9 reaches the peak)
    assert values[9] == pytest.approx(2e-4)
    assert np.all(np.diff(values[:10]) > 0) and np.all(np.diff(values[10:]) <= 0)
    assert values[-1] == pytest.approx(2e-5, rel=0.02)
    with pytest.raises(optim.OptimizerConfigError, match="warmup_fraction"):
        optim.learning_rate_schedule(10, warmup_fraction=1.5)


def test_weight_decay_skips_norms():
    params = {"layer": {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}, "embed": {"embedding": jnp.ones((3, 2))}}
    optimizer = optim.make_optimizer(lambda _: 1.0, weight_decay=0.5, clip_norm=None)
    state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, state, params)
    assert float(updates["layer"]["kernel"][0, 0]) == pytest.approx(-0.5)
    assert float(updates["embed"]["embedding"][0, 0]) == pytest.approx(-0.5)
    assert float(updates["layer"]["scale"][0]) == 0.0
    everything = optim.make_optimizer(lambda _: 1.0, weight_decay=0.5, clip_norm=None, decay_every_parameter=True)
    updates, _ = everything.update(zeros, everything.init(params), params)
    assert float(updates["layer"]["scale"][0]) == pytest.approx(-0.5)
