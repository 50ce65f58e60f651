"""demo_compare.py: the method table, the budget every method shares, the long/short mixture, the CLI errors,
and (slow) the whole comparison with a few steps."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import demo_compare
import data
import demo
from train_config import resolve
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_methods_share_the_demo_budget_and_differ_in_positions_only():
    """Every method resolves to the demo's recipe (LoRA, NF4, lr, schedule, seed, steps); only --rope and,
    for PoSE, the window, the position target and full attention differ."""
    demo_cfg = resolve({**demo.DEMO_RECIPE, "ctx": 2560, "model": str(demo.DEMO_DIR), "data": "d", "out": "o"})
    for key, m in demo_compare.METHODS.items():
        if m.pose and not demo_compare.pose_available():
            continue
        cfg = resolve(demo_compare.train_settings(m, 256, 10, 400, demo.DEMO_DIR, "d", "o"))
        differ = {k for k, v in cfg.to_dict().items() if v != demo_cfg.to_dict()[k]}
        assert differ <= ({"rope", "ctx", "pose", "attn"} if m.pose else {"rope"}), (key, differ)
        assert cfg.rope == m.rope and cfg.steps == 400 and cfg.seed == 0


def test_mixture_takes_the_short_share_of_tokens(tmp_path):
    """The spec parses with data.py's parser, weights 0.6/0.4, and there are enough short records for the
    short share of every step's tokens (reference: counting tokens by hand, records of L + 1 tokens)."""
    for name in ("long.jsonl", "short.jsonl"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    spec = demo_compare.mixture_spec(tmp_path / "long.jsonl", tmp_path / "short.jsonl", 0.4)
    assert [w for _, w in data.parse_data_spec(spec)] == [0.6, 0.4]
    n = demo_compare.short_records(400, 2560, 256, 0.4)
    assert n * 257 >= 0.4 * 400 * 2561 and (n - 11) * 257 < 0.4 * 400 * 2561


def test_table_prints_a_missing_row_across():
    rows = {"YaRN + PoSE, 3 steps": {"missing": "not available"}}
    table = demo_compare.format_compare_table(rows, 256, demo.FACTORS, ("vt",)).splitlines()
    assert table[2].startswith("| YaRN + PoSE, 3 steps | not available |")
    assert table[0].count("|") == table[2].count("|")


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "pi,bogus"], "--methods"),
    (["--steps", "0"], "--steps"),
    (["--ruler-tasks", "nope"], "--ruler-tasks"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, needle):
    assert demo_compare.main([*argv, "--out", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    with pytest.raises(UserError, match="--methods"):
        demo_compare.method_list("")


def test_compare_cli_is_one_line_on_bad_methods(tmp_path):
    """`python demo_compare.py ...` as a command: one line, exit status 1."""
    r = subprocess.run([sys.executable, str(ROOT / "demo_compare.py"), "--methods", "bogus", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: --methods 'bogus'"), r.stderr


@pytest.mark.slow
def test_comparison_with_a_few_steps_has_every_row_and_finite_numbers(tmp_path):
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, str(ROOT / "demo_compare.py"), "--steps", "3", "--methods",
                        "pi,ntk,yarn,yarn+pose,yarn+mix", "--eval-windows", "1", "--eval-keys", "2", "--ruler-trials",
                        "1", "--out", str(out)], capture_output=True, text=True, timeout=3000, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    trained = ["PI, 3 steps", "NTK, 3 steps", "YaRN, 3 steps", "YaRN, 60/40 long/short data, 3 steps"]
    frozen = ["PI, frozen (linear:10)", "NTK, frozen (ntk:10)", "YaRN, frozen (yarn:16)"]
    assert list(rows) == ["base", *trained[:3], "YaRN + PoSE, 3 steps", trained[3], *frozen]
    assert ("missing" in rows["YaRN + PoSE, 3 steps"]) != demo_compare.pose_available()
    table = (out / "results.md").read_text()
    for name, row in rows.items():
        assert f"| {name} |" in table
        if "missing" in row:
            continue
        numbers = [row[k] for k in row if k.startswith(("ppl", "passkey"))] + list(row["ruler"].values())
        numbers += [row["retained"]["ppl"], row["seconds"]]
        assert all(math.isfinite(x) for x in numbers) and len(row["ruler"]) == len(demo_compare.RULER_TASKS), name
    assert rows["base"]["retained"] == {"length": 256, "ppl": 1.0, "passkey": 1.0}
