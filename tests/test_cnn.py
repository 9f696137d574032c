import jax
import numpy as np
import pytest

from flaxlesson import models, training


def _cnn_state(size=28, channels=1, num_classes=10, seed=0):
    return training.create_train_state(models.CNN(num_classes=num_classes),
                                       np.zeros((1, size, size, channels), np.float32), seed=seed)


def _halves(n=32, size=12, seed=0):
    """Images bright on the left half (class 0) or the right half (class 1), with noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int32)
    x = rng.uniform(0.0, 0.2, (n, size, size, 1)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, :, label * size // 2:(label + 1) * size // 2] += 0.8
    return x, y


def test_cnn_has_the_lessons_layers_with_valid_padding():
    shapes = jax.tree.map(np.shape, _cnn_state().params)
    assert shapes == {
        "Conv_0": {"kernel": (3, 3, 1, 32), "bias": (32,)},
        "Conv_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
        "Dense_0": {"kernel": (5 * 5 * 64, 128), "bias": (128,)},
        "Dense_1": {"kernel": (128, 10), "bias": (10,)},
    }


def test_cnn_uses_keras_initialisers():
    params = _cnn_state().params
    assert all(np.all(np.asarray(layer["bias"]) == 0) for layer in params.values())
    kernel = np.asarray(params["Conv_1"]["kernel"])
    limit = np.sqrt(6 / (9 * 32 + 9 * 64))  # glorot_uniform: fans count the 3x3 receptive field
    assert np.abs(kernel).max() <= limit
    np.testing.assert_allclose(kernel.std(), limit / np.sqrt(3), rtol=0.02)


def test_cnn_returns_one_logit_per_class():
    state = _cnn_state(num_classes=4)
    logits = state.apply_fn({"params": state.params}, np.zeros((3, 28, 28, 1), np.float32))
    assert logits.shape == (3, 4)


def test_cnn_learns_which_half_is_bright():
    x, y = _halves()
    state, history = training.fit(_cnn_state(size=12, num_classes=2), x, y, epochs=4, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert training.evaluate(state, x, y)["accuracy"] == 1.0


def test_cnn_rejects_images_without_a_channel_axis():
    with pytest.raises(ValueError, match=r"NHWC .* got shape \(1, 28, 28\); add a channel axis"):
        training.create_train_state(models.CNN(), np.zeros((1, 28, 28), np.float32))


def test_cnn_rejects_images_too_small_for_its_stages():
    with pytest.raises(ValueError, match=r"shape \(6, 6, 1\) \(height, width, channels: NHWC\) are too small"):
        training.create_train_state(models.CNN(), np.zeros((1, 6, 6, 1), np.float32))


def test_fit_rejects_images_of_another_size_than_the_model_was_initialised_on():
    x, y = _halves(size=20)
    with pytest.raises(ValueError, match=r"x: samples of shape \(20, 20, 1\) do not fit .* initialised"):
        training.fit(_cnn_state(size=28, num_classes=2), x, y, verbose=0)


def test_cnn_rejects_channels_first_images():
    with pytest.raises(ValueError, match=r"shape \(1, 28, 28\) \(height, width, channels: NHWC\) are too small"):
        training.predict(_cnn_state(), np.zeros((2, 1, 28, 28), np.float32))
