"""Synthetic long-context training data, verifiable by construction, and its optional generator.

Llama-3-8B-Instruct-80K-QLoRA (Zhang et al. 2024, arXiv 2404.19553, sec. 2) trains on 3.5K synthetic
long chat samples of three kinds, written by GPT-4 about chunks of long documents: Single-Detail QA,
Multi-Detail QA and Biography Summarization. Here the same three kinds are made either
  - without a generator: templated facts (a name and an attribute, sampled from small fixed
    vocabularies with a seeded RNG) inserted into real documents at recorded line boundaries, so the
    answer is known exactly; or
  - with a generator model (`--generator`, any model checkpoint.load_model reads): it writes a question
    and answer (or a summary) about chunks of the document, as GPT-4 did; its raw reply is kept in meta.
  - with a server speaking OpenAI-compatible chat completions (`--generator-url http://host:port/v1
    --generator-model NAME`: vLLM, llama.cpp's server, Ollama, an API), over plain HTTP with the
    standard library: POST URL/chat/completions, the reply is choices[0].message.content; the API key
    comes from the environment variable named by --api-key-env (none is fine for local servers); each
    request has a timeout and is retried on 429, 5xx and connection errors with exponential backoff
    (delay = backoff * 2^attempt, at most 60 s or the server's Retry-After, at most --retries times).
Each sample is one conversation (user: document + question, assistant: answer) of at most ctx tokens.
No fact, question or answer reuses an evaluation's sentence or question (eval_tasks.py, eval_ruler.py, eval_protocols.py):
training on an evaluation's own format would inflate its score (tests/test_synth.py checks every 4-word run).

Output goes through data_resumable.write_resumable: samples are kept as they complete, Ctrl-C or SIGTERM stops
cleanly, a rerun with the same settings continues where the last one stopped (rows of other settings are
refused), and OUT is written atomically (outputs.atomic_path) when all are done.

Command line:
    python data_synth.py --docs DIR_OR_FILES --tokenizer PATH --ctx 65536 --kinds single,multi,summary \
        --out long.jsonl [--generator MODEL | --generator-url URL --generator-model NAME] [--concurrency 8] \
        [--seed 0] [--n 8]
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch

from checkpoint import load_model
from data import decode_text, list_files
from errors import UserError, check_range, run_cli
from generate import generate
from outputs import check_output
from data_resumable import write_resumable
from tokenizer import CHAT_TEMPLATES, Tokenizer, chat_template_for, encode_chat, load_tokenizer

# ----------------------------------------------------------------------------- constants

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
RETRY_STATUS = (429, 500, 502, 503, 504)  # rate limit and server errors: retried with backoff
MAX_BACKOFF_S = 60.0
# Bounds of the numeric flags (each refused outside them in one line): a day per request, a hundred retries
# (at most 60 s apart), 256 threads, ten million samples per file.
MIN_CTX_GENERATED = 4096  # a generated sample keeps 2048 tokens for the answers and needs chunks of the rest
MAX_TIMEOUT_S, MAX_RETRIES, MAX_CONCURRENCY, MAX_SAMPLES = 86400.0, 100, 256, 10**7

# ----------------------------------------------------------------------------- synthetic long data
# Llama-3-80K's recipe (Single-Detail QA, Multi-Detail QA, summarization) made verifiable without a
# generator: templated facts are inserted into real documents at recorded line boundaries.


def _read_doc_lines(path: Path) -> list[str]:
    return decode_text(path, path.read_bytes()).splitlines(keepends=True)


class _DocLines:
    """Lines of the synth documents, read lazily and cached, with per-line token counts."""

    def __init__(self, files: list[Path], tokenizer: Tokenizer):
        self.files = [f for f in files if f.stat().st_size > 0]  # an empty file has nothing to read
        if not self.files:
            raise UserError("synth: the --docs hold no non-empty files")
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
        raise UserError(f"synth: the documents hold only {total} tokens, fewer than the {budget} a sample "
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
        what = rng.choice(("needle", "code", "record"))
        if what == "needle":
            f = needle(rng.choice(SYNTH_NAMES))
            return [f], f"What is the secret word of {f['key']}?", [f["text"]]
        if what == "code":  # a number fact in our own words: no evaluation's sentence or question
            place, n = rng.choice(SYNTH_WORDS), str(rng.randrange(10000, 100000))
            f = dict(type="code", key=f"{place} locker", value=n, text=f"The {place} locker opens with code {n}.")
            return [f], f"Which code opens the {place} locker?", [f"The {place} locker opens with code {n}."]
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
        raise UserError(f"synth: {len(runs)} runs of whole lines of {chunk_tokens} tokens in the document span, "
                        f"{n} needed; raise --ctx, or wrap the documents' long lines")
    return sorted(rng.sample(runs, n))


def synth_sample(docs: _DocLines, tokenizer: Tokenizer, template: str, ctx: int, kind: str, seed: int,
                 index: int, generate_text: Callable[[str], str] | None = None, generator_name: str | None = None,
                 chunk_tokens: int = 2048, generator_info: dict | None = None) -> dict | None:
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
    meta.update(generator_info or {})  # e.g. generator_url and generator_model of an HTTP generator
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
        if len(lines) == 1:  # documents are cut at line ends only
            raise UserError(f"synth: line {lines[0][1]} of {docs.files[lines[0][0]]} alone is longer than --ctx {ctx} "
                            f"tokens; wrap long lines or raise --ctx")
        while cut < excess and len(lines) > 1:
            cut += lines.pop()[3]
    else:
        raise UserError(f"synth: could not fit sample {index} into ctx={ctx}")
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
    """generate_text(prompt): greedy chat completion by the model at `model_path` (checkpoint.load_model).

    The model's own tokenizer is used when `model_path` holds one, else `tokenizer` (e.g. a preset).
    """
    model = load_model(model_path, dtype=torch.float32, device="cpu")
    try:
        tok = load_tokenizer(model_path)
    except UserError:
        tok = tokenizer
    template = chat_template_for(tok, template)
    stops = [i for i in (tok.eos_id, tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|im_end|>")) if i is not None]

    def generate_text(prompt: str) -> str:
        ids, _ = encode_chat(tok, [{"role": "user", "content": prompt}], template, add_generation_prompt=True)
        new = generate(model, ids, max_new_tokens, temperature=0.0, stop_ids=stops)
        return tok.decode([t for t in new if t not in stops])

    return generate_text


def http_generate_text(url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 120.0,
                       retries: int = 5, backoff: float = 1.0, max_tokens: int = 512,
                       temperature: float = 0.0) -> Callable[[str], str]:
    """generate_text(prompt): one chat completion from an OpenAI-compatible server at `url` (.../v1).

    Request: POST url/chat/completions {"model", "messages": [{"role": "user", "content": prompt}],
    "max_tokens", "temperature"}, with "Authorization: Bearer $KEY" when the environment variable
    `api_key_env` is set. Reply: choices[0].message.content. 429, 5xx, timeouts and connection errors are
    retried up to `retries` times, sleeping min(backoff * 2^attempt, 60 s) or the server's numeric
    Retry-After (capped the same way); any other HTTP error, or a reply off the schema, is a UserError.
    """
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--generator-url {url!r}: must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)")
    try:
        urllib.parse.urlsplit(url).port  # parses the host and the port (ValueError: "Invalid IPv6 URL", ...)
    except ValueError as e:
        raise UserError(f"--generator-url {url!r}: not a URL ({e})") from None
    check_range("--timeout", timeout, 0.001, MAX_TIMEOUT_S)
    check_range("--retries", retries, 0, MAX_RETRIES)
    endpoint = url.rstrip("/") + "/chat/completions"
    key = os.environ.get(api_key_env) if api_key_env else None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}

    def generate_text(prompt: str) -> str:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": temperature}).encode()
        for attempt in range(retries + 1):
            wait = min(backoff * 2 ** attempt, MAX_BACKOFF_S)
            try:
                req = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=timeout) as r:
                    reply = json.loads(r.read().decode("utf-8"))
                break
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace")
                if e.code not in RETRY_STATUS:
                    raise UserError(f"--generator-url {endpoint}: HTTP {e.code} ({detail})") from None
                error = f"HTTP {e.code} ({detail})"
                after = e.headers.get("Retry-After", "") if e.headers else ""
                wait = min(float(after), MAX_BACKOFF_S) if after.replace(".", "", 1).isdigit() else wait
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                error = str(getattr(e, "reason", e))
            except json.JSONDecodeError as e:
                raise UserError(f"--generator-url {endpoint}: reply is not JSON ({e})") from None
            if attempt == retries:
                raise UserError(f"--generator-url {endpoint}: {error}; gave up after {retries + 1} attempts")
            time.sleep(wait)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"--generator-url {endpoint}: reply has no choices[0].message.content: "
                            f"{json.dumps(reply)[:200]}") from None
        return content if isinstance(content, str) else ""

    return generate_text


def synth(docs, tokenizer: Tokenizer, ctx: int, kinds: list[str], out, n: int, seed: int = 0,
          template: str | None = None, generate_text: Callable[[str], str] | None = None,
          generator_name: str | None = None, generator_info: dict | None = None, concurrency: int = 1) -> dict:
    """Write n long chat samples (kinds cycled) to `out` as JSONL, resumably; returns counts. A generator
    none of whose replies gives a sample is a UserError with the counts (OUT is not written)."""
    check_range("--concurrency", concurrency, 1, MAX_CONCURRENCY)
    check_range("--n", n, 1, MAX_SAMPLES)
    for k in kinds:
        if k not in SYNTH_KINDS:
            raise UserError(f"--kinds: {k!r} unknown; choose from {','.join(SYNTH_KINDS)}")
    if not kinds:
        raise UserError(f"--kinds is empty; choose from {','.join(SYNTH_KINDS)}")
    if ctx < (MIN_CTX_GENERATED if generate_text else 1024):
        raise UserError(f"--ctx {ctx}: synth needs at least {MIN_CTX_GENERATED if generate_text else 1024} tokens per "
                        f"sample{' with a generator (2048 are kept for its answers)' if generate_text else ''}")
    template = chat_template_for(tokenizer, template)
    lines = _DocLines(list_files(docs), tokenizer)
    settings = dict(docs=[str(f.resolve()) for f in lines.files], tokenizer=tokenizer.name, ctx=ctx, kinds=kinds,
                    seed=seed, template=template, generator=generator_name, **(generator_info or {}))
    replies = {"all": 0, "empty": 0}

    def counted(prompt):
        reply = generate_text(prompt)
        replies["all"] += 1
        replies["empty"] += not reply.strip()
        return reply

    def make(i):
        return synth_sample(lines, tokenizer, template, ctx, kinds[i % len(kinds)], seed, i,
                            counted if generate_text else None, generator_name, generator_info=generator_info)

    def check_row(row):
        meta, want = row.get("meta"), dict(seed=seed, template=template, tokenizer=tokenizer.name,
                                           generator=generator_name, **(generator_info or {}))
        if not isinstance(meta, dict) or not isinstance(row.get("messages"), list):
            return "is not a synth sample (needs messages and meta)"
        want["kind"] = kinds[meta["index"] % len(kinds)]
        diff = next((k for k in want if meta.get(k) != want[k]), None)
        return None if diff is None else f"has {diff} {meta.get(diff)!r}, not {want[diff]!r}: it is another run's"

    counts = write_resumable(out, n, make, concurrency, settings, check_row)
    if counts["written"] == 0:
        raise UserError(f"{generator_name or 'synth'}: none of the {n} samples could be made: "
                        f"{replies['empty']} of {replies['all']} generator replies were empty or null, the others "
                        f"did not parse as {'a summary' if kinds == ['summary'] else 'Question:/Answer:'}; "
                        f"nothing written to {out}")
    return counts


# ----------------------------------------------------------------------------- command line


def build_synth_parser() -> argparse.ArgumentParser:
    s = argparse.ArgumentParser(prog="data_synth.py", description="Write verifiable long chat samples from long documents.")
    s.add_argument("--docs", nargs="+", required=True, help="documents: files and/or folders")
    s.add_argument("--tokenizer", required=True, help="tokenizer.json, tokenizer.model, .gguf or 'bytes'")
    s.add_argument("--ctx", type=int, required=True, help="tokens per sample (upper bound)")
    s.add_argument("--kinds", default="single,multi,summary")
    s.add_argument("--out", required=True)
    s.add_argument("--generator", default=None, help="model for checkpoint.load_model; omit for templated facts")
    s.add_argument("--template", default=None, help=f"chat template, one of {sorted(CHAT_TEMPLATES)}")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n", type=int, default=8, help="number of samples (kinds cycled)")
    h = s.add_argument_group("OpenAI-compatible generator server")
    h.add_argument("--generator-url", default=None, help="chat-completions base URL, e.g. http://127.0.0.1:8000/v1")
    h.add_argument("--generator-model", default=None, help="model name the server serves")
    h.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    h.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    h.add_argument("--retries", type=int, default=5, help="retries on 429/5xx/connection errors (backoff 1, 2, 4 s...)")
    h.add_argument("--concurrency", type=int, default=1, help="samples made at once (threads)")
    return s


def main(argv: list[str] | None = None) -> int:
    args = build_synth_parser().parse_args(argv)

    def body():
        check_range("--n", args.n, 1, MAX_SAMPLES)
        check_range("--concurrency", args.concurrency, 1, MAX_CONCURRENCY)
        for path in (args.out, args.out + ".partial"):  # before anything is generated
            check_output(path, "file", "--out", inputs=[*args.docs, args.tokenizer, args.generator])
        tokenizer = load_tokenizer(args.tokenizer)
        name, info = args.generator, None
        if args.generator_url:
            if args.generator or not args.generator_model:
                raise UserError("--generator-url needs --generator-model NAME and excludes --generator")
            gen = http_generate_text(args.generator_url, args.generator_model, args.api_key_env, args.timeout,
                                     args.retries)
            name, info = args.generator_model, dict(generator_url=args.generator_url,
                                                    generator_model=args.generator_model)
        else:
            gen = model_generate_text(args.generator, tokenizer, args.template) if args.generator else None
        counts = synth(args.docs, tokenizer, args.ctx, [k.strip() for k in args.kinds.split(",") if k.strip()],
                       args.out, args.n, args.seed, args.template, gen, name, info, args.concurrency)
        print(f"wrote {counts['written']} samples to {args.out} ({counts['failed']} failed to parse)")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
