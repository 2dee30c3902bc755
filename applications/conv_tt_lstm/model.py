"""The stacked video-prediction network of the Conv-TT-LSTM paper and its configuration.

* :class:`ArchitectureConfig`: the architecture as plain, JSON-serialisable values;
  :func:`paper_config` gives the paper's (4 blocks x 3 layers, hidden 32-48-48-32,
  kernel 5, order 3, steps 3, rank 8, skip stride 2).
* :func:`build_cell`: one recurrent cell (ConvLSTM, full higher-order ConvLSTM or
  Conv-TT-LSTM of :mod:`tt_conv.recurrent`) from the cell's own arguments.
* :class:`VideoPredictionNetwork`: blocks of cells with skip connections between blocks and
  a 1x1 output convolution, rolled out over a sequence (``outputs[t]`` predicts frame
  ``t + 1``), with scheduled sampling and an optional space-to-depth ``patch_size``.

Our checkpoints of the network are :mod:`.checkpoint`'s; the paper release's are read by
:mod:`.nvlabs`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from tt_conv.recurrent import (
    ConvLSTMCell,
    ConvTTLSTMCell,
    HigherOrderConvLSTMCell,
    LSTMState,
)

from .checks import check_choice, check_int, check_positive_ints, from_fields, plain_fields

#: Cell names accepted by :attr:`ArchitectureConfig.cell`.
CELL_TYPES = ("convlstm", "hoconvlstm", "convttlstm")

#: Human-readable cell names, for tables.
CELL_NAMES = {
    "convlstm": "ConvLSTM",
    "hoconvlstm": "full higher-order ConvLSTM",
    "convttlstm": "Conv-TT-LSTM",
}

KernelSize = Union[int, Tuple[int, int]]


# ---------------------------------------------------------------------------- config


def _per_block(name: str, value: Any, blocks: int) -> Union[int, Tuple[int, ...]]:
    """``layers_per_block`` in its canonical form: one int when every block has as many."""
    if isinstance(value, (list, tuple)):
        counts = check_positive_ints(name, value)
        if len(counts) != blocks:
            raise ValueError(f"{name} must give one count per block ({blocks} blocks, as "
                             f"hidden_channels), got {value!r}")
        return counts[0] if len(set(counts)) == 1 else counts
    return check_int(name, value)


def _kernel(value: Any) -> KernelSize:
    """``kernel_size`` in its canonical form: one int for a square kernel, else (kh, kw)."""
    sizes = check_positive_ints("kernel_size", value) if isinstance(value, (list, tuple)) \
        else (check_int("kernel_size", value),) * 2
    if len(sizes) != 2 or any(k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel_size must be an odd int or a pair of odd ints, got {value!r}")
    return sizes[0] if sizes[0] == sizes[1] else sizes


@dataclass(frozen=True)
class ArchitectureConfig:
    """The network's architecture, as plain values (``to_dict``/``from_dict`` for JSON).

    Attributes
    ----------
    cell : {"convlstm", "hoconvlstm", "convttlstm"}
        ConvLSTM, full higher-order ConvLSTM (a kernel per past state) or Conv-TT-LSTM.
    image_channels : int
        Channels of a frame (1 for grayscale).
    hidden_channels : tuple of int
        Hidden channels of each block (its length is the number of blocks).
    layers_per_block : int or tuple of int
        Cells per block: one count for every block, or one per block (``(2, 1, 1, 2)``).
        A tuple whose counts are all equal is stored as that int.
    skip_stride : int
        After block ``b >= skip_stride``, its output is concatenated with that of block
        ``b - skip_stride`` (0: no skip connections).
    kernel_size : int or (int, int)
        Odd kernel of every recurrent convolution (a pair: height and width).
    order, steps, rank : int
        Tensor-train order, number of past states and rank (``steps`` is also the order of
        the higher-order ConvLSTM; ConvLSTM ignores all three).
    output_sigmoid : bool
        Apply a sigmoid to the output frames.
    patch_size : int
        Fold ``patch_size x patch_size`` pixel blocks into channels before the network and
        unfold after (space to depth; 1: off). Frame sizes must be divisible by it.
    """

    cell: str = "convttlstm"
    image_channels: int = 1
    hidden_channels: Tuple[int, ...] = (32, 48, 48, 32)
    layers_per_block: Union[int, Tuple[int, ...]] = 3
    skip_stride: int = 2
    kernel_size: Union[int, Tuple[int, int]] = 5
    order: int = 3
    steps: int = 3
    rank: int = 8
    output_sigmoid: bool = False
    patch_size: int = 1

    def __post_init__(self):
        check_choice("cell", self.cell, CELL_TYPES)
        hidden = check_positive_ints("hidden_channels", self.hidden_channels)
        object.__setattr__(self, "hidden_channels", hidden)
        object.__setattr__(self, "layers_per_block",
                           _per_block("layers_per_block", self.layers_per_block, len(hidden)))
        object.__setattr__(self, "kernel_size", _kernel(self.kernel_size))
        for name in ("image_channels", "order", "steps", "rank", "patch_size"):
            check_int(name, getattr(self, name))
        check_int("skip_stride", self.skip_stride, 0)
        if self.cell == "convttlstm" and self.steps < self.order:
            raise ValueError(
                f"steps must be >= order for convttlstm, got steps={self.steps}, "
                f"order={self.order}")
        if not isinstance(self.output_sigmoid, bool):
            raise ValueError(f"output_sigmoid must be a bool, got {self.output_sigmoid!r}")

    @property
    def blocks(self) -> int:
        return len(self.hidden_channels)

    @property
    def block_layers(self) -> Tuple[int, ...]:
        """Cells of each block (``layers_per_block`` spelled out per block)."""
        layers = self.layers_per_block
        return layers if isinstance(layers, tuple) else (layers,) * self.blocks

    @property
    def network_channels(self) -> int:
        """Channels the cells see per frame: ``image_channels * patch_size ** 2``."""
        return self.image_channels * self.patch_size ** 2

    def block_input_channels(self) -> List[int]:
        """Input channels of each block's first cell, then of the output layer."""
        hidden, skip = self.hidden_channels, self.skip_stride
        channels = [self.network_channels]
        for b, h in enumerate(hidden):
            channels.append(h + (hidden[b - skip] if skip and b >= skip else 0))
        return channels

    def to_dict(self) -> Dict[str, Any]:
        return plain_fields(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ArchitectureConfig":
        return from_fields(cls, values, "architecture")

    def replace(self, **changes) -> "ArchitectureConfig":
        return dataclasses.replace(self, **changes)


def paper_config(cell: str = "convttlstm", **changes) -> ArchitectureConfig:
    """The paper's architecture (REFERENCE.md section 2) for ``cell``, with ``changes``."""
    return ArchitectureConfig(cell=cell, **changes)


def build_cell(cell: str, in_channels: int, hidden_channels: int, *,
               kernel_size: KernelSize, order: int = 3, steps: int = 3, rank: int = 8,
               device=None, dtype=None) -> nn.Module:
    """One recurrent cell of type ``cell`` (one of :data:`CELL_TYPES`).

    Parameters
    ----------
    cell : {"convlstm", "hoconvlstm", "convttlstm"}
        ConvLSTM, full higher-order ConvLSTM or Conv-TT-LSTM.
    in_channels, hidden_channels : int
        Channels of the cell's input and of its hidden state.
    kernel_size : int or (int, int)
        Odd kernel of every convolution.
    order, steps, rank : int
        Conv-TT-LSTM's tensor-train order, past states and rank (``steps`` also for the
        higher-order ConvLSTM; ConvLSTM takes none of them).
    """
    factory = {"device": device, "dtype": dtype}
    if cell == "convlstm":
        return ConvLSTMCell(in_channels, hidden_channels, kernel_size, **factory)
    if cell == "hoconvlstm":
        return HigherOrderConvLSTMCell(in_channels, hidden_channels, kernel_size, steps,
                                       **factory)
    if cell == "convttlstm":
        return ConvTTLSTMCell(in_channels, hidden_channels, kernel_size, order, steps, rank,
                              **factory)
    raise ValueError(f"cell must be one of {CELL_TYPES}, got {cell!r}")


# ---------------------------------------------------------------------------- network


class VideoPredictionNetwork(nn.Module):
    """Stacked recurrent network that predicts the next frame at every step.

    Parameters
    ----------
    config : ArchitectureConfig
        The architecture (:func:`paper_config` for the paper's).
    channels_last : bool
        Run the convolutions on channels-last activations (faster on CPU and GPU; the
        results are the same).

    Notes
    -----
    Parameters are named ``blocks.{b}.{l}.*`` (cell ``l`` of block ``b``) and
    ``output.weight``/``output.bias`` (the 1x1 output convolution).
    """

    def __init__(self, config: ArchitectureConfig, *, channels_last: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(config, ArchitectureConfig):
            raise TypeError(f"config must be an ArchitectureConfig, got {type(config).__name__}")
        self.config = config
        self.channels_last = channels_last
        block_inputs = config.block_input_channels()
        blocks = []
        for b, (hidden, layers) in enumerate(zip(config.hidden_channels, config.block_layers)):
            cells = []
            for layer in range(layers):
                in_channels = block_inputs[b] if layer == 0 else hidden
                cells.append(build_cell(config.cell, in_channels, hidden,
                                        kernel_size=config.kernel_size, order=config.order,
                                        steps=config.steps, rank=config.rank, device=device,
                                        dtype=dtype))
            blocks.append(nn.ModuleList(cells))
        self.blocks = nn.ModuleList(blocks)
        self.output = nn.Conv2d(block_inputs[-1], config.network_channels, 1,
                                device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"config={self.config}, channels_last={self.channels_last}"

    # -- geometry helpers

    def _fold(self, frames: torch.Tensor) -> torch.Tensor:
        """``[B, T, C, H, W]`` -> ``[B, T, C p^2, H/p, W/p]``, channels-last per frame."""
        p = self.config.patch_size
        b, t = frames.shape[:2]
        if p > 1:
            folded = F.pixel_unshuffle(frames.reshape(b * t, *frames.shape[2:]), p)
            frames = folded.reshape(b, t, *folded.shape[1:])
        if self.channels_last:
            # Each frames[:, t] is then a channels-last [B, C, H, W] view.
            frames = frames.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
        return frames

    def _unfold(self, outputs: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_fold` for ``[B, T, C p^2, h, w]`` outputs (contiguous)."""
        p = self.config.patch_size
        if p > 1:
            b, t = outputs.shape[:2]
            unfolded = F.pixel_shuffle(outputs.reshape(b * t, *outputs.shape[2:]), p)
            outputs = unfolded.reshape(b, t, *unfolded.shape[1:])
        return outputs.contiguous()

    def initial_states(self, frame: torch.Tensor) -> List[LSTMState]:
        """Zero states of every cell for (folded) frames shaped like ``frame``."""
        states = []
        for block in self.blocks:
            for cell in block:
                states.append(cell.initial_state(frame, channels_last=self.channels_last))
        return states

    def step(self, x: torch.Tensor,
             states: Sequence[LSTMState]) -> Tuple[torch.Tensor, List[LSTMState]]:
        """One time step of the whole stack on a folded frame ``[B, C p^2, h, w]``.

        Returns the (folded) prediction of the next frame and the new states.
        """
        skip = self.config.skip_stride
        block_outputs: List[torch.Tensor] = []
        new_states: List[LSTMState] = []
        index = 0
        for b, block in enumerate(self.blocks):
            for cell in block:
                x, state = cell(x, states[index])
                new_states.append(state)
                index += 1
            block_outputs.append(x)
            if skip and b >= skip:
                x = torch.cat((x, block_outputs[b - skip]), dim=1)
        y = self.output(x)
        if self.config.output_sigmoid:
            y = torch.sigmoid(y)
        return y, new_states

    def forward(self, frames: torch.Tensor, future_frames: int, *,
                teacher_forcing: bool = False, sampling_ratio: float = 1.0,
                all_outputs: bool = False,
                generator: Optional[torch.Generator] = None,
                checkpoint_steps: bool = False) -> torch.Tensor:
        """Roll the network out over a sequence.

        The network runs ``inputs + future_frames - 1`` steps; ``outputs[t]`` predicts frame
        ``t + 1``. Steps ``t < inputs`` read ground truth; later steps read the network's
        own previous output or, with teacher forcing, the ground-truth frame with
        probability ``sampling_ratio`` (drawn per sample and step; scheduled sampling).

        Parameters
        ----------
        frames : torch.Tensor
            ``[batch, time, channels, height, width]``. Without teacher forcing all
            ``time`` frames are inputs. With teacher forcing they are the inputs followed
            by the ``future_frames`` ground-truth frames (``inputs = time - future_frames``).
        future_frames : int
            Number of frames to predict after the inputs (>= 1).
        teacher_forcing : bool
            See above.
        sampling_ratio : float
            Probability in ``[0, 1]`` of reading the ground truth at a future step, with
            teacher forcing (1: always, 0: never).
        all_outputs : bool
            Return every step's output ``[batch, inputs + future_frames - 1, ...]`` (what
            the training loss uses) instead of the ``future_frames`` predictions.
        generator : torch.Generator, optional
            Random source of the scheduled sampling.
        checkpoint_steps : bool
            Activation checkpointing: keep only each step's inputs and states for the
            backward pass and recompute the step's inside (``torch.utils.checkpoint``);
            memory then grows with the horizon by one state per step instead of every
            activation of every cell.

        Returns
        -------
        torch.Tensor
            ``[batch, future_frames, channels, height, width]`` (or all outputs).
        """
        config = self.config
        if not isinstance(frames, torch.Tensor) or frames.dim() != 5:
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames)
            raise ValueError(
                f"frames must be [batch, time, channels, height, width], got {shape}")
        if frames.shape[2] != config.image_channels:
            raise ValueError(
                f"frames must have {config.image_channels} channel(s) (dim 2), got shape "
                f"{tuple(frames.shape)}")
        p = config.patch_size
        if frames.shape[3] % p or frames.shape[4] % p:
            raise ValueError(
                f"frame size {tuple(frames.shape[3:])} must be divisible by patch_size={p}")
        if isinstance(future_frames, bool) or not isinstance(future_frames, int) \
                or future_frames < 1:
            raise ValueError(f"future_frames must be an int >= 1, got {future_frames!r}")
        if not 0.0 <= float(sampling_ratio) <= 1.0:
            raise ValueError(f"sampling_ratio must be in [0, 1], got {sampling_ratio!r}")
        time = frames.shape[1]
        inputs = time - future_frames if teacher_forcing else time
        if inputs < 1:
            raise ValueError(
                f"with teacher_forcing, frames must hold the inputs and the {future_frames} "
                f"future frames (time > future_frames), got time={time}")
        n_steps = inputs + future_frames - 1

        sequence = self._fold(frames)
        states = self.initial_states(sequence[:, 0])
        outputs: List[torch.Tensor] = []
        previous: Optional[torch.Tensor] = None
        for t in range(n_steps):
            if t < inputs:
                x = sequence[:, t]
            else:
                assert previous is not None
                x = previous
                if teacher_forcing and sampling_ratio > 0:
                    x = self._sample(sequence[:, t], previous, float(sampling_ratio),
                                     generator)
            if checkpoint_steps and torch.is_grad_enabled():
                previous, states = torch.utils.checkpoint.checkpoint(
                    self.step, x, states, use_reentrant=False)
            else:
                previous, states = self.step(x, states)
            outputs.append(previous)
        if not all_outputs:
            outputs = outputs[-future_frames:]
        return self._unfold(torch.stack(outputs, dim=1))

    @staticmethod
    def _sample(truth: torch.Tensor, prediction: torch.Tensor, ratio: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
        """Ground truth with probability ``ratio`` per sample, else the prediction."""
        if ratio >= 1.0:
            return truth
        batch = truth.shape[0]
        draw = torch.rand(batch, generator=generator,
                          device=generator.device if generator is not None else truth.device)
        use_truth = (draw < ratio).to(truth.device).view(batch, 1, 1, 1)
        return torch.where(use_truth, truth, prediction)
