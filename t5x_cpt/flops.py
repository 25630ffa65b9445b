"""The one definition of parameter counts, training FLOPs and hardware peaks.

Training, `model_info`, sweeps and the scaling fits all read their numbers from here.

Parameter count N: every parameter of the model, embeddings and norms included. With the
project's ladder convention (vocabulary 32,000, SwiGLU hidden 4*d_model, tied embeddings) this is
16*L*d^2 + 32000*d + (2L+1)*d, the paper's listed counts plus the norms (docs/model.md).

Training FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B):
    6 * N  +  12 * L * n_heads * head_dim * T
The first term is the forward and backward matmuls of every weight (2 FLOPs per multiply-add,
x3 for forward + backward); the second is the attention score and value products, QK^T and AV,
at full sequence length T (the causal half is not subtracted, as in PaLM and MaxText). The
input embedding lookup costs no FLOPs, but its tied output projection does, so counting the
embedding once in N is exact for tied models; an untied model counts both matrices.

The scaling laws use the paper's C = 6 N D (arXiv 2407.02118, compute-optimal allocation;
docs/scaling.md); `scaling_compute` is that number.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # keeps `import t5x_cpt.flops` free of jax/flax for the scaling tools
    from t5x_cpt.model import ModelConfig


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of `t5x_cpt.model.Decoder` built from `config`."""
    d, heads, kv, hd = config.d_model, config.num_heads, config.resolved_num_kv_heads, config.resolved_head_dim
    attention = d * heads * hd + 2 * d * kv * hd + heads * hd * d
    if config.qkv_bias:
        attention += heads * hd + 2 * kv * hd
    mlp = 3 * d * config.resolved_d_ff
    per_layer = attention + mlp + 2 * d
    embedding = config.vocab_size * d
    output = 0 if config.tie_embeddings else config.vocab_size * d
    total = config.num_layers * per_layer + embedding + output + d
    return {
        "params": total,
        "non_embedding_params": total - embedding - output,
        "embedding_params": embedding + output,
        "params_per_layer": per_layer,
    }


def train_flops_per_token(config: ModelConfig, sequence_length: int) -> float:
    """Forward+backward FLOPs per trained token: 6N plus the attention term (module docstring)."""
    n = param_counts(config)["params"]
    attention = 12 * config.num_layers * config.num_heads * config.resolved_head_dim * sequence_length
    return float(6 * n + attention)


FLOPS_PER_PARAM_TOKEN = 6.0


def scaling_compute(params, tokens):
    """C = 6 N D, the compute convention of the scaling laws (docs/scaling.md); works on arrays too."""
    return FLOPS_PER_PARAM_TOKEN * np.asarray(params, dtype=float) * np.asarray(tokens, dtype=float)


# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets. MFU is reported against these.
DECLARED_PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def declared_peak_flops(device_kind: str) -> float | None:
    """The data-sheet peak of a device kind, matched by the longest known prefix, or None."""
    matches = [k for k in DECLARED_PEAK_FLOPS if device_kind.startswith(k)]
    return DECLARED_PEAK_FLOPS[max(matches, key=len)] if matches else None


@functools.lru_cache(maxsize=None)
def measured_peak_flops(dtype_name: str = "float32", size: int = 1024, repeats: int = 3) -> float:
    """FLOP/s of one device on a square matmul (the fastest of `repeats`): the peak used for devices
    with no declared figure (CPUs). The fastest repeat, so that a busy machine understates MFU less.
    1024 is large enough to run at a CPU's GEMM rate and costs ~0.5 s at start-up (2048 cost ~5 s
    on 2 cores, in every run and test)."""
    # jax is imported here so that the scaling tools, which import this module, never load it.
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype=dtype_name)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops_per_device(device_kind: str, dtype_name: str = "float32") -> float:
    """Declared peak for accelerators; a measured matmul rate for anything else (logged once)."""
    declared = declared_peak_flops(device_kind)
    if declared is not None:
        return declared
    measured = measured_peak_flops(dtype_name)
    logging.info("no declared peak for device kind %r: using a measured matmul rate of %.3g FLOP/s",
                 device_kind, measured)
    return measured
