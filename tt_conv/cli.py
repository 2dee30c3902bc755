"""The ``tt-conv`` command: compress a saved model, or inspect what compression would save.

::

    tt-conv compress MODEL_FILE --rank 0.25 --factorization tucker --out OUT --report report.md
    tt-conv inspect MODEL_FILE [--input-shape 1,3,224,224]

``MODEL_FILE`` is a whole model saved with ``torch.save(model, path)`` (not a state_dict: its
class is needed to rebuild it). Loading unpickles arbitrary code: only load files you trust.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from typing import List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import rank as R
from .compress import compress, export
from .layers.base import conv_geometry
from .profile import (
    conv_input_shapes,
    conv_modules,
    count_parameters,
    example_inputs,
    kernel_shape,
    layer_flops,
)
from .report import write_text_atomic

RANK_HELP = (
    "0.25 (fraction of each layer's parameters), 16 or 16,8 (explicit ranks), evbmf, "
    "evbmf:W (weakened EVBMF), energy:E, error:EPS, params:F, flops:F or latency:F (the "
    "model's measured time, needs --input-shape)"
)


class CommandError(Exception):
    """A user-facing failure: printed as ``error: ...``, exit status 2, no traceback."""


# ----------------------------------------------------------------------------- parsing


def parse_rank_argument(text: str, global_budget: bool = False, min_rank: int = 1):
    """Turn ``--rank`` text (see ``RANK_HELP``) into :func:`tt_conv.compress`'s ``rank``."""
    text = text.strip()
    kind, _, value = text.partition(":")
    kind = kind.lower()
    try:
        if kind in ("params", "flops", "latency", "energy", "error", "evbmf") and (
                value or kind == "evbmf"):
            spec = {kind: float(value) if value else 1.0}
        elif kind == "evbmf":
            spec = {"evbmf": 1.0}
        elif "," in text:
            spec = tuple(int(v) for v in text.split(","))
        elif text.isdigit():
            spec = int(text)
        else:
            spec = {"params": float(text)}
    except ValueError:
        raise CommandError(f"--rank: cannot read {text!r}; expected {RANK_HELP}") from None
    if global_budget or min_rank != 1:
        if not isinstance(spec, dict):
            raise CommandError(
                f"--global and --min-rank need a fraction or a method in --rank, got {text!r}"
            )
        if global_budget:
            spec["global"] = True
        if min_rank != 1:
            spec["min_rank"] = min_rank
    return spec


def parse_shape(text: Optional[str], argument: str = "--input-shape"):
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise CommandError(f"{argument}: expected comma-separated ints such as 1,3,224,224, "
                           f"got {text!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise CommandError(f"{argument}: sizes must be positive, got {text!r}")
    return shape


def load_model(path: str):
    """A whole ``nn.Module`` saved with ``torch.save``, on the CPU, or a CommandError."""
    if not os.path.isfile(path):
        raise CommandError(f"model file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # unpickling fails in many ways
        raise CommandError(
            f"could not load {path!r} with torch.load ({type(error).__name__}: {error}); "
            f"expected a model saved with torch.save(model, path)"
        ) from None
    if not isinstance(obj, nn.Module):
        hint = ""
        if isinstance(obj, dict):
            hint = (" (it looks like a state_dict or checkpoint: build the model, load the "
                    "weights and save the whole model with torch.save(model, path))")
        raise CommandError(
            f"{path!r} holds a {type(obj).__name__}, not a torch.nn.Module{hint}"
        )
    return obj


def load_calibration(path: Optional[str]):
    if path is None:
        return None
    if not os.path.isfile(path):
        raise CommandError(f"calibration file {path!r} does not exist")
    try:
        batch = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CommandError(f"could not load calibration batch {path!r}: {error}") from None
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(batch)
    if not isinstance(batch, torch.Tensor):
        raise CommandError(
            f"calibration file {path!r} must hold a tensor (or a tuple of tensors) saved with "
            f"torch.save, got {type(batch).__name__}"
        )
    return batch


def save_model_atomic(model, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        torch.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- commands


def run_compress(args) -> int:
    model = load_model(args.model)
    rank = parse_rank_argument(args.rank, args.global_budget, args.min_rank)
    calibration = load_calibration(args.calibration)
    try:
        compressed, report = compress(
            model, args.factorization, rank, include=args.include or None,
            exclude=args.exclude or None, input_shape=parse_shape(args.input_shape),
            calibration=calibration, fit=args.fit, strict=args.strict,
            implementation=args.implementation,
            inplace=True, progress=not args.quiet,
        )
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    if args.export:
        compressed = export(compressed, inplace=True)
    save_model_atomic(compressed, args.out)
    if args.report:
        lower = args.report.lower()
        if lower.endswith(".json"):
            report.to_json(args.report)
        elif lower.endswith((".md", ".markdown")):
            report.to_markdown(args.report)
        else:
            write_text_atomic(args.report, str(report) + "\n")
    if not args.quiet:
        print(report)
        print(f"saved {'plain PyTorch' if args.export else 'tt_conv'} model to {args.out}"
              + (f", report to {args.report}" if args.report else ""))
    return 0


def inspect_rows(model, input_shape=None, progress: bool = True) -> List[dict]:
    """Per convolution: its shape, parameters, FLOPs and what EVBMF ranks would save."""
    convs = conv_modules(model)
    if not convs:
        raise CommandError(f"the model ({type(model).__name__}) has no convolution to inspect")
    shapes = {}
    if input_shape is not None:
        try:
            shapes = conv_input_shapes(model, example_inputs(model, input_shape))
        except Exception as error:
            raise CommandError(f"the model could not run on --input-shape {input_shape}: "
                               f"{error}") from None
    rows = []
    for name, conv in tqdm(convs, desc="inspecting", unit="layer",
                           disable=None if progress else True):
        _, kernel, bias = conv_geometry(conv)
        if not bool(kernel.isfinite().all()):
            raise CommandError(f"layer {name!r} has NaN or inf weights")
        params = count_parameters(conv)
        shape = shapes.get(name)
        row = {"name": name, "kernel_shape": list(kernel_shape(conv)), "groups": conv.groups,
               "params": params, "flops": layer_flops(conv, shape) if shape else None,
               "evbmf": {}}
        dims = (kernel.shape[0] // conv.groups, *kernel.shape[1:])
        extra = 0 if bias is None else bias.numel()
        for factorization in R.FACTORIZATIONS:
            ranks = R.evbmf_rank(factorization, kernel, groups=conv.groups, match_tucker=True)
            after = conv.groups * R.n_factor_parameters(factorization, dims, ranks) + extra
            row["evbmf"][factorization] = {"ranks": list(ranks), "params": after,
                                           "reduction": params / after}
        rows.append(row)
    return rows


def run_inspect(args) -> int:
    model = load_model(args.model)
    rows = inspect_rows(model, parse_shape(args.input_shape), progress=not args.quiet)
    header = ["layer", "kernel", "params", "FLOPs", "cp (EVBMF)", "tucker (EVBMF)",
              "tt (EVBMF)"]
    table = []
    for r in rows:
        cells = [r["name"], "x".join(map(str, r["kernel_shape"]))
                 + (f" g{r['groups']}" if r["groups"] > 1 else ""),
                 f"{r['params']:,}", "-" if r["flops"] is None else f"{r['flops']:,}"]
        for factorization in ("cp", "tucker", "tt"):
            e = r["evbmf"][factorization]
            cells.append(f"{','.join(map(str, e['ranks']))}: {e['params']:,} "
                         f"({e['reduction']:.1f}x)")
        table.append(cells)
    total = sum(r["params"] for r in rows)
    summary = [f"{len(rows)} convolutions, {total:,} parameters"]
    for factorization in ("cp", "tucker", "tt"):
        after = sum(min(r["evbmf"][factorization]["params"], r["params"]) for r in rows)
        summary.append(f"  EVBMF {factorization}: {after:,} parameters ({total / after:.1f}x "
                       f"fewer; layers that would not shrink kept dense)")
    widths = [max(len(c) for c in col) for col in zip(header, *table)]
    for cells in [header, ["-" * w for w in widths], *table]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    print("\n".join(summary))
    if args.json:
        write_text_atomic(args.json, json.dumps({"convs": rows}, indent=2) + "\n")
    return 0


# ----------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tt-conv",
        description="Compress the convolutions of a saved PyTorch model with CP, Tucker or "
                    "tensor-train factorizations.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compress", help="factorize a model's convolutions and save it",
                       description="Factorize the convolutions of MODEL_FILE (a whole model "
                                   "saved with torch.save) and save the result.")
    c.add_argument("model", metavar="MODEL_FILE")
    c.add_argument("--out", required=True, help="where to save the compressed model")
    c.add_argument("--factorization", default="tucker", choices=["tucker", "cp", "tt", "auto"])
    c.add_argument("--rank", default="0.25", help=RANK_HELP)
    c.add_argument("--global", dest="global_budget", action="store_true",
                   help="spread a params:/flops: fraction over all layers (shared threshold)")
    c.add_argument("--min-rank", type=int, default=1)
    c.add_argument("--include", nargs="*", help="module-name patterns to compress (default all)")
    c.add_argument("--exclude", nargs="*", help="module-name patterns to leave dense")
    c.add_argument("--input-shape", help="model input shape for FLOPs, e.g. 1,3,224,224")
    c.add_argument("--calibration", help="a tensor batch saved with torch.save, for output "
                                         "errors and a data-aware fit")
    c.add_argument("--fit", default="auto", choices=["auto", "data", "kernel"])
    c.add_argument("--strict", action="store_true",
                   help="fail on a layer that cannot shrink within its budget (default: keep "
                        "it dense and say why)")
    c.add_argument("--implementation", default="auto",
                   choices=["auto", "factorized", "reconstructed"])
    c.add_argument("--export", action="store_true",
                   help="save plain PyTorch modules (loads without tt_conv)")
    c.add_argument("--report", help="write the report here (.md, .json or text)")
    c.add_argument("--quiet", action="store_true", help="no progress bar or table")
    c.set_defaults(func=run_compress)

    i = sub.add_parser("inspect", help="list a model's convolutions and what EVBMF ranks "
                                       "would save per factorization")
    i.add_argument("model", metavar="MODEL_FILE")
    i.add_argument("--input-shape", help="model input shape for FLOPs, e.g. 1,3,224,224")
    i.add_argument("--json", help="also write the listing here as JSON")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=run_inspect)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            status = int(args.func(args) or 0)
        except CommandError as error:
            _print_warnings(caught)
            print(f"error: {error}", file=sys.stderr)
            return 2
    _print_warnings(caught)
    return status


def _print_warnings(caught) -> None:
    seen = set()
    for warning in caught:
        text = str(warning.message)
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
