"""Something-Something V2 (Goyal et al., 2017): clips decoded lazily, labelled by template.

The distribution:

- videos ``{id}.webm`` (VP9, 12 fps, height 240), extracted into a folder usually named
  ``20bn-something-something-v2``;
- annotations ``something-something-v2-{train,validation,test}.json``: a list of
  ``{"id", "label", "template", "placeholders"}`` (the test list has ids only);
- ``something-something-v2-labels.json``: ``{template: "class index"}``, the template
  written with its brackets dropped (``"Putting [something] on a surface"`` becomes
  ``"Putting something on a surface"``), 174 classes.

:class:`SomethingSomethingV2` maps every annotated clip to its class when built (a clip
whose template has no class is an error naming the clip), decodes a clip only when it is
asked for, sampling ``n_frames`` frames evenly over its whole length at a fixed size, and
can keep the decoded clips in an on-disk cache (one uint8 ``.npy`` per clip and setting,
written atomically).

Missing and corrupt videos, the policy (``on_error``):

- ``"resample"`` (default): files missing when the dataset is built are left out of it
  (``missing`` lists them, one warning says how many); a clip that fails to decode while
  iterating is replaced by the next clip of the dataset that decodes (up to
  ``max_resample`` tries), so an epoch never stops for one bad file. Each failure raises
  a warning naming the clip and file, and is appended to ``failure_log`` (a JSON-lines
  file, safe to share between DataLoader workers and ranks) when one is given;
  :meth:`SomethingSomethingV2.report` then lists the missing and corrupt clips.
- ``"raise"``: a missing file stops construction, a corrupt one the iteration, with an
  error naming the file (hence the clip id).

Items are ``(frames, label)``: float32 ``[T, C, H, W]`` in [0, 1] (``C`` = 3 for RGB, 1 for
gray) and the class index (:data:`UNLABELLED`, -1, for the test split, which has no labels).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checks import check_choice
from ..files import atomic_path, read_json_lines
from .sequence_files import DatasetFileError, frames_to_tensor
from .video import COLORS, RESAMPLE_FILTERS, SizeArg, VideoDecodeError, parse_size, read_video

PathLike = Union[str, "os.PathLike[str]"]

#: Number of classes of the full dataset.
SSV2_NUM_CLASSES = 174
#: Annotation splits and their files.
SSV2_SPLITS: Tuple[str, ...] = ("train", "validation", "test")
ANNOTATION_FILES: Dict[str, str] = {s: f"something-something-v2-{s}.json" for s in SSV2_SPLITS}
LABELS_FILE = "something-something-v2-labels.json"
#: Where the videos are looked for, in order, when no ``video_dir`` is given (then ``root``).
VIDEO_FOLDERS: Tuple[str, ...] = ("20bn-something-something-v2", "videos")
#: The label of a clip without one (the test split).
UNLABELLED = -1
#: Error policies.
ON_ERROR = ("resample", "raise")


class MissingLabelError(ValueError):
    """An annotated clip has no class: no template, or a template the labels file lacks.

    Attributes
    ----------
    clip_id : str
        The clip.
    """

    def __init__(self, clip_id: str, message: str) -> None:
        self.clip_id = clip_id
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.clip_id, str(self)))


@dataclass(frozen=True)
class SSv2Clip:
    """One annotated clip: its id, class index (:data:`UNLABELLED` if none) and template."""

    id: str
    label: int
    template: Optional[str]


def template_key(template: str) -> str:
    """The labels-file key of a template: its brackets dropped (``[something]`` -> ``something``)."""
    return template.replace("[", "").replace("]", "")


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"Something-Something V2 {what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetFileError(f"{path}: unreadable {what} ({error})") from error


def read_labels(path: PathLike) -> Dict[str, int]:
    """Read ``something-something-v2-labels.json``: template (no brackets) -> class index.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    DatasetFileError
        If it is not a JSON object of strings to integer strings, or the indices are not
        ``0 .. N-1`` each used once.
    """
    path = Path(path)
    table = _load_json(path, "labels file")
    if not isinstance(table, dict) or not table:
        raise DatasetFileError(
            f"{path}: expected a JSON object {{template: \"index\"}}, got {type(table).__name__}"
        )
    labels = {}
    for template, index in table.items():
        try:
            labels[str(template)] = int(index)
        except (TypeError, ValueError):
            raise DatasetFileError(
                f"{path}: class index of {template!r} is {index!r}, not an integer"
            ) from None
    if sorted(labels.values()) != list(range(len(labels))):
        raise DatasetFileError(
            f"{path}: class indices must be 0..{len(labels) - 1}, each once; got "
            f"{sorted(set(labels.values()))[:5]}... ({len(set(labels.values()))} distinct)"
        )
    return labels


def read_annotations(path: PathLike, labels: Dict[str, int], labelled: bool = True) -> List[SSv2Clip]:
    """Read an annotation list and give each clip its class.

    Parameters
    ----------
    path : str or os.PathLike
        ``something-something-v2-{split}.json``.
    labels : dict
        From :func:`read_labels`.
    labelled : bool
        Whether every clip must have a class (train, validation). When ``False`` (test),
        clips without a template get :data:`UNLABELLED`; a template, if present, is still
        mapped.

    Raises
    ------
    MissingLabelError
        If a clip that must be labelled has no template or one the labels lack (naming it).
    DatasetFileError
        If the file is not a list of objects with an ``"id"``, or an id repeats.
    """
    path = Path(path)
    entries = _load_json(path, "annotation file")
    if not isinstance(entries, list):
        raise DatasetFileError(
            f"{path}: expected a JSON list of {{\"id\", \"template\", ...}}, got {type(entries).__name__}"
        )
    clips, seen = [], set()
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise DatasetFileError(f"{path}: entry {position} has no \"id\": {str(entry)[:80]}")
        clip_id = str(entry["id"])
        if clip_id in seen:
            raise DatasetFileError(f"{path}: clip id {clip_id} appears twice")
        seen.add(clip_id)
        template = entry.get("template")
        if template is None:
            if labelled:
                raise MissingLabelError(clip_id, f"{path}: clip {clip_id} has no \"template\", so no class")
            clips.append(SSv2Clip(clip_id, UNLABELLED, None))
            continue
        key = template_key(str(template))
        if key not in labels:
            raise MissingLabelError(
                clip_id,
                f"{path}: clip {clip_id} has template {template!r}, whose key {key!r} is not "
                f"in the labels file",
            )
        clips.append(SSv2Clip(clip_id, labels[key], str(template)))
    return clips


def _find_file(root: Path, name: str) -> Path:
    """``root/name``, else ``root/labels/name`` when only that exists."""
    for candidate in (root / name, root / "labels" / name):
        if candidate.is_file():
            return candidate
    return root / name


def read_failure_log(path: PathLike) -> List[Dict[str, str]]:
    """The failures recorded in a JSON-lines failure log, one per clip (latest kept)."""
    path = Path(path)
    if not path.is_file():
        return []
    by_id: Dict[str, Dict[str, str]] = {}
    for record in read_json_lines(path, what="failure log"):
        if isinstance(record, dict) and "id" in record:
            by_id[str(record["id"])] = record
    return [by_id[k] for k in sorted(by_id)]


class SomethingSomethingV2(Dataset):
    """Something-Something V2 clips as ``(frames [T, C, H, W] in [0, 1], label)``.

    Parameters
    ----------
    root : str or os.PathLike
        Folder holding the annotation and labels JSON files (directly or under
        ``labels/``) and the videos (under ``20bn-something-something-v2/``, ``videos/``,
        or directly; see ``video_dir``).
    split : {"train", "validation", "test"}
        Which annotation list.
    n_frames : int
        Frames per clip, spread evenly over the clip (repeated if it is shorter).
    size : int or (int, int)
        Frame ``(height, width)`` after resizing (antialiased, aspect not kept).
    color : {"rgb", "gray"}
        3 channels or 1.
    resample : str
        Resampling filter (see :func:`~.video.resize_frames`).
    video_dir : str or os.PathLike, optional
        Folder of the ``{id}.webm`` files.
    annotations, labels : str or os.PathLike, optional
        Explicit annotation and labels files instead of the standard names under ``root``.
    cache_dir : str or os.PathLike, optional
        Keep decoded clips here (``{cache_dir}/{setting}/{id}.npy``, uint8), reused by
        later epochs and runs with the same ``n_frames``, ``size``, ``color`` and
        ``resample``.
    on_error : {"resample", "raise"}
        What a missing or corrupt video does (see the module docstring).
    failure_log : str or os.PathLike, optional
        JSON-lines file to which every decoding failure is appended (for :meth:`report`).
    max_resample : int
        With ``"resample"``, clips tried after a failure before giving up.
    check_files : bool
        Check that every video exists when the dataset is built (one ``stat`` per clip).

    Raises
    ------
    FileNotFoundError
        If a JSON file or the video folder is missing (or, with ``on_error="raise"``, a
        video).
    MissingLabelError
        If a clip of a labelled split has no class (the message names the clip id).
    DatasetFileError
        If a JSON file is malformed.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        *,
        n_frames: int = 20,
        size: SizeArg = 112,
        color: str = "rgb",
        resample: str = "bilinear",
        video_dir: Optional[PathLike] = None,
        annotations: Optional[PathLike] = None,
        labels: Optional[PathLike] = None,
        cache_dir: Optional[PathLike] = None,
        on_error: str = "resample",
        failure_log: Optional[PathLike] = None,
        max_resample: int = 10,
        check_files: bool = True,
    ) -> None:
        check_choice("split", split, SSV2_SPLITS)
        if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
            raise ValueError(f"n_frames must be an integer >= 1, got {n_frames!r}")
        check_choice("color", color, sorted(COLORS))
        check_choice("resample", resample, RESAMPLE_FILTERS)
        check_choice("on_error", on_error, ON_ERROR)
        if isinstance(max_resample, bool) or not isinstance(max_resample, int) or max_resample < 1:
            raise ValueError(f"max_resample must be an integer >= 1, got {max_resample!r}")
        self.split = split
        self.n_frames = n_frames
        self.size = parse_size(size)
        self.color = color
        self.resample = resample
        self.on_error = on_error
        self.max_resample = max_resample
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Something-Something V2 folder not found: {root}")
        self.root = root
        labels_path = Path(labels) if labels is not None else _find_file(root, LABELS_FILE)
        annotations_path = (
            Path(annotations) if annotations is not None else _find_file(root, ANNOTATION_FILES[split])
        )
        label_table = read_labels(labels_path)
        self.classes: Tuple[str, ...] = tuple(sorted(label_table, key=label_table.__getitem__))
        clips = read_annotations(annotations_path, label_table, labelled=split != "test")
        self.video_dir = self._video_dir(root, video_dir)
        self.cache_dir = None if cache_dir is None else Path(cache_dir) / self.setting
        self.failure_log = None if failure_log is None else Path(failure_log)

        missing: List[str] = []
        if check_files:
            present = []
            for clip in clips:
                (present if self.video_path(clip.id).is_file() else missing).append(clip)
            missing = [clip.id for clip in missing]
            if missing and on_error == "raise":
                raise FileNotFoundError(
                    f"{len(missing)} of {len(clips)} {split} videos missing from {self.video_dir}, "
                    f"e.g. {', '.join(f'{m}.webm' for m in missing[:5])}"
                )
            if missing:
                warnings.warn(
                    f"Something-Something V2 {split}: {len(missing)} of {len(clips)} videos missing "
                    f"from {self.video_dir} and left out (e.g. {', '.join(missing[:5])}); "
                    f"see .missing",
                    RuntimeWarning,
                    stacklevel=2,
                )
            clips = present
        if not clips:
            raise ValueError(f"no {split} clip to serve from {annotations_path} and {self.video_dir}")
        self.clips: Tuple[SSv2Clip, ...] = tuple(clips)
        self.missing: Tuple[str, ...] = tuple(missing)

    @staticmethod
    def _video_dir(root: Path, video_dir: Optional[PathLike]) -> Path:
        if video_dir is not None:
            folder = Path(video_dir)
            if not folder.is_dir():
                raise FileNotFoundError(f"Something-Something V2 video folder not found: {folder}")
            return folder
        for name in VIDEO_FOLDERS:
            if (root / name).is_dir():
                return root / name
        return root

    @property
    def n_classes(self) -> int:
        """Number of classes in the labels file (174 for the full dataset)."""
        return len(self.classes)

    @property
    def setting(self) -> str:
        """The name of this decoding setting, e.g. ``20f_112x112_rgb_bilinear`` (cache folder)."""
        height, width = self.size
        return f"{self.n_frames}f_{height}x{width}_{self.color}_{self.resample}"

    @property
    def frame_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one frame."""
        return (3 if self.color == "rgb" else 1,) + self.size

    def video_path(self, clip_id: str) -> Path:
        """The video file of a clip: ``{video_dir}/{id}.webm``."""
        return self.video_dir / f"{clip_id}.webm"

    def __len__(self) -> int:
        return len(self.clips)

    def _expected_shape(self) -> Tuple[int, ...]:
        return (self.n_frames,) + self.size + ((3,) if self.color == "rgb" else ())

    def _cached(self, clip_id: str) -> Optional[np.ndarray]:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{clip_id}.npy"
        if not path.is_file():
            return None
        try:
            frames = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None  # a damaged cache entry is decoded again and replaced
        if frames.dtype != np.uint8 or frames.shape != self._expected_shape():
            return None
        return frames

    def _store(self, clip_id: str, frames: np.ndarray) -> None:

        with atomic_path(self.cache_dir / f"{clip_id}.npy") as temporary, open(temporary, "wb") as handle:
            np.lib.format.write_array(handle, frames, allow_pickle=False)

    def frames(self, index: int) -> np.ndarray:
        """The frames of clip ``index`` as uint8 ``(T, H, W[, 3])``, no error policy applied.

        Raises
        ------
        FileNotFoundError, VideoDecodeError
            If the video is missing or cannot be decoded.
        """
        clip = self.clips[index]
        frames = self._cached(clip.id)
        if frames is None:
            frames = read_video(
                self.video_path(clip.id), color=self.color, size=self.size,
                resample=self.resample, n_frames=self.n_frames,
            )
            if self.cache_dir is not None:
                self._store(clip.id, frames)
        return frames

    def _record(self, clip: SSv2Clip, error: Exception) -> None:
        path = self.video_path(clip.id)
        kind = "missing" if isinstance(error, FileNotFoundError) else "corrupt"
        warnings.warn(
            f"Something-Something V2: {kind} video of clip {clip.id} ({path}): {error}; "
            f"serving another clip instead",
            RuntimeWarning,
            stacklevel=3,
        )
        if self.failure_log is not None:
            record = {"id": clip.id, "file": str(path), "kind": kind, "error": str(error)}
            self.failure_log.parent.mkdir(parents=True, exist_ok=True)
            # One short write to a file opened for appending: lines from several workers
            # or ranks do not interleave.
            with open(self.failure_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        index %= len(self)
        if self.on_error == "raise":
            return frames_to_tensor(self.frames(index)), self.clips[index].label
        tried = []
        for attempt in range(min(self.max_resample, len(self))):
            candidate = (index + attempt) % len(self)
            try:
                frames = self.frames(candidate)
            except (FileNotFoundError, VideoDecodeError) as error:
                self._record(self.clips[candidate], error)
                tried.append(self.clips[candidate].id)
                continue
            return frames_to_tensor(frames), self.clips[candidate].label
        raise VideoDecodeError(
            self.video_path(self.clips[index].id),
            f"this clip and the {len(tried) - 1} after it all failed to decode ({', '.join(tried)})",
        )

    def report(self) -> Dict[str, object]:
        """Missing and corrupt videos: those left out when built, those logged since.

        Returns
        -------
        dict
            ``{"split", "clips", "missing": [ids], "failed": [{"id", "file", "kind",
            "error"}]}``; ``failed`` is read from ``failure_log`` (empty without one).
        """
        failed = read_failure_log(self.failure_log) if self.failure_log is not None else []
        return {
            "split": self.split,
            "clips": len(self.clips),
            "missing": list(self.missing),
            "failed": failed,
        }
