"""bench/gpu_check.py --device cpu --small: every section runs at tiny sizes and lands in the report, so the
GPU check is known to work before the rare minutes on a GPU are spent on it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import bench_script

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("smoke", "multi_rank", "train", "hf", "demo")
SMOKE = ("nf4", "linear4bit", "bf16_forward", "sdpa_kernels", "compile_offload", "process_group", "sample")


@pytest.mark.slow
def test_small_cpu_run_writes_every_section(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--small",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    # report["seconds"]: 31-74 s measured alone on a 2-core machine; not asserted (shared CI cores vary)
    for name in SECTIONS:
        assert name in report["sections"] and f"## {name}" in md
        assert "error" not in report["sections"][name], report["sections"][name]
    smoke = report["sections"]["smoke"]
    assert set(SMOKE) <= set(smoke)
    failed = {k: v for k, v in smoke.items() if v["ok"] is False}
    assert not failed, failed  # every smoke check passes on the CPU
    assert smoke["sdpa_kernels"]["full"] == smoke["sdpa_kernels"]["s2_border"] == ["flash_attention_for_cpu"]  # profiled
    multi = report["sections"]["multi_rank"]  # 2 gloo processes on the CPU
    assert multi["ok"] is True and multi["cp2_max_loss_diff"] <= 1e-5, multi
    assert smoke["compile_offload"]["compile_graphs_compiled"] > 0
    rows = report["sections"]["train"]["rows"]
    assert set(rows) == {"64", "128", "256"} and all("tokens_per_s" in r for r in rows.values()), rows
    assert report["sections"]["demo"]["ok"] is True


def test_train_section_resets_the_peak_after_building_the_model(monkeypatch):
    """The train row's peak starts from the built model: reset_peak runs after random_nf4_model and LoRA
    (the build's transient copies are not the step's), before the step, and again once the row is done."""
    import torch
    gpu_check = bench_script("gpu_check")
    events = []
    build, apply_lora = gpu_check.random_nf4_model, gpu_check.lora.apply_lora
    monkeypatch.setattr(gpu_check, "random_nf4_model", lambda *a, **k: (events.append("build"), build(*a, **k))[1])
    monkeypatch.setattr(gpu_check.lora, "apply_lora", lambda *a, **k: (events.append("lora"), apply_lora(*a, **k))[1])
    monkeypatch.setattr(gpu_check, "reset_peak", lambda device: events.append("reset"))
    res = gpu_check.section_train(None, torch.device("cpu"), {**gpu_check.SMALL, "lengths": (64,)},
                                  {"flops_per_s": 1e9}, deadline=float("inf"))
    assert res["ok"] and "tokens_per_s" in res["rows"][64], res
    assert events == ["build", "lora", "reset", "reset"]
