"""Evaluation tasks as text: prompt builders with a known answer, and their scorers. No model here.

    passkey  a 5-digit key hidden in repeated filler at a depth (Mohtashami & Jaggi 2023, "Landmark
             Attention"; Chen et al. 2023, "Position Interpolation", sec. 3.3); exact match of the digits.
    needle   a sentence hidden at a sentence boundary of real text ("needle in a haystack", Kamradt 2023);
             exact substring match and ROUGE-L recall R = LCS(pred, ref) / |ref| on lowercase words
             (Lin 2004, sec. 3.1).
    kv       a JSON object of random UUID pairs; ask for one key's value at each depth (Liu et al. 2023,
             "Lost in the Middle", sec. 4); exact match.
    code passkey  the built-in demo's retrieval probe, in bytes: BOS + held-out Python standard library
             code with one fact line `K$NNNN` at a line start at depth U(0, 0.9) + more code + the query
             `K$`, exactly L tokens; the answer is the 4 digits (greedy exact match). `$` never occurs in
             the code (corpus_bytes replaces it), so the fact is unique.
    ppl      windows of length L cut from one EOS-joined token stream of documents.

Depth d in [0, 1] is the fraction of the context tokens that come before the probe. Prompts are token-id
lists built piece by piece, so their length is exact; chat models get the context inside a user turn of
their own template (`chat_wrap`).

Notation: T tokens of a prompt, L requested length.
"""
from __future__ import annotations

import os
import random
import re
import uuid
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from data import RecordReader
from errors import UserError
from tokenizer import BYTE_SPECIALS, CHAT_TEMPLATES

# ----------------------------------------------------------------------------- constants

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                 "them. I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
NEEDLE_INSTRUCTION = "Answer the question using the document above. Answer in one sentence."
KV_INTRO = "Extract the value corresponding to the specified key in the JSON object below."
KV_QUESTION = 'Key: "{key}"\nCorresponding value:'
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>")
CONTEXT_MARK = "\x00CONTEXT\x00"  # placeholder split out of a rendered chat turn
SENTENCE_ENDS = ".!?\n"
HOLDOUT_MOD = 10  # a stdlib file is held out when crc32(relative path) % HOLDOUT_MOD == 0
KEY_DIGITS = 4  # digits of a code-passkey value
PASSKEY_NAME = "K"  # the key name of the code-passkey prompts (one fact per prompt)
CODE_BOS = BYTE_SPECIALS["<s>"]
CODE_MAX_DEPTH = 0.9  # code-passkey facts lie at depth U(0, CODE_MAX_DEPTH)


# ----------------------------------------------------------------------------- pure functions: scoring


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def lcs_length(a: list, b: list) -> int:
    """Longest common subsequence length by the O(|a| |b|) dynamic programme, one row at a time."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """R_lcs = LCS(pred, ref) / |ref| over lowercase word tokens (Lin 2004, sec. 3.1); 0 for an empty ref."""
    ref = words(reference)
    return lcs_length(words(prediction), ref) / len(ref) if ref else 0.0


def exact_match(prediction: str, reference: str) -> bool:
    """The reference's words appear contiguously in the prediction (case and punctuation ignored)."""
    ref = " ".join(words(reference))
    return bool(ref) and f" {ref} " in f" {' '.join(words(prediction))} "


def passkey_correct(prediction: str, key: str) -> bool:
    """The first number in the answer is exactly the key."""
    found = re.findall(r"\d+", prediction)
    return bool(found) and found[0] == key


# ----------------------------------------------------------------------------- pure functions: prompts


def chat_wrap(tokenizer, template: str | None, prompt: str) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) around the context: a user turn `<context>prompt` rendered by the chat
    template with the generation prompt, or (bos, prompt) without a template. The context goes between,
    as token ids, so its length is exact."""
    if template is None:
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        return bos, tokenizer.encode(prompt)
    segs = CHAT_TEMPLATES[template]([{"role": "user", "content": CONTEXT_MARK + prompt}], True)
    before, after = "".join(s for s, _ in segs).split(CONTEXT_MARK)
    return tokenizer.encode(before), tokenizer.encode(after)


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], int]:
    """(ids, index of the key sentence's first token) for a prompt of about `length` tokens.

    intro + filler * n_before + needle + filler * n_after + question, each piece tokenized on its own with a
    leading space so token counts add up; n_before = round(depth * n_total). Exact to within one filler.
    """
    intro = tokenizer.encode(PASSKEY_INTRO, bos=tokenizer.bos_id is not None)
    filler = tokenizer.encode(" " + PASSKEY_FILLER)
    needle = tokenizer.encode(" " + PASSKEY_NEEDLE.format(key=key))
    question = tokenizer.encode(" " + PASSKEY_QUESTION)
    fixed = len(intro) + len(needle) + len(question)
    if fixed > length:
        raise UserError(f"--lengths {length}: too short for the passkey prompt ({fixed} tokens without filler)")
    n_total = max(0, round((length - fixed) / len(filler)))
    n_before = round(depth * n_total)
    ids = intro + filler * n_before
    pos = len(ids)
    return ids + needle + filler * (n_total - n_before) + question, pos


def sentence_starts(text: str, spans: list[tuple[int, int]]) -> list[int]:
    """Token indices k where a sentence or line begins (the previous character ends one), plus 0."""
    return [k for k, (a, _) in enumerate(spans) if k == 0 or (a > 0 and text[a - 1] in SENTENCE_ENDS)]


def place(context: list[int], starts: list[int], probe: list[int], depth: float) -> tuple[list[int], int]:
    """Insert `probe` ids into `context` at the sentence start nearest depth * len(context) (or the end)."""
    target = depth * len(context)
    at = min(starts + [len(context)], key=lambda k: (abs(k - target), k))
    return context[:at] + probe + context[at:], at


def needle_prompt(tokenizer, hay_ids: list[int], hay_starts: list[int], length: int, depth: float,
                  needle: str, question: str, template: str | None) -> tuple[list[int], int]:
    """(ids, needle's first token index): the haystack's first tokens, the needle at a sentence start at
    `depth`, then the question, chat-wrapped; `length` tokens in all (a shorter haystack is a UserError)."""
    prefix, suffix = chat_wrap(tokenizer, template, f"\n\n{question} {NEEDLE_INSTRUCTION}")
    probe = tokenizer.encode(" " + needle + " ")
    budget = length - len(prefix) - len(suffix) - len(probe)
    if budget < 1:
        raise UserError(f"--lengths {length}: too short for the needle and question ({length - budget} tokens)")
    if len(hay_ids) < budget:
        raise UserError(f"--lengths {length}: the haystack has only {len(hay_ids)} tokens, {budget} are needed "
                        f"besides the needle and question; pass a longer --haystack or lower --lengths")
    context = hay_ids[:budget]
    ids, at = place(context, [k for k in hay_starts if k < len(context)], probe, depth)
    return prefix + ids + suffix, len(prefix) + at


def kv_prompt(tokenizer, length: int, depth: float, rng: random.Random, template: str | None
              ) -> tuple[list[int], str, str, int]:
    """(ids, key, value, index of the asked pair's first token): a JSON object of UUID pairs filling
    `length` tokens, the asked pair at `depth` of the pairs."""
    def new_uuid():
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    prefix, suffix = chat_wrap(tokenizer, template, "")
    head = prefix + tokenizer.encode(KV_INTRO + "\n\n{")
    tail_len = len(tokenizer.encode("}\n\n" + KV_QUESTION.format(key=new_uuid()))) + len(suffix)
    pairs, used = [], len(head) + tail_len
    while True:
        k, v = new_uuid(), new_uuid()
        ids = tokenizer.encode(f'{", " if pairs else ""}"{k}": "{v}"')
        if used + len(ids) > length:
            if not pairs:
                raise UserError(f"--lengths {length}: too short for the kv prompt ({used + len(ids)} tokens "
                                 "for one pair)")
            break
        pairs.append((k, v, ids))
        used += len(ids)
    target = min(len(pairs) - 1, round(depth * (len(pairs) - 1)))
    key, value = pairs[target][:2]
    ids, at = list(head), 0
    for i, (_, _, p) in enumerate(pairs):
        at = len(ids) if i == target else at
        ids += p
    return ids + tokenizer.encode("}\n\n" + KV_QUESTION.format(key=key)) + suffix, key, value, at


def token_stream(tokenizer, texts: Iterable[str], needed: int) -> list[int]:
    """Documents encoded in order, each followed by EOS, until `needed` tokens exist (or texts run out)."""
    eos = tokenizer.eos_id
    out = []
    for text in texts:
        out += tokenizer.encode(text) + ([eos] if eos is not None else [])
        if len(out) >= needed:
            break
    return out


def windows(stream: list[int], length: int, count: int, stride: int | None) -> list[tuple[int, int]]:
    """(start, first scored offset) of `count` windows of `length`: back to back, or every `stride`
    tokens scoring only each window's last `stride` positions (the first window scores all)."""
    step = stride or length
    out = [(i * step, 0 if i == 0 or stride is None else length - stride) for i in range(count)]
    if out[-1][0] + length > len(stream):
        raise UserError(f"--docs: {len(stream)} tokens are not enough for {count} windows of {length}"
                         f"{f' at stride {stride}' if stride else ''}; add documents or lower --windows")
    return out


def fact_bytes(name: str, value: str) -> list[int]:
    """A fact line `K$NNNN` (with its newlines); the query is the same line without the value."""
    return list(f"\n{name}${value}\n".encode())


def query_bytes(name: str) -> list[int]:
    return list(f"\n{name}$".encode())


def random_value(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(KEY_DIGITS))


def code_passkey_prompt(filler: np.ndarray, offset: int, length: int, depth: float, name: str, value: str
                        ) -> list[int]:
    """BOS + filler code with one fact `K$NNNN` at the line start before `depth` of the way in + the query
    `K$`: exactly `length` byte-level ids. The answer (the value's digits) follows; filler starts at
    `offset` of the held-out corpus (corpus_bytes)."""
    fact, query = fact_bytes(name, value), query_bytes(name)
    n_fill = length - 1 - len(fact) - len(query)
    fill = filler[offset:offset + n_fill].tolist()
    cut = int(depth * n_fill)
    while cut > 0 and fill[cut - 1] != ord("\n"):
        cut -= 1
    return [CODE_BOS] + fill[:cut] + fact + fill[cut:] + query


def code_passkey_items(filler: np.ndarray, length: int, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """n code-passkey prompts of `length` ids and their answers (the value's bytes). From the RNG stream
    `seed`, per prompt in this order: the value, the filler offset, the depth U(0, 0.9)."""
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(n):
        value = random_value(rng)
        off = rng.randrange(0, len(filler) - length - 1)
        prompts.append(code_passkey_prompt(filler, off, length, rng.uniform(0.0, CODE_MAX_DEPTH), PASSKEY_NAME,
                                           value))
        answers.append([ord(c) for c in value])
    return prompts, answers


# ----------------------------------------------------------------------------- documents


def stdlib_files() -> list[Path]:
    """The Python standard library's .py files (no site-packages), sorted: deterministic."""
    root = Path(os.path.dirname(os.__file__))
    return sorted(f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts)


def stdlib_split() -> tuple[list[Path], list[Path]]:
    """(held-in, held-out) .py files of the Python standard library, split by a hash of the relative path."""
    root = Path(os.path.dirname(os.__file__))
    files = stdlib_files()
    held_out = [f for f in files if zlib.crc32(str(f.relative_to(root)).encode()) % HOLDOUT_MOD == 0]
    held_in = [f for f in files if zlib.crc32(str(f.relative_to(root)).encode()) % HOLDOUT_MOD != 0]
    return held_in, held_out


def corpus_bytes(files: list[Path]) -> np.ndarray:
    """The files' bytes, each followed by a blank line, as one uint8 array (no '$' so facts stay unique)."""
    parts = [f.read_bytes().replace(b"$", b"S") + b"\n\n" for f in files]
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def stdlib_texts(files: list[Path]) -> Iterator[str]:
    """The text of Python's own files (stdlib_files), an undecodable byte read as U+FFFD."""
    return (f.read_text(encoding="utf-8", errors="replace") for f in files)


def document_texts(paths: list[str]) -> Iterator[str]:
    """The documents of user files (--docs, --haystack) read as training data is (data.RecordReader: text
    and JSONL records, `file:line` errors, refusing empty, binary and non-UTF-8 files); a chat record's
    text is its turns' contents, one per line."""
    for rec in RecordReader(paths):
        yield rec.text if rec.text is not None else "\n".join(m["content"] for m in rec.messages)


def haystack_text(paths: list[str] | None) -> str:
    """--haystack files' text (document_texts), or by default the English prose of Python's own reference
    manual (pydoc_data.topics, ~460K characters, shipped with every CPython)."""
    if paths:
        return "\n\n".join(document_texts(paths))
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))
