"""Training batches by global step, so that a resumed run gets the batches it would have had.

Epoch ``e`` is batches ``[e * n, (e + 1) * n)`` and batch ``s`` depends only on the seed,
``s`` and the world size: generated streams (an ``IterableDataset`` per epoch, each rank
its own part) are rebuilt per epoch and skipped into; map-style datasets (prepared files,
KTH, SSV2) are shuffled per epoch by
:class:`~.distributed.ResumableDistributedSampler`, which starts part-way into an epoch.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .distributed import DistContext, ResumableDistributedSampler


class StepBatches:
    """The training batches of a run, from any step on.

    Parameters
    ----------
    dataset_for_epoch : callable
        ``epoch -> Dataset``: this rank's training set of that epoch (a generated stream
        is built for its epoch and rank; a map-style dataset may be the same every epoch).
        Epoch 0's is built once, here, and kept as :attr:`first`.
    batch_size : int
        Items per batch on this rank.
    context : DistContext
        This process's rank, world size and device.
    num_workers : int
        DataLoader worker processes.
    seed : int
        Seed of the shuffling and of the loaders' own generators.
    unit : str
        What an item is, for the messages ("sequences", "clips").

    Raises
    ------
    ValueError
        The training set gives a rank fewer items than one batch.
    """

    def __init__(self, dataset_for_epoch: Callable[[int], Dataset], batch_size: int,
                 context: DistContext, *, num_workers: int = 0, seed: int = 0,
                 unit: str = "items"):
        self.dataset_for_epoch = dataset_for_epoch
        self.batch_size, self.context = batch_size, context
        self.num_workers, self.seed = num_workers, seed
        self.first = dataset_for_epoch(0)
        self.iterable = isinstance(self.first, IterableDataset)
        world = context.world_size
        share = len(self.first) if self.iterable else math.ceil(len(self.first) / world)
        self.batches_per_epoch = share // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the training set gives each of {world} rank(s) {share} {unit}, fewer than "
                f"one batch of {batch_size}; lower --batch-size")

    def _loader(self, epoch: int, offset: int) -> Iterator[Any]:
        dataset = self.first if epoch == 0 else self.dataset_for_epoch(epoch)
        # The loader's own generator keeps it from drawing on the global RNG.
        generator = torch.Generator().manual_seed(self.seed + epoch)
        common = dict(batch_size=self.batch_size, drop_last=True, num_workers=self.num_workers,
                      generator=generator, pin_memory=self.context.device.type == "cuda")
        if self.iterable:
            batches = iter(DataLoader(dataset, **common))
            return itertools.islice(batches, offset, None)  # generated: regenerate, skip
        sampler = ResumableDistributedSampler(dataset, self.context, shuffle=True,
                                              seed=self.seed, epoch=epoch,
                                              start=offset * self.batch_size)
        return iter(DataLoader(dataset, sampler=sampler, **common))

    def from_step(self, step: int) -> Iterator[Any]:
        """Batches ``step, step + 1, ...`` forever (epoch after epoch)."""
        epoch, offset = divmod(step, self.batches_per_epoch)
        while True:
            remaining = self.batches_per_epoch - offset
            yield from itertools.islice(self._loader(epoch, offset), remaining)
            epoch, offset = epoch + 1, 0
