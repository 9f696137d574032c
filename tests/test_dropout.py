"""Issue 21: a model with Dropout and a `train` argument: a fresh 'dropout' key each step in fit, none elsewhere."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from flaxlesson import checkpoint, core, models, parallel, training
from flaxlesson.resume import resume_or_start

LOSS = "sparse_categorical_crossentropy"


class Net(nn.Module):
    """Dense -> Dropout(0.5) -> logits; Dropout is on only when `train`."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(models.Dense(16)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return models.Dense(3)(x)


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4, 4)).astype(np.float32)
    return x, (x[:, 0, 0] > 0).astype(np.int32) + (x[:, 1, 1] > 0.5).astype(np.int32)


def _state():
    return training.create_train_state(Net(), np.zeros((1, 4, 4), np.float32))


def _fit(state=None, **kwargs):
    x, y = _data()
    settings = {"epochs": 3, "batch_size": 8, "verbose": 0, **kwargs}
    return training.fit(_state() if state is None else state, x, y, **settings)


def test_a_dropout_model_trains():
    x, y = _data()
    state, _ = _fit(epochs=10)
    assert int(state.step) == 40
    assert training.evaluate(state, x, y)["loss"] < 0.9 * training.evaluate(_state(), x, y)["loss"]


def test_a_fit_is_deterministic_for_its_seed():
    first, second, other = _fit(seed=1)[0], _fit(seed=1)[0], _fit(seed=2)[0]
    assert checkpoint.fingerprint(first.params) == checkpoint.fingerprint(second.params)
    assert checkpoint.fingerprint(first.params) != checkpoint.fingerprint(other.params)


def _step_loss(state, step_number):
    """The summed training loss of one train step on a fixed batch, with the state's step set to `step_number`."""
    x, y = _data(8)
    batch = {"x": x, "y": y, "mask": np.ones(8, np.float32)}
    step = jax.jit(core.make_train_step(LOSS))
    state = state.replace(step=np.int32(step_number))
    return float(step(state, core.zero_totals(), batch, jax.random.key(0))[1]["loss"])


def test_train_steps_draw_a_new_dropout_mask_each_step_and_evaluation_draws_none():
    x, y = _data(8)
    state = _state()
    eval_loss = float(
        jax.jit(core.make_eval_step(LOSS))(state, core.zero_totals(), {"x": x, "y": y, "mask": np.ones(8)})["loss"]
    )
    losses = [_step_loss(state, n) for n in range(3)]
    assert len(set(losses)) == 3  # the same params and batch: only the mask differs
    assert all(loss != eval_loss for loss in losses)
    assert _step_loss(state, 1) == losses[1]  # the key is the step's, not carried: the same again at step 1


def test_evaluate_and_predict_are_deterministic_and_run_without_dropout():
    state, _ = _fit()
    x, y = _data()
    probabilities = training.predict(state, x)
    np.testing.assert_array_equal(probabilities, training.predict(state, x))
    assert training.evaluate(state, x, y) == training.evaluate(state, x, y)
    by_hand = jax.nn.softmax(Net().apply({"params": state.params}, x, train=False))
    np.testing.assert_allclose(probabilities, by_hand, rtol=1e-6, atol=1e-7)


def test_the_dropout_key_differs_on_each_pmap_device():
    strategy = parallel.Pmap()
    keys = jax.pmap(lambda key: core.dropout_key(key, 4, parallel.AXIS), axis_name=parallel.AXIS)(
        strategy.replicate(jax.random.key(0))
    )
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == strategy.num_replicas


def test_sharded_dropout_draws_the_single_device_masks():
    single, sharded = _fit(strategy="single")[0], _fit(strategy="sharded")[0]
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["single", "pmap"])
def test_steps_per_execution_gives_the_same_dropout_update(strategy):
    one, many = _fit(strategy=strategy)[0], _fit(strategy=strategy, steps_per_execution=3)[0]
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class StopAt(training.Callback):
    def __init__(self, epoch, step):
        self.at = (epoch, step)

    def on_train_batch_end(self, epoch, step, logs, state):
        self.stop_training = self.stop_training or (epoch, step) == self.at


def test_a_fit_resumed_mid_epoch_draws_the_uninterrupted_masks(tmp_path):
    uninterrupted, _ = _fit(seed=3)

    def start(resume):
        return resume_or_start(tmp_path, _state(), resume=resume, seed=3, save_freq=2)

    first = start(False)
    _fit(first.state, seed=3, callbacks=[*first.callbacks, StopAt(1, 2)])
    again = start(True)
    resumed, _ = _fit(
        again.state,
        seed=3,
        callbacks=again.callbacks,
        initial_epoch=again.initial_epoch,
        initial_step=again.initial_step,
    )
    assert (again.initial_epoch, again.initial_step) == (1, 2)
    assert checkpoint.fingerprint(resumed.params) == checkpoint.fingerprint(uninterrupted.params)
