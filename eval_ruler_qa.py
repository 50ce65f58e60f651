"""RULER's two real-data tasks: qa_1 (SQuAD v2) and qa_2 (HotpotQA) as document lists with one question.
No model here.

Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?"
(arXiv 2404.06654), sec. 3.3 (question answering); the reference implementation is NVIDIA/RULER,
scripts/data/synthetic/qa.py, whose data are the official dev files its json/download_qa_dataset.sh fetches:

    SQuAD v2 dev    https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v2.0.json       (--squad)
    HotpotQA dev    http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json (--hotpotqa)

What is read (RULER's read_squad / read_hotpotqa): the documents are the distinct paragraphs (SQuAD) or
"title\\nsentences joined" (HotpotQA), sorted and numbered; a SQuAD question that is not `is_impossible`
keeps its answers, its own paragraph as gold and the other paragraphs of its article as first distractors;
a HotpotQA question keeps its answer and all ten paragraphs of its context as gold. Question i of the file is
sample i (RULER walks the file in order, not at random).

A prompt with n documents (`documents`): the gold ones, then the question's own distractors (a random subset
if they are more than needed), then random other documents; shuffled; each written "Document {i}:\\n{text}",
joined by blank lines. Past the file's document count the whole list is repeated.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from errors import UserError

# ----------------------------------------------------------------------------- constants

DOCUMENT = "Document {i}:\n{document}"  # RULER qa.py's DOCUMENT_PROMPT
DATASETS = {"qa_1": ("squad", "--squad"), "qa_2": ("hotpotqa", "--hotpotqa")}


# ----------------------------------------------------------------------------- pure functions: readers


def load_json(path: str, flag: str):
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path}: no such file (see docs/evaluation.md, 'Reproducing a published RULER number')")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{flag} {path}: not valid JSON ({e})") from None


def read_squad(data, flag: str = "--squad") -> tuple[list[dict], list[str]]:
    """(questions, documents) of a SQuAD v2 JSON ({"data": [{"paragraphs": [{"context", "qas"}]}]})."""
    try:
        articles = [[(p["context"], p["qas"]) for p in d["paragraphs"]] for d in data["data"]]
        docs = sorted({c for a in articles for c, _ in a})
        number = {c: i for i, c in enumerate(docs)}
        qas = []
        for a in articles:
            own = [number[c] for c, _ in a]
            for c, questions in a:
                qas += [{"query": q["question"], "outputs": [x["text"] for x in q["answers"]],
                         "context": [number[c]], "more_context": [i for i in own if i != number[c]]}
                        for q in questions if not q["is_impossible"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"{flag}: not SQuAD v2 JSON (missing or wrong field {e}); pass dev-v2.0.json") from None
    return qas, docs


def read_hotpotqa(data, flag: str = "--hotpotqa") -> tuple[list[dict], list[str]]:
    """(questions, documents) of a HotpotQA JSON ([{"question", "answer", "context": [[title, [sent]]]}])."""
    try:
        def doc(title, sents):
            return f"{title}\n{''.join(sents)}"

        docs = sorted({doc(t, s) for d in data for t, s in d["context"]})
        number = {c: i for i, c in enumerate(docs)}
        qas = [{"query": d["question"], "outputs": [d["answer"]],
                "context": [number[doc(t, s)] for t, s in d["context"]], "more_context": []} for d in data]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{flag}: not HotpotQA JSON (missing or wrong field {e}); pass "
                        "hotpot_dev_distractor_v1.json") from None
    return qas, docs


def read(task: str, path: str | None) -> tuple[list[dict], list[str]]:
    """The (questions, documents) of qa_1 or qa_2 from its file; a UserError naming the flag if absent."""
    name, flag = DATASETS[task]
    if path is None:
        raise UserError(f"{task} needs {flag} FILE (RULER's {name} dev file; see docs/evaluation.md)")
    qas, docs = (read_squad if name == "squad" else read_hotpotqa)(load_json(path, flag), flag)
    if not qas:
        raise UserError(f"{flag} {path}: no answerable question in the file")
    return qas, docs


# ----------------------------------------------------------------------------- pure functions: prompts


def documents(qa: dict, docs: list[str], n: int, rng: random.Random, shuffle_seed: int) -> str:
    """The context of n documents around question `qa` (module docstring); the shuffle uses a fixed
    seed, as RULER's random.Random(random_seed).shuffle does."""
    gold, more = qa["context"], qa["more_context"]
    if n < len(docs):
        if n - len(gold) > len(more):
            others = [i for i in range(len(docs)) if i not in set(gold + more)]
            chosen = gold + more + rng.sample(others, max(0, n - len(gold) - len(more)))
        else:
            chosen = gold + rng.sample(more, max(0, n - len(gold)))
        texts = [docs[i] for i in chosen]
    else:
        texts = (docs * -(-n // len(docs)))[:n]
    random.Random(shuffle_seed).shuffle(texts)
    return "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(texts))
