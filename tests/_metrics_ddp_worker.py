"""A rank of the two-process gloo test in test_metrics.py (kept light: spawned processes import it)."""

import torch

from applications.conv_tt_lstm.metrics import MetricAccumulator


def reduce_worker(rank, init_file, queue):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    totals = MetricAccumulator()
    # Rank r holds r + 1 sequences whose metric value is r + 1 on every frame.
    totals.update({"mse": torch.full((rank + 1, 3), float(rank + 1))})
    totals.all_reduce()
    summary = totals.summary()
    queue.put((rank, summary["n_sequences"], summary["metrics"]["mse"]["per_frame"]))
    torch.distributed.destroy_process_group()
