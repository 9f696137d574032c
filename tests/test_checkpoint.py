import hashlib
import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding

from flaxlesson import checkpoint, models, training
from flaxlesson.resume import resume_or_start


def _toy(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 0.5).astype(np.int32)


def _state(hidden=(12,), optimizer=None):
    return training.create_train_state(
        models.MLP(hidden=hidden, num_classes=3), np.zeros((1, 5), np.float32), optimizer=optimizer
    )


def _fit(state, epochs, initial_epoch=0, strategy=None, callbacks=()):
    x, y = _toy()
    return training.fit(
        state,
        x,
        y,
        epochs=epochs,
        initial_epoch=initial_epoch,
        batch_size=12,
        seed=5,
        verbose=0,
        strategy=strategy,
        callbacks=callbacks,
    )[0]


def _assert_close(a, b, rtol=1e-5):
    for la, lb in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_allclose(la, lb, rtol=rtol, atol=1e-7)


def _snapshot(directory):
    """Every file under `directory` with a hash of its bytes: equal snapshots mean nothing was touched."""
    return {
        os.path.relpath(os.path.join(root, name), directory): hashlib.sha256(
            open(os.path.join(root, name), "rb").read()
        ).hexdigest()
        for root, _, names in os.walk(directory)
        for name in names
    }


def test_saved_on_eight_devices_resumes_on_one_like_an_uninterrupted_run(tmp_path):
    saved = _fit(_state(), 2, strategy="sharded", callbacks=[checkpoint.ModelCheckpoint(tmp_path, _state())])
    restored, epoch = checkpoint.restore(tmp_path, _state(), strategy="single")
    assert epoch == 2 and int(restored.step) == 2 * 4
    _assert_close(restored.params, saved.params, rtol=0)
    resumed = _fit(restored, 4, initial_epoch=epoch)
    _assert_close(resumed.params, _fit(_state(), 4).params)


def test_saved_on_one_device_resumes_on_eight(tmp_path):
    _fit(_state(), 1, callbacks=[checkpoint.ModelCheckpoint(tmp_path, _state())])
    restored, epoch = checkpoint.restore(tmp_path, _state(), strategy="sharded")
    kernel = restored.params["Dense_0"]["kernel"]
    assert isinstance(kernel.sharding, NamedSharding) and kernel.sharding.mesh.size == 8
    resumed = _fit(restored, 3, initial_epoch=epoch, strategy="sharded")
    _assert_close(resumed.params, _fit(_state(), 3).params)


def test_a_checkpoint_is_written_every_epoch_keeping_the_newest(tmp_path):
    _fit(_state(), 3, callbacks=[checkpoint.ModelCheckpoint(tmp_path, _state(), max_to_keep=2)])
    assert checkpoint.steps(tmp_path) == [8, 12]  # 4 steps an epoch
    assert checkpoint.latest_position(tmp_path) == checkpoint.Position(epoch=3, step=0, seed=0)


def test_an_interrupted_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    def interrupt_saves_after_the_first_epoch(epoch, logs, state):
        if epoch == 1:

            async def killed(*args, **kwargs):
                raise KeyboardInterrupt("killed while writing")

            monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", killed)

    after_one = _fit(_state(), 1)
    saver = checkpoint.ModelCheckpoint(tmp_path, _state())
    with pytest.raises(KeyboardInterrupt):
        _fit(
            _state(), 3, callbacks=[training.LambdaCallback(on_epoch_end=interrupt_saves_after_the_first_epoch), saver]
        )
    monkeypatch.undo()
    assert checkpoint.steps(tmp_path) == [4]
    restored, epoch = checkpoint.restore(tmp_path, _state())
    _assert_close(restored.params, after_one.params, rtol=0)
    resumed = _fit(
        restored,
        3,
        initial_epoch=epoch,
        callbacks=[checkpoint.ModelCheckpoint(tmp_path, restored, initial_epoch=epoch)],
    )
    assert checkpoint.steps(tmp_path) == [8, 12]
    _assert_close(resumed.params, _fit(_state(), 3).params)


@pytest.mark.parametrize("use", ["restore", "callback"])
def test_another_models_checkpoint_is_refused_and_left_as_it_was(tmp_path, use):
    checkpoint.save(tmp_path, _state(hidden=(12,)), 1)
    before = _snapshot(tmp_path)
    other = _state(hidden=(7,))
    with pytest.raises(
        ValueError,
        match=r"another model's state(.|\n)*params/Dense_0/kernel: checkpoint shape "
        r"\(5, 12\), model shape \(5, 7\)",
    ):
        checkpoint.restore(tmp_path, other) if use == "restore" else checkpoint.ModelCheckpoint(tmp_path, other)
    assert _snapshot(tmp_path) == before


def test_a_deeper_models_checkpoint_names_the_missing_layer(tmp_path):
    checkpoint.save(tmp_path, _state(hidden=(12,)), 1)
    with pytest.raises(ValueError, match="params/Dense_2/bias: missing from the checkpoint"):
        checkpoint.restore(tmp_path, _state(hidden=(12, 12)))


def test_other_optimiser_state_is_refused(tmp_path):
    checkpoint.save(tmp_path, _state(), 1)
    with pytest.raises(ValueError, match="other optimiser state"):
        checkpoint.restore(tmp_path, _state(optimizer=optax.sgd(0.1)))


def test_checkpoints_this_run_would_overwrite_are_refused(tmp_path):
    _fit(_state(), 2, callbacks=[checkpoint.ModelCheckpoint(tmp_path, _state())])
    before = _snapshot(tmp_path)
    with pytest.raises(
        ValueError,
        match=r"already holds checkpoints of epochs \[1, 2\] \(train steps \[4, 8\]\), past this run's start",
    ):
        checkpoint.ModelCheckpoint(tmp_path, _state())
    assert _snapshot(tmp_path) == before


def test_restoring_from_a_directory_without_checkpoints_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoint.restore(tmp_path / "empty", _state())
    assert not (tmp_path / "empty").exists()


def test_restoring_a_missing_epoch_is_refused(tmp_path):
    checkpoint.save(tmp_path, _state(), 1)
    with pytest.raises(ValueError, match=r"no good checkpoint of epoch 4 in"):
        checkpoint.restore(tmp_path, _state(), epoch=4)


@pytest.mark.parametrize("initial_epoch", [-1, 5, 1.5])
def test_bad_initial_epoch_is_rejected(initial_epoch):
    with pytest.raises(ValueError, match="initial_epoch"):
        _fit(_state(), 4, initial_epoch=initial_epoch)


def test_resume_or_start_without_a_directory_saves_nothing():
    state = _state()
    assert resume_or_start(None, state) == (state, 0, 0, [])


def test_resume_without_a_directory_is_rejected():
    with pytest.raises(ValueError, match="resume needs a checkpoint directory"):
        resume_or_start(None, _state(), resume=True)
