"""Training-step speed of ConvLSTM, full higher-order ConvLSTM and Conv-TT-LSTM networks.

One step = forward rollout with teacher forcing (scheduled sampling), L1 + MSE loss over
every one-step output, backward, Adam. Default: the paper's network, batch 4, 64 x 64,
10 -> 10 frames, 2 CPU threads, float32 and bf16 autocast, the cells' pointwise work fused
(compiled kernels, the library's default) and eager, side by side.

Executions (``--execution``, each cell runs the same one, so the comparison stays fair):

* ``fused``: the library's default: the cells' pointwise work (LSTM step forward and
  backward, tensor-train sums, casts) in compiled kernels (:mod:`tt_conv.pointwise`).
* ``eager``: the same pointwise work op by op (what runs where no compiler exists).
* ``compiled``: every cell's forward compiled whole by ``torch.compile``
  (:func:`tt_conv.compile_cells`, what ``train --compile`` does).

Every (cell, precision) runs in its own worker process (so each has its own peak memory;
it hands freed memory back between steps), and the workers take turns, one step each per
round, together with a dense 5x5 convolution that measures what this machine can do in
the same conditions: noise from other jobs then hits every configuration alike. Reported per configuration: median step time,
sequences per second, FLOPs per step and achieved GFLOP/s (torch.utils.flop_counter, forward
+ backward, 2 FLOPs per multiply-add), that as a fraction of the dense convolution's
throughput, and peak memory (the worker's peak resident set above its size before the first
step).

    python benchmarks/cells.py                  # the full benchmark (minutes)
    python benchmarks/cells.py --smoke          # a seconds-long check that it all runs
    python benchmarks/cells.py --batch 2 4 16   # the issue's three batch sizes
    python benchmarks/cells.py --cells convttlstm --precisions bf16 --repeats 1
    python benchmarks/cells.py --profile        # + where the time goes, by kind of op

Timings on a shared machine are noisy; compare ratios from one run, not numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CELLS = ("convlstm", "hoconvlstm", "convttlstm")
PRECISIONS = ("fp32", "bf16")
LAYOUTS = ("channels-last", "nchw")
EXECUTIONS = ("fused", "eager", "compiled")
#: The public release's step times on the issue's reference machine (2 cores with AMX), for
#: the paper configuration, batch 4, 64 x 64, 10 -> 10 (REFERENCE.md section 4).
RELEASE_SECONDS = {("convttlstm", "fp32"): 24.1, ("convttlstm", "bf16"): 7.7,
                   ("convlstm", "fp32"): 26.3, ("convlstm", "bf16"): 6.7}
#: Goals of issue 12 for Conv-TT-LSTM, per precision: fraction of the dense convolution's
#: throughput (at least), step time over ConvLSTM's (at most), speed-up over the release's
#: Conv-TT-LSTM step (at least; batch 4 only, where the release was timed).
GOALS = {"fp32": dict(fraction=0.75, vs_convlstm=0.75, vs_release=1.3),
         "bf16": dict(fraction=0.60, vs_convlstm=0.75, vs_release=2.5)}

#: Kinds of op in the ``--profile`` table (by profiler key; self time).
_CONV_KEYS = ("convolution", "conv2d", "conv3d", "conv1d")
# Only the ops that move data: aten::to / contiguous that return their input are free.
_COPY_KEYS = ("aten::copy_",)
_COMPILED_KEYS = ("Compiled", "compiled", "inductor", "cpp_fused", "triton_")
_POINTWISE_KEYS = ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::sigmoid",
                   "aten::tanh", "aten::addcmul", "aten::where", "aten::fill_", "aten::zero_",
                   "aten::abs", "aten::sgn", "aten::pow", "aten::sqrt", "aten::lerp",
                   "aten::mse", "aten::l1", "aten::sum", "aten::mean", "aten::neg",
                   "aten::exp", "aten::clamp", "aten::_foreach", "aten::sigmoid_backward",
                   "aten::tanh_backward", "aten::threshold")


def _op_kind(key: str) -> str:
    if any(k in key for k in _CONV_KEYS):
        return "convolution"
    if key == "aten::cat":
        return "cat"
    if key in _COPY_KEYS:
        return "copy / cast"
    if any(k in key for k in _COMPILED_KEYS):
        return "fused kernels"
    if any(key.startswith(k) for k in _POINTWISE_KEYS):
        return "pointwise"
    return "other"


OP_KINDS = ("convolution", "fused kernels", "pointwise", "copy / cast", "cat", "other")


# ---------------------------------------------------------------------------- workers


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _release_memory() -> None:
    """Give freed heap memory back to the system (glibc), so idle workers stay small."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _model_worker(connection, spec: dict) -> None:
    """Builds one network and runs training steps on request ("flops", "step", "memory")."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    import tt_conv
    from applications.conv_tt_lstm.model import VideoPredictionNetwork, paper_config

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    config = paper_config(spec["cell"], **spec["arch"])
    model = VideoPredictionNetwork(config, channels_last=spec["channels_last"])
    execution = spec["execution"]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    frames = torch.rand(spec["batch"], spec["input_frames"] + spec["future_frames"],
                        config.image_channels, spec["size"], spec["size"])
    generator = torch.Generator().manual_seed(1)
    bf16 = spec["precision"] == "bf16"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = model(frames, spec["future_frames"], teacher_forcing=True,
                            sampling_ratio=spec["sampling_ratio"], all_outputs=True,
                            generator=generator).float()
        target = frames[:, 1:]
        loss = F.l1_loss(outputs, target) + F.mse_loss(outputs, target)
        loss.backward()
        optimizer.step()

    baseline = _rss_bytes()
    connection.send(("ready", sum(p.numel() for p in model.parameters())))
    while True:
        command = connection.recv()
        if command == "flops":
            # The maths' FLOPs, counted eager (the same for every execution), then the first
            # step of the execution itself: kernel creation and compilation.
            tt_conv.set_pointwise(model, "eager")
            with FlopCounterMode(display=False) as counter:
                step()
            tt_conv.set_pointwise(model, "eager" if execution == "eager" else "auto")
            if execution == "compiled":
                tt_conv.compile_cells(model)
            start = time.perf_counter()
            step()
            warm_up = time.perf_counter() - start
            _release_memory()
            connection.send((counter.get_total_flops(), warm_up))
        elif command == "profile":
            connection.send(_profile(step))
        elif command == "step":
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            _release_memory()
            connection.send(elapsed)
        elif command == "memory":
            connection.send((baseline, _peak_rss_bytes()))
        else:
            connection.close()
            return


def _profile(step) -> dict:
    """Self time and calls of one step by kind of op (``OP_KINDS``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as trace:
        step()
    kinds = {kind: {"seconds": 0.0, "calls": 0} for kind in OP_KINDS}
    for event in trace.key_averages():
        if event.key.startswith("autograd::engine") or event.key.startswith("ProfilerStep"):
            continue
        kind = kinds[_op_kind(event.key)]
        kind["seconds"] += event.self_cpu_time_total / 1e6
        kind["calls"] += event.count
    _release_memory()
    return kinds


def _dense_worker(connection, spec: dict) -> None:
    """Times a large dense 5x5 convolution, forward + backward, fp32 and bf16."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    batch, channels, size, k = spec["dense_batch"], spec["dense_channels"], spec["dense_size"], 5
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = (torch.randn(channels, channels, k, k) * 0.02).requires_grad_()
    flops = 3 * 2 * batch * channels * channels * k * k * size * size  # fwd + bwd data/weight

    def run(precision: str) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            start = time.perf_counter()
            y = F.conv2d(x, weight, padding=k // 2)
        y.sum().backward()
        elapsed = time.perf_counter() - start
        x.grad = weight.grad = None
        return flops / elapsed

    for precision in PRECISIONS:
        run(precision)  # warm-up: oneDNN builds its kernels
    connection.send(("ready", flops))
    while True:
        command = connection.recv()
        if command == "step":
            # Best of three: the machine's capability, not a victim of a noisy moment.
            connection.send({p: max(run(p) for _ in range(3)) for p in PRECISIONS})
        else:
            connection.close()
            return


# ---------------------------------------------------------------------------- driver


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--batch", type=int, nargs="+", default=[4],
                        help="batch size(s); several are measured one after the other")
    parser.add_argument("--execution", nargs="+", choices=EXECUTIONS,
                        default=["fused", "eager"],
                        help="how the cells run (default: fused and eager, side by side)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step per configuration: time and calls by "
                             "kind of op (convolutions, fused kernels, pointwise, casts, cat)")
    parser.add_argument("--size", type=int, default=64, help="frame height and width")
    parser.add_argument("--input-frames", type=int, default=10)
    parser.add_argument("--future-frames", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3,
                        help="past states of Conv-TT-LSTM / higher-order ConvLSTM (paper: 3)")
    parser.add_argument("--hidden-channels", type=int, nargs="+", default=None,
                        help="hidden channels per block (default: the paper's 32 48 48 32)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed steps per configuration (median and best reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sampling-ratio", type=float, default=0.5,
                        help="scheduled-sampling ratio of the training step")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["channels-last"],
                        help="activation memory layouts to measure (default channels-last)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, one repeat: check that everything runs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.size, args.input_frames, args.future_frames = [1], 16, 2, 2
        args.repeats = 1
        args.hidden_channels = args.hidden_channels or [8, 8]
    if min(args.batch) < 1:
        parser.error("--batch must be >= 1")
    for name in ("size", "input_frames", "future_frames", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _start(context, target, spec):
    parent, child = context.Pipe()
    process = context.Process(target=target, args=(child, spec), daemon=True)
    process.start()
    child.close()
    return process, parent


def run_benchmark(args, batch: int) -> dict:
    """Every configuration at one batch size, interleaved with the dense convolution."""
    from tqdm import tqdm

    load_at_start = os.getloadavg()
    arch = {"steps": args.steps}
    if args.hidden_channels:
        arch["hidden_channels"] = tuple(args.hidden_channels)
    base = dict(threads=args.threads, batch=batch, size=args.size,
                input_frames=args.input_frames, future_frames=args.future_frames, arch=arch,
                sampling_ratio=args.sampling_ratio)
    configs = [(cell, precision, layout, execution) for cell in args.cells
               for precision in args.precisions for layout in args.layouts
               for execution in args.execution]
    context = mp.get_context("spawn")
    workers = {}
    try:
        dense_spec = dict(threads=args.threads, dense_batch=4, dense_channels=128,
                          dense_size=64)
        if args.smoke:
            dense_spec.update(dense_channels=32, dense_size=16)
        workers["dense"] = _start(context, _dense_worker, dense_spec)
        for cell, precision, layout, execution in configs:
            workers[cell, precision, layout, execution] = _start(
                context, _model_worker,
                dict(base, cell=cell, precision=precision, execution=execution,
                     channels_last=layout == "channels-last"))
        parameters = {}
        for key, (_, pipe) in workers.items():
            _, value = pipe.recv()
            if key != "dense":
                parameters[key] = value
        flops, warm_up, times, dense = {}, {}, {key: [] for key in configs}, []
        # FLOP count, then a warm-up step (oneDNN kernel creation, compilation).
        for key in tqdm(configs, desc=f"batch {batch}: FLOP count + warm-up", leave=False):
            workers[key][1].send("flops")
            flops[key], warm_up[key] = workers[key][1].recv()
        for _ in tqdm(range(args.repeats), desc=f"batch {batch}: rounds"):
            workers["dense"][1].send("step")
            dense.append(workers["dense"][1].recv())
            for key in configs:
                workers[key][1].send("step")
                times[key].append(workers[key][1].recv())
        profiles = {}
        if args.profile:
            for key in tqdm(configs, desc=f"batch {batch}: profile", leave=False):
                workers[key][1].send("profile")
                profiles[key] = workers[key][1].recv()
        memory = {}
        for key in configs:
            workers[key][1].send("memory")
            memory[key] = workers[key][1].recv()
    finally:
        for process, pipe in workers.values():
            try:
                pipe.send("stop")
            except (BrokenPipeError, OSError):
                pass
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
    dense_gflops = {p: statistics.median(d[p] for d in dense) / 1e9 for p in PRECISIONS}
    dense_best = {p: max(d[p] for d in dense) / 1e9 for p in PRECISIONS}
    rows = []
    for key in configs:
        cell, precision, layout, execution = key
        seconds, best = statistics.median(times[key]), min(times[key])
        baseline, peak = memory[key]
        rows.append(dict(
            cell=cell, precision=precision, layout=layout, execution=execution,
            batch=batch, parameters=parameters[key], warm_up_seconds=warm_up[key],
            median_seconds=seconds, min_seconds=best, all_seconds=times[key],
            sequences_per_second=batch / seconds, flops_per_step=flops[key],
            gflops_per_second=flops[key] / seconds / 1e9,
            best_gflops_per_second=flops[key] / best / 1e9,
            fraction_of_dense=flops[key] / seconds / 1e9 / dense_gflops[precision],
            best_fraction_of_dense=flops[key] / best / 1e9 / dense_best[precision],
            peak_memory_mb=(peak - baseline) / 2 ** 20, peak_rss_mb=peak / 2 ** 20,
            profile=profiles.get(key)))
    return dict(
        batch=batch,
        setup=dict(vars(args), machine=platform.machine(), processor=_cpu_name(),
                   cpu_count=os.cpu_count(), torch=_torch_version(),
                   load_average_at_start=load_at_start, load_average_at_end=os.getloadavg()),
        dense_conv=dict(shape=f"batch {dense_spec['dense_batch']}, "
                              f"{dense_spec['dense_channels']} -> "
                              f"{dense_spec['dense_channels']} channels, "
                              f"{dense_spec['dense_size']} x {dense_spec['dense_size']}, 5 x 5, "
                              "channels-last, forward + backward",
                        gflops_per_second=dense_gflops, best_gflops_per_second=dense_best,
                        rounds=[{p: v / 1e9 for p, v in d.items()} for d in dense]),
        results=rows,
    )


def _torch_version() -> str:
    import torch

    return torch.__version__


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _is_paper_setup(args) -> bool:
    return (args.size, args.input_frames, args.future_frames, args.steps) == \
        (64, 10, 10, 3) and not args.hidden_channels


def _check(value: float, goal: float, at_least: bool) -> str:
    met = value >= goal if at_least else value <= goal
    return "met" if met else "NOT met"


def report(result: dict, args) -> str:
    """Markdown tables and goal lines of one batch size's :func:`run_benchmark` result."""
    from applications.conv_tt_lstm.model import CELL_NAMES

    batch = result["batch"]
    rows = result["results"]
    by_key = {(r["cell"], r["precision"], r["layout"], r["execution"]): r for r in rows}
    dense = result["dense_conv"]
    setup = result["setup"]
    lines = [
        f"Training step (forward + backward + Adam): batch {batch}, "
        f"{args.size} x {args.size}, {args.input_frames} -> {args.future_frames}, "
        f"{args.threads} threads, {args.repeats} timed step(s) per configuration, "
        f"interleaved; {setup['processor']}, {setup['cpu_count']} cores, torch "
        f"{setup['torch']}; load average at start / end "
        f"{setup['load_average_at_start'][0]:.1f} / {setup['load_average_at_end'][0]:.1f}.",
        f"Dense 5x5 conv in the same run ({dense['shape']}), median / best: "
        + ", ".join(f"{p} {dense['gflops_per_second'][p]:.0f} / "
                    f"{dense['best_gflops_per_second'][p]:.0f} GFLOP/s" for p in PRECISIONS),
        "",
        "| model | precision | layout | execution | median step (s) | best step (s) "
        "| sequences/s | GFLOP/step | GFLOP/s median / best | of dense conv median / best "
        "| peak memory (MB) | time / ConvLSTM median / best | first step (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reference = by_key.get(("convlstm", r["precision"], r["layout"], r["execution"]))
        ratio = (f"{r['median_seconds'] / reference['median_seconds']:.2f} / "
                 f"{r['min_seconds'] / reference['min_seconds']:.2f}") if reference else "-"
        lines.append(
            f"| {CELL_NAMES[r['cell']]} | {r['precision']} | {r['layout']} | {r['execution']} "
            f"| {r['median_seconds']:.2f} | {r['min_seconds']:.2f} "
            f"| {r['sequences_per_second']:.3f} | {r['flops_per_step'] / 1e9:.0f} "
            f"| {r['gflops_per_second']:.0f} / {r['best_gflops_per_second']:.0f} "
            f"| {100 * r['fraction_of_dense']:.0f} % / {100 * r['best_fraction_of_dense']:.0f} % "
            f"| {r['peak_memory_mb']:.0f} | {ratio} | {r['warm_up_seconds']:.1f} |")
    lines.append("")
    for cell in args.cells:
        for layout in args.layouts:
            for execution in args.execution:
                fp32 = by_key.get((cell, "fp32", layout, execution))
                bf16 = by_key.get((cell, "bf16", layout, execution))
                if fp32 and bf16:
                    lines.append(
                        f"{CELL_NAMES[cell]} ({layout}, {execution}): bf16 is "
                        f"{fp32['median_seconds'] / bf16['median_seconds']:.2f}x (median) / "
                        f"{fp32['min_seconds'] / bf16['min_seconds']:.2f}x (best) faster "
                        f"than fp32.")
            fused = [by_key.get((cell, p, layout, "fused")) for p in args.precisions]
            for precision, row in zip(args.precisions, fused):
                for other in ("eager", "compiled"):
                    base = by_key.get((cell, precision, layout, other))
                    if row and base:
                        lines.append(
                            f"{CELL_NAMES[cell]} ({precision}, {layout}): fused is "
                            f"{base['median_seconds'] / row['median_seconds']:.2f}x (median) "
                            f"/ {base['min_seconds'] / row['min_seconds']:.2f}x (best) "
                            f"faster than {other}.")
    if args.profile:
        lines += ["", "Where the time goes (one profiled step, self time by kind of op; "
                      "'fused kernels' are the compiled pointwise kernels):", "",
                  "| model | precision | execution | " + " | ".join(
                      f"{k} s (%) / calls" for k in OP_KINDS) + " |",
                  "|---|---|---|" + "---|" * len(OP_KINDS)]
        for r in rows:
            kinds = r["profile"]
            total = sum(k["seconds"] for k in kinds.values()) or 1.0
            lines.append(
                f"| {CELL_NAMES[r['cell']]} | {r['precision']} | {r['execution']} | "
                + " | ".join(f"{kinds[k]['seconds']:.2f} ({100 * kinds[k]['seconds'] / total:.0f}"
                             f" %) / {kinds[k]['calls']}" for k in OP_KINDS) + " |")
    lines.append(
        "\nFLOPs: torch.utils.flop_counter over forward + backward (2 per multiply-add; "
        "optimiser and pointwise ops not counted), the same maths for every execution. Peak "
        "memory: peak resident set of the configuration's worker above its size before the "
        "first step. The median is the typical step under the machine's current load, the "
        "best the least disturbed one; 'of dense conv' compares each with the dense "
        "convolution's median / best. 'first step' includes kernel creation and compilation.")
    if _is_paper_setup(args) and args.threads == 2:
        lines.append(f"\nGoals of issue 12 at batch {batch} (Conv-TT-LSTM; the release's "
                     "times were taken at batch 4 on the issue's 2-core machine with AMX, so "
                     "that goal is only checked at batch 4 and only means something there):")
        for precision, layout, execution in [(p, l, e) for p in args.precisions
                                             for l in args.layouts for e in args.execution]:
            ours = by_key.get(("convttlstm", precision, layout, execution))
            if ours is None:
                continue
            goal = GOALS[precision]
            where = f"{precision}, {layout}, {execution}"
            fraction = ours["fraction_of_dense"]
            lines.append(f"- {where}: {100 * fraction:.0f} % of the dense conv's throughput "
                         f"(goal >= {100 * goal['fraction']:.0f} %): "
                         f"{_check(fraction, goal['fraction'], True)}")
            convlstm = by_key.get(("convlstm", precision, layout, execution))
            if convlstm:
                ratio = ours["median_seconds"] / convlstm["median_seconds"]
                lines.append(f"- {where}: {ratio:.2f}x ConvLSTM's step (goal <= "
                             f"{goal['vs_convlstm']}x): "
                             f"{_check(ratio, goal['vs_convlstm'], False)}")
            if batch == 4:
                release = RELEASE_SECONDS["convttlstm", precision]
                speedup = release / ours["median_seconds"]
                lines.append(
                    f"- {where}: {ours['median_seconds']:.2f} s vs the release's {release} s "
                    f"= {speedup:.2f}x faster (goal >= {goal['vs_release']}x, i.e. <= "
                    f"{release / goal['vs_release']:.2f} s): "
                    f"{_check(speedup, goal['vs_release'], True)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    results, texts = [], []
    for batch in args.batch:
        result = run_benchmark(args, batch)
        text = report(result, args)
        print(text + "\n", flush=True)
        result["report"] = text
        results.append(result)
        texts.append(text)
    if args.json:
        from applications.conv_tt_lstm.files import write_json_atomic

        write_json_atomic(args.json, results[0] if len(results) == 1 else
                          {"batches": results, "report": "\n\n".join(texts)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
