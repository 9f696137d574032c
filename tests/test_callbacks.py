"""Keras's callbacks: each driven through sequences of monitored values whose outcome is worked out by hand from
Keras 3's rules (keras/src/callbacks/*.py), then in real fits."""

import csv
import functools
import logging

import jax
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import toys
from flaxlesson import callbacks, core, models, training
from flaxlesson.callbacks import (
    CSVLogger,
    EarlyStopping,
    LambdaCallback,
    ReduceLROnPlateau,
    TensorBoard,
    TerminateOnNaN,
)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _state(learning_rate=1e-3):
    return training.create_train_state(
        models.MLP(num_classes=3), np.zeros((1, 4), np.float32), optimizer=core.keras_adam(learning_rate)
    )


@functools.cache
def _initial_state(learning_rate=1e-3):
    """One state per rate for the tests that call hooks directly (hooks return new states, never change one)."""
    return _state(learning_rate)


def _drive(callback, values, monitor="val_loss", state=None):
    """Epoch ends with `monitor` = each value until the callback stops; the epochs run, the last state, the logs."""
    state = _initial_state() if state is None else state
    callback.on_train_begin(state)
    ran, logged = 0, []
    for epoch, value in enumerate(values):
        logs = {"loss": 1.0, monitor: value}
        state = callback.on_epoch_end(epoch, logs, state) or state
        ran, logged = epoch + 1, logged + [logs]
        if callback.stop_training:
            break
    return ran, state, logged


def _scripted(values, key="val_loss"):
    """A callback that sets logs[key] to the scripted value of each epoch, before the callbacks after it read it."""
    return LambdaCallback(on_epoch_end=lambda epoch, logs, state: logs.update({key: values[epoch]}))


def _params_by_epoch():
    """A callback recording a host copy of the params at each epoch end, and the dict it fills."""
    saved = {}
    return LambdaCallback(on_epoch_end=lambda e, logs, s: saved.__setitem__(e, jax.device_get(s.params))), saved


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- EarlyStopping: decisions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "values", "epochs_run"),
    [
        # patience 0: the first epoch without improvement stops the fit.
        ({}, [1.0, 0.9, 0.95, 0.8], 3),
        # patience 2: two epochs without improvement after the best (epoch 1) stop it at epoch 3.
        ({"patience": 2}, [1.0, 0.9, 0.91, 0.92, 0.93], 4),
        # an improvement must beat the best by more than min_delta: 0.96 is not one against 1.0.
        ({"min_delta": 0.05, "patience": 1}, [1.0, 0.96, 0.9, 0.89], 2),
        # ... while 0.94 is; then 0.93 is not one against 0.94.
        ({"min_delta": 0.05}, [1.0, 0.94, 0.93], 3),
        # a negative min_delta counts as its absolute value.
        ({"min_delta": -0.05}, [1.0, 0.96], 2),
        # epochs before start_from_epoch are not watched: the rising 1, 2 do not stop it.
        ({"start_from_epoch": 2}, [1.0, 2.0, 3.0, 4.0], 4),
        # a value no improvement on the baseline does not reset wait: patience 2 epochs, then stop.
        ({"baseline": 0.5, "patience": 2}, [0.8, 0.9, 0.85, 0.1], 2),
        # ... but while values keep improving on the best, it never stops (Keras returns before the check).
        ({"baseline": 0.5, "patience": 2}, [0.8, 0.7, 0.6, 0.55], 4),
        # values beating the baseline reset wait as usual.
        ({"baseline": 0.5, "patience": 1}, [0.4, 0.3, 0.35], 3),
        # Keras compares in float32: 1 - 1e-9 equals 1.0 there, so it is no improvement.
        ({}, [1.0, 1.0 - 1e-9], 2),
        # NaN is never an improvement (after the first value).
        ({}, [1.0, float("nan")], 2),
    ],
)
def test_early_stopping_stops_after_the_epoch_keras_does(kwargs, values, epochs_run):
    assert _drive(EarlyStopping(**kwargs), values)[0] == epochs_run


def test_early_stopping_maximises_accuracy_in_auto_mode():
    assert _drive(EarlyStopping(monitor="val_accuracy"), [0.5, 0.6, 0.55], "val_accuracy")[0] == 3
    assert _drive(EarlyStopping(monitor="val_accuracy"), [0.5, 0.6, 0.7], "val_accuracy")[0] == 3


def test_early_stopping_follows_an_explicit_mode():
    assert _drive(EarlyStopping(monitor="val_loss", mode="max"), [1.0, 2.0, 1.5])[0] == 3
    assert _drive(EarlyStopping(monitor="custom", mode="min"), [1.0, 0.5, 0.7], "custom")[0] == 3


def test_early_stopping_records_the_stopped_and_best_epochs_zero_based():
    stopper = EarlyStopping(patience=1)
    _drive(stopper, [1.0, 0.5, 0.6, 0.7])
    assert (stopper.stopped_epoch, stopper.best_epoch, stopper.best) == (2, 1, 0.5)


def test_early_stopping_can_be_reused_across_fits():
    stopper = EarlyStopping()
    assert _drive(stopper, [1.0, 2.0])[0] == 2
    assert _drive(stopper, [5.0, 4.0, 3.0])[0] == 3


# --- EarlyStopping: real fits -------------------------------------------------------------------------------------


def test_a_fit_stopped_early_returns_the_best_epochs_params():
    x, y = toys.three_classes(40)
    record, saved = _params_by_epoch()
    stopper = EarlyStopping(patience=1, restore_best_weights=True)
    state, history = training.fit(
        _state(), x, y, epochs=6, batch_size=8, verbose=0,
        callbacks=[_scripted([1.0, 0.5, 0.7, 0.8, 0.9, 1.0]), record, stopper],
    )  # fmt: skip
    assert history.epoch == [0, 1, 2] and history.stopped_by == "EarlyStopping" and history.interrupted is None
    _assert_same_params(state.params, saved[1])
    assert not np.array_equal(np.asarray(saved[1]["Dense_0"]["kernel"]), np.asarray(saved[2]["Dense_0"]["kernel"]))


def test_restore_best_weights_restores_also_when_the_fit_ran_to_the_end_as_keras_3():
    x, y = toys.three_classes(40)
    record, saved = _params_by_epoch()
    stopper = EarlyStopping(patience=5, restore_best_weights=True)
    state, history = training.fit(
        _state(), x, y, epochs=3, batch_size=8, verbose=0, callbacks=[_scripted([1.0, 0.5, 0.7]), record, stopper]
    )
    assert history.interrupted is None
    _assert_same_params(state.params, saved[1])


def test_early_stopping_verbose_prints_keras_messages_to_stdout(capsys):
    x, y = toys.three_classes(40)
    stopper = EarlyStopping(patience=0, verbose=1, restore_best_weights=True)
    training.fit(_state(), x, y, epochs=3, batch_size=8, verbose=0, callbacks=[_scripted([1.0, 0.5, 0.7]), stopper])
    assert capsys.readouterr().out == (
        "Epoch 3: early stopping\nRestoring model weights from the end of the best epoch: 2.\n"
    )


def test_without_restore_best_weights_the_fit_returns_its_last_params():
    x, y = toys.three_classes(40)
    record, saved = _params_by_epoch()
    state, _ = training.fit(
        _state(), x, y, epochs=3, batch_size=8, verbose=0,
        callbacks=[_scripted([1.0, 0.5, 0.7]), record, EarlyStopping(patience=0)],
    )  # fmt: skip
    _assert_same_params(state.params, saved[2])


def test_early_stopping_on_the_training_loss_stops_a_sharded_fit():
    x, y = toys.three_classes(40)
    stopper = EarlyStopping(monitor="loss", restore_best_weights=True)
    record, saved = _params_by_epoch()
    state, history = training.fit(
        _state(), x, y, epochs=4, batch_size=8, verbose=0, strategy="sharded",
        callbacks=[_scripted([3.0, 2.0, 2.5, 1.0], key="loss"), record, stopper],
    )  # fmt: skip
    assert history.epoch == [0, 1, 2]
    _assert_same_params(state.params, saved[1])


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [EarlyStopping, ReduceLROnPlateau])
def test_a_mode_keras_does_not_know_is_refused_at_construction(make):
    with pytest.raises(ValueError, match=r"mode must be one of \['auto', 'max', 'min'\], got 'minimum'"):
        make(mode="minimum")


@pytest.mark.parametrize("make", [EarlyStopping, ReduceLROnPlateau])
def test_auto_mode_refuses_a_name_whose_direction_keras_cannot_infer(make):
    with pytest.raises(ValueError, match="cannot tell whether 'val_f00' should be minimised or maximised"):
        make(monitor="val_f00")


@pytest.mark.parametrize("make", [EarlyStopping, ReduceLROnPlateau])
def test_an_unknown_monitor_names_the_logs_at_the_first_epoch_end(make):
    x, y = toys.three_classes(40)
    they_hold = r"'val_loss', which is not in the logs; they hold \['accuracy', ('learning_rate', )?'loss'\]"
    with pytest.raises(ValueError, match=they_hold):
        training.fit(_state(), x, y, epochs=2, batch_size=8, verbose=0, callbacks=[make()])


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match="patience must be a non-negative integer"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="factor: ReduceLROnPlateau needs a factor in"):
        ReduceLROnPlateau(factor=1.0)
    with pytest.raises(ValueError, match="min_delta must be a finite number"):
        ReduceLROnPlateau(min_delta=float("nan"))
    with pytest.raises(ValueError, match=r"update_freq \(or 'batch'\) must be a positive integer or 'epoch'"):
        TensorBoard("logs", update_freq=0)
    with pytest.raises(ValueError, match="separator must be one character"):
        CSVLogger("log.csv", separator="")


def test_monitor_mode_resolves_as_keras_3():
    assert callbacks.monitor_mode("val_loss", "auto") == "min"
    assert callbacks.monitor_mode("accuracy", "auto") == "max"
    assert callbacks.monitor_mode("val_auc", "auto") == "max"
    assert callbacks.monitor_mode("val_mean_squared_error", "auto") == "min"
    assert callbacks.monitor_mode("val_accuracy", "min") == "min"


# --- ReduceLROnPlateau ----------------------------------------------------------------------------------------------


def _rates(callback, values, learning_rate=1e-3):
    """The learning rate logged at each epoch end, and the one the state has at the end."""
    _, state, logged = _drive(callback, values, state=_initial_state(learning_rate))
    return [logs["learning_rate"] for logs in logged], core.learning_rate(state)


def test_reduce_lr_waits_patience_epochs_then_multiplies_by_factor():
    logged, final = _rates(ReduceLROnPlateau(factor=0.5, patience=2), [1.0] * 5)
    # epoch 0 sets the best; epochs 1-2 wait, epoch 2 reduces; epochs 3-4 wait, epoch 4 reduces.
    np.testing.assert_allclose(logged, [1e-3, 1e-3, 1e-3, 5e-4, 5e-4], rtol=1e-6)
    np.testing.assert_allclose(final, 2.5e-4, rtol=1e-6)


def test_reduce_lr_counts_an_improvement_only_beyond_min_delta():
    # 0.99995 is within the default min_delta 1e-4 of 1.0: no improvement, so patience 1 reduces at epoch 1.
    assert _rates(ReduceLROnPlateau(patience=1), [1.0, 0.99995])[1] == pytest.approx(1e-4, rel=1e-6)
    # 0.9998 is an improvement: nothing changes.
    assert _rates(ReduceLROnPlateau(patience=1), [1.0, 0.9998])[1] == pytest.approx(1e-3, rel=1e-6)


def test_reduce_lr_waits_out_the_cooldown():
    # patience 1, cooldown 2: reduce at epoch 1 (counter 2); epoch 2 is cooled down (counter 1); at epoch 3 the
    # counter reaches 0 before the check, so epoch 3 counts: wait 1, reduce again; and so on.
    logged, final = _rates(ReduceLROnPlateau(factor=0.5, patience=1, cooldown=2), [1.0] * 6)
    np.testing.assert_allclose(logged, [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4], rtol=1e-6)
    np.testing.assert_allclose(final, 1.25e-4, rtol=1e-6)


def test_reduce_lr_stops_at_min_lr():
    logged, final = _rates(ReduceLROnPlateau(factor=0.1, patience=0, min_lr=5e-4), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(logged, [1e-3, 1e-3, 5e-4], rtol=1e-6)
    np.testing.assert_allclose(final, 5e-4, rtol=1e-6)


def test_reduce_lr_in_a_fit_records_the_rate_per_epoch_and_trains_with_the_new_one():
    x, y = toys.three_classes(40)
    reduce = ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=10.0)
    state, history = training.fit(_state(), x, y, epochs=3, batch_size=8, verbose=0, callbacks=[reduce])
    np.testing.assert_allclose(history.history["learning_rate"], [1e-3, 1e-3, 5e-4], rtol=1e-6)
    np.testing.assert_allclose(core.learning_rate(state), 2.5e-4, rtol=1e-6)


def test_reduce_lr_verbose_prints_keras_message_to_stdout(capsys):
    x, y = toys.three_classes(40)
    reduce = ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=10.0, verbose=1)
    training.fit(_state(), x, y, epochs=2, batch_size=8, verbose=0, callbacks=[reduce])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Epoch 2: ReduceLROnPlateau reducing learning rate to 0.0005")


def test_reduce_lr_refuses_an_optimiser_without_an_injected_rate():
    x, y = toys.three_classes(40)
    state = training.create_train_state(models.MLP(num_classes=3), x[:1], optimizer=optax.adam(1e-3))
    with pytest.raises(ValueError, match="needs the learning rate in the optimiser state"):
        training.fit(state, x, y, epochs=1, batch_size=8, verbose=0, callbacks=[ReduceLROnPlateau(monitor="loss")])


# --- TerminateOnNaN -------------------------------------------------------------------------------------------------


def _exploding(learning_rate=1e30):
    """Adam's steps are about the learning rate in size: after one step the logits overflow and the loss is NaN."""
    return _state(learning_rate)


def test_terminate_on_nan_returns_the_state_after_the_last_finite_step(caplog):
    x, y = toys.three_classes(40)
    with caplog.at_level(logging.WARNING, logger="flaxlesson.callbacks"):
        state, history = training.fit(
            _exploding(), x, y, epochs=3, batch_size=8, shuffle=False, verbose=0, callbacks=[TerminateOnNaN()]
        )
    assert history.stopped_by == "TerminateOnNaN" and history.epoch == []
    assert "Epoch 1, step 2: invalid loss nan, terminating training" in caplog.text
    one_step, _ = training.fit(_exploding(), x[:8], y[:8], epochs=1, batch_size=8, shuffle=False, verbose=0)
    assert int(state.step) == 1
    _assert_same_params(state.params, one_step.params)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_without_terminate_on_nan_the_same_fit_ends_with_non_finite_params():
    x, y = toys.three_classes(40)
    state, history = training.fit(_exploding(), x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isnan(history.history["loss"][0])
    assert not all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def test_terminate_on_nan_with_raise_error_raises():
    x, y = toys.three_classes(40)
    with pytest.raises(RuntimeError, match="Epoch 1, step 2: invalid loss nan"):
        training.fit(_exploding(), x, y, epochs=1, batch_size=8, verbose=0, callbacks=[TerminateOnNaN(True)])


# --- CSVLogger ------------------------------------------------------------------------------------------------------


def _read_csv(path, separator=","):
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=separator))


def test_csv_logger_writes_epoch_then_the_sorted_logs():
    x, y = toys.three_classes(40)
    path = "log.csv"
    _, history = training.fit(
        _state(), x, y, epochs=2, batch_size=8, validation_split=0.25, verbose=0, callbacks=[CSVLogger(path)]
    )
    rows = _read_csv(path)
    assert rows[0] == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    for epoch, row in enumerate(rows[1:]):
        assert row[0] == str(epoch)
        assert [float(v) for v in row[1:]] == [history.history[k][epoch] for k in rows[0][1:]]


def test_csv_logger_without_validation_adds_val_columns_written_na_as_keras():
    x, y = toys.three_classes(40)
    training.fit(_state(), x, y, epochs=1, batch_size=8, verbose=0, callbacks=[CSVLogger("log.csv", separator=";")])
    rows = _read_csv("log.csv", ";")
    assert rows[0] == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert rows[1][3:] == ["NA", "NA"]


def test_csv_logger_appends_without_a_second_header():
    x, y = toys.three_classes(40)
    for _ in range(2):
        training.fit(_state(), x, y, epochs=2, batch_size=8, verbose=0, callbacks=[CSVLogger("log.csv", append=True)])
    rows = _read_csv("log.csv")
    assert [row[0] for row in rows] == ["epoch", "0", "1", "0", "1"]


def test_csv_logger_records_the_rate_a_reduce_lr_before_it_adds():
    x, y = toys.three_classes(40)
    reduce = ReduceLROnPlateau(monitor="loss", patience=0, min_delta=10.0)
    training.fit(_state(), x, y, epochs=2, batch_size=8, verbose=0, callbacks=[reduce, CSVLogger("log.csv")])
    rows = _read_csv("log.csv")
    assert rows[0] == ["epoch", "accuracy", "learning_rate", "loss"] + [
        "val_accuracy",
        "val_learning_rate",
        "val_loss",
    ]
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], [1e-3, 1e-3], rtol=1e-6)


# --- TensorBoard ----------------------------------------------------------------------------------------------------


def _scalars(folder):
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_writes_every_epoch_figure_that_tensorboard_reads(tmp_path):
    x, y = toys.three_classes(40)
    reduce = ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=10.0)
    _, history = training.fit(
        _state(), x, y, epochs=3, batch_size=8, validation_split=0.2, verbose=0,
        callbacks=[TensorBoard(tmp_path / "logs"), reduce],
    )  # fmt: skip
    train, validation = _scalars(tmp_path / "logs" / "train"), _scalars(tmp_path / "logs" / "validation")
    assert set(train) == {"epoch_loss", "epoch_accuracy", "epoch_learning_rate", "epoch_samples_per_second"}
    assert set(validation) == {"epoch_loss", "epoch_accuracy"}
    for key in ("loss", "accuracy"):
        for figures, name in ((train, key), (validation, f"val_{key}")):
            steps_, values = zip(*figures[f"epoch_{key}"])
            assert steps_ == (0, 1, 2)
            np.testing.assert_allclose(values, history.history[name], rtol=1e-6)
    # TensorBoard comes before ReduceLROnPlateau here, so it sees each epoch's own rate.
    np.testing.assert_allclose([v for _, v in train["epoch_learning_rate"]], [1e-3, 1e-3, 5e-4], rtol=1e-6)
    assert [s for s, _ in train["epoch_samples_per_second"]] == [0, 1, 2]
    assert all(v > 0 for _, v in train["epoch_samples_per_second"])


def test_tensorboard_with_update_freq_writes_batch_figures_every_n_steps(tmp_path):
    x, y = toys.three_classes(40)  # 40 samples, batch 8: 5 steps per epoch, 10 in all.
    training.fit(_state(), x, y, epochs=2, batch_size=8, verbose=0, callbacks=[TensorBoard(tmp_path, update_freq=3)])
    train = _scalars(tmp_path / "train")
    assert [s for s, _ in train["batch_loss"]] == [3, 6, 9]
    assert [s for s, _ in train["batch_accuracy"]] == [3, 6, 9]


def test_tensorboard_with_steps_per_execution_writes_at_calls_that_reach_a_multiple(tmp_path):
    x, y = toys.three_classes(40)  # calls of 2 steps end at steps 2, 4, 5 of each epoch: global 2, 4, 5, 7, 9, 10.
    training.fit(
        _state(), x, y, epochs=2, batch_size=8, verbose=0, steps_per_execution=2,
        callbacks=[TensorBoard(tmp_path, update_freq=3)],
    )  # fmt: skip
    assert [s for s, _ in _scalars(tmp_path / "train")["batch_loss"]] == [4, 7, 9]
