"""The video-prediction task: training (:func:`train`) and scoring (:func:`evaluate_checkpoint`).

Training is the skeleton's (:func:`~.training.skeleton.train_task`) with this task plugged
in (:class:`PredictionTask`). Per step: a batch of ``input_frames + future_frames`` frames,
a rollout with scheduled sampling (``outputs[t]`` predicts frame ``t + 1``), the loss
``l1_weight * L1 + mse_weight * MSE`` over every one-step output (:func:`sequence_loss`),
and the learning rate and sampling ratio of :class:`~.training.schedules.TrainingSchedule`.
Every ``val_every`` steps a fixed, seeded validation set is scored (``input -> future``
MSE and the other metrics of :mod:`.evaluation`); the schedule's plateau rule sees
``MSE + MAE`` and the best model by validation MSE is kept in ``checkpoints/best.pt``. At
the end the run folder also holds ``metrics.json`` / ``metrics.md`` (model and the two
trivial predictors), ``curves.png``, ``predictions.png`` and ``predictions.gif``.

:func:`evaluate_checkpoint` rolls a checkpoint (ours or the paper release's) out over a
test split for any horizon, measures every future frame of every sequence on the device in
batches, beside the two trivial predictors (repeat the last input frame; an all-black
frame), and writes the same files. Under ``torchrun`` the split is sharded over the ranks
and the sums reduced; rank 0 writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .checkpoint import CHECKPOINT_FORMAT
from .config import DataConfig, OptimConfig, TrainConfig
from .data.factory import DatasetSpec, build_video_dataset, sample_shape
from .evaluation import evaluate, evaluation_loader, first_batch_predictions, write_evaluation
from .inference import load_model
from .metrics import FrameMetrics
from .model import ArchitectureConfig, VideoPredictionNetwork
from .precision import resolve_precision
from .training.checkpoints import LAST, RunExistsError  # noqa: F401  (raised by train())
from .training.distributed import DistContext, cleanup, init_distributed
from .training.logging import RunLogger
from .training.schedules import TrainingSchedule
from .training.skeleton import Task, Validation, train_task

PathLike = Union[str, Path]

#: Metrics logged by every validation round.
LOGGED_METRICS = ("mse", "mae", "psnr", "ssim")


# ---------------------------------------------------------------------------- pieces


def dataset_spec(data: DataConfig) -> DatasetSpec:
    """The :class:`~.data.factory.DatasetSpec` of a :class:`~.config.DataConfig`.

    ``samples_per_epoch`` sizes only the generated Moving MNIST stream: prepared training
    files (and KTH) are used whole. Validation takes at most ``val_sequences``.
    """
    lengths = {"val": data.val_sequences, "test": data.val_sequences}
    if data.dataset == "moving-mnist" and data.root is None:
        lengths["train"] = data.samples_per_epoch
    return DatasetSpec(
        name=data.dataset, data_root=data.root, input_frames=data.input_frames,
        future_frames=data.future_frames, image_size=data.frame_size, digits=data.n_digits,
        seed=data.seed, lengths=lengths, mnist_dir=data.mnist_dir,
        kth_val_persons=data.kth_val_persons)


def validation_split(data: DataConfig) -> str:
    """``"val"``, except for KTH without held-out persons: then the test persons."""
    return "test" if data.dataset == "kth" and not data.kth_val_persons else "val"


def sequence_loss(outputs: torch.Tensor, targets: torch.Tensor, optim: OptimConfig) -> torch.Tensor:
    """``l1_weight * mean |o - t| + mse_weight * mean (o - t)^2`` in float32."""
    error = outputs.float() - targets.float()
    loss = error.new_zeros(())
    if optim.l1_weight:
        loss = loss + optim.l1_weight * error.abs().mean()
    if optim.mse_weight:
        loss = loss + optim.mse_weight * error.square().mean()
    return loss


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


class PredictionTask(Task):
    """Next-frame prediction on Moving MNIST or KTH, plugged into the training skeleton."""

    description = "train"
    checkpoint_format = CHECKPOINT_FORMAT
    best_metric = "val_mse"
    item_name = "sequences"

    def __init__(self, config: TrainConfig):
        super().__init__(config)
        self.spec = dataset_spec(config.data)

    @property
    def model_name(self) -> str:
        return self.config.model.cell

    def training_set(self, epoch: int, context: DistContext):
        return build_video_dataset(self.spec, "train", epoch=epoch, rank=context.rank,
                                   world_size=context.world_size)

    def prepare(self, first_training_set, context: DistContext) -> None:
        data, model = self.config.data, self.config.model
        self.frame_shape = tuple(sample_shape(first_training_set)[1:])
        check_frame_geometry(model, self.frame_shape, f"the {data.dataset} training set")
        self.context = context
        self.val_split = validation_split(data)
        val_set = build_video_dataset(self.spec, self.val_split)
        check_frame_geometry(model, tuple(sample_shape(val_set)[1:]),
                             f"the {data.dataset} {self.val_split} set")
        self.val_loader = evaluation_loader(val_set, self.config.run.val_batch_size,
                                            num_workers=data.num_workers, rank=context.rank,
                                            world_size=context.world_size)
        self.metrics = FrameMetrics.create(context.device, lpips=False)

    def checkpoint_record(self) -> Dict[str, Any]:
        # predict resizes a user's frames to this size (C, H, W) by default.
        return {"frame_shape": [int(n) for n in self.frame_shape]}

    def build_model(self) -> nn.Module:
        return VideoPredictionNetwork(self.config.model,
                                      channels_last=self.config.run.channels_last)

    def build_schedule(self) -> TrainingSchedule:
        optim = self.config.optim
        self.schedule = TrainingSchedule(self.config.schedule, optim.lr, optim.min_lr,
                                         self.config.run.steps)
        return self.schedule

    def generators(self, context: DistContext) -> Dict[str, torch.Generator]:
        # Scheduled sampling draws from its own generator, different on every rank.
        seed = self.config.run.seed * 1009 + 17 + context.rank
        self.sampling = torch.Generator(device=context.device).manual_seed(seed)
        return {"sampling": self.sampling}

    def forward(self, model: nn.Module, frames: torch.Tensor, step: int) -> torch.Tensor:
        return model(frames, self.config.data.future_frames, teacher_forcing=True,
                     sampling_ratio=self.schedule.sampling_ratio(step), all_outputs=True,
                     generator=self.sampling,
                     checkpoint_steps=self.config.run.activation_checkpointing)

    def loss(self, outputs: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return sequence_loss(outputs, frames[:, 1:], self.config.optim)

    def step_values(self, outputs, frames, step: int) -> Dict[str, float]:
        return {"sampling_ratio": self.schedule.sampling_ratio(step)}

    def validate(self, model: nn.Module, step: int, *, final: bool,
                 logger: RunLogger) -> Validation:
        data, run = self.config.data, self.config.run
        extra = dict(step=step, dataset=data.dataset, split=self.val_split) if final else {}
        summaries = evaluate(model, self.val_loader, input_frames=data.input_frames,
                             future_frames=data.future_frames, metrics=self.metrics,
                             device=self.context.device, precision=run.precision,
                             trivial=final, **extra)
        summary = summaries["model"] if final else summaries
        metrics = summary["metrics"]
        if not final and run.image_every and step % run.image_every == 0 and \
                self.context.is_main:
            _, truth, prediction = self._figures(model, max_samples=1)
            logger.images(step, "val/truth", truth[0])
            logger.images(step, "val/prediction", prediction[0])
        return Validation(score=metrics["mse"]["mean"],
                          values={name: metrics[name]["mean"] for name in LOGGED_METRICS},
                          summary=summaries,
                          schedule_loss=metrics["mse"]["mean"] + metrics["mae"]["mean"])

    def _figures(self, model: nn.Module, max_samples: int):
        data = self.config.data
        return first_batch_predictions(model, self.val_loader, input_frames=data.input_frames,
                                       future_frames=data.future_frames,
                                       device=self.context.device,
                                       precision=self.config.run.precision,
                                       max_samples=max_samples)

    def write_outputs(self, run_dir: Path, model: nn.Module, final: Validation) -> None:
        """metrics.json / .md, curves.png, predictions.png / .gif (``evaluate``'s files)."""
        data = self.config.data
        title = (f"{LAST} on {data.dataset} {self.val_split}, "
                 f"{data.input_frames} -> {data.future_frames}")
        write_evaluation(run_dir, final.summary, self._figures(model, max_samples=4),
                         title=title, figure_samples=4)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run reports (the same numbers on every rank) and the trained model."""

    run_dir: Path
    step: int
    seconds: float
    summaries: Dict[str, Dict[str, object]]
    best_val_mse: float
    model: torch.nn.Module
    rank: int = 0


def train(config: TrainConfig, *, overwrite: bool = False,
          context: Optional[DistContext] = None) -> TrainResult:
    """Train (or continue) the video-prediction run described by ``config``.

    Parameters
    ----------
    config : TrainConfig
        Everything (see :mod:`applications.conv_tt_lstm.config`); ``config.run.resume``
        ``"auto"`` continues from the run's ``checkpoints/last.pt`` when there is one.
    overwrite, context
        As in :func:`~.training.skeleton.train_task`, which also lists what it raises.
    """
    result = train_task(PredictionTask(config), overwrite=overwrite, context=context)
    return TrainResult(result.run_dir, result.step, result.seconds, result.final.summary,
                       result.best, result.model, result.rank)


def improvement_table(summaries: Dict[str, Dict[str, object]]) -> str:
    """Markdown: validation MSE of the model and both trivial predictors, and the margin."""
    mse = {name: summaries[name]["metrics"]["mse"]["mean"] for name in summaries}
    better = min(mse["last_frame"], mse["black_frame"])
    lines = ["| predictor | val MSE x1e3 | SSIM | PSNR (dB) |", "|---|---|---|---|"]
    labels = {"model": "model", "last_frame": "repeat last input frame",
              "black_frame": "black frame"}
    for name in ("model", "last_frame", "black_frame"):
        m = summaries[name]["metrics"]
        lines.append(f"| {labels[name]} | {1e3 * mse[name]:.2f} | {m['ssim']['mean']:.4f} | "
                     f"{m['psnr']['mean']:.2f} |")
    first = summaries["model"]
    gain = 100 * (1 - mse["model"] / better)
    side = "below" if gain >= 0 else "above"  # an untrained model can be worse than both
    lines.append("")
    lines.append(f"{first['n_sequences']} validation sequences, {first['input_frames']} -> "
                 f"{first['future_frames']}; MSE per pixel on [0, 1]. The model's MSE is "
                 f"{abs(gain):.1f} % {side} the better trivial predictor's.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` measured and wrote (the same numbers on every rank)."""

    summaries: Dict[str, Dict[str, object]]
    out_dir: Path
    written: List[Path]
    notes: Tuple[str, ...]
    rank: int


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
            # --image-size sets only generated frames; prepared ones have their own size.
            fix = ("choose an --image-size divisible by it" if spec.data_root is None
                   else "prepare the frames at a size divisible by it (`predict --size` "
                        "resizes a user's frames)")
            raise ValueError(f"{height} x {width} frames are not divisible by the model's "
                             f"patch_size {config.patch_size}; {fix}")
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
