"""Context parallelism on CPU: per-rank peak memory and tokens/s of one training step at cp 1 vs cp 2
(gloo ranks, DeepSpeed-Ulysses attention), the all-to-all's share of the step, the memory plan beside the
measurement, and a projection of the exchange's cost on an NVLink node.

    python bench/bench_cp.py [--ctx 16384] [--cp 1,2] [--results bench/RESULTS.md]

Config: Llama, hidden 256, 2 layers, 8 heads, 2 kv heads, ffn 704, vocab 32000, untied, float32; LoRA r=8
on q,k,v,o; per-block checkpointing; full causal SDPA; batch 1; one thread per rank (the cp 2 point runs
its two ranks on two cores, the cp 1 point one process on one core).

Peak memory: the step's peak RSS growth per rank (VmHWM after a reset, MALLOC_MMAP_THRESHOLD_=65536 so freed
blocks leave the RSS), i.e. the activation part: weights and LoRA state are built before the reset. The
all-to-all share is the profiler's time in all_to_all_single (waiting for the slower rank included) over
the profiled step's wall time.

NVLink projection (Llama-3-8B, bf16, 8 GPUs, --cp 8): per layer a rank exchanges q, k, v and the output,
(2 H + 2 Hkv) (T/N) D values, (N - 1)/N of them leaving it, three times per step (forward, the checkpointed
recompute, backward):
    bytes out per rank per step = 3 L (2 H + 2 Hkv) (T/N) D b (N - 1)/N,   t_a2a = bytes / B_link
against the step's compute t = (FLOPs / N) / F_gpu with FLOPs = L (4 P T + 6 T^2 H D) + 4 V C T
(bench_train.model_flops's convention, plus one recomputed forward 2 P T + 2 T^2 H D per layer).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=32000, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=704, max_seq_len=4096)
LLAMA3_8B = dict(L=32, H=32, Hkv=8, D=128, C=4096, F=14336, V=128256)
B_LINK = 350e9  # bytes/s: an H100 SXM's all-to-all bus bandwidth over NVLink 4 (900 GB/s bidirectional, ~75-80% reached)
F_GPU = 400e12  # FLOP/s: bf16 at ~40% of an H100's 989 TFLOP/s dense peak


def child(T: int):
    """One rank of a point (run by torchrun, or alone for cp 1): prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist

    import lora
    import parallel
    import shift_attn
    from model import MemoryOptions, ModelConfig, Transformer

    def kib(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":"))

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    mesh = parallel.Mesh(1, world, 0, rank, dist.group.WORLD if world > 1 else None)
    net = Transformer(ModelConfig(**CONFIG), MemoryOptions(checkpointing=True)).init_weights(0)
    lora.apply_lora(net, r=8, alpha=16)
    net.train()
    tokens = torch.randint(0, CONFIG["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))
    x, pos = parallel.shard_sequence(tokens, mesh), parallel.shard_sequence(torch.arange(T), mesh)
    attn = parallel.context_parallel_attention(shift_attn.causal_attention, mesh.cp_group) if world > 1 else None

    def step():
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        (net(x, pos, attn_fn=attn, labels=x) / T).backward()
        if world > 1:
            dist.barrier()
        net.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    open("/proc/self/clear_refs", "w").write("5")
    before = kib("VmRSS")
    t1 = step()
    peak = (kib("VmHWM") - before) / 1024
    a2a_share = 0.0
    if world > 1:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t2 = step()
        a2a = sum(e.cpu_time_total for e in prof.key_averages() if "all_to_all" in e.key or "alltoall" in e.key)
        a2a_share = a2a / 1e6 / t2
    print(json.dumps(dict(rank=rank, cp=world, T=T, step_peak_mib=peak, model_mib=before / 1024, step_s=t1,
                          a2a_share=a2a_share)), flush=True)
    if world > 1:
        dist.destroy_process_group()


def run_point(T: int, cp: int) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}"] if cp > 1 \
        else [sys.executable]
    r = subprocess.run(pre + [__file__, "--child", str(T)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]


def planned_activation_mib(T: int, cp: int) -> float:
    """memory_plan.memory_plan's activation part (checkpoints + the larger transient) plus its CPU runtime
    workspace, for the bench config: what a step's RSS growth should be."""
    sys.path.insert(0, str(ROOT))
    import memory_plan
    from train_config import TrainConfig
    from model import ModelConfig

    p = memory_plan.memory_plan(TrainConfig(ctx=T, cp=cp, loss_chunk=1024), ModelConfig(**CONFIG), 4, 0, "cpu")
    act = p["block checkpoints"] + max(p["one block's backward"], p["loss (chunk x V logits + 4 T x C)"]) \
        + p["runtime workspace (cpu)"]
    return act / 2**20


def nvlink_projection(T: int, N: int = 8, b: int = 2) -> dict:
    """The module docstring's formula for Llama-3-8B at T tokens on N GPUs."""
    m = LLAMA3_8B
    L, H, Hkv, D, C, F, V = (m[k] for k in ("L", "H", "Hkv", "D", "C", "F", "V"))
    P = C * H * D + 2 * C * Hkv * D + H * D * C + 3 * C * F
    out_bytes = 3 * L * (2 * H + 2 * Hkv) * (T // N) * D * b * (N - 1) / N
    flops = L * (4 * P * T + 6 * T * T * H * D + 2 * P * T + 2 * T * T * H * D) + 4 * V * C * T
    t_a2a, t_compute = out_bytes / B_LINK, flops / N / F_GPU
    return dict(T=T, gb_out_per_rank=out_bytes / 1e9, a2a_s=t_a2a, compute_s=t_compute,
                share=t_a2a / (t_a2a + t_compute))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--cp", default="1,2")
    args = ap.parse_args()
    if args.child is not None:
        return child(args.child)
    rows = {}
    for cp in map(int, args.cp.split(",")):
        ranks = run_point(args.ctx, cp)
        rows[cp] = ranks
        peak = max(r["step_peak_mib"] for r in ranks)
        step = max(r["step_s"] for r in ranks)
        plan_mib = planned_activation_mib(args.ctx, cp)
        print(f"cp {cp}: T {args.ctx}, per-rank step peak {peak:.0f} MiB (plan {plan_mib:.0f}, {peak / plan_mib - 1:+.0%}), "
              f"step {step:.2f} s, {args.ctx / cp / step:.0f} tokens/s per rank, {args.ctx / step:.0f} tokens/s in all"
              + (f", all-to-all {max(r['a2a_share'] for r in ranks):.1%} of the step" if cp > 1 else ""), flush=True)
    if 1 in rows and len(rows) > 1:
        base = max(r["step_peak_mib"] for r in rows[1])
        for cp, ranks in rows.items():
            if cp > 1:
                print(f"cp {cp} / cp 1 activation peak: {max(r['step_peak_mib'] for r in ranks) / base:.2f}")
    print("NVLink projection, Llama-3-8B bf16, cp 8 (B_link 350 GB/s, 400 TFLOP/s per GPU):")
    for T in (131072, 262144, 524288, 1048576):
        p = nvlink_projection(T)
        print(f"  T {T:>8}: {p['gb_out_per_rank']:.1f} GB out per rank per step, all-to-all {p['a2a_s']:.2f} s, "
              f"compute {p['compute_s']:.1f} s, share {p['share']:.2%}")


if __name__ == "__main__":
    main()
