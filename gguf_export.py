"""GGUF export: a Llama checkpoint and its tokenizer as one file for llama.cpp, Ollama and LM Studio.

The file follows what llama.cpp's own converter (convert_hf_to_gguf.py) writes for a Llama model:
  - `llama.*` architecture keys (context_length = the extended length L0 * s, embedding_length,
    block_count, feed_forward_length, head counts, rms epsilon, rope.dimension_count, vocab_size);
  - tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output), 1-D norms in
    F32, weights in F32/F16/BF16 or Q8_0 blocks of 32 (x = d * q, d = max|x| / 127, q int8; rows whose
    length is not a multiple of 32 stay F16, as llama.cpp's converter falls back);
  - q and k rows permuted from Hugging Face's rotate-half layout (channel i pairs with i + D/2) to
    llama.cpp's interleaved pairs (2i, 2i + 1): per head, w.reshape(2, D/2, I).transpose -> (D/2, 2, I),
    gguf_read.permute_qk (the inverse of gguf_read.unpermute_qk);
  - RoPE in llama.cpp's terms:
        plain           rope.freq_base = theta
        linear (PI)     rope.scaling.type = "linear", rope.scaling.factor = s
        yarn            rope.scaling.type = "yarn", factor s, rope.scaling.original_context_length L0
                        (llama.cpp's defaults beta_fast 32, beta_slow 1, attention scale 0.1 ln s + 1)
        ntk (fixed)     a plain base change, freq_base = theta * s^(D/(D-2)) (identical frequencies)
        llama3          the Llama-3.1 table as tensor `rope_freqs.weight` (D/2,) F32 of factors
                        f_i = theta_i / theta'_i, which llama.cpp divides each frequency by
    Dynamic NTK (the base depends on the current length) and YaRN with non-default betas or attention
    factor are not stored settings of llama.cpp, so they are a UserError rather than a wrong file;
  - the tokenizer embedded: byte-level BPE from tokenizer.json as tokenizer.ggml.model "gpt2" (tokens,
    token types NORMAL 1 / CONTROL 3 for special added tokens / USER_DEFINED 4, merges, and
    tokenizer.ggml.pre naming llama.cpp's pre-tokenizer regex: "gpt-2", "llama-bpe" or "smollm"),
    SentencePiece from tokenizer.model as "llama" (pieces, scores, types NORMAL/UNKNOWN/CONTROL/UNUSED/
    BYTE), the bos/eos ids, add_bos_token and the chat template; a .gguf source's tokenizer.* keys are
    copied as they are. The project's byte tokenizer has no llama.cpp equivalent and is refused.

    python gguf_export.py SRC OUT.gguf [--type f16|bf16|q8_0|f32] [--tokenizer PATH]

SRC is a Hugging Face safetensors directory or a .gguf file. The file is written through
outputs.atomic_path; an OUT that is a folder, or SRC itself, is refused before anything is read. Notation: O out features, I in features, H heads, D head dim, s scaling
factor, L0 original context.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

import rope
from checkpoint import read_checkpoint
from errors import UserError, run_cli
from gguf_read import GGUF_NAMES, LLAMA3_SPLIT, open_gguf, permute_qk
from model import ModelConfig
from outputs import atomic_path, check_output
from tokenizer import HFTokenizer, load_tokenizer

# ----------------------------------------------------------------------------- constants

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType numbers
HF_TO_GGUF = {hf: g for g, hf in GGUF_NAMES.items()}
Q8_BLOCK = 32
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# ----------------------------------------------------------------------------- pure functions


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks of a float tensor (..., n), n % 32 == 0 -> uint8 (..., n / 32 * 34).

    Per block of 32: d = max|x| / 127 stored as f16, q = round(x / d) as int8; x ~ d * q
    (gguf_read.dequantize_gguf_block is the inverse). Done by the gguf package's bit-exact port of ggml.
    """
    import gguf

    return gguf.quants.quantize(w.float().numpy(), gguf.GGMLQuantizationType.Q8_0)


def rope_keys(cfg: ModelConfig) -> tuple[dict[str, float | int | str], torch.Tensor | None]:
    """(llama.* RoPE metadata, rope_freqs factors (D/2,) or None) for a config; UserError if unsupported."""
    theta, scaling, D = float(cfg.rope_theta), cfg.rope_scaling, cfg.head_dim
    if scaling is None or scaling.get("rope_type", scaling.get("type")) == "default":
        return {"rope.freq_base": theta, "context_length": cfg.max_seq_len}, None
    kind, s = scaling.get("rope_type", scaling.get("type")), float(scaling["factor"])
    L0 = int(scaling["original_max_position_embeddings"])
    ctx = int(L0 * s)
    if kind == "ntk":
        return {"rope.freq_base": rope.ntk_base(theta, s, D), "context_length": ctx}, None
    if kind == "linear":
        return {"rope.freq_base": theta, "context_length": ctx, "rope.scaling.type": "linear",
                "rope.scaling.factor": s}, None
    if kind == "yarn":
        default_scale = 0.1 * math.log(s) + 1.0 if s > 1 else 1.0
        odd = [k for k, want in (("beta_fast", rope.YARN_BETA_FAST), ("beta_slow", rope.YARN_BETA_SLOW))
               if scaling.get(k) not in (None, 0, want)]
        odd += [k for k in ("mscale", "mscale_all_dim") if scaling.get(k)]
        if scaling.get("attention_factor") not in (None, default_scale):
            odd.append("attention_factor")
        if scaling.get("truncate", True) is not True:
            odd.append("truncate")
        if odd:
            raise UserError(f"rope scaling: yarn with {', '.join(odd)} set has no llama.cpp equivalent "
                            "(it uses beta_fast 32, beta_slow 1 and attention scale 0.1 ln s + 1)")
        return {"rope.freq_base": theta, "context_length": ctx, "rope.scaling.type": "yarn",
                "rope.scaling.factor": s, "rope.scaling.original_context_length": L0}, None
    if kind == "llama3":
        plain = rope.default_inv_freq(D, theta)
        scaled, _ = rope.rope_frequencies(D, theta, scaling)
        return {"rope.freq_base": theta, "context_length": ctx,
                "rope.scaling.original_context_length": L0}, (plain / scaled).float()
    raise UserError(f"rope scaling: {kind!r} has no llama.cpp setting (llama.cpp stores linear and yarn "
                    "scaling, a base change and the Llama-3.1 table); extend with linear, yarn or ntk instead")


def bpe_pre(pre_tokenizer: dict | None, where: str) -> str:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json pre_tokenizer, or a UserError if none matches."""
    def byte_level(p, regex):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex and not p.get("add_prefix_space")

    p = pre_tokenizer or {}
    seq = p.get("pretokenizers", []) if p.get("type") == "Sequence" else [p]
    if len(seq) == 1 and byte_level(seq[0], True):
        return "gpt-2"
    if len(seq) == 2 and seq[0].get("type") == "Digits" and seq[0].get("individual_digits") and byte_level(seq[1], True):
        return "smollm"
    if (len(seq) == 2 and seq[0].get("type") == "Split" and seq[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and byte_level(seq[1], False)):
        return "llama-bpe"
    raise UserError(f"{where}: pre_tokenizer {json.dumps(p)[:200]} has no llama.cpp equivalent (supported: "
                    "GPT-2 ByteLevel, Llama-3's Split + ByteLevel, SmolLM2's Digits + ByteLevel)")


# ----------------------------------------------------------------------------- tokenizer metadata


def _padded(tokens: list, types: list[int], vocab_size: int, where: str) -> tuple[list, list[int]]:
    """Tokens up to the model's vocabulary: missing ids become "[PADi]" USER_DEFINED, as llama.cpp pads."""
    if len(tokens) > vocab_size:
        raise UserError(f"{where}: {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
    extra = range(len(tokens), vocab_size)
    return tokens + [f"[PAD{i}]" for i in extra], types + [TOKEN_USER_DEFINED] * len(extra)


def _specials(tok, writer) -> None:
    if tok.bos_id is not None:
        writer.add_bos_token_id(int(tok.bos_id))
    if tok.eos_id is not None:
        writer.add_eos_token_id(int(tok.eos_id))
    writer.add_add_bos_token(bool(tok.add_bos))
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _bpe_keys(tok: HFTokenizer, path: Path, vocab_size: int, writer) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel" or data.get("normalizer"):
        raise UserError(f"{path}: only byte-level BPE tokenizer.json files (BPE model, ByteLevel decoder, no "
                        "normalizer) map onto llama.cpp's 'gpt2' tokenizer")
    pre = bpe_pre(data.get("pre_tokenizer"), str(path))
    by_id = {i: t for t, i in model["vocab"].items()}
    kinds = {}
    for a in data.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        kinds[a["id"]] = TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED
    n = max(by_id) + 1
    if n > vocab_size:
        raise UserError(f"{path}: token id {n - 1} is outside the model's vocab_size {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [kinds.get(i, TOKEN_NORMAL if i in by_id else TOKEN_USER_DEFINED) for i in range(n)]
    tokens, types = _padded(tokens, types, vocab_size, str(path))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _specials(tok, writer)


def _sentencepiece_keys(tok, vocab_size: int, writer) -> None:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tok.name)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(TOKEN_UNKNOWN if sp.is_unknown(i) else TOKEN_CONTROL if sp.is_control(i) else
                     TOKEN_UNUSED if sp.is_unused(i) else TOKEN_BYTE if sp.is_byte(i) else TOKEN_NORMAL)
    n = len(tokens)
    tokens, types = _padded(tokens, types, vocab_size, tok.name)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores + [-1000.0] * (len(tokens) - n))
    writer.add_token_types(types)
    if sp.unk_id() >= 0:
        writer.add_unk_token_id(sp.unk_id())
    config = Path(tok.name).parent / "tokenizer_config.json"
    if config.is_file():  # Llama-2's chat template lives beside the model file
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        tok.chat_template = template if isinstance(template, str) else None
    _specials(tok, writer)


def _copy_gguf_tokenizer(path: Path, writer) -> None:
    reader = open_gguf(path)
    keys = [k for k in reader.fields if k.startswith("tokenizer.")]
    if "tokenizer.ggml.model" not in keys:
        raise UserError(f"{path}: has no embedded tokenizer (tokenizer.ggml.*); pass --tokenizer")
    for k in keys:
        f = reader.fields[k]
        writer.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[1] if len(f.types) > 1 else None)


def tokenizer_keys(spec: str | os.PathLike, vocab_size: int, writer) -> None:
    """Write the tokenizer.* keys for a tokenizer.json / tokenizer.model / .gguf / folder holding one."""
    p = Path(spec)
    if str(spec) != "bytes" and p.suffix == ".gguf":
        return _copy_gguf_tokenizer(p, writer)
    tok = load_tokenizer(spec)
    if tok.kind == "tokenizer.json":
        return _bpe_keys(tok, Path(tok.name), vocab_size, writer)
    if tok.kind == "sentencepiece":
        return _sentencepiece_keys(tok, vocab_size, writer)
    raise UserError(f"{spec}: the {tok.kind} tokenizer has no llama.cpp equivalent; pass --tokenizer with "
                    "a tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece)")


# ----------------------------------------------------------------------------- export


class _NoWriter:
    """A GGUFWriter stand-in that records nothing: tokenizer_keys runs its checks without a file."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def check_exportable(cfg: ModelConfig, tokenizer: str | os.PathLike) -> None:
    """Everything export_gguf would refuse in the model's RoPE and its tokenizer, checked without weights
    (the trainer's --merge --gguf runs this before training)."""
    rope_keys(cfg)
    tokenizer_keys(tokenizer, cfg.vocab_size, _NoWriter())


def _gguf_name(name: str, where: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:-1]) in HF_TO_GGUF:
        return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"
    stem, _, suffix = name.rpartition(".")
    if stem in HF_TO_GGUF:
        return f"{HF_TO_GGUF[stem]}.{suffix}"
    raise UserError(f"{where}: tensor {name!r} has no GGUF name (only Llama tensors are exported)")


def _encoded(w: torch.Tensor, ftype: str):
    """(data, raw_dtype or None) for the writer: 1-D tensors F32, weights by `ftype`."""
    import gguf

    T = gguf.GGMLQuantizationType
    if w.dim() == 1 or ftype == "f32":
        return w.float().numpy(), None
    if ftype == "q8_0" and w.shape[-1] % Q8_BLOCK == 0:
        return quantize_q8_0(w), T.Q8_0
    if ftype == "bf16":
        return gguf.quants.quantize(w.float().numpy(), T.BF16), T.BF16
    return w.to(torch.float16).numpy(), None


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, ftype: str = "f16",
                tokenizer: str | os.PathLike | None = None) -> Path:
    """Write SRC (HF safetensors directory or .gguf) with its tokenizer as a llama.cpp GGUF file at `out`.

    ftype: f32, f16, bf16 or q8_0. tokenizer: default SRC itself (its tokenizer.json / tokenizer.model,
    or a .gguf's embedded tokenizer). Everything is checked before the file is opened.
    """
    try:
        import gguf
    except ImportError:
        raise UserError("writing GGUF needs the optional package 'gguf' (pip install gguf)") from None
    if ftype not in FILE_TYPES:
        raise UserError(f"--type {ftype!r}: choose one of {', '.join(FILE_TYPES)}")
    out = check_output(out, "file", "OUT", inputs=[src, tokenizer])
    cfg, items = read_checkpoint(src)
    keys, rope_freqs = rope_keys(cfg)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama", use_temp_file=True)
        w.add_name(Path(src).stem if Path(src).suffix == ".gguf" else Path(src).name)
        w.add_file_type(FILE_TYPES[ftype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for k, v in {"embedding_length": cfg.dim, "block_count": cfg.n_layers, "feed_forward_length": cfg.ffn_dim,
                     "attention.head_count": cfg.n_heads, "attention.head_count_kv": cfg.n_kv_heads,
                     "rope.dimension_count": cfg.head_dim, "vocab_size": cfg.vocab_size}.items():
            w.add_uint32(f"llama.{k}", int(v))
        w.add_float32("llama.attention.layer_norm_rms_epsilon", float(cfg.norm_eps))
        if cfg.head_dim != cfg.dim // cfg.n_heads:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        for k, v in keys.items():
            if isinstance(v, str):
                w.add_string(f"llama.{k}", v)
            elif isinstance(v, int):
                w.add_uint32(f"llama.{k}", v)
            else:
                w.add_float32(f"llama.{k}", v)
        tokenizer_keys(tokenizer if tokenizer is not None else src, cfg.vocab_size, w)
        if rope_freqs is not None:
            w.add_tensor("rope_freqs.weight", rope_freqs.numpy())
        for name, t, _ in items:
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue
            t = t.float()
            if name.endswith("q_proj.weight"):
                t = permute_qk(t, cfg.n_heads)
            elif name.endswith("k_proj.weight"):
                t = permute_qk(t, cfg.n_kv_heads)
            data, raw = _encoded(t, ftype)
            w.add_tensor(_gguf_name(name, str(src)), data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a Llama checkpoint and its tokenizer as a GGUF file "
                                             "for llama.cpp / Ollama / LM Studio.")
    ap.add_argument("src", help="HF safetensors directory or .gguf file")
    ap.add_argument("out", help="output .gguf file")
    ap.add_argument("--type", default="f16", choices=tuple(FILE_TYPES), help="tensor type of the weights")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json, tokenizer.model, .gguf or a folder "
                                                      "holding one (default: the one in SRC)")
    args = ap.parse_args(argv)
    if run_cli(lambda: print(f"wrote {export_gguf(args.src, args.out, args.type, args.tokenizer)}")):
        sys.exit(1)


if __name__ == "__main__":
    main()
