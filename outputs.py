"""Output paths: the one rule for what a command may write where, and the atomic writers.

The rule, checked by every entry point before its work starts and again by every writer:
  - "file"    a file the command writes whole: an existing file there is replaced (atomically; through a
              symbolic link, here and below, the link's target is replaced and the link kept); a folder
              there is refused;
  - "folder"  a folder the command puts its own named files in (eval's results): created if missing, an
              existing one kept, its other entries untouched; a file there is refused;
  - "new"     a folder the command writes whole (a converted or merged model): missing or empty, or one
              that `owned(path)` says is the command's own (a training run's folder); a file there, or a
              non-empty folder it does not own, is refused.
A file standing where a parent folder should be, and an existing output that is one of the command's
inputs or lies inside an input folder, are refused too. Refused means one UserError line naming the flag and the path; nothing is deleted.

Writing: `atomic_path` yields a temporary name beside the target (`.tmp-NAME-XXXXXXXX`, same folder, so the
rename stays on one file system), created with the user's umask (0666 & ~umask for a file, 0777 & ~umask
for a folder, as `open` and `mkdir` would); the content goes there and is renamed into place only once
complete. An exception removes the temporary and leaves the previous target untouched; a kill -9 leaves
only a `.tmp-*` entry, which no reader picks up and the next run removes. Replacing a folder moves the old
one aside first (two renames), so no moment is without a complete target under some name.

    check_output(args.out, "file", "--out", inputs=args.docs)
    with atomic_path(path) as tmp: ...            # a file; is_dir=True: a folder to fill
    atomic_write_text(path, text); save_figure(fig, path.png); append_line(metrics, json_line)
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from safetensors import SafetensorError

from errors import UserError

TMP_PREFIX = ".tmp-"  # temporary names start with this; readers skip them, cleaners may remove them
KINDS = ("file", "folder", "new")


def _named(path: Path, flag: str) -> str:
    return f"{flag} {path}" if flag else str(path)


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(path))


def check_output(path: str | os.PathLike, kind: str = "file", flag: str = "",
                 owned: Callable[[Path], bool] | None = None, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output path that exists and is not what the command writes (the module docstring's rule);
    return it as a Path. flag: how the message names it ("--out"); inputs: paths the command reads."""
    assert kind in KINDS, kind
    path, name = Path(path), _named(Path(path), flag)
    blocker = next((p for p in reversed(Path(os.path.abspath(path)).parents) if p.exists() and not p.is_dir()),
                   None)
    if blocker is not None:
        raise UserError(f"{name}: {blocker} is a file, not a folder; choose another path")
    if kind == "file" and path.is_dir():
        raise UserError(f"{name}: is a folder; a file goes there (nothing was written or deleted: name a file)")
    if kind != "file" and (path.exists() or path.is_symlink()) and not path.is_dir():
        what = "a file" if path.exists() else "a broken link"
        raise UserError(f"{name}: is {what}; a folder goes there (nothing was written or deleted: choose a folder)")
    if kind == "new" and path.is_dir() and (owned is None or not owned(path)):
        entry = next(iter(sorted(p.name for p in path.iterdir())), None)
        if entry is not None:
            raise UserError(f"{name}: a folder that holds other files ({entry!r}) and is not this command's own; "
                            "choose a new or empty folder (nothing was deleted)")
    for inp in inputs:  # the same file under any name (a symbolic or hard link), or an existing part of an input
        if inp is None or not os.path.exists(inp) or not path.exists():
            continue
        if os.path.samefile(inp, path) or os.path.isdir(inp) and Path(_real(path)).is_relative_to(_real(inp)):
            raise UserError(f"{name}: is also an input of this command, or part of one ({inp}); choose another path")
    return path


def holds_only(*patterns: str) -> Callable[[Path], bool]:
    """An `owned` test for check_output: every entry of the folder matches one of the glob patterns (or is
    a `.tmp-*` temporary), i.e. the folder holds nothing but what the command itself writes."""
    return lambda folder: all(any(fnmatch.fnmatchcase(p.name, pat) for pat in (*patterns, TMP_PREFIX + "*"))
                              for p in folder.iterdir())


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


def _temp_beside(path: Path, is_dir: bool) -> Path:
    """A new, empty temporary file or folder beside `path`, created with the process's umask applied."""
    while True:
        tmp = path.parent / f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}"
        try:
            if is_dir:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on any exception remove it.

    is_dir: the temporary is an (empty, created) folder to fill, else an empty file to write. `path` is
    checked with check_output first: a file ("file"); a folder ("folder": an existing folder is replaced,
    for a caller that owns it) or with replace=False a new one ("new": a non-empty folder is refused).
    OS errors (read-only or full disk, permissions) become one UserError naming the path.
    """
    path = check_output(path, "new" if is_dir and not replace else "folder" if is_dir else "file")
    if path.is_symlink():
        path = Path(_real(path))  # write through the link: its target is replaced, the link kept
    tmp = old = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(path, is_dir)
        yield tmp
        if is_dir and path.is_dir():
            old = _temp_beside(path, True)
            os.replace(path, old)  # the previous folder aside, then the new one in place
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)
                old = None
                raise
        else:
            os.replace(tmp, path)
        tmp = None
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        raise UserError(f"{path}: cannot write ({getattr(e, 'strerror', None) or e})") from None
    finally:
        for p in (tmp, old):
            if p is not None:
                _remove(p)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """matplotlib's fig.savefig(path), atomically; the format is the suffix of `path` (png by default)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **kwargs)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a text file (a log such as metrics.jsonl). A failed write (a full disk) is cut
    back to the previous end, so the file never holds a torn line, and is one UserError naming the file."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError as e:
        with contextlib.suppress(OSError):  # a device such as /dev/full cannot be cut
            os.ftruncate(fd, end)
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        os.close(fd)
