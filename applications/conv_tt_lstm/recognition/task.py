"""The early-recognition task: training (:func:`train_recognizer`) and scoring
(:func:`evaluate_checkpoint`).

Training is the skeleton's (:func:`~..training.skeleton.train_task`) with this task plugged
in (:class:`RecognitionTask`). Per step: a batch of whole clips and their labels, per-step
logits ``[B, T, classes]``, the loss of :func:`sequence_cross_entropy` (every step by
default, see :class:`~.config.RecognitionOptimConfig` for why) and an optional cosine
learning-rate decay to 5 % of ``optim.lr`` (``run.cosine``). Validation scores top-1 /
top-5 accuracy after each fraction of the clip (:func:`~.evaluate.accuracy_by_fraction`);
``checkpoints/best.pt`` keeps the best top-1 at the last fraction.

The run folder holds ``config.json`` (resolved: the class count and frame channels come
from the dataset), the skeleton's logs and checkpoints and, at the end,
``recognition.json``, ``recognition.md`` and ``accuracy_vs_fraction.png`` on the evaluation
split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..complexity import parameter_counts
from ..data.factory import build_clip_source
from ..data.ssv2 import read_failure_log
from ..evaluation import evaluation_loader
from ..files import write_json_atomic, write_text_atomic
from ..precision import resolve_precision
from ..training.checkpoints import RunExistsError  # noqa: F401  (raised by train_recognizer())
from ..training.distributed import DistContext, cleanup, init_distributed
from ..training.threads import ThreadPolicy
from ..training.logging import RunLogger
from ..training.schedules import ScheduleConfig, TrainingSchedule
from ..training.skeleton import Task, Validation, train_task
from .config import RecognitionConfig, RecognitionOptimConfig
from .evaluate import accuracy_by_fraction, accuracy_table, plot_accuracy_by_fraction
from .model import CHECKPOINT_FORMAT, build_classifier, load_classifier

#: SSV2 videos that failed to decode, logged in the run folder.
FAILURE_LOG = "ssv2-failures.jsonl"
#: Floor of the cosine learning-rate decay, as a share of ``optim.lr``.
COSINE_FLOOR = 0.05


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


class RecognitionTask(Task):
    """Early recognition of labelled clips, plugged into the training skeleton."""

    checkpoint_format = CHECKPOINT_FORMAT
    best_metric = "top1"
    higher_is_better = True
    item_name = "clips"

    def __init__(self, config: RecognitionConfig):
        super().__init__(config)
        self.description = f"recognize {config.data.dataset}"
        run_dir = Path(config.run.runs_dir) / config.run.name
        self.failure_log = run_dir / FAILURE_LOG if config.data.dataset == "ssv2" else None

    @property
    def model_name(self) -> str:
        return self.config.model.model

    def training_set(self, epoch: int, context: DistContext):
        source = build_clip_source(self.config.data, "train", epoch=epoch, rank=context.rank,
                                   world_size=context.world_size, failure_log=self.failure_log)
        if epoch == 0:
            self.train_source = source
        return source.dataset

    def prepare(self, first_training_set, context: DistContext) -> None:
        data, source = self.config.data, self.train_source
        self.context = context
        eval_source = build_clip_source(data, data.eval_split, failure_log=self.failure_log)
        # The dataset decides the classes and channels; the resolved values are saved.
        self.config = dataclasses.replace(self.config, model=dataclasses.replace(
            self.config.model, n_classes=source.n_classes, image_channels=source.frame_shape[0]))
        self.eval_loader = evaluation_loader(eval_source.dataset, self.config.run.val_batch_size,
                                             num_workers=data.num_workers, rank=context.rank,
                                             world_size=context.world_size)

    def build_model(self) -> nn.Module:
        return build_classifier(self.config.model)

    def build_schedule(self) -> TrainingSchedule:
        run, lr = self.config.run, self.config.optim.lr
        rule = ScheduleConfig(sampling="none", lr_decay="cosine" if run.cosine else "none")
        return TrainingSchedule(rule, lr, COSINE_FLOOR * lr, run.steps)

    def forward(self, model: nn.Module, batch, step: int) -> torch.Tensor:
        frames, _ = batch
        return model(frames)

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return sequence_cross_entropy(logits, batch[1], self.config.optim)

    def step_values(self, logits: torch.Tensor, batch, step: int) -> Dict[str, float]:
        accuracy = (logits[:, -1].argmax(-1) == batch[1]).float().mean()
        return {"top1_last_step": float(accuracy)}

    def validate(self, model: nn.Module, step: int, *, final: bool,
                 logger: RunLogger) -> Validation:
        config = self.config
        summary = accuracy_by_fraction(model, self.eval_loader, config.run.fractions,
                                       device=self.context.device,
                                       precision=config.run.precision,
                                       distributed=self.context.distributed)
        score = summary["fractions"][-1]["top1"]
        if final:
            summary = {"dataset": config.data.dataset, "split": config.data.eval_split,
                       "model": config.model.model, "parameters": parameter_counts(model),
                       "step": step, **summary}
            if self.failure_log is not None:
                # Videos that failed to decode (and were replaced by the next clip), by id.
                summary["video_failures"] = read_failure_log(self.failure_log)
        return Validation(score=score, values=_flat(summary), summary=summary)

    def write_outputs(self, run_dir: Path, model: nn.Module, final: Validation) -> None:
        write_report(run_dir, final.summary, chance=1.0 / self.train_source.n_classes)


def train_recognizer(config: RecognitionConfig, *, overwrite: bool = False,
                     context: Optional[DistContext] = None) -> RecognitionResult:
    """Train (or continue) the run of ``config``, then score the evaluation split.

    Parameters
    ----------
    config : RecognitionConfig
        ``config.run.resume="auto"`` continues from ``checkpoints/last.pt`` when it exists.
    overwrite, context
        As in :func:`~..training.skeleton.train_task`.

    Raises
    ------
    NonFiniteLossError
        The loss became NaN or infinite (the last checkpoint is intact).
    RunExistsError, ResumeError, PrecisionError, FileNotFoundError, ValueError
        Bad input, each naming what to change.
    """
    result = train_task(RecognitionTask(config), overwrite=overwrite, context=context)
    summary = result.final.summary
    return RecognitionResult(result.run_dir, result.step, result.seconds, summary,
                             summary["parameters"], result.rank)


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
        ThreadPolicy(config.run.threads, context.local_world_size)
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
