import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding

import toys
from flaxlesson import checkpoint, models, training
from flaxlesson.resume import resume_or_start


def _where(position):
    """A saved position without its data layout: epoch, step and seed."""
    return dataclasses.replace(position, layout=None)


def _state(hidden=(12,), optimizer=None):
    return training.create_train_state(
        models.MLP(hidden=hidden, num_classes=3), np.zeros((1, 5), np.float32), optimizer=optimizer
    )


def _fit(state, epochs, initial_epoch=0, strategy=None, callbacks=()):
    x, y = toys.three_classes_of_five(40)
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
    assert checkpoint.saved_steps(tmp_path) == [8, 12]  # 4 steps an epoch
    assert _where(checkpoint.latest_position(tmp_path)) == checkpoint.Position(epoch=3, step=0, seed=0)


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
    assert checkpoint.saved_steps(tmp_path) == [4]
    restored, epoch = checkpoint.restore(tmp_path, _state())
    _assert_close(restored.params, after_one.params, rtol=0)
    resumed = _fit(
        restored,
        3,
        initial_epoch=epoch,
        callbacks=[checkpoint.ModelCheckpoint(tmp_path, restored, initial_epoch=epoch)],
    )
    assert checkpoint.saved_steps(tmp_path) == [8, 12]
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


@pytest.mark.parametrize(
    "foreign",
    [
        {"2024/notes.txt": "a user's"},  # a folder with a numeric name: once renamed damaged.*
        {"3/notes.txt": "a user's"},  # once deleted by orbax's max_to_keep clean-up
        {"7/": None},  # an empty folder with a numeric name
        {"5.orbax-checkpoint-tmp-1/notes.txt": "a user's"},  # once deleted as a killed write
        {"notes.txt": "a user's"},
    ],
)
def test_a_folder_with_entries_flaxlesson_did_not_write_is_refused_and_left_as_it_was(tmp_path, foreign):
    for name, text in foreign.items():
        if text is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
    before = _snapshot(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(checkpoint.CheckpointError, match=r"holds entries flaxlesson did not write \('"):
        _fit(_state(), 4, callbacks=[checkpoint.ModelCheckpoint(tmp_path, _state(), max_to_keep=1)])
    assert (_snapshot(tmp_path), sorted(p.name for p in tmp_path.iterdir())) == before


def test_a_folder_is_marked_with_its_run_kind_and_refused_to_another_kind(tmp_path):
    checkpoint.save(tmp_path, _state(), 1, kind="cnn_mnist")
    assert json.loads((tmp_path / checkpoint.MARK_NAME).read_text())["kind"] == "cnn_mnist"
    before = _snapshot(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="holds the checkpoints of a 'cnn_mnist' run, not of a 'fit'"):
        resume_or_start(tmp_path, _state(), resume=True)
    assert _snapshot(tmp_path) == before


def test_a_file_added_to_a_marked_folder_is_refused(tmp_path):
    _fit(_state(), 1, callbacks=[checkpoint.ModelCheckpoint(tmp_path, _state())])
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "notes.txt").write_text("a user's")
    with pytest.raises(checkpoint.CheckpointError, match=r"did not write \('9'\)"):
        resume_or_start(tmp_path, _state(), resume=True)
    assert (tmp_path / "9" / "notes.txt").read_text() == "a user's" and checkpoint.saved_steps(tmp_path) == [4, 9]


def test_a_symlinked_step_folder_is_refused_before_training_naming_the_link(tmp_path):
    directory = tmp_path / "ckpt"
    checkpoint.save(directory, _state(), 0)
    (tmp_path / "elsewhere").mkdir()
    (directory / "25").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(checkpoint.CheckpointError, match=rf"holds a symbolic link, '{directory}/25'"):
        resume_or_start(directory, _state(), resume=True)
    assert (directory / "25").is_symlink()


def test_resume_from_a_folder_that_does_not_exist_is_refused_in_one_line(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist, so there is nothing to resume") as error:
        resume_or_start(tmp_path / "missing", _state(), resume=True)
    assert "\n" not in str(error.value) and not (tmp_path / "missing").exists()


LAYOUT = {"num_examples": 40, "batch_size": 12, "validation_split": 0.1, "shuffle": True, "seed": 0}
LAYOUT |= {"steps_per_epoch": 3, "process_count": 1, "data": "abc"}


def _saved_with_layout(directory):
    """A folder whose checkpoint of train step 0 was taken by a fit laid out as LAYOUT."""
    saver = resume_or_start(directory, _state()).callbacks[0]
    saver.set_params({"epochs": 1, "layout": LAYOUT})
    saver.on_train_begin(_state())
    saver.on_train_end({}, _state())


def test_the_data_position_holds_the_fits_layout(tmp_path):
    _saved_with_layout(tmp_path)
    assert checkpoint.latest_position(tmp_path) == checkpoint.Position(0, 0, 0, LAYOUT)


def test_a_resume_with_the_same_layout_begins(tmp_path):
    _saved_with_layout(tmp_path)
    saver = resume_or_start(tmp_path, _state(), resume=True).callbacks[0]
    saver.set_params({"epochs": 2, "layout": dict(LAYOUT)})
    saver.on_train_begin(_state())
    saver.on_train_end({}, _state())


@pytest.mark.parametrize(
    "changed, said",
    [
        ({"batch_size": 32, "steps_per_epoch": 2}, "batch_size 12 -> 32, ... steps_per_epoch 3 -> 2"),
        ({"num_examples": 60}, "num_examples 40 -> 60"),
        ({"validation_split": 0.3}, "validation_split 0.1 -> 0.3"),
        ({"data": "abd"}, "data 'abc' -> 'abd'"),
    ],
)
def test_a_resume_with_other_data_settings_is_refused_in_one_line_naming_them(tmp_path, changed, said):
    _saved_with_layout(tmp_path)
    saver = resume_or_start(tmp_path, _state(), resume=True).callbacks[0]
    saver.set_params({"epochs": 2, "layout": LAYOUT | changed})
    with pytest.raises(checkpoint.CheckpointError) as error:
        saver.on_train_begin(_state())
    message = str(error.value)
    assert "\n" not in message and "resume with the old settings, or start afresh in another checkpoint" in message
    for part in said.split(", ... "):
        assert part in message
    saver.on_train_end({}, _state())
