"""t5x-style gin command lines: `--gin_file=F` (repeatable) and `--gin.NAME=VALUE` overrides.

Gin files may include others by paths relative to the repository root or to `configs/`, so a
run launched from any directory finds them. Every problem with a file or a binding raises one
`GinConfigError` whose message is a single line naming the file (and line) or the binding at
fault and, for a misspelt name, the closest known one:
  * a syntax error, an unknown configurable or parameter (gin's own checks);
  * a command-line binding of a macro that nothing in the config reads (`--gin.TRAIN_STEPZ=3`
    defines a new macro TRAIN_STEPZ that no `%TRAIN_STEPZ` uses, so without this check the run
    would silently use the default of TRAIN_STEPS);
  * when the config is finalized: a REQUIRED value left unset, a macro read but never defined.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import re
import sys
import tokenize
from typing import Iterable, Sequence

import gin
from gin import config_parser

from t5x_cpt.errors import UserInputError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_SEARCH_PATHS = (REPO_ROOT, os.path.join(REPO_ROOT, "configs"))

# What gin's parser raises for a bad file or binding.
_GIN_PARSE_ERRORS = (ValueError, KeyError, SyntaxError, IOError, tokenize.TokenError)


class GinConfigError(UserInputError):
    """A gin file or binding cannot be used; the message names it and, where it can, the fix."""


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
    """Parses gin files then bindings (later wins); raises GinConfigError naming the culprit.

    `finalize=False` leaves the config open (REQUIRED values unchecked), for tools that read a
    part of a run's config.
    """
    # The project's config roots go before gin's '' (the working directory): run files include
    # 'runs/common.gin', and a `runs/` directory of outputs in the working directory (the sweeps'
    # default OUTPUT_DIR) must not shadow configs/runs/.
    prefixes = gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
    for root in reversed(CONFIG_SEARCH_PATHS):
        if root in prefixes:
            prefixes.remove(root)
        prefixes.insert(0, root)
    resolved = [_resolve_file(f) for f in files]
    try:
        with _quiet_root_logger():
            gin.parse_config_files_and_bindings(resolved, None, skip_unknown=skip_unknown, finalize_config=False)
    except _GIN_PARSE_ERRORS as e:
        where = _location(e)
        raise GinConfigError(f"bad gin file {where or f'among {resolved}'}: {_first_line(e)}"
                             f"{_suggestion(e)}") from e
    for binding in bindings:
        try:
            gin.parse_config(binding, skip_unknown=skip_unknown)
        except _GIN_PARSE_ERRORS as e:
            raise GinConfigError(f"bad gin binding {binding!r}: {_first_line(e)}{_suggestion(e)}") from e
    _refuse_unread_macros(resolved, bindings)
    if finalize:
        try:
            gin.finalize()
        except ValueError as e:
            raise GinConfigError(_finalize_message(e)) from e


def parse_argv(argv: Sequence[str] | None = None, skip_unknown: bool = False) -> list[str]:
    """Parses the gin part of argv (default sys.argv[1:]) and returns the other arguments."""
    files, bindings, rest = split_gin_args(sys.argv[1:] if argv is None else argv)
    if not files and not bindings:
        raise GinConfigError("no --gin_file given")
    parse(files, bindings, skip_unknown=skip_unknown)
    return rest


# ---- command-line macros that nothing reads ------------------------------------------------------------

class _MacroRecorder(config_parser.ParserDelegate):
    """Records the macros a config text defines (`NAME = ...`) and reads (`%NAME`), binding nothing."""

    def __init__(self):
        self.defined: set[str] = set()
        self.read: set[str] = set()

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return None

    def macro(self, macro_name):
        self.read.add(macro_name)
        return None

    def scan(self, text: str, filename: str | None = None) -> list[str]:
        """Records `text`'s macros; returns the files it includes."""
        includes = []
        for statement in config_parser.ConfigParser(text, self):
            if isinstance(statement, config_parser.BindingStatement) and not statement.arg_name:
                self.defined.add(f"{statement.scope}/{statement.selector}" if statement.scope else statement.selector)
            elif isinstance(statement, config_parser.IncludeStatement):
                includes.append(statement.filename)
        return includes


def _refuse_unread_macros(files: Sequence[str], bindings: Sequence[str]) -> None:
    """A macro bound on the command line must be read (%NAME) by the config; else it is a typo.

    The files are scanned as text (includes followed as gin follows them), so a macro read by a
    binding that `skip_unknown` dropped still counts as read.
    """
    if not bindings:
        return
    in_config = _MacroRecorder()
    pending, seen = list(files), set()
    while pending:
        path = _find_included(pending.pop())
        if path in seen:
            continue
        seen.add(path)
        with open(path) as f:
            pending.extend(in_config.scan(f.read(), path))
    on_command_line = []
    for binding in bindings:
        before = set(in_config.defined)
        in_config.scan(binding)
        on_command_line += [(name, binding) for name in in_config.defined - before]
    for name, binding in on_command_line:
        if name not in in_config.read:
            # Dotted names are gin constants (%gin.REQUIRED), not macros a user binds.
            known = sorted(n for n in (in_config.defined | in_config.read) - {name} if "." not in n)
            hint = _closest(name, known) or f"; the config's macros are {', '.join(known) or 'none'}"
            raise GinConfigError(f"--gin.{binding} binds macro {name}, which nothing in the config reads "
                                 f"(no %{name}){hint}")


def _find_included(path: str) -> str:
    """The file gin opens for an include of `path` (gin tries its search paths in order)."""
    prefixes = [""] if os.path.isabs(path) else gin.config._LOCATION_PREFIXES  # pylint: disable=protected-access
    for prefix in prefixes:
        candidate = os.path.join(prefix, path)
        if os.path.isfile(candidate):
            return candidate
    raise GinConfigError(f"gin file {path!r} not found (searched {prefixes})")


# ---- messages --------------------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    if isinstance(error, tokenize.TokenError):  # args: (message, (line, column))
        return str(error.args[0])
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return text.strip().splitlines()[0].rstrip(".") if text.strip() else type(error).__name__


def _location(error: BaseException) -> str | None:
    """'FILE, line N' from gin's 'In file "FILE", line N' trailer, if it has one."""
    match = re.search(r'In file "([^"]+)", line (\d+)', str(error))
    return f"{match.group(1)}, line {match.group(2)}" if match else None


def _closest(word: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {matches[0]}?" if matches else ""


def _suggestion(error: BaseException) -> str:
    """'; did you mean X?' for gin's unknown-configurable and unknown-parameter errors."""
    text = str(error)
    registry = gin.config._REGISTRY  # pylint: disable=protected-access
    match = re.search(r"No configurable matching '([^']+)'", text)
    if match:
        names = {selector.rsplit(".", 1)[-1] for selector, _ in registry.items()}
        return _closest(match.group(1), names)
    match = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", text)
    if match:
        configurable = registry.get_match(match.group(1))
        if configurable is not None:
            target = configurable.wrapped
            target = target.__init__ if inspect.isclass(target) else target
            params = [p for p in inspect.signature(target).parameters if p != "self"]
            return _closest(match.group(2), params)
    return ""


def _finalize_message(error: ValueError) -> str:
    """One line for gin's finalize-time checks (REQUIRED values, macros read but never defined)."""
    text = str(error)
    match = re.match(r"(\S+)/macro\.value set to `%gin\.REQUIRED`", text)
    if match:
        return f"macro {match.group(1)} is required: pass --gin.{match.group(1)}=VALUE or bind it in a gin file"
    match = re.match(r"(\S+) set to `%gin\.REQUIRED`", text)
    if match:
        return f"{match.group(1)} is required: pass --gin.{match.group(1)}=VALUE or bind it in a gin file"
    match = re.match(r"No bindings specified for '(\S+)/gin\.macro'", text)
    if match:
        return (f"macro {match.group(1)} is read (%{match.group(1)}) but no gin file or binding defines it"
                f"{_closest(match.group(1), _defined_macros())}")
    return f"bad gin config: {_first_line(error)}"


def _defined_macros() -> list[str]:
    return sorted(scope for scope, selector in gin.config._CONFIG  # pylint: disable=protected-access
                  if selector == "gin.macro")
