"""SimpleRNNClassifier: Keras's SimpleRNN parameterisation, padding with and without seq_lengths, bad input."""

import jax
import numpy as np
import pytest

from flaxlesson import models, training

X = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0], [6, 0, 0, 0, 0]], np.int32)
LENGTHS = np.array([3, 2, 1], np.int32)


def _init(model, x=X, seed=0):
    return model.init(jax.random.key(seed), x)


def _perturbed(variables, seed=1):
    """Initial params plus noise, so that zero biases and dead units cannot hide a wrong formula."""
    leaves, tree = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])


def _keras_formula(params, x, activation):
    """h_t = activation(x_t W + h_{t-1} U + b) over every step, then Dense: Keras's SimpleRNN -> Dense."""
    cell = params["SimpleCell_0"]
    w, u, b = (np.asarray(a, np.float64) for a in (cell["i"]["kernel"], cell["h"]["kernel"], cell["i"]["bias"]))
    h = np.zeros((x.shape[0], u.shape[0]))
    for t in range(x.shape[1]):
        h = activation(x[:, t] @ w + h @ u + b)
    assert np.abs(h).max() > 1e-2, "a dead state would make the comparison vacuous"
    return h @ np.asarray(params["Dense_0"]["kernel"]) + np.asarray(params["Dense_0"]["bias"])


def test_parameters_are_keras_simple_rnn_weights():
    params = _init(models.SimpleRNNClassifier(units=8))["params"]
    shapes = jax.tree.map(np.shape, params)
    assert shapes == {
        "SimpleCell_0": {"i": {"kernel": (1, 8), "bias": (8,)}, "h": {"kernel": (8, 8)}},
        "Dense_0": {"kernel": (8, 1), "bias": (1,)},
    }


def test_initialisers_are_keras():
    params = _init(models.SimpleRNNClassifier(units=8))["params"]["SimpleCell_0"]
    u = np.asarray(params["h"]["kernel"])
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-5)
    assert np.abs(np.asarray(params["i"]["kernel"])).max() <= np.sqrt(6 / (1 + 8))
    assert np.all(np.asarray(params["i"]["bias"]) == 0)


@pytest.mark.parametrize("activation, reference", [(jax.nn.relu, lambda a: np.maximum(a, 0)), (jax.nn.tanh, np.tanh)])
def test_output_is_keras_recurrence_over_every_step(activation, reference):
    model = models.SimpleRNNClassifier(units=16, num_classes=2, activation=activation)
    variables = _perturbed(_init(model))
    expected = _keras_formula(variables["params"], X[..., None].astype(np.float64), reference)
    np.testing.assert_allclose(model.apply(variables, X), expected, rtol=1e-5, atol=1e-5)


def test_two_dimensional_input_is_one_feature_per_step():
    model = models.SimpleRNNClassifier(units=16)
    variables = _perturbed(_init(model))
    np.testing.assert_array_equal(model.apply(variables, X), model.apply(variables, X[..., None].astype(np.float32)))


def test_several_features_per_step():
    x = np.arange(24, dtype=np.float32).reshape(2, 4, 3) / 24
    model = models.SimpleRNNClassifier(units=16, num_classes=3)
    variables = _perturbed(_init(model, x))
    assert variables["params"]["SimpleCell_0"]["i"]["kernel"].shape == (3, 16)
    expected = _keras_formula(variables["params"], x.astype(np.float64), lambda a: np.maximum(a, 0))
    np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_extra_padding_changes_nothing_with_seq_lengths():
    model = models.SimpleRNNClassifier(units=16)
    variables = _perturbed(_init(model))
    longer = np.pad(X, ((0, 0), (0, 4)))
    np.testing.assert_allclose(
        model.apply(variables, X, seq_lengths=LENGTHS), model.apply(variables, longer, seq_lengths=LENGTHS), rtol=1e-6
    )


def test_extra_padding_changes_the_output_without_seq_lengths():
    model = models.SimpleRNNClassifier(units=16)
    variables = _perturbed(_init(model))
    longer = np.pad(X, ((0, 0), (0, 4)))
    assert np.abs(np.asarray(model.apply(variables, X) - model.apply(variables, longer))).max() > 1e-3


def test_seq_lengths_stop_each_sequence_at_its_last_real_step():
    model = models.SimpleRNNClassifier(units=16)
    variables = _perturbed(_init(model))
    masked = model.apply(variables, X, seq_lengths=LENGTHS)
    for row, length in enumerate(LENGTHS):
        alone = model.apply(variables, X[row : row + 1, :length])
        np.testing.assert_allclose(masked[row : row + 1], alone, rtol=1e-5, atol=1e-6)


def test_seq_lengths_work_under_jit():
    model = models.SimpleRNNClassifier(units=16)
    variables = _perturbed(_init(model))
    np.testing.assert_allclose(
        jax.jit(model.apply)(variables, X, seq_lengths=LENGTHS),
        model.apply(variables, X, seq_lengths=LENGTHS),
        rtol=1e-6,
    )


def test_fit_takes_seq_lengths_in_a_dict_input():
    model = models.SimpleRNNClassifier(units=8)
    x = {"x": X, "seq_lengths": LENGTHS}
    state = training.create_train_state(model, {"x": X[:1], "seq_lengths": LENGTHS[:1]}, loss="binary_crossentropy")
    y = np.array([1, 0, 1])
    state, history = training.fit(state, x, y, epochs=2, batch_size=2, verbose=0)
    p = training.predict(state, x)
    expected = jax.nn.sigmoid(model.apply({"params": state.params}, X, seq_lengths=LENGTHS))
    np.testing.assert_allclose(p, expected, rtol=1e-5)
    assert len(history.history["loss"]) == 2


def test_multiclass_form_trains_with_sparse_categorical_crossentropy():
    model = models.SimpleRNNClassifier(units=8, num_classes=3)
    state = training.create_train_state(model, X[:1])
    state, _ = training.fit(state, X, np.array([0, 1, 2]), epochs=1, batch_size=3, verbose=0)
    p = training.predict(state, X)
    assert p.shape == (3, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "x, seq_lengths, match",
    [
        ([[1, 2, 3], [4, 5]], None, "x: ragged sequences"),
        (np.zeros(5), None, r"x: expected \(batch, steps\) or \(batch, steps, features\), got shape \(5,\)"),
        (np.zeros((2, 3, 4, 1)), None, "x: expected"),
        (np.array([["a", "b"]]), None, "x: expected numbers"),
        (X, np.array([3, 2, 6]), r"seq_lengths: each length must lie in \[1, 5\]"),
        (X, np.array([3, 0, 1]), r"seq_lengths: each length must lie in \[1, 5\]"),
        (X, np.array([3.0, 2.0, 1.0]), "seq_lengths: expected integers"),
        (X, np.array([3, 2]), r"seq_lengths: expected shape \(3,\)"),
    ],
)
def test_bad_model_input_is_rejected(x, seq_lengths, match):
    model = models.SimpleRNNClassifier(units=4)
    variables = _init(model)
    with pytest.raises(ValueError, match=match):
        model.apply(variables, x, seq_lengths=seq_lengths)


def test_fit_rejects_seq_lengths_beyond_the_steps():
    model = models.SimpleRNNClassifier(units=4)
    state = training.create_train_state(model, {"x": X[:1], "seq_lengths": LENGTHS[:1]}, loss="binary_crossentropy")
    with pytest.raises(ValueError, match=r"seq_lengths: each length must lie in \[1, 5\]"):
        training.fit(state, {"x": X, "seq_lengths": np.array([3, 9, 1])}, np.array([1, 0, 1]), verbose=0)


def test_fit_rejects_ragged_sequences():
    model = models.SimpleRNNClassifier(units=4)
    state = training.create_train_state(model, X[:1], loss="binary_crossentropy")
    with pytest.raises(ValueError, match="x: ragged sequences"):
        training.fit(state, [[1, 2, 3], [4, 5]], np.array([1, 0]), verbose=0)
