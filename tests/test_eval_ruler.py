"""eval_ruler.py and eval_ruler_qa.py against NVIDIA/RULER: the prompts of niah_single_1, niah_multikey_2,
niah_multikey_3, vt, cwe and fwe at L = 4096 with SmolLM2's tokenizer and the base template are compared with
facts recorded from RULER's own generators (tests/data/ruler_reference_4096.json: RULER at commit c3f5e3b,
prepare.py, 200 samples per task; how it was run is in the file's "source"): length fields and bound, lead
line, question line and answer prefix with keys and values masked, number of answers, key and word
vocabulary, and the depth law (two-sample Kolmogorov-Smirnov test). qa_1/qa_2 are built from small SQuAD v2
and HotpotQA fixtures in tests/data. The scorers match RULER's on hand-made cases.
"""
import json
import math
import re
import statistics
from pathlib import Path

import pytest

import eval_ruler
import eval_ruler_qa
import tokenizer
from errors import UserError

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "ruler_reference_4096.json").read_text())
COMPARED = tuple(REFERENCE["tasks"])
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Mean input length. Where the haystack unit has a fixed length (noise lines, list words, coded words) RULER's
# fitted count is the same on every run and our mean is held within 2% of RULER's. Where it has a random
# length (needles with random keys or UUIDs, vt with random names), RULER's count is fitted on one draw and a
# sample that overflows steps down a whole increment (25 needles, 10 lines), so RULER's own mean moves between
# regimes from seed to seed (recorded "seed_means": e.g. niah_multikey_3 4,030 at seed 42, 2,535 at seed 43);
# there our mean is held within 2% of the range of RULER's seed means.
RANDOM_UNITS = ("niah_multikey_2", "niah_multikey_3", "vt")


# ----------------------------------------------------------------------------- helpers


def mask(text):
    """Keys, values and names masked: UUIDs <U>, numbers <N>, vt names <V>, niah's asked key <K> (the masking
    the reference file was recorded with)."""
    text = UUID.sub("<U>", text)
    text = re.sub(r"\d+", "<N>", text)
    text = re.sub(r"VAR [A-Z]+", "VAR <V>", text)
    return re.sub(r"for .+? mentioned", "for <K> mentioned", text)


def lead_and_question(task, row):
    first, last = row["input"].split("\n")[0], row["input"].rstrip("\n").split("\n")[-1]
    if task == "fwe":
        first = first[:first.index("coded words.") + len("coded words.")]
    return mask(first), mask(last)


def first_statement_depth(text):
    """Relative line index of vt's first statement (VAR X = number) among the task's lines after the example."""
    lines = text[text.index("Memorize", 10):].split("\n")
    hits = [i for i, line in enumerate(lines) if re.fullmatch(r"VAR [A-Z]+ = \d+", line)]
    noise = [i for i, line in enumerate(lines) if line.startswith("The grass")]
    return (hits[0] - noise[0]) / (noise[-1] - noise[0] + 1)


def answer_depths(task, rows):
    if task == "vt":
        return [first_statement_depth(r["input"]) for r in rows]
    return [r["token_position_answer"] / r["length"] for r in rows]


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov D = max_x |F_a(x) - F_b(x)|."""
    a, b = sorted(a), sorted(b)
    return max(abs(sum(x <= v for x in a) / len(a) - sum(x <= v for x in b) / len(b)) for v in a + b)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return tokenizer.load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def data4096(smol):
    return eval_ruler.RulerData(smol, None, eval_ruler.ruler_haystack(None)[0])


@pytest.fixture(scope="module")
def rulers_data(smollm2_path, tmp_path_factory):
    """RulerData on the tokenizer RULER's run loaded: transformers' conversion of the same GGUF, saved as a
    tokenizer.json (the two differ on a few white-space merges)."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    path = Path(smollm2_path)
    transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    return eval_ruler.RulerData(tokenizer.load_tokenizer(folder), None, eval_ruler.ruler_haystack(None)[0])


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer("bytes")


def qa_data(tok, template=None):
    qa = {"qa_1": eval_ruler_qa.read("qa_1", str(DATA / "squad_v2_mini.json")),
          "qa_2": eval_ruler_qa.read("qa_2", str(DATA / "hotpotqa_mini.json"))}
    return eval_ruler.RulerData(tok, template, eval_ruler.ruler_haystack(None)[0], qa)


# ----------------------------------------------------------------------------- RULER's own output at 4096


@pytest.mark.parametrize("task", COMPARED)
def test_prompts_match_rulers_text_answers_and_bound(data4096, task):
    """Every sample within L with its tokens to generate; RULER's fields, lead line, question line, answer
    prefix (keys and values masked) and number of answers; keys and words from RULER's vocabulary."""
    ref = REFERENCE["tasks"][task]
    rows = [data4096.row(task, 4096, i) for i in range(20)]
    t2g = eval_ruler.tokens_to_generate(task)
    nouns, adjectives, verbs = map(set, eval_ruler.wonderwords_lists())
    for r in rows:
        assert len(r["ids"]) + t2g <= 4096 and r["length"] <= 4096 and r["length"] == r["length_w_model_temp"]
        assert sorted(k for k in r if k != "ids") == ref["fields"]
        assert lead_and_question(task, r) == (ref["lead"], ref["question"])
        assert mask(r["answer_prefix"]) == ref["answer_prefix"] and len(r["outputs"]) == ref["outputs"]
        assert r["input"] + r["answer_prefix"] == data4096.tok.decode(r["ids"])
    if "words" in ref:  # RULER's recorded keys/words lie in our lists: the same vocabulary, and ours too
        ours = ([o for r in rows for o in r["outputs"]] if task == "cwe" else
                [re.search(r"for (.+?) mentioned in the provided text\?", r["input"]).group(1) for r in rows])
        for word in ref["words"] + ours:
            if task == "cwe":
                assert word in nouns | adjectives | verbs, word
            else:
                assert any(word[:i] in adjectives and word[i + 1:] in nouns for i in range(len(word))
                           if word[i] == "-"), word


@pytest.mark.slow
@pytest.mark.parametrize("task", COMPARED)
def test_mean_length_and_depth_law_match_rulers(rulers_data, task):
    """200 samples: mean `length` within 2% of RULER's (RANDOM_UNITS: of the range of RULER's seed means), and
    the answer's depth distributed as RULER's (KS test at alpha = 0.001: D < 1.95 sqrt((n + m) / (n m)))."""
    ref = REFERENCE["tasks"][task]
    rows = [rulers_data.row(task, 4096, i) for i in range(ref["samples"])]
    mean = statistics.mean(r["length"] for r in rows)
    low, high = (min(ref["seed_means"].values()), max(ref["seed_means"].values())) if task in RANDOM_UNITS else (
        ref["mean_length"], ref["mean_length"])
    assert 0.98 * low <= mean <= 1.02 * high, (mean, low, high)
    if "answer_depths" in ref:
        ours, theirs = answer_depths(task, rows), ref["answer_depths"]
        n, m = len(ours), len(theirs)
        assert ks_statistic(ours, theirs) < 1.95 * math.sqrt((n + m) / (n * m))


# ----------------------------------------------------------------------------- the depth law and the fit


def test_essay_needles_go_after_sentence_int_s_depth_over_100_for_grid_depths():
    words = " ".join(f"Sentence{i} ends." for i in range(80)).split(" ")
    rng = eval_ruler.random.Random(0)
    for _ in range(50):
        text = eval_ruler.insert_in_sentences(words, len(words), ["NEEDLE."], rng)
        sents = eval_ruler.split_sentences(text)
        at = sents.index("NEEDLE.")
        assert at in {int(80 * d / 100) for d in eval_ruler.DEPTHS}
    assert len(eval_ruler.DEPTHS) == 40 and eval_ruler.DEPTHS[:6] == [0, 3, 5, 8, 10, 13] and eval_ruler.DEPTHS[-1] == 100


def test_line_slots_are_distinct_and_uniform():
    rng = eval_ruler.random.Random(1)
    firsts = []
    for _ in range(2000):
        lines = eval_ruler.insert_in_lines(["x"] * 9, ["a", "b"], rng)
        assert len(lines) == 11 and lines.index("b") < lines.index("a")  # RULER: the first item at the last slot
        firsts.append(lines.index("b"))
    # P(first of two distinct slots of 9 = k) = (8 - k) / 36: slot 0 has 8/36
    assert abs(firsts.count(0) / 2000 - 8 / 36) < 0.04


def test_rows_are_seeded_per_sample_and_fit_below_L(tok):
    data = eval_ruler.RulerData(tok, None, eval_ruler.ruler_haystack(None)[0], seed=3)
    again = eval_ruler.RulerData(tok, None, eval_ruler.ruler_haystack(None)[0], seed=3)
    for task in ("niah_single_2", "niah_multiquery", "vt", "fwe"):
        a, b, c = data.row(task, 4096, 0), again.row(task, 4096, 0), data.row(task, 4096, 1)
        assert a == b and a["input"] != c["input"]
        assert len(a["ids"]) + eval_ruler.tokens_to_generate(task) <= 4096 and a["ids"][0] == tok.bos_id


def test_too_short_length_is_a_user_error_naming_lengths(tok):
    data = eval_ruler.RulerData(tok, None, eval_ruler.ruler_haystack(None)[0])
    for task in ("niah_single_1", "vt", "cwe"):
        with pytest.raises(UserError, match=f"--lengths 300: too short for {task}"):
            data.row(task, 300, 0)


def test_chat_template_wraps_the_task_and_puts_the_answer_prefix_after_the_generation_prompt(tok):
    data = eval_ruler.RulerData(tok, "chatml", eval_ruler.ruler_haystack(None)[0])
    r = data.row("niah_multiquery", 3000, 0)
    assert r["input"].startswith("<|im_start|>user\nSome special magic numbers are hidden")
    assert r["input"].endswith("mentioned in the provided text?<|im_end|>\n<|im_start|>assistant\n")
    assert r["answer_prefix"].startswith(" The special magic numbers for ") and len(r["outputs"]) == 4


def test_template_singular_edit_and_cwe_fwe_texts_as_rulers(tok):
    data = eval_ruler.RulerData(tok, None, eval_ruler.ruler_haystack(None)[0])
    one, many = data.row("niah_single_2", 2048, 0), data.row("niah_multivalue", 2048, 0)
    assert one["input"].startswith("A special magic number is hidden within the following text. Make sure to "
                                   "memorize it. I will quiz you about the number afterwards.\n")
    assert many["input"].startswith("Some special magic numbers are hidden") and len(many["outputs"]) == 4
    cwe = data.row("cwe", 2048, 0)  # below 4096: the worked example has 20 words, 3 and 1 times
    shot = cwe["input"].split("\n")[1]
    assert len(re.findall(r"\d+\. ", shot)) == 10 * 3 + 10 * 1
    counts = {w: shot.split().count(w) for w in shot.split() if not w[0].isdigit()}
    fwe = data.row("fwe", 2048, 0)
    words = fwe["input"].split("\n")[0].split("coded words. ")[1].split(" ")
    top = sorted(set(words), key=words.count, reverse=True)
    assert top[0] == "..." and top[1:4] == fwe["outputs"] and len(set(counts.values())) == 2


# ----------------------------------------------------------------------------- qa_1 / qa_2 on the fixtures


def test_qa_readers_follow_rulers_squad_and_hotpotqa_layouts():
    qas, docs = eval_ruler_qa.read("qa_1", str(DATA / "squad_v2_mini.json"))
    assert [q["query"] for q in qas] == ["Into which sea does the Nile flow?", "Where is the Amazon river?",
                                        "What is Earth's highest mountain?",
                                        "Which is the highest peak in North America?"]  # is_impossible skipped
    assert qas[0]["outputs"] == ["the Mediterranean Sea", "Mediterranean Sea"] and len(docs) == 5
    assert docs == sorted(docs) and [docs[i] for i in qas[2]["more_context"]] == [
        "K2 is the second-highest mountain on Earth, after Mount Everest.",
        "Denali is the highest mountain peak in North America."]
    qas, docs = eval_ruler_qa.read("qa_2", str(DATA / "hotpotqa_mini.json"))
    assert qas[0]["outputs"] == ["Blur"] and len(qas[0]["context"]) == 3
    assert "Blur (band)\nBlur are an English rock band formed in London in 1988. They were part of Britpop." in docs


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_prompt_has_rulers_template_documents_and_answer_prefix(tok, task):
    data = qa_data(tok)
    r = data.row(task, 2048, 1)
    assert r["input"].startswith("Answer the question based on the given documents. Only give me the answer and do "
                                 "not output any other words.\n\nThe following are given documents.\n\nDocument 1:\n")
    question = "Where is the Amazon river?" if task == "qa_1" else "In which city was the composer of Bolero born?"
    assert r["input"].endswith("\n\nQuestion: " + question) and r["answer_prefix"] == " Answer:"
    gold = ("The Amazon river in South America" if task == "qa_1" else "Maurice Ravel\nJoseph Maurice Ravel")
    assert gold in r["input"] and len(r["ids"]) + 32 <= 2048
    assert eval_ruler.score_ruler(task, "South America, I think", ["South America"]) == 1.0  # string_match_part


def test_qa_files_missing_or_malformed_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="qa_1 needs --squad"):
        eval_ruler_qa.read("qa_1", None)
    with pytest.raises(UserError, match="--hotpotqa .*no such file"):
        eval_ruler_qa.read("qa_2", str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="--squad .*not valid JSON"):
        eval_ruler_qa.read("qa_1", str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="--squad: not SQuAD v2 JSON"):
        eval_ruler_qa.read_squad({"data": [{"title": "x"}]})
    with pytest.raises(UserError, match="--hotpotqa: not HotpotQA JSON"):
        eval_ruler_qa.read_hotpotqa([{"question": "q"}])


def test_haystack_file_is_rulers_essay_json_or_text(tmp_path):
    (tmp_path / "pg.json").write_text(json.dumps({"text": "One essay.\n\nTwo  words."}))
    assert eval_ruler.ruler_haystack([str(tmp_path / "pg.json")]) == (["One", "essay.", "Two", "words."], True)
    assert eval_ruler.ruler_haystack(None)[1] is False
    (tmp_path / "bad.json").write_text(json.dumps({"essay": "x"}))
    with pytest.raises(UserError, match="not RULER's essay JSON"):
        eval_ruler.ruler_haystack([str(tmp_path / "bad.json")])
    with pytest.raises(UserError, match="--haystack .*no such file"):
        eval_ruler.ruler_haystack([str(tmp_path / "missing.json")])


# ----------------------------------------------------------------------------- prepare-only files


def test_write_validation_writes_rulers_jsonl_layout(tok, tmp_path):
    data = eval_ruler.RulerData(tok, None, eval_ruler.ruler_haystack(None)[0])
    paths = eval_ruler.write_validation(data, [2048], ["niah_single_1", "fwe"], 3, tmp_path)
    assert paths == [tmp_path / "2048" / t / "validation.jsonl" for t in ("niah_single_1", "fwe")]
    rows = [json.loads(line) for line in paths[0].read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and all("ids" not in r for r in rows)
    assert rows[0] == {k: v for k, v in data.row("niah_single_1", 2048, 0).items() if k != "ids"}


# ----------------------------------------------------------------------------- scoring and summaries


def test_string_match_all_and_part_on_hand_made_cases():
    refs = ["1234567", "2345678", "3456789", "4567890"]
    assert eval_ruler.string_match_all("1234567, 2345678, 3456789 and 4567890.", refs) == 1.0
    assert eval_ruler.string_match_all("1234567 and 3456789", refs) == 0.5
    assert eval_ruler.string_match_all("nothing here", refs) == 0.0
    assert eval_ruler.string_match_all("They are: Apple, BANANA", ["apple", "banana"]) == 1.0  # case-insensitive
    assert eval_ruler.string_match_part("1234567 only", refs) == 1.0  # max over references
    assert eval_ruler.string_match_part("nothing", refs) == 0.0
    assert eval_ruler.string_match_all("12345\x0067", ["1234567"]) == 0.0  # control characters become newlines
    for task in eval_ruler.TASKS:
        assert eval_ruler.score_ruler(task, "1234567 and 3456789", refs) == (1.0 if task.startswith("qa") else 0.5)
    with pytest.raises(ValueError):
        eval_ruler.string_match_all("x", [])


def test_standard_errors_and_the_average_name():
    cell = eval_ruler.summarize([1.0, 0.0, 1.0, 1.0])
    assert cell["score"] == 0.75 and cell["n"] == 4 and math.isclose(cell["se"], math.sqrt(0.25 / 4))
    avg = eval_ruler.average([cell, eval_ruler.summarize([0.5, 0.5])])
    assert avg["score"] == 0.625 and math.isclose(avg["se"], math.sqrt(cell["se"] ** 2) / 2)
    assert eval_ruler.average_name(list(eval_ruler.TASKS)) == "RULER"
    assert eval_ruler.average_name(["vt", "cwe"]) == "mean of 2 tasks (vt, cwe)"
    assert eval_ruler.parse_tasks(None, {"qa_1": None, "qa_2": "x.json"}) == [t for t in eval_ruler.TASKS if t != "qa_1"]
    assert eval_ruler.parse_samples("quick") == eval_ruler.QUICK_SAMPLES and eval_ruler.parse_samples("7") == 7
    for bad in ("0", "-1", "x", "5,6"):
        with pytest.raises(UserError, match="--samples"):
            eval_ruler.parse_samples(bad)
    with pytest.raises(UserError, match="--tasks: unknown"):
        eval_ruler.parse_tasks("niah_single_1,nope", {})


def test_zeta_matches_the_series():
    assert math.isclose(eval_ruler.zeta(2.0), math.pi ** 2 / 6, rel_tol=1e-10)
