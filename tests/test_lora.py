"""lora.py against transformers + PEFT 0.21 (forward), merge, gradients, QLoRA, errors (adapter files and
export: tests/test_lora_peft.py; the models both build are helpers.py's). Only the comparisons with
transformers and PEFT skip where those packages are missing.

Tolerance: 1e-5 absolute on float32 logits of a 2-layer tiny model wherever two implementations compute
the same function (ours vs transformers+PEFT, merged vs unmerged): they differ only in float32 summation
order (matmul blocking, W0 x + s B A x vs (W0 + s B A) x), which for logits of size ~1 stays below 1e-6;
1e-5 leaves a margin yet catches any wrong scaling, transpose or missed tensor (those move logits by >1e-3).
"""
import copy

import pytest
import torch

import quant4
from helpers import (ALL_EXTRAS, ALPHA, R, TOL, copy_into_peft, hf_logits, max_diff, ours,
                     peft_model, randomize_trainables, tokens)
from lora import LoRALinear, apply_lora, lora_modules, lora_scaling, lora_state_dict, merge_lora
from checkpoint import load_model
from errors import UserError

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


