"""Expected failures that end a command with one line naming the path and the cause.

A ``UserError`` is not a bug: the input, the environment or the arguments are wrong (an
unreachable scheduler, a read-only or locked ``--out``, a missing ``--src``). The CLI prints
``error: <message>`` and exits non-zero without a traceback (``--debug`` shows it); every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure; ``str(e)`` is the one line shown to the user."""

    exit_code = 1


class OutputLocked(UserError):
    """Another live ``build-shards`` holds the lock on this ``--out``."""

    exit_code = 3
