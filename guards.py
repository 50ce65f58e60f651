"""Run guards for the trainer: interrupts that save, an output folder that a failed start does not leave
behind, temporary debris removed, numerical checks on the gradient.

    with Interrupts(d) as stop:          # SIGINT/SIGTERM set a flag; a second SIGINT exits at once
        ... if stop.requested(): save, then raise UserError(stop.message(...))
    with discard_if_untrained(out, d):   # a run that fails before its first step leaves no --out
    remove_debris(out)                   # `.tmp-*` left by a kill -9 during an atomic write
    watch = GradWatch(); watch.check(step, grad_norm, out)
    check_same_files(d, [ckpt], "--out")  # files rank 0 wrote and every rank reads: the same on every node

Note: the interrupt is a flag the loop reads once per step, after the step's optimizer update, so the
saved checkpoint is exactly what `--save-every` would have written at that step and `--resume` continues
bit-identically. Ranks agree on the flag through one all-reduce per step (a signal may reach them at
different steps); a single process reads it directly.

Note: files one rank writes and all read. Rank 0 alone writes checkpoints (and the demo's data), every
rank reads them (`--resume`). On several nodes without a shared filesystem for --out, the other nodes
would find no checkpoint (or an old one) and start elsewhere than rank 0: replicas drift apart silently
until the collectives stop matching. So before reading, each rank describes what it finds (names,
sizes, and the bytes of files up to DIGEST_MAX_BYTES: trainer_state.json with its step and data
cursors) and every rank stops with the same one-line UserError when the descriptions differ.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import hashlib
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

import parallel
from checkpoint import TMP_PREFIX
from errors import UserError
from parallel import Dist

ZERO_GRAD_STEPS = 5  # consecutive steps with gradient norm exactly 0 before the one warning
SIGNALS = (signal.SIGINT, signal.SIGTERM)
DIGEST_MAX_BYTES = 16 * 2**20  # files up to this size are hashed whole; larger ones (weights, Adam moments) by size
SHARED = "for a run over several nodes it must be one folder every node sees (a shared filesystem)"


class Interrupts:
    """Context manager: SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT aborts
    at once (exit 130, one line, no traceback; atomic writes leave only `.tmp-*` debris). Outside the main
    thread it installs nothing and `requested()` is False."""

    def __init__(self, d: Dist):
        self.d, self.flag, self.old = d, False, {}

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            print("\ninterrupted again: stopped at once, without saving", file=sys.stderr, flush=True)
            os._exit(130)
        self.flag = True
        if self.d.main:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False

    def requested(self) -> bool:
        """True on every rank once a signal reached any rank (one all-reduce per step when world > 1)."""
        if self.d.world == 1:
            return self.flag
        return parallel.all_reduce_sum(torch.tensor(float(self.flag), device=self.d.device), self.d).item() > 0

    @staticmethod
    def message(ckpt: Path, step: int) -> str:
        return (f"interrupted after step {step}: checkpoint {ckpt}; continue with the same command and --resume")


def remove_debris(out: Path) -> list[Path]:
    """Remove `.tmp-*` entries that an interrupted atomic write left in `out` and its adapter folder."""
    gone = []
    for folder in (out, out / "adapter"):
        if folder.is_dir():
            for p in folder.glob(TMP_PREFIX + "*"):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                gone.append(p)
    return gone


@contextlib.contextmanager
def discard_if_untrained(out: str | os.PathLike, d: Dist):
    """On an exception, remove `out` if this run created it and no step reached it: no checkpoint, no
    metrics line (a data, tokenizer or model error found at setup or in the first step)."""
    out = Path(out)
    existed = out.exists()
    try:
        yield
    except BaseException:
        if d.main and not existed and out.is_dir():
            metrics = out / "metrics.jsonl"
            trained = any(p.name.startswith("ckpt-") for p in out.iterdir()) or \
                (metrics.is_file() and metrics.stat().st_size > 0)
            if not trained:
                shutil.rmtree(out, ignore_errors=True)
        raise


class GradWatch:
    """Per-step gradient checks: a non-finite norm stops the run before the optimizer applies it; a norm
    of exactly 0 for ZERO_GRAD_STEPS consecutive steps warns once (e.g. an lr so large the loss froze)."""

    def __init__(self, d: Dist, zero_steps: int = ZERO_GRAD_STEPS):
        self.d, self.zero_steps, self.zeros, self.warned = d, zero_steps, 0, False

    def check(self, step: int, grad_norm: torch.Tensor | float, last_good: Callable[[], Path | None]) -> None:
        g = float(grad_norm)
        if not math.isfinite(g):
            raise UserError(f"step {step}: gradient norm is {g}; stopping before the update. "
                            f"Last good checkpoint: {last_good() or 'none'}")
        self.zeros = self.zeros + 1 if g == 0.0 else 0
        if self.zeros >= self.zero_steps and not self.warned:
            self.warned = True
            if self.d.main:
                print(f"warning: gradient norm is exactly 0 for {self.zeros} steps (step {step}); the model "
                      "is not learning (too large --lr, or nothing supervised?)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- files every rank reads


def files_digest(paths: list[Path | None]) -> str:
    """What this process finds at `paths` (the module's note): for each, its name and a sha256 over its
    files' relative names, sizes and (up to DIGEST_MAX_BYTES) bytes; 'nothing' for None or a missing path."""
    out = []
    for path in paths:
        if path is None or not path.exists():
            out.append("nothing" if path is None else f"no {path.name}")
            continue
        h = hashlib.sha256()
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}:".encode())
            if size <= DIGEST_MAX_BYTES:
                h.update(f.read_bytes())
        out.append(f"{path.name} ({len(files)} file(s), sha256 {h.hexdigest()[:12]})")
    return ", ".join(out)


def check_same_files(d: Dist, paths: list[Path | None], flag: str) -> None:
    """Files rank 0 wrote and every rank is about to read must look the same on every rank: else one
    UserError, the same on every rank, naming `flag` (whose folder holds them), the two ranks' hosts and
    what each found. A no-op for one process."""
    if d.world == 1:
        return
    seen = parallel.gather_objects((socket.gethostname(), files_digest(paths)), d)
    bad = next((r for r, (_, found) in enumerate(seen) if found != seen[0][1]), None)
    if bad is not None:
        raise UserError(f"{flag}: rank {bad} (host {seen[bad][0]}) finds {seen[bad][1]}, rank 0 (host {seen[0][0]}) "
                        f"finds {seen[0][1]}; {SHARED}")
