"""The lesson's networks as `flax.linen` modules, with Keras's initialisers.

Every model returns logits; `training.predict` turns them into the probabilities Keras's softmax or sigmoid
output layer would give. Keras initialises Dense and Conv2D kernels glorot_uniform and biases to zero, so the
same is done here to keep accuracy comparable.

Every model takes `dtype`, the computation dtype, as Flax's layers do: `jnp.bfloat16` is Keras's
`mixed_bfloat16` policy (layers compute in bfloat16, params stay float32, and `core.forward` casts the logits
to float32 before the loss, so the loss, gradients and optimiser state stay float32). None computes in float32.

A model with Dropout or BatchNorm takes `train` (the flax examples' convention, Keras's `training=`): `fit`
passes True, evaluate and predict False. `CNNBatchNorm` also takes `mask`, the batch's row mask, which it hands
to its `BatchNorm` layers so that padding rows never enter the batch statistics.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlesson import layers, parallel
from flaxlesson.layers import glorot_uniform

orthogonal = nn.initializers.orthogonal()


def Dense(features: int, **kwargs) -> nn.Dense:
    """Keras's `Dense`: a glorot_uniform kernel and a zero bias."""
    return nn.Dense(features, kernel_init=glorot_uniform, bias_init=nn.initializers.zeros, **kwargs)


def Conv(features: int, kernel_size: Sequence[int], **kwargs) -> nn.Conv:
    """Keras's `Conv2D`: a glorot_uniform kernel, a zero bias, and 'valid' padding (Flax's default is 'SAME')."""
    return nn.Conv(
        features,
        tuple(kernel_size),
        padding="VALID",
        kernel_init=glorot_uniform,
        bias_init=nn.initializers.zeros,
        **kwargs,
    )


class MLP(nn.Module):
    """The lesson's dense net: Dense(10, relu) -> Dense(10, relu) -> Dense(num_classes) logits."""

    hidden: Sequence[int] = (10, 10)
    num_classes: int = 3
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(Dense(width, dtype=self.dtype)(x))
        return Dense(self.num_classes, dtype=self.dtype)(x)


class CNN(nn.Module):
    """The lesson's CNN: [Conv 3x3 relu -> MaxPool 2x2] for each of `features` -> Dense(dense, relu) -> logits.

    Takes NHWC images; with the defaults, 28x28x1 becomes 26 -> 13 -> 11 -> 5, so 5*5*64 = 1,600 dense inputs.
    `fast` computes each conv + pool stage as `layers.ConvMaxPool` (same params, values and gradients, several
    times faster on a CPU); `fast=False` is the plain `nn.Conv` + `nn.max_pool` form it is checked against.
    """

    features: Sequence[int] = (32, 64)
    dense: int = 128
    num_classes: int = 10
    fast: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(
                f"x: the CNN takes NHWC images (batch, height, width, channels), got shape {x.shape}"
                + ("; add a channel axis, e.g. x[..., None]" if x.ndim == 3 else "")
            )
        image_shape = x.shape[1:]
        for i, features in enumerate(self.features):
            if min(x.shape[1:3]) < 4:
                raise ValueError(
                    f"x: images of shape {image_shape} (height, width, channels: NHWC) are too small "
                    f"for the CNN's {len(self.features)} conv 3x3 + pool 2x2 stages"
                )
            if self.fast:
                x = layers.ConvMaxPool(features, (3, 3), dtype=self.dtype, name=f"Conv_{i}")(x)
            else:
                x = nn.relu(Conv(features, (3, 3), dtype=self.dtype, name=f"Conv_{i}")(x))
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(self.dense, dtype=self.dtype)(x))
        return Dense(self.num_classes, dtype=self.dtype)(x)


def _global_sum(tree: Any, axis_name: str) -> Any:
    """`tree` summed over the pmap axis `axis_name` when the step runs under pmap; as it is otherwise.

    Under jit (one device, or a batch sharded over a mesh) a sum over the batch axis already covers the whole
    global batch: XLA inserts the all-reduce. Under pmap each device holds its own rows, so the sums are psum-ed.
    """
    try:
        return jax.lax.psum(tree, axis_name)
    except NameError:  # the axis is not bound: not under pmap
        return tree


def masked_moments(x: jax.Array, mask: jax.Array | None, axis_name: str = parallel.AXIS) -> tuple:
    """Per-feature (last axis) mean and biased variance of `x` over the real rows (`mask` 1) of the global batch.

    Sums of the real rows and their count, summed over every device (see `_global_sum`), then divided: the
    statistics of the global batch's real rows, whatever the strategy and however the padding falls on devices.
    """
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    rows = jnp.ones(x.shape[:1], x.dtype) if mask is None else mask.astype(x.dtype)
    weight = jnp.broadcast_to(rows.reshape(-1, *([1] * (x.ndim - 1))), x.shape[:-1] + (1,))
    axes = tuple(range(x.ndim - 1))
    x = jnp.where(weight > 0, x, 0.0)  # padding rows may hold anything; 0 * inf would be NaN
    total, count = _global_sum((jnp.sum(x * weight, axes), jnp.sum(weight, axes)), axis_name)
    count = jnp.maximum(count, 1.0)
    mean = total / count
    squares = _global_sum(jnp.sum(jnp.square(x - mean) * weight, axes), axis_name)
    return mean, squares / count


class BatchNorm(nn.Module):
    """Keras's `BatchNormalization` (momentum 0.99, epsilon 1e-3) over the real rows of the global batch.

    With `train`, normalises by the statistics of the batch's real rows (`mask`, as `core` passes it to a model
    that takes one; all rows when None) over every device, and moves the running averages in the 'batch_stats'
    collection toward them; without, normalises by the running averages. Its variables are named as
    `nn.BatchNorm`'s ('scale', 'bias'; 'mean', 'var'), whose own mask is not enough here: under pmap it averages
    per-device means, unweighted by their real rows, and a device holding only padding gives NaN.
    """

    momentum: float = 0.99
    epsilon: float = 1e-3
    dtype: Any = None
    axis_name: str = parallel.AXIS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features)
        bias = self.param("bias", nn.initializers.zeros, features)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        if train:
            mean, var = masked_moments(x, mask, self.axis_name)
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        else:
            mean, var = running_mean.value, running_var.value
        y = (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype or jnp.promote_types(x.dtype, jnp.float32))


class CNNBatchNorm(nn.Module):
    """The lesson's CNN with BatchNorm after each conv + pool stage and Dropout before the output layer.

    [Conv 3x3 -> MaxPool 2x2 -> BatchNorm -> relu] for each of `features` -> Dense(dense, relu) ->
    Dropout(`dropout`) -> logits. The pool comes before the BatchNorm so that each stage is the fast fused
    `layers.ConvMaxPool` (with no activation of its own); the statistics are the pooled maps'. Takes `train`
    (Dropout on, batch statistics) and `mask` (the rows those statistics cover), as `core`'s train step passes.
    """

    features: Sequence[int] = (32, 64)
    dense: int = 128
    num_classes: int = 10
    dropout: float = 0.5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"x: the CNN takes NHWC images (batch, height, width, channels), got shape {x.shape}")
        for i, features in enumerate(self.features):
            x = layers.ConvMaxPool(features, (3, 3), activation=None, dtype=self.dtype, name=f"Conv_{i}")(x)
            x = nn.relu(BatchNorm(dtype=self.dtype, name=f"BatchNorm_{i}")(x, train, mask))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(self.dense, dtype=self.dtype)(x))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return Dense(self.num_classes, dtype=self.dtype)(x)


def _concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def check_sequence_inputs(x: Any, seq_lengths: Any = None) -> None:
    """Reject what a recurrent model cannot read: ragged or non-numeric steps, bad `seq_lengths`.

    Shapes and dtypes are checked always; values (lengths in [1, steps]) wherever they are concrete, i.e. outside jit.
    """
    if isinstance(x, (list, tuple)):
        try:
            x = np.asarray(x)
        except ValueError as error:
            raise ValueError(
                "x: ragged sequences (different lengths); pad them to one length with flaxlesson.data.pad_sequences"
            ) from error
    if not hasattr(x, "shape") or x.ndim not in (2, 3):
        raise ValueError(f"x: expected (batch, steps) or (batch, steps, features), got shape {np.shape(x)}")
    if not (jnp.issubdtype(x.dtype, jnp.integer) or jnp.issubdtype(x.dtype, jnp.floating)):
        raise ValueError(f"x: expected numbers, got dtype {x.dtype}")
    if seq_lengths is None:
        return
    if not hasattr(seq_lengths, "shape"):
        seq_lengths = np.asarray(seq_lengths)
    if seq_lengths.shape != x.shape[:1]:
        raise ValueError(
            f"seq_lengths: expected shape ({x.shape[0]},), one length per sequence, got {seq_lengths.shape}"
        )
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise ValueError(f"seq_lengths: expected integers, got dtype {seq_lengths.dtype}")
    if _concrete(seq_lengths) and seq_lengths.size:
        lengths = np.asarray(seq_lengths)
        if lengths.min() < 1 or lengths.max() > x.shape[1]:
            raise ValueError(
                f"seq_lengths: each length must lie in [1, {x.shape[1]}] (the steps), "
                f"got values from {lengths.min()} to {lengths.max()}"
            )


class SimpleRNNClassifier(nn.Module):
    """Keras's SimpleRNN(units) -> Dense(num_classes): `nn.RNN` over `nn.SimpleCell`, returning logits.

    `num_classes=1` is the lesson's binary form (one logit; sigmoid via loss 'binary_crossentropy'), more is the
    softmax form. The cell computes h_t = activation(x_t W + h_{t-1} U + b) with Keras's initialisers (W
    glorot_uniform, U orthogonal, b zero, one bias) and the output is the last state, as Keras's SimpleRNN gives.
    Input (batch, steps) is one feature per step, as Keras reads it. Without `seq_lengths` every step counts,
    padding included, as in Keras; with them each sequence ends at its own last real step, which assumes the
    padding comes after the data (`pad_sequences(padding='post')`).
    """

    units: int = 50
    num_classes: int = 1
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Any = None

    @nn.nowrap
    def check_inputs(self, x: Any, seq_lengths: Any = None) -> None:
        """Host-side check of a whole input before training (the jitted step cannot check values)."""
        check_sequence_inputs(x, seq_lengths)

    @nn.compact
    def __call__(self, x: jax.Array, seq_lengths: jax.Array | None = None) -> jax.Array:
        check_sequence_inputs(x, seq_lengths)
        x = jnp.asarray(x, self.dtype or jnp.float32)
        if x.ndim == 2:
            x = x[..., None]
        cell = nn.SimpleCell(
            self.units,
            activation_fn=self.activation,
            kernel_init=glorot_uniform,
            recurrent_kernel_init=orthogonal,
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
        )
        # Keras's zero initial state, in the computation dtype (the cell's own would be float32, its param dtype).
        initial = jnp.zeros((x.shape[0], self.units), x.dtype)
        last, _ = nn.RNN(cell, return_carry=True)(x, initial_carry=initial, seq_lengths=seq_lengths)
        return Dense(self.num_classes, dtype=self.dtype)(last)
