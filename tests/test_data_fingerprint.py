"""data_fingerprint: equal for the same data prepared at another time in another place; different
when a manifest's content or the vocabulary differs. Synthetic corpora, real SentencePiece models."""

import json
import os
import shutil
import time

import gin
import numpy as np
import pytest

from t5x_cpt.data import cache, testing, vocab_training, vocabularies
from t5x_cpt.data.errors import DataError
from t5x_cpt.data.fingerprint import data_fingerprint

TASKS = ["lo_help_zh", "lo_help_en"]


def _prepare(data_dir: str, extra_en: list[str] = ()) -> str:
    rng = np.random.default_rng(3)  # the same seed: the same documents in every copy
    for lang in ("en", "zh"):
        docs = [testing.synthetic_text(lang, rng, 40) for _ in range(60)]
        testing.write_corpus(data_dir, "lo_help", lang, docs[:54] + (list(extra_en) if lang == "en" else []),
                             docs[54:])
    return data_dir


def _edit_manifest(data_dir: str, edit) -> None:
    path = os.path.join(data_dir, "lo_help", cache.MANIFEST)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    edit(manifest)
    cache.write_json_atomic(path, manifest)


def test_same_data_prepared_twice_elsewhere_has_the_same_fingerprint(tmp_path):
    first = _prepare(str(tmp_path / "host0"))
    time.sleep(1.1)  # the manifests' time stamps differ, as on workers that prepare at other times
    second = _prepare(str(tmp_path / "elsewhere" / "host1"))
    assert cache.read_manifest("lo_help", first)["updated"] != cache.read_manifest("lo_help", second)["updated"]
    assert data_fingerprint(TASKS, first) == data_fingerprint(TASKS, second)
    assert data_fingerprint(TASKS, first) == data_fingerprint(list(reversed(TASKS)) + TASKS[:1], first)
    assert len(data_fingerprint(TASKS, first)) == 64 and int(data_fingerprint(TASKS, first), 16) >= 0


def test_manifest_content_changes_the_fingerprint(tmp_path):
    base = data_fingerprint(TASKS, _prepare(str(tmp_path / "a")))
    assert data_fingerprint(TASKS, _prepare(str(tmp_path / "b"), extra_en=["one more document"])) != base
    assert data_fingerprint(["lo_help_zh"], str(tmp_path / "a")) != base  # another task set

    def new_version(manifest):
        manifest["languages"]["en"]["source"] = {"registry": "debian", "package": "libreoffice-help-en-us",
                                                 "version": "2"}
    _edit_manifest(str(tmp_path / "a"), new_version)
    changed = data_fingerprint(TASKS, str(tmp_path / "a"))
    assert changed != base

    def bump_recipe(manifest):
        manifest["recipe_version"] = 2
    _edit_manifest(str(tmp_path / "a"), bump_recipe)
    assert data_fingerprint(TASKS, str(tmp_path / "a")) not in (base, changed)

    def other_description(manifest):  # prose and time stamps do not define the data
        manifest["description"] = "reworded"
        manifest["updated"] = "2001-01-01T00:00:00Z"
    before = data_fingerprint(TASKS, str(tmp_path / "a"))
    _edit_manifest(str(tmp_path / "a"), other_description)
    assert data_fingerprint(TASKS, str(tmp_path / "a")) == before


def test_vocabulary_changes_the_fingerprint_but_not_its_path(tmp_path):
    data_dir = _prepare(str(tmp_path / "cache"))
    byte = data_fingerprint(TASKS, data_dir)
    models = {}
    for size in (420, 460):
        report = vocab_training.train_vocab(["lo_help"], "en,zh", vocab_size=size, name=f"v{size}",
                                            sample_bytes_per_language=20_000, data_dir=data_dir,
                                            output_dir=str(tmp_path / "vocab"))
        models[size] = report["path"]
    fingerprints = {}
    for size, path in models.items():
        vocab = vocabularies.vocabulary_from_spec(f"sentencepiece:{path}")
        fingerprints[size] = data_fingerprint(TASKS, data_dir, vocabulary=vocab)
    assert len({byte, *fingerprints.values()}) == 3
    # The same model file at another path (another worker's cache): the same fingerprint.
    copy = str(tmp_path / "other_host" / "v420.model")
    os.makedirs(os.path.dirname(copy))
    shutil.copy(models[420], copy)
    assert data_fingerprint(TASKS, data_dir, vocabulary=vocabularies.vocabulary_from_spec(f"sentencepiece:{copy}")) \
        == fingerprints[420]
    # The default is the gin-selected vocabulary.
    gin.bind_parameter("get_vocabulary.name", f"sentencepiece:{models[460]}")
    assert data_fingerprint(TASKS, data_dir) == fingerprints[460]


def test_tfds_and_file_tasks_contribute_their_declarations(tmp_path):
    data_dir = str(tmp_path)
    assert data_fingerprint(["c4_en"], data_dir) == data_fingerprint(["c4_en"], str(tmp_path / "other"))
    assert len({data_fingerprint([t], data_dir) for t in ("c4_en", "mc4_en", "mc4_fr", "wiki40b_fr")}) == 4
    declared = {"lang": "fr", "train": "gs://bucket/fr/train-*.jsonl", "validation": "gs://bucket/fr/val.jsonl"}
    gin.bind_parameter("user_file_tasks.tasks", {"web_fr": declared})
    web = data_fingerprint(["web_fr"], data_dir)
    gin.bind_parameter("user_file_tasks.tasks", {"web_fr": {**declared, "train": "gs://bucket/fr/v2/*.jsonl"}})
    assert data_fingerprint(["web_fr"], data_dir) != web


def test_unprepared_or_unknown_tasks_are_refused(tmp_path):
    with pytest.raises(DataError, match="not prepared"):
        data_fingerprint(["lo_help_en"], str(tmp_path))
    with pytest.raises(DataError, match="unknown corpus"):
        data_fingerprint(["nope_en"], str(tmp_path))
