"""train_guards.py: what a rank finds of the files rank 0 wrote (files_digest), compared across ranks in the slow
two-node test of tests/test_train.py."""
import train_guards
import parallel


def test_files_digest_tells_apart_what_ranks_may_find(tmp_path, monkeypatch):
    """The same folder twice: the same description; a changed byte, a missing file, an extra file, a
    missing folder or none: another. Files above DIGEST_MAX_BYTES count by name and size."""
    ck = tmp_path / "ckpt-0000002"
    (ck / "adapter").mkdir(parents=True)
    (ck / "trainer_state.json").write_text('{"step": 2}')
    (ck / "adapter" / "w.safetensors").write_bytes(b"x" * 100)
    first = train_guards.files_digest([ck])
    assert first == train_guards.files_digest([ck]) and first.startswith("ckpt-0000002 (2 file(s), sha256 ")
    (ck / "trainer_state.json").write_text('{"step": 3}')
    changed = train_guards.files_digest([ck])
    assert changed != first
    (ck / "extra").write_text("")
    assert train_guards.files_digest([ck]) not in (first, changed)
    assert train_guards.files_digest([tmp_path / "gone"]) == "no gone" and train_guards.files_digest([None]) == "nothing"
    monkeypatch.setattr(train_guards, "DIGEST_MAX_BYTES", 10)
    big = train_guards.files_digest([ck / "adapter"])
    (ck / "adapter" / "w.safetensors").write_bytes(b"y" * 100)  # same size: not read
    assert train_guards.files_digest([ck / "adapter"]) == big
    train_guards.check_same_files(parallel.Dist(0, 0, 1, None), [ck], "--out")  # one process: nothing to compare
