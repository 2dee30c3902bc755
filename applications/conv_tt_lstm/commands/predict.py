"""``predict CHECKPOINT INPUT``: a checkpoint's predictions of the frames after a user's frames.

INPUT is an ``.npy`` / ``.npz`` file, a folder of frame images (PNG / JPEG, 8 or 16 bit, one
sequence, natural name order) or a video file (mp4, avi, webm, mkv, ... decoded with PyAV:
one sequence, gray from the luma plane for a gray model, every level of a 10/12/16-bit video
kept). Arrays may be ``(T, H, W)``, ``(N, T, H, W)``, ``(N, T, C, H, W)``, the
release's npz (``data``: ``(N, T, H, W, C)``) or the time-first ``mnist_test_seq.npy``, uint8,
uint16 or float in [0, 1] (``--layout`` when the axes are ambiguous). Frames are converted to the
model's channels (RGB <-> gray) and resized: with ``--size`` to that size, else to the
size of the checkpoint's training frames when it records them (ours do); their size must be
divisible by the model's patch size. With ``--input-frames K`` only the first K frames are given to
the model and the following ones, if they cover the whole horizon, are drawn as the truth.

Writes to --out: predictions.npy (float32 ``[N, future, C, H, W]`` in [0, 1]), one PNG per
predicted frame (``frames/seq{n}/frame_{t}.png``, t counting from the first input frame),
predictions.gif (inputs, then predictions), predictions.png (a grid) and predictions.mp4 (the
first sequence's inputs, then its predictions), plus predict.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checks import check_output_folder
from ..cli import CommandError, input_errors
from .prepare import positive


def register(subparsers) -> None:
    """Add this command's parser to ``subparsers`` (see ``cli.py``)."""
    from ..precision import PRECISION_CHOICES
    from ..inference import ARRAY_LAYOUTS

    parser = subparsers.add_parser(
        "predict",
        help="predict the frames after a user's .npy / .npz / folder of frames",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="our checkpoint or the paper release's")
    parser.add_argument("input", type=Path, help=".npy / .npz file, folder of PNG/JPEG frames or a video file")
    parser.add_argument("--future-frames", type=positive, required=True,
                        help="number of frames to predict")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--input-frames", type=positive,
                        help="give the model only the first K frames (default: all)")
    parser.add_argument("--layout", choices=ARRAY_LAYOUTS, default="auto",
                        help="axis order of an array input (default: guessed, see above)")
    parser.add_argument("--size", type=positive, nargs=2, metavar=("H", "W"),
                        help="resize the frames to H x W first (default: the checkpoint's training "
                             "frame size, when it records one)")
    parser.add_argument("--batch-size", type=positive, default=8)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32")
    parser.add_argument("--release-output-sigmoid", action="store_true",
                        help="a release checkpoint trained with a sigmoid output")
    parser.add_argument("--figure-samples", type=positive, default=4,
                        help="sequences drawn in the GIF and grid")
    parser.add_argument("--no-frame-pngs", action="store_true", help="skip the per-frame PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference import predict_file

    try:
        check_output_folder("--out", args.out)
        result = predict_file(
            args.checkpoint, args.input, args.future_frames, args.out,
            input_frames=args.input_frames, layout=args.layout, size=args.size,
            batch_size=args.batch_size, device=args.device or "auto", precision=args.precision,
            release_output_sigmoid=args.release_output_sigmoid,
            figure_samples=args.figure_samples, frame_pngs=not args.no_frame_pngs,
            progress=not args.no_progress)
    except input_errors() as error:
        raise CommandError(str(error)) from None
    for note in result.notes:
        print(f"note: {note}")
    print(f"predicted {result.future_frames} frame(s) after {result.input_frames} for "
          f"{result.sequences} sequence(s) of {result.frame_shape}")
    for path in result.written:
        print(f"wrote {path}")
    return 0
