"""Long-context fine-tuning of a Llama-family model: QLoRA + RoPE extension + S²-Attn, one GPU or many.

Launch:
    python train.py --model tiny --data notes.txt --ctx 2048 --steps 20 --out runs/tiny      # CPU, 1 process
    torchrun --nproc_per_node 2 train.py --model tiny --data src/ --ctx 80000 --steps 2 --out runs/80k
    torchrun --nproc_per_node 8 train.py --recipe llama3-80k --model /ckpt/Meta-Llama-3-8B-Instruct \\
        --data long.jsonl:0.15,short.jsonl:0.85 --ctx 81920 --out runs/llama3-80k
    python train.py --dry-run --model llama-3-8b --ctx 80000 --recipe llama3-80k --nproc 8   # memory plan only
    python train.py                                    # no --model: the built-in demo (demo.py)
    torchrun --nproc_per_node 8 train.py --ctx 80000   # no --model, ctx beyond the demo's: SmolLM2 (demo_smollm2.py)

Recipes (`--recipe`; explicit flags override them): `python train.py --help` lists them with their settings,
train_config.RECIPES holds them.

One optimizer step = grad_accum micro-steps on every rank, each micro-step one sequence of up to ctx tokens.
The loss is the sum of token NLLs divided by the number of supervised tokens of the whole step (all
micro-steps, all ranks), so 2 ranks x accum 1 and 1 rank x accum 2 take the same step:
    loss = sum_{ranks, micro-steps, tokens} NLL / N_sup,   N_sup = all-reduced count of labels != -100.
"""
from __future__ import annotations

import memory_alloc

if __name__ == "__main__":  # a command: re-executes once with the CPU allocator preloaded, before torch loads
    memory_alloc.return_freed_memory(as_command=True)

import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import train_config
import data
import doc_attn
import gguf_export
import train_guards
import lora
import lora_peft
import memory_peak
import parallel
import parallel_fsdp
import memory_plan
import pose
import rope
import shift_attn
import train_state
from checkpoint import load_model, read_json
from train_config import TrainConfig
from train_state import changed_settings, check_same_run, fallback_hint, newest_checkpoint, read_tensors
from devices import choose_dtype
from errors import UserError, json_field, run_cli
from model import PRESETS, MemoryOptions, ModelConfig
from outputs import append_line, atomic_path, atomic_write_text
from parallel import Dist, log0
from tokenizer import CHAT_TEMPLATES, load_tokenizer, save_tokenizer

CKPT_PREFIX = train_guards.CKPT_PREFIX
DRIVERS = {"demo": "demo.py", "extend": "demo_smollm2.py"}  # what `python train.py` with no --model becomes

# ----------------------------------------------------------------------------- model


def build_model(cfg: TrainConfig, d: Dist, dtype: torch.dtype):
    """Load (quantizing tensor by tensor with --quant nf4), set RoPE (--rope, --rope-theta), apply LoRA;
    the memory options go to the model. Returns (model, lora summary)."""
    memory = MemoryOptions(checkpointing=cfg.checkpointing, mlp_chunk=cfg.mlp_chunk, save_attention=cfg.save_attention)
    net = load_model(cfg.model, dtype=dtype, device=d.device, quant=None if cfg.quant == "none" else cfg.quant,
                     seed=cfg.seed, memory=memory)
    memory_plan.check_run(cfg, net.config, d.device)  # again: a GGUF file's config is known only now
    net.config.rope_theta, net.config.rope_scaling = memory_plan.trained_rope(cfg, net.config)
    summary = lora.apply_lora(net, **cfg.lora_kwargs())
    net.to(d.device)
    return net, summary


def attention_fn(cfg: TrainConfig):
    """S²-Attn for --attn s2, else None (the model's full causal attention)."""
    return shift_attn.make_attention(group_ratio=cfg.group_ratio) if cfg.attn == "s2" else None


def cp_attentions(cfg: TrainConfig, mesh: parallel.Mesh, mc: ModelConfig):
    """With --cp: (training attention, full attention), each the Ulysses exchange around whole-sequence
    attention on this rank's heads (parallel.rank_heads; cp above the kv heads too); S²-Attn is told where
    they sit (its shifted half is the model's heads >= H // 2)."""
    border = mc.n_heads // 2 - parallel.rank_heads(mesh.cp_rank, mesh.cp, mc.n_heads, mc.n_kv_heads)[0].start
    sparse = shift_attn.make_attention(group_ratio=cfg.group_ratio, border=border) if cfg.attn == "s2" \
        else shift_attn.causal_attention
    return tuple(parallel.context_parallel_attention(f, mesh.cp_group) for f in (sparse, shift_attn.causal_attention))


def shard_batch(batch: list[dict], mesh: parallel.Mesh, d: Dist) -> list[dict]:
    """Each sample cut into this cp rank's tokens [i T/N, (i+1) T/N) with their labels and true positions.
    A sample shorter than a multiple of N (a chat sample) is first padded with unsupervised tokens at its
    end, which causal attention never lets earlier tokens see."""
    if mesh.cp == 1:
        return batch
    out = []
    for b in batch:
        T = b["input_ids"].numel()
        pad = -T % mesh.cp
        if pad:
            log0(d, f"cp {mesh.cp}: a {T}-token sample padded with {pad} unsupervised tokens")
        x = torch.nn.functional.pad(b["input_ids"], (0, pad))
        y = torch.nn.functional.pad(b["labels"], (0, pad), value=-100)
        pos = b["positions"] if "positions" in b else torch.arange(T)  # --pose's, else 0..T-1
        pos = torch.cat([pos, pos[-1] + 1 + torch.arange(pad)])  # the padding continues them
        out.append({"input_ids": parallel.shard_sequence(x, mesh), "labels": parallel.shard_sequence(y, mesh),
                    "positions": parallel.shard_sequence(pos, mesh)})
    return out


def attention_backends(cfg: TrainConfig, d: Dist, net):
    """SDPA limited to its fused kernels while training on CUDA, flash first and cuDNN last
    (shift_attn.training_kernels), so a fallback to the math kernel's (T, T) scores is an error, not a
    silent O(T^2) allocation; float32 with GQA beyond shift_attn.MATH_MAX_CTX is a UserError here."""
    mc = net.config
    return shift_attn.training_kernels(choose_dtype(cfg.dtype, d.device), d.device.type,
                                       mc.n_heads != mc.n_kv_heads, cfg.ctx)


def make_schedule(cfg: TrainConfig, total_steps: int):
    """lr multiplier: linear warmup, then cosine/linear decay to 0 or constant."""
    warm = cfg.warmup

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.schedule == "constant":
            return 1.0
        p = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * p)) if cfg.schedule == "cosine" else 1.0 - p
    return f


def trained_names(net) -> dict:
    """parameter -> name, for the parameters that train."""
    return {p: n for n, p in net.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- data


def tokenizer_source(cfg: TrainConfig) -> str:
    """--tokenizer, else the model's own ("bytes" for presets): what load_tokenizer takes."""
    spec = cfg.tokenizer or cfg.model
    return "bytes" if spec in PRESETS else spec


def preflight(cfg: TrainConfig, tokenizer) -> None:
    """Checks that need files but load no weights, in a run and in the dry run: the --data spec (if given),
    the tokenizer against the model's vocabulary. (--out is checked by train_guards.check_run_folder, and locked
    for a run by train_guards.own_run_folder.)"""
    if cfg.data is not None:
        data.parse_data_spec(cfg.data)
    if cfg.chat_template is not None and cfg.chat_template not in CHAT_TEMPLATES:
        raise UserError(f"--chat-template {cfg.chat_template!r}: unknown; choose one of {sorted(CHAT_TEMPLATES)}")
    if cfg.model in PRESETS or Path(cfg.model).is_dir():
        vocab = memory_plan.model_config(cfg.model).vocab_size
        if tokenizer.vocab_size > vocab:
            raise UserError(f"--tokenizer {tokenizer.name}: {tokenizer.vocab_size} tokens, more than the vocab_size "
                            f"{vocab} of --model {cfg.model}; use the model's own tokenizer")


def check_gguf(cfg: TrainConfig, mc) -> None:
    """--merge --gguf: what the export would refuse (a RoPE llama.cpp cannot store, a tokenizer it has no
    equivalent of), found once the model's config is final and before any step."""
    if cfg.gguf:
        try:
            gguf_export.check_exportable(mc, cfg.tokenizer or cfg.model)
        except UserError as e:
            raise UserError(f"--gguf {cfg.gguf}: {e}; nothing was trained") from None


def build_data(cfg: TrainConfig, d: Dist, tokenizer):
    """The global deterministic sample stream of --data, this dp group's shard (sample i -> group i % dp);
    the cp ranks of a group (rank = dp_rank * cp + cp_rank) read the same samples."""
    return data.build_mixture(cfg.data, tokenizer, cfg.ctx, template=cfg.chat_template, seed=cfg.seed,
                              rank=d.rank // cfg.cp, world_size=d.world // cfg.cp, truncate=cfg.truncate,
                              doc_mask=cfg.doc_mask)


def add_pose_positions(cfg: TrainConfig, batch: list[dict], step: int, d: Dist) -> list[dict]:
    """--pose: each sample gets PoSE positions (pose.py) drawn from (--seed, its index in the global stream),
    so resuming and the world size leave them unchanged. Data group g's j-th sample is global sample
    j * dp + g (build_data); its cp ranks draw the same positions, then shard them."""
    if cfg.pose is not None:
        dp, group = d.world // cfg.cp, d.rank // cfg.cp
        for i, b in enumerate(batch):
            index = (step * cfg.grad_accum + i) * dp + group
            b["positions"] = pose.pose_positions(b["input_ids"].numel(), cfg.pose, pose.sample_rng(cfg.seed, index))
    return batch


def total_steps(cfg: TrainConfig, tokenizer, d: Dist) -> int:
    """--steps, or --epochs passes over the data: one tokenizing pass counts its sequences."""
    if cfg.steps:
        return cfg.steps
    n = sum(sum(1 for _ in data.file_samples(p, tokenizer, cfg.ctx, cfg.chat_template, cfg.truncate))
            for p, _ in data.parse_data_spec(cfg.data))
    if n == 0:
        raise UserError(f"--data {cfg.data}: no training sequence of ctx {cfg.ctx} tokens could be built")
    return max(1, math.ceil(cfg.epochs * n / (cfg.grad_accum * d.world // cfg.cp)))


# ----------------------------------------------------------------------------- checkpoints and resume


def save_checkpoint(out: Path, step: int, net, opt, sched, mixture, cfg: TrainConfig, d: Dist):
    """Every rank: gather the data cursors and RNG states (ranks stand at different places of the global
    stream). Rank 0: write adapter + trainer state as `ckpt-STEP` (atomically), keep the newest --keep."""
    cursor = parallel.gather_objects(mixture.state_dict(), d)
    rngs = {kind: parallel.gather_tensors(s, d) for kind, s in train_state.rng_state(d).items()}
    with parallel_fsdp.whole(net, opt):  # --fsdp: the trained tensors whole on every rank
        if not d.main:
            return
        with atomic_path(out / f"{CKPT_PREFIX}{step:07d}", is_dir=True) as tmp:
            lora_peft.save_adapter(net, tmp / "adapter", base_model_path=cfg.model)
            save_file(train_state.optimizer_tensors(opt, trained_names(net)), str(tmp / "optimizer.safetensors"))
            save_file(train_state.rng_tensors(rngs), str(tmp / "rng.safetensors"))
            state = {"step": step, "scheduler": sched.state_dict(), "data_cursor": cursor, "config": cfg.to_dict()}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    for old in sorted(out.glob(CKPT_PREFIX + "*"))[:-cfg.keep]:
        shutil.rmtree(old)


def resume(cfg: TrainConfig, out: Path, net, opt, sched, mixture, d: Dist) -> int:
    """The step to start from: with --resume the newest checkpoint's (adapter, optimizer, schedule, data
    cursor and RNG restored), with --resume-from that checkpoint's, else 0; an --out holding another run's
    checkpoints is refused. The settings that may change (lr, schedule, steps, ...) are this run's from the
    resumed step on: lr = --lr x schedule(step) with this run's schedule and total."""
    ckpt = Path(cfg.resume_from) if cfg.resume_from else newest_checkpoint(out) if cfg.resume else None
    place = f"--resume-from {ckpt}" if cfg.resume_from else f"--out {out}"
    train_guards.check_same_files(d, [ckpt or newest_checkpoint(out)], place)  # every rank finds the same (multi-node)
    if cfg.resume_from is not None and not (ckpt / "trainer_state.json").is_file():
        raise UserError(f"--resume-from {cfg.resume_from}: not a checkpoint folder (no trainer_state.json)")
    if cfg.resume and ckpt is None:
        log0(d, f"--resume: no checkpoint in {out}; starting fresh")
    if ckpt is None:
        if out.exists() and newest_checkpoint(out) is not None:
            raise UserError(f"{out}: holds checkpoints of an earlier run; pass --resume or choose a new --out")
        return 0
    where = ckpt / "trainer_state.json"
    try:  # a hand-edited or damaged state names its file and field
        state = read_json(where, "")
        step = json_field(state, "step", where, int, lambda v: v >= 0, "an integer >= 0")
        saved, scheduler = (json_field(state, k, where, dict, what="an object") for k in ("config", "scheduler"))
        cursor = json_field(state, "data_cursor", where, list, lambda v: len(v) > d.rank and all(
            isinstance(c, dict) for c in v), "a list of one data cursor (an object) per process")
    except UserError as e:
        raise UserError(f"{e}{fallback_hint(ckpt)}") from None
    check_same_run(saved, cfg, ckpt)
    optimizer, rngs = read_tensors(ckpt / "optimizer.safetensors", ckpt), read_tensors(ckpt / "rng.safetensors", ckpt)
    try:
        lora_peft.load_adapter(net, ckpt / "adapter")
    except UserError as e:
        raise UserError(f"{e}{fallback_hint(ckpt)}") from None
    train_state.load_optimizer_tensors(opt, trained_names(net), optimizer)
    sched.load_state_dict(scheduler)
    sched.base_lrs = [cfg.lr for _ in opt.param_groups]  # this run's --lr, not the saved one
    sched._last_lr = [cfg.lr * f(step) for f in sched.lr_lambdas]
    for g, lr in zip(opt.param_groups, sched.get_last_lr()):
        g["lr"], g["initial_lr"] = lr, cfg.lr
    mixture.load_state_dict(cursor[d.rank], f"{where}: data_cursor[{d.rank}]")
    if f"rank{d.rank}" not in rngs:
        raise UserError(f"{ckpt / 'rng.safetensors'}: no RNG state for rank {d.rank}{fallback_hint(ckpt)}")
    train_state.set_rng_state(rngs, d)
    if cfg.resume_from is not None:  # a rollback: its branch becomes the one a later --resume continues
        train_guards.set_aside_later(out, step, d)
    changed = changed_settings(saved, cfg)
    log0(d, f"resumed from {ckpt} at step {step}" + (f"; changed: {', '.join(changed)}" if changed else ""))
    return step


def finish(cfg: TrainConfig, net, out: Path, d: Dist, step: int):
    """Rank 0: the adapter in OUT/adapter, with --merge the merged HF model in OUT/merged; both carry the
    tokenizer the run used (save_tokenizer), so eval.py and generate.py need no --tokenizer on them."""
    if not d.main:
        return
    final = out / "adapter"
    with atomic_path(final, is_dir=True) as tmp:
        lora_peft.save_adapter(net, tmp, base_model_path=cfg.model)
        save_tokenizer(tokenizer_source(cfg), tmp)
    msg = f"done: {step} steps; adapter in {final}"
    if cfg.merge:
        merged = out / "merged"
        with atomic_path(merged, is_dir=True) as tmp:  # --fsdp: a plain model holding the trained tensors
            plain = parallel_fsdp.plain(net, lambda: build_model(cfg, d, choose_dtype(cfg.dtype, d.device))[0])
            lora_peft.export_merged(plain, tmp, dtype=choose_dtype(cfg.dtype, d.device))
            save_tokenizer(tokenizer_source(cfg), tmp)
        msg += f"; merged model in {merged}"
        if cfg.gguf:
            gguf = gguf_export.export_gguf(merged, out / "merged.gguf", cfg.gguf, cfg.tokenizer or cfg.model)
            msg += f"; GGUF in {gguf}"
    print(msg, flush=True)


# ----------------------------------------------------------------------------- metrics and progress


class MetricsLog:
    """metrics.jsonl on rank 0; on resume, lines after the resumed step (never checkpointed) are dropped."""

    def __init__(self, path: Path, enabled: bool, step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            kept = []
            if path.exists() and step > 0:
                kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            atomic_write_text(path, "".join(l + "\n" for l in kept))

    def write(self, rec: dict):
        if self.enabled:
            append_line(self.path, json.dumps(rec))


class Progress:
    """The progress bar on rank 0 (stderr), its postfix refreshed every --log-every steps; a no-op elsewhere."""

    def __init__(self, d: Dist, total: int, step: int, every: int):
        self.bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr) if d.main else None
        self.total, self.every = total, every

    def update(self, rec: dict):
        if self.bar is not None:
            self.bar.update(1)
            if rec["step"] % self.every == 0 or rec["step"] == self.total:
                self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                     mem=memory_peak.memory_label(rec))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)


def offload(cfg: TrainConfig, d: Dist):
    """Saved activations to pinned CPU memory (CUDA only), as in Unsloth-style long-context training."""
    if cfg.offload and d.device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- training


def micro_inputs(cfg: TrainConfig, b: dict, attn_fn, d: Dist):
    """(tokens, labels, positions, attn_fn) of one sample for the forward, on the device. positions: the
    sample's own (--doc-mask, --pose, a --cp shard's true ones), else None (0..T-1). --doc-mask: attention
    within the documents the positions mark (doc_attn.py); S²-Attn (attn_fn not None) keeps the sequence's
    window G = group_size_for(T, --group-ratio), cut inside each document."""
    x, y = b["input_ids"][None].to(d.device), b["labels"][None].to(d.device)  # (1, T)
    pos = b.get("positions")
    if cfg.doc_mask and pos is not None:
        G = shift_attn.group_size_for(pos.numel(), cfg.group_ratio)
        attn_fn = doc_attn.document_attention(pos, None if attn_fn is None else shift_attn.make_attention(group_size=G))
    return x, y, None if pos is None else pos.to(d.device), attn_fn  # positions (T,)


def forward_backward(cfg: TrainConfig, d: Dist, ddp, batch: list[dict], n_sup: torch.Tensor, attn_fn) -> torch.Tensor:
    """The step's micro-steps: gradients accumulate d(sum NLL / N_sup); DDP syncs on the last one only.
    Returns this rank's NLL sum (float64)."""
    loss_sum = torch.zeros((), dtype=torch.float64)
    for i, b in enumerate(batch):
        x, y, pos, fn = micro_inputs(cfg, b, attn_fn, d)  # positions: --doc-mask, --pose, a --cp shard's
        with parallel_fsdp.accumulate(ddp, last=i == len(batch) - 1), offload(cfg, d), \
                attention_backends(cfg, d, getattr(ddp, "module", ddp)):  # backward too: it recomputes blocks
            nll = ddp(x, pos, attn_fn=fn, labels=y, loss_chunk=cfg.loss_chunk)
            (nll * (d.world / n_sup)).backward()  # DDP averages over ranks; undo it: sum / global count
        loss_sum += nll.detach().double().cpu()
    return loss_sum


def train(cfg: TrainConfig, d: Dist) -> int:
    """Fine-tune as `cfg` says, on every rank of `d`, holding --out (train_guards.own_run_folder); returns the last step."""
    if not str(cfg.model).endswith(".gguf"):  # before --out is touched or a weight loads (a GGUF's: in build_model)
        memory_plan.check_run(cfg, memory_plan.model_config(cfg.model), d.device)
    with train_guards.own_run_folder(cfg.out, d):
        return fit(cfg, d)


def fit(cfg: TrainConfig, d: Dist) -> int:
    """The run itself: setup, resume, the loop, the final checkpoint and outputs."""
    # setup: seed, tokenizer, model (RoPE change, LoRA), this rank's data, optimizer and schedule
    torch.manual_seed(cfg.seed)
    dtype = choose_dtype(cfg.dtype, d.device)
    cfg = dataclasses.replace(cfg, dtype=str(dtype).removeprefix("torch."))  # checkpoints record the dtype used
    out = Path(cfg.out)
    tokenizer = load_tokenizer(tokenizer_source(cfg))
    preflight(cfg, tokenizer)
    mesh = parallel.init_mesh(d, cfg.cp)
    net, summary = build_model(cfg, d, dtype)
    check_gguf(cfg, net.config)
    log0(d, json.dumps(cfg.to_dict(), indent=2))
    log0(d, "trainable:", json.dumps(summary))
    mixture = build_data(cfg, d, tokenizer)
    attn_fn, full_fn = attention_fn(cfg), None
    if mesh.cp > 1:
        attn_fn, full_fn = cp_attentions(cfg, mesh, net.config)
        log0(d, f"mesh: dp {mesh.dp} x cp {mesh.cp}; {cfg.ctx // mesh.cp} tokens of each sequence per rank")
    if cfg.pose is not None:
        log0(d, f"PoSE: each {cfg.ctx}-token window takes positions in 2 chunks, the second skipped by a random "
                f"offset, covering [0, {cfg.pose}); drawn from --seed and the sample's index")
    ddp = parallel_fsdp.wrap(net, mesh, d, cfg.fsdp)  # DDP, or --fsdp's shards (new Parameters: before the optimizer)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    total = total_steps(cfg, tokenizer, d)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_schedule(cfg, total))
    with parallel_fsdp.whole(net, opt):  # resume: the newest checkpoint's state with --resume (--fsdp: whole)
        step = resume(cfg, out, net, opt, sched, mixture, d)
    for layer in net.model.layers if cfg.compile else ():  # blocks compiled on request
        layer.compile()
    metrics = MetricsLog(out / "metrics.jsonl", d.main, step)
    net.train()
    stream = iter(mixture)
    # loop: one optimizer step = grad_accum micro-steps on every rank
    watch = train_guards.GradWatch(d)
    with Progress(d, total, step, cfg.log_every) as bar, train_guards.Interrupts(d) as stop:
        t0, tokens_seen = time.perf_counter(), 0
        sparse_steps = total - round(cfg.full_attn_tail * total)  # S²-Attn (if chosen) before, full attention after
        while step < total:
            batch = shard_batch(add_pose_positions(cfg, [next(stream) for _ in range(cfg.grad_accum)], step, d),
                                mesh, d)
            n_sup = parallel.all_reduce_sum(torch.tensor(float(sum(int((b["labels"] != -100).sum()) for b in batch))), d)
            if n_sup.item() == 0:
                raise UserError(f"step {step}: no supervised tokens in this step's data (all labels are -100)")
            loss_sum = forward_backward(cfg, d, ddp, batch, n_sup, attn_fn if step < sparse_steps else full_fn)
            tokens_seen += sum(b["input_ids"].numel() for b in batch)
            loss = parallel.all_reduce_sum(loss_sum, d).item() / n_sup.item()
            if not math.isfinite(loss):
                last = newest_checkpoint(out)
                raise UserError(f"step {step + 1}: loss is {loss}; stopping. Last good checkpoint: {last or 'none'}")
            gnorm = parallel_fsdp.clip_grad_norm(params, cfg.clip)
            watch.check(step + 1, gnorm, lambda: newest_checkpoint(out))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            rec = {"step": step, "loss": loss, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
                   "tokens_per_s": tokens_seen * d.world / (time.perf_counter() - t0), **memory_peak.peak_memory(d.device)}
            metrics.write(rec)
            bar.update(rec)
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                save_checkpoint(out, step, net, opt, sched, mixture, cfg, d)
            if stop.requested() and step < total:  # SIGINT/SIGTERM: this step is done; keep it and stop
                save_checkpoint(out, step, net, opt, sched, mixture, cfg, d)
                raise UserError(stop.message(out / f"{CKPT_PREFIX}{step:07d}", step))
        # save: the last checkpoint, then the adapter (and merged model); a signal now stops at once
        save_checkpoint(out, step, net, opt, sched, mixture, cfg, d)
        with stop.at_once(out / f"{CKPT_PREFIX}{step:07d}"), parallel_fsdp.whole(net):
            finish(cfg, net, out, d, step)
    return step


# ----------------------------------------------------------------------------- entry point


def suggest_base_for_model(spec: str | None, target_len: int) -> float:
    """--suggest-base: the dynamic-NTK base for training --model at `target_len` (rope.suggest_base)."""
    if spec is None:
        raise UserError("--suggest-base needs --model (a HF directory or a preset) to read its RoPE base and length")
    if target_len < 1:
        raise UserError(f"--suggest-base must be a length >= 1, got {target_len}")
    mc = memory_plan.model_config(spec)
    return rope.suggest_base(mc.rope_theta, mc.max_seq_len, target_len, mc.head_dim)


def parse_flags(argv: list[str] | None) -> tuple[dict, dict]:
    """train.py's command line -> (the TrainConfig fields given, the command's own options: recipe,
    dry_run, suggest_base, force). The drivers (demo.py, demo_smollm2.py) parse the same line."""
    given = vars(train_config.build_parser(__doc__.split("\n")[0]).parse_args(argv))
    return given, {k: given.pop(k, None) for k in ("recipe", "dry_run", "suggest_base", "force")}


def run_ranks(body: Callable[[Dist], object], given: dict) -> int:
    """A command's body on every rank of torchrun's process group (or one process): its exit code, with one
    error line a node (errors.run_cli)."""
    d = None

    def start():
        nonlocal d
        d = parallel.init_distributed(given.get("nccl_timeout"))
        body(d)

    try:
        # under torchrun one process a node prints errors (each node's log says why it stopped)
        return run_cli(start, quiet=int(os.environ.get("LOCAL_RANK", "0")) > 0)
    finally:
        parallel.destroy(d)


def hand_over(driver: str, argv: list[str] | None) -> int:
    """Run the driver script on the same command line. As a command this process becomes it (os.execv:
    same process id, streams and torchrun environment), so the trainer never imports its drivers; an
    in-process caller (argv given) gets it as a child process and its exit code."""
    script = str(Path(__file__).resolve().with_name(DRIVERS[driver]))
    if argv is None:
        sys.stdout.flush(), sys.stderr.flush()
        interpreter_flags = sys.orig_argv[1:sys.orig_argv.index(sys.argv[0])] if sys.argv[0] in sys.orig_argv else []
        os.execv(sys.executable, [sys.executable, *interpreter_flags, script, *sys.argv[1:]])
    return subprocess.call([sys.executable, script, *argv])


def plan_only(given: dict, opts: dict) -> None:
    """--suggest-base prints a base; --dry-run applies every check of a run that loads no weights, then
    prints the memory plan."""
    if opts["suggest_base"] is not None:
        print(f"{suggest_base_for_model(given.get('model'), opts['suggest_base']):.4g}")
        return
    cfg = train_config.resolve(given, opts["recipe"], dry_run=True)
    preflight(cfg, load_tokenizer(tokenizer_source(cfg)))
    train_guards.check_run_folder(Path(cfg.out))
    memory_plan.dry_run(cfg)


def check_command(given: dict, opts: dict) -> None:
    """What the command line's flags say of each other, before anything runs."""
    no_model, beyond_demo = given.get("model") is None, (given.get("ctx") or 0) > train_config.DEMO_MAX_CTX
    if opts["force"] and not (no_model and beyond_demo):
        raise UserError(f"--force applies to the real-model extension only (no --model, --ctx above "
                        f"{train_config.DEMO_MAX_CTX})")
    if no_model and given.get("data") is not None and not opts["dry_run"] and opts["suggest_base"] is None:
        raise UserError("--data needs --model (without --model, train.py runs the built-in demo)")


def main(argv=None):
    given, opts = parse_flags(argv)
    code = run_cli(lambda: check_command(given, opts))
    if code:
        sys.exit(code)
    if opts["dry_run"] or opts["suggest_base"] is not None:
        code = run_cli(lambda: plan_only(given, opts))
    elif given.get("model") is None:  # the built-in demo, or beyond its length the SmolLM2 extension
        code = hand_over("extend" if (given.get("ctx") or 0) > train_config.DEMO_MAX_CTX else "demo", argv)
    else:
        code = run_ranks(lambda d: train(train_config.resolve(given, opts["recipe"], d.world), d), given)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
