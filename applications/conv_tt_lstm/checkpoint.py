"""Our checkpoint format: a format tag, the architecture, the state dict, and free extras.

A checkpoint is the dict ``{"format", "version", "architecture", "state_dict", **extra}``
written by ``torch.save``: ``format`` names the kind of model (the video-prediction network
here, the early-recognition classifier in :mod:`.recognition.model`), ``architecture`` is
its configuration's ``to_dict()``, and ``extra`` holds whatever the writer adds (step,
validation score, training state). Only plain values and tensors: the files load with
``weights_only=True`` (:func:`~.files.load_tensors`).

* :func:`model_checkpoint`, :func:`read_checkpoint` and :func:`load_state`: the format for
  any model kind (the training skeleton writes every task's checkpoints with them).
* :func:`checkpoint_dict`, :func:`save_checkpoint` and :func:`load_checkpoint`: the
  video-prediction network's.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple, Union

import torch
from torch import nn

from .files import atomic_torch_save, load_tensors
from .model import ArchitectureConfig, VideoPredictionNetwork

#: ``format`` of our video-prediction checkpoints.
CHECKPOINT_FORMAT = "tt-conv/video-prediction-network"
CHECKPOINT_VERSION = 1

#: Keys every checkpoint has; ``extra`` may not use them.
RESERVED_KEYS = ("format", "version", "architecture", "state_dict")

Source = Union[str, os.PathLike, Mapping[str, Any]]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message lists everything that did not match."""


def read_file(source: Source, map_location: Any = "cpu") -> Dict[str, Any]:
    """The dict of a checkpoint file (or a copy of an already loaded dict).

    Raises
    ------
    CheckpointError
        A missing or unreadable file, or one that does not hold a dict.
    """
    if isinstance(source, Mapping):
        return dict(source)
    value = load_tensors(source, map_location, error=CheckpointError)
    if not isinstance(value, Mapping):
        raise CheckpointError(
            f"checkpoint {os.fspath(source)} holds a {type(value).__name__}, not a dict")
    return dict(value)


def model_checkpoint(format: str, architecture: Mapping[str, Any], model: nn.Module,
                     **extra: Any) -> Dict[str, Any]:
    """Our checkpoint of ``model``: ``format`` tag, ``architecture``, state dict, ``extra``.

    Tensors are detached and moved to the CPU, so the file loads anywhere.
    """
    reserved = set(RESERVED_KEYS) & set(extra)
    if reserved:
        raise ValueError(f"checkpoint extra keys {sorted(reserved)} are reserved")
    return {
        "format": format,
        "version": CHECKPOINT_VERSION,
        "architecture": dict(architecture),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def read_checkpoint(source: Source, format: str, *,
                    map_location: Any = "cpu") -> Dict[str, Any]:
    """A checkpoint of ours of kind ``format``, its tag and version checked.

    Raises
    ------
    CheckpointError
        The file cannot be read, or it is not a ``format`` checkpoint of this version (a
        checkpoint of the paper's release is named as such).
    """
    checkpoint = read_file(source, map_location)
    if checkpoint.get("format") != format:
        hint = (" (a checkpoint of the paper's public release? use load_nvlabs_checkpoint "
                "or the convert-nvlabs command)" if "model_state_dict" in checkpoint
                or any(str(k).startswith(("layers.", "module.layers.")) for k in checkpoint)
                else "")
        raise CheckpointError(
            f"not a tt-conv checkpoint: expected format {format!r}, got "
            f"{checkpoint.get('format')!r}{hint}")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"unsupported checkpoint version {checkpoint.get('version')!r} "
            f"(this code reads version {CHECKPOINT_VERSION})")
    if not isinstance(checkpoint.get("architecture"), Mapping) or \
            not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError("the checkpoint lacks its 'architecture' or 'state_dict' dict")
    return checkpoint


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
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


# ------------------------------------------------------------------------ the network's


def checkpoint_dict(model: VideoPredictionNetwork, **extra: Any) -> Dict[str, Any]:
    """Our checkpoint of the video-prediction network ``model`` (see the module docstring).

    ``extra`` (e.g. optimiser state, step, metrics) is stored beside the model under its
    own keys; the keys ``format``, ``version``, ``architecture`` and ``state_dict`` are
    reserved.
    """
    return model_checkpoint(CHECKPOINT_FORMAT, model.config.to_dict(), model, **extra)


def save_checkpoint(path: Union[str, os.PathLike], model: VideoPredictionNetwork,
                    **extra: Any) -> None:
    """Write :func:`checkpoint_dict` of ``model`` to ``path`` atomically."""
    atomic_torch_save(checkpoint_dict(model, **extra), path)


def load_checkpoint(path_or_dict: Source, *, map_location: Any = "cpu",
                    channels_last: bool = True) -> Tuple[VideoPredictionNetwork, Dict[str, Any]]:
    """Rebuild the network from one of our checkpoints.

    Returns
    -------
    (model, checkpoint)
        The network (in training mode, on ``map_location``) and the whole checkpoint dict,
        whose other keys (optimiser state, ...) the caller may use.
    """
    checkpoint = read_checkpoint(path_or_dict, CHECKPOINT_FORMAT, map_location=map_location)
    try:
        config = ArchitectureConfig.from_dict(checkpoint["architecture"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"bad architecture in checkpoint: {error}") from None
    model = VideoPredictionNetwork(config, channels_last=channels_last)
    load_state(model, checkpoint["state_dict"])
    return model, checkpoint
