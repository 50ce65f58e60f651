"""Memory plan of one training step, per device, and `train.py --dry-run` (the plan without loading weights).

Notation: T ctx (tokens per micro-step), N context-parallel ranks (--cp), T/N the tokens a device holds, C model dim, F MLP hidden dim, L layers, V vocab, H query heads,
Hkv kv heads, D head dim.
"""
from __future__ import annotations

import json
import math

import torch

import lora
import parallel
import rope
import shift_attn
from checkpoint import read_config
from train_config import TrainConfig
from devices import choose_dtype
from errors import UserError
from model import PRESETS, ModelConfig, Transformer

WORKSPACE = {"cpu": 100 * 2**20,  # allocator and autograd bookkeeping of a CPU step beside the planned tensors
             "cuda": 2**30}  # an estimate: CUDA context, cuBLAS and allocator slack
PROCESS_BASE = {"cpu": 226 * 2**20,  # RSS of `import train` (interpreter, torch, the project) before any tensor
                "cuda": 0}  # host memory: not on the device
DDP_BUCKET_CAP = 25 * 2**20  # torch DDP's default bucket_cap_mb


def memory_plan(cfg: TrainConfig, mcfg, dtype_bytes: int, trainable: int, device: str = "cuda",
                own_trainable: int = 0) -> dict[str, float]:
    """Bytes per device for one training step (the README's memory model; bench/bench_train.py and
    bench/bench_memory.py check it on CPU).

    Held through the step: weights (NF4 linears at 4.127 bits, see quant4.bits_per_parameter; embeddings,
    norms and an untied head in the base dtype), the trained parameters with their gradients and two AdamW
    moments (all float32: lora.py keeps every trained tensor as a float32 master; `own_trainable` of the
    `trainable` parameters are the model's own embeddings, norms or head, whose float32 master replaces
    the base-dtype tensor, so the weights term leaves them out), and one (T, C) checkpoint per block. On CPU the
    process itself (interpreter and libraries, PROCESS_BASE) is counted, so the total is the process's
    peak RSS under memory_alloc.return_freed_memory. On top, the larger of two transient phases:
    - the loss: one chunk's float32 logits, turned into the softmax-gradient in place (model.py's frozen-head
      NLL), plus their copy in the model dtype when that is not float32 (chunk x V x (4 + 2) bytes in
      bf16), beside the last block's output, the final norm's input and output and the stored gradient
      of the hidden states (4 x T x C);
    - the backward of one block (block_backward_bytes).
    With --cp N every activation term counts T/N tokens (a device holds a sequence shard; attention's
    head shard (H/N heads, T tokens) has as many values as the shard's H heads).
    With --fsdp (FSDP2 over all W = world ranks, cp ranks included: parallel_fsdp's mesh note)
    the weights, trained parameters, gradients and moments are divided by W, and the all-gathered
    units are added: two blocks' full weights (the one computing and the prefetch of the next, their
    trained float32 masters included), the root unit (embeddings, final norm, head) unsharded through the
    step, and a reduce-scatter buffer of the largest unit's float32 gradients in place of DDP's buckets.
    CUDA-only terms, estimates not yet measured on a GPU: FlashAttention-2's backward workspace (a float32
    dq accumulator and GQA's per-query-head dk, dv, ~8 T H D bytes); with world > 1, DDP's gradient buckets
    (a flat copy of the trained gradients, at least one 25 MiB bucket); and, outside the device total, the
    pinned host memory of --offload (one buffer per block checkpoint, which the CUDA host allocator
    rounds up to a power of two).
    """
    T, C, F, L, V = cfg.ctx // cfg.cp, mcfg.dim, mcfg.ffn_dim, mcfg.n_layers, mcfg.vocab_size
    H, Hkv, D = mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim
    block_linear = C * H * D + 2 * C * Hkv * D + H * D * C + 3 * C * F
    root = V * C * (1 if mcfg.tie_embeddings else 2) + C
    weight_bits = 4.127 if cfg.quant == "nf4" else dtype_bytes * 8
    cuda = device == "cuda"
    block = block_backward_bytes(cfg, mcfg, dtype_bytes, cuda)
    trained = trainable * 4  # float32 masters (lora.py's module note)
    checkpoint_bytes = T * C * dtype_bytes
    weights = L * (block_linear * weight_bits / 8 + 2 * C * dtype_bytes) + (root - own_trainable) * dtype_bytes
    dp = cfg.world_size if cfg.fsdp else 1  # the ranks FSDP shards over
    block_trained = (trainable - own_trainable) * 4 / L  # one block's share of the adapters (LoRA: every block alike)
    gathered = {
        "FSDP all-gathered blocks (this + prefetch)": 2 * (weights - (root - own_trainable) * dtype_bytes) / L
                                                      + 2 * block_trained,
        "FSDP root unit whole (embed, norm, head)": (root - own_trainable) * dtype_bytes + own_trainable * 4,
        "FSDP reduce-scatter buffer (float32 grads)": max(block_trained, own_trainable * 4),
    } if cfg.fsdp else {}
    held = {
        "weights": weights / dp,
        "trained params": trained / dp,
        "gradients": trained / dp,
        "AdamW moments": 2 * trained / dp,
        **gathered,
        "block checkpoints": L * checkpoint_bytes if cfg.checkpointing and not cfg.offload else 0,
        "saved attention outputs": L * T * H * (D * dtype_bytes + 4) if cfg.checkpointing and cfg.save_attention else 0,
        f"runtime workspace ({device})": WORKSPACE[device],
        f"process itself ({device})": PROCESS_BASE[device],
        "DDP gradient buckets (cuda, estimate)": max(trained, DDP_BUCKET_CAP) if cuda and cfg.world_size > 1
                                                 and not cfg.fsdp else 0,
    }
    transient = {  # phases that do not overlap: only the larger counts
        "one block's backward": block if cfg.checkpointing else block * L,
        "loss (chunk x V logits + 4 T x C)": min(T, cfg.loss_chunk) * V * (4 + (dtype_bytes if dtype_bytes < 4 else 0))
                                              + 4 * T * C * dtype_bytes,
    }
    # every tensor saved outside a block's recompute goes to host: the L block inputs, the final norm's
    # input and the loss's stored gradient, each T x C
    pinned = (L + 2) * 2 ** math.ceil(math.log2(checkpoint_bytes)) if cuda and cfg.offload and cfg.checkpointing else 0
    return {**held, **transient, "total": sum(held.values()) + max(transient.values()),
            "host: pinned --offload buffers (estimate)": pinned}


def kv_heads_held(mcfg, cp: int) -> int:
    """Kv heads' worth of values per local token that attention's k (or v) holds: Hkv, or with --cp N past
    the kv heads N (each rank receives one kv head copy over all N T/N tokens)."""
    return max(mcfg.n_kv_heads, cp) if cp > 1 else mcfg.n_kv_heads


def block_backward_bytes(cfg: TrainConfig, mcfg, dtype_bytes: int, cuda: bool) -> int:
    """Bytes live at the peak of one checkpointed block's backward over T = ctx / cp tokens, beside what
    the step holds anyway.

    Untiled: what the recomputed forward saves (block_saved_bytes) plus the gradients live at the MLP's
    backward, T x (C + 3 F) values (the block output's, which the residual passes on as it is, and three
    F-wide ones: product, activation, up or gate), the Ulysses exchange (all_to_all_bytes) and on CUDA
    FlashAttention-2's workspace, all at once (an upper bound: the MLP's terms dominate).
    Tiled (--mlp-chunk c < T, model.TokenTiles): the block saves x, q, k, v and attention's output
    (block_saved_bytes(tiled=True)) and its two preallocated gradients, dx and d(out) (C + H D), are live
    through the backward beside the RoPE tables; on top, the largest of three phases:
      the output side's tiles: the block output's gradient (C) and one tile's recomputed o_proj,
        residual, norm and MLP with their gradients, c x (5 C + 6 F);
      the Ulysses exchange of d(out) (all_to_all_bytes);
      attention's backward: dq, dk, dv ((H + 2 Hkv) D) and on CUDA FlashAttention-2's workspace.
    Measured on the meta device (tests/test_memory_plan.py counts the live storages through a Llama-3-8B
    block's recompute and backward, CPU kernels): 0.97x to 1.01x of the CPU terms at 16K and 32K tokens,
    tiled and untiled; 28.56 GiB at 512K tokens in tiles of 4096, equal to the CPU terms (the peak is
    attention's backward there; the same block untiled in the MLP before tiling peaked at 63 GiB).
    """
    T, C, F, H, D = cfg.ctx // cfg.cp, mcfg.dim, mcfg.ffn_dim, mcfg.n_heads, mcfg.head_dim
    kv = kv_heads_held(mcfg, cfg.cp)
    kw = cfg.lora_kwargs()
    targets, c = lora.resolve_targets(kw["targets"]), min(T, cfg.mlp_chunk or T)
    flash = 8 * T * H * D if cuda else 0  # FlashAttention-2 backward workspace (estimate)
    a2a = all_to_all_bytes(cfg, mcfg, dtype_bytes)
    if c == T:
        saved = block_saved_bytes(mcfg, T, dtype_bytes, targets, kw["r"], kv_heads=kv)
        return saved + T * (C + 3 * F) * dtype_bytes + a2a + flash
    common = block_saved_bytes(mcfg, T, dtype_bytes, targets, kw["r"], tiled=True, kv_heads=kv)
    common += T * (C + H * D) * dtype_bytes + T * 2 * D * 4  # dx, d(out); the RoPE tables
    phases = (T * C + c * (5 * C + 6 * F)) * dtype_bytes, a2a, T * (H + 2 * kv) * D * dtype_bytes + flash
    return common + max(phases)


def block_saved_bytes(mcfg, T: int, dtype_bytes: int, targets=lora.ATTN_PROJ, r: int = 8,
                      mlp_tokens: int | None = None, tiled: bool = False, kv_heads: int | None = None) -> int:
    """Bytes one block's forward over T tokens saves for backward (autograd's saved tensors, each storage
    once; frozen weights apart), as model.py and lora.py compute it. In the compute dtype:
      the two norms' inputs (2 C; model.RMSNormFunction keeps x in its dtype);
      attention as the fused SDPA kernels save it: q, k, v and the output, (2 H + 2 Hkv) D, the output
      being what o_proj reads (a view of it);
      the MLP's gate, activation and up outputs, 3 F (each over `mlp_tokens`, default T);
      LoRA's inputs: C shared by q, k, v, C shared by gate and up, F for down, and r per adapted projection
      (lora.LoRALinear runs its branch in the compute dtype; a frozen linear saves only its weight).
    In float32: the norms' 1 / rms (2), attention's log-sum-exp (H) and the RoPE tables (2 D: one pair
    shared by every block, counted in each).
    Tiled (model.TokenTiles, --mlp-chunk): only x (C), q, k, v and the output ((2 H + 2 Hkv) D) and the
    log-sum-exp (H, float32); the tiles keep nothing else. kv_heads: Hkv's stand-in (kv_heads_held)."""
    C, F, H, D = mcfg.dim, mcfg.ffn_dim, mcfg.n_heads, mcfg.head_dim
    Hkv = mcfg.n_kv_heads if kv_heads is None else kv_heads
    if tiled:
        return T * (C + (2 * H + 2 * Hkv) * D) * dtype_bytes + T * H * 4
    attn = 2 * C + (2 * H + 2 * Hkv) * D + (C if {"q_proj", "k_proj", "v_proj"} & set(targets) else 0)
    mlp = 3 * F + (C if {"gate_proj", "up_proj"} & set(targets) else 0) + (F if "down_proj" in targets else 0)
    compute = T * (attn + r * len(targets)) + (T if mlp_tokens is None else mlp_tokens) * mlp
    return compute * dtype_bytes + T * (2 + H + 2 * D) * 4


def all_to_all_bytes(cfg: TrainConfig, mcfg, dtype_bytes: int) -> int:
    """Bytes per device that one block's Ulysses exchange adds at --cp N > 1 (0 at N = 1): the send and
    receive buffers of one exchange, at most 2 (T/N) H D values (q's). The head-layout q, k, v, output and
    their gradients replace their sequence-layout twins (the all-to-all saves nothing for backward), so
    the block's (H + 2 Hkv) D term already counts them, except for N > Hkv: each kv head is then copied to
    N/Hkv ranks (parallel.replicate_kv), so head-layout k and v hold 2 T D values, not the 2 (T/N) Hkv D
    counted, 2 (T/N) (N - Hkv) D more (the repeated sequence-layout copies before the exchange as many)."""
    if cfg.cp == 1:
        return 0
    copies = 2 * (cfg.ctx // cfg.cp) * max(cfg.cp - mcfg.n_kv_heads, 0) * mcfg.head_dim
    return (cfg.ctx // cfg.cp * 2 * mcfg.n_heads * mcfg.head_dim + copies) * dtype_bytes


def model_config(spec: str) -> ModelConfig:
    """The ModelConfig of a preset name, or of a HF directory / config.json (`--model`)."""
    return ModelConfig.from_name(spec) if spec in PRESETS else read_config(spec)


def trained_rope(cfg: TrainConfig, mc: ModelConfig) -> tuple[float, dict | None]:
    """(theta, scaling) the run trains with: --rope and --rope-theta over the model's own (rope.override)."""
    return rope.override(mc.rope_theta, mc.rope_scaling, cfg.rope, cfg.rope_theta, original_len=mc.max_seq_len,
                         ctx=cfg.pose or cfg.ctx)


def check_run(cfg: TrainConfig, mc: ModelConfig, device: torch.device) -> None:
    """The checks of a run that need the model's config `mc` (as read, before --rope) but no weights, the
    same for training and the dry run: --cp against the heads (parallel.check_context_parallel), --fsdp
    against the world size (more than one process), the RoPE trained with (dynamic NTK rescales by each shard's own length: refused), and the SDPA kernels
    training may use for the dtype on `device` (shift_attn.training_backends: float32 with GQA at long
    context on CUDA is refused)."""
    parallel.check_context_parallel(cfg.cp, mc.n_heads, mc.n_kv_heads)
    if cfg.fsdp and cfg.world_size < 2:
        raise UserError("--fsdp shards over the processes of a run: it needs more than one "
                        "(torchrun --nproc_per_node N; --nproc N with --dry-run)")
    if cfg.cp > 1 and (trained_rope(cfg, mc)[1] or {}).get("rope_type") == "dynamic":
        raise UserError(f"--cp {cfg.cp} with dynamic NTK RoPE: each shard would rescale for its own length; "
                        f"use --rope ntk:FACTOR (static) or --cp 1")
    shift_attn.training_backends(choose_dtype(cfg.dtype, device), device.type, mc.n_heads != mc.n_kv_heads,
                                 cfg.ctx)


def dry_run(cfg: TrainConfig) -> tuple[dict[str, float], dict]:
    """Print the resolved config and the memory plan of a GPU run (unless --dtype says otherwise), after
    check_run's checks for that GPU; the model is built on the meta device, so nothing is loaded.
    Returns (plan, LoRA summary)."""
    mcfg = model_config(cfg.model)
    check_run(cfg, mcfg, torch.device("cuda"))
    dtype = choose_dtype(cfg.dtype, torch.device("cuda"))
    with torch.device("meta"):
        net = Transformer(mcfg)
        summary = lora.apply_lora(net, **cfg.lora_kwargs())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    own = summary["embed"] + summary["norm"] + summary["lm_head"]
    plan = memory_plan(cfg, mcfg, torch.finfo(dtype).bits // 8, trainable, own_trainable=own)
    print(json.dumps(cfg.to_dict(), indent=2))
    mesh = f", dp {cfg.world_size // cfg.cp} x cp {cfg.cp}: {cfg.ctx // cfg.cp} tokens per device" if cfg.cp > 1 else ""
    print(f"\nmemory plan per device ({cfg.world_size} device(s), ctx {cfg.ctx}{mesh}, {dtype}):")
    for k, v in plan.items():
        print(f"  {k:42s} {v / 2**30:9.2f} GiB")
        if k == "one block's backward" and cfg.cp > 1:
            a2a = all_to_all_bytes(cfg, mcfg, torch.finfo(dtype).bits // 8)
            tiled = cfg.mlp_chunk and cfg.mlp_chunk < cfg.ctx // cfg.cp  # the exchange is one phase, else a term
            print(f"    {'all-to-all buffers (' + ('a phase)' if tiled else 'of which)'):40s} {a2a / 2**30:9.2f} GiB")
    return plan, summary
