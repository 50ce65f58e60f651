"""One LoRA training step, ours vs transformers + PEFT: tokens/s and peak memory, each point a fresh process.

    python bench/bench_train.py [--lengths 2048,4096,8192,16384,32768] [--speed-len 4096] [--impl ours,hf]
                                [--quant none|nf4] [--dtype float32|bfloat16] [--mlp-chunk N] [--save-attention]
                                [--shape bench|smollm2-135m|llama3-8b-shape] [--results bench/RESULTS.md]

Config (--shape bench): Llama, hidden 512, 4 layers, 8 heads, 2 kv heads, ffn 1408, vocab 32000, untied
(--shape smollm2-135m, llama3-8b-shape: SHAPES); LoRA r=8
on q,k,v,o; gradient checkpointing; SDPA; batch 1. Ours: chunked float32 loss (1024-token chunks). Theirs:
LlamaForCausalLM(attn_implementation="sdpa") + PEFT, gradient_checkpointing_enable(), loss from labels.
With --quant nf4: our NF4 base vs bitsandbytes' Linear4bit (nf4, double quant) via PEFT's QLoRA path.

Peak memory is the model's own RSS growth plus the process's peak RSS growth during the step (VmHWM, reset
after the model is built), with the allocator `python train.py` runs with (memory_alloc.command_env, and the child
calls memory_alloc.return_freed_memory as train.py does), so freed memory leaves the RSS and it follows live memory; the memory plan of `train.py --dry-run` (memory_plan.memory_plan) is printed beside ours (error in %).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import memory_alloc  # noqa: E402  (the project's root: bench/ runs as a script)
CONFIG = dict(vocab_size=32000, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=1408, max_seq_len=4096)
SHAPES = {  # --shape: the benchmark config, the shipped model's shape, Llama-3-8B's proportions reduced
    "bench": CONFIG,
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         max_seq_len=8192, tie_embeddings=True),
    "llama3-8b-shape": dict(vocab_size=128256, dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=3584,
                            max_seq_len=8192),
}

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
torch.manual_seed(0)

def kib(field):
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(field + ':'))

impl, T, quant, dtype, steps, mlp_chunk, save_attention = {impl!r}, {T}, {quant!r}, getattr(torch, {dtype!r}), {steps}, {mlp_chunk}, {save_attention}
cfg = {cfg!r}
from memory_alloc import return_freed_memory
return_freed_memory()  # as train.py's main() starts: the preloaded allocator, else glibc's setting
base_rss = kib('VmRSS')
if impl == 'ours':
    import model as M, lora, quant4
    memory = M.MemoryOptions(checkpointing=True, mlp_chunk=mlp_chunk, save_attention=save_attention)
    net = M.Transformer(M.ModelConfig(**cfg), memory).init_weights(0).to(dtype)
    if quant == 'nf4':
        quant4.quantize_model(net)
    lora.apply_lora(net, r=8, alpha=16)
    net.train()
    def step(x):
        loss = net(x, labels=x, loss_chunk=1024) / x.numel()
        loss.backward()
else:
    import transformers, peft
    hc = transformers.LlamaConfig(vocab_size=cfg['vocab_size'], hidden_size=cfg['dim'], num_hidden_layers=cfg['n_layers'],
        num_attention_heads=cfg['n_heads'], num_key_value_heads=cfg['n_kv_heads'], intermediate_size=cfg['ffn_dim'],
        max_position_embeddings=cfg['max_seq_len'], tie_word_embeddings=cfg.get('tie_embeddings', False),
        attn_implementation='sdpa')
    net = transformers.LlamaForCausalLM(hc).to(dtype)
    if quant == 'nf4':
        import bitsandbytes as bnb
        for name, mod in list(net.named_modules()):
            for child, lin in list(mod.named_children()):
                if isinstance(lin, torch.nn.Linear) and child != 'lm_head':
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                          quant_type='nf4', compress_statistics=True)
                    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type='nf4',
                                                 compress_statistics=True)
                    q = q.to('cpu')  # Params4bit quantizes when moved to a device
                    q.support_avx512bf16_for_cpu = False
                    setattr(mod, child, q)
        for p in net.parameters():
            p.requires_grad_(False)
        net = peft.prepare_model_for_kbit_training(net, use_gradient_checkpointing=True)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
    net.enable_input_require_grads()
    net = peft.get_peft_model(net, peft.LoraConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj']))
    net.train()
    def step(x):
        net(input_ids=x, labels=x).loss.backward()
model_rss = kib('VmRSS') - base_rss
x = torch.randint(0, cfg['vocab_size'], (1, T))
open('/proc/self/clear_refs', 'w').write('5')
before = kib('VmRSS')
times = []
for _ in range(steps):
    t = time.perf_counter()
    step(x)
    times.append(time.perf_counter() - t)
    net.zero_grad(set_to_none=True)
peak_step = kib('VmHWM') - before
print(json.dumps(dict(model_mib=model_rss / 1024, step_peak_mib=peak_step / 1024,
                      total_mib=(model_rss + peak_step) / 1024, step_s=min(times))))
"""


def run_point(impl: str, T: int, quant: str, dtype: str, steps: int, mlp_chunk: int = 0,
              save_attention: bool = False, shape: dict = CONFIG) -> dict:
    code = CHILD.format(root=str(ROOT), impl=impl, T=T, quant=quant, dtype=dtype, steps=steps, cfg=shape,
                        mlp_chunk=mlp_chunk, save_attention=save_attention)
    env = memory_alloc.command_env(os.environ)  # the allocator `python train.py` runs with (memory_alloc.py's note)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def planned_mib(T: int, quant: str, dtype: str, mlp_chunk: int = 0, save_attention: bool = False,
                shape: dict = CONFIG) -> float:
    """memory_plan.memory_plan for the same config, in MiB."""
    import torch

    import lora
    import model as M
    import memory_plan
    from train_config import TrainConfig

    cfg = TrainConfig(ctx=T, quant=quant, loss_chunk=1024, checkpointing=True, mlp_chunk=mlp_chunk,
                      save_attention=save_attention)
    mcfg = M.ModelConfig(**shape)
    with torch.device("meta"):
        net = M.Transformer(mcfg)
    trainable = lora.apply_lora(net, r=8, alpha=16)["trainable"]
    p = memory_plan.memory_plan(cfg, mcfg, torch.finfo(getattr(torch, dtype)).bits // 8, trainable, "cpu")
    return (p["total"] - p["process itself (cpu)"]) / 2**20  # measured here: model + step, not the interpreter


def model_flops(T: int, r: int = 8, c: dict = CONFIG) -> float:
    """FLOPs of one training step's forward and required backward, without recomputation (the MFU
    convention): frozen linears 4 P T (forward + input gradient, no weight gradient), LoRA on q,k,v,o
    6 r (in + out) T, the frozen head 4 V C T, causal attention 6 T^2 H D per layer (PaLM's 12 L H D T^2,
    halved for the causal mask: QK^T and PV forward, four T^2 matmuls backward)."""
    C, F, H, Hkv, L, V = c["dim"], c["ffn_dim"], c["n_heads"], c["n_kv_heads"], c["n_layers"], c["vocab_size"]
    D = C // H
    P = C * H * D + 2 * C * Hkv * D + H * D * C + 3 * C * F
    lora = r * ((C + H * D) + 2 * (C + Hkv * D) + (H * D + C))
    return L * (4 * P * T + 6 * lora * T + 6 * T * T * H * D) + 4 * V * C * T


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """This machine's measured dense matmul rate in FLOP/s: best of `repeats` n x n x n torch.mm."""
    import torch

    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--speed-len", type=int, default=4096, help="also timed at this length (2 steps, best)")
    ap.add_argument("--impl", default="ours,hf")
    ap.add_argument("--quant", default="none", choices=["none", "nf4"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--mlp-chunk", type=int, default=0, help="ours: MLP in chunks of this many tokens (0: off)")
    ap.add_argument("--save-attention", action="store_true", help="ours: keep attention outputs (no attention recompute)")
    ap.add_argument("--shape", default="bench", choices=list(SHAPES), help="model shape (see SHAPES)")
    ap.add_argument("--results", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    impls, shape = args.impl.split(","), SHAPES[args.shape]
    peak = matmul_peak(args.dtype)
    lines = [f"### Training step, {args.dtype}, quant={args.quant} ({datetime.date.today()}, {platform.machine()}, "
             f"`python bench/bench_train.py {' '.join(sys.argv[1:])}`)", "",
             "| T | " + " | ".join(f"{i} peak MiB" for i in impls) + " | plan MiB (ours) | plan error | "
             + " | ".join(f"{i} s/step" for i in impls) + " | " + " | ".join(f"{i} MFU" for i in impls) + " |",
             "| --- |" + " --- |" * (3 * len(impls) + 2)]
    print("\n".join(lines), flush=True)
    rows = {}
    for T in (int(s) for s in args.lengths.split(",")):
        pts = {i: run_point(i, T, args.quant, args.dtype, 2 if T == args.speed_len else 1, args.mlp_chunk,
                              args.save_attention, shape) for i in impls}
        rows[T] = pts
        plan = planned_mib(T, args.quant, args.dtype, args.mlp_chunk, args.save_attention, shape)
        ours = pts.get("ours", {}).get("total_mib")
        err = f"{100 * (plan - ours) / ours:+.0f}%" if ours else "-"
        cell = lambda p, k, f: (f.format(p[k]) if k in p else p.get("error", "-")[:40])
        line = (f"| {T} | " + " | ".join(cell(pts[i], "total_mib", "{:.0f}") for i in impls) + f" | {plan:.0f} | {err} | "
                + " | ".join(cell(pts[i], "step_s", "{:.2f}") for i in impls) + " | "
                + " | ".join(f"{model_flops(T, c=shape) / pts[i]['step_s'] / peak:.0%}" if "step_s" in pts[i] else "-" for i in impls)
                + " |")
        print(line, flush=True)
        lines.append(line)
    slopes = {}
    for i in impls:  # memory per token: the slope between the two longest lengths measured
        pts = [(T, p[i]["total_mib"]) for T, p in rows.items() if "total_mib" in p[i]][-2:]
        if len(pts) == 2 and pts[1][0] != pts[0][0]:
            slopes[i] = (pts[1][1] - pts[0][1]) * 1024 / (pts[1][0] - pts[0][0])
    if slopes:
        lines.append("\nMemory per token (slope between the two longest lengths): "
                     + ", ".join(f"{i} {v:.1f} KiB" for i, v in slopes.items())
                     + (f"; theirs / ours {slopes['hf'] / slopes['ours']:.1f}x." if {"hf", "ours"} <= set(slopes) else "."))
        print(lines[-1])
    if "ours" in impls and "hf" in impls and args.speed_len in rows:
        o, h = rows[args.speed_len]["ours"], rows[args.speed_len]["hf"]
        if "step_s" in o and "step_s" in h:
            lines.append(f"\nAt T={args.speed_len}: ours {args.speed_len / o['step_s']:.0f} tokens/s, theirs "
                         f"{args.speed_len / h['step_s']:.0f} tokens/s, ratio {h['step_s'] / o['step_s']:.2f}x.")
            print(lines[-1])
    lines.append(f"\nMFU: model FLOPs (`model_flops`: forward + required backward, no recomputation) per second over "
                 f"this machine's measured {args.dtype} matmul rate, {peak / 1e9:.0f} GFLOP/s (2048^3 torch.mm, "
                 f"{torch_threads()} threads).")
    print(lines[-1])
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
