"""A rank of the two-process gloo training test in test_train.py (spawned processes import it)."""

import os


def train_worker(rank, config_dict, port, queue):
    import torch

    from applications.conv_tt_lstm.config import TrainConfig
    from applications.conv_tt_lstm.prediction import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(TrainConfig.from_dict(config_dict))  # joins and leaves the gloo group
    # numpy arrays: tensors would travel as shared memory that dies with this process.
    state = {k: v.detach().cpu().numpy().copy() for k, v in result.model.state_dict().items()}
    val_mse = result.summaries["model"]["metrics"]["mse"]["mean"]
    queue.put((rank, {"state": state, "val_mse": val_mse}))
