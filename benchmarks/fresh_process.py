"""A compressed model and its dense original timed in fresh processes, with glibc's default
allocator and with :func:`tt_conv.retain_freed_memory`, next to the process that compressed.

The parent compresses a torchvision model with random weights (default: ResNet-18,
``"auto"`` at ``{"latency": 0.5}`` on 8 x 3 x 224 x 224) and times the result against the
dense model side by side (:func:`tt_conv.budget.measure_models_side_by_side`). Then, for
each allocator setting, a fresh Python process loads both models and does the same, and
counts the minor page faults of one forward pass of each. With glibc's default a fresh
process page-faults its activations in on every pass; the process that compressed, its heap
grown by every trial, far less, so a latency budget held there can be missed elsewhere.

Run from the repository root, with nothing else running::

    PYTHONPATH=. python benchmarks/fresh_process.py
    PYTHONPATH=. python benchmarks/fresh_process.py --model resnet50 --rank '{"flops": 0.33, "global": true}'
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tt_conv  # noqa: E402
from tt_conv.budget import example_input, measure_models_side_by_side  # noqa: E402

SETTINGS = ("default", "retained")


def faults_per_pass(model, x, passes: int = 10) -> float:
    """Minor page faults of one forward pass, after three warm-up passes."""
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(passes):
            model(x)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / passes


def measure(dense, compressed, shape) -> dict:
    """Page faults per pass (counted first: the timing's copies grow the heap, after which
    fewer blocks are faulted in), then the two models timed side by side."""
    x = example_input(shape, "cpu", torch.float32)
    faults = {"dense_faults": faults_per_pass(dense, x),
              "compressed_faults": faults_per_pass(compressed, x)}
    dense_s, compressed_s = measure_models_side_by_side([dense, compressed], (x,))
    return {"dense_ms": dense_s * 1e3, "compressed_ms": compressed_s * 1e3,
            "ratio": compressed_s / dense_s, **faults}


def child(folder: str, setting: str, shape, threads: int) -> None:
    torch.set_num_threads(threads)
    if setting == "retained":
        tt_conv.retain_freed_memory()
    # Both files were written by the parent a moment ago: whole pickled modules.
    dense = torch.load(Path(folder) / "dense.pt", weights_only=False).eval()
    compressed = torch.load(Path(folder) / "compressed.pt", weights_only=False).eval()
    print(json.dumps(measure(dense, compressed, shape)))


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a torchvision model name")
    parser.add_argument("--factorization", default="auto")
    parser.add_argument("--rank", default='{"latency": 0.5}', help="compress's rank, as JSON")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.batch, 3, args.size, args.size)
    if args.child:
        child(args.child[0], args.child[1], shape, args.threads)
        return []
    import torchvision

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = getattr(torchvision.models, args.model)(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, report = tt_conv.compress(dense, args.factorization, json.loads(args.rank),
                                              input_shape=shape, progress=False)
    rows = []
    if report.model_latency_after is not None:
        rows.append(("compressing, as reported", "default", {
            "dense_ms": report.model_latency_before * 1e3,
            "compressed_ms": report.model_latency_after * 1e3,
            "ratio": report.model_latency_after / report.model_latency_before}))
    rows.append(("compressing, timed again", "default", measure(dense, compressed, shape)))
    with tempfile.TemporaryDirectory() as folder:
        torch.save(dense, Path(folder) / "dense.pt")
        torch.save(compressed, Path(folder) / "compressed.pt")
        for setting in SETTINGS:
            done = subprocess.run([sys.executable, __file__, "--child", folder, setting,
                                   "--batch", str(args.batch), "--size", str(args.size),
                                   "--threads", str(args.threads)],
                                  capture_output=True, text=True, check=True)
            rows.append(("fresh", setting, json.loads(done.stdout.strip().splitlines()[-1])))
    print(f"{args.model}, {args.factorization} at rank={args.rank}, input {shape}, "
          f"{args.threads} threads, torch {torch.__version__}\n")
    print("| process | allocator | dense ms | compressed ms | compressed / dense "
          "| dense faults per pass | compressed faults per pass |")
    print("|---|---|---|---|---|---|---|")
    for process, setting, r in rows:
        faults = [f"{r[k]:.0f}" if k in r else "" for k in ("dense_faults", "compressed_faults")]
        print(f"| {process} | {setting} | {r['dense_ms']:.1f} | {r['compressed_ms']:.1f} | "
              f"{r['ratio']:.3f} | {faults[0]} | {faults[1]} |")
    return rows


if __name__ == "__main__":
    main()
