"""Per-task document streams with a small, exact, resumable position.

Two kinds, same interface (`remaining()`, `take(n)`, `get_state()`, `set_state()`):

* MemoryStream (prepared corpora): the shard's documents are tokenized once into one int32 array.
  Each epoch visits them in a permutation drawn from (seed, epoch). Position = (epoch, index in the
  permutation, token offset): resuming is O(1).
* DatasetStream (TFDS, user files: too big for memory): a tf.data pipeline per epoch — source
  (files shuffled by seed) -> document shuffle buffer (seeded) -> enumerate -> seqio preprocessing.
  Position = (epoch, shuffled index of the current document, token offset): resuming rebuilds the
  epoch's pipeline and skips that many *raw* documents before tokenization (reading cost only).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

import numpy as np

from t5x_cpt.data.errors import DataError

log = logging.getLogger(__name__)


class MemoryStream:
    def __init__(self, name: str, tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, seed):
        if len(lengths) == 0:
            raise DataError(f"task {name!r}: no documents in this split/shard")
        self.name = name
        self._tokens, self._starts, self._lengths = tokens, starts, lengths
        self._seed = list(seed)
        self.epoch, self.pos, self.offset = 0, 0, 0
        self._perm_epoch, self._perm = -1, None

    def _doc(self) -> int:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng(self._seed + [self.epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self._lengths)), self.epoch
        return int(self._perm[self.pos])

    def remaining(self) -> int:
        return int(self._lengths[self._doc()]) - self.offset

    def take(self, n: int) -> np.ndarray:
        d = self._doc()
        start = int(self._starts[d]) + self.offset
        out = self._tokens[start:start + n]
        self.offset += n
        if self.offset >= self._lengths[d]:
            self.offset = 0
            self.pos += 1
            if self.pos == len(self._lengths):
                self.pos, self.epoch = 0, self.epoch + 1
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "offset": self.offset}

    def set_state(self, state: dict) -> None:
        epoch, pos, offset = int(state["epoch"]), int(state["pos"]), int(state["offset"])
        if not (0 <= pos < len(self._lengths)):
            raise DataError(f"task {self.name!r}: saved position {pos} is outside its {len(self._lengths)} "
                            "documents (did the corpus or the vocabulary change since the checkpoint?)")
        self.epoch, self.pos, self.offset = epoch, pos, 0
        if not 0 <= offset < self.remaining():
            raise DataError(f"task {self.name!r}: saved offset {offset} does not fit its document")
        self.offset = offset


class DatasetStream:
    """make_iterator(epoch, skip) must yield (shuffled_index, tokens) from index `skip` on."""

    def __init__(self, name: str, make_iterator: Callable[[int, int], object]):
        self.name = name
        self._make = make_iterator
        self.epoch, self.index, self.offset = 0, 0, 0
        self._it = None
        self._doc: np.ndarray | None = None

    def _ensure(self) -> None:
        if self._doc is not None:
            return
        for attempt in range(2):
            if self._it is None:
                self._it = iter(self._make(self.epoch, self.index))
            item = next(self._it, None)
            if item is not None:
                idx, toks = item
                if self.offset and int(idx) != self.index:
                    raise DataError(f"task {self.name!r}: cannot resume inside document {self.index} "
                                    f"(the source now yields {idx} there)")
                self.index, self._doc = int(idx), np.asarray(toks, np.int32)
                return
            self._it = None  # epoch exhausted
            if attempt == 0:
                if self.index == 0 and self.offset == 0:
                    break
                self.epoch, self.index, self.offset = self.epoch + 1, 0, 0
        raise DataError(f"task {self.name!r}: the training split is empty (no documents in this shard)")

    def remaining(self) -> int:
        self._ensure()
        return len(self._doc) - self.offset

    def take(self, n: int) -> np.ndarray:
        self._ensure()
        out = self._doc[self.offset:self.offset + n]
        self.offset += n
        if self.offset >= len(self._doc):
            self._doc, self.offset, self.index = None, 0, self.index + 1
        return out

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "offset": self.offset}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index, self.offset = int(state["epoch"]), int(state["index"]), int(state["offset"])
        self._it, self._doc = None, None


# ----------------------------------------------------------------------------------------------
# Tokenized documents of a task split (memoised per process)

_MEMO: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_MEMO_LOCK = threading.Lock()
_MEMO_SIZE = 32


def load_documents(task_name: str, split: str, shard_index: int, num_shards: int, version_key):
    """(tokens int32[N], starts int64[D], lengths int64[D]) of a registered task's split shard.

    version_key (the task's TaskInfo) must change whenever the task's data or vocabulary does.
    """
    key = (task_name, split, shard_index, num_shards, version_key)
    with _MEMO_LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
    from t5x_cpt.data.tfutil import seqio  # pylint: disable=g-import-not-at-top

    sq = seqio()
    task = sq.get_mixture_or_task(task_name)
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False,
                          shard_info=sq.ShardInfo(shard_index, num_shards) if num_shards > 1 else None,
                          num_epochs=1, trim_output_features=False, try_in_mem_cache=False)
    parts, lens = [], []
    for values, row_lengths in iter_ragged_batches(ds.map(lambda ex: ex["targets"])):
        parts.append(values)
        lens.append(row_lengths)
    lengths = np.concatenate(lens).astype(np.int64) if lens else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    tokens = np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
    value = (tokens, starts, lengths)
    with _MEMO_LOCK:
        _MEMO[key] = value
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return value


def iter_ragged_batches(ds, batch: int = 256):
    """(flat int32 values, row lengths) of batches of a dataset of 1-D token tensors.

    Pulling one tensor per document through the eager iterator costs ~1 ms each; batching to
    ragged tensors first makes that cost per batch.
    """
    for rt in ds.ragged_batch(batch):
        yield rt.flat_values.numpy(), rt.row_lengths().numpy()


def dataset_iterator_factory(task_name: str, split: str, shard_index: int, num_shards: int, seed: int,
                             shuffle_buffer: int):
    """make_iterator(epoch, skip) for a DatasetStream over a registered task."""

    def make(epoch: int, skip: int):
        from t5x_cpt.data.tfutil import seqio, tf  # pylint: disable=g-import-not-at-top

        sq, t = seqio(), tf()
        task = sq.get_mixture_or_task(task_name)
        source = task.source
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)
        info = sq.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
        if info is None or source.supports_arbitrary_sharding or len(source.list_shards(split)) >= num_shards:
            ds = source.get_dataset(split=split, shuffle=True, seed=epoch_seed, shard_info=info)
        else:
            ds = source.get_dataset(split=split, shuffle=True, seed=epoch_seed).shard(num_shards, shard_index)
        if shuffle_buffer > 1:
            ds = ds.shuffle(shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        ds = ds.enumerate().map(lambda i, ex: {**ex, "doc_index": i})
        if skip:
            ds = ds.skip(skip)
        ds = task.preprocess_precache(ds, seed=epoch_seed)
        ds = task.preprocess_postcache(ds, sequence_length=None, seed=epoch_seed)
        ds = ds.map(lambda ex: (ex["doc_index"], ex["targets"])).ragged_batch(64).prefetch(t.data.AUTOTUNE)

        def docs():
            for index, rt in ds:
                values, lengths = rt.flat_values.numpy(), rt.row_lengths().numpy()
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for i, idx in enumerate(index.numpy()):
                    yield int(idx), values[offsets[i]:offsets[i + 1]]

        return docs()

    return make
