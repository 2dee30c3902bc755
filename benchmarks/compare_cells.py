"""Does Conv-TT-LSTM beat ConvLSTM with fewer parameters? Four models, trained alike, seeds.

The paper's central claim (REFERENCE.md section 6) tested at a scale two CPU cores can run:
ConvLSTM, the full higher-order ConvLSTM, Conv-TT-LSTM, and a ConvLSTM whose hidden
channels are chosen so that it has about Conv-TT-LSTM's parameter count, each trained with
``--seeds`` seeds on the same generated Moving MNIST stream (same optimiser, schedule,
precision and steps; the seed sets the initial weights and the sampling draws), validated
every ``--val-every`` steps during training (the learning curves), and finally scored on
the same fixed validation sequences at 10 -> 10 and 10 -> 30 (MSE, SSIM, PSNR; LPIPS where
its weights can be loaded). Reported: mean and standard deviation over seeds, per-frame
curves and a learning-curve figure.

Every run is an ordinary training run of the application (``train``) in
``RUNS_DIR/<model>-seed<k>``, resumed with ``--resume auto``: a killed benchmark, started
again with the same arguments, continues where it stopped (finished runs and their scores
are kept in ``scores.json`` beside them and not redone).

    python benchmarks/compare_cells.py --jobs 2             # CPU scale (95 min on 2 cores)
    python benchmarks/compare_cells.py --scale gpu          # the bigger configuration
    python benchmarks/compare_cells.py --smoke --runs-dir /tmp/smoke   # a check that it runs

``--markdown`` writes the tables; ``--figures DIR`` the learning curves and per-frame
curves. Run it on an otherwise idle machine. ``--jobs 2`` trains two runs at a time, each
on its share of the cores: the models are small, so on two cores two one-thread runs get
more done than one two-thread run (the ``s / step`` column is then per one-thread run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from applications.conv_tt_lstm.checkpoint import load_checkpoint  # noqa: E402
from applications.conv_tt_lstm.config import preset  # noqa: E402
from applications.conv_tt_lstm.data.factory import build_video_dataset  # noqa: E402
from applications.conv_tt_lstm.evaluation import evaluate, evaluation_loader  # noqa: E402
from applications.conv_tt_lstm.files import write_json_atomic  # noqa: E402
from applications.conv_tt_lstm.metrics import FrameMetrics  # noqa: E402
from applications.conv_tt_lstm.model import CELL_NAMES, VideoPredictionNetwork  # noqa: E402
from applications.conv_tt_lstm.plots import new_figure, plot_metric_curves, save_figure  # noqa: E402
from applications.conv_tt_lstm.precision import resolve_precision  # noqa: E402
from applications.conv_tt_lstm.prediction import dataset_spec, train  # noqa: E402
from applications.conv_tt_lstm.training.distributed import choose_device  # noqa: E402

#: The models compared: (key, cell, label).
MODELS = (("convlstm", "convlstm", CELL_NAMES["convlstm"]),
          ("hoconvlstm", "hoconvlstm", CELL_NAMES["hoconvlstm"]),
          ("convttlstm", "convttlstm", CELL_NAMES["convttlstm"]),
          ("convlstm-matched", "convlstm", f"{CELL_NAMES['convlstm']}, matched parameters"))

#: Per scale: the architecture and recipe changes on top of the ``quick`` preset.
#: ``cpu``: 4 x 4-folded 64 x 64 frames (16 x 16 x 16), one block of two cells of 16
#: channels, rank 4 (at 16 channels rank 8 would give Conv-TT-LSTM as many parameters as
#: ConvLSTM: 102,880 vs 102,800; rank 4: 75,640), batch 8. ``gpu``: unfolded 64 x 64 frames, the paper's block layout, batch 16.
SCALES = {
    "cpu": dict(model=dict(hidden_channels=(16,), layers_per_block=2, kernel_size=5, order=3,
                           steps=3, rank=4, patch_size=4, skip_stride=0),
                batch_size=8, steps=1400, val_every=200),
    "gpu": dict(model=dict(hidden_channels=(32, 48, 48, 32), layers_per_block=3,
                           kernel_size=5, order=3, steps=3, rank=8, patch_size=1,
                           skip_stride=2),
                batch_size=16, steps=40000, val_every=2000),
    "smoke": dict(model=dict(hidden_channels=(4,), layers_per_block=1, kernel_size=3, order=2,
                             steps=2, rank=2, patch_size=4, skip_stride=0),
                  batch_size=2, steps=4, val_every=2),
}


def _arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny networks: a check that it runs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="training steps per run (default: the scale's)")
    parser.add_argument("--models", nargs="+", choices=[m[0] for m in MODELS],
                        default=[m[0] for m in MODELS])
    parser.add_argument("--sequences", type=int, default=256,
                        help="fixed validation sequences of the final scores")
    parser.add_argument("--curve-sequences", type=int, default=64,
                        help="validation sequences of each learning-curve point")
    parser.add_argument("--precision", default="auto", help="fp32, bf16, fp16 or auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per run (default: the cores left free, or "
                             "the cores divided by --jobs)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at the same time, in separate processes")
    parser.add_argument("--runs-dir", default="runs/compare-cells")
    parser.add_argument("--markdown", help="write the tables here")
    parser.add_argument("--figures", help="write the figures into this folder")
    args = parser.parse_args(argv)
    if args.seeds < 1 or (args.steps is not None and args.steps < 1):
        parser.error("--seeds and --steps must be >= 1")
    if args.jobs < 1 or args.threads < 0:
        parser.error("--jobs must be >= 1 and --threads >= 0")
    if args.jobs > 1 and args.threads == 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    return args


def base_config(args):
    """The ``quick`` preset with the scale's architecture and recipe (no cell chosen yet)."""
    scale = SCALES["smoke" if args.smoke else args.scale]
    config = preset("quick")
    steps = args.steps or scale["steps"]
    model = config.model.replace(**scale["model"])
    data = dataclasses.replace(config.data, batch_size=scale["batch_size"],
                               val_sequences=args.curve_sequences)
    schedule = dataclasses.replace(config.schedule, linear_end=int(0.4 * steps),
                                   warmup_steps=min(config.schedule.warmup_steps, steps // 10))
    run = dataclasses.replace(config.run, steps=steps, val_every=min(scale["val_every"], steps),
                              checkpoint_every=max(1, min(250, steps // 4)), log_every=10,
                              image_every=0, progress=False, final_outputs=False,
                              time_limit=0.0, precision=args.precision, device=args.device,
                              threads=getattr(args, "threads", 0), runs_dir=args.runs_dir,
                              resume="auto")
    return dataclasses.replace(config, model=model, data=data, schedule=schedule, run=run)


def _parameters(model_config) -> int:
    return sum(p.numel() for p in VideoPredictionNetwork(model_config).parameters())


def matched_channels(model_config, target: int) -> tuple:
    """ConvLSTM hidden channels, scaled together, whose parameter count is nearest ``target``."""
    base = model_config.hidden_channels
    best = None
    for numerator in range(1, 4 * max(base) + 1):
        channels = tuple(max(1, round(c * numerator / max(base))) for c in base)
        count = _parameters(model_config.replace(cell="convlstm", hidden_channels=channels))
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (channels, count)
        if count > target:
            break
    return best[0]


def model_configs(config) -> Dict[str, object]:
    """The architecture of every compared model."""
    tt = config.model.replace(cell="convttlstm")
    configs = {key: config.model.replace(cell=cell) for key, cell, _ in MODELS}
    configs["convlstm-matched"] = config.model.replace(
        cell="convlstm", hidden_channels=matched_channels(config.model, _parameters(tt)))
    return configs


def _score(checkpoint: Path, config, sequences: int) -> Dict[str, object]:
    """10 -> 30 summary of a trained model on the fixed validation sequences."""
    device = choose_device(config.run.device)
    model, _ = load_checkpoint(checkpoint, map_location=device)
    model.to(device)
    precision = resolve_precision(config.run.precision, device)
    data = dataclasses.replace(config.data, future_frames=30, val_sequences=sequences)
    loader = evaluation_loader(build_video_dataset(dataset_spec(data), "val"),
                               config.run.val_batch_size)
    return evaluate(model, loader, input_frames=10, future_frames=30,
                    metrics=FrameMetrics.create(device), device=device,
                    precision=precision.name)


def _fingerprint(config) -> Dict[str, object]:
    """What makes two runs the same experiment (the thread count does not)."""
    wanted = config.to_dict()
    wanted["run"] = {k: v for k, v in wanted["run"].items() if k != "threads"}
    return wanted


def train_and_score(key: str, run_config, sequences: int) -> Dict[str, object]:
    """Train (or finish training) one run and score its last checkpoint: its record."""
    result = train(run_config)
    log = [json.loads(line) for line in
           (result.run_dir / "log.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["mse"]) for r in log if r["kind"] == "val"]
    seconds = [r["seconds_per_step"] for r in log if r["kind"] == "train" and r["step"] > 1]
    summary = _score(result.run_dir / "checkpoints" / "last.pt", run_config, sequences)
    return {"model": key, "seed": run_config.run.seed, "config": _fingerprint(run_config),
            "parameters": _parameters(run_config.model), "curve": curve,
            "seconds_per_step": statistics.median(seconds) if seconds else None,
            "summary": summary}


def run_all(args) -> List[Dict[str, object]]:
    """Train and score every model and seed not done yet; return every run's record.

    Only this process writes ``scores.json``, after each finished run, so ``--jobs``
    workers never race on it.
    """
    config = base_config(args)
    configs = model_configs(config)
    runs_dir = Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    scores_path = runs_dir / "scores.json"
    scores = json.loads(scores_path.read_text()) if scores_path.exists() else {}
    pending = []
    for key in args.models:
        for seed in range(args.seeds):
            name = f"{key}-seed{seed}"
            run_config = dataclasses.replace(
                config, model=configs[key],
                run=dataclasses.replace(config.run, name=name, seed=seed))
            if name in scores and scores[name]["config"] == _fingerprint(run_config):
                continue
            print(f"{name}: {_parameters(configs[key]):,} parameters, "
                  f"{config.run.steps} steps", flush=True)
            pending.append((name, key, run_config))

    def finished(name, record):
        scores[name] = record
        write_json_atomic(scores_path, scores)

    if args.jobs == 1:
        for name, key, run_config in pending:
            finished(name, train_and_score(key, run_config, args.sequences))
    else:
        # Spawned workers: each a fresh interpreter with its own torch thread count.
        with concurrent.futures.ProcessPoolExecutor(
                args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_and_score, key, run_config, args.sequences): name
                       for name, key, run_config in pending}
            for future in concurrent.futures.as_completed(futures):
                finished(futures[future], future.result())
                print(f"{futures[future]}: done", flush=True)
    return [scores[f"{key}-seed{seed}"] for key in args.models for seed in range(args.seeds)]


def _frames_mean(summary, name: str, frames: int) -> float:
    return statistics.fmean(summary["metrics"][name]["per_frame"][:frames])


def _spread(values: List[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [scale * v for v in values]
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def tables(records: List[Dict[str, object]], args) -> str:
    """The markdown report: one row per model, mean ± standard deviation over seeds."""
    metrics = [("mse", "MSE x1e3", 1e3, 2), ("ssim", "SSIM", 1.0, 4), ("psnr", "PSNR", 1.0, 2)]
    if all("lpips" in r["summary"]["metrics"] for r in records):
        metrics.append(("lpips", "LPIPS", 1.0, 4))
    header = ["model", "parameters", "s / step"] + [
        f"{label} 10->{n}" for n in (10, 30) for _, label, _, _ in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    labels = {key: label for key, _, label in MODELS}
    for key in args.models:
        group = [r for r in records if r["model"] == key]
        times = [r["seconds_per_step"] for r in group if r["seconds_per_step"]]
        cells = [labels[key], f"{group[0]['parameters']:,}",
                 f"{statistics.median(times):.3f}" if times else "-"]
        for frames in (10, 30):
            for name, _, scale, digits in metrics:
                cells.append(_spread([_frames_mean(r["summary"], name, frames) for r in group],
                                     scale, digits))
        lines.append("| " + " | ".join(cells) + " |")
    config = base_config(args)
    arch = {k: v for k, v in config.model.to_dict().items() if k != "cell"}
    lines += ["", f"{len(records) // len(args.models)} seeds per model, mean ± standard "
              f"deviation over seeds; {config.run.steps} steps of {config.data.batch_size} "
              f"sequences, precision {config.run.precision}; architecture {arch}; "
              f"{args.sequences} fixed validation sequences."]
    return "\n".join(lines)


def figures(records: List[Dict[str, object]], args, folder: Path) -> None:
    """``learning_curves.png`` (validation MSE during training, every seed) and
    ``per_frame.png`` (10 -> 30 per-frame metrics, first seed of each model)."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {key: label for key, _, label in MODELS}
    figure = new_figure(6.0, 4.0)
    axis = figure.subplots()
    for index, key in enumerate(args.models):
        for r in (r for r in records if r["model"] == key):
            steps, mse = zip(*r["curve"]) if r["curve"] else ((), ())
            axis.plot(steps, [1e3 * v for v in mse], color=f"C{index}", alpha=0.8,
                      label=labels[key] if r["seed"] == 0 else None)
    axis.set_xlabel("training step")
    axis.set_ylabel(f"validation MSE x1e3 (10 -> 10, {args.curve_sequences} sequences)")
    axis.grid(True, alpha=0.3)
    save_figure(figure, folder / "learning_curves.png", legend_axis=axis,
                title="Learning curves, every seed")
    plot_metric_curves(folder / "per_frame.png",
                       {labels[r["model"]]: r["summary"] for r in records if r["seed"] == 0},
                       title="10 -> 30, per future frame (seed 0)")


def main(argv=None) -> int:
    args = _arguments(argv)
    records = run_all(args)
    text = tables(records, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.figures:
        figures(records, args, Path(args.figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
