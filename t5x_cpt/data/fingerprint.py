"""A content fingerprint of a run's data, for checking that every host reads the same data.

Each TPU worker prepares its own copy of the corpora, at its own time and path, so the fingerprint
is built from what defines the data, never from time stamps or absolute paths:

  cache tasks  the prepared corpus' manifest content: the recipe (corpus, recipe and format
               version, held-out rule) and, for the task's language, the source package and
               version and the documents/bytes of each split
  tfds tasks   the TFDS dataset name, config and version and its split names
  file tasks   the gin declaration (file patterns, format, text field)
  vocabulary   kind, size, EOS id and the SHA-256 of the tokenizer file (vocabularies.vocabulary_identity)
"""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from t5x_cpt.data import cache, tasks
from t5x_cpt.data.vocabularies import get_vocabulary, vocabulary_identity

# Manifest keys that define a prepared corpus (others are time stamps, prose or drop statistics).
_CORPUS_KEYS = ("corpus", "recipe_version", "format_version", "validation_fraction", "split_rule")
_LANGUAGE_KEYS = ("source",) + cache.SPLITS


def task_identity(name: str, data_dir: str | None = None) -> dict:
    """The content that defines task `name`'s documents (see the module docstring)."""
    kind, corpus, lang = tasks.parse_task_name(name)
    identity = {"task": name, "kind": kind}
    if kind == "cache":
        entry = cache.require_prepared(corpus, lang, data_dir)
        manifest = cache.read_manifest(corpus, data_dir)
        identity["corpus"] = {k: manifest.get(k) for k in _CORPUS_KEYS}
        identity["language"] = {"lang": lang, **{k: entry.get(k) for k in _LANGUAGE_KEYS}}
    elif kind == "tfds":
        tfds_name, splits = tasks.tfds_dataset(corpus, lang)
        identity["tfds"] = {"dataset": tfds_name, "splits": splits}
    else:
        identity["files"] = tasks.user_file_tasks()[name]
    return identity


def data_fingerprint(task_names: Sequence[str], data_dir: str | None = None, *, vocabulary=None) -> str:
    """Hex SHA-256 over the identities of the tasks (order and repeats ignored) and of the vocabulary
    (default: the gin-selected one). Equal on hosts that read the same data, whenever and wherever
    they prepared it."""
    vocabulary = vocabulary if vocabulary is not None else get_vocabulary()
    content = {"tasks": [task_identity(n, data_dir) for n in sorted(set(task_names))],
               "vocabulary": vocabulary_identity(vocabulary)}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()
