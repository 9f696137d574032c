"""The training core's binary crossentropy on one logit: Keras's loss and binary accuracy, labels (B,) or (B, 1)."""

import jax
import numpy as np
import pytest

from flaxlesson import models, training


def _data(n=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).astype(np.int32)
    return x, y


def _state(seed=0, outputs=1):
    return training.create_train_state(
        models.MLP(num_classes=outputs), np.zeros((1, 3), np.float32), seed=seed, loss="binary_crossentropy"
    )


def _by_formula(p, y):
    """Keras's binary crossentropy and binary accuracy on probabilities p of shape (B, 1), labels (B,)."""
    p = p[:, 0].astype(np.float64)
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    return loss, np.mean((p > 0.5) == (y > 0.5))


@pytest.mark.parametrize("shape", ["flat", "column"])
def test_evaluate_gives_keras_loss_and_binary_accuracy(shape):
    x, y = _data()
    state = _state()
    labels = y if shape == "flat" else y[:, None]
    result = training.evaluate(state, x, labels, batch_size=3)
    loss, accuracy = _by_formula(training.predict(state, x), y)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(accuracy)


def test_predict_gives_one_probability_column():
    x, _ = _data()
    p = training.predict(_state(), x)
    assert p.shape == (7, 1) and np.all((p > 0) & (p < 1))


def test_column_labels_train_as_flat_labels():
    x, y = _data()
    a, _ = training.fit(_state(), x, y, epochs=2, batch_size=3, verbose=0)
    b, _ = training.fit(_state(), x, y[:, None], epochs=2, batch_size=3, verbose=0)
    for la, lb in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))


def test_soft_float_labels_are_accepted():
    x, _ = _data()
    y = np.linspace(0, 1, 7).astype(np.float32)
    loss = training.evaluate(_state(), x, y)["loss"]
    p = training.predict(_state(), x)[:, 0].astype(np.float64)
    assert loss == pytest.approx(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(), rel=1e-5)


def test_fit_learns_a_separable_binary_problem():
    x, y = _data(n=64)
    state, history = training.fit(_state(), x, y, epochs=30, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert training.evaluate(state, x, y)["accuracy"] >= 0.9


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.zeros((7, 2)), r"shape \(samples,\) or \(samples, 1\)"),
        (np.full(7, 2), r"binary labels must lie in \[0, 1\]"),
    ],
)
def test_bad_binary_labels_are_rejected(labels, match):
    x, _ = _data()
    with pytest.raises(ValueError, match=match):
        training.evaluate(_state(), x, labels)


def test_binary_loss_needs_one_output():
    x, y = _data()
    with pytest.raises(ValueError, match="binary_crossentropy needs a model with 1 output, got 3"):
        training.fit(_state(outputs=3), x, y, verbose=0)
