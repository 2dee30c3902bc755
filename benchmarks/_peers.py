"""tensorly-torch as a benchmark peer: its ``FactorizedConv.from_conv`` at a parameter budget.

Shared by the compression benchmarks. tensorly-torch has no rank selection, so every layer
gets one rank fraction, the largest whose total fits the budget (found by bisection on the
parameter counts of layers built without decomposing, then decomposed once).
"""

from __future__ import annotations

import copy
from typing import Dict, Sequence, Tuple

import torch
from torch import nn

from tt_conv.profile import count_parameters, set_submodule


def tltorch_compress(model: nn.Module, names: Sequence[str], factorization: str,
                     budget: float, dense_rest: int = 0) -> Tuple[nn.Module, float]:
    """A copy of ``model`` whose convolutions ``names`` are tensorly-torch factorized convs
    holding together, with ``dense_rest`` parameters of the other convolutions, at most
    ``budget`` parameters; and the rank fraction used."""
    import tltorch

    modules = dict(model.named_modules())
    fixed = {"fixed_rank_modes": "spatial"} if factorization == "tucker" else {}

    def build(fraction: float, decompose: bool) -> Dict[str, nn.Module]:
        return {
            name: tltorch.FactorizedConv.from_conv(
                modules[name], rank=fraction, factorization=factorization,
                implementation="factorized", decompose_weights=decompose, **fixed)
            for name in names
        }

    lo, hi = 1e-4, 1.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        total = dense_rest + sum(count_parameters(l) for l in build(mid, False).values())
        lo, hi = (mid, hi) if total <= budget else (lo, mid)
    compressed = copy.deepcopy(model)
    torch.manual_seed(0)
    for name, layer in build(lo, True).items():
        set_submodule(compressed, name, layer)
    return compressed, lo
