"""Video-prediction metrics per sample and future frame, computed in batches on the device.

Conventions (REFERENCE.md section 6); every summary and table states them:

- frames are float in ``[0, 1]``; predictions are clamped to ``[0, 1]`` first (as the
  paper's release does) unless ``clamp=False``;
- ``mse``: per-pixel mean of the squared error (the paper shows it x 1e3: ``mse_x1e3``);
  ``mse_sum``: squared error summed over C x H x W per frame (OpenSTL and others; for
  64 x 64 grayscale ``mse_sum = 4096 * mse``); ``mae`` and ``mae_sum`` likewise;
- ``psnr``: ``10 log10(1 / mse)`` per frame (data range 1; infinite for a perfect frame);
- ``ssim``: scikit-image's ``structural_similarity`` with its defaults: 7 x 7 uniform
  window, sample covariance (N / (N - 1)), K1 = 0.01, K2 = 0.03, mean over the pixels whose
  window lies inside the image (skimage crops a 3-pixel border), averaged over channels;
  ``data_range`` explicit, 1.0 by default, 2.0 reproduces old scikit-image (and the paper's
  published numbers), which used 2 for float images and so inflates SSIM;
- ``lpips``: the lpips package, AlexNet backbone, v0.1 linear layers, inputs mapped to
  ``[-1, 1]``, grayscale repeated to 3 channels (``lpips_x1e3`` as tables often show it).
  The backbone's ImageNet weights must be in the torch hub cache; when they are not, LPIPS
  is left out with a message saying which file to put where, and the rest is computed.

Typical use by an evaluation loop::

    metrics = FrameMetrics.create(device)          # loads LPIPS when its weights are cached
    totals = MetricAccumulator()
    for ...:
        totals.update(metrics(predicted_future, true_future))   # [B, T, C, H, W] each
    totals.all_reduce()                            # under DistributedDataParallel
    summary = totals.summary(metrics)
    write_metrics(out_dir, summary)                # metrics.json + metrics.md
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .checks import check_choice
from .files import write_json_atomic, write_text_atomic

#: Names of the per-frame metrics, in the order tables list them.
METRIC_NAMES = ("mse", "mse_sum", "mae", "mae_sum", "psnr", "ssim", "lpips")

#: Metrics also reported multiplied by 1e3 (as the paper's tables do).
SCALED_1E3 = ("mse", "lpips")

#: torchvision weights each lpips backbone loads from the torch hub cache.
LPIPS_BACKBONE_WEIGHTS = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "squeeze": "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth",
}


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction and target must have the same shape, got {tuple(prediction.shape)} "
            f"and {tuple(target.shape)}"
        )
    if prediction.ndim < 3:
        raise ValueError(f"frames must be [..., C, H, W], got shape {tuple(prediction.shape)}")


def _working(tensor: torch.Tensor) -> torch.Tensor:
    # Metrics in float32 at least, whatever the model ran in (bf16 / fp16 outputs).
    return tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean squared error of each frame: ``[..., C, H, W] -> [...]``."""
    _check_pair(prediction, target)
    return (_working(prediction) - _working(target)).square().mean(dim=(-3, -2, -1))


def mae(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean absolute error of each frame: ``[..., C, H, W] -> [...]``."""
    _check_pair(prediction, target)
    return (_working(prediction) - _working(target)).abs().mean(dim=(-3, -2, -1))


def psnr(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio of each frame in dB, as ``skimage.metrics.peak_signal_noise_ratio``.

    ``10 log10(data_range^2 / mse)``; ``inf`` where a frame is reproduced exactly.
    """
    return 10.0 * torch.log10(data_range**2 / mse(prediction, target))


def ssim(
    prediction: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity of each frame, as ``skimage.metrics.structural_similarity``.

    Uniform ``win_size`` x ``win_size`` window, sample covariance, mean over the positions
    whose window lies inside the frame (skimage filters with reflection, then crops
    ``(win_size - 1) // 2`` pixels per border, which leaves exactly these), averaged over
    channels (skimage's ``channel_axis``).

    Parameters
    ----------
    prediction, target : torch.Tensor
        ``[..., C, H, W]`` frames.
    data_range : float
        Value range of the images: 1.0 for ``[0, 1]``; 2.0 reproduces old scikit-image's
        silent default for float images.
    win_size : int
        Odd window side, at most ``min(H, W)``.
    k1, k2 : float
        Stabilising constants.

    Returns
    -------
    torch.Tensor
        ``[...]`` SSIM per frame.
    """
    _check_pair(prediction, target)
    *lead, channels, height, width = prediction.shape
    if win_size % 2 != 1 or win_size > min(height, width):
        raise ValueError(f"win_size must be odd and <= min(H, W) = {min(height, width)}, got {win_size}")
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    x = _working(prediction).reshape(-1, 1, height, width)
    y = _working(target).reshape(-1, 1, height, width)
    # One pooling call for the five local moments: E[x], E[y], E[xx], E[yy], E[xy].
    moments = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], dim=1), win_size, stride=1)
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = moments.unbind(dim=1)
    n_window = win_size * win_size
    covariance_norm = n_window / (n_window - 1)
    var_x = covariance_norm * (mean_xx - mean_x * mean_x)
    var_y = covariance_norm * (mean_yy - mean_y * mean_y)
    cov_xy = covariance_norm * (mean_xy - mean_x * mean_y)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    index_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / (
        (mean_x * mean_x + mean_y * mean_y + c1) * (var_x + var_y + c2)
    )
    per_channel = index_map.mean(dim=(-2, -1))
    return per_channel.reshape(*lead, channels).mean(dim=-1)


class LpipsUnavailable(RuntimeError):
    """LPIPS cannot be computed here (package or backbone weights missing)."""


def lpips_backbone_file(net: str = "alex") -> Path:
    """Where torchvision looks for the ImageNet weights of lpips' ``net`` backbone.

    ``torch.hub.get_dir()/checkpoints/<file name of the weights URL>``; the hub folder is
    ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``).
    """
    check_choice("net", net, sorted(LPIPS_BACKBONE_WEIGHTS))
    url = LPIPS_BACKBONE_WEIGHTS[net]
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


class LpipsMetric:
    """LPIPS per frame through an ``lpips.LPIPS`` model.

    Parameters
    ----------
    model : torch.nn.Module
        An ``lpips.LPIPS`` instance (any backbone; tests use a random one). It is put in
        eval mode with gradients off.
    chunk : int
        Frames per forward pass (bounds memory).
    name : str
        How the convention text names the model.
    """

    def __init__(self, model: torch.nn.Module, chunk: int = 256, name: str = "lpips.LPIPS") -> None:
        self.model = model.eval().requires_grad_(False)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = chunk
        self.name = name

    @classmethod
    def pretrained(
        cls, device: Union[str, torch.device, None] = None, net: str = "alex", chunk: int = 256
    ) -> "LpipsMetric":
        """The published LPIPS (``lpips.LPIPS(net=net)``, v0.1), loaded without any download.

        Raises
        ------
        LpipsUnavailable
            If the lpips package is missing, or the backbone's ImageNet weights are not in
            the torch hub cache; the message names the file and where to put it.
        """
        try:
            import lpips
        except ImportError as error:
            raise LpipsUnavailable("LPIPS needs the lpips package: pip install lpips") from error
        weights = lpips_backbone_file(net)
        if not weights.is_file():
            raise LpipsUnavailable(
                f"LPIPS ({net}) needs torchvision's ImageNet weights of its backbone in the "
                f"torch hub cache: put {weights.name} (from {LPIPS_BACKBONE_WEIGHTS[net]}) at "
                f"{weights} (the folder follows TORCH_HOME="
                f"{os.environ.get('TORCH_HOME', '<unset: ~/.cache/torch>')}). LPIPS is left out; "
                f"the other metrics are computed."
            )
        try:
            with warnings.catch_warnings():
                # lpips builds the backbone with torchvision's deprecated `pretrained=True`.
                warnings.simplefilter("ignore", UserWarning)
                model = lpips.LPIPS(net=net, version="0.1", verbose=False)
        except Exception as error:  # a corrupt or truncated weights file, typically
            raise LpipsUnavailable(f"LPIPS ({net}) could not be loaded from {weights}: {error}") from error
        return cls(model.to(device), chunk=chunk, name=f"lpips.LPIPS(net={net!r}, version='0.1')")

    @torch.no_grad()
    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS of each frame: ``[..., C, H, W]`` in ``[0, 1]`` (C = 1 or 3) to ``[...]``."""
        _check_pair(prediction, target)
        *lead, channels, height, width = prediction.shape
        if channels not in (1, 3):
            raise ValueError(f"LPIPS takes 1 (grayscale) or 3 (RGB) channels, got {channels}")
        x = _working(prediction).reshape(-1, channels, height, width)
        y = _working(target).reshape(-1, channels, height, width)
        if channels == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        values = []
        with torch.autocast(x.device.type, enabled=False):
            for begin in range(0, x.shape[0], self.chunk):
                part_x = x[begin : begin + self.chunk] * 2 - 1
                part_y = y[begin : begin + self.chunk] * 2 - 1
                try:
                    values.append(self.model(part_x.float(), part_y.float()).reshape(-1))
                except RuntimeError as error:
                    if "too small" not in str(error):
                        raise
                    raise ValueError(
                        f"{self.name} cannot measure {height} x {width} frames: its backbone "
                        f"shrinks them to nothing ({error})"
                    ) from error
        return torch.cat(values).reshape(lead).to(x.dtype)


@dataclass(frozen=True)
class FrameMetrics:
    """The metrics of one evaluation, with their conventions.

    Call it on ``[..., C, H, W]`` predictions and targets (typically ``[B, T, C, H, W]``,
    the future frames only) to get a dict of ``[...]`` tensors, one per metric, on the
    input's device.

    Parameters
    ----------
    ssim_data_range : float
        SSIM's data range: 1.0 (correct for ``[0, 1]`` frames) or 2.0 (old scikit-image).
    clamp : bool
        Clamp predictions to ``[0, 1]`` before measuring.
    lpips : LpipsMetric, optional
        LPIPS, or ``None`` to leave it out.
    notes : tuple of str
        Remarks carried into summaries (e.g. why LPIPS is missing).
    """

    ssim_data_range: float = 1.0
    clamp: bool = True
    lpips: Optional[LpipsMetric] = None
    notes: Tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def create(
        cls,
        device: Union[str, torch.device, None] = None,
        *,
        ssim_data_range: float = 1.0,
        clamp: bool = True,
        lpips: bool = True,
        lpips_net: str = "alex",
    ) -> "FrameMetrics":
        """Metrics with LPIPS when it can be loaded; otherwise without, and a note saying why."""
        if ssim_data_range <= 0:
            raise ValueError(f"ssim_data_range must be positive, got {ssim_data_range}")
        if not lpips:
            return cls(ssim_data_range, clamp, None, ("LPIPS not requested",))
        try:
            return cls(ssim_data_range, clamp, LpipsMetric.pretrained(device, lpips_net))
        except LpipsUnavailable as error:
            return cls(ssim_data_range, clamp, None, (str(error),))

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        _check_pair(prediction, target)
        prediction = _working(prediction.detach())
        target = _working(target.detach())
        if self.clamp:
            prediction = prediction.clamp(0.0, 1.0)
        error = prediction - target
        pixels = math.prod(prediction.shape[-3:])
        squared = error.square().mean(dim=(-3, -2, -1))
        absolute = error.abs().mean(dim=(-3, -2, -1))
        values = {
            "mse": squared,
            "mse_sum": squared * pixels,
            "mae": absolute,
            "mae_sum": absolute * pixels,
            "psnr": 10.0 * torch.log10(1.0 / squared),
            "ssim": ssim(prediction, target, data_range=self.ssim_data_range),
        }
        if self.lpips is not None:
            values["lpips"] = self.lpips(prediction, target)
        return values

    def conventions(self) -> Dict[str, str]:
        """One sentence per metric saying exactly what was computed."""
        texts = {
            "frames": "predictions clamped to [0, 1] before measuring"
            if self.clamp
            else "predictions measured as given (not clamped)",
            "mse": "per-pixel mean of squared error on [0, 1] frames",
            "mse_sum": "squared error summed over C x H x W per frame, [0, 1] frames",
            "mae": "per-pixel mean of absolute error on [0, 1] frames",
            "mae_sum": "absolute error summed over C x H x W per frame, [0, 1] frames",
            "psnr": "10 log10(1 / per-pixel MSE) per frame, data range 1, dB",
            "ssim": "scikit-image structural_similarity: 7x7 uniform window, sample covariance, "
            f"K1=0.01, K2=0.03, 3-pixel border excluded, data_range={self.ssim_data_range:g}"
            + (
                " (old scikit-image's float default, as in the paper's published numbers; "
                "inflates SSIM)"
                if self.ssim_data_range == 2.0
                else ""
            ),
        }
        if self.lpips is not None:
            texts["lpips"] = (
                f"{self.lpips.name}, inputs mapped to [-1, 1], grayscale repeated "
                "to 3 channels"
            )
        for name in SCALED_1E3:
            if name in texts:
                texts[f"{name}_x1e3"] = f"{name} x 1e3"
        return texts


class MetricAccumulator:
    """Running sums of per-frame metrics over a test set, for means and per-frame curves.

    ``update`` takes what :class:`FrameMetrics` returns (``[B, T]`` per metric) and adds it
    to float64 sums on the same device, without synchronising with the host.
    """

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, values: Mapping[str, torch.Tensor]) -> None:
        """Add a batch: every metric a ``[B, T]`` tensor (same B, T, metric names throughout)."""
        if not values:
            raise ValueError("update needs at least one metric")
        shapes = {name: tuple(value.shape) for name, value in values.items()}
        first = next(iter(shapes.values()))
        if len(first) != 2 or any(shape != first for shape in shapes.values()):
            raise ValueError(f"every metric must be a [B, T] tensor of one shape, got {shapes}")
        if self.sums and set(values) != set(self.sums):
            raise ValueError(f"metrics changed between updates: {sorted(self.sums)} then {sorted(values)}")
        for name, value in values.items():
            total = value.detach().to(torch.float64).sum(dim=0)
            if name in self.sums:
                if self.sums[name].shape != total.shape:
                    raise ValueError(
                        f"{name}: {total.shape[0]} future frames, earlier batches had "
                        f"{self.sums[name].shape[0]}"
                    )
                self.sums[name] = self.sums[name] + total
            else:
                self.sums[name] = total
        self.count += first[0]

    def all_reduce(self, group=None) -> None:
        """Sum the totals over all ranks of ``torch.distributed`` (no-op when not initialised)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        names = sorted(self.sums)
        device = self.sums[names[0]].device if names else torch.device("cpu")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=device)
        packed = torch.cat([self.sums[name] for name in names] + [count])
        torch.distributed.all_reduce(packed, group=group)
        offset = 0
        for name in names:
            size = self.sums[name].numel()
            self.sums[name] = packed[offset : offset + size]
            offset += size
        self.count = int(round(float(packed[-1])))

    def summary(self, metrics: Optional[FrameMetrics] = None, **extra) -> Dict[str, object]:
        """Means and per-frame curves as plain Python values (JSON-ready).

        Parameters
        ----------
        metrics : FrameMetrics, optional
            Supplies the conventions and notes recorded with the numbers.
        **extra
            More fields to record (model, checkpoint, horizon, ...).

        Returns
        -------
        dict
            ``{"n_sequences", "n_future_frames", "metrics": {name: {"mean", "per_frame"}},
            "conventions", "notes", **extra}``; ``mse_x1e3`` and ``lpips_x1e3`` are added.
        """
        if self.count == 0:
            raise ValueError("no batches were added; nothing to summarise")
        results: Dict[str, Dict[str, object]] = {}
        for name in [n for n in METRIC_NAMES if n in self.sums] + sorted(set(self.sums) - set(METRIC_NAMES)):
            curve = (self.sums[name] / self.count).cpu().tolist()
            results[name] = {"mean": float(sum(curve) / len(curve)), "per_frame": curve}
            if name in SCALED_1E3:
                scaled = [1e3 * v for v in curve]
                results[f"{name}_x1e3"] = {"mean": float(sum(scaled) / len(scaled)), "per_frame": scaled}
        summary: Dict[str, object] = {
            "n_sequences": self.count,
            "n_future_frames": len(next(iter(self.sums.values()))),
            "metrics": results,
            "conventions": metrics.conventions() if metrics is not None else {},
            "notes": list(metrics.notes) if metrics is not None else [],
        }
        summary.update(extra)
        return summary


#: Table rows: (metric key in the summary, column title).
TABLE_ROWS = (
    ("mse_x1e3", "MSE x1e3"),
    ("mse_sum", "MSE / frame"),
    ("mae", "MAE"),
    ("mae_sum", "MAE / frame"),
    ("psnr", "PSNR (dB)"),
    ("ssim", "SSIM"),
    ("lpips_x1e3", "LPIPS x1e3"),
)


def _format(value: float) -> str:
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def markdown_table(summary: Mapping[str, object], title: Optional[str] = None) -> str:
    """A markdown report of a :meth:`MetricAccumulator.summary`: means, conventions, curves."""
    results: Mapping[str, Mapping[str, object]] = summary["metrics"]  # type: ignore[assignment]
    conventions: Mapping[str, str] = summary.get("conventions", {})  # type: ignore[assignment]
    rows = [(key, label) for key, label in TABLE_ROWS if key in results]
    lines: List[str] = []
    if title:
        lines += [f"## {title}", ""]
    lines.append(
        f"{summary['n_sequences']} sequences, {summary['n_future_frames']} future frames each; "
        "each metric is computed per sequence and future frame, then averaged"
        + (f"; {conventions['frames']}." if "frames" in conventions else ".")
    )
    lines += ["", "| metric | mean | convention |", "|---|---|---|"]
    for key, label in rows:
        base = key[: -len("_x1e3")] if key.endswith("_x1e3") else key
        convention = conventions.get(base, "")
        if key.endswith("_x1e3"):
            convention = (convention + "; shown x 1e3").lstrip("; ")
        lines.append(f"| {label} | {_format(results[key]['mean'])} | {convention} |")
    missing = [label for key, label in TABLE_ROWS if key not in results]
    lines += ["", "Per future frame:", ""]
    lines.append("| frame | " + " | ".join(label for _, label in rows) + " |")
    lines.append("|---" * (len(rows) + 1) + "|")
    for t in range(int(summary["n_future_frames"])):
        cells = [_format(results[key]["per_frame"][t]) for key, _ in rows]  # type: ignore[index]
        lines.append(f"| {t + 1} | " + " | ".join(cells) + " |")
    notes = list(summary.get("notes", []))  # type: ignore[arg-type]
    if missing:
        notes.append(f"not computed: {', '.join(missing)}")
    if notes:
        lines += [""] + [f"Note: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_metrics(
    out_dir: Union[str, Path],
    summary: Mapping[str, object],
    stem: str = "metrics",
    title: Optional[str] = None,
) -> Tuple[Path, Path]:
    """Write ``{stem}.json`` and ``{stem}.md`` in ``out_dir`` atomically; return both paths."""
    out_dir = Path(out_dir)
    json_path = write_json_atomic(out_dir / f"{stem}.json", dict(summary))
    markdown_path = write_text_atomic(out_dir / f"{stem}.md", markdown_table(summary, title))
    return json_path, markdown_path
