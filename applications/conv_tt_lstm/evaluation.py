"""Evaluation of video predictors: per future frame and averaged metrics over a test set.

A *predictor* is a function ``(inputs [B, T_in, C, H, W], future_frames) -> [B, T_out, C,
H, W]``. :func:`evaluate_predictors` runs several of them over one pass of a DataLoader
(so generated data are made once, and the model and the trivial baselines see the same
sequences), measures each with :class:`~.metrics.FrameMetrics` on the device, accumulates
per-frame sums, reduces them over DDP ranks when ``torch.distributed`` is initialised, and
returns one summary per predictor (:meth:`~.metrics.MetricAccumulator.summary`).

:func:`evaluate` is the model's case; :func:`trivial_predictor_summaries` the two
baselines every Moving MNIST number should be read against: repeating the last input frame,
and an all-black frame. :func:`first_batch_predictions` gives the frames for figures, and
:func:`evaluation_loader` a DataLoader that shards a map-style test set over DDP ranks
without padding (each sequence counted exactly once). :func:`write_evaluation` writes the
files of an evaluation (metrics JSON and markdown with :func:`comparison_table`, per-frame
curves, a prediction grid and GIF).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from .checks import check_int
from .files import write_json_atomic, write_text_atomic
from .metrics import FrameMetrics, MetricAccumulator, markdown_table
from .plots import plot_metric_curves, save_prediction_gif, save_prediction_grid
from .precision import Precision, resolve_precision
from .training.distributed import unwrap_model

Predictor = Callable[[torch.Tensor, int], torch.Tensor]
DeviceLike = Union[str, torch.device]


# ------------------------------------------------------------------------- predictors


def last_frame_predictor(inputs: torch.Tensor, future_frames: int) -> torch.Tensor:
    """Repeat the last input frame ``future_frames`` times."""
    return inputs[:, -1:].expand(-1, future_frames, -1, -1, -1)


def black_frame_predictor(inputs: torch.Tensor, future_frames: int) -> torch.Tensor:
    """All-zero (black) frames."""
    return inputs.new_zeros((inputs.shape[0], future_frames) + tuple(inputs.shape[2:]))


#: The trivial baselines, by name.
TRIVIAL_PREDICTORS: Dict[str, Predictor] = {
    "last_frame": last_frame_predictor,
    "black_frame": black_frame_predictor,
}


def model_predictor(model: nn.Module, device: DeviceLike,
                    precision: Union[str, Precision] = "fp32") -> Predictor:
    """The model as a predictor: no gradients, autocast of ``precision``, float32 output."""
    precision = resolve_precision(precision, device)

    def predict(inputs: torch.Tensor, future_frames: int) -> torch.Tensor:
        with torch.no_grad(), precision.autocast():
            return model(inputs, future_frames).float()

    return predict


# ------------------------------------------------------------------------- evaluation


def split_sequence(frames: torch.Tensor, input_frames: int, future_frames: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[B, T, C, H, W]`` to (inputs ``[:, :input_frames]``, truth the next ``future_frames``).

    Raises
    ------
    ValueError
        If ``frames`` is not 5-D or holds fewer than ``input_frames + future_frames`` frames.
    """
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"a batch must be a [batch, time, channels, height, width] tensor, got {shape}")
    needed = input_frames + future_frames
    if frames.shape[1] < needed:
        raise ValueError(
            f"sequences hold {frames.shape[1]} frames, but input_frames + future_frames = "
            f"{input_frames} + {future_frames} = {needed} are needed"
        )
    return frames[:, :input_frames], frames[:, input_frames:needed]


def _batches(loader, max_batches: Optional[int], progress: bool, description: str) -> Iterator:
    from tqdm.auto import tqdm

    total = None
    try:
        total = len(loader)
    except TypeError:
        pass
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = tqdm(loader, total=total, desc=description, unit="batch", disable=not progress)
    for number, batch in enumerate(bar):
        if max_batches is not None and number >= max_batches:
            break
        yield batch
    bar.close()


def evaluate_predictors(
    predictors: Mapping[str, Predictor],
    loader,
    *,
    input_frames: int,
    future_frames: int,
    metrics: FrameMetrics,
    device: DeviceLike = "cpu",
    max_batches: Optional[int] = None,
    progress: bool = False,
    reduce: bool = True,
    **extra,
) -> Dict[str, Dict[str, object]]:
    """Metrics of several predictors over one pass of ``loader``.

    Parameters
    ----------
    predictors : mapping of str to callable
        ``name -> predict(inputs, future_frames)``.
    loader : iterable of tensors
        Batches ``[B, T, C, H, W]`` (T >= input_frames + future_frames; extra frames are
        ignored), e.g. a DataLoader over :func:`~.data.factory.build_video_dataset`.
    input_frames, future_frames : int
        The protocol (10 -> 10, 10 -> 30, ...).
    metrics : FrameMetrics
        What to measure, with its conventions.
    device : str or torch.device
        Where batches, predictions and metrics live.
    max_batches : int, optional
        Stop after this many batches (a quick look; the summary says how many sequences).
    progress : bool
        Show a tqdm bar.
    reduce : bool
        Sum over DDP ranks when ``torch.distributed`` is initialised (every rank must call).
    **extra
        Recorded in every summary.

    Returns
    -------
    dict
        ``name -> summary`` (``n_sequences``, ``metrics: {metric: {mean, per_frame}}``, ...).
    """
    if not predictors:
        raise ValueError("predictors is empty: nothing to evaluate")
    check_int("input_frames", input_frames)
    check_int("future_frames", future_frames)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    device = torch.device(device)
    accumulators = {name: MetricAccumulator() for name in predictors}
    for batch in _batches(loader, max_batches, progress, "evaluate"):
        frames = batch[0] if isinstance(batch, (tuple, list)) else batch
        inputs, truth = split_sequence(frames, input_frames, future_frames)
        inputs = inputs.to(device, non_blocking=True)
        truth = truth.to(device, non_blocking=True)
        for name, predict in predictors.items():
            prediction = predict(inputs, future_frames)
            if prediction.shape != truth.shape:
                raise ValueError(
                    f"predictor {name!r} returned {tuple(prediction.shape)} for truth "
                    f"{tuple(truth.shape)}"
                )
            accumulators[name].update(metrics(prediction, truth))
    summaries = {}
    for name, accumulator in accumulators.items():
        if reduce:
            accumulator.all_reduce()
        if accumulator.count == 0:
            raise ValueError("the loader gave no batches: nothing was evaluated")
        summaries[name] = accumulator.summary(
            metrics, predictor=name, input_frames=input_frames, future_frames=future_frames, **extra
        )
    return summaries


def evaluate(
    model: nn.Module,
    loader,
    *,
    input_frames: int,
    future_frames: int,
    metrics: FrameMetrics,
    device: DeviceLike = "cpu",
    precision: str = "fp32",
    max_batches: Optional[int] = None,
    progress: bool = False,
    trivial: bool = False,
    **extra,
) -> Dict[str, object]:
    """The model's metrics over ``loader``, per future frame and averaged.

    The model (already on ``device``; a DDP wrapper is unwrapped) runs in eval mode under
    ``no_grad`` and the autocast of ``precision``; its training mode is restored afterwards.
    With ``torch.distributed`` initialised every rank must call this, each on its shard
    (:func:`evaluation_loader`); the sums are reduced so every rank gets the same summary.

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(inputs, future_frames)`` (a :class:`~.model.VideoPredictionNetwork`).
    trivial : bool
        Also measure the trivial predictors on the same batches; then the result is
        ``{"model": summary, "last_frame": summary, "black_frame": summary}``.
    Other parameters
        As in :func:`evaluate_predictors`.

    Returns
    -------
    dict
        The model's summary (see :meth:`~.metrics.MetricAccumulator.summary`), with
        ``precision`` recorded; or the dict of summaries described under ``trivial``.
    """
    network = unwrap_model(model)
    predictors: Dict[str, Predictor] = {"model": model_predictor(network, device, precision)}
    if trivial:
        predictors.update(TRIVIAL_PREDICTORS)
    was_training = network.training
    network.eval()
    try:
        summaries = evaluate_predictors(
            predictors, loader, input_frames=input_frames, future_frames=future_frames,
            metrics=metrics, device=device, max_batches=max_batches, progress=progress, **extra,
        )
    finally:
        network.train(was_training)
    summaries["model"]["precision"] = resolve_precision(precision, device).name
    return summaries if trivial else summaries["model"]


def trivial_predictor_summaries(loader, **options) -> Dict[str, Dict[str, object]]:
    """``{"last_frame": summary, "black_frame": summary}`` over ``loader``.

    ``options`` as in :func:`evaluate_predictors` (``input_frames``, ``future_frames`` and
    ``metrics`` are required).
    """
    return evaluate_predictors(TRIVIAL_PREDICTORS, loader, **options)


def first_batch_predictions(
    model: nn.Module,
    loader,
    *,
    input_frames: int,
    future_frames: int,
    device: DeviceLike = "cpu",
    precision: str = "fp32",
    max_samples: int = 4,
    clamp: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, truth, predictions) of the first ``max_samples`` sequences, on the CPU.

    For figures (:func:`~.plots.save_prediction_grid`, :func:`~.plots.save_prediction_gif`):
    float32 ``[B, T_in, C, H, W]``, ``[B, T_out, C, H, W]`` twice; predictions clamped to
    ``[0, 1]`` as the metrics see them unless ``clamp`` is false.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    network = unwrap_model(model)
    batch = next(iter(loader), None)
    if batch is None:
        raise ValueError("the loader gave no batches")
    frames = batch[0] if isinstance(batch, (tuple, list)) else batch
    inputs, truth = split_sequence(frames[:max_samples], input_frames, future_frames)
    was_training = network.training
    network.eval()
    try:
        prediction = model_predictor(network, device, precision)(inputs.to(device), future_frames)
    finally:
        network.train(was_training)
    prediction = prediction.float().cpu()
    if clamp:
        prediction = prediction.clamp(0.0, 1.0)
    return inputs.float().cpu(), truth.float().cpu(), prediction


# ----------------------------------------------------------------------------- loader


class ShardSampler(Sampler):
    """Indices ``rank, rank + world_size, ...`` of a dataset: every index once, no padding.

    Unlike ``DistributedSampler`` (which repeats items so every rank has as many), the ranks
    may differ by one item; a metric summed over ranks then counts each sequence once.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.length, self.rank, self.world_size = int(length), int(rank), int(world_size)

    def __iter__(self):
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def evaluation_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader for evaluation: in order, no shuffling, sharded over DDP ranks.

    Map-style datasets are split with :class:`ShardSampler` (rank and world size default to
    ``torch.distributed``'s when it is initialised); an ``IterableDataset`` shards itself.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = None
    if not isinstance(dataset, IterableDataset):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        if len(dataset) < world_size:
            # A rank without data would have no metrics to reduce (and the others would wait).
            raise ValueError(f"{len(dataset)} sequences cannot be shared by {world_size} ranks")
        sampler = ShardSampler(len(dataset), rank, world_size)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=num_workers,
        pin_memory=pin_memory, drop_last=False, persistent_workers=False,
    )


# ----------------------------------------------------------------------------- reports

#: Columns of the comparison table: (summary key, title).
_COMPARED = (("mse_x1e3", "MSE x1e3"), ("mse_sum", "MSE / frame"), ("mae", "MAE"),
             ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips_x1e3", "LPIPS x1e3"))
#: Readable names of the predictors.
PREDICTOR_LABELS = {"model": "model", "last_frame": "repeat last input frame",
                    "black_frame": "black frame"}


def comparison_table(summaries: Mapping[str, Mapping[str, object]]) -> str:
    """Markdown: the mean of each metric for the model and the trivial predictors."""
    first = summaries["model"]
    keys = [(k, t) for k, t in _COMPARED if k in first["metrics"]]
    lines = ["| predictor | " + " | ".join(t for _, t in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name, summary in summaries.items():
        cells = [f"{summary['metrics'][k]['mean']:.4f}" for k, _ in keys]
        lines.append(f"| {PREDICTOR_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\n{first['n_sequences']} sequences, {first['input_frames']} -> "
        f"{first['future_frames']} frames; means over sequences and future frames.\n")


def write_evaluation(out_dir: Union[str, Path], summaries: Mapping[str, Mapping[str, object]],
                     figures: Tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, title: str,
                     figure_samples: int = 4) -> List[Path]:
    """metrics.json, metrics.md, curves.png, predictions.png and predictions.gif in ``out_dir``.

    Parameters
    ----------
    out_dir : str or pathlib.Path
        Where the files go (created if needed).
    summaries : dict
        ``{"model": ..., "last_frame": ..., "black_frame": ...}`` from :func:`evaluate`
        with ``trivial=True``.
    figures : (inputs, truth, predictions)
        From :func:`first_batch_predictions`.
    title : str
        Heading of the markdown and the figures.
    figure_samples : int
        Sequences drawn in the grid and the GIF.

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    out_dir = Path(out_dir)
    markdown = [f"# {title}", "", comparison_table(summaries),
                markdown_table(summaries["model"], "model")]
    for name in ("last_frame", "black_frame"):
        markdown.append(markdown_table(summaries[name], PREDICTOR_LABELS[name]))
    inputs, truth, prediction = figures
    curves = {PREDICTOR_LABELS.get(name, name): summary for name, summary in summaries.items()}
    return [
        write_json_atomic(out_dir / "metrics.json", summaries),
        write_text_atomic(out_dir / "metrics.md", "\n".join(markdown)),
        plot_metric_curves(out_dir / "curves.png", curves, title=title),
        save_prediction_grid(out_dir / "predictions.png", inputs, truth, prediction,
                             max_samples=figure_samples, title=title),
        save_prediction_gif(out_dir / "predictions.gif", inputs, truth, prediction,
                            max_samples=figure_samples),
    ]
