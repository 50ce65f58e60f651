"""gguf_export.py: a written GGUF loads back through our importer and through transformers' GGUF loader
with the source's logits, carries the RoPE settings in llama.cpp's keys, and embeds the tokenizer.

References and tolerances:
  - f32: the same float32 weights in the same model code, so logits agree to 1e-6 (rounding-free path).
  - f16 / bf16 / q8_0: the file's weights are the source's rounded once, so the loaded model must equal
    the source with each weight rounded the same way (f16/bf16 casts; q8_0 through the gguf package's
    own numpy dequantize, an implementation independent of gguf_read.dequantize_gguf_block) to 1e-5;
    against the unrounded source the logits differ by at most 2% of their largest magnitude (f16 keeps
    11 bits, about 5e-4 relative per weight; Q8_0 keeps max|block| / 254, 0.4% of a block's largest
    weight; two random layers amplify that by well under 5x).
  - transformers reads llama.* shape keys, rope.freq_base and context_length from GGUF metadata but no
    rope.scaling.* keys for Llama (integrations/ggml.py; only gpt-oss reconstructs rope_scaling), so its
    loaded config is given the scaling explicitly and must then match to 1e-4 (float32 on both sides,
    different operation order).
"""
import json
import shutil

import numpy as np
import pytest
import torch

import gguf_export
import rope
from checkpoint import load_model, save_model
from errors import UserError
from lora import LoRALinear, apply_lora
from lora_peft import export_merged
from helpers import make_bpe_dir
from tokenizer import load_tokenizer

gguf = pytest.importorskip("gguf")

SCALINGS = {
    "plain": (50000.0, None),
    "linear": (50000.0, {"rope_type": "linear", "factor": 4.0}),
    "yarn": (20000.0, {"rope_type": "yarn", "factor": 4.0}),
    "llama3": (500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
}
T = 48


def tiny_dir(tmp_path, case, tok="smollm2"):
    """A random tiny model with the case's RoPE settings saved as HF, with a small BPE tokenizer.json."""
    theta, scaling = SCALINGS[case]
    scaling = None if scaling is None else {**scaling, "original_max_position_embeddings": 64}
    m = load_model("tiny", dtype=torch.float32, seed=3, rope_theta=theta, rope_scaling=scaling, max_seq_len=64)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path / f"src_{case}"
    save_model(m, d)
    bpe = make_bpe_dir(tmp_path, tok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bpe / f, d / f)
    return m, d


def inputs(vocab=512):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, T), generator=g)
    positions = torch.arange(T) * 5  # up to 235 > L0 = 64, so the scaling matters
    return tokens, positions


def logits(model, tokens, positions):
    with torch.no_grad():
        return model(tokens, positions).float()


def rounded(model, ftype):
    """A copy of `model` with every 2-D weight rounded as the GGUF `ftype` stores it."""
    out = load_model("tiny", dtype=torch.float32, **{k: getattr(model.config, k) for k in
                                                   ("rope_theta", "rope_scaling", "max_seq_len")})
    out.load_state_dict(model.state_dict())
    T_ = gguf.GGMLQuantizationType
    with torch.no_grad():
        for n, p in out.named_parameters():
            if p.dim() < 2 or ftype == "f32":
                continue
            if ftype == "f16":
                p.copy_(p.half().float())
            elif ftype == "bf16":
                p.copy_(p.bfloat16().float())
            else:
                q = gguf.quants.quantize(p.numpy(), T_.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, T_.Q8_0).reshape(p.shape)))
    return out


def fields(path):
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t.tensor_type.name for t in r.tensors}


@pytest.mark.parametrize("case", list(SCALINGS))
@pytest.mark.parametrize("ftype", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_through_our_importer(tmp_path, case, ftype):
    src, d = tiny_dir(tmp_path, case)
    out = gguf_export.export_gguf(d, tmp_path / "m.gguf", ftype)
    back = load_model(out, dtype=torch.float32)
    assert back.config.rope_theta == pytest.approx(src.config.rope_theta)
    assert back.config.rope_scaling == src.config.rope_scaling and back.config.max_seq_len == src.config.max_seq_len
    x = inputs()
    got, ref = logits(back, *x), logits(src, *x)
    torch.testing.assert_close(got, logits(rounded(src, ftype), *x), atol=1e-6 if ftype == "f32" else 1e-5, rtol=0)
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()
    if case != "plain":  # the stored scaling is what makes the logits match
        plain = load_model(out, dtype=torch.float32, rope_scaling=None, max_seq_len=256)
        assert (logits(plain, *x) - got).abs().max() > 1e-3


def test_metadata_carries_rope_and_tokenizer(tmp_path):
    src, d = tiny_dir(tmp_path, "yarn")
    meta, types = fields(gguf_export.export_gguf(d, tmp_path / "m.gguf", "q8_0"))
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 7
    assert meta["llama.rope.freq_base"] == 20000.0 and meta["llama.rope.scaling.type"] == "yarn"
    assert meta["llama.rope.scaling.factor"] == 4.0 and meta["llama.rope.scaling.original_context_length"] == 64
    assert meta["llama.context_length"] == 256  # L0 * s, the extended length
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # ffn 160 = 5 blocks of 32
    tok = load_tokenizer(d)
    raw = json.loads((d / "tokenizer.json").read_text())
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(meta["tokenizer.ggml.tokens"]) == 512 and meta["tokenizer.ggml.tokens"][-1] == "[PAD511]"
    assert len(meta["tokenizer.ggml.merges"]) == len(raw["model"]["merges"])
    im_start = tok.token_to_id("<|im_start|>")
    assert meta["tokenizer.ggml.token_type"][im_start] == 3 and meta["tokenizer.ggml.token_type"][300] == 1
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_id and meta["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert meta["tokenizer.chat_template"] == tok.chat_template
    # our GGUF tokenizer reader (llama.cpp's rules) rebuilds the same encoding from the embedded tokens
    text = "Hello world, 2+2 is 4. Ünïcödé ✓ <|im_start|>user"
    assert load_tokenizer(tmp_path / "m.gguf").encode(text) == tok.encode(text)


def test_llama3_table_and_ntk_base(tmp_path):
    src, d = tiny_dir(tmp_path, "llama3")
    meta, types = fields(gguf_export.export_gguf(d, tmp_path / "m.gguf", "f32"))
    assert types["rope_freqs.weight"] == "F32" and "llama.rope.scaling.type" not in meta
    f = torch.from_numpy(gguf.GGUFReader(str(tmp_path / "m.gguf")).get_tensor(0).data.copy())
    plain = rope.default_inv_freq(16, 500000.0)
    torch.testing.assert_close(plain / f, rope.rope_frequencies(16, 500000.0, src.config.rope_scaling)[0])
    keys, table = gguf_export.rope_keys(src.config.__class__(**{**vars(src.config), "rope_scaling": {
        "rope_type": "ntk", "factor": 4.0, "original_max_position_embeddings": 64}}))
    assert table is None and "rope.scaling.type" not in keys
    assert keys["rope.freq_base"] == pytest.approx(500000.0 * 4 ** (16 / 14))


def test_unsupported_rope_and_tokenizers_are_user_errors(tmp_path):
    src, d = tiny_dir(tmp_path, "plain")
    cfg = dict(vars(src.config))
    with pytest.raises(UserError, match="dynamic"):
        gguf_export.rope_keys(src.config.__class__(**{**cfg, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}))
    with pytest.raises(UserError, match="beta_fast"):
        gguf_export.rope_keys(src.config.__class__(**{**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                                                             "beta_fast": 16.0}}))
    with pytest.raises(UserError, match="byte tokenizer|no llama.cpp equivalent"):
        gguf_export.export_gguf(d, tmp_path / "b.gguf", "f16", tokenizer="bytes")
    with pytest.raises(UserError, match="--type"):
        gguf_export.export_gguf(d, tmp_path / "b.gguf", "q4_k")
    assert not (tmp_path / "b.gguf").exists() and not list(tmp_path.glob(".tmp-*"))


def test_llama3_pre_tokenizer_and_cli(tmp_path, capsys):
    src, d = tiny_dir(tmp_path, "plain", tok="llama-3")
    gguf_export.main([str(d), str(tmp_path / "c.gguf"), "--type", "f32"])
    meta, _ = fields(tmp_path / "c.gguf")
    assert meta["tokenizer.ggml.pre"] == "llama-bpe" and "wrote" in capsys.readouterr().out
    # a .gguf source re-embeds its own tokenizer keys
    gguf_export.main([str(tmp_path / "c.gguf"), str(tmp_path / "c2.gguf"), "--type", "f16"])
    meta2, _ = fields(tmp_path / "c2.gguf")
    assert {k: v for k, v in meta2.items() if k.startswith("tokenizer.")} == \
        {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    with pytest.raises(SystemExit):
        gguf_export.main([str(tmp_path / "missing"), str(tmp_path / "x.gguf")])
    assert "error:" in capsys.readouterr().err


def transformers_logits(path, scaling_cfg, tokens):
    """transformers' GGUF loader, with the RoPE scaling it does not read given through the config."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    for k, v in rope.rope_to_hf(scaling_cfg.rope_theta, scaling_cfg.rope_scaling, scaling_cfg.head_dim).items():
        setattr(cfg, k, v)
    if scaling_cfg.rope_scaling:
        cfg.max_position_embeddings = scaling_cfg.max_seq_len  # rope_from_hf's fallback for L0
    m = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=cfg,
                                                          torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return m(tokens).logits.float()


@pytest.mark.parametrize("case", ["plain", "linear", "yarn"])
def test_transformers_gguf_loader(tmp_path, case):
    src, d = tiny_dir(tmp_path, case)
    out = gguf_export.export_gguf(d, tmp_path / "m.gguf", "f32")
    tokens, _ = inputs()
    torch.testing.assert_close(transformers_logits(out, src.config, tokens), logits(src, tokens, None),
                               atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- SmolLM2 (slow)


@pytest.fixture(scope="module")
def smollm2_merged(tmp_path_factory, smollm2_path):
    """SmolLM2 from its GGUF, YaRN x2 on it, LoRA (random non-zero B) merged; exported to f16 GGUF."""
    tmp = tmp_path_factory.mktemp("smollm2")
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
    m = load_model(smollm2_path, dtype=torch.float32, rope_scaling=yarn)
    apply_lora(m, 8, 16.0, targets="all-linear", seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.01)
    export_merged(m, tmp / "merged", dtype=torch.float32)
    out = gguf_export.export_gguf(tmp / "merged", tmp / "merged.gguf", "f16", tokenizer=smollm2_path)
    tok = load_tokenizer(smollm2_path)
    text = ("The quick brown fox jumps over the lazy dog. " * 3 + "In 1492, Columbus sailed the ocean blue; "
            "the numbers 3.14159 and 2.71828 are famous. Once upon a time, there was a small robot who ") * 4
    ids = tok.encode(text)[:128]
    assert len(ids) == 128
    return m, out, torch.tensor([ids])


@pytest.mark.slow
def test_smollm2_merged_round_trip(smollm2_merged):
    m, out, tokens = smollm2_merged
    meta, _ = fields(out)
    assert meta["llama.rope.scaling.type"] == "yarn" and meta["llama.rope.scaling.factor"] == 2.0
    assert meta["llama.context_length"] == 16384 and meta["tokenizer.ggml.pre"] == "smollm"
    ref = logits(m, tokens, None)
    ours = logits(load_model(out, dtype=torch.float32), tokens, None)
    theirs = transformers_logits(out, m.config, tokens)
    # f16 weights (11-bit mantissa) through 30 layers: the logits (max |l| 42) moved by 0.052 here; stated bar 0.2,
    # with next-token argmax agreeing at >= 98% of positions.
    for who, got in (("ours", ours), ("transformers", theirs)):
        print(f"{who}: max |logit diff| {(got - ref).abs().max().item():.4f} (max |logit| {ref.abs().max().item():.1f}), "
              f"argmax agreement {(got.argmax(-1) == ref.argmax(-1)).float().mean().item():.3f}")
        assert (got - ref).abs().max() < 0.2
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.98
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=0)  # same f16 weights, float32 maths


@pytest.mark.slow
def test_smollm2_in_llama_cpp(smollm2_merged):
    llama_cpp = pytest.importorskip("llama_cpp")  # CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python
    m, out, tokens = smollm2_merged
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    llm.eval(tokens[0].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:tokens.shape[1]], dtype=np.float32))
    ref = logits(m, tokens, None)[0]
    agree = (theirs.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"llama.cpp: argmax agreement {agree:.3f}, max |logit diff| {(theirs - ref).abs().max().item():.3f}")
    assert agree >= 0.95


# ----------------------------------------------------------------------------- train.py --merge --gguf


@pytest.mark.slow  # two train.py subprocesses, ~10 s
def test_train_merge_writes_gguf(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    _, d = tiny_dir(tmp_path, "linear")
    (tmp_path / "corpus.txt").write_text((root / "rope.py").read_text())
    out = tmp_path / "out"
    common = [sys.executable, str(root / "train.py"), "--model", str(d), "--ctx", "64", "--data",
              str(tmp_path / "corpus.txt"), "--steps", "2", "--lr", "1e-2", "--out", str(out)]
    r = subprocess.run([*common, "--gguf", "q8_0"], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 1 and "--gguf" in r.stderr and "--merge" in r.stderr
    r = subprocess.run([*common, "--merge", "--gguf", "f32", "--dtype", "float32"], capture_output=True, text=True,
                       timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    merged, exported = load_model(out / "merged"), load_model(out / "merged.gguf")
    assert exported.config.rope_scaling == merged.config.rope_scaling
    x = inputs()
    torch.testing.assert_close(logits(exported, *x), logits(merged, *x), atol=1e-6, rtol=0)
