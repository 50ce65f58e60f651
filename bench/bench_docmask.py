"""Benchmark: document-masked attention (per-document causal SDPA) vs SDPA with a dense boolean mask.

B = 1, H = 8, Hkv = 2, D = 64, float32, T tokens packed from --docs documents of seeded random lengths;
forward + backward of the attention alone, same inputs for both, median of --repeats timed runs after one
warm-up (the two alternate so they see the same machine load). Memory: each variant runs once more in a
fresh process, which reports its peak RSS growth during the step (VmHWM reset through
/proc/self/clear_refs, minus VmRSS before; Linux), inputs and the dense mask built before it.

    python bench/bench_docmask.py                 # T = 8192, 8 documents
    python bench/bench_docmask.py --T 16384 --docs 32
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from doc_attn import document_attention, document_mask  # noqa: E402

H, HKV, D = 8, 2, 64


def positions_for(T: int, docs: int, seed: int = 0) -> torch.Tensor:
    """(T,) positions restarting at `docs` - 1 seeded random cut points."""
    cuts = sorted(random.Random(seed).sample(range(1, T), docs - 1))
    bounds = [0, *cuts, T]
    return torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])


def variants(pos: torch.Tensor) -> dict:
    mask = document_mask(pos)[:, None]  # (1, 1, T, T) bool, built once outside the timed region

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    return {"per-document": document_attention(pos), "dense mask": dense}


def inputs(T: int):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, D, generator=g).requires_grad_()
    k = torch.randn(1, HKV, T, D, generator=g).requires_grad_()
    v = torch.randn(1, HKV, T, D, generator=g).requires_grad_()
    return q, k, v, torch.randn(1, H, T, D, generator=g)


def step(fn, q, k, v, grad_out) -> float:
    start = time.perf_counter()
    torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)
    return time.perf_counter() - start


def peak_kib(name: str, T: int, docs: int, threads: int) -> int:
    """Peak RSS growth (KiB) of one step of variant `name` in a fresh process."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import bench_docmask as b
torch.set_num_threads({threads})
fn = b.variants(b.positions_for({T}, {docs}))[{name!r}]
q, k, v, g = b.inputs({T})
def kib(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))
before = kib('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
b.step(fn, q, k, v, g)
print(kib('VmHWM') - before)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return int(r.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pos = positions_for(args.T, args.docs)
    fns = variants(pos)
    q, k, v, g = inputs(args.T)
    times = {name: [] for name in fns}
    for i in range(args.repeats + 1):
        for name, fn in fns.items():
            s = step(fn, q, k, v, g)
            if i:
                times[name].append(s)
    out = fns["per-document"](q, k, v)
    err = (out - fns["dense mask"](q, k, v)).abs().max().item()
    print(f"T = {args.T}, {args.docs} documents, H = {H}, Hkv = {HKV}, D = {D}, float32, {args.threads} threads; "
          f"max |per-document - dense| = {err:.1e}")
    print("| attention | fwd+bwd (ms) | peak RSS growth (MiB) |")
    print("| --- | --- | --- |")
    med = {n: statistics.median(t) for n, t in times.items()}
    mem = {n: peak_kib(n, args.T, args.docs, args.threads) / 1024 for n in fns}
    for n in fns:
        print(f"| {n} | {1000 * med[n]:.0f} | {mem[n]:.0f} |")
    print(f"per-document / dense: time {med['per-document'] / med['dense mask']:.3f}, "
          f"memory {mem['per-document'] / mem['dense mask']:.3f}")


if __name__ == "__main__":
    main()
