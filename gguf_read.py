"""GGUF reading (ggml's file format for llama.cpp, Gerganov 2023): a Llama model's config, tensors, vocabulary.

A .gguf file holds typed metadata keys (`llama.*` architecture, `tokenizer.ggml.*` vocabulary) and
tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output). Reading:
  - tensors renamed to Hugging Face Llama names (GGUF_NAMES), F32/F16/BF16 cast and Q8_0/Q4_0/Q4_1
    blocks dequantized to float32 (dequantize_gguf_block), dims reversed (GGUF lists them fastest-first);
  - q and k rows permuted back from llama.cpp's interleaved pairs (2i, 2i + 1) to Hugging Face's
    rotate-half layout (channel i pairs with i + D/2): per head (D/2, 2, I) -> (2, D/2, I) (unpermute_qk;
    permute_qk, its inverse, is what gguf_export.py writes);
  - RoPE from llama.cpp's keys (freq_base, scaling.type linear/yarn, a Llama-3.1 `rope_freqs` table);
  - the embedded byte-level BPE as a `tokenizers` object (read_gguf_tokenizer; tokenizer.py wraps it).
checkpoint.read_checkpoint and tokenizer.load_tokenizer call in here; the optional package `gguf` parses
the file (without it, one UserError naming the file) and `tokenizers` builds the BPE.

Notation: H heads (query or kv), D head dim, I in features.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator

import torch

import rope
from errors import UserError
from model import ModelConfig

GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}

Items = Iterator[tuple[str, torch.Tensor, str]]  # (name, tensor, file it came from)

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ----------------------------------------------------------------------------- pure functions


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face rotate-half rows -> llama.cpp interleaved pairs. w (H*D, I); inverse of unpermute_qk."""
    pairs = w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])  # (H, 2, D/2, I)
    return pairs.transpose(1, 2).reshape(w.shape)  # (H, D/2, 2, I) -> (H*D, I)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp interleaved pairs -> Hugging Face rotate-half rows (undoes its convert-time permutation of
    q and k). w (H*D, I); inverse of permute_qk."""
    pairs = w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])  # (H, D/2, 2, I)
    return pairs.transpose(1, 2).reshape(w.shape)  # (H, 2, D/2, I) -> (H*D, I)


def dequantize_gguf_block(data: torch.Tensor, kind: str) -> torch.Tensor:
    """Dequantize llama.cpp blocks of 32 weights. data: (..., bytes) uint8 -> (..., n) float32.

    Q8_0: [d f16][32 x int8]             x = d * q
    Q4_0: [d f16][16 bytes]              x = d * (q - 8)
    Q4_1: [d f16][m f16][16 bytes]       x = d * q + m
    In the 4-bit kinds byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
    """
    head = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}[kind]
    block = head + (32 if kind == "Q8_0" else 16)
    lead = data.shape[:-1]
    blocks = data.reshape(*lead, -1, block)  # (..., nblocks, block bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # (..., nblocks, 1)
    qs = blocks[..., head:]
    if kind == "Q8_0":
        x = d * qs.contiguous().view(torch.int8).float()
    else:
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()  # (..., nblocks, 32)
        x = d * (q - 8) if kind == "Q4_0" else d * q + blocks[..., 2:4].contiguous().view(torch.float16).float()
    return x.reshape(*lead, -1)


# ----------------------------------------------------------------------------- reading


def open_gguf(path: str | os.PathLike):
    """A gguf.GGUFReader over `path`, or one UserError naming the file (missing package, file or format)."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"{path}: reading GGUF needs the optional package 'gguf' (pip install gguf)") from None
    if not Path(path).is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError, ... on bad files
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str):
    """A metadata key's value (str, number or list), or None when the file lacks it."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _int_field(reader, key: str) -> int | None:
    value = _field(reader, key)
    return None if value is None else int(value)


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, Items]:
    """Config and a lazy (name, float32 tensor, file) stream from a Llama-architecture GGUF file."""
    path = Path(path)
    reader = open_gguf(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    names = {t.name for t in reader.tensors}
    tok = reader.fields.get("tokenizer.ggml.tokens")
    try:
        n_heads = int(meta["llama.attention.head_count"])
        n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
        dim = int(meta["llama.embedding_length"])
        cfg = ModelConfig(
            vocab_size=int(meta.get("llama.vocab_size") or (len(tok.data) if tok is not None else 0)),
            dim=dim, n_layers=int(meta["llama.block_count"]), n_heads=n_heads, n_kv_heads=n_kv,
            head_dim=int(meta.get("llama.rope.dimension_count", dim // n_heads)),
            ffn_dim=int(meta["llama.feed_forward_length"]),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            **_gguf_rope(path, meta, reader, dim // n_heads if "llama.rope.dimension_count" not in meta
                         else int(meta["llama.rope.dimension_count"])),
            tie_embeddings="output.weight" not in names,
            bos_id=_int_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_id=_int_field(reader, "tokenizer.ggml.eos_token_id"),
        )
    except KeyError as e:
        raise UserError(f"{path}: GGUF metadata lacks {e.args[0]!r}") from None
    except ValueError as e:  # ModelConfig's checks
        raise UserError(f"{path}: {e}") from None

    def tensors():
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":  # read into cfg.rope_scaling by _gguf_rope
                continue
            parts = t.name.split(".")
            if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_NAMES:
                name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
            elif parts[0] in GGUF_NAMES and len(parts) == 2:
                name = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
            else:
                raise UserError(f"{path}: unknown GGUF tensor {t.name!r}")
            kind = t.tensor_type.name
            raw = torch.from_numpy(t.data.copy())
            if kind in ("F32", "F16", "BF16"):
                w = raw.view({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]).float()
            elif kind in ("Q8_0", "Q4_0", "Q4_1"):
                w = dequantize_gguf_block(raw, kind)
            else:
                raise UserError(f"{path}: tensor {t.name!r} has type {kind}; supported: F32 F16 BF16 Q8_0 Q4_0 Q4_1")
            w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims fastest-first
            if name.endswith("q_proj.weight"):
                w = unpermute_qk(w, n_heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute_qk(w, n_kv)
            yield name, w, str(path)

    return cfg, tensors()


def _gguf_rope(path: Path, meta: dict, reader, head_dim: int) -> dict:
    """rope_scaling and max_seq_len (L0) of ModelConfig from llama.cpp's RoPE keys.

    rope.scaling.type linear / yarn with factor s and original_context_length L0 (default
    context_length / s); a `rope_freqs` table (Llama 3.1: llama.cpp divides theta_i by f_i) is read as
    llama3 scaling with s = max f_i, low/high frequency factors 1 and 4 and L0 from
    original_context_length or from a blended channel (1/f = (1 - g)/s + g, L0 = lambda (1 + 3 g)),
    and accepted only if that rule reproduces the table to 1e-5.
    """
    ctx = int(meta.get("llama.context_length", 4096))
    kind = meta.get("llama.rope.scaling.type", "none")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        f = torch.from_numpy(freqs.data.copy()).float().reshape(-1)
        theta = float(meta.get("llama.rope.freq_base", 10000.0))
        s = float(f.max())
        plain = rope.default_inv_freq(head_dim, theta)
        original = meta.get("llama.rope.scaling.original_context_length")
        blended = ((f > 1 + 1e-6) & (f < s * (1 - 1e-6))).nonzero()
        if original is None and len(blended):
            i = int(blended[0])
            g = (1 / float(f[i]) - 1 / s) / (1 - 1 / s)
            original = round(2 * math.pi / float(plain[i]) * (1 + 3 * g))
        original = int(original or ctx / s)
        scaling = {"rope_type": "llama3", "factor": s, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": original}
        if s < 1 or f.numel() != head_dim // 2 or not torch.allclose(
                plain / rope.rope_frequencies(head_dim, theta, scaling)[0], f, rtol=1e-5):
            raise UserError(f"{path}: rope_freqs is not a Llama-3.1 frequency table (low 1, high 4); "
                            "such a table cannot be loaded")
        return {"rope_scaling": scaling, "max_seq_len": original}
    if kind in ("linear", "yarn"):
        s = float(meta.get("llama.rope.scaling.factor", 1.0))
        original = int(meta.get("llama.rope.scaling.original_context_length") or ctx / s)
        return {"rope_scaling": {"rope_type": kind, "factor": s, "original_max_position_embeddings": original},
                "max_seq_len": original}
    if kind != "none":
        raise UserError(f"{path}: llama.rope.scaling.type {kind!r} is not supported (none, linear, yarn)")
    return {"max_seq_len": ctx}


def read_gguf_tokenizer(path: str | os.PathLike):
    """(tokenizers.Tokenizer, info): the byte-level BPE a GGUF file embeds (`tokenizer.ggml.model == "gpt2"`),
    built as llama.cpp builds it; info holds bos_id, eos_id, chat_template and add_bos.

    The vocabulary is already spelled in GPT-2's byte-to-unicode alphabet; merges are "a b" strings;
    token type 3 (CONTROL) marks special tokens, 4 (USER_DEFINED) added non-special ones. The
    pre-tokenizer follows `tokenizer.ggml.pre` as in llama-vocab.cpp: "smollm" (also starcoder,
    refact) = each digit alone, then the GPT-2 regex; "llama-bpe"/"llama3" = the Llama-3 regex;
    anything else = the GPT-2 regex.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    reader = open_gguf(path)
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise UserError(f"{path}: tokenizer.ggml.model is {model_kind!r}; only byte-level BPE ('gpt2') GGUF "
                        f"tokenizers are supported, use the model's tokenizer.json or tokenizer.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _field(reader, "tokenizer.ggml.pre") or "default"
    llama3 = pre in ("llama-bpe", "llama3", "llama-v3")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=llama3))
    if llama3:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("smollm", "starcoder", "refact"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    return tok, {"bos_id": _int_field(reader, "tokenizer.ggml.bos_token_id"),
                 "eos_id": _int_field(reader, "tokenizer.ggml.eos_token_id"),
                 "chat_template": _field(reader, "tokenizer.chat_template"),
                 "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token"))}
