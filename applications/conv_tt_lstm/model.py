"""The stacked video-prediction network of the Conv-TT-LSTM paper, and its checkpoints.

* :class:`ArchitectureConfig`: the architecture as plain, JSON-serialisable values;
  :func:`paper_config` gives the paper's (4 blocks x 3 layers, hidden 32-48-48-32,
  kernel 5, order 3, steps 3, rank 8, skip stride 2).
* :class:`VideoPredictionNetwork`: blocks of ConvLSTM, full higher-order ConvLSTM or
  Conv-TT-LSTM cells with skip connections between blocks and a 1x1 output convolution,
  rolled out over a sequence (``outputs[t]`` predicts frame ``t + 1``), with scheduled
  sampling and an optional space-to-depth ``patch_size``.
* Our checkpoint format (:func:`save_checkpoint`, :func:`load_checkpoint`): a dict with
  the architecture and the state dict.
* :func:`load_nvlabs_checkpoint`: our network from a checkpoint of the paper's public
  release (its layout is described in REFERENCE.md section 3).
"""

from __future__ import annotations

import dataclasses
import os
import re
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

from .files import atomic_torch_save

#: Cell names accepted by :attr:`ArchitectureConfig.cell`.
CELL_TYPES = ("convlstm", "hoconvlstm", "convttlstm")

#: Human-readable cell names, for tables.
CELL_NAMES = {
    "convlstm": "ConvLSTM",
    "hoconvlstm": "full higher-order ConvLSTM",
    "convttlstm": "Conv-TT-LSTM",
}

#: ``format`` field of our checkpoints.
CHECKPOINT_FORMAT = "tt-conv/video-prediction-network"
CHECKPOINT_VERSION = 1


# ---------------------------------------------------------------------------- config


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
    layers_per_block : int
        Cells per block.
    skip_stride : int
        After block ``b >= skip_stride``, its output is concatenated with that of block
        ``b - skip_stride`` (0: no skip connections).
    kernel_size : int
        Odd kernel of every recurrent convolution.
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
    layers_per_block: int = 3
    skip_stride: int = 2
    kernel_size: int = 5
    order: int = 3
    steps: int = 3
    rank: int = 8
    output_sigmoid: bool = False
    patch_size: int = 1

    def __post_init__(self):
        if self.cell not in CELL_TYPES:
            raise ValueError(f"cell must be one of {CELL_TYPES}, got {self.cell!r}")
        hidden = self.hidden_channels
        if isinstance(hidden, int) or not all(
                isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden) \
                or len(hidden) == 0:
            raise ValueError(
                f"hidden_channels must be a non-empty sequence of positive ints, got {hidden!r}")
        object.__setattr__(self, "hidden_channels", tuple(hidden))
        for name in ("image_channels", "layers_per_block", "kernel_size", "order", "steps",
                     "rank", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.skip_stride, bool) or not isinstance(self.skip_stride, int) \
                or self.skip_stride < 0:
            raise ValueError(f"skip_stride must be an int >= 0, got {self.skip_stride!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
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
        out = dataclasses.asdict(self)
        out["hidden_channels"] = list(self.hidden_channels)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ArchitectureConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown architecture field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(values))

    def replace(self, **changes) -> "ArchitectureConfig":
        return dataclasses.replace(self, **changes)


def paper_config(cell: str = "convttlstm", **changes) -> ArchitectureConfig:
    """The paper's architecture (REFERENCE.md section 2) for ``cell``, with ``changes``."""
    return ArchitectureConfig(cell=cell, **changes)


def build_cell(config: ArchitectureConfig, in_channels: int, hidden_channels: int,
               device=None, dtype=None) -> nn.Module:
    """One recurrent cell of ``config``'s type."""
    factory = {"device": device, "dtype": dtype}
    if config.cell == "convlstm":
        return ConvLSTMCell(in_channels, hidden_channels, config.kernel_size, **factory)
    if config.cell == "hoconvlstm":
        return HigherOrderConvLSTMCell(in_channels, hidden_channels, config.kernel_size,
                                       config.steps, **factory)
    return ConvTTLSTMCell(in_channels, hidden_channels, config.kernel_size, config.order,
                          config.steps, config.rank, **factory)


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
        for b, hidden in enumerate(config.hidden_channels):
            cells = []
            for layer in range(config.layers_per_block):
                in_channels = block_inputs[b] if layer == 0 else hidden
                cells.append(build_cell(config, in_channels, hidden, device, dtype))
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


# ---------------------------------------------------------------------------- checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message lists everything that did not match."""


def checkpoint_dict(model: VideoPredictionNetwork, **extra: Any) -> Dict[str, Any]:
    """Our checkpoint of ``model``: format tag, architecture, state dict and ``extra``.

    ``extra`` (e.g. optimiser state, epoch, metrics) is stored beside the model under its
    own keys; the keys ``format``, ``version``, ``architecture`` and ``state_dict`` are
    reserved.
    """
    reserved = {"format", "version", "architecture", "state_dict"} & set(extra)
    if reserved:
        raise ValueError(f"checkpoint extra keys {sorted(reserved)} are reserved")
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def save_checkpoint(path: Union[str, os.PathLike], model: VideoPredictionNetwork,
                    **extra: Any) -> None:
    """Write :func:`checkpoint_dict` of ``model`` to ``path`` atomically."""
    atomic_torch_save(checkpoint_dict(model, **extra), path)


def load_checkpoint(path_or_dict: Union[str, os.PathLike, Mapping[str, Any]], *,
                    map_location: Any = "cpu",
                    channels_last: bool = True) -> Tuple[VideoPredictionNetwork, Dict[str, Any]]:
    """Rebuild the network from one of our checkpoints.

    Returns
    -------
    (model, checkpoint)
        The network (in training mode, on ``map_location``) and the whole checkpoint dict,
        whose other keys (optimiser state, ...) the caller may use.
    """
    checkpoint = _read(path_or_dict, map_location)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        hint = (" (a checkpoint of the paper's public release? use load_nvlabs_checkpoint "
                "or the convert-nvlabs command)" if "model_state_dict" in checkpoint
                or any(str(k).startswith(("layers.", "module.layers.")) for k in checkpoint)
                else "")
        raise CheckpointError(
            f"not a tt-conv checkpoint: expected format {CHECKPOINT_FORMAT!r}, got "
            f"{checkpoint.get('format')!r}{hint}")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"unsupported checkpoint version {checkpoint.get('version')!r} "
            f"(this code reads version {CHECKPOINT_VERSION})")
    try:
        config = ArchitectureConfig.from_dict(checkpoint["architecture"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"bad architecture in checkpoint: {error}") from None
    model = VideoPredictionNetwork(config, channels_last=channels_last)
    _load_state(model, checkpoint["state_dict"])
    return model, checkpoint


def _read(path_or_dict, map_location) -> Dict[str, Any]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        value = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(value, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(value).__name__}, not a dict")
    return dict(value)


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict`` that reports every missing, unexpected and misshapen key."""
    own = model.state_dict()
    problems = []
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    for key in sorted(set(own) & set(state)):
        if tuple(state[key].shape) != tuple(own[key].shape):
            problems.append(f"{key}: expected shape {tuple(own[key].shape)}, "
                            f"got {tuple(state[key].shape)}")
    if problems:
        raise CheckpointError("checkpoint does not fit the architecture:\n  "
                              + "\n  ".join(problems))
    model.load_state_dict(state)


# ---------------------------------------------------------------------------- release layout

_CELL_KEY = re.compile(r"^layers\.b(\d+)l(\d+)\.(layers_?)\.(\d+)\.(weight|bias)$")
_OUTPUT_KEY = re.compile(r"^layers\.output\.(weight|bias)$")


def _release_state_dict(source) -> Dict[str, torch.Tensor]:
    """The bare state dict of a release checkpoint (file or dict), prefixes removed."""
    value = _read(source, "cpu")
    if "model_state_dict" in value:
        value = value["model_state_dict"]
        if not isinstance(value, Mapping):
            raise CheckpointError("'model_state_dict' of the checkpoint is not a dict")
    state = {}
    for key, tensor in value.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"entry {key!r} is a {type(tensor).__name__}, not a tensor: expected the "
                f"release's state dict (optionally under 'model_state_dict')")
        key = str(key)
        state[key[len("module."):] if key.startswith("module.") else key] = tensor
    return state


def _infer_release_architecture(state: Mapping[str, torch.Tensor],
                                arch: Mapping[str, Any]) -> ArchitectureConfig:
    """The architecture a release state dict was trained with; every mismatch listed."""
    problems: List[str] = []
    cells: Dict[Tuple[int, int], Dict[Tuple[str, int, str], torch.Tensor]] = {}
    output: Dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _CELL_KEY.match(key)
        if match:
            b, l, group, index, kind = match.groups()
            cells.setdefault((int(b), int(l)), {})[(group, int(index), kind)] = tensor
            continue
        match = _OUTPUT_KEY.match(key)
        if match:
            output[match.group(1)] = tensor
            continue
        problems.append(f"unexpected key {key!r}")
    if not cells:
        problems.append("no Conv-TT-LSTM cell keys 'layers.b{b}l{l}.layers[_].{i}.weight|bias'")
    for kind in ("weight", "bias"):
        if kind not in output:
            problems.append(f"missing key 'layers.output.{kind}'")
    if problems:
        raise CheckpointError("not a Conv-TT-LSTM checkpoint of the release's layout:\n  "
                              + "\n  ".join(problems))

    block_ids = sorted({b for b, _ in cells})
    layer_ids = sorted({l for _, l in cells})
    for b in block_ids:
        for l in layer_ids:
            if (b, l) not in cells:
                problems.append(f"missing cell layers.b{b}l{l} (every block needs layers "
                                f"{layer_ids})")
    if block_ids != list(range(block_ids[0], block_ids[0] + len(block_ids))) or \
            layer_ids != list(range(layer_ids[0], layer_ids[0] + len(layer_ids))):
        problems.append(f"block ids {block_ids} / layer ids {layer_ids} are not consecutive")

    per_cell = {}
    for (b, l), entries in sorted(cells.items()):
        name = f"layers.b{b}l{l}"
        indices = sorted({i for (g, i, _) in entries if g == "layers"})
        order = len(indices)
        cell_problems = []
        for group in ("layers", "layers_"):
            for i in range(order):
                for kind in ("weight", "bias"):
                    if (group, i, kind) not in entries:
                        cell_problems.append(f"missing key {name}.{group}.{i}.{kind}")
        for (group, i, kind) in entries:
            if i >= order:
                cell_problems.append(f"unexpected key {name}.{group}.{i}.{kind} "
                                     f"(the cell has {order} cores)")
        if order == 0 or cell_problems:
            problems.extend(cell_problems or [f"{name}: no core convolutions 'layers.{{i}}'"])
            continue
        gate = entries[("layers", order - 1, "weight")]
        if gate.dim() != 4 or gate.shape[0] % 4 or gate.shape[2] != gate.shape[3] \
                or gate.shape[2] % 2 == 0:
            problems.append(f"{name}.layers.{order - 1}.weight (gate conv) must be "
                            f"[4H, C_in + R, k, k] with k odd, got {tuple(gate.shape)}")
            continue
        hidden, k = gate.shape[0] // 4, gate.shape[2]
        window_weight = entries[("layers_", 0, "weight")]
        rank = window_weight.shape[0]
        in_channels = gate.shape[1] - rank
        if window_weight.dim() == 5:
            window = window_weight.shape[4]
            window_shape = (rank, hidden, k, k, window)
        elif window_weight.dim() == 4 and window_weight.shape[1] % hidden == 0:
            window = window_weight.shape[1] // hidden
            window_shape = (rank, window * hidden, k, k)
        else:
            problems.append(f"{name}.layers_.0.weight must be [R, H, k, k, L] (Conv3d) or "
                            f"[R, L*H, k, k] (Conv2d) with H={hidden}, got "
                            f"{tuple(window_weight.shape)}")
            continue
        expected = {("layers", order - 1, "bias"): (4 * hidden,)}
        for i in range(order - 1):
            expected[("layers", i, "weight")] = (rank, rank, k, k)
            expected[("layers", i, "bias")] = (rank,)
        for i in range(order):
            expected[("layers_", i, "weight")] = window_shape
            expected[("layers_", i, "bias")] = (rank,)
        for (group, i, kind), shape in expected.items():
            got = tuple(entries[(group, i, kind)].shape)
            if got != shape:
                problems.append(f"{name}.{group}.{i}.{kind}: expected shape {shape}, got {got}")
        if in_channels < 1:
            problems.append(f"{name}.layers.{order - 1}.weight has {gate.shape[1]} input "
                            f"channels, not more than the rank {rank}")
        per_cell[(b, l)] = dict(order=order, steps=order + window - 1, rank=rank,
                                kernel_size=k, hidden=hidden, in_channels=in_channels)
    if problems:
        raise CheckpointError("the checkpoint's shapes fit no Conv-TT-LSTM network:\n  "
                              + "\n  ".join(problems))

    shared = {}
    for name in ("order", "steps", "rank", "kernel_size"):
        values = sorted({v[name] for v in per_cell.values()})
        if len(values) != 1:
            problems.append(f"cells disagree on {name}: {values}")
        shared[name] = values[0]
    hidden_channels = []
    for b in block_ids:
        values = sorted({per_cell[(b, l)]["hidden"] for l in layer_ids})
        if len(values) != 1:
            problems.append(f"block b{b}'s cells disagree on hidden channels: {values}")
        hidden_channels.append(values[0])
        for l in layer_ids[1:]:
            got = per_cell[(b, l)]["in_channels"]
            if got != values[0]:
                problems.append(f"layers.b{b}l{l} reads {got} input channels, expected the "
                                f"block's {values[0]} hidden channels")
    out_w, out_b = output["weight"], output["bias"]
    if out_w.dim() != 4 or tuple(out_w.shape[2:]) != (1, 1) or \
            tuple(out_b.shape) != (out_w.shape[0],):
        problems.append(f"layers.output must be a 1x1 conv [C_img, C, 1, 1] with bias "
                        f"[C_img], got {tuple(out_w.shape)} / {tuple(out_b.shape)}")
    if problems:
        raise CheckpointError("the checkpoint's shapes fit no Conv-TT-LSTM network:\n  "
                              + "\n  ".join(problems))

    image_channels = out_w.shape[0]
    first = [per_cell[(b, layer_ids[0])]["in_channels"] for b in block_ids]
    observed = [*first, out_w.shape[1]]
    base = dict(cell="convttlstm", image_channels=image_channels,
                hidden_channels=tuple(hidden_channels), layers_per_block=len(layer_ids),
                **shared)
    candidates = []
    for skip in range(len(block_ids) + 1):
        config = ArchitectureConfig(**base, skip_stride=skip)
        if config.block_input_channels() == observed:
            candidates.append(skip)
    if "skip_stride" in arch:
        if arch["skip_stride"] not in candidates:
            raise CheckpointError(
                f"skip_stride={arch['skip_stride']!r} does not fit the checkpoint: its blocks "
                f"read {observed[:-1]} input channels and its output layer {observed[-1]}"
                f" (fitting skip strides: {candidates or 'none'})")
        skip = arch["skip_stride"]
    elif not candidates:
        raise CheckpointError(
            f"no skip stride explains the checkpoint's channels: blocks read "
            f"{observed[:-1]} input channels, the output layer {observed[-1]}, with "
            f"{image_channels} image channel(s) and hidden channels {hidden_channels}")
    else:
        # A stride of len(blocks) or more adds nothing; several fit only then.
        skip = candidates[0]
    inferred = dict(base, skip_stride=skip)
    conflicts = [f"{k}={arch[k]!r} (checkpoint: {inferred[k]!r})" for k in arch
                 if k in inferred and k != "skip_stride"
                 and _normalise(arch[k]) != _normalise(inferred[k])]
    if conflicts:
        raise CheckpointError("arguments contradict the checkpoint's shapes: "
                              + ", ".join(conflicts))
    extra = {k: v for k, v in arch.items() if k not in inferred}
    if extra.get("patch_size", 1) != 1:
        raise CheckpointError("the release's networks have no patch folding: patch_size "
                              f"must be 1, got {extra['patch_size']!r}")
    try:
        return ArchitectureConfig(**inferred, **extra)
    except TypeError as error:
        raise CheckpointError(f"bad architecture argument: {error}") from None


def _normalise(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def load_nvlabs_checkpoint(path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]],
                           *, channels_last: bool = True,
                           **arch: Any) -> VideoPredictionNetwork:
    """Our network, with the weights of a checkpoint of the paper's public release.

    The release stores, per cell ``layers.b{b}l{l}.``, the tensor-train cores and gate conv
    as ``layers.{i}`` and the window convolutions as ``layers_.{i}``, either Conv3d
    ``[R, H, k, k, L]`` (last axis over the window, oldest state first) or Conv2d
    ``[R, L*H, k, k]`` (the window's states concatenated on channels, oldest first), and the
    1x1 output conv as ``layers.output``. Files may wrap the state dict as
    ``{"model_state_dict": ...}`` and keys may carry DistributedDataParallel's ``module.``
    prefix. The network computes the maths of the paper's cell (REFERENCE.md section 1),
    which is what the release's training code computes. (Its evaluation code advances the
    ring buffer of past states modulo ``order`` instead of ``steps``; that only differs when
    ``steps > order``, and both official checkpoints have ``steps == order``.)
    Predictions are not clamped: the release clamps them to ``[0, 1]`` when evaluating.

    Parameters
    ----------
    path_or_state_dict : path or mapping
        A file written by ``torch.save`` or the loaded dict.
    channels_last : bool
        Passed to :class:`VideoPredictionNetwork`.
    **arch
        :class:`ArchitectureConfig` fields. Everything the shapes determine (blocks, layers
        per block, hidden channels, kernel size, order, steps, rank, image channels and the
        skip stride when only one fits) is inferred and a contradicting value is an error;
        give what shapes cannot tell, e.g. ``output_sigmoid=True``.

    Raises
    ------
    CheckpointError
        Listing the missing or unexpected keys and the shapes that fit no architecture.
    """
    state = _release_state_dict(path_or_state_dict)
    config = _infer_release_architecture(state, arch)
    model = VideoPredictionNetwork(config, channels_last=channels_last)
    _load_state(model, _convert_release_state(state, config))
    return model


def _convert_release_state(state: Mapping[str, torch.Tensor],
                           config: ArchitectureConfig) -> Dict[str, torch.Tensor]:
    """The release's tensors under our names and layouts."""
    cells = {}
    for key in state:
        match = _CELL_KEY.match(key)
        if match:
            cells.setdefault((int(match.group(1)), int(match.group(2))), None)
    block_ids = sorted({b for b, _ in cells})
    layer_ids = sorted({l for _, l in cells})
    order = config.order
    window = config.steps - config.order + 1
    out: Dict[str, torch.Tensor] = {}
    for b_index, b in enumerate(block_ids):
        for l_index, l in enumerate(layer_ids):
            src = f"layers.b{b}l{l}."
            dst = f"blocks.{b_index}.{l_index}.tt."
            windows = []
            for i in range(order):
                weight = state[f"{src}layers_.{i}.weight"]
                rank = weight.shape[0]
                if weight.dim() == 5:  # Conv3d [R, H, k, k, L] -> [L, R, H, k, k]
                    by_slot = weight.permute(4, 0, 1, 2, 3)
                else:  # Conv2d [R, L*H, k, k] -> [L, R, H, k, k]
                    r, lh, kh, kw = weight.shape
                    by_slot = weight.reshape(r, window, lh // window, kh, kw).permute(1, 0, 2, 3, 4)
                # Our blocks count window slots back from the newest state.
                windows.append(by_slot.flip(0))
            stacked = torch.stack(windows, dim=1)  # [L, P, R, H, k, k]
            out[dst + "window_weight"] = stacked.reshape(-1, *stacked.shape[3:]).contiguous()
            out[dst + "window_bias"] = torch.cat(
                [state[f"{src}layers_.{i}.bias"] for i in range(order)])
            gate = state[f"{src}layers.{order - 1}.weight"]
            k = gate.shape[-1]
            if order > 1:
                out[dst + "core_weight"] = torch.cat(
                    [state[f"{src}layers.{i}.weight"] for i in range(order - 1)])
                out[dst + "core_bias"] = torch.cat(
                    [state[f"{src}layers.{i}.bias"] for i in range(order - 1)])
            else:
                out[dst + "core_weight"] = gate.new_zeros((0, rank, k, k))
                out[dst + "core_bias"] = gate.new_zeros((0,))
            out[dst + "output_weight"] = gate
            out[dst + "output_bias"] = state[f"{src}layers.{order - 1}.bias"]
    out["output.weight"] = state["layers.output.weight"]
    out["output.bias"] = state["layers.output.bias"]
    return out
