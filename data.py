"""Data: tokenizers, chat templates, streaming readers, sequence builders, mixtures, synthetic long data.

What the recipes train on:
  - LongQLoRA (arXiv 2311.04879): packed long documents (PG19/RedPajama-style) for language modelling,
    plus ~39k long instruction samples for chat models.
  - Llama-3-8B-Instruct-80K-QLoRA (arXiv 2404.19553): 3.5K synthetic 64K-80K-token chat samples of three
    kinds (Single-Detail QA, Multi-Detail QA, Biography Summarization), written by GPT-4 about chunks of
    a long document, mixed with 20K short instances (RedPajama, LongAlpaca).
  - ProLong (Gao et al., lecture notes): long + short mixtures weighted by TOKENS, not samples
    (e.g. 60% long / 40% short); synthetic recall (needle / key-value) tasks are easy to verify.

Sample convention (what every builder here yields and the trainer consumes):
    dict(input_ids=LongTensor[L], labels=LongTensor[L]) with L <= ctx and
    labels[t] = the target for position t, i.e. already shifted:  labels[t] = ids[t + 1]  or -100.
  The trainer computes  loss = CE(logits[t], labels[t])  over t with labels[t] != -100, no shifting.
  Packing therefore cuts the token stream into chunks of ctx + 1 tokens: input_ids = chunk[:-1],
  labels = chunk[1:], so every one of the ctx positions has a target.

Token ids of ByteTokenizer (the built-in, file-free tokenizer for tests and the demo):
    0..255 the bytes of the UTF-8 text, 256 <s> (bos), 257 </s> (eos), 258 <pad>,
    259 <|im_start|>, 260 <|im_end|> (so ChatML works), 261..263 reserved; vocab_size 264
    (a multiple of 8, which keeps the embedding/LM-head matmuls aligned).

Notation: T tokens in a sequence, ctx the sequence length a builder targets.

Command line:
    python data.py synth --docs DIR_OR_FILES --tokenizer PATH --ctx 65536 --kinds single,multi,summary \
        --out long.jsonl [--generator MODEL] [--seed 0] [--n 8]
    python data.py stats FILE --tokenizer PATH [--template NAME]
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- constants

IGNORE_INDEX = -100  # label value of an unsupervised position (torch.nn.functional.cross_entropy default)

BYTE_SPECIALS = {"<s>": 256, "</s>": 257, "<pad>": 258, "<|im_start|>": 259, "<|im_end|>": 260}
BYTE_VOCAB_SIZE = 264

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java",
                 ".js", ".ts", ".sh", ".tex", ".html", ".css", ".toml", ".yaml", ".yml", ".cfg", ".ini"}
MAX_DOCUMENT_BYTES = 256 * 2**20  # a plain-text file is one document; larger ones must be split by the user

# SmolLM2-Instruct's template adds this system turn when the conversation has none.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Synthetic facts: small fixed vocabularies, sampled with a seeded random.Random.
SYNTH_NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ingrid", "Jonas",
               "Kemal", "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar")
SYNTH_WORDS = ("mango", "harbor", "velvet", "glacier", "pepper", "lantern", "orchid", "falcon", "cobalt",
               "meadow", "saffron", "quartz", "tundra", "violin", "ember", "juniper", "nebula", "walnut")
SYNTH_KINDS = ("single", "multi", "summary")
QA_PROMPT = ("Read the passage below and write one question that can be answered only from it, then its "
             "answer.\nReply exactly in this format:\nQuestion: <question>\nAnswer: <answer>\n\n"
             "Passage:\n{chunk}")
SUMMARY_PROMPT = "Summarize the passage below in two or three sentences.\n\nPassage:\n{chunk}"


class DataError(ValueError):
    """A bad input record: the message is `file:line: reason`."""


# ----------------------------------------------------------------------------- tokenizers


def _split_specials(text: str, specials: dict[str, int]) -> list[tuple[int, int, int | None]]:
    """Cut `text` into (start, end, special_id or None) pieces at occurrences of special-token strings.

    Longest match wins at a position (so `<|im_start|>` beats a hypothetical `<|im`).
    """
    if not specials:
        return [(0, len(text), None)] if text else []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    pieces, pos = [], 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            pieces.append((pos, m.start(), None))
        pieces.append((m.start(), m.end(), specials[m.group()]))
        pos = m.end()
    if pos < len(text):
        pieces.append((pos, len(text), None))
    return pieces


def _byte_to_char_map(text: str) -> list[int]:
    """m[b] = index of the character that UTF-8 byte b of `text` belongs to; m[len(bytes)] = len(text)."""
    m = []
    for i, ch in enumerate(text):
        m.extend([i] * len(ch.encode("utf-8")))
    m.append(len(text))
    return m


def _encode_with_specials(text: str, specials: dict[str, int], encode_plain: Callable
                          ) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, char spans): specials by string match, the text between by `encode_plain(piece) ->
    (ids, byte sizes)`. Sizes summing to more than the piece (a sentencepiece dummy-prefix space) are
    taken off the front; spans are clamped to the piece."""
    ids, spans = [], []
    for start, end, sid in _split_specials(text, specials):
        if sid is not None:
            ids.append(sid)
            spans.append((start, end))
            continue
        b2c = _byte_to_char_map(text[start:end])
        n_bytes = len(b2c) - 1
        piece_ids, sizes = encode_plain(text[start:end])
        pos = n_bytes - sum(sizes)
        for i, size in zip(piece_ids, sizes):
            a, b = min(max(pos, 0), n_bytes), min(max(pos + size, 0), n_bytes)
            ids.append(i)
            spans.append((start + b2c[a], start + b2c[b]))
            pos += size
    return ids, spans


def _decode_with_specials(ids: Iterable[int], names: dict[int, str], decode_plain: Callable) -> str:
    """Runs of ordinary ids through `decode_plain`, special ids written out as their strings."""
    out, run = [], []
    for i in map(int, ids):
        if i in names:
            out += [decode_plain(run), names[i]]
            run = []
        else:
            run.append(i)
    out.append(decode_plain(run))
    return "".join(out)


class Tokenizer:
    """The one tokenizer interface the rest of the code sees.

    Subclasses implement `encode_offsets(text) -> (ids, spans)` (spans are (start, end) character
    offsets of each token in `text`), `decode(ids)` and `token_to_id(s)`.

    Note: special-token strings inside `text` (e.g. "<|eot_id|>") are recognised as the special token,
    as transformers' tokenizers do by default; that is what chat rendering needs. Documents that may
    contain such strings literally should be cleaned before encoding.
    """

    name: str = "tokenizer"
    kind: str = "base"
    bos_id: int | None = None
    eos_id: int | None = None
    add_bos: bool = False  # whether the model's documents start with bos (its tokenizer's own default)
    vocab_size: int = 0
    special_tokens: dict[str, int] = {}
    chat_template: str | None = None  # the jinja string shipped with the tokenizer, if any (informational)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.encode_offsets(text)[0]
        if bos:
            ids = [self._required(self.bos_id, "bos")] + ids
        if eos:
            ids = ids + [self._required(self.eos_id, "eos")]
        return ids

    def _required(self, token_id: int | None, what: str) -> int:
        if token_id is None:
            raise ValueError(f"tokenizer {self.name}: has no {what} token; pass {what}=False")
        return token_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus the specials in BYTE_SPECIALS (see the module docstring)."""

    kind = "bytes"

    def __init__(self):
        self.name = "bytes"
        self.special_tokens = dict(BYTE_SPECIALS)
        self.bos_id, self.eos_id = BYTE_SPECIALS["<s>"], BYTE_SPECIALS["</s>"]
        self.add_bos = True
        self.pad_id = BYTE_SPECIALS["<pad>"]
        self.vocab_size = BYTE_VOCAB_SIZE
        self._names = {i: s for s, i in BYTE_SPECIALS.items()}

    def encode_offsets(self, text):
        def plain(piece):
            b = list(piece.encode("utf-8"))
            return b, [1] * len(b)
        return _encode_with_specials(text, self.special_tokens, plain)

    def decode(self, ids):
        names = {i: self._names.get(i, "") for i in range(256, self.vocab_size)}
        return _decode_with_specials(ids, names, lambda run: bytes(run).decode("utf-8", errors="replace"))

    def token_to_id(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        b = token.encode("utf-8")
        return b[0] if len(b) == 1 else None


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json or built from GGUF metadata)."""

    def __init__(self, tok, name: str, kind: str, bos: str | int | None, eos: str | int | None,
                 chat_template: str | None = None, add_bos: bool | None = None):
        self._tok = tok
        self.name, self.kind, self.chat_template = name, kind, chat_template
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.bos_id = self._resolve(bos, BOS_NAMES)
        self.eos_id = self._resolve(eos, EOS_NAMES)
        if add_bos is None:  # tokenizer.json: does its post-processor put bos in front?
            add_bos = self.bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.add_bos = bool(add_bos)

    def _resolve(self, token, fallback_names):
        if isinstance(token, int):
            return token
        if token is not None:
            return self.token_to_id(token)
        for name in fallback_names:
            if name in self.special_tokens:
                return self.special_tokens[name]
        return None

    def encode_offsets(self, text):
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids):
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token):
        return self._tok.token_to_id(token)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `tokenizer.model` (Llama-2). Control pieces (<s>, </s>) are the specials.

    Note: offsets are rebuilt from piece lengths ("\u2581" = one space byte, byte pieces = one byte),
    exact for identity-normalized models such as Llama-2's; with a normalizing model (NFKC, whitespace
    folding) they are approximate, which only matters for chat label boundaries.
    """

    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.name = path
        self.vocab_size = self._sp.get_piece_size()
        self.special_tokens = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)
                               if self._sp.is_control(i) and self._sp.id_to_piece(i)}
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.add_bos = self.bos_id is not None  # Llama-2 documents start with <s>

    def encode_offsets(self, text):
        def plain(piece):
            ids = self._sp.encode(piece, out_type=int)
            return ids, [1 if self._sp.is_byte(i) else len(self._sp.id_to_piece(i).replace("\u2581", " ").encode())
                         for i in ids]
        return _encode_with_specials(text, self.special_tokens, plain)

    def decode(self, ids):
        # Specials are written out as text, like the other backends (sentencepiece drops control pieces).
        return _decode_with_specials(ids, {i: s for s, i in self.special_tokens.items()}, self._sp.decode)

    def token_to_id(self, token):
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i


def _config_token(value) -> str | None:
    """tokenizer_config.json writes a token as "str" or {"content": "str", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _load_tokenizer_json(path: Path) -> HFTokenizer:
    from tokenizers import Tokenizer as RawTokenizer

    try:
        tok = RawTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
    config, cfg_path = {}, path.parent / "tokenizer_config.json"
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e}); fix or remove it") from None
    return HFTokenizer(tok, str(path), "tokenizer.json", _config_token(config.get("bos_token")),
                       _config_token(config.get("eos_token")), config.get("chat_template"),
                       config.get("add_bos_token"))


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _load_gguf_tokenizer(path: Path) -> HFTokenizer:
    """Byte-level BPE from GGUF metadata (`tokenizer.ggml.model == "gpt2"`), as llama.cpp builds it.

    The vocabulary is already spelled in GPT-2's byte-to-unicode alphabet; merges are "a b" strings;
    token type 3 (CONTROL) marks special tokens, 4 (USER_DEFINED) added non-special ones. The
    pre-tokenizer follows `tokenizer.ggml.pre` as in llama-vocab.cpp: "smollm" (also starcoder,
    refact) = each digit alone, then the GPT-2 regex; "llama-bpe"/"llama3" = the Llama-3 regex;
    anything else = the GPT-2 regex.
    """
    import gguf
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    reader = gguf.GGUFReader(str(path))
    model_kind = _gguf_field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model_kind!r}; only byte-level BPE ('gpt2') GGUF "
                         f"tokenizers are supported, use the model's tokenizer.json or tokenizer.model")
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges = _gguf_field(reader, "tokenizer.ggml.merges") or []
    types = _gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _gguf_field(reader, "tokenizer.ggml.pre") or "default"
    llama3 = pre in ("llama-bpe", "llama3", "llama-v3")
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                       merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=llama3)
    tok = RawTokenizer(model)
    if llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("smollm", "starcoder", "refact"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    return HFTokenizer(tok, str(path), "gguf", _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
                       _gguf_field(reader, "tokenizer.ggml.eos_token_id"),
                       _gguf_field(reader, "tokenizer.chat_template"),
                       bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token")))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """"bytes" -> ByteTokenizer; *.gguf -> embedded BPE; tokenizer.json / tokenizer.model; or a folder
    holding one of those (tokenizer.json preferred)."""
    if str(path) == "bytes":
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: tokenizer not found; pass a tokenizer.json, tokenizer.model, "
                                f".gguf, a folder holding one, or 'bytes'")
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).exists():
                return load_tokenizer(p / name)
        raise FileNotFoundError(f"{p}: folder has no tokenizer.json or tokenizer.model")
    if p.suffix == ".gguf":
        return _load_gguf_tokenizer(p)
    if p.suffix == ".json":
        return _load_tokenizer_json(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer(str(p))
    raise ValueError(f"{p}: unknown tokenizer file type; expected tokenizer.json, tokenizer.model or .gguf")


# ----------------------------------------------------------------------------- chat templates
# Each template renders a conversation as (text, supervised) segments; supervised segments are the
# assistant contents plus their end-of-turn token. The strings match the models' jinja templates.


def _check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: needs role in {ROLES} and string content, got {m!r}")


def render_llama3(messages, add_generation_prompt=False):
    """<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>..."""
    segs = [("<|begin_of_text|>", False)]
    for m in messages:
        segs.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", False))
        segs.append((m["content"].strip() + "<|eot_id|>", m["role"] == "assistant"))
    if add_generation_prompt:
        segs.append(("<|start_header_id|>assistant<|end_header_id|>\n\n", False))
    return segs


def _render_chatml(messages, add_generation_prompt, default_system):
    segs = []
    if default_system is not None and messages and messages[0]["role"] != "system":
        segs.append((f"<|im_start|>system\n{default_system}<|im_end|>\n", False))
    for m in messages:
        segs.append((f"<|im_start|>{m['role']}\n", False))
        segs.append((m["content"] + "<|im_end|>", m["role"] == "assistant"))
        segs.append(("\n", False))
    if add_generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


def render_chatml(messages, add_generation_prompt=False):
    """<|im_start|>{role}\\n{content}<|im_end|>\\n ... (plain ChatML, no default system turn)."""
    return _render_chatml(messages, add_generation_prompt, None)


def render_smollm2(messages, add_generation_prompt=False):
    """ChatML with SmolLM2-Instruct's default system turn when the conversation has none."""
    return _render_chatml(messages, add_generation_prompt, SMOLLM2_DEFAULT_SYSTEM)


def render_llama2(messages, add_generation_prompt=False):
    """<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s><s>[INST] ...

    Roles after an optional system turn must alternate user/assistant. There is no generation prompt:
    the model answers after "[/INST]".
    """
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    segs = []
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError("llama-2 template: roles must alternate user/assistant after the system turn")
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            segs.append((f"<s>[INST] {content.strip()} [/INST]", False))
        else:
            segs.append((" ", False))
            segs.append((f"{content.strip()} </s>", True))
    return segs


CHAT_TEMPLATES: dict[str, Callable] = {
    "llama-3": render_llama3, "llama-2": render_llama2, "chatml": render_chatml, "smollm2": render_smollm2,
}


def chat_template_for(tokenizer: Tokenizer, name: str | None = None) -> str:
    """The template name: `name` if given, else from the tokenizer's special tokens."""
    if name is not None:
        if name not in CHAT_TEMPLATES:
            raise ValueError(f"chat template {name!r} unknown; choose one of {sorted(CHAT_TEMPLATES)}")
        return name
    specials = tokenizer.special_tokens
    if "<|start_header_id|>" in specials:
        return "llama-3"
    if "<|im_start|>" in specials:
        return "smollm2" if SMOLLM2_DEFAULT_SYSTEM in (tokenizer.chat_template or "") else "chatml"
    if tokenizer.kind == "sentencepiece" and "<s>" in specials:
        return "llama-2"
    raise ValueError(f"tokenizer {tokenizer.name}: cannot tell its chat template from its special tokens; "
                     f"pass one of {sorted(CHAT_TEMPLATES)}")


def encode_chat(tokenizer: Tokenizer, messages: list[dict], template: str,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, labels): the rendered conversation tokenized as ONE string (as transformers'
    `apply_chat_template(tokenize=True)` does) and labels[t] = ids[t] on tokens overlapping an
    assistant content or its end-of-turn token, else -100. Labels here are NOT shifted.
    """
    _check_messages(messages)
    segs = CHAT_TEMPLATES[chat_template_for(tokenizer, template)](messages, add_generation_prompt)
    text, supervised, pos = [], [], 0
    for s, sup in segs:
        if sup:
            supervised.append((pos, pos + len(s)))
        text.append(s)
        pos += len(s)
    ids, spans = tokenizer.encode_offsets("".join(text))
    starts = [a for a, _ in supervised]
    labels = []
    for tid, (a, b) in zip(ids, spans):
        k = bisect.bisect_right(starts, max(a, b - 1)) - 1  # last supervised span starting at/before token end
        hit = k >= 0 and a < supervised[k][1] and max(b, a + 1) > supervised[k][0]
        labels.append(tid if hit else IGNORE_INDEX)
    return ids, labels


# ----------------------------------------------------------------------------- readers


@dataclasses.dataclass
class Record:
    """One input record: a plain document (`text`) or a conversation (`messages`)."""

    source: str
    line: int
    text: str | None = None
    messages: list[dict] | None = None


def _utf8_error(path, data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> str:
    line = first_line + data.count(b"\n", 0, err.start)
    return f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x}); re-encode the file as UTF-8"


def _parse_messages(raw, where: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: 'messages' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {i} is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role is None or content is None:
            raise DataError(f"{where}: turn {i} needs 'role' and 'content' (or ShareGPT 'from' and 'value')")
        mapped = SHAREGPT_ROLES.get(role) if isinstance(role, str) else None
        if mapped is None:
            raise DataError(f"{where}: turn {i} has role {role!r}; use one of system, user, assistant")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i} content must be a string")
        out.append({"role": mapped, "content": content})
    if not any(t["role"] == "assistant" for t in out):
        raise DataError(f"{where}: conversation has no assistant turn, so nothing to learn from")
    return out


def _parse_jsonl_line(raw: bytes, path, lineno: int) -> Record | None:
    where = f"{path}:{lineno}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(_utf8_error(path, raw, e, lineno)) from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: broken JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: field 'text' must be a string")
        return Record(str(path), lineno, text=obj["text"])
    for key in ("messages", "conversations"):
        if key in obj:
            return Record(str(path), lineno, messages=_parse_messages(obj[key], where))
    raise DataError(f"{where}: missing field; need 'text', 'messages' or 'conversations'")


def _is_jsonl(path: Path) -> bool:
    return path.suffix == ".jsonl"


def list_files(paths: str | os.PathLike | Iterable) -> list[Path]:
    """Files named, plus text/JSONL files under named folders (recursive, sorted: deterministic)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder")
        if p.is_dir():
            out.extend(f for f in sorted(p.rglob("*"))
                       if f.is_file() and (f.suffix in TEXT_SUFFIXES or _is_jsonl(f)))
        else:
            out.append(p)
    return out


class RecordReader:
    """Stream records from JSONL files (one per line) and plain text files (one document per file).

    on_bad_line="error" raises DataError("file:line: reason"); "skip" skips the record, counts it in
    `n_skipped` and keeps the first messages in `problems`. JSONL is read line by line, so a multi-GB
    file is never held whole.
    """

    def __init__(self, paths, on_bad_line: str = "error"):
        if on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line={on_bad_line!r}; use 'error' or 'skip'")
        self.files = list_files(paths)
        self.on_bad_line = on_bad_line
        self.n_skipped = 0
        self.problems: list[str] = []

    def _bad(self, err: DataError) -> None:
        if self.on_bad_line == "error":
            raise err
        self.n_skipped += 1
        if len(self.problems) < 20:
            self.problems.append(str(err))

    def __iter__(self) -> Iterator[Record]:
        for path in self.files:
            if path.stat().st_size == 0:
                self._bad(DataError(f"{path}:1: file is empty; remove it or give it content"))
                continue
            yield from (self._jsonl(path) if _is_jsonl(path) else self._document(path))

    def _jsonl(self, path: Path) -> Iterator[Record]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    rec = _parse_jsonl_line(raw, path, lineno)
                except DataError as e:
                    self._bad(e)
                    continue
                if rec is not None:
                    yield rec

    def _document(self, path: Path) -> Iterator[Record]:
        if path.stat().st_size > MAX_DOCUMENT_BYTES:
            self._bad(DataError(f"{path}:1: larger than {MAX_DOCUMENT_BYTES >> 20} MB; split it or convert "
                                f"it to JSONL"))
            return
        data = path.read_bytes()
        try:
            yield Record(str(path), 1, text=data.decode("utf-8"))
        except UnicodeDecodeError as e:
            self._bad(DataError(_utf8_error(path, data, e)))


# ----------------------------------------------------------------------------- sequence builders


def _sample(tokens: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    """ctx + 1 tokens (and their unshifted labels) -> shifted sample of ctx positions."""
    return {"input_ids": torch.tensor(tokens[:-1], dtype=torch.long),  # (T,)
            "labels": torch.tensor(labels[1:], dtype=torch.long)}  # (T,)


class Packer:
    """Concatenate documents, each followed by EOS, and cut chunks of exactly ctx + 1 tokens.

    Chunks do not overlap: every token of the stream lands in exactly one chunk; a chunk's first
    token is an input only (its own target sat in the previous chunk's unused slot), which costs one
    target in ctx + 1 and keeps counting simple. Every token is supervised, EOS included; attention is
    not masked across documents (the usual packing trade-off). The final partial chunk is dropped and
    counted in `dropped_tokens`.
    """

    def __init__(self, ctx: int, eos_id: int):
        if ctx < 1:
            raise ValueError(f"ctx={ctx}; must be >= 1")
        self.ctx, self.eos_id = ctx, eos_id
        self.buf: list[int] = []
        self.start = 0  # buf[:start] is already packed (cut once per add, not once per chunk: O(n) not O(n^2))
        self.n_tokens = 0  # tokens entering the stream (documents + EOS)
        self.n_sequences = 0

    def add(self, ids: list[int]) -> Iterator[dict[str, torch.Tensor]]:
        del self.buf[:self.start]
        self.start = 0
        self.buf.extend(ids)
        self.buf.append(self.eos_id)
        self.n_tokens += len(ids) + 1
        n = self.ctx + 1
        while len(self.buf) - self.start >= n:
            chunk = self.buf[self.start:self.start + n]
            self.start += n
            self.n_sequences += 1
            yield _sample(chunk, chunk)

    @property
    def dropped_tokens(self) -> int:
        return len(self.buf) - self.start


def pack_documents(token_docs: Iterable[list[int]], ctx: int, eos_id: int,
                   stats: dict | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Samples of exactly ctx positions from packed documents (see Packer). `stats`, if given, receives
    n_sequences, n_tokens and dropped_tokens when the stream ends."""
    packer = Packer(ctx, eos_id)
    for ids in token_docs:
        yield from packer.add(ids)
    if stats is not None:
        stats.update(n_sequences=packer.n_sequences, n_tokens=packer.n_tokens,
                     dropped_tokens=packer.dropped_tokens)


def chat_sample(ids: list[int], labels: list[int], ctx: int, truncate: bool = False
                ) -> dict[str, torch.Tensor] | None:
    """One conversation -> one sample of len(ids) - 1 <= ctx positions (no padding), or None when it
    is longer and truncate=False. Truncation keeps the first ctx + 1 tokens."""
    if len(ids) > ctx + 1:
        if not truncate:
            return None
        ids, labels = ids[:ctx + 1], labels[:ctx + 1]
    return _sample(ids, labels)


def chat_sequences(chats: Iterable[tuple[list[int], list[int]]], ctx: int, truncate: bool = False,
                   stats: dict | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """One sample per (ids, labels) conversation; `stats` gets n_sequences, n_dropped, n_truncated."""
    counts = dict(n_sequences=0, n_dropped=0, n_truncated=0)
    for ids, labels in chats:
        s = chat_sample(ids, labels, ctx, truncate)
        if s is None:
            counts["n_dropped"] += 1
            continue
        counts["n_truncated"] += len(ids) > ctx + 1
        counts["n_sequences"] += 1
        yield s
    if stats is not None:
        stats.update(counts)


def file_samples(paths, tokenizer: Tokenizer, ctx: int, template: str | None = None,
                 truncate: bool = False, on_bad_line: str = "error") -> Iterator[dict[str, torch.Tensor]]:
    """Samples from files in order: text records are packed ([bos if tokenizer.add_bos] + text, EOS after
    each document), chat
    records become one sample each (template from the tokenizer unless named)."""
    packer = Packer(ctx, tokenizer._required(tokenizer.eos_id, "eos"))
    for rec in RecordReader(paths, on_bad_line):
        if rec.text is not None:
            yield from packer.add(tokenizer.encode(rec.text, bos=tokenizer.add_bos))
            continue
        tpl = chat_template_for(tokenizer, template)
        s = chat_sample(*encode_chat(tokenizer, rec.messages, tpl), ctx, truncate)
        if s is not None:
            yield s


# ----------------------------------------------------------------------------- mixtures


def parse_data_spec(spec: str) -> list[tuple[str, float]]:
    """"long.jsonl:0.6,short.jsonl:0.4" -> [(path, weight), ...], weights normalized to sum 1.
    A missing weight means 1; the weight is whatever follows the LAST ':' if it parses as a number."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path, _, w = part.rpartition(":")
        try:
            weight = float(w) if path else 1.0
        except ValueError:
            path, weight = part, 1.0
        path = path or part
        if not weight > 0:
            raise ValueError(f"data spec {part!r}: weight must be > 0")
        if not Path(path).exists():
            raise FileNotFoundError(f"data spec {part!r}: {path} not found")
        out.append((path, weight))
    if not out:
        raise ValueError(f"data spec {spec!r} is empty; write path:weight,path:weight")
    total = sum(w for _, w in out)
    return [(p, w / total) for p, w in out]


@dataclasses.dataclass
class Source:
    """A named, weighted sample stream. `open(epoch)` must return the same sequence for the same epoch."""

    name: str
    weight: float
    open: Callable[[int], Iterator[dict]]


def _shuffled(it: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Streaming shuffle with a buffer of `buffer` items (0 or 1 = unchanged order)."""
    if buffer <= 1:
        yield from it
        return
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= buffer:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


class Mixture:
    """Interleave sources so that each receives its WEIGHT's share of TOKENS (not samples).

    Schedule (deterministic stride scheduling): the next sample comes from the source with the least
    emitted_tokens_i / weight_i (ties to the lower index), so after N tokens every source is within
    one sample of weight_i * N. The seed drives each source's shuffle buffer, re-seeded per
    (seed, source, epoch). A source that runs out starts its next epoch (cycle=True, the default;
    the stream is then infinite) or ends the whole mixture (cycle=False, so proportions stay honest).

    Sharding: the global stream is numbered 0, 1, 2, ...; rank r gets samples i with
    i % world_size == r, so ranks are disjoint and together give the single-rank stream.

    Resume: `state_dict()` holds the global index and each source's (epoch, consumed samples, tokens).
    `load_state_dict()` reopens each source at its epoch and skips the consumed samples.

    Note: every rank reads and tokenizes the whole global stream and resuming replays each source's
    current epoch up to the cursor. Tokenizing is cheap next to a training step at long context, and
    this keeps the cursor tiny and exact; pre-tokenize very large sources if it ever is not.
    """

    def __init__(self, sources: list[Source], seed: int = 0, rank: int = 0, world_size: int = 1,
                 cycle: bool = True, shuffle_buffer: int = 64):
        if not sources:
            raise ValueError("mixture needs at least one source")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if any(not s.weight > 0 for s in sources):
            raise ValueError("every source weight must be > 0")
        self.sources, self.seed, self.rank, self.world_size = sources, seed, rank, world_size
        self.cycle, self.shuffle_buffer = cycle, shuffle_buffer
        self.index = 0
        self.state = [dict(epoch=0, consumed=0, tokens=0) for _ in sources]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "index": self.index, "sources": [dict(s) for s in self.state],
                "names": [s.name for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        names = [s.name for s in self.sources]
        if state.get("names") != names or state.get("seed") != self.seed:
            raise ValueError(f"mixture state is for sources {state.get('names')} seed {state.get('seed')}, "
                             f"not {names} seed {self.seed}; resume with the same --data and --seed")
        self.index = int(state["index"])
        self.state = [dict(s) for s in state["sources"]]

    def _open(self, i: int) -> Iterator[dict]:
        st = self.state[i]
        rng = random.Random(f"{self.seed}:{i}:{st['epoch']}")
        it = _shuffled(iter(self.sources[i].open(st["epoch"])), self.shuffle_buffer, rng)
        for _ in range(st["consumed"]):
            if next(it, None) is None:
                raise ValueError(f"source {self.sources[i].name}: shorter than the saved cursor; "
                                 f"the data changed since the checkpoint")
        return it

    def __iter__(self) -> Iterator[dict]:
        its = [self._open(i) for i in range(len(self.sources))]
        while True:
            i = min(range(len(self.sources)), key=lambda k: (self.state[k]["tokens"] / self.sources[k].weight, k))
            st = self.state[i]
            sample = next(its[i], None)
            if sample is None:
                if not self.cycle:
                    return
                st["epoch"], st["consumed"] = st["epoch"] + 1, 0
                its[i] = self._open(i)
                sample = next(its[i], None)
                if sample is None:
                    raise ValueError(f"source {self.sources[i].name}: yields no samples")
            st["consumed"] += 1
            st["tokens"] += int(sample["input_ids"].numel())
            index, self.index = self.index, self.index + 1
            if index % self.world_size == self.rank:
                yield sample


def build_mixture(spec: str, tokenizer: Tokenizer, ctx: int, template: str | None = None, seed: int = 0,
                  rank: int = 0, world_size: int = 1, cycle: bool = True, truncate: bool = False,
                  on_bad_line: str = "error") -> Mixture:
    """The trainer's entry point: a Mixture of file sources from a `path:weight,...` spec."""
    sources = [Source(path, w, lambda epoch, p=path: file_samples(p, tokenizer, ctx, template, truncate,
                                                                  on_bad_line))
               for path, w in parse_data_spec(spec)]
    return Mixture(sources, seed=seed, rank=rank, world_size=world_size, cycle=cycle)


# ----------------------------------------------------------------------------- synthetic long data
# Llama-3-80K's recipe (Single-Detail QA, Multi-Detail QA, summarization) made verifiable without a
# generator: templated facts are inserted into real documents at recorded line boundaries.


def _read_doc_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError as e:
        raise DataError(_utf8_error(path, data, e)) from None


class _DocLines:
    """Lines of the synth documents, read lazily and cached, with per-line token counts."""

    def __init__(self, files: list[Path], tokenizer: Tokenizer):
        self.files = [f for f in files if f.stat().st_size > 0]  # an empty file has nothing to read
        if not self.files:
            raise ValueError("synth: the --docs hold no non-empty files")
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[list[str], list[int]]] = {}

    def file(self, i: int) -> tuple[list[str], list[int]]:
        if i not in self._cache:
            lines = _read_doc_lines(self.files[i])
            self._cache[i] = (lines, [len(self.tokenizer.encode(s)) for s in lines])
        return self._cache[i]

    def take(self, start_file: int, budget: int) -> list[tuple[int, int, str, int]]:
        """(file index, line number, text, tokens) for whole lines from start_file on, wrapping over
        the files once, until `budget` tokens are collected."""
        out, total = [], 0
        for k in range(len(self.files)):
            fi = (start_file + k) % len(self.files)
            lines, counts = self.file(fi)
            for ln, (text, n) in enumerate(zip(lines, counts), start=1):
                out.append((fi, ln, text, n))
                total += n
                if total >= budget:
                    return out
        raise ValueError(f"synth: the documents hold only {total} tokens, fewer than the {budget} a sample "
                         f"needs; add documents or lower --ctx")


def _facts(kind: str, rng: random.Random) -> tuple[list[dict], str, list[str]]:
    """(facts, question, answer_lines) for one templated sample; facts are in order of appearance."""
    def needle(name):
        word = rng.choice(SYNTH_WORDS)
        return dict(type="needle", key=name, value=word, text=f"The secret word of {name} is {word}.")

    def record():
        key, value = f"{rng.getrandbits(32):08x}", f"{rng.getrandbits(32):08x}"
        return dict(type="record", key=key, value=value, text=f"Record {key}: {value}.")

    if kind == "single":
        what = rng.choice(("needle", "passkey", "record"))
        if what == "needle":
            f = needle(rng.choice(SYNTH_NAMES))
            return [f], f"What is the secret word of {f['key']}?", [f["text"]]
        if what == "passkey":
            n = str(rng.randrange(10000, 100000))
            f = dict(type="passkey", key="pass key", value=n, text=f"The pass key is {n}. Remember it. {n} is the pass key.")
            return [f], "What is the pass key?", [f"The pass key is {n}."]
        f = record()
        return [f], f"What is the value of record {f['key']}?", [f"The value of record {f['key']} is {f['value']}."]
    if kind == "multi":
        facts = [needle(name) for name in rng.sample(SYNTH_NAMES, rng.randint(3, 5))]
        asked = sorted(rng.sample(range(len(facts)), rng.randint(2, 3)))
        names = [facts[i]["key"] for i in asked]
        q = f"What are the secret words of {', '.join(names[:-1])} and {names[-1]}?"
        return facts, q, [facts[i]["text"] for i in asked]
    if kind == "summary":
        facts = [record() for _ in range(rng.randint(4, 8))]
        q = "List every record in the document in order of appearance, one per line as `key: value`."
        return facts, q, [f"{f['key']}: {f['value']}" for f in facts]
    raise ValueError(f"synth kind {kind!r} unknown; choose from {SYNTH_KINDS}")


def insert_at_lines(doc: str, texts: list[str], depths: list[float]) -> tuple[str, list[int]]:
    """Insert each text as its own line at the first line boundary at or after depth * len(doc).

    `depths` must be sorted. Returns the new document and each text's character offset in it.
    """
    if doc and not doc.endswith("\n"):
        doc += "\n"
    starts = [0] + [i + 1 for i, c in enumerate(doc) if c == "\n"]  # line starts (last = len(doc))
    pieces, offsets, prev, shift = [], [], 0, 0
    for text, d in zip(texts, depths):
        pos = starts[min(bisect.bisect_left(starts, d * len(doc)), len(starts) - 1)]
        pieces.append(doc[prev:pos])
        offsets.append(pos + shift)
        pieces.append(text + "\n")
        shift += len(text) + 1
        prev = pos
    pieces.append(doc[prev:])
    return "".join(pieces), offsets


def parse_qa(text: str) -> tuple[str, str] | None:
    """("question", "answer") from a generator's reply "Question: ...\\nAnswer: ..." (markdown bold,
    'Q:'/'A:' and extra text tolerated), or None."""
    clean = text.replace("**", "").replace("__", "")
    m = re.search(r"(?:^|\n)\s*(?:#+\s*)?(?:question|q)\s*\d*\s*[:：]\s*(.+?)\s*\n\s*(?:#+\s*)?(?:answer|a)\s*\d*"
                  r"\s*[:：]\s*(.+?)\s*(?:\n\s*\n|\n\s*(?:question|q)\s*\d*\s*[:：]|$)", clean, re.I | re.S)
    if m is None or not m.group(1).strip() or not m.group(2).strip():
        return None
    return m.group(1).strip(), m.group(2).strip()


def parse_summary(text: str) -> str | None:
    s = re.sub(r"^\s*(?:\*\*)?summary(?:\*\*)?\s*[:：]\s*", "", text.strip(), flags=re.I).strip()
    return s or None


def _chunks(lines: list[tuple[int, int, str, int]], n: int, chunk_tokens: int, rng: random.Random
            ) -> list[tuple[int, int]]:
    """n non-overlapping runs [a, b) of line indices of about chunk_tokens tokens, in document order."""
    runs, a, acc = [], 0, 0
    for i, (_, _, _, t) in enumerate(lines):
        acc += t
        if acc >= chunk_tokens:
            runs.append((a, i + 1))
            a, acc = i + 1, 0
    if len(runs) < n:
        raise ValueError(f"synth: span too short for {n} chunks of {chunk_tokens} tokens; raise --ctx")
    return sorted(rng.sample(runs, n))


def synth_sample(docs: _DocLines, tokenizer: Tokenizer, template: str, ctx: int, kind: str, seed: int,
                 index: int, generate_text: Callable[[str], str] | None = None, generator_name: str | None = None,
                 chunk_tokens: int = 2048) -> dict | None:
    """One long chat sample of at most ctx tokens (None if the generator's replies could not be parsed).

    The user turn is the document span followed by the question(s); the assistant turn is the
    answer(s). The span is whole lines from the start of a seeded-random file onward (continuing into the
    next files), trimmed from the end until the whole chat fits ctx tokens.
    Without a generator, facts are inserted as their own lines at line boundaries at the recorded depths.
    `meta` (for auditing): kind, generator, seed, index, template, tokenizer, sources (file, first_line,
    last_line), document_chars (the span's length in the user content), n_tokens, and either
    facts (text, key, value, char_offset in the content, depth in [0, 1]) + answer_values, or
    chunks (char_start, char_end, depth, last_line_index, the generator's raw reply).
    """
    rng = random.Random(f"{seed}:{index}")
    start_file = rng.randrange(len(docs.files))
    meta = dict(kind=kind, generator=generator_name, seed=seed, index=index, template=template,
                tokenizer=tokenizer.name)
    if generate_text is None:
        facts, question, answer_lines = _facts(kind, rng)
        depths = sorted(round(rng.uniform(0.05, 0.95), 4) for _ in facts)
    overhead = len(encode_chat(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}],
                               template)[0])
    budget = ctx - overhead - (512 if generate_text is None else 2048)  # Q/A headroom; trimmed exactly below
    lines = docs.take(start_file, budget)
    if generate_text is not None:  # chunks come from the first 90% so trimming the tail keeps them
        got = _generated_qa(lines[:len(lines) * 9 // 10], kind, rng, generate_text, min(chunk_tokens, budget // 8))
        if got is None:
            return None
        question, answer_lines, meta["chunks"] = got
        last_chunk_line = max(c["last_line_index"] for c in meta["chunks"])
    for _ in range(64):
        doc = "".join(t for _, _, t, _ in lines)
        if generate_text is None:
            doc, offsets = insert_at_lines(doc, [f["text"] for f in facts], depths)
            meta["facts"] = [dict(f, char_offset=o, depth=d) for f, o, d in zip(facts, offsets, depths)]
            meta["answer_values"] = [f["value"] for f in facts]
        elif len(lines) <= last_chunk_line:
            return None
        content = f"{doc}\n{question}"
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "\n".join(answer_lines)}]
        n_tokens = len(encode_chat(tokenizer, messages, template)[0])
        if n_tokens <= ctx:
            break
        excess, cut = n_tokens - ctx + 8, 0
        while cut < excess and len(lines) > 1:
            cut += lines.pop()[3]
    else:
        raise ValueError(f"synth: could not fit sample {index} into ctx={ctx}")
    spans = {}
    for fi, ln, _, _ in lines:
        a, b = spans.get(fi, (ln, ln))
        spans[fi] = (min(a, ln), max(b, ln))
    meta["sources"] = [dict(file=str(docs.files[fi]), first_line=a, last_line=b) for fi, (a, b) in spans.items()]
    meta["document_chars"] = len(doc)
    meta["n_tokens"] = n_tokens
    return {"messages": messages, "meta": meta}


def _generated_qa(lines, kind, rng, generate_text, chunk_tokens):
    """Ask the generator about chunks it alone sees; returns (question, answer_lines, chunk records)."""
    n = {"single": 1, "multi": rng.randint(2, 3), "summary": rng.randint(2, 4)}[kind]
    runs = _chunks(lines, n, chunk_tokens, rng)
    starts = [0]
    for _, _, t, _ in lines:
        starts.append(starts[-1] + len(t))
    questions, answers, records = [], [], []
    for a, b in runs:
        chunk = "".join(t for _, _, t, _ in lines[a:b])
        prompt = (SUMMARY_PROMPT if kind == "summary" else QA_PROMPT).format(chunk=chunk)
        reply = generate_text(prompt)
        parsed = parse_summary(reply) if kind == "summary" else parse_qa(reply)
        if parsed is None:
            return None
        records.append(dict(char_start=starts[a], char_end=starts[b], depth=round(starts[a] / starts[-1], 4),
                            last_line_index=b - 1, reply=reply))
        if kind == "summary":
            answers.append(parsed)
        else:
            questions.append(parsed[0])
            answers.append(parsed[1])
    if kind == "summary":
        firsts = [repr(lines[a][2].strip()[:60]) for a, _ in runs]
        q = ("Summarize, in order, the parts of the document beginning with these lines:\n" +
             "\n".join(f"{i + 1}. {f}" for i, f in enumerate(firsts)))
    elif len(questions) == 1:
        q = questions[0]
    else:
        q = "Answer each question:\n" + "\n".join(f"{i + 1}. {x}" for i, x in enumerate(questions))
    answer_lines = answers if len(answers) == 1 else [f"{i + 1}. {x}" for i, x in enumerate(answers)]
    return q, answer_lines, records


def model_generate_text(model_path: str, tokenizer: Tokenizer, template: str | None = None,
                        max_new_tokens: int = 256) -> Callable[[str], str]:
    """generate_text(prompt) backed by model.py (imported here, lazily: data.py works without it).

    The model's own tokenizer is used when `model_path` holds one, else `tokenizer` (e.g. a preset).
    """
    from model import generate, load_model

    model = load_model(model_path, dtype=torch.float32, device="cpu")
    try:
        tok = load_tokenizer(model_path)
    except (ValueError, FileNotFoundError):
        tok = tokenizer
    template = chat_template_for(tok, template)
    stops = [i for i in (tok.eos_id, tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|im_end|>")) if i is not None]

    def generate_text(prompt: str) -> str:
        ids, _ = encode_chat(tok, [{"role": "user", "content": prompt}], template, add_generation_prompt=True)
        new = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=stops)
        return tok.decode([t for t in new if t not in stops])

    return generate_text


def _atomic_jsonl(out: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows to a temporary file next to `out`, rename into place; nothing is left on error."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return n


def synth(docs, tokenizer: Tokenizer, ctx: int, kinds: list[str], out, n: int, seed: int = 0,
          template: str | None = None, generate_text: Callable[[str], str] | None = None,
          generator_name: str | None = None) -> dict:
    """Write n long chat samples (kinds cycled) to `out` as JSONL; returns counts."""
    for k in kinds:
        if k not in SYNTH_KINDS:
            raise ValueError(f"--kinds: {k!r} unknown; choose from {','.join(SYNTH_KINDS)}")
    if ctx < 1024:
        raise ValueError(f"--ctx {ctx}: synth needs at least 1024 tokens per sample")
    template = chat_template_for(tokenizer, template)
    lines = _DocLines(list_files(docs), tokenizer)
    counts = dict(written=0, failed=0)

    def rows():
        for i in range(n):
            s = synth_sample(lines, tokenizer, template, ctx, kinds[i % len(kinds)], seed, i, generate_text,
                             generator_name)
            counts["failed"] += s is None
            if s is not None:
                yield s

    counts["written"] = _atomic_jsonl(out, rows())
    return counts


# ----------------------------------------------------------------------------- stats


def token_stats(path, tokenizer: Tokenizer, template: str | None = None, on_bad_line: str = "error") -> dict:
    """Per-record token lengths and supervised-token counts (text: all tokens; chat: assistant tokens)."""
    lengths, supervised = [], 0
    reader = RecordReader(path, on_bad_line)
    for rec in reader:
        if rec.text is not None:
            n = len(tokenizer.encode(rec.text))
            lengths.append(n)
            supervised += n
        else:
            ids, labels = encode_chat(tokenizer, rec.messages, chat_template_for(tokenizer, template))
            lengths.append(len(ids))
            supervised += sum(lab != IGNORE_INDEX for lab in labels)
    return dict(lengths=lengths, tokens=sum(lengths), supervised=supervised, skipped=reader.n_skipped)


def format_stats(stats: dict) -> str:
    lengths = stats["lengths"]
    if not lengths:
        return "0 records"
    buckets: dict[int, int] = {}
    for n in lengths:
        buckets[max(n, 1).bit_length() - 1] = buckets.get(max(n, 1).bit_length() - 1, 0) + 1
    top = max(buckets.values())
    rows = [f"records {len(lengths)}  tokens {stats['tokens']}  supervised {stats['supervised']} "
            f"({stats['supervised'] / max(stats['tokens'], 1):.1%})  min {min(lengths)}  max {max(lengths)}  "
            f"mean {stats['tokens'] / len(lengths):.0f}  skipped {stats['skipped']}"]
    for k in sorted(buckets):
        rows.append(f"  [{2**k:>8}, {2**(k + 1):>8})  {buckets[k]:>7}  {'#' * max(1, round(40 * buckets[k] / top))}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data.py", description="Long-context data tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write verifiable long chat samples from long documents")
    s.add_argument("--docs", nargs="+", required=True, help="documents: files and/or folders")
    s.add_argument("--tokenizer", required=True, help="tokenizer.json, tokenizer.model, .gguf or 'bytes'")
    s.add_argument("--ctx", type=int, required=True, help="tokens per sample (upper bound)")
    s.add_argument("--kinds", default="single,multi,summary")
    s.add_argument("--out", required=True)
    s.add_argument("--generator", default=None, help="model for model.load_model; omit for templated facts")
    s.add_argument("--template", default=None, help=f"chat template, one of {sorted(CHAT_TEMPLATES)}")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n", type=int, default=8, help="number of samples (kinds cycled)")
    t = sub.add_parser("stats", help="token-length histogram and supervised-token counts")
    t.add_argument("file")
    t.add_argument("--tokenizer", required=True)
    t.add_argument("--template", default=None)
    t.add_argument("--on-bad-line", choices=("error", "skip"), default="error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        if args.cmd == "synth":
            gen = model_generate_text(args.generator, tokenizer, args.template) if args.generator else None
            counts = synth(args.docs, tokenizer, args.ctx, [k.strip() for k in args.kinds.split(",") if k.strip()],
                           args.out, args.n, args.seed, args.template, gen, args.generator)
            print(f"wrote {counts['written']} samples to {args.out} ({counts['failed']} failed to parse)")
        else:
            print(format_stats(token_stats(args.file, tokenizer, args.template, args.on_bad_line)))
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
