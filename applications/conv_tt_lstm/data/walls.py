"""Walls touched: a synthetic early-recognition task built from the Moving MNIST generator.

The rule
--------
One MNIST digit moves on a Moving MNIST canvas under the generator's rules
(:mod:`~applications.conv_tt_lstm.data.moving_mnist`: unit speed, 0.1 of the free range per
frame, clamp and flip a velocity component at an edge, top-left pixel
``int(p * (canvas - digit))``), except that at ``n_turns`` random frames its direction is
drawn again, uniformly. The label says **which walls of the canvas the digit's box touches
during the clip**: a 4-bit mask, ``1`` top (row offset 0), ``2`` bottom (row offset
``canvas - digit``), ``4`` left (column offset 0), ``8`` right, so 16 classes (0: no wall).

Why this rule: contact with a wall is visible in a single frame, so the full clip decides
the label; but the turns make the future genuinely random, so a prefix does not. Naming the
walls touched so far is right, for 16-frame clips with one turn (4,000 clips, 64 x 64 or
32 x 32 canvas), 8 % of the time after the first quarter, 32 % after half, 65 % after three
quarters and 100 % at the end; the most frequent class is 13-15 % of the clips. A model can
beat the prefix rule by guessing where the digit is heading, never reach 100 % early. A
recurrent model only has to remember four "touched" bits, which a small ConvLSTM learns in
minutes on a CPU.

Random numbers: clip ``i`` of a stream has its own generator
(:func:`~applications.conv_tt_lstm.data.moving_mnist.sequence_rng` of the base seed, the
stream key and ``i``), which draws, in this order: the digit index (``integers(0, N)``),
the start position (``random(2)``, row and column), the turn frames (``choice`` of
``n_turns`` distinct frames in ``1 .. T - 2`` without replacement, sorted), then one
direction per segment (``random() * 2 pi``, velocity ``(sin, cos)``). A turn at frame ``s``
means frames ``s -> s + 1`` move along the new direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .mnist_digits import DigitSet
from .moving_mnist import (
    bounce_trajectory,
    check_digits,
    pixel_offsets,
    render,
    sequence_rng,
)
from .sequence_files import frames_to_tensor

#: Bits of the label, in order.
WALLS: Tuple[str, ...] = ("top", "bottom", "left", "right")
#: Number of classes of the task (every subset of the four walls).
N_CLASSES = 2 ** len(WALLS)
#: Spawn-key stream ids (distinct from Moving MNIST's 0-3).
STREAMS = {"train": 10, "val": 11, "test": 12, "online": 13}

SizeArg = Union[int, Tuple[int, int]]


def class_name(label: int) -> str:
    """``"top+left"`` for 5, ``"none"`` for 0."""
    if not 0 <= int(label) < N_CLASSES:
        raise ValueError(f"label must be in [0, {N_CLASSES}), got {label!r}")
    names = [wall for bit, wall in enumerate(WALLS) if int(label) >> bit & 1]
    return "+".join(names) if names else "none"


def walls_touched(offsets: np.ndarray, free: Tuple[int, int]) -> int:
    """The label of a clip from its top-left pixels.

    Parameters
    ----------
    offsets : numpy.ndarray
        int ``(T, 2)`` top-left (row, column) of the digit's box per frame.
    free : (int, int)
        ``canvas - digit`` per axis: the largest offsets.

    Returns
    -------
    int
        The 4-bit wall mask (see the module docstring).
    """
    offsets = np.asarray(offsets)
    bits = (
        np.any(offsets[:, 0] <= 0),
        np.any(offsets[:, 0] >= free[0]),
        np.any(offsets[:, 1] <= 0),
        np.any(offsets[:, 1] >= free[1]),
    )
    return int(sum(int(b) << i for i, b in enumerate(bits)))


@dataclass(frozen=True)
class WallClip:
    """One clip of the task: frames, label and how it was made (for checks and figures)."""

    frames: np.ndarray  # uint8 (T, H, W)
    label: int
    trajectory: np.ndarray  # float64 (T, 2), positions in [0, 1]
    offsets: np.ndarray  # int64 (T, 2)
    turns: Tuple[int, ...]
    digit: int


def turning_trajectory(rng: np.random.Generator, n_frames: int,
                       n_turns: int) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """Positions ``(T, 2)`` of a point bouncing in the unit square with random turns.

    Draws the start, the turn frames and one direction per segment from ``rng`` (in the
    order of the module docstring); each segment is
    :func:`~applications.conv_tt_lstm.data.moving_mnist.bounce_trajectory` from where the
    previous one ended.
    """
    if n_turns > max(0, n_frames - 2):
        raise ValueError(
            f"n_turns must be at most n_frames - 2 = {n_frames - 2}, got {n_turns}")
    start = rng.random(2)
    turns = tuple(int(t) for t in np.sort(rng.choice(np.arange(1, n_frames - 1), n_turns,
                                                     replace=False))) if n_turns else ()
    bounds = (0,) + turns + (n_frames - 1,)
    pieces = []
    position = start[None, :]
    for first, last in zip(bounds[:-1], bounds[1:]):
        angle = rng.random() * (2.0 * math.pi)
        velocity = np.array([[math.sin(angle), math.cos(angle)]])
        segment = bounce_trajectory(position, velocity, last - first + 1)[:, 0]
        # Frame `last` starts the next segment (or ends the clip).
        pieces.append(segment[:-1])
        position = segment[-1:]
    pieces.append(position)
    return np.concatenate(pieces), turns


def generate_wall_clip(digits: np.ndarray, rng: np.random.Generator, n_frames: int = 16,
                       n_turns: int = 1, canvas_size: SizeArg = 64) -> WallClip:
    """One clip of the task (see the module docstring for the rule and the draws)."""
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 2:
        raise ValueError(f"n_frames must be an integer >= 2, got {n_frames!r}")
    if isinstance(n_turns, bool) or not isinstance(n_turns, int) or n_turns < 0:
        raise ValueError(f"n_turns must be an integer >= 0, got {n_turns!r}")
    canvas = (canvas_size, canvas_size) if isinstance(canvas_size, int) else tuple(canvas_size)
    digit = int(rng.integers(0, len(digits)))
    trajectory, turns = turning_trajectory(rng, n_frames, n_turns)
    offsets = pixel_offsets(trajectory[:, None, :], canvas, digits.shape[1:])
    frames = render(digits[digit][None], offsets, canvas)
    free = (canvas[0] - digits.shape[1], canvas[1] - digits.shape[2])
    offsets = offsets[:, 0]
    return WallClip(frames, walls_touched(offsets, free), trajectory, offsets, turns, digit)


def shrink_digits(digits: np.ndarray, factor: int) -> np.ndarray:
    """Digits downscaled by an integer ``factor`` (mean of ``factor x factor`` blocks, uint8).

    Lets the task run on a smaller canvas (28 x 28 digits become 14 x 14 with ``factor=2``,
    for a 32 x 32 canvas) at a quarter of the compute; ``factor=1`` returns them unchanged.
    """
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1, got {factor!r}")
    if factor == 1:
        return digits
    n, h, w = digits.shape
    if h % factor or w % factor:
        raise ValueError(f"digit size {(h, w)} is not divisible by factor {factor}")
    blocks = digits.reshape(n, h // factor, factor, w // factor, factor).astype(np.float32)
    return np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)


class WallTouchFixed(Dataset):
    """A fixed split of the task: item ``i`` is a function of (seed, split, i).

    Parameters
    ----------
    digits : numpy.ndarray or DigitSet
        uint8 ``(N, h, w)`` digits, or a :class:`DigitSet` whose ``split`` digits are used
        (training digits for ``"train"`` and ``"val"``, the disjoint test digits for
        ``"test"``).
    n_clips : int
        Length of the dataset.
    split : {"train", "val", "test"}
        Names the random stream (and, with a DigitSet, the digits).
    seed, n_frames, n_turns, canvas_size
        See :func:`generate_wall_clip`.

    Items are ``(frames [T, 1, H, W] float32 in [0, 1], label)``.
    """

    def __init__(self, digits, n_clips: int, split: str = "val", *, seed: int = 0,
                 n_frames: int = 16, n_turns: int = 1, canvas_size: SizeArg = 64) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if isinstance(n_clips, bool) or not isinstance(n_clips, int) or n_clips < 1:
            raise ValueError(f"n_clips must be an integer >= 1, got {n_clips!r}")
        pool = digits.split(split) if isinstance(digits, DigitSet) else digits
        self.digits = check_digits(pool, canvas_size, must_move=True)
        self.n_clips, self.split, self.seed = n_clips, split, int(seed)
        self.n_frames, self.n_turns, self.canvas_size = n_frames, n_turns, canvas_size
        self.n_classes = N_CLASSES

    def __len__(self) -> int:
        return self.n_clips

    def clip(self, index: int) -> WallClip:
        if not 0 <= index < self.n_clips:
            raise IndexError(f"index {index} out of range for {self.n_clips} clips")
        rng = sequence_rng(self.seed, (STREAMS[self.split],), index)
        return generate_wall_clip(self.digits, rng, self.n_frames, self.n_turns,
                                  self.canvas_size)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        clip = self.clip(index)
        return frames_to_tensor(clip.frames), clip.label


class WallTouchStream(IterableDataset):
    """On-the-fly training clips, a fresh reproducible set per epoch, split over ranks/workers.

    Clip ``i`` of epoch ``e`` depends on (seed, e, i) only. Rank ``r`` of ``world_size``
    takes the contiguous block of ``ceil(clips_per_epoch / world_size)`` indices starting at
    ``r`` times that, and DataLoader worker ``w`` of ``W`` every ``W``-th index of it: the
    streams of ranks and workers are disjoint and the epoch's clips do not depend on how the
    work is split. The epoch is a constructor argument (build one per epoch,
    :meth:`for_epoch`), not mutable state.

    Parameters
    ----------
    digits : numpy.ndarray
        uint8 ``(N, h, w)`` training digits (``DigitSet.train``).
    clips_per_epoch : int
        Clips per epoch over all ranks.
    epoch, seed : int
        Part of every clip's seed.
    n_frames, n_turns, canvas_size
        See :func:`generate_wall_clip`.
    rank, world_size : int, optional
        This process's DDP rank and the number of ranks (default: from
        ``torch.distributed`` when initialised, else 0 and 1).
    """

    def __init__(self, digits: np.ndarray, clips_per_epoch: int, *, epoch: int = 0,
                 seed: int = 0, n_frames: int = 16, n_turns: int = 1,
                 canvas_size: SizeArg = 64, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        if isinstance(digits, DigitSet):
            raise TypeError("pass the training digits (DigitSet.train), not the whole DigitSet")
        self.digits = check_digits(digits, canvas_size, must_move=True)
        if isinstance(clips_per_epoch, bool) or not isinstance(clips_per_epoch, int) \
                or clips_per_epoch < 1:
            raise ValueError(f"clips_per_epoch must be an integer >= 1, got {clips_per_epoch!r}")
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.clips_per_epoch, self.epoch, self.seed = clips_per_epoch, int(epoch), int(seed)
        self.n_frames, self.n_turns, self.canvas_size = n_frames, n_turns, canvas_size
        self.rank, self.world_size = int(rank), int(world_size)
        self.clips_per_rank = math.ceil(clips_per_epoch / self.world_size)
        self.n_classes = N_CLASSES

    def for_epoch(self, epoch: int) -> "WallTouchStream":
        """The same stream at another epoch."""
        return WallTouchStream(
            self.digits, self.clips_per_epoch, epoch=epoch, seed=self.seed,
            n_frames=self.n_frames, n_turns=self.n_turns, canvas_size=self.canvas_size,
            rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        return self.clips_per_rank

    def indices(self, worker_id: int = 0, num_workers: int = 1) -> range:
        """Global clip indices that worker ``worker_id`` of this rank yields."""
        first = self.rank * self.clips_per_rank
        return range(first + worker_id, first + self.clips_per_rank, num_workers)

    def clip(self, index: int) -> WallClip:
        rng = sequence_rng(self.seed, (STREAMS["online"], self.epoch), index)
        return generate_wall_clip(self.digits, rng, self.n_frames, self.n_turns,
                                  self.canvas_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in self.indices(worker_id, num_workers):
            clip = self.clip(index)
            yield frames_to_tensor(clip.frames), clip.label
