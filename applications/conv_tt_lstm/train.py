"""Training of the video-prediction network, top to bottom in one function: :func:`train`.

Per step: a batch of ``input_frames + future_frames`` frames, a rollout with scheduled
sampling (``outputs[t]`` predicts frame ``t + 1``), the loss ``l1_weight * L1 + mse_weight *
MSE`` over every one-step output, Adam with gradient clipping, and the learning rate and
sampling ratio of :class:`~.training.schedules.TrainingSchedule`. Every ``val_every`` steps a
fixed, seeded validation set is scored (``input -> future`` MSE and the other metrics of
:mod:`.evaluation`), the schedule sees the result and the best model is kept in
``checkpoints/best.pt``; every ``checkpoint_every`` steps and at the end ``checkpoints/last.pt``
holds everything needed to continue exactly (``resume="auto"``).

A run folder ``runs_dir/name/`` holds ``config.json``, ``log.jsonl``, ``tensorboard/``,
``checkpoints/{last,best}.pt`` and, at the end, ``metrics.json`` / ``metrics.md`` (model and
the two trivial predictors), ``curves.png``, ``predictions.png`` and ``predictions.gif``.

Under ``torchrun`` every rank trains on its own share of the data in
DistributedDataParallel; losses and metrics are reduced over ranks and rank 0 writes.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset

from .files import atomic_torch_save, write_json_atomic
from .config import DataConfig, OptimConfig, TrainConfig
from .data.factory import DatasetSpec, build_video_dataset, sample_shape
from .evaluation import (
    evaluate, evaluation_loader, first_batch_predictions, write_evaluation,
)
from .metrics import FrameMetrics
from .checkpoint import checkpoint_dict
from .model import VideoPredictionNetwork
from .training import checkpoints as ckpt
from .training.checkpoints import RunExistsError  # noqa: F401  (raised by train())
from .training.distributed import (
    DistContext, ResumableDistributedSampler, all_gather_state, barrier, broadcast_object, cleanup,
    init_distributed, set_threads, wrap_model,
)
from .training.logging import RunLogger
from .training.loop import NonFiniteLossError, optimizer_step
from .precision import resolve_precision
from .prediction import check_frame_geometry
from .training.schedules import TrainingSchedule


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


class TrainBatches:
    """Training batches by global step: epoch ``e`` is batches ``[e * n, (e + 1) * n)``.

    Batch ``s`` depends only on ``(seed, s)`` and the world size, so a resumed run gets
    exactly the batches the interrupted one would have had. Generated Moving MNIST streams
    are rebuilt per epoch (each rank its own part); map-style datasets (prepared files, KTH)
    are shuffled per epoch by :class:`~.training.distributed.ResumableDistributedSampler`.
    """

    def __init__(self, spec: DatasetSpec, batch_size: int, context: DistContext, *,
                 num_workers: int = 0, seed: int = 0):
        self.spec, self.batch_size, self.context = spec, batch_size, context
        self.num_workers, self.seed = num_workers, seed
        first = self._dataset(0)
        self.iterable = isinstance(first, IterableDataset)
        share = len(first) if self.iterable else math.ceil(len(first) / context.world_size)
        self.batches_per_epoch = share // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the training set gives each of {context.world_size} rank(s) {share} "
                f"sequences, fewer than one batch of {batch_size}; lower --batch-size")
        self.frame_shape = tuple(sample_shape(first)[1:])

    def _dataset(self, epoch: int):
        return build_video_dataset(self.spec, "train", epoch=epoch, rank=self.context.rank,
                                   world_size=self.context.world_size)

    def _loader(self, epoch: int, offset: int) -> Iterator[torch.Tensor]:
        dataset = self._dataset(epoch)
        # The loader's own generator keeps it from drawing on the global RNG.
        generator = torch.Generator().manual_seed(self.seed + epoch)
        common = dict(batch_size=self.batch_size, drop_last=True, num_workers=self.num_workers,
                      generator=generator, pin_memory=self.context.device.type == "cuda")
        if self.iterable:
            batches = iter(DataLoader(dataset, **common))
            return itertools.islice(batches, offset, None)  # generated: regenerate, skip
        sampler = ResumableDistributedSampler(dataset, self.context, shuffle=True,
                                              seed=self.seed, epoch=epoch,
                                              start=offset * self.batch_size)
        return iter(DataLoader(dataset, sampler=sampler, **common))

    def from_step(self, step: int) -> Iterator[torch.Tensor]:
        """Batches ``step, step + 1, ...`` forever (epoch after epoch)."""
        epoch, offset = divmod(step, self.batches_per_epoch)
        while True:
            remaining = self.batches_per_epoch - offset
            yield from itertools.islice(self._loader(epoch, offset), remaining)
            epoch, offset = epoch + 1, 0


def _out_of_time(started: float, limit: float, context: DistContext) -> bool:
    """Whether ``limit`` seconds have passed, as rank 0 sees it (all ranks stop together)."""
    return bool(broadcast_object(time.perf_counter() - started > limit, context))


# ---------------------------------------------------------------------------- train


def train(config: TrainConfig, *, overwrite: bool = False,
          context: Optional[DistContext] = None) -> TrainResult:
    """Train (or continue) the run described by ``config``.

    Parameters
    ----------
    config : TrainConfig
        Everything (see :mod:`applications.conv_tt_lstm.config`); ``config.run.resume``
        ``"auto"`` continues from the run's ``checkpoints/last.pt`` when there is one.
    overwrite : bool
        Start afresh even if the run folder holds a checkpoint (its files are replaced).
    context : DistContext, optional
        Already-initialised process placement (default: :func:`init_distributed`, which reads
        torchrun's environment and is undone at the end).

    Raises
    ------
    NonFiniteLossError
        The loss became NaN/inf; the last checkpoint written before is intact.
    RunExistsError, ResumeError, PrecisionError, FileNotFoundError, DatasetFileError, ValueError
        Bad input, each naming what to change.
    """
    own_context = context is None
    context = init_distributed(config.run.device) if own_context else context
    try:
        return _train(config, context, overwrite)
    finally:
        if own_context:
            cleanup()


def _train(config: TrainConfig, context: DistContext, overwrite: bool) -> TrainResult:
    run, data = config.run, config.data
    device = context.device
    set_threads(run.threads)
    precision = resolve_precision(run.precision, device)
    run_dir = Path(run.runs_dir) / run.name
    last_path = ckpt.checkpoint_dir(run_dir) / ckpt.LAST
    resume_path = ckpt.start_run(run_dir, run.resume, overwrite)

    # Data first: a missing or malformed dataset fails before any work.
    spec = dataset_spec(data)
    batches = TrainBatches(spec, data.batch_size, context, num_workers=data.num_workers,
                           seed=data.seed)
    check_frame_geometry(config.model, batches.frame_shape, f"the {data.dataset} training set")
    val_split = validation_split(data)
    val_set = build_video_dataset(spec, val_split)
    check_frame_geometry(config.model, tuple(sample_shape(val_set)[1:]),
                         f"the {data.dataset} {val_split} set")
    val_loader = evaluation_loader(val_set, run.val_batch_size, num_workers=data.num_workers,
                                   rank=context.rank, world_size=context.world_size)
    metrics = FrameMetrics.create(device, lpips=False)

    torch.manual_seed(run.seed)  # the same initial weights on every rank
    model = VideoPredictionNetwork(config.model, channels_last=run.channels_last).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr,
                                 betas=config.optim.betas, weight_decay=config.optim.weight_decay)
    scaler = precision.make_scaler()
    schedule = TrainingSchedule(config.schedule, config.optim.lr, config.optim.min_lr, run.steps)
    # Scheduled sampling draws from its own generator, different on every rank.
    sampling = torch.Generator(device=device).manual_seed(run.seed * 1009 + 17 + context.rank)
    stateful = {"optimizer": optimizer, "scaler": scaler, "schedule": schedule}
    generators = {"sampling": sampling}

    step, best_val = 0, math.inf
    if resume_path is not None:
        saved = ckpt.load_training_checkpoint(resume_path, map_location=device)
        if saved.get("architecture") != config.model.to_dict():
            raise ckpt.ResumeError(
                f"{resume_path} was trained with model {saved.get('architecture')}, but the "
                f"configuration asks for {config.model.to_dict()}")
        model.load_state_dict(saved["state_dict"])
        step = ckpt.restore_training_state(saved["training"], stateful)
        per_rank = saved["training"]["extra"].get("rng_per_rank", [])
        if len(per_rank) != context.world_size:
            raise ckpt.ResumeError(
                f"{resume_path} was written by {len(per_rank)} rank(s); resume it with as "
                f"many (now {context.world_size}) so that every random stream continues")
        ckpt.restore_rng_state(per_rank[context.rank], generators)
        best_val = float(saved["training"]["extra"].get("best_val_mse", math.inf))
    ddp_model = wrap_model(model, context)

    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config.to_dict())
    logger = RunLogger(run_dir, context, run.steps, initial_step=step, progress=run.progress)
    started = time.perf_counter()

    def save_last(at_step: int) -> None:
        rng = all_gather_state(ckpt.capture_rng_state(generators), context)
        if context.is_main:
            training = ckpt.training_state(
                at_step, stateful, extra={"rng_per_rank": rng, "best_val_mse": best_val,
                                          "config": config.to_dict()})
            ckpt.save_training_checkpoint(last_path, checkpoint_dict(model), training)
        barrier(context)

    def validate(at_step: int) -> Dict[str, object]:
        summary = evaluate(ddp_model, val_loader, input_frames=data.input_frames,
                           future_frames=data.future_frames, metrics=metrics, device=device,
                           precision=run.precision)
        values = {name: summary["metrics"][name]["mean"] for name in ("mse", "mae", "psnr", "ssim")}
        logger.record(at_step, "val", values)
        return summary

    def log_images(at_step: int) -> None:
        if not context.is_main:
            return
        inputs, truth, prediction = first_batch_predictions(
            model, val_loader, input_frames=data.input_frames,
            future_frames=data.future_frames, device=device, precision=run.precision,
            max_samples=1)
        logger.images(at_step, "val/truth", truth[0])
        logger.images(at_step, "val/prediction", prediction[0])

    try:
        stream = batches.from_step(step)
        model.train()
        while step < run.steps:
            tick = time.perf_counter()
            frames = next(stream).to(device, non_blocking=True)
            ratio = schedule.sampling_ratio(step)
            lr = schedule.lr(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with precision.autocast():
                outputs = ddp_model(frames, data.future_frames, teacher_forcing=True,
                                    sampling_ratio=ratio, all_outputs=True, generator=sampling,
                                    checkpoint_steps=run.activation_checkpointing)
            loss = sequence_loss(outputs, frames[:, 1:], config.optim)
            value = optimizer_step(loss, optimizer, step=step + 1, context=context,
                                   scaler=scaler, clip_grad_norm=config.optim.clip_grad_norm)
            step += 1
            logger.advance(loss=f"{value:.4f}", r=f"{ratio:.2f}")
            if run.log_every and (step % run.log_every == 0 or step == 1):
                logger.record(step, "train", {"loss": value, "lr": lr, "sampling_ratio": ratio,
                                              "seconds_per_step": time.perf_counter() - tick})
            if run.val_every and step % run.val_every == 0 and step < run.steps:
                summary = validate(step)
                val_mse = summary["metrics"]["mse"]["mean"]
                schedule.end_of_round(val_mse + summary["metrics"]["mae"]["mean"])
                if val_mse < best_val:
                    best_val = val_mse
                    if context.is_main:
                        atomic_torch_save(
                            checkpoint_dict(model, step=step, val_mse=val_mse),
                            ckpt.checkpoint_dir(run_dir) / ckpt.BEST)
                if run.image_every and step % run.image_every == 0:
                    log_images(step)
            if run.checkpoint_every and step % run.checkpoint_every == 0 and step < run.steps:
                save_last(step)
            if run.time_limit and step < run.steps and \
                    _out_of_time(started, run.time_limit, context):
                logger.message(f"time limit of {run.time_limit:.0f} s reached at step {step} "
                               f"of {run.steps}: stopping training early")
                logger.record(step, "time_limit", {"seconds": time.perf_counter() - started})
                break
        save_last(step)
    except NonFiniteLossError as error:
        logger.record(error.step, "error", {"message": str(error)})
        logger.close()
        raise

    # The end: the final validation with both trivial predictors, files, figures.
    summaries = evaluate(ddp_model, val_loader, input_frames=data.input_frames,
                         future_frames=data.future_frames, metrics=metrics, device=device,
                         precision=run.precision, trivial=True, step=step,
                         dataset=data.dataset, split=val_split)
    val_mse = summaries["model"]["metrics"]["mse"]["mean"]
    logger.record(step, "val", {name: summaries["model"]["metrics"][name]["mean"]
                                for name in ("mse", "mae", "psnr", "ssim")})
    if val_mse < best_val:
        best_val = val_mse
        if context.is_main:
            atomic_torch_save(checkpoint_dict(model, step=step, val_mse=val_mse),
                                   ckpt.checkpoint_dir(run_dir) / ckpt.BEST)
    seconds = time.perf_counter() - started
    if context.is_main and run.final_outputs:
        _write_outputs(run_dir, summaries, model, val_loader, config, val_split)
    logger.record(step, "end", {"seconds": seconds, "val_mse": val_mse, "best_val_mse": best_val})
    logger.close()
    barrier(context)
    return TrainResult(run_dir, step, seconds, summaries, best_val, model, context.rank)


def _write_outputs(run_dir: Path, summaries, model, val_loader, config: TrainConfig,
                   split: str) -> None:
    """metrics.json / .md, curves.png, predictions.png / .gif (the ``evaluate`` command's files)."""
    data = config.data
    figures = first_batch_predictions(model, val_loader, input_frames=data.input_frames,
                                      future_frames=data.future_frames,
                                      device=next(model.parameters()).device,
                                      precision=config.run.precision, max_samples=4)
    title = (f"{ckpt.LAST} on {data.dataset} {split}, "
             f"{data.input_frames} -> {data.future_frames}")
    write_evaluation(run_dir, summaries, figures, title=title, figure_samples=4)


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
    lines.append("")
    lines.append(f"{first['n_sequences']} validation sequences, {first['input_frames']} -> "
                 f"{first['future_frames']}; MSE per pixel on [0, 1]. The model's MSE is "
                 f"{100 * (1 - mse['model'] / better):.1f} % below the better trivial "
                 f"predictor's.")
    return "\n".join(lines)
