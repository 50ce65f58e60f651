"""plan.py: the memory plan of `train.py --dry-run`, built from the config and the model shape alone."""
import json
import re
import sys
from pathlib import Path

import pytest

import config
import plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_memory  # bench/ is not a package: found through sys.path above


def dry_run_output(capsys, recipe, **given):
    plan.dry_run(config.resolve(given, recipe, dry_run=True))
    return capsys.readouterr().out


def test_dry_run_llama3_80k_fits_80gb(capsys):
    out = dry_run_output(capsys, "llama3-80k", model="llama-3-8b", ctx=80000, nproc=8)
    total = float(re.search(r"total\s+([\d.]+) GiB", out).group(1))
    weights = float(re.search(r"weights\s+([\d.]+) GiB", out).group(1))
    assert total < 80 and 4 < weights < 7, out  # 8B in NF4 ~ 4.3 GB linears + 2 GB bf16 embed/head


def test_dry_run_plans_the_token_chunked_mlp(capsys):
    """--mlp-chunk replaces the block's T x 6 F MLP term by chunk x 6 F + T x 4 C: on Llama-3-8B the
    recomputed block keeps 38.9K values per token instead of 108.5K (plus 0.35G for one chunk)."""
    plans = []
    for extra in ({}, {"mlp_chunk": 4096}):
        out = dry_run_output(capsys, "llama3-80k", model="llama-3-8b", ctx=80000, nproc=8, **extra)
        plans.append(float(re.search(r"one block's backward\s+([\d.]+) GiB", out).group(1)))
    assert plans[1] < plans[0] / 2, plans


def test_dry_run_returns_the_plan_it_prints(capsys):
    p, summary = plan.dry_run(config.resolve({"model": "tiny", "ctx": 64}, dry_run=True))
    out = capsys.readouterr().out
    assert f"{p['total'] / 2**30:9.2f} GiB" in out and summary["trainable"] > 0
    assert p["total"] == sum(v for k, v in p.items() if k not in ("total", "one block's backward",
                                                                     "loss (chunk x V logits + 4 T x C)")
                             and not k.startswith("host:")) + \
        max(p["one block's backward"], p["loss (chunk x V logits + 4 T x C)"])


def test_context_parallel_plan_divides_activations_and_adds_the_exchange():
    """--cp 8: checkpoints and the loss's 4 T x C count T/8 tokens; the block's backward is the T/8 block
    plus the all-to-all term; weights and optimizer state do not change. 1M tokens fit 80 GB with
    --mlp-chunk (Llama-3-8B, the 80K recipe)."""
    base = dict(model="llama-3-8b", ctx=1048576, nproc=8)
    one = plan.dry_run(config.resolve({**base, "ctx": 131072}, "llama3-80k", dry_run=True))[0]
    cp8 = plan.dry_run(config.resolve({**base, "cp": 8}, "llama3-80k", dry_run=True))[0]
    a2a = plan.all_to_all_bytes(config.resolve({**base, "cp": 8}, "llama3-80k", dry_run=True),
                                plan.model_config("llama-3-8b"), 2)
    assert a2a == 131072 * 2 * 32 * 128 * 2  # send + receive buffers of q's exchange, bf16
    assert cp8["block checkpoints"] == one["block checkpoints"]
    assert cp8["weights"] == one["weights"] and cp8["AdamW moments"] == one["AdamW moments"]
    assert cp8["one block's backward"] == one["one block's backward"] + a2a
    chunked = plan.dry_run(config.resolve({**base, "cp": 8, "mlp_chunk": 4096}, "llama3-80k", dry_run=True))[0]
    assert cp8["total"] > 80e9 > chunked["total"]


@pytest.mark.slow
def test_cpu_plan_within_15_percent_of_a_train_py_run():
    """The cheapest point of bench/RESULTS.md's plan table: `train.py --steps 1` on the benchmark shape
    (hidden 512, 4 layers, vocab 32000) at 2K, full attention, in a fresh process with train.py's allocator
    setting. Reference: the process's peak RSS; tolerance 15%, the plan's target (measured +1%)."""
    argv = bench_memory.train_args("bench", 2048, "full", None, str(Path(json.__file__).parent))
    measured = bench_memory.run_point(argv, default_allocator=False)
    planned = bench_memory.planned_mib(argv)["total"]
    assert abs(planned / measured["peak_mib"] - 1) < 0.15, (planned, measured)
