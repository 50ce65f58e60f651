"""ruler.py: every task's prompt has T <= L tokens and L - T below one filler unit; its answer is recoverable
from the decoded prompt exactly (the asked key's values stand next to it, vt's chain resolves to the
references, cwe's and fwe's references are the strict top-k by count); seeds decide the prompt; the scorers
match RULER's string_match_all / string_match_part on hand-made cases.
"""
import collections
import math
import random
import re

import pytest

import ruler
import tasks
import tokenizer
from errors import UserError

LENGTHS_DEPTHS_SEEDS = [(2048, 0.0, 0), (3000, 0.5, 1), (4096, 1.0, 2)]


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer("bytes")


@pytest.fixture(scope="module")
def hay(tok):
    """The default haystack, as eval.py builds it."""
    text = tasks.haystack_text(None)
    ids, spans = tok.encode_offsets(text)
    return ids, tasks.sentence_starts(text, spans)


def build(task, tok, hay, length, depth, seed, template=None):
    return ruler.make_prompt(task, tok, length, depth, random.Random(seed), template, *hay)


def filler_unit(task, tok):
    """The most tokens one filler unit may take (byte tokenizer): the slack allowed below L."""
    if task in ruler.NIAH and ruler.NIAH[task][0] == "essay":
        return 1  # real text is cut to the token
    if task == "cwe":  # f_u = 3 entries of a number up to 5 digits and a word up to 12 letters
        return 3 * (len(" 99999.") + len(" " + "w" * 12))
    if task == "fwe":
        return len(" ...")
    if task in ("niah_multikey_2", "niah_multikey_3"):  # a distractor needle line
        key = "x" * 36 if task.endswith("3") else "-".join([max(ruler.ADJECTIVES, key=len), max(ruler.NOUNS, key=len)])
        value = "x" * 36 if task.endswith("3") else "1234567"
        return len("\n" + ruler.NIAH_NEEDLE.format(kind="uuids", key=key, value=value))
    return len("\n" + ruler.NOISE)


def context_of(text, lead_end, question_start):
    """The main context: after the last `lead_end`, before the last `question_start`."""
    a = text.rindex(lead_end) + len(lead_end)
    return text[a:text.rindex(question_start)]


# ----------------------------------------------------------------------------- lengths and determinism


@pytest.mark.parametrize("length,depth,seed", LENGTHS_DEPTHS_SEEDS)
@pytest.mark.parametrize("task", ruler.TASKS)
def test_length_is_at_most_L_and_within_one_filler_unit(tok, hay, task, length, depth, seed):
    if task == "cwe" and length >= ruler.CWE_SMALL:
        length *= 2  # from 4096 its 10 words appear 30 times: 300 entries are ~3.9K bytes
    ids, refs, max_new, at = build(task, tok, hay, length, depth, seed)
    assert length - filler_unit(task, tok) < len(ids) <= length
    assert refs and all(isinstance(r, str) and r for r in refs)
    assert max_new >= len(tok.encode(" " + ", ".join(refs))) and 0 < at < len(ids)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_multiquery", "vt", "cwe", "fwe"])
def test_chat_prompt_is_one_user_turn_ending_in_the_answer_prefix(tok, hay, task):
    ids, _, _, _ = build(task, tok, hay, 3000, 0.5, 0, template="chatml")
    text = tok.decode(ids)
    assert len(ids) <= 3000 and text.startswith("<|im_start|>user\n") and text.count("<|im_start|>") == 2
    assert re.search(r"<\|im_end\|>\n<\|im_start\|>assistant\n (The special magic|Answer:)", text)
    ending = {"niah_single_1": "provided text is", "niah_multiquery": "provided text are", "vt": "they are: ",
              "cwe": "in the list are:", "fwe": "words are:"}[task]
    assert text.endswith(ending)


@pytest.mark.parametrize("task", ruler.TASKS)
def test_same_seed_same_prompt_other_seed_other_prompt(tok, hay, task):
    a, b, c = (build(task, tok, hay, 2048, 0.5, s) for s in (7, 7, 8))
    assert a == b
    assert a[0] != c[0] and a[1] != c[1]


@pytest.mark.parametrize("task", ruler.TASKS)
def test_too_short_is_a_user_error_naming_lengths_and_a_minimum_that_suffices(tok, hay, task):
    with pytest.raises(UserError, match=r"--lengths 200: too short for .* at least \d+ tokens") as e:
        build(task, tok, hay, 200, 0.5, 0)
    minimum = int(re.search(r"at least (\d+)", str(e.value)).group(1))
    if task != "fwe":  # fwe's vocabulary grows with L, so its minimum is an estimate for other draws
        assert len(build(task, tok, hay, minimum, 0.5, 0)[0]) <= minimum
        with pytest.raises(UserError):
            build(task, tok, hay, minimum - 1, 0.5, 0)


def test_unknown_task_and_bad_depth_are_user_errors(tok, hay):
    with pytest.raises(UserError, match="--task"):
        build("niah_single_9", tok, hay, 2048, 0.5, 0)
    with pytest.raises(UserError, match="--task"):
        ruler.score("qa_1", "x", ["x"])
    with pytest.raises(UserError, match="--depths"):
        build("vt", tok, hay, 2048, 1.5, 0)


def test_default_haystack_is_tasks_haystack_text(tok, hay):
    own = ruler.make_prompt("niah_single_2", tok, 2048, 0.5, random.Random(3))
    assert own == build("niah_single_2", tok, hay, 2048, 0.5, 3)


# ----------------------------------------------------------------------------- answers recoverable


UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


@pytest.mark.parametrize("length,depth,seed", LENGTHS_DEPTHS_SEEDS)
@pytest.mark.parametrize("task", list(ruler.NIAH))
def test_niah_asked_keys_values_stand_next_to_them(tok, hay, task, length, depth, seed):
    hay_kind, key_kind, value_kind, n_keys, n_values, n_asked = ruler.NIAH[task]
    ids, refs, _, at = build(task, tok, hay, length, depth, seed)
    text = tok.decode(ids)
    question = re.search(r"\nWhat (?:is|are all) the special magic \w+ for (.+) mentioned in the provided text\?",
                         text)
    asked = re.split(r", and |, ", question.group(1))
    assert len(asked) == n_asked
    needles = NEEDLE_RE.findall(text[:question.start()])
    by_key = collections.defaultdict(list)
    for kind, key, value in needles:
        assert kind == value_kind
        by_key[key].append(value)
    # The asked keys' needles give exactly the references (key by key in the asked order, a key's values in
    # any order); each asked key has one needle per value.
    assert [sorted(by_key[k]) for k in asked] == [sorted(refs[i * n_values:(i + 1) * n_values]) for i in range(n_asked)]
    assert all(len(by_key[k]) == n_values for k in asked)
    pattern = r"\d{7}" if value_kind == "numbers" else UUID4
    assert all(re.fullmatch(pattern, r) for r in refs)
    if key_kind == "uuids":
        assert all(re.fullmatch(pattern, k) for k in asked)
    distractors = [k for k in by_key if k not in asked]
    if hay_kind == "needle":
        assert len(distractors) > 10  # a haystack of needles
    else:
        assert len(distractors) == max(n_keys, n_asked) - n_asked
    # The first needle (the first asked key's first value) starts at probe_index, at the depth's boundary.
    sep = " " if hay_kind == "essay" else "\n"
    assert tok.decode(ids[at:]).startswith(f"{sep}One of the special magic {value_kind} for {asked[0]} is: {refs[0]}.")
    start = len(tok.decode(ids[:at]))
    if hay_kind == "essay":  # at a sentence start, or at the end of the context (only needles after it)
        assert text[start - 1] in ".!?\n" or re.fullmatch(r"( One of [^\n]*?\. )+", text[start:question.start()])
    # ... and the context before it is about a fraction `depth` of the context, up to the other needles
    # (which may come before it) and one filler unit.
    ctx_start = text.index("afterwards.") + len("afterwards.") + (hay_kind == "essay")
    ctx_len = question.start() - ctx_start
    others = sum(len(m.group(0)) + 2 for m in NEEDLE_RE.finditer(text)) if hay_kind != "needle" else 0
    assert abs((start - ctx_start) / ctx_len - depth) <= (others + 200) / ctx_len


def resolve(statements, value):
    """Names bound to `value` by following VAR a = value / VAR b = VAR a to a fixed point."""
    bound = {a for a, b in statements if b == value}
    while True:
        more = {a for a, b in statements if b in bound} - bound
        if not more:
            return bound
        bound |= more


@pytest.mark.parametrize("length,depth,seed", LENGTHS_DEPTHS_SEEDS)
def test_vt_chain_resolves_to_exactly_the_references(tok, hay, length, depth, seed):
    ids, refs, _, at = build("vt", tok, hay, length, depth, seed)
    text = tok.decode(ids)
    value = re.findall(r"assigned the value (\d{5}) in the text above\.", text)[-1]
    statements = [(a, b.removeprefix("VAR "))
                  for a, b in re.findall(r"^VAR ([A-Z]+) = (VAR [A-Z]+|\d+) ?$", text, flags=re.MULTILINE)]
    assert resolve(statements, value) == set(refs) and len(refs) == ruler.VT_HOPS + 1
    assert all(len(r) == ruler.VT_NAME_LEN for r in refs)
    # Each hop comes after the assignment it copies; the first assignment is at probe_index.
    main = context_of(text, ruler.VT_LEAD + "\n", "\nQuestion:")
    positions = [main.index(f"VAR {r} = ") for r in refs]
    assert positions == sorted(positions)
    assert tok.decode(ids[at:]).startswith(f"\nVAR {refs[0]} = {value}\n")
    hops = sum(len(f"\nVAR {r} = VAR {r} ") for r in refs)
    assert abs(main.index(f"VAR {refs[0]} = ") / len(main) - depth) <= (hops + len(ruler.NOISE) + 2) / len(main)
    assert f"{ruler.VT_HOPS + 1} variables are assigned the value {value}, they are: " in text[-150:]
    # The worked example resolves to its own answer, which it states.
    ex_value, ex_answer = re.search(r"the value (\d{5}), they are:  ([A-Z ]+)\n", text).groups()
    assert resolve(statements, ex_value) == set(ex_answer.split()) and ex_value != value


@pytest.mark.parametrize("length,seed", [(2048, 0), (8192, 1)])
def test_cwe_references_are_the_strict_top_10_of_the_numbered_list(tok, hay, length, seed):
    ids, refs, _, at = build("cwe", tok, hay, length, 0.5, seed)
    text = tok.decode(ids)
    entries = re.findall(r"(\d+)\. (\S+)", context_of(text, "most often.\n", "\nQuestion:"))
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))  # numbered 1..n in order
    counts = collections.Counter(w for _, w in entries)
    f_c, f_u = ruler.CWE_FREQ[length < ruler.CWE_SMALL]
    assert len(refs) == 10 and all(counts[r] == f_c for r in refs)
    assert all(c == f_u for w, c in counts.items() if w not in refs) and len(counts) > 10
    assert text[len(tok.decode(ids[:at])):].startswith("1. ")
    example = re.search(r"most often\.\n(.*?)\nQuestion:.*?in the list are: (.*?)\n", text, re.DOTALL)
    ex_list, ex_answer = example.groups()
    ex_counts = collections.Counter(re.findall(r"\d+\. (\S+)", ex_list))
    assert set(re.findall(r"\d+\. (\S+)", ex_answer)) == {w for w, _ in ex_counts.most_common(10)}


@pytest.mark.parametrize("length,seed", [(2048, 0), (4096, 1)])
def test_fwe_references_are_the_strict_top_3_coded_words(tok, hay, length, seed):
    ids, refs, _, at = build("fwe", tok, hay, length, 0.5, seed)
    assert tok.decode(ids[:at]).endswith("coded words.")  # the coded text starts at probe_index
    words = context_of(tok.decode(ids), "coded words.", "\nQuestion:").split()
    counts = collections.Counter(words)
    ranked = counts.most_common()
    assert ranked[0][0] == ruler.FWE_NOISE  # the noise word is the most frequent, and not an answer
    coded = [(w, c) for w, c in ranked if w != ruler.FWE_NOISE]
    assert [w for w, _ in coded[:3]] == refs
    assert coded[0][1] > coded[1][1] > coded[2][1] > coded[3][1]  # strictly, so the answer is unique
    assert all(re.fullmatch(r"[a-z]{6}", w) for w, _ in coded)


def test_zeta_and_zipf_counts():
    assert ruler.zeta(2.0) == pytest.approx(math.pi ** 2 / 6, abs=1e-9)
    assert ruler.zeta(3.0) == pytest.approx(1.2020569031595942, abs=1e-9)  # Apery's constant
    assert ruler.fwe_counts(1000, 4) == [int(1000 / k ** 2 / (math.pi ** 2 / 6)) for k in range(1, 5)]


def test_niah_template_singular_and_plural_as_ruler_edits_it(tok, hay):
    single = tok.decode(build("niah_single_1", tok, hay, 2048, 0.5, 0)[0])
    assert "A special magic number is hidden within the following text." in single
    assert "I will quiz you about the number afterwards." in single
    assert re.search(r"What is the special magic number for \S+ mentioned in the provided text\? The special "
                     r"magic number for \S+ mentioned in the provided text is$", single)
    multi = tok.decode(build("niah_multivalue", tok, hay, 2048, 0.5, 0)[0])
    assert multi.startswith("<s>Some special magic numbers are hidden within the following text.")
    assert multi.endswith("mentioned in the provided text are")


# ----------------------------------------------------------------------------- scoring


def test_string_match_all_and_part_on_hand_made_cases():
    refs = ["1234567", "2345678", "3456789", "4567890"]
    assert ruler.string_match_all("1234567, 2345678, 3456789 and 4567890.", refs) == 1.0
    assert ruler.string_match_all("1234567 and 3456789", refs) == 0.5
    assert ruler.string_match_all("nothing here", refs) == 0.0
    assert ruler.string_match_all("They are: Apple, BANANA", ["apple", "banana"]) == 1.0  # case-insensitive
    assert ruler.string_match_all("xyz", ["XYZ", "abc"]) == 0.5
    assert ruler.string_match_part("1234567 only", refs) == 1.0  # max over references
    assert ruler.string_match_part("nothing", refs) == 0.0
    assert ruler.string_match_all("12345\x0067", ["1234567"]) == 0.0  # control characters become newlines
    for task in ruler.TASKS:
        assert ruler.score(task, "1234567 and 3456789", refs) == 0.5
    with pytest.raises(ValueError):
        ruler.string_match_all("x", [])


def test_a_perfect_answer_scores_one_on_every_task(tok, hay):
    for task in ruler.TASKS:
        _, refs, _, _ = build(task, tok, hay, 2048, 0.5, 0)
        assert ruler.score(task, " " + ", ".join(refs), refs) == 1.0
        assert ruler.score(task, "I don't know.", refs) == 0.0 or task == "cwe"  # cwe words may be common English
