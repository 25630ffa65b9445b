"""A LLaMA-family decoder in Flax linen, with every parameter and activation named by logical axes.

Why linen rather than nnx: the sharding story of this project is t5x's — layers name their
dimensions with *logical* axes ('embed', 'mlp', 'heads', ...) and one gin-bindable rules function
(`t5x_cpt.partitioning.logical_axis_rules`) maps them onto the mesh. Linen carries those names as
metadata on boxed params (`nn.with_logical_partitioning`) and on activations
(`nn.with_logical_constraint`), and its `nn.scan` / `nn.remat` lift a layer into a scanned,
rematerialised stack without changing the parameter names. Parameters are plain pytrees, which is
what orbax checkpoints and the converters in `t5x_cpt.convert` read and write.

The architecture covers LLaMA-1/2/3, Mistral and Qwen2: RMSNorm, rotary embeddings (plain,
linear-scaled or llama3-scaled), grouped-query attention, SwiGLU MLP, optional QKV bias and
tied or untied output embeddings. Packed sequences are supported through `segment_ids` (no
attention across documents) and per-token `positions` (RoPE restarts per document).

Parameter tree (unscanned; with `scan_layers=True` the per-layer subtrees are stacked under
`layers` with a leading 'layers' axis; see `stack_layer_params`):
  embed/embedding                [vocab, embed]
  layers_{i}/attention_norm/scale [embed]
  layers_{i}/attention/{query,key,value}/kernel [embed, heads|kv_heads, head_dim] (+ bias)
  layers_{i}/attention/out/kernel [heads, head_dim, embed]
  layers_{i}/mlp_norm/scale      [embed]
  layers_{i}/mlp/{gate,up}/kernel [embed, mlp];  layers_{i}/mlp/down/kernel [mlp, embed]
  final_norm/scale               [embed]
  lm_head/kernel                 [embed, vocab]   (only when embeddings are untied)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from t5x_cpt import attention as attention_lib
from t5x_cpt.errors import UserInputError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ROPE_SCALINGS = ("none", "linear", "llama3")
_RESOLVED_FIELDS = ("num_kv_heads", "head_dim", "d_ff")  # None-able fields with a `resolved_` property
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class ModelConfigError(UserInputError):
    """A ModelConfig field (usually a gin binding) has a value no decoder can be built with."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder. Size gin files bind the first block of fields.

    Gin files bind the raw fields. Five of them are not what the model uses as they stand: three
    may be None, two are dtype names. The model reads them only through `resolved_*` properties:
      num_kv_heads=None -> resolved_num_kv_heads = num_heads (multi-head attention)
      head_dim=None     -> resolved_head_dim = d_model // num_heads
      d_ff=None         -> resolved_d_ff = 4 * d_model (the project's parameter-count convention;
                           docs/model.md)
      dtype, param_dtype (names such as 'bfloat16') -> resolved_dtype, resolved_param_dtype (jnp dtypes)
    """

    # The fields that fix the parameters' names and shapes (and the function they compute): two
    # configs that agree on these can load each other's weights. Converters write exactly these
    # into model.gin; dtype, remat, scanning and the attention kernel stay the run's choice.
    ARCHITECTURE_FIELDS: ClassVar[tuple[str, ...]] = (
        "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
        "rms_norm_eps", "rope_theta", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
        "rope_high_freq_factor", "rope_original_max_position", "qkv_bias", "tie_embeddings",
    )

    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qkv_bias: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention_impl: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("num_kv_heads", "head_dim", "d_ff"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ModelConfigError(f"ModelConfig.{name}={value!r} must be a positive integer or None")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ModelConfigError(
                f"ModelConfig.num_heads={self.num_heads} does not divide d_model={self.d_model}; "
                "pick a divisor or set head_dim explicitly")
        if self.resolved_num_kv_heads <= 0 or self.num_heads % self.resolved_num_kv_heads:
            raise ModelConfigError(
                f"ModelConfig.num_kv_heads={self.num_kv_heads} must be a positive divisor of "
                f"num_heads={self.num_heads}")
        if self.resolved_head_dim % 2:
            raise ModelConfigError(
                f"ModelConfig head_dim={self.resolved_head_dim} (d_model={self.d_model}, "
                f"num_heads={self.num_heads}) must be even: rotary embeddings rotate pairs")
        if self.rope_scaling not in _ROPE_SCALINGS:
            raise ModelConfigError(f"ModelConfig.rope_scaling={self.rope_scaling!r}; expected one of {_ROPE_SCALINGS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ModelConfigError(
                    f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {sorted(_DTYPES)}")
        if self.remat not in _REMAT_POLICIES:
            raise ModelConfigError(f"ModelConfig.remat={self.remat!r}; expected one of {sorted(_REMAT_POLICIES)}")
        if self.attention_impl is not None and self.attention_impl not in attention_lib.IMPLEMENTATIONS:
            raise ModelConfigError(f"ModelConfig.attention_impl={self.attention_impl!r}; expected None (the "
                                   f"platform's fastest) or one of {attention_lib.IMPLEMENTATIONS}")

    @property
    def resolved_num_kv_heads(self) -> int:
        """Key/value heads: num_kv_heads, or num_heads when None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        """Per-head width: head_dim, or d_model // num_heads when None."""
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_d_ff(self) -> int:
        """SwiGLU hidden width: d_ff, or 4 * d_model when None."""
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def resolved_attention_impl(self) -> str:
        """attention_impl, or the fastest implementation of the default backend when None."""
        return attention_lib.resolve_implementation(self.attention_impl, self.resolved_dtype)

    @property
    def resolved_dtype(self):
        """The jnp dtype activations are computed in (from the name in `dtype`)."""
        return _DTYPES[self.dtype]

    @property
    def resolved_param_dtype(self):
        """The jnp dtype parameters are stored in (from the name in `param_dtype`)."""
        return _DTYPES[self.param_dtype]

    def architecture_differences(self, other: "ModelConfig") -> list[str]:
        """'field: mine vs other's' for every ARCHITECTURE_FIELDS entry on which the two differ.

        Empty when the weights of one fit the other. num_kv_heads, head_dim and d_ff are compared
        resolved, so head_dim=None and head_dim=d_model // num_heads are the same architecture.
        """
        return [f"{name}: {self._architecture_value(name)!r} vs {other._architecture_value(name)!r}"
                for name in self.ARCHITECTURE_FIELDS
                if self._architecture_value(name) != other._architecture_value(name)]

    def _architecture_value(self, name: str):
        if name in _RESOLVED_FIELDS:
            return getattr(self, f"resolved_{name}")
        return getattr(self, name)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair inverse frequencies of the rotary embedding, with linear or llama3 scaling.

    The llama3 rule follows Meta's reference (and transformers' `_compute_llama3_parameters`):
    wavelengths longer than original_max_position / low_freq_factor are divided by the factor,
    shorter than original_max_position / high_freq_factor are kept, and those between are
    interpolated smoothly.
    """
    dim = config.resolved_head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if config.rope_scaling == "linear":
        return inv_freq / config.rope_scaling_factor
    if config.rope_scaling == "llama3":
        factor = config.rope_scaling_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(medium, smoothed, scaled)
    return inv_freq


def rotary_tables(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(sin, cos) of shape [batch, length, head_dim] in float32 for the given token positions."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(config), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)  # half-split layout, as in transformers
    return jnp.sin(angles), jnp.cos(angles)


def rotary_lookup(positions: jax.Array, num_positions: int, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """`rotary_tables` for integer positions in [0, num_positions), looked up in constant tables.

    The model's path. Computed in the graph, the sine and cosine are fused by XLA into each of
    their consumers (queries and keys of every layer, forward and backward: 127 evaluations over
    [batch, length, head_dim] in the demo's CPU step, ~4% of its time; an optimization barrier does not
    survive XLA:CPU's pipeline). Looked up, no step evaluates them. The tables hold the float32
    angle of each position (as `rotary_tables` forms it) with its sine and cosine rounded from
    float64. A position outside the tables gives NaN, so a non-finite loss, never a wrong rotation.
    """
    inv_freq = rope_inverse_frequencies(config).astype(np.float32)
    angles = (np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq).astype(np.float64)
    angles = np.concatenate([angles, angles], axis=-1)
    positions = jnp.where(positions < 0, num_positions, positions)  # take() would wrap negatives around
    return tuple(jnp.take(jnp.asarray(table.astype(np.float32)), positions, axis=0, mode="fill", fill_value=np.nan)
                 for table in (np.sin(angles), np.cos(angles)))


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotates x [batch, length, heads, head_dim] in the half-split (rotate_half) layout."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


def _init(config: ModelConfig, *axes: str):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=config.init_std), axes)


class RMSNorm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.config.resolved_param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return normed.astype(self.config.resolved_dtype) * scale.astype(self.config.resolved_dtype)


class Projection(nn.Module):
    """x[..., in] -> [..., *out_shape] with a kernel of shape [*in_shape, *out_shape] and logical names.

    Written out rather than nn.DenseGeneral, whose flattened initialiser cannot carry per-dimension
    logical names for multi-dimensional kernels.
    """

    config: ModelConfig
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kernel = self.param("kernel", _init(cfg, *self.axes), self.in_shape + self.out_shape, cfg.resolved_param_dtype)
        # One 2-D matmul over all tokens: [batch * length, in] @ [in, out]. With [batch, length]
        # kept apart, XLA:CPU transposes the weight gradients' operands inside elementwise
        # fusions (strided writes), which cost more than the matmuls at small widths
        # (docs/performance.md). Merging leading dims is a free reshape on every backend.
        lead = x.shape[:x.ndim - len(self.in_shape)]
        flat_in = x.reshape((math.prod(lead), math.prod(self.in_shape))).astype(cfg.resolved_dtype)
        flat_kernel = kernel.reshape((math.prod(self.in_shape), math.prod(self.out_shape))).astype(cfg.resolved_dtype)
        y = jnp.dot(flat_in, flat_kernel).reshape(lead + self.out_shape)
        if self.use_bias:
            bias_axes = self.axes[len(self.in_shape):]
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, bias_axes),
                              self.out_shape, cfg.resolved_param_dtype)
            y = y + bias.astype(cfg.resolved_dtype)
        return y


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, sin, cos, segment_ids):
        cfg = self.config
        d, hd = cfg.d_model, cfg.resolved_head_dim

        def projection(name, heads, axis_name):
            return Projection(cfg, (d,), (heads, hd), ("embed", axis_name, "head_dim"), cfg.qkv_bias, name=name)

        query = projection("query", cfg.num_heads, "heads")(x)
        key = projection("key", cfg.resolved_num_kv_heads, "kv_heads")(x)
        value = projection("value", cfg.resolved_num_kv_heads, "kv_heads")(x)
        query = nn.with_logical_constraint(query, ("activation_batch", "activation_length", "activation_heads", None))
        key = nn.with_logical_constraint(key, ("activation_batch", "activation_length", "activation_kv_heads", None))
        value = nn.with_logical_constraint(value, ("activation_batch", "activation_length", "activation_kv_heads", None))
        query, key = apply_rotary(query, sin, cos), apply_rotary(key, sin, cos)
        # Grouped-query attention is native here: K/V heads are shared by num_heads // kv_heads queries.
        out = attention_lib.dot_product_attention(query, key, value, segment_ids, cfg.resolved_attention_impl)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
        return Projection(cfg, (cfg.num_heads, hd), (d,), ("heads", "head_dim", "embed"), name="out")(out)


class SwiGLU(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        d, f = cfg.d_model, cfg.resolved_d_ff
        gate = Projection(cfg, (d,), (f,), ("embed", "mlp"), name="gate")(x)
        up = Projection(cfg, (d,), (f,), ("embed", "mlp"), name="up")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
        return Projection(cfg, (f,), (d,), ("mlp", "embed"), name="down")(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm residual block. Returns (x, None) so the same class works under nn.scan."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, sin, cos, segment_ids):
        x = x + Attention(self.config, name="attention")(RMSNorm(self.config, name="attention_norm")(x), sin, cos,
                                                         segment_ids)
        x = x + SwiGLU(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, None


class Decoder(nn.Module):
    """Token ids [batch, length] -> float32 logits [batch, length, vocab].

    `positions` (default 0..length-1 in every row) restart at 0 in each packed document and must
    lie in [0, length); `segment_ids` (default one document per row) keep attention inside each
    document.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        cfg = self.config
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.resolved_dtype, param_dtype=cfg.resolved_param_dtype,
                         embedding_init=_init(cfg, "vocab", "embed"), name="embed")
        x = embed(tokens)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        sin, cos = rotary_lookup(positions, tokens.shape[1], cfg)

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, name="layers")(x, sin, cos, segment_ids)
        else:
            for i in range(cfg.num_layers):
                x, _ = layer_cls(cfg, name=f"layers_{i}")(x, sin, cos, segment_ids)

        x = RMSNorm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Projection(cfg, (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), name="lm_head")(x)
        logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits.astype(jnp.float32)


def abstract_params(model_or_config: "Decoder | ModelConfig", boxed: bool = False):
    """The model's parameters as ShapeDtypeStructs, traced abstractly (no memory is allocated).

    boxed=False: plain ShapeDtypeStructs, the tree checkpoints and converters read and write.
    boxed=True: the leaves stay in their `nn.Partitioned` boxes carrying the logical axis names,
    which `t5x_cpt.partitioning.logical_to_shardings` turns into shardings.
    The layer layout (scanned or not) and dtypes are the config's.
    """
    model = model_or_config if isinstance(model_or_config, Decoder) else Decoder(model_or_config)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    if boxed:
        return params
    # unbox(apply_constraint=False): outside jit there is no mesh to constrain to.
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
                        params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def stack_layer_params(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Unscanned layout (layers_0 .. layers_{L-1}) -> scanned layout (`layers` with a leading axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
    out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_layer)
    return out


def unstack_layer_params(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Scanned layout -> unscanned layout; inverse of `stack_layer_params`."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def convert_layer_layout(params: Mapping[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Returns params in the layout `config.scan_layers` asks for, whichever layout they are in."""
    scanned = "layers" in params
    if scanned == config.scan_layers:
        return dict(params)
    if config.scan_layers:
        return stack_layer_params(params, config.num_layers)
    return unstack_layer_params(params, config.num_layers)
