"""The ``rank=`` and ``factorization=`` arguments of :func:`tt_conv.compress`, normalised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ._checks import (
    FACTORIZATIONS,
    check_fraction,
    check_min_rank,
    check_multiple_of,
    check_rank_value,
)

FACTORIZATION_CHOICES = (*FACTORIZATIONS, "auto")
SELECTORS = ("params", "flops", "latency", "evbmf", "energy", "error")
MODIFIERS = ("min_rank", "global", "multiple_of")


@dataclass(frozen=True)
class RankSpec:
    """A normalised ``rank=`` argument of :func:`tt_conv.compress`.

    Attributes
    ----------
    kind : {"explicit", "params", "flops", "latency", "evbmf", "energy", "error"}
    value : int, tuple of int or float
        Explicit ranks, the fraction kept (params, flops, the whole model's measured
        latency), the EVBMF weakening factor, the energy fraction kept, or the relative
        error allowed.
    global_budget : bool
        Spread a total ``params``/``flops`` target over the layers instead of one fraction
        per layer (always true for ``latency``: it is the whole model's).
    min_rank : int
        Lower bound on every data-driven rank.
    multiple_of : int or "auto"
        What a global budget rounds its ranks to (:func:`tt_conv.rank.rounded_ranks`):
        ``"auto"`` (the default) rounds those of FLOP and latency budgets, whose point is
        speed, to multiples of 8 or 16 (:func:`tt_conv.rank.hardware_multiple`) and leaves
        a parameter budget's exact; an int rounds to its multiples (1: never).
    """

    kind: str
    value: Any
    global_budget: bool = False
    min_rank: int = 1
    multiple_of: Any = "auto"

    @property
    def rank_multiple(self):
        """The ``multiple_of`` a global budget's allocation uses: 1 (exact ranks), an int,
        or ``"auto"``."""
        if self.multiple_of == "auto":
            return "auto" if self.kind in ("flops", "latency") else 1
        return self.multiple_of

    @property
    def is_budget(self) -> bool:
        return self.kind in ("params", "flops", "latency")

    @property
    def needs_shapes(self) -> bool:
        """Whether the budget is priced on each layer's input shape (FLOPs, latency)."""
        return self.kind in ("flops", "latency")

    @property
    def metric(self) -> str:
        """What "shrinking" is measured in: FLOPs, measured seconds, else parameters."""
        return self.kind if self.kind in ("flops", "latency") else "params"

    def describe(self) -> str:
        if self.kind == "explicit":
            return f"explicit ranks {self.value}"
        text = {
            "params": f"{self.value:g} of the parameters",
            "flops": f"{self.value:g} of the FLOPs",
            "latency": f"{self.value:g} of the dense model's measured latency",
            "evbmf": f"EVBMF (weakening {self.value:g})",
            "energy": f"{self.value:g} of the spectral energy",
            "error": f"relative error {self.value:g}",
        }[self.kind]
        if self.kind in ("params", "flops") and self.value >= 1:
            # Full-rank factors hold more parameters than the dense kernel: a budget of the
            # dense size still truncates (explicit ranks give full rank).
            text += " (a budget of the dense size, not full rank)"
        if self.global_budget and self.kind != "latency":
            text += " over all selected convolutions (global)"
        if self.min_rank > 1:
            text += f", min rank {self.min_rank}"
        if self.multiple_of != "auto" and self.multiple_of > 1:
            text += f", ranks multiples of {self.multiple_of}"
        return text


def parse_rank(rank) -> RankSpec:
    """Normalise a ``rank=`` argument (see :func:`tt_conv.compress`), or raise naming what is wrong."""
    if isinstance(rank, RankSpec):
        return rank
    if isinstance(rank, bool):
        raise TypeError(f"rank must be a number, a tuple of ints, 'evbmf' or a dict, got {rank!r}")
    if isinstance(rank, float):
        check_fraction(rank, "rank (a fraction of the parameters)")
        return RankSpec("params", rank)
    if isinstance(rank, int):
        if rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        return RankSpec("explicit", rank)
    if isinstance(rank, str):
        if rank.lower() == "evbmf":
            return RankSpec("evbmf", 1.0)
        raise ValueError(
            f"rank as a string must be 'evbmf', got {rank!r}; use a dict such as "
            f"{{'energy': 0.9}} for the other methods"
        )
    if isinstance(rank, Mapping):
        keys = set(rank)
        unknown = keys - set(SELECTORS) - set(MODIFIERS)
        if unknown:
            raise ValueError(
                f"unknown rank key(s) {sorted(unknown)}; expected one of {list(SELECTORS)} "
                f"plus optionally {list(MODIFIERS)}"
            )
        selectors = [k for k in SELECTORS if k in keys]
        if len(selectors) != 1:
            raise ValueError(
                f"rank dict needs exactly one of {list(SELECTORS)}, got {sorted(keys)}"
            )
        kind = selectors[0]
        value = rank[kind]
        min_rank = check_min_rank(rank.get("min_rank", 1))
        global_budget = rank.get("global", False)
        if not isinstance(global_budget, bool):
            raise TypeError(f"rank['global'] must be True or False, got {global_budget!r}")
        if global_budget and kind not in ("params", "flops", "latency"):
            raise ValueError(
                f"rank['global'] applies to 'params', 'flops' and 'latency' targets, not {kind!r}"
            )
        if kind == "latency":
            global_budget = True  # a fraction of the whole model's latency
        multiple_of = check_multiple_of(rank.get("multiple_of", "auto"), "rank['multiple_of']")
        if "multiple_of" in keys and not global_budget:
            raise ValueError(
                "rank['multiple_of'] rounds the ranks of a global budget ('global': True, or "
                f"'latency'); got it with {kind!r} alone")
        if kind == "evbmf":
            value = 1.0 if value is True else value
            check_fraction(value, "rank['evbmf'] (the weakening factor)", allow_zero=True)
        elif kind == "error":
            check_fraction(value, "rank['error']", allow_zero=True)
        else:
            check_fraction(value, f"rank[{kind!r}]")
        return RankSpec(kind, float(value), global_budget, min_rank, multiple_of)
    try:
        values = tuple(rank)
    except TypeError:
        raise TypeError(
            f"rank must be a float, an int, a tuple of ints, 'evbmf' or a dict, got {rank!r}"
        ) from None
    check_rank_value(values)
    return RankSpec("explicit", values)


def check_factorization_choice(factorization, argument="factorization") -> str:
    if not isinstance(factorization, str) or factorization.lower() not in FACTORIZATION_CHOICES:
        raise ValueError(
            f"{argument} must be one of {', '.join(map(repr, FACTORIZATION_CHOICES))}, "
            f"got {factorization!r}"
        )
    return factorization.lower()
