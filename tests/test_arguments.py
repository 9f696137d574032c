"""Bad arguments to the Python API: each is refused by a ValueError or TypeError that names it, before any compile."""

import jax
import numpy as np
import pytest

import toys
from flaxlesson import augment, callbacks, models, summary, training


def _data(n=12):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), (np.arange(n) % 3).astype(np.int32)


@pytest.fixture(scope="module")
def state():
    return toys.mlp_state()


@pytest.fixture
def no_compile(monkeypatch):
    """Fails the test if fit, evaluate or predict got as far as building its compiled calls."""

    def executor(*args, **kwargs):
        raise AssertionError("the arguments were not refused before the compile")

    monkeypatch.setattr(training, "Executor", executor)


def _leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_sparse_labels_of_shape_n_by_1_train_as_n(state):
    x, y = _data()
    a, _ = training.fit(state, x, y[:, None], batch_size=4, verbose=0)
    b, _ = training.fit(state, x, y, batch_size=4, verbose=0)
    for la, lb in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(la, lb)


def test_x_of_dtype_object_is_refused(state, no_compile):
    x, y = _data()
    with pytest.raises(TypeError, match=r"^x must hold numbers, got dtype object"):
        training.fit(state, x.astype(object), y, verbose=0)


def test_x_of_strings_is_refused(state, no_compile):
    x, y = _data()
    with pytest.raises(TypeError, match=r"^x must hold numbers, got dtype <U"):
        training.predict(state, x.astype(str))


def test_x_as_a_list_of_lists_trains_as_its_array(state):
    x, y = _data()
    a, _ = training.fit(state, x.tolist(), y.tolist(), batch_size=4, verbose=0)
    b, _ = training.fit(state, x, y, batch_size=4, verbose=0)
    for la, lb in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(la, lb)


def test_ragged_list_x_is_refused(state, no_compile):
    with pytest.raises(ValueError, match=r"^x: ragged sequences \(rows of different lengths\)"):
        training.predict(state, [[1.0, 2.0, 3.0, 4.0], [1.0]])


def test_x_of_higher_rank_than_the_model_takes_is_refused(state, no_compile):
    x, _ = _data()
    with pytest.raises(ValueError, match=r"^x: samples of shape \(1, 4\) give model outputs of shape \(1, 1, 3\)"):
        training.predict(state, x[:, None, :])


def test_fit_without_labels_is_refused(state, no_compile):
    x, _ = _data()
    with pytest.raises(ValueError, match=r"^y: fit needs the labels of x"):
        training.fit(state, x, None, verbose=0)


def test_validation_data_with_sample_weights_is_refused(state, no_compile):
    x, y = _data()
    with pytest.raises(ValueError, match=r"^validation_data: an \(x, y, sample_weight\) triple is not supported"):
        training.fit(state, x, y, validation_data=(x, y, np.ones(len(y))), verbose=0)


def test_callbacks_none_means_no_callbacks(state):
    x, y = _data()
    _, history = training.fit(state, x, y, batch_size=4, callbacks=None, verbose=0)
    assert history.epoch == [0]


def test_one_callback_not_in_a_list_is_called(state):
    x, y = _data()
    seen = []
    training.fit(
        state,
        x,
        y,
        epochs=2,
        batch_size=4,
        verbose=0,
        callbacks=callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs, state: seen.append(epoch)),
    )
    assert seen == [0, 1]


def test_a_function_as_callbacks_is_refused(state, no_compile):
    x, y = _data()
    with pytest.raises(TypeError, match=r"^callbacks must be a Callback or a list of them, got function"):
        training.fit(state, x, y, callbacks=lambda *a: None, verbose=0)


def test_state_none_is_refused(no_compile):
    x, y = _data()
    with pytest.raises(TypeError, match=r"^state must be a TrainState"):
        training.evaluate(None, x, y)


def test_mlp_with_no_classes_is_refused():
    with pytest.raises(ValueError, match=r"^MLP.num_classes must be a positive integer, got 0"):
        training.create_train_state(models.MLP(num_classes=0), np.zeros((1, 4), np.float32))


def test_summary_without_a_sample_input_is_refused():
    with pytest.raises(ValueError, match=r"^sample_input must be a batch of inputs"):
        summary.summary(models.MLP(), None)


def test_negative_seed_is_refused(state, no_compile):
    x, y = _data()
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, "):
        training.fit(state, x, y, seed=-1, verbose=0)


def test_unknown_verbose_is_refused(state, no_compile):
    x, y = _data()
    with pytest.raises(ValueError, match=r"^verbose must be one of 0, 1, 2, 'auto', got 'bogus'"):
        training.fit(state, x, y, verbose="bogus")


def test_shuffle_as_a_string_is_refused(state, no_compile):
    x, y = _data()
    with pytest.raises(TypeError, match=r"^shuffle must be True or False, got 'no'"):
        training.fit(state, x, y, shuffle="no", verbose=0)


def test_data_on_device_as_a_string_is_refused(state, no_compile):
    x, y = _data()
    with pytest.raises(TypeError, match=r"^data_on_device must be True, False or None, got 'yes'"):
        training.evaluate(state, x, y, data_on_device="yes")


def test_zoom_range_lower_above_upper_is_refused():
    with pytest.raises(ValueError, match=r"^zoom_range must be a pair \(lower, upper\) with lower <= upper"):
        augment.ImageDataGenerator(zoom_range=(2, 1))


def test_params_of_another_model_blame_the_state(state, no_compile):
    x, y = _data()
    other = training.create_train_state(models.MLP(hidden=(20, 20), num_classes=3), x[:1])
    with pytest.raises(ValueError, match=r"^state: its params belong to another model than its MLP"):
        training.fit(state.replace(params=other.params), x, y, verbose=0)


def test_inputs_of_another_width_blame_x(state, no_compile):
    x, y = _data()
    with pytest.raises(ValueError, match=r"^x: samples of shape \(5,\) do not fit the model's parameters"):
        training.evaluate(state, np.zeros((4, 5), np.float32), y[:4])
