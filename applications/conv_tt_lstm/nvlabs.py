"""Checkpoints of the paper's public release (NVlabs/conv-tt-lstm), of any architecture.

The release's code builds a network from a layer count per block, hidden channels per
block, a kernel size, an optional skip stride, an optional output sigmoid and one cell type
for every layer: ConvLSTM or Conv-TT-LSTM (order, steps, rank). Its checkpoints store
(REFERENCE.md section 3), per cell ``layers.b{b}l{l}.``:

* ConvLSTM: ``conv.weight`` ``[4H, C_in + H, kh, kw]`` and ``conv.bias`` (gates i, f, o, g
  of ``concat(x_t, h_{t-1})``);
* Conv-TT-LSTM: ``layers.{i}`` (``i < P - 1``: the ``R -> R`` cores ``[R, R, kh, kw]``;
  ``i = P - 1``: the gate conv ``[4H, C_in + R, kh, kw]``) and ``layers_.{i}``, the window
  convolutions of core ``i + 1``, either Conv3d ``[R, H, kh, kw, L]`` (last axis over the
  window, oldest state first) or Conv2d ``[R, L*H, kh, kw]`` (the window's states
  concatenated on channels, oldest first);

and the 1x1 output conv as ``layers.output``. Files may wrap the state dict as
``{"model_state_dict": ...}``, keys may carry DistributedDataParallel's ``module.``
prefix, and a network built with ``bias=False`` has no bias in its cells (they load as
zeros, which computes the same).

:func:`load_nvlabs_checkpoint` reads such a file in named steps: the bare state dict
(:func:`release_state_dict`), its keys grouped by cell (:func:`group_release_keys`), then
the architecture inferred from the shapes alone (:func:`infer_release_architecture`: the
cell grid, each cell's hyper-parameters, what all cells share, each block's channels, the
output layer, the skip stride, and the caller's arguments), and the tensors put into our
layout (:func:`convert_release_state`). Each step lists every mismatch it finds.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_state, read_file
from .model import ArchitectureConfig, VideoPredictionNetwork

_CELL_KEY = re.compile(r"^layers\.b(\d+)l(\d+)\.(.+)$")
_OUTPUT_KEY = re.compile(r"^layers\.output\.(weight|bias)$")
_TT_PARAMETER = re.compile(r"^(layers_?)\.(\d+)\.(weight|bias)$")
_LSTM_PARAMETER = re.compile(r"^conv\.(weight|bias)$")

Cell = Tuple[int, int]  # (block, layer)


@dataclass
class ReleaseKeys:
    """A release state dict grouped: each cell's tensors by their name inside the cell."""

    cells: Dict[Cell, Dict[str, torch.Tensor]]
    output: Dict[str, torch.Tensor]

    @property
    def has_bias(self) -> bool:
        """Whether the cells have biases (the release's ``bias=True``, its default)."""
        return any(name.endswith(".bias") for entries in self.cells.values() for name in entries)


@dataclass(frozen=True)
class CellShape:
    """What one cell's tensors say about it."""

    name: str
    cell: str
    in_channels: int
    hidden: int
    kernel: Tuple[int, int]
    order: Optional[int] = None
    steps: Optional[int] = None
    rank: Optional[int] = None


def _fail(problems: Sequence[str], header: str) -> None:
    if problems:
        raise CheckpointError(header + ":\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------- reading


def release_state_dict(source: Union[str, os.PathLike, Mapping[str, Any]]
                       ) -> Dict[str, torch.Tensor]:
    """The bare state dict of a release checkpoint (file or dict), ``module.`` prefixes removed."""
    value = read_file(source, "cpu")
    if value.get("format") == CHECKPOINT_FORMAT:
        where = source if isinstance(source, (str, os.PathLike)) else "the checkpoint"
        raise CheckpointError(f"{where} is already a tt-conv checkpoint (format "
                              f"{CHECKPOINT_FORMAT!r}): it needs no conversion; evaluate, "
                              f"predict and load_model take it as it is")
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


def group_release_keys(state: Mapping[str, torch.Tensor]) -> ReleaseKeys:
    """The state dict's tensors by cell ``(block, layer)`` and the output layer's.

    Raises
    ------
    CheckpointError
        Listing every key outside the release's layout and the missing output keys.
    """
    problems: List[str] = []
    cells: Dict[Cell, Dict[str, torch.Tensor]] = {}
    output: Dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        cell, output_key = _CELL_KEY.match(key), _OUTPUT_KEY.match(key)
        if cell:
            b, l, name = cell.groups()
            cells.setdefault((int(b), int(l)), {})[name] = tensor
        elif output_key:
            output[output_key.group(1)] = tensor
        else:
            problems.append(f"unexpected key {key!r}")
    if not cells:
        problems.append("no cell keys: expected 'layers.b{b}l{l}.conv.weight|bias' (ConvLSTM) "
                        "or 'layers.b{b}l{l}.layers[_].{i}.weight|bias' (Conv-TT-LSTM)")
    for kind in ("weight", "bias"):
        if kind not in output:
            problems.append(f"missing key 'layers.output.{kind}'")
    _fail(problems, "not a checkpoint of the release's layout")
    return ReleaseKeys(cells, output)


# ---------------------------------------------------------------------------- inference


def cell_grid(keys: ReleaseKeys) -> Tuple[int, ...]:
    """Layers per block: blocks ``b0, b1, ...`` each with layers ``l0, l1, ...``."""
    problems = []
    blocks = sorted({b for b, _ in keys.cells})
    if blocks != list(range(len(blocks))):
        problems.append(f"block ids {blocks} are not 0, 1, 2, ...")
    layers = []
    for b in blocks:
        ids = sorted(l for block, l in keys.cells if block == b)
        for l in range(max(ids) + 1):
            if l not in ids:
                problems.append(f"missing cell layers.b{b}l{l} (block b{b} has layers up to "
                                f"l{max(ids)})")
        layers.append(max(ids) + 1)
    _fail(problems, "the checkpoint's cells do not form blocks of layers")
    return tuple(layers)


def _odd_kernel(weight: torch.Tensor) -> Optional[Tuple[int, int]]:
    kernel = tuple(int(k) for k in weight.shape[2:4])
    return kernel if all(k % 2 for k in kernel) else None


def _expect_shapes(name: str, entries: Mapping[str, torch.Tensor],
                   expected: Mapping[str, Tuple[int, ...]], problems: List[str]) -> None:
    for key, shape in expected.items():
        if key in entries and tuple(entries[key].shape) != shape:
            problems.append(f"{name}.{key}: expected shape {shape}, "
                            f"got {tuple(entries[key].shape)}")


def _convlstm_cell(name: str, entries: Mapping[str, torch.Tensor], bias: bool,
                   problems: List[str]) -> Optional[CellShape]:
    """A ConvLSTM cell: ``conv`` ``[4H, C_in + H, kh, kw]`` over ``concat(x_t, h_{t-1})``."""
    names = ["conv.weight"] + (["conv.bias"] if bias else [])
    for key in names:
        if key not in entries:
            problems.append(f"missing key {name}.{key}")
    for key in entries:
        if key not in names:
            problems.append(f"unexpected key {name}.{key} (a ConvLSTM cell has "
                            f"{' and '.join(names)})")
    weight = entries.get("conv.weight")
    if weight is None:
        return None
    kernel = _odd_kernel(weight) if weight.dim() == 4 else None
    if kernel is None or weight.shape[0] % 4 or weight.shape[1] <= weight.shape[0] // 4:
        problems.append(f"{name}.conv.weight must be [4H, C_in + H, k, k] with k odd, got "
                        f"{tuple(weight.shape)}")
        return None
    hidden = weight.shape[0] // 4
    _expect_shapes(name, entries, {"conv.bias": (4 * hidden,)}, problems)
    return CellShape(name, "convlstm", weight.shape[1] - hidden, hidden, kernel)


def _convttlstm_cell(name: str, entries: Mapping[str, torch.Tensor], bias: bool,
                     problems: List[str]) -> Optional[CellShape]:
    """A Conv-TT-LSTM cell: cores and gate ``layers.{i}``, window convs ``layers_.{i}``."""
    parsed = {}
    for key in entries:
        match = _TT_PARAMETER.match(key)
        if match is None:
            problems.append(f"unexpected key {name}.{key}")
        else:
            parsed[key] = (match.group(1), int(match.group(2)), match.group(3))
    order = len({i for group, i, _ in parsed.values() if group == "layers"})
    kinds = ("weight", "bias") if bias else ("weight",)
    before = len(problems)
    for group in ("layers", "layers_"):
        for i in range(order):
            for kind in kinds:
                if f"{group}.{i}.{kind}" not in entries:
                    problems.append(f"missing key {name}.{group}.{i}.{kind}")
    for key, (group, i, kind) in parsed.items():
        if i >= order or kind not in kinds:
            problems.append(f"unexpected key {name}.{key} (the cell has {order} cores"
                            f"{'' if bias else ' and no biases'})")
    if order == 0:
        problems.append(f"{name}: no core convolutions 'layers.{{i}}'")
    if len(problems) > before:
        return None
    gate = entries[f"layers.{order - 1}.weight"]
    kernel = _odd_kernel(gate) if gate.dim() == 4 else None
    if kernel is None or gate.shape[0] % 4:
        problems.append(f"{name}.layers.{order - 1}.weight (gate conv) must be "
                        f"[4H, C_in + R, k, k] with k odd, got {tuple(gate.shape)}")
        return None
    hidden = gate.shape[0] // 4
    window_weight = entries["layers_.0.weight"]
    rank = window_weight.shape[0]
    if window_weight.dim() == 5:
        window = window_weight.shape[4]
        window_shape = (rank, hidden, *kernel, window)
    elif window_weight.dim() == 4 and window_weight.shape[1] % hidden == 0:
        window = window_weight.shape[1] // hidden
        window_shape = (rank, window * hidden, *kernel)
    else:
        problems.append(f"{name}.layers_.0.weight must be [R, H, k, k, L] (Conv3d) or "
                        f"[R, L*H, k, k] (Conv2d) with H={hidden}, got "
                        f"{tuple(window_weight.shape)}")
        return None
    expected = {f"layers.{order - 1}.bias": (4 * hidden,)}
    for i in range(order - 1):
        expected[f"layers.{i}.weight"] = (rank, rank, *kernel)
        expected[f"layers.{i}.bias"] = (rank,)
    for i in range(order):
        expected[f"layers_.{i}.weight"] = window_shape
        expected[f"layers_.{i}.bias"] = (rank,)
    _expect_shapes(name, entries, expected, problems)
    in_channels = gate.shape[1] - rank
    if in_channels < 1:
        problems.append(f"{name}.layers.{order - 1}.weight has {gate.shape[1]} input "
                        f"channels, not more than the rank {rank}")
        return None
    return CellShape(name, "convttlstm", in_channels, hidden, kernel, order=order,
                     steps=order + window - 1, rank=rank)


def read_cells(keys: ReleaseKeys) -> Dict[Cell, CellShape]:
    """Every cell's type and hyper-parameters, from its tensors' shapes."""
    problems: List[str] = []
    shapes = {}
    for (b, l), entries in sorted(keys.cells.items()):
        name = f"layers.b{b}l{l}"
        read = _convlstm_cell if any(k.startswith("conv.") for k in entries) else \
            _convttlstm_cell
        shape = read(name, entries, keys.has_bias, problems)
        if shape is not None:
            shapes[(b, l)] = shape
    _fail(problems, "the checkpoint's shapes fit no network of the release")
    return shapes


def shared_hyperparameters(shapes: Mapping[Cell, CellShape]) -> Dict[str, Any]:
    """Cell type, kernel size and (Conv-TT-LSTM) order, steps and rank: one for all cells."""
    problems = []
    shared: Dict[str, Any] = {}
    names = ("cell", "kernel", "order", "steps", "rank")
    for name in names:
        values = sorted({getattr(s, name) for s in shapes.values()}, key=repr)
        if len(values) != 1:
            problems.append(f"cells disagree on {name}: {values}")
        shared[name] = values[0]
    _fail(problems, "the checkpoint's shapes fit no network of the release")
    kernel = shared.pop("kernel")
    shared["kernel_size"] = kernel[0] if kernel[0] == kernel[1] else kernel
    return {k: v for k, v in shared.items() if v is not None}


def block_channels(shapes: Mapping[Cell, CellShape], layers: Sequence[int]
                   ) -> Tuple[Tuple[int, ...], List[int]]:
    """Hidden channels of each block, and the input channels of each block's first cell."""
    problems = []
    hidden, first = [], []
    for b, count in enumerate(layers):
        values = sorted({shapes[b, l].hidden for l in range(count)})
        if len(values) != 1:
            problems.append(f"block b{b}'s cells disagree on hidden channels: {values}")
        hidden.append(values[0])
        first.append(shapes[b, 0].in_channels)
        for l in range(1, count):
            got = shapes[b, l].in_channels
            if got != values[0]:
                problems.append(f"layers.b{b}l{l} reads {got} input channels, expected the "
                                f"block's {values[0]} hidden channels")
    _fail(problems, "the checkpoint's shapes fit no network of the release")
    return tuple(hidden), first


def output_layer(keys: ReleaseKeys) -> Tuple[int, int]:
    """(image channels, input channels) of the 1x1 output convolution."""
    weight, bias = keys.output["weight"], keys.output["bias"]
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (1, 1) or \
            tuple(bias.shape) != (weight.shape[0],):
        _fail([f"layers.output must be a 1x1 conv [C_img, C, 1, 1] with bias [C_img], got "
               f"{tuple(weight.shape)} / {tuple(bias.shape)}"],
              "the checkpoint's shapes fit no network of the release")
    return int(weight.shape[0]), int(weight.shape[1])


def skip_stride(image_channels: int, hidden: Sequence[int], observed: Sequence[int],
                given: Optional[int] = None) -> int:
    """The skip stride whose concatenations give the ``observed`` input channels.

    ``observed`` lists the input channels of each block's first cell, then of the output
    layer. A stride of the number of blocks or more adds nothing (the release's ``None``):
    0 is returned for it.
    """
    observed = list(observed)

    def inputs(skip: int) -> List[int]:
        return ArchitectureConfig(hidden_channels=tuple(hidden), image_channels=image_channels,
                                  layers_per_block=1, skip_stride=skip).block_input_channels()

    fitting = [skip for skip in range(len(hidden) + 1) if inputs(skip) == observed]
    if given is not None:
        if given not in fitting:
            raise CheckpointError(
                f"skip_stride={given!r} does not fit the checkpoint: its blocks read "
                f"{observed[:-1]} input channels and its output layer {observed[-1]}"
                f" (fitting skip strides: {fitting or 'none'})")
        return given
    if not fitting:
        doubled = [observed[0]] + [2 * h for h in hidden]
        note = (" (the release's skip_stride=0 concatenates every block's output with "
                "itself, which this network does not build)" if observed == doubled else "")
        raise CheckpointError(
            f"no skip stride explains the checkpoint's channels: blocks read "
            f"{observed[:-1]} input channels, the output layer {observed[-1]}, with "
            f"{image_channels} image channel(s) and hidden channels {list(hidden)}{note}")
    return fitting[0]


def _with_arguments(inferred: Mapping[str, Any], arch: Mapping[str, Any]) -> ArchitectureConfig:
    """``inferred`` completed by the caller's ``arch``; contradictions are errors."""
    try:
        config = ArchitectureConfig(**inferred)
        conflicts = []
        for name, value in arch.items():
            if name in inferred and name != "skip_stride":
                wanted = getattr(dataclasses.replace(config, **{name: value}), name)
                if wanted != getattr(config, name):
                    conflicts.append(f"{name}={value!r} (checkpoint: {getattr(config, name)!r})")
        if conflicts:
            raise CheckpointError("arguments contradict the checkpoint's shapes: "
                                  + ", ".join(conflicts))
        extra = {k: v for k, v in arch.items() if k not in inferred}
        if extra.get("patch_size", 1) != 1:
            raise CheckpointError("the release's networks have no patch folding: patch_size "
                                  f"must be 1, got {extra['patch_size']!r}")
        return dataclasses.replace(config, **extra)
    except (TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"bad architecture argument: {error}") from None


def infer_release_architecture(keys: ReleaseKeys,
                               arch: Optional[Mapping[str, Any]] = None) -> ArchitectureConfig:
    """The architecture a release state dict was trained with, from its shapes alone.

    Parameters
    ----------
    keys : ReleaseKeys
        From :func:`group_release_keys`.
    arch : mapping, optional
        :class:`~.model.ArchitectureConfig` fields given by the caller: they must agree with
        what the shapes determine, and complete what they cannot (``output_sigmoid``).

    Raises
    ------
    CheckpointError
        Listing every shape that fits no network of the release.
    """
    arch = dict(arch or {})
    layers = cell_grid(keys)
    shapes = read_cells(keys)
    shared = shared_hyperparameters(shapes)
    hidden, first_inputs = block_channels(shapes, layers)
    image_channels, output_inputs = output_layer(keys)
    skip = skip_stride(image_channels, hidden, [*first_inputs, output_inputs],
                       arch.pop("skip_stride", None))
    inferred = dict(shared, image_channels=image_channels, hidden_channels=hidden,
                    layers_per_block=layers, skip_stride=skip)
    return _with_arguments(inferred, arch)


# ---------------------------------------------------------------------------- conversion


def _convlstm_state(entries: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    weight = entries["conv.weight"]
    bias = entries.get("conv.bias", weight.new_zeros(weight.shape[0]))
    return {prefix + "weight": weight, prefix + "bias": bias}


def _convttlstm_state(entries: Mapping[str, torch.Tensor], config: ArchitectureConfig,
                      prefix: str) -> Dict[str, torch.Tensor]:
    order, window = config.order, config.steps - config.order + 1

    def bias(group: str, i: int) -> torch.Tensor:
        weight = entries[f"{group}.{i}.weight"]
        return entries.get(f"{group}.{i}.bias", weight.new_zeros(weight.shape[0]))

    windows = []
    for i in range(order):
        weight = entries[f"layers_.{i}.weight"]
        if weight.dim() == 5:  # Conv3d [R, H, kh, kw, L] -> [L, R, H, kh, kw]
            by_slot = weight.permute(4, 0, 1, 2, 3)
        else:  # Conv2d [R, L*H, kh, kw] -> [L, R, H, kh, kw]
            r, lh, kh, kw = weight.shape
            by_slot = weight.reshape(r, window, lh // window, kh, kw).permute(1, 0, 2, 3, 4)
        # Our window slots count back from the newest state; the release's run oldest first.
        windows.append(by_slot.flip(0))
    stacked = torch.stack(windows, dim=1)  # [L, P, R, H, kh, kw]
    gate = entries[f"layers.{order - 1}.weight"]
    cores = [entries[f"layers.{i}.weight"] for i in range(order - 1)]
    rank = stacked.shape[2]
    tt = prefix + "tt."
    return {
        tt + "window_weight": stacked.reshape(-1, *stacked.shape[3:]).contiguous(),
        tt + "window_bias": torch.cat([bias("layers_", i) for i in range(order)]),
        tt + "core_weight": torch.cat(cores) if cores else
        gate.new_zeros((0, rank, *gate.shape[2:])),
        tt + "core_bias": torch.cat([bias("layers", i) for i in range(order - 1)])
        if cores else gate.new_zeros((0,)),
        tt + "output_weight": gate,
        tt + "output_bias": bias("layers", order - 1),
    }


def convert_release_state(keys: ReleaseKeys, config: ArchitectureConfig
                          ) -> Dict[str, torch.Tensor]:
    """The release's tensors under our names and layouts (cell ``b{b}l{l}`` -> ``blocks.b.l``)."""
    out: Dict[str, torch.Tensor] = {}
    for (b, l), entries in sorted(keys.cells.items()):
        prefix = f"blocks.{b}.{l}."
        if config.cell == "convlstm":
            out.update(_convlstm_state(entries, prefix))
        else:
            out.update(_convttlstm_state(entries, config, prefix))
    out["output.weight"] = keys.output["weight"]
    out["output.bias"] = keys.output["bias"]
    return out


def load_nvlabs_checkpoint(path_or_state_dict: Union[str, os.PathLike, Mapping[str, Any]],
                           *, channels_last: bool = True,
                           **arch: Any) -> VideoPredictionNetwork:
    """Our network, with the weights of a checkpoint of the paper's public release.

    Any network the release's code builds loads (see the module docstring for its layout):
    ConvLSTM or Conv-TT-LSTM cells, a layer count per block, any image and hidden channels,
    kernel size, skip stride or none, order, steps >= order and rank, with or without
    biases, Conv3d or Conv2d window convolutions. The network computes the maths of the
    paper's cell (REFERENCE.md section 1), which is what the release's training code
    computes. (Its evaluation code advances the ring buffer of past states modulo ``order``
    instead of ``steps``; that only differs when ``steps > order``, and both official
    checkpoints have ``steps == order``.) Predictions are not clamped: the release clamps
    them to ``[0, 1]`` when evaluating.

    Parameters
    ----------
    path_or_state_dict : path or mapping
        A file written by ``torch.save`` or the loaded dict.
    channels_last : bool
        Passed to :class:`~.model.VideoPredictionNetwork`.
    **arch
        :class:`~.model.ArchitectureConfig` fields. Everything the shapes determine (cell
        type, blocks, layers per block, hidden channels, kernel size, order, steps, rank,
        image channels and the skip stride when only one fits) is inferred and a
        contradicting value is an error; give what shapes cannot tell, e.g.
        ``output_sigmoid=True``.

    Raises
    ------
    CheckpointError
        Listing the missing or unexpected keys and the shapes that fit no architecture.
    """
    keys = group_release_keys(release_state_dict(path_or_state_dict))
    config = infer_release_architecture(keys, arch)
    model = VideoPredictionNetwork(config, channels_last=channels_last)
    load_state(model, convert_release_state(keys, config))
    return model
