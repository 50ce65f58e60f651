"""Files: safetensors reading and writing, one strict name check, load_model and save_model.

Every file or directory written here goes through outputs.atomic_path (temporary name, then rename).

Reading: a Hugging Face directory (config.json + model.safetensors or an index of shards) or a llama.cpp
.gguf file (gguf_read.py) becomes a ModelConfig and a lazy stream of (name, tensor, file), one tensor at a
time; pickle checkpoints are refused. Every loader checks names through `strict_items` (unexpected, repeated,
mis-shaped or missing tensors, one message format). `load_model` builds the model on the meta device and
assigns each tensor as it arrives, optionally quantizing every linear but the LM head to NF4 (quant4.py),
so peak memory is about the loaded model plus one tensor.

    python checkpoint.py convert SRC OUT      # a .gguf or HF directory -> a HF safetensors directory
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import quant4
from errors import UserError, run_cli
from gguf_read import Items, read_gguf
from model import PRESETS, MemoryOptions, ModelConfig, Transformer
from outputs import atomic_path, check_output

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# A model folder's tokenizer (what tokenizer.load_tokenizer reads from a folder; tokenizer_config.json also
# records the byte tokenizer, which has no vocabulary file).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
QUANT_KINDS = ("nf4",)

# ----------------------------------------------------------------------------- tokenizer files


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike, names: tuple[str, ...] = TOKENIZER_FILES
                         ) -> list[str]:
    """Copy the tokenizer files among `names` that folder `src` holds into folder `dst` (each atomically),
    so a merged or converted model keeps its tokenizer; returns the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in names:
        if (src / name).is_file():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------- safetensors and config


def read_json(path: str | os.PathLike, hint: str) -> dict:
    """A JSON file's object, or one UserError naming the file (`hint` says what to pass instead)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; {hint}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a JSON {type(obj).__name__}, not an object; {hint}")
    return obj


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a Hugging Face model directory or of its config.json."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    return ModelConfig.from_hf(read_json(p, "pass a Hugging Face model directory"), where=str(p))


def _safetensors_files(d: Path) -> list[Path]:
    if (d / SAFETENSORS_INDEX).is_file():
        index = read_json(d / SAFETENSORS_INDEX, "")
        if not isinstance(index.get("weight_map"), dict):
            raise UserError(f"{d / SAFETENSORS_INDEX}: not a safetensors index (no 'weight_map' object)")
        files = [d / f for f in dict.fromkeys(index["weight_map"].values())]
        for f in files:
            if not f.is_file():
                raise UserError(f"{f}: shard named in {SAFETENSORS_INDEX} is missing")
        return files
    return [d / SAFETENSORS_SINGLE] if (d / SAFETENSORS_SINGLE).is_file() else []


def iter_checkpoint(path: str | os.PathLike) -> Items:
    """Yield (name, tensor, file) from a safetensors checkpoint directory or file, one tensor at a time."""
    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES or path.is_dir() and not _safetensors_files(path) \
            and any(any(path.glob("*" + s)) for s in PICKLE_SUFFIXES):
        raise UserError(f"{path}: pickle checkpoints are never loaded (they can run code); convert once with "
                        "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
    files = [path] if path.is_file() else _safetensors_files(path) if path.is_dir() else []
    if not files:
        what = "the weights are missing" if (path / "config.json").is_file() else "not a model"
        raise UserError(f"{path}: {what}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} found")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name), str(f)
        except (SafetensorError, OSError) as e:
            raise UserError(f"{f}: unreadable safetensors file ({e})") from None


def write_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], config: dict,
                     max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json + safetensors shards as one new directory (atomic_path; a non-empty `path` is
    refused). Past `max_shard_bytes` the tensors go into numbered shards listed by an index file."""
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    with atomic_path(path, is_dir=True, replace=False) as tmp:
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFETENSORS_SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))


def read_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, Items]:
    """(config, lazy (name, tensor, file) items) of a .gguf file or a Hugging Face safetensors directory."""
    path = Path(path)
    if path.suffix == ".gguf":
        return read_gguf(path)
    return read_config(path), iter_checkpoint(path)


# ----------------------------------------------------------------------------- strict assign


def strict_items(items: Iterable[tuple[str, torch.Tensor]], expected: dict[str, tuple[int, ...]], source: str,
                 optional: Iterable[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the (name, tensor) items, checking each against `expected` (name -> shape) as it passes.

    An unexpected name, a name seen twice or a shape that differs is a UserError naming `source` and the
    tensor, raised before that tensor is yielded; once the items are exhausted, the first expected name
    that never came (and is not in `optional`) is one too.
    """
    optional, seen = set(optional), set()
    for name, tensor in items:
        if name not in expected:
            raise UserError(f"{source}: unexpected tensor {name!r} (the model has no such tensor; check that "
                            "the checkpoint matches the model)")
        if name in seen:
            raise UserError(f"{source}: tensor {name!r} appears twice")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise UserError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                            f"{tuple(expected[name])}; check that the checkpoint matches the model")
        seen.add(name)
        yield name, tensor
    missing = [n for n in expected if n not in seen and n not in optional]
    if missing:
        raise UserError(f"{source}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")


Slot = tuple[nn.Module, str, bool]  # (owner module, attribute, is_parameter)


def tensor_slots(model: nn.Module) -> dict[str, list[Slot]]:
    """name -> every (owner, attribute, is_parameter) holding the same tensor; tied names share one list.

    Parameters and persistent buffers, in model order. Non-persistent buffers (derived tables) are never
    in a checkpoint.
    """
    by_id: dict[int, list[Slot]] = {}
    names: dict[str, int] = {}
    for name, t in model.named_parameters(remove_duplicate=False):
        owner_name, _, attr = name.rpartition(".")
        by_id.setdefault(id(t), []).append((model.get_submodule(owner_name), attr, True))
        names[name] = id(t)
    for name, t in model.named_buffers(remove_duplicate=False):
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr not in owner._non_persistent_buffers_set:
            by_id.setdefault(id(t), []).append((owner, attr, False))
            names[name] = id(t)
    return {name: by_id[i] for name, i in names.items()}


def _shape(slots: list[Slot]) -> tuple[int, ...]:
    owner, attr, _ = slots[0]
    return tuple(getattr(owner, attr).shape)


def _aliases(slots: dict[str, list[Slot]]) -> set[str]:
    """Names of tensors tied to an earlier name (lm_head.weight of a tied model): optional in a file."""
    first, out = set(), set()
    for name, s in slots.items():
        if id(s) in first:
            out.add(name)
        first.add(id(s))
    return out


def _assign(slots: list[Slot], tensor: torch.Tensor) -> None:
    """Put `tensor` in every slot (keeping tied aliases tied and requires_grad as it was)."""
    owner, attr, is_param = slots[0]
    if is_param:
        tensor = nn.Parameter(tensor, requires_grad=owner._parameters[attr].requires_grad)
    for owner, attr, is_param in slots:
        (owner._parameters if is_param else owner._buffers)[attr] = tensor


def _cast(t: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    """t on `device`; floating tensors in `dtype` (None: as stored), integer tensors as stored."""
    return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)


def assign_tensors(model: nn.Module, items: Iterable[tuple[str, torch.Tensor]], source: str,
                   dtype: torch.dtype | None = None, device="cpu") -> nn.Module:
    """Fill a (meta-built) model from (name, tensor) items, strictly (strict_items), one tensor at a time.

    A tied alias (lm_head.weight of a tied model) may be absent; if present it is skipped, the first
    name's tensor being the one kept and shared.
    """
    slots = tensor_slots(model)
    aliases = _aliases(slots)
    for name, t in strict_items(items, {n: _shape(s) for n, s in slots.items()}, source, aliases):
        if name not in aliases:
            _assign(slots[name], _cast(t, dtype, device))
    return model


def assign_quantized(model: nn.Module, items: Iterable[tuple[str, torch.Tensor]], source: str,
                     skip: Iterable[str] = ("lm_head",), dtype: torch.dtype | None = torch.bfloat16,
                     blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                     compile: bool = False, device="cpu") -> nn.Module:
    """Fill a model built on the meta device from (name, tensor) items, quantizing linears on the fly.

    Every nn.Linear not matching `skip` becomes an empty Linear4bit; its "<name>.weight" is quantized as
    it arrives (from a `dtype` copy, so the result equals quantizing the model in `dtype`); all other
    floating tensors are cast to `dtype`, integer tensors kept. Strict as assign_tensors. Non-persistent
    buffers (derived tables such as RoPE cos/sin) are not in a checkpoint and stay as the model built them.
    """
    quantized = quant4.empty_linear4bit(model, skip, dtype or torch.float32, blocksize, double_quant,
                                        compute_dtype, compile)
    slots = {name: s for name, s in tensor_slots(model).items()
             if not (isinstance(s[0][0], quant4.Linear4bit) and s[0][1].startswith("weight_"))}
    expected = {name: _shape(s) for name, s in slots.items()}
    expected.update({name: (m.out_features, m.in_features) for name, m in quantized.items()})
    aliases = _aliases(slots)

    def cast() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in strict_items(items, expected, source, aliases):
            if name not in aliases:
                yield name, _cast(t, dtype, device)

    for name, value in quant4.quantize_streaming(cast(), lambda name, _: name in quantized, blocksize, double_quant):
        if isinstance(value, quant4.NF4Tensor):
            quantized[name].set_weight(value)
        else:
            _assign(slots[name], value)
    return model


# ----------------------------------------------------------------------------- entry points


def load_model(spec: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu", quant: str | None = None,
               seed: int = 0, memory: MemoryOptions | None = None, **overrides) -> Transformer:
    """A Transformer from a preset name, a Hugging Face safetensors directory or a .gguf file.

    Preset: random weights from `seed` (init_weights), cast to `dtype` (default float32) on `device`.
    Checkpoint: built on the meta device and filled tensor by tensor (strict), floating tensors in `dtype`
    (default: as stored). quant="nf4": every linear but lm_head in NF4 (quant4); from a checkpoint each
    weight is quantized as it arrives, so peak memory is about the 4-bit model plus one tensor.
    overrides: ModelConfig fields to change (a preset's size, or a checkpoint's RoPE settings).
    """
    if quant is not None and quant not in QUANT_KINDS:
        raise UserError(f"quant {quant!r} is not supported; choose one of {', '.join(QUANT_KINDS)} or none")
    name = os.fspath(spec)
    if name in PRESETS:
        model = Transformer(ModelConfig.from_name(name, **overrides), memory).init_weights(seed)
        model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
        return quant4.quantize_model(model, skip=("lm_head",)) if quant == "nf4" else model
    path = Path(name)
    if not path.exists():
        raise UserError(f"{name}: no such model directory, file or preset ({', '.join(PRESETS)})")
    cfg, items = read_checkpoint(path)
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    with torch.device("meta"):
        model = Transformer(cfg, memory)
    pairs = ((n, t) for n, t, _ in items)
    if quant == "nf4":
        return assign_quantized(model, pairs, name, skip=("lm_head",), dtype=dtype, device=device)
    return assign_tensors(model, pairs, name, dtype=dtype, device=device)


def save_model(model: Transformer, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and model.safetensors (sharded past `max_shard_bytes`) as a new directory.

    A tied model stores the embedding only (transformers re-ties it). A non-empty `path` is refused.
    """
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    dtype = next(iter(state.values())).dtype
    config = {**model.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}
    write_checkpoint(path, state, config, max_shard_bytes)


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write model.state_dict() (4-bit buffers included) to one safetensors file, atomically.

    Tied tensors are stored once, under their first name; load_quantized_file re-ties them.
    """
    state, stored = {}, set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape)) if t.device.type != "meta" else name
        if key in stored:
            continue
        stored.add(key)
        state[name] = t.contiguous()
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


def load_quantized_file(model: nn.Module, path: str | os.PathLike, device="cpu") -> nn.Module:
    """Load a save_quantized file into a model with the same Linear4bit layout (may be on meta). Strict."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such quantized model file")
    slots = tensor_slots(model)
    aliases = _aliases(slots)
    items = ((n, t) for n, t, _ in iter_checkpoint(p))
    for name, t in strict_items(items, {n: _shape(s) for n, s in slots.items()}, str(p), aliases):
        if name not in aliases:
            _assign(slots[name], t.to(device))
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description="Convert a Llama checkpoint (.gguf or HF directory) to a HF "
                                             "safetensors directory.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="write a HF safetensors directory from a .gguf or HF checkpoint")
    c.add_argument("src")
    c.add_argument("out")
    args = ap.parse_args(argv)

    def body():
        check_output(args.out, "new", "OUT", inputs=[args.src])  # before the model loads
        save_model(load_model(args.src, dtype=torch.float32), args.out)
        print(f"wrote {args.out}")

    if run_cli(body):
        sys.exit(1)


if __name__ == "__main__":
    main()
