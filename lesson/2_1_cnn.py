# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2.1 A convolutional network, in plain JAX
#
# The lesson: CNNs learn spatial features of images with convolutions and pooling. Its CNN is written here with
# plain `nn.Conv` + `nn.max_pool`, one-hot labels from `to_categorical` and `categorical_crossentropy` as the
# lesson writes them, a jitted step and a loop over shuffled batches; then many steps per call with `lax.scan`;
# then the same in flaxlesson, and a check that both give the same parameters.
#
# Data: the lesson loads MNIST through Keras's downloader; offline, this uses Fashion-MNIST (same format, harder)
# from Debian's package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`, files in
# /usr/share/datasets/fashion-mnist). `FLAXLESSON_QUICK=1`, or a machine without that package, uses
# scikit-learn's bundled 8x8 digits resized to 28x28, a few hundred of them.

# %%
import os

QUICK = os.environ.get("FLAXLESSON_QUICK") == "1"
EPOCHS, BATCH_SIZE, VALIDATION_SPLIT, SEED = 5, 64, 0.1, 0  # the lesson's model.fit(...)
PLAIN_EPOCHS = 1  # the plain CNN runs about 2,000 images/s on 2 CPU cores: one epoch here, the lesson's 5 by fit
LIMIT = 640 if QUICK else None  # training (and test) images used; None: all
if QUICK:
    EPOCHS = 1

# %% [markdown]
# ## The lesson's Keras code
#
# ```python
# from tensorflow.keras.models import Sequential
# from tensorflow.keras.layers import Conv2D, MaxPooling2D, Flatten, Dense
# from tensorflow.keras.datasets import mnist
# from tensorflow.keras.utils import to_categorical
#
# # Load and prepare dataset
# (X_train, y_train), (X_test, y_test) = mnist.load_data()
# X_train = X_train.reshape(-1, 28, 28, 1).astype('float32') / 255
# X_test = X_test.reshape(-1, 28, 28, 1).astype('float32') / 255
# y_train = to_categorical(y_train)
# y_test = to_categorical(y_test)
#
# # Define the model
# model = Sequential([
#     Conv2D(32, kernel_size=(3, 3), activation='relu', input_shape=(28, 28, 1)),
#     MaxPooling2D(pool_size=(2, 2)),
#     Conv2D(64, kernel_size=(3, 3), activation='relu'),
#     MaxPooling2D(pool_size=(2, 2)),
#     Flatten(),
#     Dense(128, activation='relu'),
#     Dense(10, activation='softmax')
# ])
#
# # Compile the model
# model.compile(optimizer='adam', loss='categorical_crossentropy', metrics=['accuracy'])
#
# # Train the model
# model.fit(X_train, y_train, epochs=5, batch_size=64, validation_split=0.1)
#
# # Evaluate the model
# loss, accuracy = model.evaluate(X_test, y_test)
# print("Test Accuracy:", accuracy)
# ```

# %% [markdown]
# ## The same program in plain JAX

# %%
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from flaxlesson import data

FASHION = "/usr/share/datasets/fashion-mnist"
images = data.load_digits() if QUICK or not os.path.isdir(FASHION) else data.load_idx(FASHION)
images = images.head(LIMIT)
X_train, X_test = images.x_train, images.x_test  # (N, 28, 28, 1) float32 in [0, 1], as the lesson's / 255
y_train = data.to_categorical(images.y_train, 10)  # one-hot rows, as the lesson's
y_test = data.to_categorical(images.y_test, 10)
print(f"{images.name} ({images.source}): {len(X_train)} training and {len(X_test)} test images")

# %%
keras_init = dict(kernel_init=nn.initializers.glorot_uniform(), bias_init=nn.initializers.zeros)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), padding="VALID", **keras_init)(x))  # 28x28 -> 26x26 (Keras's 'valid')
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # -> 13x13
        x = nn.relu(nn.Conv(64, (3, 3), padding="VALID", **keras_init)(x))  # -> 11x11
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # -> 5x5
        x = x.reshape(x.shape[0], -1)  # Flatten: 5*5*64 = 1,600
        x = nn.relu(nn.Dense(128, **keras_init)(x))
        return nn.Dense(10, **keras_init)(x)  # logits; the softmax is in the loss


model = CNN()
tx = optax.adam(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7)  # Keras's Adam


def loss_fn(params, x, y, mask):
    logits = model.apply({"params": params}, x)
    losses = optax.softmax_cross_entropy(logits, y) * mask  # categorical_crossentropy on one-hot y
    return losses.sum() / jnp.maximum(mask.sum(), 1.0), logits


@jax.jit
def train_step(params, opt_state, x, y, mask):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    correct = ((logits.argmax(-1) == y.argmax(-1)) * mask).sum()
    return optax.apply_updates(params, updates), opt_state, loss * mask.sum(), correct


def batches(n, batch_size, seed, epoch):
    """Each epoch's shuffled batches of one size; the last partial one padded with copies of its first row, masked."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        mask = np.zeros(batch_size, np.float32)
        mask[: len(rows)] = 1.0
        yield np.concatenate([rows, np.full(batch_size - len(rows), rows[0])]), mask


def accuracy(params, x, y, batch_size=1000):
    hits = [
        (model.apply({"params": params}, x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size].argmax(-1))
        for i in range(0, len(x), batch_size)
    ]
    return float(jnp.concatenate(hits).mean())


def train(x, y, epochs, seed):
    """The lesson's model.fit: hold out the last 10%, then epochs of shuffled batches; returns params and curves."""
    split_at = int(np.floor(len(x) * (1 - VALIDATION_SPLIT)))
    x_fit, y_fit, x_val, y_val = x[:split_at], y[:split_at], x[split_at:], y[split_at:]
    params = model.init(jax.random.key(seed), x[:1])["params"]
    opt_state = tx.init(params)
    curves = {"loss": [], "accuracy": [], "val_accuracy": [], "samples_per_second": []}
    for epoch in range(epochs):
        start, loss_sum, correct = time.perf_counter(), 0.0, 0.0
        for rows, mask in batches(len(x_fit), BATCH_SIZE, seed, epoch):
            params, opt_state, batch_loss, batch_correct = train_step(params, opt_state, x_fit[rows], y_fit[rows], mask)
            loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
        curves["samples_per_second"].append(len(x_fit) / (time.perf_counter() - start))
        curves["loss"].append(float(loss_sum) / len(x_fit))
        curves["accuracy"].append(float(correct) / len(x_fit))
        curves["val_accuracy"].append(accuracy(params, x_val, y_val))
        print(f"epoch {epoch + 1}/{epochs}: " + ", ".join(f"{k} {v[-1]:,.4g}" for k, v in curves.items()))
    return params, curves


plain_params, plain_curves = train(X_train, y_train, PLAIN_EPOCHS, SEED)
plain_accuracy = accuracy(plain_params, X_test, y_test)
print(f"plain JAX, {PLAIN_EPOCHS} epoch(s): test accuracy {plain_accuracy:.4f}")

# %% [markdown]
# ### Many steps per call: `lax.scan`
#
# Each `train_step` call above returns to Python between steps. `lax.scan` runs K steps in one compiled call
# (Keras's `steps_per_execution`): the carry is (params, opt_state), the scanned inputs K stacked batches.
# The update is the same, step by step.


# %%
@jax.jit
def train_steps(params, opt_state, xs, ys, masks):
    def body(carry, batch):
        params, opt_state, loss, correct = train_step(*carry, *batch)
        return (params, opt_state), (loss, correct)

    (params, opt_state), (losses, corrects) = jax.lax.scan(body, (params, opt_state), (xs, ys, masks))
    return params, opt_state, losses.sum(), corrects.sum()


K = 4
rows, masks = zip(*list(batches(len(X_train), BATCH_SIZE, SEED, 0))[:K])
start = model.init(jax.random.key(SEED), X_train[:1])["params"]
one, one_state = start, tx.init(start)
for r, m in zip(rows, masks):
    one, one_state, _, _ = train_step(one, one_state, X_train[r], y_train[r], m)
scanned, _, _, _ = train_steps(start, tx.init(start), X_train[np.stack(rows)], y_train[np.stack(rows)], np.stack(masks))
print(
    "K one-step calls vs one K-step scan, largest difference:",
    max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one, scanned))),
)

# %% [markdown]
# ## The same in flaxlesson
#
# `models.CNN()` is the CNN above, computed by default in a faster form on a CPU (`fast=True`: each conv + pool
# stage is `layers.ConvMaxPool`, which pools before adding the bias and applying the relu, and computes the
# 3x3 conv with `ops.conv2d`'s forms; same params, values and gradients to float rounding; read
# `flaxlesson/ops.py`). `models.CNN(fast=False)` is exactly the plain module above.

# %%
from flaxlesson import models, training

state = training.create_train_state(models.CNN(), X_train[:1], seed=SEED, loss="categorical_crossentropy")
state, history = training.fit(
    state,
    X_train,
    y_train,
    epochs=EPOCHS,
    batch_size=BATCH_SIZE,
    validation_split=VALIDATION_SPLIT,
    seed=SEED,
    verbose=2,
)
fit_accuracy = training.evaluate(state, X_test, y_test)["accuracy"]
fit_speed = float(np.median(history.samples_per_second))
print(f"flaxlesson fit, {EPOCHS} epoch(s): test accuracy {fit_accuracy:.4f}, {fit_speed:,.0f} samples/s")

# %%
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3))
axis = np.arange(1, EPOCHS + 1)
ax_loss.plot(axis, history.history["loss"], "o-", label="train (fit)")
ax_acc.plot(axis, history.history["accuracy"], "o-", label="train (fit)")
ax_acc.plot(axis, history.history["val_accuracy"], "o-", label="validation (fit)")
ax_acc.plot(np.arange(1, PLAIN_EPOCHS + 1), plain_curves["val_accuracy"], "s", label="validation (plain JAX)")
for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
    ax.set(xlabel="epoch", ylabel=name, xticks=axis)
    ax.legend()
plt.tight_layout()
plt.show()

predictions = training.predict(state, X_test[:8])  # softmax probabilities, as Keras's predict
fig, axes = plt.subplots(1, 8, figsize=(12, 2))
for ax, image, p, label in zip(axes, X_test[:8], predictions, y_test[:8].argmax(-1)):
    ax.imshow(image[..., 0], cmap="gray")
    ax.set_title(f"{images.class_names[p.argmax()]}\n(true {images.class_names[label]})", fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Both gave the same parameters
#
# The plain loop and `fit` on the plain module (`fit` takes any linen module), the same seed and the same
# steps: one epoch over the first 142 images, which the 10% split leaves as 127 to train on, so 2 steps, the
# second a padded, masked batch of 63. Why so few: Adam's first steps move each weight by about
# learning_rate x sign(gradient), so where a gradient is near zero, the float rounding of two differently fused
# programs (XLA sums in its own order) changes a weight by up to 1e-3; on this CNN that reaches 1e-5 within
# ten steps, while the MLP's and the RNN's programs agree exactly over whole runs.

# %%
SUBSET = 142
check_params, _ = train(X_train[:SUBSET], y_train[:SUBSET], 1, SEED)
check = training.create_train_state(CNN(), X_train[:1], seed=SEED, loss="categorical_crossentropy")
check, _ = training.fit(
    check,
    X_train[:SUBSET],
    y_train[:SUBSET],
    epochs=1,
    batch_size=BATCH_SIZE,
    validation_split=VALIDATION_SPLIT,
    seed=SEED,
    verbose=0,
)
largest = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), check_params, check.params)))
print(f"largest parameter difference after {int(check.step)} steps: {largest:.2e}")
assert largest < 1e-6

# %% [markdown]
# ## Beside Keras
#
# The lesson's own Keras code on the full Fashion-MNIST, measured on this kind of machine (2-core AMD EPYC,
# TensorFlow 2.21, `IDX_DIR=/usr/share/datasets/fashion-mnist keras_cnn.py` in the project's `reference`
# folder): 5 epochs of batch 64, test accuracy 0.897, about 10,700 training samples/s. Ours, in this run, below.
# The plain loop ran one epoch (its samples/s include the first step's compile); the accuracy to compare is
# fit's, after the lesson's 5 epochs. Speeds depend on what else the machine runs: the committed outputs were made
# on 2 CPU cores shared with other jobs, so their samples/s are low; the README's measured figures come from a
# quiet machine.

# %%
print(f"{'':24}{'test accuracy':>14}{'samples/s':>12}")
print(f"{'Keras (reference run)':24}{0.897:>14.3f}{10700:>12,}")
plain_speed = float(np.median(plain_curves["samples_per_second"]))  # epoch 1 includes the compile
print(f"{f'plain JAX, {PLAIN_EPOCHS} epoch':24}{plain_accuracy:>14.3f}{plain_speed:>12,.0f}")
print(f"{f'flaxlesson fit, {EPOCHS} ep.':24}{fit_accuracy:>14.3f}{fit_speed:>12,.0f}")
if QUICK or images.name != "fashion_mnist":
    print(f"(quick settings on {images.name}: not comparable with the Keras figures)")

# %% [markdown]
# ## What differs from Keras, and why
#
# - **Logits, not softmax**: the last Dense has no softmax; `optax.softmax_cross_entropy` applies it inside the
#   loss, and `training.predict` gives the probabilities.
# - **'VALID' padding**: Keras's Conv2D default; Flax's `nn.Conv` defaults to 'SAME', so it is set.
# - **Initialisers**: Keras's glorot-uniform kernels and zero biases, set explicitly.
# - **Adam's epsilon** 1e-7 (Keras), not optax's 1e-8.
# - **`validation_split=0.1` takes the last 10%** of the training images, before shuffling.
# - **Fixed-size masked batches**: the last partial batch is padded to 64 and masked; one compile, same update.
# - **The fast conv** (`fast=True`, the default of `models.CNN`) changes the speed on a CPU, not what is learnt.
