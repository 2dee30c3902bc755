"""The application's file input and output: the library's one atomic-write path and guarded load.

Re-exported from :mod:`tt_conv.files` so that the library, its ``tt-conv`` command and the
application write and read files one way:

* :func:`~tt_conv.files.atomic_path` and the writers built on it (:func:`~tt_conv.files.write_text_atomic`,
  :func:`~tt_conv.files.write_json_atomic`, :func:`~tt_conv.files.atomic_torch_save`): a temporary file beside the
  target, then one rename; the temporary file removed on any failure, a full disk reported
  as :class:`~tt_conv.files.FileWriteError` naming the file, stale temporary files of killed writers
  removed (:func:`~tt_conv.files.remove_stale_temporaries`).
* :func:`~tt_conv.files.read_json_lines`: JSON-lines logs, a line cut by a killed writer
  ignored with a warning, corruption elsewhere an error naming file and line.
* :func:`~tt_conv.files.load_tensors`: ``torch.load`` with ``weights_only=True`` (no code runs), every
  failure one error type that names the file and says why in the user's terms.
"""

from tt_conv.files import (
    FileWriteError,
    JSONLinesError,
    PathLike,
    atomic_path,
    atomic_torch_save,
    load_tensors,
    read_json_lines,
    remove_stale_temporaries,
    write_json_atomic,
    write_text_atomic,
)

__all__ = ["FileWriteError", "JSONLinesError", "PathLike", "read_json_lines", "atomic_path", "atomic_torch_save", "load_tensors",
           "remove_stale_temporaries", "write_json_atomic", "write_text_atomic"]
