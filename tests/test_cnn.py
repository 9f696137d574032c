import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import cnn_mnist
from flaxlesson import checkpoint, models, plots, training


def _cnn_state(size=28, channels=1, num_classes=10, seed=0):
    return training.create_train_state(
        models.CNN(num_classes=num_classes), np.zeros((1, size, size, channels), np.float32), seed=seed
    )


def _halves(n=32, size=12, seed=0):
    """Images bright on the left half (class 0) or the right half (class 1), with noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int32)
    x = rng.uniform(0.0, 0.2, (n, size, size, 1)).astype(np.float32)
    for i, label in enumerate(y):
        x[i, :, label * size // 2 : (label + 1) * size // 2] += 0.8
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


def test_prediction_grid_and_confusion_matrix_write_pngs(tmp_path):
    images = np.random.default_rng(0).uniform(size=(7, 8, 8, 1)).astype(np.float32)
    plots.prediction_grid(images, np.arange(7) % 3, np.zeros(7, int), ("a", "b", "c"), tmp_path / "grid.png", columns=3)
    plots.confusion_matrix(np.array([[3, 1], [0, 2]]), ("a", "b"), tmp_path / "cm.png")
    for name in ("grid.png", "cm.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prediction_grid_rejects_labels_outside_class_names(tmp_path):
    with pytest.raises(ValueError, match=r"y_pred: labels must be integers in \[0, 2\)"):
        plots.prediction_grid(
            np.zeros((2, 4, 4, 1)), np.array([0, 1]), np.array([0, 2]), ("a", "b"), tmp_path / "grid.png"
        )


def test_prediction_grid_rejects_images_that_are_not_nhwc(tmp_path):
    with pytest.raises(ValueError, match="images: expected NHWC"):
        plots.prediction_grid(np.zeros((2, 4, 4)), np.array([0, 1]), np.array([0, 1]), ("a", "b"), tmp_path / "g.png")


def test_confusion_matrix_rejects_a_shape_unlike_the_classes(tmp_path):
    with pytest.raises(ValueError, match=r"matrix: expected shape \(3, 3\)"):
        plots.confusion_matrix(np.zeros((2, 2)), ("a", "b", "c"), tmp_path / "cm.png")


def test_script_trains_on_digits_and_writes_metrics_and_figures(tmp_path):
    metrics = cnn_mnist.run(cnn_mnist.Config(dataset="digits", epochs=1, out=str(tmp_path)))
    assert metrics["dataset"] == "digits" and metrics["test_accuracy"] > 0.5
    matrix = np.asarray(metrics["confusion_matrix"])
    assert matrix.sum() == 360
    np.testing.assert_allclose(np.trace(matrix) / 360, metrics["test_accuracy"], atol=1e-6)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["dataset"] == "digits" and len(written["history"]["val_accuracy"]) == 1
    assert written["train_samples_per_second"] > 0
    for name in ("curves.png", "predictions.png", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_script_reports_an_unavailable_source_as_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cnn_mnist.main(["--dataset", "idx", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "lacks train-images-idx3-ubyte.gz" in capsys.readouterr().err


def test_fast_cnn_equals_the_plain_form_in_value_and_gradient():
    x = jax.random.uniform(jax.random.key(0), (3, 28, 28, 1))
    y = jnp.array([1, 7, 3])
    fast, plain = models.CNN(), models.CNN(fast=False)
    params = fast.init(jax.random.key(1), x)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(plain.init(jax.random.key(1), x)["params"])

    def loss(model, p):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

    np.testing.assert_allclose(
        fast.apply({"params": params}, x), plain.apply({"params": params}, x), rtol=1e-5, atol=1e-5
    )
    grads = [jax.grad(loss, argnums=1)(m, params) for m in (fast, plain)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_script_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_does(tmp_path):
    common = cnn_mnist.Config(dataset="digits", limit=200, batch_size=50, epochs=2)
    whole = cnn_mnist.run(dataclasses.replace(common, out=str(tmp_path / "whole")))
    ckpt = str(tmp_path / "ckpt")
    cnn_mnist.run(dataclasses.replace(common, epochs=1, checkpoint_dir=ckpt, out=str(tmp_path / "first")))
    resumed = cnn_mnist.run(
        dataclasses.replace(common, checkpoint_dir=ckpt, resume=True, out=str(tmp_path / "resumed"))
    )
    assert len(resumed["history"]["loss"]) == 1
    np.testing.assert_allclose(resumed["history"]["loss"][0], whole["history"]["loss"][1], rtol=1e-5)
    np.testing.assert_allclose(resumed["test_accuracy"], whole["test_accuracy"], atol=1e-6)


def test_script_resumed_with_nothing_left_to_train_scores_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, _cnn_state(), 1, kind="cnn_mnist")
    config = cnn_mnist.Config(
        dataset="digits", limit=50, epochs=1, checkpoint_dir=str(ckpt), resume=True, out=str(tmp_path / "out")
    )
    metrics = cnn_mnist.run(config)
    assert metrics["history"] == {} and metrics["train_samples_per_second"] is None
    assert "nothing left to train after epoch 1" in capsys.readouterr().out
