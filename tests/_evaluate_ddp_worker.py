"""A rank of the two-process gloo test in test_evaluate.py (spawned processes import it)."""

import torch


def evaluate_worker(rank, init_file, checkpoint, sequences, queue):
    from applications.conv_tt_lstm.evaluation import evaluate, evaluation_loader
    from applications.conv_tt_lstm.inference import load_model
    from applications.conv_tt_lstm.metrics import FrameMetrics

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, _ = load_model(checkpoint)
    # Sharded by torch.distributed's rank: rank 0 gets 3 sequences (batches 2 + 1), rank 1 2.
    loader = evaluation_loader(torch.utils.data.TensorDataset(sequences), 2)
    summaries = evaluate(model, loader, input_frames=3, future_frames=2,
                         metrics=FrameMetrics(), trivial=True)
    queue.put((rank, len(loader.sampler), summaries))
    torch.distributed.destroy_process_group()
