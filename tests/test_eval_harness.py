"""eval_harness.py / `eval.py harness`: our model through lm-evaluation-harness, on the local tasks in
tests/harness_tasks (20 multiple-choice questions, 20 generation prompts; YAML + JSONL, offline).

Reference: lm-eval's own `--model hf` (HFLM) on transformers' SmolLM2-135M-Instruct loaded from the same
GGUF (AutoModelForCausalLM(gguf_file=...), as tests/test_gguf_read.py builds it). Per sample: log-likelihoods
within 1e-3 (both float32 over the same dequantized weights; the logits differ by <= 1e-3 from summation
order over 30 layers, and a continuation's few tokens sum such differences) and the same greedy generations.
"""
import json
from pathlib import Path

import pytest
import torch

import eval as ev
import eval_harness
import lora
import lora_peft
import tokenizer
from checkpoint import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "tests" / "harness_tasks"
LL_TOL = 1e-3


def samples_of(out: Path) -> dict[str, list[dict]]:
    """task -> per-sample logs (lm-eval's samples_<task>_<time>.jsonl under out/<model>/), by doc_id."""
    found = {}
    for f in out.glob("*/samples_*.jsonl"):
        task = f.name[len("samples_"):].rsplit("_", 1)[0]
        found[task] = sorted((json.loads(line) for line in f.read_text().splitlines()), key=lambda s: s["doc_id"])
    return found


def test_cut_at_stops_and_missing_lm_eval(monkeypatch):
    assert eval_harness.cut_at_stops("Rome.\nNext", ["\n", "."]) == "Rome"
    assert eval_harness.cut_at_stops("abc", ["", "x"]) == "abc"

    def no_lm_eval(name):
        raise ImportError(name)
    monkeypatch.setattr(eval_harness.importlib, "import_module", no_lm_eval)
    with pytest.raises(ev.UserError, match="pip install lm-eval"):
        eval_harness.lm_eval_api()


def test_continuation_logprob_equals_full_forward():
    """Chunked prefill through the KV cache, continuation rows only, against one plain forward's log-softmax
    (float32; same math, different SDPA calls: 1e-5)."""
    m = load_model("tiny", vocab_size=tokenizer.BYTE_VOCAB_SIZE, seed=0).eval()
    ctx, cont = list(range(40, 70)), [71, 72, 73, 90]
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ctx + cont[:-1]]))[0].float(), -1)
    want = float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
    got, greedy = eval_harness.continuation_logprob(m, ctx, cont, max_length=512, chunk=7)
    assert abs(got - want) < 1e-5 and greedy == all(int(logp[len(ctx) - 1 + i].argmax()) == t
                                                   for i, t in enumerate(cont))


def test_harness_runs_with_adapter_and_nf4(tmp_path, monkeypatch, capsys):
    """The demo-scale path: tiny base + LoRA adapter, NF4, --rope, both tasks, --log-samples; lm-eval's layout."""
    base = tmp_path / "base"
    m = load_model("tiny", vocab_size=tokenizer.BYTE_VOCAB_SIZE, seed=0)
    save_model(m, base)
    lora.apply_lora(m, r=4, alpha=8.0)
    lora_peft.save_adapter(m, tmp_path / "adapter")
    monkeypatch.chdir(ROOT)  # the task YAMLs name their JSONL relative to the repository root
    out = tmp_path / "h"
    assert ev.main(["harness", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--quant", "nf4",
                    "--rope", "yarn:2", "--tokenizer", "bytes", "--tasks", "longctx_mc,longctx_gen",
                    "--include-path", str(TASKS_DIR), "--limit", "2", "--log-samples", "--out", str(out)]) == 0
    results = list(out.glob("*/results_*.json"))  # out/<model path, sanitized>/
    assert len(results) == 1 and set(json.loads(results[0].read_text())["results"]) == {"longctx_mc", "longctx_gen"}
    s = samples_of(out)
    assert [len(s["longctx_mc"]), len(s["longctx_gen"])] == [2, 2] and len(s["longctx_mc"][0]["resps"]) == 4
    assert "longctx_mc" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--tasks", "no_such_task_xyz", "--include-path", str(TASKS_DIR)], "--tasks: unknown lm-eval task"),
    (["--tasks", "longctx_mc", "--include-path", "/nonexistent/dir"], "--include-path /nonexistent/dir"),
    (["--tasks", "longctx_mc", "--include-path", str(TASKS_DIR), "--limit", "0"], "--limit 0.0"),
    ([], "harness: give one --model"),
    (["--tasks", "longctx_mc", "--rope", "dynamic:2", "--include-path", str(TASKS_DIR)], "--rope dynamic:s"),
])
def test_harness_errors_are_one_line(argv, needle, tmp_path, capsys):
    assert ev.main(["harness", "--model", "tiny", *argv, "--out", str(tmp_path / "h")]) == 1
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and not (tmp_path / "h").exists()


@pytest.mark.slow
def test_harness_matches_lm_eval_hf_on_smollm2(smollm2_path, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)
    tasks = ["longctx_mc", "longctx_gen"]
    out = tmp_path / "ours"
    assert ev.main(["harness", "--model", smollm2_path, "--tasks", ",".join(tasks), "--include-path",
                    str(TASKS_DIR), "--log-samples", "--prefill-chunk", "8", "--out", str(out)]) == 0
    ours = samples_of(out)

    p = Path(smollm2_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    ref = lm_eval.simple_evaluate(model=HFLM(pretrained=hf.eval(), tokenizer=tok, batch_size=1), tasks=tasks,
                                  task_manager=TaskManager(include_path=str(TASKS_DIR)), log_samples=True)["samples"]
    assert [len(ours[t]) for t in tasks] == [len(ref[t]) for t in tasks] == [20, 20]
    worst = 0.0
    for a, b in zip(ours["longctx_mc"], sorted(ref["longctx_mc"], key=lambda s: s["doc_id"])):
        for (la, ga), (lb, gb) in zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"])):
            worst = max(worst, abs(float(la) - float(lb)))
            assert abs(float(la) - float(lb)) <= LL_TOL and str(ga) == str(gb)
    gens = [(a["resps"][0][0], b["resps"][0][0]) for a, b in
            zip(ours["longctx_gen"], sorted(ref["longctx_gen"], key=lambda s: s["doc_id"]))]
    assert all(x == y for x, y in gens), gens
    print(f"max |log-likelihood difference| over 80 choices: {worst:.2e}; generations equal: 20/20")
