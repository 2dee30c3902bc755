"""The ``tt-conv`` command: compress a saved model, or inspect what compression would save.

::

    tt-conv compress MODEL_FILE --arch timm:resnet18 --rank 0.25 --out OUT --report report.md
    tt-conv inspect MODEL_FILE --arch torchvision:resnet50 [--input-shape 1,3,224,224]
    tt-conv compress WHOLE_MODEL.pt --trust-pickle --out OUT      # runs code from the file

``MODEL_FILE`` is a state_dict or a checkpoint holding one (``state_dict``,
``model_state_dict``, ``model`` or ``state_dict_ema`` entry), read with
``torch.load(weights_only=True)``: no code from the file runs. ``--arch`` names the
architecture its weights belong to (``timm:NAME``, ``torchvision:NAME`` or
``package.module:function``, code from your own environment). A whole model pickled with
``torch.save(model, path)`` loads only with ``--trust-pickle``: unpickling it runs whatever
code the file names, so pass that flag only for files you trust.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import rank as R
from .allocator import retain_freed_memory
from .compress import compress, export
from .equivalent import is_uninitialized_lazy
from .fold import fold_batch_norms
from .layers.base import conv_geometry
from .profile import (
    conv_input_shapes,
    conv_modules,
    count_parameters,
    example_inputs,
    kernel_shape,
    layer_flops,
)
from .files import (
    FileWriteError,
    atomic_torch_save,
    load_pickle,
    load_tensors,
    pickled_globals,
    write_text_atomic,
)

RANK_HELP = (
    "0.25 (fraction of each layer's parameters; 1.0 is a budget of the dense size, not full "
    "rank), 16 or 16,8 (explicit ranks), evbmf, evbmf:W (weakened EVBMF), energy:E, "
    "error:EPS, params:F, flops:F or latency:F (the model's measured time, needs "
    "--input-shape)"
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


#: The entries of a checkpoint dict that may hold the model's state_dict, in this order.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema", "module")

TRUST_PICKLE_HELP = (
    "MODEL_FILE is a whole model pickled with torch.save(model, path): load it with "
    "weights_only=False, which RUNS CODE FROM THE FILE (any Python it names). Only for files "
    "you trust; a state_dict with --arch needs no such trust")
ARCH_HELP = (
    "the architecture MODEL_FILE's state_dict belongs to: timm:NAME, torchvision:NAME or "
    "package.module:function (called with no arguments; code of your environment, not of the "
    "file)")


def build_architecture(spec: str) -> nn.Module:
    """A fresh, randomly initialised model from ``--arch`` text (see ``ARCH_HELP``)."""
    source, _, name = spec.partition(":")
    if not name:
        raise CommandError(f"--arch {spec!r}: expected timm:NAME, torchvision:NAME or "
                           f"package.module:function")
    try:
        if source == "timm":
            import timm

            return timm.create_model(name, pretrained=False)
        if source == "torchvision":
            import torchvision

            return torchvision.models.get_model(name, weights=None)
        import importlib

        builder = getattr(importlib.import_module(source), name)
    except ImportError as error:
        raise CommandError(f"--arch {spec!r}: cannot import {error.name or source!r} "
                           f"({error})") from None
    except (AttributeError, KeyError, ValueError, RuntimeError) as error:
        raise CommandError(f"--arch {spec!r}: no such model ({error})") from None
    model = builder()
    if not isinstance(model, nn.Module):
        raise CommandError(f"--arch {spec!r} returned a {type(model).__name__}, not a "
                           f"torch.nn.Module")
    return model


def _state_dict_of(content, path: str):
    """The state_dict inside a weights-only ``content`` (a state_dict or a checkpoint)."""
    if isinstance(content, dict) and content and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        return content
    if isinstance(content, dict):
        for key in STATE_DICT_KEYS:
            if key in content:
                return _state_dict_of(content[key], path)
    held = type(content).__name__
    if isinstance(content, dict):
        held = f"dict with keys {sorted(map(str, content))[:8]}"
    raise CommandError(f"{path!r} holds a {held}, neither a state_dict nor a checkpoint with "
                       f"one under {'/'.join(STATE_DICT_KEYS)}")


def load_model(path: str, *, arch: Optional[str] = None, trust_pickle: bool = False):
    """The model of ``path`` on the CPU, through the one safe loading path, or a CommandError.

    A state_dict or checkpoint loads with ``weights_only=True`` into the ``arch`` model
    (:func:`build_architecture`); a whole pickled model only with ``trust_pickle``
    (:func:`tt_conv.files.load_pickle`, which runs the file's code).
    """
    if not os.path.isfile(path):
        raise CommandError(f"model file {path!r} does not exist")
    if trust_pickle:
        if arch is not None:
            raise CommandError("--arch builds the model for a state_dict; --trust-pickle loads "
                               "a whole pickled model: give one of them")
        obj = load_pickle(path, error=CommandError)
        if not isinstance(obj, nn.Module):
            hint = (" (a state_dict or checkpoint: load it with --arch instead of "
                    "--trust-pickle)" if isinstance(obj, dict) else "")
            raise CommandError(f"{path!r} holds a {type(obj).__name__}, not a "
                               f"torch.nn.Module{hint}")
        return obj
    try:
        content = load_tensors(path, error=CommandError, what="model file")
    except CommandError as error:
        objects = pickled_globals(path)
        if objects:
            raise CommandError(
                f"{error}. If it is a whole model saved with torch.save(model, path) and you "
                f"trust where it came from, pass --trust-pickle (loading then runs that "
                f"code); otherwise save model.state_dict() and pass --arch") from None
        raise
    state_dict = _state_dict_of(content, path)
    if arch is None:
        raise CommandError(
            f"{path!r} holds a state_dict ({len(state_dict)} tensors): name the architecture "
            f"it belongs to with --arch timm:NAME, torchvision:NAME or package.module:function")
    model = build_architecture(arch)
    prefix = "module."
    if all(k.startswith(prefix) for k in state_dict):  # saved from DistributedDataParallel
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    result = model.load_state_dict(state_dict, strict=False)
    wrong = [f"missing {k}" for k in result.missing_keys] + \
        [f"unexpected {k}" for k in result.unexpected_keys]
    if wrong:
        raise CommandError(f"{path!r} does not fit --arch {arch}: "
                           f"{', '.join(wrong[:8])}{', ...' if len(wrong) > 8 else ''}")
    return model.eval()


def load_calibration(path: Optional[str]):
    if path is None:
        return None
    if not os.path.isfile(path):
        raise CommandError(f"calibration file {path!r} does not exist")
    batch = load_tensors(path, error=CommandError, what="calibration batch")
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(t, torch.Tensor) for t in batch):
        return tuple(batch)
    if not isinstance(batch, torch.Tensor):
        raise CommandError(
            f"calibration file {path!r} must hold a tensor (or a tuple of tensors) saved with "
            f"torch.save, got {type(batch).__name__}"
        )
    return batch


# ----------------------------------------------------------------------------- commands


def check_outputs(model: str, outputs: Sequence[Optional[str]], force: bool) -> None:
    """Refuse outputs that would replace the input model file (without ``--force``) or
    each other."""
    def same(a: str, b: str) -> bool:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
        return os.path.realpath(a) == os.path.realpath(b)

    given = [o for o in outputs if o is not None]
    for i, output in enumerate(given):
        if same(output, model) and not force:
            raise CommandError(f"{output!r} is the input model file: writing there would "
                               f"replace it; choose another path or pass --force")
        if os.path.isdir(output):
            raise CommandError(f"{output!r} is a folder; give a file name")
        for other in given[i + 1:]:
            if same(output, other):
                raise CommandError(f"{output!r} is given for two outputs; give each its own file")


def run_compress(args) -> int:
    check_outputs(args.model, [args.out, args.report], args.force)
    model = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)
    rank = parse_rank_argument(args.rank, args.global_budget, args.min_rank)
    calibration = load_calibration(args.calibration)
    if args.retain_freed_memory:
        try:
            retain_freed_memory()
        except RuntimeError as error:
            raise CommandError(f"--retain-freed-memory: {error}") from None
    try:
        compressed, report = compress(
            model, args.factorization, rank, include=args.include or None,
            exclude=args.exclude or None, input_shape=parse_shape(args.input_shape),
            calibration=calibration, fit=args.fit, strict=args.strict,
            implementation=args.implementation, autocast=args.autocast,
            inplace=True, progress=not args.quiet,
        )
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    folded = []
    if args.fold_batch_norms:
        try:
            compressed, folded = fold_batch_norms(compressed.eval(), inplace=True)
        except ValueError as error:
            raise CommandError(str(error)) from None
    exporting = args.export or args.export_as_executed
    if exporting:
        compressed = export(compressed, inplace=True, as_executed=args.export_as_executed)
    atomic_torch_save(compressed, args.out)
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
        if args.fold_batch_norms:
            print(f"{len(folded)} batch norm(s) folded into the convolutions before them")
        print(f"saved {'plain PyTorch' if exporting else 'tt_conv'} model to {args.out}"
              + (f", report to {args.report}" if args.report else ""))
    return 0


def inspect_rows(model, input_shape=None, progress: bool = True) -> List[dict]:
    """Per convolution: its shape, parameters, FLOPs and what EVBMF ranks would save."""
    shapes = {}
    if input_shape is not None:
        lazy = any(is_uninitialized_lazy(m) for m in model.modules())
        try:  # a first pass initialises lazy convolutions, a second one sees them
            for _ in range(2 if lazy else 1):
                shapes = conv_input_shapes(model, example_inputs(model, input_shape))
        except Exception as error:
            raise CommandError(f"the model could not run on --input-shape {input_shape}: "
                               f"{error}") from None
    for name, module in model.named_modules():
        if is_uninitialized_lazy(module):
            warnings.warn(f"layer {name!r} ({type(module).__name__}) is an uninitialised lazy "
                          f"convolution and is not listed: pass --input-shape so that it is "
                          f"initialised")
    convs = conv_modules(model)
    if not convs:
        raise CommandError(f"the model ({type(model).__name__}) has no convolution to inspect")
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
    check_outputs(args.model, [args.json], force=False)
    model = load_model(args.model, arch=args.arch, trust_pickle=args.trust_pickle)
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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL_FILE and how it loads (``--arch`` / ``--trust-pickle``): one safe path."""
    parser.add_argument("model", metavar="MODEL_FILE",
                        help="a state_dict or checkpoint (with --arch), or a whole pickled "
                             "model (with --trust-pickle)")
    parser.add_argument("--arch", help=ARCH_HELP)
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tt-conv",
        description="Compress the convolutions of a saved PyTorch model with CP, Tucker or "
                    "tensor-train factorizations.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compress", help="factorize a model's convolutions and save it",
                       description="Factorize the convolutions of MODEL_FILE and save the "
                                   "result (a whole model, torch.save(model)). MODEL_FILE is "
                                   "a state_dict with --arch (no code from the file runs), or "
                                   "a whole pickled model with --trust-pickle (runs the "
                                   "file's code).")
    add_model_arguments(c)
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
    c.add_argument("--autocast", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="the precision the model will run in: measured times (latency "
                        "budgets, the execution choice) are taken under that autocast")
    c.add_argument("--retain-freed-memory", action="store_true",
                   help="time (latency budgets, the execution choice) with freed memory kept "
                        "in the process (tt_conv.retain_freed_memory), as a deployment that "
                        "calls it will run")
    c.add_argument("--fold-batch-norms", action="store_true",
                   help="for inference: fold each batch norm into the convolution before it "
                        "(tt_conv.fold_batch_norms); the model is saved in evaluation mode")
    c.add_argument("--export", action="store_true",
                   help="save plain PyTorch modules (loads without tt_conv), one chain per "
                        "factorized layer with its factors' structure and parameters")
    c.add_argument("--export-as-executed", action="store_true",
                   help="save plain PyTorch modules as the factorized layers run for "
                        "inference: consecutive 1 x 1 stages merged into one convolution "
                        "(tt_conv.export(..., as_executed=True))")
    c.add_argument("--report", help="write the report here (.md, .json or text)")
    c.add_argument("--force", action="store_true",
                   help="allow --out to be MODEL_FILE itself (replacing the input)")
    c.add_argument("--quiet", action="store_true", help="no progress bar or table")
    c.set_defaults(func=run_compress)

    i = sub.add_parser("inspect", help="list a model's convolutions and what EVBMF ranks "
                                       "would save per factorization")
    add_model_arguments(i)
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
        except (CommandError, FileWriteError) as error:
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
