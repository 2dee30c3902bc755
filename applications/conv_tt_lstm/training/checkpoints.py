"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A training checkpoint is the model's own checkpoint dict (whatever the task saves to rebuild
its model) plus a ``"training"`` entry holding the step, the ``state_dict()`` of every
stateful object given (optimiser, gradient scaler, schedules, ...), every random number
generator's state (Python, NumPy, torch CPU and CUDA, and named ``torch.Generator`` objects)
and free-form ``extra`` values. Files are written atomically, so a run killed while saving
leaves the previous checkpoint intact. Only plain values and tensors are stored: the files
load with ``torch.load(..., weights_only=True)``.

Layout of a run folder: ``checkpoints/last.pt`` (every N steps and at the end),
``checkpoints/healthy.pt`` (the newest ``last.pt`` whose loss and weights were finite and
not exploding, :func:`divergence`; a hard link, no extra space) and ``checkpoints/best.pt``
(the best validation score so far), kept apart.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..files import atomic_path, atomic_torch_save, load_tensors, remove_stale_temporaries

PathLike = Union[str, "os.PathLike[str]"]

LAST = "last.pt"
BEST = "best.pt"
#: The newest ``last.pt`` whose loss and weights were finite and not exploding: where a run
#: that diverged is resumed from (with a lower learning rate).
HEALTHY = "healthy.pt"
#: Growth (of the parameters' norm over the run's initial norm, of the loss over the run's
#: first losses) beyond which a checkpoint counts as diverging, not healthy.
EXPLOSION_FACTOR = 100.0


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


def parameter_norm(model: torch.nn.Module) -> float:
    """The Euclidean norm of all of ``model``'s parameters together (float64)."""
    total = 0.0
    for parameter in model.parameters():
        total += float(parameter.detach().double().pow(2).sum())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def divergence(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], *,
               initial_norm: float, losses: Sequence[float],
               reference_loss: Optional[float]) -> Optional[str]:
    """Why the state about to be saved is diverging, or ``None`` when it is healthy.

    Diverging: a parameter or optimiser state that is NaN/inf, a parameter norm more than
    :data:`EXPLOSION_FACTOR` times the run's initial one, or a loss since the previous
    checkpoint more than :data:`EXPLOSION_FACTOR` times the run's first losses
    (``reference_loss``). Weights grow to ~1e30 before the loss overflows: a checkpoint
    of such weights is intact but useless to resume from.
    """
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter.detach()).all()):
            return f"parameter {name} holds NaN or inf"
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and \
                        not bool(torch.isfinite(value).all()):
                    return f"the optimiser's {key} holds NaN or inf"
    norm = parameter_norm(model)
    if initial_norm > 0 and norm > EXPLOSION_FACTOR * initial_norm:
        return (f"the parameters' norm grew to {norm:.3g}, {norm / initial_norm:.3g} times its "
                f"initial {initial_norm:.3g}")
    if reference_loss is not None and reference_loss > 0 and losses:
        worst = max(losses)
        if worst > EXPLOSION_FACTOR * reference_loss:
            return (f"the loss reached {worst:.3g}, {worst / reference_loss:.3g} times the "
                    f"run's first losses ({reference_loss:.3g})")
    return None


def keep_healthy(last: PathLike, healthy: PathLike) -> Path:
    """Make ``healthy`` the same file as ``last`` (a hard link, atomically; a copy where the
    file system has no links)."""
    last, healthy = Path(last), Path(healthy)
    with atomic_path(healthy) as temporary:
        temporary.unlink()
        try:
            os.link(last, temporary)
        except OSError:
            shutil.copyfile(last, temporary)
    return healthy


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
    start), or ``checkpoints/healthy.pt``, with a warning, when ``last.pt`` was saved with
    diverging weights; a path must exist.
    """
    if resume is None:
        return None
    if resume == "auto":
        last, healthy = checkpoint_dir(run_dir) / LAST, checkpoint_dir(run_dir) / HEALTHY
        if not last.is_file():
            return None
        reason = load_training_checkpoint(last)["training"]["extra"].get("diverging")
        if reason and healthy.is_file():
            warnings.warn(f"{last} holds diverged weights ({reason}); resuming from {healthy}, "
                          f"the last checkpoint whose loss and weights were healthy",
                          stacklevel=2)
            return healthy
        return last
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
    if resume_path is None:  # a fresh start: an earlier run's healthy.pt is not this run's
        (checkpoint_dir(run_dir) / HEALTHY).unlink(missing_ok=True)
    return resume_path
