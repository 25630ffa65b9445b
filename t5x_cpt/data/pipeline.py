"""The trainer's input: packed, token-exact mixed, per-host sharded, resumable batches.

    pipe = make_train_pipeline('replay:lo_help_zh+lo_help_en@0.3', sequence_length=512, batch_size=16)
    batch = next(pipe)           # dict of int32 [batch_size // num_hosts, 512]
    state = pipe.get_state()     # small JSON-able dict; store it with the checkpoint
    pipe.set_state(state)        # the next batch is the one that followed when state was taken
    evals = make_eval_batches('lo_help_en', 512, 16, num_batches=4)

How a batch is made (per host): each task is a stream of its documents (tokens + EOS) in a seeded
per-epoch order (streams.py). Pieces of at most `block_length` (= sequence_length) tokens are drawn
from the task with the largest token deficit (credit_i += w_i * n for every piece of n tokens,
credit_chosen -= n), so each task's realised token share equals its weight up to one piece over the
whole run — whatever the document lengths. Rows are filled to the last position; a piece that does
not fit is split and continues as a new segment in the next row (packing.py). Everything is a pure
function of (seed, shard, mixture, corpus, vocabulary), and the state is a few integers per task
plus one float credit per task.
"""

from __future__ import annotations

import logging
import math
import zlib

import gin
import numpy as np

from t5x_cpt.data import cache, mixtures, packing, streams
from t5x_cpt.data import tasks as tasks_lib
from t5x_cpt.data.errors import DataError
from t5x_cpt.data.vocabularies import get_vocabulary

log = logging.getLogger(__name__)
STATE_FORMAT = 1


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def default_shard_info():
    """seqio.ShardInfo(jax.process_index(), jax.process_count())."""
    import jax  # pylint: disable=g-import-not-at-top

    from t5x_cpt.data.tfutil import seqio  # pylint: disable=g-import-not-at-top

    return seqio().ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def _local_batch(batch_size: int, num_shards: int) -> int:
    if batch_size % num_shards:
        raise DataError(f"global batch_size {batch_size} is not divisible by the {num_shards} hosts")
    return batch_size // num_shards


class TrainPipeline:
    """Iterator of packed training batches; see the module docstring."""

    def __init__(self, spec: mixtures.MixtureSpec, task_streams: list, sequence_length: int,
                 local_batch: int, block_length: int, seed: int, shard: tuple[int, int], log_every: int = 100,
                 data_dir: str | None = None):
        self.spec = spec
        self.task_names = list(spec.task_names)
        self.data_dir = data_dir  # the prepared-corpus cache it reads (data_fingerprint's data_dir)
        self.sequence_length, self.local_batch, self.block_length = sequence_length, local_batch, block_length
        self.seed, self.shard, self.log_every = seed, shard, log_every
        self._streams = task_streams
        self._credits = np.zeros(len(self.task_names), np.float64)
        self._current: list[int] | None = None  # [task index, tokens left in the current piece]
        self._tokens = [0] * len(self.task_names)
        self._batches = 0
        self._arange = np.arange(sequence_length, dtype=np.int32)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows, length = self.local_batch, self.sequence_length
        targets = np.zeros((rows, length), np.int32)
        segments = np.zeros((rows, length), np.int32)
        positions = np.zeros((rows, length), np.int32)
        task_ids = np.zeros((rows, length), np.int32)
        weights = np.asarray(self.spec.weights_at(self._batches), np.float64)
        active = np.flatnonzero(weights > 0)
        if len(active) == 0:
            raise DataError(f"mixture {self.spec.name!r} has no task with positive weight at step {self._batches}")
        for r in range(rows):
            col, seg = 0, 0
            while col < length:
                if self._current is None:
                    t = int(active[np.argmax(self._credits[active])])
                    n = min(self._streams[t].remaining(), self.block_length)
                    self._credits += weights * n
                    self._credits[t] -= n
                    self._current = [t, n]
                t, n = self._current
                k = min(n, length - col)
                targets[r, col:col + k] = self._streams[t].take(k)
                seg += 1
                segments[r, col:col + k] = seg
                positions[r, col:col + k] = self._arange[:k]
                task_ids[r, col:col + k] = t
                self._tokens[t] += k
                col += k
                self._current = [t, n - k] if n > k else None
        self._batches += 1
        if self.log_every and self._batches % self.log_every == 0:
            log.info("data: realised token shares after %d batches: %s", self._batches,
                     {n: round(s, 4) for n, s in zip(self.task_names, self.token_shares())})
        batch = packing.features_from_rows(targets, segments, positions)
        batch["task_ids"] = task_ids
        return batch

    # -- realised mixture ---------------------------------------------------------------------

    @property
    def token_counts(self) -> dict[str, int]:
        """Non-padding target tokens emitted per task so far on this host (survives set_state)."""
        return dict(zip(self.task_names, self._tokens))

    def token_shares(self) -> list[float]:
        total = sum(self._tokens)
        return [c / total if total else 0.0 for c in self._tokens]

    # -- resume --------------------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"mixture": self.spec.name, "tasks": self.task_names, "seed": self.seed,
                "shard": list(self.shard), "sequence_length": self.sequence_length,
                "local_batch": self.local_batch, "block_length": self.block_length}

    def get_state(self) -> dict:
        return {"format": STATE_FORMAT, **self._identity(), "batches": self._batches,
                "credits": [float(c) for c in self._credits], "current": self._current,
                "tokens": list(self._tokens), "streams": [s.get_state() for s in self._streams]}

    def set_state(self, state: dict) -> None:
        """Restores get_state()'s dict. Also accepts {"hosts": [state of host 0, host 1, ...]} (states
        gathered from every host) and picks this host's."""
        if isinstance(state, dict) and isinstance(state.get("hosts"), list):
            if len(state["hosts"]) != self.shard[1]:
                raise DataError(f"cannot resume: the saved data state has {len(state['hosts'])} hosts, "
                                f"this run has {self.shard[1]}")
            state = state["hosts"][self.shard[0]]
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"not a data pipeline state (format {STATE_FORMAT}): {str(state)[:200]}")
        mine = self._identity()
        for key, value in mine.items():
            if state.get(key) != value:
                raise DataError(f"cannot resume: the saved data state has {key}={state.get(key)!r} but this "
                                f"pipeline has {value!r}")
        for s, st in zip(self._streams, state["streams"]):
            s.set_state(st)
        self._batches = int(state["batches"])
        self._credits = np.asarray(state["credits"], np.float64)
        self._current = list(state["current"]) if state["current"] is not None else None
        self._tokens = [int(c) for c in state["tokens"]]


def _task_seed(seed: int, task: str, shard_index: int) -> list[int]:
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(task.encode("utf-8")), int(shard_index)]


@gin.configurable
def make_train_pipeline(mixture_or_task_name: str, sequence_length: int, batch_size: int,
                        seed: int = 0, shard_info=None, *, block_length: int | None = None,
                        shuffle_buffer: int = 10_000, log_every: int = 100,
                        data_dir: str | None = None) -> TrainPipeline:
    """Training batches of a task or mixture name (see mixtures.py for the name syntax); registers
    its seqio Tasks and Mixture (mixtures.register).

    batch_size is the global batch: each host gets batch_size // shard_info.num_shards rows.
    shard_info defaults to seqio.ShardInfo(jax.process_index(), jax.process_count()).
    """
    sequence_length = _positive_int(sequence_length, "sequence_length")
    batch_size = _positive_int(batch_size, "batch_size")
    block_length = _positive_int(block_length or sequence_length, "block_length")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DataError(f"seed must be an integer, got {seed!r}")
    shard_info = shard_info if shard_info is not None else default_shard_info()
    index, num = int(shard_info.index), int(shard_info.num_shards)
    local_batch = _local_batch(batch_size, num)
    mixture = mixtures.register(mixture_or_task_name, get_vocabulary(), data_dir)
    task_streams = []
    for info in mixture.tasks:
        task_seed = _task_seed(seed, info.name, index)
        if info.in_memory:
            toks, starts, lengths = streams.load_documents(info.name, "train", index, num, info)
            task_streams.append(streams.MemoryStream(info.name, toks, starts, lengths, task_seed))
        else:
            s = int(np.random.SeedSequence(task_seed).generate_state(1)[0] & 0x7FFFFFFF)
            task_streams.append(streams.DatasetStream(
                info.name, streams.dataset_iterator_factory(info.name, "train", index, num, s, shuffle_buffer)))
    return TrainPipeline(mixture.spec, task_streams, sequence_length, local_batch, block_length, int(seed),
                         (index, num), log_every, data_dir=cache.resolve_data_dir(data_dir))


# ----------------------------------------------------------------------------------------------
# Evaluation

_EVAL_MEMO: dict[tuple, list] = {}


def _validation_docs(name: str, info, needed_tokens: int | None) -> list[np.ndarray]:
    if info.in_memory:
        toks, starts, lengths = streams.load_documents(name, "validation", 0, 1, info)
        return [toks[s:s + n] for s, n in zip(starts, lengths)]
    from t5x_cpt.data.tfutil import seqio  # pylint: disable=g-import-not-at-top

    ds = seqio().get_mixture_or_task(name).get_dataset(
        sequence_length=None, split="validation", shuffle=False, num_epochs=1, trim_output_features=False,
        try_in_mem_cache=False)
    docs, total = [], 0
    for values, lengths in streams.iter_ragged_batches(ds.map(lambda ex: ex["targets"]), 64):
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        docs += [values[offsets[i]:offsets[i + 1]] for i in range(len(lengths))]
        total += int(offsets[-1])
        if needed_tokens is not None and total >= needed_tokens:
            break
    return docs


@gin.configurable
def make_eval_batches(task_name: str, sequence_length: int, batch_size: int, num_batches: int | None = None,
                      *, shard_info=None, data_dir: str | None = None) -> list[dict]:
    """The fixed validation split of one task as packed batches (this host's rows of each batch).

    Documents in file order (no shuffle) are cut into pieces of <= sequence_length tokens and packed
    by seqio.DecoderFeatureConverter(pack=True); rows are dealt to hosts batch by batch, so every
    host gets the same number of batches. The last batch is padded with empty rows (loss weight 0).
    Same batches on every call.
    """
    sequence_length = _positive_int(sequence_length, "sequence_length")
    batch_size = _positive_int(batch_size, "batch_size")
    if num_batches is not None:
        num_batches = _positive_int(num_batches, "num_batches")
    shard_info = shard_info if shard_info is not None else default_shard_info()
    index, num = int(shard_info.index), int(shard_info.num_shards)
    local = _local_batch(batch_size, num)
    vocab = get_vocabulary()
    info = tasks_lib.register_task(task_name, vocab, data_dir)
    key = (info, sequence_length, batch_size, num_batches, index, num)
    if key in _EVAL_MEMO:
        return [dict(b) for b in _EVAL_MEMO[key]]
    needed = None if num_batches is None else num_batches * batch_size * sequence_length
    rows = None
    while True:
        docs = _validation_docs(task_name, info, needed)
        pieces = [p for d in docs for p in packing.pieces(d, sequence_length)]
        if not pieces:
            raise DataError(f"task {task_name!r}: the validation split is empty")
        rows = packing.pack_with_seqio(pieces, sequence_length)
        have = len(rows["decoder_target_tokens"])
        if needed is None or have >= num_batches * batch_size or info.in_memory or \
                sum(map(len, docs)) < needed:
            break
        needed *= 2  # packing left gaps: read more documents
    total_rows = len(rows["decoder_target_tokens"])
    n = math.ceil(total_rows / batch_size)
    if num_batches is not None:
        if num_batches > n:
            log.warning("task %s: validation split has %d batches of %d, not %d", task_name, n, batch_size,
                        num_batches)
        n = min(n, num_batches)
    pad = n * batch_size - total_rows
    batches = []
    for b in range(n):
        lo = b * batch_size + index * local
        batch = {}
        for k, v in rows.items():
            part = v[lo:lo + local]
            if len(part) < local:
                part = np.concatenate([part, np.zeros((local - len(part), sequence_length), np.int32)])
            batch[k] = part
        batch["task_ids"] = np.zeros((local, sequence_length), np.int32)
        batches.append(batch)
    if pad:
        log.debug("task %s: last eval batch padded with %d empty rows", task_name, max(pad, 0))
    _EVAL_MEMO[key] = batches
    return [dict(b) for b in batches]
