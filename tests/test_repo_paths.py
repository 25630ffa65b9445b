"""Every repository path named in the sources and docs exists: no reference goes nowhere.

Scans .py, .gin, .md and .sh files (docstrings, comments, gin comments, docs, scripts) for tokens
such as `docs/model.md` or `configs/runs/cpt.gin` that start at one of the repository's top-level
directories. A token followed by a wildcard (`tests/test_data*.py`, `ladder_{49,66}m.gin`) is a
pattern and must match at least one file. A user's own files are named `my_...` in examples
(`configs/experiments/my_cpt.gin`) and a metavariable is in capitals (`configs/sweeps/NAME.gin`):
neither is looked for; the few other paths that are not meant to exist are listed in
USER_PATH_EXAMPLES.
"""
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = ("t5x_cpt", "configs", "docs", "tests", "benchmarks", "examples", "tpu_scripts", "gpu_scripts",
             "notebooks")
SCANNED_SUFFIXES = (".py", ".gin", ".md", ".sh")
SKIPPED_DIRS = {".venv", ".git", ".pytest_cache", "__pycache__", "node_modules"}
# Not preceded by a path character, so '/tmp/tests/x', 'my_docs/x' and URLs are not taken for ours.
PATH = re.compile(r"(?<![\w./~-])((?:%s)/[\w./-]*)([*{<\[(]?)" % "|".join(TOP_LEVEL))

# Paths that stand for a user's own (or a deliberately missing) file, not a file of this repository.
USER_PATH_EXAMPLES = {
    "configs/models/no_such_size.gin",     # tests/test_model_info.py: a path that must be refused
    "configs/nope.gin",                    # tests/test_launch_scripts.py: likewise
}


def is_user_example(path: str) -> bool:
    stem = os.path.splitext(os.path.basename(path))[0]
    metavariable = stem.isupper() and stem.isalpha() and len(stem) <= 4  # NAME, X; not README
    return path in USER_PATH_EXAMPLES or stem.startswith("my_") or metavariable


def scanned_files():
    """Every scanned file but this one, whose strings are made-up paths for testing the pattern."""
    for root, dirs, names in os.walk(REPO):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info"))
        for name in sorted(names):
            path = os.path.join(root, name)
            if name.endswith(SCANNED_SUFFIXES) and path != os.path.abspath(__file__):
                yield path


def referenced_paths(text: str):
    """(line number, path, is_pattern) for every repository path named in `text`."""
    for lineno, line in enumerate(text.splitlines(), 1):
        for match in PATH.finditer(line):
            path = match.group(1).rstrip(".-")
            yield lineno, path, bool(match.group(2))


def exists(path: str, is_pattern: bool) -> bool:
    full = os.path.join(REPO, path)
    if is_pattern:
        return bool(glob.glob(full + "*"))
    return os.path.exists(full)


def test_the_pattern_finds_paths_and_skips_lookalikes():
    text = ("see docs/model.md. and `configs/runs/cpt.gin`, tests/test_data*.py\n"
            "not /tmp/tests/x, gs://b/docs/y, my_docs/z or t5x_cpt.scaling")
    assert list(referenced_paths(text)) == [(1, "docs/model.md", False), (1, "configs/runs/cpt.gin", False),
                                            (1, "tests/test_data", True)]
    assert not exists("docs/no_such_file.md", False) and exists("tests/test_repo_", True)
    assert is_user_example("configs/experiments/my_cpt_1393m_zh.gin") and not is_user_example("docs/model.md")
    assert is_user_example("configs/sweeps/NAME.gin") and not is_user_example("docs/README.md")


def test_every_repository_path_named_in_sources_and_docs_exists():
    offenders = []
    for file in scanned_files():
        with open(file, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for lineno, path, is_pattern in referenced_paths(text):
            if not is_user_example(path) and not exists(path, is_pattern):
                offenders.append(f"{os.path.relpath(file, REPO)}:{lineno}: {path}{'*' if is_pattern else ''}")
    for offender in offenders:
        print(offender)
    assert not offenders, f"{len(offenders)} references to paths that do not exist:\n" + "\n".join(offenders)
