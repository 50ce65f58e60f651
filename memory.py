"""Process memory: the CPU allocator setting the entry points start with, and the peak readings they report.

Note: why the allocator setting. glibc's malloc serves a request above its mmap threshold with its own
mmap, which `free` unmaps at once; below it, blocks come from heaps (arenas) that are trimmed only from
the top. The threshold starts at 128 KiB but grows to the size of every mmapped block freed (up to
32 MiB), so after the first few freed activations of a training step almost every tensor lands in the
heaps, and memory freed in the middle of a heap stays in the process. The resident set then follows the
peak of the sum of all blocks ever freed and not reused, not the live tensors, and grows with the number
of layers. `mallopt(M_MMAP_THRESHOLD, 64 KiB)` fixes the threshold (and switches the dynamic growth off):
tensors of 64 KiB and more are mmapped and return to the OS when freed, the same as running with
`MALLOC_MMAP_THRESHOLD_=65536` in the environment. Cost: an mmap/munmap pair (and page faults on first
touch) per large tensor. jemalloc or tcmalloc through LD_PRELOAD return freed memory by their own
policies; when one is preloaded, or the variable is already set, the setting is left alone.
"""
from __future__ import annotations

import ctypes
import os
import platform
import resource
import sys

import torch

M_MMAP_THRESHOLD = -3  # glibc malloc.h
MMAP_THRESHOLD = 64 * 2**10  # bytes: every tensor of 16K float32 values or more is its own mapping


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> str:
    """Make this process's allocator return freed large blocks to the OS (glibc on Linux only).

    Called once from each entry point's main(); changes nothing but the allocator's threshold. Returns
    what was done, one word: "mallopt" (the setting was applied), "environment" (MALLOC_MMAP_THRESHOLD_
    already set), "preloaded" (another allocator in LD_PRELOAD), or "unsupported" (not Linux + glibc).
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return "environment"
    if any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return "preloaded"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "unsupported"
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
