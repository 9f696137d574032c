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


class MLP(nn.Module):
    """The lesson's dense net: Dense(10, relu) -> Dense(10, relu) -> Dense(num_classes) logits."""

    hidden: Sequence[int] = (10, 10)
    num_classes: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(Dense(width)(x))
        return Dense(self.num_classes)(x)
