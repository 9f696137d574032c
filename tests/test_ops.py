"""flaxlesson.ops: each fast op has the plain form's values and gradients (w.r.t. input and kernel)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from flaxlesson import layers, ops

DN = ("NHWC", "HWIO", "NHWC")


def plain_conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=DN)


def plain_pool(x, w=2):
    return nn.max_pool(x, (w, w), strides=(w, w))


def rand(seed, shape, low=-1.0, high=1.0):
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, low, high)


def close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max(initial=0.0))))


def value_and_vjp(f):
    """jit(args, g -> (f(*args), the VJP of cotangent g w.r.t. every argument)); jitted, as a model runs it."""
    return jax.jit(lambda args, g: (f(*args), jax.vjp(f, *args)[1](g)))


def same_vjp(fast, plain, args, seed=99, tol=1e-5):
    """Values equal, and the VJP of a random cotangent equal for every argument (pytrees too)."""
    g = rand(seed, jax.eval_shape(plain, *args).shape)
    yf, gf = value_and_vjp(fast)(args, g)
    yp, gp = value_and_vjp(plain)(args, g)
    close(yf, yp, tol)
    assert jax.tree.structure(gf) == jax.tree.structure(gp)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gp)):
        close(a, b, tol)


# ---------------------------------------------------------------------------- max_pool


@pytest.mark.parametrize(
    "shape,window",
    [
        ((1, 4, 4, 3), 2),
        ((2, 11, 11, 5), 2),  # odd: 11 -> 5, the last row and column get no gradient
        ((3, 7, 9, 2), 2),
        ((2, 26, 26, 4), 2),
        ((2, 10, 8, 3), 3),  # 10 -> 3, 8 -> 2
        ((1, 5, 5, 1), 5),
        ((1, 260, 7, 2), 2),  # more rows than an int8 index holds
        ((1, 13, 13, 1), 12),  # 144 candidates per window
    ],
)
def test_max_pool_matches_nn_max_pool(shape, window):
    x = rand(0, shape)
    same_vjp(lambda x: ops.max_pool(x, window), lambda x: plain_pool(x, window), (x,))
    assert ops.max_pool(x, window).shape == (shape[0], shape[1] // window, shape[2] // window, shape[3])


def test_max_pool_ties_go_to_the_first_element_like_select_and_scatter():
    # Post-ReLU zeros and repeated integers: many windows hold several equal maxima.
    x = jnp.maximum(jnp.round(rand(1, (2, 9, 9, 3), -3.0, 3.0)), 0.0)
    same_vjp(lambda x: ops.max_pool(x), lambda x: plain_pool(x), (x,))
    x = jnp.ones((1, 4, 4, 1))
    g = jax.grad(lambda x: ops.max_pool(x).sum())(x)
    np.testing.assert_array_equal(np.asarray(g)[0, :, :, 0], [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])


# ---------------------------------------------------------------------------- conv2d


@pytest.mark.parametrize(
    "xshape,kshape",
    [
        ((1, 5, 5, 1), (3, 3, 1, 4)),
        ((2, 8, 7, 3), (3, 2, 3, 5)),
        ((2, 13, 13, 8), (3, 3, 8, 6)),
        ((1, 28, 28, 1), (3, 3, 1, 32)),
        ((2, 6, 6, 2), (1, 1, 2, 3)),
    ],
)
def test_conv2d_matches_lax_conv(xshape, kshape):
    x, k = rand(2, xshape), rand(3, kshape)
    same_vjp(ops.conv2d, plain_conv, (x, k))


# ---------------------------------------------------------------------------- conv2d_max_pool


@pytest.mark.parametrize(
    "xshape,kshape,window",
    [
        ((1, 28, 28, 1), (3, 3, 1, 32), 2),  # the lesson's first layer: direct path, 26 -> 13
        ((2, 13, 13, 8), (3, 3, 8, 16), 2),  # second layer's shape: Winograd, 11 -> 5 (odd)
        ((1, 12, 12, 6), (3, 3, 6, 4), 2),  # even: 10 -> 5
        ((3, 9, 7, 3), (3, 3, 3, 5), 2),  # direct path, several channels, 7 -> 5 -> 2
        ((2, 4, 4, 16), (3, 3, 16, 4), 2),  # the smallest: 2 -> 1
        ((2, 10, 9, 5), (3, 3, 5, 7), 2),  # Winograd, non-square and odd
        ((1, 11, 11, 2), (5, 5, 2, 3), 2),  # other kernel: falls back to conv2d + max_pool
        ((2, 11, 11, 2), (3, 3, 2, 3), 3),  # other window: falls back
    ],
)
def test_conv2d_max_pool_matches_conv_then_pool(xshape, kshape, window):
    x, k = rand(4, xshape), rand(5, kshape)
    same_vjp(lambda x, k: ops.conv2d_max_pool(x, k, window), lambda x, k: plain_pool(plain_conv(x, k), window), (x, k))


@pytest.mark.parametrize("channels", [1, 8])
def test_conv2d_max_pool_ties_match_nn_max_pool(channels):
    # Small integers: conv outputs are exact in float32 (Winograd's halves too) and tie often.
    x = jnp.round(rand(6, (2, 9, 9, channels), -1.5, 1.5))
    k = jnp.round(rand(7, (3, 3, channels, 4), -1.5, 1.5))
    same_vjp(ops.conv2d_max_pool, lambda x, k: plain_pool(plain_conv(x, k)), (x, k))


@pytest.mark.parametrize("channels", [1, 32])
def test_bias_and_relu_after_the_pool_equal_keras_order(channels):
    """relu(pool(conv) + b) == pool(relu(conv + b)) in value and in gradient, as layers.ConvMaxPool relies on."""
    x, k = rand(8, (2, 13, 13, channels)), rand(9, (3, 3, channels, 6))
    b = rand(10, (6,), -0.5, 0.5)
    same_vjp(
        lambda x, k, b: nn.relu(ops.conv2d_max_pool(x, k) + b),
        lambda x, k, b: plain_pool(nn.relu(plain_conv(x, k) + b)),
        (x, k, b),
    )


def test_jit_and_lesson_shapes():
    x, k1, k2 = rand(11, (4, 28, 28, 1)), rand(12, (3, 3, 1, 32)), rand(13, (3, 3, 32, 64))
    f = jax.jit(lambda x: ops.conv2d_max_pool(nn.relu(ops.conv2d_max_pool(x, k1)), k2))
    assert f(x).shape == (4, 5, 5, 64)


# ---------------------------------------------------------------------------- layers


def test_conv_max_pool_layer_has_nn_conv_params_and_outputs():
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3), padding="VALID", kernel_init=layers.glorot_uniform, name="Conv_0")(x)
            return plain_pool(nn.relu(x))

    class Fast(nn.Module):
        @nn.compact
        def __call__(self, x):
            return layers.ConvMaxPool(8, name="Conv_0")(x)

    x = rand(14, (2, 12, 12, 3))
    p_plain = Plain().init(jax.random.key(0), x)
    p_fast = Fast().init(jax.random.key(0), x)
    assert jax.tree.structure(p_plain) == jax.tree.structure(p_fast)
    jax.tree.map(np.testing.assert_array_equal, p_plain, p_fast)
    p = jax.tree.map(lambda a: a + 0.1, p_plain)  # nonzero bias
    same_vjp(lambda p: Fast().apply(p, x), lambda p: Plain().apply(p, x), (p,))


# ---------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors():
    x, k = jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4))
    with pytest.raises(ValueError, match="NHWC"):
        ops.max_pool(jnp.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="window"):
        ops.max_pool(x, 0)
    with pytest.raises(ValueError, match="larger than the image"):
        ops.max_pool(x, 9)
    with pytest.raises(ValueError, match="input channels"):
        ops.conv2d(x, jnp.zeros((3, 3, 2, 4)))
    with pytest.raises(ValueError, match="HWIO"):
        ops.conv2d(x, jnp.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match="too small"):
        ops.conv2d_max_pool(jnp.zeros((1, 3, 3, 3)), k)
