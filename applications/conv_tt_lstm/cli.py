"""Command line of the Conv-TT-LSTM application.

Each subcommand lives in its own module of :mod:`applications.conv_tt_lstm.commands`, which
defines ``register(subparsers)``: it adds its parser and sets ``func`` to the function that
runs it (taking the parsed arguments, returning an exit status). Modules are listed in
:data:`COMMAND_MODULES`; a command's heavy imports belong inside its function so that
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

#: Subcommand modules, in the order ``--help`` lists them.
COMMAND_MODULES: List[str] = [
    "prepare",
    "compare",
    "convert_nvlabs",
    "evaluate",
    "predict",
    "train",
    "recognize",
]


class CommandError(Exception):
    """A user-facing failure: printed as ``error: ...`` with exit status 2, no traceback."""


def input_errors() -> tuple:
    """The exceptions that mean bad input (each names what to change), not a bug."""
    from .checkpoint import CheckpointError
    from .data.sequence_files import DatasetFileError
    from .data.video import VideoDecodeError
    from .files import FileWriteError
    from .precision import PrecisionError

    return (CheckpointError, FileNotFoundError, DatasetFileError, PrecisionError,
            VideoDecodeError, FileWriteError, ValueError)


def run_training(command: str, train, config, args: argparse.Namespace):
    """What ``train`` and ``recognize`` share: ``--print-config``, or the run of ``config``.

    Returns the run's result (``None`` after ``--print-config``); bad input and a
    diverged run become a :class:`CommandError` naming the command.
    """
    import json

    from .training.loop import NonFiniteLossError

    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return None
    try:
        return train(config, overwrite=args.overwrite)
    except NonFiniteLossError as error:
        raise CommandError(str(error)) from None
    except input_errors() as error:
        raise CommandError(f"{command}: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m applications.conv_tt_lstm",
        description="Convolutional Tensor-Train LSTM: data, training, evaluation and analysis.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"applications.conv_tt_lstm.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
