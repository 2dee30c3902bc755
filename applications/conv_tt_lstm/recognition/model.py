"""Early activity recognition models: logits at every time step, so any prefix can be classified.

* :class:`ClassifierConfig`: the architecture as plain values.
* :class:`RecurrentClassifier` (``convttlstm``, ``convlstm``, ``hoconvlstm``): a small
  frame encoder (strided convolutions), a stack of recurrent cells of :mod:`tt_conv.recurrent`
  (built by :func:`~applications.conv_tt_lstm.model.build_cell`), and a head that pools each
  step's top hidden state over space (mean and max) into class logits.
* :class:`Conv3dClassifier` (``conv3d``): the 3D-CNN baseline, the same encoder followed by
  3-D convolutions that are causal in time (padded on the past side only), pooled over space
  per step and averaged over the steps seen so far, so that it too gives a prediction from
  every prefix without looking ahead.

Both map ``[batch, time, channels, height, width]`` to ``[batch, time, classes]``; the logits
at step ``t`` depend on frames ``0..t`` only (a test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, load_state, read_checkpoint
from ..checks import check_choice, check_int, check_positive_ints, from_fields, plain_fields
from ..model import build_cell

#: Model names accepted by :attr:`ClassifierConfig.model`.
MODEL_TYPES = ("convttlstm", "convlstm", "hoconvlstm", "conv3d")
#: Names for tables.
MODEL_NAMES = {
    "convttlstm": "Conv-TT-LSTM",
    "convlstm": "ConvLSTM",
    "hoconvlstm": "full higher-order ConvLSTM",
    "conv3d": "3D CNN (causal)",
}


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of a recognition model (``to_dict`` / ``from_dict`` for JSON).

    Attributes
    ----------
    model : {"convttlstm", "convlstm", "hoconvlstm", "conv3d"}
        Recurrent cell type, or the causal 3D-CNN baseline.
    n_classes : int
        Number of classes.
    image_channels : int
        Channels of a frame (1 gray, 3 RGB).
    encoder_channels : tuple of int
        Output channels of the frame encoder's 3x3 stride-2 convolutions (each halves the
        frame size).
    hidden_channels : tuple of int
        Channels of each recurrent layer (or of each causal 3-D convolution).
    kernel_size : int
        Odd spatial kernel of the recurrent (or 3-D) convolutions.
    order, steps, rank : int
        Tensor-train order, past steps and rank (Conv-TT-LSTM; ``steps`` also for the
        higher-order ConvLSTM).
    temporal_kernel : int
        Temporal kernel of the 3-D convolutions (``conv3d`` only).
    """

    model: str = "convttlstm"
    n_classes: int = 16
    image_channels: int = 1
    encoder_channels: Tuple[int, ...] = (16, 32)
    hidden_channels: Tuple[int, ...] = (32, 32)
    kernel_size: int = 3
    order: int = 3
    steps: int = 3
    rank: int = 8
    temporal_kernel: int = 3

    def __post_init__(self):
        check_choice("model", self.model, MODEL_TYPES)
        object.__setattr__(self, "encoder_channels",
                           check_positive_ints("encoder_channels", self.encoder_channels))
        object.__setattr__(self, "hidden_channels",
                           check_positive_ints("hidden_channels", self.hidden_channels))
        for name in ("image_channels", "kernel_size", "order", "steps", "rank",
                     "temporal_kernel"):
            check_int(name, getattr(self, name))
        check_int("n_classes", self.n_classes, 2)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.model == "convttlstm" and self.steps < self.order:
            raise ValueError(f"steps must be >= order for convttlstm, got steps={self.steps}, "
                             f"order={self.order}")

    @property
    def downsampling(self) -> int:
        """Factor by which the encoder shrinks each side of a frame."""
        return 2 ** len(self.encoder_channels)

    def to_dict(self) -> Dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ClassifierConfig":
        return from_fields(cls, values, "classifier")


class FrameEncoder(nn.Module):
    """3x3 stride-2 convolutions with ReLU, applied to every frame independently."""

    def __init__(self, in_channels: int, channels: Tuple[int, ...]):
        super().__init__()
        layers = []
        for out_channels in channels:
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), nn.ReLU()]
            in_channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.out_channels = in_channels

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, T, C, H, W]`` -> ``[B, T, C', H / 2^n, W / 2^n]`` (channels-last frames)."""
        b, t = frames.shape[:2]
        flat = frames.reshape(b * t, *frames.shape[2:]).contiguous(
            memory_format=torch.channels_last)
        features = self.layers(flat)
        return features.reshape(b, t, *features.shape[1:])


class PoolHead(nn.Module):
    """Mean and max over space, concatenated, then a linear layer to the classes.

    Max pooling keeps an event seen in one place (a digit at a wall) that averaging would
    dilute; the mean keeps the global picture.
    """

    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(2 * channels, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., C, H, W]`` -> ``[..., classes]``."""
        pooled = torch.cat((features.mean(dim=(-2, -1)), features.amax(dim=(-2, -1))), dim=-1)
        return self.linear(pooled)


def _check_frames(frames: torch.Tensor, config: ClassifierConfig) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must be [batch, time, channels, height, width], got {shape}")
    if frames.shape[2] != config.image_channels:
        raise ValueError(f"frames must have {config.image_channels} channel(s) (dim 2), got "
                         f"shape {tuple(frames.shape)}")
    d = config.downsampling
    if frames.shape[3] % d or frames.shape[4] % d:
        raise ValueError(f"frame size {tuple(frames.shape[3:])} must be divisible by {d} "
                         f"(the encoder's {len(config.encoder_channels)} stride-2 layers)")


class RecurrentClassifier(nn.Module):
    """Frame encoder, stacked recurrent cells, per-step pooled linear head.

    Parameters
    ----------
    config : ClassifierConfig
        With ``model`` one of ``convttlstm``, ``convlstm``, ``hoconvlstm``.

    Notes
    -----
    Parameters are named ``encoder.*``, ``cells.{l}.*`` and ``head.*``.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if config.model == "conv3d":
            raise ValueError("RecurrentClassifier needs a recurrent model; use Conv3dClassifier")
        self.config = config
        self.encoder = FrameEncoder(config.image_channels, config.encoder_channels)
        cells, in_channels = [], self.encoder.out_channels
        for hidden in config.hidden_channels:
            cells.append(build_cell(config.model, in_channels, hidden,
                                    kernel_size=config.kernel_size, order=config.order,
                                    steps=config.steps, rank=config.rank))
            in_channels = hidden
        self.cells = nn.ModuleList(cells)
        self.head = PoolHead(in_channels, config.n_classes)

    def extra_repr(self) -> str:
        return f"model={self.config.model!r}"

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, classes]`` of frames ``[B, T, C, H, W]`` (step t: frames 0..t)."""
        _check_frames(frames, self.config)
        features = self.encoder(frames)
        states = [cell.initial_state(features[:, 0]) for cell in self.cells]
        tops = []
        for t in range(features.shape[1]):
            x = features[:, t]
            for index, cell in enumerate(self.cells):
                x, states[index] = cell(x, states[index])
            tops.append(x)
        return self.head(torch.stack(tops, dim=1))


class Conv3dClassifier(nn.Module):
    """3D-CNN baseline: frame encoder, causal 3-D convolutions, running mean of per-step scores.

    Each 3-D convolution has a ``temporal_kernel x k x k`` kernel padded with
    ``temporal_kernel - 1`` zero frames on the past side only, so its output at step ``t``
    sees frames ``t - temporal_kernel + 1 .. t``. Per step, the top features are pooled over
    space (:class:`PoolHead` before its linear layer) and averaged over steps ``0..t``; the
    linear layer turns that running mean into logits.
    """

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        if config.model != "conv3d":
            raise ValueError(f"Conv3dClassifier is the conv3d model, got {config.model!r}")
        self.config = config
        self.encoder = FrameEncoder(config.image_channels, config.encoder_channels)
        k, kt = config.kernel_size, config.temporal_kernel
        convs, in_channels = [], self.encoder.out_channels
        for hidden in config.hidden_channels:
            convs.append(nn.Conv3d(in_channels, hidden, (kt, k, k), padding=(0, k // 2, k // 2)))
            in_channels = hidden
        self.convs = nn.ModuleList(convs)
        self.head = PoolHead(in_channels, config.n_classes)

    def extra_repr(self) -> str:
        return f"model='conv3d', temporal_kernel={self.config.temporal_kernel}"

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, classes]`` of frames ``[B, T, C, H, W]`` (step t: frames 0..t)."""
        _check_frames(frames, self.config)
        x = self.encoder(frames).transpose(1, 2)  # [B, C, T, h, w]
        for conv in self.convs:
            x = F.relu(conv(F.pad(x, (0, 0, 0, 0, self.config.temporal_kernel - 1, 0))))
        x = x.transpose(1, 2)  # [B, T, C, h, w]
        pooled = torch.cat((x.mean(dim=(-2, -1)), x.amax(dim=(-2, -1))), dim=-1)
        pooled = pooled.float()  # a running sum in bf16 would lose the later steps' share
        steps = torch.arange(1, pooled.shape[1] + 1, device=pooled.device, dtype=pooled.dtype)
        running = pooled.cumsum(dim=1) / steps.view(1, -1, 1)
        return self.head.linear(running)


def build_classifier(config: ClassifierConfig) -> nn.Module:
    """The model of ``config``: :class:`RecurrentClassifier` or :class:`Conv3dClassifier`."""
    if not isinstance(config, ClassifierConfig):
        raise TypeError(f"config must be a ClassifierConfig, got {type(config).__name__}")
    if config.model == "conv3d":
        return Conv3dClassifier(config)
    return RecurrentClassifier(config)


# ---------------------------------------------------------------------------- checkpoints

#: ``format`` of our recognition checkpoints (:mod:`~..checkpoint`'s layout).
CHECKPOINT_FORMAT = "tt-conv/recognition-classifier"


def load_classifier(source, map_location: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a classifier from one of our checkpoints (``last.pt`` or ``best.pt``).

    Returns
    -------
    (model, checkpoint)
        The classifier and the whole checkpoint dict.

    Raises
    ------
    CheckpointError
        If the file is missing, unreadable, not a recognition checkpoint, or its weights do
        not fit its architecture.
    """
    saved = read_checkpoint(source, CHECKPOINT_FORMAT, map_location=map_location)
    try:
        config = ClassifierConfig.from_dict(saved["architecture"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"bad architecture in checkpoint: {error}") from None
    model = build_classifier(config)
    load_state(model, saved["state_dict"])
    return model, saved
