"""The one exception the project raises on purpose for a user's mistake.

A bad flag, path, data line, config field or mismatched checkpoint raises `UserError` with one line that
names the flag, file, field or tensor and says what to do. Entry points (`main()` of train.py, eval.py,
lora.py, ...) catch `UserError` alone, print it as `error: ...` and exit 1; any other exception is a bug
and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the command line, data or files: reported as one line, exit code 1."""


def run_cli(body: Callable[[], object], quiet: bool = False) -> int:
    """Run an entry point's body; return its exit code.

    0 when it returns; 1 with one `error: ...` line on stderr for a UserError, or for an OSError on a path
    the user named (unreadable, vanished, a file where a folder should be), which names that path. Any
    other exception propagates with its traceback: it is a bug. quiet: exit 1 without the line (the ranks
    of a torchrun job but rank 0, which prints the same line once).
    """
    try:
        body()
    except (UserError, OSError) as e:
        if not quiet:
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            print(f"error: {where}{e.strerror or e}" if isinstance(e, OSError) else f"error: {e}", file=sys.stderr)
        return 1
    return 0
