"""train.py: user errors, the dry-run plan, single-process training, and (slow) multi-process equivalence,
kill-and-resume determinism, the 80K path and memory scaling."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--tokenizer", "bytes"]


def run(args, env=None, timeout=600, torchrun=0):
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun \
        else [sys.executable]
    e = {**os.environ, "OMP_NUM_THREADS": "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return subprocess.run(base + [str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=e)


@pytest.fixture
def corpus(tmp_path):
    """A few KB of real text: this project's own sources, copied so the test never reads a moving target."""
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("model.py", "rope.py"):
        (d / f"{name}.txt").write_text((ROOT / name).read_text())
    return d


def adapter_tensors(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("args,needle", [
    (["--ctx", "64", "--data", "x"], "--data needs --model"),
    ([*TINY, "--ctx", "64", "--data", "{corpus}", "--force"], "--force applies to the real-model extension only"),
    (["--ctx", "2560", "--force"], "--force applies to the real-model extension only"),
    (["--model", "nope/nowhere", "--ctx", "64", "--data", "{corpus}"], "nope/nowhere"),
    ([*TINY, "--ctx", "0", "--data", "{corpus}"], "--ctx must be"),
    ([*TINY, "--ctx", "64", "--data", "{corpus}", "--steps", "2", "--epochs", "1"], "conflict"),
    ([*TINY, "--ctx", "64", "--data", "{tmp}/missing.jsonl"], "missing.jsonl"),
    ([*TINY, "--ctx", "64", "--data", "{tmp}/empty.txt", "--steps", "1"], "empty.txt"),
    ([*TINY, "--ctx", "64", "--data", "{corpus}", "--rope", "wobbly:3"], "wobbly"),
    ([*TINY, "--ctx", "64", "--data", "{corpus}", "--mlp-chunk", "-1"], "--mlp-chunk must be"),
    ([*TINY, "--ctx", "64", "--data", "{corpus}", "--full-attn-tail", "1"], "--full-attn-tail must be"),
    ([*TINY, "--ctx", "64", "--data", "{corpus}", "--full-attn-tail", "0.5"], "only applies with --attn s2"),
    ([*TINY, "--ctx", "64", "--data", "{corpus}", "--save-every", "-1"], "--save-every must be"),
    ([*TINY, "--ctx", "64", "--data", "{corpus}", "--epochs", "0"], "--epochs must be"),
])
def test_user_errors_are_one_line(tmp_path, corpus, args, needle):
    (tmp_path / "empty.txt").write_text("")
    args = [a.format(corpus=corpus, tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")]
    r = run(args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert needle in last, r.stderr


def test_unknown_recipe_is_rejected():
    r = run(["--recipe", "magic", *TINY, "--ctx", "64"])
    assert r.returncode == 2 and "invalid choice: 'magic'" in r.stderr and "Traceback" not in r.stderr


def test_resume_from_a_different_configuration_is_refused(tmp_path, corpus):
    out = tmp_path / "out"
    assert run([*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "1", "--out", str(out)]).returncode == 0
    r = run([*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "2", "--out", str(out), "--resume", "--lora-r", "4"])
    assert r.returncode == 1 and "lora_r" in r.stderr and "Traceback" not in r.stderr
    r = run([*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "2", "--out", str(out)])
    assert r.returncode == 1 and "--resume" in r.stderr


# ----------------------------------------------------------------------------- plan and training


def test_dry_run_prints_the_config_and_plan(capsys):
    """The CLI wiring of --dry-run (the plan's numbers are tests/test_plan.py's)."""
    import train
    train.main(["--dry-run", "--model", "llama-3-8b", "--ctx", "80000", "--recipe", "llama3-80k", "--nproc", "8"])
    out = capsys.readouterr().out
    assert '"world_size": 8' in out and '"recipe": "llama3-80k"' in out and "memory plan per device" in out


@pytest.mark.parametrize("args,needle", [
    (["--suggest-base", "65536"], "--suggest-base needs --model"),
    (["--suggest-base", "65536", "--model", "nope/nowhere"], "nope/nowhere"),
    (["--suggest-base", "0", "--model", "tiny"], "--suggest-base must be"),
])
def test_suggest_base_user_errors_are_one_line(capsys, args, needle):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_suggest_base_prints_the_dynamic_ntk_base(capsys):
    import rope
    import train
    train.main(["--suggest-base", "2048", "--model", "tiny"])  # tiny: base 1e4, 256 tokens, head dim 16
    assert capsys.readouterr().out.strip() == f"{rope.suggest_base(1e4, 256, 2048, 16):.4g}"


def test_single_process_run_writes_adapter_metrics_and_merged_model(tmp_path, corpus):
    out = tmp_path / "out"
    r = run([*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "4", "--lr", "1e-2", "--out", str(out),
             "--train", "norm", "--merge", "--save-every", "2", "--quant", "nf4", "--attn", "s2"])
    assert r.returncode == 0, r.stderr
    ls = losses(out)
    assert len(ls) == 4 and all(l == l for l in ls)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "merged" / "config.json").is_file()
    for folder in ("adapter", "merged"):  # a preset trains with the byte tokenizer; both outputs record it
        assert isinstance(tokenizer.load_tokenizer(out / folder), tokenizer.ByteTokenizer)
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000004"]
    assert not list(out.glob(".tmp-*"))


def test_full_attention_tail_switches_the_last_steps_to_full_attention(tmp_path, corpus):
    """--attn s2 --full-attn-tail 0.5 over 2 steps: step 1 is the S²-Attn run's step 1 exactly, step 2 is
    not (full attention over the 64 tokens instead of windows of 16)."""
    common = [*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "2", "--lr", "1e-2", "--attn", "s2"]
    assert run([*common, "--out", str(tmp_path / "s2")]).returncode == 0
    r = run([*common, "--full-attn-tail", "0.5", "--out", str(tmp_path / "tail")])
    assert r.returncode == 0, r.stderr
    s2, tail = losses(tmp_path / "s2"), losses(tmp_path / "tail")
    assert s2[0] == tail[0] and abs(s2[1] - tail[1]) > 1e-4, (s2, tail)


# ----------------------------------------------------------------------------- slow: processes


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_accumulation(tmp_path, corpus):
    common = [*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "3", "--lr", "1e-2", "--lora-targets", "all-linear"]
    r1 = run([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr
    r2 = run([*common, "--grad-accum", "1", "--out", str(tmp_path / "two")], torchrun=2)
    assert r2.returncode == 0, r2.stderr
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k  # float32: only the reduction order differs
    assert all(abs(x - y) < 1e-5 for x, y in zip(losses(tmp_path / "one"), losses(tmp_path / "two")))


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    common = [*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "8", "--lr", "1e-2", "--save-every", "1",
              "--lora-dropout", "0.1", "--keep", "3"]
    ref = run([*common, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = random.Random(0).randint(2, 6)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= target:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run([*common, "--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr
    a, b = adapter_tensors(tmp_path / "ref"), adapter_tensors(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "ref") == losses(out)


@pytest.mark.slow
def test_80k_context_two_processes_end_to_end(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    src = Path(os.__file__).parent
    text = "".join(p.read_text(errors="replace") for p in sorted(src.glob("*.py"))[:20])
    (big / "stdlib.txt").write_text(text[:200_000])
    r = run([*TINY, "--ctx", "80000", "--data", str(big), "--steps", "2", "--attn", "s2", "--out", str(tmp_path / "o"),
             "--loss-chunk", "4096"], torchrun=2, timeout=900)
    assert r.returncode == 0, r.stderr
    assert len(losses(tmp_path / "o")) == 2


def _peak_rss_mb(ctx: int, tmp_path) -> float:
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(ROOT)!r})
import lora
from checkpoint import load_model
from model import MemoryOptions
net = load_model('tiny', vocab_size=32000, memory=MemoryOptions(checkpointing=True))
lora.apply_lora(net, r=8, alpha=16)
x = torch.randint(0, 32000, (1, {ctx}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
net(x, labels=x, loss_chunk=1024).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip())


@pytest.mark.slow
def test_peak_memory_grows_linearly_with_context(tmp_path):
    m16, m32 = _peak_rss_mb(16384, tmp_path), _peak_rss_mb(32768, tmp_path)
    assert m32 <= 2.1 * m16, (m16, m32)
