"""One GPU check of tt-conv, in one call, within 8 minutes: writes gpu_check.json and .md.

Sections (each guarded: a failure is recorded with its error and the next section runs; each
has a time budget, and what does not fit is recorded as skipped):

1. the environment (torch, CUDA, GPU, Triton, whether inductor compiles for CUDA);
2. the CUDA-marked tests (``pytest -m cuda``);
3. training steps of the three cells in the paper configuration at batch 16 (64 x 64,
   10 -> 10), fp16 + GradScaler and bf16, eager / fused / compiled executions
   (``benchmarks/cells.py`` explains them), seconds per step and peak GPU memory;
4. ``torchrun`` with NCCL, world size 1: a few steps of ``train`` on the GPU;
5. ``benchmarks/model_speed.py`` on CUDA: ResNet-50 compressed per factorization to a third
   of its conv FLOPs, inference side by side with dense (fp32, fp16, bf16; batch 1, 8, 64).

    python benchmarks/gpu_check.py --out DIR        # on the GPU machine
    python benchmarks/gpu_check.py --dry-run        # on a CPU: tiny sizes, the same logic

``--dry-run`` runs every section on the CPU at tiny sizes (gloo instead of NCCL, bf16 for
both precisions: CPU autocast has no GradScaler recipe; fp32 for torchrun) to check the
script itself.
``benchmarks/gpu_check.sh`` installs the carried wheels first (see its header).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CELLS = ("convlstm", "hoconvlstm", "convttlstm")
SECTIONS = ("environment", "tests", "steps", "torchrun", "resnet50")
EXECUTIONS = ("eager", "fused", "compiled")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                        help="folder for gpu_check.json / .md (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny sizes: check the script's logic without a GPU")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for the whole check (default 450: under 8 minutes)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--compiled-cells", nargs="*", default=list(CELLS),
                        help="cells also timed with the whole-cell compile")
    parser.add_argument("--only", nargs="+", metavar="SECTION", choices=SECTIONS,
                        help=f"run only these sections (of {', '.join(SECTIONS)})")
    return parser.parse_args(argv)


class Check:
    """Results by section, time budgets, and the files at the end."""

    def __init__(self, args):
        self.args = args
        self.started = time.perf_counter()
        self.results = {"sections": {}}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.started)

    def section(self, key, name, function, share: float):
        """Run ``function(deadline_seconds)`` with ``share`` of the time left."""
        if self.args.only and key not in self.args.only:
            return
        budget = max(0.0, self.left()) * share
        start = time.perf_counter()
        if budget < 5:
            self.results["sections"][name] = {"status": "skipped", "reason": "no time left"}
            return
        print(f"== {name} (budget {budget:.0f} s)", flush=True)
        try:
            value = function(budget)
            entry = {"status": "ok", **(value or {})}
        except Exception as error:  # recorded, and the next section runs
            entry = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc()[-3000:]}
            print(entry["traceback"], flush=True)
        entry["seconds"] = round(time.perf_counter() - start, 1)
        self.results["sections"][name] = entry
        self.write()  # partial results survive a kill

    def write(self):
        self.results["total_seconds"] = round(time.perf_counter() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2))
        (self.out / "gpu_check.md").write_text(markdown(self.results))


# ---------------------------------------------------------------------------- sections


def environment(device) -> dict:
    import torch

    from tt_conv import pointwise

    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "dry_run": device.type != "cuda"}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                    cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    info["inductor_compiles_here"] = pointwise.compiler_available(device.type)
    return info


def cuda_tests(budget: float, dry_run: bool) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
               "tests/test_cuda.py", "tests/test_pointwise.py"]
    env = dict(os.environ, TT_CONV_POINTWISE="auto")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            timeout=budget, env=env)
    tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
    ok = result.returncode in (0, 5) if dry_run else result.returncode == 0
    if not ok:
        raise RuntimeError(f"pytest exited {result.returncode}:\n" + "\n".join(tail))
    return {"summary": tail[-1] if tail else "", "returncode": result.returncode}


def training_steps(budget: float, device, args) -> dict:
    import torch
    import torch.nn.functional as F

    import tt_conv
    from applications.conv_tt_lstm.model import VideoPredictionNetwork, paper_config

    deadline = time.perf_counter() + budget
    dry = device.type != "cuda"
    size, frames_n, batch = (16, 2, 2) if dry else (64, 10, args.batch)
    arch = {"hidden_channels": (8, 8)} if dry else {}
    precisions = ("bf16",) if dry else ("fp16", "bf16")
    rows = []
    # Whole-cell compilation takes the longest: it comes last, Conv-TT-LSTM first in each.
    for execution in EXECUTIONS:
        for cell in ("convttlstm", "convlstm", "hoconvlstm"):
            for precision in precisions:
                if execution == "compiled" and cell not in args.compiled_cells:
                    continue
                row = dict(cell=cell, precision=precision, execution=execution)
                rows.append(row)
                if time.perf_counter() > deadline - 20:
                    row["status"] = "skipped: out of time"
                    continue
                try:
                    row.update(_time_steps(cell, precision, execution, device, size, frames_n,
                                           batch, arch, args.repeats, torch, F, tt_conv,
                                           VideoPredictionNetwork, paper_config))
                    row["status"] = "ok"
                except Exception as error:
                    row["status"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
                finally:
                    if execution == "compiled":
                        torch._dynamo.reset()
                print(row, flush=True)
    return {"batch": batch, "size": size, "frames": f"{frames_n} -> {frames_n}", "rows": rows}


def _time_steps(cell, precision, execution, device, size, frames_n, batch, arch, repeats,
                torch, F, tt_conv, VideoPredictionNetwork, paper_config) -> dict:
    torch.manual_seed(0)
    model = VideoPredictionNetwork(paper_config(cell, **arch)).to(device)
    tt_conv.set_pointwise(model, "eager" if execution == "eager" else "auto")
    if execution == "compiled":
        tt_conv.compile_cells(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    frames = torch.rand(batch, 2 * frames_n, 1, size, size, device=device)
    generator = torch.Generator(device=device).manual_seed(1)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            outputs = model(frames, frames_n, teacher_forcing=True, sampling_ratio=0.5,
                            all_outputs=True, generator=generator).float()
        loss = F.l1_loss(outputs, frames[:, 1:]) + F.mse_loss(outputs, frames[:, 1:])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(loss)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    loss = step()
    synchronize()
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step()
        synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return dict(first_step_seconds=round(first, 2), median_seconds=statistics.median(times),
                min_seconds=min(times), sequences_per_second=batch / statistics.median(times),
                peak_memory_mb=peak, loss=loss)


def torchrun_ddp(budget: float, device) -> dict:
    dry = device.type != "cuda"
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", "1", "-m", "applications.conv_tt_lstm", "train",
                   "--preset", "quick", "--steps", "4", "--device", device.type,
                   "--precision", "fp32" if dry else "bf16", "--name", "ddp", "--runs-dir", runs, "--no-progress",
                   "--set", "run.val_every=0", "--set", "run.checkpoint_every=0",
                   "--set", "run.final_outputs=false", "--set", "data.val_sequences=8",
                   "--set", "run.val_batch_size=8", "--set", "data.batch_size=4"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        if dry:
            env["TT_CONV_POINTWISE"] = "eager"  # a CPU dry run: no kernel compilation
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                timeout=budget, env=env)
        log = Path(runs) / "ddp" / "log.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
    tail = (result.stdout + result.stderr).strip().splitlines()[-12:]
    if result.returncode != 0:
        raise RuntimeError(f"torchrun exited {result.returncode}:\n" + "\n".join(tail))
    return {"backend": "gloo" if dry else "nccl", "world_size": 1, "log_lines": len(lines),
            "last_log": lines[-1] if lines else None}


def compress_resnet50(budget: float, device) -> dict:
    """``benchmarks/model_speed.py`` on the device: ResNet-50 at a third of its conv FLOPs
    per factorization, inference side by side with dense in fp32, fp16 and bf16."""
    import model_speed

    dry = device.type != "cuda"
    argv = (["--size", "64", "--batches", "1", "--precisions", "fp32", "bf16",
             "--factorizations", "tt", "--rounds", "1", "--repeats", "1"] if dry else
            ["--batches", "1", "8", "64", "--precisions", "fp32", "fp16", "bf16",
             "--rounds", "3", "--repeats", "5", "--threads", str(os.cpu_count() or 1)])
    return model_speed.main(argv + ["--device", device.type])


# ---------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    sections = results["sections"]
    lines = ["# tt-conv GPU check", ""]
    env = sections.get("environment", {})
    lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()
                                            if k not in ("status", "seconds")))
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    for name, entry in sections.items():
        status = entry["status"] + (f" ({entry.get('error', entry.get('reason', ''))})"
                                    if entry["status"] != "ok" else "")
        lines.append(f"| {name} | {status[:200]} | {entry.get('seconds', '')} |")
    steps = sections.get("training steps", {})
    if steps.get("rows"):
        lines += ["", f"Training steps, paper network, batch {steps['batch']}, "
                      f"{steps['size']} x {steps['size']}, {steps['frames']}:", "",
                  "| model | precision | execution | median step (s) | sequences/s | first step (s) "
                  "| peak memory (MB) | status |", "|---|---|---|---|---|---|---|---|"]
        for r in steps["rows"]:
            def number(key, fmt):
                return fmt.format(r[key]) if r.get(key) is not None else "-"
            lines.append(f"| {r['cell']} | {r['precision']} | {r['execution']} "
                         f"| {number('median_seconds', '{:.3f}')} "
                         f"| {number('sequences_per_second', '{:.1f}')} "
                         f"| {number('first_step_seconds', '{:.1f}')} "
                         f"| {number('peak_memory_mb', '{:.0f}')} | {r['status'][:80]} |")
    resnet = sections.get("compress ResNet-50", {})
    if resnet.get("status") == "ok":
        import model_speed

        lines += ["", "ResNet-50 compressed to a third of its conv FLOPs "
                      "(benchmarks/model_speed.py):", "", model_speed.format_table(resnet)]
    ddp = sections.get("torchrun", {})
    if ddp.get("status") == "ok":
        lines += ["", f"torchrun world size 1, {ddp['backend']}: {ddp['log_lines']} log lines, "
                      f"last {ddp['last_log']}"]
    lines += ["", f"Total {results.get('total_seconds')} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    check = Check(args)
    check.section("environment", "environment", lambda budget: environment(device), 1.0)
    check.section("tests", "CUDA tests", lambda budget: cuda_tests(budget, args.dry_run), 0.2)
    check.section("steps", "training steps",
                  lambda budget: training_steps(budget, device, args), 0.65)
    check.section("torchrun", "torchrun", lambda budget: torchrun_ddp(budget, device), 0.4)
    check.section("resnet50", "compress ResNet-50",
                  lambda budget: compress_resnet50(budget, device), 1.0)
    check.write()
    print((check.out / "gpu_check.md").read_text())
    failed = [n for n, e in check.results["sections"].items() if e["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
