"""The built-in demo: a small byte-level Llama extended ten-fold on CPU, measured before and after.

`python train.py` with no --model (or `torchrun --nproc_per_node 2 train.py`) runs `prepare`, the trainer,
then `finish` below, from the shipped base in demo/:
  1. the base: a byte-level Llama (4 layers, 8 heads of 16, dim 128, 0.92M parameters, bf16, 2 MB)
     trained at L = 256 bytes on the Python standard library's sources (held-in files) with synthetic
     recall facts inserted;
  2. extension to 10 L = 2560 tokens with the full method, through the trainer (train.train):
     NF4 base weights with double quantization (QLoRA, Dettmers et al. 2023), LoRA r=16 alpha=32 on all
     linear layers plus trained embeddings and norms, RoPE YaRN with factor 16 (Peng et al. 2023:
     interpolation by parts, m' = m / 16 for the low frequencies only, plus an attention temperature),
     S²-Attn with group 10 L / 4 during training (Chen et al. 2024, LongLoRA), full attention at evaluation,
     400 steps of one 2560-token sequence per process, lr 2e-3 with 10 warmup steps and cosine decay;
  3. evaluation of the base and of the extended model (with `--eval-untrained`, also of the base with the
     RoPE change and no training): perplexity of 8 held-out windows over their first L, 5 L and 10 L
     positions and over positions L..10 L; passkey-style retrieval (greedy exact match of a 4-digit
     value, 40 prompts per length) at L, 5 L and 10 L.
Short-context retention: the table's columns at L are the base's own length, its last column and a printed
line give retention at L against the base (ppl: base ppl@L / row ppl@L; passkey: row / base; 1 = kept,
above 1 = better). `python demo_compare.py` runs PI, NTK, YaRN and YaRN + PoSE under this budget.
The output ends with that table, the targets it is read against, and the paths of the adapter, the table
(results.md, results.json) and a plot of NLL by position. docs/demo.md holds the measured table and the
runs behind the choice of YaRN factor 16.

Targets: the base breaks beyond L (ppl over L..10 L at least 3x its ppl@L); the extended model's ppl@10L
at most 1.15x the base's ppl@L; retrieval at 10 L at least 90% for the extended model, at most 20% for
the base, which retrieves at L.

Data, and what training never sees. A stdlib file is held out when crc32(its relative path) % 10 == 0
(`stdlib_split`); pretraining and extension read only held-in files, evaluation only held-out ones. A fact
is a line `K$NNNN` (`$` is replaced in the corpus so facts are unique), a query the line start `K$`, the
answer the 4 digits. Training values and positions come from the RNG stream TRAIN_SEED, evaluation
values, depths and filler offsets from EVAL_SEED. The passkey prompt is BOS + held-out code + the fact at
a line start at depth U(0, 0.9) + more code + the query: exactly N tokens, so at L it fits the base.

Making the base (once; the shipped demo/ is step 3000 of this command's run):
    python demo.py pretrain --out /tmp/demo_pre          # defaults: the recipe below, seed 5
    cp /tmp/demo_pre/step-3000/{config.json,model.safetensors,tokenizer_config.json} demo/
Recipe: batch 8 x 256 bytes, AdamW (0.9, 0.95) wd 0.1, lr 3e-3 with 100 warmup steps and cosine to
3e-4, 3000 steps; each sequence holds one fact and 3 later queries (6/7 of sequences), answer digits
weighted 10, fact digits 0 (random, unpredictable), code 1. Curriculum: fact and queries lie within 24
bytes at first, the span growing to the whole sequence over the first 900 steps (without it the answer
digits stayed at chance, docs/demo.md).

Notation: B batch, T tokens, L base context, N evaluation length, V vocab (264: 256 bytes + specials).
"""
from __future__ import annotations

import memory_alloc

if __name__ == "__main__":  # a command: re-executes once with the CPU allocator preloaded, before torch loads
    memory_alloc.return_freed_memory(as_command=True)

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import train_guards
import train
import model as llama
import rope
from checkpoint import SAFETENSORS_SINGLE, load_model, read_config, save_model
from train_config import TrainConfig, resolve
from errors import UserError, run_cli
from train_guards import check_same_files
from lora_peft import load_adapter
from outputs import atomic_path, atomic_write_text, check_output, holds_only, save_figure
from parallel import Dist, barrier
from eval_tasks import (KEY_DIGITS, PASSKEY_NAME, code_passkey_items, corpus_bytes, query_bytes, random_value,
                   stdlib_split)
from tokenizer import BYTE_SPECIALS, BYTE_VOCAB_SIZE, save_tokenizer

DEMO_DIR = Path(__file__).resolve().parent / "demo"
BOS, EOS = BYTE_SPECIALS["<s>"], BYTE_SPECIALS["</s>"]
VOCAB = BYTE_VOCAB_SIZE
NAMES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DEMO_FACTS, DEMO_QUERIES = 6, 8  # extension data: one fact `K$NNNN` (6/7 of sequences), 8 queries of it
TRAIN_SEED, EVAL_SEED = 1234, 987654321  # separate RNG streams for training and evaluation keys

# ----------------------------------------------------------------------------- config

# The shipped base: 4 layers, 8 heads of 16, ~0.92M parameters, trained at L = 256 bytes.
BASE_PRESET = dict(vocab_size=VOCAB, dim=128, n_layers=4, n_heads=8, n_kv_heads=8, ffn_dim=384, max_seq_len=256,
                   rope_theta=10000.0, bos_id=BOS, eos_id=EOS)
FACTORS = (1, 5, 10)  # evaluation lengths in units of the base context L
DEMO_OUTPUTS = ("data.jsonl", "train", "results.json", "results.md", "nll_by_position.png")  # what --out holds
EVAL_WINDOWS, EVAL_KEYS = 8, 40
DEMO_RECIPE = dict(tokenizer="bytes", quant="nf4", lora_r=16, lora_alpha=32.0, lora_targets="all-linear",
                   train="embed,norm", rope="yarn:16", attn="s2", group_ratio=0.25, lr=2e-3, warmup=10,
                   schedule="cosine", steps=400, checkpointing=False, log_every=10, out="runs/demo", seed=0)


# ----------------------------------------------------------------------------- pure functions: data


def training_sequence(code: np.ndarray, T: int, rng: random.Random, max_facts: int, answer_weight: float,
                      names: str = NAMES, queries: int = 1, spread: int | None = None) -> tuple[list[int], list[float]]:
    """T + 1 bytes of code with k facts `$K=NNNN` and, later, their queries `$K=` + answer inserted.

    Returns (tokens, weights): weights[t] is the loss weight of predicting tokens[t + 1]; the random fact
    values get 0 (unpredictable), the queried answers `answer_weight`, code 1.
    """
    k = min(len(names), rng.randint(0, max_facts))
    names = rng.sample(names, k) * queries
    events = []  # ("fact" | "query", name)
    pending = []
    for i, name in enumerate(names):  # random interleaving, each query after its fact
        if i < k:
            events.append(("fact", name))
        pending.append(name)
        while pending and rng.random() < 0.5:
            events.append(("query", pending.pop(rng.randrange(len(pending)))))
    rng.shuffle(pending)
    events += [("query", n) for n in pending]
    values = {n: random_value(rng) for n in names}
    start = rng.randrange(0, len(code) - 4 * T)
    pos = start
    toks, w = [BOS], [1.0]
    budget = T + 1 - 1 - 9 * len(events)
    span = max(0, budget) if spread is None else min(max(0, budget), spread)
    first = rng.randint(0, max(0, budget) - span)
    gaps = sorted(first + rng.randint(0, span) for _ in events)
    prev = 0
    for (kind, name), g in zip(events, gaps):
        n = g - prev
        prev = g
        toks += code[pos:pos + n].tolist()
        w += [1.0] * n
        pos += n
        q = query_bytes(name)
        toks += q + [ord(c) for c in values[name]] + [ord("\n")]
        w += [1.0] * (len(q) - 1) + [0.0 if kind == "fact" else answer_weight] * KEY_DIGITS + [1.0, 1.0]
    rest = T + 1 - len(toks)
    if rest > 0:
        toks += code[pos:pos + rest].tolist()
        w += [1.0] * rest
    return toks[:T + 1], w[:T]


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_hits(net, prompts: list[list[int]], answers: list[list[int]], batch: int = 16) -> torch.Tensor:
    """(n,) bool: greedy decoding of len(answer) tokens after each prompt reproduces the answer exactly.

    Note: one teacher-forced pass over prompt + answer[:-1] checks every answer token is the argmax given
    the true previous ones; greedy decoding matches the answer exactly if and only if that holds, so this
    equals generating token by token, in one batched forward (tests/test_demo.py checks it against
    model.generate).
    """
    K, device = len(answers[0]), net.model.embed_tokens.weight.device
    hits = []
    for s in range(0, len(prompts), batch):
        x, a = torch.tensor(prompts[s:s + batch]), torch.tensor(answers[s:s + batch])  # (B, T), (B, K)
        x, a = x.to(device), a.to(device)
        logits = net(torch.cat([x, a[:, :-1]], 1))[:, -K:]  # (B, K, V)
        hits.append((logits.argmax(-1) == a).all(-1).cpu())
    return torch.cat(hits)


def passkey_accuracy(net, filler: np.ndarray, length: int, n: int, seed: int, batch: int = 16) -> float:
    """Fraction of n passkey prompts of `length` tokens (eval_tasks.code_passkey_items: `eval.py passkey --format
    code` builds the same ones) answered exactly by greedy decoding."""
    return greedy_hits(net, *code_passkey_items(filler, length, n, seed), batch=batch).float().mean().item()


# ----------------------------------------------------------------------------- pretraining


def pretrain(args) -> None:
    torch.manual_seed(args.seed)
    held_in, held_out = stdlib_split()
    code, filler = corpus_bytes(held_in), corpus_bytes(held_out)
    mc = llama.ModelConfig(**{**BASE_PRESET, **json.loads(args.overrides or "{}")})
    net = llama.Transformer(mc).init_weights(args.seed)
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    rng = random.Random(TRAIN_SEED + args.seed)
    T = mc.max_seq_len
    out = check_output(args.out, "new", "--out")  # before training: step-N folders are never replaced
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        spread = int(args.spread0 + (T - args.spread0) * min(1.0, step / (args.curriculum * args.steps)))
        seqs = [training_sequence(code, T, rng, args.max_facts, args.answer_weight, args.names, args.queries, spread)
                for _ in range(args.batch)]
        x = torch.tensor([s[0] for s in seqs])  # (B, T + 1)
        w = torch.tensor([s[1] for s in seqs])  # (B, T)
        logits = net(x[:, :-1]).float()  # (B, T, V)
        nll = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1), reduction="none")
        loss = (nll * w.reshape(-1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            net.eval()
            acc = passkey_accuracy(net, filler, T, 64, EVAL_SEED)
            net.train()
            print(f"EVAL step {step} passkey@{T} {acc:.3f} {time.time() - t0:.0f}s", flush=True)
            save_model(copy.deepcopy(net).to(torch.bfloat16), out / f"step-{step}")
            save_tokenizer("bytes", out / f"step-{step}")


# ----------------------------------------------------------------------------- the demo: extend and evaluate


def write_extension_data(path: Path, code: np.ndarray, ctx: int, n: int, seed: int) -> None:
    """n JSONL text records of ctx - 1 ASCII bytes each (with BOS and EOS: exactly one packed sequence of
    ctx + 1 tokens), held-in code with facts and their queries spread over the whole length."""
    rng = random.Random(seed)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for _ in range(n):
            toks, _ = training_sequence(code, ctx - 1, rng, DEMO_FACTS, 1.0, PASSKEY_NAME, DEMO_QUERIES)
            text = bytes(b if b < 128 else ord("?") for b in toks[1:]).decode("ascii")
            f.write(json.dumps({"text": text}) + "\n")


@torch.no_grad()
def token_nll(net, tokens: torch.Tensor) -> torch.Tensor:
    """-log p(x_t | x_<t) for t = 1..T-1 of each row of tokens (B, T), float32, full causal attention."""
    tokens = tokens.to(net.model.embed_tokens.weight.device)
    logits = net(tokens[:, :-1]).float()  # (B, T-1, V)
    return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").cpu()  # (B, T-1)


def eval_windows(filler: np.ndarray, length: int, n: int, seed: int) -> torch.Tensor:
    """n held-out windows (n, length): BOS + code starting at a line start."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        off = rng.randrange(0, len(filler) - 2 * length)
        while filler[off - 1] != ord("\n"):
            off += 1
        rows.append([BOS] + filler[off:off + length - 1].tolist())
    return torch.tensor(rows)


def evaluate_demo(net, filler: np.ndarray, L: int, factors: tuple[int, ...], n_windows: int, n_keys: int) -> dict:
    """{"ppl@N": ..., "ppl(L..N)": ..., "passkey@N": ...} for N = f * L: perplexity of held-out windows
    over their first N positions, over positions L..10L, and greedy passkey exact-match accuracy."""
    net.eval()
    N = max(factors) * L
    nll = torch.cat([token_nll(net, w[None]) for w in eval_windows(filler, N, n_windows, EVAL_SEED + 1)])  # (n, N-1)
    row = {f"ppl@{f * L}": math.exp(nll[:, :f * L - 1].mean().item()) for f in factors}
    row[f"ppl({L}..{N})"] = math.exp(nll[:, L - 1:].mean().item())
    for f in factors:
        row[f"passkey@{f * L}"] = passkey_accuracy(net, filler, f * L, n_keys, EVAL_SEED, batch=max(1, 16 // f))
    row["nll_by_position"] = nll.mean(0).tolist()
    return row


def load_base(path: Path, cfg: TrainConfig | None = None, quant: str | None = None,
              device: torch.device | str = "cpu") -> llama.Transformer:
    """The base in float32 on `device` (NF4 linears with quant="nf4"); with a training config, its RoPE
    changed as the trainer changes it (--rope, --rope-theta, `:auto` factors), nothing trained. The
    evaluations move their token tensors to the model's device (token_nll, greedy_hits)."""
    net = load_model(str(path), dtype=torch.float32, device=device, quant=None if quant == "none" else quant)
    if cfg is not None:
        mc = net.config
        mc.rope_theta, mc.rope_scaling = rope.override(mc.rope_theta, mc.rope_scaling, cfg.rope, cfg.rope_theta,
                                                       mc.max_seq_len, cfg.ctx)
    return net


def length_label(f: int) -> str:
    """A length in units of the base context: "L", "5L", "10L"."""
    return "L" if f == 1 else f"{f}L"


def retained(row: dict, ref: dict, L: int) -> dict:
    """Short-context retention of `row` against `ref` (the base) at the base's own length L, both as
    "fraction kept, 1 = unchanged, above 1 = better": ppl = ref ppl@L / row ppl@L (perplexity is lower-is-
    better, so the ratio is the base's over the row's), passkey = row passkey@L / ref passkey@L (None when
    the reference retrieves nothing at L)."""
    ref_pk = ref[f"passkey@{L}"]
    return {"length": L, "ppl": ref[f"ppl@{L}"] / row[f"ppl@{L}"],
            "passkey": row[f"passkey@{L}"] / ref_pk if ref_pk > 0 else None}


def format_retained(r: dict) -> str:
    """'1.018x, 100%': retained() as printed."""
    return f"{r['ppl']:.3f}x, " + ("n/a" if r["passkey"] is None else f"{100 * r['passkey']:.0f}%")


def format_demo_table(rows: dict[str, dict], L: int, factors: tuple[int, ...]) -> str:
    """Markdown table of the rows; the last column is each row's retention at L against the first row."""
    span = f"ppl({L}..{max(factors) * L})"
    named = ([(f"ppl@{f * L}", f"ppl@{f * L} ({length_label(f)})") for f in factors] + [(span, span)]
             + [(f"passkey@{f * L}", f"passkey@{f * L} ({length_label(f)})") for f in factors])
    cols, heads = [c for c, _ in named], [h for _, h in named] + [f"retained@{L} ppl, passkey"]
    lines = ["| model | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(heads)]
    first = next(iter(rows.values()), None)
    for name, r in rows.items():
        cells = [f"{r[c]:.3f}" if c.startswith("ppl") else f"{100 * r[c]:.0f}%" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells + [format_retained(retained(r, first, L))]) + " |")
    return "\n".join(lines)


def plot_demo(rows: dict[str, dict], L: int, path: Path) -> str | None:
    """Per-position NLL of each model (smoothed over L/4 positions); None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    k = L // 4
    for name, r in rows.items():
        nll = np.asarray(r["nll_by_position"])
        smooth = np.convolve(nll, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k, smooth, label=name)
    ax.axvline(L, color="gray", linestyle=":")
    ax.set_xlabel("position (bytes)")
    ax.set_ylabel("NLL (nats/byte), held-out stdlib code")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return str(path)


@dataclass
class DemoRun:
    """What `prepare` hands the trainer and `finish`: the resolved training config and the demo's state."""

    cfg: TrainConfig
    out: Path
    base_dir: Path
    n_windows: int
    n_keys: int
    filler: np.ndarray
    rows: dict
    t0: float


def prepare(d: Dist, flags: dict) -> DemoRun:
    """Resolve the demo's training config (DEMO_RECIPE under the user's flags); on rank 0 evaluate the base
    and write the extension data. Every rank returns the same config; the caller trains, then `finish`."""
    t0 = time.time()
    given = {k: v for k, v in flags.items() if v is not None}
    out = check_output(given.pop("out", DEMO_RECIPE["out"]), "new", "--out", owned=holds_only(*DEMO_OUTPUTS))
    base_dir = Path(given.pop("base", DEMO_DIR))
    n_windows, n_keys = given.pop("eval_windows", EVAL_WINDOWS), given.pop("eval_keys", EVAL_KEYS)
    untrained = given.pop("eval_untrained", False)
    if not (base_dir / SAFETENSORS_SINGLE).is_file():
        raise UserError(f"{base_dir / SAFETENSORS_SINGLE}: missing; make it with `python demo.py pretrain`")
    L = read_config(base_dir).max_seq_len
    cfg = resolve({**DEMO_RECIPE, "ctx": FACTORS[-1] * L, **given, "model": str(base_dir),
                   "data": str(out / "data.jsonl"), "out": str(out / "train")}, world_size=d.world)
    _, held_out = stdlib_split()
    run = DemoRun(cfg, out, base_dir, n_windows, n_keys, corpus_bytes(held_out), {}, t0)
    if d.main:
        print(f"demo: base {base_dir} (context L = {L} bytes), extending to {cfg.ctx} with {d.world} process(es)",
              flush=True)
        train_guards.remove_run(out / "train")  # the demo's own previous run
        out.mkdir(parents=True, exist_ok=True)
        write_extension_data(out / "data.jsonl", corpus_bytes(stdlib_split()[0]), cfg.ctx,
                             cfg.steps * cfg.grad_accum * d.world, TRAIN_SEED + 7)
        run.rows["base"] = evaluate_demo(load_base(base_dir, device=d.device), run.filler, L, FACTORS,
                                         n_windows, n_keys)
        if untrained:  # the base with the extended RoPE, loaded afresh
            run.rows["base, RoPE extended, untrained"] = evaluate_demo(
                load_base(base_dir, cfg, device=d.device), run.filler, L, FACTORS, n_windows, n_keys)
        print(f"evaluated the base in {time.time() - t0:.0f}s", flush=True)
    barrier(d)
    check_same_files(d, [out / "data.jsonl"], f"--out {out}")  # rank 0 wrote it, every rank reads it
    return run


def finish_demo(d: Dist, run: DemoRun) -> dict | None:
    """On rank 0: evaluate the extended model (NF4 base + the trained adapter, RoPE as trained), print and
    write the table. Returns the rows on rank 0, else None."""
    if not d.main:
        return None
    cfg, out = run.cfg, run.out
    net = load_base(run.base_dir, cfg, quant=cfg.quant, device=d.device)
    load_adapter(net, Path(cfg.out) / "adapter")
    L = net.config.max_seq_len
    rows = run.rows
    rows["extended (NF4 + LoRA)"] = evaluate_demo(net, run.filler, L, FACTORS, run.n_windows, run.n_keys)
    table = format_demo_table(rows, L, FACTORS)
    png = plot_demo(rows, L, out / "nll_by_position.png")
    kept = {name: retained(r, rows["base"], L) for name, r in rows.items()}
    atomic_write_text(out / "results.json", json.dumps({"config": cfg.to_dict(), "rows": rows, "retained": kept},
                                                       indent=1))
    atomic_write_text(out / "results.md", table + "\n")
    base, ext, N = rows["base"], rows["extended (NF4 + LoRA)"], FACTORS[-1] * L
    print(f"\ndemo finished in {time.time() - run.t0:.0f}s; held-out stdlib code, {run.n_windows} windows, "
          f"{run.n_keys} keys per length\n")
    print(table)
    print(f"\nbase beyond its length: ppl({L}..{N}) / ppl@{L} = {base[f'ppl({L}..{N})'] / base[f'ppl@{L}']:.2f} "
          "(target: >= 3)")
    print(f"extended: ppl@{N} / base ppl@{L} = {ext[f'ppl@{N}'] / base[f'ppl@{L}']:.3f} (target: <= 1.15)")
    print(f"passkey@{N}: extended {ext[f'passkey@{N}']:.0%} (target: >= 90%), base {base[f'passkey@{N}']:.0%} "
          f"(target: <= 20%), base at {L}: {base[f'passkey@{L}']:.0%}")
    print(f"retained at {L} (the base's own length), extended vs base: {format_retained(kept['extended (NF4 + LoRA)'])} "
          f"(ppl: base ppl@{L} / extended ppl@{L}; passkey: extended / base; 1 = kept, above 1 = better)")
    print(f"adapter: {Path(cfg.out) / 'adapter'}; table: {out / 'results.md'}; plot: {png or 'not written (no matplotlib)'}")
    return rows


def run_demo(d: Dist, flags: dict) -> dict | None:
    """The whole demo on every rank: `prepare`, train.train, `finish`. Returns the rows on rank 0, else None."""
    job = prepare(d, flags)
    train.train(job.cfg, d)
    return finish_demo(d, job)


def run_command(argv: list[str]) -> int:
    """`python train.py [flags]` with no --model and --ctx up to the demo's, handed over to this module."""
    given, opts = train.parse_flags(argv)
    return run_cli(lambda: check_flags(given, opts)) or train.run_ranks(lambda d: run_demo(d, given), given)


def check_flags(given: dict, opts: dict) -> None:
    """The demo takes train.py's flags but these (they need --model)."""
    for flag, value in (("--recipe", opts["recipe"]), ("--force", opts["force"]), ("--data", given.get("data")),
                        ("--dry-run", opts["dry_run"]), ("--suggest-base", opts["suggest_base"])):
        if value:
            raise UserError(f"{flag} does not apply to the built-in demo (use it with train.py and --model)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != ["pretrain"]:  # the demo itself, on train.py's command line
        code = run_command(argv)
        if code:
            sys.exit(code)
        return
    ap = argparse.ArgumentParser(description="Remake the demo's base: `python demo.py pretrain` (`python train.py` "
                                 "or `python demo.py` with no --model runs the demo; demo_compare.py compares methods).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pretrain", help="train the base from scratch (the shipped demo/ was made by this)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--max-facts", type=int, default=6)
    p.add_argument("--answer-weight", type=float, default=10.0, help="loss weight of a queried answer digit")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--names", default=PASSKEY_NAME, help="key names of the facts (one name: one fact per sequence)")
    p.add_argument("--queries", type=int, default=3, help="queries per fact")
    p.add_argument("--spread0", type=int, default=24, help="curriculum: facts and queries within this many bytes at first")
    p.add_argument("--curriculum", type=float, default=0.3, help="fraction of the steps over which the spread grows to T")
    p.add_argument("--overrides", default="", help="JSON ModelConfig fields over BASE_PRESET")
    p.add_argument("--out", default="/tmp/demo_pre")
    args = ap.parse_args(argv)
    if run_cli(lambda: pretrain(args)):
        sys.exit(1)


if __name__ == "__main__":
    main()
