"""Files: atomic writers (more of checkpoint I/O lands here).

Every file or directory the project writes goes through `atomic_path`: the content is written under a
temporary name beside the target (`.tmp-NAME-XXXX`, same directory, so the rename stays on one file
system) and renamed into place only once complete. A crash or an exception leaves the previous good
target untouched and removes the temporary; a kill -9 leaves only a `.tmp-*` entry, which no reader
ever picks up.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from errors import UserError

TMP_PREFIX = ".tmp-"  # temporary names start with this; readers skip them, cleaners may remove them

# ----------------------------------------------------------------------------- atomic writers


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on any exception remove it.

    is_dir: the temporary is an (empty, created) directory to fill, else a file path not yet created.
    replace: an existing `path` is replaced (a directory is removed first, then the rename); with
    replace=False an existing non-empty directory or file at `path` is a UserError before anything is
    written. OS errors (read-only or full disk, `path` under a file) become one UserError naming the path.

    Note: replacing a directory is remove-then-rename, so a crash between the two leaves no `path` but a
    complete temporary; train.py's checkpoints never replace (each step has its own name).
    """
    path = Path(path)
    if not replace and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"{path}: exists and is not empty; choose a new output path")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            _remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
