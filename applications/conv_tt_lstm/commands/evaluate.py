"""``evaluate CHECKPOINT``: a trained network's prediction metrics on a test set, with figures.

Loads one of our checkpoints or one of the paper release's, rolls it out over the chosen
split for any horizon (10 -> 10, 10 -> 30, ...), and measures every future frame of every
sequence on the device, in batches: MSE (per pixel, and summed per frame), MAE, PSNR, SSIM
(scikit-image's definition, data range stated) and LPIPS (AlexNet, when its weights are in
the torch hub cache; otherwise a note says where to put them and the rest is computed). The
trivial predictors (repeat the last input frame; an all-black frame) are measured on the
same sequences. Writes to --out: metrics.json, metrics.md, curves.png (per-frame curves),
predictions.png (inputs / truth / predictions) and predictions.gif.

Under ``torchrun`` the test set is sharded over the ranks and the sums reduced; rank 0
writes the files.
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
    parser = subparsers.add_parser(
        "evaluate",
        help="metrics, curves and GIF of a checkpoint on a test set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="our checkpoint or the paper release's")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=("moving-mnist", "kth"), default="moving-mnist")
    data.add_argument("--data-root", type=Path,
                      help="prepared data: Moving MNIST folder or .npz/.npy file (default: "
                           "generate), KTH folder of `prepare kth` (required)")
    data.add_argument("--split", choices=("test", "val", "train"), default="test")
    data.add_argument("--input-frames", type=positive, default=10)
    data.add_argument("--future-frames", type=positive, default=10,
                      help="horizon: 10 (10 -> 10), 30 (10 -> 30), 20 / 40 for KTH, ...")
    data.add_argument("--sequences", type=positive,
                      help="number of test sequences (generated Moving MNIST: default 5000; "
                           "prepared data: at most this many, evenly spaced; default all)")
    data.add_argument("--image-size", type=positive,
                      help="frame side: the canvas of generated Moving MNIST (default 64), a "
                           "check for prepared data")
    data.add_argument("--digits", type=positive, default=2, help="digits per generated sequence")
    data.add_argument("--seed", type=int, default=0, help="seed of generated Moving MNIST")
    data.add_argument("--mnist-dir", type=Path, help="folder of MNIST IDX files (generated data)")
    data.add_argument("--kth-val-persons", type=int, nargs="+", default=(),
                      help="KTH training persons held out as the 'val' split")
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--batch-size", type=positive, default=16)
    run_group.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    run_group.add_argument("--device", help="default: cuda (this rank's GPU) if available, else cpu")
    run_group.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                           help="autocast of the model's forward (fp16: CUDA only)")
    run_group.add_argument("--max-batches", type=positive, help="stop after this many batches")
    run_group.add_argument("--release-output-sigmoid", action="store_true",
                           help="a release checkpoint trained with a sigmoid output (the "
                                "official ones were not)")
    metric = parser.add_argument_group("metrics")
    metric.add_argument("--ssim-data-range", type=float, choices=(1.0, 2.0), default=1.0,
                        help="1 (correct for [0, 1] frames) or 2 (reproduces the release's "
                             "published SSIM, old scikit-image's float default)")
    metric.add_argument("--lpips", action=argparse.BooleanOptionalAction, default=True,
                        help="LPIPS (AlexNet) when its weights are in the torch hub cache")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path,
                     help="output folder (default: beside the checkpoint, "
                          "eval-DATASET-SPLIT-INtoOUT)")
    out.add_argument("--figure-samples", type=positive, default=4,
                     help="sequences drawn in the grid and GIF")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.factory import DatasetSpec
    from ..evaluation import comparison_table
    from ..prediction import evaluate_checkpoint

    lengths = None if args.sequences is None else {args.split: args.sequences}
    try:
        check_output_folder("--out", args.out)
        spec = DatasetSpec(
            name=args.dataset, data_root=args.data_root, input_frames=args.input_frames,
            future_frames=args.future_frames, image_size=args.image_size, digits=args.digits,
            seed=args.seed, lengths=lengths, mnist_dir=args.mnist_dir,
            kth_val_persons=tuple(args.kth_val_persons))
        result = evaluate_checkpoint(
            args.checkpoint, spec, args.split, out_dir=args.out, batch_size=args.batch_size,
            num_workers=args.workers, device=args.device or "auto", precision=args.precision,
            max_batches=args.max_batches, release_output_sigmoid=args.release_output_sigmoid,
            ssim_data_range=args.ssim_data_range, lpips=args.lpips,
            figure_samples=args.figure_samples, progress=not args.no_progress)
    except input_errors() as error:
        raise CommandError(str(error)) from None
    if result.rank == 0:
        for note in result.notes:
            print(f"note: {note}")
        print(comparison_table(result.summaries))
        for path in result.written:
            print(f"wrote {path}")
    return 0
