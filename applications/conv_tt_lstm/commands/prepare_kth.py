"""``prepare kth``: KTH action videos as gray uint8 arrays, one ``.npy`` per video, and an index."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Tuple

from .prepare import positive


def frame_size(text: str) -> Tuple[int, int]:
    """argparse type: ``S`` (a square) or ``HxW``, positive pixels."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if match is None or int(match.group(1)) < 1 or (match.group(2) and int(match.group(2)) < 1):
        raise argparse.ArgumentTypeError(f"expected a size like 128 or 120x160, got {text!r}")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


def register(subparsers) -> None:
    """Add this command's parser to ``subparsers`` (see ``cli.py``)."""
    from ..data.video import RESAMPLE_FILTERS

    parser = subparsers.add_parser(
        "kth",
        help="KTH action: one gray uint8 .npy per video and kth.json",
        description=(
            "Decode the KTH action videos found in --raw (the 600 AVI files "
            "person{01..25}_{action}_d{1..4}_uncomp.avi, or the JPEG-frames layout "
            "{action}/person{XX}_{action}_d{Y}_uncomp/image_NNNN.jpg; detected), convert them "
            "to gray, resize them, and write {action}/person{XX}_{action}_d{Y}.npy (uint8 "
            "(T, H, W)) and kth.json (person, action, scenario, frames, file per video; failed, "
            "rejected and missing videos) in --out. Re-running keeps complete files and redoes "
            "the rest. A video that cannot be decoded is reported by name and skipped."
        ),
    )
    parser.add_argument("--raw", type=Path, required=True, help="folder holding the KTH videos (any depth)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--size", type=frame_size, default=(128, 128), metavar="S|HxW",
        help="frame size: 128 (default), 120 as in the paper's release, or HxW",
    )
    parser.add_argument(
        "--layout", choices=("auto", "avi", "jpeg"), default="auto",
        help="source layout (default: detect)",
    )
    parser.add_argument(
        "--resample", choices=RESAMPLE_FILTERS, default="bilinear",
        help="resampling filter, antialiased when shrinking (default bilinear)",
    )
    parser.add_argument("--workers", type=positive, default=1, help="decoding processes (default 1)")
    parser.add_argument(
        "--strict", action="store_true",
        help="exit with status 1 if a video failed or a file name did not fit the scheme",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import CommandError
    from ..data.kth import INDEX_FILE, prepare_kth

    if args.out.resolve() == args.raw.resolve():
        raise CommandError("--out must differ from --raw")
    try:
        index = prepare_kth(
            args.raw, args.out, size=args.size, layout=args.layout, resample=args.resample,
            workers=args.workers, progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    counts = index["counts"]
    height, width = index["size"]
    print(
        f"kth: {counts['videos']} videos ({counts['frames']} frames, {height}x{width}, "
        f"{index['layout']} layout) in {args.out}: {counts['written']} written, "
        f"{counts['kept']} already done"
    )
    for entry in index["failed"]:
        print(
            f"warning: failed to decode {entry['name']} ({entry['source']}): {entry['error']}",
            file=sys.stderr,
        )
    for entry in index["rejected"]:
        print(f"warning: ignored {entry['path']}: {entry['reason']}", file=sys.stderr)
    if index["missing"]:
        shown = ", ".join(index["missing"][:10]) + (" ..." if len(index["missing"]) > 10 else "")
        print(f"note: {len(index['missing'])} of the 600 KTH videos not found in {args.raw}: {shown}")
    if index["failed"]:
        print(f"{counts['failed']} video(s) failed and were skipped; listed under 'failed' in the index")
    print(f"index: {args.out / INDEX_FILE}")
    if not counts["videos"]:
        raise CommandError(f"no usable KTH video in {args.raw}: {counts['failed']} failed to "
                           f"decode, {len(index['rejected'])} ignored (see above); nothing to "
                           f"train on")
    return 1 if args.strict and (index["failed"] or index["rejected"]) else 0
