"""Issue 14: an interrupted, preempted or crashed run loses a few steps, never the run."""

import dataclasses
import errno
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import toys
from experiments import flags
from flaxlesson import checkpoint, execution, models, training
from flaxlesson.resume import Start, resume_or_start

ROOT = Path(__file__).resolve().parent.parent
SEED, BATCH, EPOCHS = 5, 6, 3  # 40 samples: 7 steps an epoch, 21 in all


def _where(position):
    """A saved position without its data layout: epoch, step and seed."""
    return dataclasses.replace(position, layout=None)


X, Y = toys.three_classes_of_five(40)


def _state():
    return training.create_train_state(models.MLP(hidden=(12,), num_classes=3), X[:1])


def _fit(state, callbacks=(), **kwargs):
    return training.fit(
        state, X, Y, epochs=EPOCHS, batch_size=BATCH, seed=SEED, verbose=0, callbacks=callbacks, **kwargs
    )


@functools.cache
def _uninterrupted(steps_per_execution=1):
    return _fit(_state(), steps_per_execution=steps_per_execution)[0]


def _assert_equal(a, b):
    for la, lb in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_array_equal(la, lb)


class StopAt(training.Callback):
    """Stop the fit after the call that ends at `step` of `epoch`, as a preemption would."""

    def __init__(self, epoch, step):
        self.at = (epoch, step)

    def on_train_batch_end(self, epoch, step, logs, state):
        self.stop_training = self.stop_training or (epoch, step) == self.at


def _start(directory, resume=False, save_freq=2, **kwargs):
    return resume_or_start(directory, _state(), resume=resume, seed=SEED, save_freq=save_freq, **kwargs)


def _run(start, *callbacks, **kwargs):
    """Fit from `start` (initial position and checkpoint callbacks included)."""
    return _fit(
        start.state,
        [*start.callbacks, *callbacks],
        initial_epoch=start.initial_epoch,
        initial_step=start.initial_step,
        **kwargs,
    )


@pytest.mark.parametrize(
    "settings, changed",
    [({"batch_size": 4}, r"batch_size 6 -> 4"), ({"validation_split": 0.3}, r"validation_split 0.0 -> 0.3")],
)
def test_a_fit_resumed_with_other_data_settings_is_refused_in_one_line(tmp_path, settings, changed):
    _run(_start(tmp_path), StopAt(1, 3))
    start = _start(tmp_path, resume=True)
    with pytest.raises(checkpoint.CheckpointError, match=changed):
        training.fit(
            start.state,
            X,
            Y,
            **{"epochs": EPOCHS, "batch_size": BATCH, "seed": SEED, "verbose": 0, **settings},
            callbacks=start.callbacks,
            initial_epoch=start.initial_epoch,
            initial_step=start.initial_step,
        )


@pytest.mark.parametrize("steps_per_execution, save_freq, stop", [(1, 2, (1, 3)), (3, 4, (1, 6))])
def test_a_fit_stopped_mid_epoch_resumes_to_the_uninterrupted_params_bit_for_bit(
    tmp_path, steps_per_execution, save_freq, stop
):
    stopped, history = _run(
        _start(tmp_path, save_freq=save_freq), StopAt(*stop), steps_per_execution=steps_per_execution
    )
    assert history.stopped_by == "StopAt" and int(stopped.step) == 7 + stop[1]
    start = _start(tmp_path, resume=True, save_freq=save_freq)
    assert (start.initial_epoch, start.initial_step, int(start.state.step)) == (*stop, 7 + stop[1])
    resumed, history = _run(start, steps_per_execution=steps_per_execution)
    assert history.epoch == [1, 2] and history.interrupted is None
    _assert_equal(resumed.params, _uninterrupted(steps_per_execution).params)
    assert checkpoint.fingerprint(resumed.params) == checkpoint.fingerprint(_uninterrupted(steps_per_execution).params)


def test_a_signal_while_the_fit_compiles_stops_it_after_its_first_call(monkeypatch):
    one_train_step = execution.core.one_train_step

    def signalled(train_step):
        os.kill(os.getpid(), signal.SIGINT)
        return one_train_step(train_step)

    monkeypatch.setattr(execution.core, "one_train_step", signalled)
    state, history = _fit(_state())
    assert history.interrupted == "SIGINT" and history.epoch == [] and int(state.step) == 1


def test_a_checkpoint_holds_the_data_position_and_seed(tmp_path):
    _run(_start(tmp_path), StopAt(1, 3))
    state, position = checkpoint.restore_newest(tmp_path, _state())
    assert _where(position) == checkpoint.Position(epoch=1, step=3, seed=SEED)
    assert position.layout["batch_size"] == BATCH and position.layout["num_examples"] == len(X)
    assert int(state.step) == 10


def test_checkpoints_are_taken_where_save_freq_steps_are_crossed_and_at_the_end(tmp_path):
    _run(_start(tmp_path, save_freq=5, max_to_keep=10), steps_per_execution=2)
    # calls end at steps 2, 4, 6, 7 of each epoch (global 2, 4, 6, 7, 9, 11, 13, 14, 16, ...): the calls that
    # cross 5, 10, 15, 20 save; the end of the fit (step 21) saves too
    assert checkpoint.saved_steps(tmp_path) == [6, 11, 16, 20, 21]
    assert _where(checkpoint.latest_position(tmp_path)) == checkpoint.Position(epoch=3, step=0, seed=SEED)


def test_a_boundary_crossed_by_an_epochs_last_call_is_saved_as_that_epochs_end(tmp_path):
    _run(_start(tmp_path, save_freq=7, max_to_keep=10))
    assert checkpoint.saved_steps(tmp_path) == [7, 14, 21]
    state, epoch = checkpoint.restore(tmp_path, _state(), epoch=1)
    assert epoch == 1 and int(state.step) == 7


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A folder holding the checkpoints of steps 6, 8 and 10 (the newest taken at epoch 1, step 3)."""
    directory = tmp_path_factory.mktemp("stopped")
    _run(_start(directory, max_to_keep=3), StopAt(1, 3))
    assert checkpoint.saved_steps(directory) == [6, 8, 10]
    return directory


def _truncate_data(step_dir):
    for data in (step_dir / "state" / "d").iterdir():
        os.truncate(data, data.stat().st_size // 2)


def _change_bytes(step_dir):
    for data in (step_dir / "state" / "d").iterdir():
        with open(data, "r+b") as f:
            f.seek(data.stat().st_size // 2)
            f.write(b"\xff" * 8)


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


DAMAGE = {
    "killed mid-write": lambda step_dir: step_dir.rename(step_dir.with_name("10.orbax-checkpoint-tmp-1764400000")),
    "truncated file": _truncate_data,
    "changed bytes": _change_bytes,
    "empty step folder": _empty,
    "missing file": lambda step_dir: (step_dir / "state" / "manifest.ocdbt").unlink(),
    "missing position": lambda step_dir: (step_dir / "position" / "metadata").unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_and_the_run_resumes_from_the_one_before(
    stopped_run, tmp_path, caplog, damage
):
    directory = tmp_path / "ckpt"
    shutil.copytree(stopped_run, directory)
    DAMAGE[damage](directory / "10")
    with caplog.at_level(logging.WARNING, logger="flaxlesson.checkpoint"):
        start = _start(directory, resume=True)
    named = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and f"{directory}/10" in r.getMessage()
    ]
    assert named and ("unfinished" if damage == "killed mid-write" else "damaged") in named[0]
    assert (start.initial_epoch, start.initial_step, int(start.state.step)) == (1, 1, 8)
    resumed, _ = _run(start)
    _assert_equal(resumed.params, _uninterrupted().params)
    assert not list(directory.glob("*.orbax-checkpoint-tmp*"))  # the killed write's folder is cleared


def _python(code, folder):
    """A Python process running `code` with `folder` as its argument, this project importable, stdout piped."""
    return subprocess.Popen(
        [sys.executable, "-c", code, str(folder)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )


HOLDER = """
import sys, time
import numpy as np
from flaxlesson import checkpoint, models, training

state = training.create_train_state(models.MLP(hidden=(12,), num_classes=3), np.zeros((1, 5), np.float32))
saver = checkpoint.BackupAndRestore(sys.argv[1], state)
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_folder_is_refused_naming_the_holder_until_the_holder_dies(tmp_path):
    holder = _python(HOLDER, tmp_path)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(checkpoint.CheckpointError, match=rf"is in use by another run \(pid {holder.pid} on "):
            _start(tmp_path)
        holder.kill()
        holder.wait(timeout=30)
        _run(_start(tmp_path))  # the kernel released the dead holder's lock
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert _where(checkpoint.latest_position(tmp_path)) == checkpoint.Position(epoch=3, step=0, seed=SEED)


def test_within_one_process_a_new_run_takes_the_folder_over_from_one_that_ended_by_an_exception(tmp_path):
    class Crash(training.Callback):
        def on_train_batch_end(self, epoch, step, logs, state):
            if (epoch, step) == (1, 3):
                raise RuntimeError("crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        _run(_start(tmp_path), Crash())
    resumed, _ = _run(_start(tmp_path, resume=True))
    _assert_equal(resumed.params, _uninterrupted().params)


def test_a_state_with_nan_params_is_never_saved(tmp_path, caplog):
    def poison(epoch, step, logs, state):
        if (epoch, step) == (1, 2):
            return state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
        return None

    with caplog.at_level(logging.WARNING, logger="flaxlesson.checkpoint"):
        _run(_start(tmp_path, save_freq=1, max_to_keep=2), training.LambdaCallback(on_train_batch_end=poison))
    assert checkpoint.saved_steps(tmp_path) == [8, 9]  # no NaN state from step 10 on replaced them
    assert any("Not saving train step 10" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)
    state, position = checkpoint.restore_newest(tmp_path, _state())
    assert _where(position) == checkpoint.Position(1, 2, SEED) and all(
        np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params)
    )


def test_a_folder_that_cannot_be_written_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(checkpoint.CheckpointError, match="cannot write into"):
        checkpoint.BackupAndRestore(tmp_path / "file" / "ckpt", _state())


class _FullDisk:
    """A write that fails in the background as a full disk does."""

    def result(self, timeout=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_gives_one_error_keeps_the_good_checkpoints_and_leaves_no_temporary_folder(
    tmp_path, monkeypatch, caplog, capfd
):
    writes = ocp.StandardCheckpointHandler.async_save

    async def fill_the_disk_from_step_8(self, directory, *args, **kwargs):
        futures = await writes(self, directory, *args, **kwargs)
        step = int(Path(directory).parent.name.split(".")[0])
        return futures if step < 8 else [*(futures or []), _FullDisk()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", fill_the_disk_from_step_8)
    with caplog.at_level(logging.DEBUG), pytest.raises(checkpoint.CheckpointWriteError) as error:
        _run(_start(tmp_path, save_freq=2), StopAt(1, 3))
    assert f"in '{tmp_path}': no space left on the device" in str(error.value)
    assert "the newest checkpoint there is step 6" in str(error.value)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "Traceback" not in capfd.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["2", "4", "6", checkpoint.LOCK_NAME, checkpoint.MARK_NAME]
    )
    monkeypatch.undo()
    resumed, _ = _run(_start(tmp_path, resume=True))  # the folder is free again
    _assert_equal(resumed.params, _uninterrupted().params)


def test_a_run_saved_on_eight_devices_resumes_mid_epoch_on_one(tmp_path):
    _run(_start(tmp_path, strategy="sharded"), StopAt(1, 3), strategy="sharded")
    start = _start(tmp_path, resume=True, strategy="single")
    assert (start.initial_epoch, start.initial_step) == (1, 3)
    resumed, _ = _run(start, strategy="single")
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(_uninterrupted().params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_resume_with_another_seed_is_refused(tmp_path):
    _run(_start(tmp_path), StopAt(1, 3))
    with pytest.raises(checkpoint.CheckpointError, match=f"trained with seed {SEED}, this run has seed 6"):
        resume_or_start(tmp_path, _state(), resume=True, seed=6)


@pytest.mark.parametrize("initial_epoch, initial_step", [(1, 7), (3, 1), (0, -1)])
def test_an_initial_step_outside_the_epoch_is_rejected(initial_epoch, initial_step):
    with pytest.raises(ValueError, match="initial_step"):
        _fit(_state(), initial_epoch=initial_epoch, initial_step=initial_step)


@pytest.mark.parametrize("save_freq", [0, "batch", 2.0, True])
def test_a_bad_save_freq_is_rejected(tmp_path, save_freq):
    with pytest.raises(ValueError, match="save_freq must be a positive integer or 'epoch'"):
        checkpoint.BackupAndRestore(tmp_path, _state(), save_freq=save_freq)


def test_save_freq_without_a_checkpoint_folder_is_a_usage_error():
    from experiments import cnn_mnist

    with pytest.raises(flags.ConfigError, match="save_freq: needs --checkpoint-dir"):
        cnn_mnist.Config(save_freq=20)


CHILD = """
import signal, sys, time
import numpy as np
from experiments import flags
from flaxlesson import checkpoint, models, training
from flaxlesson.resume import resume_or_start

rng = np.random.default_rng(0)
x = rng.normal(size=(40, 5)).astype(np.float32)
y = (x[:, 0] + x[:, 1] > 0).astype(np.int32) + (x[:, 2] > 0.5).astype(np.int32)


class WaitForSigterm(training.Callback):
    def on_train_batch_end(self, epoch, step, logs, state):
        if (epoch, step) == (1, 3):
            fits, received = signal.getsignal(signal.SIGTERM), []

            def relay(signum, frame):  # to fit's own handler, noting that it came
                received.append(signum)
                fits(signum, frame)

            signal.signal(signal.SIGTERM, relay)
            print("ready", flush=True)
            while not received:
                time.sleep(0.01)
            signal.signal(signal.SIGTERM, fits)


state = training.create_train_state(models.MLP(hidden=(12,), num_classes=3), x[:1])
start = resume_or_start(sys.argv[1], state, seed=5, save_freq=4)
_, history = training.fit(
    start.state, x, y, epochs=3, batch_size=6, seed=5, verbose=0, callbacks=[*start.callbacks, WaitForSigterm()]
)
sys.exit(flags.exit_code(flags.interrupted(history)))
"""


def test_sigterm_stops_a_run_within_30s_with_a_checkpoint_that_resumes_to_the_uninterrupted_params(tmp_path):
    child = _python(CHILD, tmp_path)
    try:
        assert child.stdout.readline() == "ready\n"
        start = time.monotonic()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == flags.TERMINATED_EXIT_CODE
        assert time.monotonic() - start < 30
    finally:
        child.kill()
        child.wait(timeout=30)
    assert checkpoint.saved_steps(tmp_path)[-1] == 10
    start = resume_or_start(tmp_path, _state(), resume=True, seed=SEED, save_freq=4)
    assert (start.initial_epoch, start.initial_step) == (1, 3)
    resumed, _ = _run(start)
    _assert_equal(resumed.params, _uninterrupted().params)


def _worker_pid(process_id, attempt):
    """The pid of launched process `process_id` of `attempt`, a child of this process; None when not running."""
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and (
            env.get("JAX_PROCESS_ID"),
            env.get("FLAXLESSON_RESTART"),
        ) == (str(process_id), str(attempt)):
            return int(proc.name)
    return None


def test_a_process_killed_by_sigkill_is_restarted_and_the_run_ends_with_the_uninterrupted_params(tmp_path, caplog):
    from experiments import distributed

    settings = {"samples": 256, "features": 8, "epochs": 3, "batch_size": 16, "seed": 3, "save_freq": 5}
    settings |= {"processes": 2, "cpu_devices": 1, "timeout": 120.0}
    whole = distributed.run(
        distributed.Config(**settings, checkpoint_dir=str(tmp_path / "w"), out=str(tmp_path / "wo"))
    )
    killed = []

    def kill_process_1_at_its_first_checkpoint():
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            if (tmp_path / "c" / "5").exists() and (pid := _worker_pid(1, attempt=0)):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_process_1_at_its_first_checkpoint)
    killer.start()
    with caplog.at_level(logging.WARNING, logger="flaxlesson.launch"):
        cut = distributed.run(
            distributed.Config(**settings, max_restarts=1, checkpoint_dir=str(tmp_path / "c"), out=str(tmp_path / "co"))
        )
    killer.join()
    assert killed and "process 1 of 2 was killed by SIGKILL; restarting" in caplog.text
    assert (cut["initial_epoch"], cut["initial_step"]) > (0, 0)  # resumed from a checkpoint, not from scratch
    assert cut["params_fingerprint"] == whole["params_fingerprint"]


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_with_a_checkpoint(tmp_path):
    # JAX's preemption service tells every process; each stops after the call they agreed on and saves there. Had
    # they stopped at different steps, the collectives of the one going on, or the save's barriers, would hang.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["--samples", "512", "--features", "8", "--epochs", "3", "--batch-size", "16", "--save-freq", "5"]
    argv += ["--processes", "2", "--coordinator", f"127.0.0.1:{port}", "--checkpoint-dir", str(tmp_path / "c")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    workers = [
        subprocess.Popen(
            [sys.executable, "experiments/distributed.py", *argv, "--process-id", str(i), "--out", str(tmp_path / "o")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "c" / "5").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        sent = time.monotonic()
        workers[1].send_signal(signal.SIGTERM)
        codes = [worker.wait(timeout=30) for worker in workers]
        assert time.monotonic() - sent < 30
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(timeout=30)
    assert codes == [flags.TERMINATED_EXIT_CODE] * 2
    position = checkpoint.latest_position(tmp_path / "c")
    assert (0, 5) < (position.epoch, position.step) < (3, 0)


def test_a_streamed_fit_stopped_mid_epoch_resumes_to_the_uninterrupted_params_bit_for_bit(tmp_path):
    from flaxlesson import shards, streaming

    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, size=(50, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, size=50)
    dataset = streaming.StreamingDataset(shards.write_arrays(tmp_path / "shards", images, labels, records_per_shard=20))
    model = models.CNN(features=(4,), dense=8, num_classes=3)

    def fit(start, *callbacks):
        return training.fit(
            start.state,
            dataset,
            epochs=2,
            batch_size=8,
            seed=SEED,
            verbose=0,
            initial_epoch=start.initial_epoch,
            initial_step=start.initial_step,
            callbacks=[*start.callbacks, *callbacks],
        )[0]

    def fresh():
        return training.create_train_state(model, images[:1].astype(np.float32))

    def begin(**kwargs):
        return resume_or_start(tmp_path / "c", fresh(), seed=SEED, save_freq=2, **kwargs)

    uninterrupted = fit(Start(fresh(), 0, 0, []))
    fit(begin(), StopAt(1, 3))
    start = begin(resume=True)
    assert (start.initial_epoch, start.initial_step) == (1, 3)
    _assert_equal(fit(start).params, uninterrupted.params)


def test_a_step_folder_turned_symlink_mid_run_fails_saying_the_new_checkpoint_was_written(tmp_path):
    directory = tmp_path / "c"

    def link_step_2(epoch, step, logs, state):
        if (epoch, step) == (0, 4):  # step 2 is saved; orbax's max_to_keep=1 clean-up deletes it at the next save
            while not (directory / "2").is_dir():
                time.sleep(0.01)
            shutil.copytree(directory / "2", tmp_path / "moved")
            shutil.rmtree(directory / "2")
            (directory / "2").symlink_to(tmp_path / "moved")

    with pytest.raises(checkpoint.CheckpointWriteError) as error:
        _run(_start(directory, save_freq=2, max_to_keep=1), training.LambdaCallback(on_train_batch_end=link_step_2))
    assert f"the checkpoint of train step 4 in '{directory}' was written, but finishing it failed: " in str(error.value)
    assert 4 in checkpoint.saved_steps(directory) and (tmp_path / "moved" / "state").is_dir()
