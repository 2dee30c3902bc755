"""Training and evaluation of an early-recognition run, top to bottom: :func:`train_recognizer`.

Per step: a batch of whole clips and their labels, per-step logits ``[B, T, classes]``, the
loss of :func:`sequence_cross_entropy` (every step by default, see
:class:`~.config.RecognitionOptimConfig` for why), Adam with gradient clipping and an optional
cosine learning-rate decay, under the run's precision (fp32, bf16 autocast, or fp16 autocast
with a GradScaler on CUDA). The engine is :mod:`applications.conv_tt_lstm.training`
(precision, torchrun / DDP, atomic checkpoints with exact resume, tqdm + TensorBoard + JSONL).

A run folder ``runs_dir/name/`` holds ``config.json`` (resolved: the class count and frame
channels come from the dataset), ``log.jsonl``, ``tensorboard/``, ``checkpoints/last.pt``
(every ``checkpoint_every`` steps and at the end; ``resume="auto"`` continues exactly) and
``checkpoints/best.pt`` (best validation top-1 at the last fraction), and at the end
``recognition.json``, ``recognition.md`` and ``accuracy_vs_fraction.png``: top-1 / top-5
accuracy after each fraction of the clip on the evaluation split.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from ..files import atomic_torch_save, write_json_atomic, write_text_atomic
from ..data.factory import ClipSource, build_clip_source
from ..evaluation import evaluation_loader
from ..training import checkpoints as ckpt
from ..training.checkpoints import RunExistsError  # noqa: F401  (raised by train_recognizer())
from ..training.distributed import (
    DistContext, ResumableDistributedSampler, barrier, cleanup, init_distributed, set_threads,
    wrap_model,
)
from ..training.logging import RunLogger
from ..training.loop import NonFiniteLossError, optimizer_step
from ..precision import resolve_precision
from .config import RecognitionConfig, RecognitionOptimConfig
from .evaluate import accuracy_by_fraction, accuracy_table, plot_accuracy_by_fraction
from ..complexity import parameter_counts
from ..checkpoint import model_checkpoint
from .model import CHECKPOINT_FORMAT, build_classifier, load_classifier

FAILURE_LOG = "ssv2-failures.jsonl"


@dataclass
class RecognitionResult:
    """What :func:`train_recognizer` returns (rank 0's view)."""

    run_dir: Path
    step: int
    seconds: float
    summary: Dict[str, object]
    parameters: Dict[str, int]
    rank: int


def sequence_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                           optim: RecognitionOptimConfig) -> torch.Tensor:
    """Cross-entropy of per-step logits ``[B, T, K]`` against clip labels ``[B]``.

    ``optim.loss="all"``: the weighted mean over steps (the last step weighs
    ``optim.last_weight``, the others 1); ``"ramp"``: step ``t`` weighs ``t + 1`` (the last
    ``T * optim.last_weight``), normalised; ``"last"``: the last step only.
    """
    logits = logits.float()
    if optim.loss == "last":
        return F.cross_entropy(logits[:, -1], labels)
    steps = logits.shape[1]
    per_step = F.cross_entropy(logits.transpose(1, 2), labels.view(-1, 1).expand(-1, steps),
                               reduction="none").mean(0)
    if optim.loss == "ramp":
        weights = torch.arange(1, steps + 1, device=logits.device, dtype=per_step.dtype)
    else:
        weights = torch.ones(steps, device=logits.device, dtype=per_step.dtype)
    weights[-1] = weights[-1] * optim.last_weight
    return (per_step * weights).sum() / weights.sum()


class ClipBatches:
    """Training batches by global step: epoch ``e`` is batches ``[e * n, (e + 1) * n)``.

    Batch ``s`` depends only on ``(seed, s)`` and the world size, so a resumed run sees the
    batches the interrupted one would have seen: generated streams are rebuilt per epoch
    (each rank its own part) and map-style datasets (KTH, SSV2) shuffled per epoch by
    :class:`~..training.distributed.ResumableDistributedSampler`.
    """

    def __init__(self, config: RecognitionConfig, context: DistContext,
                 failure_log: Optional[Path]):
        self.config, self.context, self.failure_log = config, context, failure_log
        self.batch_size = config.data.batch_size
        self.first = self._source(0)
        dataset = self.first.dataset
        self.iterable = isinstance(dataset, IterableDataset)
        share = len(dataset) if self.iterable else math.ceil(len(dataset) / context.world_size)
        self.batches_per_epoch = share // self.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"the training set gives each of {context.world_size} rank(s) "
                             f"{share} clips, fewer than one batch of {self.batch_size}; lower "
                             f"--batch-size")

    def _source(self, epoch: int) -> ClipSource:
        return build_clip_source(self.config.data, "train", epoch=epoch, rank=self.context.rank,
                                 world_size=self.context.world_size,
                                 failure_log=self.failure_log)

    def _loader(self, epoch: int, offset: int) -> Iterator:
        dataset = self.first.dataset if epoch == 0 else self._source(epoch).dataset
        data = self.config.data
        generator = torch.Generator().manual_seed(data.seed + epoch)
        common = dict(batch_size=self.batch_size, drop_last=True, num_workers=data.num_workers,
                      generator=generator, pin_memory=self.context.device.type == "cuda")
        if self.iterable:
            return itertools.islice(iter(DataLoader(dataset, **common)), offset, None)
        sampler = ResumableDistributedSampler(dataset, self.context, shuffle=True,
                                              seed=data.seed, epoch=epoch,
                                              start=offset * self.batch_size)
        return iter(DataLoader(dataset, sampler=sampler, **common))

    def from_step(self, step: int) -> Iterator:
        """Batches ``step, step + 1, ...`` forever."""
        epoch, offset = divmod(step, self.batches_per_epoch)
        while True:
            yield from itertools.islice(self._loader(epoch, offset),
                                        self.batches_per_epoch - offset)
            epoch, offset = epoch + 1, 0


def _lr(config: RecognitionConfig, step: int) -> float:
    """Constant, or a cosine from ``optim.lr`` down to 5 % of it over the run."""
    lr = config.optim.lr
    if not config.run.cosine:
        return lr
    progress = min(1.0, step / config.run.steps)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_recognizer(config: RecognitionConfig, *, overwrite: bool = False,
                     context: Optional[DistContext] = None) -> RecognitionResult:
    """Train (or continue) the run of ``config``, then score the evaluation split.

    Parameters
    ----------
    config : RecognitionConfig
        ``config.run.resume="auto"`` continues from ``checkpoints/last.pt`` when it exists.
    overwrite : bool
        Start afresh even if the run folder holds a checkpoint.
    context : DistContext, optional
        Process placement (default: :func:`~..training.distributed.init_distributed`, from
        torchrun's environment, undone at the end).

    Raises
    ------
    NonFiniteLossError
        The loss became NaN or infinite (the last checkpoint is intact).
    RunExistsError, ResumeError, PrecisionError, FileNotFoundError, ValueError
        Bad input, each naming what to change.
    """
    own_context = context is None
    context = init_distributed(config.run.device) if own_context else context
    try:
        return _train(config, context, overwrite)
    finally:
        if own_context:
            cleanup()


def _train(config: RecognitionConfig, context: DistContext, overwrite: bool) -> RecognitionResult:
    run, data = config.run, config.data
    device = context.device
    set_threads(run.threads)
    precision = resolve_precision(run.precision, device)
    run_dir = Path(run.runs_dir) / run.name
    last_path = ckpt.checkpoint_dir(run_dir) / ckpt.LAST
    resume_path = ckpt.start_run(run_dir, run.resume, overwrite)
    failure_log = run_dir / FAILURE_LOG if data.dataset == "ssv2" else None

    # Data first: missing or malformed data fail before any work.
    batches = ClipBatches(config, context, failure_log)
    source = batches.first
    eval_source = build_clip_source(data, data.eval_split, failure_log=failure_log)
    # The dataset decides the classes and channels; the resolved values are saved.
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, n_classes=source.n_classes, image_channels=source.frame_shape[0]))
    eval_loader = evaluation_loader(eval_source.dataset, run.val_batch_size,
                                    num_workers=data.num_workers, rank=context.rank,
                                    world_size=context.world_size)

    torch.manual_seed(run.seed)  # the same initial weights on every rank
    model = build_classifier(config.model).to(device)
    parameters = parameter_counts(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr,
                                 betas=config.optim.betas, weight_decay=config.optim.weight_decay)
    scaler = precision.make_scaler()
    stateful = {"optimizer": optimizer, "scaler": scaler}

    step, best = 0, -1.0
    if resume_path is not None:
        saved = ckpt.load_training_checkpoint(resume_path, map_location=device)
        if saved.get("architecture") != config.model.to_dict():
            raise ckpt.ResumeError(
                f"{resume_path} was trained with model {saved.get('architecture')}, but the "
                f"configuration asks for {config.model.to_dict()}")
        model.load_state_dict(saved["state_dict"])
        step = ckpt.restore_training_state(saved["training"], stateful)
        best = float(saved["training"]["extra"].get("best_top1", -1.0))
    ddp_model = wrap_model(model, context)

    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", config.to_dict())
        if step == 0:
            print(f"{config.model.model}: {parameters['total']:,} parameters "
                  f"({', '.join(f'{k} {v:,}' for k, v in parameters.items() if k != 'total')})",
                  flush=True)
    logger = RunLogger(run_dir, context, run.steps, initial_step=step, progress=run.progress,
                       description=f"recognize {data.dataset}")
    started = time.perf_counter()

    def save_last(at_step: int) -> None:
        if context.is_main:
            training = ckpt.training_state(at_step, stateful,
                                           extra={"best_top1": best, "config": config.to_dict()})
            ckpt.save_training_checkpoint(last_path, model_checkpoint(CHECKPOINT_FORMAT, config.model.to_dict(), model),
                                          training)
        barrier(context)

    def score() -> Dict[str, object]:
        return accuracy_by_fraction(ddp_model, eval_loader, run.fractions, device=device,
                                    precision=precision, distributed=context.distributed)

    def keep_best(summary: Dict[str, object], at_step: int) -> None:
        nonlocal best
        top1 = summary["fractions"][-1]["top1"]
        if top1 > best:
            best = top1
            if context.is_main:
                atomic_torch_save(model_checkpoint(CHECKPOINT_FORMAT, config.model.to_dict(), model, step=at_step,
                                                  top1=top1),
                                  ckpt.checkpoint_dir(run_dir) / ckpt.BEST)

    try:
        stream = batches.from_step(step)
        model.train()
        while step < run.steps:
            tick = time.perf_counter()
            frames, labels = next(stream)
            frames, labels = frames.to(device, non_blocking=True), labels.to(device)
            lr = _lr(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with precision.autocast():
                logits = ddp_model(frames)
            loss = sequence_cross_entropy(logits, labels, config.optim)
            value = optimizer_step(loss, optimizer, step=step + 1, context=context,
                                   scaler=scaler, clip_grad_norm=config.optim.clip_grad_norm)
            step += 1
            logger.advance(loss=f"{value:.3f}")
            if run.log_every and (step % run.log_every == 0 or step == 1):
                accuracy = (logits[:, -1].argmax(-1) == labels).float().mean()
                logger.record(step, "train", {"loss": value, "lr": lr,
                                              "top1_last_step": accuracy,
                                              "seconds_per_step": time.perf_counter() - tick})
            if run.val_every and step % run.val_every == 0 and step < run.steps:
                summary = score()
                logger.record(step, "val", _flat(summary))
                keep_best(summary, step)
            if run.checkpoint_every and step % run.checkpoint_every == 0 and step < run.steps:
                save_last(step)
        save_last(step)
    except NonFiniteLossError as error:
        logger.record(error.step, "error", {"message": str(error)})
        logger.close()
        raise

    summary = score()
    keep_best(summary, step)
    seconds = time.perf_counter() - started
    summary = {"dataset": data.dataset, "split": data.eval_split, "model": config.model.model,
               "parameters": parameters, "step": step, **summary}
    if failure_log is not None:
        from ..data.ssv2 import read_failure_log

        # Videos that failed to decode (and were replaced by the next clip), by id.
        summary["video_failures"] = read_failure_log(failure_log)
    logger.record(step, "end", {"seconds": seconds, **_flat(summary)})
    logger.close()
    if context.is_main:
        write_report(run_dir, summary, chance=1.0 / source.n_classes)
    barrier(context)
    return RecognitionResult(run_dir, step, seconds, summary, parameters, context.rank)


def _flat(summary: Dict[str, object]) -> Dict[str, float]:
    out = {}
    for row in summary["fractions"]:
        percent = f"{row['fraction'] * 100:g}"
        out[f"top1@{percent}%"] = row["top1"]
        out[f"top{summary['top_k']}@{percent}%"] = row["topk"]
    return out


def write_report(run_dir: Path, summary: Dict[str, object], chance: Optional[float] = None,
                 stem: str = "recognition") -> None:
    """``{stem}.json``, ``{stem}.md`` and the accuracy-versus-fraction PNG in ``run_dir``.

    The PNG is ``accuracy_vs_fraction.png`` for ``stem="recognition"`` (the end of a run),
    else ``accuracy_vs_fraction{suffix}.png`` with the stem's suffix (``-validation``, ...).
    """
    title = (f"{summary.get('model', '')} on {summary.get('dataset', '')} "
             f"{summary.get('split', '')}, step {summary.get('step', '')}").strip()
    write_json_atomic(run_dir / f"{stem}.json", summary)
    write_text_atomic(run_dir / f"{stem}.md", accuracy_table(summary, title))
    suffix = stem[len("recognition"):] if stem.startswith("recognition") else f"-{stem}"
    plot_accuracy_by_fraction(run_dir / f"accuracy_vs_fraction{suffix}.png", summary, title=title,
                              chance=chance)


def evaluate_checkpoint(checkpoint, config: RecognitionConfig, *, split: Optional[str] = None,
                        out_dir: Optional[Path] = None,
                        context: Optional[DistContext] = None) -> Dict[str, object]:
    """Score a saved classifier on ``split`` of ``config.data`` at ``config.run.fractions``.

    Writes the JSON / markdown / PNG report to ``out_dir`` (rank 0) when given.
    """
    own_context = context is None
    context = init_distributed(config.run.device) if own_context else context
    try:
        set_threads(config.run.threads)
        precision = resolve_precision(config.run.precision, context.device)
        model, saved = load_classifier(checkpoint, map_location=context.device)
        model.to(context.device)
        split = split or config.data.eval_split
        failure_log = out_dir / FAILURE_LOG if out_dir is not None and \
            config.data.dataset == "ssv2" else None
        source = build_clip_source(config.data, split, failure_log=failure_log)
        if source.n_classes != model.config.n_classes:
            raise ValueError(f"the checkpoint's model has {model.config.n_classes} classes, "
                             f"the {config.data.dataset} {split} set {source.n_classes}")
        loader = evaluation_loader(source.dataset, config.run.val_batch_size,
                                   num_workers=config.data.num_workers, rank=context.rank,
                                   world_size=context.world_size)
        summary = accuracy_by_fraction(model, loader, config.run.fractions,
                                       device=context.device, precision=precision,
                                       distributed=context.distributed)
        summary = {"dataset": config.data.dataset, "split": split,
                   "model": model.config.model, "parameters": parameter_counts(model),
                   "step": saved.get("step", saved.get("training", {}).get("step")), **summary}
        if out_dir is not None and context.is_main:
            write_report(Path(out_dir), summary, chance=1.0 / source.n_classes,
                         stem=f"recognition-{split}")
        return summary
    finally:
        if own_context:
            cleanup()
