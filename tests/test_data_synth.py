"""Tests for data_synth.py: templated facts are verifiable at their recorded offsets, the generator path
records what it was shown, the CLI reports bad documents in one line and leaves nothing half written.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import data_synth
import tokenizer
from errors import UserError
from helpers import ROOT, STDLIB_DOCS, fake_generate_text, write


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data_synth.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_synth_templated_facts_verifiable(tmp_path):
    """16K-token samples (byte tokenizer) from stdlib files: each inserted fact sits at its recorded
    offset on a line boundary at/after its depth, the rest is the real files, and answers match."""
    tok, ctx, out = tokenizer.ByteTokenizer(), 16384, tmp_path / "long.jsonl"
    counts = data_synth.synth(STDLIB_DOCS, tok, ctx, ["single", "multi", "summary"], out, n=3, seed=7)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert counts == dict(written=3, failed=0) and [r["meta"]["kind"] for r in rows] == ["single", "multi", "summary"]
    for r in rows:
        meta, (user, assistant) = r["meta"], r["messages"]
        n = len(tokenizer.encode_chat(tok, r["messages"], "chatml")[0])
        assert n == meta["n_tokens"] and 0.95 * ctx <= n <= ctx
        doc = user["content"][:meta["document_chars"]]
        inserted = 0
        for f in meta["facts"]:
            o = f["char_offset"]
            assert doc[o:].startswith(f["text"] + "\n") and (o == 0 or doc[o - 1] == "\n")
            assert o - inserted >= f["depth"] * (len(doc) - sum(len(g["text"]) + 1 for g in meta["facts"]))
            inserted += len(f["text"]) + 1
        original = doc
        for f in reversed(meta["facts"]):
            original = original[:f["char_offset"]] + original[f["char_offset"] + len(f["text"]) + 1:]
        real = "".join("".join(Path(s["file"]).read_text(encoding="utf-8").splitlines(keepends=True)
                               [s["first_line"] - 1:s["last_line"]]) for s in meta["sources"])
        assert original == real
        values = meta["answer_values"]
        if meta["kind"] == "summary":
            assert assistant["content"].splitlines() == [f"{f['key']}: {f['value']}" for f in meta["facts"]]
        elif meta["kind"] == "single":
            assert values[0] in assistant["content"] and values[0] in doc
        else:
            asked = [f for f in meta["facts"] if f["key"] in user["content"][meta["document_chars"]:]]
            assert len(asked) >= 2 and assistant["content"].splitlines() == [f["text"] for f in asked]


def test_synth_with_fake_generator_records_chunks(tmp_path):
    tok, out = tokenizer.ByteTokenizer(), tmp_path / "gen.jsonl"
    counts = data_synth.synth(STDLIB_DOCS, tok, 16384, ["single", "multi", "summary"], out, n=3, seed=1,
                        generate_text=fake_generate_text, generator_name="fake")
    assert counts == dict(written=3, failed=0)
    for line in out.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        meta, content = r["meta"], r["messages"][0]["content"]
        assert meta["generator"] == "fake" and meta["n_tokens"] <= 16384
        firsts = [content[c["char_start"]:c["char_end"]].split()[0] for c in meta["chunks"]]
        for c, first in zip(meta["chunks"], firsts):
            assert first in c["reply"] and first in r["messages"][1]["content"]
    for reply, said in [("I cannot help with that.", "0 of 2 generator replies were empty"),
                        ("  ", "2 of 2 generator replies were empty or null")]:
        with pytest.raises(UserError, match=f"none of the 2 samples could be made: {said}"):
            data_synth.synth(STDLIB_DOCS, tok, 16384, ["single"], tmp_path / "none.jsonl", n=2,
                        generate_text=lambda p: reply, generator_name="fake-refuser")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl"]  # no OUT, no progress file left


@pytest.mark.parametrize("reply,expected", [
    ("Question: Who?\nAnswer: Bob.", ("Who?", "Bob.")),
    ("Here you go:\n\n**Q1:** Why?\n**A1:** Because.\n\nQuestion: extra?\nAnswer: no", ("Why?", "Because.")),
    ("question: multi\nline?\nanswer: yes\nand more", ("multi\nline?", "yes\nand more")),
    ("Answer: only", None),
    ("Question: \nAnswer: ", None),
])
def test_parse_qa(reply, expected):
    assert data_synth.parse_qa(reply) == expected


def test_cli_synth_success_and_bad_doc(tmp_path):
    out = tmp_path / "s.jsonl"
    r = run_cli("--docs", STDLIB_DOCS[0], "--tokenizer", "bytes", "--ctx", 4096, "--kinds", "single",
                "--n", 2, "--out", out)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    bad = write(tmp_path / "bad.txt", b"fine\n" * 5000 + b"caf\xe9\n")
    out2 = tmp_path / "never.jsonl"
    r = run_cli("--docs", bad, "--tokenizer", "bytes", "--ctx", 4096, "--out", out2)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"{bad}:5001: not UTF-8" in r.stderr
    assert not out2.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "s.jsonl"]
    r = run_cli("--docs", STDLIB_DOCS[0], "--tokenizer", "bytes", "--ctx", 4096, "--kinds", "poem",
                "--out", out2)
    assert r.returncode == 1 and "poem" in r.stderr and not out2.exists()


@pytest.mark.slow
def test_synth_with_smollm2_generator_writes_questions_about_chunks(tmp_path, smollm2_path):
    """The real generator path: SmolLM2-135M-Instruct, shown one chunk of textwrap.py, writes a question
    and answer; the line records the generator, the source and the chunk it was shown."""
    out = tmp_path / "long.jsonl"
    tok = tokenizer.load_tokenizer(smollm2_path)
    counts = data_synth.synth([os.path.join(os.path.dirname(os.__file__), "textwrap.py")], tok, 4096, ["single"], out, n=1,
                        generate_text=data_synth.model_generate_text(smollm2_path, tok, max_new_tokens=96),
                        generator_name=smollm2_path)
    assert counts["written"] + counts["failed"] == 1
    rows = [json.loads(l) for l in out.read_text().splitlines()] if out.exists() else []
    if counts["written"]:  # the 135M model usually answers in the asked format (it did in every run here)
        meta = rows[0]["meta"]
        assert meta["generator"] == smollm2_path and meta["chunks"] and "textwrap.py" in meta["sources"][0]["file"]
        assert rows[0]["messages"][-1]["role"] == "assistant" and rows[0]["messages"][-1]["content"].strip()


def eval_template_fragments() -> set[str]:
    """Every fixed run of 4+ words in the evaluations' prompt strings (eval_tasks.py, eval_ruler.py, eval_protocols.py):
    their module-level upper-case string constants, cut at format fields and lower-cased."""
    import eval_protocols
    import eval_ruler
    import eval_tasks
    out = set()
    for mod in (eval_tasks, eval_ruler, eval_protocols):
        for name, value in vars(mod).items():
            if name.isupper() and isinstance(value, str):
                for piece in re.split(r"\{[^}]*\}", value):
                    words = piece.split()
                    out |= {" ".join(words[i:i + 4]).lower() for i in range(len(words) - 3)}
    return out


def test_synth_uses_no_evaluation_sentence_or_question(tmp_path):
    """Training data must not carry an evaluation's own format (it would inflate that score): no 4-word run
    of any evaluation template appears in what synth writes (facts, questions, answers), over every kind."""
    fragments = eval_template_fragments()
    assert "the pass key is" in fragments and "what is the pass" in fragments  # the check sees passkey
    assert any("dolores park" in f for f in fragments) and any("special magic" in f for f in fragments)
    tok, out = tokenizer.ByteTokenizer(), tmp_path / "s.jsonl"
    data_synth.synth(STDLIB_DOCS, tok, 4096, ["single", "multi", "summary"], out, n=60, seed=1)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {f["type"] for r in rows for f in r["meta"]["facts"]} >= {"needle", "code", "record"}
    for r in rows:
        user, assistant = r["messages"]
        written = [f["text"] for f in r["meta"]["facts"]] + [user["content"][r["meta"]["document_chars"]:],
                                                            assistant["content"]]
        text = " ".join(" ".join(w.split()).lower() for w in written)
        assert not [f for f in fragments if f in text], r["meta"]["kind"]
