"""memory_alloc.py and memory_peak.py: the allocator policy (one re-execution with a preloaded allocator, else glibc's setting, which
returns freed tensors to the OS); peak readings name what they measure."""
import ast
import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memory_alloc
import memory_peak

ROOT = Path(__file__).resolve().parents[1]

# Free one 16 MiB tensor (glibc then raises its mmap threshold to 16 MiB), allocate 256 tensors of 1 MiB
# with small tensors between them, free the large ones, keep the small ones: the RSS growth left behind.
CHILD = r"""
import json
import torch
if {apply!r}:
    import memory_alloc
    how = memory_alloc.return_freed_memory()
else:  # glibc's defaults; memory_alloc.py not even imported (its imports' own frees move glibc's threshold)
    how = "default"
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
    r = subprocess.run([sys.executable, "-c", CHILD.format(apply=apply)], capture_output=True, cwd=ROOT,
                       text=True, env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux's")
def test_setting_returns_freed_tensors_that_glibc_defaults_keep():
    """256 MiB freed: with the setting less than 32 MiB of it stays resident (the small tensors and page
    tables); with glibc's defaults (threshold raised to 16 MiB by the first free) over 128 MiB stays."""
    on, off = kept_after_free(True), kept_after_free(False)
    assert on["how"] == "mallopt", on
    assert on["kept_mib"] < 32 and off["kept_mib"] > 128, (on, off)


# A command reduced to its first call (as_command=True, as the top of train.py makes it), or an in-process
# caller (as_command=False). Prints a line per process start.
ENTRY = r"""
import os, sys
print("start", os.getpid(), os.environ.get("LD_PRELOAD"), flush=True)
import memory_alloc
assert "torch" not in sys.modules  # the allocator is chosen before torch loads
print("result", memory_alloc.return_freed_memory(as_command={as_command!r}), flush=True)
"""


def run_entry(as_command: bool = True, **env_vars) -> tuple[list[list[str]], str]:
    """Run ENTRY as a command or as an in-process caller with these variables over a cleared environment:
    (its stdout lines split, its stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", memory_alloc.ALLOCATOR_VAR) and not k.startswith("MALLOC_")}
    code = ENTRY.format(as_command=as_command)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**env, **env_vars}, check=True)
    return [line.split() for line in r.stdout.splitlines()], r.stderr


def test_preload_env_respects_the_users_choice():
    libs = ["/opt/lib/libmimalloc.so.3", "libjemalloc.so.2"]
    env = memory_alloc.preload_env({"PATH": "/bin"}, libs)
    assert env == {"PATH": "/bin", "LD_PRELOAD": libs[0], memory_alloc.ALLOCATOR_VAR: libs[0]}
    named = memory_alloc.preload_env({memory_alloc.ALLOCATOR_VAR: "/x/libtcmalloc.so.4"}, libs)
    assert named["LD_PRELOAD"] == "/x/libtcmalloc.so.4"
    for users in ({"LD_PRELOAD": "/x/libother.so"}, {"MALLOC_ARENA_MAX": "2"}, {memory_alloc.ALLOCATOR_VAR: "glibc"}):
        assert memory_alloc.preload_env(users, libs) is None, users
    assert memory_alloc.preload_env({}, []) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and mallopt are Linux + glibc's")
def test_command_reexecutes_once_with_the_library_preloaded():
    """LONGCTX_ALLOCATOR names a real library (libm: harmless to preload): the command starts twice, the
    same process id, the second time with it in LD_PRELOAD, and does not re-execute again."""
    libm = ctypes.util.find_library("m")
    lines, err = run_entry(**{memory_alloc.ALLOCATOR_VAR: libm})
    pid = lines[0][1]
    assert lines == [["start", pid, "None"], ["start", pid, libm], ["result", "preloaded"]], (lines, err)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and mallopt are Linux + glibc's")
def test_users_preload_and_glibc_choice_run_as_they_are():
    libm = ctypes.util.find_library("m")
    for env, how in (({"LD_PRELOAD": libm}, "mallopt"), ({memory_alloc.ALLOCATOR_VAR: "glibc"}, "mallopt"),
                     ({"MALLOC_MMAP_THRESHOLD_": "131072"}, "environment")):
        lines, err = run_entry(**env)
        assert [w[0] for w in lines] == ["start", "result"] and lines[-1] == ["result", how], (env, lines)
        assert not err, (env, err)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and mallopt are Linux + glibc's")
def test_missing_library_falls_back_to_glibc_with_one_line():
    lines, err = run_entry(**{memory_alloc.ALLOCATOR_VAR: "/nonexistent/libfake.so"})
    assert [w[0] for w in lines] == ["start", "result"] and lines[-1] == ["result", "mallopt"], lines
    assert err.count("\n") == 1 and "/nonexistent/libfake.so" in err and "glibc" in err, err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and mallopt are Linux + glibc's")
def test_in_process_callers_are_not_reexecuted():
    """A caller whose __main__ is not an entry point (a test runner calling main() in-process) gets glibc's
    setting silently, even with a library named."""
    lines, err = run_entry(False, **{memory_alloc.ALLOCATOR_VAR: ctypes.util.find_library("m")})
    assert [w[0] for w in lines] == ["start", "result"] and lines[-1] == ["result", "mallopt"] and not err, (lines, err)


def test_peak_memory_on_cpu_names_the_resident_set():
    rec = memory_peak.peak_memory(torch.device("cpu"))
    assert list(rec) == ["peak_rss_gb"] and 0.05 < rec["peak_rss_gb"] < 64, rec
    assert memory_peak.memory_label(rec) == f"peak rss {rec['peak_rss_gb']:.2f}G"
    assert memory_peak.memory_label({"peak_alloc_gb": 1.0, "peak_reserved_gb": 1.5}) == "peak alloc 1.00G, reserved 1.50G"


def test_child_peak_is_its_own_not_its_large_parents():
    """A child of a large parent (the test runner after a model test) reports its own peak: Linux carries
    ru_maxrss across exec, VmHWM (memory_peak.vm_hwm_kib) belongs to the new address space. Reference: the
    parent holds 600 MiB touched; the child, a bare interpreter with torch, must read well below that."""
    if memory_peak.vm_hwm_kib() is None:
        pytest.skip("no /proc/self/status here")
    big = bytearray(600 * 2**20)
    big[::4096] = b"x" * len(big[::4096])
    code = ("import torch, memory_peak; "
            "print(memory_peak.peak_memory(torch.device('cpu'))['peak_rss_gb'] * 1024)")
    mib = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               cwd=ROOT).stdout)
    assert mib < 500, mib
    del big


COMMANDS = ("train.py", "eval.py", "demo.py", "demo_compare.py")


@pytest.mark.parametrize("name", COMMANDS)
def test_commands_choose_the_allocator_before_any_other_import(name):
    """The re-execution happens before torch loads (a second torch import would cost seconds): the first
    statements after the docstring and `from __future__` are `import memory_alloc` and the `__main__` block
    that calls it as a command."""
    body = [n for n in ast.parse((ROOT / name).read_text()).body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    assert isinstance(body[0], ast.Import) and [a.name for a in body[0].names] == ["memory_alloc"], name
    guard = ast.unparse(body[1])
    assert guard.startswith("if __name__ == '__main__':") and "return_freed_memory(as_command=True)" in guard, guard
