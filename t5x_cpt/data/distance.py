"""How far a language is from the source language, as a model with a given vocabulary sees it.

    python -m t5x_cpt.data distance --corpora=lo_help --source=en --languages=fr,de,es,ru,ja,ko,zh \
        [--vocabulary=byte|sentencepiece:PATH|hf:PATH]

Transfer from a source-language model can only use what the two languages share in the model's own
input space: its tokens and the transitions between them. So the measures are computed on token
ids under the run's vocabulary (bytes for the byte vocabulary), target validation text against
source training text:

  unseen_token_share    share of the target's token occurrences whose id never occurs in the source
                        text (an input row and output column the source model never trained)
  unseen_bigram_share   share of the target's token-bigram occurrences never seen in the source
                        text (transitions the source model never learned) -- the primary measure:
                        0 when every transition of the target is familiar, 1 when none is
  unigram_js_bits       Jensen-Shannon divergence of the two token-unigram distributions, in bits
                        (0 identical, 1 disjoint)

On a parallel corpus (LibreOffice help: the same paragraphs in every language) the content is held
fixed, so the measures compare the languages' scripts and spelling, not their topics. They are
descriptive: the study (docs/study.md, finding F4) sets each language's measured CPT saving
against them.
"""

from __future__ import annotations

import collections
import math
from typing import Iterable, Sequence

from t5x_cpt.data.languages import parse_languages


def _token_counts(vocab, lines: Iterable[str]) -> tuple[collections.Counter, collections.Counter]:
    unigrams, bigrams = collections.Counter(), collections.Counter()
    for line in lines:
        ids = list(vocab.encode(line))
        unigrams.update(ids)
        bigrams.update(zip(ids, ids[1:]))
    return unigrams, bigrams


def _js_bits(p: collections.Counter, q: collections.Counter) -> float:
    total_p, total_q = sum(p.values()), sum(q.values())
    value = 0.0
    for key in set(p) | set(q):
        a, b = p.get(key, 0) / total_p, q.get(key, 0) / total_q
        m = (a + b) / 2
        if a:
            value += 0.5 * a * math.log2(a / m)
        if b:
            value += 0.5 * b * math.log2(b / m)
    return value


def language_distances(vocab, corpora: Sequence[str], source: str, languages: Iterable[str] | str,
                       data_dir: str | None = None, max_bytes: int = 2_000_000) -> dict[str, dict[str, float]]:
    """The measures of the module docstring for each language against `source` (itself included)."""
    from t5x_cpt.data.vocab_training import language_sample

    source_unigrams, source_bigrams = _token_counts(vocab, language_sample(corpora, source, max_bytes, "train",
                                                                           data_dir))
    out = {}
    for lang in parse_languages(languages):
        unigrams, bigrams = _token_counts(vocab, language_sample(corpora, lang, max_bytes, "validation", data_dir))
        n_tokens, n_bigrams = sum(unigrams.values()), sum(bigrams.values())
        out[lang] = {
            "unseen_token_share": sum(c for t, c in unigrams.items() if t not in source_unigrams) / max(n_tokens, 1),
            "unseen_bigram_share": sum(c for b, c in bigrams.items() if b not in source_bigrams) / max(n_bigrams, 1),
            "unigram_js_bits": _js_bits(unigrams, source_unigrams),
            "validation_tokens": n_tokens,
        }
    return out
