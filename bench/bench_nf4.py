"""NF4 throughput on CPU: ours (quant4.py) vs bitsandbytes vs torchao, and Linear4bit forward+backward.

Throughput is GB/s of bf16 weight processed (2 bytes per weight), median of a few repeats, on the
same bf16 matrices for every library. Prints a markdown table. Runs in well under 3 minutes on 2 cores.

    python bench/bench_nf4.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import quant4 as Q  # noqa: E402

SHAPES = ((4096, 4096),)  # a Llama attention projection
LINEAR_SHAPE = (4096, 4096)
BATCH_TOKENS = 256
REPEATS = 2


def _median_seconds(fn, repeats=REPEATS):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _libraries():
    import bitsandbytes.functional as BF
    from torchao.quantization import to_nf4

    def bnb_quant(w):
        return BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

    compiled = torch.compile(Q.dequantize_nf4, fullgraph=True, dynamic=False)  # what Linear4bit(compile=True) runs
    return {
        "ours": (lambda w: Q.quantize_nf4(w), lambda q: Q.dequantize_nf4(q)),
        "ours, torch.compile": (lambda w: Q.quantize_nf4(w), lambda q: compiled(q)),
        "bitsandbytes": (bnb_quant, lambda pq: BF.dequantize_4bit(*pq)),
        "torchao": (lambda w: to_nf4(w, 64, 256), lambda t: t.get_original_weight()),
    }


def bench_quant_dequant():
    rows = []
    for shape in SHAPES:
        w = torch.randn(shape, dtype=torch.bfloat16)
        gb = w.numel() * 2 / 1e9
        for name, (quant, dequant) in _libraries().items():
            q = quant(w)
            tq = _median_seconds(lambda: quant(w))
            td = _median_seconds(lambda: dequant(q))
            rows.append(f"| {shape[0]}x{shape[1]} | {name} | {gb / tq:.2f} | {gb / td:.2f} |")
    return ["| matrix | library | quantize GB/s | dequantize GB/s |", "|---|---|---|---|", *rows]


def bench_linear():
    import bitsandbytes as bnb

    out_f, in_f = LINEAR_SHAPE
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    ours = Q.Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    ours_compiled = Q.Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16, compile=True)
    ref = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                            quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    ref = ref.to("cpu")
    ref.support_avx512bf16_for_cpu = False  # training path, same as ours
    x = torch.randn(BATCH_TOKENS, in_f, dtype=torch.bfloat16, requires_grad=True)
    gb = out_f * in_f * 2 / 1e9
    rows = []
    for name, layer in (("ours (eager)", ours), ("ours (torch.compile)", ours_compiled), ("bitsandbytes", ref)):
        def step():
            layer(x).float().sum().backward()
        t = _median_seconds(step)
        rows.append(f"| {out_f}x{in_f}, {BATCH_TOKENS} tokens | {name} | {t * 1e3:.1f} | {gb / t:.2f} |")
    return ["| layer | implementation | fwd+bwd ms | weight GB/s |", "|---|---|---|---|", *rows]


def main():
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, bf16 weights\n")
    print("\n".join(bench_quant_dequant()))
    print()
    print("\n".join(bench_linear()))
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
