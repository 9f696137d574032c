"""Keras's mixed_bfloat16: the models compute in bfloat16 while params, optimiser state and the loss stay float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import cnn_mnist
from flaxlesson import core, layers, models, training


def _data(shape, classes, n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, *shape)).astype(np.float32)
    return x, rng.integers(classes, size=n).astype(np.int32)


CASES = {
    "mlp": (lambda dtype: models.MLP(num_classes=3, dtype=dtype), (4,), 3, "sparse_categorical_crossentropy"),
    # The lesson's CNN, narrower and on 12x12 images (12 -> 10 -> 5 -> 3 -> 1), so the test compiles quickly.
    "cnn": (lambda dtype: models.CNN((4, 8), 16, dtype=dtype), (12, 12, 1), 10, "sparse_categorical_crossentropy"),
    "cnn_plain": (
        lambda dtype: models.CNN((4, 8), 16, fast=False, dtype=dtype),
        (12, 12, 1),
        10,
        "sparse_categorical_crossentropy",
    ),
    "rnn": (lambda dtype: models.SimpleRNNClassifier(8, num_classes=1, dtype=dtype), (5,), 2, "binary_crossentropy"),
}


def _fit(key, dtype, strategy="single"):
    make, shape, classes, loss = CASES[key]
    x, y = _data(shape, classes)
    state = training.create_train_state(make(dtype), x[:1], loss=loss)
    return training.fit(state, x, y, epochs=2, batch_size=8, strategy=strategy, verbose=0), state, x


def _dtypes(tree):
    return {leaf.dtype for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)}


@pytest.mark.parametrize("key", CASES)
def test_bfloat16_model_computes_in_bfloat16_and_keeps_float32_state(key):
    (trained, history), initial, x = _fit(key, jnp.bfloat16)
    assert initial.apply_fn({"params": initial.params}, x[:2]).dtype == jnp.bfloat16
    assert core.forward(initial, initial.params, x[:2]).dtype == jnp.float32
    assert _dtypes(trained.params) == {jnp.dtype(jnp.float32)}
    assert _dtypes(trained.opt_state) == {jnp.dtype(jnp.float32)}
    (_, reference), _, _ = _fit(key, None)
    np.testing.assert_allclose(history.history["loss"], reference.history["loss"], rtol=0.03)


def test_bfloat16_under_the_sharded_strategy_matches_one_device():
    (sharded, sharded_history), _, _ = _fit("mlp", jnp.bfloat16, strategy="sharded")
    (single, single_history), _, _ = _fit("mlp", jnp.bfloat16)
    assert _dtypes(sharded.params) == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(sharded_history.history["loss"], single_history.history["loss"], rtol=1e-2)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(single.params)):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3)


def test_fast_conv_layer_in_bfloat16_matches_the_plain_bfloat16_form():
    x = jax.random.uniform(jax.random.key(0), (2, 12, 12, 8))
    fast = layers.ConvMaxPool(16, dtype=jnp.bfloat16)
    params = fast.init(jax.random.key(1), x)["params"]
    out = fast.apply({"params": params}, x)
    assert out.dtype == jnp.bfloat16 and params["kernel"].dtype == jnp.float32
    y = jax.lax.conv_general_dilated(
        x.astype(jnp.bfloat16),
        params["kernel"].astype(jnp.bfloat16),
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    plain = jax.nn.relu(jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"))
    np.testing.assert_allclose(out.astype(np.float32), plain.astype(np.float32), rtol=2e-2, atol=2e-2)


def test_cnn_script_takes_the_dtype_flag():
    parser = cnn_mnist.flags.parser(cnn_mnist.__doc__, cnn_mnist.Config())
    config = cnn_mnist.flags.config(parser, cnn_mnist.Config, parser.parse_args(["--dtype", "bfloat16"]))
    assert config.dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float16"])
