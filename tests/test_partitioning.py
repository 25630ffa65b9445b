"""Mesh construction (one slice and several), logical-axis rules, the batch's layout over hosts,
and sharded forward/backward against one device.

Multi-slice and multi-host layouts use fake device objects carrying the attributes JAX's mesh
code reads (id, process_index, slice_index, coords, core_on_chip, platform, device_kind): a Mesh
and a NamedSharding over them compute device grids and shard indices exactly as over real TPUs.

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
from jax.sharding import Mesh, PartitionSpec

from t5x_cpt import model as M
from t5x_cpt import partitioning as P
from t5x_cpt.errors import UserInputError

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


# ----------------------------------------------------------------------------------------------
# Several slices (fake TPU devices)


class FakeDevice:
    """What mesh_utils, Mesh and NamedSharding read of a TPU device, and nothing else."""

    def __init__(self, id, process_index, slice_index, coords, platform="tpu", device_kind="TPU v4"):
        self.id, self.process_index, self.slice_index, self.coords = id, process_index, slice_index, coords
        self.core_on_chip, self.platform, self.device_kind = 0, platform, device_kind

    def __repr__(self):
        return f"FakeDevice(id={self.id}, process={self.process_index}, slice={self.slice_index})"


def fake_slices(num_slices, dims=(2, 2, 1), devices_per_process=4):
    """num_slices TPU v4 slices of dims chips each, listed slice by slice in z, y, x order as JAX does."""
    devices = []
    for s in range(num_slices):
        for z in range(dims[2]):
            for y in range(dims[1]):
                for x in range(dims[0]):
                    n = len(devices)
                    devices.append(FakeDevice(n, n // devices_per_process, s, (x, y, z)))
    return devices


def fake_hosts(num_processes, devices_per_process):
    """Devices of one slice spread over processes (for meshes built directly with Mesh)."""
    return [FakeDevice(i, i // devices_per_process, 0, (i, 0, 0), platform="cpu", device_kind="cpu")
            for i in range(num_processes * devices_per_process)]


def slices_along_data(mesh):
    return [{d.slice_index for d in mesh.devices[i].flat} for i in range(mesh.shape["data"])]


def test_two_slices_keep_fsdp_and_tensor_inside_a_slice():
    devices = fake_slices(2)
    mesh = P.make_mesh(data=1, fsdp=-1, tensor=1, dcn_data=2, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert slices_along_data(mesh) == [{0}, {1}]  # each fsdp group within one slice, data across both
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    # The same devices in any order give the same slice structure (granules come from slice_index).
    shuffled = [devices[i] for i in (5, 0, 7, 2, 4, 1, 6, 3)]
    assert slices_along_data(P.make_mesh(1, -1, 1, dcn_data=-1, devices=shuffled)) == [{0}, {1}]


def test_four_slices_with_data_fsdp_and_tensor_inside_each():
    devices = fake_slices(4, dims=(2, 2, 2))  # 4 slices x 8 chips, 2 hosts per slice
    mesh = P.make_mesh(data=2, fsdp=2, tensor=2, dcn_data=-1, devices=devices)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 2, "tensor": 2}
    assert slices_along_data(mesh) == [{0}, {0}, {1}, {1}, {2}, {2}, {3}, {3}]
    for i in range(8):  # every tensor pair and fsdp pair stays in one slice
        for j in range(2):
            assert len({d.slice_index for d in mesh.devices[i, j, :]}) == 1
            assert len({d.slice_index for d in mesh.devices[i, :, j]}) == 1
    assert "data = 4 across slices (DCN) x 2 within a slice" in P.describe_mesh(mesh)


def test_several_slices_refuse_a_wrong_dcn_data():
    devices = fake_slices(2)
    with pytest.raises(P.MeshError, match=r"dcn_data=1 but the 8 devices span 2 slice.*dcn_data=2"):
        P.make_mesh(data=2, fsdp=-1, tensor=1, devices=devices)  # no silent plain reshape
    with pytest.raises(P.MeshError, match=r"dcn_data=3 but the 8 devices span 2 slice"):
        P.make_mesh(dcn_data=3, devices=devices)
    with pytest.raises(P.MeshError, match=r"dcn_data must be a positive integer or -1 \(one per slice\), got 0"):
        P.make_mesh(dcn_data=0, devices=devices)
    with pytest.raises(P.MeshError, match=r"dcn_data=2 but the 8 devices span 1 slice"):
        P.make_mesh(dcn_data=2)  # the CPU devices form one slice
    with pytest.raises(UserInputError):  # train exits 2 with one line
        P.make_mesh(dcn_data=2)


def test_several_slices_refuse_a_per_slice_shape_that_does_not_fit():
    with pytest.raises(P.MeshError, match=r"4 devices of each of the 2 slices.*needs 8 devices but 4"):
        P.make_mesh(data=1, fsdp=8, tensor=1, dcn_data=2, devices=fake_slices(2))
    with pytest.raises(P.MeshError, match=r"4 devices of each of the 2 slices.*not divisible.*3"):
        P.make_mesh(data=1, fsdp=-1, tensor=3, dcn_data=2, devices=fake_slices(2))
    uneven = fake_slices(2)[:6]
    with pytest.raises(P.MeshError, match=r"slices differ in size.*\{0: 4, 1: 2\}"):
        P.make_mesh(dcn_data=2, devices=uneven)


def test_topology_failure_is_refused_on_several_slices_and_warned_on_one(caplog):
    holed = fake_slices(2)
    holed[3].coords = holed[7].coords = (3, 3, 0)  # not a cuboid: mesh_utils cannot lay it out
    with pytest.raises(P.MeshError, match=r"does not map onto the topology of a slice \(4 devices\)"):
        P.make_mesh(1, -1, 1, dcn_data=2, devices=holed)
    with caplog.at_level("WARNING"):
        mesh = P.make_mesh(1, -1, 1, devices=holed[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert "does not map onto the device topology" in caplog.text


def test_mesh_must_hold_every_device_once():
    half = np.asarray(jax.devices()[:4]).reshape(2, 2, 1)
    with pytest.raises(P.MeshError, match=r"holds 4 device entries but there are 8.*missing ids \[4, 5, 6, 7\]"):
        P.check_mesh_covers(Mesh(half, P.MESH_AXES))
    twice = np.asarray(jax.devices()[:4] * 2).reshape(2, 2, 2)
    with pytest.raises(P.MeshError, match=r"repeated ids \[0, 1, 2, 3\]"):
        P.check_mesh_covers(twice)
    P.check_mesh_covers(P.make_mesh(2, 2, 2))


def test_describe_mesh_and_make_mesh_logs_it(caplog):
    with caplog.at_level("INFO"):
        mesh = P.make_mesh(2, 2, 2)
    line = ("mesh data=2 fsdp=2 tensor=2 over 8 devices: 1 slice(s) x 8 devices per slice, "
            "1 process(es) x 8 devices per process")
    assert P.describe_mesh(mesh) == line
    assert line in caplog.text
    two = P.describe_mesh(P.make_mesh(1, -1, 1, dcn_data=2, devices=fake_slices(2, devices_per_process=2)))
    assert two == ("mesh data=2 fsdp=4 tensor=1 over 8 devices: 2 slice(s) x 4 devices per slice, "
                   "4 process(es) x 2 devices per process; data = 2 across slices (DCN) x 1 within a slice")


def test_dcn_data_is_gin_configurable():
    gin.parse_config(["make_mesh.dcn_data = -1", "make_mesh.data = 2"])
    assert dict(P.make_mesh().shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    gin.parse_config(["make_mesh.dcn_data = 2"])
    with pytest.raises(UserInputError, match=r"dcn_data=2 but the 8 devices span 1 slice"):
        P.make_mesh()


# ----------------------------------------------------------------------------------------------
# The batch's layout over hosts


def test_one_process_holds_the_whole_batch():
    length_on_tensor = P.logical_axis_rules(overrides=[("activation_length", "tensor")])
    for shape in ((8, 1, 1), (2, 2, 2), (1, 4, 2)):
        mesh = P.make_mesh(*shape)
        assert P.batch_shard_of_process(P.batch_sharding(mesh), (16, 12)) == (0, 1)
        assert P.batch_shard_of_process(P.batch_sharding(mesh, length_on_tensor), (16, 12)) == (0, 1)
    with pytest.raises(P.MeshError, match=r"process 1 holds no device.*\[0\]"):
        P.batch_shard_of_process(P.batch_sharding(P.make_mesh(2, 2, 2)), (16, 12), process_index=1)


def shards_of_all(mesh, global_shape, rules=None):
    sharding = P.batch_sharding(mesh, rules)
    processes = sorted({d.process_index for d in mesh.devices.flat})
    return {p: P.batch_shard_of_process(sharding, global_shape, process_index=p) for p in processes}


def test_data_axis_across_hosts_gives_each_host_its_block():
    devices = fake_hosts(4, 2)
    mesh = Mesh(np.asarray(devices).reshape(4, 2, 1), P.MESH_AXES)  # host p = data row p
    assert shards_of_all(mesh, (16, 12)) == {0: (0, 4), 1: (1, 4), 2: (2, 4), 3: (3, 4)}
    reversed_hosts = Mesh(np.asarray(devices[::-1]).reshape(4, 2, 1), P.MESH_AXES)
    assert shards_of_all(reversed_hosts, (16, 12)) == {3: (0, 4), 2: (1, 4), 1: (2, 4), 0: (3, 4)}
    fsdp_across = Mesh(np.asarray(fake_hosts(2, 4)).reshape(1, 8, 1), P.MESH_AXES)
    assert shards_of_all(fsdp_across, (16, 12)) == {0: (0, 2), 1: (1, 2)}


def test_tensor_spanning_hosts_makes_them_share_a_block():
    d = fake_hosts(4, 2)
    grid = np.empty((2, 2, 2), dtype=object)
    grid[0, :, 0], grid[0, :, 1] = d[0:2], d[2:4]  # processes 0 and 1 are the two halves of a tensor pair
    grid[1, :, 0], grid[1, :, 1] = d[4:6], d[6:8]
    mesh = Mesh(grid, P.MESH_AXES)
    assert shards_of_all(mesh, (8, 12)) == {0: (0, 2), 1: (0, 2), 2: (1, 2), 3: (1, 2)}
    assert P.check_global_batch(8, mesh, process_count=4) == 2
    # Splitting the length over that tensor axis leaves each host half of every sequence: refused.
    length_on_tensor = P.logical_axis_rules(overrides=[("activation_length", "tensor")])
    with pytest.raises(P.MeshError, match=r"process 0 holds only part of rows 0..4 of the \(8, 12\) batch"):
        shards_of_all(mesh, (8, 12), length_on_tensor)


def test_non_contiguous_rows_of_a_host_are_refused():
    d = fake_hosts(2, 4)
    interleaved = np.asarray([d[0:2], d[4:6], d[2:4], d[6:8]]).reshape(4, 2, 1)  # data rows: hosts 0,1,0,1
    mesh = Mesh(interleaved, P.MESH_AXES)
    with pytest.raises(P.MeshError, match=r"process 0 holds batch rows \[\(0, 4\), \(8, 12\)\] of 16"):
        shards_of_all(mesh, (16, 12))
    with pytest.raises(P.MeshError, match=r"not one contiguous block"):
        P.check_global_batch(16, mesh, process_count=2)


def test_blocks_must_be_equal_and_identical_or_disjoint():
    full = slice(None)
    owner = {"a": 0, "b": 1, "c": 2}.get
    unequal = {"a": (slice(0, 4), full), "b": (slice(4, 16), full)}
    with pytest.raises(P.MeshError, match=r"different sizes \{0: 4, 1: 12\}"):
        P.batch_shards(unequal, (16, 12), owner)
    overlapping = {"a": (slice(0, 8), full), "b": (slice(4, 12), full), "c": (slice(8, 16), full)}
    with pytest.raises(P.MeshError, match=r"blocks 0..8 and 4..12 overlap"):
        P.batch_shards(overlapping, (16, 12), owner)
    gap = {"a": (slice(0, 4), full), "b": (slice(8, 12), full)}
    with pytest.raises(P.MeshError, match=r"\[\(0, 4\), \(8, 12\)\] do not cover the 16 rows"):
        P.batch_shards(gap, (16, 12), owner)
    # A host's pieces may tile its block in both dimensions.
    tiled = {"a": (slice(0, 4), slice(0, 6)), "b": (slice(0, 4), slice(6, 12)),
             "c": (slice(4, 8), slice(0, 12))}
    assert P.batch_shards(tiled, (8, 12), {"a": 0, "b": 0, "c": 1}.get) == {0: (0, 2), 1: (1, 2)}


def test_slices_over_hosts_give_one_block_per_slice():
    mesh = P.make_mesh(1, -1, 1, dcn_data=2, devices=fake_slices(2))  # one host per slice
    assert shards_of_all(mesh, (8, 12)) == {0: (0, 2), 1: (1, 2)}


def test_check_global_batch_names_the_numbers():
    mesh = P.make_mesh(2, 2, 2)
    assert P.check_global_batch(16, mesh, process_count=1) == 1
    with pytest.raises(P.MeshError, match=r"global batch 6 does not divide over the 4 devices .*data=2 x fsdp=2"):
        P.check_global_batch(6, mesh, process_count=1)
    with pytest.raises(P.MeshError, match=r"global batch 0"):
        P.check_global_batch(0, mesh, process_count=1)
    with pytest.raises(P.MeshError, match=r"belong to processes \[0\] \(1\) but there are 2 processes"):
        P.check_global_batch(16, mesh, process_count=2)
    hosts = Mesh(np.asarray(fake_hosts(4, 2)).reshape(4, 2, 1), P.MESH_AXES)
    assert P.check_global_batch(16, hosts, process_count=4) == 4
    with pytest.raises(P.MeshError, match=r"global batch 12 does not divide over the 8 devices"):
        P.check_global_batch(12, hosts, process_count=4)
