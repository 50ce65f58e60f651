"""Bytes a rank holds for the weights and the trained state, --fsdp on 2 CPU ranks against one process.

    python bench/bench_fsdp.py [--model smollm2-135m] [--nproc 2]

Each point builds the model as train.py does (train.build_model: NF4 base with double quantization, LoRA
r=8 alpha=16 on all linears, float32), wraps it as train.py does (parallel_fsdp.wrap: nothing for one
process, FSDP2 over dp = nproc with --fsdp), takes one AdamW step on 64 tokens and counts what the rank
holds (parallel_fsdp.local_bytes: a sharded tensor counts its local chunk): Parameters (the NF4 codes and
scales, the float32 embeddings, norms and head, the LoRA factors), buffers, the gradients after the
backward, the Adam moments. No timing: only the sizes of the tensors each rank keeps, so the numbers are
exact and independent of load. Activations and FSDP2's transient gathered block are not counted (they
scale with ctx and one block, not with the model).

The ratio printed is (per-rank bytes with --fsdp, the largest rank) / (bytes of the one process).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("parameters", "buffers", "gradients", "optimizer")


def child(model: str, fsdp: bool):
    """One rank (run by torchrun, or alone): prints one JSON line of local_bytes."""
    sys.path.insert(0, str(ROOT))
    import torch

    import parallel
    import parallel_fsdp
    import train
    import train_config

    torch.set_num_threads(1)
    d = parallel.init_distributed()
    try:
        given = dict(model=model, tokenizer="bytes", ctx=64, data="unused", quant="nf4", lora_r=8, lora_alpha=16.0,
                     lora_targets="all-linear", dtype="float32", fsdp=fsdp, out="unused")
        cfg = train_config.resolve(given, None, d.world)
        net, _ = train.build_model(cfg, d, torch.float32)
        ddp = parallel_fsdp.wrap(net, parallel.init_mesh(d, 1), d, fsdp)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        tokens = torch.randint(0, net.config.vocab_size, (1, 65), generator=torch.Generator().manual_seed(d.rank))
        ddp(tokens[:, :-1], labels=tokens[:, 1:]).backward()
        grads = parallel_fsdp.local_bytes(net)["gradients"]
        opt.step()
        out = {**parallel_fsdp.local_bytes(net, opt), "gradients": grads, "rank": d.rank}
        print(json.dumps(out), flush=True)
    finally:
        parallel.destroy(d)


def point(model: str, nproc: int) -> list[dict]:
    """Every rank's counts for one process (nproc 1) or nproc --fsdp ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    me = [str(Path(__file__).resolve()), "--child", "--model", model]
    cmd = [sys.executable, *me] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *me, "--fsdp"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    return sorted(rows, key=lambda x: x["rank"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a preset or HF directory (default smollm2-135m)")
    ap.add_argument("--nproc", type=int, default=2, help="--fsdp ranks (default 2)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.model, args.fsdp)
    one, shards = point(args.model, 1)[0], point(args.model, args.nproc)
    mib = 2 ** 20
    print(f"{args.model}, NF4 + LoRA r=8 all-linear, float32; MiB per rank")
    print(f"{'':24s}" + "".join(f"{f:>12s}" for f in (*FIELDS, "total")))
    for name, row in [("1 process", one)] + [(f"--fsdp rank {r['rank']} of {args.nproc}", r) for r in shards]:
        cells = [row[f] for f in FIELDS] + [sum(row[f] for f in FIELDS)]
        print(f"{name:24s}" + "".join(f"{c / mib:12.2f}" for c in cells))
    worst = max(sum(r[f] for f in FIELDS) for r in shards)
    print(f"ratio (largest --fsdp rank / one process): {worst / sum(one[f] for f in FIELDS):.3f}")


if __name__ == "__main__":
    main()
