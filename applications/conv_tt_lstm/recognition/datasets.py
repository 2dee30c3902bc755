"""Labelled clips for early recognition, by name: items are ``(frames [T, C, H, W], label)``.

* ``synthetic``: the walls-touched task (:mod:`.synthetic`): ``train`` an on-the-fly
  stream (fresh clips each epoch, each DDP rank and DataLoader worker its own part),
  ``val`` / ``test`` fixed seeded sets; train and val use the training digits, test the
  disjoint test digits.
* ``kth``: windows of ``n_frames`` consecutive frames of a ``prepare kth`` folder
  (:class:`~..data.kth.KTHDataset`: persons 1-16 train, 17-25 test), labelled with the
  video's action (6 classes, :data:`~..data.kth.KTH_ACTIONS` order).
* ``ssv2``: :class:`~..data.ssv2.SomethingSomethingV2` clips (its classes; 174 for the full
  dataset), ``n_frames`` frames sampled evenly, corrupt videos replaced and logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..data.kth import KTH_ACTIONS, KTHDataset
from .config import RecognitionDataConfig
from .synthetic import N_CLASSES, WallTouchFixed, WallTouchStream, shrink_digits

#: Evaluation splits each dataset has.
SPLITS = {"synthetic": ("val", "test"), "kth": ("test", "val"), "ssv2": ("validation", "train")}


@dataclass(frozen=True)
class ClipSource:
    """A dataset split and what the model must know about it."""

    dataset: Dataset
    n_classes: int
    frame_shape: Tuple[int, int, int]
    class_names: Tuple[str, ...]


class KTHActions(Dataset):
    """KTH windows labelled with their action: ``(frames [T, 1, H, W], action index)``.

    Parameters
    ----------
    root : str or os.PathLike
        A ``prepare kth`` folder.
    split : {"train", "val", "test"}
        See :class:`~..data.kth.KTHDataset`.
    n_frames : int
        Window length.
    stride : int, optional
        One window stride for every action (default: the dataset's per-action strides).
    """

    def __init__(self, root, split: str, n_frames: int, stride: Optional[int] = None):
        # A window of n_frames is a (n_frames - 1) -> 1 protocol of the prediction dataset.
        self.windows = KTHDataset(root, split, protocol=(n_frames - 1, 1), strides=stride)
        self.labels = np.array([KTH_ACTIONS.index(self.windows.window(i).video.action)
                                for i in range(len(self.windows))], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.windows[index], int(self.labels[index])


def _digits(data: RecognitionDataConfig):
    from ..data.mnist_digits import DigitSet, load_digits

    digits = load_digits(data.mnist_dir)
    if data.digit_scale == 1:
        return digits
    return DigitSet(shrink_digits(digits.train, data.digit_scale),
                    shrink_digits(digits.test, data.digit_scale),
                    f"{digits.source}, shrunk {data.digit_scale}x")


def _even_subset(dataset: Dataset, limit: int) -> Dataset:
    if limit <= 0 or len(dataset) <= limit:
        return dataset
    return Subset(dataset, np.linspace(0, len(dataset) - 1, limit).round().astype(int).tolist())


def build_clip_source(data: RecognitionDataConfig, split: str, *, epoch: int = 0,
                      rank: int = 0, world_size: int = 1,
                      failure_log: Optional[Path] = None) -> ClipSource:
    """The ``split`` of ``data.dataset`` (``"train"`` or an evaluation split).

    Raises
    ------
    ValueError
        An unknown split, or frames that do not match ``data.frame_size``.
    FileNotFoundError, DatasetFileError
        Missing or malformed data, naming the file.
    """
    known = ("train",) + SPLITS[data.dataset]
    if split not in known:
        raise ValueError(f"split of {data.dataset} must be one of {known}, got {split!r}")
    if data.dataset == "synthetic":
        digits = _digits(data)
        common = dict(seed=data.seed, n_frames=data.n_frames, n_turns=data.n_turns,
                      canvas_size=data.frame_size)
        if split == "train":
            dataset = WallTouchStream(digits.train, data.clips_per_epoch, epoch=epoch,
                                      rank=rank, world_size=world_size, **common)
        else:
            dataset = WallTouchFixed(digits, max(1, data.val_clips), split, **common)
        from .synthetic import class_name

        names = tuple(class_name(c) for c in range(N_CLASSES))
        return ClipSource(dataset, N_CLASSES, (1, data.frame_size, data.frame_size), names)
    if data.dataset == "kth":
        dataset = KTHActions(data.root, split, data.n_frames, data.kth_stride or None)
        shape = dataset.windows.frame_shape
        if data.frame_size and shape[1:] != (data.frame_size, data.frame_size):
            raise ValueError(f"{data.root} holds {shape[1]}x{shape[2]} frames, but "
                             f"data.frame_size is {data.frame_size} (0 accepts any)")
        if split != "train":
            dataset = _even_subset(dataset, data.val_clips)
        return ClipSource(dataset, len(KTH_ACTIONS), shape, KTH_ACTIONS)
    from ..data.ssv2 import SomethingSomethingV2

    dataset = SomethingSomethingV2(data.root, split, n_frames=data.n_frames,
                                   size=data.frame_size, color=data.color,
                                   failure_log=failure_log)
    source = ClipSource(dataset, dataset.n_classes, dataset.frame_shape, dataset.classes)
    if split != "train":
        source = ClipSource(_even_subset(dataset, data.val_clips), *tuple(
            getattr(source, f) for f in ("n_classes", "frame_shape", "class_names")))
    return source
