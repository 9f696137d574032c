import logging

import jax
import numpy as np
import pytest

import toys
from flaxlesson import models, training


def _leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_adam_has_keras_epsilon():
    params = {"w": np.ones(3, np.float32)}
    opt = training.keras_adam()
    updates, _ = opt.update({"w": np.full(3, 1e-8, np.float32)}, opt.init(params))
    # With a gradient of 1e-8, Adam's first step is -lr * g / (|g| + eps): eps=1e-7 gives about -9.1e-5.
    np.testing.assert_allclose(updates["w"], -1e-3 * 1e-8 / (1e-8 + 1e-7), rtol=1e-4)


def test_mlp_uses_keras_initialisers():
    params = toys.mlp_state().params
    assert all(np.all(np.asarray(layer["bias"]) == 0) for layer in params.values())
    limit = np.sqrt(6 / (4 + 10))
    assert np.abs(np.asarray(params["Dense_0"]["kernel"])).max() <= limit


def test_history_has_keras_keys_per_epoch():
    x, y = toys.three_classes(23)
    _, history = training.fit(toys.mlp_state(), x, y, epochs=3, batch_size=5, validation_split=0.2, verbose=0)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(v) == 3 for v in history.history.values())
    assert history.epoch == [0, 1, 2]


def test_history_without_validation_has_no_val_keys():
    x, y = toys.three_classes(23)
    _, history = training.fit(toys.mlp_state(), x, y, epochs=1, batch_size=5, verbose=0)
    assert set(history.history) == {"loss", "accuracy"}


def test_same_seed_gives_identical_params():
    x, y = toys.three_classes(23)
    a, _ = training.fit(toys.mlp_state(1), x, y, epochs=2, batch_size=4, seed=7, verbose=0)
    b, _ = training.fit(toys.mlp_state(1), x, y, epochs=2, batch_size=4, seed=7, verbose=0)
    for la, lb in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(la, lb)


def test_other_shuffle_seed_gives_other_params():
    x, y = toys.three_classes(23)
    a, _ = training.fit(toys.mlp_state(1), x, y, epochs=1, batch_size=4, seed=1, verbose=0)
    b, _ = training.fit(toys.mlp_state(1), x, y, epochs=1, batch_size=4, seed=2, verbose=0)
    assert any(not np.array_equal(la, lb) for la, lb in zip(_leaves(a), _leaves(b)))


def _by_hand(x, y, batches):
    """Plain jitted steps over the given row slices, each batch unpadded: the reference for fit."""
    state, totals = toys.mlp_state(), training.zero_totals()
    step = jax.jit(training.make_train_step(state.loss))
    for rows in batches:
        batch = {"x": x[rows], "y": y[rows], "mask": np.ones(len(y[rows]), np.float32)}
        state, totals = step(state, totals, batch, jax.random.key(0))
    return state, totals


def test_partial_last_batch_is_trained_as_its_own_mean():
    x, y = toys.three_classes(7)
    trained, _ = training.fit(toys.mlp_state(), x, y, epochs=1, batch_size=5, shuffle=False, verbose=0)
    state, _ = _by_hand(x, y, [slice(0, 5), slice(5, 7)])
    assert int(trained.step) == 2
    for la, lb in zip(_leaves(trained), _leaves(state)):
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-7)


def test_partial_last_batch_compiles_one_step(caplog):
    x, y = toys.three_classes(7)
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        training.fit(toys.mlp_state(), x, y, epochs=2, batch_size=5, verbose=0)
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(train_one)")]
    assert len(compiles) == 1


def test_epoch_loss_averages_over_real_samples_only():
    x, y = toys.three_classes(7)
    _, history = training.fit(toys.mlp_state(), x, y, epochs=1, batch_size=5, shuffle=False, verbose=0)
    _, totals = _by_hand(x, y, [slice(0, 5), slice(5, 7)])
    np.testing.assert_allclose(history.history["loss"][0], float(totals["loss"]) / 7, rtol=1e-5)
    np.testing.assert_allclose(history.history["accuracy"][0], float(totals["correct"]) / 7)


def test_predict_rows_are_probabilities():
    x, _ = toys.three_classes(23)
    state = toys.mlp_state()
    probs = training.predict(state, x, batch_size=10)
    assert probs.shape == (23, 3)
    np.testing.assert_allclose(probs, jax.nn.softmax(state.apply_fn({"params": state.params}, x)), rtol=1e-5)


def test_evaluate_matches_predict():
    x, y = toys.three_classes(23)
    state = toys.mlp_state()
    result = training.evaluate(state, x, y, batch_size=6)
    probs = training.predict(state, x, batch_size=6)
    np.testing.assert_allclose(result["accuracy"], np.mean(probs.argmax(1) == y))
    np.testing.assert_allclose(result["loss"], -np.mean(np.log(probs[np.arange(23), y])), rtol=1e-5)


def test_fit_learns_a_separable_problem():
    x, y = toys.three_classes(200)
    state, history = training.fit(toys.mlp_state(), x, y, epochs=60, batch_size=16, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert training.evaluate(state, x, y)["accuracy"] > 0.9


def test_verbose_two_prints_a_line_per_epoch(capsys):
    x, y = toys.three_classes(23)
    training.fit(toys.mlp_state(), x, y, epochs=2, batch_size=8, verbose=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch")]
    assert len(lines) == 2 and "samples/s" in lines[0] and "loss:" in lines[0]


def test_callbacks_see_every_epoch():
    x, y = toys.three_classes(23)
    seen = []
    training.fit(
        toys.mlp_state(),
        x,
        y,
        epochs=3,
        batch_size=8,
        verbose=0,
        callbacks=[
            training.LambdaCallback(on_epoch_end=lambda epoch, logs, state: seen.append((epoch, int(state.step))))
        ],
    )
    assert seen == [(0, 3), (1, 6), (2, 9)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"validation_split": 1.0}, "validation_split"),
        ({"validation_split": -0.5}, "validation_split"),
    ],
)
def test_bad_fit_arguments_are_rejected(kwargs, match):
    x, y = toys.three_classes(23)
    with pytest.raises(ValueError, match=match):
        training.fit(toys.mlp_state(), x, y, verbose=0, **kwargs)


def test_x_and_y_of_different_lengths_are_rejected():
    x, y = toys.three_classes(23)
    with pytest.raises(ValueError, match="same number of samples"):
        training.fit(toys.mlp_state(), x, y[:-1], verbose=0)


def test_non_finite_inputs_are_rejected():
    x, y = toys.three_classes(23)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        training.fit(toys.mlp_state(), x, y, verbose=0)


def test_labels_outside_the_classes_are_rejected():
    x, y = toys.three_classes(23)
    y[0] = 3
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        training.fit(toys.mlp_state(), x, y, verbose=0)


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="loss must be one of"):
        training.create_train_state(models.MLP(), np.zeros((1, 4), np.float32), loss="hinge")


def _noise(key, x):
    """An 'augmentation' that replaces the batch by key-derived noise, so the key schedule shows in the params."""
    return jax.random.uniform(key, x.shape)


def test_augment_runs_on_each_training_batch_with_a_fresh_key():
    x, y = toys.three_classes(8)
    trained, _ = training.fit(
        toys.mlp_state(), x, y, epochs=1, batch_size=4, shuffle=False, seed=3, augment=_noise, verbose=0
    )
    state = toys.mlp_state()
    step = jax.jit(training.make_train_step(state.loss))
    for i, rows in enumerate((slice(0, 4), slice(4, 8))):
        noise = _noise(jax.random.fold_in(jax.random.key(3), i), x[rows])
        batch = {"x": noise, "y": y[rows], "mask": np.ones(4, np.float32)}
        state, _ = step(state, training.zero_totals(), batch, jax.random.key(0))
    for la, lb in zip(_leaves(trained), _leaves(state)):
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-7)


def test_augment_never_touches_validation_data():
    x, y = toys.three_classes(10)
    trained, history = training.fit(
        toys.mlp_state(), x, y, epochs=1, batch_size=4, validation_split=0.2, augment=_noise, verbose=0
    )
    expected = training.evaluate(trained, x[8:], y[8:])
    np.testing.assert_allclose(history.history["val_loss"][0], expected["loss"], rtol=1e-5)


def _history_of(speeds, seconds):
    history = training.History()
    for epoch, (speed, second) in enumerate(zip(speeds, seconds)):
        history.append(epoch, {"loss": 1.0 / (epoch + 1)}, second, speed)
    return history


def test_history_summary_speed_is_the_median_epoch():
    summary = _history_of(speeds=[100.0, 900.0, 200.0, 400.0], seconds=[1.0] * 4).summary()
    assert summary["train_samples_per_second"] == 300.0


def test_history_summary_seconds_is_the_sum_of_epochs():
    summary = _history_of(speeds=[1.0] * 3, seconds=[1.5, 0.25, 2.0]).summary()
    assert summary["train_seconds"] == 3.75


def test_history_summary_carries_the_curves():
    summary = _history_of(speeds=[1.0] * 2, seconds=[1.0] * 2).summary()
    assert summary["history"] == {"loss": [1.0, 0.5]}


def test_history_summary_of_no_epochs_has_no_speed():
    assert training.History().summary()["train_samples_per_second"] is None
