"""Training configuration: one dataclass whose fields carry their help text, the paper recipes as partial
overrides of it, the command line built from the fields, and `resolve` (defaults <- recipe <- given flags,
then every check, each a one-line UserError naming the flag).

Every field's metadata holds:
    help      the --help text
    flag      the flag spelling where it is not `--name-with-dashes` (e.g. --no-checkpointing)
    identity  True for what must match when a run resumes from a checkpoint (see IDENTITY)
    choices, metavar, group   passed to argparse
    derived   True for what resolve() fills (recipe, world_size): saved, never a plain flag

Recipes (`RECIPES`; `python train.py --help` lists them):
    llama3-80k  Zhang et al. 2024, "Extending Llama-3's Context Ten-Fold Overnight"
    longqlora   Yang 2023, "LongQLoRA: Efficient and Effective Method to Extend Context Length of LLMs"
    longlora    Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models"
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import textwrap
import typing
from dataclasses import dataclass, field

import parallel
import rope
from errors import UserError

ROPE_GROUP = "RoPE context extension"
DEMO_MAX_CTX = 2560  # the demo's longest length (demo.py: 10 x its base's 256); no --model and a longer --ctx: SmolLM2


def _f(default, help: str | None = None, *, identity: bool = False, flag: str | None = None, choices=None,
       metavar: str | None = None, group: str | None = None, derived: bool = False):
    """A TrainConfig field with its command-line metadata."""
    return field(default=default, metadata=dict(help=help, identity=identity, flag=flag, choices=choices,
                                                metavar=metavar, group=group, derived=derived))


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings; `to_dict()` is what the run prints and every checkpoint saves."""

    model: str | None = _f(None, "HF directory, .gguf file or preset name (tiny, llama-3-8b, ...)", identity=True)
    data: str | None = _f(None, "file[:weight],file[:weight] (JSONL text/chat, .txt, directories)", identity=True)
    ctx: int | None = _f(None, "training sequence length in tokens", identity=True)
    quant: str = _f("none", "store frozen linear weights in NF4", identity=True, choices=["nf4", "none"])
    dtype: str | None = _f(None, "base weight/compute dtype (default bfloat16 on CUDA from compute capability 8.0, "
                                 "else float32; float16 is refused: training has no loss scaling)", identity=True,
                           choices=["float32", "bfloat16", "float16"])
    lora_r: int = _f(8, "LoRA rank r", identity=True)
    lora_alpha: float = _f(16.0, "LoRA alpha: the update is (alpha / r) B A x", identity=True)
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    lora_targets: str = _f("q_proj,k_proj,v_proj,o_proj", "comma list of projections, or all-linear", identity=True)
    train: str = _f("", "extra full parameters to train: embed,norm,lm_head", identity=True)
    rslora: bool = _f(False, "scale alpha/sqrt(r) (rsLoRA)", identity=True)
    rope: str | None = _f(None, "override the checkpoint's RoPE scaling: linear:4, dynamic:4, ntk:8, yarn:8, llama3:8 "
                                "(TYPE:FACTOR[,key=value]), TYPE:auto (factor ctx / original length) or default/none "
                                "to remove it", identity=True, metavar="SPEC", group=ROPE_GROUP)
    rope_theta: float | None = _f(None, "override the checkpoint's RoPE base, e.g. 2e8", identity=True,
                                  metavar="FLOAT", group=ROPE_GROUP)
    attn: str = _f("full", "attention while training (eval is always full)", identity=True, choices=["full", "s2"])
    group_ratio: float = _f(0.25, "S²-Attn group size as a fraction of ctx", identity=True)
    full_attn_tail: float = _f(0.0, "with --attn s2: train this fraction of the steps, the last ones, with full "
                                    "attention", identity=True)
    lr: float = _f(2e-4, "peak learning rate (AdamW, betas 0.9, 0.95)")
    warmup: int = _f(0, "linear warmup steps")
    schedule: str = _f("cosine", "lr after warmup: decay to 0 (cosine, linear) or constant",
                       choices=["cosine", "linear", "constant"])
    weight_decay: float = _f(0.0, "AdamW weight decay")
    clip: float = _f(1.0, "gradient-norm clip (0: off)")
    steps: int | None = _f(None, "optimizer steps (default 100 unless --epochs or a recipe sets it)")
    epochs: float | None = _f(None, "passes over the data (instead of --steps)")
    grad_accum: int = _f(1, "micro-steps per optimizer step", identity=True)
    seed: int = _f(0, "seed of the LoRA init, the data order and dropout", identity=True)
    compile: bool = _f(False, "torch.compile each block")
    checkpointing: bool = _f(True, "keep all activations instead of recomputing each block", flag="--no-checkpointing")
    offload: bool = _f(False, "offload checkpointed activations to CPU (CUDA)")
    loss_chunk: int = _f(1024, "tokens per float32 logits chunk in the loss")
    mlp_chunk: int = _f(0, "compute each block's per-token work (norms, q/k/v/o projections with RoPE, the MLP) "
                           "over this many tokens at a time, recomputed in backward; only attention sees the "
                           "whole sequence (0: off)")
    save_attention: bool = _f(False, "keep attention outputs through checkpointing: no attention recompute, "
                                     "+T x H x D per layer")
    out: str = _f("runs/train", "output directory: checkpoints, metrics.jsonl, adapter, merged model")
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end)")
    keep: int = _f(2, "checkpoints to keep")
    resume: bool = _f(False, "continue from the newest checkpoint in --out")
    resume_from: str | None = _f(None, "continue from this checkpoint folder (e.g. an older intact OUT/ckpt-N)")
    merge: bool = _f(False, "also write a merged HF model to OUT/merged")
    gguf: str | None = _f(None, "with --merge, also write OUT/merged.gguf for llama.cpp/Ollama in this tensor type",
                          choices=("f16", "bf16", "q8_0", "f32"))
    tokenizer: str | None = _f(None, "tokenizer path (default: the model's; 'bytes' for byte level)")
    chat_template: str | None = _f(None, "llama-3, llama-2, chatml (default: from the tokenizer)")
    truncate: bool = _f(False, "truncate chat samples longer than ctx (default: drop)")
    nproc: int | None = _f(None, "world size assumed by --dry-run")
    log_every: int = _f(1, "refresh the progress line every N steps (metrics.jsonl gets every step)")
    cp: int = _f(1, "context parallelism: ranks that share one sequence (DeepSpeed-Ulysses); world = dp x cp, "
                    "ctx and the query heads divisible by cp, cp a divisor or a multiple of the kv heads",
                 identity=True)
    fsdp: bool = _f(False, "shard the base (NF4 or bf16), the trained tensors, their gradients and "
                           "optimizer state over the ranks of the run (FSDP2); composes with --cp")
    doc_mask: bool = _f(False, "attend within documents only: packed text carries positions that restart at 0 at "
                               "each document start, and attention stops at document borders (no (T, T) mask); "
                               "with --attn s2 the S² windows are cut inside each document, counted from its "
                               "first token", identity=True)
    pose: int | None = _f(None, "PoSE: spread the positions of each --ctx window over [0, TARGET) in 2 chunks with "
                                "a random skip (Zhu et al. 2023); TARGET > ctx; a RoPE TYPE:auto factor uses "
                                "TARGET", identity=True, metavar="TARGET")
    nccl_timeout: float = _f(parallel.TIMEOUT_MINUTES, "minutes a collective waits for the other ranks before the "
                             "run is aborted (NCCL's watchdog, gloo's timeout); raise it when rank 0's checkpoint "
                             "writes to a slow filesystem take longer", metavar="MINUTES")
    recipe: str | None = _f(None, "the recipe the run started from", derived=True)
    world_size: int = _f(1, "processes in the run", identity=True, derived=True)

    def to_dict(self) -> dict:
        """The JSON-able settings, in field order (the keys of trainer_state.json's "config")."""
        return dataclasses.asdict(self)

    def lora_kwargs(self) -> dict:
        """Keyword arguments of lora.apply_lora for this run."""
        targets = self.lora_targets if self.lora_targets == "all-linear" else tuple(self.lora_targets.split(","))
        return dict(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=targets,
                    trainable=tuple(t for t in self.train.split(",") if t), rslora=self.rslora, seed=self.seed)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
SETTINGS = tuple(n for n, f in FIELDS.items() if not f.metadata["derived"])  # what flags and recipes may set
DEFAULTS = {n: FIELDS[n].default for n in SETTINGS}
IDENTITY = tuple(n for n, f in FIELDS.items() if f.metadata["identity"])
_TYPES = typing.get_type_hints(TrainConfig)


def value_type(name: str) -> type:
    """The field's scalar type (int, float, str or bool), without the `| None`."""
    t = _TYPES[name]
    args = [a for a in typing.get_args(t) if a is not type(None)] or [t]
    return args[0]


# ----------------------------------------------------------------------------- recipes


RECIPES: dict[str, dict] = {
    "llama3-80k": dict(quant="nf4", lora_r=32, lora_alpha=16.0, lora_dropout=0.0,
                       lora_targets="q_proj,k_proj,v_proj,o_proj", train="embed", rope_theta=2e8, attn="full",
                       lr=5e-5, epochs=1, schedule="linear", warmup=20),
    "longqlora": dict(quant="nf4", lora_r=64, lora_alpha=16.0, lora_dropout=0.05, lora_targets="all-linear", train="",
                      rope="linear:auto", attn="s2", group_ratio=0.25, lr=2e-4, steps=1000, grad_accum=16, clip=0.3,
                      schedule="constant", warmup=20),
    "longlora": dict(quant="none", lora_r=8, lora_alpha=16.0, lora_dropout=0.0,
                     lora_targets="q_proj,k_proj,v_proj,o_proj", train="embed,norm", rope="linear:auto", attn="s2",
                     group_ratio=0.25, lr=2e-5, steps=1000, schedule="constant", warmup=20),
}
RECIPE_SOURCES = {
    "llama3-80k": 'Zhang et al. 2024, "Extending Llama-3\'s Context Ten-Fold Overnight"',
    "longqlora": 'Yang 2023, "LongQLoRA"',
    "longlora": 'Chen et al. 2023, "LongLoRA"',
}


def check_recipes(recipes: dict[str, dict]) -> None:
    """Every recipe key is a setting and every value has its field's type (an int where a float is asked
    is fine); ValueError otherwise. Runs at import on RECIPES."""
    for name, recipe in recipes.items():
        for key, value in recipe.items():
            if key not in SETTINGS:
                raise ValueError(f"recipe {name!r}: {key!r} is not a TrainConfig setting")
            want = value_type(key)
            ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            choices = FIELDS[key].metadata["choices"]
            if not ok or (choices and value not in choices):
                raise ValueError(f"recipe {name!r}: {key}={value!r} is not a valid {want.__name__}"
                                 + (f" in {choices}" if choices else ""))


check_recipes(RECIPES)


# ----------------------------------------------------------------------------- command line


def flag(name: str) -> str:
    """The command-line spelling of a setting."""
    return FIELDS[name].metadata["flag"] or "--" + name.replace("_", "-")


def recipes_help() -> str:
    """The --help epilog: each recipe's source and the flags it sets."""
    def shown(v):
        return f"{v:g}" if isinstance(v, float) else (str(v) if v != "" else "''")

    lines = ["recipes (--recipe NAME; explicit flags override them):"]
    for name, recipe in RECIPES.items():
        lines.append(f"  {name:11s} {RECIPE_SOURCES[name]}")
        flags = " ".join(f"{flag(k)} {shown(v)}" for k, v in recipe.items())
        lines += textwrap.wrap(flags, 110, initial_indent=" " * 14, subsequent_indent=" " * 14, break_on_hyphens=False)
    return "\n".join(lines)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Flags from the fields; every one defaults to "not given" (SUPPRESS), so a recipe fills what the user
    left out. Besides the settings: --recipe, --dry-run, --force and --suggest-base."""
    ap = argparse.ArgumentParser(description=description, epilog=recipes_help(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS
    ap.add_argument("--recipe", choices=sorted(RECIPES), default=S, help="fill the flags from a paper's recipe")
    groups = {}
    for name in SETTINGS:
        meta = FIELDS[name].metadata
        target = ap
        if meta["group"]:
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"], ap.add_argument_group(meta["group"]))
        kw = dict(dest=name, default=S, help=meta["help"])
        if value_type(name) is bool:
            kw["action"] = "store_false" if FIELDS[name].default else "store_true"
        else:
            if value_type(name) is not str:
                kw["type"] = value_type(name)
            if meta["choices"]:
                kw["choices"] = meta["choices"]
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        target.add_argument(flag(name), **kw)
        if name == "log_every":
            ap.add_argument("--dry-run", action="store_true", help="print the resolved config and memory plan; load nothing")
            ap.add_argument("--force", action="store_true",
                            help="with no --model and --ctx beyond the demo's: run the real-model extension even "
                                 "where its time estimate on a CPU exceeds an hour")
    groups[ROPE_GROUP].add_argument("--suggest-base", metavar="TARGET_LEN", type=int, default=None,
                                    help="print the dynamic-NTK base for training at TARGET_LEN and exit (needs --model)")
    return ap


# ----------------------------------------------------------------------------- resolution


POSITIVE = ("lr", "lora_alpha")  # finite and > 0
INT64 = (-2**63, 2**63 - 1)  # every integer setting reaches torch (seeds, sizes, positions) as an int64
MAX_POSITION = 2**53  # RoPE angles are formed in float64 (rope.py): exact for integer positions below 2^53
NON_NEGATIVE = ("clip", "weight_decay", "warmup")  # finite and >= 0
TRAINABLE = ("embed", "norm", "lm_head")  # --train's names (lora.apply_lora's `trainable`)


def check_numbers(values: dict) -> None:
    """The numbers that must be finite and positive (or >= 0), --lora-dropout in [0, 1), --epochs finite,
    integers that torch holds as int64, positions (--ctx, --pose) below MAX_POSITION, --train's names: one
    UserError naming the flag, before anything loads."""
    for key in ("ctx", "pose"):
        if values[key] is not None and values[key] > MAX_POSITION:
            raise UserError(f"{flag(key)} {values[key]}: beyond 2^53, the largest position RoPE's float64 angles "
                            "hold exactly")
    for key in SETTINGS:
        if value_type(key) is int and values[key] is not None and not INT64[0] <= values[key] <= INT64[1]:
            raise UserError(f"{flag(key)} {values[key]}: beyond a 64-bit integer (torch's int64), the range of this "
                            "setting")
    for key in POSITIVE + NON_NEGATIVE:
        v = values[key]
        if not (math.isfinite(v) and (v > 0 if key in POSITIVE else v >= 0)):
            raise UserError(f"{flag(key)} must be finite and {'> 0' if key in POSITIVE else '>= 0'}, got {v}")
    if not 0.0 <= values["lora_dropout"] < 1.0:
        raise UserError(f"--lora-dropout must be in [0, 1), got {values['lora_dropout']}")
    if values["epochs"] is not None and not math.isfinite(values["epochs"]):
        raise UserError(f"--epochs must be finite, got {values['epochs']}")
    unknown = [t for t in values["train"].split(",") if t and t not in TRAINABLE]
    if unknown:
        raise UserError(f"--train {values['train']!r}: unknown {unknown}; choose from {', '.join(TRAINABLE)}")


def resolve(given: dict, recipe: str | None = None, world_size: int = 1, dry_run: bool = False) -> TrainConfig:
    """Defaults, then the recipe, then the given settings (None counts as not given); then every check.

    `given` holds settings only (the parsed flags without recipe/dry_run/suggest_base); an unknown key is
    a programming error (ValueError). With dry_run, world_size is --nproc (default 1) and --data may be absent.
    """
    unknown = sorted(set(given) - set(SETTINGS))
    if unknown:
        raise ValueError(f"train_config.resolve: unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    if recipe is not None and recipe not in RECIPES:
        raise UserError(f"--recipe {recipe!r}: unknown; choose one of {', '.join(sorted(RECIPES))}")
    values = {**DEFAULTS, **(RECIPES[recipe] if recipe else {}), **{k: v for k, v in given.items() if v is not None}}
    values["recipe"] = recipe
    values["world_size"] = world_size if not dry_run else (values["nproc"] or 1)
    if values["model"] is None:
        raise UserError("--model is required (a HF directory, a .gguf file or a preset such as tiny)")
    if values["ctx"] is None or values["ctx"] < 2:
        raise UserError(f"--ctx must be an integer >= 2, got {values['ctx']}")
    if "steps" in given and "epochs" in given:
        raise UserError("--steps and --epochs conflict: give one")
    if "steps" in given:
        values["epochs"] = None
    if "epochs" in given:
        values["steps"] = None
    if values["steps"] is None and values["epochs"] is None:
        values["steps"] = 100
    for key in ("lora_r", "grad_accum", "cp", "loss_chunk", "keep", "log_every"):
        if values[key] < 1:
            raise UserError(f"{flag(key)} must be >= 1, got {values[key]}")
    for key in ("mlp_chunk", "save_every"):
        if values[key] < 0:
            raise UserError(f"{flag(key)} must be >= 0 (0: off), got {values[key]}")
    if values["epochs"] is not None and values["epochs"] <= 0:
        raise UserError(f"--epochs must be > 0, got {values['epochs']}")
    if values["nproc"] is not None and values["nproc"] < 1:
        raise UserError(f"--nproc must be >= 1, got {values['nproc']}")
    if values["steps"] is not None and values["steps"] < 1:
        raise UserError(f"--steps must be >= 1, got {values['steps']}")
    if not 0.0 <= values["full_attn_tail"] < 1.0:
        raise UserError(f"--full-attn-tail must be in [0, 1), got {values['full_attn_tail']}")
    if values["full_attn_tail"] and values["attn"] != "s2":
        raise UserError("--full-attn-tail only applies with --attn s2")
    if values["compile"] and values["save_attention"]:  # model.attention_saving_contexts acts on eager ATen ops only
        raise UserError("--save-attention does not combine with --compile (its selective checkpointing policy sees "
                        "ATen ops one by one; a compiled block runs as one graph): drop one of them")
    if values["pose"] is not None and values["pose"] <= values["ctx"]:
        raise UserError(f"--pose must be a target length > --ctx {values['ctx']}, got {values['pose']}")
    if values["pose"] is not None and values["doc_mask"]:
        raise UserError("--pose and --doc-mask conflict: PoSE spreads one window's positions over the target, "
                        "document masking restarts them at each document; give one")
    if not 0.0 < values["group_ratio"] <= 1.0:
        raise UserError(f"--group-ratio must be in (0, 1], got {values['group_ratio']}")
    if values["gguf"] is not None and not values["merge"]:
        raise UserError("--gguf writes OUT/merged.gguf from the merged model and needs --merge")
    if values["gguf"] is not None and values["tokenizer"] == "bytes":
        raise UserError("--gguf: the byte tokenizer has no llama.cpp equivalent; pass --tokenizer with a "
                        "tokenizer.json or tokenizer.model")
    if values["world_size"] % values["cp"]:
        raise UserError(f"--cp {values['cp']} does not divide the world size {values['world_size']}"
                        + (" (--nproc)" if dry_run else " (torchrun's processes)"))
    if values["fsdp"] and values["world_size"] < 2:
        raise UserError("--fsdp shards over the processes of a run, 1 here; run at least 2 processes"
                        + (" (--nproc)" if dry_run else " (torchrun --nproc_per_node)") + " or drop --fsdp")
    if values["ctx"] % values["cp"]:
        raise UserError(f"--ctx {values['ctx']} is not divisible by --cp {values['cp']}; "
                        f"use a multiple of {values['cp']}")
    if values["doc_mask"] and values["cp"] > 1:
        raise UserError(f"--doc-mask does not combine with --cp {values['cp']} (each shard's attention would need the "
                        f"whole sequence's document borders); use --cp 1")
    if values["dtype"] == "float16":  # the loss gradient starts at world / N_sup (~1e-5 at 80K): fp16 flushes it to 0
        raise UserError("--dtype float16 trains without loss scaling, so small gradients underflow to zero; "
                        "use --dtype bfloat16 (float32's range, the same memory)")
    if values["data"] is None and not dry_run:
        raise UserError("--data is required (e.g. --data long.jsonl:0.6,short.jsonl:0.4)")
    check_numbers(values)
    theta = values["rope_theta"]
    if theta is not None and not (math.isfinite(theta) and theta > 0):
        raise UserError(f"--rope-theta must be positive and finite, got {theta}")
    if values["rope"] is not None:
        try:  # the spelling only; the factor of TYPE:auto and L0 come from the checkpoint when it loads
            rope.override(rope.DEFAULT_THETA, None, values["rope"], None, original_len=1, ctx=1)
        except ValueError as e:
            msg = str(e)  # parse_rope_spec's own messages name --rope; the scaling checks' do not
            raise UserError(msg if msg.startswith("--rope") else f"--rope {values['rope']!r}: {msg}") from None
    return TrainConfig(**values)
