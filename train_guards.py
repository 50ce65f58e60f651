"""Run guards for the trainer: one trainer per output folder, interrupts that save, an output folder that a
failed start does not leave behind, temporary debris removed, a rollback that becomes the live branch,
numerical checks on the gradient.

    with own_run_folder(out, d):         # --out checked, locked (flock), debris removed; removed if untrained
    with Interrupts(d) as stop:          # SIGINT/SIGTERM set a flag; a second SIGINT exits at once
        ... if stop.requested(): save, then raise UserError(stop.message(...))
        with stop.at_once(ckpt): ...     # the final writes: a signal stops at once, nothing half-written
    set_aside_later(out, step, d)        # --resume-from STEP: later checkpoints moved to OUT/abandoned/
    watch = GradWatch(); watch.check(step, grad_norm, out)
    check_same_files(d, [ckpt], "--out")  # files rank 0 wrote and every rank reads: the same on every node

Note: the interrupt is a flag read once per step, after the optimizer update, so the checkpoint it
saves is the one `--save-every` would write and `--resume` continues bit-identically; ranks agree on it
through one all-reduce per step (a signal may reach them at different steps).

Note: the lock is an flock on OUT/.lock held by rank 0; the kernel drops it however the process ends
(kill -9 included), so a lock file left behind never blocks the next run.

Note: rank 0 alone writes checkpoints and every rank reads them. Nodes without a shared --out would
resume elsewhere than rank 0 and drift apart silently, so each rank first describes what it finds (names,
sizes, small files' bytes) and all stop with one UserError when the descriptions differ.
"""
from __future__ import annotations

import contextlib
import fcntl
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
from errors import UserError
from outputs import TMP_PREFIX, check_output
from parallel import Dist

CKPT_PREFIX = "ckpt-"  # checkpoint folders: ckpt-STEP, the step in 7 digits
LOCK_NAME = ".lock"
ABANDONED = "abandoned"  # checkpoints after a --resume-from rollback point are moved here
RUN_FILES = {"metrics.jsonl": "file", "adapter": "folder", "merged": "folder", "merged.gguf": "file"}
ZERO_GRAD_STEPS = 5  # consecutive steps with gradient norm exactly 0 before the one warning
SIGNALS = (signal.SIGINT, signal.SIGTERM)
DIGEST_MAX_BYTES = 16 * 2**20  # files up to this size are hashed whole; larger ones (weights, Adam moments) by size
SHARED = "for a run over several nodes it must be one folder every node sees (a shared filesystem)"


class Interrupts:
    """Context manager: SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT aborts
    at once (exit 130, one line, no traceback; atomic writes leave only `.tmp-*` debris). Outside the main
    thread it installs nothing and `requested()` is False."""

    def __init__(self, d: Dist):
        self.d, self.flag, self.old, self.final, self.signum = d, False, {}, None, signal.SIGTERM

    def _handle(self, signum, frame):
        self.signum = signum
        if self.final is not None:
            raise UserError(f"{signal.Signals(signum).name}: stopped before the final outputs were complete (none "
                            f"half-written); checkpoint {self.final} is kept: rerun the same command with --resume")
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

    @contextlib.contextmanager
    def at_once(self, ckpt: Path):
        """Within: a signal (or one already received) stops at once with one line; the atomic writers
        remove their temporaries, `ckpt` stays, and --resume writes the final outputs again."""
        self.final = ckpt
        try:
            if self.flag:
                self._handle(self.signum, None)
            yield
        finally:
            self.final = None

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


def is_run_folder(out: Path) -> bool:
    """A folder a trainer wrote: it holds metrics.jsonl, the lock file, a checkpoint or an adapter."""
    return out.is_dir() and ((out / "metrics.jsonl").is_file() or (out / LOCK_NAME).is_file() or
                             any(out.glob(CKPT_PREFIX + "*")) or (out / "adapter" / "adapter_config.json").is_file())


def trained(out: Path) -> bool:
    """A step reached `out`: a checkpoint or a metrics line."""
    metrics = out / "metrics.jsonl"
    return any(out.glob(CKPT_PREFIX + "*")) or (metrics.is_file() and metrics.stat().st_size > 0)


def remove_run(out: str | os.PathLike) -> None:
    """Delete a previous training run (a demo's or compare's own); a folder that is not one is refused."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if out.is_symlink() or not is_run_folder(out):
            raise UserError(f"{out}: not a training run folder; it is not deleted: move it or choose another --out")
        shutil.rmtree(out)


def check_run_folder(out: Path) -> None:
    """--out and the paths the trainer writes in it, by outputs.check_output's rule: a new or empty folder
    or an earlier run's; metrics.jsonl and merged.gguf files, adapter and merged folders."""
    check_output(out, "new", "--out", owned=is_run_folder)
    for name, kind in RUN_FILES.items():
        check_output(out / name, kind, "--out")


def _lock(out: Path, d: Dist) -> int | None:
    """Rank 0: an exclusive flock on OUT/.lock (its fd), every rank agreeing; UserError if it is held or
    cannot be made. A file system without locks (some network mounts) gets a warning and no lock."""
    fd, problem = None, None
    if d.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            problem = (f"--out {out}: another trainer (pid {holder}) is writing there; wait for it to end or "
                       "choose another --out")
        except OSError as e:
            if fd is None:
                problem = f"--out {out}: cannot write there ({e.strerror or e})"
            else:
                print(f"warning: --out {out}: cannot lock {out / LOCK_NAME} ({e.strerror or e}); a second trainer "
                      "on it would not be refused", file=sys.stderr, flush=True)
        if problem is not None and fd is not None:
            os.close(fd)
    failed = problem is not None
    if d.world > 1:
        failed = parallel.all_reduce_sum(torch.tensor(float(failed), device=d.device), d).item() > 0
    if failed:
        raise UserError(problem or f"--out {out}: rank 0 could not take the lock")
    return fd


@contextlib.contextmanager
def own_run_folder(out: str | os.PathLike, d: Dist):
    """The trainer's hold on --out for the whole run: the folder checked (check_run_folder), locked against a
    second trainer, cleared of `.tmp-*` debris; on an exception before any step reached it, removed if this
    run created it (a data, tokenizer or model error found at setup or in the first step)."""
    out = Path(out)
    check_run_folder(out)
    created = not out.exists()
    fd = _lock(out, d)
    try:
        if d.main:
            for p in remove_debris(out):
                parallel.log0(d, f"removed {p} (left by an interrupted save)")
        yield
    except BaseException:
        if d.main and created and out.is_dir() and not trained(out):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def set_aside_later(out: Path, step: int, d: Dist) -> list[Path]:
    """A rollback (--resume-from a step-`step` checkpoint): rank 0 moves the checkpoints of `out` after
    `step` (the abandoned branch) into OUT/abandoned/, nothing deleted, so the newest checkpoint, which
    --resume continues and --keep counts from, is the rollback's own. Returns the new paths."""
    later = [p for p in sorted(out.glob(CKPT_PREFIX + "*")) if p.is_dir() and p.name > f"{CKPT_PREFIX}{step:07d}"]
    moved = []
    for p in later if d.main else []:
        dest, i = out / ABANDONED / p.name, 1
        while dest.exists():
            dest, i = out / ABANDONED / f"{p.name}.{i}", i + 1
        dest.parent.mkdir(exist_ok=True)
        os.replace(p, dest)
        moved.append(dest)
    if moved:
        parallel.log0(d, f"rollback to step {step}: moved {len(moved)} later checkpoint(s) to {out / ABANDONED} "
                         "(move one back and pass --resume-from to continue that branch)")
    return moved


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
