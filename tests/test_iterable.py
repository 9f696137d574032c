import logging

import grain
import jax
import numpy as np
import pytest

import toys
from flaxlesson import checks, training

N, B = 23, 8  # three batches an epoch, the last of 7


def _batches(x, y, batch_size=B):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


def _generator(x, y, epochs, batch_size=B):
    for _ in range(epochs):
        yield from _batches(x, y, batch_size)


def _assert_same_params(a, b):
    for leaf_a, leaf_b in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(leaf_a), np.asarray(leaf_b), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def array_fit():
    """Two epochs over the arrays in order (shuffle=False): the batches the iterables yield."""
    x, y = toys.three_classes(N)
    return training.fit(toys.mlp_state(), x, y, epochs=2, batch_size=B, shuffle=False, verbose=0)


def test_a_generator_fed_fit_equals_the_array_fed_fit_of_the_same_batches(array_fit):
    x, y = toys.three_classes(N)
    state, history = training.fit(toys.mlp_state(), _generator(x, y, 2), epochs=2, steps_per_epoch=3, verbose=0)
    _assert_same_params(state, array_fit[0])
    np.testing.assert_allclose(history.history["loss"], array_fit[1].history["loss"], rtol=1e-6)


def test_a_list_of_batches_restarts_each_epoch_and_sets_the_batch_size(array_fit):
    x, y = toys.three_classes(N)
    # fit's batch_size is not the batches': as in Keras, the iterable's own batches are the steps.
    state, _ = training.fit(toys.mlp_state(), _batches(x, y), epochs=2, batch_size=32, verbose=0)
    _assert_same_params(state, array_fit[0])


def test_a_grain_dataset_of_batches_trains_as_the_arrays(array_fit):
    x, y = toys.three_classes(N)
    batches = grain.MapDataset.source(_batches(x, y))
    state, _ = training.fit(toys.mlp_state(), batches, epochs=2, verbose=0)  # its len() is an epoch
    _assert_same_params(state, array_fit[0])
    state, _ = training.fit(toys.mlp_state(), batches.to_iter_dataset(), epochs=2, steps_per_epoch=3, verbose=0)
    _assert_same_params(state, array_fit[0])  # an IterDataset has no len(); it restarts each epoch


def test_evaluate_and_predict_read_a_generator_for_steps_batches():
    x, y = toys.three_classes(N)
    state = toys.mlp_state()
    expected = training.evaluate(state, x, y, batch_size=B)
    got = training.evaluate(state, _generator(x, y, 1), steps=3)
    assert got == pytest.approx(expected, rel=1e-6)
    probabilities = training.predict(state, _generator(x, y, 1), steps=3)
    np.testing.assert_allclose(probabilities, training.predict(state, x, batch_size=B), atol=1e-6)
    only_x = training.predict(state, ((x[i : i + B],) for i in range(0, N, B)), steps=3)
    assert only_x.shape == (N, 3)


def test_validation_data_may_be_a_generator_of_validation_steps_batches():
    x, y = toys.three_classes(N)
    x_val, y_val = toys.three_classes(10, seed=1)
    _, expected = training.fit(
        toys.mlp_state(), x, y, batch_size=B, shuffle=False, validation_data=(x_val, y_val), verbose=0
    )
    _, history = training.fit(
        toys.mlp_state(),
        x,
        y,
        batch_size=B,
        shuffle=False,
        validation_data=_generator(x_val, y_val, 1, batch_size=5),
        validation_steps=2,
        verbose=0,
    )
    assert history.history["val_loss"] == pytest.approx(expected.history["val_loss"], rel=1e-6)


def test_a_generator_without_steps_per_epoch_is_refused_before_training():
    x, y = toys.three_classes(N)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        training.fit(toys.mlp_state(), _generator(x, y, 1), verbose=0)
    with pytest.raises(ValueError, match="steps"):
        training.evaluate(toys.mlp_state(), _generator(x, y, 1))


def test_a_generator_that_runs_out_stops_the_fit_with_a_warning(caplog):
    x, y = toys.three_classes(N)
    with caplog.at_level(logging.WARNING, logger="flaxlesson.sources"):
        _, history = training.fit(toys.mlp_state(), _generator(x, y, 1), epochs=3, steps_per_epoch=3, verbose=0)
    assert history.epoch == [0]
    assert "ran out of batches" in caplog.text


def test_iterables_refuse_validation_split_y_and_batches_larger_than_the_first():
    x, y = toys.three_classes(N)
    with pytest.raises(ValueError, match="validation_split"):
        training.fit(toys.mlp_state(), _batches(x, y), validation_split=0.2, verbose=0)
    with pytest.raises(ValueError, match="y"):
        training.fit(toys.mlp_state(), _batches(x, y), y, verbose=0)
    growing = [(x[:4], y[:4]), (x[4:12], y[4:12])]
    with pytest.raises(ValueError, match="batch 1"):
        training.fit(toys.mlp_state(), growing, verbose=0)


def test_from_data_tells_batches_from_arrays():
    x, y = toys.three_classes(N)
    assert checks.is_batches(_batches(x, y)) and checks.is_batches(_generator(x, y, 1))
    assert not checks.is_batches(x) and not checks.is_batches(x.tolist()) and not checks.is_batches({"x": x})


def test_validation_split_of_class_ordered_labels_warns(caplog):
    x, _ = toys.three_classes(40)
    y = np.repeat(np.arange(3, dtype=np.int32), [16, 16, 8])  # ordered by class: the last 20% are class 2
    with caplog.at_level(logging.WARNING, logger="flaxlesson.sources"):
        training.fit(toys.mlp_state(), x, y, validation_split=0.2, verbose=0)
    assert "hold class 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxlesson.sources"):
        training.fit(toys.mlp_state(), x, np.random.default_rng(0).permutation(y), validation_split=0.2, verbose=0)
    assert "validation_split" not in caplog.text
