"""parallel_fsdp.py and --fsdp: Linear4bit's storage as frozen Parameters, gathering and re-cutting the trained
state in one process, and (slow) torchrun runs against one process on the same data and seed: 2 ranks,
dp 2 x cp 2, and kill -9 + --resume."""
import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

import lora
import parallel_fsdp
import quant4 as Q
import train
import train_config
import train_state
from checkpoint import load_model
from errors import UserError
from helpers import CP_COMMON, TINY, adapter_tensors, losses, run, torchrun_sigkill_and_resume


# ----------------------------------------------------------------------------- Linear4bit storage


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_stores_frozen_parameters_with_the_same_keys_and_values(double_quant):
    """FSDP2 shards Parameters only, so the codes and scales are frozen Parameters; the state_dict keys are the
    ones files hold, and dequantize is bit-equal to the NF4 functions' own round trip (no storage change of
    the values)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True)
    layer = Q.Linear4bit.from_linear(lin, double_quant=double_quant)
    stored = ({"weight_packed", "weight_absmax_codes", "weight_absmax_scale"} if double_quant
              else {"weight_packed", "weight_absmax"})
    params = dict(layer.named_parameters())
    assert set(params) == stored | {"bias"} and not any(p.requires_grad for p in params.values())
    assert {n for n, _ in layer.named_buffers()} == ({"weight_absmax_offset"} if double_quant else set())
    assert set(layer.state_dict()) == stored | {"bias"} | ({"weight_absmax_offset"} if double_quant else set())
    ref = Q.dequantize_nf4(Q.quantize_nf4(lin.weight.detach(), 64, double_quant, 256))
    assert torch.equal(layer.dequantize(), ref)
    x = torch.randn(3, 96)
    assert torch.equal(layer(x), (x @ ref.T + lin.bias).detach())
    empty = Q.Linear4bit(96, 40, bias=True, double_quant=double_quant, device="meta")
    empty.load_state_dict(layer.state_dict(), assign=True)
    assert torch.equal(empty.dequantize(), ref) and not any(p.requires_grad for p in empty.parameters())


# ----------------------------------------------------------------------------- one process: gather and re-cut


@pytest.fixture
def one_rank_group():
    """A gloo process group of world 1 in this process (FSDP2's machinery with one chunk per tensor)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    dist.destroy_process_group()


def tiny_qlora():
    torch.manual_seed(0)
    net = load_model("tiny", dtype=torch.float32, quant="nf4")
    lora.apply_lora(net, r=4, alpha=8, targets="all-linear", trainable=("norm",))
    return net


def one_step(net, opt, tokens):
    loss = net(tokens[:, :-1], labels=tokens[:, 1:])
    loss.backward()
    norm = parallel_fsdp.clip_grad_norm([p for p in net.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), norm


def test_sharded_model_steps_like_the_plain_one_and_whole_gathers_and_cuts_back(one_rank_group):
    """World 1: FSDP2's DTensor Parameters take the same step as the plain model (bit-equal: one chunk, no
    reduction); inside `whole` the trained Parameters and Adam moments are plain tensors keyed as in an
    unsharded run, values written there (what a resume loads) are cut back into the DTensors on exit, and
    the NF4 codes stay uint8 DTensors throughout."""
    tokens = torch.randint(0, 512, (1, 33), generator=torch.Generator().manual_seed(0))
    plain, sharded = tiny_qlora(), tiny_qlora()
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=one_rank_group)
    fully_shard(sharded, mesh=one_rank_group)
    packed = sharded.model.layers[0].self_attn.q_proj.base.weight_packed
    assert isinstance(packed, DTensor) and packed.dtype == torch.uint8
    opts = [torch.optim.AdamW([p for p in n.parameters() if p.requires_grad], lr=1e-2) for n in (plain, sharded)]
    (la, na), (lb, nb) = one_step(plain, opts[0], tokens), one_step(sharded, opts[1], tokens)
    assert torch.equal(la, lb) and torch.equal(na, nb) and not isinstance(nb, DTensor)
    names = train.trained_names(sharded)
    with parallel_fsdp.whole(sharded, opts[1]):
        inside = lora.lora_state_dict(sharded)
        assert not any(isinstance(t, DTensor) for t in inside.values())
        for k, t in lora.lora_state_dict(plain).items():
            assert torch.equal(inside[k], t), k
        moments = train_state.optimizer_tensors(opts[1], train.trained_names(sharded))
        assert moments.keys() == train_state.optimizer_tensors(opts[0], train.trained_names(plain)).keys()
        assert not any(isinstance(t, DTensor) for t in moments.values())
        key = next(k for k in inside if k.endswith("lora_B.weight"))
        with torch.no_grad():
            dict(sharded.named_parameters())[key].fill_(0.5)  # as load_adapter writes on resume
    after = dict(sharded.named_parameters())
    assert train.trained_names(sharded) == names and all(isinstance(p, DTensor) for p in names)
    assert torch.equal(after[key].full_tensor(), torch.full_like(after[key].full_tensor(), 0.5))
    state = opts[1].state[after[key]]
    assert isinstance(state["exp_avg"], DTensor) and state["exp_avg"].shape == after[key].shape
    (la, _), (lb, _) = one_step(plain, opts[0], tokens), one_step(sharded, opts[1], tokens)
    assert not torch.equal(la, lb)  # the 0.5 written inside `whole` is what the next forward uses


def test_fsdp_needs_two_ranks(tmp_path, corpus, capsys):
    args = [*TINY, "--ctx", "64", "--data", str(corpus), "--fsdp", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fsdp shards over the processes of a run" in err[0] and "torchrun" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("world,cp,dry_run,needle", [
    (2, 2, False, None),  # cp 2 x dp 1: sharded over both ranks
    (1, 1, True, "1 here; run at least 2 processes (--nproc) or drop --fsdp"),
    (6, 2, False, None),  # dp 3: uneven chunks are padded, allowed
])
def test_fsdp_world_checks(world, cp, dry_run, needle):
    given = dict(model="tiny", ctx=64, data="x", fsdp=True, cp=cp, nproc=world if dry_run else None)
    if needle is None:
        assert train_config.resolve(given, world_size=world).fsdp
        return
    with pytest.raises(UserError) as e:
        train_config.resolve(given, world_size=world, dry_run=dry_run)
    assert needle in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- slow: torchrun


def merged_tensors(out):
    return load_file(str(out / "merged" / "model.safetensors"))


def assert_close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].float() - b[k].float()).abs().max() <= tol, k


@pytest.mark.slow
def test_two_fsdp_ranks_equal_one_process_with_double_accumulation(tmp_path, corpus):
    """torchrun 2 x --fsdp (NF4 base, LoRA on all linears, norms trained, --merge) against one process with
    --grad-accum 2 on the same data and seed, float32. Tolerance 1e-5 on every logged loss, adapter tensor
    and merged tensor: only the order of the gradient reductions may differ."""
    common = [*CP_COMMON, "--data", str(corpus), "--quant", "nf4", "--train", "norm", "--merge"]
    r1 = run([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr
    r2 = run([*common, "--fsdp", "--out", str(tmp_path / "two")], torchrun=2)
    assert r2.returncode == 0, r2.stderr
    assert "fsdp: 2 blocks and the root sharded over 2 ranks (dp 2 x cp 1);" in r2.stdout
    a, b = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    assert any(k.endswith("norm.weight") for k in a)
    assert_close(a, b, 1e-5)
    assert_close(merged_tensors(tmp_path / "one"), merged_tensors(tmp_path / "two"), 1e-5)
    config = [json.loads((tmp_path / o / "adapter" / "adapter_config.json").read_text()) for o in ("one", "two")]
    assert config[0] == config[1]
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(la) == len(lb) == 3 and all(abs(x - y) < 1e-5 for x, y in zip(la, lb)), (la, lb)


@pytest.mark.slow
def test_fsdp_dp2_by_cp2_equals_one_process_with_double_accumulation(tmp_path, corpus):
    """4 ranks as --fsdp over dp 2, replicated over --cp 2 (HSDP), against one process with --grad-accum 2;
    NF4, float32, lr 1e-3 and tolerance 1e-5 as test_train's dp2 x cp2 test (its docstring: why 1e-3)."""
    common = [*CP_COMMON, "--data", str(corpus), "--lr", "1e-3", "--quant", "nf4"]
    r1 = run([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr
    r4 = run([*common, "--cp", "2", "--fsdp", "--out", str(tmp_path / "mesh")], torchrun=4)
    assert r4.returncode == 0, r4.stderr
    assert "sharded over 4 ranks (dp 2 x cp 2);" in r4.stdout
    assert_close(adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "mesh"), 1e-5)
    la, lb = losses(tmp_path / "one"), losses(tmp_path / "mesh")
    assert len(lb) == 3 and all(abs(x - y) < 1e-5 for x, y in zip(la, lb)), (la, lb)


@pytest.mark.slow
def test_fsdp_sigkill_and_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    """Kill -9 every process of a 2-rank --fsdp run at a random step, --resume: the adapter and every loss
    are bit-identical to the uninterrupted --fsdp run (dropout on: per-rank RNG states restored, and the
    gathered checkpoint re-cut into the same chunks)."""
    common = [*TINY, "--ctx", "64", "--data", str(corpus), "--steps", "5", "--lr", "1e-2", "--save-every", "1",
              "--lora-dropout", "0.1", "--keep", "3", "--quant", "nf4", "--fsdp"]
    torchrun_sigkill_and_resume(tmp_path, common, steps=5)
