"""The application's file input and output: one atomic-write path and one guarded load.

* Writes (:func:`atomic_path` and the helpers built on it) go to a temporary file beside the
  target, then rename over it: a reader (or a resumed run) sees either the previous complete
  file or the new complete file, never a truncated one, even if the writer is killed
  half-way.
* Reads of ``torch.save`` files go through :func:`load_tensors`: ``torch.load`` with
  ``weights_only=True`` (plain values and tensors only, no code runs), a missing or
  unreadable file reported as one error type that names the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Type, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename.

    The temporary file lies in the target's folder (a rename is only atomic within one file
    system) and keeps the target's suffix, so writers that pick a format from the name
    (matplotlib, PIL) behave as for the target. On an exception the temporary file is
    removed and the target is left untouched. Missing parent folders are created.

    Parameters
    ----------
    path : str or os.PathLike
        The file to create or replace.

    Yields
    ------
    pathlib.Path
        Where to write the content.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        # Data reach the disk before the rename makes them visible (a crash right after a
        # checkpoint must not leave an empty file under the checkpoint's name).
        with open(temporary_path, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_path, 0o666 & ~umask)
        os.replace(temporary_path, target)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: PathLike, value: Any) -> Path:
    """Write ``value`` as indented JSON to ``path`` atomically and return the path.

    Non-finite floats are written as ``NaN`` / ``Infinity`` (Python's json dialect): a
    perfect prediction has an infinite PSNR, and hiding that would misreport it.
    """
    return write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(value: Any, path: PathLike) -> Path:
    """``torch.save(value, path)``, atomically, and return the path."""
    import torch

    with atomic_path(path) as temporary:
        torch.save(value, temporary)
    return Path(path)


def load_tensors(source: Union[PathLike, BinaryIO], map_location: Any = "cpu", *,
                 error: Type[Exception] = ValueError, what: str = "checkpoint") -> Any:
    """``torch.load(source, weights_only=True)``, every failure raised as ``error``.

    The one place the application unpickles a file: only plain values and tensors load,
    so a file cannot run code.

    Parameters
    ----------
    source : str, os.PathLike or binary file
        A ``torch.save`` file, or an open binary stream (e.g. bytes from another rank).
    map_location
        Passed to ``torch.load``.
    error : type
        The exception raised (the caller's own, e.g. ``CheckpointError``), with a message
        naming the file.
    what : str
        What the file is, for the message ("checkpoint", "checkpoint to resume from", ...).

    Raises
    ------
    error
        The file is missing or cannot be read with ``weights_only=True``.
    """
    import torch

    name = "stream" if hasattr(source, "read") else os.fspath(source)
    if not hasattr(source, "read") and not os.path.isfile(name):
        raise error(f"{what} file not found: {name}")
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as failure:  # unpickling errors come in many types
        raise error(f"cannot read {what} {name}: {failure}") from None
