import logging

import jax
import numpy as np
import pytest

import toys
from flaxlesson import augment, models, sources, training


def _fit(**kwargs):
    x, y = toys.three_classes(23)
    settings = {"epochs": 2, "batch_size": 4, "validation_split": 0.2, "seed": 1, "verbose": 0}
    return training.fit(toys.mlp_state(), x, y, **(settings | kwargs))


def _assert_same(a, b, history_a, history_b):
    for la, lb in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=1e-5, atol=1e-6)
    assert int(a.step) == int(b.step)
    for key in history_b.history:
        np.testing.assert_allclose(history_a.history[key], history_b.history[key], rtol=1e-5, atol=1e-6)


# 18 training samples, batch 4: 5 steps an epoch, so 3 leaves a remainder of 2 and 7 is more than an epoch.
@pytest.mark.parametrize("strategy", ["single", "sharded", "pmap"])
@pytest.mark.parametrize("k", [3, 7, "epoch"])
def test_many_steps_per_call_give_the_one_step_update(strategy, k):
    one = _fit(strategy=strategy, data_on_device=False)
    many = _fit(strategy=strategy, steps_per_execution=k)
    _assert_same(many[0], one[0], many[1], one[1])


@pytest.mark.parametrize("resident", [False, True])
def test_resident_and_host_fed_data_give_the_same_params(resident):
    host = _fit(data_on_device=False)
    other = _fit(data_on_device=resident, steps_per_execution=3)
    _assert_same(other[0], host[0], other[1], host[1])


def test_many_steps_per_call_with_augmentation():
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 8, 8, 1), dtype=np.float32), rng.integers(3, size=20).astype(np.int32)
    state = training.create_train_state(models.CNN(features=(4,), dense=8, num_classes=3), x[:1])
    config = augment.ImageDataGenerator(rotation_range=20, horizontal_flip=True)
    settings = {"epochs": 2, "batch_size": 6, "seed": 2, "verbose": 0, "augment": config}
    one, h1 = training.fit(state, x, y, **settings)
    many, hk = training.fit(state, x, y, steps_per_execution=3, **settings)
    _assert_same(many, one, hk, h1)


def test_many_steps_per_call_with_seq_lengths():
    rng = np.random.default_rng(0)
    x = {"x": rng.random((14, 5, 2), dtype=np.float32), "seq_lengths": rng.integers(1, 6, size=14).astype(np.int32)}
    y = rng.integers(2, size=14).astype(np.int32)
    state = training.create_train_state(
        models.SimpleRNNClassifier(units=4, num_classes=2), {"x": x["x"][:1], "seq_lengths": x["seq_lengths"][:1]}
    )
    settings = {"epochs": 2, "batch_size": 4, "seed": 0, "verbose": 0}
    one, h1 = training.fit(state, x, y, data_on_device=False, **settings)
    many, hk = training.fit(state, x, y, steps_per_execution="epoch", data_on_device=True, **settings)
    _assert_same(many, one, hk, h1)


def test_evaluate_and_predict_take_steps_per_execution():
    x, y = toys.three_classes(23)
    state = toys.mlp_state()
    np.testing.assert_allclose(
        training.predict(state, x, batch_size=4, steps_per_execution=3), training.predict(state, x, batch_size=4)
    )
    a, b = training.evaluate(state, x, y, batch_size=4, steps_per_execution=3), training.evaluate(state, x, y)
    np.testing.assert_allclose([a["loss"], a["accuracy"]], [b["loss"], b["accuracy"]], rtol=1e-6)


def test_the_epoch_remainder_compiles_no_second_call(caplog):
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        _fit(steps_per_execution=3, validation_split=0.0)
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(train_steps)")]
    assert len(compiles) == 1


def test_a_resident_epoch_moves_only_its_index_order(monkeypatch):
    x, y = toys.three_classes(23)
    moved = []
    original = sources.ResidentSource.epoch_inputs

    def recording(self, *args, **kwargs):
        # From the first step on, only explicit placements (the index order) may move data.
        with jax.transfer_guard("disallow"):
            for inputs in original(self, *args, **kwargs):
                moved.append({k: (v.dtype, v.shape) for k, v in inputs.items()})
                yield inputs

    monkeypatch.setattr(sources.ResidentSource, "epoch_inputs", recording)
    training.fit(toys.mlp_state(), x, y, epochs=2, batch_size=4, verbose=0, data_on_device=True)
    assert moved and all(set(m) == {"index", "mask"} and m["index"][0] == np.int32 for m in moved)


@pytest.mark.parametrize("value", [0, -1, 1.5, "all", True])
def test_bad_steps_per_execution_is_refused(value):
    x, y = toys.three_classes(23)
    with pytest.raises(ValueError, match="steps_per_execution"):
        training.fit(toys.mlp_state(), x, y, steps_per_execution=value, verbose=0)
