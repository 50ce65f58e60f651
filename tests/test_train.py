"""train.py: user errors, the dry-run plan, single-process training, and (slow) multi-process equivalence,
kill-and-resume determinism, the 80K path and memory scaling."""
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenizer
from helpers import (CP_COMMON, TINY, adapter_tensors, free_port, losses, run, torchrun_sigkill_and_resume,
                     wait_for_step)

ROOT = Path(__file__).resolve().parents[1]
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
    ([*TINY, "--ctx", "64", "--data", "{corpus}", "--pose", "64"], "--pose must be"),
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
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["peak_rss_gb"] > 0 and "peak_mem_gb" not in rec, rec  # named by what it measures (memory_peak.py)
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


@pytest.fixture
def short_docs(tmp_path):
    """Many short documents (this project's lines cut to 10..30 bytes, one JSONL record each): every
    64-token chunk crosses document borders."""
    lines = [l.strip() for l in (ROOT / "model.py").read_text().splitlines() if len(l.strip()) > 10][:300]
    path = tmp_path / "short.jsonl"
    path.write_text("".join(json.dumps({"text": l[:10 + i % 21]}) + "\n" for i, l in enumerate(lines)))
    return path


def test_doc_mask_and_pose_train_with_nf4_yarn_and_s2(tmp_path, short_docs):
    """--doc-mask and --pose each change the run (attention stops at borders; positions reach 640), both
    with NF4, a RoPE method and S²-Attn; PoSE says what it does once. Exactness is test_doc_attn's and
    test_pose's."""
    common = [*TINY, "--ctx", "64", "--data", str(short_docs), "--steps", "1", "--attn", "s2",
              "--quant", "nf4", "--rope", "yarn:4"]
    outs = {}
    for name, extra in (("plain", []), ("doc", ["--doc-mask"]), ("pose", ["--pose", "640"])):
        r = run([*common, *extra, "--out", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr
        assert (r.stdout.count("PoSE:") == 1) == (name == "pose"), r.stdout
        outs[name] = losses(tmp_path / name)
        assert len(outs[name]) == 1 and all(math.isfinite(l) for l in outs[name])
    # float32 on CPU is deterministic: a flag that did nothing would give the same losses bit for bit
    assert outs["doc"] != outs["plain"] and outs["pose"] != outs["plain"], outs


def test_pose_positions_follow_the_global_sample_and_doc_mask_chooses_document_attention():
    """In process: rank r's micro-step i of step s is global sample (s * accum + i) * world + r, so 2 ranks
    x accum 1 draw the positions of 1 rank x accum 2; --doc-mask with S²-Attn equals doc_attn with the
    sequence's window G inside each document (the float64 reference is test_doc_attn's)."""
    import train_config
    import doc_attn
    import pose
    import shift_attn
    import parallel
    import train
    from parallel import Dist
    cpu = torch.device("cpu")
    cfg = train_config.resolve({"model": "tiny", "ctx": 64, "data": "x", "pose": 640, "grad_accum": 2})
    one = train.add_pose_positions(cfg, [{"input_ids": torch.zeros(64)} for _ in range(2)], 3, Dist(0, 0, 1, cpu))
    cfg2 = dataclasses.replace(cfg, grad_accum=1)
    two = [train.add_pose_positions(cfg2, [{"input_ids": torch.zeros(64)}], 3, Dist(r, r, 2, cpu))[0]
           for r in range(2)]
    for a, b in zip(one, two):
        assert torch.equal(a["positions"], b["positions"])
    assert torch.equal(one[1]["positions"], pose.pose_positions(64, 640, pose.sample_rng(0, 7)))
    # --cp 2: the two ranks of a data group draw the same positions and each keeps its half of them
    cfg_cp = dataclasses.replace(cfg2, cp=2)
    pair = [train.add_pose_positions(cfg_cp, [{"input_ids": torch.zeros(63, dtype=torch.long),
                                              "labels": torch.zeros(63, dtype=torch.long)}], 3, Dist(r, r, 2, cpu))
            for r in range(2)]
    assert torch.equal(pair[0][0]["positions"], pair[1][0]["positions"])
    shards = [train.shard_batch(pair[r], parallel.Mesh(1, 2, 0, r), Dist(r, r, 2, cpu))[0]["positions"]
              for r in range(2)]
    whole = pair[0][0]["positions"]
    assert torch.equal(torch.cat(shards), torch.cat([whole, whole[-1:] + 1]))  # 63 + one padding position

    cfg = train_config.resolve({"model": "tiny", "ctx": 40, "data": "x", "doc_mask": True, "attn": "s2"})
    pos = torch.cat([torch.arange(n) for n in (13, 27)])
    b = {"input_ids": torch.zeros(40, dtype=torch.long), "labels": torch.zeros(40, dtype=torch.long), "positions": pos}
    x, y, p, fn = train.micro_inputs(cfg, b, train.attention_fn(cfg), Dist(0, 0, 1, cpu))
    assert torch.equal(p, pos)
    q, k, v = (torch.randn(1, h, 40, 8, dtype=torch.float64) for h in (4, 2, 2))
    ref = doc_attn.document_attention(pos, shift_attn.make_attention(group_size=10))(q, k, v)  # G = 40 / 4
    assert torch.equal(fn(q, k, v), ref)
    assert not torch.allclose(fn(q, k, v), train.attention_fn(cfg)(q, k, v))


# ----------------------------------------------------------------------------- slow: processes


@pytest.mark.slow
def test_pose_and_doc_mask_resume_reproduces_the_uninterrupted_run(tmp_path, short_docs):
    """PoSE positions come from (--seed, sample index) and doc-mask positions from the data cursor, so
    3 steps equal 2 steps, then --resume to 3 (bit for bit)."""
    for extra in (["--pose", "640"], ["--doc-mask"]):
        name = extra[0].strip("-")
        common = [*TINY, "--ctx", "64", "--data", str(short_docs), "--lr", "1e-2", "--save-every", "1",
                  "--schedule", "constant", *extra]  # constant: the 2-step run has the 3-step run's lrs
        ref, out = tmp_path / f"{name}-ref", tmp_path / f"{name}-resumed"
        assert run([*common, "--steps", "3", "--out", str(ref)]).returncode == 0
        assert run([*common, "--steps", "2", "--out", str(out)]).returncode == 0
        r = run([*common, "--steps", "3", "--out", str(out), "--resume"])
        assert r.returncode == 0, r.stderr
        a, b = adapter_tensors(ref), adapter_tensors(out)
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
        assert losses(ref) == losses(out)


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
    wait_for_step(proc, out, target)
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
import resource, torch
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
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.strip())


@pytest.mark.slow
def test_peak_memory_grows_linearly_with_context(tmp_path):
    m16, m32 = _peak_rss_mb(16384, tmp_path), _peak_rss_mb(32768, tmp_path)
    assert m32 <= 2.1 * m16, (m16, m32)


# ----------------------------------------------------------------------------- context parallelism


@pytest.mark.parametrize("model,flags,needle", [
    ("llama-3-8b", ["--cp", "12", "--nproc", "12"], "--cp 12 is above the model's 8 kv heads but not a multiple"),
    ("tiny", ["--cp", "3", "--nproc", "3"], "--cp 3 is above the model's 2 kv heads but not a multiple of them"),
    ("llama-3-8b", ["--cp", "64", "--nproc", "64"], "--cp 64 does not divide the model's 32 query heads"),
    ("tiny", ["--cp", "2", "--nproc", "2", "--rope", "dynamic:4"], "dynamic NTK"),
])
def test_dry_run_refuses_what_training_refuses(tmp_path, corpus, capsys, model, flags, needle):
    """The dry run applies memory_plan.check_run, the function training applies before any weight loads, so both
    stop with the same line. Training runs in-process as rank 0 of a world of --nproc (train.train reaches
    the check before it creates any process group); the dry run through train.main, one line on stderr,
    exit 1."""
    import train_config
    import parallel
    import train
    from errors import UserError
    with pytest.raises(SystemExit) as e:
        train.main(["--dry-run", "--model", model, "--ctx", "384", *flags])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1 and needle in err, err
    given = vars(train_config.build_parser().parse_args(["--model", model, "--ctx", "384", "--data", str(corpus),
                                                   "--out", str(tmp_path / "out"), "--tokenizer", "bytes", *flags]))
    for k in ("recipe", "dry_run", "suggest_base", "force", "nproc"):
        given.pop(k, None)
    world = int(flags[flags.index("--nproc") + 1])
    with pytest.raises(UserError) as refused:
        train.train(train_config.resolve(given, world_size=world), parallel.Dist(0, 0, world, torch.device("cpu")))
    assert err == f"error: {refused.value}"


def test_plan_counts_the_kv_copies_past_the_kv_heads():
    """Llama-3-8B (8 kv heads) at --cp 16 and 32: the dry run accepts them, and the plan's exchange term
    is q's send and receive buffers plus the kv copies: the head-layout k and v that parallel.replicate_kv's
    shape gives (meta tensors), less the 2 (T/N) Hkv D the block already counts; at --cp 8 no copies."""
    import memory_plan
    import parallel
    import train_config
    mc = memory_plan.model_config("llama-3-8b")
    for cp in (8, 16, 32):
        cfg = train_config.resolve(dict(model="llama-3-8b", ctx=262144, nproc=cp, cp=cp), "llama3-80k", dry_run=True)
        plan = memory_plan.dry_run(cfg)[0]
        k = torch.empty(1, mc.n_kv_heads, 262144 // cp, mc.head_dim, device="meta")  # (B, Hkv, T/N, D)
        copies = 2 * (parallel.replicate_kv(k, cp).numel() - k.numel()) * 2  # k and v, bf16
        assert (copies == 0) == (cp == 8)
        q_buffers = 2 * (262144 // cp) * mc.n_heads * mc.head_dim * 2
        assert memory_plan.all_to_all_bytes(cfg, mc, 2) == q_buffers + copies
        assert plan["one block's backward"] > memory_plan.all_to_all_bytes(cfg, mc, 2)


def test_float16_is_refused_in_one_line(tmp_path, corpus, capsys):
    """--dtype float16 has no loss scaling: the backward starts from world / N_sup (1/65,536 here: 256
    micro-steps of 256 tokens), below which fp16 gradients flush to zero; refused, run and dry run alike,
    before anything is written."""
    import train
    args = [*TINY, "--ctx", "256", "--grad-accum", "256", "--steps", "1", "--dtype", "float16"]
    for extra in (["--data", str(corpus), "--out", str(tmp_path / "out")], ["--dry-run"]):
        with pytest.raises(SystemExit) as e:
            train.main(args + extra)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and len(err.splitlines()) == 1 and "--dtype bfloat16" in err, err
    assert not (tmp_path / "out").exists()


def assert_same_run(one: Path, other: Path, steps: int = 3) -> None:
    """Every logged loss and adapter tensor of two runs within 1e-5 (float32; only the order of the
    reductions differs: shard losses and gradients summed over ranks). Runs compared this way use lr 1e-3
    where 1e-2 fails: Adam's m / sqrt(v) turns the reordering noise of a near-zero LoRA gradient entry into
    an update of a fair share of the lr, while a real error moves entries by ~lr and the first loss at once."""
    la, lb = losses(one), losses(other)
    assert len(la) == len(lb) == steps and all(abs(x - y) < 1e-5 for x, y in zip(la, lb)), (la, lb)
    a, b = adapter_tensors(one), adapter_tensors(other)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k


@pytest.mark.slow
def test_context_parallel_equals_one_process(tmp_path, corpus):
    """torchrun --cp 2 against `python train.py` on the same data and seed, float32, tiny (4 heads, 2 kv
    heads: GQA), NF4, S²-Attn for 2 steps then full attention for the last (--full-attn-tail), norms
    trained too. Tolerance 1e-5 on every logged loss and adapter tensor: float32, only the order of the
    reductions differs (shard losses and gradients summed over ranks)."""
    common = [*CP_COMMON, "--data", str(corpus), "--attn", "s2", "--full-attn-tail", "0.34", "--quant", "nf4",
              "--train", "norm"]
    r1 = run([*common, "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr
    r2 = run([*common, "--cp", "2", "--out", str(tmp_path / "cp")], torchrun=2)
    assert r2.returncode == 0, r2.stderr
    assert "mesh: dp 1 x cp 2; 32 tokens of each sequence per rank" in r2.stdout
    assert any(k.endswith("norm.weight") for k in adapter_tensors(tmp_path / "cp"))
    assert_same_run(tmp_path / "one", tmp_path / "cp")


@pytest.mark.slow
def test_cp_past_the_kv_heads_equals_one_process(tmp_path, corpus):
    """torchrun --cp 4 on tiny (4 heads, 2 kv heads: each kv head replicated to 2 ranks, one query head
    per rank) against `python train.py` on the same data and seed, float32, ctx 128, with S²-Attn (heads
    2, 3 shifted: ranks 2 and 3's border is <= 0, ranks 0 and 1 plain; full causal attention past the kv
    heads is covered by test_parallel's 4-rank float64 exchange). Tolerance 1e-5 and lr 1e-3
    (assert_same_run; at 1e-2: 1.6e-5 on one gate_proj lora_A entry)."""
    common = [*CP_COMMON, "--ctx", "128", "--lr", "1e-3", "--data", str(corpus), "--attn", "s2"]
    r1 = run([*common, "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr
    r4 = run([*common, "--cp", "4", "--out", str(tmp_path / "cp")], torchrun=4)
    assert r4.returncode == 0, r4.stderr
    assert "mesh: dp 1 x cp 4; 32 tokens of each sequence per rank" in r4.stdout
    assert_same_run(tmp_path / "one", tmp_path / "cp")


@pytest.mark.slow
def test_dp2_by_cp2_equals_one_process_with_double_accumulation(tmp_path, corpus):
    """4 ranks as dp 2 x cp 2 against 1 process with --grad-accum 2 (the same 2 sequences per step, each
    dp group reading its own), full causal attention, float32; tolerance 1e-5 as above. lr 1e-3: at 1e-2
    Adam's first steps turn the reduction-order noise of a near-zero LoRA-B gradient entry into an update
    of a fair share of the lr (2.5e-5 measured on one up_proj entry), while a real error would still move
    entries by ~lr."""
    common = [*CP_COMMON, "--data", str(corpus), "--lr", "1e-3"]
    r1 = run([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr
    r4 = run([*common, "--cp", "2", "--out", str(tmp_path / "mesh")], torchrun=4)
    assert r4.returncode == 0, r4.stderr
    assert_same_run(tmp_path / "one", tmp_path / "mesh")


@pytest.mark.slow
def test_cp_sigkill_and_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    """Kill -9 every process of a --cp 2 run at a random step, --resume: the adapter is bit-identical
    to the uninterrupted --cp 2 run (dropout on: the per-rank RNG states are restored too)."""
    common = [*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "6", "--lr", "1e-2", "--save-every", "1",
              "--lora-dropout", "0.1", "--keep", "3", "--cp", "2"]
    torchrun_sigkill_and_resume(tmp_path, common, steps=6)


def test_bf16_trained_norms_move_and_follow_the_float32_run(tmp_path, corpus):
    """--dtype bfloat16: trained norms and embedding are float32 masters (lora.py), so one AdamW step of
    lr 2e-3 moves a norm gain of 1.0 (in bf16, 1.0 - 2e-3 rounds back to 1.0: the gains stayed exactly 1).

    Reference: the same run in float32. AdamW's first step is lr * g / (|g| + eps), i.e. +-lr per element,
    so the two runs' norm updates must agree in sign wherever bf16's gradient is not drowned by its 8-bit
    rounding (>= 90% of elements), and their losses (2 steps) within 2% relative: bf16 keeps 8 significant
    bits (2^-8 = 0.4% per rounding); a wrong master (no update, or a double one) moves far more."""
    common = [*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "2", "--lr", "2e-3", "--schedule", "constant",
              "--train", "norm,embed"]
    for dt in ("bfloat16", "float32"):
        r = run([*common, "--dtype", dt, "--out", str(tmp_path / dt)])
        assert r.returncode == 0, r.stderr
    bf, fp = adapter_tensors(tmp_path / "bfloat16"), adapter_tensors(tmp_path / "float32")
    norms = [k for k in bf if "norm" in k]
    assert norms and all(bf[k].dtype == torch.float32 for k in bf)
    moved = torch.cat([(bf[k] - 1).flatten() for k in norms])
    assert (moved != 0).all() and moved.abs().median() > 2e-3, moved  # every gain moved, most by ~2 x 2e-3
    off_grid = (moved + 1 != (moved + 1).bfloat16().float()).float().mean()  # not bf16 values: float32 masters
    assert off_grid >= 0.9, off_grid
    same_sign = torch.cat([((bf[k] - 1).sign() == (fp[k] - 1).sign()).flatten() for k in norms]).float().mean()
    assert same_sign >= 0.9, same_sign
    lb, lf = losses(tmp_path / "bfloat16"), losses(tmp_path / "float32")
    assert all(abs(a - b) <= 0.02 * abs(b) for a, b in zip(lb, lf)), (lb, lf)


def test_checkpoint_records_the_dtype_and_resumes_across_device_types(tmp_path, corpus):
    """trainer_state.json holds the dtype actually used (float32 on CPU, not None), so resuming where the
    default differs (bfloat16 on CUDA) is a one-line error naming dtype; rng.safetensors holds one state per
    device type, so a checkpoint with a CUDA state (written here by hand, as a CUDA run writes it) resumes
    on the CPU, which restores the CPU state and skips the CUDA one."""
    from safetensors.torch import load_file, save_file
    out = tmp_path / "out"
    common = [*TINY, "--ctx", "64", "--data", str(corpus), "--out", str(out)]
    assert run([*common, "--steps", "1"]).returncode == 0
    ckpt = out / "ckpt-0000001"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["config"]["dtype"] == "float32"
    rng = load_file(str(ckpt / "rng.safetensors"))
    assert sorted(rng) == ["rank0"] and rng["rank0"].numel() == torch.get_rng_state().numel()
    save_file({**rng, "rank0.cuda": torch.zeros(16, dtype=torch.uint8)}, str(ckpt / "rng.safetensors"))
    r = run([*common, "--steps", "2", "--resume"])
    assert r.returncode == 0, r.stderr
    assert len(losses(out)) == 2
    state["config"]["dtype"] = "bfloat16"  # as a CUDA run records it
    (out / "ckpt-0000002" / "trainer_state.json").write_text(json.dumps(state))
    r = run([*common, "--steps", "3", "--resume"])
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "Traceback" not in r.stderr and "dtype='bfloat16'" in last, r.stderr


@pytest.mark.slow
def test_cp_chat_shards_without_a_target_equal_one_process(tmp_path):
    """Chat samples whose prompt fills more than the first half of the sequence, --cp 2 with a trained
    embedding and head: rank 0's shard has no supervised token, its loss is a zero that still carries the
    graph (loss.py's note), so backward and DDP run as on one process. Tolerance 1e-5 on every logged loss
    and adapter tensor (float32; only the order of the reductions differs). lr 1e-3: Adam's m / sqrt(v)
    turns the reordering noise of a near-zero gradient entry into an update of order lr (2e-5 seen at 1e-2)."""
    rows = [{"messages": [{"role": "user", "content": f"question {i}: " + "what is written here? " * 7},
                          {"role": "assistant", "content": f"answer {i}."}]} for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [*TINY, "--chat-template", "chatml", "--data", str(data), "--ctx", "256", "--train", "embed,lm_head",
              "--steps", "3", "--lr", "1e-3", "--schedule", "constant"]
    r1 = run([*common, "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr
    r2 = run([*common, "--cp", "2", "--out", str(tmp_path / "cp")], torchrun=2)
    assert r2.returncode == 0, r2.stderr
    assert_same_run(tmp_path / "one", tmp_path / "cp")
    a = adapter_tensors(tmp_path / "cp")
    assert any("embed" in k for k in a) and any("lm_head" in k for k in a)


def two_nodes(args: list[str], outs: tuple[Path, Path], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """train.py as 2 "nodes" of one process each on this machine (torchrun --nnodes 2 --node_rank R, static
    rendezvous at 127.0.0.1 on a free port), node R writing to outs[R]."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(ROOT / "train.py"), *args, "--out", str(outs[r])], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in (0, 1)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_cp_group_across_two_nodes_equals_one_process(tmp_path, corpus):
    """--cp 2 whose two ranks sit on two torchrun "nodes" (two_nodes: --nnodes 2, one process each), so the
    all-to-alls cross the node boundary, against one process on the same data and seed; both nodes share
    --out (rank 0 writes). Tolerance 1e-5 (assert_same_run); lr 1e-3 for the reason given there (at 1e-2:
    2.3e-5 on one q_proj lora_A entry)."""
    common = [*CP_COMMON, "--lr", "1e-3", "--data", str(corpus), "--attn", "s2"]
    r1 = run([*common, "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr
    nodes = two_nodes([*common, "--cp", "2"], (tmp_path / "cp", tmp_path / "cp"))
    assert all(r.returncode == 0 for r in nodes), [r.stderr for r in nodes]
    assert "mesh: dp 1 x cp 2; 32 tokens of each sequence per rank" in nodes[0].stdout
    assert_same_run(tmp_path / "one", tmp_path / "cp")


@pytest.mark.slow
def test_two_nodes_resume_only_from_a_shared_out(tmp_path, corpus):
    """Two nodes, each its own --out (no shared filesystem): only rank 0 wrote the checkpoint, so --resume
    stops on both nodes with one line naming --out, both ranks' findings and the need for a shared folder.
    With one shared --out, 2 steps then --resume to 4 equal 4 uninterrupted steps bit for bit."""
    common = [*TINY, "--ctx", "64", "--data", str(corpus), "--lr", "1e-2", "--schedule", "constant",
              "--lora-dropout", "0.1"]
    own = (tmp_path / "node0", tmp_path / "node1")
    assert all(r.returncode == 0 for r in two_nodes([*common, "--steps", "2"], own))
    assert (own[0] / "ckpt-0000002").is_dir() and not own[1].exists()
    for node, r in enumerate(two_nodes([*common, "--steps", "4", "--resume"], own)):
        errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
        assert r.returncode != 0 and len(errors) == 1, r.stderr
        assert errors[0].startswith(f"error: --out {own[node]}: rank 1 (host ") and "finds nothing, rank 0 (host " \
            in errors[0] and "finds ckpt-0000002 (" in errors[0] and errors[0].endswith("(a shared filesystem)")
    shared, ref = tmp_path / "shared", tmp_path / "ref"
    assert all(r.returncode == 0 for r in two_nodes([*common, "--steps", "4"], (ref, ref)))
    assert all(r.returncode == 0 for r in two_nodes([*common, "--steps", "2"], (shared, shared)))
    resumed = two_nodes([*common, "--steps", "4", "--resume"], (shared, shared))
    assert all(r.returncode == 0 for r in resumed) and "resumed from" in resumed[0].stdout
    a, b = adapter_tensors(ref), adapter_tensors(shared)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(ref) == losses(shared)
