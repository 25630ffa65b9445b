"""The decoder: masking, RoPE, GQA, a transformers oracle, scan/remat layouts, dtypes, bad configs.

Tolerances: float32 comparisons of two computations of the same function use 1e-5 absolute on
logits of magnitude ~1 (different summation order only); the transformers oracle uses 1e-4
(different kernels, same float32 maths); bfloat16 against float32 is checked against a bound that
scales with bf16's 8-bit mantissa (see the test).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_cpt import attention
from t5x_cpt import model as M

VOCAB = 64


def tiny(**changes) -> M.ModelConfig:
    """A GQA model small enough to compile in about a second: 4 query heads, 2 KV heads, untied."""
    base = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                tie_embeddings=False)
    base.update(changes)
    return M.ModelConfig(**base)


@functools.lru_cache(maxsize=None)
def forward(config: M.ModelConfig):
    """A jitted (params, tokens, positions, segment_ids) -> logits, compiled once per config."""
    return jax.jit(lambda p, t, pos, seg: M.Decoder(config).apply({"params": p}, t, pos, seg))


@functools.lru_cache(maxsize=None)
def init_params(config: M.ModelConfig, seed: int = 0):
    """Random params of the model's own tree (shapes from an abstract init), drawn with numpy.

    Faster than compiling the model's initialisers, and norm scales are 1 + noise so that a copy
    that mixes up norms cannot pass by accident.
    """
    boxed = jax.eval_shape(M.Decoder(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1.0 + 0.1 * noise)
        return jnp.asarray(0.05 * noise)  # a little larger than init_std: logits of order 1

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(boxed)["params"])


def run(config, params, tokens, positions=None, segment_ids=None):
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    return np.asarray(forward(config)(params, tokens, jnp.asarray(positions, jnp.int32),
                                      jnp.asarray(segment_ids, jnp.int32)))


def random_tokens(shape, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, shape).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Masking


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
    cfg = tiny()
    params = init_params(cfg)
    tokens = random_tokens((2, 16))
    base = run(cfg, params, tokens)
    for cut in (1, 7, 15):
        changed = tokens.copy()
        changed[:, cut:] = (changed[:, cut:] + 1 + np.arange(16 - cut)) % VOCAB
        out = run(cfg, params, changed)
        np.testing.assert_allclose(out[:, :cut], base[:, :cut], atol=1e-5, rtol=0)
        # ... while the changed positions do see the change (the test can tell).
        assert np.abs(out[:, cut:] - base[:, cut:]).max() > 1e-3


def test_segment_mask_isolates_packed_documents():
    cfg = tiny()
    params = init_params(cfg)
    first, second = random_tokens((1, 6), seed=1), random_tokens((1, 10), seed=2)
    packed = np.concatenate([first, second], axis=1)
    segments = np.array([[1] * 6 + [2] * 10])
    positions = np.array([list(range(6)) + list(range(10))])
    base = run(cfg, params, packed, positions, segments)

    # Changing the first document leaves the second one's logits alone (and vice versa).
    other_first = (packed.copy() + np.array([[5] * 6 + [0] * 10])) % VOCAB
    out = run(cfg, params, other_first, positions, segments)
    np.testing.assert_allclose(out[:, 6:], base[:, 6:], atol=1e-5, rtol=0)
    assert np.abs(out[:, :6] - base[:, :6]).max() > 1e-3
    other_second = (packed.copy() + np.array([[0] * 6 + [3] * 10])) % VOCAB
    out = run(cfg, params, other_second, positions, segments)
    np.testing.assert_allclose(out[:, :6], base[:, :6], atol=1e-5, rtol=0)

    # Each packed document gives the logits it gives alone.
    np.testing.assert_allclose(base[:, :6], run(cfg, params, first), atol=1e-5, rtol=0)
    np.testing.assert_allclose(base[:, 6:], run(cfg, params, second), atol=1e-5, rtol=0)

    # Without the segment ids the second document would see the first: the mask is what isolates it.
    leaky = run(cfg, params, packed, positions, np.ones_like(segments))
    assert np.abs(leaky[:, 6:] - base[:, 6:]).max() > 1e-3


def test_attention_mask_against_explicit_loops():
    segments = np.array([[1, 1, 2, 2, 2, 0], [3, 3, 3, 3, 3, 3]])
    mask = np.asarray(attention.attention_mask(jnp.asarray(segments)))
    assert mask.shape == (2, 1, 6, 6)
    for b in range(2):
        for q in range(6):
            for k in range(6):
                assert mask[b, 0, q, k] == (k <= q and segments[b, q] == segments[b, k])


# ----------------------------------------------------------------------------------------------
# RoPE


def _rotate(x, position, config):
    """x [head_dim] rotated at one position, via the model's own tables and rotation."""
    sin, cos = M.rotary_tables(jnp.asarray([[position]], jnp.float32), config)
    return np.asarray(M.apply_rotary(jnp.asarray(x, jnp.float32)[None, None, None, :], sin, cos))[0, 0, 0]


def test_rope_scores_depend_only_on_relative_position():
    cfg = M.ModelConfig(d_model=64, num_heads=4)  # head_dim 16
    rng = np.random.RandomState(0)
    q, k = rng.standard_normal(16), rng.standard_normal(16)
    for m, n in ((5, 2), (0, 7), (30, 30)):
        score = _rotate(q, m, cfg) @ _rotate(k, n, cfg)
        for shift in (1, 13, 1000):
            shifted = _rotate(q, m + shift, cfg) @ _rotate(k, n + shift, cfg)
            np.testing.assert_allclose(shifted, score, atol=1e-4, rtol=1e-4)
    # A different relative offset gives a different score: the rotation is not the identity.
    assert abs(_rotate(q, 5, cfg) @ _rotate(k, 2, cfg) - _rotate(q, 6, cfg) @ _rotate(k, 2, cfg)) > 1e-3


def test_rope_preserves_norm_and_position_zero_is_identity():
    cfg = M.ModelConfig(d_model=64, num_heads=4)
    x = np.random.RandomState(1).standard_normal(16)
    for position in (0, 1, 17, 4095):
        np.testing.assert_allclose(np.linalg.norm(_rotate(x, position, cfg)), np.linalg.norm(x), rtol=1e-5)
    np.testing.assert_allclose(_rotate(x, 0, cfg), x, atol=1e-6)


def test_rope_matches_the_complex_number_definition():
    """Half-split layout: pair (x_i, x_{i+d/2}) is the complex number x_i + i x_{i+d/2} times e^{i p w_i}."""
    cfg = M.ModelConfig(d_model=64, num_heads=4, rope_theta=500.0)
    x = np.random.RandomState(2).standard_normal(16)
    position = 11
    w = 1.0 / 500.0 ** (np.arange(0, 16, 2) / 16)
    z = (x[:8] + 1j * x[8:]) * np.exp(1j * position * w)
    np.testing.assert_allclose(_rotate(x, position, cfg), np.concatenate([z.real, z.imag]), atol=1e-5)


@pytest.mark.parametrize("scaling", ["none", "llama3"])
def test_rotary_lookup_matches_the_computed_tables_and_refuses_positions_beyond_them(scaling):
    """The model's constant tables give what `rotary_tables` computes, for packed positions."""
    cfg = M.ModelConfig(d_model=64, num_heads=4, rope_scaling=scaling, rope_scaling_factor=8.0,
                        rope_original_max_position=64)
    positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 4], [5, 6, 7, 0, 1, 2, 0, 1]])  # two packed rows
    looked_up, computed = M.rotary_lookup(positions, 8, cfg), M.rotary_tables(positions, cfg)
    for a, b in zip(looked_up, computed):
        assert a.shape == b.shape == (2, 8, 16) and a.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    sin, cos = M.rotary_lookup(jnp.asarray([[7, 8, -1]]), 8, cfg)  # 8 and -1 lie outside a table of 8
    assert np.isfinite(np.asarray(sin)[0, 0]).all() and np.isnan(np.asarray(sin)[0, 1:]).all()
    assert np.isnan(np.asarray(cos)[0, 1:]).all()


def test_linear_rope_scaling_equals_positions_divided_by_factor():
    plain = M.ModelConfig(d_model=64, num_heads=4)
    scaled = plain.replace(rope_scaling="linear", rope_scaling_factor=4.0)
    positions = jnp.asarray([[0, 1, 5, 100, 2047]])
    sin_s, cos_s = M.rotary_tables(positions, scaled)
    sin_p, cos_p = M.rotary_tables(positions.astype(jnp.float32) / 4.0, plain)
    np.testing.assert_allclose(np.asarray(sin_s), np.asarray(sin_p), atol=1e-5)
    np.testing.assert_allclose(np.asarray(cos_s), np.asarray(cos_p), atol=1e-5)
    assert np.abs(np.asarray(sin_s) - np.asarray(M.rotary_tables(positions, plain)[0])).max() > 1e-2


def _numpy_llama3(head_dim, theta, factor, low, high, old_len):
    """An independent transcription of Meta's llama3 `apply_scaling`, in float64."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    out = []
    for f in inv_freq:
        wavelen = 2 * np.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return np.array(out)


@pytest.mark.parametrize("head_dim,theta,factor,low,high,old_len", [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2
    (16, 10000.0, 4.0, 2.0, 8.0, 64),      # tiny, all three bands
])
def test_llama3_rope_scaling_matches_transformers(head_dim, theta, factor, low, high, old_len):
    cfg = M.ModelConfig(d_model=head_dim * 2, num_heads=2, rope_theta=theta, rope_scaling="llama3",
                        rope_scaling_factor=factor, rope_low_freq_factor=low, rope_high_freq_factor=high,
                        rope_original_max_position=old_len)
    ours = M.rope_inverse_frequencies(cfg)
    reference = _numpy_llama3(head_dim, theta, factor, low, high, old_len)
    np.testing.assert_allclose(ours, reference, rtol=1e-12)
    plain = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    kept, divided = np.isclose(ours, plain, rtol=1e-9), np.isclose(ours, plain / factor, rtol=1e-9)
    assert kept.any() and divided.any() and (~kept & ~divided).any(), "the case should hit all three bands"

    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf_config = transformers.LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": old_len})
    hf_inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, None)
    assert attention_factor == 1.0
    np.testing.assert_allclose(ours, hf_inv_freq.double().numpy(), rtol=1e-6)  # transformers: float32


# ----------------------------------------------------------------------------------------------
# Grouped-query attention


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg = tiny(num_heads=4, num_kv_heads=2)
    mha_cfg = gqa_cfg.replace(num_kv_heads=None)
    gqa = init_params(gqa_cfg)
    groups = gqa_cfg.num_heads // gqa_cfg.resolved_num_kv_heads

    def widen(path, x):
        name = jax.tree_util.keystr(path)
        if ("['key']" in name or "['value']" in name) and name.endswith("['kernel']"):
            return np.repeat(np.asarray(x), groups, axis=1)  # query head h reads kv head h // groups
        return x

    mha = jax.tree_util.tree_map_with_path(widen, gqa)
    assert mha["layers_0"]["attention"]["key"]["kernel"].shape == (32, 4, 8)
    tokens = random_tokens((2, 12), seed=3)
    np.testing.assert_allclose(run(mha_cfg, mha, tokens), run(gqa_cfg, gqa, tokens), atol=1e-5, rtol=0)

    # Tiling instead of repeating pairs the wrong heads: the comparison above is not vacuous.
    tiled = jax.tree_util.tree_map_with_path(
        lambda p, x: np.tile(np.asarray(x), (1, groups, 1)) if widen(p, x) is not x else x, gqa)
    assert np.abs(run(mha_cfg, tiled, tokens) - run(gqa_cfg, gqa, tokens)).max() > 1e-4


# ----------------------------------------------------------------------------------------------
# transformers oracle


def _copy_into_our_tree(state: dict, config: M.ModelConfig) -> dict:
    """A transformers Llama/Qwen2 state dict -> our param tree (the layout of the module docstring)."""
    w = {k: v.detach().double().numpy().astype(np.float32) for k, v in state.items()}
    d, hd = config.d_model, config.resolved_head_dim
    params = {"embed": {"embedding": w["model.embed_tokens.weight"]},
              "final_norm": {"scale": w["model.norm.weight"]}}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": w["lm_head.weight"].T}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attention = {}
        kv = config.resolved_num_kv_heads
        for ours, theirs, heads in (("query", "q_proj", config.num_heads), ("key", "k_proj", kv),
                                    ("value", "v_proj", kv)):
            attention[ours] = {"kernel": w[p + f"self_attn.{theirs}.weight"].T.reshape(d, heads, hd)}
            if config.qkv_bias:
                attention[ours]["bias"] = w[p + f"self_attn.{theirs}.bias"].reshape(heads, hd)
        attention["out"] = {"kernel": w[p + "self_attn.o_proj.weight"].T.reshape(config.num_heads, hd, d)}
        params[f"layers_{i}"] = {
            "attention_norm": {"scale": w[p + "input_layernorm.weight"]},
            "attention": attention,
            "mlp_norm": {"scale": w[p + "post_attention_layernorm.weight"]},
            "mlp": {name: {"kernel": w[p + f"mlp.{name}_proj.weight"].T} for name in ("gate", "up", "down")},
        }
    return params


def _randomise_norms(torch, model):
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                tensor.add_(0.1 * torch.randn_like(tensor))


@pytest.mark.parametrize("rope", ["none", "llama3"])
def test_matches_transformers_llama(rope):
    import torch
    import transformers
    torch.manual_seed(0)
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    ours = dict(rope_theta=10000.0)
    if rope == "llama3":
        rope_parameters = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        ours.update(rope_scaling="llama3", rope_scaling_factor=4.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_position=32)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=rope_parameters,
        max_position_embeddings=64, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_config).float().eval()
    _randomise_norms(torch, hf)
    cfg = tiny(rms_norm_eps=1e-5, **ours)
    params = _copy_into_our_tree(hf.state_dict(), cfg)
    tokens = random_tokens((2, 24), seed=4)
    with torch.no_grad():
        expected = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(run(cfg, params, tokens), expected, atol=1e-4, rtol=0)


def test_matches_transformers_qwen2_with_qkv_bias_and_tied_embeddings():
    import torch
    import transformers
    torch.manual_seed(1)
    hf_config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, max_position_embeddings=64,
        use_sliding_window=False, attn_implementation="eager")
    hf = transformers.Qwen2ForCausalLM(hf_config).float().eval()
    _randomise_norms(torch, hf)
    cfg = tiny(qkv_bias=True, tie_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0)
    params = _copy_into_our_tree(hf.state_dict(), cfg)
    assert "lm_head" not in params
    tokens = random_tokens((2, 24), seed=5)
    with torch.no_grad():
        expected = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(run(cfg, params, tokens), expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# Parameter tree, scan, remat, dtypes


def test_param_tree_shapes_and_logical_names_follow_the_docstring():
    cfg = tiny(qkv_bias=True)
    boxed = M.abstract_params(cfg, boxed=True)
    expected = {
        "embed/embedding": ((VOCAB, 32), ("vocab", "embed")),
        "layers_1/attention_norm/scale": ((32,), ("norm",)),
        "layers_1/attention/query/kernel": ((32, 4, 8), ("embed", "heads", "head_dim")),
        "layers_1/attention/query/bias": ((4, 8), ("heads", "head_dim")),
        "layers_1/attention/key/kernel": ((32, 2, 8), ("embed", "kv_heads", "head_dim")),
        "layers_1/attention/value/bias": ((2, 8), ("kv_heads", "head_dim")),
        "layers_1/attention/out/kernel": ((4, 8, 32), ("heads", "head_dim", "embed")),
        "layers_1/mlp/gate/kernel": ((32, 48), ("embed", "mlp")),
        "layers_1/mlp/down/kernel": ((48, 32), ("mlp", "embed")),
        "final_norm/scale": ((32,), ("norm",)),
        "lm_head/kernel": ((32, VOCAB), ("embed", "vocab")),
    }
    flat = {"/".join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
    for name, (shape, names) in expected.items():
        assert flat[name].value.shape == shape, name
        assert tuple(flat[name].names) == names, name
    assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in flat.values())
    assert len(flat) == 3 + 2 * 12  # embed, final norm, lm_head + 12 tensors per layer (with biases)

    # Unboxed: the same tree of plain ShapeDtypeStructs, in the config's param_dtype.
    plain = M.abstract_params(M.Decoder(cfg.replace(param_dtype="bfloat16")))
    plain_flat = {"/".join(k.key for k in path): leaf
                  for path, leaf in jax.tree_util.tree_flatten_with_path(plain)[0]}
    assert set(plain_flat) == set(flat)
    for name, leaf in plain_flat.items():
        assert type(leaf) is jax.ShapeDtypeStruct, name
        assert leaf.shape == flat[name].value.shape and leaf.dtype == jnp.bfloat16, name


def test_architecture_differences_compare_what_fixes_the_weights():
    base = tiny()
    assert base.architecture_differences(base.replace(dtype="bfloat16", remat="full", scan_layers=True)) == []
    # None-able sizes are compared resolved: head_dim None and d_model // num_heads are one architecture.
    assert M.ModelConfig(d_model=64, num_heads=4).architecture_differences(
        M.ModelConfig(d_model=64, num_heads=4, head_dim=16, num_kv_heads=4, d_ff=256)) == []
    assert base.architecture_differences(base.replace(d_ff=64, tie_embeddings=True)) == \
        ["d_ff: 48 vs 64", "tie_embeddings: False vs True"]
    assert "dtype" not in M.ModelConfig.ARCHITECTURE_FIELDS and "scan_layers" not in M.ModelConfig.ARCHITECTURE_FIELDS


@functools.lru_cache(maxsize=None)
def loss_and_grad(config: M.ModelConfig):
    """Jitted params, tokens -> ((next-token loss, logits), grads), compiled once per config."""

    def loss(params, tokens):
        logits = M.Decoder(config).apply({"params": params}, tokens)
        targets = jnp.roll(tokens, -1, axis=1)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)
        return jnp.mean(nll), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("scan,remat", [(True, "none"), (False, "dots"), (True, "full")])
def test_scan_and_remat_equal_the_plain_model(scan, remat):
    plain_cfg = tiny()
    variant_cfg = plain_cfg.replace(scan_layers=scan, remat=remat)
    params = init_params(plain_cfg)
    variant_params = M.convert_layer_layout(params, variant_cfg)
    if scan:
        # Same tree, shapes and logical names as the scanned model's own init (leading 'layers' axis).
        boxed = jax.eval_shape(M.Decoder(variant_cfg).init, jax.random.key(0),
                               jnp.zeros((1, 8), jnp.int32))["params"]
        assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(variant_params)
        for a, b in zip(jax.tree.leaves(nn.unbox(boxed)), jax.tree.leaves(variant_params)):
            assert a.shape == b.shape
        kernel = boxed["layers"]["mlp"]["gate"]["kernel"]
        assert tuple(kernel.names) == ("layers", "embed", "mlp") and kernel.value.shape == (2, 32, 48)
        restored = M.convert_layer_layout(variant_params, plain_cfg)
        jax.tree.map(np.testing.assert_array_equal, restored, params)

    tokens = jnp.asarray(random_tokens((2, 10), seed=6))
    # Remat leaves values alone, so check that it is there at all: a checkpoint in the traced program.
    jaxpr = str(jax.make_jaxpr(loss_and_grad(variant_cfg))(variant_params, tokens))
    assert ("checkpoint" in jaxpr or "remat" in jaxpr) == (remat != "none")
    assert (" scan[" in jaxpr or "scan(" in jaxpr) == scan
    (plain_loss, plain_logits), plain_grads = loss_and_grad(plain_cfg)(params, tokens)
    (variant_loss, variant_logits), variant_grads = loss_and_grad(variant_cfg)(variant_params, tokens)
    np.testing.assert_allclose(variant_logits, plain_logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(variant_loss, plain_loss, atol=1e-6)
    variant_grads = M.convert_layer_layout(jax.tree.map(np.asarray, variant_grads), plain_cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), variant_grads, plain_grads)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(plain_grads)) > 1e-3  # gradients are not ~0


def test_bfloat16_compute_is_close_to_float32():
    f32_cfg = tiny()
    params = init_params(f32_cfg)
    tokens = random_tokens((2, 16), seed=7)
    reference = run(f32_cfg, params, tokens)
    # bf16 activations carry ~3 significant digits; a few layers of rounding stay well inside 5e-2
    # relative to the logits' scale, while a wrong computation differs by the scale itself.
    scale = np.abs(reference).max()
    out = run(f32_cfg.replace(dtype="bfloat16"), params, tokens)
    assert out.dtype == np.float32
    assert np.abs(out - reference).max() <= 5e-2 * scale
    assert np.abs(out - reference).max() > 0  # bf16 really ran

    bf16_cfg = f32_cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    abstract = jax.eval_shape(M.Decoder(bf16_cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(abstract))} == {jnp.dtype(jnp.bfloat16)}
    cast = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    out = run(bf16_cfg, cast, tokens)
    assert np.isfinite(out).all()
    assert np.abs(out - reference).max() <= 5e-2 * scale


# ----------------------------------------------------------------------------------------------
# Config validation


def test_heads_must_divide_d_model():
    with pytest.raises(M.ModelConfigError, match=r"num_heads=5\b.*d_model=64\b"):
        M.ModelConfig(d_model=64, num_heads=5)
    assert M.ModelConfig(d_model=64, num_heads=5, head_dim=16).resolved_head_dim == 16  # explicit head_dim is fine


def test_kv_heads_must_divide_heads():
    with pytest.raises(M.ModelConfigError, match=r"num_kv_heads=3\b.*num_heads=4\b"):
        M.ModelConfig(d_model=64, num_heads=4, num_kv_heads=3)
    with pytest.raises(M.ModelConfigError, match=r"num_kv_heads=0\b"):
        M.ModelConfig(d_model=64, num_heads=4, num_kv_heads=0)


@pytest.mark.parametrize("field,value", [("rope_scaling", "yarn"), ("dtype", "float64"), ("remat", "some"),
                                         ("d_model", 0), ("num_layers", -1)])
def test_other_bad_fields_name_the_value(field, value):
    with pytest.raises(M.ModelConfigError, match=rf"ModelConfig\.{field}\W.*{value!r}"):
        M.ModelConfig(**{field: value})


def test_head_dim_must_be_even_for_rope():
    with pytest.raises(M.ModelConfigError, match=r"head_dim=9\b.*d_model=36\b.*num_heads=4\b"):
        M.ModelConfig(d_model=36, num_heads=4)


@pytest.mark.parametrize("field,value", [("num_kv_heads", 2.0), ("head_dim", 0), ("d_ff", -4)])
def test_optional_sizes_must_be_positive_integers(field, value):
    with pytest.raises(M.ModelConfigError, match=rf"ModelConfig\.{field}={value!r}"):
        M.ModelConfig(d_model=64, num_heads=4, **{field: value})
