"""LoRA adapter files in PEFT's format (Mangrulkar et al. 2022, PEFT 0.21): save, read, load; merged export.

Adapter directories follow PEFT 0.21 (`PeftModel.from_pretrained` loads ours; we load PEFT's):
    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules, use_rslora, modules_to_save
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  (r, I)
                                 base_model.model.<module>.lora_B.weight  (O, r)
                                 base_model.model.<module>.weight         (a module in modules_to_save)
Module names are Hugging Face Llama names, which are also ours (model.py), so only the prefix changes.
The adapters themselves (y = W0 x + s B A x, apply_lora, merge_lora) are lora.py's; this module reads
files through checkpoint.py (iter_checkpoint, strict_items) and writes them through outputs.atomic_path.

Note: tied embeddings. A tied embedding/head (SmolLM2) is one tensor; PEFT stores it under both names
with `ensure_weight_tying=True`, so save_adapter does the same and load_adapter keeps the embedding's copy.

Merging exports W' = W0 + s B A as an ordinary Hugging Face directory:

    python lora_peft.py BASE ADAPTER OUT [--dtype bfloat16|float16|float32]

Notation: I in features, O out features, r rank, s scaling.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from checkpoint import copy_tokenizer_files, iter_checkpoint, load_model, read_json, save_model
from errors import UserError, json_field, run_cli
from lora import (ALL_LINEAR, EMBED, LLAMA_LINEARS, LM_HEAD, NORM_NAMES, apply_lora, dequantize_linears,
                  extra_params, load_lora_state_dict, lora_modules, lora_state_dict, lora_summary, merge_lora,
                  release_masters)
from outputs import atomic_path, atomic_write_text, check_output

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> our module names

# PEFT config fields whose non-default value changes the computation; we refuse rather than ignore them.
UNSUPPORTED = {
    "use_dora": (False, None), "lora_bias": (False, None), "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layers_to_transform": (None,),
    "layer_replication": (None,), "trainable_token_indices": (None,), "target_parameters": (None, []),
    "exclude_modules": (None, [], ""), "use_qalora": (False, None),
}
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")  # these inits move W0 too; the adapter alone is not W0's


# ----------------------------------------------------------------------------- adapter files


def adapter_config(model: nn.Module, base_model_path: str | os.PathLike | None = None) -> dict:
    """The PEFT adapter_config.json for the LoRA layers and trained extras currently in the model."""
    mods = list(lora_modules(model))
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA layers; call apply_lora or load_adapter first")
    hyper = {(m.r, m.alpha, m.rslora, getattr(m.dropout, "p", 0.0)) for _, m in mods}
    if len(hyper) > 1:
        raise ValueError(f"save_adapter: LoRA layers disagree on (r, alpha, rslora, dropout): {sorted(hyper)}")
    r, alpha, rslora, dropout = hyper.pop()
    leaves = {n.rpartition(".")[2] for n, _ in mods}
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    all_norms = set(extra_params(model, ("norm",)))
    odd = sorted(trained - all_norms - {f"{EMBED}.weight", f"{LM_HEAD}.weight"})
    if odd:
        raise ValueError(f"save_adapter: trainable tensor {odd[0]!r} is neither LoRA, embedding, norm nor lm_head; "
                         "freeze it or it would be lost")
    tied = model.get_parameter(f"{LM_HEAD}.weight") is model.get_parameter(f"{EMBED}.weight")
    modules_to_save = [leaf for leaf, owner in (("embed_tokens", EMBED), ("lm_head", LM_HEAD))
                       if f"{owner}.weight" in trained]
    # PEFT matches an entry against the END of module names, so the leaf names cover every norm; a
    # partial set is listed by qualified names, which match only themselves.
    norms = trained & all_norms
    modules_to_save += list(NORM_NAMES) if norms == all_norms else sorted(n.removesuffix(".weight") for n in norms)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None if base_model_path is None else str(base_model_path),
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora, "bias": "none",
        "target_modules": [n for n in LLAMA_LINEARS if n in leaves], "modules_to_save": modules_to_save or None,
        "ensure_weight_tying": tied and "embed_tokens" in modules_to_save,
        "init_lora_weights": True, "fan_in_fan_out": False, "use_dora": False, "inference_mode": True,
    }


def save_adapter(model: nn.Module, dir: str | os.PathLike, base_model_path: str | os.PathLike | None = None):
    """Write adapter_model.safetensors + adapter_config.json (PEFT 0.21 layout), each atomically.

    Weights are renamed into place before the config, so a directory is never left with half a file and
    re-saving into the same directory (a trainer's "latest") is allowed. The trained extras (embeddings,
    norms, head) go into the same file under PEFT's modules_to_save names.
    """
    config = adapter_config(model, base_model_path)
    state = {PEFT_PREFIX + n: t.contiguous() for n, t in lora_state_dict(model).items()}
    if config["ensure_weight_tying"]:  # PEFT stores the tied matrix under both names
        state[f"{PEFT_PREFIX}{LM_HEAD}.weight"] = state[f"{PEFT_PREFIX}{EMBED}.weight"].clone()
    bad = [n for n, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(f"{dir}: not written: tensor {bad[0]!r} holds NaN or infinite values")
    d = Path(dir)
    with atomic_path(d / ADAPTER_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    atomic_write_text(d / ADAPTER_CONFIG, json.dumps(config, indent=2))


def read_adapter_config(dir: str | os.PathLike) -> dict:
    """Parse and check a PEFT LoRA adapter_config.json; returns our arguments.

    Keys: r, alpha, dropout, targets (as written: "all-linear" or PEFT entries), rslora, modules_to_save
    (list), tied (ensure_weight_tying). `peft_targets` turns the targets into our leaf names.
    """
    path = Path(dir) / ADAPTER_CONFIG
    if not Path(dir).is_dir():
        raise UserError(f"{dir}: no such adapter directory")
    cfg = read_json(path, "pass a directory written by save_adapter or PEFT save_pretrained")
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{path}: bias {cfg['bias']!r} is not supported; train with bias='none'")
    for key, allowed in UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise UserError(f"{path}: {key}={cfg[key]!r} is not supported by this implementation")
    if str(cfg.get("init_lora_weights")).lower().startswith(BASE_CHANGING_INITS):
        raise UserError(f"{path}: init_lora_weights={cfg['init_lora_weights']!r} also rewrites the base weights; "
                         "convert it to a plain LoRA first (PEFT save_pretrained(path_initial_model_for_weight_conversion=...))")
    targets = cfg.get("target_modules")
    if not (targets == ALL_LINEAR or targets and isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise UserError(f"{path}: target_modules must be {ALL_LINEAR!r} or a non-empty list of module names "
                        f"(PEFT's regular expressions are not supported), got {targets!r}")
    r = json_field(cfg, "r", path, int, lambda v: v >= 1, "an integer >= 1")
    alpha = json_field(cfg, "lora_alpha", path, (int, float), math.isfinite, "a finite number")
    dropout = json_field(cfg, "lora_dropout", path, (int, float), lambda v: 0 <= v < 1, "a number in [0, 1)", 0.0)
    saved = json_field(cfg, "modules_to_save", path, list, lambda v: all(isinstance(t, str) for t in v),
                       "a list of module names", [])
    return {"r": r, "alpha": float(alpha), "dropout": float(dropout), "targets": targets,
            "rslora": json_field(cfg, "use_rslora", path, bool, what="true or false", default=False),
            "modules_to_save": saved, "tied": json_field(cfg, "ensure_weight_tying", path, bool, default=False)}


def peft_targets(model: nn.Module, targets: str | list[str], where: Path) -> tuple[str, ...]:
    """Leaf names targeted by PEFT `target_modules` entries (PEFT's rule: name == entry or ends with ".entry").

    PEFT 0.21 writes "all-linear" out as qualified names (model.layers.0.mlp.up_proj, ...); those are fine as
    long as they cover every layer uniformly, which is all our apply_lora expresses.
    """
    if targets == ALL_LINEAR:
        return LLAMA_LINEARS
    slots = [n for n, _ in model.named_modules() if n.rpartition(".")[2] in LLAMA_LINEARS + (LM_HEAD,)]
    hit = set()
    for entry in targets:
        found = [n for n in slots if n == entry or n.endswith("." + entry)]
        if not found:
            raise UserError(f"{where}: target_modules entry {entry!r} matches no projection of the model "
                             f"({', '.join(LLAMA_LINEARS)})")
        if LM_HEAD in found:
            raise UserError(f"{where}: target_modules entry {entry!r} targets lm_head; LoRA on the head is not supported")
        hit.update(found)
    leaves = {n.rpartition(".")[2] for n in hit}
    partial = sorted(n for n in slots if n.rpartition(".")[2] in leaves and n not in hit)
    if partial:
        raise UserError(f"{where}: target_modules adapt only some layers ({partial[0]!r} is not adapted); "
                         "per-layer targets are not supported")
    return tuple(n for n in LLAMA_LINEARS if n in leaves)


def _modules_to_save_params(model: nn.Module, entries: list[str], tied_flag: bool, where: Path) -> dict:
    """Our parameter names for PEFT modules_to_save entries (PEFT's rule: module name ends with the entry)."""
    out = {}
    allowed = (EMBED, LM_HEAD)
    for entry in entries:
        hits = [n for n, _ in model.named_modules(remove_duplicate=False) if n.endswith(entry)]
        if not hits:
            raise UserError(f"{where}: modules_to_save entry {entry!r} matches no module of the model")
        for n in hits:
            if n not in allowed and n.rpartition(".")[2] not in NORM_NAMES:
                raise UserError(f"{where}: modules_to_save entry {entry!r} matches {n!r}; only the embeddings, "
                                 "norms and lm_head can be fully trained here")
            out[f"{n}.weight"] = model.get_parameter(f"{n}.weight")
    tied = model.get_parameter(f"{LM_HEAD}.weight") is model.get_parameter(f"{EMBED}.weight")
    if tied and {f"{EMBED}.weight", f"{LM_HEAD}.weight"} & set(out):
        if not tied_flag:
            raise UserError(f"{where}: the adapter trains a tied embedding/head without ensure_weight_tying "
                             "(PEFT unties them); re-save it with ensure_weight_tying=True")
        out.pop(f"{LM_HEAD}.weight", None)
        out[f"{EMBED}.weight"] = model.get_parameter(f"{EMBED}.weight")
    return out


def load_adapter(model: nn.Module, dir: str | os.PathLike) -> dict:
    """Load a PEFT-format LoRA adapter (ours or PEFT's save_pretrained) into `model`, strictly.

    Applies LoRA with the config's r/alpha/targets/rslora unless the model already has matching LoRA
    layers; marks the modules_to_save tensors trainable; loads every tensor, refusing missing,
    unexpected or mis-shaped ones. Never unpickles. Returns the apply_lora-style summary.
    """
    d = Path(dir)
    cfg = read_adapter_config(d)
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (d / ADAPTER_PICKLE).is_file():
            raise UserError(f"{d / ADAPTER_PICKLE}: pickle adapters are never loaded (they can run code); "
                             "re-save it with PEFT save_pretrained(..., safe_serialization=True)")
        raise UserError(f"{weights}: missing; the adapter directory holds no weights")
    targets = peft_targets(model, cfg["targets"], d / ADAPTER_CONFIG)
    mods = list(lora_modules(model))
    if mods:
        have = ({(m.r, m.alpha, m.rslora) for _, m in mods}, tuple(n for n in LLAMA_LINEARS
                if n in {k.rpartition(".")[2] for k, _ in mods}))
        want = ({(cfg["r"], cfg["alpha"], cfg["rslora"])}, targets)
        if have != want:
            raise UserError(f"{d / ADAPTER_CONFIG}: (r, alpha, rslora) and targets {want} differ from the LoRA "
                             f"layers already in the model {have}; load into a model without LoRA")
    else:
        apply_lora(model, cfg["r"], cfg["alpha"], cfg["dropout"], targets, rslora=cfg["rslora"])
    extras = _modules_to_save_params(model, cfg["modules_to_save"], cfg["tied"], d / ADAPTER_CONFIG)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    for p in extras.values():
        p.requires_grad_(True)
    tied_head = cfg["tied"] and f"{EMBED}.weight" in extras

    def items():
        for key, tensor, _ in iter_checkpoint(weights):
            if not key.startswith(PEFT_PREFIX):
                raise UserError(f"{weights}: tensor {key!r} lacks PEFT's {PEFT_PREFIX!r} prefix; "
                                 "not a PEFT LoRA adapter for a causal LM")
            name = key.removeprefix(PEFT_PREFIX)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise UserError(f"{weights}: tensor {key!r} holds NaN or infinite values; refusing to load or "
                                 "merge it (resume from an earlier checkpoint)")
            if tied_head and name == f"{LM_HEAD}.weight":
                continue  # PEFT's copy of the tied matrix; the embedding is the one kept
            yield name, tensor

    load_lora_state_dict(model, items(), str(weights))
    return lora_summary(model)


# ----------------------------------------------------------------------------- export and command


def export_merged(model: nn.Module, dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Merge LoRA, dequantize any remaining 4-bit layers, cast to `dtype` and save_pretrained (in place).

    The result is an ordinary Hugging Face Llama directory whose config.json carries the model's RoPE
    settings (ModelConfig.to_hf), loadable by transformers and by checkpoint.load_model.
    """
    merge_lora(model, dtype)
    dequantize_linears(model, dtype)
    release_masters(model)
    model.to(dtype)
    bad = next((n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise UserError(f"{dir}: not written: merged tensor {bad!r} holds NaN or infinite values")
    save_model(model, dir)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model and write a HF directory.")
    ap.add_argument("base", help="base model: HF directory, .gguf file or preset")
    ap.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("out", help="output directory (must not exist or be empty)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = ap.parse_args(argv)

    def body():
        check_output(args.out, "new", "OUT", inputs=[args.base, args.adapter])  # before the model loads
        model = load_model(args.base, dtype=torch.float32)
        load_adapter(model, args.adapter)
        with atomic_path(args.out, is_dir=True, replace=False) as tmp:
            export_merged(model, tmp, getattr(torch, args.dtype))
            if Path(args.base).is_dir():  # the merged model keeps its base's tokenizer
                copy_tokenizer_files(args.base, tmp)
        print(f"wrote {args.out}")

    if run_cli(body):
        sys.exit(1)


if __name__ == "__main__":
    main()
