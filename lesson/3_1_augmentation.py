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
# # 3.1 Data augmentation, in plain JAX
#
# The lesson: augmentation makes new training images by rotating, shifting, shearing, zooming and flipping the
# ones there are. Keras's `ImageDataGenerator` draws each image's transform with numpy and applies it on the host
# with `scipy.ndimage.affine_transform`. Here the same affine map is written with `jax.random` and
# `jax.scipy.ndimage.map_coordinates`, checked against flaxlesson's `augment.apply_affine_transform`, then
# `jax.vmap`-ed over a batch inside a jitted train step, and checked against `fit(..., augment=...)`.
#
# The quick and the full settings are the same: the images are scikit-learn's bundled digits, and the training
# run shows the mechanics (a step that augments on the device), not an accuracy.

# %%
import os

QUICK = os.environ.get("FLAXLESSON_QUICK") == "1"
SEED, BATCH_SIZE = 0, 64

# %% [markdown]
# ## The lesson's Keras code
#
# ```python
# from tensorflow.keras.preprocessing.image import ImageDataGenerator
#
# # Define data augmentation parameters
# datagen = ImageDataGenerator(
#     rotation_range=20,
#     width_shift_range=0.2,
#     height_shift_range=0.2,
#     shear_range=0.2,
#     zoom_range=0.2,
#     horizontal_flip=True,
#     fill_mode='nearest'
# )
#
# # Sample image (dummy data)
# import numpy as np
# import matplotlib.pyplot as plt
#
# x = np.random.rand(1, 28, 28, 1)  # Dummy image data
#
# # Generate augmented images
# for batch in datagen.flow(x, batch_size=1):
#     plt.figure(figsize=(2, 2))
#     plt.imshow(batch[0].reshape(28, 28), cmap='gray')
#     plt.axis('off')
#     plt.show()
#     break
# ```

# %% [markdown]
# ## The affine map, in plain JAX
#
# Keras composes rotation, shift, shear and zoom into one 3x3 matrix about the image centre; output pixel
# (row, col) then reads the input at `matrix @ (row, col, 1)`, interpolated bilinearly, with 'nearest' filling
# outside the image. Two Keras quirks are kept: `tx` (drawn from `height_shift_range` times the rows) moves along
# columns, and the centre is (rows/2 - 0.5, cols/2 - 0.5).

# %%
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.scipy.ndimage import map_coordinates


def keras_matrix(theta, tx, ty, shear, zx, zy, rows, cols):
    theta, shear = jnp.deg2rad(theta), jnp.deg2rad(shear)
    c, s = jnp.cos(theta), jnp.sin(theta)
    rotation = jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    shift = jnp.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])
    shear_ = jnp.array([[1.0, -jnp.sin(shear), 0.0], [0.0, jnp.cos(shear), 0.0], [0.0, 0.0, 1.0]])
    zoom = jnp.array([[zx, 0.0, 0.0], [0.0, zy, 0.0], [0.0, 0.0, 1.0]])
    ox, oy = rows / 2 - 0.5, cols / 2 - 0.5
    offset = jnp.array([[1.0, 0.0, ox], [0.0, 1.0, oy], [0.0, 0.0, 1.0]])
    reset = jnp.array([[1.0, 0.0, -ox], [0.0, 1.0, -oy], [0.0, 0.0, 1.0]])
    matrix = offset @ rotation @ shift @ shear_ @ zoom @ reset  # in Keras's (x, y) frame
    return matrix[jnp.array([1, 0, 2])][:, jnp.array([1, 0, 2])]  # to (row, col), as scipy indexes


def affine(image, theta=0.0, tx=0.0, ty=0.0, shear=0.0, zx=1.0, zy=1.0):
    """One (rows, cols, channels) image through Keras's affine map: bilinear, 'nearest' outside."""
    rows, cols, channels = image.shape
    matrix = keras_matrix(theta, tx, ty, shear, zx, zy, rows, cols)
    grid = jnp.stack([*jnp.meshgrid(jnp.arange(rows), jnp.arange(cols), indexing="ij"), jnp.ones((rows, cols))])
    source = jnp.einsum("ij,jrc->irc", matrix, grid.astype(jnp.float32))[:2]  # where each output pixel reads
    sample = lambda ch: map_coordinates(image[..., ch], list(source), order=1, mode="nearest")  # noqa: E731
    return jnp.stack([sample(ch) for ch in range(channels)], axis=-1)


# %% [markdown]
# ### Checked against `augment.apply_affine_transform`

# %%

from flaxlesson import augment, data

digits = data.load_digits()  # 8x8 digits resized to 28x28, NHWC float32 in [0, 1]
image = digits.x_train[0]
args = dict(theta=17.0, tx=3.2, ty=-2.5, shear=11.0, zx=0.85, zy=1.15)
ours, library = affine(image, **args), augment.apply_affine_transform(image, **args)
largest = float(jnp.max(jnp.abs(ours - library)))
print(f"plain affine vs augment.apply_affine_transform: largest difference {largest:.2e}")
assert largest < 1e-5

# %% [markdown]
# ## Random transforms with `jax.random`, vmapped over a batch
#
# Keras draws each image's transform from numpy's global generator; here each image gets its own key, split from
# one, so the same key gives the same augmented batch, on any device, inside `jit`.


# %%
def random_transform(key, image):
    """The lesson's generator: rotation 20, shifts 0.2, shear 0.2, zoom 0.2, horizontal flip."""
    rows, cols, _ = image.shape
    u = jax.random.uniform(key, (7,))
    theta = 20 * (2 * u[0] - 1)
    tx, ty = 0.2 * (2 * u[1] - 1) * rows, 0.2 * (2 * u[2] - 1) * cols
    shear = 0.2 * (2 * u[3] - 1)
    zx, zy = 0.8 + 0.4 * u[4], 0.8 + 0.4 * u[5]
    out = affine(image, theta, tx, ty, shear, zx, zy)
    return jnp.where(u[6] < 0.5, out[:, ::-1], out)


@jax.jit
def augment_batch(key, images):
    return jax.vmap(random_transform)(jax.random.split(key, len(images)), images)


x = np.random.default_rng(SEED).random((1, 28, 28, 1)).astype(np.float32)  # the lesson's dummy image
batch = np.concatenate([x, digits.x_train[:7]])
augmented = augment_batch(jax.random.key(SEED), batch)
fig, axes = plt.subplots(2, 8, figsize=(12, 3))
for column, (before, after) in enumerate(zip(batch, augmented)):
    axes[0, column].imshow(before[..., 0], cmap="gray")
    axes[1, column].imshow(after[..., 0], cmap="gray")
for ax in axes.ravel():
    ax.axis("off")
axes[0, 0].set_title("original", fontsize=8, loc="left")
axes[1, 0].set_title("augmented", fontsize=8, loc="left")
plt.show()

# %% [markdown]
# ### Speed, beside Keras's
#
# Keras's `ImageDataGenerator` on the lesson's options, 28x28x1, batches of 256, measured on this kind of machine
# (2-core AMD EPYC, `keras_rest.py aug` in the project's `reference` folder): 15,400 images/s. This plain
# `map_coordinates` form, and flaxlesson's `augment.augment` (the same map, laid out for XLA on a CPU), here:

# %%
images256 = jnp.asarray(digits.x_train[:256])
config = augment.LESSON_GENERATOR
library_batch = lambda key, images: augment.augment(key, images, config)  # noqa: E731
for name, fn in (("plain map_coordinates", augment_batch), ("augment.augment", library_batch)):
    fn(jax.random.key(0), images256).block_until_ready()  # compile
    repeats = 3 if QUICK else 20
    start = time.perf_counter()
    for i in range(repeats):
        fn(jax.random.key(i), images256).block_until_ready()
    print(f"{name:24} {repeats * 256 / (time.perf_counter() - start):>10,.0f} images/s")
print(f"{'Keras (reference run)':24} {15400:>10,} images/s")

# %% [markdown]
# ## Augmenting inside the jitted train step
#
# The step folds its step number into the run's key (`jax.random.fold_in`), augments the batch on the device,
# then takes the Adam step. `fit(..., augment=fn)` does exactly this, calling `fn(key, images)`.

# %%
import flax.linen as nn
import optax

from flaxlesson import models, training


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return models.Dense(10)(x.reshape(x.shape[0], -1))  # glorot-uniform kernel, zero bias, as Keras's Dense


model = Linear()
tx = optax.adam(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7)
x_train, y_train = digits.x_train[:512], digits.y_train[:512]


@jax.jit
def train_step(params, opt_state, step, x, y):
    x = augment_batch(jax.random.fold_in(jax.random.key(SEED), step), x)

    def loss_fn(params):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


params = model.init(jax.random.key(SEED), x_train[:1])["params"]
opt_state, step = tx.init(params), 0
order = np.random.default_rng([SEED, 0]).permutation(len(x_train))  # one epoch of 8 full batches
for start in range(0, len(x_train), BATCH_SIZE):
    rows = order[start : start + BATCH_SIZE]
    params, opt_state, loss = train_step(params, opt_state, step, x_train[rows], y_train[rows])
    step += 1
print(f"plain loop: {step} augmented steps, last loss {float(loss):.4f}")

state = training.create_train_state(Linear(), x_train[:1], seed=SEED)
state, _ = training.fit(
    state, x_train, y_train, epochs=1, batch_size=BATCH_SIZE, seed=SEED, augment=augment_batch, verbose=0
)
largest = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params, state.params)))
print(f"plain loop vs fit(augment=augment_batch): largest parameter difference {largest:.2e}")
assert largest < 1e-6

# %% [markdown]
# ## What differs from Keras, and why
#
# - **Keys, not a global generator**: every draw comes from an explicit key (`split` per image, `fold_in` per
#   step), so a run is reproducible and each device of a sharded run draws its own.
# - **On the device**: the transform runs inside the jitted step, not in host worker threads.
# - **float32 coordinates**: scipy computes in float64, so a sample point within about 1e-5 pixels of a pixel
#   edge can round the other way; values agree to float32 rounding otherwise.
# - **Interpolation**: `jax.scipy.ndimage.map_coordinates` supports orders 0 and 1 (Keras's default is 1), and
#   flaxlesson's `augment` supports the fill modes 'nearest', 'constant', 'reflect' and 'wrap'.
