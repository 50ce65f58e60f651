"""eval_tasks.py: the scorers against hand-checked cases and a brute-force LCS, and the prompt builders:
exact lengths, the probe at its depth on a sentence start, the asked pair inside the prompt.
"""
import itertools
import random

import pytest

import eval_tasks
import tokenizer
from helpers import HAY


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer("bytes")


# ----------------------------------------------------------------------------- scoring


def test_rouge_l_and_exact_match_hand_checked():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 reference words.
    assert eval_tasks.rouge_l_recall("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    assert eval_tasks.rouge_l_recall("", "a b") == 0.0
    assert eval_tasks.rouge_l_recall("b a", "a b") == 0.5  # order matters: LCS is 1
    assert eval_tasks.exact_match("Answer: Eat a sandwich, then sleep.", "eat a sandwich")
    assert not eval_tasks.exact_match("eat the sandwich", "eat a sandwich")
    assert not eval_tasks.exact_match("sandwiches", "sandwich")  # whole words only
    assert eval_tasks.passkey_correct(" 12345. Remember", "12345")
    assert not eval_tasks.passkey_correct(" 123456", "12345") and not eval_tasks.passkey_correct("none", "12345")


def brute_lcs(a, b):
    """Largest k such that some k-subsequence of a is a subsequence of b (exhaustive)."""
    def is_subseq(s, t):
        it = iter(t)
        return all(c in it for c in s)

    for k in range(min(len(a), len(b)), 0, -1):
        if any(is_subseq(c, b) for c in itertools.combinations(a, k)):
            return k
    return 0


def test_lcs_matches_brute_force_on_random_strings():
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 8))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 8))]
        assert eval_tasks.lcs_length(a, b) == brute_lcs(a, b), (a, b)


# ----------------------------------------------------------------------------- prompts





@pytest.mark.parametrize("template", [None, "chatml"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_sits_at_depth_on_a_sentence_start(tok, depth, template):
    ids, spans = tok.encode_offsets(HAY)
    starts = eval_tasks.sentence_starts(HAY, spans)
    L = 2000
    prompt, at = eval_tasks.needle_prompt(tok, ids, starts, L, depth, "NEEDLE here.", "Q?", template)
    probe = tok.encode(" NEEDLE here. ")
    assert prompt[at:at + len(probe)] == probe
    assert len(prompt) == L  # the haystack is long enough, so the length is exact
    prefix, suffix = eval_tasks.chat_wrap(tok, template, "\n\nQ? " + eval_tasks.NEEDLE_INSTRUCTION)
    context_len = L - len(prefix) - len(suffix) - len(probe)
    offset = at - len(prefix)  # needle position inside the context
    sentence = max(b - a for a, b in zip(starts, starts[1:]))
    assert abs(offset - depth * context_len) <= sentence  # within one sentence of the requested depth
    assert offset in starts or offset == context_len  # on a sentence start (or the very end)
    if template:
        assert tok.decode(prompt[:len(prefix)]).startswith("<|im_start|>user\n")


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_length_and_key_position(tok, depth):
    L, key = 3000, "54321"
    ids, at = eval_tasks.passkey_prompt(tok, L, depth, key)
    filler = len(tok.encode(" " + eval_tasks.PASSKEY_FILLER))
    assert abs(len(ids) - L) <= filler // 2 + 1
    needle = tok.encode(" " + eval_tasks.PASSKEY_NEEDLE.format(key=key))
    assert ids[at:at + len(needle)] == needle
    assert abs(at / len(ids) - depth) < 0.05
    assert tok.decode(ids).endswith(eval_tasks.PASSKEY_QUESTION)


def test_kv_prompt_fills_length_and_holds_the_pair(tok):
    ids, key, value, at = eval_tasks.kv_prompt(tok, 2000, 0.5, random.Random(0), None)
    text = tok.decode(ids)
    assert 1800 < len(ids) <= 2000
    assert f'"{key}": "{value}"' in text and text.endswith(eval_tasks.KV_QUESTION.format(key=key))
    assert 0.4 < at / len(ids) < 0.6
