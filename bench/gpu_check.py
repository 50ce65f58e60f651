"""Every device-dependent path, run once and measured: the check to run whenever a GPU is at hand.

    python bench/gpu_check.py --out DIR [--device cuda] [--small]     # writes DIR/report.md, DIR/report.json

Sections, each catching its own failure (recorded, then the next one runs):
  smoke      NF4 quantize/dequantize bit-exact against the CPU (the double-quantization offset included),
             Linear4bit forward/backward, bf16 forward against float32, the SDPA kernels actually run
             (profiled) on the model's strided and stride-0 expanded q/k/v, train.py --compile and
             --offload, a 1-rank process group (NCCL for CUDA tensors, gloo for CPU ones) with the loss
             all-reduce and DDP, sampling with a CPU generator from device logits;
  multi_rank with 2 GPUs (2 gloo processes on the CPU): NCCL all-reduce and all-to-all against their known
             results, and train.py --cp 2 under torchrun against one process;
  train      one training step of the llama-3-8b shape (random weights, NF4 + LoRA r=32 on q,k,v,o, bf16,
             recipe llama3-80k without its trained embedding) at 8K/32K/80K tokens, sizes the memory plan
             (memory_plan.memory_plan) says do not fit skipped; peak memory from the built model on (the peak is
             reset after the build) against the plan, tokens/s, MFU against a bf16 matmul rate measured
             in the same run;
  hf         the same step through transformers + PEFT (bitsandbytes NF4 when importable) at 8K and 32K;
  demo       the built-in demo (train.py with no --model), at its full scale on CUDA when time allows.
--small runs every section at tiny sizes (the tiny preset, 64-256 tokens): `--device cpu --small` took
266 s on a loaded 2-core CPU and is what tests/test_gpu_check.py runs, so this script cannot rot unnoticed.

Tolerances: NF4 codes and dequantized weights bit-exact (the same integer arithmetic and one fp32 rounding);
Linear4bit and the compiled/offloaded/DDP trainer 1e-3 relative (different matmul kernels and Inductor's
fusion reorder float32 sums, ~1e-6; 1e-3 still catches a wrong weight or a dropped block); bf16 logits
against float32 within 3e-2 relative L2 (8 significant bits: 2^-8 = 0.4% per rounding, a few layers deep).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import train_config  # noqa: E402
import demo  # noqa: E402
import devices  # noqa: E402
import generate  # noqa: E402
import lora  # noqa: E402
import memory_peak  # noqa: E402
import parallel  # noqa: E402
import memory_plan  # noqa: E402
import quant4  # noqa: E402
import shift_attn  # noqa: E402
import train  # noqa: E402
from model import MemoryOptions, ModelConfig, Transformer, cached_attention  # noqa: E402

BUDGET_S = 8 * 60  # the whole run on one GPU
SDPA_KERNELS = ("flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention",
                "attention_math")
FULL = dict(lengths=(8192, 32768, 81920), hf_lengths=(8192, 32768), model="llama-3-8b", smoke_T=4096, nf4=(4096, 4096))
SMALL = dict(lengths=(64, 128, 256), hf_lengths=(64, 128), model="tiny", smoke_T=64, nf4=(256, 256))

# ----------------------------------------------------------------------------- helpers


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sdpa_kernels_run(fn) -> list[str]:
    """The SDPA ATen kernels that ran during fn(), read from a profiler trace (not assumed)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    found = set()
    for e in prof.key_averages():
        name = e.key.removeprefix("aten::_scaled_dot_product_").removesuffix("_backward")
        if name in SDPA_KERNELS:
            found.add(name)
        elif e.key.startswith("aten::_efficient_attention"):  # the lower-right causal bias calls it directly
            found.add("efficient_attention")
    return sorted(found)


def peak_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak since reset_peak; CPU: the process's peak RSS (not reset: an upper bound)."""
    rec = memory_peak.peak_memory(device)
    return (rec["peak_alloc_gb"] if device.type == "cuda" else rec["peak_rss_gb"]) * 2**30


def reset_peak(device: torch.device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def corpus(out: Path) -> Path:
    """A few KB of real text for the trainer runs: this project's own sources."""
    d = out / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("model.py", "rope.py", "lora.py"):
        (d / f"{name}.txt").write_text((ROOT / name).read_text())
    return d


def run_trainer(out: Path, device: torch.device, name: str, **flags) -> list[float]:
    """train.train on the tiny preset (2 steps at 128 tokens) with `flags`; returns the step losses."""
    given = {**dict(model="tiny", tokenizer="bytes", ctx=128, data=str(corpus(out)), steps=2, lr=1e-2,
                    out=str(out / name)), **flags}
    train.train(train_config.resolve(given), parallel.Dist(0, 0, 1, device))
    return [json.loads(l)["loss"] for l in (out / name / "metrics.jsonl").read_text().splitlines()]

# ----------------------------------------------------------------------------- section 1: smoke


def smoke_nf4(device, sizes) -> dict:
    w = torch.randn(*sizes[:2], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cpu, dev = quant4.quantize_nf4(w), quant4.quantize_nf4(w.to(device))
    fields = ("packed", "absmax", "absmax_scale", "absmax_offset")
    same = {f: bool(torch.equal(getattr(cpu, f).cpu(), getattr(dev, f).cpu())) for f in fields if getattr(cpu, f) is not None}
    deq = {str(dt): bool(torch.equal(quant4.dequantize_nf4(cpu, dt), quant4.dequantize_nf4(dev, dt).cpu()))
           for dt in (torch.float32, torch.bfloat16)}
    ok = all(same.values()) and all(deq.values())
    return {"ok": ok, "fields_equal": same, "dequantized_equal": deq, "shape": list(w.shape)}


def smoke_linear4bit(device) -> dict:
    lin = torch.nn.Linear(256, 192, bias=False)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1))
    out = {}
    for where in ("cpu", device):
        layer = quant4.Linear4bit.from_linear(lin).to(where)
        xi = x.to(where).requires_grad_()
        y = layer(xi)
        y.square().sum().backward()
        out[str(where)] = (y.detach().cpu(), xi.grad.cpu())
    (yc, gc), (yd, gd) = out["cpu"], out[str(device)]
    e = {"forward_rel_err": rel_err(yd, yc), "grad_x_rel_err": rel_err(gd, gc)}
    return {"ok": max(e.values()) <= 1e-3, **e}


def smoke_bf16(device) -> dict:
    mc = ModelConfig.from_name("tiny", n_layers=4)
    net = Transformer(mc).init_weights(0).to(device).eval()
    x = torch.randint(0, mc.vocab_size, (1, 128), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref = net(x).float()
        low = net.to(torch.bfloat16)(x).float()
    e = rel_err(low, ref)
    return {"ok": e <= 3e-2, "logits_rel_l2": e, "tolerance": 3e-2}


def smoke_sdpa(device, T) -> dict:
    """The kernels that training attention (full, S²-Attn, and S²-Attn with a context-parallel rank's head
    border, under train.attention_backends' policy: shift_attn.training_kernels) and chunked prefill
    (cached_attention with start > 0) actually run, for the dtype the trainer picks, on the model's own
    layouts: q, k, v as the attention module makes them, (B, T, H, D) projections viewed as (B, H, T, D)
    (strided, not contiguous), and a border inside a kv group, whose pieces broadcast their one kv head
    by a stride-0 expand (shift_attn's note)."""
    dtype = devices.choose_dtype(None, device)
    H, Hkv, D = (32, 8, 128) if T >= 1024 else (8, 2, 16)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, T, h, D, generator=g).to(device, dtype).requires_grad_() for h in (H, Hkv, Hkv))
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D) views of (B, T, H, D), as model.Attention's
    border = H // 2 - H // Hkv // 2  # inside a kv group: pieces of rep/2 query heads on one (expanded) kv head
    res = {"dtype": str(dtype), "q_stride": list(q.stride()), "border_in_kv_group": border,
           "allowed": [b.name for b in shift_attn.training_backends(dtype, device.type, True, T) or []] or "any"}

    def train_step(attn):
        def f():
            with shift_attn.training_kernels(dtype, device.type, gqa=True, ctx=T):
                attn(q, k, v).float().sum().backward()
            sync(device)
        return f

    res["full"] = sdpa_kernels_run(train_step(shift_attn.causal_attention))
    res["s2"] = sdpa_kernels_run(train_step(shift_attn.make_attention(group_ratio=0.25)))
    res["s2_border"] = sdpa_kernels_run(train_step(shift_attn.make_attention(group_ratio=0.25, border=border)))
    with torch.no_grad():
        chunk = T // 4
        qc = q[:, :, -chunk:].detach()
        res["prefill_chunk"] = sdpa_kernels_run(lambda: (cached_attention(qc, k.detach(), v.detach(), T - chunk), sync(device)))
    fused = ("flash_attention", "efficient_attention", "cudnn_attention")
    if device.type == "cuda":
        res["ok"] = all(res[p] and all(k_ in fused for k_ in res[p]) for p in ("full", "s2", "s2_border", "prefill_chunk"))
    else:
        res["ok"] = all(res[p] for p in ("full", "s2", "s2_border", "prefill_chunk"))  # CPU: whichever kernel, recorded
    return res


def smoke_trainer_paths(device, out: Path) -> dict:
    """train.train eager vs --compile vs --offload on the tiny preset: equal losses within 1e-3 relative."""
    from torch._dynamo.utils import counters

    res = {"eager": run_trainer(out, device, "eager")}
    res["resumed_step_3"] = run_trainer(out, device, "eager", steps=3, resume=True)  # restores the device RNG
    for name, flags in (("compile", dict(compile=True)), ("offload", dict(offload=True))):
        try:
            graphs = counters["stats"]["unique_graphs"]
            res[name] = run_trainer(out, device, name, **flags)
            res[name + "_graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs
            res[name + "_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(res[name], res["eager"]))
        except Exception as e:  # noqa: BLE001 (a report records any failure and goes on)
            res[name] = f"failed: {type(e).__name__}: {e}"
    if device.type != "cuda":
        res["offload_note"] = "--offload is a no-op off CUDA (train.offload)"
    res["ok"] = all(isinstance(res.get(n + "_rel_diff"), float) and res[n + "_rel_diff"] <= 1e-3
                    for n in ("compile", "offload")) and res.get("compile_graphs_compiled", 0) > 0 \
        and len(res["resumed_step_3"]) == 3 and res["resumed_step_3"][:2] == res["eager"]
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_process_group(device) -> dict:
    """A 1-rank group as parallel.init_distributed builds it, the trainer's two all-reduces (the CPU token
    count through gloo, the loss on the device), and one DDP step equal to the plain step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        count = torch.tensor(12.0)
        loss = torch.tensor(3.5, device=device, dtype=torch.float64)
        dist.all_reduce(count)
        dist.all_reduce(loss)
        net = Transformer(ModelConfig.from_name("tiny")).init_weights(0).to(device)
        x = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(4)).to(device)
        net(x, labels=x).backward()
        want = net.lm_head.weight.grad.clone()
        net.zero_grad()
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
        ddp(x, labels=x).backward()
        e = rel_err(net.lm_head.weight.grad, want)
        ok = float(count) == 12.0 and float(loss) == 3.5 and e <= 1e-3
        return {"ok": ok, "backend": backend, "count": float(count), "loss": float(loss), "ddp_grad_rel_err": e}
    finally:
        dist.destroy_process_group()


def smoke_sample(device) -> dict:
    logits = torch.randn(512, generator=torch.Generator().manual_seed(5)).to(device)
    draws = [generate.sample(logits, 1.0, 0.9, torch.Generator().manual_seed(6)) for _ in range(2)]
    cpu = generate.sample(logits.cpu(), 1.0, 0.9, torch.Generator().manual_seed(6))
    return {"ok": draws[0] == draws[1] == cpu, "device_draw": draws[0], "cpu_draw": cpu}


def section_smoke(args, device, sizes, out: Path) -> dict:
    checks = {"nf4": lambda: smoke_nf4(device, sizes["nf4"]), "linear4bit": lambda: smoke_linear4bit(device),
              "bf16_forward": lambda: smoke_bf16(device), "sdpa_kernels": lambda: smoke_sdpa(device, sizes["smoke_T"]),
              "compile_offload": lambda: smoke_trainer_paths(device, out / "trainer"),
              "process_group": lambda: smoke_process_group(device), "sample": lambda: smoke_sample(device)}
    res = {}
    for name, fn in checks.items():
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001
            res[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
    return res

# ----------------------------------------------------------------------------- section 2: several ranks


def collectives_worker(rank: int, world: int, port: int, device_type: str, out: str) -> None:
    """One rank of section_multi_rank: an all-reduce and parallel.exchange's all-to-all (NCCL on CUDA, gloo
    on the CPU) against the results they must give, written to OUT/rank{rank}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        x = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(x)
        t = torch.arange(2 * world, device=device, dtype=torch.float32) + 100 * rank  # piece j: [2j, 2j+1] + 100 rank
        got = parallel.exchange(t, 0, 0, None)  # piece `rank` of every rank j, in rank order
        want = torch.cat([torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float32) + 100 * j for j in range(world)])
        res = {"backend": dist.get_backend(), "all_reduce_ok": bool((x == world * (world + 1) / 2).all()),
               "all_to_all_ok": bool(torch.equal(got.cpu(), want))}
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


def section_multi_rank(device, out: Path) -> dict:
    """Two ranks (two GPUs; gloo processes on the CPU): the collectives of collectives_worker, then
    `torchrun --nproc_per_node 2 train.py --cp 2` against `python train.py` on the same data and seed in
    float32, every logged loss within 1e-5 on the CPU (only the order of the reductions differs), 1e-4 on
    CUDA (cuBLAS picks other kernels, split-K included, for half-length shards). Skipped below 2 GPUs."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"ok": None, "skipped": f"{torch.cuda.device_count()} GPU: needs 2"}
    world, where = 2, out / "collectives"
    where.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(collectives_worker, args=(world, free_port(), device.type, str(where)), nprocs=world)
    ranks = [json.loads((where / f"rank{r}.json").read_text()) for r in range(world)]
    common = [str(ROOT / "train.py"), "--model", "tiny", "--tokenizer", "bytes", "--ctx", "128", "--steps", "2",
              "--data", str(corpus(out)), "--lr", "1e-2", "--schedule", "constant", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, *common], "cp2": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node", "2", *common, "--cp", "2"]}
    losses = {}
    for name, cmd in runs.items():
        r = subprocess.run([*cmd, "--out", str(out / f"cp_{name}")], capture_output=True, text=True, env=env, cwd=ROOT)
        if r.returncode:
            return {"ok": False, "collectives": ranks, "error": f"{name}: {r.stderr[-1500:]}"}
        losses[name] = [json.loads(l)["loss"] for l in (out / f"cp_{name}" / "metrics.jsonl").read_text().splitlines()]
    tol = 1e-4 if device.type == "cuda" else 1e-5
    diff = max(abs(a - b) for a, b in zip(losses["one"], losses["cp2"]))
    ok = all(r["all_reduce_ok"] and r["all_to_all_ok"] for r in ranks) and len(losses["cp2"]) == 2 and diff <= tol
    return {"ok": ok, "collectives": ranks, "losses": losses, "cp2_max_loss_diff": diff, "tolerance": tol}

# ----------------------------------------------------------------------------- section 3: our training step


def matmul_rate(device) -> dict:
    """Dense matmul FLOP/s measured now: bf16 8192^3 on CUDA (best of 5), float32 512^3 on CPU."""
    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 512)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    sync(device)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        times.append(time.perf_counter() - t)
    return {"dtype": str(dtype), "n": n, "flops_per_s": 2 * n**3 / min(times)}


def model_flops(mc: ModelConfig, T: int, r: int) -> float:
    """bench_train.model_flops' convention for any config: frozen linears 4 P T, LoRA on q,k,v,o 6 r T
    (in + out), frozen head 4 V C T, causal attention 6 T^2 H D per layer; recomputation not counted."""
    C, Fd, H, Hkv, L, V, D = mc.dim, mc.ffn_dim, mc.n_heads, mc.n_kv_heads, mc.n_layers, mc.vocab_size, mc.head_dim
    P = C * H * D + 2 * C * Hkv * D + H * D * C + 3 * C * Fd
    lora_p = r * ((C + H * D) + 2 * (C + Hkv * D) + (H * D + C))
    return L * (4 * P * T + 6 * lora_p * T + 6 * T * T * H * D) + 4 * V * C * T


def random_nf4_model(mc: ModelConfig, dtype, device, memory: MemoryOptions) -> Transformer:
    """Random N(0, 0.02) weights built straight on the device in `dtype` (no float32 copy), then NF4."""
    with torch.device("meta"):
        net = Transformer(mc, memory)
    net = net.to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02, generator=g)
    return quant4.quantize_model(net, skip=("lm_head",))


def section_train(args, device, sizes, rate: dict, deadline: float) -> dict:
    d = parallel.Dist(0, 0, 1, device)
    mc = ModelConfig.from_name(sizes["model"])
    dtype = devices.choose_dtype(None, device)  # as the trainer picks it
    capacity = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    rows = {}
    for T in sizes["lengths"]:
        given = dict(model=sizes["model"], ctx=T, data="x", train="", dtype=str(dtype).removeprefix("torch."))
        cfg = train_config.resolve(given, "llama3-80k")
        if time.time() > deadline:
            rows[T] = {"skipped": "time budget spent"}
            continue
        net = None
        try:
            net = random_nf4_model(mc, dtype, device, MemoryOptions(checkpointing=cfg.checkpointing))
            summary = lora.apply_lora(net, **cfg.lora_kwargs())
            net.to(device).train()
            reset_peak(device)  # after the build: quantize_model's transient copies are not the step's peak
            need = memory_plan.memory_plan(cfg, mc, torch.finfo(dtype).bits // 8, summary["trainable"], device.type)["total"]
            if capacity is not None and need > capacity:
                rows[T] = {"skipped": f"plan {need / 2**30:.1f} GiB > device {capacity / 2**30:.1f} GiB"}
                continue
            params = [p for p in net.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.lr)
            x = torch.randint(0, mc.vocab_size, (1, T), device=device)
            y = torch.roll(x, -1, 1)
            times = []
            for _ in range(2 if T <= 32768 else 1):  # the first step includes allocator and kernel warm-up
                sync(device)
                t = time.perf_counter()
                with train.attention_backends(cfg, d, net):
                    (net(x, labels=y, loss_chunk=cfg.loss_chunk) / T).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                times.append(time.perf_counter() - t)
            step = min(times)
            peak = peak_bytes(device)
            rows[T] = {"step_s": step, "tokens_per_s": T / step, "peak_gib": peak / 2**30, "plan_gib": need / 2**30,
                       "peak_over_plan": peak / need, "mfu": model_flops(mc, T, cfg.lora_r) / step / rate["flops_per_s"]}
        except Exception as e:  # noqa: BLE001
            rows[T] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            del net
            reset_peak(device)
    return {"ok": all("error" not in r for r in rows.values()), "model": sizes["model"], "dtype": str(dtype),
            "rows": rows}

# ----------------------------------------------------------------------------- section 4: transformers + PEFT


def section_hf(args, device, sizes, rate: dict, deadline: float) -> dict:
    try:
        import peft
        import transformers
    except ImportError as e:
        return {"ok": None, "skipped": f"not importable: {e}"}
    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    mc = ModelConfig.from_name(sizes["model"])
    dtype = devices.choose_dtype(None, device)  # as the trainer picks it
    hc = transformers.LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.dim, num_hidden_layers=mc.n_layers,
                                  num_attention_heads=mc.n_heads, num_key_value_heads=mc.n_kv_heads,
                                  intermediate_size=mc.ffn_dim, rope_theta=mc.rope_theta, attn_implementation="sdpa",
                                  max_position_embeddings=max(sizes["hf_lengths"]), tie_word_embeddings=False)
    rows = {}
    for T in sizes["hf_lengths"]:
        if time.time() > deadline:
            rows[T] = {"skipped": "time budget spent"}
            continue
        net = None
        try:
            with torch.device(device):
                net = transformers.LlamaForCausalLM(hc).to(dtype)
            quant = "none"
            if bnb is not None and device.type == "cuda":
                for mod in list(net.modules()):
                    for child, lin in list(mod.named_children()):
                        if isinstance(lin, torch.nn.Linear) and child != "lm_head":
                            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                                  quant_type="nf4", compress_statistics=True)
                            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                                         compress_statistics=True)
                            setattr(mod, child, q.to(device))  # Params4bit quantizes as it moves to the GPU
                quant = "bitsandbytes nf4"
                net = peft.prepare_model_for_kbit_training(net, use_gradient_checkpointing=True)
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=False))
            net.enable_input_require_grads()
            net = peft.get_peft_model(net, peft.LoraConfig(r=32, lora_alpha=16, target_modules=list(lora.ATTN_PROJ)))
            net.train()
            reset_peak(device)  # after the build, as section_train
            opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=5e-5)
            x = torch.randint(0, mc.vocab_size, (1, T), device=device)
            times = []
            for _ in range(2):
                sync(device)
                t = time.perf_counter()
                net(input_ids=x, labels=x).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                times.append(time.perf_counter() - t)
            step = min(times)
            rows[T] = {"quant": quant, "step_s": step, "tokens_per_s": T / step,
                       "peak_gib": peak_bytes(device) / 2**30,
                       "mfu": model_flops(mc, T, 32) / step / rate["flops_per_s"]}
        except Exception as e:  # noqa: BLE001
            rows[T] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            del net
            reset_peak(device)
    return {"ok": all("error" not in r for r in rows.values()), "rows": rows,
            "versions": {"transformers": transformers.__version__, "peft": peft.__version__,
                         "bitsandbytes": getattr(bnb, "__version__", None)}}

# ----------------------------------------------------------------------------- section 5: the demo


def section_demo(args, device, small: bool, out: Path, deadline: float) -> dict:
    if time.time() > deadline:
        return {"ok": None, "skipped": "time budget spent"}
    flags = {"out": str(out / "demo")}
    if small:
        flags.update(steps=2, eval_windows=1, eval_keys=1)
    elif device.type == "cuda":
        flags.update(eval_windows=16, eval_keys=80)  # twice the CPU demo's evaluation, its 400 steps
    t = time.time()
    rows = demo.run_demo(parallel.Dist(0, 0, 1, device), flags)
    return {"ok": rows is not None, "seconds": time.time() - t, "flags": flags,
            "rows": {k: {c: v for c, v in r.items() if c != "nll_by_position"} for k, r in (rows or {}).items()}}

# ----------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = [f"# gpu_check report", "", f"device: {report['device']} ({report['device_name']}), torch "
             f"{report['torch']}, small={report['small']}, {report['seconds']:.0f} s", ""]
    for name in ("smoke", "multi_rank", "train", "hf", "demo"):
        sec = report["sections"][name]
        lines += [f"## {name}", ""]
        if name == "smoke" and isinstance(sec, dict) and "error" not in sec:
            lines += ["| check | ok | details |", "| --- | --- | --- |"]
            for check, r in sec.items():
                detail = {k: v for k, v in r.items() if k not in ("ok", "traceback")}
                lines.append(f"| {check} | {r.get('ok')} | `{json.dumps(detail, default=str)[:400]}` |")
        elif isinstance(sec, dict) and "rows" in sec and name in ("train", "hf"):
            lines += ["| tokens | step s | tokens/s | peak GiB | plan GiB | MFU | note |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
            for T, r in sec["rows"].items():
                f = lambda k, fmt: format(r[k], fmt) if k in r else ""  # noqa: E731
                note = r.get("error") or r.get("skipped") or r.get("quant", "")
                lines.append(f"| {T} | {f('step_s', '.2f')} | {f('tokens_per_s', '.0f')} | {f('peak_gib', '.2f')} | "
                             f"{f('plan_gib', '.2f')} | {f('mfu', '.1%')} | {note} |")
            lines.append("")
            lines.append(f"`{json.dumps({k: v for k, v in sec.items() if k != 'rows'}, default=str)}`")
        else:
            lines.append(f"`{json.dumps(sec, default=str)[:2000]}`")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for report.md, report.json and scratch runs")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--small", action="store_true", help="tiny sizes: every section in a few minutes on a CPU")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        device = devices.choose_device(args.device)
    except train_config.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = SMALL if args.small else FULL
    deadline = t0 + BUDGET_S - 90  # leave the demo and the report a margin
    sections, rate = {}, None

    def guarded(name, fn):
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            sections[name] = fn()
        except Exception as e:  # noqa: BLE001
            sections[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}

    guarded("smoke", lambda: section_smoke(args, device, sizes, out))
    guarded("multi_rank", lambda: section_multi_rank(device, out / "multi_rank"))
    try:
        rate = matmul_rate(device)
    except Exception as e:  # noqa: BLE001
        rate = {"flops_per_s": float("nan"), "error": str(e)}
    guarded("train", lambda: {**section_train(args, device, sizes, rate, deadline - 120), "matmul": rate})
    guarded("hf", lambda: section_hf(args, device, sizes, rate, deadline - 60))
    guarded("demo", lambda: section_demo(args, device, args.small, out, deadline))
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "small": args.small, "seconds": time.time() - t0, "sections": sections}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(markdown(report))
    print(f"gpu_check: wrote {out / 'report.md'} and {out / 'report.json'} in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
