"""Inference speed of compressed models against the dense one, measured side by side.

A model (a torchvision ResNet-50 with random weights, or ``--model`` any timm model,
e.g. ``efficientnet_b0``) is compressed once per
factorization with ``tt_conv.compress`` at a rank target (default: a third of its conv
FLOPs, ``rank={"flops": 0.33, "global": True}`` on a 1 x 3 x 224 x 224 input; ``--rank
'{"latency": 0.5}' --compress-batch 8`` asks for half the measured latency at batch 8
instead), then the dense model
and every compressed one run forward in inference mode, channels-last, at each batch size
and precision (fp32; bf16, or fp16 on a GPU, under ``torch.autocast``), in interleaved rounds (dense, cp,
tucker, tt, dense, ...) so that a machine's drift hits all of them alike. The table gives
the median time per batch and the speed-up over dense of the same round set.

bf16 convolutions are only fast on CPUs with AMX (or on GPUs): elsewhere the bf16 rows say
what the machine does, not what the library can do; the machine line says which it is.

Run from the repository root::

    PYTHONPATH=. python benchmarks/model_speed.py --json speed.json --markdown speed.md
    PYTHONPATH=. python benchmarks/model_speed.py --batches 1 --precisions fp32 --rounds 3
    PYTHONPATH=. python benchmarks/model_speed.py --model efficientnet_b0   # a timm model
    PYTHONPATH=. python benchmarks/model_speed.py --rank '{"latency": 0.5}' --compress-batch 8 \
        --factorizations tucker auto --batches 8 --precisions fp32
    PYTHONPATH=. python benchmarks/model_speed.py --rank '{"latency": 0.5}' --compress-batch 8 \
        --autocast bf16 --batches 8 --precisions bf16     # a latency budget for bf16 inference

The compressed models are built with ``implementation`` (default ``"auto"``).
``--exact-ranks-too`` also compresses each factorization with ``"multiple_of": 1``, the
global budget's ranks as its energy allocation gives them instead of rounded to the
multiples of 8 or 16 that convolution kernels run fastest, and times them alongside.
``--fold-batch-norms`` first folds every batch norm into the convolution before it
(:func:`tt_conv.fold_batch_norms`), as an inference deployment would: the dense model and
the ones compressed from it run without them alike. ``--retain-freed-memory`` first calls
:func:`tt_conv.retain_freed_memory`, so that no model page-faults its activations in on
every pass (glibc's default returns them to the system: a fixed cost per pass that does
not shrink with the FLOPs). ``--compile`` runs every model, the dense one too, through
``torch.compile`` (inductor, with its weight freezing, which folds the batch norms and
prepacks the weights): the batch norms, activations and additions that bound an eager
model's speed-up are fused, as a compiled deployment would have them. The table then
also gives each model's compile time and its largest difference from the eager model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tt_conv  # noqa: E402
from compress_pretrained import machine_description  # noqa: E402
from tt_conv.files import write_text_atomic  # noqa: E402

FACTORIZATIONS = ("cp", "tucker", "tt")
CHOICES = (*FACTORIZATIONS, "auto")


def resnet50(seed: int = 0):
    import torchvision

    torch.manual_seed(seed)
    return torchvision.models.resnet50(weights=None).eval()


def build_model(name: str, seed: int = 0):
    """``resnet50`` (torchvision) or a timm model name, with random weights."""
    if name == "resnet50":
        return resnet50(seed)
    import timm

    torch.manual_seed(seed)
    try:
        return timm.create_model(name, pretrained=False).eval()
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise SystemExit(f"--model {name!r}: not resnet50 and not a timm model ({error})")


def model_title(name: str) -> str:
    return "ResNet-50" if name == "resnet50" else name


#: Autocast dtype of each precision (fp32: none).
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(precision: str, device: str):
    if precision in AUTOCAST:
        return torch.autocast(device, dtype=AUTOCAST[precision])
    return contextlib.nullcontext()


def time_forward(model, x, precision: str, repeats: int) -> float:
    """Median seconds of one forward pass (after one warm-up pass)."""
    device = x.device.type
    times = []
    with torch.inference_mode(), precision_context(precision, device):
        model(x)
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50",
                        help="resnet50 (torchvision) or a timm model name, random weights")
    parser.add_argument("--factorizations", nargs="*", default=list(FACTORIZATIONS),
                        choices=CHOICES)
    parser.add_argument("--rank", default='{"flops": 0.33, "global": true}',
                        help="tt_conv.compress's rank= as JSON")
    parser.add_argument("--compress-batch", type=int, default=1,
                        help="batch of the input_shape given to compress")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--precisions", nargs="*", default=["fp32", "bf16"],
                        choices=("fp32", "bf16", "fp16"),
                        help="fp32, and bf16 / fp16 under torch.autocast (fp16: a GPU's)")
    parser.add_argument("--implementation", default="auto",
                        choices=("auto", "factorized", "reconstructed"))
    parser.add_argument("--autocast", default="fp32", choices=("fp32", "bf16", "fp16"),
                        help="compress's autocast=: the precision its measured times "
                             "(latency budgets, the execution choice) are taken in")
    parser.add_argument("--fold-batch-norms", action="store_true",
                        help="fold the batch norms into the convolutions before them "
                             "(tt_conv.fold_batch_norms) first: the dense model and the "
                             "compressed ones (compressed from it) have none")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="call tt_conv.retain_freed_memory() first: freed activations "
                             "stay in the heap instead of being page-faulted in again on "
                             "every pass (glibc; dense and compressed alike)")
    parser.add_argument("--exact-ranks-too", action="store_true",
                        help="also compress each factorization with \"multiple_of\": 1 (a "
                             "global budget's ranks as the energy allocation gives them, not "
                             "rounded to multiples of 8 or 16), timed beside the rest as "
                             "'<factorization> exact'")
    parser.add_argument("--op-shares", action="store_true",
                        help="also profile the dense model (torch.profiler) and print the "
                             "share of its time in convolutions, batch norms, copies (casts "
                             "of the weights under autocast) and the rest: what bounds the "
                             "speed-up of a model whose convolutions alone get faster")
    parser.add_argument("--compile", action="store_true",
                        help="time every model (dense too) compiled by torch.compile "
                             "(inductor, weights frozen), not eager")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.retain_freed_memory:
        tt_conv.retain_freed_memory()

    dense = build_model(args.model)
    if args.fold_batch_norms:
        dense, folded = tt_conv.fold_batch_norms(dense)
        print(f"{len(folded)} batch norms folded into the convolutions", flush=True)
    models = {"dense": dense}
    compress_seconds = {}
    shape = (args.compress_batch, 3, args.size, args.size)
    rank = json.loads(args.rank)
    refused = {}
    variants = [(factorization, factorization, rank) for factorization in args.factorizations]
    if args.exact_ranks_too:
        variants += [(f"{factorization} exact", factorization, {**rank, "multiple_of": 1})
                     for factorization in args.factorizations]
    for label, factorization, rank_of_variant in variants:
        start = time.perf_counter()
        try:
            model, report = tt_conv.compress(dense, factorization, rank_of_variant,
                                             input_shape=shape,
                                             implementation=args.implementation,
                                             autocast=args.autocast, progress=False)
        except ValueError as error:  # a budget this machine cannot reach: say so, go on
            refused[label] = str(error)
            print(f"{label}: not compressed: {error}", flush=True)
            continue
        compress_seconds[label] = time.perf_counter() - start
        totals = report.totals()
        print(f"{label}: compressed in {compress_seconds[label]:.1f} s, conv "
              f"FLOPs {totals['conv_flops_before'] / 1e9:.2f}G -> "
              f"{totals['conv_flops_after'] / 1e9:.2f}G"
              + ("" if report.model_latency_after is None else
                 f", measured latency {report.model_latency_after / report.model_latency_before:.3f}"
                 f" of dense at compress time"), flush=True)
        models[label] = model
    for name in models:
        models[name] = models[name].to(device).to(memory_format=torch.channels_last)
    eager = dict(models)
    if args.compile:
        # Freezing treats the weights as constants: batch norms fold into the convolutions
        # and the weights are prepacked once, for the dense model and the compressed alike.
        import torch._dynamo.config as dynamo_config
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
        # The models share one forward's code (every compressed ResNet is a ResNet), whose
        # compiled graphs count against one recompile limit: past it, dynamo would run the
        # rest eagerly without a word. Each (precision, batch) compiles afresh, and an
        # exhausted limit is an error.
        dynamo_config.fail_on_recompile_limit_hit = True

    rows = []
    compiled = []
    for precision in args.precisions:
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, device=device)
            x = x.contiguous(memory_format=torch.channels_last)
            samples = {name: [] for name in models}
            if args.compile:
                torch._dynamo.reset()
                models = {name: torch.compile(model, dynamic=False)
                          for name, model in eager.items()}
                compiled += compile_for(models, eager, x, precision, batch)
            for _ in range(args.rounds):
                for name, model in models.items():
                    samples[name].append(time_forward(model, x, precision, args.repeats))
            dense_s = statistics.median(samples["dense"])
            for name in models:
                seconds = statistics.median(samples[name])
                rows.append({"precision": precision, "batch": batch, "model": name,
                             "ms": seconds * 1e3, "speedup": dense_s / seconds})
                print(f"{precision} batch {batch} {name:12s} {seconds * 1e3:9.1f} ms  "
                      f"{dense_s / seconds:5.2f}x", flush=True)
    shares = op_shares(eager["dense"], args, device) if args.op_shares else []
    results = {"machine": machine_description() if device.type == "cpu"
               else torch.cuda.get_device_name(device),
               "threads": args.threads, "torch": torch.__version__, "rank": rank,
               "model": args.model, "compress_shape": list(shape),
               "size": args.size, "implementation": args.implementation,
               "autocast": args.autocast, "fold_batch_norms": args.fold_batch_norms,
               "exact_ranks_too": args.exact_ranks_too, "compile": args.compile,
               "compiled": compiled,
               "retain_freed_memory": args.retain_freed_memory,
               "compress_seconds": compress_seconds, "refused": refused, "rows": rows,
               "op_shares": shares}
    text = format_table(results)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
    if args.markdown:
        write_text_atomic(args.markdown, text + "\n")
    return results


def compile_for(models, eager, x, precision: str, batch: int) -> list:
    """Compile every model for this input and precision; seconds and deviation from eager."""
    out = []
    with torch.inference_mode(), precision_context(precision, x.device.type):
        for name, model in models.items():
            start = time.perf_counter()
            y = model(x)
            seconds = time.perf_counter() - start
            reference = eager[name](x).float()
            deviation = float((y.float() - reference).abs().max() / reference.abs().max())
            out.append({"precision": precision, "batch": batch, "model": name,
                        "compile_s": seconds, "deviation": deviation})
            print(f"{precision} batch {batch} {name}: compiled in {seconds:.1f} s, largest "
                  f"difference from eager {deviation:.1e} of its largest output", flush=True)
    return out


#: Profiler events by what they are, for --op-shares (self CPU time).
OP_KINDS = {"aten::mkldnn_convolution": "convolution", "aten::convolution": "convolution",
            "aten::cudnn_convolution": "convolution", "aten::native_batch_norm": "batch norm",
            "aten::copy_": "copies"}


def op_shares(model, args, device) -> list:
    """Share of the model's profiled time per kind of operation, per precision and batch."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    rows = []
    for precision in args.precisions:
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, device=device)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), precision_context(precision, device.type):
                model(x)
                with profile(activities=activities) as prof:
                    for _ in range(args.repeats):
                        model(x)
            times = {"convolution": 0.0, "batch norm": 0.0, "copies": 0.0, "rest": 0.0}
            for event in prof.key_averages():
                self_time = (event.self_device_time_total if device.type == "cuda"
                             else event.self_cpu_time_total)
                times[OP_KINDS.get(event.key, "rest")] += self_time
            total = sum(times.values()) or 1.0
            rows.append({"precision": precision, "batch": batch,
                         **{kind: t / total for kind, t in times.items()}})
            print(f"dense {precision} batch {batch}: " + ", ".join(
                f"{kind} {t / total:.0%}" for kind, t in times.items()), flush=True)
    return rows


def format_table(results) -> str:
    compressed = results["compress_seconds"] or results.get("refused")
    title = model_title(results.get("model", "resnet50"))
    lines = [(f"{title} compressed at rank={json.dumps(results['rank'])} on input "
              f"{tuple(results['compress_shape'])}; " if compressed else f"{title} (dense only); ")
             + f"timed at {results['size']}x{results['size']}, "
             f"channels-last, inference mode, "
             f"implementation={results['implementation']!r}"
             + (f", compress timed under {results['autocast']} autocast"
                if results.get("autocast", "fp32") != "fp32" else "")
             + (", batch norms folded into the convolutions (dense too)"
                if results.get("fold_batch_norms") else "")
             + (", freed memory retained (tt_conv.retain_freed_memory)"
                if results.get("retain_freed_memory") else "")
             + (", 'exact': compressed with \"multiple_of\": 1 (ranks not rounded)"
                if results.get("exact_ranks_too") else "")
             + (", every model (dense too) compiled by torch.compile (inductor, weights "
                "frozen)" if results.get("compile") else "")
             + f" ({results['machine']}, "
             f"{results['threads']} threads, torch {results['torch']})", "",
             "| precision | batch | model | ms per batch | speed-up over dense |",
             "|---|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['precision']} | {row['batch']} | {row['model']} | "
                     f"{row['ms']:.1f} | {row['speedup']:.2f}x |")
    if results.get("compiled"):
        lines += ["", "| precision | batch | model | compile s | largest difference from eager |",
                  "|---|---|---|---|---|"]
        lines += [f"| {row['precision']} | {row['batch']} | {row['model']} | "
                  f"{row['compile_s']:.1f} | {row['deviation']:.1e} |"
                  for row in results["compiled"]]
    for factorization, error in results.get("refused", {}).items():
        lines.append(f"\n{factorization}: not compressed: {error}")
    if results.get("op_shares"):
        lines += ["", "Share of the dense model's profiled time:", "",
                  "| precision | batch | convolution | batch norm | copies | rest |",
                  "|---|---|---|---|---|---|"]
        for row in results["op_shares"]:
            lines.append(f"| {row['precision']} | {row['batch']} | "
                         + " | ".join(f"{row[kind]:.0%}" for kind in
                                      ("convolution", "batch norm", "copies", "rest")) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
