"""Peak memory of a default `train.py` run against the CPU memory plan, on named shapes; each point a fresh process.

    python bench/bench_memory.py --points smollm2-135m:4096:full,smollm2-135m:4096:s2 [--tokenizer GGUF]
                                 [--data DIR] [--allocator default] [--results bench/RESULTS.md]

A point is SHAPE:CTX:VARIANT, VARIANT one of full (full causal attention), s2 (--attn s2), nf4
(--quant nf4), chunk (--mlp-chunk 1024). Shapes: the presets (smollm2-135m: 30 layers, tied, vocab 49152,
GQA 3) and two more registered as presets in the child only: `bench` (bench/bench_train.py's config:
hidden 512, 4 layers, vocab 32000, untied) and `llama3-8b-shape` (Llama-3-8B's proportions reduced:
hidden 1024, 8 layers, 8/2 heads of 128, ffn 3584, vocab 128256, untied). Every point runs
`train.main([--model SHAPE --data DATA --ctx CTX --steps 1 ...])`: float32 on CPU, LoRA r=8 on q,k,v,o,
block checkpointing, chunked loss, one step with AdamW; the tokenizer is --tokenizer for smollm2-135m
and bytes otherwise (token values do not change memory).

Measured: the process's peak RSS (VmHWM, memory_peak.vm_hwm_kib: interpreter, libraries, weights and the step) with
the allocator `python train.py` runs with (memory_alloc.command_env: the preloaded library, else glibc's setting), or
glibc's defaults with --allocator default;
the RSS after imports alone (the process baseline); CPU seconds (user + system) and wall seconds of the
child. Planned: memory_plan.memory_plan on "cpu" for the same TrainConfig.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import memory_alloc  # noqa: E402  (the project's root: bench/ runs as a script)
SHAPES = {
    "bench": dict(vocab_size=32000, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=1408, max_seq_len=4096),
    "llama3-8b-shape": dict(vocab_size=128256, dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=3584,
                            rope_theta=500000.0, max_seq_len=8192),
}
VARIANTS = {"full": [], "s2": ["--attn", "s2"], "nf4": ["--quant", "nf4"], "chunk": ["--mlp-chunk", "1024"]}

CHILD = r"""
import json, resource, sys
sys.path.insert(0, {root!r})
import memory_peak, model, train
model.PRESETS.update({shapes!r})
base = memory_peak.vm_hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
train.main({argv!r})
peak = memory_peak.vm_hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(base_mib=base / 1024, peak_mib=peak / 1024)))
"""


def train_args(shape: str, ctx: int, variant: str, tokenizer: str | None, data: str) -> list[str]:
    tok = ["--tokenizer", tokenizer] if tokenizer and shape == "smollm2-135m" else []
    return ["--model", shape, "--data", data, "--ctx", str(ctx), "--steps", "1", *tok, *VARIANTS[variant]]


def run_point(argv: list[str], default_allocator: bool) -> dict:
    with tempfile.TemporaryDirectory() as out:
        code = CHILD.format(root=str(ROOT), shapes=SHAPES, argv=argv + ["--out", out])
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", memory_alloc.ALLOCATOR_VAR)
               and not k.startswith("MALLOC_")}
        # glibc untouched: any MALLOC_* variable makes memory_alloc.py leave glibc alone; this one at glibc's own
        # default (8 arenas per core on 64-bit), unlike the threshold and pad settings, which also stop the
        # threshold's dynamic growth
        env = {**env, "MALLOC_ARENA_MAX": str(8 * os.cpu_count())} if default_allocator else memory_alloc.command_env(env)
        before, t = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    res["wall_s"] = time.perf_counter() - t
    return res


def planned_mib(argv: list[str]) -> dict[str, float]:
    """memory_plan.memory_plan on "cpu" (float32) for the TrainConfig these train.py flags resolve to, in MiB."""
    import torch

    import train_config
    import lora
    import model as M
    import memory_plan

    M.PRESETS.update(SHAPES)
    given = vars(train_config.build_parser("").parse_args(argv))
    given = {k: v for k, v in given.items() if k not in ("recipe", "dry_run", "suggest_base", "force")}
    cfg = train_config.resolve(given, None, dry_run=True)
    mcfg = M.ModelConfig.from_name(cfg.model)
    with torch.device("meta"):
        net = M.Transformer(mcfg)
        trainable = lora.apply_lora(net, **cfg.lora_kwargs())["trainable"]
    return {k: v / 2**20 for k, v in memory_plan.memory_plan(cfg, mcfg, 4, trainable, "cpu").items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", required=True, help="SHAPE:CTX:VARIANT,... (VARIANT: " + ", ".join(VARIANTS) + ")")
    ap.add_argument("--tokenizer", default=None, help="smollm2-135m's tokenizer (its GGUF)")
    ap.add_argument("--data", default=str(Path(json.__file__).parent), help="training text (default: a stdlib dir)")
    ap.add_argument("--allocator", default="setting", choices=["setting", "default"],
                    help="setting: what `python train.py` runs with (memory_alloc.command_env); default: glibc's defaults")
    ap.add_argument("--results", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    lines = [f"### Peak RSS of `train.py --steps 1` vs the CPU plan, allocator {args.allocator} "
             f"({datetime.date.today()}, {platform.machine()}, `python bench/bench_memory.py {' '.join(sys.argv[1:])}`)",
             "", "| shape | ctx | variant | peak RSS MiB | baseline MiB | plan MiB | plan / peak | CPU s | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for point in args.points.split(","):
        shape, ctx, variant = point.split(":")
        argv = train_args(shape, int(ctx), variant, args.tokenizer, args.data)
        p, plan = run_point(argv, args.allocator == "default"), planned_mib(argv)["total"]
        if "error" in p:
            line = f"| {shape} | {ctx} | {variant} | {p['error'][:60]} | | {plan:.0f} | | | |"
        else:
            line = (f"| {shape} | {ctx} | {variant} | {p['peak_mib']:.0f} | {p['base_mib']:.0f} | {plan:.0f} | "
                    f"{plan / p['peak_mib']:.2f} | {p['cpu_s']:.0f} | {p['wall_s']:.0f} |")
        print(line, flush=True)
        lines.append(line)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
