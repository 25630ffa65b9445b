"""The main job at demo scale: does continual pre-training beat training from scratch?

    python -m t5x_cpt.demo [--output_dir=demo_output] [--targets=zh,fr] [--gin.NAME=VALUE ...]

1. pre-trains a small English source model on the LibreOffice-help corpus;
2. for each target language, trains on it for the same budget three ways: from the English
   weights with no replay, from the English weights with English replay, and from scratch;
3. writes report.md and report.png: target loss against training FLOPs, the FLOPs CPT needed
   to reach scratch's final loss (or that it never did), and the English loss of the CPT models
   (forgetting) with and without replay.
Each run is an ordinary training run (configs/experiments/demo_*.gin) in its own MODEL_DIR, so
an interrupted demo resumes where it stopped and a finished run is not trained again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

import gin

from t5x_cpt import gin_cli, run_dir
from t5x_cpt.errors import USAGE_EXIT_CODE, UserInputError, one_line

SOURCE_LANGUAGE = "en"
TASK = "lo_help_{}"
LANGUAGE_NAMES = {"zh": "Chinese", "fr": "French", "en": "English", "de": "German", "ru": "Russian",
                  "es": "Spanish", "ja": "Japanese", "ko": "Korean"}


def run_specs(targets: list[str], replay_ratio: float) -> list[dict]:
    """The demo's runs in order: the source first, then three runs per target language."""
    source = {"name": "source_en", "gin_file": "experiments/demo_pretrain.gin", "language": SOURCE_LANGUAGE,
              "bindings": []}
    specs = [source]
    for lang in targets:
        task = TASK.format(lang)
        common = [f"TARGET_TASK='{task}'", f"train.language='{lang}'",
                  f"EVAL_TASKS=['{TASK.format(SOURCE_LANGUAGE)}', '{task}']"]
        specs.append({"name": f"scratch_{lang}", "gin_file": "experiments/demo_scratch.gin", "language": lang,
                      "bindings": common})
        for ratio in (0.0, replay_ratio):
            specs.append({"name": f"cpt_{lang}_replay{int(round(100 * ratio))}", "gin_file": "experiments/demo_cpt.gin",
                          "language": lang, "replay_ratio": ratio, "source": "source_en",
                          "bindings": common + [f"REPLAY_RATIO={ratio}"]})
    return specs


def train_run(spec: dict, output_dir: str, overrides: list[str]) -> None:
    """One training run in this process (gin is reset around it)."""
    from t5x_cpt import train

    model_dir = os.path.join(output_dir, spec["name"])
    bindings = [f"MODEL_DIR='{model_dir}'", *spec["bindings"]]
    if "source" in spec:
        bindings.append(f"SOURCE_CHECKPOINT='{os.path.join(output_dir, spec['source'])}'")
    gin.clear_config()
    gin_cli.parse([spec["gin_file"]], bindings + overrides)
    start = time.time()
    logging.info("=== %s (%s)", spec["name"], model_dir)
    train.train()
    logging.info("=== %s done in %.0fs", spec["name"], time.time() - start)


def eval_curve(model_dir: str, task: str) -> list[tuple[float, float]]:
    """(training FLOPs, eval loss) pairs of one run, step 0 included."""
    key = f"eval/{task}/loss"
    return [(r["flops"], r[key]) for r in run_dir.read_metrics(model_dir) if key in r]


def flops_to_reach(curve: list[tuple[float, float]], target_loss: float) -> float | None:
    """First FLOPs at which a loss curve reaches `target_loss`, interpolated linearly in log FLOPs."""
    if curve and curve[0][1] <= target_loss:
        return curve[0][0]
    for (f0, l0), (f1, l1) in zip(curve, curve[1:]):
        if l1 <= target_loss:
            t = (l0 - target_loss) / (l0 - l1)
            if f0 <= 0:  # the step-0 point: no log scale below the first trained step
                return f0 + t * (f1 - f0)
            return math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0)))
    return None


def summarise(output_dir: str, targets: list[str], replay_ratio: float) -> dict:
    """Numbers for the report: savings per target and forgetting with/without replay."""
    source_task = TASK.format(SOURCE_LANGUAGE)
    source_curve = eval_curve(os.path.join(output_dir, "source_en"), source_task)
    summary = {"source_final_en_loss": source_curve[-1][1] if source_curve else None, "targets": {}}
    replay_name = f"replay{int(round(100 * replay_ratio))}"
    for lang in targets:
        task = TASK.format(lang)
        scratch = eval_curve(os.path.join(output_dir, f"scratch_{lang}"), task)
        entry = {"scratch_final_loss": scratch[-1][1], "scratch_flops": scratch[-1][0], "cpt": {}}
        for name in ("replay0", replay_name):
            run_dir = os.path.join(output_dir, f"cpt_{lang}_{name}")
            curve = eval_curve(run_dir, task)
            english = eval_curve(run_dir, source_task)
            reach = flops_to_reach(curve, entry["scratch_final_loss"])
            entry["cpt"][name] = {
                "final_loss": curve[-1][1],
                "flops_to_scratch_final_loss": reach,
                "flops_saved_fraction": None if reach is None else 1.0 - reach / entry["scratch_flops"],
                "english_loss_start": english[0][1], "english_loss_end": english[-1][1],
                "english_loss_max": max(loss for _, loss in english),
            }
        summary["targets"][lang] = entry
    return summary


def plot(output_dir: str, targets: list[str], replay_ratio: float, path: str) -> None:
    from t5x_cpt.scaling.plots import pyplot, save_figure

    plt = pyplot()
    replay_name = f"replay{int(round(100 * replay_ratio))}"
    fig, axes = plt.subplots(2, len(targets), figsize=(5.5 * len(targets), 8), squeeze=False)
    styles = {"scratch": ("scratch", "tab:gray", "--"), "replay0": ("CPT, no replay", "tab:blue", "-"),
              replay_name: (f"CPT, {100 * replay_ratio:.0f}% English replay", "tab:orange", "-")}
    for col, lang in enumerate(targets):
        task, source_task = TASK.format(lang), TASK.format(SOURCE_LANGUAGE)
        top, bottom = axes[0][col], axes[1][col]
        for key, (label, color, style) in styles.items():
            run = f"scratch_{lang}" if key == "scratch" else f"cpt_{lang}_{key}"
            curve = [(f, l) for f, l in eval_curve(os.path.join(output_dir, run), task) if f > 0]
            top.plot([f for f, _ in curve], [l for _, l in curve], style, color=color, label=label, marker=".")
            if key != "scratch":
                english = eval_curve(os.path.join(output_dir, run), source_task)
                bottom.plot([f / 1e12 for f, _ in english], [l for _, l in english], style, color=color,
                            label=label, marker=".")
        top.set_xscale("log")
        top.set_title(f"{LANGUAGE_NAMES.get(lang, lang)} validation loss")
        top.set_xlabel("training FLOPs on the target run")
        top.set_ylabel("loss (nats/token)")
        top.legend()
        bottom.set_title(f"English validation loss during CPT to {LANGUAGE_NAMES.get(lang, lang)}")
        bottom.set_xlabel("training TFLOPs")
        bottom.set_ylabel("loss (nats/token)")
        bottom.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_report(output_dir: str, targets: list[str], replay_ratio: float, elapsed: float) -> str:
    summary = summarise(output_dir, targets, replay_ratio)
    plot(output_dir, targets, replay_ratio, os.path.join(output_dir, "report.png"))
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    info = run_dir.read_run_info(os.path.join(output_dir, "source_en"))
    replay_name = f"replay{int(round(100 * replay_ratio))}"
    lines = [
        "# t5x_cpt demo: continual pre-training vs training from scratch", "",
        f"Model: {info['params'] / 1e6:.2f}M parameters; sequence length {info['sequence_length']}, "
        f"batch {info['batch_size']}; data: LibreOffice help (the same paragraphs in every language). "
        f"English source model: {info['train_steps']} steps, final English loss "
        f"{summary['source_final_en_loss']:.3f}. Total time {elapsed / 60:.1f} min.", "",
        "![curves](report.png)", "",
        "| target | scratch final loss | CPT final loss (no replay) | FLOPs CPT needed to reach scratch's final loss | saved |",
        "| --- | --- | --- | --- | --- |",
    ]
    for lang, entry in summary["targets"].items():
        cpt = entry["cpt"]["replay0"]
        reach = cpt["flops_to_scratch_final_loss"]
        lines.append(f"| {LANGUAGE_NAMES.get(lang, lang)} | {entry['scratch_final_loss']:.3f} | {cpt['final_loss']:.3f} | "
                     + (f"{reach:.3g} of {entry['scratch_flops']:.3g} | {100 * cpt['flops_saved_fraction']:.0f}% |"
                        if reach is not None else "never reached within the budget | none |"))
    lines += ["", "Forgetting (English validation loss of the CPT models):", "",
              f"| target | start | end, no replay | end, {100 * replay_ratio:.0f}% replay |", "| --- | --- | --- | --- |"]
    for lang, entry in summary["targets"].items():
        no, yes = entry["cpt"]["replay0"], entry["cpt"][replay_name]
        lines.append(f"| {LANGUAGE_NAMES.get(lang, lang)} | {no['english_loss_start']:.3f} | "
                     f"{no['english_loss_end']:.3f} | {yes['english_loss_end']:.3f} |")
    lines += ["", _interpretation(summary), ""]
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _interpretation(summary: dict) -> str:
    notes = []
    for lang, entry in summary["targets"].items():
        cpt = entry["cpt"]["replay0"]
        name = LANGUAGE_NAMES.get(lang, lang)
        if cpt["flops_saved_fraction"] is not None and cpt["flops_saved_fraction"] > 0:
            notes.append(f"CPT to {name} reached scratch's final loss with {100 * cpt['flops_saved_fraction']:.0f}% "
                         "fewer FLOPs.")
        else:
            notes.append(f"CPT to {name} did not reach scratch's final loss with fewer FLOPs at this scale "
                         f"({cpt['final_loss']:.3f} against {entry['scratch_final_loss']:.3f}): small models can "
                         "show little or negative transfer to a distant language (Hernandez et al. 2021, "
                         "'ossification'); docs/demo.md discusses it and gives the larger settings to try.")
        replayed = [run for key, run in entry["cpt"].items() if key != "replay0"]
        if replayed:
            notes.append(f"Without replay, {name} CPT raised English loss from {cpt['english_loss_start']:.3f} to "
                         f"{cpt['english_loss_end']:.3f}; with replay it ended at {replayed[0]['english_loss_end']:.3f}.")
    return " ".join(notes)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "orbax", "tensorflow", "jax._src.xla_bridge"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    _, overrides, rest = gin_cli.split_gin_args(argv)
    parser = argparse.ArgumentParser(prog="python -m t5x_cpt.demo")
    parser.add_argument("--output_dir", default=os.path.join(gin_cli.REPO_ROOT, "demo_output"))
    parser.add_argument("--targets", default="zh,fr")
    parser.add_argument("--replay_ratio", type=float, default=0.25)
    args = parser.parse_args(rest)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    output_dir = os.path.abspath(args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    from t5x_cpt import train  # noqa: F401  registers the trainer's configurables
    from t5x_cpt.data import pipeline  # noqa: F401
    start = time.time()
    try:
        for spec in run_specs(targets, args.replay_ratio):
            train_run(spec, output_dir, overrides)
    except UserInputError as e:
        print(f"t5x_cpt.demo: error: {one_line(e)}", file=sys.stderr)
        return USAGE_EXIT_CODE
    report = write_report(output_dir, targets, args.replay_ratio, time.time() - start)
    print(f"\nReport: {report}\nPlot:   {os.path.join(output_dir, 'report.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
