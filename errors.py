"""The one exception the project raises on purpose for a user's mistake.

A bad flag, path, data line, config field or mismatched checkpoint raises `UserError` with one line that
names the flag, file, field or tensor and says what to do. Entry points (`main()` of train.py, eval.py,
lora_peft.py, ...) catch `UserError` alone, print it as `error: ...` and exit 1; any other exception is a bug
and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the command line, data or files: reported as one line, exit code 1."""


def check_range(name: str, value, low=None, high=None):
    """`value` if low <= value <= high (either bound optional), else a UserError naming `name` (a flag or a
    file's field) with the range. NaN is outside every range; an infinite value is outside a finite one."""
    inside = (low is None or value >= low) and (high is None or value <= high) and value == value
    if not inside:
        lo = f">= {low}" if low is not None else ""
        hi = f"<= {high}" if high is not None else ""
        raise UserError(f"{name} must be {lo}{' and ' if lo and hi else ''}{hi}, got {value}")
    return value


def json_field(obj: dict, key: str, where, want: type | tuple, ok: Callable | None = None, what: str = "",
               default=None):
    """obj[key] (or `default` when absent or null, if one is given) when it is of type `want` and passes `ok`;
    else a UserError naming the file `where` and the field, saying it must be `what` (a hand-edited JSON file:
    trainer_state.json, adapter_config.json). A bool never counts as a number."""
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None and default is not None:
        return default
    number = want in (int, float) or (isinstance(want, tuple) and int in want)
    if not isinstance(value, want) or (number and isinstance(value, bool)) or (ok is not None and not ok(value)):
        raise UserError(f"{where}: field {key!r} must be {what or getattr(want, '__name__', want)}, got {value!r}; "
                        f"fix the file or use an intact one")
    return value


def run_cli(body: Callable[[], object], quiet: bool = False) -> int:
    """Run an entry point's body; return its exit code.

    0 when it returns; 1 with one `error: ...` line on stderr for a UserError, or for an OSError on a path
    the user named (unreadable, vanished, a file where a folder should be), which names that path. Any
    other exception propagates with its traceback: it is a bug. quiet: exit 1 without the line (the
    processes of a torchrun node but its local rank 0, which prints the same line once for the node).
    """
    try:
        body()
    except (UserError, OSError) as e:
        if not quiet:
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            print(f"error: {where}{e.strerror or e}" if isinstance(e, OSError) else f"error: {e}", file=sys.stderr)
        return 1
    return 0
