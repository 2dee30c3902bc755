"""What every run is configured by: sections of plain values and ``section.field=value``.

A task's configuration is a frozen dataclass of sections (:class:`SectionedConfig`): JSON
round trips (``to_dict`` / ``from_dict``) and overrides from the command line
(:func:`apply_overrides`) work on any of them. The sections the training skeleton itself
reads are based here, as torch's ``_ConvNd`` is the base of its convolutions:

* :class:`BaseRunConfig`: length, precision, device, threads, seed, cadence of logs,
  validations and checkpoints, the run folder, resume, the time limit;
* :class:`BaseOptimConfig`: Adam and gradient clipping.

Each task derives its ``run`` and ``optim`` sections from them, adding what only it needs
(:class:`~applications.conv_tt_lstm.config.RunConfig` for video prediction,
:class:`~applications.conv_tt_lstm.recognition.config.RecognitionRunConfig`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Iterable, Literal, Mapping, Optional, Tuple

from ..checks import check_choice, check_int, from_fields, plain_fields
from ..precision import PRECISION_CHOICES


@dataclass(frozen=True)
class BaseRunConfig:
    """How a run goes: the fields the training skeleton reads.

    Attributes
    ----------
    name, runs_dir : str
        The run folder is ``runs_dir/name``.
    steps : int
        Optimiser steps.
    seed : int
        Seed of the initial weights and of the task's own random draws.
    threads : int
        torch CPU threads: a fixed count, or 0 (the default) for every core the machine's
        other jobs leave free, re-checked during the run (:mod:`~.threads`). A fixed count
        makes a run bitwise reproducible on a busy machine.
    compile : bool
        ``torch.compile`` every recurrent cell (``train --compile``, ``recognize
        --compile``; a model without recurrent cells is compiled whole). Without it only
        the cells' pointwise work is compiled, where a compiler exists.
    precision : {"fp32", "bf16", "fp16", "auto"}
        Autocast of the forward pass (fp16 with a gradient scaler, CUDA only). ``"auto"``:
        bf16 where the device runs it fast (CUDA, a CPU with AMX or AVX512-BF16), else
        fp32; the log names what it chose.
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    log_every, val_every, checkpoint_every : int
        Cadence in optimiser steps of the training log, the validation rounds (0: only
        at the end) and ``checkpoints/last.pt`` (0: only at the end).
    val_batch_size : int
        Validation batches per process.
    resume : str, optional
        ``None``, ``"auto"`` (the run's ``checkpoints/last.pt`` when it exists) or a
        checkpoint path.
    progress : bool
        Show a progress bar.
    time_limit : float
        Stop training after this many seconds (0: no limit); the final validation and the
        outputs are still written.
    fit_time_limit : bool
        With ``time_limit``: time the first steps of a fresh run and, if all ``steps`` would
        not fit into the limit, shorten the run to the steps that do, the schedule with it
        (:meth:`~.schedules.TrainingSchedule.shorten`), so a slow machine still runs a
        whole schedule. The shortened length is saved in the checkpoints.
    final_outputs : bool
        Write the task's files at the end (reports, figures).
    """

    name: str = "run"
    runs_dir: str = "runs"
    steps: int = 1000
    seed: int = 0
    threads: int = 0
    compile: bool = False
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    device: str = "auto"
    log_every: int = 10
    val_every: int = 500
    checkpoint_every: int = 500
    val_batch_size: int = 32
    resume: Optional[str] = None
    progress: bool = True
    time_limit: float = 0.0
    fit_time_limit: bool = False
    final_outputs: bool = True

    def __post_init__(self):
        check_choice("run.precision", self.precision, PRECISION_CHOICES)
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"run.name must be a plain folder name, got {self.name!r}")
        check_int("run.steps", self.steps, 1)
        for name in ("log_every", "val_every", "checkpoint_every", "threads"):
            check_int(f"run.{name}", getattr(self, name), 0)
        check_int("run.val_batch_size", self.val_batch_size, 1)
        if not self.time_limit >= 0:
            raise ValueError(f"run.time_limit must be >= 0 seconds, got {self.time_limit!r}")


@dataclass(frozen=True)
class BaseOptimConfig:
    """Adam and gradient clipping (``clip_grad_norm`` 0: no clipping)."""

    lr: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    clip_grad_norm: float = 3.0

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        for name in ("weight_decay", "clip_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"optim.{name} must be a finite number >= 0, got {value!r}")


class SectionedConfig:
    """Base of a frozen dataclass whose fields are configuration sections (dataclasses).

    Subclasses list their sections in ``SECTIONS`` (name -> dataclass); this class gives
    them JSON round trips, and :func:`apply_overrides` works on any of them.
    """

    SECTIONS: ClassVar[Dict[str, type]] = {}

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        """Plain JSON-ready values (tuples become lists)."""
        return {name: plain_fields(getattr(self, name)) for name in self.SECTIONS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Mapping[str, Any]]):
        """Inverse of :meth:`to_dict`; missing sections and fields take their defaults."""
        unknown = sorted(set(values) - set(cls.SECTIONS))
        if unknown:
            raise ValueError(
                f"unknown config section(s) {unknown}; expected {sorted(cls.SECTIONS)}")
        return cls(**{name: from_fields(kind, values.get(name, {}), f"config section {name!r}")
                      for name, kind in cls.SECTIONS.items()})

    def replace(self, **sections):
        return dataclasses.replace(self, **sections)


def _optional_inner(annotation: Any) -> Tuple[bool, Any]:
    """Whether a field's type admits ``None``, and its type without ``None``."""
    if typing.get_origin(annotation) is typing.Union:
        others = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(others) < len(typing.get_args(annotation)), \
            others[0] if len(others) == 1 else None
    return annotation is type(None), annotation


def parse_value(text: str, current: Any, where: str, annotation: Any = None) -> Any:
    """``text`` as the type of the field (its annotation when given, else its current value).

    ``none`` / ``null`` clear only a field whose type admits ``None``; an optional field
    holding ``None`` takes the value as its declared type (a path stays a string).
    """
    lowered = text.strip().lower()
    optional, inner = _optional_inner(annotation) if annotation is not None else (True, None)
    if lowered in ("none", "null"):
        if not optional:
            raise ValueError(f"{where}: this field cannot be none")
        return None
    if current is None and inner in (str, int, float, bool):
        return parse_value(text, inner() if inner is not str else "", where)
    if isinstance(current, bool):
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where} expects true or false, got {text!r}")
    if isinstance(current, tuple):
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        element = current[0] if current else 0
        return tuple(parse_value(p, element, where) for p in parts)
    if isinstance(current, int) and "," in text:
        # A field that also takes one int per item (model.layers_per_block=2,1,1,2).
        return tuple(parse_value(p, current, where) for p in text.split(",") if p.strip())
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{where} expects an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{where} expects a number, got {text!r}") from None
    if current is None:
        # Optional fields (paths, resume) are strings; numbers stay numbers.
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def apply_overrides(config: SectionedConfig, overrides: Iterable[str]) -> SectionedConfig:
    """Apply ``"section.field=value"`` strings in order; values take the field's type.

    Tuples are comma-separated (``model.hidden_channels=32,48``); ``none`` clears an
    optional field.

    Raises
    ------
    ValueError
        Naming the override that does not parse, an unknown section or field, or a value the
        section rejects.
    """
    values = config.to_dict()
    for override in overrides:
        key, sep, text = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"override {override!r} must look like section.field=value, "
                             f"e.g. optim.lr=1e-4")
        if section not in config.SECTIONS:
            raise ValueError(f"override {override!r}: unknown section {section!r}; expected "
                             f"one of {sorted(config.SECTIONS)}")
        current_section = getattr(config, section)
        if name not in values[section]:
            raise ValueError(f"override {override!r}: {section} has no field {name!r}; "
                             f"fields: {sorted(values[section])}")
        current = getattr(current_section, name)
        try:
            annotation = typing.get_type_hints(type(current_section)).get(name)
        except Exception:  # an annotation that does not resolve: go by the value
            annotation = None
        values[section][name] = parse_value(text, current, f"override {override!r}",
                                            annotation)
    try:
        return type(config).from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid configuration after overrides: {error}") from None
