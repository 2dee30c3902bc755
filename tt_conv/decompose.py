"""Decompose convolution kernels through TensorLy.

Each function takes one group's kernel as a torch tensor, runs TensorLy's PyTorch backend
inside :func:`tensorly.backend_context` (the global backend is never switched), computes in
float32 or float64 whatever the kernel's dtype (SVDs are not available in half precision),
and returns torch tensors in that working precision on the kernel's device. Callers cast
back to the layer's dtype.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import tensorly as tl
import torch
from tensorly.cp_tensor import CPTensor
from tensorly.decomposition import parafac, partial_tucker, tensor_train

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


def check_finite(kernel: torch.Tensor, name: str = "kernel") -> None:
    """Raise ``ValueError`` if ``kernel`` holds NaN or inf, naming ``name``."""
    if not torch.isfinite(kernel).all():
        bad = int((~torch.isfinite(kernel)).sum())
        raise ValueError(f"{name} holds {bad} NaN or inf values; cannot decompose it")


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


def _rank_one(tensor: torch.Tensor) -> List[torch.Tensor]:
    """Vectors whose outer product best approximates ``tensor`` (truncated HOSVD, rank 1)."""
    vectors = []
    for mode in range(tensor.dim()):
        unfolding = tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)
        u, _, _ = torch.linalg.svd(unfolding, full_matrices=False)
        vectors.append(u[:, 0])
    scale = tensor
    for vector in vectors:
        scale = torch.tensordot(vector, scale, dims=([0], [0]))
    vectors[0] = vectors[0] * scale
    return vectors


def gevd_init(tensor: torch.Tensor, rank: int) -> Optional[Tuple[torch.Tensor, List[torch.Tensor]]]:
    """An algebraic CP initialisation by a generalized eigenvalue decomposition.

    For a tensor of exact CP rank ``R`` no larger than its two largest dimensions ``I_a``
    and ``I_b``, project it on the leading ``R`` singular vectors of modes ``a`` and ``b``,
    combine the remaining modes into two ``R x R`` slices ``S_1 = A D_1 B^T`` and
    ``S_2 = A D_2 B^T`` (``D`` diagonal), and read ``A`` off the eigenvectors of
    ``S_1 S_2^{-1} = A D_1 D_2^{-1} A^{-1}``. The other factors follow by least squares
    and a rank-one fit per term. Exact for exactly low-rank tensors in general position,
    a good start otherwise; ``None`` where it does not apply.
    """
    shape = tuple(tensor.shape)
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    a, b = order[0], order[1]
    rest = [i for i in range(len(shape)) if i not in (a, b)]
    if rank > shape[b] or rank < 2 or math.prod(shape[i] for i in rest) < 2:
        return None
    t3 = tensor.permute(a, b, *rest).reshape(shape[a], shape[b], -1)
    u_a = torch.linalg.svd(t3.reshape(shape[a], -1), full_matrices=False)[0][:, :rank]
    u_b = torch.linalg.svd(t3.transpose(0, 1).reshape(shape[b], -1), full_matrices=False)[0][:, :rank]
    core = torch.einsum("ijk,ir,js->rsk", t3, u_a, u_b)
    # The two dominant combinations of the remaining modes' slices.
    weights = torch.linalg.svd(core.reshape(rank * rank, -1), full_matrices=False)[2][:2]
    s1 = torch.einsum("rsk,k->rs", core, weights[0])
    s2 = torch.einsum("rsk,k->rs", core, weights[1])
    try:
        eigenvectors = torch.linalg.eig(torch.linalg.solve(s2.T, s1.T).T)[1]
    except RuntimeError:  # singular slice: no algebraic start
        return None
    factor_a = u_a @ eigenvectors.real.to(tensor.dtype)
    factor_a = factor_a / torch.linalg.vector_norm(factor_a, dim=0).clamp_min(1e-300)
    # Least squares for the Khatri-Rao product of the other modes, then one rank-one fit
    # per term.
    unfolding = tensor.movedim(a, 0).reshape(shape[a], -1)
    others = torch.linalg.lstsq(factor_a, unfolding).solution  # (R, prod(other dims))
    other_modes = [i for i in range(len(shape)) if i != a]
    columns = [_rank_one(others[r].reshape([shape[i] for i in other_modes])) for r in range(rank)]
    factors: List[torch.Tensor] = [None] * len(shape)  # type: ignore[list-item]
    factors[a] = factor_a
    for position, mode in enumerate(other_modes):
        factors[mode] = torch.stack([column[position] for column in columns], dim=1)
    return torch.ones(rank, dtype=tensor.dtype, device=tensor.device), factors


def cp(
    kernel: torch.Tensor,
    rank: int,
    *,
    n_iter_max: int = 100,
    ridge: Sequence[float] = (1e-3, 1e-5, 1e-7),
    tol: float = 1e-9,
    init="auto",
    linesearch: bool = False,
    random_state: Optional[int] = 0,
    precision: Optional[str] = "float64",
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """CP decomposition of a kernel by regularised alternating least squares.

    Plain ALS on a kernel that is not exactly low rank drifts into *degenerate* solutions:
    rank-one terms far larger than the kernel that cancel each other, which is harmless in
    float64 and ruinous under bf16/fp16 autocast. Here ALS
    (:func:`tensorly.decomposition.parafac`) runs in stages with a ridge penalty that
    decreases from stage to stage (``ridge``, relative to the kernel's scale), each stage
    starting from the last: the early stages keep the terms small, the last one is nearly
    unregularised, so exactly low-rank kernels are still recovered to about 1e-6.

    Parameters
    ----------
    kernel : torch.Tensor
        Tensor of any order.
    rank : int
        Number of rank-one terms. At :func:`~tt_conv.rank.max_cp_rank` the exact
        decomposition of :func:`exact_cp` is returned instead of iterating.
    n_iter_max : int
        ALS iterations per stage.
    ridge : sequence of float
        Relative ridge penalty of each stage; ``(0,)`` is plain ALS.
    init : {"auto", "svd", "random"} or CPTensor
        ``"auto"`` runs ALS from TensorLy's SVD start and from :func:`gevd_init` (where it
        applies) and keeps the better result; anything else goes to ``parafac`` as is.
    tol, linesearch, random_state
        Passed to :func:`tensorly.decomposition.parafac`.
    precision : {"float64", "float32", None}
        Working precision (see :func:`working_dtype`); ALS needs float64 to converge
        tightly, so it is the default.

    Returns
    -------
    weights : torch.Tensor
        ``(rank,)``.
    factors : list of torch.Tensor
        One ``(dim, rank)`` matrix per mode.
    """
    tensor = _prepare(kernel, precision)
    if rank >= max_cp_rank(tensor.shape):
        return exact_cp(tensor)
    options = dict(n_iter_max=n_iter_max, tol=tol, linesearch=linesearch,
                   random_state=random_state)
    candidates = []
    if init == "auto":
        candidates.append(_staged_als(tensor, rank, "svd", ridge=ridge, **options))
        algebraic = gevd_init(tensor, rank)
        if algebraic is not None:
            # An algebraic start is already close: only the light last stage polishes it,
            # and the start itself competes (it is exact for exactly low-rank kernels).
            candidates.append(algebraic)
            candidates.append(
                _staged_als(tensor, rank, CPTensor(algebraic), ridge=tuple(ridge)[-1:], **options)
            )
    else:
        candidates.append(_staged_als(tensor, rank, init, ridge=ridge, **options))
    with tl.backend_context("pytorch"):
        errors = [relative_error(tl.cp_to_tensor(c), tensor) for c in candidates]
    weights, factors = candidates[errors.index(min(errors))]
    return weights, list(factors)


def _staged_als(tensor, rank, init, *, n_iter_max, ridge, tol, linesearch, random_state):
    n = tensor.dim()
    # Gram matrices of the other factors scale as ||T||^(2(n-1)/n) once the terms are
    # balanced, so this makes the ridge independent of the kernel's magnitude.
    scale = float(torch.linalg.vector_norm(tensor)) ** (2 * (n - 1) / n)
    current = init
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        # The SVD initialisation asks for more vectors than a small mode has; TensorLy
        # completes them randomly and warns each time.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        for penalty in ridge:
            current = parafac(
                tensor,
                rank,
                n_iter_max=n_iter_max,
                tol=tol,
                init=current,
                l2_reg=penalty * scale,
                linesearch=linesearch,
                random_state=random_state,
                normalize_factors=False,
            )
    weights, factors = current
    return weights, list(factors)


def tucker(
    kernel: torch.Tensor,
    rank: Sequence[int],
    *,
    n_iter_max: int = 100,
    tol: float = 1e-5,
    precision: Optional[str] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Tucker decomposition of the leading ``len(rank)`` modes of a kernel (HOOI).

    The remaining modes are kept whole. Ranks must already be clipped to the kernel
    (:func:`~tt_conv.rank.clip_tucker_rank`): TensorLy pads larger ranks with noise.

    Returns
    -------
    core : torch.Tensor
        Shape ``(*rank, *kernel.shape[len(rank):])``.
    factors : list of torch.Tensor
        ``(dim_i, rank_i)`` orthonormal matrices for the decomposed modes.
    """
    tensor = _prepare(kernel, precision)
    modes = list(range(len(rank)))
    if all(r == n for r, n in zip(rank, tensor.shape)):
        # Full rank: the identity factors are exact, and no SVD is needed.
        eye = [torch.eye(n, dtype=tensor.dtype, device=tensor.device) for n in rank]
        return tensor.clone(), eye
    with tl.backend_context("pytorch"):
        (core, factors), _ = partial_tucker(
            tensor, rank=list(rank), modes=modes, n_iter_max=n_iter_max, tol=tol, init="svd"
        )
    return core, list(factors)


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
