"""The main job at demo scale: does continual pre-training beat training from scratch?

    python -m t5x_cpt.demo [--output_dir=demo_output] [--targets=zh,fr] [--gin.NAME=VALUE ...]

1. pre-trains a small English source model on the LibreOffice-help corpus;
2. for each target language, trains on it for the same budget three ways: from the English
   weights with no replay, from the English weights with English replay, and from scratch;
3. writes report.md and report.png: target loss against training FLOPs, the FLOPs CPT needed
   to reach scratch's final loss (where it never did, what scratch needed to reach CPT's), and
   the English loss of the CPT models (forgetting) with and without replay.
Each run is an ordinary training run (configs/experiments/demo_*.gin) in its own MODEL_DIR, so
an interrupted demo resumes where it stopped and a finished run is not trained again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import gin

from t5x_cpt import gin_cli, run_dir
from t5x_cpt.errors import USAGE_EXIT_CODE, UserInputError, one_line

SOURCE_LANGUAGE = "en"
TASK = "lo_help_{}"
# Where `make mini-study` commits its per-language analyses (docs/results/mini_study.md).
MINI_STUDY_ANALYSES = os.path.join(gin_cli.REPO_ROOT, "docs", "results", "mini_study")
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


def saving(scratch: list[tuple[float, float]], cpt: list[tuple[float, float]]) -> dict:
    """The study's law-free saving at scratch's final loss (savings.saving_at_scratch_point) from
    two (FLOPs, loss) curves; the step-0 points are left out (no log scale at zero compute)."""
    from t5x_cpt.scaling.savings import saving_at_scratch_point

    def arrays(curve):
        trained = [(f, loss) for f, loss in curve if f > 0]
        flops = [f for f, _ in trained]
        return flops, [loss for _, loss in trained], flops  # one size: FLOPs stand in for tokens

    return saving_at_scratch_point(arrays(scratch), arrays(cpt))


def summarise(output_dir: str, targets: list[str], replay_ratio: float) -> dict:
    """Numbers for the report: savings per target and forgetting with/without replay."""
    source_task = TASK.format(SOURCE_LANGUAGE)
    source_curve = run_dir.eval_curve(os.path.join(output_dir, "source_en"), source_task)
    info = run_dir.read_run_info(os.path.join(output_dir, "source_en"))
    source_tokens = info["train_steps"] * info["batch_size"] * info["sequence_length"]
    summary = {"source_final_en_loss": source_curve[-1][1] if source_curve else None,
               "source_tokens_per_param": source_tokens / info["params"], "targets": {}}
    replay_name = f"replay{int(round(100 * replay_ratio))}"
    for lang in targets:
        task = TASK.format(lang)
        scratch = run_dir.eval_curve(os.path.join(output_dir, f"scratch_{lang}"), task)
        entry = {"scratch_final_loss": scratch[-1][1], "scratch_flops": scratch[-1][0], "cpt": {}}
        for name in ("replay0", replay_name):
            model_dir = os.path.join(output_dir, f"cpt_{lang}_{name}")
            curve = run_dir.eval_curve(model_dir, task)
            english = run_dir.eval_curve(model_dir, source_task)
            entry["cpt"][name] = {
                "final_loss": curve[-1][1],
                "saving": saving(scratch, curve),
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
            curve = [(f, l) for f, l in run_dir.eval_curve(os.path.join(output_dir, run), task) if f > 0]
            top.plot([f for f, _ in curve], [l for _, l in curve], style, color=color, label=label, marker=".")
            if key != "scratch":
                english = run_dir.eval_curve(os.path.join(output_dir, run), source_task)
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
        lines.append(f"| {LANGUAGE_NAMES.get(lang, lang)} | {entry['scratch_final_loss']:.3f} | {cpt['final_loss']:.3f} | "
                     f"{_saving_cells(cpt['saving'])} |")
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


def _saving_cells(saving: dict) -> str:
    """The report's last two columns for one saving (savings.saving_at_scratch_point's methods)."""
    of = f"of {saving['C_scratch']:.3g}"
    saved = f"{100 * saving['saved_fraction']:.0f}%"
    return {
        "cpt_reaches_scratch": f"{saving['C_cpt']:.3g} {of} | {saved}",
        "at_least": f"at most {saving['C_cpt']:.3g} (its first evaluation) {of} | at least {saved}",
        "scratch_reaches_cpt": f"never reached; scratch reached CPT's final loss with {saving['C_scratch']:.3g} "
                               f"of CPT's {saving['C_cpt']:.3g} | {saved}",
        "at_most": f"never reached; scratch passed CPT's final loss by its first evaluation | at most {saved}",
    }[saving["method"]]


def mini_study_gain(lang: str, root: str = MINI_STUDY_ANALYSES) -> dict | None:
    """Where the committed mini study finds CPT to `lang` starting to save compute: the smallest
    size from which every larger size it trained saves (law-free, at scratch's final loss).

    Returns {"N", "run", "saved_fraction", "sizes"} (sizes: every (N, saved fraction, run) read), a
    dict with N None when no size gains, or None when the mini study has no analysis of `lang`.
    """
    by_run = {}
    for sweep in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, sweep, lang, "scaling.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            runs = json.load(f).get("savings", {}).get("runs", [])
        for run in runs:
            end = run.get("at_scratch_end")
            if end is not None and not run.get("replay_ratio"):
                by_run[run["run"]] = (run["N"], end["saved_fraction"], run["run"])
    if not by_run:
        return None
    sizes = sorted(by_run.values())
    start = None
    for i in range(len(sizes) - 1, -1, -1):  # walk down from the largest size while every one gains
        if sizes[i][1] <= 0:
            break
        start = sizes[i]
    if start is None:
        return {"N": None, "sizes": sizes}
    return {"N": start[0], "run": start[2], "saved_fraction": start[1], "sizes": sizes}


def _mini_study_sentence(lang: str) -> str:
    gain = mini_study_gain(lang)
    name = LANGUAGE_NAMES.get(lang, lang)
    if gain is None:
        return "The mini study (docs/results/mini_study.md) has no runs on this language."
    if gain["N"] is None:
        return (f"The mini study (docs/results/mini_study.md) finds no size up to {gain['sizes'][-1][0] / 1e6:.2f}M "
                f"parameters at which CPT to {name} saves compute.")
    size = f"{gain['N'] / 1e6:.2f}M parameters"
    where = f"at its largest size, {size}" if gain["N"] == gain["sizes"][-1][0] else f"from {size} on"
    return (f"The mini study (docs/results/mini_study.md) finds CPT to {name} saving compute {where} "
            f"({gain['run']}: {100 * gain['saved_fraction']:.0f}% of the FLOPs "
            "at scratch's final loss), with an English source trained to 1.5 tokens per parameter and "
            "300 target steps.")


def _interpretation(summary: dict) -> str:
    notes = []
    for lang, entry in summary["targets"].items():
        cpt = entry["cpt"]["replay0"]
        name = LANGUAGE_NAMES.get(lang, lang)
        saved = cpt["saving"]["saved_fraction"]
        if cpt["saving"]["method"] in ("cpt_reaches_scratch", "at_least"):
            bound = "at least " if cpt["saving"]["method"] == "at_least" else ""
            notes.append(f"CPT to {name} reached scratch's final loss with {bound}{100 * saved:.0f}% fewer FLOPs.")
        else:
            notes.append(f"CPT to {name} did not reach scratch's final loss ({cpt['final_loss']:.3f} against "
                         f"{entry['scratch_final_loss']:.3f}): scratch reached CPT's final loss with "
                         f"{100 / (1 - saved):.0f}% of CPT's compute. Small models can show little or negative "
                         "transfer to a distant language (Hernandez et al. 2021, 'ossification'), and the demo's "
                         f"source model is trained to {summary['source_tokens_per_param']:.1f} tokens per parameter "
                         "(docs/demo.md). "
                         + _mini_study_sentence(lang))
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
