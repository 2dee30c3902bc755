"""``compare``: parameters and FLOPs of ConvLSTM, full higher-order ConvLSTM and Conv-TT-LSTM.

For one architecture (the paper's by default) the three cell types are built with the same
blocks, hidden channels and kernel, and their parameters and FLOPs per sequence are measured
on a real rollout with ``torch.utils.flop_counter``. The table is printed as markdown; the
numbers can also be written as JSON.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import CommandError

DEFAULT_CELLS = ("convlstm", "hoconvlstm", "convttlstm")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="parameters and FLOPs of ConvLSTM, higher-order ConvLSTM and Conv-TT-LSTM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    arch = parser.add_argument_group("architecture (default: the paper's)")
    arch.add_argument("--hidden-channels", type=int, nargs="+", default=[32, 48, 48, 32],
                      metavar="H", help="hidden channels per block (default: 32 48 48 32)")
    arch.add_argument("--layers-per-block", type=int, default=3)
    arch.add_argument("--skip-stride", type=int, default=2, help="0: no skip connections")
    arch.add_argument("--kernel-size", type=int, default=5)
    arch.add_argument("--order", type=int, default=3)
    arch.add_argument("--steps", type=int, default=3,
                      help="past states of Conv-TT-LSTM and of the higher-order ConvLSTM")
    arch.add_argument("--rank", type=int, default=8)
    arch.add_argument("--image-channels", type=int, default=1)
    arch.add_argument("--patch-size", type=int, default=1)
    seq = parser.add_argument_group("sequence")
    seq.add_argument("--input-frames", type=int, default=10)
    seq.add_argument("--future-frames", type=int, default=10)
    seq.add_argument("--height", type=int, default=64)
    seq.add_argument("--width", type=int, default=64)
    parser.add_argument("--cells", nargs="+", choices=DEFAULT_CELLS, default=list(DEFAULT_CELLS),
                        help="cell types to compare (default: all three)")
    parser.add_argument("--no-backward", action="store_true",
                        help="skip counting the FLOPs of forward + backward")
    parser.add_argument("--device", default="meta",
                        help="where the counting forward runs (default meta: nothing is "
                             "computed, the counts are the same)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--format", choices=("markdown", "json"), default="markdown",
                        help="what to print (default markdown)")
    parser.set_defaults(func=run)


def _table(results, reference, args) -> str:
    """The markdown table; reduction factors are relative to ``reference``."""
    backward = all(r.training_flops is not None for r in results)
    ref = reference.name if reference else "ref"
    head = ["model", "parameters", f"params / {ref}", "GFLOPs / sequence (fwd)"]
    if backward:
        head.append("GFLOPs / sequence (fwd+bwd)")
    head += ["G multiply-adds / sample / step", f"FLOPs / {ref}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.name, f"{r.parameters:,}",
               f"{r.parameters / reference.parameters:.2f}x" if reference else "-",
               f"{r.forward_flops / 1e9:.1f}"]
        if backward:
            row.append(f"{r.training_flops / 1e9:.1f}")
        row += [f"{r.macs_per_step / 1e9:.2f}",
                f"{r.forward_flops / reference.forward_flops:.2f}x" if reference else "-"]
        lines.append("| " + " | ".join(row) + " |")
    steps = results[0].steps
    notes = [
        "",
        f"One sample, {args.input_frames} -> {args.future_frames} frames "
        f"({steps} recurrent steps), {args.height} x {args.width}. FLOPs counted by "
        "torch.utils.flop_counter on a real rollout: 2 per multiply-add, biases and "
        "pointwise operations not counted.",
        "Multiply-adds per sample per step = forward FLOPs / 2 / steps (the paper release's "
        "convention; it reports 15.88 G for ConvLSTM and 10.76 G for Conv-TT-LSTM).",
    ]
    if reference is not None:
        for r in results:
            if r is not reference:
                notes.append(
                    f"{reference.name} has {r.parameters / reference.parameters:.2f}x fewer "
                    f"parameters and {r.forward_flops / reference.forward_flops:.2f}x fewer "
                    f"FLOPs than {r.name}.")
    return "\n".join(lines + notes)


def run(args) -> int:
    from ..model import ArchitectureConfig
    from ..complexity import measure_complexity
    from ..atomic import write_json_atomic

    results = []
    for cell in args.cells:
        try:
            config = ArchitectureConfig(
                cell=cell, image_channels=args.image_channels,
                hidden_channels=tuple(args.hidden_channels),
                layers_per_block=args.layers_per_block, skip_stride=args.skip_stride,
                kernel_size=args.kernel_size, order=args.order, steps=args.steps,
                rank=args.rank, patch_size=args.patch_size)
            if args.height % args.patch_size or args.width % args.patch_size:
                raise ValueError(f"--height {args.height} and --width {args.width} must be "
                                 f"divisible by --patch-size {args.patch_size}")
            results.append(measure_complexity(
                config, input_frames=args.input_frames, future_frames=args.future_frames,
                height=args.height, width=args.width, backward=not args.no_backward,
                device=args.device))
        except (ValueError, RuntimeError) as error:
            raise CommandError(f"compare: {error}") from None
    reference = next((r for r in results if r.cell == "convttlstm"), None)
    payload = {
        "architecture": {k: v for k, v in config.to_dict().items() if k != "cell"},
        "sequence": {"input_frames": args.input_frames, "future_frames": args.future_frames,
                     "height": args.height, "width": args.width, "batch": 1},
        "flop_convention": "torch.utils.flop_counter: 2 FLOPs per multiply-add, biases and "
                           "pointwise ops not counted; macs_per_step = forward_flops / 2 / steps",
        "results": [r.to_dict() for r in results],
        "reductions_vs_convttlstm": (
            {r.cell: {"parameters": r.parameters / reference.parameters,
                      "forward_flops": r.forward_flops / reference.forward_flops}
             for r in results} if reference else None),
    }
    if args.json:
        write_json_atomic(args.json, payload)
    if args.format == "json":
        import json

        print(json.dumps(payload, indent=2))
    else:
        print(_table(results, reference, args))
    sys.stdout.flush()
    return 0
