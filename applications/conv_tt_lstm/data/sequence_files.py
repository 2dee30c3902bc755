"""Video-sequence files: the release's npz layout and the time-first ``mnist_test_seq.npy``.

Two layouts of uint8 frames:

- **npz** (the Conv-TT-LSTM release, ``moving-mnist-{train,val,test}.npz``): a zip holding
  one array under the key ``"data"``, shape ``(N, T, H, W, C)``.
- **time-first npy** (Srivastava et al.'s standard test set ``mnist_test_seq.npy``): one
  array ``(T, N, H, W)``, 20 x 10,000 x 64 x 64.

Readers validate the file and memory-map it where the format allows (any npy; an npz whose
member is stored uncompressed, which is what :class:`NpzSequenceWriter` writes by default),
so DataLoader workers share the page cache instead of each holding a copy. Writers are
atomic. :class:`SequenceFileDataset` serves either layout as float ``[T, C, H, W]`` in [0, 1].
"""

from __future__ import annotations

import os
import struct
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..files import atomic_path

PathLike = Union[str, "os.PathLike[str]"]

#: The array key of the release's npz files.
NPZ_KEY = "data"

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header (30 bytes)


class DatasetFileError(ValueError):
    """A dataset file exists but does not hold what its layout requires."""


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise DatasetFileError(f"{path}: expected a {what}, found a folder or special file")


def _check_frames(array: np.ndarray, path: Path, expected: str, n_dims: int) -> None:
    if array.dtype != np.uint8:
        raise DatasetFileError(f"{path}: expected uint8 frames {expected}, got dtype {array.dtype}")
    if array.ndim != n_dims:
        raise DatasetFileError(
            f"{path}: expected a {n_dims}-D array {expected}, got shape {tuple(array.shape)}"
        )
    if 0 in array.shape:
        raise DatasetFileError(f"{path}: holds an empty array of shape {tuple(array.shape)}")


def read_npy_header(handle) -> Tuple[Tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, data offset)`` of the ``.npy`` header at ``handle``.

    Raises ``ValueError`` (numpy's) for a file that is not an ``.npy``.
    """
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
    else:
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
    return shape, fortran_order, dtype, handle.tell()


def _memmap_stored_member(path: Path, member: str) -> Optional[np.ndarray]:
    """Memory-map an uncompressed ``.npy`` member of a zip, or ``None`` if it is deflated."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
        if fields[0] != b"PK\x03\x04":
            raise DatasetFileError(f"{path}: corrupt zip (no local header for {member})")
        name_length, extra_length = fields[-2], fields[-1]
        handle.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
        shape, fortran_order, dtype, offset = read_npy_header(handle)
    if dtype.hasobject:
        raise DatasetFileError(f"{path}: member {member} holds Python objects, not frames")
    if 0 in shape:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset,
                     order="F" if fortran_order else "C")


def read_sequences_npz(path: PathLike, key: str = NPZ_KEY, mmap: bool = True) -> np.ndarray:
    """Read the release's npz layout: uint8 ``(N, T, H, W, C)`` under ``key``.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` file.
    key : str
        The array's name inside the file (``"data"`` in the release).
    mmap : bool
        Memory-map the array when it is stored uncompressed (read-only); a deflated member
        is always read into memory.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    DatasetFileError
        If it is not an npz, lacks ``key``, or the array is not 5-D uint8.
    """
    path = Path(path)
    _require_file(path, "npz sequence file")
    expected = f"(N, T, H, W, C) under key {key!r}"
    if not zipfile.is_zipfile(path):
        raise DatasetFileError(f"{path}: not an npz (zip) file; expected uint8 frames {expected}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise DatasetFileError(
                    f"{path}: no array {key!r}; the file holds {sorted(archive.files)}; "
                    f"expected uint8 frames {expected}"
                )
            array = _memmap_stored_member(path, f"{key}.npy") if mmap else None
            if array is None:
                array = archive[key]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        if isinstance(error, DatasetFileError):
            raise
        raise DatasetFileError(f"{path}: unreadable npz ({error}); expected uint8 frames {expected}") from error
    _check_frames(array, path, expected, 5)
    return array


def read_time_first_npy(path: PathLike, mmap: bool = True) -> np.ndarray:
    """Read a time-first sequence file like ``mnist_test_seq.npy``: uint8 ``(T, N, H, W)``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    DatasetFileError
        If it is not an npy file or the array is not 4-D uint8.
    """
    path = Path(path)
    _require_file(path, "npy sequence file")
    expected = "(T, N, H, W), time first, like mnist_test_seq.npy's (20, 10000, 64, 64)"
    try:
        with open(path, "rb") as handle:
            np.lib.format.read_magic(handle)
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:
        raise DatasetFileError(
            f"{path}: not a valid npy file ({error}); expected uint8 frames {expected}"
        ) from error
    _check_frames(array, path, expected, 4)
    return array


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W)`` or ``(T, H, W, C)`` frames as float32 ``[T, C, H, W]`` in [0, 1]."""
    array = np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise ValueError(f"frames must be uint8 (T, H, W) or (T, H, W, C), got {array.dtype} {array.shape}")
    if array.ndim == 3:
        array = array[..., None]
    # Converted in numpy: a DataLoader worker then never touches torch's intra-op thread pool
    # (an order of magnitude slower for such small arrays on a busy machine). This also
    # copies a read-only memory map into a buffer torch may own.
    scaled = np.ascontiguousarray(np.moveaxis(array, -1, 1), dtype=np.float32)
    np.divide(scaled, 255.0, out=scaled)
    return torch.from_numpy(scaled)


class NpzSequenceWriter:
    """Stream uint8 sequences into an npz of the release's layout, atomically.

    Memory stays at one chunk however large the file; the file appears under its name only
    when all ``shape[0]`` sequences have been written and the writer closes without error.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.npz`` to create or replace.
    shape : tuple of int
        Full shape ``(N, T, H, W, C)``.
    key : str
        The array's name (``"data"``).
    compress : bool
        Deflate the member (smaller, but readers can then not memory-map it).

    Examples
    --------
    >>> with NpzSequenceWriter("moving-mnist-test.npz", (n, 40, 64, 64, 1)) as writer:  # doctest: +SKIP
    ...     for block in blocks:
    ...         writer.write(block)
    """

    def __init__(self, path: PathLike, shape: Sequence[int], key: str = NPZ_KEY, compress: bool = False) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 5 or min(self.shape) < 1:
            raise ValueError(f"shape must be (N, T, H, W, C) of positive sizes, got {tuple(shape)}")
        self.key = key
        self.compress = compress
        self.written = 0

    @contextmanager
    def _session(self) -> Iterator["NpzSequenceWriter"]:
        # Any exception unwinds through these blocks: the zip is closed, then atomic_path
        # deletes the temporary file and the target stays as it was.
        compression = zipfile.ZIP_DEFLATED if self.compress else zipfile.ZIP_STORED
        with atomic_path(self.path) as temporary:
            with zipfile.ZipFile(temporary, "w", compression=compression) as archive:
                with archive.open(f"{self.key}.npy", "w", force_zip64=True) as member:
                    header = {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                        "fortran_order": False,
                        "shape": self.shape,
                    }
                    np.lib.format.write_array_header_1_0(member, header)
                    self._member = member
                    yield self
            if self.written != self.shape[0]:
                raise ValueError(
                    f"{self.path}: {self.written} sequences written, {self.shape[0]} announced"
                )

    def __enter__(self) -> "NpzSequenceWriter":
        self._context = self._session()
        return self._context.__enter__()

    def __exit__(self, kind, error, traceback) -> Optional[bool]:
        return self._context.__exit__(kind, error, traceback)

    def write(self, block: np.ndarray) -> None:
        """Append sequences: uint8 ``(n, T, H, W, C)`` matching the announced shape."""
        block = np.asarray(block)
        if block.dtype != np.uint8 or block.shape[1:] != self.shape[1:]:
            raise ValueError(
                f"block must be uint8 (n,) + {self.shape[1:]}, got {block.dtype} {block.shape}"
            )
        if self.written + len(block) > self.shape[0]:
            raise ValueError(f"more than the announced {self.shape[0]} sequences written to {self.path}")
        self._member.write(np.ascontiguousarray(block).tobytes())
        self.written += len(block)


def write_sequences_npz(
    path: PathLike, sequences: np.ndarray, key: str = NPZ_KEY, compress: bool = False
) -> Path:
    """Write uint8 ``(N, T, H, W, C)`` sequences in the release's npz layout, atomically."""
    sequences = np.asarray(sequences)
    if sequences.dtype != np.uint8 or sequences.ndim != 5:
        raise ValueError(f"sequences must be uint8 (N, T, H, W, C), got {sequences.dtype} {sequences.shape}")
    with NpzSequenceWriter(path, sequences.shape, key=key, compress=compress) as writer:
        writer.write(sequences)
    return Path(path)


def write_time_first_npy(path: PathLike, frames: np.ndarray) -> Path:
    """Write uint8 ``(T, N, H, W)`` frames as a time-first npy (``mnist_test_seq`` layout)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be uint8 (T, N, H, W), got {frames.dtype} {frames.shape}")
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.lib.format.write_array(handle, np.ascontiguousarray(frames), allow_pickle=False)
    return Path(path)


class SequenceFileDataset(Dataset):
    """Sequences from an npz (release layout) or time-first npy file as float tensors.

    Items are float32 ``[T, C, H, W]`` in [0, 1]. The file is memory-mapped where possible;
    the dataset pickles as its path, so each DataLoader worker maps the file itself.

    Parameters
    ----------
    path : str or os.PathLike
        ``*.npz`` (``(N, T, H, W, C)`` under ``key``) or ``*.npy`` (``(T, N, H, W)``).
    layout : {"npz", "time-first"}, optional
        Overrides the layout guessed from the suffix.
    n_frames : int, optional
        Serve only the first ``n_frames`` frames of each sequence (e.g. 20 of 40 for
        10 -> 10); by default all.
    key : str
        The npz array name.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        layout: Optional[str] = None,
        n_frames: Optional[int] = None,
        key: str = NPZ_KEY,
    ) -> None:
        self.path = Path(path)
        if layout is None:
            suffix = self.path.suffix.lower()
            if suffix not in (".npz", ".npy"):
                raise ValueError(
                    f"cannot tell the layout of {self.path} from its suffix; expected .npz "
                    f"(N, T, H, W, C) or .npy (T, N, H, W), or pass layout='npz'/'time-first'"
                )
            layout = "npz" if suffix == ".npz" else "time-first"
        if layout not in ("npz", "time-first"):
            raise ValueError(f"layout must be 'npz' or 'time-first', got {layout!r}")
        self.layout = layout
        self.key = key
        self._array = self._open()
        total = self._array.shape[1] if layout == "npz" else self._array.shape[0]
        if n_frames is not None and not (isinstance(n_frames, int) and 1 <= n_frames <= total):
            raise ValueError(f"n_frames must be in [1, {total}] for {self.path}, got {n_frames!r}")
        self.n_frames = total if n_frames is None else n_frames

    def _open(self) -> np.ndarray:
        if self.layout == "npz":
            return read_sequences_npz(self.path, self.key)
        return read_time_first_npy(self.path)

    @property
    def frame_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one frame."""
        if self.layout == "npz":
            _, _, height, width, channels = self._array.shape
        else:
            _, _, height, width = self._array.shape
            channels = 1
        return channels, height, width

    def __len__(self) -> int:
        return self._array.shape[0] if self.layout == "npz" else self._array.shape[1]

    def sequence(self, index: int) -> np.ndarray:
        """Sequence ``index`` as uint8 ``(T, H, W, C)``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences in {self.path}")
        if self.layout == "npz":
            return np.asarray(self._array[index, : self.n_frames])
        return np.asarray(self._array[: self.n_frames, index])[..., None]

    def __getitem__(self, index: int) -> torch.Tensor:
        return frames_to_tensor(self.sequence(index))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_array"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._array = self._open()
