"""lora_peft.py: adapter files both ways with PEFT 0.21 (PeftModel.from_pretrained reads ours, our
load_adapter reads save_pretrained's), merged export read by transformers and by our loader, file errors,
atomic saves, and the merge command.

Tolerance: 1e-5 absolute on float32 logits, as in tests/test_lora.py (same tiny models and reason);
a reloaded adapter restores every tensor exactly.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quant4
from checkpoint import load_model
from errors import UserError
from lora import LLAMA_LINEARS, apply_lora, lora_state_dict
from lora_peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_merged, load_adapter, main, save_adapter
from helpers import (ALL_EXTRAS, ALPHA, R, TOL, hf_logits, max_diff, ours, peft_model, randomize_trainables,
                     tokens)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied", [False, True])
def test_save_adapter_loads_in_peft(tmp_path, hf_base, tied):
    hf, d = hf_base[tied]
    trainable = ("embed", "norm") if tied else ALL_EXTRAS
    m = ours(d, "all-linear", trainable, rslora=True)
    save_adapter(m, tmp_path / "adapter", base_model_path=d)
    base = transformers.LlamaForCausalLM.from_pretrained(d)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = tokens()
    with torch.no_grad():
        assert max_diff(m(ids), hf_logits(pm, ids)) < TOL
    # And back into a fresh model of ours: every trained tensor restored exactly.
    m2 = load_model(str(d))
    load_adapter(m2, tmp_path / "adapter")
    s1, s2 = lora_state_dict(m), lora_state_dict(m2)
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("tied", [False, True])
def test_peft_save_pretrained_loads_in_ours(tmp_path, hf_base, tied):
    hf, d = hf_base[tied]
    trainable = ("embed", "norm") if tied else ALL_EXTRAS
    pm = peft_model(hf, "all-linear", trainable, rslora=False, tied=tied)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "peft_adapter")
    m = load_model(str(d))
    summary = load_adapter(m, tmp_path / "peft_adapter")
    assert summary["embed"] > 0 and summary["norm"] > 0
    ids = tokens()
    with torch.no_grad():
        assert max_diff(m(ids), hf_logits(pm, ids)) < TOL


def test_export_merged_loads_in_transformers_with_rope_scaling(tmp_path):
    m = load_model("tiny", rope_scaling={"rope_type": "linear", "factor": 4.0})
    apply_lora(m, R, ALPHA, targets="all-linear", trainable=("embed", "norm"))
    randomize_trainables(m)
    ids = tokens(512, T=20)
    with torch.no_grad():
        want = m(ids)
    export_merged(m, tmp_path / "merged", dtype=torch.float32)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["factor"] == 4.0
    # transformers (reference) vs ours unmerged: float32, 1e-5 (see module docstring)
    assert max_diff(hf_logits(hf, ids), want) < TOL


def test_qlora_export_dequantizes_untargeted_layers(tmp_path):
    q = quant4.quantize_model(load_model("tiny"))
    apply_lora(q, R, ALPHA)  # attention only: the MLP stays 4-bit until export
    randomize_trainables(q)
    ids = tokens(512)
    with torch.no_grad():
        want = q(ids)
    export_merged(q, tmp_path / "merged", dtype=torch.float32)
    back = load_model(str(tmp_path / "merged"))
    with torch.no_grad():
        assert max_diff(back(ids), want) < TOL


def test_adapter_file_errors(tmp_path):
    m = load_model("tiny")
    apply_lora(m, R, ALPHA, trainable=("norm",))
    d = tmp_path / "adapter"
    save_adapter(m, d)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    with pytest.raises(UserError, match="no such adapter directory"):
        load_adapter(load_model("tiny"), tmp_path / "nope")
    with pytest.raises(UserError, match=r"adapter_model.safetensors: tensor 'model.layers.0.*' has shape .* the model expects"):
        load_adapter(load_model("tiny", dim=32, n_heads=2, n_kv_heads=1), d)  # a different model size
    with pytest.raises(UserError, match=r"\(r, alpha, rslora\)"):
        other = load_model("tiny")
        apply_lora(other, 2 * R, ALPHA)
        load_adapter(other, d)

    state = load_file(d / ADAPTER_WEIGHTS)
    missing = {k: v for k, v in state.items() if k != name}
    save_file(missing, tmp_path / "w.safetensors")
    (tmp_path / "w.safetensors").replace(d / ADAPTER_WEIGHTS)
    with pytest.raises(UserError, match=r"adapter_model.safetensors: tensor 'model.layers.0.self_attn.q_proj.lora_A.weight' is missing"):
        load_adapter(load_model("tiny"), d)
    save_file({**state, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": state[name].clone()}, d / ADAPTER_WEIGHTS)
    with pytest.raises(UserError, match="unexpected tensor 'model.layers.0.mlp.up_proj.lora_A.weight'"):
        load_adapter(load_model("tiny"), d)

    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    (d / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora"):
        load_adapter(load_model("tiny"), d)
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg))

    (d / ADAPTER_WEIGHTS).replace(d / "adapter_model.bin")
    with pytest.raises(UserError, match="pickle adapters are never loaded"):
        load_adapter(load_model("tiny"), d)
    (d / "adapter_model.bin").unlink()
    with pytest.raises(UserError, match="holds no weights"):
        load_adapter(load_model("tiny"), d)
    (d / ADAPTER_CONFIG).unlink()
    with pytest.raises(UserError, match="adapter_config.json: missing"):
        load_adapter(load_model("tiny"), d)


def test_save_adapter_is_atomic_and_overwrites(tmp_path):
    m = load_model("tiny")
    apply_lora(m, R, ALPHA)
    d = tmp_path / "adapter"
    save_adapter(m, d)
    randomize_trainables(m)
    save_adapter(m, d)  # the trainer re-saves into the same directory
    assert sorted(p.name for p in d.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])  # no temp files left
    m2 = load_model("tiny")
    load_adapter(m2, d)
    assert all(torch.equal(v, lora_state_dict(m2)[k]) for k, v in lora_state_dict(m).items())
    assert set(json.loads((d / ADAPTER_CONFIG).read_text())["target_modules"]) <= set(LLAMA_LINEARS)


def test_cli_merges_and_reports_errors_in_one_line(tmp_path, capsys):
    m = load_model("tiny")
    apply_lora(m, R, ALPHA)
    randomize_trainables(m)
    save_adapter(m, tmp_path / "adapter")
    ids = tokens(512)
    with torch.no_grad():
        want = m(ids)
    main(["tiny", str(tmp_path / "adapter"), str(tmp_path / "out"), "--dtype", "float32"])
    with torch.no_grad():  # same tolerance and reason as above (merged vs unmerged float32)
        assert max_diff(load_model(str(tmp_path / "out"))(ids), want) < TOL
    with pytest.raises(SystemExit) as e:
        main(["tiny", str(tmp_path / "missing"), str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "no such adapter directory" in err

