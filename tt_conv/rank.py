"""Rank selection for factorized convolutions.

All functions work on the kernel of *one group*, ``(out_channels // groups,
in_channels // groups, *kernel_size)``, which is what each factorization decomposes.

Rank conventions, by factorization:

* ``"cp"``: ``(R,)``, the number of rank-one terms.
* ``"tucker"``: ``(r_out, r_in)`` for the Tucker-2 form (channel modes factorized, spatial
  modes kept), or ``(r_out, r_in, s_1, ..., s_d)`` for a full Tucker decomposition.
* ``"tt"``: the ``d + 1`` inner tensor-train ranks over the modes
  ``(in, k_1, ..., k_d, out)``; the boundary ranks are always 1.

Ways to choose ranks:

* budgets: :func:`budget_rank` (parameters of one group, exact integer search, never over
  budget); what needs a convolution's geometry (a fraction of its parameters or FLOPs,
  whole-network budgets) is in :mod:`tt_conv.budget`;
* EVBMF: :func:`evbmf` on a matrix (analytic global solution, exact threshold, noise
  variance by bounded minimisation), :func:`evbmf_rank` on a kernel's unfoldings, with
  MUSCO-style :func:`weakened_rank` and a minimum rank;
* spectra: :func:`energy_rank` (keep a fraction of each unfolding's energy),
  :func:`error_rank` (a relative error, guaranteed for Tucker and TT) and
  :func:`tt_svd_rank` (the adaptive TT-SVD's ranks).

Every data-driven rank is clipped to what the kernel allows (a single input channel gives
``r_in = 1``, a 1x1 kernel caps the TT's spatial bonds, a minimum rank above a dimension
becomes that dimension), so the result can always be used as it is.
:func:`rounded_ranks` rounds ranks to the channel multiples convolution kernels run fastest
(global FLOP and latency budgets do so by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from ._checks import (
    FACTORIZATIONS,
    check_factorization,
    check_finite,
    check_fraction,
    check_min_rank,
    check_multiple_of,
    check_rank_value,
)

RankArg = Union[int, float, Sequence[int]]


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
    check_rank_value(rank)
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

    def cost(ranks):
        return n_factor_parameters(factorization, dims, ranks)

    return ranks_within(factorization, dims, cost, budget,
                        budget_text=f"budget of {budget:.0f} parameters per group",
                        unit="parameters", subject=f"a kernel of shape {dims}")


# =========================================================================== data-driven ranks
#
# Everything below chooses ranks from a trained kernel, passed as a convolution's
# ``weight``, ``(out, in // groups, *k)``,
# with ``groups``; every group must use the same ranks, so the largest per-group rank wins.



# --------------------------------------------------------------------------- unfoldings


def group_kernels(weight, groups: int = 1):
    """The per-group kernels of a conv ``weight``: ``(groups, out // groups, in // groups, *k)``.

    Raises
    ------
    ValueError
        If ``weight`` is not at least 3-D or ``groups`` does not divide ``out``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() < 3:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(
            f"weight must be a conv kernel (out, in // groups, *kernel_size), got {shape}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups:
        raise ValueError(
            f"groups={groups} does not divide the {weight.shape[0]} output channels of weight"
        )
    check_finite(weight, "weight")
    return weight.detach().double().reshape(groups, weight.shape[0] // groups, *weight.shape[1:])


def unfolding_modes(factorization: str, n_modes: int) -> List[Tuple[int, ...]]:
    """Which modes index the rows of each unfolding a factorization's ranks live on.

    For a group kernel ``(out, in, k_1, ..., k_d)`` (``n_modes = d + 2``):

    * ``"tucker"``: ``(0,)`` and ``(1,)``, the channel unfoldings of the Tucker-2 form;
    * ``"cp"``: every single mode, since a CP rank is at least each unfolding's rank;
    * ``"tt"``: the sequential unfoldings of the TT order ``(in, k_1, ..., k_d, out)``, i.e.
      rows ``(1,)``, ``(1, 2)``, ..., ``(1, 2, ..., d + 1)``; the ``j``-th one's rank is the
      ``j``-th inner TT rank.
    """
    factorization = check_factorization(factorization)
    if factorization == "tucker":
        return [(0,), (1,)]
    if factorization == "cp":
        return [(m,) for m in range(n_modes)]
    return [tuple(range(1, j + 2)) for j in range(n_modes - 1)]


def unfold(tensor, rows: Sequence[int]):
    """The matrix whose rows run over the modes ``rows`` (C order) and columns over the rest."""
    rows = tuple(rows)
    cols = tuple(m for m in range(tensor.dim()) if m not in rows)
    n_rows = math.prod(tensor.shape[m] for m in rows)
    return tensor.permute(*rows, *cols).reshape(n_rows, -1)


def singular_values(matrix) -> np.ndarray:
    """Descending singular values of a matrix (float64), from its smaller Gram matrix.

    An eigenvalue problem of the smaller Gram matrix is several times cheaper than an SVD
    of a long unfolding; values below about ``1e-8`` of the largest lose relative accuracy,
    far below what rank selection looks at.
    """
    a = matrix.detach().double()
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    values = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()
    return values.cpu().numpy()


def unfolding_spectra(factorization: str, weight, groups: int = 1) -> List[List[np.ndarray]]:
    """Singular values of each relevant unfolding (see :func:`unfolding_modes`), per group.

    Returns
    -------
    list of list of numpy.ndarray
        ``spectra[g][u]``: the descending singular values (float64) of unfolding ``u`` of
        group ``g``'s kernel.
    """
    kernels = group_kernels(weight, groups)
    modes = unfolding_modes(factorization, kernels.dim() - 1)
    return [
        [singular_values(unfold(kernel, rows)) for rows in modes]
        for kernel in kernels
    ]


def _combine(factorization: str, dims: Sequence[int], per_unfolding: Sequence[int]) -> Tuple[int, ...]:
    """Turn one rank per relevant unfolding into the factorization's (clipped) ranks."""
    per_unfolding = [max(1, int(r)) for r in per_unfolding]
    if factorization == "tucker":
        return clip_tucker_rank(dims, per_unfolding)
    if factorization == "cp":
        return (min(max(per_unfolding), max_cp_rank(dims)),)
    return clip_tt_rank(tt_dims(dims), per_unfolding)


def ranks_from_spectra(factorization, dims, spectra, rank_of_spectrum) -> Tuple[int, ...]:
    """Apply ``rank_of_spectrum(s, unfolding_index)`` to each unfolding of each group, keep
    the largest rank over groups, and clip to what the kernel allows."""
    n_unfoldings = len(spectra[0])
    per_unfolding = [
        max(rank_of_spectrum(group[u], u) for group in spectra) for u in range(n_unfoldings)
    ]
    return _combine(factorization, dims, per_unfolding)


def hardware_multiple(rank: int) -> int:
    """The multiple ``multiple_of="auto"`` rounds a rank to: 1 (as is) below 12, 8 from 12
    and 16 from 40, so a rank moves by at most a third and by at most a fifth from 20 on.

    Convolution kernels block channels by 8 or 16 (AVX2 and AVX-512 vectors, oneDNN's
    blocked layouts, AMX tiles, tensor cores), so a stage of 66 channels runs the blocks of
    80 with the last one mostly padding (``benchmarks/model_speed.py --exact-ranks-too``
    compares whole models with and without rounding).
    """
    if rank < 12:
        return 1
    return 8 if rank < 40 else 16


def round_rank(rank: int, multiple_of: Union[int, str] = "auto") -> int:
    """``rank`` rounded to the nearest positive multiple of ``multiple_of`` (ties upward),
    or of :func:`hardware_multiple` for ``"auto"``; 1 leaves it as it is."""
    multiple = hardware_multiple(rank) if multiple_of == "auto" else check_multiple_of(multiple_of)
    if multiple <= 1:
        return int(rank)
    return max(multiple, multiple * int(math.floor(rank / multiple + 0.5)))


def next_rounded_rank(rank: int, multiple_of: Union[int, str] = "auto") -> int:
    """The smallest rank above ``rank`` that :func:`round_rank` leaves as it is."""
    candidate = int(rank) + 1
    while round_rank(candidate, multiple_of) != candidate:
        candidate += 1
    return candidate


def rounded_ranks(factorization: str, dims: Sequence[int], ranks: Sequence[int],
                  multiple_of: Union[int, str] = "auto") -> Tuple[int, ...]:
    """Ranks in ``factorization``'s convention each rounded by :func:`round_rank`, then
    clipped to what the kernel allows."""
    return _combine(factorization, dims, [round_rank(r, multiple_of) for r in ranks])


def group_dims(weight, groups: int) -> Tuple[int, ...]:
    return (weight.shape[0] // groups, *weight.shape[1:])


# --------------------------------------------------------------------------- energy and error


def tail_rank(singular_values, tail: float) -> int:
    """Smallest ``r`` whose discarded energy ``sum_{i >= r} s_i^2`` is at most ``tail``.

    ``singular_values`` are descending; ``tail`` is an absolute squared norm. Returns at
    least 0 (0 when the whole spectrum fits in ``tail``).
    """
    s2 = np.asarray(singular_values, dtype=np.float64) ** 2
    # discarded[r] = energy beyond the first r values, r = 0..n
    discarded = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])
    # A hair of slack so that a request met exactly in exact arithmetic is met in floats.
    slack = 1e-12 * discarded[0]
    return int(np.argmax(discarded <= tail + slack))


def energy_rank(
    factorization: str, weight, energy: float, *, groups: int = 1, min_rank: int = 1
) -> Tuple[int, ...]:
    """The smallest ranks keeping a fraction ``energy`` of the spectral energy on each unfolding.

    Parameters
    ----------
    factorization : {"cp", "tucker", "tt"}
    weight : torch.Tensor
        A conv kernel ``(out, in // groups, *kernel_size)``.
    energy : float in (0, 1]
        Fraction of ``sum(s_i^2)`` each relevant unfolding (:func:`unfolding_modes`) keeps.
    groups : int
    min_rank : int
        Lower bound on every rank (then clipped to what the kernel allows).

    Returns
    -------
    tuple of int
        Ranks in the factorization's convention, clipped (a rank never exceeds what a mode
        allows, e.g. ``r_in = 1`` for a single input channel).
    """
    factorization = check_factorization(factorization)
    check_fraction(energy, "energy")
    min_rank = check_min_rank(min_rank)
    spectra = unfolding_spectra(factorization, weight, groups)

    def rank(s, _):
        total = float(np.sum(s.astype(np.float64) ** 2))
        return max(min_rank, tail_rank(s, (1.0 - energy) * total))

    return ranks_from_spectra(factorization, group_dims(weight, groups), spectra, rank)


def error_rank_from_spectra(
    factorization: str, dims: Sequence[int], spectra, error: float, *, min_rank: int = 1
) -> Tuple[int, ...]:
    """Ranks at relative error ``error``, from precomputed :func:`unfolding_spectra`.

    The squared error budget ``error^2 ||W||^2`` is split evenly over the relevant
    unfoldings. For Tucker (HOSVD bound) and TT (Oseledets' TT-SVD bound) the decomposition
    at these ranks is then guaranteed to be within ``error``; for CP the rank is the
    largest unfolding rank at that error, a lower bound of the CP rank such an error needs.
    """
    factorization = check_factorization(factorization)
    n = len(spectra[0])
    share = 1.0 if factorization == "cp" else 1.0 / n

    def rank(s, _):
        total = float(np.sum(s.astype(np.float64) ** 2))
        return max(min_rank, tail_rank(s, share * error**2 * total))

    return ranks_from_spectra(factorization, dims, spectra, rank)


def error_rank(
    factorization: str, weight, error: float, *, groups: int = 1, min_rank: int = 1
) -> Tuple[int, ...]:
    """The smallest ranks whose truncation keeps the relative kernel error within ``error``.

    See :func:`error_rank_from_spectra` for the guarantee per factorization; for TT,
    :func:`tt_svd_rank` gives the (often smaller) ranks of the adaptive TT-SVD.
    """
    check_fraction(error, "error", allow_zero=True, allow_one=True)
    min_rank = check_min_rank(min_rank)
    spectra = unfolding_spectra(factorization, weight, groups)
    return error_rank_from_spectra(
        factorization, group_dims(weight, groups), spectra, error, min_rank=min_rank
    )


def tt_svd_rank(weight, error: float, *, groups: int = 1, min_rank: int = 1) -> Tuple[int, ...]:
    """Inner TT ranks of the TT-SVD (Oseledets 2011) to a relative error.

    The kernel is ordered ``(in, k_1, ..., k_d, out)``; each of the ``d + 1`` sequential SVDs
    of the remainder discards at most ``delta = error ||W|| / sqrt(d + 1)`` in norm, so the
    tensor train at these ranks (as :func:`tt_conv.decompose.tensor_train_cores` computes it)
    is within ``error`` of the kernel.
    """
    check_fraction(error, "error", allow_zero=True, allow_one=True)
    min_rank = check_min_rank(min_rank)
    kernels = group_kernels(weight, groups)
    dims = tuple(kernels.shape[1:])
    modes = tt_dims(dims)
    n_cuts = len(modes) - 1
    per_group = []
    for kernel in kernels:
        tensor = kernel.permute(*range(1, kernel.dim()), 0)
        delta2 = error**2 * float(torch.sum(tensor**2)) / n_cuts
        ranks, rest, r_prev = [], tensor.reshape(-1), 1
        for j in range(n_cuts):
            matrix = rest.reshape(r_prev * modes[j], -1)
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            r = max(1, tail_rank(s.cpu().numpy(), delta2))
            ranks.append(r)
            rest = s[:r, None] * vh[:r]
            r_prev = r
        per_group.append(ranks)
    chosen = [max(max(g[j] for g in per_group), min_rank) for j in range(n_cuts)]
    return clip_tt_rank(modes, chosen)


# --------------------------------------------------------------------------- EVBMF


def _evb_gap(tau: float, alpha: float) -> float:
    """``2 (F_signal - F_null) / M`` for one component at ``tau = z / M`` (see :func:`evbmf`)."""
    return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau


def evb_tau(alpha: float) -> float:
    """The root ``tau_bar > 0`` of ``log(1 + t) + alpha log(1 + t / alpha) - t = 0``.

    It sets the EVBMF threshold ``gamma_bar = sigma sqrt(M (1 + tau_bar)(1 + alpha /
    tau_bar))`` (see :func:`evbmf`). For ``alpha = 1`` it is 2.5129...; for thinner
    matrices it exceeds ``2.5129 sqrt(alpha)``, the shortcut some implementations use, by
    a growing margin (1 % at ``alpha = 0.3``, 12 % at ``alpha = 0.01``).
    """
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha = L / M must be in (0, 1], got {alpha!r}")
    # The gap rises from 0 at t = 0, peaks, then falls without bound: one positive root,
    # and it lies past the peak, which is at t = sqrt(alpha).
    lo = math.sqrt(alpha)
    hi = 2.0 * lo
    while _evb_gap(hi, alpha) > 0.0:
        hi *= 2.0
    return brentq(_evb_gap, lo, hi, args=(alpha,), xtol=1e-15, rtol=4 * np.finfo(float).eps)


def _evb_component_terms(gamma2_scaled: np.ndarray, L: int, M: int) -> np.ndarray:
    """``z`` of each component from ``g = gamma^2 / sigma^2`` (larger root, g large enough)."""
    b = gamma2_scaled - (L + M)
    disc = np.maximum(b * b - 4.0 * L * M, 0.0)
    return 0.5 * (b + np.sqrt(disc))


def evb_free_energy(
    singular_values, shape: Tuple[int, int], noise_variance, max_rank: Optional[int] = None
):
    """Twice the EVB free energy (up to a constant) at noise variance ``sigma^2``.

    ``2F = L M log(sigma^2) + sum_h gamma_h^2 / sigma^2 + sum_{retained h} (M log(1 + z_h / M)
    + L log(1 + z_h / L) - z_h)``, where component ``h`` is retained when ``gamma_h`` is above
    the EVB threshold and ``h <= max_rank``, and ``z_h = gamma_h hat(gamma)_h / sigma^2``.
    ``noise_variance`` may be an array (one value per entry).
    """
    L, M = sorted(shape)
    s = np.asarray(singular_values, dtype=np.float64)
    H = L if max_rank is None else min(max_rank, L)
    alpha = L / M
    tau = evb_tau(alpha)
    return _evb_free_energy(s, L, M, H, (1 + tau) * (1 + alpha / tau), noise_variance)


def _evb_free_energy(s, L, M, H, x_bar, noise_variance):
    variance = np.asarray(noise_variance, dtype=np.float64)
    g = s[:H] ** 2 / variance[..., None]
    retained = g > M * x_bar
    z = _evb_component_terms(np.where(retained, g, 2.0 * (L + M) + 4.0 * math.sqrt(L * M)), L, M)
    signal = np.where(retained, M * np.log1p(z / M) + L * np.log1p(z / L) - z, 0.0).sum(-1)
    energy = L * M * np.log(variance) + np.sum(s**2) / variance + signal
    return float(energy) if energy.ndim == 0 else energy


@dataclass(frozen=True)
class EVBMFResult:
    """What :func:`evbmf` found for one matrix.

    Attributes
    ----------
    rank : int
        Number of components above the threshold.
    noise_variance : float
        The noise variance used (estimated unless given).
    threshold : float
        Singular values above it are kept: ``sqrt(M sigma^2 (1 + tau)(1 + alpha / tau))``.
    singular_values : numpy.ndarray
        The matrix's singular values, descending.
    estimates : numpy.ndarray
        The EVB estimates of the kept singular values (shrunk), length ``rank``.
    """

    rank: int
    noise_variance: float
    threshold: float
    singular_values: np.ndarray = field(repr=False)
    estimates: np.ndarray = field(repr=False)


def evbmf_from_singular_values(
    singular_values,
    shape: Tuple[int, int],
    *,
    noise_variance: Optional[float] = None,
    max_rank: Optional[int] = None,
) -> EVBMFResult:
    """EVBMF (:func:`evbmf`) from a matrix's singular values and shape."""
    L, M = sorted(int(n) for n in shape)
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    if s.shape != (L,):
        raise ValueError(f"expected {L} singular values for a {shape} matrix, got {s.shape[0]}")
    H = L if max_rank is None else max(0, min(int(max_rank), L))
    alpha = L / M
    tau = evb_tau(alpha)
    x_bar = (1 + tau) * (1 + alpha / tau)
    total = float(np.sum(s**2))
    if total == 0.0 or H == 0:
        return EVBMFResult(0, noise_variance or 0.0, 0.0, s, s[:0])

    if noise_variance is None:
        # The optimum sigma^2 equals E||V - B A^T||^2 / (L M): at most ||V||^2 / (L M), and at
        # least the energy of the components EVB cannot retain. No more than
        # eta = ceil(L / (1 + alpha)) - 1 components are ever retained (each retained one
        # costs (L + M) sigma^2 of residual), and a component beyond eta lies below the
        # threshold unless the rank limit, not the threshold, excluded it.
        upper = total / (L * M)
        eta = min(H, math.ceil(L / (1 + alpha)) - 1)
        lower = float(np.sum(s[eta:] ** 2)) / (L * M)
        if eta < H:
            lower = max(lower, s[eta] ** 2 / (M * x_bar))
        # Exactly low-rank matrices have no residual: let sigma^2 go very small instead.
        lower = max(lower, upper * 1e-14)
        if upper <= lower * (1 + 1e-12):
            noise_variance = upper
        else:
            # 2F(sigma^2) has kinks where components cross the threshold and may have several
            # local minima: locate the best one on a log grid, then refine it by bounded Brent.
            def objective(log_var):
                return _evb_free_energy(s, L, M, H, x_bar, math.exp(log_var))

            grid = np.linspace(math.log(lower), math.log(upper), 256)
            values = _evb_free_energy(s, L, M, H, x_bar, np.exp(grid))
            best = int(np.argmin(values))
            a = grid[max(best - 1, 0)]
            b = grid[min(best + 1, len(grid) - 1)]
            result = minimize_scalar(objective, bounds=(a, b), method="bounded",
                                     options={"xatol": 1e-10})
            log_var = result.x if result.fun <= values[best] else grid[best]
            noise_variance = math.exp(log_var)
    elif not (noise_variance > 0):
        raise ValueError(f"noise_variance must be positive, got {noise_variance!r}")

    threshold = math.sqrt(M * noise_variance * x_bar)
    rank = int(np.sum(s[:H] > threshold))
    g = s[:rank] ** 2 / noise_variance
    z = _evb_component_terms(g, L, M)
    estimates = z * noise_variance / np.maximum(s[:rank], np.finfo(float).tiny)
    return EVBMFResult(rank, float(noise_variance), threshold, s, estimates)


def evbmf(matrix, *, noise_variance: Optional[float] = None,
          max_rank: Optional[int] = None) -> EVBMFResult:
    """Empirical variational Bayesian matrix factorization (Nakajima et al., JMLR 2013).

    The model ``V = B A^T + E`` (``L x M``, ``L <= M`` after transposing), Gaussian noise of
    variance ``sigma^2``, Gaussian priors on the columns of ``A`` and ``B`` whose variances
    are estimated (empirical Bayes). Its VB solution is the SVD of ``V`` with each singular
    value ``gamma_h`` either discarded or shrunk, analytically:

    * with ``z`` the larger root of ``z^2 - (gamma^2 / sigma^2 - L - M) z + L M = 0``, the
      shrunk value is ``z sigma^2 / gamma`` and, relative to discarding the component, twice
      the free energy changes by ``M log(1 + z / M) + L log(1 + z / L) - z``;
    * that is negative exactly when ``tau = z / M`` exceeds the root ``tau_bar`` of
      ``log(1 + t) + alpha log(1 + t / alpha) - t`` (``alpha = L / M``; :func:`evb_tau`),
      i.e. when ``gamma > sigma sqrt(M (1 + tau_bar)(1 + alpha / tau_bar))``.

    The threshold uses the exact root (not the ``2.5129 sqrt(alpha)`` upper bound). Unless
    given, the noise variance minimises the free energy (:func:`evb_free_energy`) over the
    interval where its minimiser must lie, by a grid search refined with
    :func:`scipy.optimize.minimize_scalar` (bounded).

    Parameters
    ----------
    matrix : torch.Tensor or numpy.ndarray
        2-D.
    noise_variance : float, optional
        Known noise variance; estimated when omitted.
    max_rank : int, optional
        Number of components of the model (default: all).

    Returns
    -------
    EVBMFResult
    """
    if isinstance(matrix, np.ndarray):
        matrix = torch.from_numpy(matrix)
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got {getattr(matrix, 'shape', type(matrix))}")
    check_finite(matrix, "matrix")
    s = singular_values(matrix)
    return evbmf_from_singular_values(
        s, tuple(matrix.shape), noise_variance=noise_variance, max_rank=max_rank
    )


def weakened_rank(full_rank: int, evbmf_rank: int, weakening: float = 1.0, min_rank: int = 1) -> int:
    """MUSCO-style weakening: ``r_full - w (r_full - r_evbmf)``, rounded up, at least ``min_rank``.

    ``weakening = 1`` keeps the EVBMF rank, ``0`` the full rank; the result never exceeds
    ``full_rank``.
    """
    check_fraction(weakening, "weakening", allow_zero=True)
    check_min_rank(min_rank)
    rank = math.ceil(full_rank - weakening * (full_rank - evbmf_rank) - 1e-9)
    return min(full_rank, max(rank, min_rank))


def evbmf_rank(
    factorization: str,
    weight,
    *,
    groups: int = 1,
    weakening: float = 1.0,
    min_rank: int = 1,
    spectra=None,
    match_tucker: bool = False,
) -> Tuple[int, ...]:
    """Ranks from EVBMF on the kernel's unfoldings (:func:`unfolding_modes`).

    Each relevant unfolding of each group's kernel gets its EVBMF rank (:func:`evbmf`),
    weakened by :func:`weakened_rank`; the largest over groups is kept and the ranks are
    clipped to what the kernel allows. For CP the rank is the largest unfolding rank (a CP
    decomposition needs at least that many terms).

    That lower bound is exact for a kernel that truly is a sum of few rank-one terms, but a
    trained kernel is not: its CP rank at a given error is far above every unfolding's rank,
    and the bound keeps a much smaller share of the parameters than the Tucker and TT ranks
    do (4 % against 30 % on a pretrained pitch network, where it cost the accuracy). With
    ``match_tucker=True`` (what :func:`tt_conv.compress` uses) the CP rank is raised to the
    largest one with no more parameters than the Tucker-2 EVBMF ranks of the same kernel,
    so that ``rank="evbmf"`` keeps about the same share whatever the factorization.

    Parameters
    ----------
    factorization : {"cp", "tucker", "tt"}
    weight : torch.Tensor
        A conv kernel ``(out, in // groups, *kernel_size)``.
    groups : int
    weakening : float in [0, 1]
        ``1`` is plain EVBMF; smaller values keep more of each unfolding's full rank.
    min_rank : int
        Lower bound on every rank (clipped to what the kernel allows).
    spectra : optional
        Precomputed :func:`unfolding_spectra` of ``weight``.
    match_tucker : bool
        For CP only: at least the parameters of the Tucker-2 EVBMF ranks (see above).
    """
    factorization = check_factorization(factorization)
    check_fraction(weakening, "weakening", allow_zero=True)
    min_rank = check_min_rank(min_rank)
    kernels_shape = group_dims(weight, groups)
    if spectra is None:
        spectra = unfolding_spectra(factorization, weight, groups)
    modes = unfolding_modes(factorization, len(kernels_shape))

    def rank(s, u):
        rows = math.prod(kernels_shape[m] for m in modes[u])
        shape = (rows, math.prod(kernels_shape) // rows)
        found = evbmf_from_singular_values(s, shape).rank
        return weakened_rank(min(shape), found, weakening, min_rank)

    ranks = ranks_from_spectra(factorization, kernels_shape, spectra, rank)
    if factorization == "cp" and match_tucker:
        # CP's unfoldings start with Tucker-2's two channel unfoldings.
        tucker = ranks_from_spectra("tucker", kernels_shape, [g[:2] for g in spectra], rank)
        budget = n_factor_parameters("tucker", kernels_shape, tucker)
        matched = search_ranks("cp", kernels_shape,
                               lambda r: n_factor_parameters("cp", kernels_shape, r), budget)
        if matched is not None:
            ranks = (max(ranks[0], matched[0]),)
    return ranks


# --------------------------------------------------------------------------- layer budgets


def ranks_within(factorization: str, dims: Tuple[int, ...], cost, budget: float, *,
                 budget_text: str, unit: str, subject: str):
    """:func:`search_ranks`, raising where even rank 1 costs more than ``budget``.

    The message reads "a {budget_text} is below what rank 1 needs ({cost} {unit} for a
    {factorization} factorization of {subject})".
    """
    ranks = search_ranks(factorization, dims, cost, budget)
    if ranks is None:
        smallest = cost(resolve_rank(factorization, dims, 1))
        raise ValueError(f"a {budget_text} is below what rank 1 needs ({smallest} {unit} for "
                         f"a {factorization} factorization of {subject})")
    return ranks


def search_ranks(factorization: str, dims: Tuple[int, ...], cost, budget: float):
    """Largest ranks of :func:`budget_rank`'s family with ``cost(ranks) <= budget``, or None."""
    if factorization == "cp":
        cap = max_cp_rank(dims)

        def candidate(t):
            return (min(t, cap),)

        n_max = cap
    elif factorization == "tucker":
        cap2 = clip_tucker_rank(dims, dims[:2])
        n_max = max(cap2)

        def candidate(t):
            r = tuple(max(1, min(c, round(t * c / n_max))) for c in cap2)
            return clip_tucker_rank(dims, r)

    else:
        modes = tt_dims(dims)
        caps = clip_tt_rank(modes, [math.prod(dims)] * (len(modes) - 1))
        n_max = max(caps)

        def candidate(t):
            return clip_tt_rank(modes, [t] * (len(modes) - 1))

    lo, hi = 0, n_max
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(candidate(mid)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return None
    ranks = candidate(lo)
    if factorization == "tucker":
        # Raise one channel rank at a time, the relatively smaller first, while it fits.
        ranks = list(ranks)
        while True:
            for i in sorted(range(2), key=lambda i: ranks[i] / cap2[i]):
                trial = list(ranks)
                trial[i] += 1
                if (trial[i] <= cap2[i] and clip_tucker_rank(dims, trial) == tuple(trial)
                        and cost(tuple(trial)) <= budget):
                    ranks = trial
                    break
            else:
                return tuple(ranks)
    return ranks
