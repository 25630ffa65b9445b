"""Per-device memory of one train step, estimated before compiling, and the check that it fits.

Without this check an absurd size (say the tiny model at sequence length 100,000) compiles for
minutes and then dies inside XLA with an allocation failure that names no setting. The estimate
is a sum of components, each per device:

  params            the parameters in `param_dtype`, sharded as the logical-axis rules say
                    (`t5x_cpt.partitioning.logical_axis_rules`; a mesh axis that does not divide
                    a dimension replicates it, as `partitioning.logical_to_shardings` does);
  optimizer_state   AdamW's two moments, each the size of the parameters (`t5x_cpt.optim`);
  gradients         the gradient and two more trees of its size that are alive at the update
                    (the clipped gradient / AdamW's update, the new moments the non-finite guard
                    of `trainer.make_train_step` selects from); with accumulate_steps > 1 the
                    scan's accumulator is the gradient, and the micro-batch gradient beside it
                    is free again by the update, so the count does not change;
  gathered_params   FSDP: the weights all-gathered over the mesh axes that also split the batch,
                    in the compute dtype. XLA keeps each gathered weight from the forward to the
                    backward pass, so unscanned layers hold all of theirs at once; a scanned
                    stack gathers one layer per iteration;
  activations       what the backward pass keeps per layer under `ModelConfig.remat`, for one
                    micro-batch (global_batch / accumulate_steps rows, split over the mesh axes
                    'activation_batch' maps to), plus the step's input batch;
  attention_scores  the [rows, heads, T, T] tensors of `jax.nn.dot_product_attention`'s XLA
                    implementation (masked logits, exponentials and probabilities in float32,
                    plus the boolean mask), per layer that keeps them; about a third of that
                    for 'chunked' (blocks below the diagonal only); none for 'cudnn' and 'tpu_flash';
  logits            the [rows, T, vocab] float32 logits (or the exponentials the cross-entropy
                    keeps in their place) and their gradient.

What the backward pass keeps per layer follows the residuals JAX's autodiff saves for
`t5x_cpt.model.DecoderLayer` (`jax.ad_checkpoint.print_saved_residuals`):
  remat='none'  everything: both norms' float32 intermediates, the residual adds, q, k, v and the
                attention output, the SwiGLU gate/up/silu/product, and the attention scores;
  remat='dots'  the layer input and the outputs of the projections (q, k, v, out, gate, up,
                down); one layer's remainder, scores included, is recomputed at a time;
  remat='full'  the layer input only; one whole layer is recomputed at a time.
The recomputation only lowers the peak when XLA schedules it late. With `scan_layers=True` it
does (measured on XLA:CPU); without it XLA:CPU runs the recomputation early and saves nothing
(measured at 1, 2 and 4 layers), so there the estimate is low for unscanned remat. Accelerators
were not measured.

tests/test_memory.py compares the total with XLA's own `compiled.memory_analysis()` of the real
train step on CPU, at sizes where activations, attention scores and parameters dominate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from t5x_cpt import attention as attention_lib
from t5x_cpt import partitioning
from t5x_cpt.errors import UserInputError
from t5x_cpt.model import ModelConfig, abstract_params

GIB = 2 ** 30
FLOAT32_BYTES = 4
INT32_BYTES = 4
NUM_INPUT_ARRAYS = 6  # trainer.INPUT_KEYS: tokens, targets, weights, segments, positions, task ids

# Per-layer saved tensors, in units of one [rows, T, width] tensor, from the residual list above.
NORM_FLOAT32_TENSORS_PER_LAYER = 4  # two RMSNorms, each keeps x*rsqrt and the scaled output
RESIDUAL_ADDS_PER_LAYER = 2
MLP_HIDDEN_TENSORS_NO_REMAT = 6  # gate, up, three silu intermediates, gate*up
ATTENTION_SCORE_FLOAT32_TENSORS = 3  # masked logits, exp, probabilities
# The 'chunked' attention keeps its exponentials (normalised after the value product) and, for
# part of the blocks, the masked logits: 1.5 fits XLA's buffers within 12% at T = 512 and 2048.
CHUNKED_SCORE_FLOAT32_TENSORS = 1.5
GRADIENT_SIZED_BUFFERS = 3  # see "gradients" in the module docstring
LOGITS_FLOAT32_TENSORS = 2  # the logits (or the exp the cross-entropy keeps in their place) and their gradient


class MemoryBudgetError(UserInputError):
    """The train step cannot fit in the device's memory; the message names the numbers and the knobs."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per device of one train step, by component (module docstring)."""

    params: int
    optimizer_state: int
    gradients: int
    gathered_params: int
    activations: int
    attention_scores: int
    logits: int

    @property
    def total(self) -> int:
        return sum(self.components().values())

    def components(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def summary(self) -> str:
        """One line: every component and the total in GiB, 2 decimals."""
        parts = [f"{name} {value / GIB:.2f}" for name, value in self.components().items()]
        return f"total {self.total / GIB:.2f} GiB (" + ", ".join(parts) + ")"


def _mesh_axes(rules: Any, logical_name: str) -> tuple[str, ...]:
    mapped = dict(rules).get(logical_name)
    if mapped is None:
        return ()
    return tuple(mapped) if isinstance(mapped, (tuple, list)) else (mapped,)


def _split(dim: int, mesh_axes: tuple[str, ...], mesh_shape: Mapping[str, int]) -> int:
    """The per-device length of `dim` sharded over `mesh_axes`, skipping axes that do not divide it
    (the rule of `partitioning.logical_to_shardings`)."""
    factor = 1
    for name in mesh_axes:
        size = int(mesh_shape.get(name, 1))
        if dim % (factor * size) == 0:
            factor *= size
    return dim // factor


def _param_bytes(config: ModelConfig, mesh_shape: Mapping[str, int], rules: Any) -> tuple[int, int]:
    """(bytes of the parameter shards one device stores, bytes of the weights FSDP gathers for use)."""
    batch_axes = set(_mesh_axes(rules, "activation_batch"))
    compute = np.dtype(config.resolved_dtype).itemsize
    boxed = abstract_params(config, boxed=True)
    stored = gathered = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        value, names = (leaf.value, leaf.names) if isinstance(leaf, nn.Partitioned) else (leaf, (None,) * leaf.ndim)
        axes = [_mesh_axes(rules, name) if name else () for name in names]
        local = [_split(dim, a, mesh_shape) for dim, a in zip(value.shape, axes)]
        # A weight split over an axis that also splits the batch is gathered whole before its matmul.
        in_use = [_split(dim, tuple(x for x in a if x not in batch_axes), mesh_shape)
                  for dim, a in zip(value.shape, axes)]
        stored += math.prod(local) * np.dtype(value.dtype).itemsize
        if in_use != local:
            elements = math.prod(in_use)
            if config.scan_layers and getattr(path[0], "key", None) == "layers":
                elements //= config.num_layers
            gathered += elements * compute
    return stored, gathered


def estimate_train_memory(config: ModelConfig, *, global_batch: int, sequence_length: int, accumulate_steps: int,
                          mesh_shape: Mapping[str, int], rules: Any = None,
                          platform: str | None = None) -> MemoryEstimate:
    """Bytes per device of one train step of `config` (see the module docstring for the model).

    mesh_shape maps mesh axis names ('data', 'fsdp', 'tensor') to sizes, e.g. `dict(mesh.shape)`;
    rules are the logical-axis rules (default: the gin-configured `partitioning.logical_axis_rules()`);
    platform ('cpu', 'gpu', 'tpu'; default: this process's backend) decides which attention
    implementation `attention_impl=None` stands for.
    """
    rules = partitioning.logical_axis_rules() if rules is None else rules
    compute = np.dtype(config.resolved_dtype).itemsize

    param_bytes, gathered_bytes = _param_bytes(config, mesh_shape, rules)

    def split(dim: int, logical_name: str) -> int:
        return _split(dim, _mesh_axes(rules, logical_name), mesh_shape)

    batch_devices = math.prod(int(mesh_shape.get(a, 1)) for a in _mesh_axes(rules, "activation_batch"))
    rows = math.ceil(global_batch / accumulate_steps / batch_devices)  # of one micro-batch
    length = split(sequence_length, "activation_length")
    tokens = rows * length
    d = split(config.d_model, "activation_embed")
    head_dim = config.resolved_head_dim
    heads = split(config.num_heads, "activation_heads")
    query_width = heads * head_dim
    kv_width = split(config.resolved_num_kv_heads, "activation_kv_heads") * head_dim
    mlp = split(config.resolved_d_ff, "activation_mlp")
    vocab = split(config.vocab_size, "activation_vocab")

    # Bytes per token that one layer keeps for the backward pass, by what is saved.
    everything = (NORM_FLOAT32_TENSORS_PER_LAYER * d * FLOAT32_BYTES
                  + (RESIDUAL_ADDS_PER_LAYER * d + 2 * query_width + 2 * kv_width
                     + MLP_HIDDEN_TENSORS_NO_REMAT * mlp) * compute)
    projections = (3 * d + query_width + 2 * kv_width + 2 * mlp) * compute  # input, out, down; q k v; gate up
    layer_input = d * compute
    scores = heads * sequence_length * (ATTENTION_SCORE_FLOAT32_TENSORS * FLOAT32_BYTES + 1)
    attention_impl = attention_lib.resolve_implementation(config.attention_impl, config.resolved_dtype, platform)
    if attention_impl in ("cudnn", "tpu_flash"):
        scores = heads * FLOAT32_BYTES  # the fused kernels keep only the softmax statistics
    elif attention_impl == "chunked":  # only the blocks at or below the diagonal exist
        blocks = math.ceil(sequence_length / attention_lib.CHUNKED_QUERY_BLOCK)
        scores = heads * sequence_length * (CHUNKED_SCORE_FLOAT32_TENSORS * FLOAT32_BYTES + 1) * \
            (blocks + 1) / (2 * blocks)

    layers = config.num_layers
    if config.remat == "none":
        per_token, score_layers = layers * everything, layers
    elif config.remat == "dots":
        per_token, score_layers = layers * projections + (everything - projections), 1
    else:
        per_token, score_layers = layers * layer_input + everything, 1
    # Outside the layers: the embedding output and the final norm's float32 intermediates.
    per_token += d * compute + 2 * d * FLOAT32_BYTES
    input_bytes = NUM_INPUT_ARRAYS * INT32_BYTES * math.ceil(global_batch / batch_devices) * length

    return MemoryEstimate(
        params=param_bytes,
        optimizer_state=2 * param_bytes,  # AdamW's two moments, in the parameters' dtype
        gradients=GRADIENT_SIZED_BUFFERS * param_bytes,
        gathered_params=gathered_bytes,
        activations=tokens * per_token + input_bytes,
        attention_scores=score_layers * tokens * scores,
        logits=LOGITS_FLOAT32_TENSORS * tokens * vocab * FLOAT32_BYTES,
    )


def device_memory_bytes(device: Any) -> int | None:
    """The memory one device may allocate: XLA's `bytes_limit` on GPU/TPU; on CPU the host's
    physical memory shared by the process's CPU devices; None when neither is known."""
    stats = device.memory_stats()  # None on CPU
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if getattr(device, "platform", None) == "cpu":
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
        return host // max(1, len(jax.local_devices(backend="cpu")))
    return None


def check_fits(estimate: MemoryEstimate, device: Any, *, headroom: float = 0.9) -> None:
    """Raises MemoryBudgetError when the estimate exceeds `headroom` of the device's memory.

    Does nothing when the device's memory is unknown.
    """
    available = device_memory_bytes(device)
    if available is None:
        logging.info("the memory of %s is unknown: the memory estimate is not checked", device)
        return
    if estimate.total <= headroom * available:
        return
    raise MemoryBudgetError(
        f"the train step needs an estimated {estimate.total / GIB:.2f} GiB per device but "
        f"{getattr(device, 'device_kind', device)} has {available / GIB:.2f} GiB "
        f"(the check allows {headroom:.0%} of it); estimate in GiB: "
        + ", ".join(f"{name} {value / GIB:.2f}" for name, value in estimate.components().items())
        + ". Reduce BATCH_SIZE or SEQUENCE_LENGTH, raise train.accumulate_steps, set ModelConfig.remat "
          "('dots' or 'full', with ModelConfig.scan_layers=True) or ModelConfig.attention_impl='cudnn' on GPU, "
          "or shard over more devices (make_mesh.fsdp)")
