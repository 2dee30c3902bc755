"""Multi-process training through ``torchrun`` and DistributedDataParallel.

``torchrun --nproc-per-node N -m applications.conv_tt_lstm train ...`` starts N processes
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`init_distributed` reads them, joins the process group (NCCL on CUDA, gloo on CPU) and
picks the device. A plain ``python -m ...`` run is a world of one and needs no process group.

The one place that turns a ``--device`` argument into a device (:func:`choose_device`) and
wraps a model for several processes (:func:`wrap_model`); training, evaluation and prediction all go through them.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import tt_conv

from ..files import load_tensors


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    #: Processes of this world on this machine (torchrun's ``LOCAL_WORLD_SIZE``).
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, writes checkpoints and figures."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


#: What ``--device`` takes, for messages.
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def choose_device(device: Any, local_rank: int = 0) -> torch.device:
    """The one ``--device`` check of every command (train, recognize, evaluate, predict).

    ``"auto"``: this process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU;
    ``"cpu"``; ``"cuda"`` (this process's GPU) or ``"cuda:N"``.

    Raises
    ------
    ValueError
        A name torch does not know (``gpu``), a device type the commands do not run on
        (``mps``, ``meta``, ...), or a GPU that is not there; the message says what to pass.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise ValueError(f"--device must be {DEVICE_CHOICES}, got {device!r}")
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device}: not a device name; expected {DEVICE_CHOICES}"
                         ) from None
    if chosen.type == "cpu":
        return chosen
    if chosen.type != "cuda":
        raise ValueError(f"--device {device}: the commands run on the CPU or CUDA GPUs only; "
                         f"expected {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (no GPU or a "
                         f"CPU-only torch); use --device cpu or auto")
    if chosen.index is None:
        chosen = torch.device(f"cuda:{local_rank}")
    if chosen.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return chosen


def init_distributed(device: str = "auto", backend: Optional[str] = None) -> DistContext:
    """Join the process group described by torchrun's environment (if any).

    Parameters
    ----------
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    backend : str, optional
        Override of the process-group backend (default: ``nccl`` on CUDA, ``gloo`` on CPU).

    Returns
    -------
    DistContext
        A world of one when ``WORLD_SIZE`` is unset or 1.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    chosen = choose_device(device, local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if chosen.type == "cuda" else "gloo")
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistContext(rank, world_size, local_rank, chosen, local_world_size)


def cleanup() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    if context.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, context: DistContext) -> torch.Tensor:
    """The mean of ``value`` over ranks (a copy; ``value`` itself is untouched)."""
    value = value.detach().clone()
    if context.distributed:
        dist.all_reduce(value)
        value /= context.world_size
    return value


def broadcast_object(value: Any, context: DistContext) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not context.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_state(value: Any, context: DistContext) -> List[Any]:
    """Every rank's ``value`` (plain values and tensors), in rank order.

    ``all_gather_object`` cannot carry tensors between CPU processes, so each value travels
    as the bytes of ``torch.save`` and is read back by the guarded loader.
    """
    if not context.distributed:
        return [value]
    buffer = io.BytesIO()
    torch.save(value, buffer)
    out = [None] * context.world_size
    dist.all_gather_object(out, buffer.getvalue())
    return [load_tensors(io.BytesIO(data), what="state of another rank") for data in out]


def wrap_model(model: torch.nn.Module, context: DistContext, *,
               compile: bool = False) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when the world is larger than one.

    With ``compile``, every recurrent cell of ``model`` is first compiled in place
    (:func:`tt_conv.compile_cells`; a model without recurrent cells is compiled whole, also
    in place). Compiling the bare module before wrapping keeps its parameter names, so
    checkpoints are unchanged, and DistributedDataParallel's gradient hooks fire on the
    same parameters as in eager mode; the loops over time stay in Python, so the compiled
    graphs are one cell step each.
    """
    if compile:
        if any(isinstance(m, tt_conv.recurrent.RECURRENT_CELLS) for m in model.modules()):
            tt_conv.compile_cells(model)
        else:
            model.compile()
    if not context.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (or ``model`` itself).

    Evaluation runs the bare module: DistributedDataParallel's forward would broadcast
    buffers and arm gradient hooks, and the ranks may run different numbers of batches.
    """
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
        else model


class ResumableDistributedSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler` that can start part-way into an epoch.

    The epoch's order is the parent's (a permutation seeded by ``seed + epoch``, padded and
    split between ranks); ``start`` skips the first ``start`` indices of this rank's share,
    so a resumed run sees exactly the batches the interrupted one would have seen.
    """

    def __init__(self, dataset, context: DistContext, *, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, start: int = 0):
        super().__init__(dataset, num_replicas=context.world_size, rank=context.rank,
                         shuffle=shuffle, seed=seed, drop_last=False)
        self.set_epoch(epoch)
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
