"""Mesh construction, logical-axis rules, and sharded forward/backward against one device.

Tolerance of the sharded comparisons: 1e-5 absolute in float32 (logits and gradients are of
order 0.1 to 1; sharding only changes the order of additions in the reductions).
"""
import functools

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from t5x_cpt import model as M
from t5x_cpt import partitioning as P

ATOL = 1e-5


def test_eight_fake_devices():
    assert jax.device_count() == 8


# ----------------------------------------------------------------------------------------------
# Mesh shapes


@pytest.mark.parametrize("sizes,expected", [
    ((-1, 1, 1), (8, 1, 1)),
    ((1, -1, 1), (1, 8, 1)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 4, -1), (1, 4, 2)),
    ((2, 2, 2), (2, 2, 2)),
])
def test_resolve_mesh_shape_fills_one_axis(sizes, expected):
    assert P.resolve_mesh_shape(*sizes, num_devices=8) == expected


def test_resolve_mesh_shape_errors_name_the_values():
    with pytest.raises(ValueError, match=r"needs 4 devices but 8"):
        P.resolve_mesh_shape(2, 2, 1, num_devices=8)
    with pytest.raises(ValueError, match=r"needs 16 devices but 8"):
        P.resolve_mesh_shape(2, 4, 2, num_devices=8)
    with pytest.raises(ValueError, match=r"at most one.*'data'.*'fsdp'"):
        P.resolve_mesh_shape(-1, -1, 1, num_devices=8)
    with pytest.raises(ValueError, match=r"8 devices.*not divisible.*3"):
        P.resolve_mesh_shape(3, -1, 1, num_devices=8)
    with pytest.raises(ValueError, match=r"'tensor': 0"):
        P.resolve_mesh_shape(1, -1, 0, num_devices=8)


def test_make_mesh_axes_and_errors():
    mesh = P.make_mesh(2, -1, 2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}  # Explicit axes break linen's constraints
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    with pytest.raises(ValueError, match=r"'data': 3.*'fsdp': 1.*'tensor': 1.*needs 3 devices but 8"):
        P.make_mesh(3, 1, 1)
    small = P.make_mesh(data=-1, fsdp=1, tensor=2, devices=jax.devices()[:4])
    assert dict(small.shape) == {"data": 2, "fsdp": 1, "tensor": 2}


def test_make_mesh_is_gin_configurable():
    gin.parse_config(["make_mesh.data = 4", "make_mesh.fsdp = 1", "make_mesh.tensor = -1"])
    assert dict(P.make_mesh().shape) == {"data": 4, "fsdp": 1, "tensor": 2}


# ----------------------------------------------------------------------------------------------
# Rules


def test_default_rules_match_the_design():
    rules = dict(P.logical_axis_rules())
    assert rules["activation_batch"] == ("data", "fsdp")
    assert rules["embed"] == "fsdp"
    for name in ("heads", "kv_heads", "mlp", "vocab"):
        assert rules[name] == "tensor", name
    for name in ("head_dim", "norm", "layers", "activation_length", "activation_embed"):
        assert rules[name] is None, name
    assert P.batch_sharding(P.make_mesh(2, 2, 2)).spec == PartitionSpec(("data", "fsdp"), None)


def test_rule_overrides_replace_defaults_in_place():
    rules = P.logical_axis_rules(overrides=[("embed", None), ("activation_length", ["tensor"]),
                                            ("new_axis", ("data", "fsdp"))])
    as_dict = dict(rules)
    assert as_dict["embed"] is None
    assert as_dict["activation_length"] == ("tensor",)  # gin lists become tuples
    assert as_dict["new_axis"] == ("data", "fsdp")
    assert as_dict["mlp"] == "tensor"  # untouched
    assert [name for name, _ in rules][:3] == ["vocab", "embed", "mlp"]  # order (= priority) kept


def test_rule_overrides_from_gin_change_shardings():
    gin.parse_config("logical_axis_rules.overrides = [('embed', None), ('mlp', 'fsdp')]")
    mesh = P.make_mesh(1, 4, 2)
    boxed = {"w": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 128), jnp.float32), ("embed", "mlp"))}
    assert P.logical_to_shardings(boxed, mesh)["w"].spec == PartitionSpec(None, "fsdp")


def test_rule_override_with_unknown_mesh_axis_names_it():
    with pytest.raises(ValueError, match=r"'model'.*mesh axes are \('data', 'fsdp', 'tensor'\)"):
        P.logical_axis_rules(overrides=[("mlp", "model")])
    with pytest.raises(ValueError, match=r"'pipe'"):
        P.logical_axis_rules(overrides=[("activation_batch", ("data", "pipe"))])


def test_indivisible_dimensions_are_replicated():
    mesh = P.make_mesh(1, 2, 4)
    tree = {
        "ok": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 8, 16), jnp.float32), ("embed", "heads", "head_dim")),
        "three_heads": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 3, 16), jnp.float32),
                                               ("embed", "heads", "head_dim")),
        "plain": jnp.zeros((5,)),
    }
    shardings = P.logical_to_shardings(tree, mesh)
    assert shardings["ok"].spec == PartitionSpec("fsdp", "tensor", None)
    assert shardings["three_heads"].spec == PartitionSpec("fsdp", None, None)
    assert shardings["plain"].spec == PartitionSpec()


# ----------------------------------------------------------------------------------------------
# Sharded forward and gradient


def tiny(**changes):
    base = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                tie_embeddings=False)
    base.update(changes)
    return M.ModelConfig(**base)


def numpy_params(boxed_params, seed=0):
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        return 1.0 + 0.1 * noise if jax.tree_util.keystr(path).endswith("['scale']") else 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(boxed_params))


def loss_fn(config):
    def loss(params, tokens, segment_ids):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits = M.Decoder(config).apply({"params": params}, tokens, positions, segment_ids)
        targets = jnp.roll(tokens, -1, axis=1)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
        return jnp.mean(nll), logits

    return jax.value_and_grad(loss, has_aux=True)


@functools.lru_cache(maxsize=None)
def setup(scan_layers: bool):
    cfg = tiny(scan_layers=scan_layers)
    boxed = jax.eval_shape(M.Decoder(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = numpy_params(boxed)
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, 64, (8, 12)).astype(np.int32)
    segments = np.repeat(np.array([[1] * 5 + [2] * 7]), 8, axis=0)
    (loss, logits), grads = jax.jit(loss_fn(cfg))(params, tokens, segments)  # one device, no mesh
    assert jax.tree.leaves(grads)[0].sharding.num_devices == 1
    return cfg, boxed, params, tokens, segments, (np.asarray(loss), np.asarray(logits), jax.tree.map(np.asarray, grads))


def _sharded_axes(array):
    """Mesh axes of size > 1 that an array's sharding splits it over."""
    sharding = array.sharding
    return {a for entry in sharding.spec for a in (entry if isinstance(entry, tuple) else (entry,))
            if a is not None and sharding.mesh.shape[a] > 1}


@pytest.mark.parametrize("shape,scan_layers", [((8, 1, 1), False), ((2, 2, 2), False), ((1, 4, 2), False),
                                               ((1, 4, 2), True)])
def test_sharded_forward_and_gradient_equal_single_device(shape, scan_layers):
    cfg, boxed, params, tokens, segments, (ref_loss, ref_logits, ref_grads) = setup(scan_layers)
    data, fsdp, tensor = shape
    mesh = P.make_mesh(*shape)
    shardings = P.logical_to_shardings(boxed, mesh)
    lead = (None,) if scan_layers else ()
    layer = shardings["layers"] if scan_layers else shardings["layers_0"]
    assert layer["mlp"]["gate"]["kernel"].spec == PartitionSpec(*lead, "fsdp", "tensor")
    assert layer["attention"]["out"]["kernel"].spec == PartitionSpec(*lead, "tensor", None, "fsdp")

    sharded_params = jax.device_put(params, shardings)
    # The parameters really are split (a replicated run would pass the comparison trivially).
    gate = (sharded_params["layers"]["mlp"]["gate"]["kernel"] if scan_layers
            else sharded_params["layers_0"]["mlp"]["gate"]["kernel"])
    assert gate.addressable_shards[0].data.shape == ((2,) if scan_layers else ()) + (32 // fsdp, 48 // tensor)
    embedding = sharded_params["embed"]["embedding"]
    assert embedding.addressable_shards[0].data.shape == (64 // tensor, 32 // fsdp)

    batch = P.batch_sharding(mesh)
    tokens_s, segments_s = jax.device_put(tokens, batch), jax.device_put(segments, batch)
    assert tokens_s.addressable_shards[0].data.shape == (8 // (data * fsdp), 12)
    with P.activation_sharding(mesh):
        step = jax.jit(loss_fn(cfg), out_shardings=((P.replicated(mesh), None), shardings))
        (loss, logits), grads = step(sharded_params, tokens_s, segments_s)

    # Activations follow the rules: logits' batch over data+fsdp, vocab over tensor.
    assert _sharded_axes(logits) == {a for a, n in zip(("data", "fsdp", "tensor"), shape) if n > 1}
    assert grads["embed"]["embedding"].sharding == shardings["embed"]["embedding"]

    np.testing.assert_allclose(np.asarray(loss), ref_loss, atol=ATOL)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=ATOL, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=0), grads, ref_grads)
