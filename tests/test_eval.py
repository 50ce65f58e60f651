"""eval.py: scoring functions, prompt construction and placement, perplexity against a float64 reference,
chunked prefill, adapter vs merged model, the CLI error path; one slow SmolLM2 passkey run.

Tolerances: the float64 perplexity reference differs from our float32 chunked loss only by float32
rounding of logits and sums over < 1K tokens, so 1e-5 relative; chunked vs one-pass prefill runs the
same float32 math with different attention kernels and summation order, so 1e-5 relative as well.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import tokenizer
from helpers import HAY
import lora
import lora_peft
import rope
import eval_ruler
from checkpoint import load_model, save_model

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return tokenizer.load_tokenizer("bytes")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", vocab_size=tokenizer.BYTE_VOCAB_SIZE, seed=0).eval()


def run_cli(*argv):
    """The real command line in a subprocess (exit code, stderr)."""
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def run_main(*argv):
    """eval.main in-process (no interpreter start-up); returns the exit code."""
    return ev.main(list(argv))


def test_dynamic_is_evaluated_as_its_one_pass_ntk():
    dyn = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 100}
    assert ev.fixed_rope(1e4, dyn, 100) is None
    ntk = ev.fixed_rope(1e4, dyn, 300)
    got = rope.rope_frequencies(16, 1e4, ntk)[0]
    want = rope.rope_frequencies(16, 1e4, dyn, seq_len=300)[0]
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- model paths


def test_window_nll_matches_float64_log_softmax(tiny):
    tokens = torch.randint(0, tokenizer.BYTE_VOCAB_SIZE, (200,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(tiny(tokens[None])[0].double(), dim=-1)  # (T, V) reference in float64
    ref = -logp[:-1].gather(1, tokens[1:, None]).sum().item()
    for chunk in (None, 7):
        nll, n = ev.window_nll(tiny, tokens, chunk=chunk)
        assert n == 199 and nll == pytest.approx(ref, rel=REL_TOL)
    nll, n = ev.window_nll(tiny, tokens, first=150)  # sliding: only the last 49 targets
    assert n == 49 and nll == pytest.approx(-logp[150:-1].gather(1, tokens[151:, None]).sum().item(), rel=REL_TOL)


def test_cli_scores_equal_with_chunked_prefill(tmp_path):
    docs = tmp_path / "doc.txt"
    docs.write_text(HAY)
    common = ["--model", "tiny", "--lengths", "64,150", "--windows", "1", "--rope", "default", "--rope", "yarn:2"]
    res = {}
    for chunk in ("0", "7"):
        assert run_main("ppl", *common, "--docs", str(docs), "--prefill-chunk", chunk, "--out", str(tmp_path / chunk)) == 0
        res[chunk] = json.loads((tmp_path / chunk / "ppl.json").read_text())
        assert run_main("passkey", "--model", "tiny", "--lengths", "256", "--depths", "0.5", "--prefill-chunk", chunk,
                        "--out", str(tmp_path / chunk)) == 0
        res[chunk + "p"] = json.loads((tmp_path / chunk / "passkey.json").read_text())
    for a, b in zip(res["0"]["rows"], res["7"]["rows"]):
        for L in ("64", "150"):
            assert a["by_length"][L]["ppl"] == pytest.approx(b["by_length"][L]["ppl"], rel=REL_TOL)
    # The 64-token window was scored from the 150-token pass's hidden states; check it against its own pass.
    tiny = load_model("tiny", vocab_size=tokenizer.BYTE_VOCAB_SIZE, seed=0).eval()
    stream = torch.tensor(tokenizer.load_tokenizer("bytes").encode(HAY)[:64])
    nll64 = next(i["nll"] for i in res["7"]["rows"][0]["items"] if i["length"] == 64)
    assert nll64 == pytest.approx(ev.window_nll(tiny, stream)[0], rel=REL_TOL)
    assert res["0p"]["rows"][0]["items"][0]["answer"] == res["7p"]["rows"][0]["items"][0]["answer"]
    meta = res["7"]
    want_device = "cuda" if torch.cuda.is_available() else "cpu"  # devices.choose_device's default
    assert meta["device"] == want_device and meta["dtype"] == ("bfloat16" if want_device == "cuda" else "float32")
    assert meta["git_revision"] and meta["rows"][1]["rope_scaling"]["rope_type"] == "yarn"
    assert (tmp_path / "7" / "ppl.png").stat().st_size > 0


def test_adapter_equals_merged_model(tmp_path):
    base = tmp_path / "base"
    m = load_model("tiny", vocab_size=tokenizer.BYTE_VOCAB_SIZE, seed=0)
    save_model(m, base)
    lora.apply_lora(m, r=4, alpha=8.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    lora_peft.save_adapter(m, tmp_path / "adapter")
    lora.merge_lora(m)
    save_model(m, tmp_path / "merged")
    docs = tmp_path / "doc.txt"
    docs.write_text(HAY)
    assert run_main("ppl", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--model",
                    str(tmp_path / "merged"), "--adapter", "none", "--model", str(base), "--adapter", "none",
                    "--tokenizer", "bytes", "--docs", str(docs), "--lengths", "100", "--windows", "2",
                    "--out", str(tmp_path / "o")) == 0
    rows = json.loads((tmp_path / "o" / "ppl.json").read_text())["rows"]
    adapted, merged, plain = (row["by_length"]["100"]["ppl"] for row in rows)
    assert adapted == pytest.approx(merged, rel=1e-4)  # merge changes float32 rounding of W0 + BA only
    assert abs(adapted - plain) > 1e-3 * plain  # the adapter did something


def test_retention_is_oriented_so_that_one_is_kept():
    """Hand-made rows: perplexity is lower-is-better, so the ratio is first / row; accuracy row / first;
    a first row that retrieves nothing gives no ratio."""
    from eval_report import retention
    assert retention("ppl", [4.0, 2.0, 8.0]) == [1.0, 2.0, 0.5]
    assert retention("passkey", [0.5, 0.25, 1.0]) == [1.0, 0.5, 2.0]
    assert retention("kv", [0.0, 0.5]) == [None, None]


def test_tables_report_the_base_length_and_retention(tmp_path, capsys):
    """--base-length is evaluated beside --lengths; the JSON and the table carry each row's retention at it
    against the first row (reference: the rows' own perplexities, exact)."""
    docs = tmp_path / "doc.txt"
    docs.write_text(HAY)
    assert run_main("ppl", "--model", "tiny", "--lengths", "150", "--base-length", "64", "--windows", "1", "--rope",
                    "default", "--rope", "linear:4", "--docs", str(docs), "--out", str(tmp_path)) == 0
    res = json.loads((tmp_path / "ppl.json").read_text())
    assert res["lengths"] == [64, 150] and res["base_length"] == 64
    first, second = (r["by_length"]["64"]["ppl"] for r in res["rows"])
    assert res["rows"][0]["retained"]["ppl"] == 1.0 and res["rows"][1]["retained"]["ppl"] == first / second
    out = capsys.readouterr().out
    assert "retained@64 vs first row" in out and f"{first / second:.3f}x" in out


def test_ruler_scores_carry_standard_errors_and_the_average_names_its_tasks(tmp_path, capsys):
    """RULER's protocol through the CLI: --samples prompts per task and length, each within L with its tokens
    to generate, scored by RULER's metric; per-task score +- s.e. and an average not called RULER."""
    assert run_main("ruler", "--model", "tiny", "--lengths", "2048", "--samples", "2", "--tasks", "niah_single_1,fwe",
                    "--out", str(tmp_path)) == 0
    row = json.loads((tmp_path / "ruler.json").read_text())["rows"][0]
    assert len(row["items"]) == 4 and row["chat_template"] == "base"
    for it in row["items"]:
        assert it["prompt_tokens"] + eval_ruler.tokens_to_generate(it["task"]) <= 2048
        assert it["correct"] == eval_ruler.score_ruler(it["task"], it["answer"], it["reference"])
    cell = row["by_task"]["fwe"]["2048"]
    assert cell["n"] == 2 and cell == eval_ruler.summarize([i["correct"] for i in row["items"] if i["task"] == "fwe"])
    assert row["average"]["name"] == "mean of 2 tasks (niah_single_1, fwe)"
    out = capsys.readouterr().out
    assert f"| fwe | {cell['score']:.3f} ± {cell['se']:.3f} |" in out and "not RULER's" in out


def test_ruler_prepare_only_writes_rulers_jsonl_without_a_model(tmp_path):
    assert run_main("ruler", "--prepare-only", "--tokenizer", "bytes", "--lengths", "2048", "--tasks", "vt,cwe",
                    "--samples", "2", "--template", "base", "--out", str(tmp_path)) == 0
    data = eval_ruler.RulerData(tokenizer.load_tokenizer("bytes"), None, eval_ruler.ruler_haystack(None)[0])
    for task in ("vt", "cwe"):
        rows = [json.loads(x) for x in (tmp_path / "2048" / task / "validation.jsonl").read_text().splitlines()]
        assert rows == [{k: v for k, v in data.row(task, 2048, i).items() if k != "ids"} for i in range(2)]


@pytest.mark.parametrize("argv,needle", [
    (["ppl", "--model", "tiny", "--base-length", "1"], "--base-length"),
    (["ppl", "--model", "does/not/exist"], "does/not/exist"),
    (["ppl", "--model", "tiny", "--lengths", "0,x"], "--lengths"),
    (["passkey", "--model", "tiny", "--depths", "2"], "--depths"),
    (["ppl", "--model", "tiny", "--adapter", "nowhere"], "--adapter nowhere"),
    (["ppl", "--model", "tiny", "--docs", "missing.txt"], "missing.txt"),
    (["ppl", "--model", "tiny", "--device", "nodevice"], "--device 'nodevice'"),
] + ([] if torch.cuda.is_available() else [(["ppl", "--model", "tiny", "--device", "cuda"], "CUDA is not available")]))
def test_errors_are_one_line(tmp_path, capsys, argv, needle):
    assert run_main(*argv, "--out", str(tmp_path)) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_cli_error_exits_1_with_one_line(tmp_path):
    r = run_cli("kv", "--model", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


@pytest.mark.slow
def test_smollm2_passkey_short(smollm2_path, tmp_path):
    r = run_cli("passkey", "--model", smollm2_path, "--lengths", "512", "--depths", "0.5", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    item = json.loads((tmp_path / "passkey.json").read_text())["rows"][0]["items"][0]
    assert item["correct"], item  # a 135M instruct model retrieves a 5-digit key from 512 tokens
