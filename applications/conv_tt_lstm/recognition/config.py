"""Configuration of an early-recognition run: plain dataclasses, presets, ``section.field=value``.

A :class:`RecognitionConfig` has four sections: ``model`` (:class:`~.model.ClassifierConfig`),
``data`` (:class:`RecognitionDataConfig`), ``optim`` (:class:`RecognitionOptimConfig`) and
``run`` (:class:`RecognitionRunConfig`). :data:`PRESETS`:

* ``quick``: the walls-touched synthetic task (:mod:`.synthetic`) on a 32 x 32 canvas with
  half-size digits, 16 frames, one Conv-TT-LSTM layer (32 channels, order 3, 3 steps, rank
  8; 60,152 parameters) on 8 x 8 features, the ramp loss (late steps weigh more), 1,500
  steps of 16 clips with a cosine decay; about 3 CPU-minutes (one thread), and accuracy
  growing with the fraction of the clip seen (one run, test top-1 at 25/50/75/100 %:
  42/53/69/70; the former two-layer ConvLSTM with equal step weights, 800 steps:
  45/58/67/65). ``--model`` switches.
* ``synthetic``: the same task at Moving MNIST's 64 x 64 with 16 frames, a longer run.
* ``kth``: the six KTH actions from a ``prepare kth`` folder (``data.root``), 20-frame clips.
* ``ssv2``: Something-Something V2's 174 classes (``data.root``), 16 RGB frames at 64 x 64.

Every field can be overridden (:func:`apply_overrides`); the resolved configuration is saved
with each run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, Tuple

from ..checks import check_choice, check_int
from ..data.factory import CLIP_SPLITS, ClipSpec
from ..training.config import (  # noqa: F401  (apply_overrides: re-exported)
    BaseOptimConfig,
    BaseRunConfig,
    SectionedConfig,
    apply_overrides,
)
from .model import ClassifierConfig

#: Datasets of ``recognize``.
DATASETS = tuple(CLIP_SPLITS)
#: Which steps the training loss covers, and how they are weighted.
LOSSES = ("all", "ramp", "last")


@dataclass(frozen=True)
class RecognitionDataConfig(ClipSpec):
    """What is trained and evaluated on: the clips (:class:`~..data.factory.ClipSpec`'s
    fields) and how they are served.

    Attributes
    ----------
    eval_split : str
        Split scored at the end: synthetic ``test`` (test digits) or ``val``; KTH ``test``
        (persons 17-25); SSV2 ``validation``.
    batch_size : int
        Clips per step on each process.
    num_workers : int
        DataLoader workers per process.
    """

    eval_split: str = "test"
    batch_size: int = 16
    num_workers: int = 0

    def __post_init__(self):
        super().__post_init__()
        check_int("data.batch_size", self.batch_size, 1)
        check_int("data.num_workers", self.num_workers, 0)


@dataclass(frozen=True)
class RecognitionOptimConfig(BaseOptimConfig):
    """Adam (:class:`~..training.config.BaseOptimConfig`) and the loss.

    ``loss="all"``: cross-entropy of the clip's label at every step, averaged (``"last"``:
    only at the last step). Every step's logits are a prediction from a prefix, which is what
    early recognition scores, and under cross-entropy the best logits at step ``t`` are the
    class posterior given frames ``0..t``: training every step teaches each prefix to be
    calibrated instead of leaving early steps untrained. ``"ramp"``: every step too, step
    ``t`` of ``T`` weighted ``(t + 1) / T`` (weights normalised to sum to 1), so the late
    steps, where the clip decides the label, carry most of the gradient while every prefix
    is still trained towards its posterior. ``last_weight`` multiplies the last step's
    weight (``"all"`` and ``"ramp"``; 1: no extra weight).
    """

    clip_grad_norm: float = 1.0
    loss: str = "all"
    last_weight: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check_choice("optim.loss", self.loss, LOSSES)
        if not self.last_weight > 0:
            raise ValueError(f"optim.last_weight must be > 0, got {self.last_weight!r}")


@dataclass(frozen=True)
class RecognitionRunConfig(BaseRunConfig):
    """How a recognition run goes (:class:`~..training.config.BaseRunConfig`'s fields and the
    task's own).

    ``fractions``: shares of each clip shown to the model when it is scored (the first
    ``max(1, floor(f * T))`` frames). ``cosine``: cosine learning-rate decay to 5 % of
    ``optim.lr`` over the run (else constant). ``threads``: torch CPU threads (0: adaptive, as
    in the prediction task's ``run.threads``).
    """

    name: str = "recognize"
    val_every: int = 250
    checkpoint_every: int = 250
    val_batch_size: int = 64
    fractions: Tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    cosine: bool = True

    def __post_init__(self):
        super().__post_init__()
        fractions = tuple(float(f) for f in self.fractions)
        if not fractions or not all(0 < f <= 1 for f in fractions):
            raise ValueError(f"run.fractions must be numbers in (0, 1], got {self.fractions!r}")
        object.__setattr__(self, "fractions", tuple(sorted(set(fractions))))


@dataclass(frozen=True)
class RecognitionConfig(SectionedConfig):
    """A complete early-recognition configuration (see the module docstring)."""

    SECTIONS: ClassVar[Dict[str, type]] = {
        "model": ClassifierConfig, "data": RecognitionDataConfig,
        "optim": RecognitionOptimConfig, "run": RecognitionRunConfig}

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: RecognitionDataConfig = field(default_factory=RecognitionDataConfig)
    optim: RecognitionOptimConfig = field(default_factory=RecognitionOptimConfig)
    run: RecognitionRunConfig = field(default_factory=RecognitionRunConfig)


def quick_preset() -> RecognitionConfig:
    return RecognitionConfig(
        # One Conv-TT-LSTM layer: half the time per step of two, so twice the steps fit.
        model=ClassifierConfig(model="convttlstm", n_classes=16, encoder_channels=(16, 32),
                               hidden_channels=(32,), kernel_size=3, order=3, steps=3,
                               rank=8),
        data=RecognitionDataConfig(dataset="synthetic", n_frames=16, frame_size=32,
                                   digit_scale=2, n_turns=1, clips_per_epoch=100000,
                                   val_clips=1000, batch_size=16, num_workers=1),
        # The ramp: with equal weights (the former preset) the early steps, whose label a
        # prefix cannot decide, gave most of the gradient, mostly noise, and the full-clip
        # prediction came out worse than the 75 % one; the ramp still trains every prefix
        # towards its posterior but spends the gradient where the clip decides the label.
        # One run each: optim.last_weight=4 on top lost 7 points at 75 and 100 %, and
        # lr 5e-3 lost 20-24.
        optim=RecognitionOptimConfig(lr=3e-3, loss="ramp"),
        # One compute thread and one worker generating clips: these small convolutions gain
        # little from a second thread, and on a busy machine two threads were 4x slower.
        run=RecognitionRunConfig(name="recognize-quick", steps=1500, val_every=0,
                                 checkpoint_every=100, val_batch_size=100, threads=1),
    )


def synthetic_preset() -> RecognitionConfig:
    return RecognitionConfig(
        model=ClassifierConfig(model="convttlstm", n_classes=16, encoder_channels=(16, 32),
                               hidden_channels=(64, 64)),
        data=RecognitionDataConfig(dataset="synthetic", n_frames=16, frame_size=64,
                                   n_turns=1, val_clips=2000, batch_size=32),
        optim=RecognitionOptimConfig(lr=2e-3),
        run=RecognitionRunConfig(name="recognize-synthetic", steps=10000, val_every=1000,
                                 checkpoint_every=1000),
    )


def kth_preset() -> RecognitionConfig:
    return RecognitionConfig(
        model=ClassifierConfig(model="convttlstm", n_classes=6, encoder_channels=(16, 32, 64),
                               hidden_channels=(64, 64)),
        data=RecognitionDataConfig(dataset="kth", root="data/kth", n_frames=20, frame_size=0,
                                   val_clips=0, batch_size=16),
        optim=RecognitionOptimConfig(lr=1e-3),
        run=RecognitionRunConfig(name="recognize-kth", steps=20000, val_every=1000,
                                 checkpoint_every=1000),
    )


def ssv2_preset() -> RecognitionConfig:
    return RecognitionConfig(
        model=ClassifierConfig(model="convttlstm", n_classes=174, image_channels=3,
                               encoder_channels=(32, 64, 64), hidden_channels=(128, 128)),
        data=RecognitionDataConfig(dataset="ssv2", root="data/ssv2", n_frames=16,
                                   frame_size=64, val_clips=5000, eval_split="validation",
                                   batch_size=32, num_workers=8),
        optim=RecognitionOptimConfig(lr=1e-3),
        run=RecognitionRunConfig(name="recognize-ssv2", steps=100000, val_every=5000,
                                 checkpoint_every=2000, precision="bf16"),
    )


#: Named presets.
PRESETS = {"quick": quick_preset, "synthetic": synthetic_preset, "kth": kth_preset,
           "ssv2": ssv2_preset}


def preset(name: str) -> RecognitionConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
