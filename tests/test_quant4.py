"""Tests for quant4.py: NF4 + double quantization against bitsandbytes 0.50.2 on CPU (bit-exact), and the
NF4 equations of Dettmers et al. (2023, QLoRA, section 3) as properties that need no bitsandbytes.

Reference: bitsandbytes.functional.quantize_4bit / dequantize_4bit / quantize_blockwise and
bitsandbytes.nn.Linear4bit. Tolerance 0 (torch.equal) unless stated: our code performs the same fp32
operations in the same order, so any difference is a bug, not rounding noise. Only the tests that take
the `bnb` or `BF` fixture need bitsandbytes; they skip where it is not installed.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import quant4 as Q
from helpers import StandInModel

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 1-D and 2-D; sizes not divisible by 64 or 256; one more than 256 blocks (two nested blocks).
SHAPES = ((64,), (65,), (100,), (256 * 64 + 1,), (1000, 33), (3, 5), (40, 128), (300, 100), (257, 192))


@pytest.fixture(scope="module")
def bnb():
    """bitsandbytes, the reference of the bit-exactness tests."""
    return pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def BF(bnb):
    """bitsandbytes.functional (quantize_4bit, dequantize_4bit, quantize_blockwise, the code tables)."""
    return pytest.importorskip("bitsandbytes.functional")


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    row_scale = torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g) * 3  # spread the absmax values
    return (w * row_scale).to(dtype)


def _bnb_dequantize(BF, packed, state):
    """bnb's CPU dequantization of the flattened weight, reshaped.

    bnb 0.50.2's AVX-512 kernel indexes absmax per row (row * (I // b) + col // b), which is wrong when
    I % b != 0 and I % 16 == 0 (e.g. 40x100 is fine, 40x96 is not): quantization blocks run over the flat
    tensor. For a 1-D shape the kernel sees one row and its indexing is the flat one, so we compare
    against that (same kernel, same arithmetic).
    """
    flat_state = BF.QuantState(
        absmax=state.absmax, shape=torch.Size((state.shape.numel(),)), dtype=state.dtype,
        blocksize=state.blocksize, code=state.code, quant_type=state.quant_type, offset=state.offset,
        state2=state.state2,
    )
    return BF.dequantize_4bit(packed, flat_state).reshape(state.shape)


# ----------------------------------------------------------------------------- tables


def test_nf4_code_matches_bitsandbytes(BF):
    # Reference: bnb's hard-coded table; exact.
    assert torch.equal(Q.NF4_CODE, BF.get_4bit_type("nf4", device="cpu"))


def test_nf4_code_is_the_normal_quantile_construction():
    """NF4 = sort(Phi^-1(linspace(delta, 1/2, 9)[:-1]), 0, -Phi^-1(linspace(delta, 1/2, 8)[:-1])) / max, with
    delta = 0.9677083 (NF4_CODE's docstring). Reference: that formula computed as bitsandbytes'
    create_normal_map does (float32 linspace, float64 quantiles, normalised in float32), here with
    torch.special.ndtri for scipy's norm.ppf; exact. Index 0 is -1, 7 is 0, 15 is 1."""
    delta = 0.9677083
    positives = torch.special.ndtri(torch.linspace(delta, 0.5, 9)[:-1].double())
    negatives = -torch.special.ndtri(torch.linspace(delta, 0.5, 8)[:-1].double())
    values = torch.cat((positives, torch.zeros(1, dtype=torch.float64), negatives)).sort().values.float()
    assert torch.equal(Q.NF4_CODE, values / values.max())
    assert Q.NF4_CODE[0] == -1 and Q.NF4_CODE[7] == 0 and Q.NF4_CODE[15] == 1


def test_nf4_code_is_normal_quantiles(BF):
    # Reference: create_normal_map (scipy quantiles), float32 rounding -> tolerance 1e-7.
    pytest.importorskip("scipy")
    full = BF.create_normal_map()
    regenerated = torch.cat((full[:7], torch.zeros(1), full[-8:]))  # 7 negatives, 0, 8 positives
    torch.testing.assert_close(Q.NF4_CODE, regenerated, rtol=0, atol=1e-7)


@pytest.mark.parametrize("signed", (True, False))
def test_dynamic_map_matches_bitsandbytes(BF, signed):
    # Reference: bnb's create_dynamic_map; exact (same fp32 construction).
    assert torch.equal(Q.dynamic_map_8bit(signed), BF.create_dynamic_map(signed))


def test_pack_unpack_round_trip():
    # Property: unpack(pack(c)) = c (plus the pad code 7), high nibble first.
    codes = torch.randint(0, 16, (37,), dtype=torch.uint8)
    packed = Q.pack_nibbles(codes)
    assert packed[0] == (codes[0] << 4) | codes[1]
    assert torch.equal(Q.unpack_nibbles(packed)[:37], codes.long())
    assert Q.unpack_nibbles(packed)[37] == Q.NF4_PAD_CODE


# ----------------------------------------------------------------------------- bit-exactness


@pytest.mark.parametrize("double_quant", (True, False))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_dequantize_bit_exact(BF, shape, dtype, double_quant):
    w = _weight(shape, dtype)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = Q.quantize_nf4(w, blocksize=64, double_quant=double_quant)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)  # uint8 codes with double quant, fp32 otherwise
    if double_quant:
        assert torch.equal(q.absmax_scale, state.state2.absmax)
        assert torch.equal(q.absmax_offset, state.offset)
    out = Q.dequantize_nf4(q)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, _bnb_dequantize(BF, packed, state))
    if len(shape) == 2 and (shape[1] % 64 == 0 or shape[1] % 16):  # where bnb's 2-D kernel is right
        assert torch.equal(out, BF.dequantize_4bit(packed, state))


def test_absmax_8bit_grid_bit_exact(BF):
    # Reference: bnb.functional.quantize_blockwise (C kernel, 65536-point grid); exact, dense sweep
    # of [-1, 1] plus small values near 0 where the grid is coarser than the code.
    x = torch.cat((torch.linspace(-1, 1, 200_001), torch.linspace(-1e-4, 1e-4, 20_001), torch.zeros(256)))
    codes, state = BF.quantize_blockwise(x, blocksize=256)
    ours, absmax = Q._blockwise_8bit(x, Q.dynamic_map_8bit(), 256)
    assert torch.equal(ours, codes) and torch.equal(absmax, state.absmax)


def test_zero_weight_bit_exact(BF):
    w = torch.zeros(4, 128)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = Q.quantize_nf4(w)
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)


@pytest.mark.parametrize("double_quant", (True, False))
def test_zero_weight_round_trips_to_zero(double_quant):
    # Property: 0 is an NF4 value (index 7), so an all-zero weight dequantizes to exact zeros.
    w = torch.zeros(4, 128)
    q = Q.quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(Q.unpack_nibbles(q.packed), torch.full((512,), Q.NF4_PAD_CODE))
    assert torch.equal(Q.dequantize_nf4(q), w)


@pytest.mark.parametrize("shape", ((1000, 33), (40, 128), (65,)))
def test_codes_are_the_nearest_nf4_values_of_the_block_scaled_weight(shape):
    """The QLoRA equations without bitsandbytes: scale_k = max |W_i| over block k (exact), q_i the NF4
    value nearest to W_i / scale_k, W_i ~= NF4[q_i] * scale_k (the fp32 product, exact). Nearest is
    checked against float64 W_i / scale_k with tolerance 1e-6: quant4 scales in float32 (a reciprocal
    product, a few ulp of 1.2e-7 away) and a value that close to a midpoint may go either way."""
    w = _weight(shape, torch.float32)
    q = Q.quantize_nf4(w, double_quant=False)
    n, b = w.numel(), q.blocksize
    blocks = nn.functional.pad(w.reshape(-1).abs(), (0, -n % b)).view(-1, b)  # (nb, b), zero pad
    assert torch.equal(q.absmax, blocks.amax(dim=1))
    scale = q.absmax.repeat_interleave(b)[:n]  # (n,) each weight's block scale
    codes = Q.unpack_nibbles(q.packed)[:n]
    distance = ((w.reshape(-1).double() / scale.double())[:, None] - Q.NF4_CODE.double()).abs()  # (n, 16)
    assert (distance.gather(1, codes[:, None])[:, 0] <= distance.min(dim=1).values + 1e-6).all()
    assert torch.equal(Q.dequantize_nf4(q), (Q.NF4_CODE[codes] * scale).view(shape))


def test_double_quantization_keeps_codes_and_scales_within_half_a_step():
    """Double quantization (QLoRA section 3) changes only the stored scales: the 4-bit codes are those of
    the fp32 scales, and each dequantized scale lies within s_m * (half the widest dynamic-map gap + one
    step of its 65536-point grid) of the true one, plus 1e-6 relative for the float32 sum c + DYN[a] s_m.
    Weights of 300 x 100 make 469 blocks: two nested blocks, the second short."""
    w = _weight((300, 100), torch.float32)
    plain, q = Q.quantize_nf4(w, double_quant=False), Q.quantize_nf4(w)
    assert torch.equal(q.packed, plain.packed) and q.absmax.dtype == torch.uint8
    d, dyn = q.dq_blocksize, Q.dynamic_map_8bit()
    s_m = q.absmax_scale.repeat_interleave(d)[:plain.absmax.numel()]  # (nb,) each scale's nested absmax
    nested = nn.functional.pad(plain.absmax - q.absmax_offset, (0, -plain.absmax.numel() % d)).view(-1, d)
    assert torch.equal(q.absmax_scale, nested.abs().amax(dim=1))
    bound = s_m * (dyn.diff().max() / 2 + 2 / 65535) + 1e-6 * plain.absmax
    assert ((Q.absmax_fp32(q) - plain.absmax).abs() <= bound).all()


def test_chunked_quantization_equals_unchunked(monkeypatch):
    # Property: chunking never changes a result (blocks lie inside chunks). Shrink the chunk so a small
    # tensor crosses several chunk borders, with a short last block.
    w = _weight((70, 33), torch.bfloat16)
    whole = Q.quantize_nf4(w)
    monkeypatch.setattr(Q, "_CHUNK_ELEMENTS", 256)
    chunked = Q.quantize_nf4(w)
    for a, b in zip((whole.packed, whole.absmax, whole.absmax_scale), (chunked.packed, chunked.absmax, chunked.absmax_scale)):
        assert torch.equal(a, b)


def test_dequantize_in_other_dtype():
    # Rounded once from the fp32 product: bf16 output equals fp32 output rounded to bf16.
    q = Q.quantize_nf4(_weight((8, 64), torch.float32))
    assert torch.equal(Q.dequantize_nf4(q, torch.bfloat16), Q.dequantize_nf4(q).to(torch.bfloat16))


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="dtype"):
        Q.quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="blocksize"):
        Q.quantize_nf4(torch.ones(64), blocksize=48)
    with pytest.raises(ValueError, match="NaN"):
        Q.quantize_nf4(torch.full((64,), float("nan")))


# ----------------------------------------------------------------------------- Linear4bit


def _linear(out_f, in_f, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _assert_same_forward_backward(layer, ref, x):
    """Output and input gradient of `layer` and `ref` on x are bit-identical."""
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = layer(x), ref(x_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(y, y_ref) and torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("bias", (True, False))
def test_linear4bit_equals_linear_with_dequantized_weight(bias):
    # Reference: nn.Linear holding dequantize(); tolerance 0: same F.linear / mm calls on the same
    # fp32 tensors (forward y = x W^T + b, backward dx = dy W).
    lin = _linear(40, 96, bias)
    layer = Q.Linear4bit.from_linear(lin)
    ref = nn.Linear(96, 40, bias=bias)
    ref.weight.data = layer.dequantize()
    if bias:
        ref.bias.data = lin.bias.data.clone()
    x = torch.randn(3, 5, 96, requires_grad=True)
    _assert_same_forward_backward(layer, ref, x)


@pytest.mark.parametrize("train", (True, False))
def test_linear4bit_equals_bitsandbytes_linear4bit(bnb, train):
    # Reference: bnb.nn.Linear4bit (nf4, double quant, compute fp32); tolerance 0. I = 128 keeps bnb's
    # AVX-512 dequantization on its correct path (see _bnb_dequantize).
    lin = _linear(40, 128)
    ref = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    ref.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    ref.bias = nn.Parameter(lin.bias.data.clone())
    ref = ref.to("cpu")  # quantizes
    # On AVX512-BF16 CPUs bnb switches eval-mode inference to a bf16 kernel; keep it on the fp32 path.
    ref.support_avx512bf16_for_cpu = False
    layer = Q.Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    ref.train(train)
    layer.train(train)
    assert torch.equal(layer.weight_packed, ref.weight.data.view(-1))
    x = torch.randn(3, 128, requires_grad=True)
    _assert_same_forward_backward(layer, ref, x)


def test_backward_saves_no_dequantized_weight():
    # Property: no tensor with O*I elements (the dequantized weight) is kept for backward.
    layer = Q.Linear4bit.from_linear(_linear(64, 128))
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert sizes and max(sizes) < 64 * 128
    assert layer.weight_packed.grad is None


def test_meta_construction_and_buffers_move_and_save():
    layer = Q.Linear4bit(96, 40, bias=True, weight_dtype=torch.float32, device="meta")
    assert layer.weight_packed.is_meta and layer.weight_packed.shape == (40 * 96 // 2,)
    real = Q.Linear4bit.from_linear(_linear(40, 96))
    layer.load_state_dict(real.state_dict(), assign=True)
    assert torch.equal(layer.dequantize(), real.dequantize())
    assert set(real.state_dict()) == {"weight_packed", "weight_absmax_codes", "weight_absmax_scale",
                                      "weight_absmax_offset", "bias"}
    moved = real.to(torch.device("cpu"))
    assert moved.weight_packed.dtype == torch.uint8


def test_bits_per_parameter_llama_layer():
    # 4096x4096: 4 + 8/64 + 32/(64*256) + 32/4096^2 = 4.12695; buffer sizes only depend on the shape,
    # so an empty (unquantized) layer has the same storage as a quantized one.
    layer = Q.Linear4bit(4096, 4096, bias=False, device="cpu")
    assert abs(Q.bits_per_parameter(layer) - 4.127) < 1e-3
    small = Q.Linear4bit.from_linear(_linear(64, 256))  # 256 blocks -> one nested scale
    expected = (64 * 256 / 2 + 256 + 4 + 4) * 8 / (64 * 256)
    assert Q.bits_per_parameter(nn.Sequential(small)) == pytest.approx(expected, rel=0, abs=1e-12)
    with pytest.raises(ValueError):
        Q.bits_per_parameter(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- model-level


def test_quantize_model_replaces_linears_except_skip():
    model = Q.quantize_model(StandInModel())
    assert isinstance(model.layers[1].up_proj, Q.Linear4bit)
    assert type(model.lm_head) is nn.Linear


def test_empty_linear4bit_replaces_linears_on_meta():
    with torch.device("meta"):
        model = StandInModel()
    layers = Q.empty_linear4bit(model, skip=("lm_head",), weight_dtype=torch.bfloat16)
    assert set(layers) == {f"layers.{i}.{n}.weight" for i in range(2) for n in ("q_proj", "up_proj")}
    assert model.layers[0].up_proj is layers["layers.0.up_proj.weight"] and model.layers[0].up_proj.weight_packed.is_meta
    assert type(model.lm_head) is nn.Linear


# ----------------------------------------------------------------------------- compile and memory


@pytest.mark.slow
def test_compiled_dequant_matmul_equals_eager_without_graph_breaks():
    # Tolerance 1e-5: Inductor may reorder the fp32 matmul accumulation.
    import torch._dynamo

    layer = Q.Linear4bit.from_linear(_linear(64, 128))
    x = torch.randn(4, 128)
    explanation = torch._dynamo.explain(Q.dequant_matmul)(x, layer.nf4())
    assert explanation.graph_break_count == 0
    compiled = Q.Linear4bit.from_linear(_linear(64, 128), compile=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = layer(xe), compiled(xc)
    ye.sum().backward()
    yc.sum().backward()
    torch.testing.assert_close(yc, ye, rtol=0, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_streaming_peak_memory_under_two_bf16_copies():
    # Llama-3-8B MLP matrix 14336x4096 in bf16 (117 MB): quantizing it must add < 2x that to peak RSS.
    script = textwrap.dedent(
        """
        import resource, torch, quant4
        w = torch.randn(14336, 4096, dtype=torch.bfloat16)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        q = quant4.quantize_nf4(w)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(Q.__file__)))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(Q.__file__)))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=repo, check=True)
    extra = int(out.stdout.strip().splitlines()[-1])
    bf16_bytes = 14336 * 4096 * 2
    assert extra < 2 * bf16_bytes, f"peak extra {extra / 2**20:.0f} MiB vs bf16 {bf16_bytes / 2**20:.0f} MiB"


@pytest.mark.slow
def test_compiled_dequant_matmul_serves_many_shapes_without_hitting_the_recompile_limit():
    """Twelve (weight, input) shapes through the one shared compiled function: with dynamic=False each was a
    recompile and the 9th passed dynamo's limit of 8, an error under fullgraph=True. Automatic dynamic shapes
    recompile only when a size changes kind (double-quant block counts: one, several, a ragged last block). Counted with dynamo's CompileCounter backend (no Inductor, so the
    test is quick); results equal eager exactly, since that backend runs the traced graph op by op."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cnt = CompileCounter()
    fn = Q.compiled_dequant_matmul(cnt)
    for i, (o, n) in enumerate([(64, 3), (128, 5), (192, 7), (64, 9), (256, 2), (320, 4), (64, 6), (384, 8),
                                (448, 3), (512, 5), (128, 11), (576, 1)]):
        q = Q.quantize_nf4(_linear(o, 128).weight.detach())
        x = torch.randn(n, 128)
        torch.testing.assert_close(fn(x, q), Q.dequant_matmul(x, q), rtol=0, atol=0)
    assert cnt.frame_count < 8, cnt.frame_count  # below dynamo's recompile limit: 6 in torch 2.13 (branch kinds)


def test_absmax_offset_is_bnb_cpu_mean_and_independent_of_the_reduction_order():
    """The double-quantization offset c: bit-equal to bitsandbytes' CPU `absmax.mean()` up to 32768 blocks,
    and beyond that the same float32 value at every CPU thread count (as on any device: it is taken on the
    CPU in single-thread slices), where torch's own float32 mean changes with the thread count (checked
    here, so the test shows an order that matters). Within 1e-6 relative of the float64 mean."""
    from quant4 import absmax_offset
    g = torch.Generator().manual_seed(0)
    for n in (1, 1000, 32768):
        a = torch.rand(n, generator=g) * torch.rand(n, generator=g) * 3
        assert torch.equal(absmax_offset(a), a.mean())
    a = torch.rand(2_000_000, generator=g) * torch.rand(2_000_000, generator=g) * 3
    threads = torch.get_num_threads()
    try:
        offsets, means = set(), set()
        for t in (1, 2, 4, 8):
            torch.set_num_threads(t)
            offsets.add(absmax_offset(a).item())
            means.add(a.mean().item())
    finally:
        torch.set_num_threads(threads)
    assert len(offsets) == 1 and len(means) > 1, (offsets, means)
    assert abs(offsets.pop() / a.double().mean().item() - 1) < 1e-6
