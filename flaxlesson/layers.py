"""Small Flax modules over `flaxlesson.ops`: the lesson's conv layers in their fast CPU forms.

Parameters are named and shaped as `flax.linen.Conv`'s ('kernel' (kh, kw, in, out), 'bias' (out,)) and
initialised as Keras's Conv2D (glorot_uniform kernel, zero bias), so a module built with these layers under
the same names (e.g. ``name="Conv_0"``) has the same parameter tree as one built with `nn.Conv`: the same
initial values for the same key, and checkpoints that load into either.
"""

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlesson import ops

glorot_uniform = nn.initializers.glorot_uniform()


class ConvMaxPool(nn.Module):
    """Keras's ``Conv2D(features, kernel_size, activation=...)`` ('valid') then ``MaxPooling2D(window)``.

    Computes ``activation(ops.conv2d_max_pool(x, kernel, window) + bias)``, which equals
    ``max_pool(activation(conv(x) + bias))`` in value and gradient for any non-decreasing activation
    (ReLU, identity, sigmoid, tanh): a per-channel bias and a monotone activation commute with the max, so they
    run on the pooled array, a quarter of the size.

    `dtype` is the computation dtype (params stay `param_dtype`, float32), as `nn.Conv`'s. In a 16-bit float the
    conv and the pool run as the unfused fast forms `ops.conv2d` + `ops.max_pool`: Winograd's transforms add
    rounding that bfloat16 magnifies (about twice the plain bfloat16 conv's gradient error), the unfused forms
    give the plain conv's.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    window: int = 2
    activation: Callable[[jax.Array], jax.Array] | None = nn.relu
    kernel_init: Callable = glorot_uniform
    bias_init: Callable = nn.initializers.zeros
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits == 16:
            y = ops.max_pool(ops.conv2d(x, kernel), self.window) + bias
        else:
            y = ops.conv2d_max_pool(x, kernel, self.window) + bias
        return y if self.activation is None else self.activation(y)
