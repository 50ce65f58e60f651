"""Long-context fine-tuning of a Llama-family model: QLoRA + RoPE extension + S²-Attn, one GPU or many.

Launch:
    python train.py --model tiny --data notes.txt --ctx 2048 --steps 20 --out runs/tiny      # CPU, 1 process
    torchrun --nproc_per_node 2 train.py --model tiny --data src/ --ctx 80000 --steps 2 --out runs/80k
    torchrun --nproc_per_node 8 train.py --recipe llama3-80k --model /ckpt/Meta-Llama-3-8B-Instruct \\
        --data long.jsonl:0.15,short.jsonl:0.85 --ctx 81920 --out runs/llama3-80k
    python train.py --dry-run --model llama-3-8b --ctx 80000 --recipe llama3-80k --nproc 8   # memory plan only

Recipes (`--recipe`, explicit flags override them):
    llama3-80k  Zhang et al. 2024, "Extending Llama-3's Context Ten-Fold Overnight": NF4 + LoRA r=32 alpha=16
                on q,k,v,o + trained embedding, RoPE base 500K -> 200M, lr 5e-5, one epoch, full attention.
    longqlora   Yang 2023, "LongQLoRA": NF4 + LoRA r=64 alpha=16 dropout 0.05 on all linear layers, Position
                Interpolation (factor ctx / original), S²-Attn, lr 2e-4, 1000 steps, grad-accum 16, clip 0.3.
    longlora    Chen et al. 2023, "LongLoRA": LoRA r=8 on q,k,v,o + trained embeddings and norms, PI, S²-Attn,
                lr 2e-5, 1000 steps, 20 warmup steps.

One optimizer step = grad_accum micro-steps on every rank, each micro-step one sequence of up to ctx tokens.
The loss is the sum of token NLLs divided by the number of supervised tokens of the whole step (all
micro-steps, all ranks), so 2 ranks x accum 1 and 1 rank x accum 2 take the same step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import rope

CKPT_PREFIX = "ckpt-"
IDENTITY = ("model", "ctx", "quant", "lora_r", "lora_alpha", "lora_targets", "train", "rope", "rope_theta",
            "attn", "group_ratio", "full_attn_tail", "data", "seed", "grad_accum", "dtype", "world_size", "rslora")

RECIPES: dict[str, dict] = {
    "llama3-80k": dict(quant="nf4", lora_r=32, lora_alpha=16.0, lora_dropout=0.0, lora_targets="q_proj,k_proj,v_proj,o_proj",
                       train="embed", rope_theta=2e8, attn="full", lr=5e-5, epochs=1, schedule="linear", warmup=20),
    "longqlora": dict(quant="nf4", lora_r=64, lora_alpha=16.0, lora_dropout=0.05, lora_targets="all-linear", train="",
                      rope="linear:auto", attn="s2", group_ratio=0.25, lr=2e-4, steps=1000, grad_accum=16, clip=0.3,
                      schedule="constant", warmup=20),
    "longlora": dict(quant="none", lora_r=8, lora_alpha=16.0, lora_dropout=0.0, lora_targets="q_proj,k_proj,v_proj,o_proj",
                     train="embed,norm", rope="linear:auto", attn="s2", group_ratio=0.25, lr=2e-5, steps=1000,
                     schedule="constant", warmup=20),
}

DEFAULTS = dict(model=None, data=None, ctx=None, quant="none", dtype=None, lora_r=8, lora_alpha=16.0, lora_dropout=0.0,
                lora_targets="q_proj,k_proj,v_proj,o_proj", train="", rslora=False, rope=None, rope_theta=None,
                attn="full", group_ratio=0.25, full_attn_tail=0.0, lr=2e-4, warmup=0, schedule="cosine", weight_decay=0.0, clip=1.0,
                steps=None, epochs=None, grad_accum=1, seed=0, compile=False, checkpointing=True, offload=False,
                loss_chunk=1024, mlp_chunk=0, save_attention=False, out="runs/train", save_every=0, keep=2, resume=False, merge=False, tokenizer=None,
                chat_template=None, truncate=False, nproc=None, log_every=1)


class UserError(Exception):
    """A mistake in the command line, data or files: reported as one line, exit code 1."""


# ----------------------------------------------------------------------------- configuration


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS  # every flag defaults to "not given", so recipes can fill what the user left out
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=S, help="fill the flags from a paper's recipe")
    ap.add_argument("--model", default=S, help="HF directory, .gguf file or preset name (tiny, llama-3-8b, ...)")
    ap.add_argument("--tokenizer", default=S, help="tokenizer path (default: the model's; 'bytes' for byte level)")
    ap.add_argument("--data", default=S, help="file[:weight],file[:weight] (JSONL text/chat, .txt, directories)")
    ap.add_argument("--chat-template", default=S, help="llama-3, llama-2, chatml (default: from the tokenizer)")
    ap.add_argument("--truncate", action="store_true", default=S, help="truncate chat samples longer than ctx (default: drop)")
    ap.add_argument("--ctx", type=int, default=S, help="training sequence length in tokens")
    ap.add_argument("--quant", choices=["nf4", "none"], default=S, help="store frozen linear weights in NF4")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=S,
                    help="base weight/compute dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--lora-r", type=int, default=S)
    ap.add_argument("--lora-alpha", type=float, default=S)
    ap.add_argument("--lora-dropout", type=float, default=S)
    ap.add_argument("--lora-targets", default=S, help="comma list of projections, or all-linear")
    ap.add_argument("--rslora", action="store_true", default=S, help="scale alpha/sqrt(r) (rsLoRA)")
    ap.add_argument("--train", default=S, help="extra full parameters to train: embed,norm,lm_head")
    ap.add_argument("--attn", choices=["full", "s2"], default=S, help="attention while training (eval is always full)")
    ap.add_argument("--group-ratio", type=float, default=S, help="S²-Attn group size as a fraction of ctx")
    ap.add_argument("--full-attn-tail", type=float, default=S,
                    help="with --attn s2: train this fraction of the steps, the last ones, with full attention")
    ap.add_argument("--lr", type=float, default=S)
    ap.add_argument("--warmup", type=int, default=S, help="linear warmup steps")
    ap.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=S)
    ap.add_argument("--weight-decay", type=float, default=S)
    ap.add_argument("--clip", type=float, default=S, help="gradient-norm clip (0: off)")
    ap.add_argument("--steps", type=int, default=S, help="optimizer steps")
    ap.add_argument("--epochs", type=float, default=S, help="passes over the data (instead of --steps)")
    ap.add_argument("--grad-accum", type=int, default=S, help="micro-steps per optimizer step")
    ap.add_argument("--seed", type=int, default=S)
    ap.add_argument("--compile", action="store_true", default=S, help="torch.compile each block")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", default=S,
                    help="keep all activations instead of recomputing each block")
    ap.add_argument("--offload", action="store_true", default=S, help="offload checkpointed activations to CPU (CUDA)")
    ap.add_argument("--loss-chunk", type=int, default=S, help="tokens per float32 logits chunk in the loss")
    ap.add_argument("--mlp-chunk", type=int, default=S,
                    help="compute each MLP over this many tokens at a time, recomputed in backward (0: off)")
    ap.add_argument("--save-attention", action="store_true", default=S,
                    help="keep attention outputs through checkpointing: no attention recompute, +T x H x D per layer")
    ap.add_argument("--out", default=S, help="output directory: checkpoints, metrics.jsonl, adapter, merged model")
    ap.add_argument("--save-every", type=int, default=S, help="checkpoint every N steps (0: only at the end)")
    ap.add_argument("--keep", type=int, default=S, help="checkpoints to keep")
    ap.add_argument("--resume", action="store_true", default=S, help="continue from the newest checkpoint in --out")
    ap.add_argument("--merge", action="store_true", default=S, help="also write a merged HF model to OUT/merged")
    ap.add_argument("--log-every", type=int, default=S, help="refresh the progress line every N steps (metrics.jsonl gets every step)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and memory plan; load nothing")
    ap.add_argument("--nproc", type=int, default=S, help="world size assumed by --dry-run")
    rope.add_rope_args(ap)
    return ap


def resolve_config(args: argparse.Namespace, world_size: int) -> dict:
    """Defaults, then the recipe, then explicit flags. Returns a plain dict (saved with checkpoints)."""
    given = {k: v for k, v in vars(args).items() if k not in ("dry_run", "suggest_base", "recipe")}
    recipe = getattr(args, "recipe", None)
    cfg = {**DEFAULTS, **(RECIPES[recipe] if recipe else {}), **{k: v for k, v in given.items() if v is not None}}
    cfg["recipe"] = recipe
    cfg["world_size"] = world_size if not args.dry_run else (cfg["nproc"] or 1)
    if cfg["model"] is None:
        raise UserError("--model is required (a HF directory, a .gguf file or a preset such as tiny)")
    if cfg["ctx"] is None or cfg["ctx"] < 2:
        raise UserError(f"--ctx must be an integer >= 2, got {cfg['ctx']}")
    if "steps" in given and "epochs" in given:
        raise UserError("--steps and --epochs conflict: give one")
    if "steps" in given:
        cfg["epochs"] = None
    if "epochs" in given:
        cfg["steps"] = None
    if cfg["steps"] is None and cfg["epochs"] is None:
        cfg["steps"] = 100
    for key in ("lora_r", "grad_accum", "loss_chunk", "keep", "log_every"):
        if cfg[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    for key in ("mlp_chunk", "save_every"):
        if cfg[key] < 0:
            raise UserError(f"--{key.replace('_', '-')} must be >= 0 (0: off), got {cfg[key]}")
    if cfg["epochs"] is not None and cfg["epochs"] <= 0:
        raise UserError(f"--epochs must be > 0, got {cfg['epochs']}")
    if cfg["nproc"] is not None and cfg["nproc"] < 1:
        raise UserError(f"--nproc must be >= 1, got {cfg['nproc']}")
    if cfg["steps"] is not None and cfg["steps"] < 1:
        raise UserError(f"--steps must be >= 1, got {cfg['steps']}")
    if not 0.0 <= cfg["full_attn_tail"] < 1.0:
        raise UserError(f"--full-attn-tail must be in [0, 1), got {cfg['full_attn_tail']}")
    if cfg["full_attn_tail"] and cfg["attn"] != "s2":
        raise UserError("--full-attn-tail only applies with --attn s2")
    if not 0.0 < cfg["group_ratio"] <= 1.0:
        raise UserError(f"--group-ratio must be in (0, 1], got {cfg['group_ratio']}")
    if cfg["data"] is None and not args.dry_run:
        raise UserError("--data is required (e.g. --data long.jsonl:0.6,short.jsonl:0.4)")
    return cfg


def choose_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE) or a single process; NCCL for CUDA tensors,
    gloo for CPU ones."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        # NCCL takes CUDA tensors only; the step's token counts, data cursors and RNG states are CPU tensors
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local, world, device)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(x)
    return x


def log0(d: Dist, *msg):
    if d.main:
        print(*msg, flush=True)


# ----------------------------------------------------------------------------- model


def build_model(cfg: dict, d: Dist, dtype: torch.dtype):
    """Load (quantizing on the fly with --quant nf4), set RoPE, apply LoRA. Returns (model, lora summary)."""
    import model as M

    spec = cfg["model"]
    if spec in M.PRESETS:
        net = M.load_model(spec, dtype=dtype, device=d.device, seed=cfg["seed"])
        if cfg["quant"] == "nf4":
            import quant4
            quant4.quantize_model(net, skip=("lm_head",))
    else:
        if not Path(spec).exists():
            raise UserError(f"--model {spec}: no such directory, file or preset ({', '.join(M.PRESETS)})")
        if cfg["quant"] == "nf4":
            import quant4
            mcfg, tensors = M.read_checkpoint(spec)
            with torch.device("meta"):
                net = M.Transformer(mcfg)
            quant4.load_quantized(net, ((n, t) for n, t, _ in tensors), skip=("lm_head",), dtype=dtype, device=d.device)
        else:
            net = M.Transformer.from_pretrained(spec, dtype=dtype, device=d.device)
    mc = net.config
    theta, scaling = rope.resolve_rope(_rope_args(cfg, mc), mc.rope_theta, mc.rope_scaling, mc.max_seq_len)
    mc.rope_theta, mc.rope_scaling = theta, scaling
    summary = apply_lora(net, cfg)
    net.to(d.device)
    net.checkpointing = cfg["checkpointing"]
    net.mlp_chunk = cfg["mlp_chunk"]
    net.save_attention = cfg["save_attention"]
    return net, summary


def apply_lora(net, cfg: dict) -> dict:
    """LoRA and the extra trained parameters named by the resolved config (lora.apply_lora's summary)."""
    import lora

    targets = cfg["lora_targets"] if cfg["lora_targets"] == "all-linear" else tuple(cfg["lora_targets"].split(","))
    return lora.apply_lora(net, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"], targets=targets,
                           trainable=tuple(t for t in cfg["train"].split(",") if t), rslora=cfg["rslora"],
                           seed=cfg["seed"])


def _rope_args(cfg: dict, mc) -> argparse.Namespace:
    """`--rope linear:auto` (the recipes) means PI by ctx / original length."""
    spec = cfg["rope"]
    if spec and spec.endswith(":auto"):
        spec = f"{spec.split(':')[0]}:{max(1.0, cfg['ctx'] / mc.max_seq_len):g}"
    return argparse.Namespace(rope=spec, rope_theta=cfg["rope_theta"])


def attention_fn(cfg: dict):
    if cfg["attn"] == "s2":
        import shift_attn
        return shift_attn.make_attention(group_ratio=cfg["group_ratio"])
    return None


def make_schedule(cfg: dict, total_steps: int):
    """lr multiplier: linear warmup, then cosine/linear decay to 0 or constant."""
    warm = cfg["warmup"]

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg["schedule"] == "constant":
            return 1.0
        p = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * p)) if cfg["schedule"] == "cosine" else 1.0 - p
    return f


# ----------------------------------------------------------------------------- data


def build_data(cfg: dict, d: Dist, tokenizer):
    """The global deterministic sample stream of `cfg['data']`, this rank's shard (sample i -> rank i % world)."""
    import data as D

    try:
        return D.build_mixture(cfg["data"], tokenizer, cfg["ctx"], template=cfg["chat_template"], seed=cfg["seed"],
                               rank=d.rank, world_size=d.world, truncate=cfg["truncate"])
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


def epoch_sequences(cfg: dict, tokenizer) -> int:
    """Sequences in one pass over every source (for --epochs): one tokenizing pass over the data."""
    import data as D

    n = sum(sum(1 for _ in D.file_samples(p, tokenizer, cfg["ctx"], cfg["chat_template"], cfg["truncate"]))
            for p, _ in D.parse_data_spec(cfg["data"]))
    if n == 0:
        raise UserError(f"--data {cfg['data']}: no training sequence of ctx {cfg['ctx']} tokens could be built")
    return n


def gather_cursor(mixture, d: Dist) -> list[dict]:
    """Every rank's data cursor (ranks stand at different places of the global stream)."""
    mine = mixture.state_dict()
    if d.world == 1:
        return [mine]
    out = [None] * d.world
    dist.all_gather_object(out, mine)
    return out


def load_tok(cfg: dict):
    import data as D
    import model as M

    spec = cfg["tokenizer"] or cfg["model"]
    if spec in M.PRESETS:
        spec = "bytes"
    try:
        tok = D.load_tokenizer(spec)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"tokenizer: {e}") from None
    return tok


# ----------------------------------------------------------------------------- checkpoints


def rng_state(d: Dist) -> torch.Tensor:
    """This rank's torch CPU (and CUDA) RNG state as one uint8 tensor."""
    s = [torch.get_rng_state()]
    if d.device.type == "cuda":
        s.append(torch.cuda.get_rng_state(d.device))
    return torch.cat(s)


def set_rng_state(state: torch.Tensor, d: Dist):
    n = torch.get_rng_state().numel()
    torch.set_rng_state(state[:n].clone())
    if d.device.type == "cuda":
        torch.cuda.set_rng_state(state[n:].clone(), d.device)


def gather_rng(d: Dist) -> list[torch.Tensor]:
    mine = rng_state(d)
    if d.world == 1:
        return [mine]
    out = [torch.empty_like(mine) for _ in range(d.world)]
    dist.all_gather(out, mine)
    return out


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict) -> dict[str, torch.Tensor]:
    """AdamW state as named tensors (safetensors holds tensors only; no pickle)."""
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"{names[p]}::{k}"] = v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, names: dict, tensors: dict):
    by_name = {n: p for p, n in names.items()}
    for key, v in tensors.items():
        name, _, field = key.partition("::")
        if name not in by_name:
            raise UserError(f"checkpoint optimizer state names {name!r}, which this model does not train")
        p = by_name[name]
        opt.state[p][field] = v.to(p.device) if field != "step" else v
    return opt


def save_checkpoint(out: Path, step: int, net, opt, sched: dict, cursor: list[dict], rngs, cfg: dict, d: Dist, keep: int):
    """Rank 0 writes adapter + trainer state into a temporary directory, then renames it `ckpt-STEP`."""
    import lora
    from safetensors.torch import save_file

    if not d.main:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=out))
    lora.save_adapter(net, tmp / "adapter", base_model_path=cfg["model"])
    names = {p: n for n, p in net.named_parameters() if p.requires_grad}
    save_file(optimizer_tensors(opt, names), str(tmp / "optimizer.safetensors"))
    save_file({f"rank{i}": r for i, r in enumerate(rngs)}, str(tmp / "rng.safetensors"))
    state = {"step": step, "scheduler": sched, "data_cursor": cursor, "config": cfg}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    final = out / f"{CKPT_PREFIX}{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(out.glob(CKPT_PREFIX + "*"))[:-keep]:
        shutil.rmtree(old)


def newest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (temporary `.tmp-*` directories are never picked)."""
    done = [p for p in sorted(out.glob(CKPT_PREFIX + "*")) if (p / "trainer_state.json").is_file()]
    return done[-1] if done else None


def check_same_run(saved: dict, cfg: dict, where: Path):
    for k in IDENTITY:
        if saved.get(k, DEFAULTS.get(k)) != cfg.get(k):
            raise UserError(f"{where}: checkpoint was trained with {k}={saved.get(k)!r}, this run has {cfg.get(k)!r}; "
                            "use a new --out or the same flags")


# ----------------------------------------------------------------------------- memory plan


WORKSPACE = {"cpu": 100 * 2**20,  # measured: a step at T = 16 of the bench config grows RSS by 98 MiB (102 bf16)
             "cuda": 2**30}  # estimate, not measured here: CUDA context, cuBLAS and allocator slack


def memory_plan(cfg: dict, mcfg, dtype_bytes: int, trainable: int, device: str = "cuda") -> dict[str, float]:
    """Bytes per device for one training step (the README's memory model; bench/bench_train.py checks it).

    Held through the step: weights (NF4 linears at 4.127 bits, see quant4.bits_per_parameter; embeddings,
    norms and an untied head in the base dtype), trained parameters in float32 with their gradients and two
    AdamW moments, and one (T, C) checkpoint per block. On top, the larger of two transient phases:
    - the loss: one chunk's float32 logits, turned into the softmax-gradient in place (model.py's
      `_FrozenHeadNLL`), plus their copy in the model dtype when that is not float32 (chunk x V x
      (4 + 2) bytes in bf16), beside the last block's output, the final norm's input and output and
      the stored gradient of the hidden states (4 x T x C);
    - the backward of one block: its recomputed activations and their gradients, T x (4 C + (H + 2 Hkv) D
      + 6 F) values; with --mlp-chunk c < T the MLP keeps c x 6 F of them and T x 8 C more instead
      (the chunks' outputs, the gradients assembled from them). The coefficients were measured
      (bench/bench_train.py, MALLOC_MMAP_THRESHOLD_=65536 so RSS follows live memory) by varying T, C
      and F (the chunked term at C = 512, F = 1408 only); the MLP's gate/up/activation/product and their
      gradients dominate without chunking.
    """
    T, C, F, L, V = cfg["ctx"], mcfg.dim, mcfg.ffn_dim, mcfg.n_layers, mcfg.vocab_size
    H, Hkv, D = mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim
    linear = L * (C * H * D + 2 * C * Hkv * D + H * D * C + 3 * C * F)
    embed = V * C * (1 if mcfg.tie_embeddings else 2)
    weight_bits = 4.127 if cfg["quant"] == "nf4" else dtype_bytes * 8
    chunk = cfg["mlp_chunk"]
    if chunk and chunk < T:
        block = (T * (8 * C + (H + 2 * Hkv) * D) + chunk * 6 * F) * dtype_bytes
    else:
        block = T * (4 * C + (H + 2 * Hkv) * D + 6 * F) * dtype_bytes
    held = {
        "weights": linear * weight_bits / 8 + (embed + L * 2 * C + C) * dtype_bytes,
        "trained params (fp32)": trainable * 4,
        "gradients (fp32)": trainable * 4,
        "AdamW moments (fp32)": trainable * 8,
        "block checkpoints": L * T * C * dtype_bytes if cfg["checkpointing"] and not cfg["offload"] else 0,
        "saved attention outputs": L * T * H * (D * dtype_bytes + 4) if cfg["checkpointing"] and cfg["save_attention"] else 0,
        f"runtime workspace ({device})": WORKSPACE[device],
    }
    transient = {  # phases that do not overlap: only the larger counts
        "one block's backward": block if cfg["checkpointing"] else block * L,
        "loss (chunk x V logits + 4 T x C)": min(T, cfg["loss_chunk"]) * V * (4 + (dtype_bytes if dtype_bytes < 4 else 0))
                                              + 4 * T * C * dtype_bytes,
    }
    return {**held, **transient, "total": sum(held.values()) + max(transient.values())}


def dry_run(cfg: dict):
    import model as M

    mcfg = M.ModelConfig.from_name(cfg["model"]) if cfg["model"] in M.PRESETS else M.ModelConfig.from_hf(cfg["model"])
    dtype = choose_dtype(cfg["dtype"], torch.device("cuda"))  # the plan is for a GPU run unless --dtype says
    with torch.device("meta"):
        net = M.Transformer(mcfg)
        summary = apply_lora(net, cfg)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    plan = memory_plan(cfg, mcfg, torch.finfo(dtype).bits // 8, trainable)
    print(json.dumps(cfg, indent=2))
    print(f"\nmemory plan per device ({cfg['world_size']} device(s), ctx {cfg['ctx']}, {dtype}):")
    for k, v in plan.items():
        print(f"  {k:34s} {v / 2**30:9.2f} GiB")
    return plan, summary


# ----------------------------------------------------------------------------- training


def train(cfg: dict, d: Dist):
    torch.manual_seed(cfg["seed"])
    dtype = choose_dtype(cfg["dtype"], d.device)
    out = Path(cfg["out"])
    tokenizer = load_tok(cfg)
    net, summary = build_model(cfg, d, dtype)
    log0(d, json.dumps(cfg, indent=2))
    log0(d, "trainable:", json.dumps(summary))
    mixture = build_data(cfg, d, tokenizer)
    attn_fn = attention_fn(cfg)
    params = [p for p in net.parameters() if p.requires_grad]
    names = {p: n for n, p in net.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    total = cfg["steps"] or max(1, math.ceil(cfg["epochs"] * epoch_sequences(cfg, tokenizer) / (cfg["grad_accum"] * d.world)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_schedule(cfg, total))
    step = 0
    ckpt = newest_checkpoint(out) if cfg["resume"] else None
    if cfg["resume"] and ckpt is None:
        log0(d, f"--resume: no checkpoint in {out}; starting fresh")
    if ckpt is not None:
        step = resume_from(ckpt, cfg, net, opt, sched, mixture, names, d)
        log0(d, f"resumed from {ckpt} at step {step}")
    elif out.exists() and newest_checkpoint(out) is not None:
        raise UserError(f"{out}: holds checkpoints of an earlier run; pass --resume or choose a new --out")
    ddp = net
    if d.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[d.device] if d.device.type == "cuda" else None,
                                                        broadcast_buffers=False)
    if cfg["compile"]:
        for layer in net.model.layers:
            layer.compile()
    metrics = MetricsLog(out / "metrics.jsonl", d.main, step)
    net.train()
    stream = iter(mixture)
    with _progress(d, total, step) as bar:
        step = _loop(cfg, d, net, ddp, opt, sched, params, mixture, stream, attn_fn, metrics, bar, out, step, total)
    finish(cfg, net, out, d, step)


def _loop(cfg, d: Dist, net, ddp, opt, sched, params, mixture, stream, attn_fn, metrics, bar, out: Path, step: int,
          total: int) -> int:
    """Optimizer steps from `step` to `total`; checkpoints every --save-every and at the end."""
    t0, tokens_seen = time.perf_counter(), 0
    sparse_steps = total - round(cfg["full_attn_tail"] * total)  # S²-Attn (if chosen) before, full attention after
    while step < total:
        batch = [next(stream) for _ in range(cfg["grad_accum"])]
        n_sup = all_reduce_sum(torch.tensor(float(sum(int((b["labels"] != -100).sum()) for b in batch))), d)
        if n_sup.item() == 0:
            raise UserError(f"step {step}: no supervised tokens in this step's data (all labels are -100)")
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, b in enumerate(batch):
            x, y = b["input_ids"][None].to(d.device), b["labels"][None].to(d.device)
            sync = i == len(batch) - 1 or d.world == 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()), _offload(cfg, d):
                nll = ddp(x, attn_fn=attn_fn if step < sparse_steps else None, labels=y, loss_chunk=cfg["loss_chunk"])
                (nll * (d.world / n_sup)).backward()  # DDP averages over ranks; undo it: sum / global count
            loss_sum += nll.detach().double().cpu()
            tokens_seen += x.numel()
        loss = all_reduce_sum(loss_sum, d).item() / n_sup.item()
        if not math.isfinite(loss):
            last = newest_checkpoint(out)
            raise UserError(f"step {step + 1}: loss is {loss}; stopping. Last good checkpoint: {last or 'none'}")
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg["clip"] if cfg["clip"] > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        rate = tokens_seen * d.world / (time.perf_counter() - t0)
        rec = {"step": step, "loss": loss, "lr": sched.get_last_lr()[0], "grad_norm": float(gnorm),
               "tokens_per_s": rate, "peak_mem_gb": peak_memory_gb(d)}
        metrics.write(rec)
        if d.main:
            bar.update(1)
            if step % cfg["log_every"] == 0 or step == total:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rate:.0f}", mem=f"{rec['peak_mem_gb']:.2f}G")
        if cfg["save_every"] and step % cfg["save_every"] == 0 and step < total:
            save_checkpoint(out, step, net, opt, sched.state_dict(), gather_cursor(mixture, d), gather_rng(d), cfg, d, cfg["keep"])
    save_checkpoint(out, step, net, opt, sched.state_dict(), gather_cursor(mixture, d), gather_rng(d), cfg, d, cfg["keep"])
    return step


def resume_from(ckpt: Path, cfg, net, opt, sched, mixture, names, d: Dist) -> int:
    import lora
    from safetensors.torch import load_file

    state = json.loads((ckpt / "trainer_state.json").read_text())
    check_same_run(state["config"], cfg, ckpt)
    lora.load_adapter(net, ckpt / "adapter")
    load_optimizer_tensors(opt, names, load_file(str(ckpt / "optimizer.safetensors")))
    sched.load_state_dict(state["scheduler"])
    for g, lr in zip(opt.param_groups, sched.get_last_lr()):
        g["lr"] = lr
    mixture.load_state_dict(state["data_cursor"][d.rank])
    set_rng_state(load_file(str(ckpt / "rng.safetensors"))[f"rank{d.rank}"], d)
    return state["step"]


def finish(cfg, net, out: Path, d: Dist, step: int):
    import lora

    if d.main:
        final = out / "adapter"
        if final.exists():
            shutil.rmtree(final)
        lora.save_adapter(net, final, base_model_path=cfg["model"])
        msg = f"done: {step} steps; adapter in {final}"
        if cfg["merge"]:
            merged = out / "merged"
            if merged.exists():
                shutil.rmtree(merged)
            lora.export_merged(net, merged, dtype=choose_dtype(cfg["dtype"], d.device))
            msg += f"; merged model in {merged}"
        print(msg, flush=True)


class MetricsLog:
    """metrics.jsonl on rank 0; on resume, lines after the resumed step (never checkpointed) are dropped."""

    def __init__(self, path: Path, enabled: bool, step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if path.exists() and step > 0:
                kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            os.replace(tmp, path)

    def write(self, rec: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def peak_memory_gb(d: Dist) -> float:
    if d.device.type == "cuda":
        return torch.cuda.max_memory_allocated(d.device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _progress(d: Dist, total: int, step: int):
    if not d.main:
        return contextlib.nullcontext()
    from tqdm import tqdm
    return tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)


def _offload(cfg, d: Dist):
    """Saved activations to pinned CPU memory (CUDA only), as in Unsloth-style long-context training."""
    if cfg["offload"] and d.device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- entry point


def main(argv=None):
    args = build_parser().parse_args(argv)
    d = None
    try:
        if args.suggest_base is not None:
            import model as M
            mc = M.ModelConfig.from_name(args.model) if getattr(args, "model", None) in M.PRESETS else \
                M.ModelConfig.from_hf(args.model)
            print(f"{rope.suggest_base(mc.rope_theta, mc.max_seq_len, args.suggest_base, mc.head_dim):.4g}")
            return
        if args.dry_run:
            dry_run(resolve_config(args, 1))
            return
        d = init_distributed()
        if getattr(args, "model", None) is None:  # no model given: the built-in demo (demo.py)
            if getattr(args, "data", None) is not None:
                raise UserError("--data needs --model (without --model, train.py runs the built-in demo)")
            import demo
            demo.run(d, {k: v for k, v in vars(args).items() if k not in ("dry_run", "suggest_base", "recipe")})
            return
        cfg = resolve_config(args, d.world)
        train(cfg, d)
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if d is not None and d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
