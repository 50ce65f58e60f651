"""Resumable JSONL output: rows made one by one (by threads), kept as they complete, written whole at the end.

Completed rows are appended to OUT.partial as whole JSON lines (outputs.append_line: a failed write, a full
disk, is cut back and names the file), in completion order (with concurrency N, N threads work on N row indices at once); a row that
could not be made is recorded as {"failed": index}. The first line of OUT.partial records the settings the
rows were made with. A rerun with the same settings reads OUT.partial, drops a torn last line (a kill
mid-write), checks every row (file:line on a bad one; rows of other settings are refused, never mixed) and
makes only the indices not yet there, so each row is made and written once. When all n are done OUT is
written atomically (outputs.atomic_path) with the rows in index order and OUT.partial is removed; OUT
itself is therefore never half-written.

Ctrl-C or SIGTERM: the rows in flight finish and are kept, no new one starts, and the run stops with one
line saying how many rows are kept and to rerun the same command; a second signal stops at once, dropping
the rows in flight (a row is written under a lock, so none is torn). The main thread only waits on the
workers, so it is always free to take the signal.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from data import DataError, utf8_error
from errors import UserError
from outputs import append_line, atomic_path

SETTING_FLAGS = {"docs": "--docs", "tokenizer": "--tokenizer", "ctx": "--ctx", "kinds": "--kinds", "seed": "--seed",
                 "template": "--template", "generator": "--generator/--generator-model",
                 "generator_url": "--generator-url"}  # synth's settings keys and the flag that sets each


def _bad_row(path: Path, lineno: int, why: str) -> UserError:
    return UserError(f"{path}:{lineno}: {why}; remove {path} to start over")


def read_partial(path: Path, settings: dict, check_row: Callable[[dict], str | None] | None = None) -> dict[int, dict]:
    """index -> row of the complete lines of OUT.partial (a torn last line is cut off the file).

    The first line records the settings the file was made with ({"synth_settings": ...}); it must equal
    `settings`, so rows of another --seed, --ctx, documents or generator are never mixed in. Every row is
    then checked: UTF-8, a JSON object, {"failed": i} or {"messages", "meta": {"index": i, ...}}, and
    `check_row(row)` (None when the row belongs to these settings, else why not). A bad row names file:line.
    """
    if not path.exists():
        return {}
    if not path.is_file():
        raise UserError(f"{path}: not a file; synth keeps its progress there, remove it")
    data = path.read_bytes()
    keep = data[:data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    done = {}
    for lineno, raw in enumerate(keep.splitlines(), start=1):
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(utf8_error(path, raw, e, lineno)) from None
        except json.JSONDecodeError as e:
            raise _bad_row(path, lineno, f"broken JSON ({e.msg} at column {e.colno})") from None
        if lineno == 1:
            saved = row.get("synth_settings") if isinstance(row, dict) else None
            if not isinstance(saved, dict):
                raise _bad_row(path, 1, "not a synth progress file (no settings line)")
            changed = [k for k in settings if saved.get(k) != settings[k]]
            if changed:
                k = changed[0]
                raise UserError(f"{path}: made with {SETTING_FLAGS.get(k, k)} {saved.get(k)!r}, not {settings[k]!r}; "
                                f"rerun with the settings it was made with to continue it, or remove it to start over")
            continue
        index = row.get("failed", (row.get("meta") or {}).get("index")) if isinstance(row, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise _bad_row(path, lineno, "not a synth row (needs meta.index or failed: a sample index)")
        why = None if "failed" in row or check_row is None else check_row(row)
        if why:
            raise _bad_row(path, lineno, f"sample {index} {why}")
        done[index] = row
    return done


class _Signals:
    """SIGINT/SIGTERM while samples are made: the first sets `stop` (the samples in flight finish and are
    kept, no new one starts); a second sets `now` (stop at once, dropping those in flight). Installed only
    in the main thread."""

    def __init__(self, stop: threading.Event):
        self.stop, self.now, self.name, self.old = stop, False, None, {}

    def _handle(self, signum, frame):
        if self.name is not None:
            self.now = True
            return
        self.name = signal.Signals(signum).name
        self.stop.set()
        print(f"\n{self.name}: finishing the samples in flight, then stopping (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def write_resumable(out, n: int, make: Callable[[int], dict | None], concurrency: int = 1, settings: dict | None = None,
                    check_row: Callable[[dict], str | None] | None = None) -> dict:
    """Rows make(0..n-1) to `out` in index order through OUT.partial (see the module docstring); `settings`
    and `check_row` as read_partial. `concurrency` threads make samples; the main thread only waits, so a
    signal stops them cleanly (_Signals) and says how to continue. When no row could be made, OUT is not
    written and the progress file is removed."""
    out, settings = Path(out), settings or {}
    partial = out.with_name(out.name + ".partial")
    done = read_partial(partial, settings, check_row)
    todo = iter([i for i in range(n) if i not in done])
    lock, stop = threading.Lock(), threading.Event()
    state = {"closed": False, "error": None}

    def keep(i, row):
        with lock:
            if state["closed"]:  # stopped at once: a late row is dropped, never half-written
                return
            if not partial.exists():  # created by the first result, so a run failing at once leaves no file
                append_line(partial, json.dumps({"synth_settings": settings}, ensure_ascii=False))
            append_line(partial, json.dumps(row, ensure_ascii=False))  # whole, or a UserError naming the file
            done[i] = row

    def worker():
        while not stop.is_set():
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                row = make(i)
                keep(i, row if row is not None else {"failed": i})
            except BaseException as e:  # re-raised in the main thread below (a bug keeps its traceback)
                state["error"] = state["error"] or e
                stop.set()
                return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(concurrency, n)))]
    with _Signals(stop) as signals:
        for t in threads:
            t.start()
        for t in threads:  # joined in short waits: the main thread must stay free to take a signal
            while t.is_alive() and not signals.now:
                t.join(0.1)
    with lock:
        state["closed"] = True
    if state["error"] is not None:
        raise state["error"]
    if signals.name is not None:
        kept = len([i for i in done if i < n])
        raise UserError(f"{signals.name}: stopped with {kept} of {n} samples kept in {partial}"
                        f"{'; the samples in flight were dropped' if signals.now else ''}; "
                        f"rerun the same command to continue")
    rows = [done[i] for i in range(n) if "failed" not in done[i]]
    if rows:
        write_jsonl(out, rows)
    partial.unlink(missing_ok=True)
    return dict(written=len(rows), failed=n - len(rows))


def write_jsonl(out, rows: Iterable[dict]) -> int:
    """Write rows to `out` atomically (checkpoint.atomic_path): the file appears complete or not at all."""
    n = 0
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
