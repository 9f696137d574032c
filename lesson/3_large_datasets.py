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
# # 3. Datasets larger than memory, in plain JAX
#
# The lesson's part 3 is "techniques for handling large-scale datasets", though its code keeps every array in
# memory. A data set larger than memory lives on disk, in files of records that can be read in any order, and a
# training run reads each batch as it needs it. Here: images written as ArrayRecord shards; grain's `MapDataset`
# over them, with a seeded global shuffle and each process's share; a plain JAX loop trained on the streamed
# batches; then flaxlesson's `StreamingDataset`, and a check that streaming and in-memory training give the same
# parameters.
#
# Data: Fashion-MNIST's 60,000 training images from Debian's `dataset-fashion-mnist`
# (/usr/share/datasets/fashion-mnist); `FLAXLESSON_QUICK=1`, or a machine without it, uses scikit-learn's digits.
# The Keras lesson has no code for this section, so there is no Keras block to set beside it.

# %%
import os
import tempfile

QUICK = os.environ.get("FLAXLESSON_QUICK") == "1"
SEED, BATCH_SIZE = 0, 64

# %% [markdown]
# ## Writing shards
#
# `shards.write_arrays` writes each image (uint8) and label as one record (msgpack of the arrays) into ArrayRecord
# files of at most `records_per_shard` records, and a `metadata.json` naming the fields and the files.

# %%
import glob

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxlesson import data, models, shards, streaming, training

FASHION = "/usr/share/datasets/fashion-mnist"
images = data.load_digits() if QUICK or not os.path.isdir(FASHION) else data.load_idx(FASHION)
pixels = np.round(images.x_train[..., 0] * 255).astype(np.uint8)  # back to the bytes the files hold
folder = shards.write_arrays(tempfile.mkdtemp(), pixels, images.y_train, records_per_shard=1000 if QUICK else 10_000)
files = sorted(glob.glob(str(folder / "shard-*.array_record")))
print(f"{images.name}: {len(pixels)} images in {len(files)} shards, {sum(map(os.path.getsize, files)):,} bytes")

# %% [markdown]
# ## grain's `MapDataset`: random access, a seeded global shuffle, each process's share
#
# `ArrayRecordDataSource` reads any record by its index across all the shards. `MapDataset.source(...)` wraps
# it; `.shuffle(seed)` is a global shuffle of all the indices (nothing is read to shuffle); `[index::count]`
# keeps one process's share; `.map` decodes; `.batch` stacks. Nothing is read until an element is asked for.

# %%
fields = streaming.read_metadata(folder)["fields"]


def decode(raw):
    example = streaming.decode_record(raw, fields)
    return {"x": example["image"].astype(np.float32) / 255, "y": example["label"].astype(np.int32)}


source = grain.sources.ArrayRecordDataSource(files)
process_index, process_count = 0, 1  # jax.process_index(), jax.process_count() on several hosts
dataset = (
    grain.MapDataset.source(source)
    .shuffle(seed=SEED)[process_index::process_count]
    .map(decode)
    .batch(BATCH_SIZE, drop_remainder=True)
)
first = dataset[0]
print(f"{len(dataset)} batches; the first: x {first['x'].shape} {first['x'].dtype}, labels {first['y'][:10]}")

# %% [markdown]
# ## A plain JAX loop over streamed batches
#
# For the equality check below, the loop reads records in the order `fit` uses (numpy's
# `default_rng([seed, epoch])` permutation, the last batch padded and masked) rather than grain's shuffle:
# `MapDataset` reads them by index all the same. The model is a linear classifier, enough to show the loop.


# %%
class Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        return models.Dense(10)(x.reshape(x.shape[0], -1))


model = Linear()
tx = optax.adam(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7)


def loss_fn(params, x, y, mask):
    losses = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y) * mask
    return losses.sum() / jnp.maximum(mask.sum(), 1.0)


@jax.jit
def train_step(params, opt_state, x, y, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


records = grain.MapDataset.source(source).map(decode)  # record i, decoded, read when asked for
n, epoch = len(records), 0
order = np.random.default_rng([SEED, epoch]).permutation(n)
params = model.init(jax.random.key(SEED), records[0]["x"][None])["params"]
opt_state = tx.init(params)
for start in range(0, n, BATCH_SIZE):
    rows = order[start : start + BATCH_SIZE]
    mask = np.zeros(BATCH_SIZE, np.float32)
    mask[: len(rows)] = 1.0
    rows = np.concatenate([rows, np.full(BATCH_SIZE - len(rows), rows[0])])
    batch = [records[int(i)] for i in rows]  # only this batch's records are read
    x = np.stack([b["x"] for b in batch])
    y = np.array([b["y"] for b in batch])
    params, opt_state, loss = train_step(params, opt_state, x, y, mask)
streamed_params = params
print(f"plain streamed loop: one epoch, {-(-n // BATCH_SIZE)} steps, last loss {float(loss):.4f}")

# %% [markdown]
# ## The same in flaxlesson: `StreamingDataset`
#
# `fit` takes a `StreamingDataset` where it takes arrays; it reads each batch as it trains (with grain worker
# processes if asked), and resumes mid-epoch without reading the steps before.

# %%
streamed = streaming.StreamingDataset(folder)
state = training.create_train_state(Linear(), streamed.take([0])["x"], seed=SEED)
state, _ = training.fit(state, streamed, epochs=1, batch_size=BATCH_SIZE, seed=SEED, verbose=0)

in_memory = training.create_train_state(Linear(), images.x_train[:1], seed=SEED)
in_memory, _ = training.fit(
    in_memory,
    pixels[..., None] / np.float32(255),
    images.y_train,
    epochs=1,
    batch_size=BATCH_SIZE,
    seed=SEED,
    verbose=0,
)


def largest_difference(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)))


plain_vs_fit = largest_difference(streamed_params, state.params)
streamed_vs_memory = largest_difference(state.params, in_memory.params)
print(f"plain streamed loop vs fit(StreamingDataset): largest difference {plain_vs_fit:.2e}")
print(f"fit streamed vs fit in memory:               largest difference {streamed_vs_memory:.2e}")
assert plain_vs_fit < 1e-6 and streamed_vs_memory < 1e-6
print("test accuracy (streamed fit):", round(training.evaluate(state, images.x_test, images.y_test)["accuracy"], 4))

# %% [markdown]
# ## What differs from in-memory training, and why
#
# - **Reading costs time**: each batch's records are read and decoded on the host; grain's worker processes
#   (`StreamingDataset(worker_count=...)`) do that in parallel while the device trains.
# - **The shuffle is global and costs nothing to set up**: it permutes indices, not data, so it needs random
#   access (ArrayRecord), not a sequential file (where a shuffle buffer only mixes nearby records).
# - **Several processes** each read only their own share of every global batch (`[index::count]` here;
#   `fit` reads each process's contiguous slice of each global batch).
