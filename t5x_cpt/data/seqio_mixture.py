"""The seqio.Mixture registered under a mixture name, with rates that give token shares.

seqio mixes *examples*: each draw picks task i with probability r_i / sum_j r_j. An example of task
i carries m_i(L) tokens on average at feature length L, so task i's share of the tokens is
r_i m_i(L) / sum_j r_j m_j(L), and the rate r_i = w_i / m_i(L) makes it the token weight w_i. The
tasks cut every document into pieces of at most L tokens (tasks.split_to_feature_length), so

    m_i(L) = sum_d n_d / sum_d ceil(n_d / L)      (n_d: tokens of training document d, EOS included)

and, with no feature length (whole documents), the mean document length. m_i(L) depends on L, and
seqio's rate callables only see the task, so `get_dataset` computes the rates for the
`sequence_length` it is given. Document lengths come from the task's training split as the
trainer's pipeline tokenizes it: every document of a prepared corpus (memoised with the trainer's
in-memory copy, streams.load_documents), or the first SAMPLE_DOCUMENTS documents of a streamed
(TFDS / user-file) task, an estimate.

Imports seqio (and TensorFlow) at import: only imported lazily, by mixtures.register.
"""

from __future__ import annotations

import copy
import threading
from typing import Mapping, Sequence

import numpy as np

from t5x_cpt.data import streams, tfutil
from t5x_cpt.data.tasks import TaskInfo

seqio = tfutil.seqio()  # configures TensorFlow first (no accelerators, quiet)

SAMPLE_DOCUMENTS = 2000
_LENGTHS: dict[TaskInfo, np.ndarray] = {}
_LENGTHS_LOCK = threading.Lock()


def document_lengths(info: TaskInfo) -> np.ndarray:
    """Token counts (EOS included) of the task's training documents (a sample for streamed tasks)."""
    with _LENGTHS_LOCK:
        if info in _LENGTHS:
            return _LENGTHS[info]
    if info.in_memory:
        lengths = streams.load_documents(info.name, "train", 0, 1, info)[2]
    else:
        ds = seqio.get_mixture_or_task(info.name).get_dataset(
            sequence_length=None, split="train", shuffle=False, num_epochs=1, trim_output_features=False,
            try_in_mem_cache=False)
        parts, count = [], 0
        for _, row_lengths in streams.iter_ragged_batches(ds.map(lambda ex: ex["targets"])):
            parts.append(row_lengths)
            count += len(row_lengths)
            if count >= SAMPLE_DOCUMENTS:
                break
        lengths = np.concatenate(parts)[:SAMPLE_DOCUMENTS] if parts else np.zeros(0, np.int64)
    with _LENGTHS_LOCK:
        _LENGTHS[info] = np.asarray(lengths, np.int64)
    return _LENGTHS[info]


def mean_example_tokens(info: TaskInfo, feature_length: int | None) -> float:
    """m(L): mean tokens per example the task emits at feature length L (None: whole documents)."""
    lengths = document_lengths(info)
    if len(lengths) == 0:
        return 1.0  # an empty split emits nothing; seqio reports that when it is read
    if feature_length is None:
        return float(lengths.mean())
    return float(lengths.sum() / np.ceil(lengths / feature_length).sum())


def _targets_length(sequence_length: Mapping[str, int] | None) -> int | None:
    return None if sequence_length is None else sequence_length.get("targets")


class TokenShareMixture(seqio.Mixture):
    """A seqio.Mixture whose `rate_per_task_name` are token weights; `get_rate` turns them into
    example rates (weight / mean tokens per example) at the feature length of the `get_dataset`
    call being built (whole documents outside one, e.g. when nested in another mixture)."""

    def __init__(self, name: str, tasks, default_rate=None, source_info=None, *,
                 infos: Sequence[TaskInfo]):
        super().__init__(name, tasks, default_rate=default_rate, source_info=source_info)
        self._infos = {info.name: info for info in infos}
        self._feature_length: int | None = None

    def get_rate(self, task: seqio.Task) -> float:
        weight = float(self.rate_per_task_name.get(task.name, 0.0))
        if weight == 0.0:
            return 0.0
        return weight / mean_example_tokens(self._infos[task.name], self._feature_length)

    @property
    def total_rate(self) -> float:
        return sum(self.get_rate(t) for t in self.tasks)

    def get_dataset(self, sequence_length=None, *args, **kwargs):
        # The rates depend on the feature length: build from a copy that knows it, so concurrent
        # calls with other lengths never see each other's.
        at_length = copy.copy(self)
        at_length._feature_length = _targets_length(sequence_length)  # pylint: disable=protected-access
        return seqio.Mixture.get_dataset(at_length, sequence_length, *args, **kwargs)


def register(name: str, infos: Sequence[TaskInfo], token_weights: Sequence[float]) -> TokenShareMixture:
    """(Re-)registers `name` in seqio's MixtureRegistry over the registered tasks `infos`."""
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, [(info.name, float(w)) for info, w in zip(infos, token_weights)],
                                     mixture_cls=TokenShareMixture, infos=tuple(infos))
