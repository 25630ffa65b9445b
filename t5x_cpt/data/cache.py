"""The prepared-corpus cache: where it lives, its layout, manifests and atomic writes.

Layout (one directory per corpus, one per language, one manifest per corpus):

    $DATA_DIR/
      downloads/                       fetched .deb / sdist files, kept so re-runs need no network
      <corpus>/manifest.json           source package + version, licence, bytes, documents per split
      <corpus>/<lang>/train.jsonl      one JSON object per line: {"id": ..., "text": ...}
      <corpus>/<lang>/validation.jsonl the fixed held-out split
      vocab/<name>.model               SentencePiece models written by `train_vocab`

DATA_DIR is `--data_dir`, else `$T5X_CPT_DATA_DIR`, else `~/.cache/t5x_cpt`. A language directory
is built under a temporary name and renamed into place, and the manifest is replaced atomically
after it, so an interrupted `prepare` never leaves a half-written corpus that looks prepared.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Iterator

import gin

from t5x_cpt.data.errors import DataError

ENV_VAR = "T5X_CPT_DATA_DIR"
DEFAULT_DIR = os.path.join("~", ".cache", "t5x_cpt")
SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1

log = logging.getLogger(__name__)


@gin.configurable
def resolve_data_dir(data_dir: str | None = None) -> str:
    """The cache root: the argument (flag or gin), else $T5X_CPT_DATA_DIR, else ~/.cache/t5x_cpt."""
    path = data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR
    return os.path.abspath(os.path.expanduser(path))


def corpus_dir(corpus: str, data_dir: str | None = None) -> str:
    return os.path.join(resolve_data_dir(data_dir), corpus)


def split_path(corpus: str, lang: str, split: str, data_dir: str | None = None) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; splits are {SPLITS}")
    return os.path.join(corpus_dir(corpus, data_dir), lang, f"{split}.jsonl")


def downloads_dir(data_dir: str | None = None) -> str:
    path = os.path.join(resolve_data_dir(data_dir), "downloads")
    os.makedirs(path, exist_ok=True)
    return path


def vocab_dir(data_dir: str | None = None) -> str:
    return os.path.join(resolve_data_dir(data_dir), "vocab")


# ----------------------------------------------------------------------------------------------
# Manifests


def read_manifest(corpus: str, data_dir: str | None = None) -> dict | None:
    path = os.path.join(corpus_dir(corpus, data_dir), MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to a temp file in the same directory and renames it over `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_prepared(corpus: str, lang: str, recipe_version: int | None = None,
                data_dir: str | None = None) -> bool:
    manifest = read_manifest(corpus, data_dir)
    if not manifest or lang not in manifest.get("languages", {}):
        return False
    if recipe_version is not None and manifest.get("recipe_version") != recipe_version:
        return False
    return all(os.path.exists(split_path(corpus, lang, s, data_dir)) for s in SPLITS)


def require_prepared(corpus: str, lang: str, data_dir: str | None = None) -> dict:
    """The manifest entry of (corpus, lang), or a DataError that says how to prepare it."""
    root = resolve_data_dir(data_dir)
    if not is_prepared(corpus, lang, data_dir=data_dir):
        raise DataError(
            f"corpus {corpus!r} language {lang!r} is not prepared in {root} "
            f"(cache dir from --data_dir, ${ENV_VAR}, or {DEFAULT_DIR}); run: "
            f"python -m t5x_cpt.data prepare --corpora={corpus} --languages={lang} --data_dir={root}")
    entry = read_manifest(corpus, data_dir)["languages"][lang]
    if entry.get("train", {}).get("documents", 0) == 0:
        raise DataError(f"corpus {corpus!r} language {lang!r} in {root} is empty (0 training documents)")
    return entry


@contextlib.contextmanager
def corpus_lock(corpus: str, data_dir: str | None = None):
    """An exclusive lock so two `prepare` processes never write one corpus at once."""
    path = corpus_dir(corpus, data_dir)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LanguageWriter:
    """Writes the splits of one (corpus, language) into a temp dir; `commit()` renames it in place.

    Used as a context manager: leaving the block with an exception deletes the temp dir, so a failed
    prepare leaves nothing behind. Documents are routed to a split by the caller.
    """

    def __init__(self, corpus: str, lang: str, data_dir: str | None = None):
        self.corpus, self.lang = corpus, lang
        self.final = os.path.join(corpus_dir(corpus, data_dir), lang)
        os.makedirs(os.path.dirname(self.final), exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".tmp-{lang}-", dir=os.path.dirname(self.final))
        self._files = {s: open(os.path.join(self.tmp, f"{s}.jsonl"), "w", encoding="utf-8") for s in SPLITS}
        self.stats = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
        self.committed = False

    def write(self, split: str, doc_id: str, text: str) -> None:
        self._files[split].write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        self.stats[split]["documents"] += 1
        self.stats[split]["bytes"] += len(text.encode("utf-8"))

    def commit(self) -> dict:
        for f in self._files.values():
            f.close()
        if self.stats["train"]["documents"] == 0:
            raise DataError(f"corpus {self.corpus!r} language {self.lang!r}: recipe produced no documents")
        if os.path.exists(self.final):
            trash = self.final + f".old-{os.getpid()}-{time.time_ns()}"
            os.rename(self.final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp made it 0700
        os.rename(self.tmp, self.final)
        self.committed = True
        return self.stats

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for f in self._files.values():
            if not f.closed:
                f.close()
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def update_manifest(corpus: str, lang: str, entry: dict, corpus_info: dict,
                    data_dir: str | None = None) -> dict:
    """Adds/replaces one language's entry and the corpus-level info, atomically."""
    manifest = read_manifest(corpus, data_dir) or {"corpus": corpus, "languages": {}}
    if manifest.get("recipe_version") != corpus_info.get("recipe_version"):
        manifest["languages"] = {}  # other languages were built by an older recipe: not trusted
    manifest.update(corpus_info)
    manifest["format_version"] = FORMAT_VERSION
    manifest["languages"][lang] = entry
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(os.path.join(corpus_dir(corpus, data_dir), MANIFEST), manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading documents (prepared splits and user files alike)


class BadLineCounter:
    """Counts lines skipped while reading (invalid UTF-8, bad JSON, missing text field)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, path: str, reason: str) -> None:
        key = f"{path}: {reason}"
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        if n == 1:
            log.warning("skipping a bad line in %s (%s); further ones in this file are only counted", path, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def iter_lines(path: str, fmt: str = "jsonl", text_field: str = "text",
               bad: BadLineCounter | None = None) -> Iterator[str]:
    """Texts of a text-lines or JSONL file (local or any tf.io.gfile path), skipping bad lines.

    A line that is not valid UTF-8, not valid JSON, or lacks `text_field` is skipped and counted;
    reading never stops on one.
    """
    bad = bad if bad is not None else BadLineCounter()
    opener = _open_binary(path)
    with opener as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.add(path, "invalid UTF-8")
                continue
            line = line.rstrip("\r\n")
            if fmt == "text":
                if line.strip():
                    yield line
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad.add(path, "invalid JSON")
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                bad.add(path, f"no string field {text_field!r}")
                continue
            yield text


def _open_binary(path: str):
    if "://" in path:
        from t5x_cpt.data.tfutil import tf  # gs:// and other remote paths go through tf.io.gfile
        return tf().io.gfile.GFile(path, "rb")
    if not os.path.exists(path):
        raise DataError(f"file {path!r} does not exist")
    return open(path, "rb")
