"""lora.py against transformers + PEFT 0.21 (forward, adapter files both ways), merge, gradients, QLoRA, errors.
Only the comparisons with transformers and PEFT skip where those packages are missing.

Tolerance: 1e-5 absolute on float32 logits of a 2-layer tiny model wherever two implementations compute
the same function (ours vs transformers+PEFT, merged vs unmerged): they differ only in float32 summation
order (matmul blocking, W0 x + s B A x vs (W0 + s B A) x), which for logits of size ~1 stays below 1e-6;
1e-5 leaves a margin yet catches any wrong scaling, transpose or missed tensor (those move logits by >1e-3).
"""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import quant4
from helpers import hf_llama
from lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, LLAMA_LINEARS, LoRALinear, apply_lora, export_merged,
                  load_adapter, lora_modules, lora_scaling, lora_state_dict, main, merge_lora, save_adapter)
from checkpoint import load_model
from errors import UserError

R, ALPHA = 4, 8  # alpha/r = 2 and alpha/sqrt(r) = 4 differ, so a wrong rsLoRA scaling shows
TOL = 1e-5  # see module docstring
ALL_EXTRAS = ("embed", "norm", "lm_head")
PEFT_EXTRAS = {"embed": "embed_tokens", "norm": "norm", "lm_head": "lm_head"}  # PEFT matches name endings


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """(hf_model, directory) for an untied and a tied random Llama, built once per module."""
    root = tmp_path_factory.mktemp("hf")
    return {tied: hf_llama(root / str(tied), tie_word_embeddings=tied) for tied in (False, True)}


def tokens(vocab=128, T=12, seed=0):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_trainables(model, seed=1):
    """B ~ N(0, 0.1) (nonzero, so the adapter matters) and extras perturbed by N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(noise) if ".lora_B" in n else p.add_(noise)
    return model


def ours(d, targets, trainable=(), rslora=False):
    m = load_model(str(d))
    apply_lora(m, R, ALPHA, targets=targets, trainable=trainable, rslora=rslora)
    return randomize_trainables(m).eval()


def peft_model(hf, targets, trainable=(), rslora=False, tied=False):
    """PEFT's LoRA over a copy of hf with our settings (the calling test skips without PEFT)."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets if isinstance(targets, str) else list(targets),
                          modules_to_save=[PEFT_EXTRAS[k] for k in trainable] or None, use_rslora=rslora,
                          ensure_weight_tying=tied, task_type="CAUSAL_LM")
    return peft.get_peft_model(copy.deepcopy(hf), cfg).eval()


@torch.no_grad()
def copy_into_peft(m, pm):
    """Our trainable tensors -> PEFT's lora_A/B.default and modules_to_save.default copies."""
    theirs = dict(pm.base_model.model.named_parameters())
    for n, p in lora_state_dict(m).items():
        mod, _, leaf = n.rpartition(".")
        key = f"{mod}.{leaf}".replace(".weight", ".default.weight") if ".lora_" in n else f"{mod}.modules_to_save.default.{leaf}"
        theirs[key].copy_(p)


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=ids).logits


def max_diff(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), "all-linear"])
def test_zero_B_leaves_model_unchanged(targets):
    m = load_model("tiny")
    ids = tokens(512)
    with torch.no_grad():
        before = m(ids)
        summary = apply_lora(m, R, ALPHA, targets=targets)
        after = m(ids)
    assert torch.equal(before, after)  # B = 0 exactly, so y + 0 = y bit for bit
    n_targets = 2 if targets != "all-linear" else 7
    assert len(list(lora_modules(m))) == n_targets * m.config.n_layers
    assert summary["lora"] == sum(p.numel() for n, p in m.named_parameters() if ".lora_" in n) == summary["trainable"]


def test_init_is_deterministic_and_scaling():
    a, b, c = (load_model("tiny") for _ in range(3))
    apply_lora(a, R, ALPHA, seed=3)
    apply_lora(b, R, ALPHA, seed=3)
    apply_lora(c, R, ALPHA, seed=4)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.lora_A.weight"],
                           sc["model.layers.0.self_attn.q_proj.lora_A.weight"])
    bound = 1 / 64 ** 0.5  # Kaiming-uniform(a=sqrt(5)) on (r, I) is U(-1/sqrt(I), 1/sqrt(I))
    assert sa["model.layers.0.self_attn.q_proj.lora_A.weight"].abs().max() <= bound
    assert lora_scaling(4, 8) == 2.0 and lora_scaling(4, 8, rslora=True) == 4.0


def test_merge_equation_on_one_layer():
    # Property: merged weight = W0 + s B A; merged layer output = LoRA layer output (float32, 1e-5 as above).
    base = torch.nn.Linear(16, 24, bias=True)
    layer = LoRALinear(copy.deepcopy(base), r=3, alpha=5.0, rslora=True)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 16)
    merged = layer.merged()
    want = base.weight + (5.0 / 3 ** 0.5) * layer.lora_B.weight @ layer.lora_A.weight
    assert max_diff(merged.weight, want) < TOL
    assert torch.equal(merged.bias, base.bias)
    assert max_diff(merged(x), layer(x)) < TOL


def test_mixed_dtype_branch_runs_in_the_activations_dtype():
    """float32 A, B over a bf16 base: the branch runs in bf16 with A and B rounded to it. Reference: PEFT's
    order of operations (x cast to float32, branch, sum, cast back) under torch.autocast(bfloat16), which
    runs each matmul in bf16 the same way; bit-equal. The gradients reach the float32 masters."""
    base = torch.nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    layer = LoRALinear(base, r=2, alpha=2, dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = (base(x) + layer.lora_B(layer.lora_A(x.float())) * layer.scaling).to(torch.bfloat16)
    assert torch.equal(y, want)
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == layer.lora_B.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------- reference: transformers + PEFT


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("trainable", [(), ALL_EXTRAS])
@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj"), "all-linear"])
def test_logits_match_peft(hf_base, targets, trainable, rslora):
    hf, d = hf_base[False]
    m = ours(d, targets, trainable, rslora)
    pm = peft_model(hf, targets, trainable, rslora)
    assert {n.replace(".default", "").replace("modules_to_save.", "") for n, p in pm.base_model.model.named_parameters()
            if p.requires_grad} == set(lora_state_dict(m))  # same trainable set, same names
    copy_into_peft(m, pm)
    ids = tokens()
    with torch.no_grad():
        assert max_diff(m(ids), hf_logits(pm, ids)) < TOL
        assert max_diff(m(ids), hf_logits(hf, ids)) > 1e-3  # the adapter and extras really change the output


@pytest.mark.parametrize("tied", [False, True])
def test_save_adapter_loads_in_peft(tmp_path, hf_base, tied):
    hf, d = hf_base[tied]
    trainable = ("embed", "norm") if tied else ALL_EXTRAS
    m = ours(d, "all-linear", trainable, rslora=True)
    save_adapter(m, tmp_path / "adapter", base_model_path=d)
    peft = pytest.importorskip("peft")
    base = pytest.importorskip("transformers").LlamaForCausalLM.from_pretrained(d)
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


# ----------------------------------------------------------------------------- merge and export


def test_merge_equals_unmerged_and_is_idempotent():
    m = load_model("tiny")
    names = set(m.state_dict())
    apply_lora(m, R, ALPHA, targets="all-linear", trainable=("norm",))
    randomize_trainables(m).eval()
    ids = tokens(512)
    with torch.no_grad():
        before = m(ids)
        merge_lora(m)
        after = m(ids)
    assert not any(True for _ in lora_modules(m))
    assert max_diff(before, after) < TOL
    state = {k: v.clone() for k, v in m.state_dict().items()}
    assert set(state) == names  # the base model's names again: no base./lora_ leftovers
    merge_lora(m)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())  # no double add


def test_export_merged_loads_in_transformers_with_rope_scaling(tmp_path):
    m = load_model("tiny", rope_scaling={"rope_type": "linear", "factor": 4.0})
    apply_lora(m, R, ALPHA, targets="all-linear", trainable=("embed", "norm"))
    randomize_trainables(m)
    ids = tokens(512, T=20)
    with torch.no_grad():
        want = m(ids)
    export_merged(m, tmp_path / "merged", dtype=torch.float32)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["factor"] == 4.0
    # transformers (reference) vs ours unmerged: float32, 1e-5 (see module docstring)
    assert max_diff(hf_logits(hf, ids), want) < TOL


# ----------------------------------------------------------------------------- gradients


def test_only_lora_and_extras_train():
    m = load_model("tiny")
    apply_lora(m, R, ALPHA, targets=("q_proj", "v_proj"), trainable=("norm",))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    want = {n for n, _ in m.named_parameters() if ".lora_" in n or n.endswith("norm.weight")}
    assert trainable == want and any(".lora_A" in n for n in want) and any("layernorm" in n for n in want)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = tokens(512)
    for _ in range(2):  # step 1 moves B (A's gradient is B^T dy = 0); step 2 moves A too
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, before[n]), n


# ----------------------------------------------------------------------------- QLoRA


def dequantized_copy(qmodel):
    """The same model with every Linear4bit replaced by an nn.Linear holding its dequantized weight."""
    ref = copy.deepcopy(qmodel)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, quant4.Linear4bit):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=False)
            lin.weight = torch.nn.Parameter(mod.dequantize(torch.float32))
            parent, _, leaf = name.rpartition(".")
            setattr(ref.get_submodule(parent), leaf, lin)
    return ref


def test_qlora_matches_dequantized_base_and_merges():
    q = quant4.quantize_model(load_model("tiny"))
    ref = dequantized_copy(q)
    for m in (q, ref):
        apply_lora(m, R, ALPHA, targets="all-linear", trainable=("norm",), seed=7)
        randomize_trainables(m)  # same seeds: identical A, B and norms in both
    assert isinstance(q.model.layers[0].mlp.up_proj.base, quant4.Linear4bit)
    assert q.model.layers[0].mlp.up_proj.lora_A.weight.dtype == torch.float32
    ids = tokens(512)
    with torch.no_grad():
        want = ref(ids)
        # Reference: LoRA over nn.Linear holding the dequantized weight; float32, 1e-5 (module docstring).
        assert max_diff(q(ids), want) < TOL
    loss = q(ids).float().logsumexp(-1).mean()
    loss.backward()  # gradients reach the adapters through the 4-bit base
    assert q.model.layers[0].mlp.up_proj.lora_B.weight.grad.abs().sum() > 0
    merge_lora(q)
    assert type(q.model.layers[0].mlp.up_proj) is torch.nn.Linear
    with torch.no_grad():
        assert max_diff(q(ids), want) < TOL


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


# ----------------------------------------------------------------------------- errors


def test_bad_arguments():
    m = load_model("tiny")
    with pytest.raises(UserError, match="unknown target 'x_proj'"):
        apply_lora(m, R, ALPHA, targets=("q_proj", "x_proj"))
    with pytest.raises(UserError, match="unknown target 'lm_head'"):
        apply_lora(m, R, ALPHA, targets=("lm_head",))
    with pytest.raises(UserError, match="unknown trainable 'bias'"):
        apply_lora(m, R, ALPHA, trainable=("bias",))
    with pytest.raises(UserError, match="r must be >= 1"):
        apply_lora(m, 0, ALPHA)
    with pytest.raises(UserError, match="dropout must be in"):
        apply_lora(m, R, ALPHA, dropout=1.0)
    assert not any(True for _ in lora_modules(m))  # failed calls changed nothing
    apply_lora(m, R, ALPHA)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(m, R, ALPHA)


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
