"""Process memory: the CPU allocator every entry point starts with, and the peak readings they report.

Note: why an allocator policy. glibc's malloc serves a request above its mmap threshold with its own
mmap, which `free` unmaps at once; below it, blocks come from heaps (arenas) that are trimmed only from
the top. The threshold starts at 128 KiB but grows to the size of every mmapped block freed (up to
32 MiB), so after the first few freed activations of a training step almost every tensor lands in the
heaps, and memory freed in the middle of a heap stays in the process: the resident set follows the peak
of all blocks ever freed and not reused, not the live tensors. Fixing the threshold at 64 KiB
(`mallopt(M_MMAP_THRESHOLD)`, as `MALLOC_MMAP_THRESHOLD_=65536`) makes the RSS honest but turns every
tensor of 64 KiB or more into an mmap/munmap pair with fresh page faults, the demo's cost. An allocator
that keeps freed pages for reuse and returns them after a delay gives both. So `return_freed_memory`
re-executes the entry point once with one in LD_PRELOAD (as torch.backends.xeon.run_cpu launches):
mimalloc from the `cmeel-mimalloc` wheel that requirements.txt installs (the same on every machine set
up by the README), else the system's jemalloc or tcmalloc; with none, the glibc setting and one line.
Measured (bench/RESULTS.md, section 9; a 2-core machine under load 11-17, so times are ratios at best):
the demo's training recipe, 10 steps side by side, took the same wall time (within 1%) under mimalloc,
jemalloc, tcmalloc and glibc, with user + system 74 / 76 / 74 / 81 s and peak RSS 542 / 493 / 500 /
479 MB (mimalloc's peak +10% over jemalloc's); in the full demo, side by side, mimalloc and jemalloc
reached step 92 in the time the glibc setting reached step 62 (same CPU time each); smollm2-135m
`--steps 1` under mimalloc peaked at 1,303 and 1,470 MiB at 2,048 and 4,096 tokens (0.08 MiB per token;
the CPU plan 8% under both). Cost: the interpreter and imports start twice (`python train.py --help`:
14 vs 8 s wall on that machine).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import platform
import resource
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD = 64 * 2**10  # bytes: every tensor of 16K float32 values or more is its own mapping
ALLOCATOR_VAR = "LONGCTX_ALLOCATOR"  # a library path to preload, or "glibc"; set by the re-execution itself
PIP_ALLOCATOR = ("cmeel-mimalloc", "libmimalloc.so")  # requirements.txt's package and the library it ships
SYSTEM_ALLOCATORS = ("jemalloc", "tcmalloc_minimal", "tcmalloc")  # ctypes.util.find_library names, in order
ENTRY_DIR = Path(__file__).resolve().parent  # a __main__ here is an entry point run as a command


def allocator_libraries() -> list[str]:
    """Allocator libraries present here, best first: the pip package's mimalloc, then the system's jemalloc
    and tcmalloc (sonames, which the dynamic loader finds in its own paths)."""
    found = []
    try:
        dist = importlib.metadata.distribution(PIP_ALLOCATOR[0])
        found += [str(dist.locate_file(f)) for f in dist.files or () if f.name.startswith(PIP_ALLOCATOR[1])][:1]
    except importlib.metadata.PackageNotFoundError:
        pass
    return found + [lib for lib in map(ctypes.util.find_library, SYSTEM_ALLOCATORS) if lib]


def preload_env(environ: Mapping[str, str], libraries: list[str]) -> dict[str, str] | None:
    """The environment to re-execute with: `environ` plus LD_PRELOAD of ALLOCATOR_VAR's library, else of
    the first of `libraries`, and ALLOCATOR_VAR naming it. None when the user chose already (their own
    LD_PRELOAD, a MALLOC_* variable, ALLOCATOR_VAR="glibc") or when there is no library."""
    chosen = environ.get(ALLOCATOR_VAR)
    if environ.get("LD_PRELOAD") or any(k.startswith("MALLOC_") for k in environ) or chosen == "glibc":
        return None
    lib = chosen or next(iter(libraries), None)
    return None if lib is None else {**environ, "LD_PRELOAD": lib, ALLOCATOR_VAR: lib}


def command_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a command started in `environ` runs in after `return_freed_memory`'s re-execution:
    what a benchmark gives a `python -c` child (never re-executed) so that it runs as `python train.py`."""
    return preload_env(environ, allocator_libraries()) or dict(environ)


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> str:
    """Give this process an allocator that returns freed memory to the OS (Linux + glibc only).

    Called first in each entry point's main(). Run as a command (`python train.py ...`: `__main__` is a
    file of this directory), it re-executes the same command line once with `preload_env` (same process
    id, arguments and streams; the new process finds its library in LD_PRELOAD and goes on). Otherwise
    (in-process callers such as tests; the user's own LD_PRELOAD or ALLOCATOR_VAR=glibc; no library, said
    in one line on stderr) it fixes glibc's mmap threshold. Returns what holds, one word: "preloaded"
    (an allocator in LD_PRELOAD), "environment" (MALLOC_* set), "mallopt" (the threshold was set), or
    "unsupported" (not Linux + glibc).
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "unsupported"
    preloaded, chosen = os.environ.get("LD_PRELOAD", ""), os.environ.get(ALLOCATOR_VAR)
    if any(a in preloaded for a in ("jemalloc", "tcmalloc", "mimalloc")) or \
            (chosen and chosen in preloaded.split(":")):
        return "preloaded"
    if any(k.startswith("MALLOC_") for k in os.environ):
        return "environment"
    main_file = getattr(sys.modules["__main__"], "__file__", None)
    if main_file and Path(main_file).resolve().parent == ENTRY_DIR:
        env = preload_env(os.environ, [] if chosen else allocator_libraries())
        if env and ("/" not in env["LD_PRELOAD"] or Path(env["LD_PRELOAD"]).is_file()):
            sys.stdout.flush(), sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        if not preloaded and chosen != "glibc":
            missing = f"{chosen} ({ALLOCATOR_VAR}) not found" if chosen else \
                "no mimalloc, jemalloc or tcmalloc found (`pip install -r requirements.txt` brings mimalloc)"
            print(f"memory: {missing}; glibc malloc with a {threshold // 1024} KiB mmap threshold instead "
                  "(slower on CPU: memory.py's note)", file=sys.stderr)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "unsupported"
    return "mallopt" if libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1 else "unsupported"


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak memory so far, in GiB, named by what it measures.

    CUDA: `peak_alloc_gb`, the caching allocator's peak of live tensor bytes
    (torch.cuda.max_memory_allocated), and `peak_reserved_gb`, its peak of bytes held from the driver
    (max_memory_reserved; what nvidia-smi sees, less the CUDA context). CPU: `peak_rss_gb`, the peak
    resident set of the whole process (VmHWM, else getrusage ru_maxrss: interpreter, libraries, weights and the
    step), which follows live tensors once `return_freed_memory` is applied.
    """
    if device.type == "cuda":
        return {"peak_alloc_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    kib = vm_hwm_kib()
    if kib is not None:
        return {"peak_rss_gb": kib / 2**20}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB; macOS: bytes
    return {"peak_rss_gb": kib / (2**30 if sys.platform == "darwin" else 2**20)}


def vm_hwm_kib() -> int | None:
    """Linux: this process's peak resident set in KiB (VmHWM in /proc/self/status), None elsewhere.

    Note: preferred to getrusage's ru_maxrss, which Linux carries across exec: a process started by a large
    parent (a test runner that has loaded a model, say) reports the parent's peak until it exceeds it.
    VmHWM belongs to the address space, which exec replaces.
    """
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    except OSError:
        return None


def memory_label(rec: dict) -> str:
    """The progress bar's memory text for a `peak_memory` record, naming what it shows."""
    if "peak_alloc_gb" in rec:
        return f"peak alloc {rec['peak_alloc_gb']:.2f}G, reserved {rec['peak_reserved_gb']:.2f}G"
    return f"peak rss {rec['peak_rss_gb']:.2f}G"
