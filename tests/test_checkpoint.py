"""checkpoint.py: safetensors save/load (into transformers too), sharding; the strict name check of every
loader; NF4 streaming load and the quantized file; the convert CLI (GGUF reading: tests/test_gguf_read.py).

Tolerances: float32 logits of an identical computation differ only by summation order, so 1e-5 absolute
on logits of magnitude ~1 (tiny random models). Loads that copy tensors: exact.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import quant4 as Q
from checkpoint import (assign_quantized, load_model, load_quantized_file, read_checkpoint, save_model,
                        save_quantized, strict_items)
from helpers import StandInModel, hf_llama
from errors import UserError

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5

CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
}


def tokens(n=24, vocab=128, batch=2, seed=0):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize("name", ["gqa", "tied"])
def test_save_model_round_trip_into_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    _, d = hf_llama(tmp_path, **CONFIGS[name])
    ours = load_model(str(d)).eval()
    out = tmp_path / "ours"
    save_model(ours, out)
    back = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    x = tokens()
    with torch.no_grad():
        assert (back(x).logits - ours(x)).abs().max() < TOL


def test_sharded_save_and_load(tmp_path):
    model = load_model("tiny").eval()
    out = tmp_path / "sharded"
    save_model(model, out, max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = load_model(str(out)).eval()
    x = tokens(vocab=512)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


# ----------------------------------------------------------------------------- strict loading


def _saved_tiny(tmp_path):
    d = tmp_path / "tiny"
    save_model(load_model("tiny"), d)
    return d


def test_missing_tensor_is_named(tmp_path):
    d = _saved_tiny(tmp_path)
    state = load_file(d / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, d / "model.safetensors")
    with pytest.raises(UserError, match="tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        load_model(str(d))


def test_wrong_shape_and_unexpected_tensor_are_named(tmp_path):
    d = _saved_tiny(tmp_path)
    state = load_file(d / "model.safetensors")
    state["model.norm.weight"] = torch.ones(3)
    save_file(state, d / "model.safetensors")
    with pytest.raises(UserError, match=r"'model.norm.weight' has shape \(3,\)"):
        load_model(str(d))
    state["model.norm.weight"] = torch.ones(64)
    state["model.extra.weight"] = torch.ones(2)
    save_file(state, d / "model.safetensors")
    with pytest.raises(UserError, match="unexpected tensor 'model.extra.weight'"):
        load_model(str(d))


def test_truncated_file_and_pickles_are_refused(tmp_path):
    d = _saved_tiny(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(UserError, match="model.safetensors: unreadable safetensors file"):
        load_model(str(d))
    f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match="pickle checkpoints are never loaded"):
        load_model(str(d))


def test_mismatched_config_is_named(tmp_path):
    d = _saved_tiny(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 32
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"mlp\.\w+_proj\.weight' has shape"):
        load_model(str(d))


def test_save_refuses_non_empty_directory_and_leaves_no_temp(tmp_path):
    model = load_model("tiny")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(UserError, match="holds other files"):
        save_model(model, tmp_path / "taken")
    save_model(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "taken"]


def test_command_line_error_is_one_line(tmp_path):
    d = _saved_tiny(tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 10)
    r = subprocess.run([sys.executable, str(ROOT / "checkpoint.py"), "convert", str(d), str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_strict_items_checks_each_name_once():
    expected = {"a": (2,), "b": (3,), "c": (1,)}
    ok = [("a", torch.zeros(2)), ("b", torch.zeros(3))]
    assert [n for n, _ in strict_items(iter(ok), expected, "src", optional=("c",))] == ["a", "b"]
    with pytest.raises(UserError, match=r"^src: tensor 'c' is missing \(1 missing in all\)$"):
        list(strict_items(iter(ok), expected, "src"))
    with pytest.raises(UserError, match="^src: tensor 'a' appears twice$"):
        list(strict_items(iter(ok + ok[:1]), expected, "src"))
    with pytest.raises(UserError, match=r"^src: tensor 'b' has shape \(4,\), the model expects \(3,\)"):
        list(strict_items(iter([("b", torch.zeros(4))]), expected, "src"))
    with pytest.raises(UserError, match="^src: unexpected tensor 'z'"):
        list(strict_items(iter([("z", torch.zeros(1))]), expected, "src"))


def test_unknown_spec_and_quant_are_named(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'}: no such model directory, file or preset"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="quant 'int8'"):
        load_model("tiny", quant="int8")


def test_tied_checkpoint_with_or_without_lm_head(tmp_path):
    """A tied model's checkpoint may carry lm_head.weight (transformers may write it) or not."""
    model = load_model("tiny", tie_embeddings=True)
    d = tmp_path / "tied"
    save_model(model, d)
    state = load_file(d / "model.safetensors")
    assert "lm_head.weight" not in state
    back = load_model(str(d))
    assert back.lm_head.weight is back.model.embed_tokens.weight
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, d / "model.safetensors")
    back = load_model(str(d))
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


def test_convert_cli_writes_a_loadable_directory(tmp_path, capsys):
    from checkpoint import main

    src = _saved_tiny(tmp_path)
    main(["convert", str(src), str(tmp_path / "out")])
    assert "wrote" in capsys.readouterr().out
    x = tokens(vocab=512)
    with torch.no_grad():
        assert torch.equal(load_model(str(tmp_path / "out"))(x), load_model(str(src))(x))


# ----------------------------------------------------------------------------- NF4 streaming and quantized files


def _zero(module):
    for t in module.parameters(recurse=False):
        t.data.zero_()


def test_load_quantized_streaming_equals_quantize_model(tmp_path):
    torch.manual_seed(0)
    source = StandInModel().to(torch.bfloat16)
    state = source.state_dict()
    reference = Q.quantize_model(StandInModel().to(torch.bfloat16))
    reference.load_state_dict({k: v for k, v in Q.quantize_model(source).state_dict().items()})
    with torch.device("meta"):
        skeleton = StandInModel()
    loaded = assign_quantized(skeleton, iter(state.items()), "state", dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    # safetensors round trip into a fresh meta skeleton
    path = tmp_path / "q.safetensors"
    save_quantized(loaded, path)
    fresh = Q.quantize_model(StandInModel().apply(_zero).to(torch.bfloat16))
    load_quantized_file(fresh, path)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert os.listdir(tmp_path) == ["q.safetensors"]  # no temporary left


@pytest.mark.parametrize(
    "edit, message",
    (
        (lambda s: s.pop("layers.0.q_proj.weight"), "missing"),
        (lambda s: s.__setitem__("layers.9.q_proj.weight", torch.zeros(64, 64)), "unexpected"),
        (lambda s: s.__setitem__("layers.0.up_proj.weight", torch.zeros(64, 64)), "shape"),
    ),
)
def test_load_quantized_is_strict(edit, message):
    state = dict(StandInModel().state_dict())
    edit(state)
    with torch.device("meta"):
        skeleton = StandInModel()
    with pytest.raises(UserError, match=message):
        assign_quantized(skeleton, iter(state.items()), "state")


def test_load_quantized_file_missing_path(tmp_path):
    with pytest.raises(UserError, match="nope.safetensors"):
        load_quantized_file(StandInModel(), tmp_path / "nope.safetensors")


def test_load_quantized_file_is_strict(tmp_path):
    model = Q.quantize_model(StandInModel())
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    state = load_file(path)
    state.pop("layers.1.up_proj.weight_packed")
    save_file(state, path)
    with pytest.raises(UserError, match=r"q.safetensors: tensor 'layers.1.up_proj.weight_packed' is missing"):
        load_quantized_file(Q.quantize_model(StandInModel()), path)


@pytest.mark.parametrize("tied", [False, True])
def test_load_model_nf4_equals_quantizing_the_loaded_model(tmp_path, tied):
    """Streaming NF4 (each weight cast to dtype, then quantized as it arrives) equals loading in dtype and
    quantizing the whole model (quant4.quantize_model, lm_head kept): exact. Presets quantize after init."""
    d = tmp_path / "m"
    save_model(load_model("tiny", tie_embeddings=tied), d)
    streamed = load_model(str(d), dtype=torch.bfloat16, quant="nf4")
    whole = Q.quantize_model(load_model(str(d), dtype=torch.bfloat16), skip=("lm_head",))
    assert isinstance(streamed.model.layers[0].mlp.up_proj, Q.Linear4bit) and type(streamed.lm_head) is nn.Linear
    a, b = streamed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tied
    preset = load_model("tiny", dtype=torch.bfloat16, quant="nf4", seed=3)
    ref = Q.quantize_model(load_model("tiny", dtype=torch.bfloat16, seed=3), skip=("lm_head",))
    a, b = preset.state_dict(), ref.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


STREAMING_LOADERS = {  # how each entry point loads an NF4 model: the trainer and eval.py share load_model
    "checkpoint.load_model": "load_model({path!r}, dtype=torch.float32, quant='nf4')",
    "eval.load": "ev.load({path!r}, None, argparse.Namespace(dtype='float32', quant='nf4', tokenizer='bytes', "
                 "seed=0, device=torch.device('cpu')))[0]",
}


@pytest.mark.parametrize("loader", sorted(STREAMING_LOADERS))
def test_load_model_nf4_streams_below_the_float32_size(tmp_path, loader):
    """load_model(dir, dtype=float32, quant="nf4") never holds the float32 model: peak anonymous memory
    growth stays below its size, while loading it whole and then quantizing (the non-streaming way) does
    not. The checkpoint is stored in bfloat16 (as released models are), so every float32 tensor is a new
    allocation.

    Measured in a fresh process: a thread samples RssAnon (/proc/self/status) while the load runs; file
    pages of the memory-mapped safetensors file are page cache, not anonymous, and are left out.
    MALLOC_MMAP_THRESHOLD_ makes glibc return each freed tensor to the system at once.
    """
    d = tmp_path / "m"
    model = load_model("tiny", dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=1024, vocab_size=2048)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    save_model(model.to(torch.bfloat16), d)
    save_model(load_model("tiny").to(torch.bfloat16), tmp_path / "warm")
    del model
    script = textwrap.dedent(f"""
        import argparse, sys, threading, torch
        sys.path.insert(0, {str(ROOT)!r})
        import eval as ev
        import quant4
        from checkpoint import load_model

        def anon():
            with open('/proc/self/status') as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith('RssAnon:'))

        def peak_growth(load):
            before, peak, done = anon(), [0], threading.Event()
            def sample():
                while not done.is_set():
                    peak[0] = max(peak[0], anon())
            t = threading.Thread(target=sample)
            t.start()
            try:
                net = load()
            finally:  # a failing load must not leave the sampler spinning (the process would never exit)
                done.set()
                t.join()
            return max(peak[0], anon()) - before, net

        sys.setswitchinterval(1e-5)
        for _ in range(2):  # warm up: the first call touches new code and allocator arenas
            load_model({str(tmp_path / "warm")!r}, dtype=torch.float32, quant='nf4')
        streamed, net = peak_growth(lambda: {STREAMING_LOADERS[loader].format(path=str(d))})
        del net
        whole, net = peak_growth(lambda: quant4.quantize_model(load_model({str(d)!r}, dtype=torch.float32)))
        print(streamed, whole)
    """)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    streamed, whole = map(int, out.stdout.split())
    mib = f"{loader}: streamed {streamed / 2**20:.1f} MiB, whole then quantized {whole / 2**20:.1f} MiB, " \
          f"float32 model {fp32_bytes / 2**20:.1f} MiB"
    assert streamed < fp32_bytes, mib
    assert whole >= fp32_bytes * 0.9, mib  # the measurement does see a float32 model held at once


def test_bad_config_json_is_named(tmp_path):
    d = _saved_tiny(tmp_path)
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "num_hidden_layers"}))
    with pytest.raises(UserError, match=f"^{cfg_path}: missing field 'num_hidden_layers'$"):
        read_checkpoint(d)
    cfg_path.write_text("{not json")
    with pytest.raises(UserError, match=f"^{cfg_path}: not valid JSON"):
        load_model(str(d))
    cfg_path.unlink()
    with pytest.raises(UserError, match=f"^{cfg_path}: missing"):
        load_model(str(d))
