"""File input and output: one atomic-write path and one guarded load (a leaf module).

Everything tt-conv writes, the library, its ``tt-conv`` command and the Conv-TT-LSTM
application alike, goes through :func:`atomic_path`; everything it reads with
``torch.load`` goes through :func:`load_tensors` (or, for a whole pickled model the user
vouches for, :func:`load_pickle`).

* Writes go to a temporary file beside the target (``.NAME.PID.XXXX.tmp.SUFFIX``), then one
  rename replaces the target: a reader sees the previous complete file or the new complete
  file, never a truncated one, even if the writer is killed half-way. On any failure the
  temporary file is removed; a full disk (``ENOSPC``, or torch's own "unexpected pos" /
  "file write failed" from its zip writer) becomes a :class:`FileWriteError` naming the file
  and the disk. Temporary files left by a killed writer are removed by the next write of
  the same file (:func:`remove_stale_temporaries`, which a run also calls at its start).
* ``torch.load`` runs with ``weights_only=True``: plain values and tensors only, so a file
  cannot run code. A refused file is described without running it (:func:`pickled_globals`
  lists the Python objects a pickle would import): an empty file, a file that is not a
  ``torch.save`` file at all, or one that holds Python objects, each with its own message.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickletools
import re
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, List, Optional, Type, Union

PathLike = Union[str, "os.PathLike[str]"]

#: Error numbers that mean "no room left": a full disk or an exhausted quota.
_FULL_DISK = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: What writers say when a write stops short without an error number: torch's zip writer
#: (caffe2 inline_container, a RuntimeError) and NumPy's ``tofile`` (an OSError).
_TORCH_SHORT_WRITE = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed")
_NUMPY_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


class FileWriteError(OSError):
    """A file could not be written (full disk, no permission, ...); the target is unchanged.

    An ``OSError`` (its ``errno`` is the cause's, ``ENOSPC`` for a full disk) whose message
    names the file, the cause and that the previous content, if any, is intact.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def _temporary_prefix(target: Path) -> str:
    return f".{target.name}."


def _owner_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: PathLike, name: Optional[str] = None) -> List[Path]:
    """Delete the temporary files a killed :func:`atomic_path` writer left in ``folder``.

    A temporary file is stale when the process that wrote it no longer runs (its id is in
    the name); files of older versions, without an id, are stale too. Files of live writers
    are kept.

    Parameters
    ----------
    folder : str or os.PathLike
        Where to look (not recursive).
    name : str, optional
        Only the temporary files of this target file name (default: of every target).

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".{glob_escape(name)}.*.tmp*" if name else ".*.tmp*"
    removed = []
    for path in folder.glob(pattern):
        match = re.fullmatch(r"\.(?P<target>.+?)\.(?:(?P<pid>\d+)\.)?[^.]+\.tmp(?:\.[^.]*)?",
                             path.name)
        if match is None or not path.is_file():
            continue
        pid = match.group("pid")
        if pid is not None and _owner_alive(int(pid)):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def glob_escape(text: str) -> str:
    """``text`` with the glob metacharacters ``* ? [`` escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _write_error(target: Path, failure: BaseException) -> Optional[FileWriteError]:
    """A :class:`FileWriteError` for ``failure`` if it is a failed write, else ``None``."""
    folder = target.parent.absolute()
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    room = "" if free is None else f" ({_bytes(free)} free in {folder})"
    kept = f"; {target} was not changed" if target.exists() else f"; {target} was not written"
    if isinstance(failure, OSError) and failure.errno in _FULL_DISK:
        return FileWriteError(failure.errno, f"cannot write {target}: the disk is full "
                                             f"({os.strerror(failure.errno)}){room}{kept}. "
                                             f"Free some space and run again")
    if (isinstance(failure, RuntimeError) and _TORCH_SHORT_WRITE.search(str(failure))) or (
            isinstance(failure, OSError) and failure.errno is None
            and _NUMPY_SHORT_WRITE.search(str(failure))):
        cause = str(failure).strip().splitlines()[0]
        likely = ("the disk is full" if free is not None and free < 64 * 2 ** 20
                  else "the disk may be full, or a file-size limit or quota was reached")
        return FileWriteError(errno.ENOSPC, f"cannot write {target}: the write stopped short, "
                                            f"{likely}{room}{kept}. Free some space and run "
                                            f"again (the writer said: {cause})")
    if isinstance(failure, OSError) and failure.errno is not None and \
            not isinstance(failure, FileWriteError):
        return FileWriteError(failure.errno, f"cannot write {target}: "
                                             f"{failure.strerror or failure}{kept}")
    return None


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename.

    The temporary file lies in the target's folder (a rename is only atomic within one file
    system) and keeps the target's suffix, so writers that pick a format from the name
    (matplotlib, PIL) behave as for the target. The result gets the permissions a plain
    ``open()`` would give (``0666`` less the umask). On any exception the temporary file is
    removed and the target is left untouched; a failed write (full disk, permissions) is
    raised as :class:`FileWriteError` naming the file. Missing parent folders are created;
    stale temporary files of the same target (from a killed writer) are removed first.

    Parameters
    ----------
    path : str or os.PathLike
        The file to create or replace.

    Yields
    ------
    pathlib.Path
        Where to write the content.

    Raises
    ------
    FileWriteError
        The folder or the file could not be written; ``path`` is unchanged.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(target.parent, target.name)
        handle, temporary = tempfile.mkstemp(prefix=f"{_temporary_prefix(target)}{os.getpid()}.",
                                             suffix=f".tmp{target.suffix}", dir=target.parent)
        os.close(handle)
    except OSError as failure:
        raise (_write_error(target, failure) or failure) from None
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
    except BaseException as failure:
        temporary_path.unlink(missing_ok=True)
        translated = _write_error(target, failure) if isinstance(failure, Exception) else None
        if translated is None:
            raise
        raise translated from None


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
    """``torch.save(value, path)``, atomically, and return the path.

    torch writes through a file object we close ourselves: after a failed write (a full
    disk) the removed temporary file's space is freed at once, whereas torch's own file
    writer would keep it open until garbage collection.
    """
    import torch

    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        torch.save(value, handle)
    return Path(path)


# ------------------------------------------------------------------------------ reading


class JSONLinesError(ValueError):
    """A JSON-lines file is corrupt before its last line; the message names file and line."""


def read_json_lines(path: PathLike, *, what: str = "log") -> List[Any]:
    """The records of a JSON-lines file (one JSON value a line; blank lines skipped).

    A half-written last line (no newline at its end and not valid JSON: what a kill or a
    full disk leaves) is ignored with a warning naming the file; any other line that is not
    valid JSON is an error naming the file and the line.

    Raises
    ------
    JSONLinesError
        A corrupt line before the last one, or a complete last line that is corrupt.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    cut = lines.pop() if lines else ""  # what follows the last newline
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise JSONLinesError(f"{what} {path}, line {number}: not valid JSON ({error.msg} "
                                 f"at column {error.colno}); repair or remove that line"
                                 ) from None
    if cut.strip():
        try:
            records.append(json.loads(cut))
        except json.JSONDecodeError:
            warnings.warn(f"{what} {path}: its last line ({len(lines) + 1}) was cut short by an "
                          f"interrupted write and is ignored")
    return records




def pickled_globals(source: Union[PathLike, BinaryIO]) -> Optional[List[str]]:
    """The Python objects (``module.name``) beyond tensors and plain values that a
    ``torch.save`` file or a pickle would import on load, found without running it.

    A ``torch.save`` zip archive is read by torch's own
    ``torch.serialization.get_unsafe_globals_in_checkpoint``, a plain pickle by
    :mod:`pickletools` (which only parses). ``None`` when the file is neither (random bytes,
    a truncated or foreign file).
    """
    import torch

    if hasattr(source, "read"):
        position = source.tell()
        data = source.read()
        source.seek(position)
    else:
        data = Path(source).read_bytes()
    if data[:4] == b"PK\x03\x04":
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
        except Exception:  # a damaged archive
            return None
    found: List[str] = []
    strings: List[str] = []
    memo: dict = {}
    try:
        for opcode, argument, _ in pickletools.genops(io.BytesIO(data)):
            name = opcode.name
            if name == "GLOBAL":
                found.append(str(argument).replace(" ", "."))
            elif name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(argument, str) and ("UNICODE" in name or name.endswith("STRING")):
                strings.append(argument)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[argument] = strings[-1]
            elif name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET") and argument in memo:
                strings.append(memo[argument])
            if name == "STOP":
                break
    except Exception:  # not a pickle: pickletools stops at the first unknown opcode
        return None
    return list(dict.fromkeys(found))


def describe_refused(source: Union[PathLike, BinaryIO], name: str, what: str,
                     failure: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused ``source``, in the user's terms.

    Never repeats torch's advice to retry with ``weights_only=False`` (that runs the file's
    code): an empty file, a file that is not a ``torch.save`` file, or a file holding Python
    objects (named) each get their own message.
    """
    size = None if hasattr(source, "read") else os.path.getsize(name)
    if size == 0:
        return f"{what} {name} is empty (0 bytes): it was not written completely"
    objects = pickled_globals(source)
    if objects is None:
        return (f"{what} {name} is not a torch.save file (neither a zip archive from "
                f"torch.save nor a pickle); it may be truncated or of another format")
    if objects:
        shown = ", ".join(objects[:6]) + (", ..." if len(objects) > 6 else "")
        return (f"{what} {name} holds Python objects, not only tensors and plain values "
                f"({shown}): loading it would run code from the file, so it is refused")
    first = str(failure).strip().splitlines()[0] if str(failure).strip() else \
        type(failure).__name__
    if "weights_only" in first or "Weights only" in first:
        first = type(failure).__name__
    return f"cannot read {what} {name}: {first}"


def _not_a_file(name: str, what: str) -> str:
    if os.path.isdir(name):
        return f"{what} {name} is a folder; give the {what} file itself"
    return f"{what} file not found: {name}"


def load_tensors(source: Union[PathLike, BinaryIO], map_location: Any = "cpu", *,
                 error: Type[Exception] = ValueError, what: str = "checkpoint") -> Any:
    """``torch.load(source, weights_only=True)``, every failure raised as ``error``.

    The one place tt-conv unpickles a file it did not just write itself: only plain values
    and tensors load, so a file cannot run code.

    Parameters
    ----------
    source : str, os.PathLike or binary file
        A ``torch.save`` file, or an open binary stream (e.g. bytes from another rank).
    map_location
        Passed to ``torch.load``.
    error : type
        The exception raised (the caller's own, e.g. ``CheckpointError``), with a message
        naming the file (:func:`describe_refused`).
    what : str
        What the file is, for the message ("checkpoint", "model file", ...).

    Raises
    ------
    error
        The file is missing or cannot be read with ``weights_only=True``.
    """
    import torch

    name = "stream" if hasattr(source, "read") else os.fspath(source)
    if not hasattr(source, "read") and not os.path.isfile(name):
        raise error(_not_a_file(name, what))
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols says nothing useful
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(source, map_location=map_location, weights_only=True)
    except Exception as failure:  # unpickling errors come in many types
        raise error(describe_refused(source, name, what, failure)) from None


def load_pickle(path: PathLike, *, error: Type[Exception] = ValueError,
                what: str = "model file") -> Any:
    """``torch.load(path, weights_only=False)``: a whole pickled object, **running its code**.

    Only for files the user has said they trust (``tt-conv ... --trust-pickle``): unpickling
    imports and calls whatever the file names. Every failure is raised as ``error`` naming
    the file.
    """
    import torch

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise error(_not_a_file(name, what))
    if os.path.getsize(name) == 0:
        raise error(f"{what} {name} is empty (0 bytes): it was not written completely")
    try:
        return torch.load(name, map_location="cpu", weights_only=False)
    except Exception as failure:  # unpickling fails in many ways
        if pickled_globals(name) is None:
            raise error(f"{what} {name} is not a torch.save file (neither a zip archive from "
                        f"torch.save nor a pickle)") from None
        raise error(f"cannot load {what} {name} ({type(failure).__name__}: {failure})") from None
