"""Entry point: `python -m t5x_cpt.train --gin_file=F [--gin.NAME=VALUE ...] [multi-process flags]`.

One run = one MODEL_DIR (a local path or gs://...). The init mode follows from what exists:
  resume        MODEL_DIR already holds a checkpoint: everything is restored from it (params,
                optimizer, step, data position), whatever the other settings say;
  source        `train.source_checkpoint` names an imported LLM dir or another run's MODEL_DIR:
                weights only, strictly; fresh optimizer, step 0, a new warm-up;
  random        otherwise.
The run directory's files are described in t5x_cpt/run_dir.py; what happens before the first step
in t5x_cpt/preflight.py; the loop in t5x_cpt/train_loop.py. Exit codes: 0 done, 2 the input is
wrong (one line on stderr), 143 preempted after saving a checkpoint (run the same command again to
resume), 1 anything else (a traceback).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import sys
import traceback
from typing import Any, Sequence

import gin

from t5x_cpt import distributed, gin_cli
from t5x_cpt.errors import USAGE_EXIT_CODE, UserInputError, one_line
from t5x_cpt.preflight import TrainSettings, prepare_run
from t5x_cpt.train_loop import PREEMPTED_EXIT_CODE, TrainLoop

PROG = "python -m t5x_cpt.train"


@gin.configurable
def train(model_dir: str = gin.REQUIRED, train_steps: int = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          sequence_length: int = gin.REQUIRED, seed: int = 0, log_period: int = 10, eval_period: int = 100,
          checkpoint_period: int = 100, keep_checkpoints: int = 3, async_checkpoints: bool = True,
          source_checkpoint: str | None = None, eval_tasks: Sequence[str] = (), eval_batches: int | None = 4,
          eval_batch_size: int | None = None, accumulate_steps: int = 1, run_kind: str = "scratch",
          language: str | None = None, replay_ratio: float = 0.0, data_shards: int | None = None) -> dict[str, Any]:
    """Trains one run; returns the last metrics record. Bound from gin (configs/runs/*.gin)."""
    settings = TrainSettings(
        model_dir=model_dir, train_steps=train_steps, batch_size=batch_size, sequence_length=sequence_length,
        seed=seed, log_period=log_period, eval_period=eval_period, checkpoint_period=checkpoint_period,
        keep_checkpoints=keep_checkpoints, async_checkpoints=async_checkpoints,
        source_checkpoint=None if source_checkpoint in ("", "None") else source_checkpoint,
        eval_tasks=tuple(eval_tasks), eval_batches=eval_batches, eval_batch_size=eval_batch_size,
        accumulate_steps=accumulate_steps, run_kind=run_kind, language=language, replay_ratio=replay_ratio,
        data_shards=data_shards)
    return TrainLoop(prepare_run(settings))()


def run_file_macros() -> list[tuple[str, str, str]]:
    """(run file, macro, default or 'REQUIRED') of configs/runs/*.gin, read from the files themselves."""
    found = []
    for path in sorted(glob.glob(os.path.join(gin_cli.REPO_ROOT, "configs", "runs", "*.gin"))):
        for line in open(path):
            match = re.match(r"^([A-Z][A-Z0-9_]*)\s*=\s*(.+?)\s*$", line)
            if match:
                value = "REQUIRED" if match.group(2) == "%gin.REQUIRED" else match.group(2)
                found.append((os.path.relpath(path, gin_cli.REPO_ROOT), match.group(1), value))
    return found


def _parser() -> argparse.ArgumentParser:
    macros = "\n".join(f"  {name:<18} {value:<12} ({where})" for where, name, value in run_file_macros())
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train one run: pre-training, training from scratch, or continual pre-training (CPT) with "
                    "replay. Configured with gin, t5x style: --gin_file=F (repeatable; paths relative to the "
                    "repository or configs/) and --gin.NAME=VALUE overrides (strings in quotes: "
                    "--gin.MODEL_DIR=\"'gs://bucket/run'\").",
        epilog=f"run-file macros (--gin.NAME=VALUE):\n{macros}\n\n"
               "example:\n"
               f"  {PROG} --gin_file=configs/experiments/tiny_pretrain.gin --gin.MODEL_DIR=\"'/tmp/tiny_en'\"\n"
               f"  {PROG} --gin_file=configs/experiments/tiny_cpt.gin --gin.MODEL_DIR=\"'/tmp/tiny_zh'\" \\\n"
               "      --gin.SOURCE_CHECKPOINT=\"'/tmp/tiny_en'\" --gin.REPLAY_RATIO=0.1\n\n"
               f"exit codes: 0 done; {USAGE_EXIT_CODE} bad input (one line on stderr); {PREEMPTED_EXIT_CODE} preempted "
               "after a checkpoint (run the same command to resume); 1 a bug (traceback).\n"
               "docs: docs/training.md, docs/tpu.md, docs/gpu.md, docs/errors.md")
    parser.add_argument("--gin_file", action="append", metavar="FILE", help="a gin file (repeatable)")
    parser.add_argument("--gin.NAME=VALUE", dest="_gin_override_help", metavar="", action="append",
                        help="override a gin binding or macro (repeatable)")
    distributed.add_flags(parser)
    return parser


def _configure_logging() -> None:
    import jax

    process = f" p{jax.process_index()}" if jax.process_count() > 1 else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s{process} %(levelname)s %(message)s", force=True)
    for noisy in ("absl", "jax._src.xla_bridge", "jax._src.distributed", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(argv: Sequence[str]) -> int:
    files, bindings, rest = gin_cli.split_gin_args(argv)
    args = _parser().parse_args(rest)  # --help exits here; unknown flags exit 2 naming them
    distributed.initialize(distributed.flags_from_args(args))
    _configure_logging()
    from t5x_cpt.data import pipeline as _  # noqa: F401  registers the data configurables for gin

    if not files:
        raise gin_cli.GinConfigError(f"no --gin_file given; see {PROG} --help")
    gin_cli.parse(files, bindings)
    train()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; on several processes an error ends this process at once (peers follow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow (under seqio) is chatty on import
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except UserInputError as e:
        logging.error("%s: %s", type(e).__name__, one_line(e))
        print(f"t5x_cpt.train: error: {one_line(e)}", file=sys.stderr)
        code = USAGE_EXIT_CODE
    except SystemExit:
        raise
    except BaseException as e:  # a bug: the traceback is the report; with peers, leave without the barrier
        if not distributed.has_peers():
            raise
        traceback.print_exc()
        lost = distributed.lost_peers(e)
        if lost:
            print(f"t5x_cpt.train: error: lost peer process(es) {lost}: they stopped responding, so this process "
                  "stops too; their logs say why", file=sys.stderr, flush=True)
        code = 1
    if distributed.has_peers():
        distributed.exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
