"""memory.py: the allocator setting returns freed tensors to the OS; peak readings name what they measure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memory

ROOT = Path(__file__).resolve().parents[1]

# Free one 16 MiB tensor (glibc then raises its mmap threshold to 16 MiB), allocate 256 tensors of 1 MiB
# with small tensors between them, free the large ones, keep the small ones: the RSS growth left behind.
CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
import torch, memory
how = memory.return_freed_memory() if {apply!r} else "default"
def rss_mib():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024
x = torch.ones(4 * 2**20)
del x
before = rss_mib()
big, small = [], []
for _ in range(256):
    big.append(torch.ones(2**18))
    small.append(torch.ones(16))
del big
print(json.dumps(dict(how=how, kept_mib=rss_mib() - before)))
"""


def kept_after_free(apply: bool) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), apply=apply)], capture_output=True,
                       text=True, env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_setting_returns_freed_tensors_that_glibc_defaults_keep():
    """256 MiB freed: with the setting less than 32 MiB of it stays resident (the small tensors and page
    tables); with glibc's defaults (threshold raised to 16 MiB by the first free) over 128 MiB stays."""
    on, off = kept_after_free(True), kept_after_free(False)
    assert on["how"] == "mallopt", on
    assert on["kept_mib"] < 32 and off["kept_mib"] > 128, (on, off)


def test_peak_memory_on_cpu_names_the_resident_set():
    rec = memory.peak_memory(torch.device("cpu"))
    assert list(rec) == ["peak_rss_gb"] and 0.05 < rec["peak_rss_gb"] < 64, rec
    assert memory.memory_label(rec) == f"peak rss {rec['peak_rss_gb']:.2f}G"
    assert memory.memory_label({"peak_alloc_gb": 1.0, "peak_reserved_gb": 1.5}) == "peak alloc 1.00G, reserved 1.50G"


def test_child_peak_is_its_own_not_its_large_parents():
    """A child of a large parent (the test runner after a model test) reports its own peak: Linux carries
    ru_maxrss across exec, VmHWM (memory.vm_hwm_kib) belongs to the new address space. Reference: the
    parent holds 600 MiB touched; the child, a bare interpreter with torch, must read well below that."""
    if memory.vm_hwm_kib() is None:
        pytest.skip("no /proc/self/status here")
    big = bytearray(600 * 2**20)
    big[::4096] = b"x" * len(big[::4096])
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import torch, memory; "
            "print(memory.peak_memory(torch.device('cpu'))['peak_rss_gb'] * 1024)")
    mib = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert mib < 500, mib
    del big
