"""Attention implementations: the start-up choice, and the same function from every kernel.

'xla' is jax.nn.dot_product_attention on an explicit mask (JAX's own reference path); the other
implementations are checked against it, outputs and gradients, on packed documents with padding,
grouped-query heads and lengths the blocks do not divide. The Pallas TPU kernel runs here in
Pallas' TPU interpret mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_cpt import attention
from t5x_cpt import model as M


@pytest.mark.parametrize("platform, dtype, expected", [
    ("cpu", jnp.float32, "chunked"),
    ("cpu", jnp.bfloat16, "chunked"),
    ("gpu", jnp.bfloat16, "cudnn"),
    ("gpu", jnp.float16, "cudnn"),
    ("gpu", jnp.float32, "xla"),  # cuDNN's fused attention has no float32 kernel
    ("tpu", jnp.bfloat16, "tpu_flash"),
    ("tpu", jnp.float32, "tpu_flash"),
    ("metal", jnp.float32, "xla"),
])
def test_default_implementation_per_platform(platform, dtype, expected):
    assert attention.default_implementation(platform, dtype) == expected


@pytest.mark.parametrize("implementation, length, expected", [
    ("tpu_flash", 2048, "tpu_flash"), ("tpu_flash", 200, "xla"), ("chunked", 200, "chunked"), ("cudnn", 200, "cudnn")])
def test_the_path_taken_at_a_sequence_length(implementation, length, expected):
    assert attention.runs_as(implementation, length) == expected


def test_none_means_this_backends_default_and_a_binding_overrides_it():
    assert jax.default_backend() == "cpu"
    assert M.ModelConfig().resolved_attention_impl == "chunked"
    assert M.ModelConfig(attention_impl="xla").resolved_attention_impl == "xla"
    with pytest.raises(M.ModelConfigError, match="attention_impl='flash'.*chunked"):
        M.ModelConfig(attention_impl="flash")


def _inputs(batch, length, heads, kv_heads, head_dim, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    query = jax.random.normal(keys[0], (batch, length, heads, head_dim), dtype)
    key = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), dtype)
    value = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), dtype)
    rng = np.random.RandomState(seed)
    segments = np.zeros((batch, length), np.int32)
    for row in range(batch):  # documents of random lengths, then padding (segment 0) at the end
        cuts = np.sort(rng.choice(np.arange(1, length - 8), size=3, replace=False))
        for doc, (start, stop) in enumerate(zip([0, *cuts], [*cuts, length - 8 * row])):
            segments[row, start:stop] = doc + 1
    return query, key, value, jnp.asarray(segments)


def _output_and_gradients(implementation, query, key, value, segments):
    def loss(q, k, v):
        out = attention.dot_product_attention(q, k, v, segments, implementation)
        # A fixed random projection, so that every output element's gradient matters.
        weights = jax.random.normal(jax.random.key(7), out.shape, jnp.float32)
        return jnp.sum(out.astype(jnp.float32) * weights)

    out = attention.dot_product_attention(query, key, value, segments, implementation)
    grads = jax.grad(loss, argnums=(0, 1, 2))(query, key, value)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("length, heads, kv_heads", [(150, 4, 2), (64, 4, 4), (200, 6, 1)])
def test_chunked_equals_xla(length, heads, kv_heads, dtype, tolerance):
    assert length % attention.CHUNKED_QUERY_BLOCK or length == attention.CHUNKED_QUERY_BLOCK  # ragged or one block
    inputs = _inputs(2, length, heads, kv_heads, 16, dtype)
    expected = _output_and_gradients("xla", *inputs)
    actual = _output_and_gradients("chunked", *inputs)
    for name, a, e in zip(("output", "d_query", "d_key", "d_value"), actual, expected):
        scale = max(1.0, float(np.abs(e).max()))
        np.testing.assert_allclose(a, e, atol=tolerance * scale, rtol=0, err_msg=name)


def test_tpu_flash_kernel_equals_xla_in_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu

    inputs = _inputs(1, 256, 4, 2, 32, jnp.float32)  # the kernel tiles by 128
    expected = _output_and_gradients("xla", *inputs)
    with pltpu.force_tpu_interpret_mode():
        actual = _output_and_gradients("tpu_flash", *inputs)
    for name, a, e in zip(("output", "d_query", "d_key", "d_value"), actual, expected):
        np.testing.assert_allclose(a, e, atol=2e-5 * max(1.0, float(np.abs(e).max())), rtol=0, err_msg=name)


def test_masking_is_exact_in_the_chunked_path():
    """A query's output depends only on earlier tokens of its own document, block edges included."""
    query, key, value, segments = _inputs(1, 150, 2, 2, 8, jnp.float32)
    base = np.asarray(attention.dot_product_attention(query, key, value, segments, "chunked"))
    position = 100  # inside the second block; its document starts before the block edge at 64
    doc = segments[0, position]
    changed = np.asarray(segments[0] != doc) | (np.arange(150) > position)
    noise = jnp.asarray(changed[None, :, None, None] * 5.0, jnp.float32)
    moved = np.asarray(attention.dot_product_attention(query, key + noise, value + noise, segments, "chunked"))
    np.testing.assert_allclose(moved[0, position], base[0, position], atol=1e-6, rtol=0)
    assert np.abs(moved[0, changed]).max() > 0  # and the noise did reach other queries


def test_decoder_gives_the_same_logits_and_gradients_with_every_cpu_implementation():
    config = M.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2)
    tokens = jax.random.randint(jax.random.key(1), (2, 100), 0, 64)
    segments = jnp.asarray(np.repeat([[1] * 40 + [2] * 60], 2, axis=0), jnp.int32)
    positions = jnp.asarray(np.repeat([list(range(40)) + list(range(60))], 2, axis=0), jnp.int32)
    params = M.Decoder(config.replace(attention_impl="xla")).init(jax.random.key(0), tokens)["params"]

    def logits_and_grad(implementation):
        decoder = M.Decoder(config.replace(attention_impl=implementation))

        def loss(p):
            return jnp.mean(decoder.apply({"params": p}, tokens, positions, segments) ** 2)

        logits = decoder.apply({"params": params}, tokens, positions, segments)
        return logits, jax.grad(loss)(params)

    logits_xla, grads_xla = logits_and_grad("xla")
    logits_chunked, grads_chunked = logits_and_grad("chunked")
    np.testing.assert_allclose(logits_chunked, logits_xla, atol=1e-5, rtol=0)
    for a, e in zip(jax.tree.leaves(grads_chunked), jax.tree.leaves(grads_xla)):
        np.testing.assert_allclose(a, e, atol=1e-6, rtol=1e-4)
