"""RULER's 13 tasks as NVIDIA runs them: prompts fitted to a length, RULER's jsonl rows, RULER's scorers.
No model here.

Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?"
(arXiv 2404.06654), sec. 3. The facts below (templates, answer prefixes, tokens to generate, sizes, depth
grid, fitting steps) are read from the reference implementation, NVIDIA/RULER: scripts/synthetic.yaml,
scripts/data/synthetic/{constants,niah,variable_tracking,common_words_extraction,freq_words_extraction,
qa}.py, scripts/data/{prepare,template}.py and scripts/eval/synthetic/constants.py (the metrics).

    niah_*    "One of the special magic {v} for {key} is: {value}." needles in a haystack of essays (the Paul
              Graham essays, --haystack), of the noise line, or of other needles; keys adjective-noun words
              from wonderwords' lists, or UUIDs; values 7-digit numbers or UUIDs; string_match_all.
    vt        variable tracking: one chain "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ... (4 hops) among
              noise lines, after one worked example; the 5 names; string_match_all.
    cwe       common words extraction: "1. w 2. w ..." with 10 words 30 times and the others 3 times (6 and 1
              below 4096), words from wonderwords' nouns, adjectives and verbs, after one worked example
              (40 words 10/3 times; 20 words 3/1 below 4096); the 10; string_match_all.
    fwe       frequent words extraction: coded 6-letter words, rank k written floor(N k^-a / zeta(a)) times
              (a = 2) over (L - 50) // 50 types, rank 1 replaced by "..."; ranks 2-4; string_match_all.
    qa_1/2    SQuAD v2 / HotpotQA documents around a question (eval_ruler_qa.py); string_match_part.

Length. A prompt is model template(task template) + answer prefix (prepare.py), and its tokens plus the
task's tokens_to_generate (niah 128, vt 30, cwe 120, fwe 50, qa 32) stay <= L. The haystack count n (essay
words, noise lines, needles, list words, documents) is RULER's: a binary search over n on one draw, then
each sample starts from that n and steps down by the task's increment until it fits (fwe: RULER's coarse
upward search in steps of (L - 50) // 32 words, then steps down). The model gets bos first when its
tokenizer adds one by default; bos is counted against L here (RULER's `length` does not count it).

Depth law. Essay haystacks: each needle's depth drawn without replacement from DEPTHS (40 points, 0-100%),
the needle going after sentence int(sentences * depth / 100). Noise and needle haystacks, and vt: distinct
slots drawn uniformly among the n haystack lines.

Metrics (RULER's, as fractions instead of percentages), lower-case substring tests after postprocess:
    string_match_all(pred, R)  = |{r in R : r in pred}| / |R|
    string_match_part(pred, R) = max_{r in R} [r in pred]

Note: where this departs from the reference. Essays are split into sentences by a regular expression
(a sentence ends at . ! or ? before white space), where RULER uses nltk's punkt. A word key is an adjective
and a noun drawn independently from wonderwords' de-duplicated lists (RULER draws from their sorted product
set: the same law unless two pairs spell the same string). cwe stops at wonderwords' 8,166 distinct words
(RULER then draws from its own English list, past ~100K tokens). Below one fitting step (RULER's increments
assume a subword tokenizer; a byte-level model's essay step of 500 words can exceed L) the count steps down by
a tenth, where RULER would retry forever. The row's `index` is the sample number (RULER's niah
rows carry the answer's character offset there). The niah singular edit ('Some' -> 'A', 'are' -> 'is', ...)
touches the task template only (RULER's touches the model template too). Seeds are per sample, so our
prompts are RULER's in law, not draw for draw.

Notation: L requested length, n haystack count, T prompt tokens.
"""
from __future__ import annotations

import functools
import json
import math
import random
import re
import string
import uuid
from pathlib import Path

import eval_ruler_qa
from errors import UserError
from outputs import atomic_write_text
from eval_tasks import haystack_text
from tokenizer import CHAT_TEMPLATES, chat_template_for

# ----------------------------------------------------------------------------- constants

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
# synthetic.yaml: haystack, key kind, value kind, keys, values per key, keys asked
NIAH = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 1, 1, 4),
}
# synthetic/constants.py: (task template, answer prefix, tokens_to_generate) per family
TEMPLATES = {
    "niah": ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
             "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
             "magic {type_needle_v} for {query} mentioned in the provided text?",
             " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128),
    "vt": ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
           "Question: Find all variables that are assigned the value {query} in the text above.",
           " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
           "assigned the value {query}, they are: ", 30),
    "cwe": ("Below is a numbered list of words. In these words, some appear more often than others. Memorize "
            "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
            "above list?", " Answer: The top 10 words that appear most often in the list are:", 120),
    "fwe": ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
            "the dots '....'. What are the three most frequently appeared words in the above coded text?",
            " Answer: According to the coded text above, the three most frequently appeared words are:", 50),
    "qa": ("Answer the question based on the given documents. Only give me the answer and do not output any "
           "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
           "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
           " Answer:", 32),
}
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)): no value is x.5
SEED = 42  # RULER's default random_seed; its fixed-seed shuffles use it
VT_HOPS, VT_ICL_TOKENS = 4, 500  # the worked example fits 500 tokens (3-letter names, value 12345)
CWE_COMMON = 10
FWE_ALPHA, FWE_WORD_LEN, FWE_TOKENS_PER_TYPE = 2.0, 6, 50
DEFAULT_SAMPLES, QUICK_SAMPLES = 500, 5  # RULER's num_samples; --samples quick for smoke runs
TEMPLATE_KINDS = ("base", "chat")


def family(task: str) -> str:
    return "niah" if task in NIAH else "qa" if task in eval_ruler_qa.DATASETS else task


def tokens_to_generate(task: str) -> int:
    return TEMPLATES[family(task)][2]


# ----------------------------------------------------------------------------- pure functions: scoring


def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: control characters become newlines, then strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of the references found in the prediction, case-insensitive (RULER's niah/vt/cwe/fwe)."""
    if not references:
        raise ValueError("string_match_all: no references")
    pred = postprocess(prediction).lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1.0 if any reference is found in the prediction, case-insensitive, else 0.0 (RULER's qa)."""
    if not references:
        raise ValueError("string_match_part: no references")
    pred = postprocess(prediction).lower()
    return float(any(r.lower() in pred for r in references))


def score_ruler(task: str, prediction: str, references: list[str]) -> float:
    """RULER's metric for the task, in [0, 1]."""
    check_tasks([task])
    return (string_match_part if family(task) == "qa" else string_match_all)(prediction, references)


def summarize(scores: list[float]) -> dict:
    """{"score": mean, "se": sample standard deviation / sqrt(n) (None for one sample), "n": n}."""
    n = len(scores)
    mean = sum(scores) / n
    se = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else None
    return {"score": mean, "se": se, "n": n}


def average(cells: list[dict]) -> dict:
    """The mean of task scores with its standard error sqrt(sum se^2) / k (independent tasks)."""
    k, ses = len(cells), [c["se"] for c in cells]
    se = None if None in ses else math.sqrt(sum(s ** 2 for s in ses)) / k
    return {"score": sum(c["score"] for c in cells) / k, "se": se, "n": sum(c["n"] for c in cells)}


def cell_text(cell: dict) -> str:
    """'0.812 ± 0.017', or '0.812 (n=1)' without a standard error."""
    return f"{cell['score']:.3f} " + (f"(n={cell['n']})" if cell["se"] is None else f"± {cell['se']:.3f}")


def average_name(tasks) -> str:
    """'RULER' only for all 13 tasks; otherwise the tasks the average covers."""
    return "RULER" if set(tasks) == set(TASKS) else f"mean of {len(tasks)} tasks ({', '.join(tasks)})"


def parse_tasks(text: str | None, qa_files: dict) -> list[str]:
    """--tasks: a comma list, or by default all 13 less the qa tasks whose file (qa_files) is not given."""
    if text is None:
        return [t for t in TASKS if qa_files.get(t, "") is not None]
    tasks = [t for t in (x.strip() for x in text.split(",")) if t]
    check_tasks(tasks)
    return tasks


def parse_samples(text: str) -> int:
    """--samples: an integer >= 1, or 'quick' (QUICK_SAMPLES)."""
    if text == "quick":
        return QUICK_SAMPLES
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--samples {text!r}: an integer >= 1 (RULER uses {DEFAULT_SAMPLES}), or 'quick'")
    return int(text)


def check_tasks(tasks) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserError(f"--tasks: unknown {unknown or 'empty list'}; choose from {','.join(TASKS)}")


# ----------------------------------------------------------------------------- pure functions: draws


@functools.lru_cache(maxsize=1)
def wonderwords_lists() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(nouns, adjectives, verbs) of the wonderwords package, each de-duplicated and sorted (RULER's source)."""
    try:
        from wonderwords import RandomWord
    except ImportError:
        raise UserError("RULER's keys and words come from the wonderwords package: pip install wonderwords==3.0.1"
                        ) from None
    lists = RandomWord()  # its default categories are the package's nounlist/adjectivelist/verblist.txt
    return tuple(tuple(sorted(set(lists.filter(include_categories=[k])))) for k in ("noun", "adjective", "verb"))


def needle_value(kind: str, rng: random.Random) -> str:
    """A needle key or value as RULER draws it: 7 digits, a UUID4, or an adjective-noun word."""
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    nouns, adjectives, _ = wonderwords_lists()
    return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"


def zeta(alpha: float, terms: int = 100) -> float:
    """Riemann zeta(a) = sum_k k^-a for a > 1 (scipy.special.zeta in RULER): sum_{k<n} k^-a plus the
    Euler-Maclaurin tail n^(1-a)/(a-1) + n^-a/2 + a n^(-a-1)/12, error O(n^(-a-3)) (~1e-11 at a = 2)."""
    n = terms
    return (sum(k ** -alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2
            + alpha * n ** (-alpha - 1) / 12)


def split_sentences(text: str) -> list[str]:
    """Sentences: a sentence ends at . ! or ? (and closing quotes/brackets) before white space."""
    return [s for s in re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+", text.strip()) if s]


def ruler_haystack(paths: list[str] | None) -> tuple[list[str], bool]:
    """(haystack words, is RULER's): --haystack files (RULER's PaulGrahamEssays.json, {"text": ...}, or plain
    text), else Python's reference manual (not RULER's haystack); words as RULER splits them."""
    if not paths:
        return re.sub(r"\s+", " ", haystack_text(None)).split(" "), False
    texts = []
    for p in map(Path, paths):
        if not p.is_file():
            raise UserError(f"--haystack {p}: no such file (RULER's PaulGrahamEssays.json; see docs/evaluation.md)")
        text = p.read_text(encoding="utf-8", errors="replace")
        if p.suffix == ".json":
            try:
                text = json.loads(text)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"--haystack {p}: not RULER's essay JSON ({{\"text\": \"...\"}})") from None
            if not isinstance(text, str):
                raise UserError(f"--haystack {p}: its \"text\" field is not a string")
        texts.append(text)
    words = re.sub(r"\s+", " ", " ".join(texts)).strip().split(" ")
    if words == [""]:
        raise UserError(f"--haystack {', '.join(paths)}: no text")
    return words, True


def insert_in_sentences(words: list[str], n: int, items: list[str], rng: random.Random) -> str:
    """RULER's essay insertion: n words (repeated if short), split into sentences, each item after sentence
    int(sentences * depth / 100) for depths drawn without replacement from DEPTHS, joined by spaces."""
    text = " ".join((words * -(-n // len(words)))[:n])
    sents = split_sentences(text)
    cuts = [0] + sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(items))) + [len(sents)]
    pieces = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        pieces.append(" ".join(sents[a:b]))
        if i < len(items):
            pieces.append(items[i])
    return " ".join(pieces)


def insert_in_lines(lines: list[str], items: list[str], rng: random.Random) -> list[str]:
    """RULER's line insertion: items before distinct line slots drawn uniformly, the first item at the last
    slot (RULER zips the items with the slots in decreasing order)."""
    lines = list(lines)
    for index, item in zip(sorted(rng.sample(range(len(lines)), len(items)), reverse=True), items):
        lines.insert(index, item)
    return lines


# ----------------------------------------------------------------------------- prompts


class RulerData:
    """RULER's prompts for one tokenizer and template: `row(task, L, i)` is sample i of a task at length L,
    as RULER's generators write it (index, input, outputs, length, length_w_model_temp, answer_prefix,
    token_position_answer) plus `ids`, the model's prompt tokens.

    template: None for RULER's `base` template, else a chat template name (tokenizer.CHAT_TEMPLATES): the task
    text goes in the user turn and the answer prefix after the generation prompt. haystack: the essay words
    (ruler_haystack). qa: {task: (questions, documents)} (eval_ruler_qa.read). Each (task, L) fits its haystack
    count once; sample i draws from a generator seeded by (seed, task, L, i).
    """

    def __init__(self, tokenizer, template: str | None, haystack: list[str], qa: dict | None = None, seed: int = 0):
        self.tok, self.seed, self.haystack, self.qa, self.template = tokenizer, seed, haystack, qa or {}, template
        self.chat = ("", "")
        if template is not None:
            mark = "\x00TASK\x00"
            segs = CHAT_TEMPLATES[template]([{"role": "user", "content": mark}], True)
            self.chat = tuple("".join(s for s, _ in segs).split(mark))
        self.bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        self.fitted: dict = {}

    def count(self, text: str) -> int:
        return len(self.tok.encode(text))

    def rng(self, *parts) -> random.Random:
        return random.Random(":".join(map(str, (self.seed,) + parts)))

    # one draw of each task at haystack count n: (task text with answer prefix, outputs)

    def wrap(self, task_text: str, answer_prefix: str) -> str:
        """prepare.py: model template around the task template, then the answer prefix."""
        return self.chat[0] + task_text + self.chat[1] + answer_prefix

    def niah(self, task: str, n: int, rng: random.Random) -> tuple[str, list[str]]:
        hay, key_kind, kind, n_keys, n_values, n_asked = NIAH[task]
        n_keys = max(n_keys, n_asked)
        keys, values, needles = [], [], []
        for _ in range(n_keys):
            keys.append(needle_value(key_kind, rng))
            values.append([needle_value(kind, rng) for _ in range(n_values)])
            needles += [NEEDLE.format(type_needle_v=kind, key=keys[-1], value=v) for v in values[-1]]
        random.Random(SEED).shuffle(needles)
        if hay == "essay":
            context = insert_in_sentences(self.haystack, n, needles, rng)
        else:
            lines = [NOISE] * n if hay == "noise" else [
                NEEDLE.format(type_needle_v=kind, key=needle_value(key_kind, rng), value=needle_value(kind, rng))
                for _ in range(n)]
            context = "\n".join(insert_in_lines(lines, needles, rng))
        asked = rng.sample(range(n_keys), n_asked)
        query = [keys[i] for i in asked]
        query = ", ".join(query[:-1]) + ", and " + query[-1] if n_asked > 1 else query[0]
        body, prefix, _ = TEMPLATES["niah"]
        if n_asked * n_values == 1:  # RULER's singular edit
            body, prefix = ([t.replace("Some", "A").replace("are all", "is").replace("are", "is")
                             .replace("answers", "answer") for t in (body, prefix)])
            kind = kind[:-1]
        return (self.wrap(body.format(type_needle_v=kind, context=context, query=query),
                          prefix.format(type_needle_v=kind, query=query)),
                [v for i in asked for v in values[i]])

    def vt_chain(self, rng: random.Random, name_len: int, value: str | None) -> tuple[list[str], list[str]]:
        """(names, statements) of one chain: VAR n0 = value, VAR n1 = VAR n0 , ... (RULER's generate_chains)."""
        names = []
        while len(names) < VT_HOPS + 1:  # RULER draws until the names are distinct
            names = list(dict.fromkeys(names + ["".join(rng.choices(string.ascii_uppercase, k=name_len))]))
        value = value or str(rng.randint(10000, 99998))  # numpy's randint(10000, 99999) excludes the top
        return names, [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]

    def vt_text(self, n: int, rng: random.Random, icl: bool) -> tuple[str, list[str]]:
        names, chain = self.vt_chain(rng, 3 if icl else 5, "12345" if icl else None)
        value = chain[0].split("=")[-1].strip()
        lines = [NOISE] * n
        for j, pos in enumerate(sorted(rng.sample(range(n), len(chain)))):  # RULER: insert at pos + j
            lines.insert(pos + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        body, prefix, _ = TEMPLATES["vt"]
        text = body.format(context=context, query=value) + prefix.format(num_v=VT_HOPS + 1, query=value)
        return (text if icl else self.wrap(body.format(context=context, query=value),
                                           prefix.format(num_v=VT_HOPS + 1, query=value))), names

    def vt(self, L: int, n: int, rng: random.Random) -> tuple[str, list[str]]:
        """The task with the worked example before the task template, names and value redrawn (randomize_icl)."""
        example = self.vt_example(L)
        for name in example.strip().split()[-(VT_HOPS + 1):]:
            example = example.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
        example = example.replace("12345", str(rng.randint(10000, 99998)))
        text, names = self.vt_text(n, rng, icl=False)
        cut = text.index(TEMPLATES["vt"][0][:20])
        return text[:cut] + example + "\n" + text[cut:], names

    def cwe(self, L: int, n: int, rng: random.Random) -> tuple[str, list[str]]:
        nouns, adjectives, verbs = wonderwords_lists()
        words = sorted(set(nouns + adjectives + verbs))
        body, prefix, _ = TEMPLATES["cwe"]

        def example(count, f_common, f_rare):
            if count > len(words):
                raise UserError(f"--lengths {L}: cwe needs more than wonderwords' {len(words)} words; "
                                "use a shorter length for cwe")
            chosen = rng.sample(words, count)
            entries = chosen[:CWE_COMMON] * f_common + chosen[CWE_COMMON:] * f_rare
            random.Random(SEED).shuffle(entries)
            return " ".join(f"{i + 1}. {w}" for i, w in enumerate(entries)), chosen[:CWE_COMMON]

        small = L < 4096
        shot, shot_answer = example(*((20, 3, 1) if small else (40, 10, 3)))
        context, answer = example(n, *((6, 1) if small else (30, 3)))
        shot = self.wrap(body.format(context=shot), prefix) + " " + " ".join(
            f"{i + 1}. {w}" for i, w in enumerate(shot_answer))
        return shot + "\n" + self.wrap(body.format(context=context), prefix), answer

    def fwe(self, L: int, n: int, rng: random.Random) -> tuple[str, list[str]]:
        size = (L - tokens_to_generate("fwe")) // FWE_TOKENS_PER_TYPE
        vocab = set()
        while len(vocab) < size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN)))
        vocab = sorted(vocab)
        random.Random(SEED).shuffle(vocab)
        vocab[0] = "..."  # rank 1 is noise
        z = zeta(FWE_ALPHA)
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(n * k ** -FWE_ALPHA / z))]
        random.Random(SEED).shuffle(words)
        body, prefix, _ = TEMPLATES["fwe"]
        return self.wrap(body.format(context=" ".join(words)), prefix), vocab[1:4]

    def qa_text(self, task: str, index: int, n: int, rng: random.Random) -> tuple[str, list[str]]:
        qas, docs = self.qa[task]
        qa = qas[index % len(qas)]
        body, prefix, _ = TEMPLATES["qa"]
        return (self.wrap(body.format(context=eval_ruler_qa.documents(qa, docs, n, rng, SEED), query=qa["query"]),
                          prefix), qa["outputs"])

    # fitting and rows

    def fits(self, text: str, limit: int) -> bool:
        return len(self.bos) + self.count(text) <= limit

    def fit(self, build, limit: int, step: int, rng: random.Random, probe: int, cap: int | None, floor: int = 1
            ) -> int:
        """RULER's binary search: the largest n in [step, 3 x estimate] (at most cap) whose draw fits `limit`
        tokens, the estimate from one draw at n = probe; if none does, the same search in [floor, step).
        The result is itself a draw: where n + 1 lines straddle the limit, RULER's n (and so whether most
        samples step down) follows the luck of the probes."""
        per = self.count(build(probe, rng)[0]) / probe
        hi = min(max(int(limit / per * 3), 2 * step), cap or math.inf)
        for lo in (step, floor):  # RULER's range; below it only where nothing from `step` up fits
            best = None
            while lo <= hi:  # a fresh draw at each probe, as RULER's
                mid = (lo + hi) // 2
                if self.fits(build(mid, rng)[0], limit):
                    best, lo = mid, mid + 1
                else:
                    hi = mid - 1
            if best is not None:
                return best
            hi = step - 1
        return floor

    def fit_fwe(self, build, limit: int, step: int, rng: random.Random) -> int:
        """RULER's fwe search: from limit // 6 words up in steps until the text reaches the limit, one step
        back."""
        n, state = limit // FWE_WORD_LEN, rng.getstate()
        while self.fits(build(n, rng)[0], limit - 1):
            n += step
            rng.setstate(state)
        return max(step, n - step)

    def draw(self, build, n: int, limit: int, step: int, rng: random.Random, floor: int = 1) -> tuple[str, list[str]]:
        """Sample at count n, stepping n down by `step` while it does not fit (RULER's retry loop); at or
        below one step it steps down by a tenth, to `floor` at least (RULER retries the same count forever)."""
        state = rng.getstate()
        while True:
            text, outputs = build(n, rng)
            if self.fits(text, limit) or n <= floor:
                return text, outputs
            n = max(floor, n - step if n > step else n - max(1, n // 10))
            rng.setstate(state)

    def vt_example(self, L: int) -> str:
        """RULER's worked example: a 3-letter chain with value 12345 in as many noise lines as fit 500 tokens
        (steps of 5), its answer after the answer prefix, then a newline."""
        if ("vt-icl", L) not in self.fitted:
            build, limit = (lambda n, rng: self.vt_text(n, rng, icl=True)), VT_ICL_TOKENS + len(self.bos)
            n = self.fit(build, limit, 5, self.rng("vt-icl", L, "fit"), 5, None, VT_HOPS + 1)
            text, names = self.draw(build, n, limit, 5, self.rng("vt-icl", L), VT_HOPS + 1)
            self.fitted["vt-icl", L] = text + " " + " ".join(names) + "\n"
        return self.fitted["vt-icl", L]

    def builder(self, task: str, L: int, index: int):
        """(build(n, rng), step, probe, cap) of a task at L: RULER's increments and estimate probes."""
        if task in NIAH:
            step = 500 if NIAH[task][0] == "essay" else 25 if L >= 4096 else 5
            return (lambda n, rng: self.niah(task, n, rng)), step, step, None
        if task == "vt":
            step = 10 if L >= 4096 else 5
            return (lambda n, rng: self.vt(L, n, rng)), step, step, None
        if task == "cwe":
            cap = len(set(sum(wonderwords_lists(), ())))
            return (lambda n, rng: self.cwe(L, n, rng)), 10, min(4096, cap), cap
        if task == "fwe":
            return (lambda n, rng: self.fwe(L, n, rng)), max(1, (L - tokens_to_generate("fwe")) // 32), None, None
        if task not in self.qa:
            self.qa[task] = eval_ruler_qa.read(task, None)
        return (lambda n, rng: self.qa_text(task, index, n, rng)), 10, 10, None

    def row(self, task: str, L: int, index: int) -> dict:
        """Sample `index` of a task at length L: RULER's jsonl fields plus `ids`."""
        t2g = tokens_to_generate(task)
        build, step, probe, cap = self.builder(task, L, index)
        floor = (VT_HOPS + 1 if task == "vt" else CWE_COMMON if task == "cwe" else  # the fewest lines/words
                 max(NIAH[task][3], NIAH[task][5]) * NIAH[task][4] if task in NIAH and NIAH[task][0] != "essay" else 1)
        if (task, L) not in self.fitted:  # on sample 0's draw, as RULER fits once per task and length
            fit_build, limit, rng = self.builder(task, L, 0)[0], L - t2g, self.rng(task, L, "fit")
            if task == "vt":  # RULER fits the task alone against L minus the worked example's tokens
                fit_build = lambda n, r: self.vt_text(n, r, icl=False)  # noqa: E731
                limit -= self.count(self.vt_example(L))
            n = (self.fit_fwe(fit_build, limit, step, rng) if task == "fwe"
                 else self.fit(fit_build, limit, step, rng, probe, cap, floor))
            if cap is not None and n == cap:
                raise UserError(f"--lengths {L}: {task} would need more than wonderwords' {cap} words; use a "
                                f"shorter length for {task}")
            self.fitted[task, L] = n
        text, outputs = self.draw(build, self.fitted[task, L], L - t2g, step, self.rng(task, L, index), floor)
        ids = self.bos + self.tok.encode(text)
        if len(ids) + t2g > L:
            raise UserError(f"--lengths {L}: too short for {task}; its template, shortest haystack and {t2g} "
                            f"tokens to generate need {len(ids) + t2g} tokens")
        cut = text.rfind(TEMPLATES[family(task)][1][:10])  # RULER locates the answer prefix by its start
        length = self.count(text) + t2g
        row = {"index": index, "input": text[:cut], "outputs": list(outputs), "length": length,
               "length_w_model_temp": length, "answer_prefix": text[cut:]}
        if task in NIAH:  # RULER writes the answer's token position for niah only
            row["token_position_answer"] = self.count(text[:text.find(outputs[0])])
        return {**row, "ids": ids}

    def prompt(self, task: str, L: int, index: int) -> tuple[list[int], list[str], int, int | None]:
        """(ids, references, max_new_tokens, the answer's token index or None) for eval.py's probe loop."""
        r = self.row(task, L, index)
        at = r.get("token_position_answer")
        return r["ids"], r["outputs"], tokens_to_generate(task), None if at is None else at + len(self.bos)


# ----------------------------------------------------------------------------- public entry points


def setup(tokenizer, template: str | None, chat_name: str | None, haystack: list[str] | None, qa_files: dict,
          tasks: list[str], seed: int) -> tuple[RulerData, bool]:
    """(RulerData, haystack is RULER's) for eval.py: template 'base', 'chat' or None (chat when the tokenizer
    carries a chat template, as an instruct model's does); qa_files {task: path} read for the asked qa tasks."""
    template = template or ("chat" if tokenizer.chat_template else "base")
    chat = chat_template_for(tokenizer, chat_name) if template == "chat" else None
    words, is_ruler = ruler_haystack(haystack)
    qa = {t: eval_ruler_qa.read(t, qa_files.get(t)) for t in tasks if t in eval_ruler_qa.DATASETS}
    return RulerData(tokenizer, chat, words, qa, seed), is_ruler


def write_validation(data: RulerData, lengths: list[int], tasks: list[str], samples: int, out) -> list[Path]:
    """DIR/<L>/<task>/validation.jsonl in RULER's format (RULER's evaluator reads them), each written whole."""
    written = []
    for L in lengths:
        for task in tasks:
            rows = [data.row(task, L, i) for i in range(samples)]
            path = Path(out) / str(L) / task / "validation.jsonl"
            atomic_write_text(path, "".join(json.dumps({k: v for k, v in r.items() if k != "ids"}) + "\n"
                                            for r in rows))
            written.append(path)
    return written
