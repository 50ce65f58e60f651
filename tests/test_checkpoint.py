"""checkpoint.py: atomic writers (the target appears complete or not at all; temporaries never linger)."""
import os

import pytest

from checkpoint import TMP_PREFIX, atomic_path, atomic_write_text
from errors import UserError


def test_atomic_file_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]  # the temporary is gone
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_dir_and_refusal(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, is_dir=True) as tmp:
        assert tmp.is_dir() and tmp.name.startswith(TMP_PREFIX)
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(UserError, match="exists and is not empty"):
        with atomic_path(target, is_dir=True, replace=False):
            pass
    with atomic_path(target, is_dir=True) as tmp:  # replace=True swaps the whole directory
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["b"] and os.listdir(tmp_path) == ["model"]


def test_atomic_path_os_error_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=str(blocker / "sub")):
        atomic_write_text(blocker / "sub" / "out.txt", "y")  # parent is a file
