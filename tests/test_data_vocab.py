"""Vocabularies: gin selection, SentencePiece training (deterministic, lossless, byte fallback),
the Hugging Face tokenizer.json adapter, and their errors. Real sentencepiece / tokenizers / seqio."""

import json
import os

import gin
import numpy as np
import pytest

from t5x_cpt.data import testing, vocab_training, vocabularies
from t5x_cpt.data.errors import DataError

EN = ["The quick brown fox jumps over the lazy dog number {i}.", "Select the cells and choose Format - Cells {i} times."]
ZH = ["选择单元格，然后选择「格式」-「单元格」第{i}次。", "这是第{i}个关于电子表格的中文句子。"]
FR = ["Sélectionnez les cellules et choisissez Format - Cellules {i} fois.", "Voici la phrase française numéro {i}."]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("vocab_cache"))
    rng = np.random.default_rng(0)
    for lang, templates in (("en", EN), ("zh", ZH), ("fr", FR)):
        docs = ["\n".join([t.format(i=i + k) for k, t in enumerate(templates)] +
                          [testing.synthetic_text(lang, rng, 30)]) for i in range(400)]
        testing.write_corpus(d, "lo_help", lang, docs[:360], docs[360:])
    return d


def test_byte_vocabulary_is_the_default_and_gin_selectable():
    assert vocabularies.vocab_size() == 259
    gin.parse_config("get_vocabulary.name = 'byte'")
    vocab = vocabularies.get_vocabulary()
    assert vocab.encode("é") == [0xC3 + 3, 0xA9 + 3] and vocab.eos_id == 1


def test_vocabulary_spec_errors(tmp_path):
    with pytest.raises(DataError, match="unknown vocabulary kind"):
        vocabularies.vocabulary_from_spec("wordpiece:x")
    with pytest.raises(DataError, match="does not exist"):
        vocabularies.vocabulary_from_spec(f"sentencepiece:{tmp_path}/missing.model")
    with pytest.raises(DataError, match="does not exist"):
        vocabularies.vocabulary_from_spec(f"hf:{tmp_path}/tokenizer.json")
    with pytest.raises(DataError, match="needs a file"):
        vocabularies.vocabulary_from_spec("sentencepiece")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(Exception):
        vocabularies.vocabulary_from_spec(f"sentencepiece:{bad}").encode("x")


def test_train_vocab_is_deterministic_lossless_with_byte_fallback(corpus_dir, tmp_path):
    kw = dict(corpora=["lo_help"], languages="en,zh,fr", vocab_size=600, name="t",
              sample_bytes_per_language=50_000, data_dir=corpus_dir)
    a = vocab_training.train_vocab(**kw, output_dir=str(tmp_path / "a"))
    b = vocab_training.train_vocab(**kw, output_dir=str(tmp_path / "b"))
    assert a["sha256"] == b["sha256"]
    with open(a["path"], "rb") as fa, open(b["path"], "rb") as fb:
        assert fa.read() == fb.read()
    assert a["vocab_size"] == 600
    vocab = vocabularies.vocabulary_from_spec(f"sentencepiece:{a['path']}")
    assert vocab.tokenizer.pad_id() == 0 and vocab.eos_id == 1 and vocab.unk_id == 2
    text = "  Two  spaces,\nnew line; 한국어 𝔘nseen — 选择单元格"
    ids = vocab.encode(text)
    assert 2 not in ids  # byte fallback: nothing is unknown
    assert vocab.decode(ids) == text  # lossless: identity normalisation, whitespace kept
    bpt = a["bytes_per_token"]
    assert set(bpt) == {"en", "zh", "fr"} and all(v > 1.5 for v in bpt.values())
    # The report is idempotent: a second call returns the stored report without retraining.
    again = vocab_training.train_vocab(**kw, output_dir=str(tmp_path / "a"))
    assert again == json.load(open(os.path.join(tmp_path / "a", "t.json")))


def test_sentencepiece_by_name_from_the_cache(corpus_dir):
    vocab_training.train_vocab(["lo_help"], "en,zh", vocab_size=550, name="named", sample_bytes_per_language=20_000,
                               data_dir=corpus_dir)
    gin.parse_config(["get_vocabulary.name = 'sentencepiece:named'", f"get_vocabulary.data_dir = '{corpus_dir}'"])
    assert vocabularies.vocab_size() == 550


def test_train_vocab_errors(corpus_dir, tmp_path):
    with pytest.raises(DataError, match="not prepared"):
        vocab_training.train_vocab(["lo_help"], "ja", vocab_size=600, data_dir=corpus_dir, output_dir=str(tmp_path))
    with pytest.raises(DataError, match="too small"):
        vocab_training.train_vocab(["lo_help"], "en", vocab_size=100, data_dir=corpus_dir, output_dir=str(tmp_path))


def _hf_tokenizer(path, specials=("<unk>", "</s>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=specials[0] if "<unk>" in specials else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([t.format(i=i) for i in range(50) for t in EN + FR + ZH], trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_adapter(tmp_path):
    from t5x_cpt.data.tfutil import tf

    path = _hf_tokenizer(tmp_path / "tokenizer.json")
    vocab = vocabularies.vocabulary_from_spec(f"hf:{path}")
    assert vocab.eos_id == 1 and vocab.unk_id == 0 and vocab.vocab_size == 400
    text = "Voici la phrase numéro 7 — 选择单元格"
    ids = vocab.encode(text)
    assert 0 not in ids
    assert list(vocab.encode_tf(tf().constant(text)).numpy()) == ids
    assert vocab.decode(ids) == text
    assert vocab.decode_tf(tf().constant(ids, tf().int32)).numpy().decode() == text


def test_hf_tokenizer_with_ordinary_id0_is_refused(tmp_path):
    path = _hf_tokenizer(tmp_path / "tokenizer.json", specials=("!", "</s>"))
    data = json.load(open(path))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "!"]
    with open(path, "w") as f:
        json.dump(data, f)
    with pytest.raises(DataError, match="id 0 is the ordinary token"):
        vocabularies.vocabulary_from_spec(f"hf:{path}")


def test_bytes_per_token_of_bytes_is_one(corpus_dir):
    vocab = vocabularies.vocabulary_from_spec("byte")
    bpt = vocab_training.bytes_per_token(vocab, ["lo_help"], "en,zh", data_dir=corpus_dir)
    assert bpt == {"en": 1.0, "zh": 1.0}
    assert np.isclose(bpt["zh"], 1.0)
