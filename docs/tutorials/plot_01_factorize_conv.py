"""
Factorize a convolution: CP, Tucker and tensor-train side by side
=================================================================

We take one ``nn.Conv2d``, factorize it with each of the three decompositions at the same
parameter budgets, and compare what matters: parameters, how far the output moves from the
dense layer's, and how long a forward pass takes.
"""

# %%
# A convolution with a decaying spectrum
# --------------------------------------
# Kernels of trained networks are far from random: their channel unfoldings have quickly
# decaying singular values, which is what makes them compressible. A freshly initialised
# conv is the worst case (a flat spectrum), so we give a 32 -> 64, 3 x 3 conv a kernel with
# the decay of a trained layer: a random kernel whose singular values along both channel
# modes fall off exponentially, plus a little noise.
import time

import matplotlib.pyplot as plt
import torch

import tt_conv

torch.manual_seed(0)

conv = torch.nn.Conv2d(32, 64, kernel_size=3, padding=1)
with torch.no_grad():
    core = torch.randn(64, 32, 3, 3)
    core *= torch.exp(-torch.arange(64.0) / 10).view(64, 1, 1, 1)
    core *= torch.exp(-torch.arange(32.0) / 6).view(1, 32, 1, 1)
    u_out, _ = torch.linalg.qr(torch.randn(64, 64))
    u_in, _ = torch.linalg.qr(torch.randn(32, 32))
    kernel = torch.einsum("oikl,Oo,Ii->OIkl", core, u_out, u_in)
    kernel += 0.02 * kernel.std() * torch.randn_like(kernel)
    conv.weight.copy_(kernel / kernel.std() * conv.weight.std())

x = torch.randn(8, 32, 32, 32)
with torch.no_grad():
    reference = conv(x)
print(conv)
print(f"dense parameters: {conv.weight.numel():,} (+ {conv.bias.numel()} bias)")

# %%
# Factorize at three budgets
# --------------------------
# A float ``rank`` is the fraction of the dense kernel's parameters the factors may use;
# :mod:`tt_conv.rank` solves for the largest ranks that fit and never exceeds it. Tucker
# runs higher-order orthogonal iteration, TT a single TT-SVD and CP regularised alternating
# least squares (:mod:`tt_conv.decompose`); the last column is the time each took.


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


budgets = [0.05, 0.1, 0.25, 0.5]
layers = {}
print(f"{'method':8} {'budget':>6} {'ranks':>14} {'params':>7} {'kernel err':>10} "
      f"{'output err':>10} {'decomp s':>8}")
for factorization in ("cp", "tucker", "tt"):
    for budget in budgets:
        start = time.perf_counter()
        layer = tt_conv.FactorizedConv.from_conv(
            conv, factorization=factorization, rank=budget)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            kernel_error = relative_error(layer.reconstruct_kernel(), conv.weight)
            output_error = relative_error(layer(x), reference)
        layers[factorization, budget] = (layer, kernel_error, output_error)
        print(f"{factorization:8} {budget:6.2f} {str(layer.rank):>14} {layer.n_parameters:7,} "
              f"{kernel_error:10.3f} {output_error:10.3f} {seconds:8.2f}")

# %%
# Every layer is a drop-in replacement: same input, same output shape, same geometry. Its
# ``repr`` says which ranks it uses and how it runs.
print(layers["tucker", 0.25][0])

# %%
# How each one executes
# ---------------------
# With ``implementation="factorized"`` a layer runs a chain of small standard convolutions
# (``to_sequential`` shows it as plain PyTorch modules); with ``"reconstructed"`` it rebuilds
# the dense kernel and runs one convolution. ``"auto"`` (the default) picks the cheaper by
# an estimate of compute and memory traffic.
for factorization in ("cp", "tucker", "tt"):
    layer = layers[factorization, 0.25][0]
    print(f"{factorization}: {layer.implementation}")
    print(layer.to_sequential())

# %%
# Forward time
# ------------
# Median of a few forward passes on the batch above (8 x 32 x 32 x 32, float32, one CPU
# thread while this page was built). Timings on a shared build machine are noisy;
# ``benchmarks/layers.py`` measures this properly.


def median_time(module, repeats=15):
    times = []
    with torch.no_grad():
        module(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


timings = {"dense": median_time(conv)}
for factorization in ("cp", "tucker", "tt"):
    layer = layers[factorization, 0.1][0]
    for implementation in ("factorized", "reconstructed"):
        layer.set_implementation(implementation)
        timings[f"{factorization}\n{implementation[:5]}."] = median_time(layer)
    layer.set_implementation("auto")
for name, ms in timings.items():
    print(f"{name.replace(chr(10), ' '):20} {ms:6.2f} ms")

# %%
# The trade-off in one figure
# ---------------------------
figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
for factorization, marker in (("cp", "o"), ("tucker", "s"), ("tt", "^")):
    fractions = [layers[factorization, b][0].n_parameters / conv.weight.numel() for b in budgets]
    errors = [layers[factorization, b][2] for b in budgets]
    left.plot(fractions, errors, marker=marker, label=factorization)
left.set_xlabel("parameters kept (fraction of the dense kernel)")
left.set_ylabel("relative output error")
left.set_title("Accuracy at equal budget")
left.grid(True, alpha=0.3)
left.legend()
names = list(timings)
right.bar(range(len(names)), [timings[n] for n in names],
          color=["gray"] + ["C0", "C0", "C1", "C1", "C2", "C2"])
right.set_xticks(range(len(names)), names, fontsize=8)
right.set_ylabel("forward time (ms)")
right.set_title("Speed at 10 % of the parameters")
plt.show()

# %%
# What to take away
# -----------------
# * At the same parameter count the three decompositions do not fit equally well: Tucker-2
#   keeps the full spatial extent and suits kernels whose redundancy is across channels;
#   TT and CP also compress the spatial modes.
# * The factorized chain pays off when the ranks are small compared with the channels; for
#   generous ranks rebuilding the kernel can be faster, which is what
#   ``implementation="auto"`` decides for you.
# * A layer goes back to plain PyTorch with ``layer.to_conv()`` (one dense conv) or
#   ``layer.to_sequential()`` (the small convs), both giving the layer's output.
layer = layers["tt", 0.25][0]
with torch.no_grad():
    print("to_conv matches:", relative_error(layer.to_conv()(x), layer(x)) < 1e-5)
    print("to_sequential matches:", relative_error(layer.to_sequential()(x), layer(x)) < 1e-5)
