"""Training-step time of a preset at each thread count, on an idle and on a busy machine.

Each fixed thread count is measured, and the adaptive policy of ``run.threads=0``
(``applications/conv_tt_lstm/training/threads.py``), which starts on the idle machine and
must notice the background job by itself.

On a machine whose cores are shared with another job, every parallel region of PyTorch waits
for its slowest thread, and a thread the OS has descheduled makes the whole region wait; a
recurrent network runs thousands of small regions per step. This script measures how much
that costs: the preset's model (``train --preset NAME``) is trained for a few steps at each
thread count, first alone, then beside a deliberate background job (``--load-threads``
threads of matrix products in another process, started and stopped by this script).

    python benchmarks/threads.py                         # quick preset, 1 and 2 threads
    python benchmarks/threads.py --preset quick --threads 1 2 --steps 6 --json threads.json

Reported: median seconds per step, and busy / idle for each thread count. Run it with
nothing else on the machine (the idle rows must be idle).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LOAD = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(384, 384)
print("ready", flush=True)
while True:
    a = torch.tanh(a @ a)
"""


def parse_args(argv=None):
    from applications.conv_tt_lstm.config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    parser.add_argument("--load-threads", type=int, default=2,
                        help="threads of the background job (0: idle rows only)")
    parser.add_argument("--precision", choices=("fp32", "bf16"),
                        help="default: the preset's")
    parser.add_argument("--warmup", type=float, default=8.0,
                        help="seconds of untimed steps before each row")
    parser.add_argument("--recheck", type=float, default=2.0,
                        help="the adaptive policy's seconds between looks at the load")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.steps < 1 or min(args.threads) < 1 or args.load_threads < 0:
        parser.error("--steps and --threads must be >= 1, --load-threads >= 0")
    return args


def _step_function(config, precision: str):
    import torch

    from applications.conv_tt_lstm.model import VideoPredictionNetwork
    from applications.conv_tt_lstm.precision import resolve_precision
    from applications.conv_tt_lstm.prediction import sequence_loss

    torch.manual_seed(0)
    model = VideoPredictionNetwork(config.model, channels_last=config.run.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    data = config.data
    size = data.frame_size or 64
    frames = torch.rand(data.batch_size, data.input_frames + data.future_frames,
                        config.model.image_channels, size, size)

    autocast = resolve_precision(precision, "cpu").autocast

    def step() -> float:
        start = time.perf_counter()
        with autocast():
            outputs = model(frames, data.future_frames, teacher_forcing=True,
                            sampling_ratio=0.5, all_outputs=True)
        loss = sequence_loss(outputs, frames[:, 1:], config.optim)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def _measure(step, policy, steps, warmup_seconds):
    """Seconds of ``steps`` steps after at least ``warmup_seconds`` of warm-up steps
    (kernel creation, compilation, and the adaptive policy's first look at the load)."""
    start = time.perf_counter()
    step()
    while time.perf_counter() - start < warmup_seconds:
        step()
        policy.update()
    seconds, used = [], []
    for _ in range(steps):
        used.append(policy.threads)
        seconds.append(step())
        policy.update()
    return seconds, used


def main(argv=None) -> int:
    from applications.conv_tt_lstm.config import preset
    from applications.conv_tt_lstm.files import write_json_atomic
    from applications.conv_tt_lstm.training.threads import ThreadPolicy

    args = parse_args(argv)
    config = preset(args.preset)
    precision = args.precision or config.run.precision
    if precision == "auto":
        from applications.conv_tt_lstm.precision import fast_precision

        precision = fast_precision("cpu")
    step = _step_function(config, precision)
    import torch

    # The adaptive policy is made once, on the idle machine, and kept for the busy rows.
    policies = [(str(n), ThreadPolicy(n)) for n in args.threads]
    policies.append(("adaptive", ThreadPolicy(0, recheck_seconds=args.recheck)))

    def measure_all(load: str) -> None:
        for name, policy in policies:
            torch.set_num_threads(policy.threads)
            seconds, used = _measure(step, policy, args.steps, args.warmup)
            rows.append(dict(threads=name, used=used, load=load, seconds=seconds))

    rows = []
    measure_all("idle")
    if args.load_threads:
        load = subprocess.Popen([sys.executable, "-c", LOAD, str(args.load_threads)],
                                stdout=subprocess.PIPE, text=True)
        try:
            load.stdout.readline()
            time.sleep(1.0)
            measure_all(f"{args.load_threads}-thread job")
        finally:
            load.kill()
            load.wait()
    idle = {r["threads"]: statistics.median(r["seconds"]) for r in rows if r["load"] == "idle"}
    lines = [f"`train --preset {args.preset}` model, {precision}, one training step "
             f"(batch {config.data.batch_size}), median of {args.steps}; "
             f"{os.cpu_count()} cores",
             "", "| threads | used in the timed steps | machine | s / step "
             "| vs idle, same policy | vs best idle |",
             "|---|---|---|---|---|---|"]
    best = min(idle.values())
    for r in rows:
        median = statistics.median(r["seconds"])
        r["median_seconds"] = median
        used = "/".join(str(n) for n in sorted(set(r["used"])))
        lines.append(f"| {r['threads']} | {used} | {r['load']} | {median:.3f} "
                     f"| {median / idle[r['threads']]:.2f}x | {median / best:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.json:
        write_json_atomic(args.json, dict(setup=vars(args), precision=precision, rows=rows,
                                          report=text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
