"""Tests for rope.py: frequencies vs transformers, precision at 1M positions, config and CLI plumbing.

References: transformers' ROPE_INIT_FUNCTIONS / LlamaRotaryEmbedding.compute_default_rope_parameters
(5.23 here) for every method it has; float64 formulas for fixed NTK (no transformers type) and for the
rotation itself.
"""
import json
import math

import pytest
import torch

import rope
from checkpoint import load_model, save_model
from helpers import hf_llama

HEAD_DIMS = (32, 64, 128)
BASES = (1e4, 5e5)
FACTORS = (2.0, 4.0, 8.0)
ORIGINAL = 2048
YARN_OPTIONS = (
    {},
    {"beta_fast": 16, "beta_slow": 2},
    {"attention_factor": 1.5},
    {"mscale": 0.707, "mscale_all_dim": 1.0},
    {"mscale": 1.0},  # mscale without mscale_all_dim is ignored by transformers
    {"truncate": False},
)


def hf_config(head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int):
    """A transformers LlamaConfig whose only relevant fields are the RoPE ones (the test skips without
    transformers)."""
    transformers = pytest.importorskip("transformers")
    params = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        params = {"rope_theta": theta, **{k: v for k, v in scaling.items()}}
        if params["rope_type"] == "dynamic":  # transformers' dynamic reads L0 here, not from the dict
            params.pop("original_max_position_embeddings")
    return transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4,
                                    head_dim=head_dim, max_position_embeddings=max_position_embeddings,
                                    rope_parameters=params)


def hf_frequencies(config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' (inv_freq, attention scaling) for a LlamaConfig: the reference of the frequency tests."""
    pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, device="cpu", seq_len=seq_len)


def assert_same_frequencies(ours: tuple[torch.Tensor, float], ref: tuple[torch.Tensor, float]) -> None:
    # Tolerance 1e-6 relative: both are float32 (ulp 1.2e-7) built from the same formula; we allow a
    # few ulp for a different operation order (e.g. theta / s vs 1 / (s * base^x)).
    inv_freq, scale = ours
    ref_inv_freq, ref_scale = ref
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == ref_inv_freq.shape
    torch.testing.assert_close(inv_freq, ref_inv_freq.float(), rtol=1e-6, atol=0.0)
    assert scale == pytest.approx(ref_scale, rel=1e-6)


# ----------------------------------------------------------------------------- frequencies vs transformers


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("factor", FACTORS)
def test_linear_dynamic_llama3_match_transformers(head_dim, base, factor):
    for spec in ("linear", "llama3"):
        scaling = rope.parse_rope_spec(f"{spec}:{factor}", ORIGINAL)
        assert_same_frequencies(rope.rope_frequencies(head_dim, base, scaling),
                                hf_frequencies(hf_config(head_dim, base, scaling, int(ORIGINAL * factor))))
    scaling = rope.parse_rope_spec(f"dynamic:{factor}", ORIGINAL)
    config = hf_config(head_dim, base, scaling, ORIGINAL)
    for seq_len in (ORIGINAL // 2, ORIGINAL, ORIGINAL + 1, 3 * ORIGINAL, int(factor * ORIGINAL) * 2):
        ours = rope.rope_frequencies(head_dim, base, scaling, seq_len=seq_len)
        assert_same_frequencies(ours, hf_frequencies(config, seq_len=seq_len))
    plain = rope.default_inv_freq(head_dim, base)
    assert torch.equal(rope.rope_frequencies(head_dim, base, scaling, seq_len=ORIGINAL)[0], plain)
    assert torch.equal(rope.rope_frequencies(head_dim, base, scaling, seq_len=None)[0], plain)
    assert not torch.allclose(rope.rope_frequencies(head_dim, base, scaling, seq_len=4 * ORIGINAL)[0], plain)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("options", YARN_OPTIONS, ids=lambda o: ",".join(o) or "plain")
def test_yarn_matches_transformers(head_dim, base, factor, options):
    scaling = {**rope.parse_rope_spec(f"yarn:{factor}", ORIGINAL), **options}
    ours = rope.rope_frequencies(head_dim, base, scaling)
    assert_same_frequencies(ours, hf_frequencies(hf_config(head_dim, base, scaling, int(ORIGINAL * factor))))
    if not options:  # Peng et al. sec. 3.4: sqrt(1/t) = 0.1 ln(s) + 1
        assert ours[1] == pytest.approx(0.1 * math.log(factor) + 1.0, rel=1e-12)


def test_yarn_edge_cases_match_transformers():
    # A small base with a long L0 pushes the ramp's upper end past D/2 (transformers clamps it to D - 1),
    # a large base with a short L0 pushes the lower end below 0.
    for base, original in ((500.0, 8192), (2e8, 64)):
        for truncate in (True, False):
            scaling = {**rope.parse_rope_spec("yarn:4", original), "truncate": truncate}
            assert_same_frequencies(rope.rope_frequencies(64, base, scaling),
                                    hf_frequencies(hf_config(64, base, scaling, 4 * original)))


def test_llama31_8b_real_settings_match_transformers():
    # Llama-3.1-8B config.json: theta 5e5, llama3 factor 8, low 1, high 4, L0 8192, head_dim 128.
    cfg = {"rope_theta": 500000.0, "max_position_embeddings": 131072,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    theta, scaling = rope.rope_from_hf(cfg)
    assert theta == 500000.0 and scaling["original_max_position_embeddings"] == 8192
    ref = hf_frequencies(hf_config(128, theta, scaling, 131072))
    assert_same_frequencies(rope.rope_frequencies(128, theta, scaling), ref)
    assert rope.parse_rope_spec("llama3:8", 8192) == scaling


def test_default_and_plain_base_change_match_transformers():
    for base in (1e4, 5e5, 2e8):
        assert_same_frequencies(rope.rope_frequencies(128, base), hf_frequencies(hf_config(128, base, None, 4096)))
        assert_same_frequencies(rope.rope_frequencies(128, base, {"rope_type": "default"}),
                                hf_frequencies(hf_config(128, base, None, 4096)))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("alpha", FACTORS)
def test_ntk_matches_float64_formula(head_dim, base, alpha):
    # No transformers reference: float64 formula base' = base * alpha^(D/(D-2)), theta_i = base'^(-2i/D).
    # Tolerance 1e-6 relative: ours is float32 (ulp 1.2e-7) plus float32 rounding of the exponent 2i/D.
    inv_freq, scale = rope.rope_frequencies(head_dim, base, rope.parse_rope_spec(f"ntk:{alpha}", ORIGINAL))
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    ref = (base * alpha ** (head_dim / (head_dim - 2))) ** (-2 * i / head_dim)
    torch.testing.assert_close(inv_freq.double(), ref, rtol=1e-6, atol=0.0)
    assert scale == 1.0
    # The point of the exponent D/(D-2): the fastest channel is kept, the slowest is divided by exactly alpha.
    plain = rope.default_inv_freq(head_dim, base).double()
    assert inv_freq[0].item() == 1.0
    assert (plain[-1] / inv_freq[-1].double()).item() == pytest.approx(alpha, rel=1e-6)


def test_bad_scaling_dicts_raise():
    bad = [
        {"rope_type": "longrope", "factor": 2.0},
        {"rope_type": "linear"},
        {"rope_type": "linear", "factor": 0.5},
        {"rope_type": "linear", "factor": float("nan")},
        {"rope_type": "yarn", "factor": 4.0},  # no original_max_position_embeddings
        {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},  # no low/high
        {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
         "low_freq_factor": 4.0, "high_freq_factor": 1.0},
        {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
    ]
    for scaling in bad:
        with pytest.raises(ValueError, match="rope"):
            rope.rope_frequencies(64, 1e4, scaling)
    with pytest.raises(ValueError, match="head_dim"):
        rope.rope_frequencies(63, 1e4)
    with pytest.raises(ValueError, match="rope_theta"):
        rope.rope_frequencies(64, -1.0)
    # The older key "type" is accepted.
    assert_same_frequencies(rope.rope_frequencies(64, 1e4, {"type": "linear", "factor": 4.0}),
                            rope.rope_frequencies(64, 1e4, {"rope_type": "linear", "factor": 4.0}))


# ----------------------------------------------------------------------------- precision at 1M positions


def rotate64(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """float64 rotate-half rotation of x (..., D) by angles (..., D/2)."""
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = angles.cos(), angles.sin()
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def relative_position_error(cos: torch.Tensor, sin: torch.Tensor, q, k, inv_freq, m: int, n: int) -> float:
    """|q_m . k_n - q_{m-n} . k_0| / (|q| |k|), rows 0 and 1 of the tables being positions m and n; the
    reference uses float64 angles from the same float32 inv_freq."""
    qm = rope.apply_rope(q.view(1, 1, 1, -1), cos[0:1], sin[0:1]).double().flatten()
    kn = rope.apply_rope(k.view(1, 1, 1, -1), cos[1:2], sin[1:2]).double().flatten()
    ref = rotate64(q, (m - n) * inv_freq.double()) @ k.double()
    return abs((qm @ kn - ref).item()) / (q.norm() * k.norm()).item()


def test_relative_position_property_at_one_million():
    gen = torch.Generator().manual_seed(0)
    inv_freq = rope.default_inv_freq(128, 5e5)
    pairs = [(1_000_003, 999_000), (1_048_575, 1_000_000), (999_999, 999_998), (1_000_000, 123)]
    errors = {"ours": [], "float32 angles": [], "bf16 cos/sin": [], "bf16 angles": []}
    for m, n in pairs:
        q, k = torch.randn(128, generator=gen), torch.randn(128, generator=gen)
        positions = torch.tensor([m, n])
        cos, sin = rope.rope_cos_sin(inv_freq, positions)
        errors["ours"].append(relative_position_error(cos, sin, q, k, inv_freq, m, n))
        angles32 = positions.float()[:, None] * inv_freq[None, :]  # what float32 pipelines do
        angles32 = torch.cat((angles32, angles32), dim=-1)
        errors["float32 angles"].append(relative_position_error(angles32.cos(), angles32.sin(), q, k, inv_freq, m, n))
        cos16, sin16 = cos.bfloat16().float(), sin.bfloat16().float()
        errors["bf16 cos/sin"].append(relative_position_error(cos16, sin16, q, k, inv_freq, m, n))
        angles16 = (positions.bfloat16()[:, None] * inv_freq.bfloat16()[None, :]).float()
        angles16 = torch.cat((angles16, angles16), dim=-1)
        errors["bf16 angles"].append(relative_position_error(angles16.cos(), angles16.sin(), q, k, inv_freq, m, n))
    worst = {name: max(values) for name, values in errors.items()}
    # Tolerance 1e-6 of |q||k| (measured ~1e-8): float32 cos/sin (ulp 6e-8) and a float32 rotation and
    # dot over 128 channels with random signs stay near 1e-8; 1e-6 leaves a 100x margin.
    assert worst["ours"] < 1e-6, worst
    # float32 angle products are off by up to ulp(1e6)/2 = 0.03 rad in the fast channels (measured ~5e-4),
    # bf16 cos/sin by 2^-9 relative (~2e-4), bf16 angles by whole radians (~0.1): orders of magnitude worse.
    assert worst["float32 angles"] > 1e-5 and worst["float32 angles"] > 1000 * worst["ours"], worst
    assert worst["bf16 cos/sin"] > 1e-5 and worst["bf16 cos/sin"] > 1000 * worst["ours"], worst
    assert worst["bf16 angles"] > 1e-2, worst


def test_apply_rope_matches_complex_reference():
    # Reference: x viewed as complex pairs (x_i + j x_{i+D/2}) times e^{j m theta_i}, all in float64.
    gen = torch.Generator().manual_seed(1)
    B, H, T, D = 2, 3, 5, 64
    x = torch.randn(B, H, T, D, generator=gen)
    positions = torch.tensor([0, 1, 17, 4096, 1_000_000])
    inv_freq = rope.default_inv_freq(D, 5e5)
    cos, sin = rope.rope_cos_sin(inv_freq, positions)  # (T, D)
    out = rope.apply_rope(x, cos, sin)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double())  # (B, H, T, D/2)
    z = z * torch.polar(torch.ones(T, D // 2, dtype=torch.float64), positions.double()[:, None] * inv_freq.double())
    ref = torch.cat((z.real, z.imag), dim=-1)  # (B, H, T, D)
    # Tolerance 1e-6 absolute (|x| ~ 1): float32 cos/sin and one float32 multiply-add, ~2e-7 each.
    torch.testing.assert_close(out.double(), ref, rtol=0.0, atol=1e-6)
    # A bf16 input comes back bf16, rotated in float32 then rounded once (bf16 ulp 2^-8 relative).
    out16 = rope.apply_rope(x.bfloat16(), cos, sin)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), rope.apply_rope(x.bfloat16().float(), cos, sin).double(),
                               rtol=2**-8, atol=1e-6)


# ----------------------------------------------------------------------------- config plumbing


SCALINGS = [
    None,
    rope.parse_rope_spec("linear:4", 4096),
    rope.parse_rope_spec("dynamic:2", 4096),
    rope.parse_rope_spec("yarn:8", 4096),
    rope.parse_rope_spec("yarn:4,beta_fast=16,beta_slow=2,attention_factor=1.25,truncate=false", 4096),
    rope.parse_rope_spec("llama3:8", 8192),
]


def hf_spellings(theta: float, scaling: dict | None) -> list[dict]:
    """rope_to_hf's fields as written, and in the older (rope_theta, rope_scaling) and newer (rope_parameters)
    spellings alone, each beside a max_position_embeddings."""
    cfg = {"max_position_embeddings": 32768, **rope.rope_to_hf(theta, scaling)}  # rope fields last, as rope_to_hf asks
    old = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    new = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    return [cfg, old, new]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"] if s else "default")
def test_rope_to_hf_round_trips_in_both_spellings(scaling):
    for spelling in hf_spellings(5e5, scaling):
        assert rope.rope_from_hf(spelling) == (5e5, scaling)


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"] if s else "default")
def test_rope_to_hf_spellings_give_transformers_the_same_frequencies(scaling, tmp_path):
    """transformers reads the settings rope_to_hf writes, in each spelling, from a config.json."""
    AutoConfig = pytest.importorskip("transformers").AutoConfig
    theta, head_dim = 5e5, 64
    ours = rope.rope_frequencies(head_dim, theta, scaling, seq_len=20000)
    for spelling in hf_spellings(theta, scaling):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"model_type": "llama", "hidden_size": 4 * head_dim, "num_attention_heads": 4,
                                    "num_key_value_heads": 4, "head_dim": head_dim, **spelling}))
        assert_same_frequencies(ours, hf_frequencies(AutoConfig.from_pretrained(tmp_path), seq_len=20000))


def test_rope_from_hf_defaults_and_fallbacks():
    assert rope.rope_from_hf({}) == (10000.0, None)
    assert rope.rope_from_hf({"rope_theta": 5e5, "rope_scaling": None}) == (5e5, None)
    assert rope.rope_from_hf({"rope_parameters": {"rope_type": "default", "rope_theta": 2e8}}) == (2e8, None)
    # L0 falls back to max_position_embeddings (as transformers does), older "type" key accepted.
    theta, scaling = rope.rope_from_hf({"max_position_embeddings": 4096,
                                        "rope_scaling": {"type": "yarn", "factor": 4.0}})
    assert scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    with pytest.raises(ValueError, match="max_position_embeddings"):
        rope.rope_from_hf({"rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="longrope"):
        rope.rope_from_hf({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})


def test_ntk_is_saved_as_plain_base():
    scaling = rope.parse_rope_spec("ntk:8", 8192)
    fields = rope.rope_to_hf(5e5, scaling, head_dim=128)
    assert fields["rope_scaling"] is None and fields["rope_theta"] == pytest.approx(rope.suggest_base(5e5, 8192, 65536))
    theta, loaded = rope.rope_from_hf(fields)
    assert loaded is None
    ref = hf_frequencies(hf_config(128, theta, None, 8192))
    assert_same_frequencies(rope.rope_frequencies(128, 5e5, scaling), ref)
    with pytest.raises(ValueError, match="head_dim"):
        rope.rope_to_hf(5e5, scaling)


# ----------------------------------------------------------------------------- command line


def test_parse_rope_spec_good_spellings():
    assert rope.parse_rope_spec("default", 4096) is None
    assert rope.parse_rope_spec(" None ", 4096) is None
    assert rope.parse_rope_spec("linear:4", 4096) == {"rope_type": "linear", "factor": 4.0,
                                                      "original_max_position_embeddings": 4096}
    assert rope.parse_rope_spec("YaRN:8", 2048)["rope_type"] == "yarn"
    assert rope.parse_rope_spec("yarn:8,beta_fast=16,truncate=false", 2048) == {
        "rope_type": "yarn", "factor": 8.0, "beta_fast": 16.0, "truncate": False,
        "original_max_position_embeddings": 2048}
    assert rope.parse_rope_spec("llama3:8,high_freq_factor=2", 8192)["high_freq_factor"] == 2.0
    for kind in ("dynamic", "ntk"):
        assert rope.parse_rope_spec(f"{kind}:2.5", 4096)["factor"] == 2.5


@pytest.mark.parametrize("spec", ["", "linear", "linear:", "linear:x", "linear:0.5", "linear:inf", "pi:4",
                                  "longrope:4", "yarn:8,beta_fast", "yarn:8,beta_fast=x", "linear:4,beta_fast=3",
                                  "llama3:8,low_freq_factor=4"])
def test_parse_rope_spec_bad_spellings(spec):
    with pytest.raises(ValueError, match="rope"):
        rope.parse_rope_spec(spec, 4096)


def test_suggest_base_gao_2024_table_18():
    # Gao et al. 2024 Table 18: dynamic NTK suggests ~4M for Llama-3 (5e5, 8K) at 64K.
    assert rope.suggest_base(500000, 8192, 65536, head_dim=128) == pytest.approx(500000 * 8 ** (128 / 126))
    assert 4.0e6 < rope.suggest_base(500000, 8192, 65536) < 4.2e6
    assert rope.suggest_base(500000, 8192, 4096) == 500000
    with pytest.raises(ValueError, match="suggest_base"):
        rope.suggest_base(500000, 0, 65536)


def test_override_replaces_only_what_is_given():
    checkpoint = (5e5, rope.parse_rope_spec("llama3:8", 8192))
    assert rope.override(*checkpoint, None, None, 8192) == checkpoint
    assert rope.override(*checkpoint, None) == checkpoint  # nothing to parse: no length needed
    assert rope.override(*checkpoint, "yarn:4", 2e8, 8192) == (2e8, rope.parse_rope_spec("yarn:4", 8192))
    assert rope.override(*checkpoint, "none", None, 8192) == (5e5, None)
    assert rope.override(*checkpoint, None, 1e6, 8192) == (1e6, checkpoint[1])
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="theta"):
            rope.override(*checkpoint, None, bad, 8192)
    with pytest.raises(ValueError, match="theta"):
        rope.override(float("nan"), None, None)  # a non-finite checkpoint base is refused too
    with pytest.raises(ValueError, match="wobbly"):
        rope.override(*checkpoint, "wobbly:3", None, 8192)
    with pytest.raises(ValueError, match="original_len"):
        rope.override(*checkpoint, "linear:4")


def test_override_auto_factor_is_ctx_over_original_length():
    """TYPE:auto (the recipes' PI) means s = max(1, ctx / L0), the same string parse_rope_spec reads."""
    assert rope.override(5e5, None, "linear:auto", None, 8192, 81920) == (5e5, rope.parse_rope_spec("linear:10", 8192))
    assert rope.override(1e4, None, "linear:auto", None, 4096, 10000)[1]["factor"] == pytest.approx(10000 / 4096, rel=1e-5)
    assert rope.override(1e4, None, "linear:auto", None, 4096, 2048)[1]["factor"] == 1.0  # never below 1
    assert rope.override(1e4, None, "yarn:auto,beta_fast=16", None, 256, 2560)[1] == \
        rope.parse_rope_spec("yarn:10,beta_fast=16", 256)
    assert rope.override(1e4, None, "YaRN:AUTO", 2e8, 256, 2560) == (2e8, rope.parse_rope_spec("yarn:10", 256))
    with pytest.raises(ValueError, match="ctx"):
        rope.override(1e4, None, "linear:auto", None, 4096)


# ----------------------------------------------------------------------------- through the model

MODEL_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("name", MODEL_SCALINGS)
def test_model_logits_with_scaling_match_transformers(tmp_path, name):
    """Logits at 100 positions (original length 64) equal LlamaForCausalLM configured the same way.

    Tolerance 1e-5: float32 on both sides; our angles are formed in float64, which moves cos/sin by at
    most ulp(100 * theta_0) ~ 4e-6 rad at these positions.
    """
    params = {"rope_theta": 10000.0, **MODEL_SCALINGS[name]}
    hf, d = hf_llama(tmp_path, rope_parameters=params, max_position_embeddings=64)
    ours = load_model(d).eval()
    assert ours.config.rope_scaling["rope_type"] == name
    x = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max() < 1e-5


@pytest.mark.parametrize("spec", ["linear:4", "yarn:4", "dynamic:4", "llama3:4", "ntk:4"])
def test_saved_scaling_loads_into_transformers_with_same_logits(tmp_path, spec):
    """A model extended with --rope SPEC and saved by us loads in transformers with the same positions."""
    transformers = pytest.importorskip("transformers")
    model = load_model("tiny", vocab_size=128, max_seq_len=64).eval()
    model.config.rope_scaling = rope.parse_rope_spec(spec, 64)
    save_model(model, tmp_path / "ext")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ext").eval()
    x = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(1))  # beyond the original 64
    with torch.no_grad():
        assert (back(x).logits - model(x)).abs().max() < 1e-5
