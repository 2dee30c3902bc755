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
import os
from pathlib import Path

from ..cli import CommandError
from .prepare import positive


def register(subparsers) -> None:
    """Add this command's parser to ``subparsers`` (see ``cli.py``)."""
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
    run_group.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
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


def _distributed_setup(device_arg):
    """(device, rank, world size), joining the process group when run under torchrun."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device_arg in (None, "cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    if device_arg is not None and device_arg != "cuda":
        device = torch.device(device_arg)
    elif device_arg == "cuda" or torch.cuda.is_available():
        # Each rank its own GPU.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, rank, world


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.factory import DatasetSpec, build_video_dataset, sample_shape
    from ..data.sequence_files import DatasetFileError
    from ..evaluation import evaluate, evaluation_loader, first_batch_predictions
    from ..inference import load_model
    from ..metrics import FrameMetrics
    from ..model import CheckpointError
    from ..precision import check_precision

    device, rank, world = _distributed_setup(args.device)
    try:
        check_precision(args.precision, device)
        model, info = load_model(args.checkpoint, device=device,
                                 output_sigmoid=True if args.release_output_sigmoid else None)
    except (CheckpointError, ValueError) as error:
        raise CommandError(str(error)) from None
    config = model.config
    try:
        spec = DatasetSpec(
            name=args.dataset, data_root=args.data_root, input_frames=args.input_frames,
            future_frames=args.future_frames, image_size=args.image_size, digits=args.digits,
            seed=args.seed, lengths=None if args.sequences is None else {args.split: args.sequences},
            mnist_dir=args.mnist_dir, kth_val_persons=tuple(args.kth_val_persons),
        )
        dataset = build_video_dataset(spec, args.split)
    except (FileNotFoundError, DatasetFileError, ValueError) as error:
        raise CommandError(str(error)) from None
    channels, height, width = sample_shape(dataset)[1:]
    if channels != config.image_channels:
        raise CommandError(f"the model takes {config.image_channels} channel(s), the "
                           f"{args.dataset} frames have {channels}")
    if height % config.patch_size or width % config.patch_size:
        raise CommandError(f"{height} x {width} frames are not divisible by the model's "
                           f"patch_size {config.patch_size}; choose another --image-size")

    out_dir = args.out or args.checkpoint.parent / (
        f"eval-{args.dataset}-{args.split}-{args.input_frames}to{args.future_frames}")
    metrics = FrameMetrics.create(device, ssim_data_range=args.ssim_data_range, lpips=args.lpips)
    if args.lpips and metrics.lpips is None and rank == 0:
        print(f"note: {metrics.notes[0]}")
    loader = evaluation_loader(dataset, args.batch_size, num_workers=args.workers,
                               pin_memory=device.type == "cuda")
    context = dict(
        checkpoint=str(args.checkpoint), checkpoint_layout=info["layout"],
        architecture=info["architecture"], parameters=info["parameters"],
        dataset=spec.to_dict(), split=args.split, device_name=str(device), world_size=world,
    )
    summaries = evaluate(
        model, loader, input_frames=args.input_frames, future_frames=args.future_frames,
        metrics=metrics, device=device, precision=args.precision, max_batches=args.max_batches,
        progress=not args.no_progress and rank == 0, trivial=True, **context,
    )
    if rank == 0:
        figures = first_batch_predictions(
            model, evaluation_loader(dataset, args.figure_samples, rank=0, world_size=1),
            input_frames=args.input_frames, future_frames=args.future_frames, device=device,
            precision=args.precision, max_samples=args.figure_samples)
        paths = write_evaluation(out_dir, summaries, figures, args)
        print(comparison_table(summaries))
        for path in paths:
            print(f"wrote {path}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


#: Columns of the comparison table: (summary key, title).
_COMPARED = (("mse_x1e3", "MSE x1e3"), ("mse_sum", "MSE / frame"), ("mae", "MAE"),
             ("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips_x1e3", "LPIPS x1e3"))
_LABELS = {"model": "model", "last_frame": "repeat last input frame", "black_frame": "black frame"}


def comparison_table(summaries) -> str:
    """Markdown: the mean of each metric for the model and the trivial predictors."""
    first = summaries["model"]
    keys = [(k, t) for k, t in _COMPARED if k in first["metrics"]]
    lines = ["| predictor | " + " | ".join(t for _, t in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for name, summary in summaries.items():
        cells = [f"{summary['metrics'][k]['mean']:.4f}" for k, _ in keys]
        lines.append(f"| {_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        f"\n\n{first['n_sequences']} sequences, {first['input_frames']} -> "
        f"{first['future_frames']} frames; means over sequences and future frames.\n")


def write_evaluation(out_dir: Path, summaries, figures, args) -> list:
    """metrics.json, metrics.md, curves.png, predictions.png and predictions.gif in ``out_dir``."""
    from ..atomic import write_json_atomic, write_text_atomic
    from ..metrics import markdown_table
    from ..plots import plot_metric_curves, save_prediction_gif, save_prediction_grid

    out_dir = Path(out_dir)
    model = summaries["model"]
    horizon = f"{args.input_frames} -> {args.future_frames}"
    title = f"{Path(args.checkpoint).name} on {args.dataset} {args.split}, {horizon}"
    markdown = [f"# {title}", "", comparison_table(summaries),
                markdown_table(model, "model")]
    for name in ("last_frame", "black_frame"):
        markdown.append(markdown_table(summaries[name], _LABELS[name]))
    inputs, truth, prediction = figures
    paths = [
        write_json_atomic(out_dir / "metrics.json", summaries),
        write_text_atomic(out_dir / "metrics.md", "\n".join(markdown)),
        plot_metric_curves(out_dir / "curves.png",
                           {_LABELS[name]: summary for name, summary in summaries.items()},
                           title=title),
        save_prediction_grid(out_dir / "predictions.png", inputs, truth, prediction,
                             max_samples=args.figure_samples, title=title),
        save_prediction_gif(out_dir / "predictions.gif", inputs, truth, prediction,
                            max_samples=args.figure_samples),
    ]
    return paths
