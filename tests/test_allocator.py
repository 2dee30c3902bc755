"""retain_freed_memory: freed blocks stay in the process instead of being faulted in again."""

import subprocess
import sys

import pytest

# Each check runs in its own interpreter: the setting is process-wide and permanent.
_FAULTS = """
import resource, sys, torch
import tt_conv
if sys.argv[1] == "retain":
    tt_conv.retain_freed_memory()
def faults_per_pass():
    # 40 MiB: above glibc's largest dynamic mmap threshold (32 MiB), so by default every
    # such block is mapped afresh and faulted in page by page when written.
    for _ in range(3):
        torch.empty(10 * 2**20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(10 * 2**20).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(faults_per_pass())
"""


def _faults(mode):
    result = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return float(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 40 * 2**20 / 4096
    assert _faults("default") > 0.5 * pages  # mapped and faulted in on every pass
    # Reused from the heap (the heap may still grow once or twice, when other blocks sit above it).
    assert _faults("retain") < 0.15 * pages


def test_a_c_library_without_mallopt_is_named(monkeypatch):
    import ctypes.util

    from tt_conv import allocator

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libnothing.so.0")
    with pytest.raises(RuntimeError, match="libnothing.so.0.*jemalloc or tcmalloc"):
        allocator.retain_freed_memory()
