"""``predict CHECKPOINT INPUT``: a checkpoint's predictions of the frames after a user's frames.

INPUT is an ``.npy`` / ``.npz`` file or a folder of frame images (PNG / JPEG, one sequence,
natural name order). Arrays may be ``(T, H, W)``, ``(N, T, H, W)``, ``(N, T, C, H, W)``, the
release's npz (``data``: ``(N, T, H, W, C)``) or the time-first ``mnist_test_seq.npy``, uint8
or float in [0, 1] (``--layout`` when the axes are ambiguous). Frames are converted to the
model's channels (RGB <-> gray) and, with ``--size``, resized; their size must be divisible
by the model's patch size. With ``--input-frames K`` only the first K frames are given to
the model and the following ones, if they cover the whole horizon, are drawn as the truth.

Writes to --out: predictions.npy (float32 ``[N, future, C, H, W]`` in [0, 1]), one PNG per
predicted frame (``frames/seq{n}/frame_{t}.png``, t counting from the first input frame),
predictions.gif (inputs, then predictions) and predictions.png (a grid), plus predict.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import CommandError
from .prepare import positive


def register(subparsers) -> None:
    """Add this command's parser to ``subparsers`` (see ``cli.py``)."""
    from ..inference import ARRAY_LAYOUTS

    parser = subparsers.add_parser(
        "predict",
        help="predict the frames after a user's .npy / .npz / folder of frames",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="our checkpoint or the paper release's")
    parser.add_argument("input", type=Path, help=".npy / .npz file or folder of PNG/JPEG frames")
    parser.add_argument("--future-frames", type=positive, required=True,
                        help="number of frames to predict")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--input-frames", type=positive,
                        help="give the model only the first K frames (default: all)")
    parser.add_argument("--layout", choices=ARRAY_LAYOUTS, default="auto",
                        help="axis order of an array input (default: guessed, see above)")
    parser.add_argument("--size", type=positive, nargs=2, metavar=("H", "W"),
                        help="resize the frames to H x W first")
    parser.add_argument("--batch-size", type=positive, default=8)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--release-output-sigmoid", action="store_true",
                        help="a release checkpoint trained with a sigmoid output")
    parser.add_argument("--figure-samples", type=positive, default=4,
                        help="sequences drawn in the GIF and grid")
    parser.add_argument("--no-frame-pngs", action="store_true", help="skip the per-frame PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..atomic import write_json_atomic
    from ..inference import InputFramesError, fit_frames, load_model, predict_frames, read_input_frames
    from ..model import CheckpointError
    from ..precision import check_precision

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        check_precision(args.precision, device)
        model, info = load_model(args.checkpoint, device=device,
                                 output_sigmoid=True if args.release_output_sigmoid else None)
    except (CheckpointError, ValueError) as error:
        raise CommandError(str(error)) from None
    try:
        frames = fit_frames(read_input_frames(args.input, args.layout), model.config,
                            None if args.size is None else tuple(args.size))
    except InputFramesError as error:
        raise CommandError(str(error)) from None
    n_given = frames.shape[1]
    k = n_given if args.input_frames is None else args.input_frames
    if k > n_given:
        raise CommandError(f"--input-frames {k}, but {args.input} holds {n_given} frame(s) per sequence")
    inputs, truth = frames[:, :k], frames[:, k:k + args.future_frames]
    prediction = predict_frames(model, inputs, args.future_frames, batch_size=args.batch_size,
                                device=device, precision=args.precision,
                                progress=not args.no_progress)
    out = Path(args.out)
    written = [write_npy(out / "predictions.npy", prediction.numpy())]
    if not args.no_frame_pngs:
        written.append(write_frame_pngs(out / "frames", prediction, first_number=k + 1))
    written += write_figures(out, inputs, truth, prediction, args.figure_samples)
    write_json_atomic(out / "predict.json", {
        "checkpoint": str(args.checkpoint), "checkpoint_layout": info["layout"],
        "architecture": info["architecture"], "input": str(args.input),
        "sequences": int(inputs.shape[0]), "input_frames": k, "future_frames": args.future_frames,
        "frame_shape": list(inputs.shape[2:]), "precision": args.precision, "device": str(device),
        "predictions": "predictions.npy: float32 [N, future_frames, C, H, W] in [0, 1]",
    })
    written.append(out / "predict.json")
    print(f"predicted {args.future_frames} frame(s) after {k} for {inputs.shape[0]} sequence(s) "
          f"of {tuple(inputs.shape[2:])}")
    for path in written:
        print(f"wrote {path}")
    return 0


def write_npy(path: Path, array) -> Path:
    """``array`` as an .npy file, atomically."""
    import numpy as np

    from ..atomic import atomic_path

    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)


def write_frame_pngs(folder: Path, prediction, first_number: int) -> Path:
    """One 8-bit PNG per predicted frame: ``seq{n:04d}/frame_{t:04d}.png``."""
    import numpy as np
    from PIL import Image

    from ..atomic import atomic_path

    frames = np.rint(prediction.numpy() * 255).astype(np.uint8)  # [N, T, C, H, W]
    for n, sequence in enumerate(frames):
        for t, frame in enumerate(sequence):
            image = frame[0] if frame.shape[0] == 1 else np.moveaxis(frame, 0, -1)
            with atomic_path(folder / f"seq{n:04d}" / f"frame_{first_number + t:04d}.png") as temporary:
                Image.fromarray(image).save(temporary)
    return Path(folder)


def write_figures(out: Path, inputs, truth, prediction, samples: int) -> list:
    """predictions.gif and predictions.png: against the truth when the input holds all of it."""
    from ..plots import save_prediction_gif, save_prediction_grid, save_sequence_figures

    if truth.shape[1] == prediction.shape[1]:
        return [
            save_prediction_gif(out / "predictions.gif", inputs, truth, prediction, max_samples=samples),
            save_prediction_grid(out / "predictions.png", inputs, truth, prediction, max_samples=samples),
        ]
    return save_sequence_figures(out / "predictions.gif", out / "predictions.png", inputs,
                                 prediction, max_samples=samples)
