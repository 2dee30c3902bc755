"""Inference helpers: load any checkpoint, read a user's frames, fit them to the model, predict.

* :func:`load_model`: our checkpoints (:func:`~.checkpoint.save_checkpoint`) and the paper
  release's (:func:`~.nvlabs.load_nvlabs_checkpoint`), told apart by their content.
* :func:`read_input_frames`: a user's ``.npz`` / ``.npy`` or folder of frame images as float
  ``[N, T, C, H, W]`` in ``[0, 1]``.
* :func:`fit_frames`: converts channels (RGB <-> gray) and resizes to what the model takes,
  with a clear error when the frame size does not suit its ``patch_size``.
* :func:`predict_frames`: batched rollout on a device under a chosen precision.
* :func:`predict_file`: all of the above for a file or folder of frames, writing the
  predictions (npy, one PNG per frame, GIF and grid, an mp4, ``predict.json``).
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from tt_conv.profile import count_parameters

from .checkpoint import (
    CHECKPOINT_FORMAT,
    RESERVED_KEYS,
    CheckpointError,
    load_checkpoint,
    read_file,
)
from .data.sequence_files import NPZ_KEY
from .data.video import VIDEO_SUFFIXES, VideoDecodeError, read_video, write_video
from .files import atomic_path, write_json_atomic
from .model import ArchitectureConfig, VideoPredictionNetwork
from .nvlabs import load_nvlabs_checkpoint
from .plots import save_prediction_gif, save_prediction_grid, save_sequence_figures
from .precision import resolve_precision
from .training.distributed import choose_device

PathLike = Union[str, "os.PathLike[str]"]

#: Array layouts :func:`read_input_frames` understands (N sequences, T frames, C channels).
ARRAY_LAYOUTS: Tuple[str, ...] = ("auto", "THW", "TCHW", "THWC", "NTHW", "TNHW", "NTCHW", "NTHWC")
#: Image suffixes of a frame folder.
IMAGE_SUFFIXES: Tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: Pillow modes of gray images deeper than 8 bits (16-bit PNGs open as one of them).
_DEEP_GRAY = ("I", "I;16", "I;16B", "I;16L", "I;16N")

#: ITU-R 601-2 luma weights (what Pillow's "L" conversion uses).
_LUMA = (0.299, 0.587, 0.114)


class InputFramesError(ValueError):
    """A user's input frames cannot be read or do not fit the model; the message says why."""


# ------------------------------------------------------------------------- checkpoints


def load_model(
    path: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    output_sigmoid: Optional[bool] = None,
) -> Tuple[VideoPredictionNetwork, Dict[str, Any]]:
    """The network of a checkpoint, ours or the paper release's, in eval mode on ``device``.

    Parameters
    ----------
    path : str or os.PathLike
        A ``torch.save`` file: our format (``format`` = :data:`~.checkpoint.CHECKPOINT_FORMAT`) or
        the release's state dict (optionally under ``model_state_dict``).
    device : str or torch.device
        Where the model goes.
    output_sigmoid : bool, optional
        Release checkpoints only (their shapes cannot tell): the network was trained with
        a sigmoid on its output. The official ones were not (the default).

    Returns
    -------
    (model, info)
        ``info``: ``{"checkpoint", "layout" ("tt-conv" or "release"), "architecture",
        "parameters"}`` plus, for ours, the checkpoint's JSON-friendly extra fields.

    Raises
    ------
    CheckpointError
        Missing or unreadable file, or weights that fit no architecture.
    """
    path = Path(path)
    content = read_file(path)
    info: Dict[str, Any] = {"checkpoint": str(path)}
    if content.get("format") == CHECKPOINT_FORMAT:
        if output_sigmoid is not None:
            raise CheckpointError(
                "output_sigmoid (--release-output-sigmoid) applies to release checkpoints only; "
                f"{path} records its own architecture"
            )
        model, checkpoint = load_checkpoint(content)
        info["layout"] = "tt-conv"
        for key, value in checkpoint.items():
            if key not in RESERVED_KEYS and _plain(value):
                info[key] = value
    else:
        arch = {} if output_sigmoid is None else {"output_sigmoid": bool(output_sigmoid)}
        model = load_nvlabs_checkpoint(content, **arch)
        info["layout"] = "release"
    info["architecture"] = model.config.to_dict()
    info["parameters"] = count_parameters(model)
    return model.to(device).eval(), info


def _plain(value: Any) -> bool:
    """JSON-friendly (no tensors): worth copying into a result file."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


# ------------------------------------------------------------------------------ inputs


def _natural_key(path: Path):
    # frame_2.png before frame_10.png
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def read_image_folder(folder: PathLike) -> np.ndarray:
    """The images of ``folder`` (PNG/JPEG, natural name order) as uint8 ``(T, H, W, 3)`` or
    ``(T, H, W)`` when every image is grayscale; uint16 ``(T, H, W)`` when a gray frame
    has 16 bits (then every level is kept, and 8-bit frames are scaled exactly).

    Raises
    ------
    InputFramesError
        No image in the folder, an unreadable image, or images of different sizes.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=_natural_key)
    if not files:
        raise InputFramesError(f"{folder}: no {'/'.join(IMAGE_SUFFIXES)} frame images in the folder")
    images: List[Image.Image] = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                images.append(image.copy())
        except (OSError, UnidentifiedImageError) as error:
            raise InputFramesError(f"{file}: unreadable image ({error})") from None
    sizes = {image.size for image in images}
    if len(sizes) > 1:
        raise InputFramesError(
            f"{folder}: frames differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}); "
            "every frame of a sequence must be the same size"
        )
    deep_color = [_is_deep_color_png(file) for file in files]
    if any(deep_color):
        # 16-bit RGB(A) PNGs: Pillow reads them as 8-bit RGB (dropping the low byte with no
        # warning), so they are decoded by PyAV, every level kept; the other frames are
        # scaled exactly to 16 bits (v * 257) and gray ones repeated into RGB.
        frames = []
        for file, image, deep in zip(files, images, deep_color):
            if deep:
                frames.append(_read_deep_color_png(file))
            elif image.mode in _DEEP_GRAY:
                frames.append(np.repeat(np.asarray(image).astype(np.uint16)[..., None], 3, -1))
            else:
                frames.append(np.asarray(image.convert("RGB")).astype(np.uint16) * 257)
        return np.stack(frames)
    gray = all(image.mode in ("L", "1") + _DEEP_GRAY for image in images)
    if gray and any(image.mode in _DEEP_GRAY for image in images):
        # 16-bit gray: kept exactly (Pillow's "L" conversion would clip it to 0 / 255);
        # 8-bit frames among them are scaled exactly (v * 257: 255 -> 65535).
        frames = []
        for file, image in zip(files, images):
            if image.mode in _DEEP_GRAY:
                values = np.asarray(image).astype(np.int64)
                if values.min() < 0 or values.max() > 65535:
                    raise InputFramesError(f"{file}: {image.mode} values outside 0-65535 "
                                           f"({values.min()} to {values.max()})")
                frames.append(values.astype(np.uint16))
            else:
                frames.append(np.asarray(image.convert("L")).astype(np.uint16) * 257)
        return np.stack(frames)
    return np.stack([np.asarray(image.convert("L" if gray else "RGB")) for image in images])


def _is_deep_color_png(file: Path) -> bool:
    """Whether ``file`` is a PNG of 16-bit RGB or RGBA samples (its IHDR chunk says so)."""
    with open(file, "rb") as handle:
        header = handle.read(26)
    return (len(header) == 26 and header[:8] == b"\x89PNG\r\n\x1a\n"
            and header[12:16] == b"IHDR" and header[24] == 16 and header[25] in (2, 6))


def _read_deep_color_png(file: Path) -> np.ndarray:
    """A 16-bit RGB(A) PNG as ``[H, W, 3]`` uint16, decoded by PyAV (alpha dropped)."""
    import av

    try:
        with av.open(str(file)) as container:
            frame = next(container.decode(video=0))
    except (av.error.FFmpegError, StopIteration) as error:
        raise InputFramesError(f"{file}: unreadable 16-bit PNG ({error})") from None
    return frame.to_ndarray(format="rgb48le")


def _guess_layout(array: np.ndarray, path: Path) -> str:
    if array.ndim == 3:
        return "THW"
    if array.ndim == 4:
        if path.name.startswith("mnist_test_seq"):
            return "TNHW"
        return "NTHW"
    if array.ndim == 5:
        c_first, c_last = array.shape[2] in (1, 3), array.shape[4] in (1, 3)
        if c_first != c_last:
            return "NTCHW" if c_first else "NTHWC"
        raise InputFramesError(
            f"{path}: cannot tell whether {tuple(array.shape)} is (N, T, C, H, W) or "
            "(N, T, H, W, C); pass --layout NTCHW or NTHWC"
        )
    raise InputFramesError(
        f"{path}: expected frames (T, H, W), (N, T, H, W) or (N, T, C, H, W), got a "
        f"{array.ndim}-D array of shape {tuple(array.shape)}"
    )


def _to_ntchw(array: np.ndarray, layout: str, path: Path) -> np.ndarray:
    expected = len(layout)
    if array.ndim != expected:
        raise InputFramesError(
            f"{path}: layout {layout} needs a {expected}-D array, got shape {tuple(array.shape)}")
    axes = {name: i for i, name in enumerate(layout)}
    if "N" not in axes:
        array, axes = array[None], {name: i + 1 for name, i in axes.items()}
        axes["N"] = 0
    if "C" not in axes:
        array = array[..., None]
        axes["C"] = array.ndim - 1
    return np.transpose(array, [axes[name] for name in "NTCHW"])


#: The first bytes of an .npy file (NumPy's format magic).
_NPY_MAGIC = b"\x93NUMPY"


def _is_array_file(path: Path) -> bool:
    """Whether ``path`` holds an .npy or .npz by its content, whatever its suffix."""
    with open(path, "rb") as handle:
        start = handle.read(len(_NPY_MAGIC))
    return start == _NPY_MAGIC or zipfile.is_zipfile(path)


def _read_array(path: Path) -> Tuple[np.ndarray, Optional[str]]:
    """The array of an .npy, or of an .npz (the release's ``data`` key, or its only array)."""

    try:
        if path.suffix.lower() == ".npz" or zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                if NPZ_KEY in names:
                    array = archive[NPZ_KEY]
                    return array, "NTHWC" if array.ndim == 5 else None
                if len(names) != 1:
                    raise InputFramesError(
                        f"{path}: holds arrays {names}; expected the release's 'data' array or "
                        "a single array")
                return archive[names[0]], None
        return np.load(path, allow_pickle=False), None
    except InputFramesError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputFramesError(f"{path}: not a readable .npy / .npz file ({error})") from None


def read_input_frames(path: PathLike, layout: str = "auto", *,
                      video_color: str = "rgb") -> np.ndarray:
    """A user's sequences as float32 ``[N, T, C, H, W]`` in ``[0, 1]``.

    Parameters
    ----------
    path : str or os.PathLike
        An ``.npy`` / ``.npz`` file, a video file, or a folder of frame images (one
        sequence, frames in natural name order: ``frame_2`` before ``frame_10``). A file
        with another suffix is read as an array when its content is one (NumPy's magic, a
        zip), else decoded as a video. Arrays are uint8 (0-255) or
        float in ``[0, 1]``; an npz holds the release's ``data`` array (``(N, T, H, W,
        C)``) or a single array.
    layout : str
        Axis order of an array: one of :data:`ARRAY_LAYOUTS`. ``"auto"``: 3-D ``THW``, 4-D
        ``NTHW`` (``TNHW`` for a file named ``mnist_test_seq*``), 5-D ``NTCHW`` or
        ``NTHWC`` by which axis has 1 or 3 entries.
    video_color : {"rgb", "gray"}
        How a video file (:data:`~.data.video.VIDEO_SUFFIXES`: mp4, avi, webm, mkv, ...)
        is decoded: one sequence of all its frames.

    Raises
    ------
    InputFramesError
        A missing or unreadable input, an unknown layout, or values outside the range.
    """
    path = Path(path)
    if layout not in ARRAY_LAYOUTS:
        raise InputFramesError(f"layout must be one of {ARRAY_LAYOUTS}, got {layout!r}")
    if not path.exists():
        raise InputFramesError(f"input not found: {path}")
    if path.is_dir():
        array, file_layout = read_image_folder(path), None
        layout = "THW" if array.ndim == 3 else "THWC"
    elif path.suffix.lower() in VIDEO_SUFFIXES:
        # Decoded by PyAV (gray from the luma plane, every level of a deep video kept).
        array = read_video(path, color=video_color, deep=True)
        layout = "THW" if array.ndim == 3 else "THWC"
    elif path.suffix.lower() not in (".npy", ".npz") and not _is_array_file(path):
        # Another suffix, not an array by its content: a video FFmpeg may know.
        try:
            array = read_video(path, color=video_color, deep=True)
        except VideoDecodeError as error:
            raise InputFramesError(
                f"{path}: neither an .npy / .npz array nor a video FFmpeg can decode "
                f"({error.reason}); give an .npy / .npz file, a folder of PNG / JPEG frames "
                "or a video file") from None
        layout = "THW" if array.ndim == 3 else "THWC"
    else:
        array, file_layout = _read_array(path)
        if layout == "auto":
            layout = file_layout or _guess_layout(array, path)
    frames = _to_ntchw(array, layout, path)
    if 0 in frames.shape:
        raise InputFramesError(f"{path}: empty frames of shape {tuple(frames.shape)} (as N, T, C, H, W)")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    if frames.dtype == np.uint16:  # 16-bit frames (PNG, arrays): every level kept
        return (frames.astype(np.float64) / 65535.0).astype(np.float32)
    if not np.issubdtype(frames.dtype, np.floating):
        raise InputFramesError(f"{path}: frames must be uint8 (0-255), uint16 (0-65535) or "
                               f"float in [0, 1], got {frames.dtype}")
    low, high = float(np.min(frames)), float(np.max(frames))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
        raise InputFramesError(
            f"{path}: float frames must lie in [0, 1], found values in [{low:g}, {high:g}]; "
            "scale them (or store uint8 0-255)"
        )
    return frames.astype(np.float32)


def fit_frames(frames: Union[np.ndarray, torch.Tensor], config: ArchitectureConfig,
               size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Frames ``[N, T, C, H, W]`` in ``[0, 1]`` as the model of ``config`` takes them.

    RGB becomes gray (ITU-R 601-2 luma) for a one-channel model and gray is repeated for a
    three-channel one; ``size`` ``(H, W)`` resizes (bilinear, antialiased).

    Raises
    ------
    InputFramesError
        Channels that cannot be converted, or a frame size not divisible by the model's
        ``patch_size`` (the message says which sizes would do).
    """
    frames = torch.as_tensor(frames, dtype=torch.float32)
    channels, wanted = frames.shape[2], config.image_channels
    if channels != wanted:
        if channels == 3 and wanted == 1:
            weights = torch.tensor(_LUMA).view(1, 1, 3, 1, 1)
            frames = (frames * weights).sum(dim=2, keepdim=True)
        elif channels == 1 and wanted == 3:
            frames = frames.expand(-1, -1, 3, -1, -1)
        else:
            raise InputFramesError(
                f"the frames have {channels} channel(s) but the model takes {wanted}; only "
                "RGB <-> gray are converted")
    if size is not None:
        n, t, c = frames.shape[:3]
        resized = F.interpolate(frames.reshape(n * t, c, *frames.shape[3:]), size=tuple(size),
                                mode="bilinear", antialias=True, align_corners=False)
        frames = resized.clamp(0.0, 1.0).reshape(n, t, c, *size)
    p = config.patch_size
    height, width = frames.shape[3:]
    if height % p or width % p:
        fit = (max(p, height // p * p), max(p, width // p * p))
        raise InputFramesError(
            f"frame size {height} x {width} is not divisible by the model's patch_size {p}; "
            f"resize the frames, e.g. --size {fit[0]} {fit[1]}")
    return frames.contiguous()


def predict_frames(
    model: torch.nn.Module,
    frames: torch.Tensor,
    future_frames: int,
    *,
    batch_size: int = 8,
    device: Union[str, torch.device] = "cpu",
    precision: str = "fp32",
    progress: bool = False,
) -> torch.Tensor:
    """The model's ``future_frames`` predictions after ``frames`` ``[N, T, C, H, W]``, batched.

    Returns float32 ``[N, future_frames, C, H, W]`` on the CPU, clamped to ``[0, 1]``.
    """
    from tqdm.auto import tqdm

    precision = resolve_precision(precision, device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outputs = []
    with torch.no_grad(), precision.autocast():
        for begin in tqdm(range(0, len(frames), batch_size), desc="predict", unit="batch",
                          disable=not progress):
            batch = frames[begin:begin + batch_size].to(device)
            outputs.append(model(batch, future_frames).float().clamp(0.0, 1.0).cpu())
    return torch.cat(outputs)


# ------------------------------------------------------------------------------ outputs


@dataclass(frozen=True)
class PredictionFiles:
    """What :func:`predict_file` predicted and wrote."""

    sequences: int
    input_frames: int
    future_frames: int
    frame_shape: Tuple[int, int, int]
    written: List[Path]
    notes: List[str] = field(default_factory=list)


def predict_file(checkpoint: PathLike, source: PathLike, future_frames: int, out: PathLike, *,
                 input_frames: Optional[int] = None, layout: str = "auto",
                 size: Optional[Sequence[int]] = None, batch_size: int = 8,
                 device: str = "auto", precision: str = "fp32",
                 release_output_sigmoid: bool = False, figure_samples: int = 4,
                 frame_pngs: bool = True, progress: bool = False) -> PredictionFiles:
    """A checkpoint's predictions of the ``future_frames`` after the frames of ``source``.

    Frames are read (:func:`read_input_frames`), fitted to the model (:func:`fit_frames`:
    channels, ``size``; without ``size``, frames of another size than the checkpoint's
    training frames, when it records them, are resized to that size, with a note), and the
    first ``input_frames`` (default: all) are given to the model; the following ones, when they cover the whole horizon, are drawn as the truth.
    Writes to ``out``: ``predictions.npy`` (float32 ``[N, future, C, H, W]`` in ``[0, 1]``),
    ``frames/seq{n}/frame_{t}.png`` (``t`` counting from the first input frame),
    ``predictions.gif``, ``predictions.png`` and ``predict.json``.

    Raises
    ------
    CheckpointError, InputFramesError, PrecisionError, ValueError
        Bad input, each naming what to change.
    """
    device = choose_device(device)
    resolve_precision(precision, device)
    model, info = load_model(checkpoint, device=device,
                             output_sigmoid=True if release_output_sigmoid else None)
    color = "gray" if model.config.image_channels == 1 else "rgb"
    frames = read_input_frames(source, layout, video_color=color)
    notes = []
    trained = info.get("frame_shape")  # (C, H, W) of the training frames, when recorded
    if size is None and trained is not None and tuple(frames.shape[3:]) != tuple(trained[1:]):
        size = tuple(trained[1:])
        notes.append(f"resized the {frames.shape[3]} x {frames.shape[4]} frames to "
                     f"{size[0]} x {size[1]}, the checkpoint's training frames (--size "
                     "chooses another size)")
    frames = fit_frames(frames, model.config, None if size is None else tuple(size))
    given = frames.shape[1]
    k = given if input_frames is None else input_frames
    if k > given:
        raise InputFramesError(f"--input-frames {k}, but {source} holds {given} frame(s) per "
                               f"sequence")
    inputs, truth = frames[:, :k], frames[:, k:k + future_frames]
    prediction = predict_frames(model, inputs, future_frames, batch_size=batch_size,
                                device=device, precision=precision, progress=progress)
    out = Path(out)
    written = [write_npy(out / "predictions.npy", prediction.numpy())]
    if frame_pngs:
        written.append(write_frame_pngs(out / "frames", prediction, first_number=k + 1))
    written += write_figures(out, inputs, truth, prediction, figure_samples)
    written.append(write_prediction_video(out / "predictions.mp4", inputs[0], prediction[0]))
    written.append(write_json_atomic(out / "predict.json", {
        "checkpoint": str(checkpoint), "checkpoint_layout": info["layout"],
        "architecture": info["architecture"], "input": str(source),
        "sequences": int(inputs.shape[0]), "input_frames": k, "future_frames": future_frames,
        "frame_shape": list(inputs.shape[2:]), "notes": notes,
        "precision": precision, "device": str(device),
        "predictions": "predictions.npy: float32 [N, future_frames, C, H, W] in [0, 1]",
    }))
    return PredictionFiles(int(inputs.shape[0]), k, future_frames, tuple(inputs.shape[2:]),
                           written, notes)


def write_npy(path: PathLike, array: np.ndarray) -> Path:
    """``array`` as an .npy file, atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)


def write_frame_pngs(folder: PathLike, prediction: torch.Tensor, first_number: int) -> Path:
    """One 8-bit PNG per predicted frame: ``seq{n:04d}/frame_{t:04d}.png``."""
    from PIL import Image

    frames = np.rint(prediction.numpy() * 255).astype(np.uint8)  # [N, T, C, H, W]
    for n, sequence in enumerate(frames):
        for t, frame in enumerate(sequence):
            image = frame[0] if frame.shape[0] == 1 else np.moveaxis(frame, 0, -1)
            name = Path(folder) / f"seq{n:04d}" / f"frame_{first_number + t:04d}.png"
            with atomic_path(name) as temporary:
                Image.fromarray(image).save(temporary)
    return Path(folder)


def write_prediction_video(path: PathLike, inputs: torch.Tensor, prediction: torch.Tensor,
                           fps: float = 4.0) -> Path:
    """One sequence's input frames, then its predicted frames (``[T, C, H, W]`` in
    ``[0, 1]``), as an mp4."""
    frames = torch.cat([inputs, prediction]).clamp(0, 1).mul(255).round().to(torch.uint8)
    frames = frames.permute(0, 2, 3, 1).numpy()
    return write_video(path, frames[..., 0] if frames.shape[-1] == 1 else frames, fps)


def write_figures(out: PathLike, inputs: torch.Tensor, truth: torch.Tensor,
                  prediction: torch.Tensor, samples: int) -> List[Path]:
    """predictions.gif and predictions.png: against the truth when the input holds all of it."""
    out = Path(out)
    if truth.shape[1] == prediction.shape[1]:
        return [
            save_prediction_gif(out / "predictions.gif", inputs, truth, prediction,
                                max_samples=samples),
            save_prediction_grid(out / "predictions.png", inputs, truth, prediction,
                                 max_samples=samples),
        ]
    return save_sequence_figures(out / "predictions.gif", out / "predictions.png", inputs,
                                 prediction, max_samples=samples)
