"""The one exception type for bad user input, and the hook that prints it as one line instead of a traceback.

``python -m monai.bundle run ...`` wraps an error raised inside a config expression in MONAI's own exceptions, so
the line a user needs ends up under 60-240 lines of traceback. :func:`install` (run when the configs import
``scripts``) replaces Python's last-resort handler: a :class:`DataError` anywhere in the exception chain, or one of
MONAI's config errors (an unknown run id or key), is printed as ``error: <message>`` on stderr, the full traceback
goes to a log file named on the same line, and the exit code is 1. Any other exception keeps its traceback.
``PATHOLOGY_WSSS_DEBUG=1`` prints the traceback too.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

# MONAI's messages for config mistakes a user makes on the command line: worth one line, not a traceback
_CONFIG_ERRORS = ("doesn't exist in the config", "is not found in the config resolver", "is not defined in the config")


class DataError(ValueError):
    """Bad input data or configuration; the message names the file (or key) and what is wrong."""


def user_error(exc: BaseException | None) -> str | None:
    """The one-line message for ``exc`` if it (or an exception it was raised from) is the user's mistake, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(c.__name__ == DataError.__name__ and c.__module__ == __name__ for c in type(exc).__mro__):
            return str(exc)  # by name: MONAI Label re-imports scripts.* per request, each import a new DataError class
        if isinstance(exc, (KeyError, ValueError)) and any(s in str(exc) for s in _CONFIG_ERRORS):
            return f"config: {str(exc).strip(chr(34) + chr(39))}"
        exc = exc.__cause__ or exc.__context__
    return None


def _hook(kind, value, tb) -> None:
    message = user_error(value)
    if message is None or os.environ.get("PATHOLOGY_WSSS_DEBUG"):
        sys.__excepthook__(kind, value, tb)
        if message is None:
            return
    fd, log = tempfile.mkstemp(prefix="pathology_wsss-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write("".join(traceback.format_exception(kind, value, tb)))
    first = " ".join(message.split())  # one line, whatever the message held
    print(f"error: {first} (traceback: {log})", file=sys.stderr)


def moved(old: str, new: str) -> None:
    """A command line that changed: refuse the old one with the new one, instead of MONAI's "unknown run id".

    Args:
        old: the command as it was.
        new: the command now.
    """
    raise DataError(f"{old} is now {new}")


def install() -> None:
    """Print user errors as one line (see the module docstring); idempotent."""
    sys.excepthook = _hook
