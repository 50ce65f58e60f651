"""LoRA and QLoRA adapters by module replacement: LoRALinear, float32 masters, apply, merge, dequantize.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Sec. 4.1) freezes a
pretrained weight W0 (O, I) and learns a rank-r update:

    y = W0 x + s * B A dropout(x),     A (r, I),  B (O, r),
    s = alpha / r                      (LoRA),
    s = alpha / sqrt(r)                (rsLoRA, Kalajdzievski 2023, "A Rank Stabilization Scaling Factor"),

with A ~ Kaiming-uniform(a = sqrt(5)) and B = 0, so the adapted model equals the base model at step 0.
QLoRA (Dettmers et al. 2023, Sec. 3) keeps W0 in 4-bit NF4 (quant4.py) and trains A, B in 16/32-bit:
the base output is computed from the dequantized weight and the adapter branch in the activations' dtype.
LongLoRA (Chen et al. 2023, Sec. 3.3, "Improved LoRA for long context") additionally trains the token
embeddings and the normalization layers in full; `apply_lora(trainable=("embed", "norm"))` does that.
Merging folds the update into the weight: W' = W0 + s * B A (computed in float32).

Note: float32 master weights. Every trained tensor is kept in float32 whatever the base dtype: in bf16,
1.0 + 2e-3 rounds back to 1.0 (8 significant bits), so a bf16 norm gain or embedding under AdamW at the
recipes' learning rates would never move. LoRA's A and B are float32 by default (PEFT's
`autocast_adapter_dtype`), a trained embedding, norm or head over a 16-bit base is upcast in place, and
each is rounded to the activations' dtype at use (LoRALinear, MasterEmbedding, MasterLinear, model.RMSNorm):
the forward is the 16-bit model with the rounded weights, the gradient reaches the float32 tensor through
the cast, and AdamW and the micro-step accumulation act on float32 (no copy-back step, no second tensor
to checkpoint), as memory_plan.memory_plan assumes.

Adapter files (PEFT's format), loading, export and the merge command live in lora_peft.py.

Notation: N leading dims (batch x tokens), I in features, O out features, r rank, s scaling, V vocab, C dim.

Note: tied embeddings. When the LM head shares the embedding matrix (SmolLM2), "embed" and "lm_head"
name the same tensor: training one trains both, as PEFT does with `ensure_weight_tying=True`
(lora_peft.save_adapter stores the matrix under both names, PEFT's layout, and writes that flag).

Note: order with 4-bit weights. Quantize first (quant4.quantize_model), then apply_lora: LoRA wraps any
layer with in_features/out_features and either `.weight` or `.dequantize()`. Quantizing after apply_lora
would quantize the adapters themselves.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoint import strict_items
from errors import UserError, check_range

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_LINEARS = ATTN_PROJ + ("gate_proj", "up_proj", "down_proj")  # "all-linear"; never lm_head
ALL_LINEAR = "all-linear"
NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "norm")
TRAINABLE_KINDS = ("embed", "norm", "lm_head")
EMBED = "model.embed_tokens"
LM_HEAD = "lm_head"

# ----------------------------------------------------------------------------- pure functions


def lora_scaling(r: int, alpha: float, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, Eq. 5)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def resolve_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    """Leaf names of the projections to adapt, in Llama order; "all-linear" is the 7 projections."""
    names = [targets] if isinstance(targets, str) else list(targets)
    if names == [ALL_LINEAR]:
        return LLAMA_LINEARS
    unknown = [n for n in names if n not in LLAMA_LINEARS]
    if unknown or not names:
        raise UserError(f"LoRA: unknown target {unknown[0] if unknown else '(none)'!r}; "
                         f"choose from {', '.join(LLAMA_LINEARS)} or {ALL_LINEAR!r}")
    return tuple(n for n in LLAMA_LINEARS if n in names)


def merged_weight(base: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """W' = W0 + s * B A in float32, cast to `dtype` (default: W0's dtype). W0 may be 4-bit (dequantized)."""
    w0 = base_weight(base)  # (O, I)
    delta = B.detach().float() @ A.detach().float()  # (O, r) @ (r, I) -> (O, I)
    return (w0.float() + scaling * delta).to(dtype or w0.dtype)


def base_weight(base: nn.Module) -> torch.Tensor:
    """The (O, I) weight of an nn.Linear, or of a quantized linear through its `dequantize()`."""
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.detach()
    return base.dequantize()


def is_linear(m: nn.Module) -> bool:
    """Duck-typed linear: in/out features and a `.weight` tensor (nn.Linear) or `.dequantize()` (4-bit)."""
    return (hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, LoRALinear)
            and (isinstance(getattr(m, "weight", None), torch.Tensor) or callable(getattr(m, "dequantize", None))))


def _device(m: nn.Module) -> torch.device:
    t = next(iter(m.parameters()), next(iter(m.buffers()), None))
    return t.device if t is not None else torch.device("cpu")


def plain_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A frozen nn.Linear holding `weight` (O, I) and base's bias (cast to weight's dtype)."""
    bias = getattr(base, "bias", None)
    out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().to(weight.dtype).clone(), requires_grad=False)
    return out


# ----------------------------------------------------------------------------- modules


class LoRALinear(nn.Module):
    """y = base(x) + s * B A dropout(x); `base` frozen (nn.Linear or 4-bit), A and B trainable.

    The branch runs in x's dtype with A and B rounded to it (as torch.autocast runs PEFT's float32 branch):
    casting x up instead, as PEFT does, keeps a float32 copy of x for A's gradient in every adapted
    projection (a bf16 Llama-3-8B block then saved 0.78x its float32 bytes for backward, not 0.50x).
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dtype: torch.dtype | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA: rank r must be >= 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA: dropout must be in [0, 1), got {dropout}")
        w = getattr(base, "weight", None)
        if dtype is None:  # a float base lends its dtype; a packed 4-bit base gets fp32 adapters
            dtype = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scaling(r, alpha, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=_device(base), dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=_device(base), dtype=dtype)
        self.reset_lora(generator)

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None):
        """A ~ Kaiming-uniform(a=sqrt(5)) (PEFT's and nn.Linear's default: U(-1/sqrt(I), 1/sqrt(I))), B = 0."""
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32, device="cpu")  # (r, I), CPU: same draw anywhere
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (N, O)
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)  # (r, I), (O, r)
        h = F.linear(F.linear(self.dropout(x), a), b)  # (N, I) -> (N, r) -> (N, O)
        return (y + h * self.scaling).to(y.dtype)

    def merged(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain frozen nn.Linear with W' = W0 + s * B A (see merged_weight)."""
        return plain_linear(self.base, merged_weight(self.base, self.lora_A.weight, self.lora_B.weight,
                                                     self.scaling, dtype))

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}"


class MasterEmbedding(nn.Embedding):
    """An embedding whose trained weight is a float32 master: rows are looked up, then rounded to
    `compute_dtype` (the base's activation dtype); identical to looking up the rounded table."""

    def __init__(self, weight: nn.Parameter, compute_dtype: torch.dtype):
        super().__init__(*weight.shape, device="meta")
        self.weight = weight  # the same Parameter (a tied head keeps sharing it)
        self.compute_dtype = compute_dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens).to(self.compute_dtype)  # (B, T) -> (B, T, C)


class MasterLinear(nn.Linear):
    """A bias-free linear whose trained weight is a float32 master, rounded to the input's dtype at use."""

    def __init__(self, weight: nn.Parameter):
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype))  # (N, C) -> (N, V)


def _use_masters(model: nn.Module, extras: dict[str, nn.Parameter]) -> None:
    """Upcast 16-bit trained extras to float32 in place; give their embedding/head a casting module."""
    low = {id(p): p.dtype for p in extras.values() if p.dtype in (torch.bfloat16, torch.float16)}
    if not low:
        return
    for p in extras.values():
        if id(p) in low:
            p.data = p.data.float()
    for name, m in list(model.named_modules()):
        w = getattr(m, "weight", None)
        if w is None or id(w) not in low:
            continue
        if type(m) is nn.Embedding:
            _replace(model, name, MasterEmbedding(w, low[id(w)]))
        elif type(m) is nn.Linear and m.bias is None:
            _replace(model, name, MasterLinear(w))
        elif not name.rpartition(".")[2] in NORM_NAMES:  # model.RMSNorm casts its gain itself
            raise ValueError(f"apply_lora: no float32-master form for trained module {name} ({type(m).__name__})")


def release_masters(model: nn.Module) -> nn.Module:
    """Replace MasterEmbedding/MasterLinear by the plain modules over the same weights (before export)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (MasterEmbedding, MasterLinear)):
            plain = (nn.Embedding(*m.weight.shape, device="meta") if isinstance(m, MasterEmbedding)
                     else nn.Linear(m.in_features, m.out_features, bias=False, device="meta"))
            plain.weight = m.weight
            _replace(model, name, plain)
    return model


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, LoRALinear) in model order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def _replace(model: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def extra_params(model: nn.Module, kinds: Iterable[str]) -> dict[str, nn.Parameter]:
    """Our parameter names for the full-trained extras: "embed", "norm" (every RMSNorm), "lm_head"."""
    out = {}
    for kind in kinds:
        if kind == "embed":
            out[f"{EMBED}.weight"] = model.get_parameter(f"{EMBED}.weight")
        elif kind == "lm_head":
            head = model.get_parameter(f"{LM_HEAD}.weight")
            tied = head is model.get_parameter(f"{EMBED}.weight")
            out[f"{EMBED if tied else LM_HEAD}.weight"] = head  # tied: the one shared matrix, our name for it
        elif kind == "norm":
            out.update({f"{n}.weight": m.weight for n, m in model.named_modules()
                        if n.rpartition(".")[2] in NORM_NAMES})
        else:
            raise UserError(f"LoRA: unknown trainable {kind!r}; choose from {', '.join(TRAINABLE_KINDS)}")
    return out


def lora_summary(model: nn.Module) -> dict:
    """Trainable parameter counts by kind, total parameters (a 4-bit weight counts O*I) and the percentage."""
    counts = dict.fromkeys(("lora",) + TRAINABLE_KINDS, 0)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = ("lora" if ".lora_" in name else "embed" if name.startswith(EMBED) else
                "lm_head" if name.startswith(LM_HEAD) else "norm")
        counts[kind] += p.numel()
    total = sum(p.numel() for n, p in model.named_parameters() if not n.rpartition(".")[2].startswith("weight_"))
    total += sum(m.in_features * m.out_features for m in model.modules()
                 if is_linear(m) and not isinstance(getattr(m, "weight", None), torch.Tensor))
    trainable = sum(counts.values())
    return {**counts, "trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


# ----------------------------------------------------------------------------- entry points


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
               targets: str | Iterable[str] = ATTN_PROJ, trainable: Iterable[str] = (), rslora: bool = False,
               seed: int = 0, dtype: torch.dtype | None = None) -> dict:
    """Wrap every target projection in a LoRALinear, in place; freeze all else but the `trainable` extras.

    targets: leaf names among LLAMA_LINEARS, or "all-linear" (the 7 projections; never lm_head).
    trainable: extra full parameters to train: "embed", "norm", "lm_head" (LongLoRA Sec. 3.3 uses embed+norm).
    dtype: adapter dtype (default float32: master weights, see the module note); trained extras of a
    16-bit base are upcast to float32 (MasterEmbedding, MasterLinear).
    A is drawn from one generator seeded with `seed`, layer by layer in model order.
    Returns the summary {"lora", "embed", "norm", "lm_head", "trainable", "total", "percent"}.
    """
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"apply_lora: dropout must be in [0, 1), got {dropout}")
    names = resolve_targets(targets)
    if any(True for _ in lora_modules(model)):
        raise ValueError("apply_lora: the model already has LoRA layers; merge_lora it or start from a fresh model")
    extras = extra_params(model, tuple(trainable))
    found = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in names and is_linear(m)]
    if not found:
        raise ValueError(f"apply_lora: the model has no linear layer named {', '.join(names)}")
    check_range("apply_lora: rank r", r, 1, min(min(m.in_features, m.out_features) for _, m in found))
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name, base in found:
        _replace(model, name, LoRALinear(base, r, alpha, dropout, rslora, dtype or torch.float32, g))
    for p in extras.values():
        p.requires_grad_(True)
    _use_masters(model, extras)
    return lora_summary(model)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors only (LoRA A/B and the extras), under our module names, detached."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, items: Iterable[tuple[str, torch.Tensor]], source: str = "state dict"):
    """Copy (name, tensor) pairs into the model's trainable tensors, strictly (checkpoint.strict_items).

    Every trainable tensor must arrive exactly once with its shape; anything else is a UserError naming
    the tensor and `source`. Values are cast to each parameter's dtype and device.
    """
    params = dict(model.named_parameters())
    expected = {n: tuple(p.shape) for n, p in params.items() if p.requires_grad}
    for name, t in strict_items(items, expected, source):
        params[name].copy_(t)


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace each LoRALinear by a frozen nn.Linear with W' = W0 + s * B A, in place; returns the model.

    A 4-bit base is dequantized first, so its merged layer is a plain nn.Linear in `dtype` (default: the
    base weight's dtype). With no LoRA layers left a second call changes nothing.

    Note: merging a QLoRA model gives dequant(W0) + s B A, i.e. exactly the function that was trained
    (the adapters learned to correct the quantized weight), not the original full-precision W0 + s B A.
    Re-quantizing the merged weight would add a second rounding, so the export stays in 16/32-bit.
    """
    for name, m in list(lora_modules(model)):
        _replace(model, name, m.merged(dtype))
    return model


@torch.no_grad()
def dequantize_linears(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear (one with `.dequantize()` and no `.weight`) by a plain nn.Linear."""
    for name, m in list(model.named_modules()):
        if is_linear(m) and not isinstance(getattr(m, "weight", None), torch.Tensor):
            w = m.dequantize()
            _replace(model, name, plain_linear(m, w.to(dtype or w.dtype)))
    return model
