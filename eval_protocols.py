"""Published recall protocols as their own code builds and scores them, beside ours (eval_tasks.py). No model here.

    llama3-80k  the needle test of Zhang et al. 2024 ("Extending Llama-3's Context Ten-Fold Overnight"),
                as FlagEmbedding's research/Long_LLM/longllm_qlora/main/eval_needle.py runs it:
                    ids = desc + ctx[:p] + needle + ctx[p:] + question,   |ids| = L,
                    p = |desc| + round((L - |question| - |needle| - 1 - |desc|) * depth% / 100),
                ctx the haystack (repeated when L exceeds its word count) cut to L - |desc| - |needle| - |question|
                tokens; the ids are decoded to text, put in one user turn of the chat template with the
                generation prompt, and tokenized again; 50 new tokens, greedy. Grid: 10 lengths
                linspace(8000, 80000) x 10 depths linspace(0, 100) cast to int (the paper's command). Score:
                ROUGE-L F of the `rouge` package (pltrdy), which that code calls (rouge_l_summary below).
    kamradt     Kamradt 2023, LLMTest_NeedleInAHaystack: the haystack cut to L tokens, then to L - buffer (200)
                - |needle|; the needle inserted after the last '.' token at or before int(n depth% / 100)
                (at the end for depth 100); a system turn, the context as one user turn and the question
                as a second; 300 new tokens. Grid: 35 x 35 from round(linspace(1000, 16000)) and
                round(linspace(0, 100)). Its score is a GPT judge (1-10), which cannot run offline: here
                ROUGE-L F as the `rouge_score` package computes it (rouge_l_f) and exact match instead.
    helmet      HELMET's json_kv (Yen et al. 2024): JSON first, then the instruction, two in-context
                examples and the key; no chat template (its recall configs); a fixed number of pairs per
                length (50 at 4K ... 1800 at 128K), 100 new tokens; substring exact match after SQuAD's
                normalisation. HELMET reads pre-generated files; their record layout is Liu et al. 2023's
                kv_retrieval ("JSON data:" then `{"k": "v",\\n "k": "v"}` with UUID4 keys and values, the
                key quoted after "Key: "), which its prompt cites; the examples' pairs are fresh UUIDs.

Without --haystack the needle protocols use our manual haystack (eval_tasks.haystack_text): both papers use
Paul Graham's essays, so such a score is labelled as not theirs (HAYSTACK_NOTE).

Notation: L requested length, p needle position among the context tokens.
"""
from __future__ import annotations

import math
import random
import re
import string
import uuid
from pathlib import Path

import numpy as np

from data import list_files
from errors import UserError
from eval_tasks import exact_match, haystack_text, rouge_l_recall
from tokenizer import CHAT_TEMPLATES

# ----------------------------------------------------------------------------- constants

PROTOCOLS = {"needle": ("ours", "llama3-80k", "kamradt"), "kv": ("ours", "helmet")}
SCORING = {"ours": "exact match (needle: and ROUGE-L recall)",
           "llama3-80k": "ROUGE-L F of the `rouge` package, as the paper's code scores (and exact match)",
           "kamradt": "ROUGE-L F (rouge_score) and exact match: NOT Kamradt's GPT judge, which cannot run offline",
           "helmet": "substring exact match, as HELMET scores json_kv"}
HAYSTACK_NOTE = "Python's reference manual (ours; not the published protocol's Paul Graham essays)"

L80K_NEEDLE = ("\n\nThe best thing to do in San Francisco is sitting in Dolores Park and eating a hamburg on a "
               "sunny day.\n\n")
L80K_QUESTION = "\n\nWhat is the best thing to do in San Francisco?\nAnswer:"
L80K_DESCRIPTION = ("There is an important infomation hidden in the following context. Find the information and "
                    "memorize it. I will quiz you about the important information there.\n")
L80K_NEW_TOKENS = 50

KAMRADT_NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
KAMRADT_QUESTION = "What is the best thing to do in San Francisco?"
KAMRADT_SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct"
KAMRADT_SUFFIX = " Don't give information outside the document or repeat your findings"
KAMRADT_BUFFER = 200
KAMRADT_NEW_TOKENS = 300

HELMET_USER = ("{context}\n\nExtract the value corresponding to the specified key in the JSON object below.\n\n"
               "{demos}Key: {question}")
HELMET_ANSWER_PREFIX = "Corresponding value:"
HELMET_DEMO = "Key: {key}\nCorresponding value:{value}"
HELMET_SHOTS = 2
HELMET_PAIRS = {4096: 50, 8192: 105, 16384: 220, 32768: 440, 65536: 900, 131072: 1800}
HELMET_NEW_TOKENS = 100


def default_grid(task: str, protocol: str) -> tuple[list[int], list[float]] | None:
    """(lengths, depths as fractions) of the protocol's own grid; None for ours (eval.py's defaults)."""
    allowed = PROTOCOLS.get(task, ("ours",))
    if protocol not in allowed:
        raise UserError(f"--protocol {protocol}: unknown for {task}; choose one of {', '.join(allowed)}")
    if protocol == "llama3-80k":
        return (np.linspace(8000, 80000, 10).astype(int).tolist(),
                [d / 100 for d in np.linspace(0, 100, 10).astype(int).tolist()])
    if protocol == "kamradt":
        return (np.round(np.linspace(1000, 16000, 35)).astype(int).tolist(),
                [d / 100 for d in np.round(np.linspace(0, 100, 35)).astype(int).tolist()])
    if protocol == "helmet":  # HELMET's lengths; six depths ("dep6" in its file names), evenly spaced
        return sorted(HELMET_PAIRS), [i / 5 for i in range(6)]
    return None


# ----------------------------------------------------------------------------- pure functions: scoring


def rouge_l_f(prediction: str, reference: str) -> float:
    """ROUGE-L F1 as the `rouge_score` package computes it (Lin 2004, sec. 3.1; no stemming): tokens are the
    lowercase runs of [a-z0-9]; P = LCS / |pred|, R = LCS / |ref|, F = 2 P R / (P + R), 0 when either is empty."""
    def tokens(text):
        return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    pred, ref = tokens(prediction), tokens(reference)
    lcs = lcs_table(ref, pred)[-1][-1] if pred and ref else 0
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def lcs_table(x: list, y: list) -> list[list[int]]:
    """t[i][j] = LCS length of x[:i] and y[:j] (the O(|x| |y|) dynamic programme)."""
    t = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t


def lcs_words(x: list[str], y: list[str]) -> set[str]:
    """The words of one LCS of x and y, walked back from the end preferring x's predecessor only when its
    table value is strictly larger (the `rouge` package's _recon_lcs, whose union below depends on which
    LCS is taken)."""
    t, i, j, out = lcs_table(x, y), len(x), len(y), set()
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.add(x[i - 1])
            i, j = i - 1, j - 1
        elif t[i - 1][j] > t[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_l_summary(prediction: str, reference: str) -> float:
    """ROUGE-L F of the `rouge` package 1.0.1 (pltrdy; `Rouge().get_scores(...)["rouge-l"]["f"]`), the
    summary-level form (Lin 2004, sec. 3.2) with its quirks: sentences are the pieces between '.'s (kept when
    non-empty before whitespace is squeezed, so '...day.\\n\\n' leaves an empty sentence and an empty word),
    words split on single spaces, case kept; every count is of DISTINCT words:
        U = | union over reference sentences r, prediction sentences c of words(LCS(r, c)) |,
        R = U / |distinct ref words|, P = U / |distinct pred words|, F = 2 P R / (P + R + 1e-8).
    An empty prediction scores 0 (the caller there catches the package's error and returns 0)."""
    def sentences(text):
        return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]
    hyp, ref = sentences(prediction), sentences(reference)
    if not hyp or not ref:
        return 0.0
    union = set()
    for r in ref:
        for h in hyp:
            union |= lcs_words(r.split(" "), h.split(" "))
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp for w in s.split(" ")})
    r_lcs, p_lcs = len(union) / m, len(union) / n
    return 2.0 * (p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8)


def squad_normalize(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, squeeze whitespace (HELMET's normalize_answer)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def parse_after(output: str, prefix: str) -> str:
    """The rest of the line after `prefix` (case-insensitive), else the first line, stripped (HELMET's
    parse_output, which also strips a repeated prefix)."""
    for pat in (re.compile(f"(?:{re.escape(prefix)})(.*)(?:\n|$)", re.I), re.compile(r"(?:^)(.*)(?:\n|$)")):
        m = pat.search(output)
        if m is not None:
            return re.sub(f"^{re.escape(prefix)}", "", m[1].strip(), flags=re.I).strip()
    return ""


def substring_exact_match(prediction: str, answer: str) -> bool:
    """HELMET's json_kv metric: the normalised answer inside the normalised output (the answer prefix put
    back in front, as HELMET does without a chat template), or inside the parsed line after it."""
    full = HELMET_ANSWER_PREFIX + prediction
    return any(squad_normalize(answer) in squad_normalize(p) for p in (full, parse_after(full, HELMET_ANSWER_PREFIX)))


def score(task: str, protocol: str, answer: str, reference: str) -> dict:
    """The item's scores: `correct` (the accuracy every table shows) and the protocol's ROUGE-L when it has one."""
    if task == "kv":
        return {"correct": substring_exact_match(answer, reference) if protocol == "helmet"
                else exact_match(answer, reference)}
    if protocol == "ours":
        return {"correct": exact_match(answer, reference), "rouge_l_recall": rouge_l_recall(answer, reference)}
    rouge = rouge_l_summary(answer, reference) if protocol == "llama3-80k" else rouge_l_f(answer, reference)
    return {"correct": exact_match(answer, reference.strip()), "rouge_l_f": rouge}


# ----------------------------------------------------------------------------- pure functions: prompts


def percent(depth: float) -> float:
    """depth in [0, 1] as the published codes' depth percent (0.11 -> 11.0, not 11.000000000000002)."""
    return round(depth * 100, 9)


def read_haystack(paths: list[str] | None) -> tuple[str, str]:
    """(text, label): --haystack files (folders: their text files, sorted, joined with nothing between as
    the published codes join them; one file stripped, as eval_needle.py reads one), or our manual haystack
    under HAYSTACK_NOTE."""
    if not paths:
        return haystack_text(None), HAYSTACK_NOTE
    parts = []
    for p in paths:
        if not Path(p).exists():
            raise UserError(f"--haystack {p}: no such file or folder; pass the essays' text file or folder")
    for f in list_files(paths):
        try:
            parts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"--haystack {f}: not UTF-8 text; pass plain-text essays (e.g. Paul Graham's)") from None
    text = "".join(parts)
    text = text.strip() if len(parts) == 1 else text
    if len(text.split()) < 2:
        raise UserError(f"--haystack {','.join(paths)}: holds no text; pass plain-text essays (e.g. Paul Graham's)")
    return text, ",".join(paths)


def render_turns(tokenizer, template: str | None, messages: list[dict]) -> list[int]:
    """Token ids of the conversation rendered by the chat template with the generation prompt and tokenized
    as one string; without a template, the contents joined by blank lines."""
    if template is None:  # BOS where the tokenizer adds one by itself, as `tokenizer(text)` does
        bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        return bos + tokenizer.encode("\n\n".join(m["content"] for m in messages))
    segs = CHAT_TEMPLATES[template](messages, True)
    return tokenizer.encode("".join(s for s, _ in segs))


def llama3_80k_text(tokenizer, haystack: str, length: int, depth: float) -> str:
    """The user turn's text of the 80K paper's needle prompt of `length` tokens at depth in [0, 1] (module
    docstring): description, context with the needle at p, question, decoded from ids."""
    n_words = len(haystack.split())
    context = haystack * math.ceil(length / n_words) if length > n_words else haystack
    desc, needle, question = (tokenizer.encode(t) for t in (L80K_DESCRIPTION, L80K_NEEDLE, L80K_QUESTION))
    lo, hi = len(desc), length - len(question) - len(needle) - 1
    budget = length - len(desc) - len(needle) - len(question)
    if hi < 0 or budget < 1:
        raise UserError(f"--lengths {length}: too short for the llama3-80k needle prompt "
                        f"({len(desc) + len(needle) + len(question) + 1} tokens without context)")
    p = lo + round((hi - lo) * percent(depth) / 100)
    ctx = tokenizer.encode(context)[:budget]
    return tokenizer.decode(desc + ctx[:p] + needle + ctx[p:] + question)


def kamradt_context(tokenizer, haystack: str, length: int, depth: float) -> str:
    """The context of Kamradt's prompt for `length` at depth in [0, 1]: haystack (repeated until long enough)
    cut to `length` tokens, then to length - buffer - |needle|, the needle after a '.' token (module docstring)."""
    ids = tokenizer.encode(haystack)
    while len(ids) < length:
        haystack += haystack
        ids = tokenizer.encode(haystack)
    ctx = tokenizer.encode(tokenizer.decode(ids[:length]))
    needle = tokenizer.encode(KAMRADT_NEEDLE)
    room = length - KAMRADT_BUFFER
    if room - len(needle) < 1:
        raise UserError(f"--lengths {length}: too short for the kamradt protocol (buffer {KAMRADT_BUFFER} + needle "
                        f"{len(needle)} tokens)")
    if len(ctx) + len(needle) > room:
        ctx = ctx[:room - len(needle)]
    if depth >= 1.0:
        return tokenizer.decode(ctx + needle)
    periods = set(tokenizer.encode("."))
    at = int(len(ctx) * (percent(depth) / 100))
    while at > 0 and ctx[at - 1] not in periods:
        at -= 1
    return tokenizer.decode(ctx[:at] + needle + ctx[at:])


def kamradt_messages(context: str) -> list[dict]:
    return [{"role": "system", "content": KAMRADT_SYSTEM}, {"role": "user", "content": context},
            {"role": "user", "content": KAMRADT_QUESTION + KAMRADT_SUFFIX}]


def helmet_kv_text(length: int, depth: float, rng: random.Random) -> tuple[str, str]:
    """(prompt text, answer) of HELMET's json_kv at `length` (a key of HELMET_PAIRS): the pairs' JSON first,
    the asked pair at index round(depth (n - 1)), two worked examples, the quoted key, the answer prefix."""
    if length not in HELMET_PAIRS:
        raise UserError(f"--lengths {length}: HELMET's json_kv is defined at {','.join(map(str, sorted(HELMET_PAIRS)))} "
                        "only (a fixed number of pairs per length)")

    def new_uuid():
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    n = HELMET_PAIRS[length]
    pairs = [(new_uuid(), new_uuid()) for _ in range(n + HELMET_SHOTS)]
    pairs, demos = pairs[:n], pairs[n:]
    key, value = pairs[round(depth * (n - 1))]
    records = ",\n".join(f'{" " if i else "{"}"{k}": "{v}"' for i, (k, v) in enumerate(pairs)) + "}"
    demo_text = "\n\n".join(HELMET_DEMO.format(key=f'"{k}"', value=" " + v) for k, v in demos) + "\n\n"
    user = HELMET_USER.format(context="JSON data:\n" + records, demos=demo_text, question=f'"{key}"')
    return user + "\n" + HELMET_ANSWER_PREFIX, value


def make_prompt(task: str, protocol: str, tokenizer, length: int, depth: float, rng: random.Random,
                template: str | None, haystack: str | None) -> tuple[list[int], str, int, None]:
    """(ids, reference, max_new_tokens, None: no probe index) of one prompt of a published protocol."""
    if task == "kv":
        text, value = helmet_kv_text(length, depth, rng)
        if template is None:  # HELMET's recall default: the prompt as completion text, BOS by the tokenizer
            ids = render_turns(tokenizer, None, [{"role": "user", "content": text}])
        else:  # HELMET with use_chat_template: its default system message, the answer prefix left out
            ids = render_turns(tokenizer, template, [{"role": "system", "content": "You are a helpful assistant."},
                                                    {"role": "user", "content": text.rsplit("\n", 1)[0]}])
        return ids, value, HELMET_NEW_TOKENS, None
    if protocol == "llama3-80k":
        text = llama3_80k_text(tokenizer, haystack, length, depth)
        return render_turns(tokenizer, template, [{"role": "user", "content": text}]), L80K_NEEDLE, L80K_NEW_TOKENS, None
    context = kamradt_context(tokenizer, haystack, length, depth)
    return render_turns(tokenizer, template, kamradt_messages(context)), KAMRADT_NEEDLE, KAMRADT_NEW_TOKENS, None
