"""``prepare DATASET``: write a dataset's fixed, seeded train / val / test files.

Each dataset is a target with its own module in this package, listed in
:data:`PREPARE_TARGETS`; it defines ``register(subparsers)``, adding its parser to the
``prepare`` sub-commands and setting ``func``, like the top-level commands of ``cli.py``.
Adding ``prepare kth`` means appending a ``prepare_kth`` module here.
"""

from __future__ import annotations

import argparse
import importlib
from typing import List

#: Target modules of ``prepare``, in the order ``prepare --help`` lists them.
PREPARE_TARGETS: List[str] = ["prepare_moving_mnist", "prepare_kth"]


def register(subparsers) -> None:
    """Add this command's parser to ``subparsers`` (see ``cli.py``)."""
    parser = subparsers.add_parser(
        "prepare",
        help="write a dataset's fixed train/val/test files",
        description="Write a dataset's fixed, seeded train / val / test files.",
    )
    targets = parser.add_subparsers(dest="dataset", metavar="DATASET")
    for name in PREPARE_TARGETS:
        importlib.import_module(f"{__package__}.{name}").register(targets)

    def needs_target(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=needs_target)


def count(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
