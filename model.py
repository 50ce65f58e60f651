"""Llama in pure PyTorch: config, model, checkpoint I/O (safetensors, GGUF), KV cache and generation.

The architecture is Llama 2/3 (Touvron et al. 2023; Grattafiori et al. 2024): pre-norm decoder blocks
    h = x + Attn(RMSNorm(x)),   out = h + MLP(RMSNorm(h)),
    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g,
    MLP(x) = W_down (silu(W_gate x) * W_up x)            (SwiGLU, Shazeer 2020),
with rotary positions (rope.py) and grouped-query attention (Ainslie et al. 2023): H query heads share
Hkv key/value heads, query head h reading kv head h // (H / Hkv).

Module names follow Hugging Face's LlamaForCausalLM, so `state_dict()` keys are exactly the checkpoint
names (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`, ...) and loading needs no renaming.

Attention seam: every forward takes `attn_fn(q, k, v) -> out` with q (B, H, T, D), k/v (B, Hkv, T, D)
and causal semantics. The default is full causal attention (`causal_attention`); training may pass
shifted sparse attention (shift_attn.py). Generation always uses full attention through the KV cache.

Notation: B batch, T tokens (this call), S cached + new tokens, H query heads, Hkv kv heads,
D head dim, C model dim, F ffn dim, V vocab.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts,
                                    noop_context_fn)

import rope
from shift_attn import AttnFn, causal_attention

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# ----------------------------------------------------------------------------- config


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0: dim // n_heads
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style dict, e.g. {"rope_type": "linear", "factor": 4.0}
    max_seq_len: int = 4096  # the context the weights were trained for (max_position_embeddings)
    tie_embeddings: bool = False
    bos_id: int | None = 1
    eos_id: int | list[int] | None = 2

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            self.rope_scaling.setdefault("original_max_position_embeddings", self.max_seq_len)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict) -> "ModelConfig":
        """Read a Hugging Face config.json (a directory, the file, or its dict), either RoPE spelling."""
        if isinstance(path_or_dict, dict):
            cfg, where = path_or_dict, "config"
        else:
            p = Path(path_or_dict)
            p = p / "config.json" if p.is_dir() else p
            cfg, where = read_json(p, "pass a Hugging Face model directory"), str(p)
        arch = cfg.get("model_type", "llama")
        if arch not in ("llama", "mistral") or cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise ValueError(f"{where}: model_type {arch!r} (or attention/MLP biases) is not a Llama model this project loads")
        try:
            theta, scaling = rope.rope_from_hf(cfg)
            n_heads = cfg["num_attention_heads"]
            return cls(
                vocab_size=cfg["vocab_size"],
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                head_dim=cfg.get("head_dim") or 0,
                ffn_dim=cfg["intermediate_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-5),
                rope_theta=theta,
                rope_scaling=scaling,
                max_seq_len=_original_len(cfg, scaling),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_id=cfg.get("bos_token_id"),
                eos_id=cfg.get("eos_token_id"),
            )
        except KeyError as e:
            raise ValueError(f"{where}: missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict:
        """config.json fields that transformers' LlamaForCausalLM loads back (RoPE in both spellings)."""
        max_pos = self.max_seq_len
        if self.rope_scaling and self.rope_scaling.get("factor"):
            max_pos = int(self.max_seq_len * self.rope_scaling["factor"])
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": max_pos,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            **rope.rope_to_hf(self.rope_theta, self.rope_scaling, head_dim=self.head_dim),
        }


def read_json(path: Path, hint: str) -> dict:
    """A JSON file's object, or one clear error naming the file (`hint` says what to pass instead)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _original_len(cfg: dict, scaling: dict | None) -> int:
    """The pre-extension context: a scaling's original length if it names one, else max_position_embeddings."""
    if scaling and scaling.get("original_max_position_embeddings"):
        return int(scaling["original_max_position_embeddings"])
    return int(cfg.get("max_position_embeddings", 4096))


PRESETS: dict[str, dict] = {
    # Tests: small enough to run anywhere; head_dim 16 with dim 64 and 4 heads, GQA 2.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160, max_seq_len=256,
                 bos_id=1, eos_id=2),
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True, bos_id=1, eos_id=2),
    "llama-2-7b": dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008,
                       rope_theta=10000.0, max_seq_len=4096, bos_id=1, eos_id=2),
    "llama-3-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                       rope_theta=500000.0, max_seq_len=8192, bos_id=128000, eos_id=[128001, 128009]),
    "llama-3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                         rope_theta=500000.0, max_seq_len=8192, bos_id=128000, eos_id=[128001, 128008, 128009],
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}

# ----------------------------------------------------------------------------- pure functions


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of T new queries at positions [start, start + T) over S = start + T cached keys.

    q (B, H, T, D), k/v (B, Hkv, S, D). Query i sees keys j <= start + i; the (T, S) boolean mask is the
    only extra memory, so a prefill chunk costs O(T * S), never O(S^2).
    """
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(start, start + T, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # mask (T, S)


def _chunk_nll(h: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (N, V) for one chunk only
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


class _FrozenHeadNLL(torch.autograd.Function):
    """sum NLL through a frozen linear head, with d/dh formed chunk by chunk during the forward pass.

    For logits z = h W^T:  dNLL/dz = softmax(z) - onehot(y)  (0 on unsupervised rows),  dNLL/dh = (dNLL/dz) W.
    Only one chunk's float32 logits exist at a time and backward just scales the stored (N, C) gradient,
    so the head costs two matmuls per chunk instead of three (forward, recompute, backward). The
    log-sum-exp and the softmax share one in-place exp(z - max) pass over the chunk (2.4x faster than
    torch.logsumexp followed by a second exp, measured on a 1024 x 32000 chunk).
    """

    @staticmethod
    def forward(ctx, h, weight, labels, chunk):  # h (N, C), weight (V, C), labels (N,)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        for s in range(0, h.shape[0], chunk):
            y = labels[s:s + chunk]
            keep = y != -100
            if not keep.any():
                continue
            z = (h[s:s + chunk] @ weight.T).float()  # (c, V)
            rows = torch.arange(z.shape[0], device=z.device)
            yc = y.clamp(min=0)
            z_y = z[rows, yc]  # (c,) target logits, before z is overwritten
            top = z.amax(-1, keepdim=True)  # (c, 1)
            z.sub_(top).exp_()  # exp(z - max), in place: one (c, V) buffer for the whole chunk
            denom = z.sum(-1, keepdim=True)  # (c, 1)
            total += ((top[:, 0] + denom[:, 0].log() - z_y) * keep).sum()  # logsumexp - z_y
            if grad_h is not None:
                z.div_(denom)  # softmax
                z[rows, yc] -= 1.0
                if not keep.all():
                    z[~keep] = 0.0
                grad_h[s:s + chunk] = (z.to(weight.dtype) @ weight)  # (c, C)
            del z  # else the next chunk's logits are allocated while these are still referenced
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad_h,) = ctx.saved_tensors
        return grad_h * g.to(grad_h.dtype), None, None, None


def chunked_cross_entropy(h: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """sum_t -log softmax(head(h_t))[labels_t] over supervised t, never forming a (T, V) tensor.

    h (B, T, C), labels (B, T). Each chunk of `chunk` tokens is projected to float32 logits and reduced to
    its NLL sum. A frozen bias-free nn.Linear head (the usual LoRA case) takes `_FrozenHeadNLL`, which
    forms the gradient during the forward pass; any other head (trained, or wrapped by LoRA) is
    checkpointed per chunk, so backward recomputes that chunk's logits instead of keeping all of them.

    Note: at T = 80K and V = 128K the full float32 logits alone would take 41 GB; one 1024-token chunk's
    float32 logits take 0.5 GB.
    """
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)  # (B*T, C), (B*T,)
    if type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad:
        return _FrozenHeadNLL.apply(h, head.weight, labels, chunk)
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hs, ls = h[s:s + chunk], labels[s:s + chunk]
        if not (ls != -100).any():
            continue
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_nll, hs, head, ls, use_reentrant=False)
        else:
            total = total + _chunk_nll(hs, head, ls)
    return total


def token_chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn(x) for a position-wise fn (the MLP), over chunks of `chunk` tokens of x (B, T, C), each chunk
    recomputed in backward, so only one chunk's intermediates exist at a time.

    Note: why. With per-block checkpointing, the largest live tensors at long context are the recomputed
    block's MLP activations and their gradients, ~6 F values per token (gate, up, silu, product; F = 14336
    for Llama-3-8B: 13.8 GB at T = 80K in bf16). Chunking the MLP over tokens (the idea of the tiled MLP
    in Arctic Long Sequence Training, Bekman et al. 2025) caps that at 6 F x chunk values, for one extra
    MLP forward per step.
    """
    return torch.cat([checkpoint(fn, piece, use_reentrant=False) for piece in x.split(chunk, dim=1)], dim=1)


_ATTENTION_OPS = tuple(getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"))


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def attention_saving_contexts():
    """Selective checkpointing contexts that keep SDPA's outputs (out and its log-sum-exp) and recompute
    everything else, so backward's recomputation of a block skips the O(T^2) attention forward.

    Note: the trade. Per layer it keeps T x H x D values (+ T x H float32 statistics): 8 KiB per token for
    the 4-layer benchmark model, but 21 GB at T = 80K for Llama-3-8B's 32 layers in bf16, hence opt-in
    (`save_attention`). What it saves: when attention dominates a step (long context), the recomputed
    attention forward is about 1/4.5 of its FLOPs (forward 1, recompute 1, backward ~2.5).
    """
    return create_selective_checkpoint_contexts(_keep_attention)


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, normalised in float32 and cast back before the gain."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: (B, Hkv, S_max, D) each."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, Hkv, T, D) at [start, start + T); return the filled prefix (B, Hkv, S, D)."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} tokens; {end} requested")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, attn_fn: AttnFn, cache: KVCache | None = None, start: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
        if cache is None:
            out = attn_fn(q, k, v)
        else:
            k, v = cache.update(start, k, v)  # (B, Hkv, S, D)
            out = cached_attention(q, k, v, start)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*D) -> (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_fn: AttnFn, cache: KVCache | None = None, start: int = 0,
                mlp_chunk: int = 0):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_fn, cache, start)
        if mlp_chunk and torch.is_grad_enabled() and h.shape[1] > mlp_chunk:
            return h + token_chunked(self.mlp, self.post_attention_layernorm(h), mlp_chunk)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """The `model.` prefix of Hugging Face names: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    """Llama decoder with an LM head. `checkpointing` recomputes each block in backward (training), except
    the attention itself with `save_attention`; `mlp_chunk` > 0 runs each MLP over that many tokens at a
    time under gradient (token_chunked)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpointing = False
        self.mlp_chunk = 0  # > 0: compute the MLP in chunks of this many tokens when training (token_chunked)
        self.save_attention = False  # with checkpointing: keep attention outputs (attention_saving_contexts)
        self.caches: list[KVCache] | None = None

    # -- positions

    def rope_tables(self, start: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (T, D) float32 for positions [start, start + T), attention scale folded in.

        Dynamic NTK rescales for the total length start + T, as transformers does.

        Note: the D/2 frequencies are recomputed per call instead of kept as a buffer, because
        `Module.to(torch.bfloat16)` would round a buffer to bf16 and break long positions (rope.py).
        """
        cfg = self.config
        inv_freq, scale = rope.rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, seq_len=start + T)
        positions = torch.arange(start, start + T, device=device)
        cos, sin = rope.rope_cos_sin(inv_freq.to(device), positions)
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos, sin

    # -- forward

    def hidden(self, tokens: torch.Tensor, start: int = 0, attn_fn: AttnFn | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) of tokens (B, T) at positions [start, start + T)."""
        attn_fn = attn_fn or causal_attention
        B, T = tokens.shape
        cos, sin = self.rope_tables(start, T, tokens.device)
        x = self.model.embed_tokens(tokens)  # (B, T, C)
        for i, layer in enumerate(self.model.layers):
            cache = self.caches[i] if self.caches is not None else None
            if self.checkpointing and self.training and torch.is_grad_enabled():
                contexts = attention_saving_contexts if self.save_attention else noop_context_fn
                x = checkpoint(layer, x, cos, sin, attn_fn, cache, start, self.mlp_chunk, use_reentrant=False,
                               context_fn=contexts)
            else:
                x = layer(x, cos, sin, attn_fn, cache, start, self.mlp_chunk)
        return self.model.norm(x)

    def forward(self, tokens: torch.Tensor, start: int = 0, attn_fn: AttnFn | None = None,
                labels: torch.Tensor | None = None, loss_chunk: int = 1024) -> torch.Tensor:
        """Logits (B, T, V) in the model dtype; with `labels` (B, T), the summed NLL (float32 scalar).

        labels[b, t] is the target of position t (already shifted), -100 where unsupervised.
        """
        h = self.hidden(tokens, start, attn_fn)
        if labels is None:
            return self.lm_head(h)
        return chunked_cross_entropy(h, self.lm_head, labels, loss_chunk)

    # -- generation state

    def setup_caches(self, batch: int, max_len: int):
        p = self.model.norm.weight
        cfg = self.config
        self.caches = [KVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, p.dtype, p.device) for _ in range(cfg.n_layers)]

    def clear_caches(self):
        self.caches = None

    # -- checkpoints

    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random N(0, std) weights, unit norms (as transformers initialises Llama), from a fixed seed."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device="cpu") -> "Transformer":
        """Load a Hugging Face safetensors directory or a .gguf file, strictly, one tensor at a time.

        The model is built on the meta device and each checkpoint tensor is assigned in place, so peak
        memory is about one copy of the weights.
        """
        cfg, tensors = read_checkpoint(path)
        with torch.device("meta"):
            model = cls(cfg)
        load_tensors(model, tensors, dtype=dtype, device=device)
        return model

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 2**30):
        """Write config.json and model.safetensors (sharded past `max_shard_bytes`), atomically."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        dtype = next(iter(state.values())).dtype
        config = {**self.config.to_hf(), "torch_dtype": str(dtype).removeprefix("torch.")}
        write_checkpoint(Path(path), state, config, max_shard_bytes)


# ----------------------------------------------------------------------------- checkpoint I/O


def read_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor, str]]]:
    """(config, lazy (name, tensor, file) items) of a .gguf file or a Hugging Face safetensors directory."""
    path = Path(path)
    if path.suffix == ".gguf":
        return read_gguf(path)
    return ModelConfig.from_hf(path), iter_checkpoint(path)


def iter_checkpoint(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Yield (name, tensor, file) from a safetensors checkpoint directory or file, one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES or path.is_dir() and not _safetensors_files(path) \
            and any(path.glob("*" + s) for s in PICKLE_SUFFIXES):
        raise ValueError(f"{path}: pickle checkpoints are never loaded (they can run code); convert once with "
                         "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")
    files = [path] if path.is_file() else _safetensors_files(path)
    if not files:
        raise FileNotFoundError(f"{path}: no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} found")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name), str(f)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: unreadable safetensors file ({e})") from None


def _safetensors_files(d: Path) -> list[Path]:
    if (d / SAFETENSORS_INDEX).is_file():
        try:
            weight_map = json.loads((d / SAFETENSORS_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{d / SAFETENSORS_INDEX}: not a safetensors index ({e})") from None
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard named in {SAFETENSORS_INDEX} is missing")
        return files
    return [d / SAFETENSORS_SINGLE] if (d / SAFETENSORS_SINGLE).is_file() else []


def load_tensors(model: nn.Module, tensors, dtype=None, device="cpu"):
    """Assign (name, tensor, file) items into a (meta-built) model, strictly, and re-tie the head.

    A name the model lacks, a shape that differs or a tensor never supplied is a ValueError naming it.
    Tied models accept a checkpoint with or without `lm_head.weight`.
    """
    expected = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.config, "tie_embeddings", False)
    seen = set()
    for name, t, f in tensors:
        if tied and name == "lm_head.weight":
            continue  # transformers may write the tied copy; the embedding is the one kept
        if name not in expected:
            raise ValueError(f"{f}: unexpected tensor {name!r} (not in a {_describe(model)})")
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(want.shape)}")
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        t = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        setattr(mod, leaf, nn.Parameter(t, requires_grad=want.requires_grad))
        seen.add(name)
    missing = [n for n in expected if n not in seen and not (tied and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def _describe(model) -> str:
    c = model.config
    return f"{c.n_layers}-layer model of dim {c.dim}"


def write_checkpoint(path: Path, state: dict[str, torch.Tensor], config: dict, max_shard_bytes: int):
    """Write config.json + safetensors shards into a temporary directory beside `path`, then rename it."""
    from safetensors.torch import save_file

    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path}: exists and is not empty; choose a new output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SAFETENSORS_SINGLE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if path.exists():
        path.rmdir()
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- GGUF import

GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


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


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time row permutation of q/k (interleaved pairs -> rotate-half halves)."""
    out_dim = w.shape[0]
    return w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: str | os.PathLike) -> tuple[ModelConfig, Iterator[tuple[str, torch.Tensor, str]]]:
    """Config and a lazy (name, float32 tensor, file) stream from a Llama-architecture GGUF file."""
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: reading GGUF needs the optional package 'gguf' (pip install gguf)") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError, ... on bad files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    n_heads = int(meta["llama.attention.head_count"])
    n_kv = int(meta.get("llama.attention.head_count_kv", n_heads))
    dim = int(meta["llama.embedding_length"])
    names = {t.name for t in reader.tensors}
    tok = reader.fields.get("tokenizer.ggml.tokens")
    cfg = ModelConfig(
        vocab_size=int(meta.get("llama.vocab_size") or len(tok.data)),
        dim=dim, n_layers=int(meta["llama.block_count"]), n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=int(meta.get("llama.rope.dimension_count", dim // n_heads)),
        ffn_dim=int(meta["llama.feed_forward_length"]),
        norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        max_seq_len=int(meta.get("llama.context_length", 4096)),
        tie_embeddings="output.weight" not in names,
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"), eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )

    def tensors():
        for t in reader.tensors:
            parts = t.name.split(".")
            if parts[0] == "blk":
                name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
            elif parts[0] in GGUF_NAMES:
                name = f"{GGUF_NAMES[parts[0]]}.{parts[1]}"
            else:
                raise ValueError(f"{path}: unknown GGUF tensor {t.name!r}")
            kind = t.tensor_type.name
            raw = torch.from_numpy(t.data.copy())
            if kind in ("F32", "F16", "BF16"):
                w = raw.view({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]).float()
            elif kind in ("Q8_0", "Q4_0", "Q4_1"):
                w = dequantize_gguf_block(raw, kind)
            else:
                raise ValueError(f"{path}: tensor {t.name!r} has type {kind}; supported: F32 F16 BF16 Q8_0 Q4_0 Q4_1")
            w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims fastest-first
            if name.endswith("q_proj.weight"):
                w = unpermute_qk(w, n_heads)
            elif name.endswith("k_proj.weight"):
                w = unpermute_qk(w, n_kv)
            yield name, w, str(path)

    return cfg, tensors()


def _field(reader, key):
    f = reader.fields.get(key)
    return int(f.contents()) if f is not None else None


# ----------------------------------------------------------------------------- generation


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """Greedy at temperature 0; else nucleus sampling (Holtzman et al. 2020) from logits (V,)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest prefix with mass >= top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


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
             stop_ids=None, prefill_chunk: int | None = None, generator: torch.Generator | None = None) -> list[int]:
    """Continue `tokens` (list or 1-D tensor) by up to `max_new_tokens`; return the new token ids.

    Stops after emitting any id in `stop_ids` (included in the output). Full attention always.
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
            if nxt in stop:
                break
            h = model.hidden(torch.tensor([[nxt]], device=device), start=pos)
            logits, pos = model.lm_head(h[0, -1]).float(), pos + 1
        return out
    finally:
        model.clear_caches()
        model.train(was_training)


# ----------------------------------------------------------------------------- entry points


def load_model(spec: str, dtype: torch.dtype | None = None, device="cpu", seed: int = 0, **overrides) -> Transformer:
    """A model from a preset name (random weights, for tests and dry runs), a HF directory or a .gguf file."""
    if spec in PRESETS:
        model = Transformer(ModelConfig.from_name(spec, **overrides)).init_weights(seed)
        return model.to(device=device, dtype=dtype) if dtype else model.to(device)
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"{spec}: no such model directory, file or preset ({', '.join(PRESETS)})")
    return Transformer.from_pretrained(p, dtype=dtype, device=device)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Load a Llama checkpoint; convert it or greedily continue a prompt.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="write a HF safetensors directory from a .gguf or HF checkpoint")
    c.add_argument("src")
    c.add_argument("out")
    g = sub.add_parser("generate", help="greedy continuation of a prompt")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "convert":
            load_model(args.src, dtype=torch.float32).save_pretrained(args.out)
            print(f"wrote {args.out}")
        else:
            from data import load_tokenizer

            model, tok = load_model(args.model, dtype=torch.float32), load_tokenizer(args.model)
            ids = generate(model, tok.encode(args.prompt, bos=True), args.max_new_tokens, stop_ids=tok.eos_id)
            print(args.prompt + tok.decode(ids))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
