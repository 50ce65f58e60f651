"""A controlled comparison of RoPE extension methods on the demo's base, every method under one budget.

`python demo_compare.py` extends the demo's base (demo/, a byte-level Llama trained
at L = 256 bytes) ten-fold, to 10 L = 2,560, once per method, through the trainer (train.train), with the
same budget: the demo's recipe (NF4 base with double quantization, LoRA r=16 alpha=32 on all linear layers
plus trained embeddings and norms, lr 2e-3, 10 warmup steps, cosine, seed 0), the same number of steps and
the same extension data (demo.write_extension_data, RNG stream TRAIN_SEED + 7). Only the position handling
differs:
    pi          linear:10. Position Interpolation (Chen et al. 2023): m' = m / 10.
    ntk         ntk:10. The NTK-aware base change (bloc97 2023): base' = base * 10^(D/(D-2)).
    yarn        yarn:16, the demo's own setting (Peng et al. 2023: interpolation by parts plus an attention
                temperature; factor 16 puts 10 L at an interpolated position 160 < L). This row is the demo.
    yarn+pose   yarn:16 trained in windows of L tokens whose position ids are split into chunks with random
                skips that cover [0, 10 L) (PoSE, Zhu et al. 2023): 1/10 of the tokens per step. Full
                attention (S²-Attn saves nothing in a window of L). Needs the trainer's `pose` setting.
    yarn+mix    yarn:16 on a long/short mixture: 60% of the tokens from the long sequences, 40% from
                sequences of L tokens (same generator), packed to 10 L (ProLong, Gao et al. 2024).
The long methods train with S²-Attn (group 10 L / 4) as the demo does; evaluation is always full attention.
Beside them: the base, and each RoPE change frozen (training-free: the float32 base with its frequencies
changed, nothing trained), as in the "frozen" rows of Lu et al. 2024 (A Controlled Study on Long Context
Extension).

Each row reports: perplexity of 8 held-out windows over their first L, 5 L and 10 L positions; passkey
(demo.evaluate_demo: greedy exact match of a 4-digit fact, 40 prompts per length) at L, 5 L, 10 L; RULER tasks
at 10 L (eval_ruler.py's RULER prompts of at most 10 L bytes with BOS first, greedy decoding, RULER's metric;
a model pretrained on Python source has never read such English prompts); retention at L against the base
(demo.retained: base ppl@L / row ppl@L and row passkey@L / base passkey@L, 1 = kept, above 1 = better);
and the row's wall seconds (training plus evaluation).

Notation: L the base's context (256), N = 10 L the target.
"""
from __future__ import annotations

import memory_alloc

if __name__ == "__main__":  # a command: re-executes once with the CPU allocator preloaded, before torch loads
    memory_alloc.return_freed_memory(as_command=True)

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import demo
import train_guards
import eval_ruler
from checkpoint import SAFETENSORS_SINGLE, read_config
from train_config import TrainConfig, resolve
from errors import UserError, run_cli
from generate import generate
from lora_peft import load_adapter
from outputs import atomic_write_text, check_output, holds_only
from parallel import destroy, init_distributed
from tokenizer import ByteTokenizer
from train import train

# ----------------------------------------------------------------------------- constants


@dataclass(frozen=True)
class Method:
    """One trained row: its RoPE spec, whether it trains with PoSE, the short-token fraction of its data."""

    label: str
    rope: str
    pose: bool = False
    short: float = 0.0


METHODS = {
    "pi": Method("PI", "linear:10"),
    "ntk": Method("NTK", "ntk:10"),
    "yarn": Method("YaRN", "yarn:16"),
    "yarn+pose": Method("YaRN + PoSE", "yarn:16", pose=True),
    "yarn+mix": Method("YaRN, 60/40 long/short data", "yarn:16", short=0.4),
}
DEFAULT_METHODS = "pi,ntk,yarn,yarn+pose"
ROPE_NAMES = {"linear": "PI", "ntk": "NTK", "yarn": "YaRN"}  # the frozen rows' names
RULER_TASKS = ("niah_single_1", "niah_multikey_1", "niah_multivalue", "vt")
RULER_TRIALS = 4
SHORT_SEED = demo.TRAIN_SEED + 8  # RNG stream of the short sequences (the long ones use TRAIN_SEED + 7)


def pose_available() -> bool:
    """Whether this trainer has PoSE (a `pose` TrainConfig field: the target length of the position ids)."""
    return "pose" in {f.name for f in dataclasses.fields(TrainConfig)}


# ----------------------------------------------------------------------------- pure functions


def method_list(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise UserError(f"--methods {text!r}: unknown {bad or 'empty list'}; choose from {','.join(METHODS)}")
    return list(dict.fromkeys(names))


def mixture_spec(long_path: Path, short_path: Path, short: float) -> str:
    """data.py's `path:weight,...` spelling of the long/short mixture (weights are token shares)."""
    return f"{long_path}:{1 - short:g},{short_path}:{short:g}"


def short_records(steps: int, ctx: int, L: int, short: float) -> int:
    """Records of L + 1 tokens (L - 1 bytes + BOS + EOS) that fill the short share of steps x (ctx + 1)
    tokens, plus one packed sequence to spare (the mixture never needs a second epoch)."""
    return math.ceil(short * steps * (ctx + 1) / (L + 1)) + math.ceil((ctx + 1) / (L + 1))


def train_settings(method: Method, L: int, factor: int, steps: int, base: Path, data: str, out: Path) -> dict:
    """The trainer's settings of one method: the demo's recipe with only the positions (and data) changed."""
    given = {**demo.DEMO_RECIPE, "ctx": factor * L, "rope": method.rope, "steps": steps, "model": str(base),
             "data": data, "out": str(out)}
    if method.pose:  # windows of L, position ids over [0, factor L)
        given.update(ctx=L, pose=factor * L, attn="full")
    return given


def format_compare_table(rows: dict[str, dict], L: int, factors: tuple[int, ...], tasks: tuple[str, ...]) -> str:
    """One markdown line per row; a row {"missing": reason} prints its reason across the table."""
    N = max(factors) * L
    heads = ([f"ppl@{f * L} ({demo.length_label(f)})" for f in factors]
             + [f"passkey@{f * L}" for f in factors] + [f"{t}@{N}" for t in tasks] + [f"RULER avg@{N}",
                                                                                     f"retained@{L} ppl, passkey",
                                                                                     "wall s"])
    lines = ["| row | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(heads)]
    for name, r in rows.items():
        if "missing" in r:
            lines.append(f"| {name} | {r['missing']} |" + " |" * (len(heads) - 1))
            continue
        cells = ([f"{r[f'ppl@{f * L}']:.3f}" for f in factors] + [f"{100 * r[f'passkey@{f * L}']:.0f}%" for f in factors]
                 + [f"{100 * r['ruler'][t]:.0f}%" for t in tasks]
                 + [f"{100 * sum(r['ruler'].values()) / len(tasks):.0f}%", demo.format_retained(r["retained"]),
                    f"{r['seconds']:.0f}"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def ruler_scores(net, data: eval_ruler.RulerData, length: int, tasks: tuple[str, ...], trials: int) -> dict[str, float]:
    """{task: mean RULER score} over the first `trials` samples of RULER's prompts (BOS first, prompt plus
    tokens to generate <= length), greedy decoding until EOS or RULER's token budget."""
    out = {}
    for task in tasks:
        total = 0.0
        for t in range(trials):
            ids, refs, max_new, _ = data.prompt(task, length, t)
            new = generate(net, ids, max_new, stop_ids=[demo.EOS])
            total += eval_ruler.score_ruler(task, data.tok.decode(new), refs)
        out[task] = total / trials
    return out


def evaluate_row(net, filler, L: int, args, hay, base_row: dict | None) -> dict:
    """demo.evaluate_demo (ppl and passkey at L, 5 L, 10 L) plus RULER at 10 L and retention against the base."""
    row = demo.evaluate_demo(net, filler, L, demo.FACTORS, args.eval_windows, args.eval_keys)
    row["ruler"] = ruler_scores(net, hay, max(demo.FACTORS) * L, args.ruler_tasks, args.ruler_trials)
    row["retained"] = demo.retained(row, base_row or row, L)
    return row


# ----------------------------------------------------------------------------- the comparison


def write_data(out: Path, method: Method, L: int, ctx: int, steps: int) -> str:
    """The --data of one method. Long methods: the demo's extension data (steps records of ctx tokens, RNG
    stream TRAIN_SEED + 7), with method.short > 0 mixed with records of L tokens (stream SHORT_SEED) by
    token shares. PoSE: steps records of L tokens from the demo's stream (its window is L)."""
    code = demo.corpus_bytes(demo.stdlib_split()[0])
    if method.pose:
        path = out / f"data-{L}.jsonl"
        demo.write_extension_data(path, code, L, steps, demo.TRAIN_SEED + 7)
        return str(path)
    long_path = out / "data.jsonl"
    demo.write_extension_data(long_path, code, ctx, steps, demo.TRAIN_SEED + 7)
    if not method.short:
        return str(long_path)
    short_path = out / f"short-{L}.jsonl"
    demo.write_extension_data(short_path, code, L, short_records(steps, ctx, L, method.short), SHORT_SEED)
    return mixture_spec(long_path, short_path, method.short)


def compare(args) -> dict:
    """Train and evaluate every method, then the frozen RoPE changes; print and write the table."""
    base_dir, out = Path(args.base), Path(args.out)
    if not (base_dir / SAFETENSORS_SINGLE).is_file():
        raise UserError(f"--base {base_dir}: no {SAFETENSORS_SINGLE}; make it with `python demo.py pretrain`")
    L, factor = read_config(base_dir).max_seq_len, max(demo.FACTORS)
    check_output(out, "new", "--out", owned=holds_only("data.jsonl", "short-*.jsonl", "results.*", *METHODS))
    out.mkdir(parents=True, exist_ok=True)
    filler = demo.corpus_bytes(demo.stdlib_split()[1])
    hay = eval_ruler.RulerData(ByteTokenizer(), None, eval_ruler.ruler_haystack(None)[0], seed=demo.EVAL_SEED)
    d = init_distributed()
    try:
        if d.world != 1:
            raise UserError("compare runs in one process (python demo_compare.py), not under torchrun")
        t = time.time()
        rows = {"base": evaluate_row(demo.load_base(base_dir), filler, L, args, hay, None)}
        rows["base"]["seconds"] = time.time() - t
        print(f"base evaluated in {rows['base']['seconds']:.0f}s", flush=True)
        frozen = {}
        for key in args.methods:
            m = METHODS[key]
            frozen.setdefault(m.rope, ROPE_NAMES[m.rope.partition(":")[0]])
            name = f"{m.label}, {args.steps} steps"
            if m.pose and not pose_available():
                rows[name] = {"missing": "not available: this trainer has no PoSE (`pose` setting)"}
                print(f"{name}: {rows[name]['missing']}", flush=True)
                continue
            t = time.time()
            data = write_data(out, m, L, factor * L, args.steps)
            cfg = resolve(train_settings(m, L, factor, args.steps, base_dir, data, out / key / "train"), world_size=1)
            train_guards.remove_run(cfg.out)  # this command's own previous run of the method
            train(cfg, d)
            net = demo.load_base(base_dir, cfg, quant=cfg.quant)
            load_adapter(net, Path(cfg.out) / "adapter")
            rows[name] = evaluate_row(net, filler, L, args, hay, rows["base"])
            rows[name]["seconds"] = time.time() - t
            print(f"{name}: {time.time() - t:.0f}s", flush=True)
        for spec, label in frozen.items():
            t = time.time()
            cfg = resolve({"model": str(base_dir), "data": "unused", "ctx": factor * L, "rope": spec}, world_size=1)
            name = f"{label}, frozen ({spec})"
            rows[name] = evaluate_row(demo.load_base(base_dir, cfg), filler, L, args, hay, rows["base"])
            rows[name]["seconds"] = time.time() - t
            print(f"{name}: {time.time() - t:.0f}s", flush=True)
    finally:
        destroy(d)
    table = format_compare_table(rows, L, demo.FACTORS, args.ruler_tasks)
    settings = {"steps": args.steps, "methods": {k: dataclasses.asdict(METHODS[k]) for k in args.methods},
                "eval_windows": args.eval_windows, "eval_keys": args.eval_keys, "ruler_tasks": list(args.ruler_tasks),
                "ruler_trials": args.ruler_trials}
    atomic_write_text(out / "results.json", json.dumps({"settings": settings, "rows": rows}, indent=1))
    atomic_write_text(out / "results.md", table + "\n")
    print(f"\n{len(rows)} rows; held-out stdlib code, {args.eval_windows} windows and {args.eval_keys} passkey prompts "
          f"per length, {args.ruler_trials} prompts per RULER task; retained@{L}: base ppl / row ppl and row passkey "
          f"/ base passkey at {L} (1 = kept)\n")
    print(table)
    print(f"\ntable: {out / 'results.md'}")
    return rows


# ----------------------------------------------------------------------------- entry point


def build_compare_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python demo_compare.py",
                                 description="Extend the demo base ten-fold with each RoPE method under one budget.")
    ap.add_argument("--steps", type=int, default=demo.DEMO_RECIPE["steps"], help="training steps of every method")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list from {','.join(METHODS)}")
    ap.add_argument("--out", default="runs/compare", help="output directory (data, adapters, results.md/json)")
    ap.add_argument("--base", default=str(demo.DEMO_DIR), help="the base (default: the shipped demo/)")
    ap.add_argument("--eval-windows", type=int, default=demo.EVAL_WINDOWS, help="held-out windows for perplexity")
    ap.add_argument("--eval-keys", type=int, default=demo.EVAL_KEYS, help="passkey prompts per length")
    ap.add_argument("--ruler-tasks", default=",".join(RULER_TASKS), help="comma list of eval_ruler.py tasks")
    ap.add_argument("--ruler-trials", type=int, default=RULER_TRIALS, help="prompts per RULER task")
    return ap


def check_compare_args(args) -> None:
    args.methods = method_list(args.methods)
    for name in ("steps", "eval_windows", "eval_keys", "ruler_trials"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.ruler_tasks = tuple(t.strip() for t in args.ruler_tasks.split(",") if t.strip())
    unknown = [t for t in args.ruler_tasks if t not in eval_ruler.TASKS]
    if unknown or not args.ruler_tasks:
        raise UserError(f"--ruler-tasks: unknown {unknown or 'empty list'}; choose from {','.join(eval_ruler.TASKS)}")


def main(argv=None) -> int:
    args = build_compare_parser().parse_args(argv)
    return run_cli(lambda: (check_compare_args(args), compare(args)))


if __name__ == "__main__":
    sys.exit(main())
