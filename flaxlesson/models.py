"""The lesson's networks as `flax.linen` modules, with Keras's initialisers.

Every model returns logits; `training.predict` turns them into the probabilities Keras's softmax or sigmoid
output layer would give. Keras initialises Dense and Conv2D kernels glorot_uniform and biases to zero, so the
same is done here to keep accuracy comparable.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

glorot_uniform = nn.initializers.glorot_uniform()


def Dense(features: int, **kwargs) -> nn.Dense:
    """Keras's `Dense`: a glorot_uniform kernel and a zero bias."""
    return nn.Dense(features, kernel_init=glorot_uniform, bias_init=nn.initializers.zeros, **kwargs)


def Conv(features: int, kernel_size: Sequence[int], **kwargs) -> nn.Conv:
    """Keras's `Conv2D`: a glorot_uniform kernel, a zero bias, and 'valid' padding (Flax's default is 'SAME')."""
    return nn.Conv(features, tuple(kernel_size), padding="VALID", kernel_init=glorot_uniform,
                   bias_init=nn.initializers.zeros, **kwargs)


class MLP(nn.Module):
    """The lesson's dense net: Dense(10, relu) -> Dense(10, relu) -> Dense(num_classes) logits."""

    hidden: Sequence[int] = (10, 10)
    num_classes: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(Dense(width)(x))
        return Dense(self.num_classes)(x)


class CNN(nn.Module):
    """The lesson's CNN: [Conv 3x3 relu -> MaxPool 2x2] for each of `features` -> Dense(dense, relu) -> logits.

    Takes NHWC images; with the defaults, 28x28x1 becomes 26 -> 13 -> 11 -> 5, so 5*5*64 = 1,600 dense inputs.
    """

    features: Sequence[int] = (32, 64)
    dense: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"x: the CNN takes NHWC images (batch, height, width, channels), got shape {x.shape}"
                             + ("; add a channel axis, e.g. x[..., None]" if x.ndim == 3 else ""))
        image_shape = x.shape[1:]
        for features in self.features:
            if min(x.shape[1:3]) < 4:
                raise ValueError(f"x: images of shape {image_shape} (height, width, channels: NHWC) are too small "
                                 f"for the CNN's {len(self.features)} conv 3x3 + pool 2x2 stages")
            x = nn.relu(Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(self.dense)(x))
        return Dense(self.num_classes)(x)
