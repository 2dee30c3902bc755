"""The video-prediction task: scoring a checkpoint on a test split (:func:`evaluate_checkpoint`).

The checkpoint (ours or the paper release's) is rolled out over the split for any horizon,
every future frame of every sequence is measured on the device in batches, beside the two
trivial predictors (repeat the last input frame; an all-black frame), and the files of
:func:`~.evaluation.write_evaluation` are written. Under ``torchrun`` the split is sharded
over the ranks and the sums reduced; rank 0 writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from .data.factory import DatasetSpec, build_video_dataset, sample_shape
from .evaluation import evaluate, evaluation_loader, first_batch_predictions, write_evaluation
from .inference import load_model
from .metrics import FrameMetrics
from .model import ArchitectureConfig
from .precision import resolve_precision
from .training.distributed import cleanup, init_distributed

PathLike = Union[str, Path]


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` measured and wrote (the same numbers on every rank)."""

    summaries: Dict[str, Dict[str, object]]
    out_dir: Path
    written: List[Path]
    notes: Tuple[str, ...]
    rank: int


def check_frame_geometry(model: ArchitectureConfig, frame_shape: Tuple[int, int, int],
                         where: str = "the dataset") -> None:
    """Raise ``ValueError`` unless frames ``(C, H, W)`` fit the model (channels, patch size)."""
    channels, height, width = frame_shape
    if channels != model.image_channels:
        raise ValueError(f"{where} has {channels}-channel frames, but model.image_channels is "
                         f"{model.image_channels}")
    p = model.patch_size
    if height % p or width % p:
        raise ValueError(f"{where} has {height} x {width} frames, not divisible by "
                         f"model.patch_size={p}; choose a patch size dividing both "
                         f"(--set model.patch_size=N) or resize the data")


def evaluate_checkpoint(checkpoint: PathLike, spec: DatasetSpec, split: str = "test", *,
                        out_dir: Optional[PathLike] = None, batch_size: int = 16,
                        num_workers: int = 0, device: str = "auto", precision: str = "fp32",
                        max_batches: Optional[int] = None,
                        release_output_sigmoid: bool = False, ssim_data_range: float = 1.0,
                        lpips: bool = True, figure_samples: int = 4,
                        progress: bool = False) -> CheckpointEvaluation:
    """Metrics, curves, grid and GIF of ``checkpoint`` on ``split`` of ``spec``.

    Parameters
    ----------
    checkpoint : path
        Our checkpoint or the paper release's (:func:`~.inference.load_model`).
    spec : DatasetSpec
        The data and the protocol (``input_frames -> future_frames``).
    split : {"test", "val", "train"}
        The split scored.
    out_dir : path, optional
        Where the files go (default: beside the checkpoint,
        ``eval-DATASET-SPLIT-INtoOUT``).
    batch_size, num_workers : int
        Evaluation batches per rank and DataLoader workers.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    precision : {"fp32", "bf16", "fp16"}
        Autocast of the model's forward.
    max_batches : int, optional
        Stop after this many batches.
    release_output_sigmoid : bool
        A release checkpoint trained with a sigmoid on its output.
    ssim_data_range : float
        1 (correct for ``[0, 1]`` frames) or 2 (the release's published SSIM).
    lpips : bool
        Measure LPIPS when its backbone weights are in the torch hub cache.
    figure_samples : int
        Sequences drawn in the grid and GIF.
    progress : bool
        Show a progress bar (rank 0).

    Raises
    ------
    CheckpointError, PrecisionError, FileNotFoundError, DatasetFileError, ValueError
        Bad input, each naming what to change.
    """
    context = init_distributed(device)
    try:
        precision = resolve_precision(precision, context.device).name
        model, info = load_model(checkpoint, device=context.device,
                                 output_sigmoid=True if release_output_sigmoid else None)
        config = model.config
        dataset = build_video_dataset(spec, split)
        channels, height, width = sample_shape(dataset)[1:]
        if channels != config.image_channels:
            raise ValueError(f"the model takes {config.image_channels} channel(s), the "
                             f"{spec.name} frames have {channels}")
        if height % config.patch_size or width % config.patch_size:
            raise ValueError(f"{height} x {width} frames are not divisible by the model's "
                             f"patch_size {config.patch_size}; choose another --image-size")
        checkpoint = Path(checkpoint)
        out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent / (
            f"eval-{spec.name}-{split}-{spec.input_frames}to{spec.future_frames}")
        metrics = FrameMetrics.create(context.device, ssim_data_range=ssim_data_range,
                                      lpips=lpips)
        loader = evaluation_loader(dataset, batch_size, num_workers=num_workers,
                                   rank=context.rank, world_size=context.world_size,
                                   pin_memory=context.device.type == "cuda")
        recorded = dict(
            checkpoint=str(checkpoint), checkpoint_layout=info["layout"],
            architecture=info["architecture"], parameters=info["parameters"],
            dataset=spec.to_dict(), split=split, device_name=str(context.device),
            world_size=context.world_size)
        summaries = evaluate(
            model, loader, input_frames=spec.input_frames, future_frames=spec.future_frames,
            metrics=metrics, device=context.device, precision=precision,
            max_batches=max_batches, progress=progress and context.is_main, trivial=True,
            **recorded)
        written: List[Path] = []
        if context.is_main:
            figures = first_batch_predictions(
                model, evaluation_loader(dataset, figure_samples, rank=0, world_size=1),
                input_frames=spec.input_frames, future_frames=spec.future_frames,
                device=context.device, precision=precision, max_samples=figure_samples)
            title = (f"{checkpoint.name} on {spec.name} {split}, "
                     f"{spec.input_frames} -> {spec.future_frames}")
            written = write_evaluation(out_dir, summaries, figures, title=title,
                                       figure_samples=figure_samples)
        notes = metrics.notes if lpips and metrics.lpips is None else ()
        return CheckpointEvaluation(summaries, out_dir, written, tuple(notes), context.rank)
    finally:
        cleanup()
