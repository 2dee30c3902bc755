"""Time ``tt_conv.compress`` on a torchvision ResNet-50 (random weights, all 53 convolutions).

Issue 3's speed goal: under 30 s each for Tucker with EVBMF ranks and for CP at a quarter of
the parameters, on the project's 2-core CPU machine. With ``--tltorch``, tensorly-torch's
per-layer ``FactorizedConv.from_conv`` (Tucker, the same EVBMF ranks' parameter fraction is
not available to it, so 0.25 of each layer) is timed on the same model in the same run;
its CP is skipped (it does not finish within minutes).

Run from the repository root::

    PYTHONPATH=. python benchmarks/compress_resnet50.py --json benchmarks/results/compress_resnet50.json

The machine may be shared: compare numbers within one run only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

import tt_conv
from tt_conv.files import write_text_atomic

CASES = (("tucker", "evbmf"), ("cp", 0.25), ("tt", 0.25), ("tucker", 0.25))


def resnet50(seed: int = 0) -> nn.Module:
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet50(weights=None).eval()


def time_tltorch_tucker(model: nn.Module, fraction: float) -> float:
    import tltorch

    start = time.perf_counter()
    for _, conv in tt_conv.profile.conv_modules(model):
        if conv.kernel_size != (1, 1):
            tltorch.FactorizedConv.from_conv(conv, rank=fraction, factorization="tucker",
                                             implementation="factorized",
                                             fixed_rank_modes="spatial")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cases", nargs="*", default=None,
                        help="factorization:rank pairs, e.g. tucker:evbmf cp:0.25")
    parser.add_argument("--tltorch", action="store_true", help="also time tensorly-torch Tucker")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = CASES
    if args.cases:
        cases = []
        for text in args.cases:
            factorization, _, rank = text.partition(":")
            cases.append((factorization, rank if rank == "evbmf" else float(rank)))

    model = resnet50()
    n_convs = len(tt_conv.profile.conv_modules(model))
    results = []
    for factorization, rank in cases:
        start = time.perf_counter()
        _, report = tt_conv.compress(model, factorization, rank, progress=False)
        seconds = time.perf_counter() - start
        totals = report.totals()
        results.append({
            "method": "tt_conv.compress", "factorization": factorization, "rank": str(rank),
            "seconds": seconds, "convs": n_convs,
            "layers_factorized": totals["layers_factorized"],
            "conv_params_before": totals["conv_params_before"],
            "conv_params_after": totals["conv_params_after"],
            "mean_kernel_error": sum(r.kernel_error for r in report.layers if r.kernel_error
                                     is not None) / max(1, totals["layers_factorized"]),
        })
        print(f"tt_conv.compress {factorization:6s} rank={str(rank):6s}: {seconds:6.1f} s, "
              f"{totals['layers_factorized']}/{n_convs} layers factorized, conv params "
              f"{totals['conv_params_before']:,} -> {totals['conv_params_after']:,}", flush=True)
    if args.tltorch:
        seconds = time_tltorch_tucker(model, 0.25)
        results.append({"method": "tltorch from_conv (k x k convs only)",
                        "factorization": "tucker", "rank": "0.25", "seconds": seconds})
        print(f"tensorly-torch from_conv tucker 0.25 on the k x k convs: {seconds:.1f} s")
    goal = {f"{r['factorization']}:{r['rank']}": r["seconds"] < 30 for r in results
            if r["method"] == "tt_conv.compress"}
    print("goal (< 30 s each):", ", ".join(f"{k} {'met' if v else 'NOT met'}"
                                             for k, v in goal.items()))
    if args.json:
        write_text_atomic(args.json, json.dumps({"threads": args.threads, "results": results,
                                                  "goal_under_30s": goal}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
