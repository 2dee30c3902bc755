"""Figures of an evaluation: per-frame metric curves, a prediction grid and an animated GIF.

Frames are given as ``[T, C, H, W]`` (one sequence) or ``[B, T, C, H, W]`` torch tensors or
numpy arrays with values in ``[0, 1]`` (values outside are clipped for display); C is 1
(grayscale) or 3 (RGB). Matplotlib is used through its object API on the Agg canvas, so no
global backend is switched and no display is needed. Every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np

from .files import atomic_path

ArrayLike = Union[np.ndarray, "torch.Tensor"]  # noqa: F821 (torch is optional here)
PathLike = Union[str, Path]

#: Curves drawn by default, as keys of a metrics summary, with their axis labels.
DEFAULT_CURVES = (
    ("mse_x1e3", "MSE x1e3 (per pixel)"),
    ("ssim", "SSIM"),
    ("psnr", "PSNR (dB)"),
    ("lpips_x1e3", "LPIPS x1e3"),
)

_INPUT_COLOUR = (46, 160, 67)  # bar over frames the model was given
_PREDICTED_COLOUR = (214, 39, 40)  # bar over frames the model predicted


def _as_batch(frames: ArrayLike, name: str) -> np.ndarray:
    """``[T, C, H, W]`` or ``[B, T, C, H, W]`` to float ``[B, T, H, W, C]`` clipped to [0, 1]."""
    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    array = np.asarray(frames, dtype=np.float32)
    if array.ndim == 4:
        array = array[None]
    if array.ndim != 5 or array.shape[2] not in (1, 3):
        raise ValueError(
            f"{name} must be [T, C, H, W] or [B, T, C, H, W] with C = 1 or 3, got shape {array.shape}"
        )
    return np.clip(np.moveaxis(array, 2, -1), 0.0, 1.0)


def _check_sequences(inputs: ArrayLike, truth: ArrayLike, prediction: ArrayLike):
    inputs, truth, prediction = (
        _as_batch(inputs, "inputs"), _as_batch(truth, "truth"), _as_batch(prediction, "prediction")
    )
    if truth.shape != prediction.shape:
        raise ValueError(f"truth and prediction shapes differ: {truth.shape} vs {prediction.shape}")
    if inputs.shape[0] != truth.shape[0] or inputs.shape[2:] != truth.shape[2:]:
        raise ValueError(
            f"inputs {inputs.shape} and truth {truth.shape} must share batch and frame size"
        )
    return inputs, truth, prediction


def new_figure(width: float, height: float):
    """A matplotlib ``Figure`` of ``width x height`` inches on its own Agg canvas.

    No pyplot, no global backend switched, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: PathLike, *, title: Optional[str] = None,
                legend_axis=None) -> Path:
    """Write ``figure`` as a PNG to ``path`` atomically (with a legend and a title if given)."""
    if legend_axis is not None:
        legend_axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100)
    return Path(path)


def _summaries(runs: Mapping) -> Mapping[str, Mapping]:
    # One summary (it has "metrics") or a mapping label -> summary.
    return {"": runs} if "metrics" in runs else runs


def plot_metric_curves(
    path: PathLike,
    runs: Mapping,
    curves: Sequence[tuple] = DEFAULT_CURVES,
    title: Optional[str] = None,
    first_frame: int = 1,
) -> Path:
    """PNG of per-future-frame metric curves, one panel per metric.

    Parameters
    ----------
    path : str or pathlib.Path
        The PNG to write.
    runs : dict
        A summary from :meth:`~applications.conv_tt_lstm.metrics.MetricAccumulator.summary`,
        or ``{label: summary}`` to compare runs (one line each).
    curves : sequence of (key, label)
        Metrics to draw; those no run has (LPIPS without its weights) are skipped.
    title : str, optional
        Figure title.
    first_frame : int
        Number of the first future frame on the x axis (1, or input_frames + 1).
    """
    runs = _summaries(runs)
    if not runs:
        raise ValueError("runs is empty: nothing to plot")
    present = [(key, label) for key, label in curves if any(key in run["metrics"] for run in runs.values())]
    if not present:
        raise ValueError(f"none of {[key for key, _ in curves]} is in the summaries")
    figure = new_figure(4.0 * len(present), 3.2)
    axes = figure.subplots(1, len(present), squeeze=False)[0]
    for axis, (key, label) in zip(axes, present):
        for run_label, run in runs.items():
            if key not in run["metrics"]:
                continue
            curve = run["metrics"][key]["per_frame"]
            x = np.arange(first_frame, first_frame + len(curve))
            axis.plot(x, curve, marker="o", markersize=3, label=run_label or None)
        axis.set_xlabel("future frame")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    return save_figure(figure, path, title=title, legend_axis=axes[0] if any(runs) else None)


def _strip(frames: np.ndarray, columns: int, gap: int) -> np.ndarray:
    """Frames ``[T, H, W, C]`` side by side on a white strip of ``columns`` slots."""
    _, height, width, channels = frames.shape
    strip = np.ones((height, columns * (width + gap) - gap, channels), dtype=np.float32)
    for t, frame in enumerate(frames[:columns]):
        strip[:, t * (width + gap) : t * (width + gap) + width] = frame
    return strip


def _save_strips(path: PathLike, rows: Sequence[tuple], columns: int,
                 title: Optional[str] = None) -> Path:
    """PNG of labelled strips of frames: ``rows`` of ``(label, frames [T, H, W, C], first)``,
    each frame numbered from ``first + 1``."""
    height, width = rows[0][1].shape[1:3]
    gap = max(1, width // 16)
    strip_width = columns * (width + gap) - gap
    # About 0.8 inch per frame keeps 64 x 64 frames at their pixel size or larger.
    inch = 0.8 / width  # inches per pixel
    figure = new_figure(1.2 + strip_width * inch, 0.3 + len(rows) * (height * inch + 0.25))
    axes = figure.subplots(len(rows), 1, squeeze=False)[:, 0]
    for axis, (label, frames, first) in zip(axes, rows):
        strip = _strip(frames, columns, gap)
        axis.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0.0,
                    vmax=1.0, interpolation="nearest")
        centres = np.arange(len(frames)) * (width + gap) + width / 2
        axis.set_xticks(centres, [str(first + t + 1) for t in range(len(frames))], fontsize=6)
        axis.set_yticks([])
        axis.set_ylabel(label, rotation=0, ha="right", va="center")
        axis.tick_params(length=0)
        for spine in axis.spines.values():
            spine.set_visible(False)
    return save_figure(figure, path, title=title)


def save_prediction_grid(
    path: PathLike,
    inputs: ArrayLike,
    truth: ArrayLike,
    prediction: ArrayLike,
    max_samples: int = 4,
    title: Optional[str] = None,
) -> Path:
    """PNG grid: for each sample a row of inputs, a row of ground truth, a row of predictions.

    Parameters
    ----------
    path : str or pathlib.Path
        The PNG to write.
    inputs : array
        ``[(B,) T_in, C, H, W]`` frames the model was given.
    truth, prediction : array
        ``[(B,) T_out, C, H, W]`` future frames, true and predicted.
    max_samples : int
        At most this many samples (the first ones) are drawn.
    title : str, optional
        Figure title.
    """
    inputs, truth, prediction = _check_sequences(inputs, truth, prediction)
    n_samples = min(max_samples, inputs.shape[0])
    if n_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    rows = []
    for b in range(n_samples):
        rows += [
            (f"input {b + 1}" if n_samples > 1 else "input", inputs[b], 0),
            ("truth", truth[b], inputs.shape[1]),
            ("prediction", prediction[b], inputs.shape[1]),
        ]
    return _save_strips(path, rows, max(inputs.shape[1], truth.shape[1]), title)


def _write_gif(path: PathLike, grid: List[List[np.ndarray]], n_inputs: int, fps: float,
               scale: int) -> None:
    """Animate a grid of ``[T, H, W, C]`` sequences in [0, 1], each under a bar that is green
    during the first ``n_inputs`` frames and red after; ``scale`` upsamples (nearest)."""
    from PIL import Image

    height, width = grid[0][0].shape[1:3]
    gap, bar = 2 * scale, 3 * scale
    cell_h, cell_w = height * scale, width * scale
    n_rows, n_columns = len(grid), len(grid[0])
    canvas_h = n_rows * (bar + cell_h + gap) - gap
    canvas_w = n_columns * (cell_w + gap) - gap
    images = []
    for t in range(grid[0][0].shape[0]):
        canvas = np.full((canvas_h, canvas_w, 3), 255, dtype=np.uint8)
        colour = _INPUT_COLOUR if t < n_inputs else _PREDICTED_COLOUR
        for row, sequences in enumerate(grid):
            top = row * (bar + cell_h + gap)
            for column, frames in enumerate(sequences):
                x0 = column * (cell_w + gap)
                frame = np.rint(frames[t] * 255).astype(np.uint8)
                frame = np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)
                if frame.shape[-1] == 1:
                    frame = np.repeat(frame, 3, axis=-1)
                canvas[top : top + bar, x0 : x0 + cell_w] = colour
                canvas[top + bar : top + bar + cell_h, x0 : x0 + cell_w] = frame
        images.append(Image.fromarray(canvas))
    with atomic_path(path) as temporary:
        images[0].save(temporary, save_all=True, append_images=images[1:],
                       duration=int(round(1000 / fps)), loop=0, optimize=False)


def _check_animation(fps: float, scale: int, max_samples: int) -> None:
    if fps <= 0 or scale < 1 or max_samples < 1:
        raise ValueError(f"need fps > 0, scale >= 1 and max_samples >= 1, got {fps}, {scale}, "
                         f"{max_samples}")


def save_prediction_gif(path: PathLike, inputs: ArrayLike, truth: ArrayLike,
                        prediction: ArrayLike, max_samples: int = 4, fps: float = 4.0,
                        scale: int = 2) -> Path:
    """Animated GIF: per sample, ground truth (left) beside the model's view (right).

    Both panels play the input frames first, then the left one the true future and the right
    one the prediction. A bar over each panel is green while the frames are inputs and red
    while they are predicted (or the truth the prediction is compared with).

    Parameters
    ----------
    path : str or pathlib.Path
        The GIF to write.
    inputs, truth, prediction : array
        As in :func:`save_prediction_grid`.
    max_samples : int
        At most this many samples, stacked vertically.
    fps : float
        Frames per second.
    scale : int
        Integer upscaling (nearest neighbour) so that small frames stay visible.
    """
    inputs, truth, prediction = _check_sequences(inputs, truth, prediction)
    _check_animation(fps, scale, max_samples)
    n_samples = min(max_samples, inputs.shape[0])
    left = np.concatenate([inputs, truth], axis=1)[:n_samples]
    right = np.concatenate([inputs, prediction], axis=1)[:n_samples]
    grid = [[left[b], right[b]] for b in range(n_samples)]
    _write_gif(path, grid, inputs.shape[1], fps, scale)
    return Path(path)


def save_sequence_figures(gif_path: PathLike, png_path: PathLike, inputs: ArrayLike,
                          prediction: ArrayLike, max_samples: int = 4, fps: float = 4.0,
                          scale: int = 2) -> List[Path]:
    """A GIF and a PNG grid of inputs followed by predictions, when no truth is known.

    The GIF plays each sample's inputs (green bar) then its predictions (red bar), samples
    side by side; the PNG has a row of inputs and a row of predictions per sample.
    ``inputs`` ``[(B,) T_in, C, H, W]`` and ``prediction`` ``[(B,) T_out, C, H, W]``.
    """
    inputs, prediction = _as_batch(inputs, "inputs"), _as_batch(prediction, "prediction")
    if inputs.shape[0] != prediction.shape[0] or inputs.shape[2:] != prediction.shape[2:]:
        raise ValueError(f"inputs {inputs.shape} and prediction {prediction.shape} must share "
                         "batch and frame size")
    _check_animation(fps, scale, max_samples)
    n_samples = min(max_samples, inputs.shape[0])
    sequence = np.concatenate([inputs, prediction], axis=1)[:n_samples]
    _write_gif(gif_path, [list(sequence)], inputs.shape[1], fps, scale)

    rows = []
    for b in range(n_samples):
        rows += [(f"input {b + 1}" if n_samples > 1 else "input", inputs[b], 0),
                 ("prediction", prediction[b], inputs.shape[1])]
    _save_strips(png_path, rows, max(inputs.shape[1], prediction.shape[1]))
    return [Path(gif_path), Path(png_path)]
