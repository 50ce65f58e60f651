"""Text generation with the KV cache: chunked prefill, greedy or nucleus sampling, and the model CLI.

Prefill runs the prompt through the per-layer KV caches (model.KVCache) in chunks, so only one chunk's
activations and its (chunk, S) attention mask exist at a time; decoding then feeds one token per step
at cache slot `start` = tokens so far. Attention is always full causal attention.

    python generate.py --model DIR_OR_GGUF_OR_PRESET --prompt "Once upon a time" [--max-new-tokens 32]
        [--device cuda] [--dtype bfloat16]        (default: CUDA in bfloat16 when present, as eval.py)

Before anything is allocated for a sequence, `check_memory` compares an estimate of what it needs
(`inference_bytes`) with the memory free on the device and refuses, in one line, a length that cannot fit.

Notation: T prompt tokens, S cached tokens, c prefill chunk, C model dim, F MLP dim, L layers, H query heads,
Hkv kv heads, D head dim, V vocab.
"""
from __future__ import annotations

import argparse
import sys

import torch

from checkpoint import load_model
from devices import add_device_flags, device_and_dtype
from errors import UserError, run_cli
from model import PRESETS, ModelConfig, Transformer
from tokenizer import load_tokenizer

HOST_BYTES_PER_TOKEN = 32  # a prompt's ids on the host: Python lists (8 bytes a slot, a copy or two) and int64s

# ----------------------------------------------------------------------------- pure functions


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """Greedy at temperature 0; else nucleus sampling (Holtzman et al. 2020) from logits (V,).

    The draw happens on the generator's device (the V probabilities move there when they are elsewhere,
    e.g. CUDA logits and a CPU generator), so one seeded generator gives the same tokens on any device.
    """
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest prefix with mass >= top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))


def inference_bytes(mc: ModelConfig, prompt: int, new: int, chunk: int | None, dtype_bytes: int,
                    device: torch.device) -> dict[str, int]:
    """Bytes beyond the weights of a prompt of T tokens prefilled in chunks of c = min(chunk, T) and continued
    by `new` tokens, by part (an upper bound): the cache, 2 L S Hkv D values for S = T + new; one block's
    activations for a chunk, c (4 C + (H + 2 Hkv) D + 3 F) values, and off CUDA, for a chunk after the first,
    its (c, T) boolean mask and the float32 bias SDPA makes of it, 5 c T bytes (model.cached_attention; on CUDA
    neither is formed; measured on CPU: +180 MiB peak for the tiny preset at T = 16384, c = 2048, of which
    160 MiB is this term); the last position's float32 logits; and the ids on the host (HOST_BYTES_PER_TOKEN)."""
    S, c = prompt + new, min(chunk or prompt, prompt)
    H, Hkv, D = mc.n_heads, mc.n_kv_heads, mc.head_dim
    return {"KV cache": 2 * mc.n_layers * S * Hkv * D * dtype_bytes,
            "activations": c * (4 * mc.dim + (H + 2 * Hkv) * D + 3 * mc.ffn_dim) * dtype_bytes
            + (5 * c * prompt if device.type != "cuda" and c < prompt else 0) + mc.vocab_size * 4,
            "token ids": S * HOST_BYTES_PER_TOKEN}


def free_memory(device: torch.device) -> int | None:
    """Bytes free for tensors: CUDA's free device memory, or Linux's MemAvailable; None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        return None


def check_memory(mc: ModelConfig, prompt: int, new: int, chunk: int | None, dtype_bytes: int,
                 device: torch.device, what: str, of_prompt: bool = False) -> None:
    """A UserError naming `what` (the flag that asked for the new tokens, or with of_prompt for the prompt's
    length) when inference_bytes exceeds the free memory: the estimate by part, what is free, and how many
    tokens `what` could ask for instead."""
    def need(k):  # bytes when `what` asks for k tokens
        return sum(inference_bytes(mc, k if of_prompt else prompt, new if of_prompt else k, chunk, dtype_bytes,
                                   device).values())

    free, asked = free_memory(device), prompt if of_prompt else new
    if free is None or need(asked) <= free:
        return
    lo, hi = 0, asked  # the most that fits, by bisection (the estimate grows with the tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= free else (lo, mid - 1)
    parts = ", ".join(f"{k} {v / 2**30:.3g}" for k, v in inference_bytes(mc, prompt, new, chunk, dtype_bytes,
                                                                        device).items())
    raise UserError(f"{what} {asked}: needs about {need(asked) / 2**30:.3g} GiB ({parts}), {free / 2**30:.3g} GiB "
                    f"is free on {device}; at most about {lo} fit")


# ----------------------------------------------------------------------------- entry points


@torch.no_grad()
def prefill(model: Transformer, tokens: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Run tokens (T,) through the KV cache in chunks; return the last position's logits (V,).

    Only one chunk's activations and its (chunk, S) attention mask exist at a time, and logits are
    computed for the final position alone, so no (T, V) tensor is formed.
    """
    T = tokens.shape[0]
    chunk = chunk or T
    for start in range(0, T, chunk):
        h = model.hidden(tokens[None, start:start + chunk], start=start)  # (1, c, C)
    return model.lm_head(h[0, -1]).float()


@torch.no_grad()
def generate(model: Transformer, tokens, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop_ids=None, prefill_chunk: int | None = None, generator: torch.Generator | None = None,
             until=None) -> list[int]:
    """Continue `tokens` (list or 1-D tensor) by up to `max_new_tokens`; return the new token ids.

    Stops after emitting any id in `stop_ids` (included in the output), or once `until(new ids)` is true
    (e.g. a stop string appeared in their text). Full attention always.
    """
    device = model.model.norm.weight.device
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=device).flatten()
    stop = set([stop_ids] if isinstance(stop_ids, int) else stop_ids or [])
    was_training = model.training
    model.eval()
    model.setup_caches(1, tokens.shape[0] + max_new_tokens)
    try:
        logits = prefill(model, tokens, prefill_chunk)
        out, pos = [], tokens.shape[0]
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, generator)
            out.append(nxt)
            if nxt in stop or (until is not None and until(out)):
                break
            h = model.hidden(torch.tensor([[nxt]], device=device), start=pos)
            logits, pos = model.lm_head(h[0, -1]).float(), pos + 1
        return out
    finally:
        model.clear_caches()
        model.train(was_training)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Greedily continue a prompt with a Llama checkpoint or preset.")
    ap.add_argument("--model", required=True, help="HF directory, .gguf file or preset")
    ap.add_argument("--tokenizer", default=None, help="default: the model's own; 'bytes' for presets")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    add_device_flags(ap)
    args = ap.parse_args(argv)

    def body():
        if args.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        device, dtype = device_and_dtype(args.device, args.dtype)  # as eval.py chooses them
        # A preset is random weights for tests: its vocabulary is sized to its tokenizer's (as eval.py does).
        preset = args.model in PRESETS
        tok = load_tokenizer(args.tokenizer or "bytes") if preset else None
        model = load_model(args.model, dtype=dtype, device=device, **({"vocab_size": tok.vocab_size} if preset else {}))
        tok = tok or load_tokenizer(args.tokenizer or args.model)
        prompt = tok.encode(args.prompt, bos=tok.bos_id is not None)
        check_memory(model.config, len(prompt), args.max_new_tokens, None, dtype.itemsize, device, "--max-new-tokens")
        ids = generate(model, prompt, args.max_new_tokens, stop_ids=tok.eos_id)
        print(args.prompt + tok.decode(ids))

    if run_cli(body):
        sys.exit(1)


if __name__ == "__main__":
    main()
