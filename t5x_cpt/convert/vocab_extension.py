"""Vocabulary extension: add target-language tokens to a source BPE tokenizer and resize the model.

    python -m t5x_cpt.convert extend_vocab --checkpoint=DIR --target_text=zh.txt[,more.txt] \
        --num_new_tokens=8000 --out=NEW_DIR [--eval_text=zh_heldout.txt] [--init=subword_mean|mean]

1. A BPE model is trained on the target text with the *source's* normalizer and pre-tokenizer (so
   its merges operate on the same pre-tokens and byte alphabet).
2. Its merges are appended, in training order, after the source's merges, keeping a merge only if
   both parts already exist, the result is new, and the result contains a non-ASCII character
   (for byte-level BPE: a byte >= 0x80); a character-level (SentencePiece-style) BPE first gains
   the target characters it lacked as base tokens. Appended merges rank below every source merge,
   so BPE applies all source merges first; and since each new merge needs a non-ASCII part, text made of
   ASCII only tokenizes exactly as before. Source token ids never change; new ids follow the
   highest existing id (special tokens included).
3. Embedding rows (and output-layer columns when untied) of the new ids are initialised with
   `subword_mean` (default): the mean of the source rows of the tokens the *source* tokenizer splits
   the new token into — the new token starts out meaning what its pieces meant together (as in
   Gee et al. 2022; FOCUS/WECHSEL refine this further). `mean` uses the mean of all source rows
   (Hewitt 2021). Rows of the source's ids are copied unchanged.
4. The output is an imported-style DIR (params, model_config.json, model.gin, hf_config.json,
   the new tokenizer, import_info.json) plus vocab_extension.json with bytes/token before and after.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any, Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from t5x_cpt.convert import checkpoint_dir, common
from t5x_cpt.convert.gguf_tokenizer import bytes_to_unicode
from t5x_cpt.convert.common import ConversionError

log = logging.getLogger(__name__)

REPORT_FILE = "vocab_extension.json"
STALE_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt")


def _lines(paths: Iterable[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for path in paths:
        if not os.path.isfile(path):
            raise ConversionError(f"text file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            for line in f:
                seen += len(line.encode("utf-8"))
                yield line
                if seen >= max_bytes:
                    return


def _read_text(paths: Iterable[str], max_bytes: int) -> str:
    return "".join(_lines(paths, max_bytes))


def _is_byte_level(data: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(data.get("pre_tokenizer")) or "ByteLevel" in json.dumps(data.get("decoder"))


def _non_ascii(token: str, byte_level: bool, byte_of: dict[str, int]) -> bool:
    if byte_level:
        return any(byte_of.get(ch, 0) >= 0x80 for ch in token)
    return any(ord(ch) >= 0x80 and ch != "\u2581" for ch in token)


def _merge_pair(merge: Any) -> tuple[str, str]:
    return tuple(merge.split(" ", 1)) if isinstance(merge, str) else (merge[0], merge[1])


def train_target_merges(source_json: dict[str, Any], texts: Iterable[str], num_merges: int,
                        min_frequency: int = 2) -> list[tuple[str, str]]:
    """Merges of a BPE trained on `texts` with the source tokenizer's normalizer and pre-tokenizer."""
    data = copy.deepcopy(source_json)
    byte_level = _is_byte_level(data)
    scratch = Tokenizer(models.BPE())
    template = Tokenizer.from_str(json.dumps(data))
    scratch.normalizer = template.normalizer
    scratch.pre_tokenizer = template.pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + num_merges, min_frequency=min_frequency,
                                  initial_alphabet=alphabet, show_progress=False, special_tokens=[])
    scratch.train_from_iterator(texts, trainer)
    trained = json.loads(scratch.to_str())["model"]["merges"]
    return [_merge_pair(m) for m in trained]


def merge_into(source_json: dict[str, Any], new_merges: list[tuple[str, str]], num_new_tokens: int,
               first_id: int) -> tuple[dict[str, Any], list[str]]:
    """The source tokenizer.json with up to `num_new_tokens` target tokens appended (see module doc)."""
    data = copy.deepcopy(source_json)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(f"vocabulary extension needs a BPE tokenizer.json; this one is {model.get('type')!r}")
    vocab: dict[str, int] = model["vocab"]
    merges = model["merges"]
    string_merges = bool(merges) and isinstance(merges[0], str)
    byte_level = _is_byte_level(data)
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    added, next_id = [], first_id
    for left, right in new_merges:
        if len(added) >= num_new_tokens:
            break
        merged = left + right
        if not byte_level:
            # A character-level BPE (SentencePiece style) may lack the target script's characters
            # (it fell back to bytes for them): they join as merge-less base tokens first.
            for part in (left, right):
                if len(part) == 1 and part not in vocab and _non_ascii(part, False, byte_of) \
                        and len(added) < num_new_tokens:
                    vocab[part] = next_id
                    added.append(part)
                    next_id += 1
        if len(added) >= num_new_tokens:
            break
        if left not in vocab or right not in vocab or merged in vocab:
            continue
        if not _non_ascii(merged, byte_level, byte_of):
            continue  # keeps ASCII-only text tokenized exactly as before
        vocab[merged] = next_id
        merges.append(f"{left} {right}" if string_merges else [left, right])
        added.append(merged)
        next_id += 1
    return data, added


def bytes_per_token(tokenizer, text: str) -> float:
    """UTF-8 bytes of `text` per token (no special tokens added); higher means fewer tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    return len(text.encode("utf-8")) / max(1, len(ids))


def _new_rows(matrix: np.ndarray, decompositions: list[list[int]], source_rows: int, init: str) -> np.ndarray:
    """Initial rows [n_new, dim] (matrix is [vocab, dim]); computed in float32."""
    overall = matrix[:source_rows].astype(np.float32).mean(axis=0)
    if init == "mean":
        return np.broadcast_to(overall, (len(decompositions), matrix.shape[1])).copy()
    rows = np.empty((len(decompositions), matrix.shape[1]), np.float32)
    for i, ids in enumerate(decompositions):
        rows[i] = matrix[ids].astype(np.float32).mean(axis=0) if ids else overall
    return rows


def resize_params(params: dict[str, Any], config, new_vocab: int, new_ids: list[int],
                  decompositions: list[list[int]], source_rows: int, init: str) -> dict[str, Any]:
    """Params with embedding (and untied head) resized to `new_vocab`; source rows unchanged."""
    out = dict(params)
    embedding = np.asarray(params["embed"]["embedding"])
    grown = np.empty((new_vocab, embedding.shape[1]), embedding.dtype)
    keep = min(embedding.shape[0], new_vocab)
    grown[:keep] = embedding[:keep]
    overall = embedding[:source_rows].astype(np.float32).mean(axis=0)
    grown[keep:] = overall.astype(embedding.dtype)  # padding rows beyond the new tokens
    grown[new_ids] = _new_rows(embedding, decompositions, source_rows, init).astype(embedding.dtype)
    out["embed"] = {"embedding": grown}
    if not config.tie_embeddings:
        kernel = np.asarray(params["lm_head"]["kernel"])  # [embed, vocab]
        head = np.empty((kernel.shape[0], new_vocab), kernel.dtype)
        head[:, :keep] = kernel[:, :keep]
        head[:, keep:] = kernel[:, :source_rows].astype(np.float32).mean(axis=1, keepdims=True).astype(kernel.dtype)
        head[:, new_ids] = _new_rows(kernel.T, decompositions, source_rows, init).T.astype(kernel.dtype)
        out["lm_head"] = {"kernel": head}
    return out


def extend_vocabulary(checkpoint: str, out: str, target_text: list[str], num_new_tokens: int,
                      eval_text: list[str] | None = None, source_eval_text: list[str] | None = None,
                      init: str = "subword_mean", pad_to_multiple_of: int = 1, min_frequency: int = 2,
                      step: int | None = None, tokenizer: str | None = None, max_train_bytes: int = 200 << 20,
                      overwrite: bool = False) -> dict[str, Any]:
    """Extends the vocabulary of an imported DIR or MODEL_DIR; writes `out` and returns the report."""
    if init not in ("subword_mean", "mean"):
        raise ConversionError(f"--init={init!r}; expected subword_mean or mean")
    if num_new_tokens <= 0:
        raise ConversionError("--num_new_tokens must be positive")
    opened = checkpoint_dir.open_checkpoint(checkpoint, tokenizer)
    checkpoint, config, tokenizer_dir = opened.path, opened.config, opened.tokenizer_dir
    if tokenizer_dir is None or not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise ConversionError(f"no tokenizer.json for {checkpoint} (looked in {tokenizer_dir}); vocabulary extension "
                              "works on a Hugging Face fast tokenizer; pass --tokenizer=DIR")
    source_json = common.read_json(os.path.join(tokenizer_dir, "tokenizer.json"))
    first_id = common.tokenizer_size(tokenizer_dir)
    if first_id > config.vocab_size:
        raise ConversionError(f"vocab size mismatch: the tokenizer in {tokenizer_dir} has {first_id} ids, "
                              f"the model {config.vocab_size}")

    merges = train_target_merges(source_json, _lines(target_text, max_train_bytes), 4 * num_new_tokens, min_frequency)
    new_json, added = merge_into(source_json, merges, num_new_tokens, first_id)
    if not added:
        raise ConversionError("no new tokens could be added: the target text adds no non-ASCII merges")
    source_tok = Tokenizer.from_str(json.dumps(source_json))
    new_tok = Tokenizer.from_str(json.dumps(new_json))
    new_ids = list(range(first_id, first_id + len(added)))
    if [new_tok.token_to_id(t) for t in added] != new_ids:
        raise ConversionError("internal error: new token ids are not contiguous")
    decompositions = [[t.id for t in source_tok.model.tokenize(token)] for token in added]
    new_vocab = max(config.vocab_size, first_id + len(added))
    new_vocab = -(-new_vocab // pad_to_multiple_of) * pad_to_multiple_of

    params = resize_params(dict(opened.read_params(step)), config, new_vocab, new_ids, decompositions, first_id, init)
    new_config = config.replace(vocab_size=new_vocab)

    report: dict[str, Any] = {
        "checkpoint": checkpoint, "step": step, "tokenizer_from": tokenizer_dir, "target_text": list(target_text),
        "requested_new_tokens": num_new_tokens, "added_tokens": len(added), "first_new_id": first_id,
        "old_vocab_size": config.vocab_size, "new_vocab_size": new_vocab, "init": init,
        "examples": [new_tok.decode([i]) for i in new_ids[:20]],
    }
    evaluations = {"target": eval_text or target_text}
    if source_eval_text:
        evaluations["source"] = source_eval_text
    for name, paths in evaluations.items():
        text = _read_text(paths, 16 << 20)
        before, after = bytes_per_token(source_tok, text), bytes_per_token(new_tok, text)
        report[f"{name}_bytes_per_token"] = {"before": before, "after": after, "text": list(paths)}
        log.info("%s text: %.3f -> %.3f bytes/token", name, before, after)

    base_hf = opened.hf_config() or {}
    base_info = opened.import_info()
    with common.atomic_output_dir(out, overwrite) as tmp:
        for name in common.TOKENIZER_FILES:
            if name not in STALE_TOKENIZER_FILES and name != "tokenizer.json" \
                    and os.path.isfile(os.path.join(tokenizer_dir, name)):
                with open(os.path.join(tokenizer_dir, name), "rb") as src, open(os.path.join(tmp, name), "wb") as dst:
                    dst.write(src.read())
        new_tok.save(os.path.join(tmp, "tokenizer.json"))
        info = {**base_info, "vocab_extension": report}
        header = f"vocabulary-extended model from {checkpoint}\nby python -m t5x_cpt.convert extend_vocab"
        common.write_imported_dir(tmp, new_config, params, {**base_hf, "vocab_size": new_vocab}, info, header)
        common.write_json(os.path.join(tmp, REPORT_FILE), report)
    return report
