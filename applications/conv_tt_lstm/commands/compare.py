"""``compare``: parameters and FLOPs of ConvLSTM, full higher-order ConvLSTM and Conv-TT-LSTM.

For one architecture (the paper's by default) the three cell types are built with the same
blocks, hidden channels and kernel, and their parameters and FLOPs per sequence are measured
on a real rollout with ``torch.utils.flop_counter``. The table is printed as markdown; the
numbers can also be written as JSON.
"""

from __future__ import annotations

import argparse
import json
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
    arch.add_argument("--layers-per-block", type=int, nargs="+", default=[3], metavar="N",
                      help="cells per block: one count for every block, or one per block "
                           "(default: 3)")
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


def run(args) -> int:
    from ..complexity import compare_cells, comparison_markdown, comparison_payload
    from ..files import write_json_atomic
    from ..model import ArchitectureConfig

    sequence = dict(input_frames=args.input_frames, future_frames=args.future_frames,
                    height=args.height, width=args.width)
    try:
        if args.height % args.patch_size or args.width % args.patch_size:
            raise ValueError(f"--height {args.height} and --width {args.width} must be "
                             f"divisible by --patch-size {args.patch_size}")
        config = ArchitectureConfig(
            cell=args.cells[0], image_channels=args.image_channels,
            hidden_channels=tuple(args.hidden_channels),
            layers_per_block=tuple(args.layers_per_block) if len(args.layers_per_block) > 1
            else args.layers_per_block[0], skip_stride=args.skip_stride,
            kernel_size=args.kernel_size, order=args.order, steps=args.steps,
            rank=args.rank, patch_size=args.patch_size)
        results = compare_cells(config, args.cells, backward=not args.no_backward,
                                device=args.device, **sequence)
    except (ValueError, RuntimeError) as error:
        raise CommandError(f"compare: {error}") from None
    payload = comparison_payload(config, results, **sequence)
    if args.json:
        write_json_atomic(args.json, payload)
    if args.format == "json":
        print(json.dumps(payload, indent=2))
    else:
        print(comparison_markdown(results, **sequence))
    sys.stdout.flush()
    return 0
