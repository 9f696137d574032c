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
# # 3.2 Distributed training, in plain JAX
#
# The lesson: distributed training splits the work over several devices or machines. Its example wraps a model
# in `tf.distribute.MirroredStrategy`: a copy of the model on every device, each batch split between them, the
# gradients summed. In JAX that is a `Mesh` of devices, `NamedSharding`s that say what is split and what is
# copied, `jax.device_put`, and the same jitted step: XLA inserts the gradient all-reduce itself. Then the older
# `jax.pmap` form with `lax.pmean`, and what `jax.distributed.initialize` adds for several machines.
#
# This machine has one CPU, so the first cell asks XLA for 8 virtual CPU devices, before JAX is imported. They
# share the CPU's cores: they show the mechanics and the equality, not a speed-up.

# %%
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
QUICK = os.environ.get("FLAXLESSON_QUICK") == "1"
EPOCHS, BATCH_SIZE, SEED = (1 if QUICK else 5), 32, 0  # the lesson's model.fit(X, y, epochs=5, batch_size=32)

import jax

print(jax.devices())

# %% [markdown]
# ## The lesson's Keras code
#
# ```python
# import tensorflow as tf
# from tensorflow.keras.models import Sequential
# from tensorflow.keras.layers import Dense
#
# # Define a distributed strategy
# strategy = tf.distribute.MirroredStrategy()
#
# with strategy.scope():
#     # Define the model
#     model = Sequential([
#         Dense(64, activation='relu', input_shape=(784,)),
#         Dense(64, activation='relu'),
#         Dense(10, activation='softmax')
#     ])
#
#     # Compile the model
#     model.compile(optimizer='adam', loss='sparse_categorical_crossentropy', metrics=['accuracy'])
#
# # Dummy data
# X = np.random.rand(1000, 784)
# y = np.random.randint(10, size=(1000,))
#
# # Train the model
# model.fit(X, y, epochs=5, batch_size=32)
# ```

# %% [markdown]
# ## The model and the step, as on one device

# %%
import time

import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxlesson import models, training

rng = np.random.default_rng(SEED)
X = rng.random((1000, 784), dtype=np.float32)  # the lesson's dummy data
y = rng.integers(10, size=1000).astype(np.int32)

model = models.MLP(hidden=(64, 64), num_classes=10)  # Dense(64, relu) -> Dense(64, relu) -> Dense(10) logits
tx = optax.adam(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7)


def loss_fn(params, x, y, mask):
    losses = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y) * mask
    return losses.sum() / jnp.maximum(mask.sum(), 1.0)


@jax.jit
def train_step(params, opt_state, x, y, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def batches(n, batch_size, seed, epoch):
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        mask = np.zeros(batch_size, np.float32)
        mask[: len(rows)] = 1.0  # 1000 = 31 x 32 + 8: the last batch is padded and masked
        yield np.concatenate([rows, np.full(batch_size - len(rows), rows[0])]), mask


def train(epochs, place=lambda tree, kind: tree):
    """The loop of 1.1; `place(tree, 'replicated' | 'batch')` puts params and batches where they should be."""
    params = place(model.init(jax.random.key(SEED), X[:1])["params"], "replicated")
    opt_state = place(tx.init(params), "replicated")
    seconds = []
    for epoch in range(epochs):
        for rows, mask in batches(len(X), BATCH_SIZE, SEED, epoch):
            start = time.perf_counter()
            x, labels, mask = place((X[rows], y[rows], mask), "batch")
            params, opt_state, loss = train_step(params, opt_state, x, labels, mask)
            loss.block_until_ready()
            seconds.append(time.perf_counter() - start)
        print(f"epoch {epoch + 1}/{epochs}: last batch loss {float(loss):.4f}")
    return params, 1e3 * float(np.median(seconds[1:]))  # the first step compiles


one_device, one_ms = train(EPOCHS)

# %% [markdown]
# ## On 8 devices: a `Mesh`, `NamedSharding`, `jax.device_put`
#
# A 1-D mesh names its axis 'data'. Params and optimiser state are copied to every device
# (`PartitionSpec()`); each batch is split along its first axis (`PartitionSpec('data')`): 4 rows per device.
# The step is the same jitted function: it reads the shardings of its arguments, and XLA adds the all-reduce that
# sums the gradients.

# %%
mesh = Mesh(np.array(jax.devices()), ("data",))
shardings = {"replicated": NamedSharding(mesh, PartitionSpec()), "batch": NamedSharding(mesh, PartitionSpec("data"))}


def place(tree, kind):
    return jax.device_put(tree, shardings[kind])


sharded, sharded_ms = train(EPOCHS, place)
print("a placed batch lives on", len(place(X[:32], "batch").sharding.device_set), "devices")


def largest_difference(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b)))


print(f"8 devices vs one: largest parameter difference {largest_difference(sharded, one_device):.2e}")
print(f"median step: {one_ms:.2f} ms on one device, {sharded_ms:.2f} ms sharded over 8 virtual devices")
print("(the 8 virtual devices share this machine's CPU cores, and the all-reduce is added work: no speed-up here)")
assert largest_difference(sharded, one_device) < 1e-6

# %% [markdown]
# ## The same in flaxlesson: `fit(strategy='sharded')`

# %%
state = training.create_train_state(model, X[:1], seed=SEED)
state, history = training.fit(
    state, X, y, epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED, strategy="sharded", verbose=0
)
print(
    f"plain sharded loop vs fit(strategy='sharded'): largest difference {largest_difference(sharded, state.params):.2e}"
)
assert largest_difference(sharded, state.params) < 1e-6

# %% [markdown]
# ## The `jax.pmap` form, with `lax.pmean`
#
# `pmap` runs one copy of the step per device, on a leading device axis: params copied 8 times, the batch
# reshaped to (8, 4, ...). Each device divides its loss by its share of the global batch's real rows, so the
# mean of the devices' gradients (`lax.pmean`) is the global batch's gradient, padded last batch included.

# %%
n = jax.device_count()


def pmap_step(params, opt_state, x, y, mask):
    share = jax.lax.psum(mask.sum(), "devices") / n  # the real rows per device, on average

    def local_loss(params):
        losses = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y) * mask
        return losses.sum() / jnp.maximum(share, 1.0 / n)

    grads = jax.lax.pmean(jax.grad(local_loss)(params), "devices")
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


pmap_step = jax.pmap(pmap_step, axis_name="devices")
copies = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), tree)  # noqa: E731
params = copies(model.init(jax.random.key(SEED), X[:1])["params"])
opt_state = copies(tx.init(model.init(jax.random.key(SEED), X[:1])["params"]))
for epoch in range(EPOCHS):
    for rows, mask in batches(len(X), BATCH_SIZE, SEED, epoch):
        split = lambda a: a.reshape(n, -1, *a.shape[1:])  # noqa: E731
        params, opt_state = pmap_step(params, opt_state, split(X[rows]), split(y[rows]), split(mask))
pmapped = jax.tree.map(lambda a: a[0], params)
print(f"pmap + pmean vs one device: largest parameter difference {largest_difference(pmapped, one_device):.2e}")
assert largest_difference(pmapped, one_device) < 1e-6

# %% [markdown]
# ## Several machines: `jax.distributed.initialize`
#
# On several hosts, each process calls `jax.distributed.initialize(coordinator_address, num_processes,
# process_id)` (on TPU pods and SLURM clusters it finds them itself) before anything else in JAX. After it,
# `jax.devices()` lists the devices of every process, so the same `Mesh` spans the machines, and the same jitted
# step runs there; each process feeds only its own share of every global batch
# (`jax.make_array_from_process_local_data`), and the gradient all-reduce crosses the network. flaxlesson's
# `parallel.initialize` calls it from the launcher's environment, and `fit` reads each process's share.
#
# ## What differs from Keras, and why
#
# - **Shardings, not a strategy scope**: where each array lives is said by its sharding; the step is not rewritten.
# - **The update is the one-device update** for the same global batch: padded rows are masked, and the loss is
#   divided by the global batch's real rows, as Keras's MirroredStrategy divides by the global batch size.
# - **`pmap`** is JAX's older form; `jit` with shardings is the current one, and what `fit(strategy='sharded')` uses.
