"""The train step's memory estimate against XLA's own buffer assignment, and the refusal before compiling.

Oracle: `compiled.memory_analysis()` of the real jitted train step (trainer.make_train_step with
the project's AdamW, sharded as train.py shards it) on CPU. Its peak per device is
argument + output - alias + temp bytes (the state is donated, so its outputs alias its inputs).
"""

import math
import os

import gin
import jax
import jax.numpy as jnp
import pytest

from t5x_cpt import memory, optim, partitioning, trainer
from t5x_cpt.errors import UserInputError
from t5x_cpt.model import Decoder, ModelConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30
# The estimate must agree with XLA within this factor either way (measured: 0.95x .. 1.19x).
TOLERANCE = 1.25
# LLVM's optimisation level changes the machine code, not XLA's buffer assignment (checked: equal
# memory_analysis); without it each compile takes several times longer.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny_config(**changes) -> ModelConfig:
    """configs/models/tiny.gin with the vocabulary of configs/experiments/tiny_budget.gin."""
    gin.parse_config_files_and_bindings([os.path.join(REPO_ROOT, "configs", "models", "tiny.gin")],
                                        ["ModelConfig.vocab_size = 264"])
    return ModelConfig().replace(**changes)


def xla_peak_bytes(config: ModelConfig, *, global_batch: int, sequence_length: int, accumulate_steps: int,
                   mesh_shape: tuple[int, int, int]) -> int:
    """XLA's bytes per device for the compiled train step (printed with its parts)."""
    mesh = partitioning.make_mesh(*mesh_shape, devices=jax.devices()[:math.prod(mesh_shape)])
    model = Decoder(config)
    optimizer = optim.make_optimizer(optim.learning_rate_schedule(10))
    with partitioning.activation_sharding(mesh):
        params, shardings = trainer.state_shardings(model, optimizer, mesh)
        placed = lambda tree, sh: jax.tree.map(  # noqa: E731
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
        scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step)
        state = trainer.TrainState(step=scalar, params=placed(params, shardings.params),
                                   opt_state=placed(jax.eval_shape(optimizer.init, params), shardings.opt_state),
                                   first_nonfinite_step=scalar)
        accumulators = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                   sharding=partitioning.replicated(mesh)),
                                    trainer.zero_accumulators(1))
        batch_sharding = partitioning.batch_sharding(mesh)
        batch = {key: jax.ShapeDtypeStruct((global_batch, sequence_length), jnp.int32, sharding=batch_sharding)
                 for key in trainer.INPUT_KEYS}
        step = jax.jit(trainer.make_train_step(model, optimizer, 1, accumulate_steps), donate_argnums=(0, 1))
        analysis = step.lower(state, accumulators, batch).compile(FAST_COMPILE).memory_analysis()
    peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
            + analysis.temp_size_in_bytes)
    print(f"XLA: argument {analysis.argument_size_in_bytes} + output {analysis.output_size_in_bytes} "
          f"- alias {analysis.alias_size_in_bytes} + temp {analysis.temp_size_in_bytes} = {peak} bytes")
    return peak


WIDE = {"d_model": 256, "d_ff": 1024}
XLA_ATTENTION = {"attention_impl": "xla"}
CASES = {
    # name: (config changes, global batch, sequence length, accumulate steps, mesh (data, fsdp, tensor),
    #        the component that dominates at this size)
    # The materialised [T, T] scores of the 'xla' attention (the CPU default 'chunked' keeps less).
    "scores_one_device": (XLA_ATTENTION, 8, 512, 1, (1, 1, 1), "attention_scores"),
    "scores_accumulate_2_fsdp_8": (XLA_ATTENTION, 16, 512, 2, (1, 8, 1), "attention_scores"),
    "remat_full_scanned": ({**XLA_ATTENTION, "num_layers": 4, "scan_layers": True, "remat": "full"}, 8, 512, 1,
                           (1, 1, 1), "attention_scores"),
    "remat_dots_scanned": ({**XLA_ATTENTION, "num_layers": 4, "scan_layers": True, "remat": "dots"}, 8, 512, 1,
                           (1, 1, 1), "attention_scores"),
    # The blockwise 'chunked' attention: half the blocks, exponentials only; long enough that
    # its scores outweigh the logits.
    "chunked_scores": ({"attention_impl": "chunked"}, 2, 2048, 1, (1, 1, 1), "attention_scores"),
    "activations": (WIDE, 64, 64, 1, (1, 1, 1), "activations"),
    "params_one_device": ({**WIDE, "vocab_size": 8192}, 8, 8, 1, (1, 1, 1), "gradients"),
    "params_fsdp_8": ({**WIDE, "vocab_size": 8192}, 8, 8, 1, (1, 8, 1), "gathered_params"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_agrees_with_xla(name):
    changes, batch, length, accumulate, mesh_shape, dominant = CASES[name]
    config = tiny_config(**changes)
    estimate = memory.estimate_train_memory(config, global_batch=batch, sequence_length=length,
                                            accumulate_steps=accumulate,
                                            mesh_shape=dict(zip(partitioning.MESH_AXES, mesh_shape)))
    parts = estimate.components()
    assert max(parts, key=parts.get) == dominant, f"test premise: {dominant} should dominate, got {parts}"
    actual = xla_peak_bytes(config, global_batch=batch, sequence_length=length, accumulate_steps=accumulate,
                            mesh_shape=mesh_shape)
    ratio = estimate.total / actual
    print(f"{name}: estimate {estimate.total} bytes, XLA {actual} bytes, ratio {ratio:.2f}; {estimate.summary()}")
    assert 1 / TOLERANCE <= ratio <= TOLERANCE, f"{name}: estimate/XLA = {ratio:.2f}; {estimate.summary()}"


def host_memory_per_cpu_device() -> int:
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return total_kib * 1024 // len(jax.local_devices(backend="cpu"))


def test_cpu_device_memory_is_host_memory_shared_by_the_cpu_devices():
    assert len(jax.local_devices(backend="cpu")) == 8  # tests/conftest.py
    assert memory.device_memory_bytes(jax.devices()[0]) == host_memory_per_cpu_device()


class _AcceleratorStandIn:
    """What a GPU/TPU device reports (none is attached here): XLA's allocator limit."""

    platform = "gpu"
    device_kind = "stand-in"

    def memory_stats(self):
        return {"bytes_limit": 80 * GIB, "bytes_in_use": 0}


def test_accelerator_memory_is_its_allocator_limit():
    assert memory.device_memory_bytes(_AcceleratorStandIn()) == 80 * GIB


def test_issue_case_sequence_100000_is_refused_with_the_numbers():
    """The tiny model at SEQUENCE_LENGTH=100000 (BATCH_SIZE 8) must be refused before compiling."""
    config = tiny_config(attention_impl="xla")
    estimate = memory.estimate_train_memory(config, global_batch=8, sequence_length=100_000, accumulate_steps=1,
                                            mesh_shape={"data": 1, "fsdp": 1, "tensor": 1})
    # Without remat the backward pass keeps at least each layer's float32 attention probabilities.
    probabilities = config.num_layers * 8 * config.num_heads * 100_000 ** 2 * 4
    assert estimate.attention_scores >= probabilities
    device = jax.devices()[0]
    with pytest.raises(memory.MemoryBudgetError) as raised:
        memory.check_fits(estimate, device)
    assert isinstance(raised.value, UserInputError)
    message = str(raised.value)
    assert "\n" not in message
    assert f"{estimate.total / GIB:.2f} GiB" in message
    assert f"{host_memory_per_cpu_device() / GIB:.2f} GiB" in message
    assert f"attention_scores {estimate.attention_scores / GIB:.2f}" in message
    for knob in ("BATCH_SIZE", "SEQUENCE_LENGTH", "accumulate_steps", "remat", "fsdp"):
        assert knob in message


def test_tiny_run_fits():
    """configs/experiments/tiny_pretrain.gin's sizes (BATCH_SIZE 8, SEQUENCE_LENGTH 64) on the test mesh."""
    estimate = memory.estimate_train_memory(tiny_config(), global_batch=8, sequence_length=64, accumulate_steps=1,
                                            mesh_shape={"data": 1, "fsdp": 8, "tensor": 1})
    memory.check_fits(estimate, jax.devices()[0])
    assert estimate.total < 0.01 * host_memory_per_cpu_device()


def test_headroom_is_the_refusal_threshold():
    limit = 80 * GIB
    just_under = memory.MemoryEstimate(params=0, optimizer_state=0, gradients=0, gathered_params=0,
                                       activations=int(0.89 * limit), attention_scores=0, logits=0)
    just_over = memory.MemoryEstimate(params=0, optimizer_state=0, gradients=0, gathered_params=0,
                                      activations=int(0.91 * limit), attention_scores=0, logits=0)
    memory.check_fits(just_under, _AcceleratorStandIn())
    with pytest.raises(memory.MemoryBudgetError, match="80.00 GiB"):
        memory.check_fits(just_over, _AcceleratorStandIn())
    memory.check_fits(just_over, _AcceleratorStandIn(), headroom=0.95)


def test_summary_is_one_line_in_gib():
    estimate = memory.MemoryEstimate(params=GIB, optimizer_state=2 * GIB, gradients=3 * GIB, gathered_params=0,
                                     activations=GIB // 2, attention_scores=GIB // 4, logits=GIB // 100)
    summary = estimate.summary()
    assert "\n" not in summary
    assert summary.startswith("total 6.76 GiB")
    for expected in ("params 1.00", "optimizer_state 2.00", "gradients 3.00", "gathered_params 0.00",
                     "activations 0.50", "attention_scores 0.25", "logits 0.01"):
        assert expected in summary
