"""Atomic file output: write to a temporary file beside the target, then rename over it.

A reader (or a resumed run) therefore sees either the previous complete file or the new
complete file, never a truncated one, even if the writer is killed half-way.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

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
