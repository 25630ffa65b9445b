"""Language codes used everywhere in t5x_cpt.data, and how source-specific codes map onto them."""

from __future__ import annotations

from t5x_cpt.data.errors import DataError

# The study's languages (ISO 639-1). English is the usual source, the rest are targets.
LANGUAGES = ("en", "zh", "fr", "de", "es", "ru", "ja", "ko")

# Codes as they appear in sources (LibreOffice help dirs, man page dirs, TFDS configs) -> ours.
_ALIASES = {
    "en-us": "en", "en_us": "en", "zh-cn": "zh", "zh_cn": "zh", "zh-hans": "zh",
}


def normalize_language(code: str) -> str:
    """Maps a language code (any case, `en-US`, `zh-CN`, ...) to one of LANGUAGES or raises."""
    c = str(code).strip().lower()
    c = _ALIASES.get(c, c)
    if c not in LANGUAGES:
        raise DataError(f"unknown language {code!r}; known languages: {', '.join(LANGUAGES)}")
    return c


def parse_languages(spec) -> tuple[str, ...]:
    """'en,zh,fr' or a sequence -> validated, de-duplicated tuple in the given order."""
    if isinstance(spec, str):
        items = [s for s in spec.split(",") if s.strip()]
    else:
        items = list(spec)
    out = []
    for item in items:
        lang = normalize_language(item)
        if lang not in out:
            out.append(lang)
    if not out:
        raise DataError("no language given")
    return tuple(out)
