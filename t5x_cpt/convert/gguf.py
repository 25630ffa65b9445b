"""GGUF (llama.cpp) files: architecture metadata -> a Hugging Face config, tensors -> HF layout.

A GGUF is turned into exactly what a Hugging Face directory provides — a config.json-like dict and
a TensorSource with Hugging Face names and [out, in] layout — so the architecture modules and
`hf_layout` do the rest. The traps, each handled here:
  * shapes: GGUF lists dimensions fastest-first; the reader's numpy arrays are already [out, in].
  * quantization: Q4_0/Q4_1/Q5_x/Q8_0/K-quants/F16/BF16 are dequantized to float32 by `gguf.quants`,
    one tensor at a time (the file is memory-mapped).
  * rotary layout: for `llama` llama.cpp permutes the rows of Q and K to its interleaved rotary
    layout; that is undone per head (num_heads for Q, num_kv_heads for K). `qwen2` uses the
    half-split (NeoX) layout in llama.cpp and is stored unpermuted.
  * tied head: no `output.weight` tensor means the output layer is the embedding.
  * llama3 rope scaling: stored as a `rope_freqs.weight` tensor of per-frequency divisors; the
    (factor, low, high) parameters are recovered from it and checked to reproduce it exactly.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import gguf
import numpy as np
from gguf.quants import dequantize

from t5x_cpt.convert.common import ConversionError
from t5x_cpt.convert.hf_files import TensorSource
from t5x_cpt.model import ModelConfig, rope_inverse_frequencies

SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
ROPE_FREQS = "rope_freqs.weight"


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor (unknown names are returned unchanged)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return gguf_name


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(w, n_head)`: interleaved rotary rows -> half-split rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute`: half-split rows -> interleaved rows (used to write test GGUFs)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFFile:
    """A GGUF file opened for conversion: metadata, the HF-style config and a tensor source."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # truncated or not a GGUF: the reader raises ValueError/IndexError/...
            raise ConversionError(f"cannot read GGUF file {self.path}: {type(e).__name__}: {e}") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.value("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConversionError(
                f"unsupported architecture in GGUF {self.path}: general.architecture={self.architecture!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")

    def value(self, key: str, default: Any = ConversionError) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is ConversionError:
                raise ConversionError(f"GGUF {self.path} has no metadata key {key!r}")
            return default
        return field.contents()

    def arch_value(self, key: str, default: Any = ConversionError) -> Any:
        return self.value(f"{self.architecture}.{key}", default)

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face config dict equivalent to this file's metadata (read, never assumed)."""
        heads = int(self.arch_value("attention.head_count"))
        kv_heads = self.arch_value("attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            raise ConversionError(f"GGUF {self.path}: per-layer KV head counts are not supported")
        d_model = int(self.arch_value("embedding_length"))
        head_dim = int(self.arch_value("attention.key_length", d_model // heads))
        value_dim = int(self.arch_value("attention.value_length", head_dim))
        if value_dim != head_dim:
            raise ConversionError(f"GGUF {self.path}: key_length {head_dim} != value_length {value_dim}")
        rope_dims = int(self.arch_value("rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ConversionError(f"GGUF {self.path}: rotary on {rope_dims} of {head_dim} dims is not supported")
        embed = self.tensors.get("token_embd.weight")
        if embed is None:
            raise ConversionError(f"GGUF {self.path} has no token_embd.weight tensor")
        vocab = int(self.arch_value("vocab_size", int(embed.shape[-1])))
        theta = _f32(self.arch_value("rope.freq_base", 10000.0))  # llama.cpp's default when absent
        hf: dict[str, Any] = {
            "model_type": SUPPORTED_ARCHITECTURES[self.architecture],
            "vocab_size": vocab,
            "hidden_size": d_model,
            "intermediate_size": int(self.arch_value("feed_forward_length")),
            "num_hidden_layers": int(self.arch_value("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": head_dim,
            "rms_norm_eps": _f32(self.arch_value("attention.layer_norm_rms_epsilon")),
            "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "max_position_embeddings": int(self.arch_value("context_length", 2048)),
            "rope_theta": theta,
            "rope_scaling": self._rope_scaling(theta, head_dim),
        }
        if self.architecture == "llama" and any(n.endswith(".attn_output.bias") for n in self.tensors):
            hf["attention_bias"] = True  # refused by the llama architecture with a clear message
        for key in ("bos", "eos", "padding"):
            token_id = self.value(f"tokenizer.ggml.{key}_token_id", None)
            if token_id is not None:
                hf[{"padding": "pad"}.get(key, key) + "_token_id"] = int(token_id)
        return hf

    def _rope_scaling(self, theta: float, head_dim: int) -> dict[str, Any] | None:
        kind = self.arch_value("rope.scaling.type", "none")
        if ROPE_FREQS in self.tensors:
            if kind not in ("none", None):
                raise ConversionError(f"GGUF {self.path}: both rope.scaling.type={kind!r} and rope_freqs")
            factors = self._dequantize(self.tensors[ROPE_FREQS]).reshape(-1).astype(np.float64)
            return llama3_from_rope_freqs(factors, theta, head_dim, self.path)
        if kind in ("none", None):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": _f32(self.arch_value("rope.scaling.factor"))}
        raise ConversionError(f"GGUF {self.path}: rope scaling type {kind!r} is not supported "
                              "(supported: none, linear, llama3 via rope_freqs)")

    def _dequantize(self, tensor) -> np.ndarray:
        shape = tuple(int(x) for x in reversed(tensor.shape))  # GGUF lists the fastest dimension first
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(f"GGUF {self.path}: tensor {tensor.name} has quantization "
                                  f"{tensor.tensor_type.name}, which gguf cannot dequantize: {e}") from e
        return np.asarray(array, dtype=np.float32).reshape(shape)

    def tensor_source(self, num_heads: int, num_kv_heads: int) -> "GGUFTensorSource":
        return GGUFTensorSource(self, num_heads, num_kv_heads)

    def tokenizer_metadata(self) -> dict[str, Any]:
        """The tokenizer.* metadata (vocabulary, merges, special ids, chat template)."""
        return {name: self.value(name) for name in self.reader.fields if name.startswith("tokenizer.")}


class GGUFTensorSource(TensorSource):
    """The tensors of a GGUF, dequantized to float32, with Hugging Face names and layout."""

    def __init__(self, file: GGUFFile, num_heads: int, num_kv_heads: int):
        self._file = file
        self._by_hf = {hf_name(n): t for n, t in file.tensors.items() if n != ROPE_FREQS}
        self._heads = {"q_proj": num_heads, "k_proj": num_kv_heads}
        types = sorted({t.tensor_type.name for t in file.tensors.values()})
        self.description = {"format": "gguf", "files": [os.path.basename(file.path)], "tensor_types": types}

    def names(self) -> list[str]:
        return list(self._by_hf)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self._by_hf[name].shape))

    def get(self, name: str) -> np.ndarray:
        try:
            array = self._file._dequantize(self._by_hf[name])  # pylint: disable=protected-access
        except ConversionError:
            raise
        except Exception as e:  # a truncated file surfaces here as a short memmap
            raise ConversionError(f"GGUF {self._file.path}: cannot read tensor {name}: {e}") from e
        if self._file.architecture in _PERMUTED_ARCHITECTURES:
            for proj, heads in self._heads.items():
                if name.endswith(f"self_attn.{proj}.weight") or name.endswith(f"self_attn.{proj}.bias"):
                    array = unpermute_rotary(array, heads)
        return array


def llama3_from_rope_freqs(factors: np.ndarray, theta: float, head_dim: int, where: str) -> dict[str, Any] | None:
    """Recovers llama3 rope scaling parameters from llama.cpp's per-frequency divisors.

    Only the wavelength thresholds original_max/low and original_max/high are identifiable, so
    original_max_position_embeddings is fixed at 8192 (Llama 3.1's) and low/high are derived; any
    choice yields the same frequencies. The result must reproduce `factors` to 1e-5 relative.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv.shape:
        raise ConversionError(f"GGUF {where}: rope_freqs has {factors.size} entries, expected {inv.size}")
    factor = float(factors.max())
    if np.allclose(factors, 1.0, rtol=1e-6):
        return None
    old_len = 8192
    wavelen = 2 * math.pi / inv
    mid = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if mid.sum() >= 2:
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[mid], smooth, 1)  # smooth = old/(hi-lo)/wavelen - lo/(hi-lo)
        low_wavelen, high_wavelen = slope / -intercept, slope / (1 - intercept)
        low, high = old_len / low_wavelen, old_len / high_wavelen
    else:
        low, high = 1.0, 4.0  # Llama 3.1/3.2's values; verified below
    candidate = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                 "high_freq_factor": float(high), "original_max_position_embeddings": old_len}
    config = ModelConfig(vocab_size=8, d_model=head_dim, num_layers=1, num_heads=1, rope_theta=theta,
                         rope_scaling="llama3", rope_scaling_factor=factor, rope_low_freq_factor=low,
                         rope_high_freq_factor=high, rope_original_max_position=old_len)
    reproduced = inv / rope_inverse_frequencies(config)
    if not np.allclose(reproduced, factors, rtol=1e-5):
        raise ConversionError(f"GGUF {where}: rope_freqs does not follow the llama3 rule "
                              f"(best fit {candidate} is off by {np.max(np.abs(reproduced / factors - 1)):.2e})")
    return candidate


def _f32(value: float) -> float:
    """GGUF stores floats as float32; the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))
