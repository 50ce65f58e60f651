"""NF4 weight quantization with double quantization (QLoRA), bit-exact with bitsandbytes 0.50.2 on CPU.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3) stores a frozen
weight W as 4-bit NormalFloat codes in blocks of b = 64 values with one absmax per block:

    scale_k = max_{i in block k} |W_i|                            (blockwise absmax, fp32)
    q_i     = argmin_j |W_i / scale_k - NF4[j]|                   (4-bit code, ties to the lower code)
    W_i    ~= NF4[q_i] * scale_k                                  (dequantization)

and "double quantization" (section 3, "Double Quantization") quantizes the absmax vector itself:

    c       = mean_k scale_k                                      (offset, fp32)
    s_m     = max_{k in block m} |scale_k - c|                    (nested absmax, one per 256 scales)
    a_k     ~ argmin_j |(scale_k - c) / s_m - DYN[j]|             (8-bit code, dynamic map; see Note)
    scale_k~= DYN[a_k] * s_m + c

Storage per weight: 4 + 8/64 + 32/(64*256) = 4.127 bits (plus one fp32 offset per tensor).

Packing (same as bitsandbytes): W is flattened row-major; code 2j goes to the HIGH nibble of byte j and
code 2j+1 to the low nibble; an odd count is padded with code 7 (NF4 value 0.0). Blocks run over the
flat tensor, so rows need not be multiples of 64; the last block may be short.

Notation: N number of weights, b blocksize (64), nb = ceil(N/b) number of blocks, d dq_blocksize (256),
O out_features, I in_features, B batch, T tokens.

Note: "bit-exact" pins down bitsandbytes 0.50.2's CPU rounding choices, not only its formulas: fp32
    reciprocal scaling and midpoint ties to the LOWER code (_nf4_codes), 8-bit absmax codes read through
    bnb's 65536-point grid (_blockwise_8bit), one rounding at dequantization, and the offset c summed in
    fixed single-thread slices (absmax_offset). Each rule as read off bnb's source: docs/design.md.

Note: memory. quantize_nf4 works in chunks of _CHUNK_ELEMENTS (whole blocks): its fp32 copies stay a few
    MB, the peak is the input plus its 4-bit output, and c is formed after the last chunk (same result).
"""
from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- constants

NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
"""The 16 NF4 values (QLoRA section 3, "4-bit NormalFloat Quantization"), index 0 = -1, 7 = 0, 15 = 1.

They are quantiles of N(0, 1), made asymmetric so that 0 is represented exactly:

    positives  v_j = Phi^-1(p_j),  p_j = linspace(delta, 1/2, 9)[:-1]   (8 values)
    negatives  v_j = -Phi^-1(p_j), p_j = linspace(delta, 1/2, 8)[:-1]   (7 values)
    zero       0
    NF4 = sort(positives, zero, negatives) / max

with delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 = 0.9677083 (the mean of the outermost quantile for 15 and
for 16 bins), so that the outermost values are exactly -1 and 1 after normalisation: bitsandbytes' values
(functional.get_4bit_type("nf4"), from create_normal_map()), which the tests regenerate with scipy.
"""

NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
"""Decision boundaries between neighbouring NF4 codes, fp32, shape (15,)."""

NF4_PAD_CODE = 7  # NF4 index of 0.0, used for the padding nibble of an odd element count
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LUT_SIZE = 65536  # grid of bnb's CPU 8-bit quantizer (see _blockwise_8bit)
_CHUNK_ELEMENTS = 1 << 20  # weights processed at a time by quantize_nf4 (see the memory note)
_MEAN_SLICE = 32768  # torch's CPU grain size: a reduction this long runs on one thread (absmax_offset)


# ----------------------------------------------------------------------------- config


@dataclass
class NF4Tensor:
    """A weight in NF4 with (optional) double-quantized absmax; plain tensors, no subclassing.

    packed:        uint8 ((N+1)//2,)  two 4-bit codes per byte, element 2j in the high nibble.
    absmax:        fp32 (nb,) block scales if not double quantized, else uint8 (nb,) codes a_k of
                   (scale_k - c) under dynamic_map_8bit().
    absmax_scale:  fp32 (ceil(nb/d),) nested absmax s_m, or None without double quant.
    absmax_offset: fp32 () offset c, or None without double quant.
    shape, dtype:  the original weight's shape and dtype (the default dequantization dtype).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: Optional[torch.Tensor]
    absmax_offset: Optional[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    dq_blocksize: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Every stored byte: packed codes + absmax (codes) + nested absmax + offset."""
        parts = (self.packed, self.absmax, self.absmax_scale, self.absmax_offset)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


# ----------------------------------------------------------------------------- pure functions


def dynamic_map_8bit(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic map (create_dynamic_map(signed)), 256 sorted fp32 values in [-1, 1].

    Dettmers (2016), "8-Bit Approximations for Parallelism in Deep Learning": a decimal exponent times a
    linear fraction. For e = -6 .. 0, [0.1, 1] is split into n_e = 2^(e+6) equal bins (2^(e+7) unsigned,
    the sign bit spent on precision) whose centres are scaled by 10^e:

        DYN = sort({0, 1} U {+-10^e * (f_l + f_{l+1}) / 2 : f = linspace(0.1, 1, n_e + 1)})

    Signed: 2 * (1 + 2 + ... + 64) = 254 values + {0, 1} = 256; the smallest magnitude is 10^-6 * 0.55,
    the most negative value -0.99297 (not -1), the largest exactly 1.
    """
    parts = [torch.zeros(1, device="cpu"), torch.ones(1, device="cpu")]  # explicit: immune to a default device
    for i in range(7):
        exponent = i - 6  # decimal exponent e
        bins = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, bins + 1, dtype=torch.float32, device="cpu")
        centres = (10**exponent) * ((edges[:-1] + edges[1:]) / 2.0)
        parts += [centres, -centres] if signed else [centres]
    return torch.cat(parts).sort().values


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16), shape (N,) -> uint8 ((N+1)//2,); code 2j -> high nibble of byte j."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=NF4_PAD_CODE)
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ((P,)) -> int64 codes (2P,), the inverse of pack_nibbles (padding included)."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).reshape(-1).long()  # (P, 2) -> (2P,)


def _nf4_codes(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x (n,) -> (uint8 codes (n,), fp32 absmax (ceil(n/b),)), as bnb's default quantize_4bit."""
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)  # (n//b, b)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:  # short last block: division, and the clamped absmax is the one stored
        tail_absmax = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat((absmax, tail_absmax[None]))
        scaled = torch.cat((scaled, (x[full:] / tail_absmax).clamp(-1, 1)))
    codes = torch.bucketize(scaled, NF4_MIDPOINTS.to(x.device), out_int32=True)
    return codes.to(torch.uint8), absmax


def dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """Nearest-code table on the grid g_i = -1 + 2i/65535 (i < 65536): int64, shape (65536,).

    entry i = #{midpoints (code_j + code_j+1)/2 < g_i}, i.e. the nearest code to g_i, ties to the lower.
    """
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32, device=code.device)) / (_LUT_SIZE - 1)
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(midpoints, grid, right=False)


def _blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x (n,) -> (uint8 code indices (n,), fp32 absmax (ceil(n/d),)), as bnb's CPU C kernel.

    bnb 0.50.2 rounds v = x * (1/absmax) onto dynamic_lut's 65536-point grid, i = trunc(((v + 1) * 0.5) *
    65535 + 0.5), and reads the table: the code nearest to v's GRID POINT, not to v (near 0, where the map
    is finer than the grid step 3e-5, codes 124..130 never occur). A block of zeros gets code 0.
    """
    n = x.numel()
    nblocks = -(-n // blocksize)
    blocks = F.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)  # (nb, d); zero pad
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax == 0, 0.0, 1.0 / absmax)  # all-zero blocks are set to code 0 below
    scaled = (blocks * inverse[:, None]).clamp(-1.0, 1.0)  # (nb, d)
    grid_index = (((scaled + 1.0) * 0.5) * (_LUT_SIZE - 1) + 0.5).to(torch.int64)  # trunc, values >= 0
    idx = dynamic_lut(code)[grid_index]
    idx = torch.where(absmax[:, None] == 0, 0, idx).reshape(-1)[:n]
    return idx.to(torch.uint8), absmax


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """fp32 values (>= n,) times scales[i // blocksize], fp32, shape (n,)."""
    nblocks = scales.numel()
    values = F.pad(values[: nblocks * blocksize], (0, max(0, nblocks * blocksize - values.numel())))
    return (values.view(nblocks, blocksize) * scales[:, None]).reshape(-1)[:n]  # (nb, b) -> (n,)


def absmax_offset(absmax: torch.Tensor) -> torch.Tensor:
    """c = mean_k scale_k in float32, the same bits on every device (the bit-exact note), on absmax's device."""
    parts = absmax.cpu().split(_MEAN_SLICE)  # (<= 32768,) each
    total = parts[0].sum()
    for part in parts[1:]:
        total = total + part.sum()
    return (total / absmax.numel()).to(absmax.device)


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, dq_blocksize: int = 256
) -> NF4Tensor:
    """Quantize w (any shape, fp32/bf16/fp16) to NF4; equals bitsandbytes.functional.quantize_4bit(
    w, blocksize, quant_type="nf4", compress_statistics=double_quant) on CPU (dq_blocksize=256)."""
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4: weight dtype {w.dtype} is not supported; pass float32, bfloat16 or float16")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"quantize_nf4: blocksize={blocksize} is invalid; use one of {VALID_BLOCKSIZES}")
    if dq_blocksize <= 0:
        raise ValueError(f"quantize_nf4: dq_blocksize={dq_blocksize} must be positive (bitsandbytes uses 256)")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} is empty")
    flat = w.detach().reshape(-1)  # (N,) row-major
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    chunk = max(blocksize, _CHUNK_ELEMENTS // blocksize * blocksize)  # multiple of b, hence even
    for start in range(0, n, chunk):
        codes, chunk_absmax = _nf4_codes(flat[start : start + chunk].float(), blocksize)
        packed[start // 2 : start // 2 + (codes.numel() + 1) // 2] = pack_nibbles(codes)
        absmax[start // blocksize : start // blocksize + chunk_absmax.numel()] = chunk_absmax
    if not torch.isfinite(absmax).all():
        raise ValueError(f"quantize_nf4: weight of shape {tuple(w.shape)} holds NaN or inf values; fix the checkpoint")
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, w.shape, w.dtype, blocksize, dq_blocksize)
    offset = absmax_offset(absmax)
    codes8, nested = _blockwise_8bit(absmax - offset, dynamic_map_8bit().to(w.device), dq_blocksize)
    return NF4Tensor(packed, codes8, nested, offset, w.shape, w.dtype, blocksize, dq_blocksize)


def absmax_fp32(q: NF4Tensor) -> torch.Tensor:
    """The per-block scales of q in fp32, shape (nb,): scale_k = DYN[a_k] * s_{k // d} + c."""
    if not q.double_quant:
        return q.absmax
    dmap = dynamic_map_8bit().to(q.absmax.device) if torch.compiler.is_compiling() else _dynamic_map_on(q.absmax.device)
    values = dmap[q.absmax.long()]  # (nb,)
    return _scale_blocks(values, q.absmax_scale, q.dq_blocksize, q.absmax.numel()) + q.absmax_offset


@functools.cache
def _dynamic_map_on(device: torch.device) -> torch.Tensor:
    """dynamic_map_8bit() on `device`, built once per device (a constant, like NF4_CODE)."""
    return dynamic_map_8bit().to(device)


@functools.cache
def nibble_quad_table(device: torch.device) -> torch.Tensor:
    """fp32 (65536, 4): row u holds the NF4 values of the four codes in the two packed bytes whose
    native-endian uint16 reading is u, in weight order (high nibble of the first byte first).

    Note: why a 65536-row table. Dequantization is a table look-up per code; torch's CPU gather kernels
    cost about the same per index whatever the row width, so reading two bytes (four codes) per index
    does a quarter of the look-ups of a per-code table. The table is 1 MiB, built once per device.
    """
    u = torch.arange(65536)
    first, second = (u & 0xFF, u >> 8) if sys.byteorder == "little" else (u >> 8, u & 0xFF)
    return torch.stack([NF4_CODE[first >> 4], NF4_CODE[first & 0xF], NF4_CODE[second >> 4], NF4_CODE[second & 0xF]],
                       dim=1).to(device)  # (65536, 4)


def dequantize_nf4(q: NF4Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W_i = NF4[q_i] * scale_{i // b} in fp32, rounded once to `dtype` (default: the original dtype).

    Equals bitsandbytes.functional.dequantize_4bit on CPU when dtype is the original dtype. When the
    blocks tile W exactly (N % b == 0, every Llama matrix) the codes are read four at a time through
    nibble_quad_table and the fp32 product is rounded straight into the output; otherwise one code at
    a time, with the short last block padded.

    Note: under torch.compile the per-code form is traced instead: Inductor fuses it into one kernel,
    and dynamo would re-trace the cached tables (it ignores functools.cache) on every call.
    """
    dtype = dtype or q.dtype
    scales = absmax_fp32(q)  # (nb,) fp32
    b = q.blocksize
    if q.numel % b == 0 and not torch.compiler.is_compiling():  # b % 4 == 0: bytes pair up into uint16 words
        words = q.packed.view(torch.int16).int() & 0xFFFF  # (N/4,) native-endian uint16 as int32
        values = torch.index_select(nibble_quad_table(q.packed.device), 0, words)  # (N/4, 4) fp32
        out = torch.empty(q.shape, dtype=dtype, device=q.packed.device)
        torch.mul(values.view(-1, b), scales[:, None], out=out.view(-1, b))  # fp32 product, one rounding
        return out
    values = NF4_CODE.to(q.packed.device)[unpack_nibbles(q.packed)]  # (2P,) fp32
    return _scale_blocks(values, scales, b, q.numel).view(q.shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T with W dequantized on the fly; the gradient flows to x only (W is frozen).

    Only the quantized parts (~0.52 bytes per weight) are saved for backward; W is dequantized again in
    backward instead of being kept alive between the passes (QLoRA's memory saving).
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, absmax_scale, absmax_offset, shape, dtype, blocksize, dq_blocksize):
        q = NF4Tensor(packed, absmax, absmax_scale, absmax_offset, shape, dtype, blocksize, dq_blocksize)
        ctx.save_for_backward(packed, absmax, absmax_scale, absmax_offset)
        ctx.meta = (shape, dtype, blocksize, dq_blocksize)
        return F.linear(x, dequantize_nf4(q, x.dtype))  # (..., O)

    @staticmethod
    def backward(ctx, grad_y):
        q = NF4Tensor(*ctx.saved_tensors, *ctx.meta)
        grad_x = grad_y @ dequantize_nf4(q, grad_y.dtype)  # (..., O) @ (O, I) -> (..., I)
        return grad_x, None, None, None, None, None, None, None, None


def dequant_matmul(x: torch.Tensor, q: NF4Tensor) -> torch.Tensor:
    """x (..., I) @ dequantize(q)^T -> (..., O), in x's dtype; gradient to x only."""
    return _NF4Matmul.apply(
        x, q.packed, q.absmax, q.absmax_scale, q.absmax_offset, q.shape, q.dtype, q.blocksize, q.dq_blocksize
    )


@functools.cache
def compiled_dequant_matmul(backend="inductor") -> Callable[[torch.Tensor, NF4Tensor], torch.Tensor]:
    """dequant_matmul under torch.compile(fullgraph=True): Inductor fuses unpack, table look-up, scaling
    and the dtype cast into one kernel producing W for the matmul.

    Note: built lazily on first use and memoised (so importing this file never touches dynamo, and every
    Linear4bit shares one compiled function and its cache). Opt-in via Linear4bit(compile=True).

    Note: dynamic=None (automatic dynamic shapes), not dynamic=False: static shapes recompile for every
    layer shape and input length, past dynamo's recompile limit, an error under fullgraph (docs/design.md).
    """
    return torch.compile(dequant_matmul, fullgraph=True, dynamic=None, backend=backend)


# ----------------------------------------------------------------------------- modules


class Linear4bit(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4 (frozen Parameters but the 0-d offset, a buffer).

    y = x W^T + bias with W = dequantize(weight) in `compute_dtype` (default: the original weight dtype);
    x is cast to compute_dtype and y cast back to x's dtype. Stored (all requires_grad=False):
        weight_packed        uint8 ((O*I+1)//2,)
        weight_absmax        fp32 (nb,)                   [double_quant=False]
        weight_absmax_codes  uint8 (nb,)                  [double_quant=True]
        weight_absmax_scale  fp32 (ceil(nb/d),)           [double_quant=True]
        weight_absmax_offset fp32 () buffer               [double_quant=True]
        bias                 weight_dtype (O,)            [bias=True]   (FSDP2 shards Parameters, not buffers)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        dq_blocksize: int = 256,
        weight_dtype: torch.dtype = torch.float32,
        compute_dtype: Optional[torch.dtype] = None,
        compile: bool = False,
        device: Optional[torch.device | str] = None,
    ):
        super().__init__()
        if blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"Linear4bit: blocksize={blocksize} is invalid; use one of {VALID_BLOCKSIZES}")
        if weight_dtype not in FLOAT_DTYPES:
            raise ValueError(f"Linear4bit: weight_dtype={weight_dtype} is invalid; use one of {FLOAT_DTYPES}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant, self.dq_blocksize = blocksize, double_quant, dq_blocksize
        self.weight_dtype = weight_dtype
        self.compute_dtype = compute_dtype
        self.compile = compile
        n = in_features * out_features
        nblocks = -(-n // blocksize)
        frozen = functools.partial(nn.Parameter, requires_grad=False)
        self.weight_packed = frozen(torch.empty((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.weight_absmax_codes = frozen(torch.empty(nblocks, dtype=torch.uint8, device=device))
            self.weight_absmax_scale = frozen(torch.empty(-(-nblocks // dq_blocksize), dtype=torch.float32, device=device))
            self.register_buffer("weight_absmax_offset", torch.empty((), dtype=torch.float32, device=device))
        else:
            self.weight_absmax = frozen(torch.empty(nblocks, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=weight_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        compile: bool = False,
        dq_blocksize: int = 256,
    ) -> "Linear4bit":
        """Quantize an nn.Linear (its weight must hold real values, not meta)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize=blocksize,
                    double_quant=double_quant, dq_blocksize=dq_blocksize, weight_dtype=w.dtype,
                    compute_dtype=compute_dtype, compile=compile, device="meta")
        layer.set_weight(quantize_nf4(w, blocksize, double_quant, dq_blocksize))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_weight(self, q: NF4Tensor) -> None:
        """Assign a quantized weight (replacing the tensors, so this also fills a meta-device layer)."""
        want = (self.out_features, self.in_features, self.blocksize, self.double_quant, self.dq_blocksize)
        got = (*q.shape, q.blocksize, q.double_quant, q.dq_blocksize) if len(q.shape) == 2 else None
        if got != want:
            raise ValueError(
                f"Linear4bit.set_weight: quantized weight (shape {tuple(q.shape)}, blocksize {q.blocksize}, "
                f"double_quant {q.double_quant}, dq_blocksize {q.dq_blocksize}) does not match the layer "
                f"(out, in, blocksize, double_quant, dq_blocksize) = {want}"
            )
        self.weight_dtype = q.dtype
        self.weight_packed = nn.Parameter(q.packed, requires_grad=False)
        if self.double_quant:
            self.weight_absmax_codes = nn.Parameter(q.absmax, requires_grad=False)
            self.weight_absmax_scale = nn.Parameter(q.absmax_scale, requires_grad=False)
            self.weight_absmax_offset = q.absmax_offset
        else:
            self.weight_absmax = nn.Parameter(q.absmax, requires_grad=False)

    def nf4(self) -> NF4Tensor:
        """The weight as an NF4Tensor view of the stored tensors (no copy)."""
        shape = torch.Size((self.out_features, self.in_features))
        if self.double_quant:
            return NF4Tensor(
                self.weight_packed, self.weight_absmax_codes, self.weight_absmax_scale,
                self.weight_absmax_offset, shape, self.weight_dtype, self.blocksize, self.dq_blocksize,
            )
        return NF4Tensor(
            self.weight_packed, self.weight_absmax, None, None, shape, self.weight_dtype, self.blocksize,
            self.dq_blocksize,
        )

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The (O, I) weight in `dtype` (default: the original weight dtype)."""
        return dequantize_nf4(self.nf4(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = self.compute_dtype or self.weight_dtype
        matmul = compiled_dequant_matmul() if self.compile else dequant_matmul
        y = matmul(x.to(compute_dtype), self.nf4())  # (..., O)
        if self.bias is not None:
            y = y + self.bias.to(compute_dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, weight_dtype={self.weight_dtype}, "
            f"compute_dtype={self.compute_dtype}, compile={self.compile}"
        )


# ----------------------------------------------------------------------------- entry points


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(s in name for s in skip)


def _linear_children(model: nn.Module, skip: Iterable[str]) -> Iterator[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, child name, full name, linear) for every nn.Linear whose full name avoids `skip`."""
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and not _skipped(full, skip):
                yield parent, child_name, full, child


def quantize_model(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    compile: bool = False,
) -> nn.Module:
    """Replace, in place, every nn.Linear whose qualified name contains no `skip` entry by a Linear4bit."""
    for parent, child_name, _, linear in list(_linear_children(model, skip)):
        setattr(parent, child_name, Linear4bit.from_linear(linear, blocksize, double_quant, compute_dtype, compile))
    return model


def quantize_streaming(
    state_iter: Iterable[tuple[str, torch.Tensor]],
    should_quantize: Callable[[str, torch.Tensor], bool],
    blocksize: int = 64,
    double_quant: bool = True,
    dq_blocksize: int = 256,
) -> Iterator[tuple[str, torch.Tensor | NF4Tensor]]:
    """Yield (name, NF4Tensor) for tensors selected by should_quantize(name, tensor), else (name, tensor).

    One tensor is alive at a time (plus its 4-bit copy), so a checkpoint far larger than memory in bf16
    streams through as long as the 4-bit model fits.
    """
    for name, tensor in state_iter:
        if should_quantize(name, tensor):
            tensor = quantize_nf4(tensor, blocksize, double_quant, dq_blocksize)
        yield name, tensor


def empty_linear4bit(
    model: nn.Module,
    skip: Iterable[str] = ("lm_head",),
    weight_dtype: torch.dtype = torch.bfloat16,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    compile: bool = False,
) -> dict[str, Linear4bit]:
    """Replace, in place, every nn.Linear whose qualified name contains no `skip` entry by an empty
    (meta-device) Linear4bit of the same shape; returns {"<name>.weight": layer} for a streaming loader
    to fill with Linear4bit.set_weight as each weight arrives (checkpoint.assign_quantized)."""
    layers: dict[str, Linear4bit] = {}
    for parent, child_name, full, linear in list(_linear_children(model, skip)):
        layer = Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, blocksize=blocksize,
                           double_quant=double_quant, weight_dtype=weight_dtype, compute_dtype=compute_dtype,
                           compile=compile, device="meta")
        setattr(parent, child_name, layer)
        layers[f"{full}.weight"] = layer
    return layers


def bits_per_parameter(model_or_module: nn.Module) -> float:
    """Stored bits of all Linear4bit layers (packed + absmax codes + nested scales + offsets) per weight."""
    layers = [m for m in model_or_module.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("bits_per_parameter: the module holds no Linear4bit layer; run quantize_model first")
    stored = sum(layer.nf4().nbytes() for layer in layers)
    weights = sum(layer.out_features * layer.in_features for layer in layers)
    return stored * 8 / weights
