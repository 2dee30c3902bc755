"""``convert-nvlabs IN OUT``: a checkpoint of the paper's public release to our format.

Reads a Conv-TT-LSTM checkpoint in the release's layout (``{"model_state_dict": ...}`` or a
bare state dict, optional ``module.`` prefix, Conv3d or Conv2d window convolutions), infers
the architecture from its shapes and writes our checkpoint (architecture + state dict),
atomically. Load it with ``applications.conv_tt_lstm.checkpoint.load_checkpoint``.
"""

from __future__ import annotations

import argparse

from ..cli import CommandError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert-nvlabs",
        help="convert a checkpoint of the paper's public release to our format",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="IN", help="the release's checkpoint (torch.save file)")
    parser.add_argument("output", metavar="OUT", help="where to write our checkpoint")
    parser.add_argument("--output-sigmoid", action="store_true",
                        help="the network was trained with a sigmoid on its output (the "
                             "official Moving-MNIST and KTH checkpoints were not)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    parser.set_defaults(func=run)


def run(args) -> int:
    import os

    from tt_conv.profile import count_parameters

    from ..checkpoint import CheckpointError, save_checkpoint
    from ..nvlabs import load_nvlabs_checkpoint

    if os.path.exists(args.output) and not args.force:
        raise CommandError(f"{args.output} exists (pass --force to overwrite it)")
    try:
        model = load_nvlabs_checkpoint(args.input, output_sigmoid=args.output_sigmoid)
    except CheckpointError as error:
        raise CommandError(f"{args.input}: {error}") from None
    save_checkpoint(args.output, model, source={"converted_from": os.path.abspath(args.input),
                                                "layout": "NVlabs conv-tt-lstm release"})
    n_params = count_parameters(model)
    print(f"wrote {args.output}: {model.config} ({n_params:,} parameters)")
    return 0
