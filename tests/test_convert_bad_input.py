"""Bad input to the converters: one clear message each, exit status 2, and no partial output left."""

import json
import os
import shutil

import pytest

from t5x_cpt.convert import ConversionError, load_pretrained, testing
from t5x_cpt.convert import __main__ as cli

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    testing.make_hf_model("llama", str(root / "single"), **TINY)
    testing.make_hf_model("llama", str(root / "sharded"), max_shard_size="8KB", **TINY)
    testing.make_hf_model("llama", str(root / "bin"), safe_serialization=False, **TINY)
    return root


def _fails(tmp_path, capsys, args, *needles):
    """Runs the CLI expecting failure; checks the message and that nothing was left in out's parent."""
    out_parent = tmp_path / "outputs"
    out_parent.mkdir(exist_ok=True)
    before = set(os.listdir(out_parent))
    code = cli.main([*args, f"--out={out_parent / 'result'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("t5x_cpt.convert ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert set(os.listdir(out_parent)) == before, f"partial output left: {os.listdir(out_parent)}"
    return lines[0]


def _copy(pristine, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(pristine / name, dst)
    return dst


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("model_type", ["gpt2", "qwen3", "gemma"])
def test_unsupported_architecture(pristine, tmp_path, capsys, model_type):
    src = _copy(pristine, "single", tmp_path)
    _edit_config(src, model_type=model_type, architectures=["SomethingForCausalLM"])
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "unsupported architecture", repr(model_type))


def test_unsupported_rope_scaling(pristine, tmp_path, capsys):
    src = _copy(pristine, "single", tmp_path)
    _edit_config(src, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "rope scaling type 'yarn' is not supported")


def test_legacy_unsupported_rope_scaling(pristine, tmp_path, capsys):
    src = _copy(pristine, "single", tmp_path)
    _edit_config(src, rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0})
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "'dynamic' is not supported")


def test_llama_attention_bias_is_refused(pristine, tmp_path, capsys):
    src = _copy(pristine, "single", tmp_path)
    _edit_config(src, attention_bias=True)
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "attention_bias")


def test_missing_required_field(pristine, tmp_path, capsys):
    src = _copy(pristine, "single", tmp_path)
    _edit_config(src, hidden_size=None)
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "'hidden_size'")


def test_missing_shard(pristine, tmp_path, capsys):
    src = _copy(pristine, "sharded", tmp_path)
    shard = sorted(p for p in os.listdir(src) if p.endswith(".safetensors"))[1]
    os.remove(src / shard)
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "missing", shard)


def test_no_weight_files(pristine, tmp_path, capsys):
    src = _copy(pristine, "single", tmp_path)
    os.remove(src / "model.safetensors")
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "no weight files")


@pytest.mark.parametrize("name,weights", [("single", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_truncated_weight_file(pristine, tmp_path, capsys, name, weights):
    src = _copy(pristine, name, tmp_path)
    data = (src / weights).read_bytes()
    (src / weights).write_bytes(data[: len(data) // 2])
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "cannot read weight file", weights)


def test_tensor_with_wrong_shape(pristine, tmp_path, capsys):
    src = _copy(pristine, "single", tmp_path)
    _edit_config(src, intermediate_size=40)
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "shape mismatches", "mlp.gate_proj.weight")


def test_untied_config_without_head_tensor(pristine, tmp_path, capsys):
    src = tmp_path / "tied"
    testing.make_hf_model("llama", str(src), **{**TINY, "tie_word_embeddings": True})
    _edit_config(src, tie_word_embeddings=False)
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "missing tensors", "lm_head.weight")


def test_tokenizer_larger_than_vocab(pristine, tmp_path, capsys):
    src = _copy(pristine, "single", tmp_path)
    testing.train_byte_level_tokenizer(str(src), 400)  # the model has 300 embedding rows
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "vocab size mismatch", "300 rows")


def test_no_tokenizer(pristine, tmp_path, capsys):
    src = _copy(pristine, "single", tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        os.remove(src / name)
    _fails(tmp_path, capsys, ["import", f"--source={src}"], "no tokenizer found", "--tokenizer")


def test_not_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    _fails(tmp_path, capsys, ["import", f"--source={tmp_path / 'empty'}"], "no config.json")
    _fails(tmp_path, capsys, ["import", f"--source={tmp_path / 'notes.txt'}"], "not a GGUF")
    _fails(tmp_path, capsys, ["import", f"--source={tmp_path / 'missing'}"], "does not exist")


def test_truncated_and_unsupported_gguf(pristine, tmp_path, capsys):
    model = testing.make_hf_model("llama", None, **TINY)
    path = tmp_path / "m.gguf"
    testing.write_gguf(str(path), model)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 5000])
    _fails(tmp_path, capsys, ["import", f"--source={tmp_path / 'cut.gguf'}"], "cut.gguf")
    testing.write_gguf(str(tmp_path / "g.gguf"), model, architecture="gemma")
    _fails(tmp_path, capsys, ["import", f"--source={tmp_path / 'g.gguf'}"], "unsupported architecture", "'gemma'")


def test_existing_output_is_not_overwritten(pristine, tmp_path, capsys):
    out = tmp_path / "outputs" / "result"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    _fails(tmp_path, capsys, ["import", f"--source={pristine / 'single'}"], "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert cli.main(["import", f"--source={pristine / 'single'}", f"--out={out}", "--overwrite"]) == 0
    assert sorted(os.listdir(out.parent)) == ["result"] and (out / "params").is_dir()
    assert not (out / "keep.txt").exists()


def test_export_needs_a_checkpoint_and_a_tokenizer(pristine, tmp_path, capsys):
    _fails(tmp_path, capsys, ["export", f"--checkpoint={pristine / 'single'}"], "no model_config.json")
    assert cli.main(["import", f"--source={pristine / 'single'}", f"--out={tmp_path / 'imp'}"]) == 0
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "imp" / "params", run / "checkpoints" / "3" / "params")
    shutil.copy(tmp_path / "imp" / "model_config.json", run / "model_config.json")
    _fails(tmp_path, capsys, ["export", f"--checkpoint={run}"], "cannot find the tokenizer", "--tokenizer")
    _fails(tmp_path, capsys, ["export", f"--checkpoint={run}", "--step=7", f"--tokenizer={tmp_path / 'imp'}"],
           "step 7 not found")
    _fails(tmp_path, capsys, ["export", f"--checkpoint={tmp_path / 'imp'}", "--architecture=qwen2"], "QKV bias")


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(ConversionError, match="does not exist"):
        load_pretrained(str(tmp_path / "nothing"))
    with pytest.raises(ConversionError, match="architecture fields"):
        load_pretrained(str(tmp_path), vocab_size=10)


def test_command_line_exit_status_and_single_line(tmp_path):
    """The real entry point: status 2 and one line on stderr, nothing on stdout."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "t5x_cpt.convert", "import", f"--source={tmp_path / 'nope'}",
                             f"--out={tmp_path / 'out'}"], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"t5x_cpt.convert import: error: source {tmp_path / 'nope'} does not exist"]
    assert not (tmp_path / "out").exists()
