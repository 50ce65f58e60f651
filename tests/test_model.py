"""model.py against transformers' LlamaForCausalLM; KV cache; explicit positions; memory options.

Tolerances: float32 logits of an identical computation differ only by summation order, so 1e-5 absolute
on logits of magnitude ~1 (tiny random models).
"""
import pytest
import torch

import model as model_module
import rope
from checkpoint import load_model
from helpers import hf_llama
from errors import UserError
from model import MemoryOptions, ModelConfig, Transformer

TOL = 1e-5

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "head_dim": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24),  # 4 * 24 != 64
}


def tokens(n=24, vocab=128, batch=2, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf, d = hf_llama(tmp_path, **CONFIGS[name])
    ours = load_model(str(d)).eval()
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert (got - ref).abs().max() < TOL


def test_from_hf_reads_both_rope_spellings():
    old = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
               max_position_embeddings=4096, rope_theta=5e5,
               rope_scaling={"type": "linear", "factor": 2.0})
    new = {k: v for k, v in old.items() if not k.startswith("rope")}
    new["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    a, b = ModelConfig.from_hf(old), ModelConfig.from_hf(new)
    assert a.rope_theta == b.rope_theta == 5e5
    assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == 2.0


# ----------------------------------------------------------------------------- KV cache


def test_cached_decoding_equals_full_forward():
    model = load_model("tiny").eval()
    x = tokens(40, vocab=512, batch=1)[0]
    with torch.no_grad():
        full = model(x[None])[0]  # (T, V)
        model.setup_caches(1, 40)
        logits = [model(x[None, :10])[0]]
        for t in range(10, 40):
            logits.append(model(x[None, t:t + 1], start=t)[0])
        model.clear_caches()
    assert (torch.cat(logits) - full).abs().max() < TOL


def test_checkpointing_gives_same_gradients():
    model = load_model("tiny").train()
    x = tokens(16, vocab=512)
    model(x).sum().backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.memory = MemoryOptions(checkpointing=True)
    model(x).sum().backward()
    for a, p in zip(g0, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_token_chunked_mlp_gives_same_loss_and_gradients(checkpointing, chunk):
    """mlp_chunk only changes what is kept for backward. Reference: the unchunked model in float64;
    tolerance 1e-12 (summation order of the concatenated chunks' gradients)."""
    model = load_model("tiny").double().train()
    x = tokens(37, vocab=512)  # 37 tokens: a ragged last chunk for every chunk size < 37
    ref = model(x, labels=x)
    ref.backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.memory = MemoryOptions(checkpointing=checkpointing, mlp_chunk=chunk)
    loss = model(x, labels=x)
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-12
    for a, p in zip(g0, model.parameters()):
        assert torch.allclose(a, p.grad, rtol=0, atol=1e-12)


def test_save_attention_skips_the_attention_recompute_and_keeps_gradients():
    """With save_attention the recomputation in backward reuses SDPA's saved output: the flash kernel runs
    once per layer instead of twice, and gradients equal plain checkpointing (float32, tolerance 1e-6:
    the same kernels in the same order; measured 0)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountAttention(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func == torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
            return func(*args, **(kwargs or {}))

    model = load_model("tiny").train()
    x = tokens(40, vocab=512)
    grads, calls = [], []
    for save in (False, True):
        model.zero_grad()
        model.memory = MemoryOptions(checkpointing=True, save_attention=save)
        with CountAttention() as counter:
            model(x, labels=x).backward()
        calls.append(counter.calls)
        grads.append([p.grad.clone() for p in model.parameters()])
    n = model.config.n_layers
    assert calls == [2 * n, n], calls
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)




def float32_rms_norm(x, weight, eps):
    """The float32 RMSNorm formula for autograd to differentiate (model.RMSNorm's forward before
    RMSNormFunction; Hugging Face's LlamaRMSNorm order)."""
    xf = x.float()
    return weight.to(x.dtype) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gradients_equal_autograd_of_the_float32_formula(dtype):
    """RMSNormFunction's hand-written backward against autograd through the float32 formula, input and a
    trained float32 gain. Tolerance: float32 1e-6 relative (the recomputed normalisation and the mean of
    gn n are summed in another order; measured 1.1e-7); bf16 bit-equal (every float32 value is rounded to
    bf16 at the same points)."""
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(2, 7, 64, generator=g).to(dtype) * 3, torch.randn(64, generator=g)
    dy = torch.randn(2, 7, 64, generator=g).to(dtype)
    out = []
    for f in (float32_rms_norm, model_module.RMSNormFunction.apply):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = f(x, w, 1e-5)
        y.backward(dy)
        out.append((y, x.grad, w.grad))
    tol = 0 if dtype == torch.bfloat16 else 1e-6
    for a, b in zip(*out):
        assert a.dtype == b.dtype and (a - b).abs().max() <= tol * a.abs().max()


def test_rms_norm_saves_its_input_in_its_own_dtype():
    """In bf16 the norm keeps x (bf16), its gain and the (..., 1) float32 1/rms; no float32 (..., C) copy."""
    norm = model_module.RMSNorm(64).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        norm(x)
    assert sorted(saved) == [((3, 5, 1), torch.float32), ((3, 5, 64), torch.bfloat16), ((64,), torch.bfloat16)]


def test_checkpointed_blocks_do_not_save_the_rope_tables():
    """checkpoint saves its tensor arguments for the recompute, and --offload (torch's save_on_cpu, a
    saved_tensors_hooks) copies every saved tensor to pinned host memory: the (T, D) cos/sin tables
    passed as arguments were saved once per layer. Bound to each block instead, they are not saved by the
    checkpointed forward at all. Counted with the same hook mechanism save_on_cpu uses."""
    net = Transformer(ModelConfig.from_name("tiny", n_layers=3), MemoryOptions(checkpointing=True)).train()
    T, D = 32, net.config.head_dim
    x = tokens(T, vocab=512)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = net(x, labels=x)
    assert saved.count((T, D)) == 0 and saved.count((*x.shape, net.config.dim)) >= 3, saved  # the 3 block inputs
    loss.backward()  # the recompute still finds its tables


def test_memory_options_are_constructor_arguments():
    opts = MemoryOptions(checkpointing=True, mlp_chunk=8, save_attention=True)
    with torch.device("meta"):
        assert Transformer(ModelConfig.from_name("tiny"), memory=opts).memory is opts
        assert Transformer(ModelConfig.from_name("tiny")).memory == MemoryOptions()
    assert load_model("tiny", memory=opts).memory is opts


def test_from_hf_errors_name_the_file_and_field():
    good = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(UserError, match=r"^x/config.json: missing field 'hidden_size'$"):
        ModelConfig.from_hf({k: v for k, v in good.items() if k != "hidden_size"}, where="x/config.json")
    with pytest.raises(UserError, match=r"^x/config.json: .*n_kv_heads"):
        ModelConfig.from_hf({**good, "num_key_value_heads": 3}, where="x/config.json")
    with pytest.raises(UserError, match="unknown model preset 'nope'"):
        ModelConfig.from_name("nope")


# ----------------------------------------------------------------------------- explicit positions


def test_arange_positions_equal_the_default_exactly():
    """positions = arange(start, start + T) is the default computation itself, so torch.equal (tolerance 0),
    for a plain forward and for the KV-cache path with start > 0."""
    model = load_model("tiny").eval()
    x = tokens(30, vocab=512)
    with torch.no_grad():
        assert torch.equal(model(x, torch.arange(30)), model(x))
        assert torch.equal(model(x, torch.arange(30)[None].expand(2, 30)), model(x))
        out = []
        for explicit in (False, True):
            model.setup_caches(2, 30)
            model(x[:, :10])
            pos = torch.arange(10, 30) if explicit else None
            out.append(model(x[:, 10:], pos, start=10))
        model.clear_caches()
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                     {"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0}])
def test_rope_tables_of_offset_positions_are_rows_of_the_longer_table(scaling):
    """Tolerance 0: each row is cos/sin of positions[t] * inv_freq alone, and both calls rescale (dynamic
    NTK) for the same length max(positions) + 1 = k + T. (B, T) positions give (B, 1, T, D) tables."""
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("tiny", rope_scaling=scaling))
    k, T = 250, 40  # k + T > max_seq_len 256: dynamic NTK is active
    cos, sin = model.rope_tables(torch.arange(k, k + T))
    cos_all, sin_all = model.rope_tables(torch.arange(k + T))
    assert cos.shape == (T, model.config.head_dim)
    assert torch.equal(cos, cos_all[k:]) and torch.equal(sin, sin_all[k:])
    cos_b, sin_b = model.rope_tables(torch.stack([torch.arange(k, k + T), torch.arange(k + T - 1, k - 1, -1)]))
    assert cos_b.shape == (2, 1, T, model.config.head_dim)
    assert torch.equal(cos_b[0, 0], cos) and torch.equal(sin_b[1, 0], sin.flip(0))


def _float64_rope(monkeypatch):
    """RoPE tables and rotation in float64 (the shipped ones are float32 by design, see rope.py)."""
    def cos_sin(inv_freq, positions):
        angles = positions.double()[:, None] * inv_freq.double()[None, :]  # (T, D/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, D)
        return angles.cos(), angles.sin()

    monkeypatch.setattr(rope, "rope_cos_sin", cos_sin)
    monkeypatch.setattr(rope, "apply_rope", lambda x, cos, sin: x * cos + rope.rotate_half(x) * sin)


def test_rope_is_relative_offset_positions_give_the_same_logits(monkeypatch):
    """RoPE's relative property: <R(m) q, R(n) k> depends on m - n only, so the same tokens at positions
    k..k+T and 0..T give the same logits (plain RoPE, no scaling). Weights of std 0.2 make attention
    depend strongly on positions (checked below), so the property is not trivially true.

    Tolerances: the shipped float32 RoPE tables carry a 2^-24 relative rounding that differs between the
    two position sets; through 2 layers to logits of magnitude ~6 that stays below 1e-4. With RoPE patched
    to float64 only float64 rounding remains (~1e-15 on the scores), hence 1e-10.
    """
    model = load_model("tiny").init_weights(0, std=0.2).double().eval()
    x = tokens(30, vocab=512)
    k = 1000
    with torch.no_grad():
        near, far = model(x, torch.arange(30)), model(x, torch.arange(k, k + 30))
        spread = model(x, 3 * torch.arange(30))
        assert (spread - near).abs().max() > 1.0  # positions matter a lot in this model
        assert (far - near).abs().max() < 1e-4
        _float64_rope(monkeypatch)
        near, far = model(x, torch.arange(30)), model(x, torch.arange(k, k + 30))
    assert (far - near).abs().max() < 1e-10


def test_batched_positions_equal_per_row_calls():
    """A (B, T) positions batch with different rows equals one call per row. Float32, tolerance 1e-5 (TOL):
    the same kernels; only matmul blocking over the batch can differ."""
    model = load_model("tiny").init_weights(0, std=0.2).eval()
    x = tokens(30, vocab=512)
    pos = torch.stack([torch.arange(5, 35), torch.arange(200, 260, 2)])
    with torch.no_grad():
        batch = model(x, pos)
        rows = torch.cat([model(x[i:i + 1], pos[i]) for i in range(2)])
        assert (model(x, pos[[1, 0]]) - batch).abs().max() > 1e-2  # the rows' positions matter
    assert (batch - rows).abs().max() < TOL


@pytest.mark.parametrize("start,T,gqa", [(5, 3, True), (16, 16, True), (7, 1, False), (40, 9, False)])
def test_lower_right_causal_bias_equals_the_boolean_mask(start, T, gqa):
    """cached_attention's CUDA form (torch.nn.attention.bias.causal_lower_right) against its CPU form (the
    (T, S) boolean mask, query i sees slots <= start + i), same q, k, v: within 1e-6 in float32 (the two
    differ at most in summation order). On CPU the bias materializes the mask (and warns why no fused
    kernel took it); on CUDA it runs flash or memory-efficient attention (bench/gpu_check.py)."""
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from model import cached_attention

    g = torch.Generator().manual_seed(start)
    S, H, Hkv = start + T, 4, 2 if gqa else 4
    q, k, v = torch.randn(1, H, T, 16, generator=g), torch.randn(1, Hkv, S, 16, generator=g), torch.randn(1, Hkv, S, 16, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), enable_gqa=gqa)
    torch.testing.assert_close(cached_attention(q, k, v, start), want, rtol=0, atol=1e-6)


def test_llama3_70b_presets_have_metas_parameter_count_and_rope():
    """Llama-3-70B with the sizes of Meta's config.json (dim 8192, 80 layers, 64/8 heads, ffn 28672, vocab
    128256, untied): 70,553,706,496 parameters counted on the meta device (the "70B"); 3.1 adds the llama3
    RoPE scaling and end tokens that 3.1-8B has."""
    with torch.device("meta"):
        net = Transformer(ModelConfig.from_name("llama-3-70b"))
    assert sum(p.numel() for p in net.parameters()) == 70_553_706_496
    a, b = ModelConfig.from_name("llama-3.1-70b"), ModelConfig.from_name("llama-3.1-8b")
    assert a.rope_scaling == b.rope_scaling and a.eos_id == b.eos_id and a.max_seq_len == 8192
    assert ModelConfig.from_name("llama-3-70b").rope_scaling is None
