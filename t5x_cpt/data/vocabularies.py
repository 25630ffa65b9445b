"""Vocabularies, selected in gin by one string; all are seqio.Vocabulary objects.

    get_vocabulary.name = 'byte'                                   # seqio.ByteVocabulary, 259 ids
    get_vocabulary.name = 'sentencepiece:spm_lo_help_en_zh_fr_8000'  # a train_vocab model in $DATA_DIR/vocab
    get_vocabulary.name = 'sentencepiece:/path/to/model.model'     # any SentencePiece model file
    get_vocabulary.name = 'hf:/path/to/tokenizer.json'             # a Hugging Face fast tokenizer

Ids 0 = padding and the vocabulary's EOS ends every document, as seqio expects. `vocab_size()` is
the number of ids the model's embedding must cover (the trainer checks it against the model).
"""

from __future__ import annotations

import hashlib
import os
import threading

import gin

from t5x_cpt.data import cache
from t5x_cpt.data.errors import DataError

DEFAULT_VOCABULARY = "byte"
_CACHE: dict[str, object] = {}
_LOCK = threading.Lock()


def resolve_spec(spec: str, data_dir: str | None = None) -> tuple[str, str | None]:
    """'kind[:path]' -> (kind, absolute path or None); checks the file exists."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"vocabulary spec must be a non-empty string, got {spec!r}")
    kind, _, path = spec.strip().partition(":")
    kind = kind.lower()
    aliases = {"bytes": "byte", "spm": "sentencepiece", "sp": "sentencepiece", "tokenizer.json": "hf",
               "huggingface": "hf"}
    kind = aliases.get(kind, kind)
    if kind == "byte":
        if path:
            raise DataError(f"vocabulary {spec!r}: the byte vocabulary takes no file")
        return kind, None
    if kind not in ("sentencepiece", "hf"):
        raise DataError(f"unknown vocabulary kind in {spec!r}; use 'byte', 'sentencepiece:PATH' or 'hf:PATH'")
    if not path:
        raise DataError(f"vocabulary {spec!r} needs a file: '{kind}:PATH'")
    candidates = [path]
    if kind == "sentencepiece" and "/" not in path:  # a name made by train_vocab
        name = path if path.endswith(".model") else path + ".model"
        candidates.append(os.path.join(cache.vocab_dir(data_dir), name))
    for c in candidates:
        c = os.path.expanduser(c)
        if "://" in c:
            return kind, c
        if os.path.isfile(c):
            return kind, os.path.abspath(c)
    raise DataError(f"tokenizer file for vocabulary {spec!r} does not exist (looked at {candidates})")


def vocabulary_from_spec(spec: str, data_dir: str | None = None):
    """A seqio.Vocabulary for a spec string (cached per resolved spec)."""
    kind, path = resolve_spec(spec, data_dir)
    key = f"{kind}:{path}"
    with _LOCK:
        if key not in _CACHE:
            from t5x_cpt.data.tfutil import seqio  # pylint: disable=g-import-not-at-top

            if kind == "byte":
                vocab = seqio().ByteVocabulary()
            elif kind == "sentencepiece":
                vocab = seqio().SentencePieceVocabulary(path)
                _check_sentencepiece(vocab, path)
            else:
                from t5x_cpt.data.hf_vocab import HfTokenizerVocabulary  # pylint: disable=g-import-not-at-top

                vocab = HfTokenizerVocabulary(path)
            _CACHE[key] = vocab
        return _CACHE[key]


def _check_sentencepiece(vocab, path: str) -> None:
    try:
        pad = vocab.tokenizer.pad_id()
        eos = vocab.eos_id
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError on bad files
        raise DataError(f"{path} is not a valid SentencePiece model: {e}") from e
    if pad != 0 or eos is None or eos < 0:
        raise DataError(f"SentencePiece model {path} must have pad_id=0 and an EOS id (has pad={pad}, eos={eos}); "
                        "models made by `python -m t5x_cpt.data train_vocab` do")


@gin.configurable
def get_vocabulary(name: str = DEFAULT_VOCABULARY, data_dir: str | None = None):
    """The run's vocabulary (gin: `get_vocabulary.name = 'byte' | 'sentencepiece:P' | 'hf:P'`)."""
    return vocabulary_from_spec(name, data_dir)


@gin.configurable
def hf_vocab_spec(path: str = gin.REQUIRED) -> str:
    """Gin helper: 'hf:' + path, so a run file can take the tokenizer path from a macro."""
    return f"hf:{path}"


def vocab_size() -> int:
    """Number of ids of the gin-selected vocabulary: the model's vocab size must be >= this."""
    return int(get_vocabulary().vocab_size)


def vocabulary_key(vocab) -> str:
    """A short string naming a vocabulary within one process (class and file; a memo key)."""
    name = type(vocab).__name__
    for attr in ("_sentencepiece_model_file", "path"):
        if hasattr(vocab, attr):
            return f"{name}:{getattr(vocab, attr)}"
    return name


def vocabulary_identity(vocab) -> dict:
    """What defines a vocabulary's ids wherever it is loaded: kind, size, EOS id, and the SHA-256 of
    its tokenizer file's bytes (none for the byte vocabulary) — not its path."""
    identity = {"kind": type(vocab).__name__, "vocab_size": int(vocab.vocab_size), "eos_id": int(vocab.eos_id)}
    if hasattr(vocab, "sp_model"):  # seqio.SentencePieceVocabulary: the serialized model proto
        identity["file_sha256"] = hashlib.sha256(vocab.sp_model).hexdigest()
    elif hasattr(vocab, "path"):  # hf_vocab.HfTokenizerVocabulary: tokenizer.json
        with open(vocab.path, "rb") as f:
            identity["file_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return identity
