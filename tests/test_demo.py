"""The demo's saving: the study's law-free measure read off (FLOPs, loss) curves from metrics."""

import numpy as np
import pytest

from t5x_cpt import demo


def _curve(shift: float) -> list[tuple[float, float]]:
    """A power-law run logged like the trainer: step 0 at zero FLOPs (a loss no law describes)."""
    flops = np.geomspace(1e9, 1e11, 9)
    return [(0.0, 5.6)] + [(float(f), float(10 * (shift * f) ** -0.1)) for f in flops]


@pytest.mark.parametrize("shift, method, saved", [
    (2.0, "cpt_reaches_scratch", 0.5),     # CPT at F is scratch at 2F: half the FLOPs
    (0.5, "scratch_reaches_cpt", -1.0),    # CPT at F is scratch at F/2: never reaches, twice the FLOPs
])
def test_saving_ignores_step_zero_and_reads_the_curves(shift, method, saved):
    result = demo.saving(_curve(1.0), _curve(shift))
    assert result["method"] == method
    assert result["saved_fraction"] == pytest.approx(saved, rel=1e-9)


def test_report_says_when_cpt_falls_behind():
    behind = demo.saving(_curve(1.0), _curve(0.5))
    summary = {"source_tokens_per_param": 0.73, "targets": {"zh": {"scratch_final_loss": 1.0, "cpt": {
        "replay0": {"final_loss": 1.1, "saving": behind, "english_loss_start": 2.0, "english_loss_end": 3.0}}}}}
    text = demo._interpretation(summary)
    assert "did not reach scratch's final loss" in text and "with 50% of CPT's compute" in text
    assert demo._saving_cells(behind).startswith("never reached")


def _write_analysis(root, sweep, lang, savings):
    import json
    import os

    os.makedirs(os.path.join(root, sweep, lang))
    runs = [{"run": f"cpt_{lang}_{n}", "N": n, "replay_ratio": 0.0,
             "at_scratch_end": {"saved_fraction": saved}} for n, saved in savings]
    with open(os.path.join(root, sweep, lang, "scaling.json"), "w") as f:
        json.dump({"savings": {"runs": runs}}, f)


def test_mini_study_gain_is_the_smallest_size_from_which_every_larger_one_saves(tmp_path):
    # Two sweeps' analyses, sizes interleaved: a gain at 2e6 does not count, 4e6 breaks the run.
    _write_analysis(tmp_path, "ladder", "zh", [(1e6, -0.5), (2e6, 0.1), (4e6, -0.05), (16e6, 0.3)])
    _write_analysis(tmp_path, "languages", "zh", [(8e6, 0.2)])
    _write_analysis(tmp_path, "languages", "ru", [(1e6, -0.4), (2e6, -0.1)])
    gain = demo.mini_study_gain("zh", root=str(tmp_path))
    assert (gain["N"], gain["run"], gain["saved_fraction"]) == (8e6, "cpt_zh_8000000.0", 0.2)
    assert [n for n, _, _ in gain["sizes"]] == [1e6, 2e6, 4e6, 8e6, 16e6]
    assert demo.mini_study_gain("ru", root=str(tmp_path))["N"] is None
    assert demo.mini_study_gain("fr", root=str(tmp_path)) is None
