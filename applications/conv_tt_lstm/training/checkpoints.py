"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A training checkpoint is the model's own checkpoint dict (whatever the task saves to rebuild
its model) plus a ``"training"`` entry holding the step, the ``state_dict()`` of every
stateful object given (optimiser, gradient scaler, schedules, ...), every random number
generator's state (Python, NumPy, torch CPU and CUDA, and named ``torch.Generator`` objects)
and free-form ``extra`` values. Files are written atomically, so a run killed while saving
leaves the previous checkpoint intact. Only plain values and tensors are stored: the files
load with ``torch.load(..., weights_only=True)``.

Layout of a run folder: ``checkpoints/last.pt`` (every N steps and at the end) and
``checkpoints/best.pt`` (the best validation score so far), kept apart.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import torch

from ..files import atomic_torch_save, load_tensors, remove_stale_temporaries

PathLike = Union[str, "os.PathLike[str]"]

LAST = "last.pt"
BEST = "best.pt"


class ResumeError(ValueError):
    """``--resume`` names something that cannot be resumed from."""


def checkpoint_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def capture_rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> Dict[str, Any]:
    """The state of every random number generator, as plain values and tensors."""
    numpy_state = np.random.get_state(legacy=False)
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(numpy_state["state"]["key"]).copy()),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any],
                      generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    """Inverse of :func:`capture_rng_state` (generators are matched by name)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32),
                  "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name not in saved:
            raise ResumeError(f"the checkpoint has no state for random generator {name!r}")
        generator.set_state(saved[name])


def training_state(step: int, stateful: Mapping[str, Any],
                   generators: Optional[Mapping[str, torch.Generator]] = None,
                   extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``"training"`` entry of a checkpoint (see the module docstring).

    ``stateful`` maps names to objects with ``state_dict()`` (``None`` values are skipped:
    e.g. no gradient scaler in fp32).
    """
    return {
        "step": int(step),
        "states": {name: obj.state_dict() for name, obj in stateful.items() if obj is not None},
        "rng": capture_rng_state(generators),
        "extra": dict(extra or {}),
    }


def save_training_checkpoint(path: PathLike, model_checkpoint: Mapping[str, Any],
                             training: Mapping[str, Any]) -> Path:
    """Write ``{**model_checkpoint, "training": training}`` to ``path`` atomically."""
    if "training" in model_checkpoint:
        raise ValueError("model_checkpoint must not have a 'training' key")
    return atomic_torch_save({**model_checkpoint, "training": dict(training)}, path)


def load_training_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a training checkpoint written by :func:`save_training_checkpoint`.

    Raises
    ------
    ResumeError
        If the file is missing, unreadable, or holds no training state.
    """
    path = Path(path)
    value = load_tensors(path, map_location, error=ResumeError,
                         what="checkpoint to resume from")
    if not isinstance(value, dict) or not isinstance(value.get("training"), dict):
        raise ResumeError(f"{path} holds no training state (a model-only checkpoint such as "
                          f"best.pt or a converted one cannot be resumed; use last.pt)")
    return value


def restore_training_state(training: Mapping[str, Any], stateful: Mapping[str, Any],
                           generators: Optional[Mapping[str, torch.Generator]] = None) -> int:
    """Load every stateful object's and generator's state; return the step to continue from."""
    states = training["states"]
    for name, obj in stateful.items():
        if obj is None:
            continue
        if name not in states:
            raise ResumeError(f"the checkpoint has no state for {name!r} (was it written with "
                              f"another precision or configuration?)")
        obj.load_state_dict(states[name])
    restore_rng_state(training["rng"], generators)
    return int(training["step"])


def find_resume_checkpoint(run_dir: PathLike, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint ``--resume`` designates: ``None``, ``"auto"`` or a path.

    ``"auto"`` gives the run's ``checkpoints/last.pt`` if it exists (else ``None``: a fresh
    start); a path must exist.
    """
    if resume is None:
        return None
    if resume == "auto":
        last = checkpoint_dir(run_dir) / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise ResumeError(f"--resume {resume}: no such checkpoint file")
    return path


class RunExistsError(ValueError):
    """The run folder already holds a checkpoint and neither resume nor overwrite was asked."""


def start_run(run_dir: PathLike, resume: Optional[str], overwrite: bool) -> Optional[Path]:
    """The checkpoint to resume ``run_dir`` from (or None), refusing to clobber a run.

    Raises
    ------
    RunExistsError
        ``run_dir`` holds a last checkpoint, nothing is resumed and ``overwrite`` is false.
    """
    run_dir = Path(run_dir)
    last_path = checkpoint_dir(run_dir) / LAST
    # Saves killed half-way leave full-size temporary files; nothing else would remove them.
    remove_stale_temporaries(checkpoint_dir(run_dir))
    resume_path = find_resume_checkpoint(run_dir, resume)
    if resume_path is None and last_path.is_file() and not overwrite:
        raise RunExistsError(
            f"{run_dir} already holds a checkpoint ({last_path}); continue it with --resume "
            f"auto, start over with --overwrite, or pick another --name")
    return resume_path
