"""Measured memory: the process's peak readings, named by what they measure (the plan's predictions are
memory_plan.py; the CPU allocator that makes the resident set follow live tensors is memory_alloc.py).
"""
from __future__ import annotations

import resource
import sys

import torch


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak memory so far, in GiB, named by what it measures.

    CUDA: `peak_alloc_gb`, the caching allocator's peak of live tensor bytes
    (torch.cuda.max_memory_allocated), and `peak_reserved_gb`, its peak of bytes held from the driver
    (max_memory_reserved; what nvidia-smi sees, less the CUDA context). CPU: `peak_rss_gb`, the peak
    resident set of the whole process (VmHWM, else getrusage ru_maxrss: interpreter, libraries, weights and the
    step), which follows live tensors under memory_alloc's allocator.
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
