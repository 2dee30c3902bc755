"""Small real video files for the tests, encoded with PyAV (not with the code under test)."""

from pathlib import Path

import av
import numpy as np


def write_video(path, frames, *, codec="mpeg4", fps=25):
    """Encode uint8 frames ``(T, H, W)`` (gray) or ``(T, H, W, 3)`` (RGB) into ``path``.

    ``mpeg4`` at top quality (qscale 1) for AVI files like KTH's, ``libvpx-vp9`` for webm
    files like Something-Something V2's.
    """
    frames = np.asarray(frames, dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    source_format = "gray" if frames.ndim == 3 else "rgb24"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            stream.codec_context.qscale = 1
        else:
            stream.options = {"crf": "4", "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
        _encode(container, stream, frames, source_format)
    return path


def _encode(container, stream, frames, frame_format):
    """Encode and mux every frame (arrays in PyAV's ``frame_format``), then flush."""
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format=frame_format)):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def level_frames(levels, height, width):
    """Gray frames ``(T, H, W)`` whose frame ``t`` is flat at ``levels[t]``.

    Flat frames survive lossy coding almost exactly, so a test can identify each decoded
    frame by its mean level.
    """
    levels = np.asarray(levels, dtype=np.uint8)
    frames = np.repeat(levels[:, None, None], height, axis=1).repeat(width, axis=2)
    return frames


def write_lossless_video(path, frames, *, pix_fmt, frame_format):
    """Encode ``frames`` (one array per frame in PyAV's ``frame_format``, e.g. uint16
    ``gray16le`` or ``rgb48le``) losslessly with FFV1 in ``pix_fmt``; every level survives."""
    path = Path(path)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        _encode(container, stream, frames, frame_format)
    return path
