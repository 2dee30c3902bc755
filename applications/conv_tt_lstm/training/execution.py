"""How a run executes on its device: CPU threads and the optional ``torch.compile`` of the cells.

Both trainers (video prediction and recognition) call :func:`prepare_execution` once, before
wrapping the model in DistributedDataParallel.

Threads (``run.threads``): the number of CPU threads PyTorch uses; 0 keeps PyTorch's default
(one per core). Every operation of a recurrent network is a parallel region that waits for
its slowest thread, so on a machine whose cores also run another job, a thread that the OS
has descheduled stalls every region: measured with ``benchmarks/threads.py`` on 2 cores, the
small presets run many times slower at 2 threads beside another 2-thread job, but only about
2x slower at 1 thread. The small presets (``train --preset quick``, ``recognize --preset
quick``) therefore set 1 thread; the paper presets keep one per core (their large
convolutions use every core, and a paper run belongs on a machine of its own).
"""

from __future__ import annotations

import torch

import tt_conv


def prepare_execution(model: torch.nn.Module, *, threads: int = 0,
                      compile: bool = False) -> torch.nn.Module:
    """Set the CPU threads and, with ``compile``, compile every recurrent cell in place.

    Parameters
    ----------
    model : torch.nn.Module
        The network (not yet wrapped in DistributedDataParallel).
    threads : int
        CPU threads (0: PyTorch's default, one per core).
    compile : bool
        ``torch.compile`` each cell's forward (:func:`tt_conv.compile_cells`); a model
        without recurrent cells (the 3D-CNN baseline) is compiled whole. Otherwise only the
        cells' pointwise work is compiled where a compiler exists (their default).

    Returns
    -------
    torch.nn.Module
        ``model``.
    """
    if threads:
        torch.set_num_threads(threads)
    if compile:
        if any(isinstance(m, tt_conv.recurrent.RECURRENT_CELLS) for m in model.modules()):
            tt_conv.compile_cells(model)
        else:
            model.compile()
    return model
