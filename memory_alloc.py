"""The CPU allocator every command starts with, chosen before torch is imported (standard library only).

Note: why an allocator policy. glibc's mmap threshold grows to the size of every mmapped block freed, so
tensors soon land in heaps trimmed only from the top and the resident set follows the peak of all blocks
ever freed; a fixed small threshold is honest but pays an mmap/munmap and fresh page faults per tensor. An
allocator that reuses freed pages and returns them later (mimalloc, jemalloc, tcmalloc) gives both, so a
command re-executes itself once with one in LD_PRELOAD (mimalloc from requirements.txt's `cmeel-mimalloc`,
else the system's jemalloc or tcmalloc; with none, glibc with a fixed threshold and one line).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import platform
import sys
from collections.abc import Mapping

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD = 64 * 2**10  # bytes: every tensor of 16K float32 values or more is its own mapping
ALLOCATOR_VAR = "LONGCTX_ALLOCATOR"  # a library path to preload, or "glibc"; set by the re-execution itself
PIP_ALLOCATOR = ("cmeel-mimalloc", "libmimalloc.so")  # requirements.txt's package and the library it ships
SYSTEM_ALLOCATORS = ("jemalloc", "tcmalloc_minimal", "tcmalloc")  # ctypes.util.find_library names, in order
PRELOADED_NAMES = ("jemalloc", "tcmalloc", "mimalloc")  # an LD_PRELOAD naming one of these is an allocator


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
    """The environment a command started in `environ` runs in after its re-execution: what a benchmark gives
    a `python -c` child (never re-executed) so that it runs as `python train.py` does."""
    return preload_env(environ, allocator_libraries()) or dict(environ)


def return_freed_memory(as_command: bool = False, threshold: int = MMAP_THRESHOLD) -> str:
    """Give this process an allocator that returns freed memory to the OS (Linux + glibc only).

    A command calls it with `as_command=True` at the top of its file, before torch is imported: it then
    re-executes the same command line once with `preload_env` (os.execve: same process id, arguments and
    streams; the new process finds its library in LD_PRELOAD, returns "preloaded" here and goes on).
    Otherwise (in-process callers such as tests; the user's own LD_PRELOAD or ALLOCATOR_VAR=glibc; no
    library, said in one line on stderr) it fixes glibc's mmap threshold. Returns what holds, one word:
    "preloaded", "environment" (MALLOC_* set), "mallopt" (the threshold was set), or "unsupported".
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "unsupported"
    preloaded, chosen = os.environ.get("LD_PRELOAD", ""), os.environ.get(ALLOCATOR_VAR)
    if any(a in preloaded for a in PRELOADED_NAMES) or (chosen and chosen in preloaded.split(":")):
        return "preloaded"
    if any(k.startswith("MALLOC_") for k in os.environ):
        return "environment"
    if as_command:
        env = preload_env(os.environ, [] if chosen else allocator_libraries())
        if env and ("/" not in env["LD_PRELOAD"] or os.path.isfile(env["LD_PRELOAD"])):
            sys.stdout.flush(), sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
        if not preloaded and chosen != "glibc":
            missing = f"{chosen} ({ALLOCATOR_VAR}) not found" if chosen else \
                "no mimalloc, jemalloc or tcmalloc found (`pip install -r requirements.txt` brings mimalloc)"
            print(f"memory: {missing}; glibc malloc with a {threshold // 1024} KiB mmap threshold instead "
                  "(slower on CPU: memory_alloc.py's note)", file=sys.stderr)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "unsupported"
    return "mallopt" if libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1 else "unsupported"
