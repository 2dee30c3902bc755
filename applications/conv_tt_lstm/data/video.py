"""Video and frame-folder reading: PyAV decoding, Pillow resizing, uniform frame sampling.

Every reader returns uint8 numpy frames, ``(T, H, W)`` for ``color="gray"`` and
``(T, H, W, 3)`` for ``color="rgb"``, which :func:`~.sequence_files.frames_to_tensor` turns
into float ``[T, C, H, W]`` in [0, 1].

- :func:`read_video` decodes the first video stream of a file with PyAV (FFmpeg), so any
  container and codec FFmpeg knows works: the KTH AVIs, the Something-Something V2 VP9
  webm clips.
- :func:`read_frame_folder` reads a folder of numbered images (``image_0001.jpg``, ...) with
  Pillow, the layout in which many copies of KTH circulate.
- Resizing (:func:`resize_frames`) uses Pillow's convolution resampling, whose filter
  support widens with the reduction factor, so a downscale averages the pixels it merges
  instead of aliasing (a plain bilinear lookup, as in ``torch.nn.functional.interpolate``
  without ``antialias``, would drop most of them).
- Sampling: ``n_frames`` picks frames evenly spread over the whole video
  (:func:`uniform_indices`); the frame count comes from decoding, never from container
  metadata (webm files do not record it).

A file that cannot be decoded raises :class:`VideoDecodeError`, which names the file; a
file that does not exist raises :class:`FileNotFoundError`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ..checks import check_choice, check_int
from ..files import atomic_path

PathLike = Union[str, "os.PathLike[str]"]
SizeArg = Union[int, Tuple[int, int], Sequence[int]]

#: Colour modes: PyAV's output pixel format and Pillow's image mode for each.
COLORS = {"gray": ("gray", "L"), "rgb": ("rgb24", "RGB")}

#: Resampling filters by name (Pillow's; all but ``nearest`` antialias when downscaling).
RESAMPLE_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")

#: File names of a frame folder in the common KTH layout: ``image_0001.jpg``, ...
FRAME_FILE_PATTERN = r"image_(\d+)\.(?:jpe?g|png)"


class VideoDecodeError(RuntimeError):
    """A video (or a frame of a frame folder) exists but cannot be decoded.

    Attributes
    ----------
    path : pathlib.Path
        The offending file.
    reason : str
        What went wrong, from the decoder.
    """

    def __init__(self, path: PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.reason))


def parse_size(size: Optional[SizeArg], name: str = "size") -> Optional[Tuple[int, int]]:
    """``None``, an int ``s`` (``s x s``) or ``(height, width)`` as ``(height, width)``."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        shape: Tuple[int, ...] = (int(size), int(size))
    elif isinstance(size, (tuple, list)) and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size
    ):
        shape = tuple(int(s) for s in size)
    else:
        raise ValueError(f"{name} must be None, an int or (height, width), got {size!r}")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return shape  # type: ignore[return-value]


def _check_color(color: str) -> str:
    check_choice("color", color, sorted(COLORS))
    return color


def _pillow_filter(resample: str):
    from PIL import Image

    check_choice("resample", resample, RESAMPLE_FILTERS)
    return getattr(Image.Resampling, resample.upper())


def uniform_indices(total: int, count: int) -> np.ndarray:
    """``count`` frame indices spread evenly over ``total`` frames.

    Index ``i`` is the frame at the centre of the ``i``-th of ``count`` equal segments,
    ``floor((i + 0.5) * total / count)``: increasing, inside ``[0, total)``, symmetric about
    the middle of the video. With fewer frames than asked for, frames repeat (each index
    still appears in order), so every clip yields exactly ``count`` frames.

    Parameters
    ----------
    total : int
        Frames in the video (>= 1).
    count : int
        Frames wanted (>= 1).

    Returns
    -------
    numpy.ndarray
        int64 ``(count,)``.
    """
    check_int("total", total)
    check_int("count", count)
    # Integer arithmetic: floor((2i + 1) * total / (2 count)), no float rounding at the edges.
    return (2 * np.arange(count, dtype=np.int64) + 1) * int(total) // (2 * int(count))


def resize_frames(
    frames: np.ndarray, size: Optional[SizeArg], resample: str = "bilinear"
) -> np.ndarray:
    """Resize uint8 frames ``(T, H, W)`` or ``(T, H, W, 3)`` to ``size`` with Pillow.

    Parameters
    ----------
    frames : numpy.ndarray
        uint8 frames, gray ``(T, H, W)`` or RGB ``(T, H, W, 3)``.
    size : int or (int, int) or None
        Target ``(height, width)`` (an int for a square); ``None`` or the current size
        returns the frames unchanged.
    resample : str
        One of :data:`RESAMPLE_FILTERS`. Every filter but ``"nearest"`` antialiases when
        downscaling (its support is scaled by the reduction factor).

    Returns
    -------
    numpy.ndarray
        uint8 ``(T, height, width[, 3])``.
    """
    from PIL import Image

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or not (
        frames.ndim == 3 or (frames.ndim == 4 and frames.shape[-1] == 3)
    ):
        raise ValueError(
            f"frames must be uint8 (T, H, W) or (T, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    target = parse_size(size)
    method = _pillow_filter(resample)
    if target is None or tuple(frames.shape[1:3]) == target:
        return frames
    height, width = target
    out = np.empty((len(frames), height, width) + frames.shape[3:], dtype=np.uint8)
    for t, frame in enumerate(frames):
        out[t] = np.asarray(Image.fromarray(frame).resize((width, height), method))
    return out


def _convert(image, color: str, size: Optional[Tuple[int, int]], method) -> np.ndarray:
    """A Pillow image in ``color``, resized to ``size``, as a uint8 array."""
    mode = COLORS[color][1]
    if image.mode != mode:
        image = image.convert(mode)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), method)
    return np.asarray(image, dtype=np.uint8)


def _stack(frames: List[np.ndarray], path: Path) -> np.ndarray:
    shapes = {frame.shape for frame in frames}
    if len(shapes) > 1:
        raise VideoDecodeError(
            path, f"frames differ in size ({sorted(shapes)}); pass size= to resize them"
        )
    return np.stack(frames)


#: Suffixes of the video files the commands decode (any container FFmpeg reads works).
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv")


def _bits(frame) -> int:
    """Bits per sample of a decoded frame's first plane (8 for ordinary video)."""
    try:
        return max(component.bits for component in frame.format.components)
    except (AttributeError, ValueError):
        return 8


def write_video(path: PathLike, frames: np.ndarray, fps: float = 4.0) -> Path:
    """Encode uint8 frames ``(T, H, W)`` or ``(T, H, W, 3)`` as an H.264 mp4, atomically.

    Odd frame sizes are padded by one replicated row / column (yuv420p needs even sizes).
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or len(frames) == 0:
        raise ValueError(f"write_video needs uint8 (T, H, W[, 3]) frames, got "
                         f"{frames.dtype} {frames.shape}")
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
    frames = np.pad(frames, pad, mode="edge")
    from fractions import Fraction

    with atomic_path(path) as temporary:
        with av.open(str(temporary), "w", format="mp4") as container:
            stream = container.add_stream("libx264" if "libx264" in av.codecs_available
                                          else "mpeg4", rate=Fraction(fps).limit_denominator(1000))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return Path(path)


def read_video(
    path: PathLike,
    *,
    color: str = "gray",
    size: Optional[SizeArg] = None,
    resample: str = "bilinear",
    n_frames: Optional[int] = None,
    deep: bool = False,
) -> np.ndarray:
    """Decode a video file's first video stream into uint8 frames.

    Parameters
    ----------
    path : str or os.PathLike
        The video (any container and codec FFmpeg decodes: AVI, webm/VP9, mp4, ...).
    color : {"gray", "rgb"}
        Gray frames ``(T, H, W)`` (FFmpeg's luma conversion) or RGB ``(T, H, W, 3)``.
    size : int or (int, int), optional
        Resize every frame to ``(height, width)`` (an int for a square); default: keep.
    resample : str
        Resampling filter, one of :data:`RESAMPLE_FILTERS` (see :func:`resize_frames`).
    n_frames : int, optional
        Return this many frames spread evenly over the whole video
        (:func:`uniform_indices`; frames repeat if the video is shorter); default: all.
    deep : bool
        Frames of a video with more than 8 bits per sample (10-, 12-, 16-bit), gray or
        RGB, come back as uint16 with every level kept (default: uint8, as for training
        data).

    Returns
    -------
    numpy.ndarray
        uint8 ``(T, H, W)`` or ``(T, H, W, 3)``; uint16 for a deep video with ``deep=True``
        (levels scaled to 0-65535).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    VideoDecodeError
        If FFmpeg cannot open or decode it, it has no video stream, or no frame decodes.
    """
    import av
    from av.video.reformatter import VideoReformatter
    from PIL import Image

    path = Path(path)
    color = _check_color(color)
    target = parse_size(size)
    method = _pillow_filter(resample)
    if n_frames is not None:
        uniform_indices(1, n_frames)  # validates n_frames
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    # One reformatter for the whole video: it keeps FFmpeg's conversion context, which
    # otherwise is rebuilt for every frame (three times slower on small frames).
    reformatter = VideoReformatter()
    pixel_format = COLORS[color][0]

    def deep_plane(plane: np.ndarray) -> np.ndarray:
        # One 16-bit plane, resized in float so no level is lost to 8 bits.
        if target is not None and plane.shape != target:
            image = Image.fromarray(plane.astype(np.float32), "F")
            plane = np.clip(np.rint(np.asarray(image.resize((target[1], target[0]), method))),
                            0, 65535)
        return np.asarray(plane, dtype=np.uint16)

    def convert(frame) -> np.ndarray:
        if deep and _bits(frame) > 8:
            # Every level of a 10/12/16-bit video kept: 16-bit luma or 48-bit RGB.
            if color == "gray":
                return deep_plane(reformatter.reformat(frame, format="gray16le").to_ndarray())
            rgb = reformatter.reformat(frame, format="rgb48le").to_ndarray()
            return np.stack([deep_plane(rgb[..., c]) for c in range(3)], axis=-1)
        array = reformatter.reformat(frame, format=pixel_format).to_ndarray()
        return _convert(Image.fromarray(array), color, target, method)

    try:
        with av.open(str(path), "r") as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "the file holds no video stream")
            stream = container.streams.video[0]
            if n_frames is None:
                frames = [convert(frame) for frame in container.decode(stream)]
            else:
                # The length is only known once decoded: keep the decoded frames (compact
                # YUV) and convert just the chosen ones.
                decoded = list(container.decode(stream))
                if not decoded:
                    raise VideoDecodeError(path, "no frame could be decoded")
                frames = [convert(decoded[i]) for i in uniform_indices(len(decoded), n_frames)]
    except av.FFmpegError as error:
        raise VideoDecodeError(path, f"{type(error).__name__}: {error}") from error
    except (OSError, ValueError, EOFError) as error:  # e.g. a container PyAV rejects late
        raise VideoDecodeError(path, f"{type(error).__name__}: {error}") from error
    if not frames:
        raise VideoDecodeError(path, "no frame could be decoded")
    return _stack(frames, path)


def list_frame_files(folder: PathLike, pattern: str = FRAME_FILE_PATTERN) -> List[Path]:
    """The frame files of a frame folder, in frame-number order.

    Parameters
    ----------
    folder : str or os.PathLike
        A folder of numbered images.
    pattern : str
        A regular expression matched against each whole file name, whose first group is
        the frame number (default ``image_(\\d+).jpg``, ``.jpeg`` or ``.png``). Other files
        are ignored.

    Returns
    -------
    list of pathlib.Path
        Sorted by frame number (numerically: ``image_10`` after ``image_9``).

    Raises
    ------
    FileNotFoundError
        If ``folder`` does not exist or holds no matching file.
    ValueError
        If two files carry the same frame number.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"frame folder not found: {folder}")
    regex = re.compile(pattern, re.IGNORECASE)
    numbered = []
    for entry in folder.iterdir():
        match = regex.fullmatch(entry.name)
        if match and entry.is_file():
            numbered.append((int(match.group(1)), entry))
    if not numbered:
        raise FileNotFoundError(f"no frame files matching {pattern!r} in {folder}")
    numbered.sort()
    numbers = [number for number, _ in numbered]
    if len(set(numbers)) != len(numbers):
        duplicate = next(n for n in numbers if numbers.count(n) > 1)
        raise ValueError(f"{folder}: several files carry frame number {duplicate}")
    return [entry for _, entry in numbered]


def read_frame_folder(
    folder: PathLike,
    *,
    color: str = "gray",
    size: Optional[SizeArg] = None,
    resample: str = "bilinear",
    n_frames: Optional[int] = None,
    pattern: str = FRAME_FILE_PATTERN,
) -> np.ndarray:
    """Read a folder of numbered frame images (JPEG or PNG) with Pillow.

    Parameters
    ----------
    folder : str or os.PathLike
        The frame folder, e.g. ``boxing/person01_boxing_d1_uncomp/`` holding
        ``image_0001.jpg``, ``image_0002.jpg``, ...
    color, size, resample, n_frames
        As in :func:`read_video` (gray uses Pillow's ITU-R 601-2 luma).
    pattern : str
        Frame file names, see :func:`list_frame_files`.

    Returns
    -------
    numpy.ndarray
        The frames, as :func:`read_video` returns them.

    Raises
    ------
    FileNotFoundError
        If the folder does not exist or holds no frame file.
    VideoDecodeError
        If a frame file cannot be decoded (naming that file).
    """
    from PIL import Image, UnidentifiedImageError

    color = _check_color(color)
    target = parse_size(size)
    method = _pillow_filter(resample)
    files = list_frame_files(folder, pattern)
    if n_frames is not None:
        files = [files[i] for i in uniform_indices(len(files), n_frames)]
    frames = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()  # decode now: a truncated JPEG fails here, not later
                frames.append(_convert(image, color, target, method))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise VideoDecodeError(file, f"{type(error).__name__}: {error}") from error
    return _stack(frames, Path(folder))
