"""`python -m t5x_cpt.model_info`: the JSON it prints, and how it refuses bad input."""
import json
import os
import subprocess
import sys

import pytest

from t5x_cpt import flops, model_info
from t5x_cpt.model import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "t5x_cpt.model_info", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def expected_counts(d, heads, layers, vocab=32000):
    """Independent of t5x_cpt.flops: the ladder convention (MHA, SwiGLU 4d, tied) counted by hand."""
    per_layer = 4 * d * d + 3 * d * (4 * d) + 2 * d
    non_embedding = layers * per_layer + d
    return non_embedding + vocab * d, non_embedding


def test_1393m_row_as_a_subprocess():
    result = run_tool("--gin_file=configs/models/ladder_1393m.gin")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    params, non_embedding = expected_counts(1792, 14, 26)
    assert abs(info["params"] - 1393e6) <= 0.01 * 1393e6
    assert info["params"] == params
    assert info["non_embedding_params"] == non_embedding
    assert info["sequence_length"] == 2048
    # PaLM's training FLOPs: 6N + 12 * layers * heads * head_dim * T.
    assert info["train_flops_per_token"] == pytest.approx(6 * params + 12 * 26 * 14 * 128 * 2048, rel=1e-12)
    assert info["config"]["num_heads"] == 14


def test_overrides_and_sequence_length_in_process(capsys):
    code = model_info.main(["--gin_file=configs/models/ladder_49m.gin", "--gin.ModelConfig.num_layers=4",
                            "--sequence_length", "4096"])
    assert code == 0
    info = json.loads(capsys.readouterr().out)
    params, _ = expected_counts(512, 8, 4)
    assert info["params"] == params
    assert info["train_flops_per_token"] == pytest.approx(6 * params + 12 * 4 * 8 * 64 * 4096, rel=1e-12)


def test_describe_counts_an_untied_gqa_model_like_the_model_does():
    config = ModelConfig(vocab_size=100, d_model=64, num_layers=3, num_heads=8, num_kv_heads=2, d_ff=96,
                         tie_embeddings=False, qkv_bias=True)
    info = model_info.describe(config, 128)  # raises if flops.param_counts disagrees with the real tree
    hd = 8
    per_layer = 64 * 8 * hd * 2 + 2 * 64 * 2 * hd + 3 * 64 * 96 + 2 * 64 + 8 * hd + 2 * 2 * hd
    assert info["params"] == 3 * per_layer + 64 + 2 * 100 * 64
    assert info["embedding_params"] == 2 * 100 * 64
    assert flops.scaling_compute(info["params"], 1000) == 6 * info["params"] * 1000


def test_unknown_binding_fails_and_names_it():
    result = run_tool("--gin_file=configs/models/tiny.gin", "--gin.ModelConfig.num_experts=4")
    assert result.returncode != 0
    assert "num_experts" in result.stderr
    assert "Traceback" not in result.stderr  # one clear message, not a stack trace
    assert result.stdout == ""


@pytest.mark.parametrize("args,names", [
    (["--gin_file=configs/models/tiny.gin", "--gin.NoSuchThing.size=4"], ["NoSuchThing"]),
    (["--gin_file=configs/models/ladder_1393m.gin", "--gin.ModelConfig.num_heads=13"], ["13", "1792"]),
    (["--gin_file=configs/models/tiny.gin", "--gin.ModelConfig.num_kv_heads=3"], ["num_kv_heads=3", "num_heads=4"]),
    (["--gin_file=configs/models/no_such_size.gin"], ["no_such_size.gin"]),
])
def test_bad_input_in_process(args, names, capsys):
    assert model_info.main(args) != 0
    err = capsys.readouterr().err
    for name in names:
        assert name in err, err
