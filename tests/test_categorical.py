"""Keras's `to_categorical` and loss 'categorical_crossentropy' on one-hot or soft labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toys
from experiments import cnn_mnist
from flaxlesson import core, data, models, training


def test_to_categorical_gives_keras_one_hot_rows():
    np.testing.assert_array_equal(data.to_categorical([0, 1, 2, 3], num_classes=4), np.eye(4))
    assert data.to_categorical([2, 0]).shape == (2, 3)  # classes inferred as max + 1
    assert data.to_categorical([1, 0], num_classes=5).dtype == np.float32


def test_to_categorical_drops_a_trailing_axis_of_one_and_keeps_others():
    assert data.to_categorical(np.array([[1], [0]]), 2).shape == (2, 2)
    np.testing.assert_array_equal(data.to_categorical(np.array([[0, 1], [1, 1]]), 2)[0], [[1, 0], [0, 1]])


def test_to_categorical_takes_whole_float_labels():
    np.testing.assert_array_equal(data.to_categorical(np.array([1.0, 0.0]), 2), [[0, 1], [1, 0]])


@pytest.mark.parametrize(
    ("y", "num_classes", "message"),
    [
        ([0, 3], 3, r"y: class indices must lie in \[0, 3\) for num_classes=3, got values from 0 to 3"),
        ([-1, 0], 2, r"y: class indices must lie in \[0, 2\)"),
        ([0.5, 1.0], 2, "y: class indices must be whole numbers"),
        (["a"], 2, "y: class indices must be integers"),
        ([0, 1], 0, "num_classes must be a positive integer"),
        ([], None, "num_classes: cannot be inferred from empty labels"),
    ],
)
def test_to_categorical_refuses_what_it_cannot_encode(y, num_classes, message):
    with pytest.raises(ValueError, match=message):
        data.to_categorical(y, num_classes)


def test_categorical_crossentropy_gives_keras_documented_values():
    # keras.utils.to_categorical's docstring: categorical_crossentropy(a, b) for these probabilities b (whose rows
    # Keras normalises; the softmax of log(b) does the same).
    a = data.to_categorical([0, 1, 2, 3], num_classes=4)
    b = np.array([0.9, 0.04, 0.03, 0.03, 0.3, 0.45, 0.15, 0.13, 0.04, 0.01, 0.94, 0.05, 0.12, 0.21, 0.5, 0.17])
    losses = core.get_loss("categorical_crossentropy").per_example(jnp.log(b.reshape(4, 4)), a)
    np.testing.assert_allclose(losses, [0.10536, 0.82807, 0.1011, 1.77196], atol=1e-5)


def test_categorical_accuracy_compares_argmaxes_of_labels_and_logits():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 3.0, 0.0]])
    soft = jnp.array([[0.6, 0.4, 0.0], [0.5, 0.2, 0.3], [0.1, 0.8, 0.1]])
    np.testing.assert_array_equal(core.get_loss("categorical_crossentropy").correct(logits, soft), [1, 0, 1])


def test_one_hot_labels_train_as_the_sparse_ones_do():
    x, y = toys.three_classes(30)
    fits = {
        loss: training.fit(
            training.create_train_state(models.MLP(num_classes=3), x[:1], loss=loss),
            x,
            labels,
            epochs=2,
            batch_size=8,
            validation_split=0.2,
            verbose=0,
        )
        for loss, labels in (
            ("sparse_categorical_crossentropy", y),
            ("categorical_crossentropy", data.to_categorical(y, 3)),
        )
    }
    (sparse, sparse_history), (one_hot, one_hot_history) = fits.values()
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(one_hot_history.history[key], sparse_history.history[key], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one_hot.params), jax.tree.leaves(sparse.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_soft_labels_train():
    x, y = toys.three_classes(30)
    soft = 0.8 * data.to_categorical(y, 3) + 0.2 / 3
    state = training.create_train_state(models.MLP(num_classes=3), x[:1], loss="categorical_crossentropy")
    _, history = training.fit(state, x, soft, epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_one_hot_labels_of_another_width_than_the_outputs_are_refused():
    x, y = toys.three_classes(30)
    state = training.create_train_state(models.MLP(num_classes=3), x[:1], loss="categorical_crossentropy")
    with pytest.raises(ValueError, match="y: labels are 4 wide but the model has 3 outputs"):
        training.fit(state, x, data.to_categorical(y, 4), verbose=0)
    with pytest.raises(ValueError, match="needs one-hot or soft labels of shape \\(samples, classes\\)"):
        training.fit(state, x, y, verbose=0)


def test_cnn_script_runs_the_lessons_one_hot_code_path(tmp_path):
    config = cnn_mnist.Config(dataset="digits", labels="one-hot", epochs=1, limit=100, batch_size=50, out=str(tmp_path))
    metrics = cnn_mnist.run(config)
    assert metrics["settings"]["labels"] == "one-hot"
    matrix = np.asarray(metrics["confusion_matrix"])
    assert matrix.sum() == 100
    np.testing.assert_allclose(metrics["test_accuracy"], np.trace(matrix) / 100, atol=1e-4)
