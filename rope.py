"""Rotary position embeddings (RoPE) and their context-extension variants.

RoPE (Su et al., 2021, "RoFormer", sec. 3.2) rotates each pair of channels (i, i + D/2) of a query or
key at position m by the angle m * theta_i, with theta_i = base^(-2i/D). The dot product q_m . k_n then
depends only on m - n.

Context extension changes theta_i (and, for YaRN, a temperature on the attention scores):
    linear   Position Interpolation (Chen et al., 2023, arXiv:2306.15595, sec. 2): m' = m / s, which is
             theta'_i = theta_i / s.
    ntk      fixed NTK-aware scaling (bloc97, 2023; compared with PI and YaRN by Lu et al. 2024, "A
             Controlled Study on Long Context Extension"): base' = base * s^(D/(D-2)). The exponent
             keeps theta_0 = 1 and divides the slowest frequency theta_{D/2-1} by exactly s.
    dynamic  dynamic NTK (emozilla, 2023; transformers' "dynamic"): the same base change, with s replaced
             by (s * L / L0) - (s - 1) for the current length L > L0, and plain RoPE for L <= L0.
    yarn     YaRN (Peng et al., 2023, arXiv:2309.00071, sec. 3.2-3.4): "NTK-by-parts" interpolation,
             theta'_i = (1 - gamma_i) theta_i / s + gamma_i theta_i, with a ramp gamma over the number of
             rotations r_i = L0 / lambda_i each channel makes in the original context (lambda_i = 2 pi /
             theta_i): gamma = 0 (interpolate) for r < beta_slow, 1 (keep) for r > beta_fast. The
             attention temperature sqrt(1/t) = 0.1 ln(s) + 1 multiplies cos and sin, so it reaches
             every score q . k squared.
    llama3   Llama 3.1 (Meta, 2024; `apply_scaling` in the llama-models reference code): keep
             wavelengths lambda < L0 / high_freq_factor, divide theta by s for lambda > L0 /
             low_freq_factor, and blend linearly in L0 / lambda between the two.
A plain base change ("rope theta" 1e4 -> 5e5 -> 8e6, Gao et al. 2024, "How to Train Long-Context LMs
Effectively", Table 18) needs no scaling dict: it is just `base`.

Notation: B batch, H heads, T tokens, D head dim, s scaling factor, L0 original (pre-extension) context
length, L current sequence length.

Note: why the tables are built in float64 and kept in float32.
    At position m ~ 1e6 a float32 product m * theta_i carries an absolute angle error up to
    ulp(1e6) / 2 = 0.03 rad, and a bf16 table is off by whole radians. The angles are therefore
    formed in float64 and only cos/sin are rounded to float32; the rotation itself runs in float32
    whatever the model dtype, then casts back. The frequencies theta_i themselves are float32 and
    computed with the same operations as transformers, so both models rotate by the same angles.

Note: the scaling dict is the Hugging Face one ({"rope_type": "yarn", "factor": 4.0, ...}), always
    carrying "original_max_position_embeddings" (L0) when it is not None, so every method reads L0 from
    one place. transformers' "dynamic" reads L0 from config.max_position_embeddings instead;
    rope_from_hf / rope_to_hf translate.
"""
from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- constants

DEFAULT_THETA = 10000.0  # transformers' default rope_theta when a config.json names none
ROPE_TYPES = ("linear", "dynamic", "ntk", "yarn", "llama3")
# Method keys besides rope_type, factor and original_max_position_embeddings; settable as key=value in
# --rope. llama3's two are required (parse_rope_spec fills in Llama 3.1's values), yarn's are optional.
EXTRA_KEYS = {
    "linear": (),
    "dynamic": (),
    "ntk": (),
    "yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("low_freq_factor", "high_freq_factor"),
}
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # Peng et al. sec. 3.2: beta = 32, alpha = 1 for Llama
LLAMA3_LOW_FREQ_FACTOR, LLAMA3_HIGH_FREQ_FACTOR = 1.0, 4.0  # Llama 3.1's released settings

# ----------------------------------------------------------------------------- pure functions


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """theta_i = base^(-2i/D) for i in [0, D/2), float32, shape (D/2,)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (base ** exponents)


def ntk_base(base: float, factor: float, head_dim: int) -> float:
    """NTK-aware base change, base' = base * s^(D/(D-2)), in float64."""
    return base * factor ** (head_dim / (head_dim - 2))


def _is_default(scaling: dict | None) -> bool:
    return scaling is None or scaling.get("rope_type", scaling.get("type")) == "default"


def _validated(scaling: dict) -> tuple[str, dict]:
    """(rope_type, scaling) after checking the dict's keys and values; raises ValueError."""
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope scaling: rope_type {rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("rope scaling: partial_rotary_factor != 1 is not supported (Llama rotates the whole head)")
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not 1.0 <= factor < math.inf:
        raise ValueError(f"rope scaling: {rope_type} needs a finite numeric factor >= 1, got {factor!r}")
    original = scaling.get("original_max_position_embeddings")
    if rope_type in ("dynamic", "yarn", "llama3") and (not isinstance(original, int) or original < 1):
        raise ValueError(
            f"rope scaling: {rope_type} needs original_max_position_embeddings (a positive int), got {original!r}"
        )
    missing = [k for k in EXTRA_KEYS["llama3"] if k not in scaling] if rope_type == "llama3" else []
    if missing:
        raise ValueError(f"rope scaling: llama3 needs {' and '.join(missing)} (Llama 3.1 uses 1.0 and 4.0)")
    if rope_type == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError(
            "rope scaling: llama3 needs high_freq_factor > low_freq_factor, got "
            f"{scaling['high_freq_factor']} and {scaling['low_freq_factor']}"
        )
    return rope_type, scaling


def _yarn(inv_freq: torch.Tensor, base: float, head_dim: int, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN frequencies and attention scale (Peng et al. 2023, sec. 3.2 "NTK-by-parts", sec. 3.4).

    The ramp is written in channel space as transformers does: channel i makes r = L0 theta_i / (2 pi)
    rotations over L0, so r = beta at the (fractional) channel d(beta) = D ln(L0 / (2 pi beta)) / (2 ln base).
    gamma_i = 1 - clamp((i - d(beta_fast)) / (d(beta_slow) - d(beta_fast)), 0, 1) is the share kept:
        theta'_i = (1 - gamma_i) * theta_i / s + gamma_i * theta_i.
    With `truncate` (default) d(beta_fast) is floored and d(beta_slow) ceiled. Attention scale:
    attention_factor if given; else mscale(s, mscale) / mscale(s, mscale_all_dim) when both are set
    (DeepSeek's variant); else mscale(s) = 0.1 ln(s) + 1.
    """
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    # transformers treats 0/None as "use the default" (`or`), so do we.
    beta_fast = scaling.get("beta_fast") or YARN_BETA_FAST
    beta_slow = scaling.get("beta_slow") or YARN_BETA_SLOW

    def channel(num_rotations: float) -> float:
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = channel(beta_fast), channel(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)  # transformers clamps to D - 1, not D/2 - 1
    if low == high:
        high += 0.001  # avoid 0/0 (transformers does the same)
    i = torch.arange(head_dim // 2, dtype=torch.float32)
    gamma = 1.0 - ((i - low) / (high - low)).clamp(0.0, 1.0)  # (D/2,) 1 = keep, 0 = interpolate
    inv_freq = (inv_freq / factor) * (1.0 - gamma) + inv_freq * gamma

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0

    attention_scale = scaling.get("attention_factor")
    if attention_scale is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return inv_freq, float(attention_scale)


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 frequencies: by wavelength lambda_i = 2 pi / theta_i,
        lambda < L0 / high:  theta_i                      (high frequencies kept)
        lambda > L0 / low:   theta_i / s                   (low frequencies interpolated)
        otherwise:           (1 - g) theta_i / s + g theta_i,  g = (L0 / lambda - low) / (high - low).
    """
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq  # (D/2,)
    g = (original / wavelen - low) / (high - low)
    blended = (1.0 - g) * inv_freq / factor + g * inv_freq
    out = torch.where(wavelen > original / low, inv_freq / factor, blended)
    return torch.where(wavelen < original / high, inv_freq, out)


def rope_frequencies(
    head_dim: int, base: float, scaling: dict | None = None, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 (D/2,), attention_scale) for plain RoPE or a Hugging Face style scaling dict.

    `seq_len` (L) matters only for "dynamic": base' = base * ((s L / L0) - (s - 1))^(D/(D-2)) for L > L0,
    plain frequencies for L <= L0 or L None. The attention scale multiplies cos and sin (1.0 except YaRN).
    Accepts the older key "type" for "rope_type". Raises ValueError on a bad dict.
    """
    if head_dim < 4 or head_dim % 2:
        raise ValueError(f"rope: head_dim must be even and >= 4, got {head_dim}")
    if not base > 0:
        raise ValueError(f"rope: rope_theta (base) must be positive, got {base}")
    if _is_default(scaling):
        return default_inv_freq(head_dim, base), 1.0
    rope_type, scaling = _validated(scaling)
    factor = float(scaling["factor"])
    if rope_type == "ntk":
        return default_inv_freq(head_dim, ntk_base(base, factor, head_dim)), 1.0
    if rope_type == "dynamic":
        original = scaling["original_max_position_embeddings"]
        if seq_len is None or seq_len <= original:
            return default_inv_freq(head_dim, base), 1.0
        return default_inv_freq(head_dim, ntk_base(base, factor * seq_len / original - (factor - 1), head_dim)), 1.0
    inv_freq = default_inv_freq(head_dim, base)
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "yarn":
        return _yarn(inv_freq, base, head_dim, scaling)
    return _llama3(inv_freq, scaling), 1.0


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer `positions` (T,), float32, shape (T, D) in rotate-half layout.

    angle[t, i] = positions[t] * inv_freq[i], formed in float64 (see the module note).
    """
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D)
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in float32, cast back to x's dtype.

    x: (B, H, T, D); cos, sin: (T, D) float32. This is the rotate-half convention of Hugging Face
    Llama checkpoints (channel i pairs with channel i + D/2).
    """
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def suggest_base(base: float, original_len: int, target_len: int, head_dim: int = 128) -> float:
    """RoPE base for training at `target_len`, by the dynamic-NTK rule base * s^(D/(D-2)), s = target / original.

    Gao et al. (2024, "How to Train Long-Context Language Models (Effectively)", Table 18) note that
    dynamic NTK roughly suggests 4M for Llama-3-8B (base 5e5, 8K) trained at 64K:
    500000 * 8^(128/126) = 4.1M. They found 8M slightly better, so treat this as a starting point.
    (For 512K the rule gives 34M where their Table 19 quotes "roughly 64M".)
    A target at or below the original length returns `base` unchanged.
    """
    if original_len < 1 or target_len < 1 or not base > 0:
        raise ValueError(
            f"suggest_base: base, original length and target length must be positive, got {base}, "
            f"{original_len}, {target_len}"
        )
    return ntk_base(base, max(target_len / original_len, 1.0), head_dim)


# ----------------------------------------------------------------------------- config plumbing


def rope_from_hf(hf_config: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from a Hugging Face config.json dict, in either spelling.

    transformers <= 4.x writes `rope_theta` and `rope_scaling` ({"type" or "rope_type", "factor", ...});
    transformers 5 writes `rope_parameters` ({"rope_theta", "rope_type", method keys}). If both are
    present, `rope_scaling` wins as in transformers 5 (its rope_theta, else the top-level one). The
    returned dict always carries original_max_position_embeddings (L0): the dict's own value, else
    max_position_embeddings (transformers' fallback); for "dynamic" always max_position_embeddings,
    which is what transformers reads.
    """
    scaling = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    theta = float(scaling.get("rope_theta", hf_config.get("rope_theta", DEFAULT_THETA)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    out = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    out["rope_type"] = rope_type
    max_pos = hf_config.get("max_position_embeddings")
    if rope_type == "dynamic" or "original_max_position_embeddings" not in out:
        if max_pos is None:
            raise ValueError(
                f"config.json: rope_type {rope_type!r} needs max_position_embeddings or "
                "rope_scaling.original_max_position_embeddings; add the pre-extension context length"
            )
        out["original_max_position_embeddings"] = max_pos
    _validated(out)
    return theta, out


def rope_to_hf(theta: float, scaling: dict | None, head_dim: int | None = None) -> dict:
    """config.json fields, in both spellings, that make transformers load these RoPE settings.

    Checked against transformers 5 (reads either spelling); the rope_theta/rope_scaling pair is the
    spelling transformers 4.x reads.

    Returns rope_theta, rope_scaling (method keys without rope_theta, or None) and rope_parameters
    (rope_theta + rope_type + method keys). Two methods need translation:
      dynamic  transformers takes L0 from max_position_embeddings, so that field (= L0) is returned too and
               must be written last, over any other max_position_embeddings.
      ntk      transformers has no fixed-NTK type; it is written as a plain base change
               rope_theta = base * s^(D/(D-2)), which needs `head_dim` (rope_from_hf reads it back as
               the equivalent plain RoPE).
    """
    theta = float(theta)
    if _is_default(scaling):
        return {"rope_theta": theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    rope_type, scaling = _validated(scaling)
    if rope_type == "ntk":
        if head_dim is None:
            raise ValueError("rope_to_hf: ntk scaling is saved as a plain rope_theta and needs head_dim")
        return rope_to_hf(ntk_base(theta, float(scaling["factor"]), head_dim), None)
    method = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")}
    method["rope_type"] = rope_type
    out = {}
    if rope_type == "dynamic":
        out["max_position_embeddings"] = method.pop("original_max_position_embeddings")
    out.update(rope_theta=theta, rope_scaling=method, rope_parameters={"rope_theta": theta, **method})
    return out


# ----------------------------------------------------------------------------- spec parsing and overrides


def parse_rope_spec(spec: str, original_max_position_embeddings: int) -> dict | None:
    """Scaling dict from a command-line spec `TYPE[:FACTOR][,key=value...]`, or None for default/none.

    Examples: linear:4, dynamic:4, ntk:8, yarn:8, yarn:8,beta_fast=16, llama3:8 (Llama 3.1's low 1 / high 4
    unless given), default, none.
    """
    text = spec.strip().lower()
    if text in ("default", "none"):
        return None
    head, *extras = text.split(",")
    rope_type, _, factor_text = head.partition(":")
    usage = "use TYPE:FACTOR[,key=value...] with TYPE one of " + ", ".join(ROPE_TYPES) + ", or default/none"
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"--rope {spec!r}: unknown type {rope_type!r}; {usage}")
    try:
        factor = float(factor_text)
    except ValueError:
        raise ValueError(f"--rope {spec!r}: factor {factor_text!r} is not a number; {usage}") from None
    scaling: dict = {"rope_type": rope_type, "factor": factor}
    if rope_type == "llama3":
        scaling.update(low_freq_factor=LLAMA3_LOW_FREQ_FACTOR, high_freq_factor=LLAMA3_HIGH_FREQ_FACTOR)
    for item in extras:
        key, eq, value = item.partition("=")
        if not eq or key not in EXTRA_KEYS[rope_type]:
            allowed = ", ".join(EXTRA_KEYS[rope_type]) or "none"
            raise ValueError(f"--rope {spec!r}: bad option {item!r}; {rope_type} accepts key=value for: {allowed}")
        if value in ("true", "false"):
            scaling[key] = value == "true"
        else:
            try:
                scaling[key] = float(value)
            except ValueError:
                raise ValueError(f"--rope {spec!r}: {key}={value!r} is not a number") from None
    scaling["original_max_position_embeddings"] = int(original_max_position_embeddings)
    _validated(scaling)
    return scaling


def override(theta: float, scaling: dict | None, spec: str | None, theta_override: float | None = None,
             original_len: int | None = None, ctx: int | None = None) -> tuple[float, dict | None]:
    """(theta, scaling) after the overrides: a given `spec` replaces the checkpoint's scaling, a given
    `theta_override` its base; None keeps the checkpoint's value.

    spec: a parse_rope_spec spelling ("linear:4", "yarn:8,beta_fast=16", "default", ...) or TYPE:auto, the
    recipes' spelling, which means factor s = max(1, ctx / original_len) (Position Interpolation to the
    training length for "linear:auto"); `original_len` (L0) is needed for any spec, `ctx` for ":auto".
    Raises ValueError on a bad spec, a non-finite or non-positive theta, or a missing length.
    """
    if spec is not None:
        if original_len is None:
            raise ValueError(f"rope override {spec!r}: needs original_len (the pre-extension context length)")
        head, sep, extras = spec.strip().partition(",")
        if head.lower().endswith(":auto"):
            if ctx is None:
                raise ValueError(f"--rope {spec!r}: ':auto' sets the factor to ctx / original length and needs ctx")
            head = f"{head.partition(':')[0]}:{max(1.0, ctx / original_len):g}"
            spec = head + sep + extras
        scaling = parse_rope_spec(spec, original_len)
    if theta_override is not None:
        theta = theta_override
    if not (isinstance(theta, (int, float)) and math.isfinite(theta) and theta > 0):
        raise ValueError(f"rope: theta (base) must be a finite positive number, got {theta!r}")
    return float(theta), scaling
