"""seqio DataSources for text files (prepared corpora and user files). Imports seqio/TF at import:
only imported lazily by tasks.py.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import seqio
import tensorflow as tf

from t5x_cpt.data import cache
from t5x_cpt.data.errors import DataError

log = logging.getLogger(__name__)


def expand_globs(patterns: str | Sequence[str]) -> list[str]:
    """Sorted files matching one pattern or a list (local paths or gs:// etc. via tf.io.gfile)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files = []
    for p in patterns:
        matched = sorted(tf.io.gfile.glob(p)) if any(ch in p for ch in "*?[") else (
            [p] if tf.io.gfile.exists(p) else [])
        if not matched:
            raise DataError(f"no file matches {p!r}")
        files.extend(matched)
    return files


class TextFilesDataSource(seqio.DataSource):
    """Documents from text-lines or JSONL files, one document per line, as {"text": str}.

    Sharding: by file when a split has at least as many files as shards, else by line index
    (line i goes to shard i % num_shards). Bad lines (invalid UTF-8, bad JSON, no text field) are
    skipped and counted; the count is logged when a pass over a file ends.
    `shuffle` only shuffles the file order (the train pipeline shuffles documents itself).
    """

    def __init__(self, split_files: Mapping[str, str | Sequence[str]], fmt: str = "jsonl",
                 text_field: str = "text", num_input_examples: Mapping[str, int] | None = None):
        if fmt not in ("jsonl", "text"):
            raise DataError(f"unknown file format {fmt!r}; use 'jsonl' or 'text'")
        self._split_files = dict(split_files)
        self._fmt, self._text_field = fmt, text_field
        self._files: dict[str, list[str]] = {}
        super().__init__(splits=list(split_files), num_input_examples=num_input_examples,
                         caching_permitted=False)

    def files(self, split: str) -> list[str]:
        if split not in self._split_files:
            raise DataError(f"split {split!r} not in {sorted(self._split_files)}")
        if split not in self._files:
            self._files[split] = expand_globs(self._split_files[split])
        return self._files[split]

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return self.files(split)

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, **unused) -> tf.data.Dataset:
        files = self.files(split)
        index, num = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        if len(files) >= num:
            files, line_index, line_num = files[index::num], 0, 1
        else:
            line_index, line_num = index, num
        if shuffle and len(files) > 1:
            rng = __import__("random").Random(seed if seed is not None else 0)
            files = list(files)
            rng.shuffle(files)
        fmt, field = self._fmt, self._text_field

        def gen():  # batches of texts: one Python->TF crossing per 256 documents, not per document
            bad = cache.BadLineCounter()
            i, chunk = 0, []
            for path in files:
                for text in cache.iter_lines(path, fmt, field, bad):
                    if i % line_num == line_index:
                        chunk.append(text)
                        if len(chunk) == 256:
                            yield chunk
                            chunk = []
                    i += 1
            if chunk:
                yield chunk
            if bad.total:
                log.warning("skipped %d bad lines: %s", bad.total, bad.counts)

        ds = tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec([None], tf.string))
        return ds.unbatch().map(lambda text: {"text": text})
