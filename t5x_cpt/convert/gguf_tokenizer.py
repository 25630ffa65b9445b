"""A Hugging Face `tokenizer.json` rebuilt from a GGUF's tokenizer metadata.

A GGUF carries its vocabulary, merges and special ids as metadata under llama.cpp's names; this
module writes the equivalent fast tokenizer (tokenizer.json + tokenizer_config.json) with the
`tokenizers` library, so an imported GGUF is usable by the data pipeline and by transformers.

Supported `tokenizer.ggml.model` values:
  gpt2   byte-level BPE (SmolLM, Llama 3, Qwen2, ...). The split rule before BPE depends on
         `tokenizer.ggml.pre`; the ones known here follow llama.cpp's definitions (e.g. 'smollm'
         splits every digit, like SmolLM's own tokenizer.json). Any other value is refused, since
         a wrong split silently changes tokenization.
  llama  SentencePiece BPE (Llama 2, Mistral v0.x): BPE with byte fallback and the '▁' metaspace;
         merges are recovered from the piece scores as transformers does.
Tokens the file marks CONTROL become special added tokens; USER_DEFINED ones plain added tokens.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from t5x_cpt.convert.common import ConversionError, write_json

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (split regex or None for GPT-2's built-in one, split digits first, ignore_merges, NFC)
BYTE_LEVEL_PRE = {
    "default": (None, False, False, False),
    "gpt2": (None, False, False, False),
    "smollm": (None, True, False, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, True, False),
    "llama3": (_LLAMA3_SPLIT, False, True, False),
    "llama-v3": (_LLAMA3_SPLIT, False, True, False),
    "smaug-bpe": (_LLAMA3_SPLIT, False, True, False),
    "qwen2": (_QWEN2_SPLIT, False, False, True),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False, False, True),
}
CONTROL, USER_DEFINED = 3, 4


def write_gguf_tokenizer(metadata: Mapping[str, Any], directory: str,
                         model_max_length: int | None = None) -> dict[str, Any]:
    """Writes tokenizer.json and tokenizer_config.json for the GGUF `metadata` into `directory`."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ConversionError("the GGUF has no tokenizer.ggml.tokens; pass --tokenizer=PATH")
    if len(set(tokens)) != len(tokens):
        raise ConversionError("the GGUF vocabulary has duplicate tokens; pass --tokenizer=PATH")
    if kind == "gpt2":
        tokenizer = _byte_level(metadata, tokens)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(metadata, tokens)
    else:
        raise ConversionError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2, llama); "
                              "pass --tokenizer=PATH with the source's tokenizer files")
    _add_special(tokenizer, metadata, tokens)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    specials = _special_tokens(metadata, tokens)
    _post_processor(tokenizer, kind, specials, add_bos, add_eos)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False, "model_max_length": int(model_max_length or 1 << 30),
        **specials,
    }
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    write_json(os.path.join(directory, "tokenizer_config.json"), config)
    return {"tokenizer_model": kind, "tokenizer_pre": metadata.get("tokenizer.ggml.pre"), "tokens": len(tokens)}


def _byte_level(metadata: Mapping[str, Any], tokens: list[str]):
    pre = metadata.get("tokenizer.ggml.pre") or "default"
    if pre not in BYTE_LEVEL_PRE:
        raise ConversionError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {sorted(BYTE_LEVEL_PRE)}); "
                              "pass --tokenizer=PATH with the source's tokenizer.json")
    split, digits, ignore_merges, nfc = BYTE_LEVEL_PRE[pre]
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spelling = bytes_to_unicode()
    # Byte-level vocabularies spell every byte as a printable char; a token written in raw text
    # (some user-defined tokens) is respelled so the BPE model can match it.
    vocab = {tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    if not merges:
        raise ConversionError("the GGUF byte-level tokenizer has no merges")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(metadata: Mapping[str, Any], tokens: list[str]):
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise ConversionError("the GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", 0)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True,
                                     byte_fallback=True))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581",
                                                       prepend_scheme="first" if prefix else "never",
                                                       split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by SentencePiece scores (transformers' `generate_merges`): every split of
    a piece into two pieces is a merge, ranked by the merged piece's score, best first."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special(tokenizer, metadata: Mapping[str, Any], tokens: list[str]) -> None:
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    vocab = tokenizer.get_vocab()
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
               if kind == CONTROL and t in vocab]
    user = [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
            if kind == USER_DEFINED and t in vocab]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)


def _special_tokens(metadata: Mapping[str, Any], tokens: list[str]) -> dict[str, str]:
    out = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            out[name] = tokens[int(token_id)]
    return out


def _post_processor(tokenizer, kind: str, specials: Mapping[str, str], add_bos: bool, add_eos: bool) -> None:
    pieces_single, pieces_pair, special = ["$A:0"], ["$A:0", "$B:1"], []
    vocab = tokenizer.get_vocab()
    if add_bos and "bos_token" in specials:
        bos = specials["bos_token"]
        pieces_single.insert(0, f"{bos}:0")
        pieces_pair = [f"{bos}:0", "$A:0", f"{bos}:1", "$B:1"]
        special.append((bos, vocab[bos]))
    if add_eos and "eos_token" in specials:
        eos = specials["eos_token"]
        pieces_single.append(f"{eos}:0")
        pieces_pair = pieces_pair[:2] + [f"{eos}:0"] + pieces_pair[2:] + [f"{eos}:1"]
        special.append((eos, vocab[eos]))
    if special:
        tokenizer.post_processor = processors.TemplateProcessing(single=pieces_single, pair=pieces_pair,
                                                                 special_tokens=special)
    elif kind == "gpt2":
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
