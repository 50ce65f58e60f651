"""outputs.py: the output-path rule (refused, never deleted) and the atomic writers (previous state kept on
failure, the user's umask, writes through a symbolic link, no torn log line)."""
import os
import stat

import pytest

from errors import UserError
from outputs import (TMP_PREFIX, append_line, atomic_path, atomic_write_text, check_output, holds_only,
                     save_figure)


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
    with pytest.raises(UserError, match="holds other files"):
        with atomic_path(target, is_dir=True, replace=False):
            pass
    with pytest.raises(RuntimeError):  # a failed replacement keeps the previous folder whole
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "c").write_text("3")
            raise RuntimeError("crash while writing")
    assert os.listdir(target) == ["a"] and os.listdir(tmp_path) == ["model"]
    with atomic_path(target, is_dir=True) as tmp:  # replace=True swaps the whole directory
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["b"] and os.listdir(tmp_path) == ["model"]


def test_atomic_path_os_error_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=str(blocker / "sub")):
        atomic_write_text(blocker / "sub" / "out.txt", "y")  # parent is a file


def test_a_folder_where_a_file_goes_is_refused_and_kept(tmp_path):
    folder = tmp_path / "model.gguf"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="is a folder; a file goes there"):
        atomic_write_text(folder, "x")
    assert (folder / "precious.txt").read_text() == "keep me"
    link = tmp_path / "link"
    link.symlink_to(folder)  # a link to a folder is a folder
    with pytest.raises(UserError, match="is a folder"):
        atomic_write_text(link, "x")
    assert (folder / "precious.txt").read_text() == "keep me"


def test_a_file_where_a_folder_goes_is_refused_and_kept(tmp_path):
    f = tmp_path / "merged"
    f.write_text("keep me")
    for replace in (True, False):
        with pytest.raises(UserError, match="is a file; a folder goes there"):
            with atomic_path(f, is_dir=True, replace=replace):
                pass
    assert f.read_text() == "keep me" and os.listdir(tmp_path) == ["merged"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_writes_keep_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        with atomic_path(tmp_path / "d", is_dir=True) as tmp:
            (tmp / "inner").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask


def test_a_file_link_is_written_through(tmp_path):
    real = tmp_path / "store" / "a.jsonl"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "a.jsonl"
    link.symlink_to(real)
    atomic_write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new" and sorted(os.listdir(real.parent)) == ["a.jsonl"]


def test_check_output_rule(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"--out .*run: a folder that holds other files \('notes.txt'\)"):
        check_output(tmp_path / "run", "new", "--out")
    check_output(tmp_path / "run", "new", "--out", owned=holds_only("*.txt"))  # the command's own
    check_output(tmp_path / "run", "folder", "--out")  # a results folder: other files are left alone
    check_output(tmp_path / "empty", "new")  # missing
    src = tmp_path / "docs.txt"
    src.write_text("x")
    with pytest.raises(UserError, match="also an input"):
        check_output(tmp_path / "." / "docs.txt", "file", "--out", inputs=[src])
    os.link(src, tmp_path / "hard.txt")
    with pytest.raises(UserError, match="also an input"):
        check_output(tmp_path / "hard.txt", "file", "--out", inputs=[src])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.safetensors").write_text("w")
    with pytest.raises(UserError, match="part of one"):
        check_output(tmp_path / "model" / "w.safetensors", "file", "OUT", inputs=[tmp_path / "model"])
    check_output(tmp_path / "model" / "new.gguf", "file", "OUT", inputs=[tmp_path / "model"])  # a new file beside


def test_append_line_never_leaves_a_torn_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    append_line(f, '{"step": 1}')
    append_line(f, '{"step": 2}\n')
    assert f.read_text() == '{"step": 1}\n{"step": 2}\n'
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(UserError, match="/dev/full: cannot write"):
        append_line("/dev/full", "x" * 100_000)


def test_save_figure_is_atomic(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["p.png"]
    (tmp_path / "q.png").write_bytes(b"previous")
    with pytest.raises(Exception):
        save_figure(fig, tmp_path / "q.png", dpi="not a number")
    plt.close(fig)
    assert (tmp_path / "q.png").read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["p.png", "q.png"]
