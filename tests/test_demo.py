"""demo.py: the held-out split, the fact/query data, the passkey prompts and scoring, the shipped base, and
(slow) a shortened end-to-end demo through `python train.py` with no model."""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import demo
import eval as ev
import lora_peft
import model as llama
import eval_tasks
import tokenizer
from checkpoint import SAFETENSORS_SINGLE, load_model
from train_config import resolve
from errors import UserError
import generate as gen
from generate import generate
from parallel import Dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def split():
    return demo.stdlib_split()


@pytest.fixture(scope="module")
def held_out(split):
    return demo.corpus_bytes(split[1][:40])


def test_split_is_disjoint_deterministic_and_nonempty(split):
    held_in, held_out = split
    assert held_in and held_out and not set(held_in) & set(held_out)
    assert 0.05 < len(held_out) / (len(held_in) + len(held_out)) < 0.2  # ~1/HOLDOUT_MOD of the files
    assert demo.stdlib_split() == split


def test_corpus_has_no_fact_marker(held_out):
    assert ord("$") not in set(held_out[:2_000_000].tolist())


@pytest.mark.parametrize("names,queries,spread", [(demo.NAMES, 1, None), ("K", 3, 24), ("K", 8, None)])
@pytest.mark.parametrize("seed", range(8))
def test_training_sequence_answers_repeat_their_facts(held_out, seed, names, queries, spread):
    """Property: every query `K$` is answered by the value of the one earlier fact `K$NNNN`, answers carry
    the answer weight, fact values weight 0, and the sequence is exactly T + 1 tokens."""
    T = 256
    toks, w = demo.training_sequence(held_out, T, random.Random(seed), 6, 4.0, names, queries, spread)
    assert len(toks) == T + 1 and len(w) == T and toks[0] == demo.BOS
    text = bytes(toks[1:]).decode("latin-1")
    seen = {}
    for m in re.finditer(r"\n([A-Z])\$(\d{4})\n", text):
        name, value, i = m.group(1), m.group(2), m.start(2) + 1  # token index of the value's first digit
        weights = w[i - 1:i - 1 + demo.KEY_DIGITS]  # weight of predicting tokens[i..i+3]
        if name in seen:
            assert value == seen[name] and weights == [4.0] * demo.KEY_DIGITS
        else:
            seen[name] = value
            assert weights == [0.0] * demo.KEY_DIGITS
    assert sum(x == 4.0 for x in w) == demo.KEY_DIGITS * (len(re.findall(r"\n[A-Z]\$\d{4}\n", text)) - len(seen))


def test_passkey_prompt_is_exact_length_with_one_fact(held_out):
    for length, depth in [(256, 0.0), (256, 0.5), (2560, 0.9)]:
        ids = eval_tasks.code_passkey_prompt(held_out, 1000, length, depth, "Q", "1234")
        assert len(ids) == length and ids[0] == demo.BOS
        text = bytes(ids[1:]).decode("latin-1")
        assert text.count("$") == 2 and text.count("\nQ$1234\n") == 1 and text.endswith("\nQ$")
        assert abs(text.index("Q$1234") / length - depth) < 0.2  # at a line start near the depth


def test_eval_keys_differ_from_training_keys(held_out):
    """Evaluation prompts come from their own RNG stream: not the training stream's values."""
    _, answers = eval_tasks.code_passkey_items(held_out, 256, 50, demo.EVAL_SEED)
    rng = random.Random(demo.TRAIN_SEED)
    train_values = [demo.random_value(rng) for _ in range(50)]
    assert [bytes(a).decode() for a in answers] != train_values


def test_greedy_hits_equal_token_by_token_generation(held_out):
    """Reference: model.generate (KV cache, one token at a time). The model's own greedy continuation must
    count as a hit, and the same continuation with its last token changed must not. Exact: argmax ties
    have probability ~0 with random float32 weights."""
    cfg = llama.ModelConfig(**{**demo.BASE_PRESET, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                               "ffn_dim": 64, "max_seq_len": 64})
    net = llama.Transformer(cfg).init_weights(0, std=0.2).eval()
    prompts, _ = eval_tasks.code_passkey_items(held_out, 48, 6, 0)
    greedy = [generate(net, p, demo.KEY_DIGITS) for p in prompts]
    wrong = [g[:-1] + [(g[-1] + 1) % 256] for g in greedy]
    assert demo.greedy_hits(net, prompts, greedy, batch=4).all()
    assert not demo.greedy_hits(net, prompts, wrong, batch=4).any()


def test_untrained_rope_change_resolves_auto_factors_as_training_does():
    """`--rope linear:auto` (the recipes' spelling) means ctx / L in training; the untrained-RoPE row
    must resolve it the same way (it used to fail on 'auto')."""
    cfg = resolve({"model": str(demo.DEMO_DIR), "data": "unused.jsonl", "ctx": 2560, "rope": "linear:auto"})
    net = demo.load_base(demo.DEMO_DIR, cfg)
    assert net.config.rope_scaling["rope_type"] == "linear" and net.config.rope_scaling["factor"] == 10


def test_extension_records_pack_to_one_sequence_each(tmp_path, held_out):
    """Reference: data.py's packer (the trainer's input path): n records give n sequences of ctx tokens,
    each starting with BOS, facts and queries intact."""
    path = tmp_path / "d.jsonl"
    demo.write_extension_data(path, held_out, 512, 5, 0)
    samples = list(data.file_samples(path, tokenizer.ByteTokenizer(), 512))
    assert len(samples) == 5
    for s in samples:
        assert s["input_ids"].shape == (512,) and s["input_ids"][0] == demo.BOS
    text = bytes(t for t in samples[0]["input_ids"].tolist() if t < 256).decode()
    assert re.search(r"\nK\$\d{4}\n", text)


def test_shipped_base_loads_strictly_is_small_and_retrieves_at_L(held_out):
    path = demo.DEMO_DIR / SAFETENSORS_SINGLE
    if not path.is_file():
        pytest.fail(f"{path} missing: the demo base must be shipped (python demo.py pretrain ...)")
    assert path.stat().st_size < 8 * 2**20
    net = load_model(str(demo.DEMO_DIR), dtype=torch.float32)
    assert net.config.vocab_size == tokenizer.BYTE_VOCAB_SIZE and net.config.max_seq_len == 256
    # measured 95% on 40 held-out prompts (demo.py docstring); 80% on these 20 leaves room for sampling noise
    assert demo.passkey_accuracy(net.eval(), held_out, 256, 20, demo.EVAL_SEED) >= 0.8


def test_eval_code_passkey_reproduces_the_demo_probe_on_the_shipped_base(tmp_path, split):
    """`eval.py passkey --format code --model demo` (no --tokenizer: the folder records the byte tokenizer)
    scores the demo's own prompts for the same keys: its per-prompt hits (generate, KV cache, prefill in
    chunks) equal demo.greedy_hits (one teacher-forced batch), so its accuracy is the demo's passkey@256.
    Exact: the same argmax of float32 logits, no near-ties expected on 12 prompts."""
    assert isinstance(tokenizer.load_tokenizer(demo.DEMO_DIR), tokenizer.ByteTokenizer)
    out = tmp_path / "ev"
    assert ev.main(["passkey", "--format", "code", "--model", str(demo.DEMO_DIR), "--lengths", "256", "--trials",
                    "12", "--seed", str(demo.EVAL_SEED), "--out", str(out)]) == 0
    items = json.loads((out / "passkey.json").read_text())["rows"][0]["items"]
    net = load_model(str(demo.DEMO_DIR), dtype=torch.float32).eval()
    hits = demo.greedy_hits(net, *eval_tasks.code_passkey_items(demo.corpus_bytes(split[1]), 256, 12, demo.EVAL_SEED))
    assert [i["correct"] for i in items] == hits.tolist()


def test_eval_code_format_errors_are_one_line(tmp_path, capsys):
    for argv, needle in [(["kv", "--format", "code"], "passkey task only"),
                         (["passkey", "--format", "code", "--depths", "0.5"], "--depths does not apply")]:
        assert ev.main([*argv, "--model", "tiny", "--out", str(tmp_path)]) == 1
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1


def test_run_without_base_is_one_clear_error(tmp_path):
    """`python train.py` with no model and no shipped base: one line naming the file and the fix."""
    d = Dist(0, 0, 1, torch.device("cpu"))
    with pytest.raises(UserError, match=r"model.safetensors: missing; make it with `python demo.py pretrain"):
        demo.run_demo(d, {"base": str(tmp_path), "out": str(tmp_path / "o")})
    assert not (tmp_path / "o").exists()


def test_table_labels_the_base_length_and_reports_retention():
    """Hand-made rows (the README's measured demo): retention at L is base ppl@L / extended ppl@L
    (3.596 / 3.533 = 1.018) and extended passkey@L / base passkey@L; a base retrieving nothing gives n/a."""
    keys = ["ppl@256", "ppl@1280", "ppl@2560", "ppl(256..2560)", "passkey@256", "passkey@1280", "passkey@2560"]
    rows = {"base": dict(zip(keys, [3.596, 18.92, 26.339, 32.832, 0.95, 0.0, 0.0])),
            "extended": dict(zip(keys, [3.533, 3.332, 3.391, 3.376, 0.95, 0.93, 0.82]))}
    table = demo.format_demo_table(rows, 256, demo.FACTORS).splitlines()
    assert "ppl@256 (L)" in table[0] and "passkey@2560 (10L)" in table[0] and "retained@256" in table[0]
    assert table[2].endswith("| 1.000x, 100% |") and table[3].endswith("| 1.018x, 100% |")
    kept = demo.retained(rows["extended"], rows["base"], 256)
    assert kept["ppl"] == pytest.approx(3.596 / 3.533, rel=1e-12) and kept["passkey"] == 1.0
    assert demo.format_retained(demo.retained(rows["base"], {**rows["base"], "passkey@256": 0.0}, 256)).endswith("n/a")


@pytest.mark.slow
def test_shortened_demo_extended_beats_base_at_ten_times(tmp_path):
    """`python train.py` with no --model runs the demo; 40 steps instead of the default, fewer eval items.
    The extended model must beat the base at 10 L on perplexity and not lose on passkey retrieval."""
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--steps", "40", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "adapter:" in r.stdout.splitlines()[-1]
    rows = json.loads((out / "results.json").read_text())["rows"]
    base, ext = rows["base"], rows["extended (NF4 + LoRA)"]
    assert ext["ppl@2560"] < base["ppl@2560"]
    assert ext["passkey@2560"] >= base["passkey@2560"]
    assert "retained at 256" in r.stdout and "retained@256" in (out / "results.md").read_text()
    assert (out / "train" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_short_demo_run_is_reproduced_by_eval_and_its_outputs_carry_the_tokenizer(tmp_path):
    """A 2-step demo run (in-process, 8 keys and one window per length): `eval.py passkey --format code`
    on its base and adapter (no --tokenizer; NF4 and the RoPE as trained) gives the demo table's passkey
    column exactly, same keys (--seed EVAL_SEED); lora_peft.py merges it into a folder generate.py reads
    without a tokenizer flag."""
    torch.set_num_threads(2)
    out = tmp_path / "demo"
    rows = demo.run_demo(Dist(0, 0, 1, torch.device("cpu")), {"steps": 2, "out": str(out), "eval_keys": 8,
                                                         "eval_windows": 1})
    adapter = out / "train" / "adapter"
    assert isinstance(tokenizer.load_tokenizer(adapter), tokenizer.ByteTokenizer)
    lengths = [256, 1280, 2560]
    for name, extra in [("base", []), ("extended (NF4 + LoRA)", ["--adapter", str(adapter), "--quant", "nf4",
                                                               "--rope", demo.DEMO_RECIPE["rope"]])]:
        ev_out = tmp_path / name.split()[0]
        assert ev.main(["passkey", "--format", "code", "--model", str(demo.DEMO_DIR), *extra, "--lengths",
                        ",".join(map(str, lengths)), "--trials", "8", "--seed", str(demo.EVAL_SEED),
                        "--out", str(ev_out)]) == 0
        got = json.loads((ev_out / "passkey.json").read_text())["rows"][0]["by_length"]
        assert [got[str(L)]["accuracy"] for L in lengths] == pytest.approx(
            [rows[name][f"passkey@{L}"] for L in lengths], abs=1e-6)  # float32 mean vs exact fraction
    merged = tmp_path / "merged"
    assert lora_peft.main([str(demo.DEMO_DIR), str(adapter), str(merged)]) is None
    assert gen.main(["--model", str(merged), "--prompt", "def ", "--max-new-tokens", "4"]) is None
