"""Gin command lines on the project's real gin files: what is refused, with which one-line message.

The configurables are registered as the trainer's entry point registers them (it imports
t5x_cpt.train and the data pipeline before it parses), so gin checks bindings against the real
signatures.
"""
import os

import gin
import pytest

import t5x_cpt.data.pipeline  # noqa: F401  (registers make_train_pipeline, ...)
import t5x_cpt.train  # noqa: F401  (registers train)
from t5x_cpt import errors, gin_cli, model_info
from t5x_cpt.model import ModelConfig, ModelConfigError

EXPERIMENT = "configs/experiments/tiny_pretrain.gin"
MODEL_DIR = "MODEL_DIR='/tmp/never_written'"


def refused(bindings, files=(EXPERIMENT,), **kwargs) -> str:
    """The message of the GinConfigError parse raises; it must be one line."""
    with pytest.raises(gin_cli.GinConfigError) as caught:
        gin_cli.parse(list(files), bindings, **kwargs)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_a_mistyped_macro_is_refused_naming_the_closest_one():
    message = refused(["TRAIN_STEPZ=3", MODEL_DIR])
    assert message.startswith("--gin.TRAIN_STEPZ=3 binds macro TRAIN_STEPZ, which nothing in the config reads")
    assert "did you mean TRAIN_STEPS?" in message


def test_any_unread_command_line_macro_is_refused_and_the_config_macros_listed():
    message = refused([MODEL_DIR, "WARMUP_FRACTION=0.1"])
    assert "binds macro WARMUP_FRACTION, which nothing in the config reads" in message
    # No close name: the message lists the macros the experiment does read instead.
    assert "TRAIN_STEPS" in message and "SEQUENCE_LENGTH" in message and "did you mean" not in message


def test_macros_the_config_reads_may_be_overridden_and_new_ones_read_by_a_binding():
    gin_cli.parse([EXPERIMENT], [MODEL_DIR, "TRAIN_STEPS=7", "MY_SEED=5", "train.seed=%MY_SEED"])
    assert gin.query_parameter("%TRAIN_STEPS") == 7
    assert gin.query_parameter("%MY_SEED") == 5


def test_a_macro_read_only_by_a_binding_that_skip_unknown_drops_still_counts(tmp_path):
    extra = tmp_path / "extra.gin"
    extra.write_text("include 'experiments/tiny_pretrain.gin'\nnot_registered_here.size = %ONLY_HERE\n")
    gin_cli.parse([str(extra)], ["ONLY_HERE=3"], skip_unknown=True, finalize=False)
    assert gin.query_parameter("%ONLY_HERE") == 3


@pytest.mark.parametrize("binding,expected", [
    ("train.train_stepz=3",
     "Configurable 'train' doesn't have a parameter named 'train_stepz'; did you mean train_steps?"),
    ("trian.train_steps=3", "No configurable matching 'trian'; did you mean train?"),
    ("train.train_steps=(3", "bad gin binding 'train.train_steps=(3'"),
])
def test_bad_bindings_name_the_binding_and_the_closest_name(binding, expected):
    message = refused([MODEL_DIR, binding])
    assert message.startswith(f"bad gin binding {binding!r}: "), message
    assert expected in message


def test_finalize_names_a_required_macro_left_unset():
    assert refused([]) == "macro MODEL_DIR is required: pass --gin.MODEL_DIR=VALUE or bind it in a gin file"


def test_a_macro_read_but_never_defined_is_named():
    message = refused([MODEL_DIR, "train.train_steps=%TRAIN_STEPZ"])
    assert message.startswith("macro TRAIN_STEPZ is read (%TRAIN_STEPZ) but no gin file or binding defines it")
    assert "did you mean TRAIN_STEPS?" in message


def test_a_bad_gin_file_is_named_with_its_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'models/tiny.gin'\nModelConfig.num_layerz = 3\n")
    message = refused([], files=[str(bad)])
    assert message.startswith(f"bad gin file {bad}, line 2: ")
    assert "'num_layerz'; did you mean num_layers?" in message


def test_gins_call_trailer_does_not_bury_the_message(capsys):
    # Gin appends "In call to configurable ModelConfig ..." to errors raised inside a configurable.
    gin_cli.parse(["configs/models/tiny.gin"], ["ModelConfig.num_heads=3"], finalize=False)
    with pytest.raises(ModelConfigError) as caught:
        ModelConfig()
    assert "In call to configurable" in str(caught.value)
    assert errors.one_line(caught.value) == ("ModelConfig.num_heads=3 does not divide d_model=64; pick a divisor "
                                             "or set head_dim explicitly")
    # ... and a command shows the message alone, on one line, with exit code 2.
    gin.clear_config()
    code = model_info.main(["--gin_file=configs/models/tiny.gin", "--gin.ModelConfig.num_heads=3"])
    err = capsys.readouterr().err
    assert code == errors.USAGE_EXIT_CODE
    assert err.splitlines() == ["t5x_cpt.model_info: error: " + errors.one_line(caught.value)]


def test_a_runs_directory_in_the_working_directory_does_not_shadow_configs_runs(tmp_path, monkeypatch):
    """Sweeps write their runs under ./runs by default; run files include 'runs/common.gin'."""
    (tmp_path / "runs" / "mini_study").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    gin_cli.parse([os.path.join(gin_cli.REPO_ROOT, "configs/models/tiny.gin"),
                   os.path.join(gin_cli.REPO_ROOT, "configs/runs/pretrain.gin")], [], finalize=False)
    assert gin.query_parameter("train.run_kind") == "source"
