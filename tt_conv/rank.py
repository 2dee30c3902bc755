"""Rank selection for factorized convolutions.

All functions work on the kernel of *one group*, ``(out_channels // groups,
in_channels // groups, *kernel_size)``, which is what each factorization decomposes.

Rank conventions, by factorization:

* ``"cp"``: ``(R,)``, the number of rank-one terms.
* ``"tucker"``: ``(r_out, r_in)`` for the Tucker-2 form (channel modes factorized, spatial
  modes kept), or ``(r_out, r_in, s_1, ..., s_d)`` for a full Tucker decomposition.
* ``"tt"``: the ``d + 1`` inner tensor-train ranks over the modes
  ``(in, k_1, ..., k_d, out)``; the boundary ranks are always 1.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

FACTORIZATIONS = ("cp", "tucker", "tt")

RankArg = Union[int, float, Sequence[int]]


def check_factorization(factorization: str) -> str:
    """Return ``factorization`` lower-cased, or raise naming the accepted values."""
    if not isinstance(factorization, str) or factorization.lower() not in FACTORIZATIONS:
        raise ValueError(
            f"factorization must be one of {', '.join(map(repr, FACTORIZATIONS))}, "
            f"got {factorization!r}"
        )
    return factorization.lower()


# --------------------------------------------------------------------------- limits


def max_cp_rank(dims: Sequence[int]) -> int:
    """Largest useful CP rank: the product of all dimensions but the largest.

    At that rank every tensor of shape ``dims`` has an exact CP decomposition (one term per
    fibre along the largest mode), so a larger rank never helps.
    """
    return math.prod(dims) // max(dims)


def clip_tucker_rank(dims: Sequence[int], rank: Sequence[int]) -> Tuple[int, ...]:
    """Clip Tucker ranks to what the kernel allows.

    ``rank`` covers the first ``len(rank)`` modes of ``dims`` (2 for Tucker-2); the other
    modes are kept whole. Each rank is at most its dimension and at most the product of the
    other modes' ranks (beyond that the core's unfolding cannot have that rank).
    """
    full = list(rank) + list(dims[len(rank):])
    full = [max(1, min(r, n)) for r, n in zip(full, dims)]
    changed = True
    while changed:
        changed = False
        for i in range(len(full)):
            others = math.prod(full[:i] + full[i + 1:])
            if full[i] > others:
                full[i] = others
                changed = True
    return tuple(full[: len(rank)])


def clip_tt_rank(dims: Sequence[int], rank: Sequence[int]) -> Tuple[int, ...]:
    """Clip the inner TT ranks over modes ``dims`` to what TT-SVD can produce.

    ``r_j <= r_{j-1} * n_{j-1}`` and ``r_j <= n_j * r_{j+1}`` (with boundary ranks 1), so the
    ranks a TT-SVD returns are exactly the ranks asked for.
    """
    full = [1] + [max(1, int(r)) for r in rank] + [1]
    for j in range(1, len(full) - 1):
        full[j] = min(full[j], full[j - 1] * dims[j - 1])
    for j in range(len(full) - 2, 0, -1):
        full[j] = min(full[j], dims[j] * full[j + 1])
    return tuple(full[1:-1])


def tt_dims(dims: Sequence[int]) -> Tuple[int, ...]:
    """The TT mode order ``(in, k_1, ..., k_d, out)`` of a group kernel ``(out, in, *k)``."""
    return (dims[1], *dims[2:], dims[0])


# --------------------------------------------------------------------------- sizes


def n_factor_parameters(factorization: str, dims: Sequence[int], rank: Sequence[int]) -> int:
    """Number of parameters of one group's factors (no bias) at the given ranks."""
    factorization = check_factorization(factorization)
    if factorization == "cp":
        (r,) = rank
        return r * sum(dims)
    if factorization == "tucker":
        spatial = list(dims[2:])
        core_shape = list(rank) + spatial[len(rank) - 2:]
        factors = sum(n * r for n, r in zip(dims, rank))
        return math.prod(core_shape) + factors
    modes = tt_dims(dims)
    full = [1, *rank, 1]
    return sum(full[j] * modes[j] * full[j + 1] for j in range(len(modes)))


# --------------------------------------------------------------------------- resolution


def _check_rank_value(rank) -> None:
    if isinstance(rank, bool):
        raise TypeError(f"rank must be an int, a tuple of ints or a float in (0, 1], got {rank!r}")
    if isinstance(rank, float):
        if not (0.0 < rank <= 1.0) or math.isnan(rank):
            raise ValueError(
                f"rank as a float is the fraction of the dense kernel's parameters to keep and "
                f"must be in (0, 1], got {rank!r}"
            )
    elif isinstance(rank, int):
        if rank <= 0:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
    else:
        try:
            values = tuple(rank)
        except TypeError:
            raise TypeError(
                f"rank must be an int, a tuple of ints or a float in (0, 1], got {rank!r}"
            ) from None
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"rank as a tuple must hold ints, got {rank!r}")
        if any(v <= 0 for v in values):
            raise ValueError(f"every rank must be positive, got {rank!r}")


def resolve_rank(factorization: str, dims: Sequence[int], rank: RankArg) -> Tuple[int, ...]:
    """Turn a user's ``rank`` into the exact ranks a layer will use.

    Parameters
    ----------
    factorization : {"cp", "tucker", "tt"}
    dims : sequence of int
        One group's kernel shape ``(out, in, *kernel_size)``.
    rank : int, tuple of int or float
        An int or tuple gives explicit ranks, clipped to what the kernel allows (see the
        module docstring for each factorization's convention). A float in ``(0, 1]`` is the
        fraction of the kernel's parameters the factors may use; the largest ranks that fit
        are returned and the budget is never exceeded.

    Returns
    -------
    tuple of int
        The ranks, in the factorization's convention.

    Raises
    ------
    ValueError
        If ``rank`` is not positive, a float outside ``(0, 1]``, a tuple of the wrong
        length, or a budget too small for rank 1.
    """
    factorization = check_factorization(factorization)
    dims = tuple(int(n) for n in dims)
    _check_rank_value(rank)
    if isinstance(rank, float):
        return budget_rank(factorization, dims, rank * math.prod(dims))
    n_spatial = len(dims) - 2
    values = (rank,) if isinstance(rank, int) else tuple(rank)
    if factorization == "cp":
        if len(values) != 1:
            raise ValueError(f"a CP rank is one int, got {rank!r}")
        return (min(values[0], max_cp_rank(dims)),)
    if factorization == "tucker":
        if len(values) == 1:
            values = values * 2
        if len(values) not in (2, 2 + n_spatial):
            raise ValueError(
                f"a Tucker rank is an int, (r_out, r_in) for Tucker-2 or "
                f"{2 + n_spatial} ints for a full Tucker decomposition, got {rank!r}"
            )
        return clip_tucker_rank(dims, values)
    modes = tt_dims(dims)
    if len(values) == 1:
        values = values * (len(modes) - 1)
    elif len(values) == len(modes) + 1 and values[0] == values[-1] == 1:
        values = values[1:-1]
    if len(values) != len(modes) - 1:
        raise ValueError(
            f"a TT rank is an int or the {len(modes) - 1} inner ranks over the modes "
            f"(in, {', '.join('k%d' % (i + 1) for i in range(n_spatial))}, out), got {rank!r}"
        )
    return clip_tt_rank(modes, values)


def _largest_fitting(candidate, budget: float, n_max: int):
    """Largest integer ``t`` in ``[1, n_max]`` with ``candidate(t)[1] <= budget`` (monotone)."""
    lo, hi = 0, n_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if candidate(mid)[1] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def budget_rank(factorization: str, dims: Sequence[int], budget: float) -> Tuple[int, ...]:
    """The largest ranks whose factors hold at most ``budget`` parameters (one group).

    Tucker uses the Tucker-2 form with channel ranks in proportion to the channel counts;
    TT uses one shared inner rank (clipped where the kernel allows less); CP its single
    rank. The result never exceeds the budget.

    Raises
    ------
    ValueError
        If even rank 1 does not fit.
    """
    factorization = check_factorization(factorization)
    dims = tuple(int(n) for n in dims)
    if factorization == "cp":
        cap = max_cp_rank(dims)

        def candidate(t):
            r = (min(t, cap),)
            return r, n_factor_parameters("cp", dims, r)

        n_max = cap
    elif factorization == "tucker":
        cap = clip_tucker_rank(dims, dims[:2])
        n_max = max(cap)

        def candidate(t):
            # Ranks proportional to each mode's own limit, so neither channel mode collapses.
            r = tuple(max(1, min(c, round(t * c / n_max))) for c in cap)
            r = clip_tucker_rank(dims, r)
            return r, n_factor_parameters("tucker", dims, r)

    else:
        modes = tt_dims(dims)
        caps = clip_tt_rank(modes, [math.prod(dims)] * (len(modes) - 1))
        n_max = max(caps)

        def candidate(t):
            r = clip_tt_rank(modes, [t] * (len(modes) - 1))
            return r, n_factor_parameters("tt", dims, r)

    t = _largest_fitting(candidate, budget, n_max)
    if t == 0:
        smallest = candidate(1)
        raise ValueError(
            f"a budget of {budget:.0f} parameters per group is below what rank 1 needs "
            f"({smallest[1]} parameters for a {factorization} factorization of a kernel "
            f"of shape {dims})"
        )
    ranks = candidate(t)[0]
    if factorization == "tucker":
        ranks = _fill_tucker(dims, ranks, budget)
    return ranks


def _fill_tucker(dims, ranks, budget):
    """Raise Tucker-2 ranks one at a time, smaller relative rank first, while they fit."""
    ranks = list(ranks)
    cap = clip_tucker_rank(dims, dims[:2])
    while True:
        order = sorted(range(2), key=lambda i: ranks[i] / cap[i])
        for i in order:
            trial = list(ranks)
            trial[i] += 1
            if (
                trial[i] <= cap[i]
                and clip_tucker_rank(dims, trial) == tuple(trial)
                and n_factor_parameters("tucker", dims, trial) <= budget
            ):
                ranks = trial
                break
        else:
            return tuple(ranks)
