"""Language distance in a vocabulary's tokens (t5x_cpt.data.distance)."""
import math

import pytest

from t5x_cpt.data import distance, vocabularies


class _Chars:
    """A character vocabulary: the measures' arithmetic checked on ids anyone can count by hand."""

    def encode(self, text):
        return [ord(c) for c in text]


def test_measures_on_hand_counted_text():
    source_uni, source_bi = distance._token_counts(_Chars(), ["abab"])
    target_uni, target_bi = distance._token_counts(_Chars(), ["abc"])
    assert dict(target_uni) == {97: 1, 98: 1, 99: 1} and dict(target_bi) == {(97, 98): 1, (98, 99): 1}
    assert set(source_bi) == {(97, 98), (98, 97)}
    # JS divergence: p = (1/3, 1/3, 1/3) over a, b, c; q = (1/2, 1/2, 0).
    p, q = [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    expected = 0.5 * sum(a * math.log2(a / c) for a, c in zip(p, m) if a) + \
        0.5 * sum(b * math.log2(b / c) for b, c in zip(q, m) if b)
    assert distance._js_bits(target_uni, source_uni) == pytest.approx(expected)
    assert distance._js_bits(source_uni, source_uni) == 0.0
    assert distance._js_bits(distance._token_counts(_Chars(), ["xy"])[0], source_uni) == pytest.approx(1.0)


def test_byte_distances_on_the_parallel_corpus():
    """On LibreOffice help (prepared by `make test`): English is at distance ~0 from itself, French
    shares most byte transitions with English, Chinese UTF-8 almost none."""
    d = distance.language_distances(vocabularies.vocabulary_from_spec("byte"), ["lo_help"], "en", "en,fr,zh",
                                    max_bytes=300_000)
    assert d["en"]["unseen_bigram_share"] < 0.01 and d["en"]["unigram_js_bits"] < 0.02
    assert d["fr"]["unseen_bigram_share"] < 0.15 and d["fr"]["unigram_js_bits"] < 0.1
    assert d["zh"]["unseen_bigram_share"] > 0.6 and d["zh"]["unigram_js_bits"] > 0.6
