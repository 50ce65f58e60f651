"""Training data: streaming readers, sequence builders (packing, one chat per sequence), mixtures, stats.

What the recipes train on:
  - LongQLoRA (arXiv 2311.04879): packed long documents (PG19/RedPajama-style) for language modelling,
    plus ~39k long instruction samples for chat models.
  - Llama-3-8B-Instruct-80K-QLoRA (arXiv 2404.19553): 3.5K synthetic 64K-80K-token chat samples of three
    kinds (Single-Detail QA, Multi-Detail QA, Biography Summarization), written by GPT-4 about chunks of
    a long document, mixed with 20K short instances (RedPajama, LongAlpaca); data_synth.py makes such data.
  - ProLong (Gao et al. 2024, "How to Train Long-Context Language Models (Effectively)"): long + short
    mixtures weighted by TOKENS, not samples (e.g. 60% long / 40% short).

Sample convention (what every builder here yields and the trainer consumes):
    dict(input_ids=LongTensor[L], labels=LongTensor[L]) with L <= ctx and
    labels[t] = the target for position t, i.e. already shifted:  labels[t] = ids[t + 1]  or -100.
  The trainer computes loss = CE(logits[t], labels[t]) over t with labels[t] != -100, no shifting; packing
  therefore cuts chunks of ctx + 1 tokens, input_ids = chunk[:-1], labels = chunk[1:] (ctx targets).

Notation: T tokens in a sequence, ctx the sequence length a builder targets.

Command line:
    python data.py stats FILE --tokenizer PATH [--template NAME]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from errors import UserError, json_field, run_cli
from tokenizer import CHAT_TEMPLATES, IGNORE_INDEX, Tokenizer, chat_template_for, encode_chat, load_tokenizer

# ----------------------------------------------------------------------------- constants

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java",
                 ".js", ".ts", ".sh", ".tex", ".html", ".css", ".toml", ".yaml", ".yml", ".cfg", ".ini"}
MAX_DOCUMENT_BYTES = 256 * 2**20  # a plain-text file is one document; larger ones must be split by the user


class DataError(UserError):
    """A bad input record: the message is `file:line: reason`."""


# ----------------------------------------------------------------------------- readers


@dataclasses.dataclass
class Record:
    """One input record: a plain document (`text`) or a conversation (`messages`)."""

    source: str
    line: int
    text: str | None = None
    messages: list[dict] | None = None


def utf8_error(path, data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> str:
    line = first_line + data.count(b"\n", 0, err.start)
    return f"{path}:{line}: not UTF-8 (byte 0x{data[err.start]:02x}); re-encode the file as UTF-8"


def decode_text(path, data: bytes) -> str:
    """A text file's bytes as str; DataError `file:line` on a NUL byte (a binary file) or on bytes that are
    not UTF-8."""
    if b"\0" in data:
        line = 1 + data.count(b"\n", 0, data.index(b"\0"))
        raise DataError(f"{path}:{line}: a NUL byte: a binary file, not text; remove it from the data")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(utf8_error(path, data, e)) from None


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
        raise DataError(utf8_error(path, raw, e, lineno)) from None
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
            raise UserError(f"{p}: no such file or folder")
        if p.is_dir():
            found = [f for f in sorted(p.rglob("*")) if f.is_file() and (f.suffix in TEXT_SUFFIXES or _is_jsonl(f))]
            if not found:
                raise UserError(f"{p}: folder holds no file this reads (.jsonl or text: "
                                f"{' '.join(sorted(TEXT_SUFFIXES))})")
            out.extend(found)
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
        try:
            text = decode_text(path, path.read_bytes())
        except DataError as e:
            self._bad(e)
            return
        yield Record(str(path), 1, text=text)


# ----------------------------------------------------------------------------- sequence builders


def _ids(x) -> torch.Tensor:
    """A LongTensor of a list of ints or an int64 array.array (copied: the array is the packer's buffer)."""
    return torch.frombuffer(x, dtype=torch.long).clone() if isinstance(x, array) else torch.tensor(x, dtype=torch.long)


def _sample(tokens, labels) -> dict[str, torch.Tensor]:
    """ctx + 1 tokens (and their unshifted labels) -> shifted sample of ctx positions."""
    return {"input_ids": _ids(tokens[:-1]),  # (T,)
            "labels": _ids(labels[1:])}  # (T,)


def _doc_sample(tokens: list[int], pos: list[int]) -> dict[str, torch.Tensor]:
    """ctx + 1 tokens and their positions in their documents -> a shifted sample (Packer, doc_mask=True)."""
    k = next((i for i in range(1, len(pos) - 1) if pos[i] == 0), len(pos) - 1)  # end of the first document
    sample = _sample(tokens, [IGNORE_INDEX if p == 0 else t for t, p in zip(tokens, pos)])
    sample["positions"] = torch.tensor([p - pos[0] for p in pos[:k]] + pos[k:-1], dtype=torch.long)  # (T,)
    return sample


class Packer:
    """Concatenate documents, each followed by EOS, and cut chunks of exactly ctx + 1 tokens.

    Chunks do not overlap: every token of the stream lands in exactly one chunk; a chunk's first
    token is an input only (its own target sat in the previous chunk's unused slot), which costs one
    target in ctx + 1 and keeps counting simple. Every token is supervised, EOS included; attention is
    not masked across documents (the usual packing trade-off). The final partial chunk is dropped and
    counted in `dropped_tokens`.

    doc_mask=True: each sample also carries `positions` (T,) that restart at 0 at each document start
    (the convention of doc_attn.py, transformers' padding-free packing) and at the chunk start, where a
    chunk continues a document (RoPE scores depend on position differences only, so that piece attends
    as it would at its true offset). The target that starts another document, predicted across the
    border, is -100 (as transformers' DataCollatorWithFlattening does): with attention masked at
    borders it has no context, and so each document's loss is the loss it has alone.
    """

    def __init__(self, ctx: int, eos_id: int, doc_mask: bool = False):
        if ctx < 1:
            raise ValueError(f"ctx={ctx}; must be >= 1")
        self.ctx, self.eos_id, self.doc_mask = ctx, eos_id, doc_mask
        self.buf = array("q")  # int64 token ids: 8 bytes a token (a list of ints costs up to 36)
        self.pos: list[int] = []  # with doc_mask: each buffered token's position in its document
        self.start = 0  # buf[:start] is already packed (cut once per add, not once per chunk: O(n) not O(n^2))
        self.n_tokens = 0  # tokens entering the stream (documents + EOS)
        self.n_sequences = 0

    def add(self, ids: list[int]) -> Iterator[dict[str, torch.Tensor]]:
        """One document's ids, then EOS: the samples completed."""
        yield from self.add_pieces([ids])

    def add_pieces(self, pieces: Iterable[list[int]]) -> Iterator[dict[str, torch.Tensor]]:
        """One document given as consecutive pieces of ids (Tokenizer.encode_pieces), then EOS: samples are cut
        as the pieces arrive, so a long document is never held whole."""
        n, in_doc = self.ctx + 1, 0
        for part in itertools.chain(pieces, [[self.eos_id]]):
            del self.buf[:self.start]
            del self.pos[:self.start]
            self.start = 0
            self.buf.extend(part)
            if self.doc_mask:
                self.pos.extend(range(in_doc, in_doc + len(part)))
            in_doc += len(part)
            self.n_tokens += len(part)
            while len(self.buf) - self.start >= n:
                a = self.start
                chunk = self.buf[a:a + n]
                self.start += n
                self.n_sequences += 1
                yield _doc_sample(chunk, self.pos[a:a + n]) if self.doc_mask else _sample(chunk, chunk)

    @property
    def dropped_tokens(self) -> int:
        return len(self.buf) - self.start


def pack_documents(token_docs: Iterable[list[int]], ctx: int, eos_id: int,
                   stats: dict | None = None, doc_mask: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Samples of exactly ctx positions from packed documents (see Packer, also for doc_mask). `stats`, if
    given, receives n_sequences, n_tokens and dropped_tokens when the stream ends."""
    packer = Packer(ctx, eos_id, doc_mask)
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
                 truncate: bool = False, on_bad_line: str = "error",
                 doc_mask: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Samples from files in order: text records are packed ([bos if tokenizer.add_bos] + text, EOS after
    each document; doc_mask: see Packer), chat
    records become one sample each (template from the tokenizer unless named). Files that give no sample
    at all are a UserError saying why (too few tokens for one sequence, every chat longer than ctx)."""
    packer = Packer(ctx, tokenizer._required(tokenizer.eos_id, "eos"), doc_mask)
    n_chats = n_long = n_out = 0
    for rec in RecordReader(paths, on_bad_line):
        if rec.text is not None:
            for s in packer.add_pieces(tokenizer.encode_pieces(rec.text, bos=tokenizer.add_bos)):
                n_out += 1
                yield s
            continue
        tpl = chat_template_for(tokenizer, template)
        s = chat_sample(*encode_chat(tokenizer, rec.messages, tpl), ctx, truncate)
        n_chats, n_long = n_chats + 1, n_long + (s is None)
        if s is not None:
            n_out += 1
            yield s
    if n_out == 0:
        raise UserError(f"{paths}: yields no samples of --ctx {ctx}: its text documents hold {packer.n_tokens} tokens "
                        f"(with EOS), fewer than the {ctx + 1} one packed sequence needs"
                        + (f", and all {n_chats} chats are longer than --ctx (--truncate keeps them)" if n_long else "")
                        + "; add data or lower --ctx")


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
            if not Path(part).exists():  # a path holding ':' is fine; anything else after ':' is a bad weight
                raise UserError(f"data spec {part!r}: weight {w!r} is not a number; write path:weight") from None
            path, weight = part, 1.0
        path = path or part
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"data spec {part!r}: weight must be > 0 and finite")
        if not Path(path).exists():
            raise UserError(f"data spec {part!r}: {path} not found")
        out.append((path, weight))
    if not out:
        raise UserError(f"data spec {spec!r} is empty; write path:weight,path:weight")
    top = max(w for _, w in out)  # scaled by the largest first: a sum of huge weights would overflow to inf
    total = sum(w / top for _, w in out)
    scaled = [(p, w / top / total) for p, w in out]
    for (p, w), (_, share) in zip(out, scaled):
        if share == 0.0:
            raise UserError(f"data spec {spec!r}: weight {w:g} of {p} is too small beside {top:g} (its share "
                            "rounds to 0)")
    return scaled


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

    Note: every rank tokenizes the whole global stream and a resume replays each source's epoch up to the
    cursor: cheap next to a long-context step, and the cursor stays tiny and exact.
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

    def load_state_dict(self, state: dict, where: str = "mixture state") -> None:
        """`where` names the state in errors (a checkpoint file's field): a hand-edited one is a UserError."""
        names = [s.name for s in self.sources]
        if state.get("names") != names or state.get("seed") != self.seed:
            raise UserError(f"{where}: for sources {state.get('names')} seed {state.get('seed')}, "
                            f"not {names} seed {self.seed}; resume with the same --data and --seed")
        counts = ("epoch", "consumed", "tokens")
        self.index = json_field(state, "index", where, int, lambda v: v >= 0, "an integer >= 0")
        self.state = json_field(state, "sources", where, list, lambda v: len(v) == len(names) and all(
            isinstance(s, dict) and all(type(s.get(k)) is int and s[k] >= 0 for k in counts) for s in v),
            f"a list of {len(names)} objects with integers {', '.join(counts)} >= 0")
        self.state = [{k: s[k] for k in counts} for s in self.state]

    def _open(self, i: int) -> Iterator[dict]:
        st = self.state[i]
        rng = random.Random(f"{self.seed}:{i}:{st['epoch']}")
        it = _shuffled(iter(self.sources[i].open(st["epoch"])), self.shuffle_buffer, rng)
        for _ in range(st["consumed"]):
            if next(it, None) is None:
                raise UserError(f"source {self.sources[i].name}: shorter than the saved cursor; "
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
                    raise UserError(f"source {self.sources[i].name}: yields no samples")
            st["consumed"] += 1
            st["tokens"] += int(sample["input_ids"].numel())
            index, self.index = self.index, self.index + 1
            if index % self.world_size == self.rank:
                yield sample


def build_mixture(spec: str, tokenizer: Tokenizer, ctx: int, template: str | None = None, seed: int = 0,
                  rank: int = 0, world_size: int = 1, cycle: bool = True, truncate: bool = False,
                  on_bad_line: str = "error", doc_mask: bool = False) -> Mixture:
    """The trainer's entry point: a Mixture of file sources from a `path:weight,...` spec (doc_mask: Packer)."""
    sources = [Source(path, w, lambda epoch, p=path: file_samples(p, tokenizer, ctx, template, truncate,
                                                                  on_bad_line, doc_mask))
               for path, w in parse_data_spec(spec)]
    return Mixture(sources, seed=seed, rank=rank, world_size=world_size, cycle=cycle)


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


def data_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="data.py", description="Long-context data tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("stats", help="token-length histogram and supervised-token counts")
    t.add_argument("file")
    t.add_argument("--tokenizer", required=True)
    t.add_argument("--template", default=None)
    t.add_argument("--on-bad-line", choices=("error", "skip"), default="error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = data_parser().parse_args(argv)

    def body():
        if args.template is not None and args.template not in CHAT_TEMPLATES:
            raise UserError(f"--template {args.template!r}: unknown; choose one of {sorted(CHAT_TEMPLATES)}")
        print(format_stats(token_stats(args.file, load_tokenizer(args.tokenizer), args.template, args.on_bad_line)))

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
