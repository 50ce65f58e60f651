"""The built-in demo (`python train.py`) under each CPU allocator: wall, user and system time, peak RSS, same table.

    python bench/bench_alloc.py [--rounds 2] [--side-by-side] [--script eval.py] [--args "ppl --model M"]
                                [--results bench/RESULTS.md]
        [VARIANT ...]    # LABEL or LABEL:VAR=VALUE[;VAR=VALUE]; default: the three below

Variants: `default` is the project's own choice (memory_alloc.return_freed_memory: the command exactly as a user
types it, with LD_PRELOAD, MALLOC_* and LONGCTX_ALLOCATOR removed from the environment); `glibc` its
fallback without a library (LONGCTX_ALLOCATOR=glibc: mallopt with a 64 KiB mmap threshold); `jemalloc` the
system's jemalloc preloaded by hand (LD_PRELOAD). Any other variant is a label and its environment, e.g.
`mmap32m:MALLOC_MMAP_THRESHOLD_=33554432` or `tcmalloc:LD_PRELOAD=libtcmalloc_minimal.so.4`. Each run is a
fresh process in its own working directory (runs/ goes there); rounds interleave the variants (A B C A B C),
or with --side-by-side start them at once, so a loaded machine slows them alike. Wall: the parent's clock;
user, system and peak RSS: the child's own rusage (os.wait4; the peak includes the interpreter before a
re-execution, which is smaller). Ratios are per round against the variant named by --reference. Tables: the
demo's printed markdown lines (`| ...`), which must be identical across all runs.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLEARED = ("LD_PRELOAD", "LONGCTX_ALLOCATOR")  # plus every MALLOC_* variable
BUILTIN = {"default": {}, "glibc": {"LONGCTX_ALLOCATOR": "glibc"},
           "jemalloc": {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}}


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """`LABEL` (a BUILTIN) or `LABEL:VAR=VALUE[;VAR=VALUE]` -> (label, environment additions)."""
    label, _, assigns = spec.partition(":")
    if not assigns:
        if label not in BUILTIN:
            sys.exit(f"error: variant {label!r} is not one of {', '.join(BUILTIN)}; write LABEL:VAR=VALUE")
        return label, BUILTIN[label]
    return label, dict(a.split("=", 1) for a in assigns.split(";"))


def run_round(variants: dict[str, dict[str, str]], args: list[str], side_by_side: bool) -> dict[str, dict]:
    """`python SCRIPT ARGS` (`args`: the script first) once per variant, each in a fresh working directory,
    one after the other or all at once: wall time, the child's user and system time and peak RSS, its printed
    table lines."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED and not k.startswith("MALLOC_")}
    results, running = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in variants.items():
            cwd, out = Path(tmp) / label, Path(tmp) / f"{label}.out"
            cwd.mkdir()
            with open(out, "w") as f, open(out.with_suffix(".err"), "w") as e:
                p = subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd, env={**env, **extra},
                                     stdout=f, stderr=e)
            running.append((label, p, out, time.perf_counter()))
            if not side_by_side:
                results.update(child_record(running.pop(), *os.wait4(p.pid, 0)[1:]))
        while running:  # side by side: each as it ends
            pid, status, ru = os.wait4(-1, 0)
            done = next(r for r in running if r[1].pid == pid)
            running.remove(done)
            results.update(child_record(done, status, ru))
    return {label: results[label] for label in variants}


def child_record(run: tuple, status: int, ru) -> dict[str, dict]:
    """A run's record from its wait status and its own rusage (os.wait4; RUSAGE_CHILDREN would sum all)."""
    label, p, out, t0 = run
    p.returncode = os.waitstatus_to_exitcode(status)
    table = [line for line in out.read_text().splitlines() if line.startswith("|")]
    res = {"rc": p.returncode, "wall": time.perf_counter() - t0, "user": ru.ru_utime, "sys": ru.ru_stime,
           "rss_mb": ru.ru_maxrss * 1024 / 1e6, "table": table}
    print(f"{label}: rc {res['rc']}, wall {res['wall']:.0f} s, user {res['user']:.0f} s, sys {res['sys']:.0f} s, "
          f"peak RSS {res['rss_mb']:.0f} MB, load {os.getloadavg()[0]:.1f}", flush=True)
    if p.returncode:
        print("  " + (out.with_suffix(".err").read_text().strip().splitlines() or [""])[-1][-300:], flush=True)
    return {label: res}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="*", default=["default", "glibc", "jemalloc"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--script", default="train.py", help="the entry point (train.py, eval.py)")
    ap.add_argument("--args", default="", help="its arguments (default: none: `python train.py`, the demo as shipped)")
    ap.add_argument("--reference", default="jemalloc", help="the variant the wall-time ratios divide by")
    ap.add_argument("--side-by-side", action="store_true",
                    help="start a round's variants at once (a fluctuating load then hits them alike)")
    ap.add_argument("--results", default=None, help="append the table to this markdown file")
    a = ap.parse_args()
    variants = dict(map(parse_variant, a.variants))
    args = [a.script, *shlex.split(a.args)]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(a.rounds):
        print(f"round {r + 1}", flush=True)
        for label, res in run_round(variants, args, a.side_by_side).items():
            runs[label].append(res)
    first = runs[next(iter(runs))][0]["table"]
    ref = runs.get(a.reference)
    how = "side by side" if a.side_by_side else "interleaved"
    lines = [f"### `python {shlex.join(args)}` by allocator, {a.rounds} {how} rounds ({datetime.date.today()}, "
             f"{platform.machine()}, {os.cpu_count()} CPUs, "
             f"`python bench/bench_alloc.py {' '.join(sys.argv[1:])}`)", "",
             f"| variant | wall s (each round) | user s | system s | peak RSS MB | wall / {a.reference} (per round) | "
             "table as the first run |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, rs in runs.items():
        walls = ", ".join(f"{x['wall']:.0f}" for x in rs)
        ratios = [x["wall"] / y["wall"] for x, y in zip(rs, ref)] if ref else []
        user, system = (statistics.median(x[k] for x in rs) for k in ("user", "sys"))
        lines.append(f"| {label} | {walls} | {user:.0f} | {system:.0f} | "
                     f"{max(x['rss_mb'] for x in rs):.0f} | {', '.join(f'{q:.2f}' for q in ratios)} | "
                     f"{'yes' if all(x['table'] == first and x['rc'] == 0 for x in rs) else 'NO'} |")
    print("\n".join(lines))
    if not first:
        print("note: the runs printed no table (every run's exit code above)")
    if a.results:
        with open(a.results, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
