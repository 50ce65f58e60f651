"""RULER's synthetic recall tasks as text: seeded prompt builders with known answers, and RULER's scorers.
No model here.

Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?"
(arXiv 2404.06654), sec. 3 (the tasks). Task names, templates, answer prefixes, sizes and metrics follow the
reference implementation, NVIDIA/RULER: scripts/synthetic.yaml (13 configs; the two QA ones need SQuAD and
HotpotQA and are not here),
scripts/data/synthetic/{constants,niah,variable_tracking,common_words_extraction,freq_words_extraction}.py
and scripts/eval/synthetic/constants.py (the metrics).

    niah_single_1    a needle "One of the special magic numbers for {key} is: {value}." in repeated noise
                     ("The grass is green. ..."); key an adjective-noun word, value 7 digits; string_match_all.
    niah_single_2    the same needle in real text; string_match_all.
    niah_single_3    real text, a UUID value; string_match_all.
    niah_multikey_1  real text; the asked needle among 3 distractor needles with other keys; string_match_all.
    niah_multikey_2  a haystack made only of needles with other keys; string_match_all.
    niah_multikey_3  the same with UUID keys and UUID values; string_match_all.
    niah_multivalue  one key in 4 needles with 4 values; all 4 asked; string_match_all.
    niah_multiquery  4 keys asked at once ("a, b, c, and d"); their 4 values; string_match_all.
    vt               variable tracking: a chain "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ... (1 chain,
                     4 hops) in noise lines, after one worked example; the 5 names bound to the value;
                     string_match_all.
    cwe              common words extraction: a numbered list "1. w 2. w ..." where 10 words appear f_c times
                     and the others f_u times ((f_c, f_u) = (30, 3), or (6, 1) below 4096 tokens), after one
                     worked example; the 10; string_match_all.
    fwe              frequent words extraction: coded 6-letter words, word k drawn n_k = floor(N k^-a / zeta(a))
                     times (a = 2), rank 1 the noise word "..."; ranks 2-4; string_match_all.

Metrics (RULER's, as fractions instead of percentages): with lower-case substring tests,
    string_match_all(pred, R)  = |{r in R : r in pred}| / |R|
    string_match_part(pred, R) = max_{r in R} [r in pred]        (RULER's QA metric, for completeness)

A prompt is [chat prefix] [worked example] lead, context, question [chat suffix] answer prefix: it ends with
RULER's answer prefix, as RULER appends that after the model's template. Pieces are token-id lists built one
by one (tasks.py's convention), so L - u < T <= L for one filler unit u (a noise line, a distractor needle, an
uncommon word with its f_u entries, one "..."; real text is cut to the exact token). Depth d in [0, 1] puts
the first needle (the asked key's, vt's first assignment) at the filler boundary whose offset is nearest
d * (context tokens); in real text that boundary is a sentence start. The other needles and the later hops go
to random boundaries (the hops after the first, in order). cwe and fwe have no depth: their words are shuffled.

Note: where this departs from the reference. `length` is the prompt (RULER's max_seq_length also counts the
tokens to generate). Worked examples sit inside the user turn (RULER formats cwe's with the whole model
template). Keys come from our own adjective and noun lists (RULER: wonderwords), cwe's words from Python's
reference manual and, past its ~2,500 words, made-up syllable words (RULER: wonderwords, then a large English
list). Values are distinct where RULER leaves collisions to chance (vt's chain values), and no distractor
needle reuses an asked key.

Notation: L requested length, T prompt tokens, d depth, u one filler unit, N fwe's word budget.
"""
from __future__ import annotations

import functools
import itertools
import random
import re
import string
import uuid

from errors import UserError
from tasks import chat_wrap, haystack_text, sentence_starts

# ----------------------------------------------------------------------------- constants

TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
         "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
# RULER's synthetic.yaml: haystack, key kind, value kind, keys, values per key, keys asked.
NIAH = {
    "niah_single_1": ("noise", "words", "numbers", 1, 1, 1),
    "niah_single_2": ("essay", "words", "numbers", 1, 1, 1),
    "niah_single_3": ("essay", "words", "uuids", 1, 1, 1),
    "niah_multikey_1": ("essay", "words", "numbers", 4, 1, 1),
    "niah_multikey_2": ("needle", "words", "numbers", 1, 1, 1),
    "niah_multikey_3": ("needle", "uuids", "uuids", 1, 1, 1),
    "niah_multivalue": ("essay", "words", "numbers", 1, 4, 1),
    "niah_multiquery": ("essay", "words", "numbers", 4, 1, 4),
}
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's, raised to fit the references

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_LEAD = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {kind} afterwards.")
NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_ANSWER = " The special magic {kind} for {query} mentioned in the provided text are"
VT_LEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
             "assigned the value {value}, they are: ")
VT_CHAINS, VT_HOPS, VT_NAME_LEN, VT_EXAMPLE_NAME_LEN = 1, 4, 5, 3
VT_EXAMPLE_TOKENS, VT_EXAMPLE_MIN_NOISE = 500, 5  # RULER fits its worked example in 500 tokens, >= 5 lines
CWE_LEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n")
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER = " Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON, CWE_SMALL = 10, 4096
CWE_FREQ = {True: (6, 1), False: (30, 3)}  # (f_c, f_u) by L < CWE_SMALL
CWE_EXAMPLE = {True: (20, 3, 1), False: (40, 10, 3)}  # (words, f_c, f_u) of the worked example
FWE_LEAD = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words.")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?")
FWE_ANSWER = " Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_ALPHA, FWE_WORD_LEN, FWE_TOKENS_PER_TYPE, FWE_NOISE = 2.0, 6, 50, "..."

ADJECTIVES = """able agile amber ancient bitter bold brave bright brisk calm candid cheerful clever cosmic crisp
curious damp dark eager early elegant fancy fierce fragile gentle giant glad golden grand green happy hollow
humble icy jolly keen kind lively lofty loud lucky mellow merry mighty modest narrow noble odd pale placid
polite proud quick quiet rapid rare rich rough royal rustic scarlet shiny silent silver sleepy slow smooth
solid stark sturdy sunny swift tender tidy tiny vivid warm wild witty young zealous""".split()
NOUNS = """anchor apple arrow badge basket beacon bison blossom bridge brook button cactus camel canyon castle
cedar cherry cloud comet coral cottage crystal dolphin dragon eagle ember falcon feather fern forest fountain
garden glacier harbor hazel island jacket jungle kettle lantern lemon lizard maple marble meadow mirror monkey
mountain ocean orchid otter owl panther parrot pebble pepper pillow planet pond quartz rabbit raven river
rocket saddle salmon shadow shell spider squirrel statue thunder tiger tulip turtle valley violin walrus
willow window zebra""".split()
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"  # made-up cwe words: three consonant-vowel syllables


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


# ----------------------------------------------------------------------------- pure functions: draws


def random_value(kind: str, rng: random.Random) -> str:
    """A needle key or value as RULER draws it: 7 digits, a UUID4, or an adjective-noun word."""
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def zeta(alpha: float, terms: int = 100) -> float:
    """Riemann zeta(a) = sum_k k^-a for a > 1 (scipy.special.zeta in RULER): sum_{k<n} k^-a plus the
    Euler-Maclaurin tail n^(1-a)/(a-1) + n^-a/2 + a n^(-a-1)/12, error O(n^(-a-3)) (~1e-11 at a = 2)."""
    n = terms
    return (sum(k ** -alpha for k in range(1, n)) + n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2
            + alpha * n ** (-alpha - 1) / 12)


@functools.lru_cache(maxsize=1)
def manual_words() -> tuple[str, ...]:
    """Distinct lower-case words of 4-12 letters in Python's reference manual (tasks.haystack_text), sorted."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,12}\b", haystack_text(None)))))


def word_stream(rng: random.Random):
    """cwe's words: the manual's words in random order, then fresh made-up words (never a repeat)."""
    real = manual_words()
    yield from rng.sample(real, len(real))
    seen = set(real)
    while True:
        w = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(3))
        if w not in seen:
            seen.add(w)
            yield w


def distinct(draw, n: int, avoid=()) -> list:
    """n distinct results of draw(), none in `avoid`, in the order drawn."""
    out = []
    while len(out) < n:
        x = draw()
        if x not in out and x not in avoid:
            out.append(x)
    return out


# ----------------------------------------------------------------------------- pure functions: layout


def frame(tokenizer, template: str | None, lead: str, question: str, answer: str, example: list[int] = ()
          ) -> tuple[list[int], list[int]]:
    """(head, tail) around the context: chat prefix + worked example + lead, and question + chat suffix +
    answer prefix (`tasks.chat_wrap` puts the question inside the user turn, after the context)."""
    prefix, suffix = chat_wrap(tokenizer, template, question)
    return prefix + list(example) + tokenizer.encode(lead), suffix + tokenizer.encode(answer)


def room(task: str, length: int, fixed: int, unit: int) -> int:
    """Tokens left for filler, L - fixed; a UserError if not even one filler unit fits."""
    if length - fixed < unit:
        raise UserError(f"--lengths {length}: too short for {task}; it needs at least {fixed + unit} tokens")
    return length - fixed


def line_units(budget: int, next_line) -> list[list[int]]:
    """Filler lines from next_line() while the next one fits in `budget` tokens."""
    units = []
    while len(line := next_line()) <= budget:
        units.append(line)
        budget -= len(line)
    return units


def text_units(hay_ids: list[int], hay_starts: list[int], budget: int) -> list[list[int]]:
    """The haystack's first `budget` tokens (the haystack repeated if shorter), cut at its sentence starts."""
    if not hay_ids:
        raise UserError("--haystack: the haystack text has no tokens")
    reps = -(-budget // len(hay_ids))
    ids = (hay_ids * reps)[:budget]
    cuts = sorted({0} | {s + r * len(hay_ids) for r in range(reps) for s in hay_starts
                         if s + r * len(hay_ids) < budget})
    return [ids[a:b] for a, b in zip(cuts, cuts[1:] + [budget])]


def depth_slot(units: list[list[int]], depth: float) -> int:
    """The unit boundary j (0 = before the first, len(units) = after the last) whose token offset is nearest
    d * (tokens of all units); ties go to the earlier boundary."""
    offsets = list(itertools.accumulate(map(len, units), initial=0))
    return min(range(len(offsets)), key=lambda j: (abs(offsets[j] - depth * offsets[-1]), j))


def interleave(units: list[list[int]], probes: list[list[int]], slots: list[int]) -> tuple[list[int], int]:
    """(ids, index of probes[0]): the units with probe i inserted at boundary slots[i]; probes sharing a
    boundary keep their order."""
    at_slot: dict[int, list[int]] = {}
    for i, s in enumerate(slots):
        at_slot.setdefault(s, []).append(i)
    out, first = [], 0
    for j in range(len(units) + 1):
        for i in at_slot.get(j, []):
            first = len(out) if i == 0 else first
            out += probes[i]
        if j < len(units):
            out += units[j]
    return out, first


# ----------------------------------------------------------------------------- prompts


def niah_texts(kind: str, query: str, singular: bool) -> list[str]:
    """Lead, question and answer prefix; for one asked value, RULER's own edit of its template
    ('Some' -> 'A', 'are all' -> 'is', 'are' -> 'is', 'numbers' -> 'number')."""
    texts = [NIAH_LEAD, NIAH_QUESTION, NIAH_ANSWER]
    if singular:
        kind = kind[:-1]
        texts = [t.replace("Some", "A").replace("are all", "is").replace("are", "is") for t in texts]
    return [t.format(kind=kind, query=query) for t in texts]


def niah_prompt(task, tokenizer, length, depth, rng, template, hay) -> tuple[list[int], list[str], int]:
    """(ids, references, index of the first needle) for one of the NIAH configs."""
    hay_kind, key_kind, value_kind, n_keys, n_values, n_asked = NIAH[task]
    keys = distinct(lambda: random_value(key_kind, rng), max(n_keys, n_asked))
    values = [[random_value(value_kind, rng) for _ in range(n_values)] for _ in keys]
    asked = keys[:n_asked]
    query = ", ".join(asked[:-1]) + ", and " + asked[-1] if n_asked > 1 else asked[0]
    lead, question, answer = niah_texts(value_kind, query, n_asked * n_values == 1)
    def needle(key, value):
        return NIAH_NEEDLE.format(kind=value_kind, key=key, value=value)

    def distractor():
        key = distinct(lambda: random_value(key_kind, rng), 1, avoid=keys)[0]
        return tokenizer.encode("\n" + needle(key, random_value(value_kind, rng)))

    shape = " {} " if hay_kind == "essay" else "\n{}"  # a sentence of real text (as tasks.py), or a line
    needles = [tokenizer.encode(shape.format(needle(k, v))) for k, vs in zip(keys, values) for v in vs]
    head, tail = frame(tokenizer, template, lead + ("\n" if hay_kind == "essay" else ""), "\n" + question, answer)
    noise = tokenizer.encode("\n" + NOISE)
    unit = {"essay": 1, "noise": len(noise), "needle": len(needles[0])}[hay_kind]
    budget = room(task, length, len(head) + len(tail) + sum(map(len, needles)), unit)
    if hay_kind == "essay":
        units = text_units(*hay, budget)
    else:
        units = line_units(budget, (lambda: noise) if hay_kind == "noise" else distractor)
    slots = [depth_slot(units, depth)] + [rng.randint(0, len(units)) for _ in needles[1:]]
    context, at = interleave(units, needles, slots)
    return head + context + tail, [v for vs in values[:n_asked] for v in vs], len(head) + at


def vt_chains(rng, chains: int, hops: int, name_len: int, avoid_values=()) -> list[tuple[list[str], list[str], str]]:
    """(statements, names, value) per chain: VAR n0 = value, VAR n1 = VAR n0 , ... with distinct upper-case
    names and distinct 5-digit values (RULER's generate_chains)."""
    names = distinct(lambda: "".join(rng.choices(string.ascii_uppercase, k=name_len)), chains * (hops + 1))
    values = distinct(lambda: str(rng.randint(10000, 99999)), chains, avoid=avoid_values)
    out = []
    for c, value in enumerate(values):
        ns = names[c * (hops + 1):(c + 1) * (hops + 1)]
        hops_text = [f"VAR {b} = VAR {a} " for a, b in itertools.pairwise(ns)]
        out.append(([f"VAR {ns[0]} = {value}"] + hops_text, ns, value))
    return out


def vt_example(tokenizer, rng, avoid_values) -> list[int]:
    """RULER's worked example: one chain of 3-letter names in as many noise lines as fit 500 tokens (at
    least 5), its question, answer prefix and answer, then a blank line."""
    (lines, names, value), = vt_chains(rng, 1, VT_HOPS, VT_EXAMPLE_NAME_LEN, avoid_values)
    noise = tokenizer.encode("\n" + NOISE)
    stmts = [tokenizer.encode("\n" + s) for s in lines]
    head = tokenizer.encode(VT_LEAD)
    tail = tokenizer.encode("\n" + VT_QUESTION.format(value=value) + VT_ANSWER.format(n=VT_HOPS + 1, value=value)
                            + " " + " ".join(names) + "\n\n")
    fixed = len(head) + len(tail) + sum(map(len, stmts))
    n = max(VT_EXAMPLE_MIN_NOISE, (VT_EXAMPLE_TOKENS - fixed) // len(noise))
    return head + interleave([noise] * n, stmts, sorted(rng.randint(0, n) for _ in stmts))[0] + tail


def vt_prompt(tokenizer, length, depth, rng, template) -> tuple[list[int], list[str], int]:
    """(ids, names bound to the asked value, index of its first assignment)."""
    chains = vt_chains(rng, VT_CHAINS, VT_HOPS, VT_NAME_LEN)
    value = chains[0][2]
    example = vt_example(tokenizer, rng, [v for _, _, v in chains])
    head, tail = frame(tokenizer, template, VT_LEAD, "\n" + VT_QUESTION.format(value=value),
                       VT_ANSWER.format(n=VT_HOPS + 1, value=value), example)
    noise = tokenizer.encode("\n" + NOISE)
    stmts = [tokenizer.encode("\n" + s) for lines, _, _ in chains for s in lines]
    units = line_units(room("vt", length, len(head) + len(tail) + sum(map(len, stmts)), len(noise)), lambda: noise)
    first = depth_slot(units, depth)
    slots = [first] + sorted(rng.randint(first, len(units)) for _ in range(VT_HOPS))
    for lines, _, _ in chains[1:]:
        slots += sorted(rng.randint(0, len(units)) for _ in lines)
    context, at = interleave(units, stmts, slots)
    return head + context + tail, chains[0][1], len(head) + at


def numbered(enc, entries: list[str]) -> list[int]:
    """'1. w 2. w ...' as pieces "1." / " i." and " w", so each entry's tokens do not depend on its neighbours."""
    return [t for i, w in enumerate(entries, 1) for t in enc(f" {i}." if i > 1 else "1.") + enc(" " + w)]


def cwe_prompt(tokenizer, length, rng, template) -> tuple[list[int], list[str], int]:
    """(ids, the 10 common words, index of the list's first token)."""
    enc = functools.lru_cache(maxsize=None)(lambda s: tuple(tokenizer.encode(s)))
    small = length < CWE_SMALL
    f_c, f_u = CWE_FREQ[small]
    n_ex, fc_ex, fu_ex = CWE_EXAMPLE[small]
    words = word_stream(rng)
    ex = [next(words) for _ in range(n_ex)]
    ex_entries = ex[:CWE_COMMON] * fc_ex + ex[CWE_COMMON:] * fu_ex
    rng.shuffle(ex_entries)
    ex_answer = " " + " ".join(f"{i}. {w}" for i, w in enumerate(ex[:CWE_COMMON], 1))
    example = (tokenizer.encode(CWE_LEAD) + numbered(enc, ex_entries)
               + tokenizer.encode("\n" + CWE_QUESTION + CWE_ANSWER + ex_answer + "\n"))
    head, tail = frame(tokenizer, template, CWE_LEAD, "\n" + CWE_QUESTION, CWE_ANSWER, example)
    common = [next(words) for _ in range(CWE_COMMON)]
    n = CWE_COMMON * f_c
    used = len(numbered(enc, common * f_c))
    budget = room("cwe", length, len(head) + len(tail), used) - used
    uncommon = []
    while True:  # add uncommon words while their f_u entries fit; entries' tokens add up (see `numbered`)
        w = next(words)
        cost = sum(len(enc(f" {i}.")) + len(enc(" " + w)) for i in range(n + 1, n + f_u + 1))
        if cost > budget:
            break
        uncommon.append(w)
        budget, n = budget - cost, n + f_u
    entries = common * f_c + uncommon * f_u
    rng.shuffle(entries)
    return head + numbered(enc, entries) + tail, common, len(head)


def fwe_counts(n: int, size: int, alpha: float = FWE_ALPHA) -> list[int]:
    """n_k = floor(N k^-a / zeta(a)) for ranks k = 1..size (RULER's Zipf sampling, numpy's zipf law)."""
    z = zeta(alpha)
    return [int(n * k ** -alpha / z) for k in range(1, size + 1)]


def fwe_prompt(tokenizer, length, rng, template) -> tuple[list[int], list[str], int]:
    """(ids, the ranks 2-4 coded words, index of the text's first token): the largest N whose words fit,
    then "..." (rank 1, already the most frequent) repeated into what is left, so T is exact to one "..."."""
    head, tail = frame(tokenizer, template, FWE_LEAD, "\n" + FWE_QUESTION, FWE_ANSWER)
    size = max(5, length // FWE_TOKENS_PER_TYPE)
    vocab = [FWE_NOISE] + distinct(lambda: "".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LEN)), size - 1)
    pieces = [tokenizer.encode(" " + w) for w in vocab]

    def tokens(n):
        return sum(c * len(p) for c, p in zip(fwe_counts(n, size), pieces))

    def strict(c):  # ranks 2, 3, 4 have distinct counts above rank 5's: the answer is unambiguous
        return c[1] > c[2] > c[3] > c[4]

    budget = length - len(head) - len(tail)
    lo, hi = 0, 1
    while tokens(hi) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # largest n with tokens(n) <= budget
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= budget else (lo, mid)
    counts = fwe_counts(lo, size)
    if budget < 0 or not strict(counts):
        need = next(n for n in itertools.count(1) if strict(fwe_counts(n, size)))
        raise UserError(f"--lengths {length}: too short for fwe; it needs at least "
                        f"{len(head) + len(tail) + tokens(need)} tokens")
    counts[0] += (budget - tokens(lo)) // len(pieces[0])
    order = [k for k, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(order)
    return head + [t for k in order for t in pieces[k]] + tail, vocab[1:4], len(head)


# ----------------------------------------------------------------------------- public entry points


def check_task(task: str) -> None:
    if task not in TASKS:
        raise UserError(f"--task {task}: not a RULER task; choose from {', '.join(TASKS)}")


def make_prompt(task: str, tokenizer, length: int, depth: float, rng: random.Random, template: str | None = None,
                haystack_ids: list[int] | None = None, haystack_starts: list[int] | None = None
                ) -> tuple[list[int], list[str], int, int]:
    """(ids, references, max_new_tokens, probe_index) of one RULER prompt of T <= L tokens (L - u < T).

    `rng` draws every key, value, word and position; `template` a chat template name (tokenizer.CHAT_TEMPLATES)
    or None for a plain prompt; the real-text tasks use (haystack_ids, haystack_starts) as eval.py builds them
    (ids, spans = tok.encode_offsets(text); starts = tasks.sentence_starts(text, spans)), by default those of
    tasks.haystack_text(None). probe_index is the first needle's first token (vt: the first assignment; cwe,
    fwe: the list's start). max_new_tokens is RULER's tokens_to_generate, raised to fit the references.
    """
    check_task(task)
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"--depths {depth}: a depth is a fraction of the context, in [0, 1]")
    if task in NIAH:
        if NIAH[task][0] == "essay" and haystack_ids is None:
            text = haystack_text(None)
            haystack_ids, spans = tokenizer.encode_offsets(text)
            haystack_starts = sentence_starts(text, spans)
        ids, refs, at = niah_prompt(task, tokenizer, length, depth, rng, template, (haystack_ids, haystack_starts))
    elif task == "vt":
        ids, refs, at = vt_prompt(tokenizer, length, depth, rng, template)
    else:
        ids, refs, at = (cwe_prompt if task == "cwe" else fwe_prompt)(tokenizer, length, rng, template)
    written = len(tokenizer.encode(" " + ", ".join(refs))) + 16
    return ids, list(refs), max(TOKENS_TO_GENERATE["niah" if task in NIAH else task], written), at


def score(task: str, prediction: str, references: list[str]) -> float:
    """RULER's metric for the task, in [0, 1]: string_match_all for every task here."""
    check_task(task)
    return string_match_all(prediction, references)
