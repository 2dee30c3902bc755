"""``train``: train a video-prediction network (Moving MNIST or KTH) from a named preset.

Start from a preset (``--preset quick``: minutes on 2 CPU cores; ``paper``: the paper's
network and recipe; ``paper-kth``: the paper's network on prepared KTH), change what you
need with the explicit options or ``--set section.field=value`` (sections: model, data,
optim, schedule, run; e.g. ``--set optim.lr=1e-4 --set model.hidden_channels=32,32``), and
read the result in ``runs/NAME/``. ``--resume auto`` continues a killed run from its last
checkpoint, exactly. Multi-GPU / multi-node: ``torchrun --nproc-per-node N -m
applications.conv_tt_lstm train ...``.
"""

from __future__ import annotations

import argparse
import sys

from ..cli import CommandError, run_training
from .prepare import count, positive

#: ``--model`` names and the cell each builds.
MODEL_NAMES = {"convlstm": "convlstm", "ho-convlstm": "hoconvlstm", "convttlstm": "convttlstm"}


def register(subparsers) -> None:
    """Add this command's parser to ``subparsers`` (see ``cli.py``)."""
    from ..precision import PRECISION_CHOICES
    from ..config import PRESETS

    parser = subparsers.add_parser(
        "train", help="train a video-prediction network (presets: quick, paper, paper-kth)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                        help="starting configuration (default: quick)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE",
                        help="override any field, e.g. optim.lr=1e-4 (repeatable; applied "
                             "after the options below)")
    common = parser.add_argument_group("common fields (shortcuts for --set)")
    common.add_argument("--model", choices=sorted(MODEL_NAMES), help="recurrent cell")
    common.add_argument("--precision", choices=PRECISION_CHOICES,
                        help="fp32, bf16 autocast (CPU or GPU) or fp16 autocast + GradScaler (CUDA)")
    common.add_argument("--steps", type=positive, help="optimiser steps")
    common.add_argument("--batch-size", type=positive, help="sequences per step per process")
    common.add_argument("--lr", type=float, help="learning rate")
    common.add_argument("--dataset", choices=("moving-mnist", "kth"))
    common.add_argument("--data-root", help="prepared data folder (KTH: required)")
    common.add_argument("--name", help="run name: outputs go to RUNS_DIR/NAME (default: the preset's)")
    common.add_argument("--runs-dir", help="parent folder of runs (default: runs)")
    common.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    common.add_argument("--resume", help="'auto' (the run's last checkpoint, if any) or a checkpoint path")
    common.add_argument("--activation-checkpointing", action="store_true", default=None,
                        help="recompute each rollout step in the backward pass (less memory)")
    common.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile every recurrent cell (without it only their "
                             "pointwise work is compiled, where a compiler exists)")
    common.add_argument("--threads", type=count,
                        help="CPU threads (default 0: the cores other jobs leave free, "
                             "re-checked during the run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if the run folder holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as JSON and exit")
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    """The :class:`~..config.TrainConfig` of the parsed arguments."""
    from ..config import apply_overrides, preset

    config = preset(args.preset)
    shortcuts = []
    if args.dataset == "kth" and args.preset != "paper-kth":
        # KTH's frames and protocol differ from Moving MNIST's: start from paper-kth's data.
        kth = preset("paper-kth").data
        shortcuts += [f"data.input_frames={kth.input_frames}",
                      f"data.future_frames={kth.future_frames}"]
    pairs = [("model", "model.cell", MODEL_NAMES.get(args.model)),
             ("precision", "run.precision", args.precision), ("steps", "run.steps", args.steps),
             ("batch_size", "data.batch_size", args.batch_size), ("lr", "optim.lr", args.lr),
             ("dataset", "data.dataset", args.dataset), ("data_root", "data.root", args.data_root),
             ("name", "run.name", args.name), ("runs_dir", "run.runs_dir", args.runs_dir),
             ("device", "run.device", args.device), ("resume", "run.resume", args.resume),
             ("activation_checkpointing", "run.activation_checkpointing",
              args.activation_checkpointing), ("compile", "run.compile", args.compile),
             ("threads", "run.threads", args.threads)]
    shortcuts += [f"{key}={value}" for _, key, value in pairs if value is not None]
    if args.no_progress:
        shortcuts.append("run.progress=false")
    try:
        return apply_overrides(config, shortcuts + list(args.overrides))
    except ValueError as error:
        raise CommandError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    from ..prediction import improvement_table, train

    result = run_training("train", train, resolve_config(args), args)
    if result is not None and result.rank == 0:
        print(f"\n{result.step} steps in {result.seconds:.0f} s; run folder {result.run_dir}\n")
        print(improvement_table(result.summaries))
        sys.stdout.flush()
    return 0
