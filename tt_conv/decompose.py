"""Decompose convolution kernels (CP, Tucker, tensor train).

Each function takes one group's kernel as a torch tensor, computes in float32 or float64
whatever the kernel's dtype (SVDs are not available in half precision), and returns torch
tensors in that working precision on the kernel's device; callers cast back to the layer's
dtype. TensorLy runs under :func:`tensorly.backend_context` (the global backend is never
switched): TT-SVD is :func:`tensorly.decomposition.tensor_train`, and CP's ``"svd"`` and
``"random"`` starts are TensorLy's. CP-ALS and Tucker's HOOI are written here on Gram
matrices and two contractions per sweep: TensorLy's ``parafac`` forms a Khatri-Rao product
per mode and ``partial_tucker`` an SVD of each long unfolding, which made factorizing every
convolution of a ResNet-50 take minutes. On large kernels (a 512 x 256 x 64 layer at rank
2,517) ALS forms its products block by block (:data:`_BLOCK_ELEMENTS`), runs on the kernel's
projection onto the leading directions of its concentrated modes before finishing on the
kernel, and starts from the closest of three orthogonal expansions (see :func:`cp`). The
tests check both against TensorLy (same Tucker subspaces; CP errors no larger than
``parafac``'s).
``benchmarks/decompositions.py`` times every factorization of real networks layer by layer.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import tensorly as tl
import torch
from tensorly.decomposition import tensor_train

from ._checks import check_finite
from .rank import max_cp_rank


def working_dtype(dtype: torch.dtype, precision: Optional[str] = None) -> torch.dtype:
    """The floating dtype a decomposition runs in.

    ``precision`` may force ``"float32"`` or ``"float64"``; by default float64 kernels stay
    float64 and everything else (float32, float16, bfloat16) runs in float32.
    """
    if precision is None:
        return torch.float64 if dtype == torch.float64 else torch.float32
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    return torch.float64 if precision == "float64" else torch.float32


def _prepare(kernel: torch.Tensor, precision: Optional[str]) -> torch.Tensor:
    return kernel.detach().to(working_dtype(kernel.dtype, precision)).contiguous()


def exact_cp(tensor: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """An exact CP decomposition at rank :func:`~tt_conv.rank.max_cp_rank`.

    One rank-one term per fibre along the largest mode: that mode's factor holds the fibres,
    the other factors one-hot vectors selecting them.
    """
    shape = tuple(tensor.shape)
    big = max(range(len(shape)), key=lambda i: shape[i])
    others = [i for i in range(len(shape)) if i != big]
    rank = max_cp_rank(shape)
    # Columns enumerate the multi-index over the other modes in C order.
    fibres = tensor.permute(big, *others).reshape(shape[big], rank)
    factors: List[torch.Tensor] = [None] * len(shape)  # type: ignore[list-item]
    factors[big] = fibres
    index = torch.arange(rank, device=tensor.device)
    stride = rank
    for mode in others:
        stride //= shape[mode]
        position = (index // stride) % shape[mode]
        one_hot = torch.zeros(shape[mode], rank, dtype=tensor.dtype, device=tensor.device)
        one_hot[position, index] = 1
        factors[mode] = one_hot
    return torch.ones(rank, dtype=tensor.dtype, device=tensor.device), factors


def cp(
    kernel: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    ridge: Sequence[float] = (1e-3, 1e-5, 1e-7),
    tol: Optional[float] = None,
    init="structured",
    linesearch: bool = True,
    random_state: Optional[int] = 0,
    precision: Optional[str] = "mixed",
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """CP decomposition of a kernel by regularised alternating least squares.

    Plain ALS on a kernel that is not exactly low rank drifts into *degenerate* solutions:
    rank-one terms far larger than the kernel that cancel each other, which is harmless in
    float64 and ruinous under bf16/fp16 autocast. Here ALS runs in stages with a ridge
    penalty that decreases from stage to stage (``ridge``, relative to the kernel's scale),
    each stage starting from the last: the early stages keep the terms small, the last one
    is nearly unregularised, so exactly low-rank kernels are still recovered to about 1e-6.

    These shortcuts keep it fast on large kernels:

    * a tensor with at most two modes larger than 1 (a 1x1 convolution) is a matrix, whose
      best rank-``R`` CP approximation is its truncated SVD: no iteration;
    * the ``"structured"`` initialisation expands the tensor into mutually orthogonal
      rank-one terms by nested SVDs (mode by mode, largest mode first) and keeps the ``R``
      largest; the discarded terms' norm is exactly the starting error, so ALS starts from
      a close approximation instead of from random or padded factors. The same expansion
      of the tensor's slices along its largest and second-largest modes (each filter, or
      each input channel, expanded on its own) is tried too and the closest start kept:
      trained 1-D kernels (a 512 x 256 x 64 pitch-network layer) are nearly low rank filter
      by filter, which ALS finds only after hundreds of sweeps from the other start;
    * on large kernels (elements times rank over :data:`_SMALL_WORK`) ALS runs on the
      kernel's projection onto the leading directions of the modes whose energy is
      concentrated (see :func:`_compression`: a 64-tap layer that only ever sees 8 samples
      keeps 99.9 % of its energy in 15 tap directions), with every error counting what the
      projection leaves out, and its last stage then runs on the kernel itself;
    * when ``rank`` fits the largest mode (and, merged with a few small modes, the second),
      the generalised eigenvalue decomposition (:func:`_gevd_init`) is tried as a start too,
      and the better start is kept: exact for exactly low-rank kernels;
    * each ALS sweep multiplies the tensor with a factor matrix only twice (the mode-0
      unfolding with the Khatri-Rao product of the other factors, formed block by block, to
      update the largest mode; the tensor with the largest mode's factor for all the others,
      into a buffer reused across sweeps) instead of forming a whole Khatri-Rao product per
      mode; modes of size 1 are folded away; an extrapolation step (``linesearch``) saves
      sweeps;
    * by default (``precision="mixed"``) sweeps run in float32 while the error is above
      1 %, where float32 resolves it, and in float64 below, where exact kernels converge.

    The result is never worse than the start: if the regularised stages end above it (a
    near-exact start), the start is polished by the last stage instead.

    Parameters
    ----------
    kernel : torch.Tensor
        Tensor of any order.
    rank : int
        Number of rank-one terms. At :func:`~tt_conv.rank.max_cp_rank` the exact
        decomposition of :func:`exact_cp` is returned instead of iterating.
    n_iter_max : int
        Most ALS sweeps per stage.
    ridge : sequence of float
        Relative ridge penalty of each stage; ``(0,)`` is plain ALS.
    tol : float, optional
        A stage ends when a sweep changes the relative error by less than ``tol`` times
        itself. The default (None) stops once sweeps gain less than 0.1 % (``1e-3``), or
        less than 1 % (``1e-2``) on kernels whose sweeps are costly (the tensor ALS runs on
        has more than :data:`_COSTLY_WORK` elements times rank, about half a second a sweep
        on two cores: CREPE's 512 x 256 x 64 layer at rank 2,517 ends at 0.046 in a third of
        the time 0.032 takes). ``1e-4`` lowers the error of trained kernels by a further
        1-3 % for about three times the sweeps.
    init : {"structured", "svd", "random"} or (weights, factors)
        Starting point: the orthogonal expansion above, TensorLy's SVD or random
        initialisation, or a given CP decomposition.
    linesearch : bool
        Extrapolate the factors along the last sweep's step when that lowers the error
        (often saves sweeps on slowly converging kernels).
    random_state : int, optional
        Seed for random initial factors (and for random completion of the structured
        initialisation when the tensor has fewer than ``rank`` orthogonal terms).
    precision : {"mixed", "float64", "float32", None}
        Working precision (see :func:`working_dtype`); ``"mixed"`` starts and ends in
        float64 but runs the sweeps of a stage in float32 while the error is above 1 %
        (float32 cannot measure smaller errors, and ALS needs float64 to converge tightly).
        Factors are returned in float64 for ``"mixed"``.

    Returns
    -------
    weights : torch.Tensor
        ``(rank,)``.
    factors : list of torch.Tensor
        One ``(dim, rank)`` matrix per mode.
    """
    mixed = precision == "mixed"
    tensor = _prepare(kernel, "float64" if mixed else precision)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank >= max_cp_rank(tensor.shape):
        return exact_cp(tensor)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(0 if random_state is None else int(random_state))
    if sum(n > 1 for n in tensor.shape) <= 2:
        return _cp_of_matrix(tensor, rank)
    # Modes of size 1 (the trailing axis of a 1-D signal run through Conv2d) only scale each
    # term: ALS runs without them (a Gram solve fewer per sweep), and their factors come
    # back as rows of ones.
    big = [m for m in range(tensor.dim()) if tensor.shape[m] > 1]
    squeezed = tensor.reshape([tensor.shape[m] for m in big])
    n = len(big)
    # Where sweeps are costly, ALS runs on the kernel's projection onto the leading
    # subspaces of its modes (see _compression) and finishes on the kernel; ``outside`` is
    # the energy the projection leaves out, which every error below includes, so
    # tolerances and comparisons refer to the kernel itself.
    bases, core, outside = _compression(squeezed, rank) \
        if squeezed.numel() * rank > _SMALL_WORK else ([None] * n, squeezed, 0.0)
    # Work with the largest mode first and the second largest second (see _cp_als).
    order = sorted(range(n), key=lambda m: -core.shape[m])
    projected = [basis is not None for basis in bases]
    core = core.permute(*order).contiguous()
    permuted = squeezed.permute(*order).contiguous() if any(projected) else core
    unprojected_bases, bases = bases, [bases[m] for m in order]
    alternative = None  # a second start to run the schedule from (small kernels only)
    start_error = None  # the start's error on ``core``, where known without contracting
    if isinstance(init, str):
        if init == "structured":
            # The nested-SVD expansion, or the slices' expansions along the two largest
            # modes (filters, or input channels), whichever starts closest (each knows its
            # error exactly).
            starts = [_structured_init(core, rank, generator, split) for split in (None, 0, 1)]
            factors, start_error = min(starts, key=lambda start: start[1])
            gevd = _gevd_init(core, rank, generator)
            if gevd is not None:
                gevd_error = _cp_error(core, gevd)
                if gevd_error < start_error:
                    factors, start_error = gevd, gevd_error
            if factors is not starts[0][0] and core.numel() * rank <= _SMALL_WORK:
                # A closer start does not always end closer: where it is cheap, ALS also
                # runs from the nested-SVD start and the better end is kept.
                alternative = starts[0][0]
        elif init in ("svd", "random"):
            with tl.backend_context("pytorch"), warnings.catch_warnings():
                # The SVD initialisation asks for more vectors than a small mode has;
                # TensorLy completes them randomly and warns each time.
                warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
                from tensorly.decomposition._cp import initialize_cp

                weights, factors = initialize_cp(core, rank, init=init,
                                                 random_state=random_state)
            factors = [f * weights.abs().pow(1.0 / len(factors)) for f in factors]
        else:
            raise ValueError(
                f"init must be 'structured', 'svd', 'random' or (weights, factors), got {init!r}"
            )
    else:
        weights, factors = init
        scale = weights.to(tensor).abs().pow(1.0 / tensor.dim())
        signs = torch.sign(weights.to(tensor))
        factors = [f.to(tensor) * scale for f in factors]
        factors[0] = factors[0] * signs
        for m in range(tensor.dim()):  # fold the size-1 modes into the first other one
            if tensor.shape[m] == 1:
                factors[big[0]] = factors[big[0]] * factors[m][0]
        factors = [f if basis is None else basis.T @ f
                   for f, basis in zip([factors[m] for m in big], unprojected_bases)]
        factors = [factors[m] for m in order]
    # Gram matrices of the other factors scale as ||T||^(2(n-1)/n) once the terms are
    # balanced, so this makes the ridge independent of the kernel's magnitude.
    scale = float(torch.linalg.vector_norm(tensor)) ** (2 * (n - 1) / n)

    if tol is None:
        tol = _COSTLY_TOL if core.numel() * rank > _COSTLY_WORK else _TOL

    # Each stage returns its factors with their error (its last sweep's, in the precision it
    # ran in), so no comparison below contracts the kernel again; ``error`` is the start's
    # when known.
    def stage(target, factors, penalty, stage_tol, outside=0.0, error=None):
        if error is None:
            error = _cp_error(target, factors, outside=outside)
        if mixed and error > _MIXED_SWITCH:
            fast, error = _cp_als(target.float(), [f.float() for f in factors], n_iter_max,
                                  penalty * scale, stage_tol, linesearch, outside)
            return [f.to(target.dtype) for f in fast], error
        return _cp_als(target, factors, n_iter_max, penalty * scale, stage_tol, linesearch,
                       outside)

    def schedule(start, start_error):
        factors, error = start, start_error
        for penalty in ridge:
            factors, error = stage(core, factors, penalty, tol, outside, error)
        if len(ridge) > 1 and start_error < error:
            # The schedule ended worse than it began (an exactly low-rank kernel whose start
            # was already near exact): polish the start with the last, weakest stage
            # instead, to convergence (near an exact solution ALS may creep, so the
            # tolerance is tighter).
            polished, polished_error = stage(core, start, ridge[-1], tol * 1e-3, outside,
                                             start_error)
            if polished_error < error:
                factors, error = polished, polished_error
        return factors, error

    core_norm2 = float(torch.sum(core * core))
    factors, error = schedule(factors, _cp_error(core, factors, outside=outside)
                              if start_error is None or core_norm2 + outside == 0 else
                              math.sqrt((start_error ** 2 * core_norm2 + outside)
                                        / (core_norm2 + outside)))
    if alternative is not None:
        other, other_error = schedule(alternative, _cp_error(core, alternative,
                                                             outside=outside))
        if other_error < error:
            factors = other
    if any(projected):
        factors = [f if basis is None else basis @ f for f, basis in zip(factors, bases)]
        # What the projection left out may be partly representable: finish with the last
        # stage on the kernel itself (a sweep or two where, as usual, it is not).
        factors, _ = stage(permuted, factors, ridge[-1], tol)
    ones = torch.ones(1, rank, dtype=tensor.dtype, device=tensor.device)
    out = [ones] * tensor.dim()
    for position, m in enumerate(order):
        out[big[m]] = factors[position]
    return torch.ones(rank, dtype=tensor.dtype, device=tensor.device), out


#: Default stopping tolerance of an ALS stage (``cp(tol=None)``) ...
_TOL = 1e-3
#: ... and on kernels whose sweeps are costly: elements of the tensor ALS runs on (the
#: projection, where there is one) times the rank above :data:`_COSTLY_WORK`. CREPE's 1-D
#: layers from 128 x 1024 x 64 up: its 512 x 256 x 64 layer at rank 2,517 takes three times
#: as long at the tighter tolerance to lower the error from 0.046 to 0.032
#: (``benchmarks/decompositions.py --model crepe --only cp``); ResNet-50's largest 3 x 3
#: layers stay below (1.4e9).
_COSTLY_TOL = 1e-2
_COSTLY_WORK = 1 << 31

#: Above this relative error, "mixed" precision runs ALS sweeps in float32.
_MIXED_SWITCH = 1e-2

#: Kernel elements times rank under which CP runs ALS from two starts when they differ
#: (ResNet-50's stem and 3 x 3 layers up to 128 channels: a fraction of a second each).
_SMALL_WORK = 1 << 26


def _cp_of_matrix(tensor: torch.Tensor, rank: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Best rank-``rank`` CP of a tensor with at most two non-singleton modes (truncated SVD)."""
    big = [m for m in range(tensor.dim()) if tensor.shape[m] > 1]
    while len(big) < 2:  # a vector or a scalar: pad with singleton modes
        big.append(next(m for m in range(tensor.dim()) if m not in big))
    a, b = big[:2]
    matrix = tensor.permute(a, b, *[m for m in range(tensor.dim()) if m not in (a, b)])
    matrix = matrix.reshape(tensor.shape[a], tensor.shape[b])
    u, s, v = _leading_singular(matrix, rank)
    root = s.sqrt()
    factors = []
    for m in range(tensor.dim()):
        if m == a:
            factors.append(u * root)
        elif m == b:
            factors.append(v * root)
        else:
            factors.append(torch.ones(1, rank, dtype=tensor.dtype, device=tensor.device))
    return torch.ones(rank, dtype=tensor.dtype, device=tensor.device), factors


def _leading_singular(matrix: torch.Tensor, count: int, right_vectors: bool = True):
    """The ``count`` leading singular triplets ``(u, s, v)`` of a (batch of) matrix, via the
    smaller Gram matrix.

    Eigen-decomposing the smaller Gram matrix costs one matrix product and a small
    symmetric eigenproblem, far less than an SVD of a long unfolding; the vectors of the
    other side are recovered by one product and re-orthonormalised (QR), so they stay
    orthonormal even where singular values vanish. With ``right_vectors=False`` (HOOI needs
    only ``u`` and ``s``) ``v`` is None when the rows are the smaller side, and that product
    and QR are skipped.
    """
    rows, cols = matrix.shape[-2:]
    count = min(count, rows, cols)
    transpose = rows > cols
    a = matrix.transpose(-1, -2) if transpose else matrix
    values, vectors = torch.linalg.eigh(a @ a.transpose(-1, -2))
    s = values.flip(-1)[..., :count].clamp_min(0).sqrt()
    left = vectors.flip(-1)[..., :count]
    if not (right_vectors or transpose):
        return left, s, None
    product = a.transpose(-1, -2) @ left
    right = torch.linalg.qr(product).Q
    # QR may flip signs: keep v = a^T u / s exactly where s > 0.
    signs = torch.sign(torch.sum(right * product, dim=-2, keepdim=True))
    right = right * torch.where(signs == 0, torch.ones_like(signs), signs)
    if transpose:
        left, right = right, left
    return left, s, right


def _orthogonal_terms(tensors: torch.Tensor, limit: int):
    """Up to ``limit`` mutually orthogonal rank-one terms of each tensor of a batch.

    Split off the first mode by an SVD and expand each right singular vector the same way,
    recursively; every pair of terms is orthogonal (they differ in some singular vector of
    one SVD), so the norm of the discarded terms is exactly the truncation error.

    Parameters
    ----------
    tensors : torch.Tensor
        ``(batch, n_1, ..., n_d)``.

    Returns
    -------
    weights : torch.Tensor
        ``(batch, T)``, descending (zeros where a tensor has fewer terms).
    vectors : list of torch.Tensor
        Per mode, ``(batch, n_m, T)`` unit columns.
    """
    batch, first, rest = tensors.shape[0], tensors.shape[1], tensors.shape[2:]
    if not rest:
        norm = torch.linalg.vector_norm(tensors, dim=1, keepdim=True)
        unit = tensors / norm.clamp_min(torch.finfo(tensors.dtype).tiny)
        return norm, [unit.unsqueeze(-1)]
    u, s, v = _leading_singular(tensors.reshape(batch, first, -1), limit)
    count = s.shape[-1]
    sub = v.transpose(1, 2).reshape(batch * count, *rest)
    sub_weights, sub_vectors = _orthogonal_terms(sub, limit)
    inner = sub_weights.shape[-1]
    weights = (s.unsqueeze(-1) * sub_weights.reshape(batch, count, inner)).reshape(batch, -1)
    top = torch.topk(weights, min(limit, weights.shape[-1]), dim=-1).indices
    weights = torch.gather(weights, 1, top)
    # Term ``c * inner + i`` is u's column c times term i of v's column c: gather only the
    # kept terms' vectors (expanding every candidate first formed count * inner columns
    # per mode, a 1024 x 65,536 matrix for a 1024 x 128 x 64 kernel).
    column, term = top // inner, top % inner
    vectors = [torch.gather(u, 2, column.unsqueeze(1).expand(-1, first, -1))]
    rows = torch.arange(batch, device=top.device).unsqueeze(1) * count + column
    vectors += [vec[rows, :, term].transpose(1, 2) for vec in sub_vectors]
    return weights, vectors


def _structured_init(tensor: torch.Tensor, rank: int, generator: torch.Generator,
                     split: Optional[int] = None):
    """Balanced CP factors from the ``rank`` largest orthogonal terms (see :func:`cp`).

    ``split=None`` expands the tensor by nested SVDs from its first mode; ``split=m`` takes
    its slices along mode ``m`` and expands each (its terms are one-hot along ``m``): the
    better start for kernels whose filters are each nearly low rank but differ from filter
    to filter, which the SVD of the first mode spreads over many terms. Either way the terms
    are mutually orthogonal, so the relative error of the start is known exactly from the
    discarded weights; it is returned with the factors.
    """
    n = tensor.dim()
    if split is None:
        weights, vectors = _orthogonal_terms(tensor.unsqueeze(0), rank)
        weights, vectors = weights[0], [vec[0] for vec in vectors]
    else:
        slices = tensor.movedim(split, 0).contiguous()
        per_slice, parts = _orthogonal_terms(slices, rank)
        count, terms = per_slice.shape
        weights, top = torch.topk(per_slice.reshape(-1), min(rank, per_slice.numel()))
        one_hot = torch.zeros(count, top.numel(), dtype=tensor.dtype, device=tensor.device)
        one_hot[top // terms, torch.arange(top.numel(), device=tensor.device)] = 1
        others = [part.transpose(1, 2).reshape(count * terms, -1)[top].T for part in parts]
        vectors = others[:split] + [one_hot] + others[split:]
    norm2 = float(torch.sum(tensor * tensor))
    error = math.sqrt(max(1.0 - float(torch.sum(weights * weights)) / norm2, 0.0)) \
        if norm2 > 0 else 0.0
    share = weights.pow(1.0 / n)
    factors = [vec * share for vec in vectors]
    missing = rank - int((weights > 0).sum())
    if missing > 0:
        # Fewer orthogonal terms than rank-one terms asked for: the tensor is exactly
        # representable already; small random columns give ALS something to work with.
        factors = [f[:, : rank - missing] for f in factors]
        norm = math.sqrt(norm2) or 1.0
        level = 1e-3 * (norm / rank) ** (1.0 / n)
        extra = [
            torch.randn(dim, missing, generator=generator, dtype=torch.float64)
            .to(tensor) * level for dim in tensor.shape
        ]
        factors = [torch.cat([f, e], dim=1) for f, e in zip(factors, extra)]
    return factors, error


def _gevd_init(tensor: torch.Tensor, rank: int, generator: torch.Generator):
    """CP factors by the generalised eigenvalue decomposition (Jennrich's algorithm), or None.

    View the tensor (largest mode first) as a three-way ``(n_0, n_B, n_C)`` tensor: mode 0,
    then mode 1 merged with as few following modes as make ``n_B >= rank``, then the rest
    (``n_C >= 2``). When ``rank <= n_0``, compress the first two ways to ``rank`` by their
    leading singular vectors; two random mixtures of the core's slices are then
    ``A D_1 B^T`` and ``A D_2 B^T``, so the eigenvectors of ``S_1 S_2^{-1}`` give the
    first factor. Least squares gives each term's ``b_r c_r^T``, whose best rank-one
    approximations split back into the merged modes. Exact for exactly low-rank tensors in
    general position; a good start otherwise.
    """
    dims = tuple(tensor.shape)
    if dims[0] < rank:
        return None
    split = next((j for j in range(2, len(dims))
                  if math.prod(dims[1:j]) >= rank and math.prod(dims[j:]) >= 2), None)
    if split is None:
        return None
    b_dims, c_dims = dims[1:split], dims[split:]
    n_b, n_c = math.prod(b_dims), math.prod(c_dims)
    t3 = tensor.reshape(dims[0], n_b, n_c)
    u = _leading_singular(t3.reshape(dims[0], -1), rank)[0]
    v = _leading_singular(t3.transpose(0, 1).reshape(n_b, -1), rank)[0]
    core = torch.einsum("oik,or,is->rsk", t3, u, v)
    mix = torch.randn(n_c, 2, generator=generator, dtype=torch.float64).to(tensor)
    s1, s2 = core @ mix[:, 0], core @ mix[:, 1]
    try:
        pencil = torch.linalg.lstsq(s2.T, s1.T).solution.T  # s1 s2^{-1}
        vectors = torch.linalg.eig(pencil).eigenvectors.real.to(tensor.dtype)
    except RuntimeError:  # pragma: no cover - a singular pencil: no GEVD start
        return None
    a = u @ vectors
    a = a / torch.linalg.vector_norm(a, dim=0).clamp_min(torch.finfo(a.dtype).tiny)
    # Each row of pinv(a) T_(0) is vec(b_r c_r^T): one rank-one SVD per term, then the
    # best rank-one approximation of b_r and c_r over the modes merged into them.
    rows = torch.linalg.lstsq(a, t3.reshape(dims[0], -1)).solution.reshape(rank, n_b, n_c)
    left, sigma, right = torch.linalg.svd(rows, full_matrices=False)
    w_b, v_b = _orthogonal_terms((left[:, :, 0] * sigma[:, :1]).reshape(rank, *b_dims), 1)
    w_c, v_c = _orthogonal_terms(right[:, 0, :].reshape(rank, *c_dims), 1)
    factors = [a * (w_b[:, 0] * w_c[:, 0])] + [vec[:, :, 0].T for vec in v_b + v_c]
    # Balance the column norms across modes.
    norms = torch.stack([torch.linalg.vector_norm(f, dim=0) for f in factors])
    share = norms.prod(0).pow(1.0 / len(factors))
    return [f * (share / n.clamp_min(torch.finfo(n.dtype).tiny)) for f, n in zip(factors, norms)]


def _solve_factor(mttkrp: torch.Tensor, gram: torch.Tensor, l2: float) -> torch.Tensor:
    """``mttkrp (gram + l2 I)^-1``, by Cholesky when it is positive definite, with its
    negligible entries zeroed (:func:`_flush_negligible`)."""
    system = gram.clone()
    system.diagonal().add_(l2)  # (forming an identity matrix cost a third of this solve)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return _flush_negligible(torch.cholesky_solve(mttkrp.T, chol).T)
    return _flush_negligible(torch.linalg.lstsq(system, mttkrp.T).solution.T)


def _flush_negligible(factor: torch.Tensor) -> torch.Tensor:
    """``factor`` with the entries below ``eps**2`` of its largest set to zero, in place.

    Entries of components ALS drives towards zero shrink sweep after sweep until their
    products (the Khatri-Rao blocks, the contractions) are subnormal floats, which Intel
    CPUs compute on a slow path (the CP of a pretrained 128 x 1024 x 64 kernel took 93 s on
    one with them, 24 s without; 26 s on an AMD CPU). An entry that small changes nothing
    the dtype can represent in any sum with the large ones.
    """
    limit = float(factor.abs().max()) * torch.finfo(factor.dtype).eps ** 2
    return factor.masked_fill_(factor.abs() < limit, 0.0)


#: Largest temporary (elements) the ALS contractions form at once: bigger blocks of a large
#: kernel's products are split, which keeps them in cache-friendly, reused allocations
#: instead of fresh page-faulting buffers of hundreds of MB each sweep.
_BLOCK_ELEMENTS = 1 << 22


def _row_blocks(rows: int, per_row: int):
    """Slices of ``range(rows)`` whose temporaries of ``per_row`` elements per row stay under
    :data:`_BLOCK_ELEMENTS`."""
    step = max(1, _BLOCK_ELEMENTS // max(per_row, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _contract_except(partial: torch.Tensor, factors: List[torch.Tensor], keep: int) -> torch.Tensor:
    """Sum ``partial[i_1, ..., i_k, r] prod_{j != keep} factors[j][i_j, r]`` over all but ``keep``.

    Contracts the largest axis first, so the intermediate shrinks fastest, in blocks of the
    first axis (concatenated when it is the one kept, summed otherwise).
    """
    if partial.dim() > 2 and partial.numel() > _BLOCK_ELEMENTS:
        blocks = _row_blocks(partial.shape[0], partial[0].numel())
        if len(blocks) > 1:
            first = factors[0]
            parts = [_contract_except(partial[b], [first[b], *factors[1:]], keep)
                     for b in blocks]
            return torch.cat(parts) if keep == 0 else sum(parts[1:], parts[0])
    axes = [j for j in range(len(factors)) if j != keep]
    alive = list(range(len(factors)))  # which factor each remaining axis belongs to
    for j in sorted(axes, key=lambda j: -factors[j].shape[0]):
        position = alive.index(j)
        shape = [1] * (len(alive) + 1)
        shape[position] = factors[j].shape[0]
        shape[-1] = factors[j].shape[1]
        partial = (partial * factors[j].reshape(shape)).sum(position)
        alive.pop(position)
    return partial


def _mttkrp_first(by_first: torch.Tensor, others: List[torch.Tensor]) -> torch.Tensor:
    """``T_(0) (f_1 kr ... kr f_k)``: the mode-0 unfolding times the Khatri-Rao product of the
    other factors (C order), formed block by block over the first of them.

    One long matrix product per block (its inner dimension is a block of the unfolding's
    columns) instead of contracting a ``(n_0, ..., rank)`` intermediate mode by mode.
    """
    rank = others[0].shape[1]
    tail = others[-1]
    for factor in reversed(others[1:-1]):  # the small modes' Khatri-Rao product, once
        tail = (factor[:, None, :] * tail[None, :, :]).reshape(-1, rank)
    if len(others) == 1:
        return by_first @ others[0]
    inner = tail.shape[0]
    out = None
    for block in _row_blocks(others[0].shape[0], inner * rank):
        khatri_rao = (others[0][block, None, :] * tail[None, :, :]).reshape(-1, rank)
        columns = by_first[:, block.start * inner:block.stop * inner]
        out = columns @ khatri_rao if out is None else out.addmm_(columns, khatri_rao)
    return out


def _cp_als(tensor, factors, n_iter, l2, tol, linesearch, outside=0.0):
    """ALS sweeps on ``tensor`` (largest mode first, second largest second) from ``factors``.

    ``outside``: energy of the kernel outside ``tensor`` (a projection of it), counted in the
    error that the stopping test reads. Returns the factors and their relative error (the
    last sweep's, in ``tensor``'s precision).
    """
    n = tensor.dim()
    dims = tensor.shape
    rank = factors[0].shape[1]
    norm2 = float(torch.sum(tensor * tensor))
    if norm2 + outside == 0:
        return [torch.zeros_like(f) for f in factors], 0.0
    by_first = tensor.reshape(dims[0], -1)  # the mode-0 unfolding
    factors = [f.clone() for f in factors]
    grams = [f.T @ f for f in factors]

    partial = torch.empty(math.prod(dims[1:]), rank, dtype=tensor.dtype, device=tensor.device)

    def sweep(factors, grams, first=None):
        # Mode 0: one product with the Khatri-Rao product of the others, in blocks (``first``:
        # already computed for these factors by the line search).
        mttkrp = _mttkrp_first(by_first, factors[1:]) if first is None else first
        gram = _hadamard([g for j, g in enumerate(grams) if j != 0])
        factors[0] = _solve_factor(mttkrp, gram, l2)
        grams[0] = factors[0].T @ factors[0]
        # Every other mode: contract mode 0 once (into a buffer reused across sweeps), then
        # the rest per mode.
        torch.matmul(by_first.T, factors[0], out=partial)
        shaped = partial.view(*dims[1:], rank)
        for m in range(1, n):
            mttkrp = _contract_except(shaped, factors[1:], m - 1)
            gram = _hadamard([g for j, g in enumerate(grams) if j != m])
            factors[m] = _solve_factor(mttkrp, gram, l2)
            grams[m] = factors[m].T @ factors[m]
        # Error from the last update: ||T||^2 - 2 <T, T_hat> + ||T_hat||^2.
        inner = float(torch.sum(mttkrp * factors[-1]))
        norm_hat2 = float(torch.sum(gram * grams[-1]))
        return _relative_error(norm2, inner, norm_hat2, outside)

    previous, first, error = None, None, None
    for iteration in range(n_iter):
        old = [f.clone() for f in factors] if linesearch else None
        error = sweep(factors, grams, first)
        first = None
        if linesearch and iteration > 1:
            jump = iteration ** (1.0 / 3.0)
            trial = [_flush_negligible(o + jump * (f - o)) for o, f in zip(old, factors)]
            trial_grams = [f.T @ f for f in trial]
            # The trial's error needs its mode-0 product, which is also what the next sweep
            # starts with if the trial is taken: computed once (a third of a sweep's work).
            trial_first = _mttkrp_first(by_first, trial[1:])
            trial_error = _error_from_first(trial_first, trial[0], trial_grams, norm2, outside)
            if trial_error < error:
                factors, grams, error, first = trial, trial_grams, trial_error, trial_first
        if previous is not None and abs(previous - error) < tol * max(previous, 1e-300):
            break
        previous = error
    if error is None:  # no sweep asked for
        error = _cp_error(tensor, factors, grams, norm2, outside)
    return factors, error


def _hadamard(matrices: List[torch.Tensor]) -> torch.Tensor:
    out = matrices[0]
    for m in matrices[1:]:
        out = out * m
    return out


def _cp_error(tensor, factors, grams=None, norm2=None, outside=0.0) -> float:
    """Relative error of CP ``factors`` of ``tensor`` (``norm2 = ||tensor||^2`` if known), of
    a kernel with ``outside`` more energy orthogonal to ``tensor`` and to the factors."""
    if grams is None:
        grams = [f.T @ f for f in factors]
    if norm2 is None:
        norm2 = float(torch.sum(tensor * tensor))
    if norm2 + outside == 0:
        return 0.0
    first = _mttkrp_first(tensor.reshape(tensor.shape[0], -1), factors[1:])
    return _error_from_first(first, factors[0], grams, norm2, outside)


def _error_from_first(first, factor0, grams, norm2, outside=0.0) -> float:
    """Relative CP error from the mode-0 product ``first`` of the other factors:
    ``||T||^2 - 2 <T, T_hat> + ||T_hat||^2`` with ``<T, T_hat> = sum(first * factor0)``."""
    inner = float(torch.sum(first * factor0))
    norm_hat2 = float(torch.sum(_hadamard(grams)))
    return _relative_error(norm2, inner, norm_hat2, outside)


def _relative_error(norm2, inner, norm_hat2, outside=0.0) -> float:
    """``||K - K_hat|| / ||K||`` for a kernel ``K`` whose projection ``T`` has ``||T||^2 =
    norm2``, ``<T, K_hat> = inner``, and ``outside = ||K||^2 - norm2`` (``K_hat`` lies in the
    projection's subspace)."""
    return math.sqrt(max(norm2 - 2 * inner + norm_hat2 + outside, 0.0) / (norm2 + outside))


#: Energy (relative to the kernel's) the subspace CP-ALS runs in may leave out along each
#: mode (see :func:`_compression`); ALS then finishes on the kernel itself.
_COMPRESSION_LOSS = 1e-3

#: The projection is used only when it cuts the kernel to this share of its size or less.
_COMPRESSION_SHARE = 0.75


def _compression(tensor: torch.Tensor, rank: int):
    """Orthonormal bases of the leading subspaces of ``tensor``'s modes, its projection on
    them, and the energy the projection leaves out.

    CP-ALS costs the tensor's size times the rank per sweep, and trained kernels often carry
    little energy in some directions of a mode: a pitch network's 64-tap layers that only
    ever see 8 samples keep 99.9 % of their energy in 15 tap directions. Each mode keeps the
    fewest leading directions of its unfolding (eigenvectors of its Gram matrix) whose
    discarded energy is at most :data:`_COMPRESSION_LOSS` of the tensor's; the projection
    leaves out at most the sum over the modes, and what it leaves out is returned exactly.
    The projection stays large enough that ``rank`` terms could not represent it exactly
    twice over (:func:`~tt_conv.rank.max_cp_rank`): where they could, the rank has room to
    fit part of what was left out, and the kept directions grow. A mode that would keep
    more than :data:`_COMPRESSION_SHARE` of its directions stays whole (rotating it gains
    little and loses the coordinates, filters or channels, that the best starts expand one
    by one), and where the projection would not shrink the tensor to that share of its
    size, nothing is projected. Returns ``bases`` (one ``(dim, k)`` matrix per mode, or None
    where the mode is whole), the projection and the energy outside it.
    """
    dims = list(tensor.shape)
    norm2 = float(torch.sum(tensor * tensor))
    whole = [None] * len(dims), tensor, 0.0
    if norm2 == 0:
        return whole
    vectors, counts = [], []
    for mode in range(len(dims)):
        unfolded = unfold_mode(tensor, mode)
        values, vecs = torch.linalg.eigh(unfolded @ unfolded.T)
        values, vecs = values.flip(0).clamp_min(0), vecs.flip(-1)
        tail = values.flip(0).cumsum(0).flip(0)  # tail[k]: energy of the directions from k on
        vectors.append(vecs)
        counts.append(max(1, int((tail > _COMPRESSION_LOSS * norm2).sum())))
    counts = [k if k <= _COMPRESSION_SHARE * n else n for k, n in zip(counts, dims)]
    while max_cp_rank(counts) < 2 * rank and counts != dims:
        # Grow the mode cut the most (relative to its size) by one direction.
        mode = min((m for m in range(len(dims)) if counts[m] < dims[m]),
                   key=lambda m: counts[m] / dims[m])
        counts[mode] += 1
    counts = [k if k <= _COMPRESSION_SHARE * n else n for k, n in zip(counts, dims)]
    if math.prod(counts) > _COMPRESSION_SHARE * math.prod(dims):
        return whole
    bases = [vecs[:, :k] if k < n else None for vecs, k, n in zip(vectors, counts, dims)]
    core = tensor
    for mode, basis in enumerate(bases):
        if basis is not None:
            core = mode_product(core, basis.T, mode)
    core = core.contiguous()
    return bases, core, max(norm2 - float(torch.sum(core * core)), 0.0)


def tucker(
    kernel: torch.Tensor,
    rank: Sequence[int],
    *,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    precision: Optional[str] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Tucker decomposition of the leading ``len(rank)`` modes of a kernel (HOOI).

    The remaining modes are kept whole. Ranks must already be clipped to the kernel
    (:func:`~tt_conv.rank.clip_tucker_rank`). Starts from the truncated HOSVD and runs
    higher-order orthogonal iteration until the relative error changes by less than
    ``tol``; every leading subspace comes from the eigen-decomposition of the smaller Gram
    matrix of the unfolding, far cheaper than an SVD of a long unfolding, and the error of
    each sweep from its singular values (no core is formed until the end). Modes kept at
    full rank get identity factors, and a kernel with no other mode larger than 1 (a 1x1
    convolution, a matrix) needs no iteration: its HOSVD is optimal.

    Returns
    -------
    core : torch.Tensor
        Shape ``(*rank, *kernel.shape[len(rank):])``.
    factors : list of torch.Tensor
        ``(dim_i, rank_i)`` orthonormal matrices for the decomposed modes.
    """
    tensor = _prepare(kernel, precision)
    rank = [int(r) for r in rank]
    modes = list(range(len(rank)))
    for mode, r in zip(modes, rank):
        if not 1 <= r <= tensor.shape[mode]:
            raise ValueError(
                f"Tucker rank {r} for mode {mode} must be in [1, {tensor.shape[mode]}] "
                f"(clip ranks with tt_conv.rank.clip_tucker_rank)"
            )
    full = [r == tensor.shape[m] for m, r in zip(modes, rank)]
    if all(full):
        # Full rank: the identity factors are exact, and no SVD is needed.
        eye = [torch.eye(n, dtype=tensor.dtype, device=tensor.device) for n in rank]
        return tensor.clone(), eye

    factors = [
        torch.eye(tensor.shape[m], dtype=tensor.dtype, device=tensor.device) if full[m]
        else _leading_singular(unfold_mode(tensor, m), rank[m], right_vectors=False)[0]
        for m in modes
    ]
    matrix_like = sum(n > 1 for m, n in enumerate(tensor.shape) if m not in modes) == 0 \
        and len(modes) == 2
    norm2 = float(torch.sum(tensor * tensor))
    previous = None
    iterations = 0 if matrix_like or norm2 == 0 else n_iter_max
    for _ in range(iterations):
        kept = 0.0  # ||core||^2 after this sweep's last update
        for m in modes:
            if full[m]:
                continue
            others = [j for j in modes if j != m and not full[j]]
            projected = _projected_unfolding(tensor, m, others, factors)
            factors[m], singular = _leading_singular(projected, rank[m],
                                                     right_vectors=False)[:2]
            kept = float(torch.sum(singular * singular))
        # The core of the last update is U_m^T times that projection: its norm is the sum of
        # the kept squared singular values, so the error needs no projection of its own.
        error = math.sqrt(max(norm2 - kept, 0.0) / norm2)
        if previous is not None and abs(previous - error) < tol:
            break
        previous = error
    return _project(tensor, factors, modes, full), factors


def _projected_unfolding(tensor, mode, others, factors):
    """The mode-``mode`` unfolding of ``tensor`` projected on ``factors[j]`` along each mode
    of ``others``, with its columns in whatever order the contractions leave them.

    Its Gram matrix (all HOOI needs) does not depend on the column order, so each
    contraction's result is used as it comes, contiguous, instead of being moved back into
    place and copied again for the unfolding.
    """
    moved = tensor.movedim(mode, 0)
    axes = [j if j > mode else j + 1 for j in others]  # where each mode sits after the move
    for count, (axis, j) in enumerate(zip(axes, others)):
        # Every contracted axis goes to the end, so the axes not yet contracted keep their
        # places minus the ones before them already taken out.
        position = axis - sum(1 for done in axes[:count] if done < axis)
        moved = torch.tensordot(moved, factors[j], dims=([position], [0]))
    return moved.reshape(tensor.shape[mode], -1)


def _project(tensor, factors, modes, full):
    core = tensor
    for m in modes:
        if not full[m]:
            core = mode_product(core, factors[m].T, m)
    return core


def unfold_mode(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: rows indexed by that mode, columns by the others (C order)."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode matrix``: multiply mode ``mode`` by ``matrix`` (``(new, dim)``)."""
    moved = tensor.movedim(mode, -1)
    return (moved @ matrix.T).movedim(-1, mode)


def tensor_train_cores(
    kernel: torch.Tensor, rank: Sequence[int], *, precision: Optional[str] = None
) -> List[torch.Tensor]:
    """TT-SVD of a tensor with the given inner ranks (``tensorly.tensor_train``).

    Ranks must already be clipped (:func:`~tt_conv.rank.clip_tt_rank`) so the cores have
    exactly the requested shapes ``(r_{j-1}, n_j, r_j)``.
    """
    tensor = _prepare(kernel, precision)
    with tl.backend_context("pytorch"):
        cores = tensor_train(tensor, [1, *rank, 1])
    cores = [c for c in cores]
    expected = [1, *rank, 1]
    got = [c.shape[0] for c in cores] + [cores[-1].shape[-1]]
    if got != expected:  # pragma: no cover - guarded by clip_tt_rank
        raise RuntimeError(f"TT-SVD returned ranks {got}, expected {expected}")
    return cores


def relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    """``||approximation - reference|| / ||reference||`` in float64 (0 if both are zero)."""
    a = approximation.detach().double()
    b = reference.detach().double().to(a.device)
    norm = torch.linalg.vector_norm(b)
    diff = torch.linalg.vector_norm(a - b)
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return float(diff / norm)
