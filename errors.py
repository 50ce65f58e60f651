"""The one exception the project raises on purpose for a user's mistake.

A bad flag, path, data line, config field or mismatched checkpoint raises `UserError` with one line that
names the flag, file, field or tensor and says what to do. Entry points (`main()` of train.py, eval.py,
lora.py, ...) catch `UserError` alone, print it as `error: ...` and exit 1; any other exception is a bug
and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the command line, data or files: reported as one line, exit code 1."""
