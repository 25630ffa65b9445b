"""Causal, packing-aware dot-product attention: the implementations and the start-up choice.

Every implementation computes the same function: causal attention in which a token sees only
tokens of its own packed document (equal `segment_ids`), softmax in float32, grouped-query heads
native ([batch, length, heads | kv_heads, head_dim] in, [batch, length, heads, head_dim] out).

  'xla'        jax.nn.dot_product_attention on a [batch, 1, q, k] boolean mask: the scores of the
               whole sequence are materialised. Runs everywhere.
  'chunked'    the queries in blocks of CHUNKED_QUERY_BLOCK; each block attends only to the keys
               at or before its last position, so the all-masked upper blocks are never computed,
               and the softmax is normalised after the value product (a [q, head_dim] divide
               instead of a [q, k] one). Pure XLA; the fastest path on CPUs (docs/performance.md:
               about 3x the 'xla' path's forward+backward at 8x256 tokens on 2 cores).
  'cudnn'      cuDNN's fused flash attention through jax.nn.dot_product_attention (NVIDIA GPUs,
               bfloat16/float16 only): no score matrix in memory.
  'tpu_flash'  the Pallas TPU flash-attention kernel (jax.experimental.pallas.ops.tpu), with
               segment ids; K/V heads are repeated for grouped-query attention.

`ModelConfig.attention_impl = None` (the default) means "the best the platform has":
`default_implementation` picks it from the backend the model is traced for, and
`t5x_cpt.preflight` logs the choice at start-up. A gin binding overrides it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "chunked", "cudnn", "tpu_flash")
# Queries per block of the 'chunked' path. 64 measured best at sequence 256-512 on 2 CPU cores
# (docs/performance.md); the last block is shorter when 64 does not divide the length.
CHUNKED_QUERY_BLOCK = 64
# The Pallas TPU kernel tiles the sequence in blocks of 128; shorter or ragged lengths use 'xla'.
_TPU_FLASH_BLOCK = 128
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def default_implementation(platform: str, dtype) -> str:
    """The fastest implementation for a backend ('cpu', 'gpu', 'tpu', ...) and compute dtype."""
    if platform == "tpu":
        return "tpu_flash"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"  # cuDNN's fused kernel has no float32 variant
    if platform == "cpu":
        return "chunked"
    return "xla"


def resolve_implementation(requested: str | None, dtype, platform: str | None = None) -> str:
    """`requested`, or the platform's default when None; unknown names raise ValueError."""
    if requested is None:
        return default_implementation(platform or jax.default_backend(), dtype)
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {requested!r}; expected None (automatic) or one of "
                         f"{IMPLEMENTATIONS}")
    return requested


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """Boolean [batch, 1, q, k]: causal by index and only within the same packed document."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same_doc)[:, None]


def runs_as(implementation: str, sequence_length: int) -> str:
    """The path `implementation` takes at this sequence length: 'tpu_flash' falls back to 'xla' when
    the length is not a multiple of the kernel's block."""
    if implementation == "tpu_flash" and sequence_length % _TPU_FLASH_BLOCK:
        return "xla"
    return implementation


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
                          implementation: str) -> jax.Array:
    """Causal attention within packed documents; shapes in the module docstring."""
    implementation = runs_as(implementation, query.shape[1])
    if implementation == "chunked":
        return _chunked(query, key, value, segment_ids)
    if implementation == "tpu_flash":
        return _tpu_flash(query, key, value, segment_ids)
    if implementation in ("xla", "cudnn", "tpu_flash"):
        return jax.nn.dot_product_attention(query, key, value, mask=attention_mask(segment_ids),
                                            implementation="cudnn" if implementation == "cudnn" else "xla")
    raise ValueError(f"attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")


def _chunked(query, key, value, segment_ids):
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups = heads // kv_heads
    # Heads-major once, so that each block is a plain batched matmul over contiguous rows:
    # query [batch, kv_heads, groups, length, head_dim] (each K/V head serves `groups` query
    # heads), key and value [batch, kv_heads, length, head_dim].
    query = query.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    query = query * jnp.asarray(head_dim ** -0.5, query.dtype)
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    outputs = []
    for start in range(0, length, CHUNKED_QUERY_BLOCK):
        stop = min(start + CHUNKED_QUERY_BLOCK, length)
        # Keys after `stop` are in the future of every query of this block: left out, not masked.
        scores = jnp.einsum("bkgtd,bksd->bkgts", query[:, :, :, start:stop], key[:, :, :stop],
                            preferred_element_type=jnp.float32)
        causal = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
        same_doc = segment_ids[:, start:stop, None] == segment_ids[:, None, :stop]
        scores = jnp.where((causal[None] & same_doc)[:, None, None], scores, _MASKED)
        # The max only keeps exp() in range; any constant per row gives the same softmax.
        weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True)))
        out = jnp.einsum("bkgts,bksd->bkgtd", weights.astype(value.dtype), value[:, :, :stop],
                         preferred_element_type=jnp.float32)
        outputs.append((out / weights.sum(axis=-1, keepdims=True)).astype(value.dtype))
    out = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def _tpu_flash(query, key, value, segment_ids):
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash  # TPU-only dependency

    groups = query.shape[2] // key.shape[2]
    if groups > 1:  # the kernel wants as many K/V heads as query heads
        key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
    to_heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, t, h, d] <-> [b, h, t, d]
    out = tpu_flash.flash_attention(
        to_heads_major(query), to_heads_major(key), to_heads_major(value),
        segment_ids=tpu_flash.SegmentIds(q=segment_ids, kv=segment_ids), causal=True,
        sm_scale=query.shape[-1] ** -0.5)
    return to_heads_major(out)
