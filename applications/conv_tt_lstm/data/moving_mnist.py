"""Moving MNIST (Srivastava et al., 2015): the generator, on-the-fly and fixed datasets.

The generator, as in REFERENCE.md section 5, for any canvas, digit count and length:

- each digit starts at a uniform position in ``[0, 1]^2`` and moves at unit speed in a
  uniform random direction;
- from one frame to the next it moves ``step = 0.1`` along its velocity; a coordinate that
  reaches an edge (``<= 0`` or ``>= 1``) is clamped to it and that velocity component flips;
- the position ``p`` becomes the digit's top-left pixel ``int(p * (canvas - digit))`` (36 for
  28 x 28 digits on 64 x 64), per axis, truncated;
- overlapping digits combine by pixel-wise maximum.

Random numbers: every sequence has its own generator seeded from a
:class:`numpy.random.SeedSequence` of the base seed with a spawn key naming the stream
(which split, or the training epoch) and the sequence's index, so sequence ``i`` is the same
however the work is split between processes. From that generator a sequence draws, in this
order: the digit indices (``integers(0, n_digits_available, n_digits)``), the start
positions (``random((n_digits, 2))``, as (row, column)) and the directions
(``random(n_digits) * 2 pi``, velocity ``(sin, cos)`` as (row, column)).

Frames come out as uint8 ``(T, H, W)`` from the generator and as float tensors
``[T, 1, H, W]`` in ``[0, 1]`` from the datasets.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..checks import check_int
from ..files import write_json_atomic
from .mnist_digits import DigitSet
from .sequence_files import NpzSequenceWriter, frames_to_tensor

#: Distance a digit moves per frame, in units of the free range ``canvas - digit``.
STEP = 0.1

#: Spawn-key stream ids: fixed splits, and the on-the-fly training stream (one per epoch).
STREAMS = {"train": 0, "val": 1, "test": 2, "online": 3}

#: File names of the prepared splits, as in the paper's release.
SPLIT_FILES = {split: f"moving-mnist-{split}.npz" for split in ("train", "val", "test")}

SizeArg = Union[int, Tuple[int, int]]


def _canvas_shape(canvas_size: SizeArg) -> Tuple[int, int]:
    if isinstance(canvas_size, (int, np.integer)):
        shape = (int(canvas_size), int(canvas_size))
    else:
        shape = tuple(int(s) for s in canvas_size)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"canvas_size must be a positive int or (height, width), got {canvas_size!r}")
    return shape  # type: ignore[return-value]


def check_digits(digits: np.ndarray, canvas_size: SizeArg, *, must_move: bool = False,
                 option: Optional[str] = None) -> np.ndarray:
    """``digits`` if they are a non-empty uint8 ``(N, h, w)`` array that fits the canvas.

    Parameters
    ----------
    digits : numpy.ndarray
        The digit images.
    canvas_size : int or (int, int)
        The canvas.
    must_move : bool
        The digits must be strictly smaller than the canvas (a digit as large as the canvas
        has nowhere to go: every frame would touch every wall).
    option : str, optional
        The user's option that set the canvas (``"--canvas"``, ``"image_size"``), named in
        the message.

    Raises
    ------
    ValueError
        Naming the digits' and the canvas' sizes.
    """
    if not isinstance(digits, np.ndarray) or digits.dtype != np.uint8 or digits.ndim != 3 \
            or len(digits) == 0:
        raise ValueError(
            f"digits must be a non-empty uint8 array (N, h, w), got "
            f"{getattr(digits, 'dtype', type(digits).__name__)} {getattr(digits, 'shape', '')}"
        )
    canvas = _canvas_shape(canvas_size)
    height, width = digits.shape[1:]
    if must_move:
        too_large = height >= canvas[0] or width >= canvas[1]
    else:
        too_large = height > canvas[0] or width > canvas[1]
    if too_large:
        if option is not None:
            shown = canvas[0] if canvas[0] == canvas[1] else f"{canvas[0]} x {canvas[1]}"
            raise ValueError(f"{option} {shown} is smaller than the {height} x {width} digits")
        if must_move:
            raise ValueError(
                f"digits of {digits.shape[1:]} need a larger canvas than {canvas} to move")
        raise ValueError(f"digits of {digits.shape[1:]} do not fit a canvas of {canvas}")
    return digits


def bounce_trajectory(
    start: np.ndarray, velocity: np.ndarray, n_frames: int, step: float = STEP
) -> np.ndarray:
    """Positions in ``[0, 1]`` of points bouncing inside the unit square.

    Parameters
    ----------
    start : numpy.ndarray
        ``(K, 2)`` positions at frame 0, in ``[0, 1]``.
    velocity : numpy.ndarray
        ``(K, 2)`` velocities (unit length for Moving MNIST).
    n_frames : int
        Number of frames ``T``.
    step : float
        Distance along the velocity per frame.

    Returns
    -------
    numpy.ndarray
        float64 ``(T, K, 2)``; frame 0 is ``start``. After each move a coordinate that
        reached 0 or 1 (or went past) is clamped there and its velocity component flips.
    """
    n_frames = check_int("n_frames", n_frames)
    position = np.array(start, dtype=np.float64)
    speed = np.array(velocity, dtype=np.float64)
    if position.ndim != 2 or position.shape[1] != 2 or speed.shape != position.shape:
        raise ValueError(
            f"start and velocity must both be (K, 2), got {position.shape} and {speed.shape}"
        )
    if np.any(position < 0) or np.any(position > 1):
        raise ValueError("start positions must lie in [0, 1]")
    out = np.empty((n_frames,) + position.shape)
    for t in range(n_frames):
        out[t] = position
        position = position + step * speed
        low, high = position <= 0.0, position >= 1.0
        position = np.clip(position, 0.0, 1.0)
        speed = np.where(low | high, -speed, speed)
    return out


def pixel_offsets(trajectory: np.ndarray, canvas_size: SizeArg, digit_shape: Tuple[int, int]) -> np.ndarray:
    """Top-left pixels ``int(p * (canvas - digit))`` of a ``(T, K, 2)`` trajectory (int64)."""
    canvas = _canvas_shape(canvas_size)
    free = np.array([canvas[0] - digit_shape[0], canvas[1] - digit_shape[1]], dtype=np.float64)
    if np.any(free < 0):
        raise ValueError(f"digits of {tuple(digit_shape)} do not fit a canvas of {canvas}")
    # Positions are non-negative, so truncation towards zero is the floor.
    return (np.asarray(trajectory) * free).astype(np.int64)


def render(
    digits: np.ndarray, offsets: np.ndarray, canvas_size: SizeArg
) -> np.ndarray:
    """Paste digits at given offsets on black canvases, overlaps by pixel-wise maximum.

    Parameters
    ----------
    digits : numpy.ndarray
        uint8 ``(K, h, w)``: the digit of each trajectory.
    offsets : numpy.ndarray
        int ``(T, K, 2)`` top-left pixels (row, column).
    canvas_size : int or (int, int)
        Canvas height and width.

    Returns
    -------
    numpy.ndarray
        uint8 ``(T, H, W)``.
    """
    height, width = _canvas_shape(canvas_size)
    _, h, w = digits.shape
    frames = np.zeros((offsets.shape[0], height, width), dtype=np.uint8)
    for t in range(offsets.shape[0]):
        for k in range(offsets.shape[1]):
            row, col = int(offsets[t, k, 0]), int(offsets[t, k, 1])
            window = frames[t, row : row + h, col : col + w]
            np.maximum(window, digits[k], out=window)
    return frames


def generate_sequence(
    digits: np.ndarray,
    rng: np.random.Generator,
    n_frames: int = 20,
    n_digits: int = 2,
    canvas_size: SizeArg = 64,
) -> np.ndarray:
    """One Moving MNIST sequence, uint8 ``(n_frames, H, W)``.

    Parameters
    ----------
    digits : numpy.ndarray
        uint8 ``(N, h, w)`` images to draw the digits from (with replacement).
    rng : numpy.random.Generator
        Source of randomness; the draws are listed in the module docstring.
    n_frames, n_digits : int
        Sequence length and digits per sequence.
    canvas_size : int or (int, int)
        Canvas height and width (each at least the digit size).
    """
    n_frames = check_int("n_frames", n_frames)
    n_digits = check_int("n_digits", n_digits)
    check_digits(digits, canvas_size)
    chosen = rng.integers(0, len(digits), size=n_digits)
    start = rng.random((n_digits, 2))
    angle = rng.random(n_digits) * (2.0 * math.pi)
    velocity = np.stack([np.sin(angle), np.cos(angle)], axis=1)
    trajectory = bounce_trajectory(start, velocity, n_frames)
    offsets = pixel_offsets(trajectory, canvas_size, digits.shape[1:])
    return render(digits[chosen], offsets, canvas_size)


def sequence_rng(seed: int, stream: Sequence[int], index: int) -> np.random.Generator:
    """The generator of sequence ``index`` in ``stream`` (a tuple of ints) under ``seed``."""
    key = tuple(int(k) for k in stream) + (int(index),)
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=key))


class MovingMnistFixed(Dataset):
    """A fixed, map-style Moving MNIST split: sequence ``i`` is a function of (seed, split, i).

    Used for validation and test sets generated in memory and to write the prepared files.

    Parameters
    ----------
    digits : numpy.ndarray or DigitSet
        uint8 ``(N, h, w)`` digits, or a :class:`DigitSet` whose ``split`` digits are used
        (training digits for ``"train"`` and ``"val"``, test digits for ``"test"``).
    n_sequences : int
        Length of the dataset.
    split : {"train", "val", "test"}
        Names the random stream (and, with a DigitSet, the digits).
    seed : int
        Base seed.
    n_frames, n_digits, canvas_size
        As in :func:`generate_sequence`.
    """

    def __init__(
        self,
        digits: Union[np.ndarray, DigitSet],
        n_sequences: int,
        split: str = "val",
        *,
        seed: int = 0,
        n_frames: int = 20,
        n_digits: int = 2,
        canvas_size: SizeArg = 64,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        self.n_sequences = check_int("n_sequences", n_sequences)
        self.split = split
        self.seed = int(seed)
        self.n_frames = check_int("n_frames", n_frames)
        self.n_digits = check_int("n_digits", n_digits)
        self.canvas_size = _canvas_shape(canvas_size)
        pool = digits.split(split) if isinstance(digits, DigitSet) else digits
        self.digits = check_digits(pool, self.canvas_size)

    def __len__(self) -> int:
        return self.n_sequences

    def sequence(self, index: int) -> np.ndarray:
        """Sequence ``index`` as uint8 ``(T, H, W)``."""
        if not 0 <= index < self.n_sequences:
            raise IndexError(f"index {index} out of range for {self.n_sequences} sequences")
        rng = sequence_rng(self.seed, (STREAMS[self.split],), index)
        return generate_sequence(self.digits, rng, self.n_frames, self.n_digits, self.canvas_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        return frames_to_tensor(self.sequence(index))


class MovingMnistStream(IterableDataset):
    """On-the-fly training sequences: a fresh, reproducible set every epoch.

    Sequence ``i`` of epoch ``e`` is a function of (seed, e, i) only. Each DDP rank takes a
    contiguous block of ``ceil(samples_per_epoch / world_size)`` indices (every rank yields
    the same number, as DDP needs) and, inside it, each DataLoader worker every
    ``num_workers``-th index. Streams of different ranks, workers and epochs are therefore
    independent (disjoint spawn keys of one SeedSequence), reproducible, and the epoch's
    data do not depend on how many workers or ranks share it.

    The epoch is a constructor argument, not mutable state: build the dataset (and its
    DataLoader) per epoch, e.g. ``stream.for_epoch(e)``.

    Parameters
    ----------
    digits : numpy.ndarray
        uint8 ``(N, h, w)`` training digits (``DigitSet.train``).
    samples_per_epoch : int
        Sequences per epoch over all ranks (rounded up to a multiple of ``world_size``).
    epoch : int
        Epoch number, part of every sequence's seed.
    seed : int
        Base seed.
    n_frames, n_digits, canvas_size
        As in :func:`generate_sequence`.
    rank, world_size : int, optional
        This process's DDP rank and the number of ranks; by default read from
        ``torch.distributed`` when it is initialised, else 0 and 1.
    """

    def __init__(
        self,
        digits: np.ndarray,
        samples_per_epoch: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        n_frames: int = 20,
        n_digits: int = 2,
        canvas_size: SizeArg = 64,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        if isinstance(digits, DigitSet):
            raise TypeError("pass the training digits (DigitSet.train), not the whole DigitSet")
        self.samples_per_epoch = check_int("samples_per_epoch", samples_per_epoch)
        self.epoch = check_int("epoch", epoch, 0)
        self.seed = int(seed)
        self.n_frames = check_int("n_frames", n_frames)
        self.n_digits = check_int("n_digits", n_digits)
        self.canvas_size = _canvas_shape(canvas_size)
        self.digits = check_digits(digits, self.canvas_size)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        self.world_size = check_int("world_size", world_size)
        if not 0 <= int(rank) < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        self.rank = int(rank)
        self.samples_per_rank = math.ceil(self.samples_per_epoch / self.world_size)

    def for_epoch(self, epoch: int) -> "MovingMnistStream":
        """The same stream for another epoch."""
        return MovingMnistStream(
            self.digits,
            self.samples_per_epoch,
            epoch=epoch,
            seed=self.seed,
            n_frames=self.n_frames,
            n_digits=self.n_digits,
            canvas_size=self.canvas_size,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __len__(self) -> int:
        return self.samples_per_rank

    def indices(self, worker_id: int = 0, num_workers: int = 1) -> range:
        """Global sequence indices that worker ``worker_id`` of this rank yields."""
        first = self.rank * self.samples_per_rank
        return range(first + worker_id, first + self.samples_per_rank, num_workers)

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        stream = (STREAMS["online"], self.epoch)
        for index in self.indices(worker_id, num_workers):
            rng = sequence_rng(self.seed, stream, index)
            yield frames_to_tensor(
                generate_sequence(self.digits, rng, self.n_frames, self.n_digits, self.canvas_size)
            )


def prepare_moving_mnist(
    out_dir: Union[str, Path],
    digits: DigitSet,
    *,
    sizes: Optional[Dict[str, int]] = None,
    n_frames: int = 40,
    n_digits: int = 2,
    canvas_size: SizeArg = 64,
    seed: int = 0,
    compress: bool = False,
    chunk: int = 256,
    progress: bool = True,
) -> Dict[str, object]:
    """Write fixed train / val / test splits in the release's npz layout, and a manifest.

    Files ``moving-mnist-{split}.npz`` (key ``"data"``, uint8 ``(N, T, H, W, 1)``) and
    ``moving-mnist.json`` (what was generated, how, from which digits) in ``out_dir``, each
    written atomically. Train and val draw from the training digits with different random
    streams; test draws from the test digits. Sequence ``i`` of a split equals
    ``MovingMnistFixed(digits, n, split, seed=seed, ...).sequence(i)``.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Output folder (created).
    digits : DigitSet
        Digit source.
    sizes : dict, optional
        Sequences per split; default ``{"train": 10000, "val": 3000, "test": 5000}``. A
        split of size 0 is skipped.
    n_frames, n_digits, canvas_size, seed
        As in :class:`MovingMnistFixed`.
    compress : bool
        Deflate the npz (much smaller; but then readers load it into memory instead of
        memory-mapping it).
    chunk : int
        Sequences generated per write.
    progress : bool
        Show tqdm progress bars.

    Returns
    -------
    dict
        The manifest written to ``moving-mnist.json``.
    """
    from tqdm.auto import tqdm

    sizes = dict({"train": 10000, "val": 3000, "test": 5000} if sizes is None else sizes)
    unknown = set(sizes) - set(SPLIT_FILES)
    if unknown:
        raise ValueError(f"sizes may only name train, val and test, got {sorted(unknown)}")
    for split, size in sizes.items():
        check_int(f"sizes[{split!r}]", size, 0)
    height, width = _canvas_shape(canvas_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "val", "test"):
        size = sizes.get(split, 0)
        if size == 0:
            continue
        dataset = MovingMnistFixed(
            digits, size, split, seed=seed, n_frames=n_frames, n_digits=n_digits,
            canvas_size=(height, width),
        )
        path = out_dir / SPLIT_FILES[split]
        shape = (size, n_frames, height, width, 1)
        with NpzSequenceWriter(path, shape, compress=compress) as writer, tqdm(
            total=size, desc=f"moving-mnist {split}", unit="seq", disable=not progress
        ) as bar:
            for begin in range(0, size, chunk):
                end = min(size, begin + chunk)
                block = np.stack([dataset.sequence(i) for i in range(begin, end)])
                writer.write(block[..., None])
                bar.update(end - begin)
        files[split] = {"file": path.name, "sequences": size, "shape": list(shape)}
    manifest = {
        "dataset": "moving-mnist",
        "layout": "npz key 'data', uint8 (N, T, H, W, 1), values 0-255",
        "splits": files,
        "n_frames": n_frames,
        "n_digits": n_digits,
        "canvas_size": [height, width],
        "digit_size": list(digits.train.shape[1:]),
        "seed": seed,
        "digits": digits.source,
        "digits_per_split": {"train": len(digits.train), "val": len(digits.train), "test": len(digits.test)},
        "generator": (
            "uniform start in [0,1]^2, unit speed in a uniform direction, step 0.1 per frame, "
            "clamp to [0,1] and flip the velocity component at an edge, top-left pixel "
            "int(p * (canvas - digit)), overlaps by pixel-wise max"
        ),
        "streams": "SeedSequence(seed, spawn_key=(stream, index)); train 0, val 1, test 2",
    }
    write_json_atomic(out_dir / "moving-mnist.json", manifest)
    return manifest
