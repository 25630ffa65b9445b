"""`train_vocab`: a SentencePiece model shared by all languages, and bytes-per-token reports.

The training sample is language-balanced: the same number of UTF-8 bytes of training-split text from
each language (documents in a fixed shuffled order, seed 0), so no language dominates the pieces.
Training is deterministic (all sample lines, no sentence sampling, one thread); the model is
lossless (identity normalisation, whitespace kept) with byte fallback, pad=0, eos=1, unk=2.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import tempfile
import time
from typing import Iterable, Sequence

from t5x_cpt.data import cache, corpora as corpora_lib
from t5x_cpt.data.errors import DataError
from t5x_cpt.data.languages import parse_languages

log = logging.getLogger(__name__)


def _prepared_pairs(corpora: Sequence[str], lang: str, data_dir: str | None) -> list[str]:
    pairs = [c for c in corpora if lang in corpora_lib.get_corpus(c).languages]
    if not pairs:
        raise DataError(f"none of the corpora {list(corpora)} has language {lang!r}")
    for c in pairs:
        cache.require_prepared(c, lang, data_dir)
    return pairs


def language_sample(corpora: Sequence[str], lang: str, max_bytes: int, split: str = "train",
                    data_dir: str | None = None, seed: int = 0) -> list[str]:
    """Lines (paragraphs) of up to max_bytes of `split` text of one language, deterministic."""
    docs = []
    for c in _prepared_pairs(corpora, lang, data_dir):
        docs.extend(cache.iter_lines(cache.split_path(c, lang, split, data_dir)))
    random.Random(seed).shuffle(docs)
    out, total = [], 0
    for doc in docs:
        for line in doc.split("\n"):
            if not line.strip():
                continue
            out.append(line)
            total += len(line.encode("utf-8"))
            if total >= max_bytes:
                return out
    return out


def train_vocab(corpora: Sequence[str] = ("lo_help",), languages: Iterable[str] | str = ("en", "zh", "fr"),
                vocab_size: int = 8000, name: str | None = None, sample_bytes_per_language: int = 2_000_000,
                data_dir: str | None = None, model_type: str = "unigram", force: bool = False,
                output_dir: str | None = None) -> dict:
    """Trains and stores $DATA_DIR/vocab/<name>.model (+ .json report); idempotent unless force.

    output_dir overrides where the model goes (default $DATA_DIR/vocab, where
    `get_vocabulary.name = 'sentencepiece:<name>'` finds it).
    """
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    langs = parse_languages(languages)
    corpora = [corpora] if isinstance(corpora, str) else list(corpora)
    for c in corpora:
        corpora_lib.get_corpus(c)
    if vocab_size < 300:
        raise DataError(f"vocab_size {vocab_size} is too small for byte fallback (needs 256 byte pieces + specials)")
    name = name or f"spm_{'_'.join(corpora)}_{'_'.join(langs)}_{vocab_size}"
    out_dir = output_dir or cache.vocab_dir(data_dir)
    model_path = os.path.join(out_dir, name + ".model")
    report_path = os.path.join(out_dir, name + ".json")
    if os.path.exists(model_path) and os.path.exists(report_path) and not force:
        with open(report_path, encoding="utf-8") as f:
            return json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    lines = []
    for lang in langs:
        lines += language_sample(corpora, lang, sample_bytes_per_language, "train", data_dir)
    model = io.BytesIO()
    try:
        # Sentences from memory and the model into memory: no file paths end up in the model proto,
        # so the same sample gives a byte-identical model.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=0.9995, byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
            allow_whitespace_only_pieces=True, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=1 << 16, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"SentencePiece training failed: {str(e).splitlines()[-1]}") from e
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=out_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, model_path)
    from t5x_cpt.data import vocabularies  # pylint: disable=g-import-not-at-top

    vocab = vocabularies.vocabulary_from_spec(f"sentencepiece:{model_path}")
    with open(model_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    report = {"name": name, "path": model_path, "vocab_size": vocab.vocab_size, "model_type": model_type,
              "corpora": corpora, "languages": list(langs), "sample_bytes_per_language": sample_bytes_per_language,
              "sha256": digest, "train_seconds": round(time.time() - t0, 1),
              "gin": f"get_vocabulary.name = 'sentencepiece:{name}'",
              "bytes_per_token": bytes_per_token(vocab, corpora, langs, data_dir)}
    cache.write_json_atomic(report_path, report)
    return report


def bytes_per_token(vocab, corpora: Sequence[str], languages: Iterable[str] | str,
                    data_dir: str | None = None, max_bytes: int = 2_000_000) -> dict[str, float]:
    """UTF-8 bytes per token (EOS not counted) on the validation split of each language."""
    out = {}
    for lang in parse_languages(languages):
        lines = language_sample(corpora, lang, max_bytes, "validation", data_dir)
        n_bytes = sum(len(line.encode("utf-8")) for line in lines)
        n_tokens = sum(len(vocab.encode(line)) for line in lines)
        out[lang] = round(n_bytes / max(n_tokens, 1), 3)
    return out
