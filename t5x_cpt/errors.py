"""The error model every t5x_cpt command follows (docs/errors.md).

Two kinds of failure, and only two:
  * the user's input is wrong (a flag, a gin binding, a path, a file's content, a size that cannot
    fit): the code raises a subclass of `UserInputError` whose message names the cause and, where
    one exists, the fix. Commands print `<prog>: error: <message>` on one line, no traceback, and
    exit with `USAGE_EXIT_CODE` (2, as argparse does).
  * anything else is a bug or an environment failure: it propagates with its full traceback and
    Python's exit status (1).
Package-specific types (DataError, ConversionError, ScalingInputError, ...) subclass
`UserInputError`, so a command's `main` catches exactly one type.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

USAGE_EXIT_CODE = 2


class UserInputError(Exception):
    """The user's input is wrong; the message says which input and why, in one line."""


def run_command(prog: str, body: Callable[[Sequence[str] | None], int | None],
                argv: Sequence[str] | None = None) -> int:
    """Runs a command's body; a UserInputError becomes one line on stderr and exit code 2.

    Every other exception propagates (a traceback is the right report for a bug).
    """
    try:
        return int(body(argv) or 0)
    except UserInputError as e:
        logging.getLogger(prog).debug("input error", exc_info=True)
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return USAGE_EXIT_CODE


def one_line(error: BaseException) -> str:
    """The error's message without gin's "In call to configurable ..." trailer."""
    text = str(error)
    for marker in ("\n  In call to configurable", "\n  In file", "\n    In call to configurable"):
        text = text.split(marker, 1)[0]
    return text.strip()
