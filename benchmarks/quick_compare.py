"""ConvLSTM vs full higher-order ConvLSTM vs Conv-TT-LSTM, trained alike with the quick preset.

Each cell type gets the ``quick`` preset's architecture (blocks, channels, kernel, order,
steps, rank, 4 x 4 folding) and recipe, trains for the same number of steps on the same
generated Moving MNIST stream, and is then scored on the same fixed validation sequences,
10 -> 30 frames (the first 10 predicted frames of that rollout are the 10 -> 10 numbers:
without teacher forcing the rollout does not depend on how far it goes). Printed as one
markdown table: parameters, training time per step, and MSE / SSIM / PSNR for 10 -> 10 and
10 -> 30 (MSE per pixel on [0, 1], x 1e3; SSIM as scikit-image with data_range 1).

    python benchmarks/quick_compare.py                 # the quick preset's steps (long)
    python benchmarks/quick_compare.py --steps 300     # shorter
    python benchmarks/quick_compare.py --steps 2 --sequences 8 --smoke   # a check that it runs

The models train one after another on a shared machine: time per step is noisy, compare
the ratios of one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CELLS = ("convlstm", "hoconvlstm", "convttlstm")


def _arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, help="training steps per model (default: the quick preset's)")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--sequences", type=int, default=256, help="validation sequences")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: the preset's")
    parser.add_argument("--runs-dir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny networks and data: checks that everything runs")
    return parser.parse_args(argv)


def _config(args, cell: str, runs_dir: str):
    from applications.conv_tt_lstm.config import preset

    config = preset("quick")
    run = dataclasses.replace(config.run, name=f"compare-{cell}", runs_dir=runs_dir,
                              steps=args.steps or config.run.steps, val_every=0, log_every=1,
                              checkpoint_every=0, image_every=0, progress=False,
                              final_outputs=False, time_limit=0.0,
                              precision=args.precision or config.run.precision)
    model = config.model.replace(cell=cell)
    data = dataclasses.replace(config.data, val_sequences=args.sequences)
    schedule = config.schedule
    if schedule.sampling == "linear":
        schedule = dataclasses.replace(schedule, linear_end=min(schedule.linear_end,
                                                                int(0.4 * run.steps)))
    if args.smoke:
        model = model.replace(hidden_channels=(4,), layers_per_block=1, rank=2)
        data = dataclasses.replace(data, batch_size=2)
    return dataclasses.replace(config, model=model, run=run, data=data, schedule=schedule)


def _score(model, config, device="cpu"):
    """10 -> 30 summary of ``model`` on the validation sequences (40 frames)."""
    from applications.conv_tt_lstm.data.factory import build_video_dataset
    from applications.conv_tt_lstm.evaluation import evaluate, evaluation_loader
    from applications.conv_tt_lstm.metrics import FrameMetrics
    from applications.conv_tt_lstm.prediction import dataset_spec

    spec = dataset_spec(dataclasses.replace(config.data, future_frames=30))
    loader = evaluation_loader(build_video_dataset(spec, "val"), config.run.val_batch_size)
    return evaluate(model, loader, input_frames=10, future_frames=30,
                    metrics=FrameMetrics.create(device, lpips=False), device=device,
                    precision=config.run.precision)


def _means(summary, frames):
    return {name: statistics.fmean(summary["metrics"][name]["per_frame"][:frames])
            for name in ("mse", "ssim", "psnr")}


def main(argv=None) -> int:
    args = _arguments(argv)
    from applications.conv_tt_lstm.model import CELL_NAMES
    from applications.conv_tt_lstm.prediction import train

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        runs_dir = args.runs_dir or scratch
        for cell in args.cells:
            config = _config(args, cell, runs_dir)
            print(f"training {CELL_NAMES[cell]} for {config.run.steps} steps ...", flush=True)
            result = train(config, overwrite=True)
            log = [json.loads(line) for line in
                   (result.run_dir / "log.jsonl").read_text().splitlines()]
            times = [r["seconds_per_step"] for r in log if r["kind"] == "train" and r["step"] > 1]
            summary = _score(result.model, config)
            rows.append({
                "cell": cell, "model": CELL_NAMES[cell], "steps": result.step,
                "parameters": sum(p.numel() for p in result.model.parameters()),
                "seconds_per_step": statistics.median(times) if times else float("nan"),
                "10->10": _means(summary, 10), "10->30": _means(summary, 30),
            })
    first = _config(args, args.cells[0], ".")
    lines = [
        "| model | parameters | s / step | MSE x1e3 10->10 | SSIM 10->10 | PSNR 10->10 | "
        "MSE x1e3 10->30 | SSIM 10->30 | PSNR 10->30 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["10->10"], r["10->30"]
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['seconds_per_step']:.3f} | "
                     f"{1e3 * a['mse']:.2f} | {a['ssim']:.4f} | {a['psnr']:.2f} | "
                     f"{1e3 * b['mse']:.2f} | {b['ssim']:.4f} | {b['psnr']:.2f} |")
    arch = {k: v for k, v in first.model.to_dict().items() if k != "cell"}
    lines += ["", f"Quick preset architecture ({arch}), {rows[0]['steps']} "
              f"steps of {first.data.batch_size} sequences, {first.run.precision}; "
              f"{args.sequences} fixed validation sequences; s / step is the median training "
              f"step (shared machine: noisy)."]
    print("\n".join(lines))
    if args.json:
        from applications.conv_tt_lstm.files import write_json_atomic

        write_json_atomic(args.json, {"rows": rows, "config": first.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
