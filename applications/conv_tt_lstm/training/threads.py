"""How many CPU threads a run uses: a fixed count, or the cores other jobs leave free.

A recurrent network runs thousands of small operators per step, each a parallel region
that waits for its slowest thread. When another job shares the cores, the OS deschedules
one of our threads now and then and the whole region waits: measured with
``benchmarks/threads.py`` on 2 cores beside a 2-thread job, the quick preset's step takes
5x its idle time at 2 threads, 1.4x at 1 thread. The adaptive policy (``run.threads=0``,
the default) therefore uses every core of an idle machine and steps down to the cores
that are free when other processes are busy, re-checking as the run goes.

Thread counts change reductions' order, so runs whose thread count changed are not
bitwise reproducible; set ``run.threads`` to a fixed count for that.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Tuple

import torch

#: Seconds between two looks at the machine's load during a run.
RECHECK_SECONDS = 15.0

# Free cores are rounded up from this fraction, so that a job using half a core now and
# then does not cost us a thread.
_ROUND_UP_FROM = 0.75


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _busy_ticks() -> Optional[int]:
    """Clock ticks all cores spent busy since boot (``/proc/stat``), None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    values = [int(v) for v in fields[1:9]]
    return sum(values) - values[3] - values[4]


def _others_running_now() -> Optional[int]:
    """Runnable threads of other processes at this moment (``/proc/loadavg``)."""
    try:
        with open("/proc/loadavg") as loadavg:
            running = int(loadavg.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, running - 1)  # this thread, reading the file, is one of them


def _threads_for(free: float, cores: int) -> int:
    return max(1, min(cores, int(free + (1 - _ROUND_UP_FROM))))


class ThreadPolicy:
    """Sets torch's CPU thread count for a run and keeps it fitted to the machine's load.

    Parameters
    ----------
    threads : int
        A fixed count (>= 1), or 0 for the adaptive policy (module docstring).
    processes_per_machine : int
        Training processes sharing this machine (torchrun's local world size): the
        adaptive policy then gives each a fixed share of the cores instead, since the
        processes would otherwise count each other as load.
    recheck_seconds : float
        Least seconds between two looks at the load.

    Call :meth:`update` once per step; it looks at the load at most every
    ``recheck_seconds``.
    """

    def __init__(self, threads: int = 0, processes_per_machine: int = 1,
                 recheck_seconds: float = RECHECK_SECONDS):
        self.recheck_seconds = recheck_seconds
        if threads < 0:
            raise ValueError(f"run.threads must be >= 0 (0: adaptive), got {threads}")
        self.cores = available_cores()
        self.adaptive = threads == 0 and processes_per_machine == 1
        if threads:
            self.threads = threads
        elif processes_per_machine > 1:
            self.threads = max(1, self.cores // processes_per_machine)
        else:
            others = _others_running_now()
            self.threads = self.cores if others is None else _threads_for(
                self.cores - others, self.cores)
        torch.set_num_threads(self.threads)
        self._mark: Optional[Tuple[float, int, float]] = self._sample()

    @staticmethod
    def _sample() -> Optional[Tuple[float, int, float]]:
        busy = _busy_ticks()
        if busy is None:
            return None
        own = os.times()
        return time.monotonic(), busy, own.user + own.system

    def update(self) -> int:
        """Refit the thread count to the load seen since the last look; return the count."""
        if not self.adaptive or self._mark is None:
            return self.threads
        now = time.monotonic()
        if now - self._mark[0] < self.recheck_seconds:
            return self.threads
        sample = self._sample()
        if sample is None:
            return self.threads
        elapsed = sample[0] - self._mark[0]
        busy_cores = (sample[1] - self._mark[1]) / os.sysconf("SC_CLK_TCK") / elapsed
        own_cores = (sample[2] - self._mark[2]) / elapsed
        self._mark = sample
        threads = _threads_for(self.cores - max(0.0, busy_cores - own_cores), self.cores)
        if threads != self.threads:
            self.threads = threads
            torch.set_num_threads(threads)
        return self.threads

    def describe(self) -> str:
        """``"2 CPU threads (adaptive)"`` and the like, for the run's log."""
        kind = "adaptive" if self.adaptive else "fixed"
        return f"{self.threads} CPU thread{'s' if self.threads != 1 else ''} ({kind})"
