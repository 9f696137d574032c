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
# # 2.2 A recurrent network, in plain JAX
#
# The lesson: RNNs read sequences one step at a time, carrying a state from step to step. Its example pads three
# short sequences to length 5 and trains a SimpleRNN on them. Here: `pad_sequences` in numpy,
# `nn.RNN(nn.SimpleCell)` with and without `seq_lengths`, the training loop in plain JAX, then flaxlesson's
# `fit`, and a check that both give the same parameters.
#
# The lesson's settings are tiny (3 sequences, 10 epochs of batch 1), so the quick and the full runs are the same.

# %%
EPOCHS, BATCH_SIZE, SEED = 10, 1, 0  # the lesson's model.fit(X, y, epochs=10, batch_size=1)

# %% [markdown]
# ## The lesson's Keras code
#
# ```python
# from tensorflow.keras.models import Sequential
# from tensorflow.keras.layers import SimpleRNN, Dense
# from tensorflow.keras.preprocessing.sequence import pad_sequences
# import numpy as np
#
# # Prepare dummy sequential data
# X = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
# y = np.array([1, 0, 1])
# X = pad_sequences(X, padding='post', maxlen=5)
#
# # Define the model
# model = Sequential([
#     SimpleRNN(50, activation='relu', input_shape=(X.shape[1], 1)),
#     Dense(1, activation='sigmoid')
# ])
#
# # Compile the model
# model.compile(optimizer='adam', loss='binary_crossentropy', metrics=['accuracy'])
#
# # Train the model
# model.fit(X, y, epochs=10, batch_size=1)
#
# # Make predictions
# y_pred = model.predict(X)
# print("Predictions:", y_pred)
# ```

# %% [markdown]
# ## Padding, in numpy
#
# `pad_sequences(padding='post', maxlen=5)` writes each sequence at the start of a row of zeros (sequences longer
# than `maxlen` lose their first steps, Keras's default `truncating='pre'`).

# %%
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


def pad_post(sequences, maxlen):
    out = np.zeros((len(sequences), maxlen), np.int32)
    for row, seq in zip(out, sequences):
        seq = np.asarray(seq)[-maxlen:]
        row[: len(seq)] = seq
    return out


X = pad_post([[1, 2, 3], [4, 5, 6], [7, 8, 9]], maxlen=5)
y = np.array([1, 0, 1], np.float32)
lengths = np.array([3, 3, 3], np.int32)  # the real steps of each row
print(X)

from flaxlesson import data

assert (X == data.pad_sequences([[1, 2, 3], [4, 5, 6], [7, 8, 9]], padding="post", maxlen=5)).all()

# %% [markdown]
# ## The model: `nn.RNN` over `nn.SimpleCell`
#
# The cell computes h_t = relu(x_t W + h_{t-1} U + b), Keras's SimpleRNN, with Keras's initialisers (W
# glorot-uniform, U orthogonal, b zero). `nn.RNN` scans it over the steps and, with `return_carry=True`, returns
# the last state, which is what Keras's SimpleRNN outputs. The Dense layer gives one logit (the sigmoid is in
# the loss).


# %%
class RNN(nn.Module):
    @nn.compact
    def __call__(self, x, seq_lengths=None):
        x = jnp.asarray(x, jnp.float32)[..., None]  # (batch, steps) -> (batch, steps, 1 feature), as Keras reads it
        cell = nn.SimpleCell(
            50,
            activation_fn=nn.relu,
            kernel_init=nn.initializers.glorot_uniform(),
            recurrent_kernel_init=nn.initializers.orthogonal(),
            bias_init=nn.initializers.zeros,
        )
        initial = jnp.zeros((x.shape[0], 50))  # Keras's zero initial state
        last, _ = nn.RNN(cell, return_carry=True)(x, initial_carry=initial, seq_lengths=seq_lengths)
        return nn.Dense(1, kernel_init=nn.initializers.glorot_uniform(), bias_init=nn.initializers.zeros)(last)


model = RNN()
params = model.init(jax.random.key(SEED), X[:1])["params"]

# %% [markdown]
# Without `seq_lengths` every step counts, the two padded zeros included, as in Keras (which would need a
# `Masking` layer to skip them). With `seq_lengths` the output is the state at each row's last real step: the
# same as running the unpadded sequences.

# %%
with_padding = model.apply({"params": params}, X)
with_lengths = model.apply({"params": params}, X, seq_lengths=lengths)
unpadded = model.apply({"params": params}, X[:, :3])
print("logits, every step:      ", with_padding.ravel())
print("logits, with seq_lengths:", with_lengths.ravel())
print("logits, unpadded rows:   ", unpadded.ravel())
assert np.allclose(with_lengths, unpadded, atol=1e-6) and not np.allclose(with_padding, unpadded)

# %% [markdown]
# ## Training, in plain JAX

# %%
tx = optax.adam(learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-7)  # Keras's Adam
opt_state = tx.init(params)


def loss_fn(params, x, y, mask):
    logits = model.apply({"params": params}, x).reshape(-1)
    losses = optax.sigmoid_binary_cross_entropy(logits, y) * mask  # binary_crossentropy on the sigmoid of the logit
    return losses.sum() / jnp.maximum(mask.sum(), 1.0), logits


@jax.jit
def train_step(params, opt_state, x, y, mask):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    correct = (((logits > 0) == (y > 0.5)) * mask).sum()
    return optax.apply_updates(params, updates), opt_state, loss * mask.sum(), correct


for epoch in range(EPOCHS):
    order = np.random.default_rng([SEED, epoch]).permutation(len(X))  # batches of 1: no padding, every mask 1
    loss_sum = correct = 0.0
    for start in range(0, len(X), BATCH_SIZE):
        rows, mask = order[start : start + BATCH_SIZE], np.ones(BATCH_SIZE, np.float32)
        params, opt_state, batch_loss, batch_correct = train_step(params, opt_state, X[rows], y[rows], mask)
        loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
    print(f"epoch {epoch + 1}/{EPOCHS}: loss {float(loss_sum) / len(X):.4f}, accuracy {float(correct) / len(X):.4f}")

plain_params = params
plain_predictions = jax.nn.sigmoid(model.apply({"params": params}, X)).ravel()
print("Predictions (plain JAX):", plain_predictions)

# %% [markdown]
# ## The same in flaxlesson

# %%
from flaxlesson import models, training

state = training.create_train_state(
    models.SimpleRNNClassifier(units=50, num_classes=1), X[:1], seed=SEED, loss="binary_crossentropy"
)
state, history = training.fit(state, X, y, epochs=EPOCHS, batch_size=BATCH_SIZE, seed=SEED, verbose=0)
fit_predictions = training.predict(state, X).ravel()
print("Predictions (flaxlesson):", fit_predictions, " last epoch:", {k: v[-1] for k, v in history.history.items()})

# %% [markdown]
# ## Both gave the same parameters

# %%
largest = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain_params, state.params)))
print(f"largest parameter difference after {int(state.step)} steps: {largest:.2e}")
assert largest < 1e-6

# %% [markdown]
# ## What differs from Keras, and why
#
# - **One logit, not a sigmoid output**: `optax.sigmoid_binary_cross_entropy` takes the logit (exact for large
#   logits, where log(sigmoid) would round to 0); `training.predict` returns the sigmoid, as Keras's `predict`.
# - **Initialisers**: glorot-uniform input kernel, orthogonal recurrent kernel, one zero bias, as Keras's
#   SimpleRNN (Flax's `SimpleCell` defaults are LeCun-normal and orthogonal: set explicitly).
# - **Adam's epsilon** 1e-7 (Keras), not optax's 1e-8.
# - **`seq_lengths`** is Flax's way of skipping padding; Keras steps through it unless a `Masking` layer is added.
#   Both the lesson's model and `models.SimpleRNNClassifier` step through it by default, as Keras does.
# - Three sequences and ten epochs teach the mechanics, not a task: the predictions are near 0.5 and
#   `accuracy` depends on the seed, in Keras as here.
