"""A seqio.Vocabulary over a Hugging Face `tokenizer.json` (the `tokenizers` package), so a converted
LLM keeps its own tokenizer. Imported lazily by vocabularies.py (it imports seqio/TF at import).

Constraint: seqio treats id 0 as padding (loss weight 0). Tokenizers whose id 0 is a special token
(LLaMA/Mistral `<unk>`, Gemma/T5 `<pad>`) work as they are; a tokenizer whose id 0 is an ordinary
piece (GPT-2/Qwen `!`) is refused with a message, because its text would be silently masked.
"""

from __future__ import annotations

import json
import os

import numpy as np
import seqio
import tensorflow as tf

from t5x_cpt.data.errors import DataError

_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")


class HfTokenizerVocabulary(seqio.Vocabulary):
    """seqio vocabulary backed by `tokenizers.Tokenizer.from_file(path)`; no special tokens added."""

    def __init__(self, path: str, eos_token: str | None = None):
        import tokenizers  # pylint: disable=g-import-not-at-top

        if not os.path.isfile(path):
            raise DataError(f"tokenizer file {path!r} does not exist")
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{path} is not a valid tokenizer.json: {e}") from e
        self.path = path
        specials = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        if 0 not in specials:
            raise DataError(
                f"tokenizer {path}: id 0 is the ordinary token {self._tok.id_to_token(0)!r}, but seqio "
                "uses id 0 as padding (loss weight 0); use a tokenizer whose id 0 is special (unk/pad)")
        eos_token = eos_token or _eos_from_config(path)
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        if eos_token is None or self._tok.token_to_id(eos_token) is None:
            raise DataError(f"tokenizer {path}: cannot find its end-of-sequence token "
                            f"(looked for {eos_token or _EOS_CANDIDATES})")
        self._eos = int(self._tok.token_to_id(eos_token))
        unk = None
        model = json.loads(self._tok.to_str()).get("model", {})
        if model.get("unk_token") is not None:
            unk = self._tok.token_to_id(model["unk_token"])
        self._unk = unk
        super().__init__(extra_ids=0)

    @property
    def eos_id(self):
        return self._eos

    @property
    def unk_id(self):
        return self._unk

    @property
    def _base_vocab_size(self):
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, s):
        return self._tok.encode(s, add_special_tokens=False).ids

    def _decode(self, ids):
        return self._tok.decode([int(i) for i in ids if int(i) != 0], skip_special_tokens=False)

    def _encode_tf(self, s):
        def enc(x):
            x = x.item() if isinstance(x, np.ndarray) else x
            return np.asarray(self._encode(x.decode("utf-8", errors="replace")), np.int32)

        out = tf.numpy_function(enc, [s], tf.int32, stateful=False)
        out.set_shape([None])
        return out

    def _decode_tf(self, ids):
        def dec(x):
            if x.ndim == 1:
                return np.asarray(self._decode(x.tolist()).encode("utf-8"), dtype=object)
            return np.asarray([self._decode(r.tolist()).encode("utf-8") for r in x], dtype=object)

        return tf.numpy_function(dec, [ids], tf.string, stateful=False)

    def __eq__(self, other):
        return isinstance(other, HfTokenizerVocabulary) and other.path == self.path and other._eos == self._eos

    def __hash__(self):
        return hash((self.path, self._eos))


def _eos_from_config(path: str) -> str | None:
    cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos
