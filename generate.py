"""Text generation with the KV cache: chunked prefill, greedy or nucleus sampling, and the model CLI.

Prefill runs the prompt through the per-layer KV caches (model.KVCache) in chunks, so only one chunk's
activations and its (chunk, S) attention mask exist at a time; decoding then feeds one token per step
at cache slot `start` = tokens so far. Attention is always full causal attention.

    python generate.py --model DIR_OR_GGUF_OR_PRESET --prompt "Once upon a time" [--max-new-tokens 32]
        [--device cuda] [--dtype bfloat16]        (default: CUDA in bfloat16 when present, as eval.py)

Notation: T prompt tokens, S cached tokens, C model dim, V vocab.
"""
from __future__ import annotations

import argparse
import sys

import torch

from checkpoint import load_model
from devices import add_device_flags, device_and_dtype
from errors import UserError, run_cli
from model import Transformer
from tokenizer import load_tokenizer

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
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    add_device_flags(ap)
    args = ap.parse_args(argv)

    def body():
        if args.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        device, dtype = device_and_dtype(args.device, args.dtype)  # as eval.py chooses them
        model, tok = load_model(args.model, dtype=dtype, device=device), load_tokenizer(args.model)
        ids = generate(model, tok.encode(args.prompt, bos=True), args.max_new_tokens, stop_ids=tok.eos_id)
        print(args.prompt + tok.decode(ids))

    if run_cli(body):
        sys.exit(1)


if __name__ == "__main__":
    main()
