"""``recognize``: early activity recognition, trained and scored from any prefix of a clip.

``recognize [train]`` trains a classifier (``--model convttlstm | convlstm | hoconvlstm |
conv3d``) on whole clips with a loss at every step, then writes top-1 / top-5 accuracy after
the first 25 %, 50 %, 75 % and 100 % of the frames (``--fractions``) to
``runs/NAME/recognition.{json,md}`` and ``accuracy_vs_fraction.png``. ``recognize evaluate
--run runs/NAME`` (or ``--checkpoint FILE``) scores a trained model again, on any split.

Datasets: ``synthetic`` (walls touched by a moving MNIST digit with random turns; offline,
``--preset quick`` takes minutes on 2 CPU cores), ``kth`` (the 6 actions of a ``prepare
kth`` folder) and ``ssv2`` (Something-Something V2's 174 classes). Change any field with
``--set section.field=value`` (sections: model, data, optim, run). ``--resume auto``
continues a killed run exactly; ``torchrun --nproc-per-node N -m applications.conv_tt_lstm
recognize ...`` trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli import CommandError, input_errors, run_training
from .prepare import count, positive


def _fractions(text: str):
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected fractions like 0.25,0.5,0.75,1, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"fractions must lie in (0, 1], got {text!r}")
    return values


def register(subparsers) -> None:
    """Add this command's parser to ``subparsers`` (see ``cli.py``)."""
    from ..precision import PRECISION_CHOICES
    from ..recognition.config import PRESETS

    parser = subparsers.add_parser(
        "recognize", help="early activity recognition: train, and score from 25/50/75/100 %% "
                          "of each clip", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", choices=("train", "evaluate"), default="train",
                        help="train (default; scores at the end) or evaluate a trained run")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="starting configuration (default: quick)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE",
                        help="override any field, e.g. optim.lr=1e-4 (repeatable)")
    common = parser.add_argument_group("common fields (shortcuts for --set)")
    common.add_argument("--model", choices=("convttlstm", "convlstm", "hoconvlstm", "conv3d"))
    common.add_argument("--dataset", choices=("synthetic", "kth", "ssv2"))
    common.add_argument("--data-root", help="KTH: a prepare-kth folder; SSV2: its JSON + videos")
    common.add_argument("--precision", choices=PRECISION_CHOICES,
                        help="fp32, bf16 autocast (CPU or GPU), fp16 autocast + GradScaler (CUDA)")
    common.add_argument("--steps", type=positive, help="optimiser steps")
    common.add_argument("--batch-size", type=positive, help="clips per step per process")
    common.add_argument("--lr", type=float, help="learning rate")
    common.add_argument("--frames", type=positive, help="frames per clip")
    common.add_argument("--fractions", type=_fractions,
                        help="fractions of each clip to score, e.g. 0.25,0.5,0.75,1")
    common.add_argument("--name", help="run name: outputs go to RUNS_DIR/NAME")
    common.add_argument("--runs-dir", help="parent folder of runs (default: runs)")
    common.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    common.add_argument("--threads", type=count,
                        help="torch CPU threads (0: the cores other jobs leave free)")
    common.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile every recurrent cell (the conv3d model: whole)")
    common.add_argument("--resume", help="'auto' (the run's last checkpoint, if any) or a path")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if the run folder holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as JSON and exit")
    scoring = parser.add_argument_group("evaluate")
    scoring.add_argument("--run", type=Path,
                         help="run folder to evaluate (its config.json and checkpoints/)")
    scoring.add_argument("--checkpoint", type=Path,
                         help="checkpoint to evaluate (default: RUN/checkpoints/best.pt, "
                              "else last.pt)")
    scoring.add_argument("--split", help="split to score (default: the config's eval_split)")
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace, base=None):
    """The :class:`~..recognition.config.RecognitionConfig` of the parsed arguments."""
    from ..recognition.config import apply_overrides, preset

    config = base if base is not None else preset(args.preset)
    shortcuts = []
    if base is None and args.dataset and args.dataset != config.data.dataset \
            and args.dataset in ("kth", "ssv2"):
        # Start from that dataset's preset data section (frames, size, split) ...
        data = preset(args.dataset).data
        shortcuts += [f"data.n_frames={data.n_frames}", f"data.frame_size={data.frame_size}",
                      f"data.eval_split={data.eval_split}", f"data.val_clips={data.val_clips}"]
    pairs = [("model.model", args.model), ("data.dataset", args.dataset),
             ("data.root", args.data_root), ("run.precision", args.precision),
             ("run.steps", args.steps), ("data.batch_size", args.batch_size),
             ("optim.lr", args.lr), ("data.n_frames", args.frames),
             ("run.fractions", ",".join(str(f) for f in args.fractions)
              if args.fractions else None),
             ("run.name", args.name), ("run.runs_dir", args.runs_dir),
             ("run.device", args.device), ("run.threads", args.threads),
             ("run.compile", args.compile),
             ("run.resume", args.resume)]
    shortcuts += [f"{key}={value}" for key, value in pairs if value is not None]
    if args.no_progress:
        shortcuts.append("run.progress=false")
    if args.dataset in ("kth", "ssv2") and args.data_root is None and base is None:
        shortcuts.append("data.root=none")  # the error below names --data-root
    try:
        return apply_overrides(config, shortcuts + list(args.overrides))
    except ValueError as error:
        raise CommandError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    if args.action == "evaluate":
        return _evaluate(args)
    from ..recognition.evaluate import accuracy_table
    from ..recognition.task import train_recognizer

    result = run_training("recognize", train_recognizer, resolve_config(args), args)
    if result is not None and result.rank == 0:
        print(f"\n{result.step} steps in {result.seconds:.0f} s; "
              f"{result.parameters['total']:,} parameters; run folder {result.run_dir}\n")
        print(accuracy_table(result.summary, f"{result.summary['model']} on "
                                             f"{result.summary['dataset']} "
                                             f"{result.summary['split']}"))
        sys.stdout.flush()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ..recognition.config import RecognitionConfig
    from ..recognition.evaluate import accuracy_table
    from ..recognition.task import evaluate_checkpoint

    if args.run is None and args.checkpoint is None:
        raise CommandError("recognize evaluate needs --run RUN_DIR or --checkpoint FILE")
    run_dir = args.run if args.run is not None else args.checkpoint.parent.parent
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise CommandError(f"recognize evaluate: {config_path} not found (the run's resolved "
                           f"configuration, written by recognize train)")
    try:
        base = RecognitionConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise CommandError(f"recognize evaluate: {config_path}: {error}") from None
    config = resolve_config(args, base=base)
    checkpoint = args.checkpoint
    if checkpoint is None:
        best = run_dir / "checkpoints" / "best.pt"
        checkpoint = best if best.is_file() else run_dir / "checkpoints" / "last.pt"
    try:
        summary = evaluate_checkpoint(checkpoint, config, split=args.split, out_dir=run_dir)
    except input_errors() as error:
        raise CommandError(f"recognize evaluate: {error}") from None
    print(accuracy_table(summary, f"{summary['model']} on {summary['dataset']} "
                                  f"{summary['split']} ({checkpoint})"))
    return 0
