"""Benchmark: S2-Attn vs full causal SDPA, forward + backward of the attention alone.

B = 1, H = 8, Hkv = 2, D = 64, G = T / 4, float32, same inputs for both; median of --repeats timed
runs after one warm-up. Prints a markdown table; LongLoRA's claim is ~G/T of the attention cost, our
target is a ratio <= 0.35 at T = 16384.

    python bench/bench_s2.py                 # T = 4096, 8192, 16384
    python bench/bench_s2.py --long          # also T = 32768
    python bench/bench_s2.py --compile       # also the torch.compile'd S2 path
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shift_attn import causal_attention, shifted_sparse_attention  # noqa: E402

B, H, HKV, D = 1, 8, 2, 64
GROUP_RATIO = 4  # G = T / 4


def fwd_bwd_seconds(attn_fn, q, k, v, grad_out) -> float:
    """Wall seconds of out = attn_fn(q, k, v) plus the backward to q, k, v."""
    start = time.perf_counter()
    out = attn_fn(q, k, v)
    torch.autograd.grad(out, (q, k, v), grad_out)
    return time.perf_counter() - start


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(attn_fns: list, q, k, v, grad_out, repeats: int) -> list[float]:
    """Median seconds per function; the functions alternate within each repeat so that they see the same
    machine load (the benchmark box is shared), after one untimed warm-up round."""
    times = [[] for _ in attn_fns]
    for i in range(repeats + 1):
        for fn, ts in zip(attn_fns, times):
            seconds = fwd_bwd_seconds(fn, q, k, v, grad_out)
            if i:
                ts.append(seconds)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", action="store_true", help="also T = 32768")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(shifted_sparse_attention)")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 0:
        print("bench_s2: --repeats must be >= 1 and --threads >= 0", file=sys.stderr)
        sys.exit(1)
    if args.threads:
        torch.set_num_threads(args.threads)

    lengths = [4096, 8192, 16384] + ([32768] if args.long else [])
    compiled = torch.compile(shifted_sparse_attention, dynamic=False) if args.compile else None
    print(f"B={B} H={H} Hkv={HKV} D={D} G=T/{GROUP_RATIO} float32, fwd+bwd, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    a = torch.randn(2048, 2048)
    mm = min(_seconds(lambda: torch.mm(a, a)) for _ in range(5))
    peak = 2 * 2048**3 / mm
    print(f"measured matmul rate: {peak / 1e9:.0f} GFLOP/s (best of 5 2048^3 torch.mm)\n")
    header = "| T | G | full causal (ms) | full: % of matmul rate | S2 (ms) | ratio |"
    header += " S2 compiled (ms) | ratio |" if compiled else ""
    print(header)
    print("|" + "---|" * header.count(" |"))
    for T in lengths:
        G = T // GROUP_RATIO
        gen = torch.Generator().manual_seed(T)
        q = torch.randn(B, H, T, D, generator=gen).requires_grad_()
        k = torch.randn(B, HKV, T, D, generator=gen).requires_grad_()
        v = torch.randn(B, HKV, T, D, generator=gen).requires_grad_()
        grad_out = torch.randn(B, H, T, D, generator=gen)
        fns = [causal_attention, lambda *x: shifted_sparse_attention(*x, G)]
        fns += [lambda *x: compiled(*x, G)] if compiled else []
        full, s2, *rest = compare(fns, q, k, v, grad_out, args.repeats)
        flops = 6 * T * T * H * D * B  # causal: QK^T and PV forward, four T^2 matmuls backward, each halved
        row = f"| {T} | {G} | {full * 1e3:.0f} | {flops / full / peak:.0%} | {s2 * 1e3:.0f} | {s2 / full:.3f} |"
        row += "".join(f" {s2c * 1e3:.0f} | {s2c / full:.3f} |" for s2c in rest)
        print(row, flush=True)


if __name__ == "__main__":
    main()
