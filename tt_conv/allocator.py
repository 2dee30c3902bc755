"""Keep freed memory in the process for CPU inference (glibc's ``mallopt``).

PyTorch allocates every activation on the CPU with ``malloc`` and frees it when the next
layer is done with it. glibc serves blocks above its mmap threshold (dynamic, at most
32 MiB) with fresh ``mmap`` calls and returns the top of the heap to the system once more
than its trim threshold is free, so each forward pass page-faults much of its activation
memory back in: in a fresh process a ResNet-18 at batch 8 took about 13,000 minor faults
per pass (50 MiB), dense or compressed, and ran 18 % longer than with freed memory retained
(``benchmarks/fresh_process.py`` on the 2-core development machine). Fault costs do not shrink with a
model's FLOPs, so they also eat into what factorizing saves.

:func:`retain_freed_memory` raises both thresholds, so freed blocks stay in the heap for
the next pass. The cost is that the process keeps its peak heap until it exits. jemalloc or
tcmalloc preloaded (``LD_PRELOAD``), which PyTorch's CPU performance guide suggests, do
the same for a whole process from outside it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap: far above any activation of the models here
#: (a 1 GiB block is 8 x 64 x 1,024 x 512 floats), yet a huge one is still mapped on its own.
MMAP_THRESHOLD = 1 << 30

#: Free memory the heap keeps at its top before returning it to the system (the largest
#: value mallopt accepts).
TRIM_THRESHOLD = (1 << 31) - 1


def retain_freed_memory() -> None:
    """Make this process keep freed memory for reuse instead of returning it to the system.

    Raises glibc's mmap threshold to :data:`MMAP_THRESHOLD` and its trim threshold to
    :data:`TRIM_THRESHOLD`, process-wide and for the rest of the process (see the module
    docstring: CPU inference then stops page-faulting its activations in on every pass).
    Both the dense and the compressed model gain; measure them under the same setting.

    Raises
    ------
    RuntimeError
        Where the C library is not glibc (no ``mallopt``: macOS, Windows, musl) or refuses
        a value; there, preload jemalloc or tcmalloc instead.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        raise RuntimeError(
            f"retain_freed_memory needs glibc's mallopt, which this platform's C library "
            f"({name or 'none found'}) does not have; preload jemalloc or tcmalloc "
            f"(LD_PRELOAD) instead") from None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting either one switches off glibc's dynamic threshold,
    # and with the trim threshold alone every block above 128 KiB would be mapped afresh.
    for parameter, value, what in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
                                   (_M_TRIM_THRESHOLD, TRIM_THRESHOLD, "M_TRIM_THRESHOLD")):
        if mallopt(parameter, value) != 1:
            raise RuntimeError(f"mallopt({what}, {value}) was refused by {name}; preload "
                               f"jemalloc or tcmalloc (LD_PRELOAD) instead")
