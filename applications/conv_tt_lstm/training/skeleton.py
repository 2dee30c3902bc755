"""The one training skeleton: a run from start to end, top to bottom in :func:`train_task`.

The skeleton owns everything a run does whatever it learns: the CPU threads, the numeric
precision, the run folder and its ``config.json``, resuming exactly, wrapping the model in
DistributedDataParallel, Adam with gradient clipping and the learning-rate schedule, the
logger (a context manager: tqdm, JSONL, TensorBoard), ``checkpoints/last.pt`` every
``checkpoint_every`` steps and at the end, ``checkpoints/best.pt`` by validation, the time
limit and the stop on a non-finite loss, which names the last checkpoint whose loss and
weights were finite and not exploding (``checkpoints/healthy.pt``) to resume from. A task
plugs in what differs (:class:`Task`): its data, its model, a forward pass and a loss, a
validation score and its final outputs.

The tasks: video prediction (:class:`~applications.conv_tt_lstm.prediction.PredictionTask`)
and early recognition (:class:`~applications.conv_tt_lstm.recognition.task.RecognitionTask`).

A run folder ``runs_dir/name/`` holds ``config.json`` (the task's resolved configuration),
``log.jsonl``, ``tensorboard/``, ``checkpoints/{last,best}.pt`` and the task's outputs.
Under ``torchrun`` every rank trains on its own share of the data; losses and scores are
reduced over ranks, and rank 0 writes.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import load_state, model_checkpoint
from ..complexity import parameter_counts
from ..files import atomic_torch_save, write_json_atomic
from ..precision import resolve_precision
from . import checkpoints as ckpt
from .batches import StepBatches
from .distributed import (
    DistContext,
    all_gather_state,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    wrap_model,
)
from .logging import RunLogger
from .loop import NonFiniteLossError, optimizer_step
from .schedules import TrainingSchedule
from .threads import ThreadPolicy


@dataclass
class Validation:
    """One validation round of a task.

    Attributes
    ----------
    score : float
        The value of the task's :attr:`Task.best_metric` (what ``best.pt`` is chosen by).
    values : dict
        Logged as the round's ``"val"`` record.
    summary : object
        The task's whole result (its outputs and the run's result are made from it).
    schedule_loss : float, optional
        Fed to the learning-rate / sampling schedule's plateau rule.
    """

    score: float
    values: Dict[str, float]
    summary: Any = None
    schedule_loss: Optional[float] = None


@dataclass
class RunResult:
    """What a finished run reports (the same numbers on every rank) and the trained model."""

    run_dir: Path
    step: int
    seconds: float
    final: Validation
    best: float
    model: nn.Module
    rank: int


class Task:
    """What a task plugs into :func:`train_task`: everything that is not the skeleton.

    ``config`` is the task's sectioned configuration: ``model`` (with ``to_dict``), ``data``
    (``batch_size``, ``num_workers``, ``seed``), ``optim``
    (:class:`~.config.BaseOptimConfig`) and ``run`` (:class:`~.config.BaseRunConfig`).
    The hooks run in the order they are listed.
    """

    #: Progress-bar label.
    description = "train"
    #: ``format`` tag of the task's checkpoints.
    checkpoint_format = ""
    #: Name of the validation score ``best.pt`` is chosen by, and its direction.
    best_metric = "score"
    higher_is_better = False
    #: What a training item is, for messages.
    item_name = "items"

    def __init__(self, config):
        self.config = config

    @property
    def model_name(self) -> str:
        """The model's name for messages."""
        raise NotImplementedError

    def training_set(self, epoch: int, context: DistContext) -> Dataset:
        """This rank's training set of ``epoch``."""
        raise NotImplementedError

    def prepare(self, first_training_set: Dataset, context: DistContext) -> None:
        """Validation data and checks, before any work; may resolve ``self.config``."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """A fresh model (the skeleton seeds the RNG first and moves it to the device)."""
        raise NotImplementedError

    def checkpoint_record(self) -> Dict[str, Any]:
        """JSON-friendly facts every checkpoint of the run carries (after :meth:`prepare`)."""
        return {}

    def build_schedule(self) -> TrainingSchedule:
        """The learning rate (and sampling ratio) by step; saved with the checkpoints."""
        raise NotImplementedError

    def generators(self, context: DistContext) -> Dict[str, torch.Generator]:
        """The task's own random streams, saved per rank with the checkpoints."""
        return {}

    def forward(self, model: nn.Module, batch: Any, step: int) -> Any:
        """The model's outputs on a training batch (run under the precision's autocast)."""
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Any) -> torch.Tensor:
        """The scalar training loss."""
        raise NotImplementedError

    def step_values(self, outputs: Any, batch: Any, step: int) -> Dict[str, float]:
        """What to log and show of a training step beside its loss and learning rate."""
        return {}

    def validate(self, model: nn.Module, step: int, *, final: bool,
                 logger: RunLogger) -> Validation:
        """A validation round (``final``: the one after training, with everything)."""
        raise NotImplementedError

    def write_outputs(self, run_dir: Path, model: nn.Module, final: Validation) -> None:
        """The task's files at the end of the run (rank 0)."""
        raise NotImplementedError


def train_task(task: Task, *, overwrite: bool = False,
               context: Optional[DistContext] = None) -> RunResult:
    """Train (or continue) the run of ``task.config``; see the module docstring.

    Parameters
    ----------
    task : Task
        The task and its configuration (``config.run.resume`` ``"auto"`` continues from the
        run's ``checkpoints/last.pt`` when there is one).
    overwrite : bool
        Start afresh even if the run folder holds a checkpoint (its files are replaced).
    context : DistContext, optional
        Already-initialised process placement (default: :func:`~.distributed.init_distributed`,
        which reads torchrun's environment and is undone at the end).

    Raises
    ------
    NonFiniteLossError
        The loss became NaN/inf; its message names the last checkpoint from before the
        divergence (``checkpoints/healthy.pt``: finite, not exploding) to resume from.
    RunExistsError, ResumeError, PrecisionError, FileNotFoundError, DatasetFileError, ValueError
        Bad input, each naming what to change.
    """
    own_context = context is None
    context = init_distributed(task.config.run.device) if own_context else context
    try:
        return _train(task, context, overwrite)
    finally:
        if own_context:
            cleanup()


def _train(task: Task, context: DistContext, overwrite: bool) -> RunResult:
    run, optim, data = task.config.run, task.config.optim, task.config.data
    device = context.device
    threads = ThreadPolicy(run.threads, context.local_world_size)
    precision = resolve_precision(run.precision, device)
    run_dir = Path(run.runs_dir) / run.name
    resume_path = ckpt.start_run(run_dir, run.resume, overwrite)

    # Data first: missing or malformed data fail before any work.
    batches = StepBatches(lambda epoch: task.training_set(epoch, context), data.batch_size,
                          context, num_workers=data.num_workers, seed=data.seed,
                          unit=task.item_name)
    task.prepare(batches.first, context)
    config = task.config  # as the task resolved it (e.g. the dataset's class count)

    torch.manual_seed(run.seed)  # the same initial weights on every rank
    model = task.build_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=optim.lr, betas=optim.betas,
                                 weight_decay=optim.weight_decay)
    scaler = precision.make_scaler()
    schedule = task.build_schedule()
    generators = task.generators(context)
    stateful = {"optimizer": optimizer, "scaler": scaler, "schedule": schedule}
    step, best = 0, -math.inf if task.higher_is_better else math.inf
    # What "diverging" is measured against (ckpt.divergence): the run's initial weights'
    # norm and its first losses, saved with the checkpoints.
    health: Dict[str, Any] = {"initial_norm": ckpt.parameter_norm(model), "first_losses": []}
    losses_since_save: list = []
    if resume_path is not None:
        step, best, saved_health = _resume(resume_path, task, model, stateful, generators,
                                           context, best)
        health.update(saved_health)
    # The one place the model is wrapped for training (compiled, DistributedDataParallel).
    wrapped = wrap_model(model, context, compile=run.compile)

    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config.to_dict())
    started = time.perf_counter()

    def checkpoint(**extra: Any) -> Dict[str, Any]:
        return model_checkpoint(task.checkpoint_format, config.model.to_dict(), model,
                                **task.checkpoint_record(), **extra)

    def save_last(at_step: int) -> None:
        rng = all_gather_state(ckpt.capture_rng_state(generators), context)
        if context.is_main:
            first = health["first_losses"]
            reason = ckpt.divergence(model, optimizer, initial_norm=health["initial_norm"],
                                     losses=losses_since_save,
                                     reference_loss=sorted(first)[len(first) // 2]
                                     if first else None)
            # The verdict goes into last.pt, so --resume auto can pass over a diverged one.
            extra = {"rng_per_rank": rng, f"best_{task.best_metric}": best,
                     "config": config.to_dict(), "health": dict(health), "diverging": reason}
            folder = ckpt.checkpoint_dir(run_dir)
            ckpt.save_training_checkpoint(folder / ckpt.LAST, checkpoint(),
                                          ckpt.training_state(at_step, stateful, extra=extra))
            if reason is None:
                ckpt.keep_healthy(folder / ckpt.LAST, folder / ckpt.HEALTHY)
            else:
                if not logger.said("diverging"):
                    logger.message(f"step {at_step}: the run is diverging ({reason}); "
                                   f"{folder / ckpt.HEALTHY} keeps the last healthy "
                                   f"checkpoint")
                logger.record(at_step, "diverging", {"reason": reason})
        losses_since_save.clear()
        barrier(context)

    def keep_best(validation: Validation, at_step: int) -> None:
        nonlocal best
        better = validation.score > best if task.higher_is_better else validation.score < best
        if better:
            best = validation.score
            if context.is_main:
                atomic_torch_save(checkpoint(step=at_step, **{task.best_metric: best}),
                                  ckpt.checkpoint_dir(run_dir) / ckpt.BEST)

    # The run's length: run.steps, or what an earlier fit to the time limit left.
    total = schedule.total_steps
    fitting = step == 0 and run.fit_time_limit and run.time_limit > 0 and total > _FIT_FROM + _FIT_STEPS
    fit_clock = 0.0
    with RunLogger(run_dir, context, total, initial_step=step, progress=run.progress,
                   description=task.description) as logger:
        chosen = f" (run.precision={run.precision})" if run.precision != precision.name else ""
        logger.message(f"{device}, {precision.name}{chosen}, {threads.describe()}")
        if step == 0:
            counts = parameter_counts(model)
            parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k != "total")
            logger.message(f"{task.model_name}: {counts['total']:,} parameters ({parts})")
        try:
            stream = batches.from_step(step)
            model.train()
            while step < total:
                tick = time.perf_counter()
                batch = _to_device(next(stream), device)
                lr = schedule.lr(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with precision.autocast():
                    outputs = task.forward(wrapped, batch, step)
                loss = task.loss(outputs, batch)
                value = optimizer_step(loss, optimizer, step=step + 1, context=context,
                                       scaler=scaler, clip_grad_norm=optim.clip_grad_norm)
                values = task.step_values(outputs, batch, step)
                step += 1
                losses_since_save.append(value)
                if len(health["first_losses"]) < 10:
                    health["first_losses"].append(value)
                threads.update()
                if fitting and step == _FIT_FROM:
                    fit_clock = time.perf_counter()  # the first steps (compilation) not timed
                elif fitting and step == _FIT_FROM + _FIT_STEPS:
                    per_step = (time.perf_counter() - fit_clock) / _FIT_STEPS
                    fitted = broadcast_object(_steps_within(run.time_limit, started, per_step,
                                                            step, total), context)
                    fitting = False
                    if fitted < total:
                        logger.message(f"{total} steps would not fit into run.time_limit="
                                       f"{run.time_limit:.0f} s at {per_step:.2f} s per step: "
                                       f"training {fitted} steps, the schedule shortened "
                                       f"to match")
                        logger.record(step, "fit_time_limit", {"steps": fitted,
                                                               "seconds_per_step": per_step})
                        schedule.shorten(fitted)
                        total = fitted
                        logger.set_total(total)
                logger.advance(loss=f"{value:.4f}", **{k: f"{v:.3g}" for k, v in values.items()})
                if run.log_every and (step % run.log_every == 0 or step == 1):
                    logger.record(step, "train", {"loss": value, "lr": lr, **values,
                                                  "seconds_per_step": time.perf_counter() - tick})
                if run.val_every and step % run.val_every == 0 and step < total:
                    validation = task.validate(model, step, final=False, logger=logger)
                    logger.record(step, "val", validation.values)
                    if validation.schedule_loss is not None:
                        schedule.end_of_round(validation.schedule_loss)
                    keep_best(validation, step)
                if run.checkpoint_every and step % run.checkpoint_every == 0 and step < total:
                    save_last(step)
                if run.time_limit and step < total and \
                        _out_of_time(started, run.time_limit, context):
                    logger.message(f"time limit of {run.time_limit:.0f} s reached at step "
                                   f"{step} of {total}: stopping training early")
                    logger.record(step, "time_limit", {"seconds": time.perf_counter() - started})
                    break
            save_last(step)
        except NonFiniteLossError as error:
            stop = _divergence_stop(error, ckpt.checkpoint_dir(run_dir), context)
            logger.record(error.step, "error", {"message": str(stop)})
            raise stop from None

        # The end: the final validation, the best checkpoint, the task's files.
        final = task.validate(model, step, final=True, logger=logger)
        logger.record(step, "val", final.values)
        keep_best(final, step)
        seconds = time.perf_counter() - started
        if context.is_main and run.final_outputs:
            task.write_outputs(run_dir, model, final)
        logger.record(step, "end", {"seconds": seconds, **final.values,
                                    f"best_{task.best_metric}": best})
    barrier(context)
    return RunResult(run_dir, step, seconds, final, best, model, context.rank)


def _divergence_stop(error: NonFiniteLossError, folder: Path,
                     context: DistContext) -> NonFiniteLossError:
    """``error`` naming the checkpoint to resume from: the last healthy one, if any."""
    healthy, last = folder / ckpt.HEALTHY, folder / ckpt.LAST
    if not healthy.is_file():
        note = (f"{last} holds weights that had already diverged." if last.is_file() else "")
        return NonFiniteLossError(error.step, error.value, note=note)
    healthy_step = int(ckpt.load_training_checkpoint(healthy)["training"]["step"])
    note = ""
    if last.is_file() and not os.path.samefile(last, healthy):
        note = (f"{last} (a later step) is kept, but its weights had already diverged: do "
                f"not resume from it.")
    return NonFiniteLossError(error.step, error.value, resume_from=str(healthy),
                              resume_step=healthy_step, note=note)


def _resume(path: Path, task: Task, model: nn.Module, stateful: Mapping[str, Any],
            generators: Mapping[str, torch.Generator], context: DistContext,
            best: float) -> Tuple[int, float, Dict[str, Any]]:
    """Restore a run from ``path``: the step to continue from, the best score so far and
    what divergence is measured against (older checkpoints: nothing)."""
    saved = ckpt.load_training_checkpoint(path, map_location=context.device)
    wanted = task.config.model.to_dict()
    if saved.get("architecture") != wanted:
        raise ckpt.ResumeError(f"{path} was trained with model {saved.get('architecture')}, "
                               f"but the configuration asks for {wanted}")
    load_state(model, saved["state_dict"])
    step = ckpt.restore_training_state(saved["training"], stateful)
    extra = saved["training"]["extra"]
    per_rank = extra.get("rng_per_rank")
    if per_rank is not None or generators:
        per_rank = per_rank or []
        if len(per_rank) != context.world_size:
            raise ckpt.ResumeError(
                f"{path} was written by {len(per_rank)} rank(s); resume it with as many "
                f"(now {context.world_size}) so that every random stream continues")
        ckpt.restore_rng_state(per_rank[context.rank], generators)
    health = extra.get("health") or {}
    return step, float(extra.get(f"best_{task.best_metric}", best)), {
        k: health[k] for k in ("initial_norm", "first_losses") if k in health}


#: Steps timed before a run is fitted to its time limit, and the untimed steps before
#: them (the first compile kernels and warm caches).
_FIT_STEPS, _FIT_FROM = 10, 5
#: Share of the time left that the fitted steps may take (validation, checkpoints, the
#: final outputs and the slower steps of a busy machine take the rest).
_FIT_SHARE = 0.9


def _steps_within(limit: float, started: float, per_step: float, step: int,
                  total: int) -> int:
    """How many steps in all fit into ``limit`` seconds from ``started``, at most ``total``."""
    left = limit - (time.perf_counter() - started)
    return max(step, min(total, step + int(_FIT_SHARE * left / per_step)))


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(item, device) for item in batch)
    return batch.to(device, non_blocking=True)


def _out_of_time(started: float, limit: float, context: DistContext) -> bool:
    """Whether ``limit`` seconds have passed, as rank 0 sees it (all ranks stop together)."""
    return bool(broadcast_object(time.perf_counter() - started > limit, context))
