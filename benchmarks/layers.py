"""Speed of tt-conv's factorized convolutions against the dense conv and tensorly-torch.

For one convolution (by default 128 -> 128 channels, 3x3, padding 1, on a batch of 8
32x32 inputs) factorized at a parameter budget (by default 10% of the dense kernel), this
times, side by side in one run:

* the dense ``nn.Conv2d``;
* tt-conv's CP, Tucker and TT layers (``FactorizedConv.from_conv``), each in its
  ``factorized`` and ``reconstructed`` implementation;
* tensorly-torch's ``FactorizedConv`` at the same ranks (so the same parameter count, up to
  its extra CP weight vector and Tucker spatial factors), each of its implementations
  (``factorized``, ``reconstructed`` and, for CP, ``mobilenet``).

It prints one markdown table: parameters, FLOPs (tt-conv's own ``layer.flops`` and
``torch.utils.flop_counter`` for every path, forward and forward + backward), median
forward (no grad), backward and forward + backward times, and ratios against the dense conv;
then a summary per factorization against the issue's goals. Paths are timed round-robin
(one call of each per round, warm-up rounds excluded) so that load from other processes
falls on all of them alike; timings on a shared machine stay noisy.

Run from the repository root::

    python benchmarks/layers.py [--repeats 20] [--json results.json] [--channels-last]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import tensorly as tl
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tt_conv  # noqa: E402
from tt_conv.files import write_json_atomic  # noqa: E402
from tt_conv.interop import import_tltorch  # noqa: E402

FACTORIZATIONS = ("cp", "tucker", "tt")
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class BenchPath:
    """One way of computing the convolution."""

    def __init__(self, name: str, library: str, factorization: str, implementation: str,
                 module: nn.Module, own_flops: Optional[int] = None):
        self.name = name
        self.library = library
        self.factorization = factorization
        self.implementation = implementation
        self.module = module
        self.own_flops = own_flops  # tt-conv's layer.flops(), forward only
        self.params = sum(p.numel() for p in module.parameters())
        self.times: Dict[str, List[float]] = {"forward": [], "backward": [], "train": []}
        self.flops: Dict[str, int] = {}


# --------------------------------------------------------------------------- building


def tltorch_rank(layer: tt_conv.FactorizedConv):
    """tensorly-torch's rank for the same factor shapes as a tt-conv layer."""
    if layer.factorization == "cp":
        return layer.rank[0]
    if layer.factorization == "tucker":
        # tensorly-torch factorizes every mode: keep the spatial ones full (Tucker-2's shape).
        return (*layer.rank, *layer.kernel_size) if not layer.full_tucker else tuple(layer.rank)
    return [1, *layer.rank, 1]


def build_paths(args, conv: nn.Module, input_shape) -> List[BenchPath]:
    tltorch = import_tltorch()
    paths = [BenchPath("dense", "torch", "-", "dense", conv)]
    for factorization in args.factorizations:
        start = time.perf_counter()
        if args.init == "decompose":
            ours = tt_conv.FactorizedConv.from_conv(conv, factorization=factorization,
                                                    rank=args.rank, implementation="factorized")
        else:
            cls = tt_conv.FactorizedConv.class_for(factorization)
            ours = cls(conv.in_channels, conv.out_channels, conv.kernel_size,
                       stride=conv.stride, padding=conv.padding, bias=conv.bias is not None,
                       rank=args.rank, implementation="factorized")
        built = time.perf_counter() - start
        print(f"[build] tt-conv {factorization}: rank {ours.rank} ({built:.1f} s, "
              f"auto would pick {_auto_choice(ours)!r})", file=sys.stderr)
        for implementation in ("factorized", "reconstructed"):
            layer = copy.deepcopy(ours)
            layer.set_implementation(implementation)
            paths.append(BenchPath(f"tt-conv {factorization} {implementation}", "tt-conv",
                               factorization, implementation, layer,
                               layer.flops(input_shape, implementation, autograd=True)))
        rank = tltorch_rank(ours)
        implementations = ["factorized", "reconstructed"] + (["mobilenet"] if factorization == "cp" else [])
        start = time.perf_counter()
        with tl.backend_context("pytorch"):
            theirs = tltorch.FactorizedConv.from_conv(
                conv, rank=rank, factorization=factorization, implementation="factorized",
                decompose_weights=args.init == "decompose",
            )
        print(f"[build] tensorly-torch {factorization}: rank {theirs.weight.rank} "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        for implementation in implementations:
            layer = copy.deepcopy(theirs)
            layer.implementation = implementation
            layer.forward_fun = tltorch.functional.convolution._get_factorized_conv(
                layer.weight, implementation)
            paths.append(BenchPath(f"tensorly-torch {factorization} {implementation}",
                               "tensorly-torch", factorization, implementation, layer))
    return paths


def _auto_choice(layer: tt_conv.FactorizedConv) -> str:
    probe = copy.deepcopy(layer)
    probe.set_implementation("auto")
    return probe.implementation


# --------------------------------------------------------------------------- measuring


def count_flops(path: BenchPath, x: torch.Tensor, grad: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        y = path.module(x)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        y.backward(grad)
    path.flops = {"forward": forward, "backward": counter.get_total_flops()}
    path.flops["train"] = forward + path.flops["backward"]
    _clear_grads(path.module)


def _clear_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def time_once(path: BenchPath, x: torch.Tensor, grad: torch.Tensor, record: bool) -> None:
    module = path.module
    with torch.no_grad():
        start = time.perf_counter()
        module(x)
        forward = time.perf_counter() - start
    xg = x.detach().requires_grad_(True)
    start = time.perf_counter()
    y = module(xg)
    middle = time.perf_counter()
    y.backward(grad)
    end = time.perf_counter()
    _clear_grads(module)
    if record:
        path.times["forward"].append(forward)
        path.times["backward"].append(end - middle)
        path.times["train"].append(end - start)


def run_rounds(paths: List[BenchPath], x, grad, warmup: int, repeats: int, progress: Callable):
    for round_ in progress(range(warmup + repeats)):
        for path in paths:
            time_once(path, x, grad, record=round_ >= warmup)


def median_ms(values: List[float]) -> float:
    return 1e3 * statistics.median(values)


# --------------------------------------------------------------------------- reporting


def summarize(paths: List[BenchPath], dense_params: int) -> dict:
    dense = paths[0]
    rows = []
    for p in paths:
        t = {k: median_ms(v) for k, v in p.times.items()}
        rows.append({
            "path": p.name, "library": p.library, "factorization": p.factorization,
            "implementation": p.implementation, "params": p.params,
            "param_ratio": dense_params / p.params,
            "flops_forward_own": p.own_flops, "flops_forward": p.flops["forward"],
            "flops_train": p.flops["train"],
            "flop_ratio_train": dense.flops["train"] / p.flops["train"],
            "forward_ms": t["forward"], "backward_ms": t["backward"], "train_ms": t["train"],
            "train_min_ms": 1e3 * min(p.times["train"]),
            "samples_ms": {k: [1e3 * v for v in vals] for k, vals in p.times.items()},
            "speedup_forward": median_ms(dense.times["forward"]) / t["forward"],
            "speedup_train": median_ms(dense.times["train"]) / t["train"],
        })
    goals = []
    factorizations = [f for f in FACTORIZATIONS if any(r["factorization"] == f for r in rows)]
    for f in factorizations:
        ours = [r for r in rows if r["factorization"] == f and r["library"] == "tt-conv"]
        theirs = [r for r in rows if r["factorization"] == f and r["library"] == "tensorly-torch"]
        best_ours = min(ours, key=lambda r: r["train_ms"])
        best_theirs = min(theirs, key=lambda r: r["train_ms"])
        factorized = next(r for r in ours if r["implementation"] == "factorized")
        reduction = factorized["flop_ratio_train"]
        goals.append({
            "factorization": f,
            "our_best": best_ours["path"], "our_best_ms": best_ours["train_ms"],
            "their_best": best_theirs["path"], "their_best_ms": best_theirs["train_ms"],
            "ours_vs_theirs": best_theirs["train_ms"] / best_ours["train_ms"],
            "flop_reduction": reduction,
            "speedup": best_ours["speedup_train"],
            "flop_efficiency": best_ours["speedup_train"] / reduction,
            "goal_faster_than_tltorch": best_ours["train_ms"] <= best_theirs["train_ms"],
            "goal_half_flop_reduction": best_ours["speedup_train"] >= 0.5 * reduction,
        })
    return {"rows": rows, "goals": goals}


def markdown(summary: dict, setup: str) -> str:
    lines = [setup, ""]
    header = ("| path | params | params ÷ | fwd GFLOP (own) | fwd GFLOP (counted) | "
              "fwd+bwd GFLOP | FLOPs ÷ | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd min ms | fwd × | "
              "fwd+bwd × |")
    lines += [header, "|" + "---|" * 13]
    for r in summary["rows"]:
        own = "" if r["flops_forward_own"] is None else f"{r['flops_forward_own'] / 1e9:.3f}"
        lines.append(
            f"| {r['path']} | {r['params']:,} | {r['param_ratio']:.1f} | {own} | "
            f"{r['flops_forward'] / 1e9:.3f} | {r['flops_train'] / 1e9:.3f} | "
            f"{r['flop_ratio_train']:.2f} | {r['forward_ms']:.2f} | {r['backward_ms']:.2f} | "
            f"{r['train_ms']:.2f} | {r['train_min_ms']:.2f} | {r['speedup_forward']:.2f} | "
            f"{r['speedup_train']:.2f} |"
        )
    lines += ["", "Goals (forward + backward): our best path at least as fast as tensorly-torch's "
              "best, and a speedup over dense of at least half the FLOP reduction of our "
              "factorized path.", ""]
    head = ("| factorization | our best | ms | tensorly-torch best | ms | ours ÷ theirs time | "
            "FLOP reduction | speedup | speedup ÷ FLOP reduction | ≥ tltorch | ≥ ½ FLOP reduction |")
    lines += [head, "|" + "---|" * 11]
    for g in summary["goals"]:
        lines.append(
            f"| {g['factorization']} | {g['our_best']} | {g['our_best_ms']:.2f} | "
            f"{g['their_best']} | {g['their_best_ms']:.2f} | {g['ours_vs_theirs']:.2f} | "
            f"{g['flop_reduction']:.2f} | {g['speedup']:.2f} | {g['flop_efficiency']:.2f} | "
            f"{'yes' if g['goal_faster_than_tltorch'] else 'no'} | "
            f"{'yes' if g['goal_half_flop_reduction'] else 'no'} |"
        )
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (tt_conv's one atomic-write path)."""
    write_json_atomic(path, payload)


# --------------------------------------------------------------------------- profiling


def profile_paths(paths: List[BenchPath], x, grad, rows: int) -> str:
    """torch.profiler tables (self CPU time by op and input shape) for tt-conv's paths."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for path in paths:
        if path.library == "torch" or path.implementation == "dense":
            continue
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(3):
                time_once(path, x, grad, record=False)
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40,
            max_shapes_column_width=70)
        out.append(f"### {path.name} (3 forward + 3 forward/backward calls)\n\n```\n{table}\n```")
    return "\n\n".join(out)


# --------------------------------------------------------------------------- main


def _load() -> float:
    """One-minute load average (other processes compete for the cores), NaN if unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on every platform
        return float("nan")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--in-channels", type=int, default=128)
    parser.add_argument("--out-channels", type=int, default=128)
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="spatial size of the input")
    parser.add_argument("--n-dim", type=int, default=2, choices=(1, 2, 3))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=float, default=0.1,
                        help="fraction of the dense kernel's parameters (tt-conv budget rank)")
    parser.add_argument("--factorizations", nargs="+", default=list(FACTORIZATIONS),
                        choices=FACTORIZATIONS)
    parser.add_argument("--init", choices=("decompose", "random"), default="decompose",
                        help="factorize the conv's kernel (from_conv) or draw random factors "
                             "(same shapes, same timings, no decomposition wait)")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--channels-last", action="store_true",
                        help="input, gradient and dense weight in channels-last memory format "
                             "(2-D/3-D)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print torch.profiler tables of each factorized path")
    parser.add_argument("--profile-rows", type=int, default=12)
    args = parser.parse_args(argv)
    for name in ("in_channels", "out_channels", "kernel_size", "size", "batch", "repeats",
                 "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if not 0 < args.rank <= 1:
        parser.error(f"--rank must be a fraction in (0, 1], got {args.rank}")
    if args.channels_last and args.n_dim == 1:
        parser.error("--channels-last needs a 2-D or 3-D convolution")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        from tqdm import tqdm
        progress = lambda it: tqdm(it, desc="rounds", file=sys.stderr)  # noqa: E731
    except ImportError:  # tqdm is in the 'app' extra
        progress = lambda it: it  # noqa: E731

    conv = CONVS[args.n_dim](args.in_channels, args.out_channels, args.kernel_size,
                             padding=args.kernel_size // 2)
    input_shape = (args.batch, args.in_channels, *(args.size,) * args.n_dim)
    paths = build_paths(args, conv, input_shape)
    x = torch.randn(input_shape)
    out_shape = paths[0].module(x).shape
    grad = torch.randn(out_shape)
    if args.channels_last:
        memory_format = torch.channels_last if args.n_dim == 2 else torch.channels_last_3d
        x = x.contiguous(memory_format=memory_format)
        grad = grad.contiguous(memory_format=memory_format)
        # Only the dense conv holds a kernel-shaped weight to convert. Factor tensors are not
        # kernels, and Module.to(memory_format=...) refuses tt-conv's 5-D Tucker core (2-D)
        # and 4-D TT cores (3-D), so the factorized paths get channels-last activations only.
        paths[0].module.to(memory_format=memory_format)

    load_before = _load()
    # tensorly-torch's layers need TensorLy's PyTorch backend; tt-conv's do not care.
    with tl.backend_context("pytorch"):
        for path in paths:
            count_flops(path, x, grad)
        run_rounds(paths, x, grad, args.warmup, args.repeats, progress)
        profile = profile_paths(paths, x, grad, args.profile_rows) if args.profile else None

    dense_params = paths[0].params
    summary = summarize(paths, dense_params)
    setup = (
        f"Conv{args.n_dim}d {args.in_channels} -> {args.out_channels}, kernel "
        f"{args.kernel_size}, input {tuple(input_shape)}, budget rank {args.rank} "
        f"({args.init}), {args.threads} threads, "
        f"{'channels-last' if args.channels_last else 'contiguous'}, median of "
        f"{args.repeats} rounds after {args.warmup} warm-up; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load_before:.1f} before / {_load():.1f} after"
    )
    print(markdown(summary, setup))
    if profile:
        print("\n" + profile)
    payload = {"setup": setup, "args": {k: (str(v) if isinstance(v, Path) else v)
                                        for k, v in vars(args).items()}, **summary}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
