"""`stats`: what a run's input pipeline really delivers, measured on its batches.

    python -m t5x_cpt.data stats --gin_file=configs/data/stats_example.gin --gin.REPLAY_RATIO=0.3 --batches=50

Reads the same gin files as training (unknown configurables are skipped), builds
`make_train_pipeline()` from its bindings (mixture_or_task_name, sequence_length, batch_size, seed)
as host 0 of 1, draws K batches and prints one JSON object:

    tokens_per_task     share of non-padding target tokens per task (sums to 1), from the batches
    expected_per_task   the mixture's token weights at step 0
    tokens_per_second   non-padding target tokens per second (batch production only, after setup)
    fill                non-padding share of all positions
    ...                 counts, segments per row, setup time, vocabulary
"""

from __future__ import annotations

import time
from typing import Sequence

import gin
import numpy as np

from t5x_cpt.data import pipeline, vocabularies
from t5x_cpt.data.errors import DataError


def measure(pipe: pipeline.TrainPipeline, batches: int) -> dict:
    """Realised shares / throughput / fill over `batches` batches of an existing pipeline."""
    names = pipe.task_names
    counts = np.zeros(len(names), np.int64)
    positions = nonpad = segments = rows = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(pipe)
        w = b["decoder_loss_weights"] > 0
        counts += np.bincount(b["task_ids"][w], minlength=len(names))[:len(names)]
        positions += w.size
        nonpad += int(w.sum())
        segments += int(b["decoder_segment_ids"].max(axis=1).sum())
        rows += w.shape[0]
    dt = time.perf_counter() - t0
    total = int(counts.sum())
    return {
        "tokens_per_task": {n: (int(c) / total if total else 0.0) for n, c in zip(names, counts)},
        "token_counts": {n: int(c) for n, c in zip(names, counts)},
        "expected_per_task": dict(zip(names, pipe.spec.weights_at(0))),
        "tokens_per_second": nonpad / dt if dt > 0 else float("inf"),
        "positions_per_second": positions / dt if dt > 0 else float("inf"),
        "fill": nonpad / positions if positions else 0.0,
        "segments_per_row": segments / rows if rows else 0.0,
        "seconds": dt,
    }


def run_stats(gin_args: Sequence[str], batches: int = 50) -> dict:
    from t5x_cpt import gin_cli  # pylint: disable=g-import-not-at-top
    from t5x_cpt.data.tfutil import seqio  # pylint: disable=g-import-not-at-top

    if batches <= 0:
        raise DataError(f"--batches must be positive, got {batches}")
    files, bindings, rest = gin_cli.split_gin_args(gin_args)
    if rest:
        raise DataError(f"unexpected arguments {rest}")
    if not files and not bindings:
        raise DataError("stats needs --gin_file=F (a training gin file) and/or --gin.NAME=VALUE bindings")
    try:
        gin_cli.parse(files, bindings, skip_unknown=True, finalize=False)
    except gin_cli.GinConfigError as e:
        raise DataError(str(e)) from e
    t0 = time.perf_counter()
    try:
        pipe = pipeline.make_train_pipeline(shard_info=seqio().ShardInfo(0, 1))
    except TypeError as e:
        raise DataError(f"make_train_pipeline is missing a gin binding ({e}); the gin file must bind "
                        "make_train_pipeline.mixture_or_task_name, .sequence_length and .batch_size") from e
    setup = time.perf_counter() - t0
    result = {
        "mixture_or_task_name": pipe.spec.name,
        "task_names": pipe.task_names,
        "sequence_length": pipe.sequence_length,
        "batch_size": pipe.local_batch,
        "batches": batches,
        "seed": pipe.seed,
        "vocabulary": gin.query_parameter("get_vocabulary.name") if _bound("get_vocabulary.name") else
        vocabularies.DEFAULT_VOCABULARY,
        "vocab_size": vocabularies.vocab_size(),
        "setup_seconds": setup,
    }
    result.update(measure(pipe, batches))
    return result


def _bound(param: str) -> bool:
    try:
        gin.query_parameter(param)
        return True
    except ValueError:
        return False
