"""Issue 21: BatchNorm's batch statistics in fit: over the real rows of the global batch, saved and resumed."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from flaxlesson import checkpoint, core, launch, models, saving, training
from flaxlesson.callbacks import EarlyStopping
from flaxlesson.resume import resume_or_start

MOMENTUM = 0.99  # models.BatchNorm's, Keras's


class Net(nn.Module):
    """BatchNorm on the flattened 4x4 input itself, so its statistics depend on the data alone, then logits."""

    @nn.compact
    def __call__(self, x, train: bool = False, mask=None):
        x = models.BatchNorm()(x.reshape(x.shape[0], -1), train, mask)
        return models.Dense(3)(x)


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(2.0, 3.0, size=(n, 4, 4)).astype(np.float32), rng.integers(0, 3, n)


def _state():
    return training.create_train_state(Net(), np.zeros((1, 4, 4), np.float32))


def _by_hand(x, batch_size):
    """The running mean and variance after one step per batch of `x` in order, each over that batch's rows only."""
    mean, var = np.zeros(16), np.ones(16)
    for start in range(0, len(x), batch_size):
        rows = x[start : start + batch_size].reshape(-1, 16).astype(np.float64)
        mean = MOMENTUM * mean + (1 - MOMENTUM) * rows.mean(0)
        var = MOMENTUM * var + (1 - MOMENTUM) * rows.var(0)
    return mean, var


def test_create_train_state_holds_the_models_batch_stats():
    state = _state()
    stats = state.batch_stats["BatchNorm_0"]
    np.testing.assert_array_equal(stats["mean"], np.zeros(16))
    np.testing.assert_array_equal(stats["var"], np.ones(16))
    assert training.create_train_state(models.MLP(), np.zeros((1, 4), np.float32)).batch_stats == {}


@pytest.mark.parametrize("strategy", ["single", "sharded", "pmap"])
@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_running_statistics_are_those_of_the_real_rows_of_the_global_batch(strategy, steps_per_execution):
    # 29 samples in batches of 16: the second batch has 13 real rows and 3 of padding; on 8 devices (2 rows each)
    # the last device holds only padding and the one before it one real row.
    x, y = _data(29)
    state, _ = training.fit(
        _state(),
        x,
        y,
        batch_size=16,
        shuffle=False,
        verbose=0,
        strategy=strategy,
        steps_per_execution=steps_per_execution,
    )
    mean, var = _by_hand(x, 16)
    stats = jax.device_get(state.batch_stats["BatchNorm_0"])
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-5, atol=1e-6)


# One process of two, 4 CPU devices each: the fit above, whose process 0 writes the statistics to argv[2].
WORKER = """
import sys
import numpy as np
from flaxlesson import parallel
parallel.initialize()
import jax
from tests.test_batchnorm import _data, _state
from flaxlesson import training
x, y = _data(29)
state, _ = training.fit(_state(), x, y, batch_size=16, shuffle=False, verbose=0, strategy=sys.argv[1])
stats = jax.device_get(state.batch_stats["BatchNorm_0"])
if jax.process_index() == 0:
    np.savez(sys.argv[2], mean=stats["mean"], var=stats["var"])
"""


@pytest.mark.parametrize("strategy", ["sharded", "pmap"])
def test_two_processes_average_the_statistics_over_the_global_batch(strategy, tmp_path):
    # Each process reads half of each global batch of 16: in the second, process 1 holds 5 real rows, 3 padding.
    launch.launch_local(["-c", WORKER, strategy, str(tmp_path / "stats.npz")], 2, devices_per_process=4, timeout=180)
    stats = np.load(tmp_path / "stats.npz")
    mean, var = _by_hand(_data(29)[0], 16)
    np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], var, rtol=1e-5, atol=1e-6)


def test_padding_rows_change_neither_the_update_nor_the_statistics():
    x, y = _data(16)
    mask = np.array([1.0] * 13 + [0.0] * 3, np.float32)
    step = jax.jit(core.make_train_step("sparse_categorical_crossentropy"))
    key = jax.random.key(0)
    results = []
    for padding in (0.0, 1e6):
        batch = {"x": x.copy(), "y": y, "mask": mask}
        batch["x"][13:] = padding
        results.append(step(_state(), core.zero_totals(), batch, key))
    (first, first_totals), (second, second_totals) = results
    for a, b in zip(
        jax.tree.leaves((first.params, first.batch_stats)), jax.tree.leaves((second.params, second.batch_stats))
    ):
        np.testing.assert_array_equal(a, b)
    mean, var = _by_hand(x[:13], 16)
    np.testing.assert_allclose(first.batch_stats["BatchNorm_0"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.batch_stats["BatchNorm_0"]["var"], var, rtol=1e-5, atol=1e-6)
    assert float(first_totals["loss"]) == float(second_totals["loss"])


def test_evaluate_and_predict_use_the_running_averages():
    x, y = _data(24)
    state, _ = training.fit(_state(), x, y, batch_size=8, epochs=2, verbose=0)
    stats, params = state.batch_stats["BatchNorm_0"], state.params
    flat = x.reshape(-1, 16)
    normed = (flat - stats["mean"]) / np.sqrt(stats["var"] + 1e-3) * params["BatchNorm_0"]["scale"]
    logits = (normed + params["BatchNorm_0"]["bias"]) @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
    expected = jax.nn.softmax(logits)
    np.testing.assert_allclose(training.predict(state, x[:5], batch_size=5), expected[:5], rtol=1e-4, atol=1e-6)
    # one sample at a time: with batch statistics a single row would normalise to the bias alone
    np.testing.assert_allclose(training.predict(state, x[:5], batch_size=1), expected[:5], rtol=1e-4, atol=1e-6)


class StopAt(training.Callback):
    def __init__(self, epoch, step):
        self.at = (epoch, step)

    def on_train_batch_end(self, epoch, step, logs, state):
        self.stop_training = self.stop_training or (epoch, step) == self.at


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_a_fit_resumed_mid_epoch_ends_with_the_uninterrupted_params_and_statistics(tmp_path, steps_per_execution):
    x, y = _data(24)
    settings = {"epochs": 2, "batch_size": 4, "seed": 3, "verbose": 0, "steps_per_execution": steps_per_execution}
    uninterrupted, _ = training.fit(_state(), x, y, **settings)

    def start(resume):
        return resume_or_start(tmp_path, _state(), resume=resume, seed=3, save_freq=2)

    first = start(False)
    stopped, history = training.fit(first.state, x, y, callbacks=[*first.callbacks, StopAt(1, 2)], **settings)
    assert history.stopped_by == "StopAt"
    again = start(True)
    assert (again.initial_epoch, again.initial_step) == (1, 2)
    resumed, _ = training.fit(
        again.state,
        x,
        y,
        callbacks=again.callbacks,
        initial_epoch=again.initial_epoch,
        initial_step=again.initial_step,
        **settings,
    )
    assert checkpoint.fingerprint(resumed.params) == checkpoint.fingerprint(uninterrupted.params)
    assert checkpoint.fingerprint(resumed.batch_stats) == checkpoint.fingerprint(uninterrupted.batch_stats)
    assert checkpoint.fingerprint(resumed.batch_stats) != checkpoint.fingerprint(_state().batch_stats)


def test_save_model_and_load_model_round_trip_the_batch_stats(tmp_path):
    x, y = _data(24)
    state, _ = training.fit(_state(), x, y, batch_size=8, verbose=0)
    saving.save_model(tmp_path / "model", state, sample_input=x[:1])
    loaded = saving.load_model(tmp_path / "model", custom_objects={"Net": Net})
    assert checkpoint.fingerprint(loaded.batch_stats) == checkpoint.fingerprint(state.batch_stats)
    np.testing.assert_array_equal(training.predict(loaded, x), training.predict(state, x))


def test_the_cnn_with_batchnorm_and_dropout_trains_and_predicts_deterministically():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 12, 12, 1)).astype(np.float32), rng.integers(0, 3, 32)
    model = models.CNNBatchNorm(features=(4,), dense=8, num_classes=3)
    state = training.create_train_state(model, x[:1])
    trained, history = training.fit(state, x, y, epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert checkpoint.fingerprint(trained.batch_stats) != checkpoint.fingerprint(state.batch_stats)
    np.testing.assert_array_equal(training.predict(trained, x), training.predict(trained, x))


def test_early_stopping_restores_the_best_epochs_statistics_with_its_params():
    x, y = _data(24)
    scores = [1.0, 5.0, 6.0]  # the first epoch is the best
    score = training.LambdaCallback(on_epoch_end=lambda epoch, logs, state: logs.update(score=scores[epoch]))
    settings = {"batch_size": 8, "seed": 1, "verbose": 0}
    restored, _ = training.fit(
        _state(),
        x,
        y,
        epochs=3,
        callbacks=[score, EarlyStopping("score", patience=5, mode="min", restore_best_weights=True)],
        **settings,
    )
    best, _ = training.fit(_state(), x, y, epochs=1, **settings)
    assert checkpoint.fingerprint(restored.batch_stats) == checkpoint.fingerprint(best.batch_stats)
    assert checkpoint.fingerprint(restored.params) == checkpoint.fingerprint(best.params)


def test_the_exported_predict_normalises_by_the_running_averages(tmp_path):
    x, y = _data(24)
    state, _ = training.fit(_state(), x, y, batch_size=8, verbose=0)
    path = saving.export(tmp_path / "net.jax", state, x[:1], platforms=("cpu",))
    exported = jax.export.deserialize(path.read_bytes())
    np.testing.assert_allclose(np.asarray(exported.call(x[:5])), training.predict(state, x[:5]), rtol=1e-6, atol=1e-7)
