"""Tokenizers and chat templates: text <-> token ids, conversations -> (ids, labels).

Backends behind one `Tokenizer` interface: Hugging Face tokenizer.json (the `tokenizers` package),
SentencePiece tokenizer.model, the byte-level BPE embedded in a GGUF file (rebuilt as llama.cpp builds
it, gguf_read.read_gguf_tokenizer), and a file-free byte tokenizer for tests and the demo.

Token ids of ByteTokenizer:
    0..255 the bytes of the UTF-8 text, 256 <s> (bos), 257 </s> (eos), 258 <pad>,
    259 <|im_start|>, 260 <|im_end|> (so ChatML works), 261..263 reserved; vocab_size 264
    (a multiple of 8, which keeps the embedding/LM-head matmuls aligned).

Chat templates render a conversation as (text, supervised) segments whose strings match the models'
jinja templates (Llama-3, Llama-2, ChatML, SmolLM2); `encode_chat` turns them into ids and labels with
only the assistant turns (and their end-of-turn token) supervised:
    labels[t] = ids[t + 1] if token t + 1 lies in an assistant segment, else IGNORE_INDEX  (already shifted).
"""
from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from checkpoint import copy_tokenizer_files
from errors import UserError
from gguf_read import GPT2_SPLIT, LLAMA3_SPLIT, read_gguf_tokenizer
from outputs import atomic_write_text

# ----------------------------------------------------------------------------- constants

IGNORE_INDEX = -100  # label value of an unsupervised position (torch.nn.functional.cross_entropy default)

BYTE_SPECIALS = {"<s>": 256, "</s>": 257, "<pad>": 258, "<|im_start|>": 259, "<|im_end|>": 260}
BYTE_VOCAB_SIZE = 264
# How a model folder records the byte tokenizer (it has no vocabulary file): tokenizer_config.json with
# this tokenizer_class, as Hugging Face names a vocabulary-free tokenizer (ByT5) by its class alone.
TOKENIZER_CONFIG = "tokenizer_config.json"
BYTE_TOKENIZER_CLASS = "bytes"

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")

ROLES = ("system", "user", "assistant")

# SmolLM2-Instruct's template adds this system turn when the conversation has none.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

PIECE_CHARS = 2**18  # texts longer than this are encoded piece by piece where that cannot change the ids
WORD_END = re.compile(r"(?<=[^\W_])\s")  # a whitespace character after a letter or digit: a safe cut

# ----------------------------------------------------------------------------- tokenizers


def word_end_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut before a whitespace character that follows a
    letter or digit (WORD_END): the last such place within `size`, else the first after it.

    Note: the GPT-2 and Llama-3 pre-tokenizer regexes (GPT2_SPLIT, LLAMA3_SPLIT) end a word's or number's
    pre-token at its last character and start the next one at the whitespace, so a byte-level BPE without a
    normalizer gives the same ids for the pieces as for the whole text (tested); so do the byte tokenizer's
    specials, which hold no whitespace. tokenizers' Encoding of one text costs ~700 bytes per token
    (measured: 2.4 GB for 3.5M tokens of a 22 MB line): pieces of PIECE_CHARS bound it (tests/test_data.py).
    """
    out, start = [], 0
    while len(text) - start > size:
        last = None
        for last in WORD_END.finditer(text, start + 1, start + size + 1):
            pass
        last = last or WORD_END.search(text, start + size)
        if last is None:
            break
        out.append(text[start:last.start()])
        start = last.start()
    return out + [text[start:]]


def _byte_level_state(pre_tokenizer, normalizer) -> bool:
    """The tokenizers pre-tokenizer is one word_end_pieces keeps exact: GPT-2's or Llama-3's regex, digits
    split or not, and no normalizer."""
    state = json.loads(pre_tokenizer.__getstate__()) if pre_tokenizer is not None and normalizer is None else {}
    parts = state.get("pretokenizers", [state]) if state.get("type") == "Sequence" else [state]
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]  # one regex only:
    splits += ["GPT2"] * sum(p.get("type") == "ByteLevel" and bool(p.get("use_regex")) for p in parts)  # its own
    return all(p.get("type") in ("Digits", "ByteLevel", "Split") for p in parts) and splits in (
        [GPT2_SPLIT], [LLAMA3_SPLIT], ["GPT2"])


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
    piecewise: bool = False  # whether word_end_pieces keep this tokenizer's ids (encode_pieces)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def encode_ids(self, text: str) -> list[int]:
        """The ids of encode_offsets without the spans (backends override it to skip forming them: a span is
        a tuple per token, ~20x the memory of the text it covers)."""
        return self.encode_offsets(text)[0]

    def encode_pieces(self, text: str, bos: bool = False) -> Iterator[list[int]]:
        """encode(text, bos) as consecutive lists of ids, one per word_end_pieces piece where that keeps the ids:
        a long text never exists whole as a list of Python ints (up to 36 bytes a token)."""
        if bos:
            yield [self._required(self.bos_id, "bos")]
        for piece in word_end_pieces(text) if self.piecewise else [text]:
            yield self.encode_ids(piece)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.encode_ids(text)
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
    piecewise = True

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

    def encode_ids(self, text):
        return [i for a, b, sid in _split_specials(text, self.special_tokens)
                for i in ([sid] if sid is not None else text[a:b].encode("utf-8"))]

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
        self.piecewise = _byte_level_state(tok.pre_tokenizer, tok.normalizer)

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

    def encode_ids(self, text):
        if len(text) <= PIECE_CHARS or not self.piecewise:
            return self._tok.encode(text, add_special_tokens=False).ids
        return [i for piece in word_end_pieces(text) for i in self._tok.encode(piece, add_special_tokens=False).ids]

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

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:  # sentencepiece reports a corrupt file as RuntimeError
            raise UserError(f"{path}: not a readable SentencePiece tokenizer.model ({e})") from None
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
        raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None
    config, cfg_path = {}, path.parent / "tokenizer_config.json"
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg_path}: not valid JSON ({e}); fix or remove it") from None
        if not isinstance(config, dict):
            raise UserError(f"{cfg_path}: holds a JSON {type(config).__name__}, not an object; fix or remove it")
    return HFTokenizer(tok, str(path), "tokenizer.json", _config_token(config.get("bos_token")),
                       _config_token(config.get("eos_token")), config.get("chat_template"),
                       config.get("add_bos_token"))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """"bytes" -> ByteTokenizer; *.gguf -> embedded BPE; tokenizer.json / tokenizer.model; or a folder
    holding one of those (tokenizer.json preferred)."""
    if str(path) == "bytes":
        return ByteTokenizer()
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: tokenizer not found; pass a tokenizer.json, tokenizer.model, "
                                f".gguf, a folder holding one, or 'bytes'")
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).exists():
                return load_tokenizer(p / name)
        if records_byte_tokenizer(p):
            return ByteTokenizer()
        raise UserError(f"{p}: folder has no tokenizer.json, tokenizer.model or byte-level {TOKENIZER_CONFIG}; "
                        "pass --tokenizer")
    if p.suffix == ".gguf":
        tok, v = read_gguf_tokenizer(p)
        return HFTokenizer(tok, str(p), "gguf", v["bos_id"], v["eos_id"], v["chat_template"], v["add_bos"])
    if p.suffix == ".json":
        return _load_tokenizer_json(p)
    if p.suffix == ".model":
        return SentencePieceTokenizer(str(p))
    raise UserError(f"{p}: unknown tokenizer file type; expected tokenizer.json, tokenizer.model or .gguf")


def records_byte_tokenizer(folder: Path) -> bool:
    """The folder's tokenizer_config.json names the byte tokenizer (see save_tokenizer)."""
    path = folder / TOKENIZER_CONFIG
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix or remove it") from None
    return isinstance(config, dict) and config.get("tokenizer_class") == BYTE_TOKENIZER_CLASS


def save_tokenizer(spec: str | os.PathLike, folder: str | os.PathLike) -> list[str]:
    """Record the tokenizer `spec` (what load_tokenizer takes) in a model folder, so that
    load_tokenizer(folder) finds it; returns the file names written.

    "bytes" -> tokenizer_config.json {"tokenizer_class": "bytes", bos/eos names}; a folder -> its tokenizer
    files copied; a tokenizer.json / tokenizer.model file -> it and its folder's tokenizer_config.json;
    a .gguf -> nothing (its tokenizer lives inside the .gguf).
    """
    folder = Path(folder)
    if str(spec) == "bytes":
        record = {"tokenizer_class": BYTE_TOKENIZER_CLASS, "bos_token": "<s>", "eos_token": "</s>",
                  "vocab_size": BYTE_VOCAB_SIZE}
        atomic_write_text(folder / TOKENIZER_CONFIG, json.dumps(record, indent=2) + "\n")
        return [TOKENIZER_CONFIG]
    src = Path(spec)
    if src.is_dir():
        return copy_tokenizer_files(src, folder)
    if src.name in ("tokenizer.json", "tokenizer.model"):
        return copy_tokenizer_files(src.parent, folder, (src.name, TOKENIZER_CONFIG))
    return []


# ----------------------------------------------------------------------------- chat templates
# Each template renders a conversation as (text, supervised) segments; supervised segments are the
# assistant contents plus their end-of-turn token. The strings match the models' jinja templates.


def _check_messages(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"messages[{i}]: needs role in {ROLES} and string content, got {m!r}")


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
            raise UserError("llama-2 template: roles must alternate user/assistant after the system turn")
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
# The special tokens each template writes: a tokenizer without them would read them as plain text.
TEMPLATE_SPECIALS = {"llama-3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                     "llama-2": ("<s>", "</s>"), "chatml": ("<|im_start|>", "<|im_end|>"),
                     "smollm2": ("<|im_start|>", "<|im_end|>")}


def chat_template_for(tokenizer: Tokenizer, name: str | None = None) -> str:
    """The template name: `name` if given (refused when the tokenizer lacks one of its special tokens), else
    from the tokenizer's special tokens."""
    if name is not None:
        if name not in CHAT_TEMPLATES:
            raise UserError(f"chat template {name!r} unknown; choose one of {sorted(CHAT_TEMPLATES)}")
        missing = [t for t in TEMPLATE_SPECIALS[name] if t not in tokenizer.special_tokens]
        if missing:
            raise UserError(f"chat template {name!r}: tokenizer {tokenizer.name} has no special token {missing[0]}, so "
                            f"the template would be plain text; use the model's own template (omit the flag)")
        return name
    specials = tokenizer.special_tokens
    if "<|start_header_id|>" in specials:
        return "llama-3"
    if "<|im_start|>" in specials:
        return "smollm2" if SMOLLM2_DEFAULT_SYSTEM in (tokenizer.chat_template or "") else "chatml"
    if tokenizer.kind == "sentencepiece" and "<s>" in specials:
        return "llama-2"
    raise UserError(f"tokenizer {tokenizer.name}: cannot tell its chat template from its special tokens; "
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
