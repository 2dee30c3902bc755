"""Early-recognition scores: top-1 / top-5 accuracy after the first 25 %, 50 %, ... of a clip.

A model gives logits at every step, the logits at step ``t`` depending on frames ``0..t``
only, so one forward pass over the whole clip scores every fraction: for fraction ``f`` of a
``T``-frame clip the model has seen the first ``n = max(1, floor(f * T))`` frames and its
prediction is the logits at step ``n - 1``. Counts are summed over DDP ranks.

Outputs: :func:`accuracy_table` (markdown), :func:`plot_accuracy_by_fraction` (PNG, matplotlib's
object API on the Agg canvas, written atomically), and the summary dict as JSON.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Union

import torch

from ..plots import new_figure, save_figure
from ..precision import Precision, resolve_precision

PathLike = Union[str, Path]


def frames_seen(fraction: float, n_frames: int) -> int:
    """Frames the model sees at ``fraction`` of a ``n_frames`` clip: ``max(1, floor(f T))``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return max(1, int(math.floor(fraction * n_frames + 1e-9)))


@torch.no_grad()
def accuracy_by_fraction(model: torch.nn.Module, loader, fractions: Sequence[float], *,
                         device: Union[str, torch.device] = "cpu",
                         precision: Union[str, Precision] = "fp32",
                         top_k: int = 5, distributed: bool = False) -> Dict[str, object]:
    """Top-1 and top-k accuracy of ``model`` at each fraction of the clips of ``loader``.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``[B, T, C, H, W]`` to per-step logits ``[B, T, classes]``.
    loader : iterable of (frames, labels)
    fractions : sequence of float
        In ``(0, 1]``.
    device : torch.device
    precision : str or Precision
        Its autocast wraps the forward pass (default: fp32).
    top_k : int
        The second accuracy (``min(top_k, classes)`` is used and reported).
    distributed : bool
        Sum the counts over the ranks of the initialised process group.

    Returns
    -------
    dict
        ``{"clips", "n_frames", "top_k", "fractions": [{"fraction", "frames", "top1",
        "topk", "loss"}, ...]}`` (accuracies in [0, 1], loss the mean cross-entropy).
    """
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    correct1 = correct_k = loss_sum = None
    clips, n_frames, k = 0, None, None
    steps = None
    try:
        for frames, labels in loader:
            frames = frames.to(device)
            labels = torch.as_tensor(labels).to(device)
            with precision.autocast():
                logits = model(frames)
            logits = logits.float()
            if n_frames is None:
                n_frames = logits.shape[1]
                steps = torch.tensor([frames_seen(f, n_frames) - 1 for f in fractions],
                                     device=device)
                k = min(top_k, logits.shape[2])
                correct1 = torch.zeros(len(fractions), dtype=torch.float64, device=device)
                correct_k = torch.zeros_like(correct1)
                loss_sum = torch.zeros_like(correct1)
            chosen = logits[:, steps]  # [B, F, classes]
            ranked = chosen.topk(k, dim=-1).indices
            hits = ranked == labels.view(-1, 1, 1)
            correct1 += hits[..., 0].sum(0).double()
            correct_k += hits.any(-1).sum(0).double()
            loss_sum += torch.nn.functional.cross_entropy(
                chosen.transpose(1, 2), labels.view(-1, 1).expand(-1, len(fractions)),
                reduction="none").sum(0).double()
            clips += labels.shape[0]
    finally:
        model.train(was_training)
    if n_frames is None:
        raise ValueError("the evaluation loader gave no clips")
    totals = torch.cat([correct1, correct_k, loss_sum,
                        torch.tensor([clips], dtype=torch.float64, device=device)])
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    f = len(fractions)
    count = float(totals[-1])
    rows = [{"fraction": float(fraction), "frames": frames_seen(fraction, n_frames),
             "top1": float(totals[i]) / count, "topk": float(totals[f + i]) / count,
             "loss": float(totals[2 * f + i]) / count}
            for i, fraction in enumerate(fractions)]
    return {"clips": int(count), "n_frames": int(n_frames), "top_k": int(k), "fractions": rows}


def accuracy_table(summary: Mapping, title: Optional[str] = None) -> str:
    """Markdown table of a :func:`accuracy_by_fraction` summary (accuracies in %)."""
    k = summary["top_k"]
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines += [f"| fraction seen | frames | top-1 (%) | top-{k} (%) |", "|---|---|---|---|"]
    for row in summary["fractions"]:
        lines.append(f"| {row['fraction'] * 100:.0f} % | {row['frames']} / {summary['n_frames']} "
                     f"| {row['top1'] * 100:.1f} | {row['topk'] * 100:.1f} |")
    lines += ["", f"{summary['clips']} clips; the model sees the first "
                  f"max(1, floor(fraction x {summary['n_frames']})) frames."]
    return "\n".join(lines) + "\n"


def plot_accuracy_by_fraction(path: PathLike, runs: Mapping, title: Optional[str] = None,
                              chance: Optional[float] = None) -> Path:
    """PNG of top-1 and top-k accuracy versus the fraction of the clip seen.

    Parameters
    ----------
    path : str or pathlib.Path
        The PNG to write.
    runs : dict
        A :func:`accuracy_by_fraction` summary, or ``{label: summary}`` (one line each).
    title : str, optional
    chance : float, optional
        Accuracy of guessing (drawn as a dotted line).
    """
    runs = {"": runs} if "fractions" in runs else dict(runs)
    if not runs:
        raise ValueError("runs is empty: nothing to plot")
    figure = new_figure(8.0, 3.4)
    axes = figure.subplots(1, 2)
    k = next(iter(runs.values()))["top_k"]
    for axis, key, label in ((axes[0], "top1", "top-1 accuracy (%)"),
                             (axes[1], "topk", f"top-{k} accuracy (%)")):
        for run_label, summary in runs.items():
            x = [100 * row["fraction"] for row in summary["fractions"]]
            y = [100 * row[key] for row in summary["fractions"]]
            axis.plot(x, y, marker="o", label=run_label or None)
        if chance is not None and key == "top1":
            axis.axhline(100 * chance, linestyle=":", color="grey", label="chance")
        axis.set_xlabel("fraction of the clip seen (%)")
        axis.set_ylabel(label)
        axis.set_ylim(0, 100)
        axis.grid(True, alpha=0.3)
    legend = axes[0] if any(runs) or chance is not None else None
    return save_figure(figure, path, title=title, legend_axis=legend)
