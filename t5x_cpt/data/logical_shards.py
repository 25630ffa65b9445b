"""A run's training data as a fixed number of logical shards, whatever the number of hosts.

The global batch of a run is the concatenation, in order, of `num_shards` logical shards, each a
`TrainPipeline` of `batch_size / num_shards` rows with its own document order and position. A
host reads the contiguous run of shards that covers its rows of the global batch. Because the
shards, not the hosts, define the data:

  * the batches — and so the losses — are the same on 1, 2 or 4 hosts for the same `num_shards`;
  * a checkpoint holds the position of every shard, so a run resumes on any host count that
    divides `num_shards` (2 hosts -> 1 host reads both shards on one host).

`num_shards` is fixed when a run starts (`train.data_shards`, default: the number of host data
shards) and read back from the checkpoint on resume.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from t5x_cpt.data.errors import DataError


class LogicalShards:
    """Iterator over this host's rows of the global batch (see the module docstring)."""

    def __init__(self, make_shard: Callable[[int, int], Any], num_shards: int, host_shard: tuple[int, int]):
        """`make_shard(index, num_shards)` builds one logical shard's pipeline; `host_shard` is
        (this host's data-shard index, number of host data shards) from the mesh layout."""
        index, hosts = host_shard
        if num_shards % hosts:
            raise DataError(f"the run's data has {num_shards} logical shard(s), which do not divide over "
                            f"{hosts} host data shard(s); use a host count that divides {num_shards}")
        per_host = num_shards // hosts
        self.num_shards = num_shards
        self.shard_indices = list(range(index * per_host, (index + 1) * per_host))
        self.pipelines = [make_shard(j, num_shards) for j in self.shard_indices]
        self.task_names = list(self.pipelines[0].task_names)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(p) for p in self.pipelines]
        if len(batches) == 1:
            return batches[0]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict[str, Any]:
        """{shard index: that shard's pipeline state} for the shards this host reads."""
        return {str(j): p.get_state() for j, p in zip(self.shard_indices, self.pipelines)}

    def set_state(self, shard_states: list[Any]) -> None:
        """Restores every shard of this host from the list of all shards' states."""
        if len(shard_states) != self.num_shards:
            raise DataError(f"cannot resume: the saved data state has {len(shard_states)} shard(s), this run "
                            f"{self.num_shards}")
        for j, pipeline in zip(self.shard_indices, self.pipelines):
            pipeline.set_state(shard_states[j])
