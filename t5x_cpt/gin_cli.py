"""t5x-style gin command lines: `--gin_file=F` (repeatable) and `--gin.NAME=VALUE` overrides.

Gin files may include others by paths relative to the repository root or to `configs/`, so a
run launched from any directory finds them. Errors in a file or binding stop with one message
that names the file or binding at fault.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Sequence

import gin

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_SEARCH_PATHS = (REPO_ROOT, os.path.join(REPO_ROOT, "configs"))


class GinConfigError(ValueError):
    """A gin file or binding could not be parsed or names an unknown configurable or parameter."""


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Splits argv into (gin files, gin bindings, remaining args).

    Accepts `--gin_file=F`, `--gin_file F`, `--gin.NAME=VALUE` and `--gin_bindings=NAME=VALUE`.
    """
    files, bindings, rest = [], [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--gin_file" and i + 1 < len(args):
            files.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("--gin_bindings="):
            bindings.append(arg.split("=", 1)[1])
        elif arg.startswith("--gin."):
            name_value = arg[len("--gin."):]
            if "=" not in name_value:
                raise GinConfigError(f"gin override {arg!r} has no value; write --gin.NAME=VALUE")
            bindings.append(name_value)
        else:
            rest.append(arg)
        i += 1
    return files, bindings, rest


def _resolve_file(path: str) -> str:
    if os.path.exists(path):
        return path
    for root in CONFIG_SEARCH_PATHS:
        candidate = os.path.join(root, path)
        if os.path.exists(candidate):
            return candidate
    raise GinConfigError(f"gin file {path!r} not found (looked in the working directory and {CONFIG_SEARCH_PATHS})")


@contextlib.contextmanager
def _quiet_root_logger():
    """gin logs every include path it tries at ERROR level; failures still raise, so mute those logs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


def parse(files: Sequence[str], bindings: Sequence[str], skip_unknown: bool = False, finalize: bool = True) -> None:
    """Parses gin files then bindings (later wins), with errors that name the culprit."""
    for root in CONFIG_SEARCH_PATHS:
        if root not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
            gin.add_config_file_search_path(root)
    resolved = [_resolve_file(f) for f in files]
    try:
        with _quiet_root_logger():
            gin.parse_config_files_and_bindings(resolved, None, skip_unknown=skip_unknown, finalize_config=False)
    except (ValueError, KeyError, SyntaxError, IOError) as e:
        raise GinConfigError(f"bad gin file among {resolved}: {e}") from e
    for binding in bindings:
        try:
            gin.parse_config(binding, skip_unknown=skip_unknown)
        except (ValueError, KeyError, SyntaxError) as e:
            raise GinConfigError(f"bad gin binding {binding!r}: {e}") from e
    if finalize:
        gin.finalize()


def parse_argv(argv: Sequence[str] | None = None, skip_unknown: bool = False) -> list[str]:
    """Parses the gin part of argv (default sys.argv[1:]) and returns the other arguments."""
    files, bindings, rest = split_gin_args(sys.argv[1:] if argv is None else argv)
    if not files and not bindings:
        raise GinConfigError("no --gin_file given")
    parse(files, bindings, skip_unknown=skip_unknown)
    return rest
