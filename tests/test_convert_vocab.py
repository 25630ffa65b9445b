"""Vocabulary extension on SmolLM2's real English tokenizer with Chinese text.

The model is a tiny random Llama with SmolLM2's 49152-token vocabulary (the tokenizer is what
matters here; the weights only need the right shapes). The Chinese text is the original prose in
`t5x_cpt.convert.testing.ZH_SAMPLE`: 11 paragraphs teach the new tokens, 4 held-out ones measure.
"""

import json

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer

from t5x_cpt import checkpoints
from t5x_cpt.convert import __main__ as cli
from t5x_cpt.convert import load_pretrained, testing
from t5x_cpt.convert.gguf import GGUFFile
from t5x_cpt.convert.gguf_tokenizer import write_gguf_tokenizer

NEW_TOKENS = 400


@pytest.fixture(scope="module")
def extended(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    write_gguf_tokenizer(GGUFFile(testing.smollm2_gguf()).tokenizer_metadata(), str(root))  # SmolLM2's tokenizer
    testing.make_hf_model("llama", None, vocab_size=49152, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=False).save_pretrained(root / "hf")
    (root / "zh_train.txt").write_text("\n".join(testing.ZH_SAMPLE[:11]), encoding="utf-8")
    (root / "zh_eval.txt").write_text("\n".join(testing.ZH_SAMPLE[11:]), encoding="utf-8")
    (root / "en.txt").write_text(testing.ENGLISH_SAMPLE, encoding="utf-8")
    assert cli.main(["import", f"--source={root / 'hf'}", f"--tokenizer={root}", f"--out={root / 'source'}"]) == 0
    assert cli.main(["extend_vocab", f"--checkpoint={root / 'source'}", f"--out={root / 'extended'}",
                     f"--target_text={root / 'zh_train.txt'}", f"--num_new_tokens={NEW_TOKENS}",
                     f"--eval_text={root / 'zh_eval.txt'}", f"--source_eval_text={root / 'en.txt'}",
                     "--pad_to_multiple_of=64"]) == 0
    return root


def test_report_and_bytes_per_token(extended):
    report = json.loads((extended / "extended" / "vocab_extension.json").read_text())
    zh, en = report["target_bytes_per_token"], report["source_bytes_per_token"]
    print(f"Chinese held-out bytes/token {zh['before']:.3f} -> {zh['after']:.3f} "
          f"(+{report['added_tokens']} tokens); English {en['before']:.3f} -> {en['after']:.3f}")
    assert 0 < report["added_tokens"] <= NEW_TOKENS
    assert zh["after"] > zh["before"] * 1.1
    assert en["after"] == en["before"]  # ASCII-only text tokenizes exactly as before
    assert report["first_new_id"] == 49152
    assert report["new_vocab_size"] % 64 == 0 and report["new_vocab_size"] >= 49152 + report["added_tokens"]
    config = checkpoints.read_model_config(str(extended / "extended"))
    assert config.vocab_size == report["new_vocab_size"]
    assert f"ModelConfig.vocab_size = {config.vocab_size}" in (extended / "extended" / "model.gin").read_text()


def test_source_ids_and_rows_unchanged(extended):
    old = Tokenizer.from_file(str(extended / "tokenizer.json"))
    new = Tokenizer.from_file(str(extended / "extended" / "tokenizer.json"))
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert all(new_vocab[token] == index for token, index in old_vocab.items())
    for text in (testing.ENGLISH_SAMPLE, "<|im_start|>user\nHi there, 42!<|im_end|>"):
        assert new.encode(text).ids == old.encode(text).ids
    zh = testing.ZH_SAMPLE[12]
    assert new.decode(new.encode(zh).ids) == zh
    assert max(new.encode(zh).ids) >= 49152 and len(new.encode(zh).ids) < len(old.encode(zh).ids)

    _, before = load_pretrained(str(extended / "source"))
    model, after = load_pretrained(str(extended / "extended"))
    emb_old, emb_new = np.asarray(before["embed"]["embedding"]), np.asarray(after["embed"]["embedding"])
    head_old, head_new = np.asarray(before["lm_head"]["kernel"]), np.asarray(after["lm_head"]["kernel"])
    assert np.array_equal(emb_new[:49152], emb_old) and np.array_equal(head_new[:, :49152], head_old)
    # A new token starts as the mean of the source tokens it used to be split into.
    report = json.loads((extended / "extended" / "vocab_extension.json").read_text())
    token_id = 49152 + report["added_tokens"] - 1
    pieces = [t.id for t in old.model.tokenize(new.id_to_token(token_id))]
    np.testing.assert_allclose(emb_new[token_id], emb_old[pieces].mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(head_new[:, token_id], head_old[:, pieces].mean(axis=1), rtol=1e-6, atol=1e-7)
    # Logits of the source vocabulary on source tokens are untouched.
    tokens = np.asarray([old.encode(testing.ENGLISH_SAMPLE[:120]).ids])
    source_model, _ = load_pretrained(str(extended / "source"))
    np.testing.assert_array_equal(np.asarray(model.apply({"params": after}, tokens))[..., :49152],
                                  np.asarray(source_model.apply({"params": before}, tokens)))


def test_extended_model_exports_to_transformers(extended):
    assert cli.main(["export", f"--checkpoint={extended / 'extended'}", f"--out={extended / 'hf_extended'}"]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(extended / "hf_extended"))
    ids = tokenizer(testing.ZH_SAMPLE[13])["input_ids"]
    assert max(ids) >= 49152
    model, params = load_pretrained(str(extended / "extended"))
    ours = np.asarray(model.apply({"params": params}, np.asarray([ids])))
    theirs = testing.hf_logits(testing.load_hf(str(extended / "hf_extended")), np.asarray([ids]))
    assert theirs.shape[-1] == model.config.vocab_size
    assert np.abs(ours - theirs).max() <= 1e-4


def test_sentencepiece_style_bpe_is_extended_too(tmp_path):
    """A Llama-2-style tokenizer.json (metaspace, byte fallback) gets Chinese merges the same way."""
    from t5x_cpt.convert.vocab_extension import bytes_per_token, merge_into, train_target_merges

    metadata = testing.sentencepiece_gguf_metadata(str(tmp_path), testing.ENGLISH_SAMPLE)  # English only
    write_gguf_tokenizer(metadata, str(tmp_path))
    source_json = json.loads((tmp_path / "tokenizer.json").read_text())
    merges = train_target_merges(source_json, testing.ZH_SAMPLE[:11], 800)
    extended_json, added = merge_into(source_json, merges, 200, first_id=500)
    old, new = Tokenizer.from_str(json.dumps(source_json)), Tokenizer.from_str(json.dumps(extended_json))
    assert 0 < len(added) <= 200 and all(new.token_to_id(t) == 500 + i for i, t in enumerate(added))
    assert all(new.get_vocab()[t] == i for t, i in old.get_vocab().items())
    assert new.encode(testing.ENGLISH_SAMPLE).ids == old.encode(testing.ENGLISH_SAMPLE).ids
    held_out = "".join(testing.ZH_SAMPLE[11:])
    assert new.decode(new.encode(held_out).ids) == held_out
    assert bytes_per_token(new, held_out) > 1.5 * bytes_per_token(old, held_out)  # from byte fallback

