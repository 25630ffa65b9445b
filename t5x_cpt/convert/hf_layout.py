"""The tensor correspondence between Hugging Face LLaMA-like checkpoints and t5x_cpt params.

One table serves Llama, Mistral and Qwen2 (they share tensor names; Qwen2 adds q/k/v biases) and,
after GGUF names are translated, GGUF too. Hugging Face linear weights are [out, in]; t5x_cpt
kernels are [in, out] with heads split out, so each entry carries the reshape both ways. RoPE in
t5x_cpt uses the same half-split (rotate_half) layout as transformers, so q/k need no permutation.

    embed/embedding  [V, D]        <- model.embed_tokens.weight [V, D]
    query/kernel     [D, H, hd]    <- q_proj.weight [H*hd, D]   (transpose, split heads)
    query/bias       [H, hd]       <- q_proj.bias [H*hd]
    out/kernel       [H, hd, D]    <- o_proj.weight [D, H*hd]   (transpose, split heads)
    mlp/gate|up      [D, F]        <- gate_proj|up_proj.weight [F, D]
    mlp/down         [F, D]        <- down_proj.weight [D, F]
    lm_head/kernel   [D, V]        <- lm_head.weight [V, D]     (absent when tied)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator

import numpy as np

from t5x_cpt import param_paths
from t5x_cpt.convert.common import ConversionError
from t5x_cpt.convert.hf_files import TensorSource

log = logging.getLogger(__name__)

# Buffers some checkpoints carry that are not weights (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    hf_shape: tuple[int, ...]
    param_path: str
    to_param: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
    return x


_SAME = (_identity, _identity)
_TRANSPOSE = (np.transpose, np.transpose)


def tensor_specs(config) -> list[TensorSpec]:
    """Every tensor of `config`'s model, in checkpoint order."""
    d, f, v = config.d_model, config.resolved_d_ff, config.vocab_size
    h, kv, hd = config.num_heads, config.resolved_num_kv_heads, config.resolved_head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (v, d), "embed/embedding", _identity, _identity)]

    def in_proj(heads):
        return (lambda w: w.T.reshape(d, heads, hd)), (lambda k: k.reshape(d, heads * hd).T)

    def bias(heads):
        return (lambda b: b.reshape(heads, hd)), (lambda b: b.reshape(heads * hd))

    for i in range(config.num_layers):
        hf, p = f"model.layers.{i}", f"layers_{i}"
        specs.append(TensorSpec(f"{hf}.input_layernorm.weight", (d,), f"{p}/attention_norm/scale", *_SAME))
        for name, ours, heads in (("q_proj", "query", h), ("k_proj", "key", kv), ("v_proj", "value", kv)):
            specs.append(TensorSpec(f"{hf}.self_attn.{name}.weight", (heads * hd, d), f"{p}/attention/{ours}/kernel",
                                    *in_proj(heads)))
            if config.qkv_bias:
                specs.append(TensorSpec(f"{hf}.self_attn.{name}.bias", (heads * hd,), f"{p}/attention/{ours}/bias",
                                        *bias(heads)))
        specs.append(TensorSpec(f"{hf}.self_attn.o_proj.weight", (d, h * hd), f"{p}/attention/out/kernel",
                                lambda w: w.T.reshape(h, hd, d), lambda k: k.reshape(h * hd, d).T))
        specs.append(TensorSpec(f"{hf}.post_attention_layernorm.weight", (d,), f"{p}/mlp_norm/scale", *_SAME))
        specs.append(TensorSpec(f"{hf}.mlp.gate_proj.weight", (f, d), f"{p}/mlp/gate/kernel", *_TRANSPOSE))
        specs.append(TensorSpec(f"{hf}.mlp.up_proj.weight", (f, d), f"{p}/mlp/up/kernel", *_TRANSPOSE))
        specs.append(TensorSpec(f"{hf}.mlp.down_proj.weight", (d, f), f"{p}/mlp/down/kernel", *_TRANSPOSE))
    specs.append(TensorSpec("model.norm.weight", (d,), "final_norm/scale", _identity, _identity))
    if not config.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, d), "lm_head/kernel", np.transpose, np.transpose))
    return specs


def read_params(source: TensorSource, config, dtype=None, where: str = "checkpoint") -> tuple[dict[str, Any], dict]:
    """Reads every tensor of `config`'s model from `source`, strictly, into an unscanned params tree.

    Missing tensors, unexpected tensors and shape mismatches raise one ConversionError naming them all
    (checked from the file headers before any tensor is read). `dtype` (numpy) casts every tensor;
    None keeps the stored dtype. Returns (params, facts for import_info).
    """
    specs = tensor_specs(config)
    available = set(source.names())
    # Some tied checkpoints store the head anyway (it must equal the embedding, checked below).
    tied_duplicate = config.tie_embeddings and "lm_head.weight" in available
    considered = {n for n in available if not n.endswith(IGNORED_SUFFIXES)}
    if tied_duplicate:
        considered.remove("lm_head.weight")
    expected = {s.hf_name: s.hf_shape for s in specs}
    # Checkpoint order first: a sharded .bin source maps one shard at a time.
    in_order = [name for name in expected if name in considered] + sorted(considered - set(expected))
    found = {name: source.shape(name) for name in in_order}
    problems = param_paths.shape_differences(expected, found, "file", "config")
    if problems:
        raise ConversionError(f"{where} does not match its config: " + "; ".join(problems))

    flat, stored_dtypes = {}, set()
    for spec in specs:
        array = np.asarray(source.get(spec.hf_name))
        stored_dtypes.add(str(array.dtype))
        if array.dtype.kind != "f":
            raise ConversionError(f"{where}: tensor {spec.hf_name} has non-float dtype {array.dtype}")
        array = spec.to_param(array)
        flat[spec.param_path] = np.ascontiguousarray(array if dtype is None else array.astype(dtype))
    if tied_duplicate:
        head = np.asarray(source.get("lm_head.weight"))
        if not np.array_equal(head.astype(np.float32), flat["embed/embedding"].astype(np.float32)):
            raise ConversionError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from the "
                                  "embedding; the config and the weights disagree")
        log.info("%s: ignoring lm_head.weight, a copy of the tied embedding", where)
    return param_paths.unflatten(flat), {"stored_dtypes": sorted(stored_dtypes), "tensors_read": len(specs)}


def iter_hf_tensors(params: dict[str, Any], config, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """(hf_name, array) for every tensor of `config`'s model, from an unscanned params tree."""
    flat = param_paths.flatten(params)
    for spec in tensor_specs(config):
        array = spec.to_hf(np.asarray(flat[spec.param_path]))
        if tuple(array.shape) != spec.hf_shape:
            raise ConversionError(f"{spec.param_path} has shape {np.shape(flat[spec.param_path])}; the config "
                                  f"expects {spec.hf_shape} for {spec.hf_name}")
        yield spec.hf_name, np.ascontiguousarray(array if dtype is None else array.astype(dtype))
