"""Which convolutions :func:`tt_conv.compress` factorizes, with which settings, and which
it must leave dense (and why).

Every convolution of the model gets a :class:`ConvEntry`: its name and module, whether
``include`` / ``exclude`` select it, its factorization and rank rule after ``overrides``,
and its plain equivalent (:func:`tt_conv.equivalent.plain_equivalent`): the module itself
for a plain ``nn.ConvNd``, the convolution a conv subclass or a wrapped conv really
computes, or nothing, with the reason (then the layer stays dense with a warning).
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from .equivalent import is_uninitialized_lazy, plain_equivalent
from .layers.base import conv_geometry
from .profile import is_conv
from .rankspec import RankSpec, check_factorization_choice, parse_rank


@dataclass
class ConvEntry:
    """One convolution of the model, as :func:`select_convolutions` found it.

    Attributes
    ----------
    name : str
    module : nn.Module
        The module in the model.
    selected : bool
        Chosen by ``include`` / ``exclude``.
    factorization : str
        After ``overrides`` ("cp", "tucker", "tt" or "auto").
    spec : RankSpec
        After ``overrides``.
    plain : nn.Module or None
        A plain convolution computing what ``module`` computes (for selected layers).
    baked : str
        What ``plain`` fixed that the module computes in its forward.
    dense_reason : str
        Why the layer stays dense whatever the budget (empty if it may be factorized).
    """

    name: str
    module: nn.Module
    selected: bool
    factorization: str
    spec: RankSpec
    plain: Optional[nn.Module] = None
    baked: str = ""
    dense_reason: str = ""

    @property
    def to_factorize(self) -> bool:
        return self.selected and self.plain is not None and not self.dense_reason


def matches(name: str, pattern: str) -> bool:
    """Glob match on the module name, or ``pattern`` names a parent module of it."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".")


def as_patterns(value, argument: str) -> List[str]:
    """``include`` / ``exclude`` as a list of patterns, or raise naming the argument."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        patterns = list(value)
    except TypeError:
        raise TypeError(f"{argument} must be a pattern or a list of patterns, got {value!r}") from None
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{argument} must hold strings (module-name patterns), got {value!r}")
    return patterns


def check_overrides(overrides) -> Dict[str, Dict[str, Any]]:
    """``overrides`` checked: ``{pattern: {"factorization": ..., "rank": ...}}``."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"overrides must map module-name patterns to dicts of 'factorization'/'rank', "
            f"got {type(overrides).__name__}"
        )
    checked = {}
    for pattern, override in overrides.items():
        if not isinstance(pattern, str) or not isinstance(override, Mapping):
            raise TypeError(
                f"overrides must map module-name patterns to dicts, got {pattern!r}: {override!r}"
            )
        unknown = set(override) - {"factorization", "rank"}
        if unknown:
            raise ValueError(
                f"overrides[{pattern!r}] has unknown key(s) {sorted(unknown)}; expected "
                f"'factorization' and/or 'rank'"
            )
        if "factorization" in override:
            check_factorization_choice(override["factorization"], f"overrides[{pattern!r}]")
        if "rank" in override:
            parse_rank(override["rank"])
        checked[pattern] = dict(override)
    return checked


def _warn_unmatched(patterns: Sequence[str], names: Sequence[str], argument: str) -> None:
    examples = ", ".join(repr(n) for n in names[:3])
    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            warnings.warn(
                f"{argument} pattern {pattern!r} matches no convolution (the model's "
                f"convolutions are named like {examples})",
                UserWarning,
                stacklevel=4,
            )


def all_convolutions(model: nn.Module) -> List[tuple]:
    """``(name, module)`` of every convolution, uninitialised lazy ones included, in order
    (the modules inside a factorized layer are not listed)."""
    found, skip = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        lazy = is_uninitialized_lazy(module) and isinstance(module, nn.modules.conv._ConvNd) \
            and not isinstance(module, nn.modules.conv._ConvTransposeNd)
        if is_conv(module) or lazy:
            found.append((name, module))
            skip.append(name + ".")
    return found


def select_convolutions(model: nn.Module, factorization: str, spec: RankSpec, *,
                        include=None, exclude=None,
                        overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
                        ) -> List[ConvEntry]:
    """A :class:`ConvEntry` for every convolution of ``model`` (see the module docstring).

    Selected layers without a plain equivalent are warned about, naming the layer, its
    class and the reason.

    Raises
    ------
    ValueError
        For a model with no convolution, patterns selecting none, or NaN / inf weights in
        a selected layer (naming it).
    """
    overrides = overrides or {}
    convs = all_convolutions(model)
    if not convs:
        raise ValueError(
            f"model ({type(model).__name__}) has no nn.Conv1d, nn.Conv2d or nn.Conv3d layer to "
            f"compress"
        )
    names = [name for name, _ in convs]
    include_patterns = as_patterns(include, "include")
    exclude_patterns = as_patterns(exclude, "exclude")
    _warn_unmatched(include_patterns, names, "include")
    _warn_unmatched(exclude_patterns, names, "exclude")
    _warn_unmatched(list(overrides), names, "overrides")
    entries = []
    for name, module in convs:
        selected = ((not include_patterns or any(matches(name, p) for p in include_patterns))
                    and not any(matches(name, p) for p in exclude_patterns))
        layer_factorization, layer_spec = factorization, spec
        for pattern, override in overrides.items():
            if matches(name, pattern):
                layer_factorization = override.get("factorization", layer_factorization)
                if "rank" in override:
                    layer_spec = parse_rank(override["rank"])
        entries.append(ConvEntry(name, module, selected,
                                 check_factorization_choice(layer_factorization), layer_spec))
    if not any(e.selected for e in entries):
        raise ValueError(
            f"include={include_patterns} and exclude={exclude_patterns} leave none of the "
            f"model's {len(convs)} convolutions to compress"
        )
    for entry in entries:
        if not entry.selected:
            entry.dense_reason = "not selected (include/exclude)"
            continue
        if not is_uninitialized_lazy(entry.module):
            _, kernel, bias = conv_geometry(entry.module)
            for what, tensor in (("weight", kernel), ("bias", bias)):
                if tensor is not None and not torch.isfinite(tensor).all():
                    raise ValueError(
                        f"layer {entry.name!r} has NaN or inf values in its {what}; cannot "
                        f"compress it"
                    )
        equivalent = plain_equivalent(entry.module)
        entry.plain, entry.baked = equivalent.conv, equivalent.baked
        if equivalent.conv is None:
            entry.dense_reason = f"left dense: {equivalent.reason}"
            warnings.warn(f"layer {entry.name!r} ({type(entry.module).__name__}) is left dense: "
                          f"{equivalent.reason}", UserWarning, stacklevel=3)
    return entries
