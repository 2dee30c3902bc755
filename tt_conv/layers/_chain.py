"""Consecutive pointwise stages of a factorized chain, run as one convolution.

Tucker's and TT's chains hold pointwise stages next to each other wherever the kernel has
an axis of size 1: a 1 x 1 kernel runs ``in -> r1 -> r2 -> out`` (Tucker) or ``in -> r1 ->
r2 -> r3 -> out`` (TT), each arrow a 1 x 1 convolution. Two 1 x 1 convolutions in a row
(bias-free, unpadded, the second unstrided, with the same groups) are one 1 x 1 convolution
whose weight is the product of theirs, so the chain can run fewer, cheaper convolutions and
compute the same output. :func:`pointwise_runs` chooses which stages run together,
:func:`merged_specs` gives their geometry and :func:`merge_stage_weights` their weights.
"""

from typing import List, Sequence, Tuple

import torch


def _mergeable(first, second) -> bool:
    """Whether ``second`` run right after ``first`` is one convolution with ``first``'s
    geometry."""
    return (all(k == 1 for k in first.kernel_size) and all(k == 1 for k in second.kernel_size)
            and all(p == 0 for p in first.padding) and all(p == 0 for p in second.padding)
            and all(s == 1 for s in second.stride) and first.groups == second.groups)


def _run_cost(specs, start: int, stop: int, activation_cost: float) -> float:
    """Cost per output position of stages ``start .. stop - 1`` run as one convolution:
    multiply-adds plus a charge per activation read and written."""
    first, last = specs[start], specs[stop - 1]
    macs = first.in_channels * last.out_channels / first.groups
    return macs + activation_cost * (first.in_channels + last.out_channels)


def pointwise_runs(specs: Sequence, activation_cost: float, first_alone: bool = False
                   ) -> List[Tuple[int, int]]:
    """The chain's stages as runs ``(start, stop)`` executed as one convolution each.

    Within every stretch of mergeable stages the grouping of least cost is chosen (a merged
    run is not always cheaper: ``in -> r -> out`` through a small ``r`` costs less than the
    ``in -> out`` product). ``first_alone`` keeps the first stage a run of its own (the
    layer pads explicitly before its second stage).
    """
    n = len(specs)
    # best[i]: least cost of stages 0 .. i - 1 within the current stretch; runs are
    # recovered from the chosen starts.
    best = [0.0] * (n + 1)
    start_of = [0] * (n + 1)
    for stop in range(1, n + 1):
        best[stop] = best[stop - 1] + _run_cost(specs, stop - 1, stop, activation_cost)
        start_of[stop] = stop - 1
        start = stop - 1
        while start > 0 and _mergeable(specs[start - 1], specs[start]) and not (
                first_alone and start - 1 == 0):
            start -= 1
            cost = best[start] + _run_cost(specs, start, stop, activation_cost)
            if cost < best[stop]:
                best[stop], start_of[stop] = cost, start
    runs: List[Tuple[int, int]] = []
    stop = n
    while stop > 0:
        runs.append((start_of[stop], stop))
        stop = start_of[stop]
    return runs[::-1]


def merged_specs(specs: Sequence, runs: Sequence[Tuple[int, int]], spec_class) -> list:
    """The geometry of each run: its first stage's, from its input to its last output."""
    merged = []
    for start, stop in runs:
        first, last = specs[start], specs[stop - 1]
        merged.append(first if stop - start == 1 else spec_class(
            first.in_channels, last.out_channels, first.kernel_size, first.stride,
            first.padding, first.dilation, first.groups))
    return merged


def merge_flops(specs: Sequence, runs: Sequence[Tuple[int, int]]) -> int:
    """FLOPs of the products :func:`merge_stage_weights` forms (two per multiply-add)."""
    total = 0
    for start, stop in runs:
        g = specs[start].groups
        columns = specs[start].in_channels // g
        for k in range(start + 1, stop):
            total += 2 * g * (specs[k].out_channels // g) * (specs[k].in_channels // g) * columns
    return total


def merge_stage_weights(weights: List[torch.Tensor], runs: List[Tuple[int, int]],
                        groups: List[int]) -> List[torch.Tensor]:
    """The weight of each run: the product of its stages' 1 x 1 weights, group by group.

    ``groups[i]`` is stage ``i``'s number of groups (equal within a run).
    """
    out: List[torch.Tensor] = []
    for start, stop in runs:
        weight = weights[start]
        if stop - start > 1:
            g = groups[start]
            product = weight.reshape(g, weight.shape[0] // g, -1)
            for k in range(start + 1, stop):
                nxt = weights[k]
                product = torch.matmul(nxt.reshape(g, nxt.shape[0] // g, -1), product)
            weight = product.reshape([product.shape[0] * product.shape[1], product.shape[2]]
                                     + [1] * (weight.dim() - 2))
        out.append(weight)
    return out
