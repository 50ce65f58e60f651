"""model.py against transformers' LlamaForCausalLM, checkpoint I/O, GGUF import, KV cache and generation.

Tolerances: float32 logits of an identical computation differ only by summation order, so 1e-5 absolute
on logits of magnitude ~1 (tiny random models). The SmolLM2 GGUF test allows 1e-3: 30 layers of
float32 reordering on real weights with logits of magnitude ~20.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import hf_llama
from model import (ModelConfig, Transformer, dequantize_gguf_block, generate, load_model, prefill, read_gguf,
                   unpermute_qk)

ROOT = Path(__file__).resolve().parents[1]
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
    ours = Transformer.from_pretrained(d).eval()
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert (got - ref).abs().max() < TOL


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_save_pretrained_round_trip_into_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    _, d = hf_llama(tmp_path, **CONFIGS[name])
    ours = Transformer.from_pretrained(d).eval()
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = tokens()
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max() < TOL


def test_sharded_save_and_load(tmp_path):
    model = load_model("tiny").eval()
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = Transformer.from_pretrained(out).eval()
    x = tokens(vocab=512)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_from_hf_reads_both_rope_spellings():
    old = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
               max_position_embeddings=4096, rope_theta=5e5,
               rope_scaling={"type": "linear", "factor": 2.0})
    new = {k: v for k, v in old.items() if not k.startswith("rope")}
    new["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}
    a, b = ModelConfig.from_hf(old), ModelConfig.from_hf(new)
    assert a.rope_theta == b.rope_theta == 5e5
    assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == 2.0


# ----------------------------------------------------------------------------- cache and generation


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


def test_chunked_prefill_equals_one_shot():
    model = load_model("tiny").eval()
    x = tokens(100, vocab=512, batch=1)[0]
    model.setup_caches(1, 100)
    one = prefill(model, x)
    model.setup_caches(1, 100)
    chunked = prefill(model, x, chunk=7)
    model.clear_caches()
    assert (one - chunked).abs().max() < TOL


def test_greedy_generation_matches_transformers(tmp_path):
    hf, d = hf_llama(tmp_path, **CONFIGS["gqa"])
    ours = Transformer.from_pretrained(d)
    prompt = tokens(12, batch=1)
    ref = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16, eos_token_id=None,
                      pad_token_id=0)[0, 12:].tolist()
    assert generate(ours, prompt[0], 16, prefill_chunk=5) == ref


def test_sampling_is_reproducible_and_top_p_one_token_is_greedy():
    model = load_model("tiny")
    p = list(range(5))
    a = generate(model, p, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, p, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b
    # top_p tiny keeps only the most likely token: equals greedy
    assert generate(model, p, 8, temperature=1.0, top_p=1e-9) == generate(model, p, 8)


def test_stop_ids_end_generation():
    model = load_model("tiny")
    first = generate(model, [1, 2, 3], 1)[0]
    assert generate(model, [1, 2, 3], 10, stop_ids=[first]) == [first]


def test_checkpointing_gives_same_gradients():
    model = load_model("tiny").train()
    x = tokens(16, vocab=512)
    model(x).sum().backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.checkpointing = True
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
    model.checkpointing, model.mlp_chunk = checkpointing, chunk
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
    model.checkpointing = True
    x = tokens(40, vocab=512)
    grads, calls = [], []
    for save in (False, True):
        model.zero_grad()
        model.save_attention = save
        with CountAttention() as counter:
            model(x, labels=x).backward()
        calls.append(counter.calls)
        grads.append([p.grad.clone() for p in model.parameters()])
    n = model.config.n_layers
    assert calls == [2 * n, n], calls
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_block_dequant_matches_gguf_package(kind):
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    w = torch.randn(6, 96, generator=torch.Generator().manual_seed(0)).numpy()
    q = quants.quantize(w, gguf.GGMLQuantizationType[kind])
    ref = torch.from_numpy(quants.dequantize(q, gguf.GGMLQuantizationType[kind]).copy())
    got = dequantize_gguf_block(torch.from_numpy(q.copy()), kind)
    assert torch.equal(got, ref)  # the same float32 operations: exact


def test_unpermute_inverts_llama_cpp_permute():
    n_heads, hd, dim = 3, 8, 5
    w = torch.randn(n_heads * hd, dim)
    # llama.cpp's convert script: reshape(n_head, 2, hd // 2, ...).swapaxes(1, 2)
    permuted = w.reshape(n_heads, 2, hd // 2, dim).transpose(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_qk(permuted, n_heads), w)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2_path):
    transformers = pytest.importorskip("transformers")
    p = Path(smollm2_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    ours = Transformer.from_pretrained(p, dtype=torch.float32).eval()
    assert ours.config.n_heads == 9 and ours.config.n_kv_heads == 3 and ours.config.tie_embeddings
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-3, diff
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert generate(ours, ids[0], len(ref), prefill_chunk=4)[:len(ref)] == ref


# ----------------------------------------------------------------------------- bad checkpoints


def _saved_tiny(tmp_path):
    d = tmp_path / "tiny"
    load_model("tiny").save_pretrained(d)
    return d


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _saved_tiny(tmp_path)
    state = load_file(d / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        Transformer.from_pretrained(d)


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _saved_tiny(tmp_path)
    state = load_file(d / "model.safetensors")
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(3,\)"):
        Transformer.from_pretrained(d)
    state["model.norm.weight"] = torch.ones(64)
    state["model.extra.weight"] = torch.ones(2)
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected tensor 'model.extra.weight'"):
        Transformer.from_pretrained(d)


def test_truncated_file_and_pickles_are_refused(tmp_path):
    d = _saved_tiny(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors file"):
        Transformer.from_pretrained(d)
    f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickle checkpoints are never loaded"):
        Transformer.from_pretrained(d)


def test_mismatched_config_is_named(tmp_path):
    d = _saved_tiny(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight' has shape"):
        Transformer.from_pretrained(d)


def test_save_refuses_non_empty_directory_and_leaves_no_temp(tmp_path):
    model = load_model("tiny")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "taken")
    model.save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "taken"]


def test_command_line_error_is_one_line(tmp_path):
    d = _saved_tiny(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 10)
    r = subprocess.run([sys.executable, str(ROOT / "model.py"), "convert", str(d), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_chunked_cross_entropy_equals_full_and_its_gradient():
    model = load_model("tiny").train()
    x = tokens(50, vocab=512)
    labels = tokens(50, vocab=512, seed=1)
    labels[:, :7] = -100
    ref = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    got = model(x, labels=labels, loss_chunk=13)
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-3  # a sum over ~86 tokens of float32 NLLs ~6: reordering only
    for a, p in zip(g, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_frozen_head_loss_equals_full_cross_entropy_and_its_gradient():
    """The fused path (frozen lm_head: gradient formed in forward) against F.cross_entropy on full logits."""
    model = load_model("tiny").train()
    model.lm_head.weight.requires_grad_(False)
    x = tokens(50, vocab=512)
    labels = tokens(50, vocab=512, seed=2)
    labels[0, 10:30] = -100
    ref = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), labels.flatten(), reduction="sum")
    ref.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    got = model(x, labels=labels, loss_chunk=16)
    (got * 0.5).backward()  # a scaled loss checks the incoming gradient is applied
    assert abs(got.item() - ref.item()) < 1e-3  # float32 sums of ~80 NLLs of ~6: reordering only
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(2 * p.grad, g[n], atol=1e-5), n
