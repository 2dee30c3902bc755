"""KTH action (Schuldt et al., 2004): preparation into memory-mappable arrays, and the dataset.

The distribution: 6 actions x 25 persons x 4 scenarios, grayscale AVI files of 160 x 120
pixels at 25 fps named ``person{01..25}_{action}_d{1..4}_uncomp.avi``. Many copies circulate
instead as JPEG frames, ``{action}/person{XX}_{action}_d{Y}_uncomp/image_{NNNN}.jpg``.

:func:`prepare_kth` reads either layout (detected), converts every video to gray, resizes it
(128 x 128 by default; the paper's release used 120 x 120) and stores it as one uint8
``(T, H, W)`` ``.npy`` per video, ``{out}/{action}/person{XX}_{action}_d{Y}.npy``, plus an
index ``{out}/kth.json`` listing each video's person, action, scenario, frame count and file,
the videos that failed to decode (by name, with the decoder's message), the files whose
names do not fit the naming scheme and the person/action/scenario combinations not found.
Files are written atomically; a re-run keeps every complete file and redoes the rest.

:class:`KTHDataset` serves windows of ``input + future`` consecutive frames that stay
inside one video, memory-mapping the files (nothing is loaded whole): persons 1-16 train,
17-25 test, optionally some training persons held out for validation. Window starts step by
a per-action stride: by default, as in other toolkits, non-overlapping windows (stride =
window length) for boxing, handclapping, handwaving and walking, and stride 3 for jogging
and running (fast actions, which would otherwise give few windows); configurable.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..checks import check_choice
from ..files import atomic_path, remove_stale_temporaries, write_json_atomic
from .sequence_files import DatasetFileError, frames_to_tensor, read_npy_header
from .video import (
    RESAMPLE_FILTERS,
    VideoDecodeError,
    parse_size,
    read_frame_folder,
    read_video,
)

PathLike = Union[str, "os.PathLike[str]"]

#: The six actions, in the distribution's order.
KTH_ACTIONS: Tuple[str, ...] = ("boxing", "handclapping", "handwaving", "jogging", "running", "walking")
#: Persons 1-25 and scenarios d1-d4.
KTH_PERSONS: Tuple[int, ...] = tuple(range(1, 26))
KTH_SCENARIOS: Tuple[int, ...] = (1, 2, 3, 4)
#: The standard split by person.
TRAIN_PERSONS: Tuple[int, ...] = tuple(range(1, 17))
TEST_PERSONS: Tuple[int, ...] = tuple(range(17, 26))

#: Video-prediction protocols: (input frames, future frames).
KTH_PROTOCOLS: Dict[str, Tuple[int, int]] = {"10->20": (10, 20), "10->40": (10, 40)}

#: Actions whose windows overlap by default, and their stride; the others do not overlap.
FAST_ACTIONS: Tuple[str, ...] = ("jogging", "running")
FAST_ACTION_STRIDE = 3

#: The index written by :func:`prepare_kth` in the output folder.
INDEX_FILE = "kth.json"
#: Default output frame size (the paper's release: 120).
DEFAULT_SIZE = 128

_STEM = re.compile(r"person(\d+)_([A-Za-z]+)_d(\d+)_uncomp")
_PREPARE_HINT = "python -m applications.conv_tt_lstm prepare kth --raw DIR --out DIR"


# ------------------------------------------------------------------------------- names


@dataclass(frozen=True, order=True)
class KTHName:
    """Who does what where: one KTH video's identity.

    Attributes
    ----------
    person : int
        1-25.
    action : str
        One of :data:`KTH_ACTIONS`.
    scenario : int
        1-4 (``d1`` outdoors, ``d2`` outdoors with scale variation, ``d3`` outdoors with
        different clothes, ``d4`` indoors).
    """

    person: int
    action: str
    scenario: int

    @property
    def stem(self) -> str:
        """The distribution's name without suffix, ``person01_boxing_d1_uncomp``."""
        return f"person{self.person:02d}_{self.action}_d{self.scenario}_uncomp"

    @property
    def prepared_path(self) -> str:
        """The prepared file, relative to the output folder: ``boxing/person01_boxing_d1.npy``."""
        return f"{self.action}/person{self.person:02d}_{self.action}_d{self.scenario}.npy"


def parse_kth_name(stem: str) -> KTHName:
    """Parse ``person{XX}_{action}_d{Y}_uncomp`` strictly.

    Parameters
    ----------
    stem : str
        A file name without its suffix (or a frame folder's name).

    Returns
    -------
    KTHName

    Raises
    ------
    ValueError
        Saying which part does not fit: the pattern, the two-digit person 01-25, the
        action, or the scenario d1-d4.
    """
    match = _STEM.fullmatch(stem)
    if match is None:
        raise ValueError(f"{stem!r} does not follow person{{XX}}_{{action}}_d{{Y}}_uncomp")
    person_text, action, scenario_text = match.groups()
    if len(person_text) != 2 or not 1 <= int(person_text) <= 25:
        raise ValueError(f"{stem!r}: person {person_text!r} is not two digits in 01-25")
    if action not in KTH_ACTIONS:
        raise ValueError(f"{stem!r}: action {action!r} is not one of {', '.join(KTH_ACTIONS)}")
    if len(scenario_text) != 1 or int(scenario_text) not in KTH_SCENARIOS:
        raise ValueError(f"{stem!r}: scenario d{scenario_text} is not d1-d4")
    return KTHName(int(person_text), action, int(scenario_text))


def all_kth_names() -> List[KTHName]:
    """The 600 person x action x scenario combinations, in sorted order."""
    return sorted(KTHName(p, a, s) for p in KTH_PERSONS for a in KTH_ACTIONS for s in KTH_SCENARIOS)


# ------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class KTHSource:
    """One raw video: an AVI file or a folder of JPEG frames."""

    name: KTHName
    path: Path
    layout: str  # "avi" or "jpeg"


@dataclass(frozen=True)
class KTHSources:
    """What :func:`find_kth_sources` found in a raw folder.

    Attributes
    ----------
    layout : str
        ``"avi"`` or ``"jpeg"``.
    sources : list of KTHSource
        Recognised videos, sorted by name.
    rejected : list of (pathlib.Path, str)
        Candidate files or folders that do not fit the naming scheme, with the reason.
    missing : list of KTHName
        Combinations of the 600 not found.
    """

    layout: str
    sources: List[KTHSource]
    rejected: List[Tuple[Path, str]]
    missing: List[KTHName]


def _avi_candidates(raw: Path) -> List[Path]:
    return sorted(p for p in raw.rglob("*") if p.suffix.lower() == ".avi" and p.is_file())


def _frame_folder_candidates(raw: Path) -> List[Path]:
    """Folders (at any depth) holding at least one ``image_NNNN.jpg``-like frame file."""
    folders = set()
    for path in raw.rglob("*"):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png") and path.name.lower().startswith("image_"):
            folders.add(path.parent)
    return sorted(folders)


def find_kth_sources(raw: PathLike, layout: str = "auto") -> KTHSources:
    """Find the KTH videos in ``raw``: AVI files or JPEG frame folders, at any depth.

    Parameters
    ----------
    raw : str or os.PathLike
        The folder the distribution was extracted into (the six per-action zips may be
        extracted into one folder or into one folder per action).
    layout : {"auto", "avi", "jpeg"}
        ``"auto"`` picks whichever of the two is present and refuses to guess when both are.

    Returns
    -------
    KTHSources

    Raises
    ------
    FileNotFoundError
        If ``raw`` does not exist or holds neither layout.
    ValueError
        If ``layout`` is unknown, or ``"auto"`` finds both layouts.
    """
    raw = Path(raw)
    if layout not in ("auto", "avi", "jpeg"):
        raise ValueError(f"layout must be 'auto', 'avi' or 'jpeg', got {layout!r}")
    if not raw.is_dir():
        raise FileNotFoundError(f"KTH raw folder not found: {raw}")
    avis = _avi_candidates(raw) if layout in ("auto", "avi") else []
    folders = _frame_folder_candidates(raw) if layout in ("auto", "jpeg") else []
    if layout == "auto":
        if avis and folders:
            raise ValueError(
                f"{raw} holds both AVI files ({len(avis)}) and JPEG frame folders "
                f"({len(folders)}); choose one with layout='avi' or 'jpeg' (--layout)"
            )
        layout = "avi" if avis else "jpeg"
    candidates = avis if layout == "avi" else folders
    if not candidates:
        raise FileNotFoundError(
            f"no KTH videos in {raw}: expected AVI files person01_boxing_d1_uncomp.avi ... or "
            f"JPEG frame folders boxing/person01_boxing_d1_uncomp/image_0001.jpg ..."
        )
    found: Dict[KTHName, KTHSource] = {}
    rejected: List[Tuple[Path, str]] = []
    for path in candidates:
        stem = path.stem if layout == "avi" else path.name
        try:
            name = parse_kth_name(stem)
        except ValueError as error:
            rejected.append((path, str(error)))
            continue
        parent = path.parent.name
        if parent in KTH_ACTIONS and parent != name.action:
            rejected.append((path, f"a {name.action} video inside the folder {parent}/"))
        elif name in found:
            rejected.append((path, f"duplicate of {found[name].path}"))
        else:
            found[name] = KTHSource(name, path, layout)
    missing = [name for name in all_kth_names() if name not in found]
    return KTHSources(layout, [found[n] for n in sorted(found)], rejected, missing)


# -------------------------------------------------------------------------- preparation


def read_npy_shape(path: PathLike) -> Optional[Tuple[int, ...]]:
    """The shape of a complete uint8 ``.npy`` file, or ``None`` if it is not one.

    Complete means: a valid header announcing uint8 data in C order and exactly the bytes
    the header promises (a copy cut short, or junk under the name, gives ``None``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            shape, fortran, dtype, offset = read_npy_header(handle)
        size = path.stat().st_size
    except (OSError, ValueError, EOFError):
        return None
    if dtype != np.uint8 or fortran or size != offset + int(np.prod(shape, dtype=np.int64)):
        return None
    return tuple(int(s) for s in shape)


def _write_npy(path: Path, frames: np.ndarray) -> None:

    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.lib.format.write_array(handle, np.ascontiguousarray(frames), allow_pickle=False)


def prepare_one(source: KTHSource, target: PathLike, size: Tuple[int, int], resample: str) -> Dict:
    """Decode, gray, resize and store one video; never raises for a bad video.

    Returns
    -------
    dict
        ``{"status": "written" | "kept" | "failed", "frames": T, "error": str}``
        (``"kept"`` when ``target`` already held a complete file of the right frame size).
    """
    target = Path(target)
    shape = read_npy_shape(target) if target.exists() else None
    if shape is not None and len(shape) == 3 and shape[1:] == tuple(size) and shape[0] >= 1:
        return {"status": "kept", "frames": shape[0]}
    try:
        if source.layout == "avi":
            frames = read_video(source.path, color="gray", size=size, resample=resample)
        else:
            frames = read_frame_folder(source.path, color="gray", size=size, resample=resample)
    except (VideoDecodeError, FileNotFoundError, ValueError) as error:
        return {"status": "failed", "error": str(error)}
    _write_npy(target, frames)
    return {"status": "written", "frames": int(frames.shape[0])}


def _remove_stale_temporaries(out: Path) -> int:
    """Delete temporary files left by a killed run in every action folder."""
    return sum(len(remove_stale_temporaries(out / action)) for action in KTH_ACTIONS)


def prepare_kth(
    raw: PathLike,
    out: PathLike,
    *,
    size: Union[int, Tuple[int, int]] = DEFAULT_SIZE,
    layout: str = "auto",
    resample: str = "bilinear",
    workers: int = 1,
    progress: bool = True,
) -> Dict:
    """Convert the KTH videos in ``raw`` into gray uint8 ``.npy`` arrays and an index.

    Parameters
    ----------
    raw : str or os.PathLike
        The extracted distribution (AVI files) or a JPEG-frames copy; see
        :func:`find_kth_sources`.
    out : str or os.PathLike
        Output folder: ``{action}/person{XX}_{action}_d{Y}.npy`` (uint8 ``(T, H, W)``) and
        ``kth.json``.
    size : int or (int, int)
        Frame size ``(height, width)`` (an int for a square): 128 by default, 120 for the
        paper release's preprocessing.
    layout : {"auto", "avi", "jpeg"}
        Source layout (``"auto"`` detects it).
    resample : str
        Resampling filter (see :func:`~.video.resize_frames`); antialiased by default.
    workers : int
        Processes decoding videos in parallel (1: in this process).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    dict
        The index written to ``{out}/kth.json``: ``videos`` (person, action, scenario,
        frames, path, source), ``failed`` (name, source, error), ``rejected`` (path,
        reason), ``missing`` (names), the settings, and ``counts`` of written, kept and
        failed videos in this run.

    Raises
    ------
    FileNotFoundError
        If ``raw`` holds no KTH video.
    ValueError
        On a bad argument, or when ``out`` already holds KTH prepared with another size
        or filter (choose another folder rather than mix the two).
    """
    from tqdm.auto import tqdm

    target_size = parse_size(size)
    check_choice("resample", resample, RESAMPLE_FILTERS)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    raw, out = Path(raw), Path(out)
    found = find_kth_sources(raw, layout)
    index_path = out / INDEX_FILE
    if index_path.is_file():
        previous = _read_index_json(index_path)
        settings = (previous.get("size"), previous.get("resample"))
        if settings != (list(target_size), resample):
            raise ValueError(
                f"{out} already holds KTH prepared with size {settings[0]} and resample "
                f"{settings[1]!r}; asked for {list(target_size)} and {resample!r}: use "
                f"another output folder or delete {out}"
            )
    out.mkdir(parents=True, exist_ok=True)
    stale = _remove_stale_temporaries(out)

    results: Dict[KTHName, Dict] = {}
    jobs = [(source, out / source.name.prepared_path) for source in found.sources]
    bar = tqdm(total=len(jobs), desc="kth", unit="video", disable=not progress)
    with bar:
        if workers == 1:
            for source, target in jobs:
                results[source.name] = prepare_one(source, target, target_size, resample)
                _show(bar, source, results[source.name])
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {
                    pool.submit(prepare_one, source, target, target_size, resample): source
                    for source, target in jobs
                }
                for future in as_completed(futures):
                    source = futures[future]
                    results[source.name] = future.result()
                    _show(bar, source, results[source.name])

    videos, failed = [], []
    for source in found.sources:
        result = results[source.name]
        entry_source = _relative(source.path, raw)
        if result["status"] == "failed":
            failed.append({"name": source.name.stem, "source": entry_source, "error": result["error"]})
            continue
        videos.append({
            "person": source.name.person,
            "action": source.name.action,
            "scenario": source.name.scenario,
            "frames": result["frames"],
            "path": source.name.prepared_path,
            "source": entry_source,
        })
    statuses = Counter(result["status"] for result in results.values())
    index = {
        "dataset": "kth",
        "format": "one uint8 .npy per video, shape (T, H, W), gray, values 0-255",
        "size": list(target_size),
        "resample": resample,
        "layout": found.layout,
        "raw": str(raw),
        "videos": videos,
        "failed": failed,
        "rejected": [{"path": _relative(p, raw), "reason": reason} for p, reason in found.rejected],
        "missing": [name.stem for name in found.missing],
        "counts": {
            "videos": len(videos),
            "written": statuses["written"],
            "kept": statuses["kept"],
            "failed": statuses["failed"],
            "rejected": len(found.rejected),
            "missing": len(found.missing),
            "stale_temporaries_removed": stale,
            "frames": int(sum(v["frames"] for v in videos)),
        },
    }
    write_json_atomic(index_path, index)
    return index


def _show(bar, source: KTHSource, result: Dict) -> None:
    if result["status"] == "failed":
        bar.write(f"warning: skipped {source.path}: {result['error']}")
    bar.update(1)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class KTHVideo:
    """One prepared video, as listed in the index.

    Attributes
    ----------
    person, action, scenario
        Its :class:`KTHName`.
    frames : int
        Number of frames ``T``.
    path : pathlib.Path
        Its ``.npy`` file (absolute).
    """

    person: int
    action: str
    scenario: int
    frames: int
    path: Path


@dataclass(frozen=True)
class KTHIndex:
    """A prepared KTH folder: frame size and the videos (see :func:`load_kth_index`)."""

    root: Path
    size: Tuple[int, int]
    videos: Tuple[KTHVideo, ...]
    failed: Tuple[str, ...]


def _read_index_json(path: Path) -> Dict:
    import json

    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetFileError(f"{path}: unreadable KTH index ({error}); re-run {_PREPARE_HINT}") from error
    if not isinstance(index, dict) or index.get("dataset") != "kth":
        raise DatasetFileError(f"{path}: not a KTH index (no \"dataset\": \"kth\"); re-run {_PREPARE_HINT}")
    return index


def load_kth_index(root: PathLike, check_files: bool = True) -> KTHIndex:
    """Read and validate a folder written by :func:`prepare_kth`.

    Parameters
    ----------
    root : str or os.PathLike
        The output folder of ``prepare kth``.
    check_files : bool
        Also read each video file's header and check it holds uint8 ``(frames, H, W)`` as
        the index says (600 small reads).

    Raises
    ------
    FileNotFoundError
        If the folder, its ``kth.json`` or a listed video file is missing.
    DatasetFileError
        If the index is malformed or a video file disagrees with it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"KTH prepared folder not found: {root}; create it with {_PREPARE_HINT}")
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{root} holds no {INDEX_FILE}: not a prepared KTH folder; create it with {_PREPARE_HINT}"
        )
    index = _read_index_json(index_path)
    try:
        size = parse_size(tuple(index["size"]), "size")
        entries = index["videos"]
        if not isinstance(entries, list):
            raise TypeError("'videos' is not a list")
        videos = []
        for position, entry in enumerate(entries):
            name = KTHName(int(entry["person"]), str(entry["action"]), int(entry["scenario"]))
            if parse_kth_name(name.stem) != name:  # validates the ranges
                raise ValueError(f"video {position} is not a KTH name")
            frames = int(entry["frames"])
            if frames < 1:
                raise ValueError(f"video {position} ({name.stem}) has {frames} frames")
            videos.append(KTHVideo(name.person, name.action, name.scenario, frames, root / entry["path"]))
        failed = tuple(str(f["name"]) for f in index.get("failed", []))
    except (KeyError, TypeError, ValueError) as error:
        raise DatasetFileError(
            f"{index_path}: malformed KTH index ({type(error).__name__}: {error}); re-run {_PREPARE_HINT}"
        ) from error
    if check_files:
        for video in videos:
            if not video.path.is_file():
                raise FileNotFoundError(f"{index_path} lists {video.path}, which does not exist")
            shape = read_npy_shape(video.path)
            if shape != (video.frames,) + size:
                raise DatasetFileError(
                    f"{video.path}: expected uint8 {(video.frames,) + size} as {index_path} "
                    f"says, found {'an unreadable or truncated file' if shape is None else shape}"
                )
    return KTHIndex(root, size, tuple(videos), failed)


def parse_protocol(protocol: Union[str, Sequence[int]]) -> Tuple[int, int]:
    """``"10->20"``, ``"10->40"`` (:data:`KTH_PROTOCOLS`) or ``(input, future)`` as ints."""
    if isinstance(protocol, str):
        if protocol not in KTH_PROTOCOLS:
            raise ValueError(
                f"protocol must be one of {sorted(KTH_PROTOCOLS)} or (input, future), got {protocol!r}"
            )
        return KTH_PROTOCOLS[protocol]
    try:
        inputs, future = (int(v) for v in protocol)
    except (TypeError, ValueError):
        raise ValueError(f"protocol must be a name or (input, future), got {protocol!r}") from None
    if inputs < 1 or future < 1:
        raise ValueError(f"protocol needs input and future frames >= 1, got {protocol!r}")
    return inputs, future


def default_strides(window: int) -> Dict[str, int]:
    """Per-action window strides: ``window`` (no overlap), 3 for jogging and running."""
    return {a: FAST_ACTION_STRIDE if a in FAST_ACTIONS else int(window) for a in KTH_ACTIONS}


def window_starts(n_frames: int, window: int, stride: int) -> range:
    """First frames of the windows of ``window`` frames, every ``stride``, inside ``n_frames``."""
    return range(0, max(0, n_frames - window + 1), stride)


def split_persons(split: str, val_persons: Iterable[int] = ()) -> Tuple[int, ...]:
    """Persons of ``split``: train 1-16 minus ``val_persons``, val ``val_persons``, test 17-25."""
    val = tuple(sorted({int(p) for p in val_persons}))
    outside = [p for p in val if p not in TRAIN_PERSONS]
    if outside:
        raise ValueError(f"val_persons must be training persons 1-16, got {outside}")
    if split == "train":
        persons = tuple(p for p in TRAIN_PERSONS if p not in val)
        if not persons:
            raise ValueError("val_persons takes every training person; none left to train on")
        return persons
    if split == "val":
        if not val:
            raise ValueError("split 'val' needs val_persons (some of the training persons 1-16)")
        return val
    if split == "test":
        return TEST_PERSONS
    raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")


@dataclass(frozen=True)
class KTHWindow:
    """Where a dataset item comes from: a video and the window's first frame."""

    video: KTHVideo
    start: int


class KTHDataset(Dataset):
    """Windows of consecutive KTH frames as float tensors ``[T, 1, H, W]`` in [0, 1].

    Each item is ``input + future`` frames of one video (``T`` = the window length); the
    training loop feeds the first ``input_frames`` and scores the rest. Video files are
    memory-mapped per item, so the dataset holds only the index and pickles cheaply into
    DataLoader workers.

    Parameters
    ----------
    root : str or os.PathLike
        A folder written by ``prepare kth`` (:func:`prepare_kth`).
    split : {"train", "val", "test"}
        Persons 1-16 (minus ``val_persons``), ``val_persons``, or 17-25.
    protocol : str or (int, int)
        ``"10->20"`` (default), ``"10->40"``, or ``(input_frames, future_frames)``.
    strides : int or dict, optional
        Window stride: one int for every action, or a dict ``{action: stride}`` overriding
        :func:`default_strides` (non-overlapping windows; 3 for jogging and running).
    val_persons : iterable of int
        Training persons held out as the validation split.
    persons : iterable of int, optional
        Use exactly these persons instead of the split's.

    Raises
    ------
    FileNotFoundError, DatasetFileError
        If ``root`` is not a complete prepared folder (see :func:`load_kth_index`).
    ValueError
        On a bad argument, or when no window fits in the split's videos.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        *,
        protocol: Union[str, Sequence[int]] = "10->20",
        strides: Optional[Union[int, Mapping[str, int]]] = None,
        val_persons: Iterable[int] = (),
        persons: Optional[Iterable[int]] = None,
    ) -> None:
        self.input_frames, self.future_frames = parse_protocol(protocol)
        self.n_frames = self.input_frames + self.future_frames
        self.strides = self._strides(strides, self.n_frames)
        if persons is None:
            self.persons = split_persons(split, val_persons)
        else:
            self.persons = tuple(sorted({int(p) for p in persons}))
            unknown = [p for p in self.persons if p not in KTH_PERSONS]
            if unknown or not self.persons:
                raise ValueError(f"persons must be a non-empty set of 1-25, got {sorted(persons)}")
        self.split = split
        index = load_kth_index(root)
        self.root = index.root
        self.size = index.size
        self.videos = tuple(v for v in index.videos if v.person in self.persons)
        starts = [
            (number, start)
            for number, video in enumerate(self.videos)
            for start in window_starts(video.frames, self.n_frames, self.strides[video.action])
        ]
        if not starts:
            raise ValueError(
                f"no window of {self.n_frames} frames fits in the {len(self.videos)} videos of "
                f"persons {list(self.persons)} in {self.root}"
            )
        # Two int arrays, not a list of objects: cheap to pickle into every worker.
        self._video_of = np.array([s[0] for s in starts], dtype=np.int64)
        self._start_of = np.array([s[1] for s in starts], dtype=np.int64)

    @staticmethod
    def _strides(strides, window: int) -> Dict[str, int]:
        table = default_strides(window)
        if strides is None:
            return table
        if isinstance(strides, Mapping):
            unknown = set(strides) - set(KTH_ACTIONS)
            if unknown:
                raise ValueError(f"strides names unknown actions {sorted(unknown)}; actions: {KTH_ACTIONS}")
            table.update(strides)
        else:
            table = {action: strides for action in KTH_ACTIONS}
        for action, stride in table.items():
            if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
                raise ValueError(f"stride of {action} must be an integer >= 1, got {stride!r}")
        return {action: int(stride) for action, stride in table.items()}

    def __len__(self) -> int:
        return len(self._start_of)

    @property
    def frame_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one frame: ``(1, H, W)``."""
        return (1,) + self.size

    def window(self, index: int) -> KTHWindow:
        """The video and first frame of item ``index`` (for per-action scores)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} KTH windows")
        return KTHWindow(self.videos[int(self._video_of[index])], int(self._start_of[index]))

    def windows_per_action(self) -> Dict[str, int]:
        """Number of items of each action."""
        counts = Counter(self.videos[int(v)].action for v in self._video_of)
        return {action: counts.get(action, 0) for action in KTH_ACTIONS}

    def sequence(self, index: int) -> np.ndarray:
        """Item ``index`` as uint8 ``(T, H, W)``."""
        where = self.window(index)
        frames = np.load(where.video.path, mmap_mode="r", allow_pickle=False)
        return np.array(frames[where.start : where.start + self.n_frames])

    def __getitem__(self, index: int) -> torch.Tensor:
        return frames_to_tensor(self.sequence(index))


class KTHActions(Dataset):
    """KTH windows labelled with their action: ``(frames [T, 1, H, W], action index)``.

    Parameters
    ----------
    root : str or os.PathLike
        A ``prepare kth`` folder.
    split : {"train", "val", "test"}
        See :class:`KTHDataset`.
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
