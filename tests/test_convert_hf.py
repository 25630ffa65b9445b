"""Hugging Face round trips: transformers model -> import -> logits match -> export -> transformers again.

Every architecture is built tiny and random in transformers with non-default settings
(GQA, odd sizes, explicit head_dim, QKV bias, tied and untied heads, linear and llama3 rope
scaling, safetensors sharded and not, a pytorch .bin), so a mapping mistake cannot hide behind a
default. torch and transformers are test dependencies: these tests fail, never skip, without them.
"""

import json

import numpy as np
import pytest
import torch  # noqa: F401  (fail here, loudly, if the oracle is missing)
import transformers  # noqa: F401

from t5x_cpt import checkpoints
from t5x_cpt.convert import __main__ as cli
from t5x_cpt.convert import load_pretrained, testing

IMPORT_TOL = 1e-4   # ours vs transformers, float32
EXPORT_TOL = 1e-5   # transformers(exported) vs transformers(original)

CASES = {
    "llama_gqa_untied_llama3": ("llama", dict(
        vocab_size=301, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}), {}),
    "llama_tied_linear_headdim_sharded": ("llama", dict(
        vocab_size=257, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, head_dim=12, rms_norm_eps=3e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.5}),
        {"max_shard_size": "30KB"}),
    "mistral_gqa_bin": ("mistral", dict(
        vocab_size=263, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, sliding_window=None, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}), {"safe_serialization": False}),
    "qwen2_bias_untied": ("qwen2", dict(
        vocab_size=311, hidden_size=36, intermediate_size=60, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}), {}),
    "qwen2_bias_tied_linear": ("qwen2", dict(
        vocab_size=270, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}), {}),
}


def _tokens(vocab, seed=0, shape=(2, 23)):
    return np.random.RandomState(seed).randint(0, vocab, size=shape)


def _run_cli(*args):
    assert cli.main(list(args)) == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip(case, tmp_path):
    model_type, config, save = CASES[case]
    hf_dir, imported, exported = tmp_path / "hf", tmp_path / "imported", tmp_path / "exported"
    hf_model = testing.make_hf_model(model_type, str(hf_dir), **save, **config)
    tokens = _tokens(config["vocab_size"])
    reference = testing.hf_logits(hf_model, tokens)

    _run_cli("import", f"--source={hf_dir}", f"--out={imported}")
    for name in ("params", "model_config.json", "model.gin", "hf_config.json", "import_info.json", "tokenizer.json"):
        assert (imported / name).exists(), name
    model, params = load_pretrained(str(imported))
    ours = np.asarray(model.apply({"params": params}, tokens))
    assert ours.shape == reference.shape and ours.dtype == np.float32
    import_diff = float(np.abs(ours - reference).max())
    assert import_diff <= IMPORT_TOL, f"{case}: import logits differ by {import_diff}"

    _run_cli("export", f"--checkpoint={imported}", f"--out={exported}")
    reloaded = testing.load_hf(str(exported))
    assert type(reloaded) is type(hf_model)
    again = testing.hf_logits(reloaded, tokens)
    export_diff = float(np.abs(again - reference).max())
    assert export_diff <= EXPORT_TOL, f"{case}: exported logits differ by {export_diff}"
    assert float(np.abs(again - ours).max()) <= IMPORT_TOL
    # The tokenizer travels with the export and is the source's.
    tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    source_tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    assert tok("the quick fox")["input_ids"] == source_tok("the quick fox")["input_ids"]
    print(f"{case}: import max|diff|={import_diff:.2e} export max|diff|={export_diff:.2e}")


def test_import_info_and_gin_reflect_the_source(tmp_path):
    """Every architecture field comes from config.json; model.gin binds exactly those fields."""
    import gin

    from t5x_cpt.model import ModelConfig

    model_type, config, save = CASES["llama_gqa_untied_llama3"]
    testing.make_hf_model(model_type, str(tmp_path / "hf"), **config)
    _run_cli("import", f"--source={tmp_path / 'hf'}", f"--out={tmp_path / 'imp'}", "--dtype=bfloat16")
    info = json.loads((tmp_path / "imp" / "import_info.json").read_text())
    assert info["architecture"] == "llama" and info["source_format"] == "safetensors"
    assert info["stored_dtype"] == "bfloat16"
    gin.clear_config()
    try:
        gin.parse_config_file(str(tmp_path / "imp" / "model.gin"))
        bound = ModelConfig()
    finally:
        gin.clear_config()
    stored = checkpoints.read_model_config(str(tmp_path / "imp"))
    assert bound == stored.replace(dtype=bound.dtype, param_dtype=bound.param_dtype)
    assert (bound.num_kv_heads, bound.head_dim, bound.rope_scaling, bound.rope_theta, bound.rms_norm_eps,
            bound.rope_original_max_position, bound.tie_embeddings) == (2, 8, "llama3", 5000.0, 1e-5, 16, False)
    metadata = checkpoints.read_params_metadata(checkpoints.find_params_dir(str(tmp_path / "imp")))
    assert str(metadata["embed"]["embedding"].dtype) == "bfloat16"


def test_load_pretrained_from_hf_dir_in_memory_and_scanned(tmp_path):
    model_type, config, save = CASES["qwen2_bias_untied"]
    hf_model = testing.make_hf_model(model_type, str(tmp_path / "hf"), **config)
    tokens = _tokens(config["vocab_size"], seed=1, shape=(1, 11))
    reference = testing.hf_logits(hf_model, tokens)
    model, params = load_pretrained(str(tmp_path / "hf"), scan_layers=True)
    assert "layers" in params
    assert np.abs(np.asarray(model.apply({"params": params}, tokens)) - reference).max() <= IMPORT_TOL
    assert not any(p.name != "hf" for p in tmp_path.iterdir()), "load_pretrained must not write anything"


def test_export_of_a_training_model_dir_uses_its_step_and_source_tokenizer(tmp_path):
    """A MODEL_DIR has no tokenizer of its own: export follows run_info.json's source_checkpoint."""
    import jax

    model_type, config, save = CASES["llama_tied_linear_headdim_sharded"]
    testing.make_hf_model(model_type, str(tmp_path / "hf"), **config)
    _run_cli("import", f"--source={tmp_path / 'hf'}", f"--out={tmp_path / 'imp'}")
    model, params = load_pretrained(str(tmp_path / "imp"))
    run = tmp_path / "run"
    for step, scale in ((10, 1.5), (20, 0.5)):
        changed = jax.tree.map(lambda x, s=scale: np.asarray(x) * s, params)
        checkpoints.save_params(str(run / "checkpoints" / str(step)), changed)
    checkpoints.write_model_config(str(run), model.config)
    (run / "run_info.json").write_text(json.dumps({"source_checkpoint": str(tmp_path / "imp")}))
    tokens = _tokens(config["vocab_size"], seed=2, shape=(1, 9))
    for step_flag, scale in (([], 0.5), (["--step=10"], 1.5)):
        out = tmp_path / f"export{scale}"
        _run_cli("export", f"--checkpoint={run}", f"--out={out}", *step_flag)
        assert (out / "tokenizer.json").exists()
        expected = np.asarray(model.apply({"params": jax.tree.map(lambda x, s=scale: x * s, params)}, tokens))
        got = testing.hf_logits(testing.load_hf(str(out)), tokens)
        assert np.abs(got - expected).max() <= IMPORT_TOL
