"""The callbacks that decide when to save a checkpoint: Keras's `BackupAndRestore` and `ModelCheckpoint`.

`BackupAndRestore` keeps ONE orbax manager (`store`) for the life of a fit and writes asynchronously every
`save_freq` steps, at epoch ends, and when the fit stops (SIGTERM, Ctrl-C, a callback). What is kept is what can
be trusted:

- a checkpoint is written under a temporary name and renamed when complete; a damaged one is skipped on resume
  with a WARNING naming it, and the run resumes from the one before it;
- a state with NaN or infinite params is never saved, so keeping the newest `max_to_keep` never drops the last
  good checkpoints for bad ones;
- a folder serves one run of one kind (`ownership`): marked when first used, locked while a run writes, refused
  when it holds anything flaxlesson did not write; a write that fails (a full disk) raises one
  `CheckpointWriteError` and leaves no temporary folder behind;
- a resume whose data layout (rows, batch size, validation split, ...) differs from the checkpoint's is refused
  before its first step, naming the setting.

The saving decision is this module's, not orbax's save interval: orbax saves at multiples of N, which a fit of K
steps per call steps over; here a save follows the call that crosses a multiple.
"""

import contextlib
import dataclasses
import datetime
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flaxlesson import checks, ownership, results, store
from flaxlesson.callbacks import Callback
from flaxlesson.ownership import DAMAGED_PREFIX, LOCK_NAME, MARK_NAME
from flaxlesson.store import (
    CheckpointError,
    CheckpointWriteError,
    Position,
    fingerprint,
    latest_position,
    restore,
    restore_newest,
    saved_steps,
)

__all__ = [
    "DAMAGED_PREFIX",
    "LOCK_NAME",
    "MARK_NAME",
    "BackupAndRestore",
    "CheckpointError",
    "CheckpointWriteError",
    "ModelCheckpoint",
    "Position",
    "fingerprint",
    "latest_position",
    "restore",
    "restore_newest",
    "save",
    "saved_steps",
]

logger = logging.getLogger(__name__)


def _writable(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"directory: {str(directory)!r} is a file, not a directory")
    try:
        results.check_writable(directory)
    except ValueError as error:
        raise CheckpointError(f"directory: {str(error).removeprefix('path: ')}") from None


def _primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    """Every process waits here for the others (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class _Snapshot(NamedTuple):
    """A state copied to the host, to be written as the checkpoint of train step `step` at `position`."""

    step: int
    payload: dict[str, Any]
    position: Position


def _check_layout(saved: Mapping[str, Any], now: Mapping[str, Any], directory: Path, step: int) -> None:
    """CheckpointError in one line naming each data setting that differs from the checkpoint's (old -> new)."""
    keys = sorted(saved.keys() | now.keys())
    changed = [f"{key} {saved.get(key)!r} -> {now.get(key)!r}" for key in keys if saved.get(key) != now.get(key)]
    if changed:
        raise CheckpointError(
            f"the checkpoint of train step {step} in {str(directory)!r} was taken with other data settings "
            f"({', '.join(changed)}); resume with the old settings, or start afresh in another checkpoint directory"
        )


class BackupAndRestore(Callback):
    """Keras's BackupAndRestore: save the train state and data position every `save_freq` steps, asynchronously.

    `save_freq` is an int N (save after the compiled call that crosses a multiple of N train steps) or 'epoch'.
    Either way it also saves when the fit ends or stops (SIGTERM, Ctrl-C, a callback), waits for the write, and
    lets go of the folder. `state` is the state the fit starts from and `initial_epoch`/`initial_step` where it
    starts (what `resume_or_start` returns); `seed` is the fit's. Made before training, it takes the folder's lock
    and refuses (CheckpointError, folder untouched) a folder it cannot write, one held by another run, another
    model's checkpoints, good checkpoints past its start (this run would write over them), and a folder that is
    not its `kind`'s (`ownership.claim`); damaged checkpoints of its own past its start are renamed
    `damaged.<step>.<time>` with a WARNING. When the folder holds a checkpoint at its start, the fit must lay out
    its data as that checkpoint's was (`on_train_begin`). It serves one fit. Unlike Keras's, it keeps its
    checkpoints after a finished fit: they are the run's record, and what a resume with nothing left scores.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        state: Any,
        *,
        save_freq: int | str = "epoch",
        max_to_keep: int = 3,
        seed: int = 0,
        initial_epoch: int = 0,
        initial_step: int = 0,
        kind: str = "fit",
    ):
        save_freq = checks.count_or_epoch("save_freq", save_freq)
        checks.positive_int("max_to_keep", max_to_keep)
        self.directory, self.save_freq, self.seed = Path(directory), save_freq, checks.non_negative_int("seed", seed)
        self.position = Position(
            checks.non_negative_int("initial_epoch", initial_epoch),
            checks.non_negative_int("initial_step", initial_step),
            seed,
        )
        self.step = int(jax.device_get(state.step))
        self._last_in_epoch, self._pending, self._writing = initial_step, None, None
        _writable(self.directory)
        self._lock = ownership.Lock(self.directory, self._release) if _primary() else None
        try:
            if self._lock is not None:
                ownership.claim(self.directory, kind)
                self._set_aside_newer(state)
            _sync("flaxlesson.checkpoint.open")
            self._quiet = contextlib.ExitStack()
            self._quiet.enter_context(store.quiet())
            self._manager = store.open_manager(self.directory, write=True, max_to_keep=max_to_keep)
        except BaseException:
            if self._lock is not None:
                self._lock.abandon()
            self._release()
            raise
        self._saved = self.step if self.step in self._manager.all_steps() else None
        start = store.read_position(self.directory, self.step) if self._saved is not None else None
        self._start_layout = None if start is None else start.layout

    def _release(self) -> None:
        """Close the manager after its writes (errors are reported where they are waited for), let go of the folder."""
        manager, self._manager = getattr(self, "_manager", None), None
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()
        if getattr(self, "_quiet", None) is not None:
            self._quiet.close()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()

    def _set_aside_newer(self, state: Any) -> None:
        """Refuse good checkpoints past this run's start; rename damaged ones out of orbax's sight."""
        with store.reading(self.directory) as manager:
            if manager is None:
                return
            newer = [step for step in sorted(manager.all_steps()) if step > self.step]
            good, damaged = {}, {}
            for step in newer:
                try:
                    good[step] = store.read(manager, step, state)[1]
                except store.Damaged as why:
                    damaged[step] = why
            if not good and self.step in manager.all_steps():
                store.read(manager, self.step, state)  # another model's checkpoint at the start is refused too
        if good:
            epochs = [p.epoch if p.step == 0 else p.describe() for p in good.values()]
            raise CheckpointError(
                f"directory {str(self.directory)!r} already holds checkpoints of epochs {epochs} (train steps "
                f"{list(good)}), past this run's start (train step {self.step}, {self.position.describe()}); "
                "resume from the newest or use another directory"
            )
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        for step, why in damaged.items():
            aside = self.directory / f"{DAMAGED_PREFIX}{step}.{stamp}"
            (self.directory / str(step)).rename(aside)
            logger.warning("Damaged checkpoint %s (%s) moved aside to %s", self.directory / str(step), why, aside)

    def set_params(self, params: Mapping[str, Any]) -> None:
        """Keep the fit's data layout (`params["layout"]`, if it gives one), to save with every position."""
        super().set_params(params)
        layout = params.get("layout")
        self.position = dataclasses.replace(self.position, layout=None if layout is None else dict(layout))

    def on_train_begin(self, state: Any) -> None:
        """Check that the fit starts where this callback was made for, with its data laid out as there."""
        if self._manager is None:
            raise CheckpointError("a BackupAndRestore serves one fit; make a new one (resume_or_start) for the next")
        if int(jax.device_get(state.step)) != self.step:
            raise CheckpointError(
                f"the fit starts at train step {int(jax.device_get(state.step))}, this BackupAndRestore was made "
                f"for step {self.step}"
            )
        if self._start_layout is not None and self.position.layout is not None:
            _check_layout(self._start_layout, self.position.layout, self.directory, self.step)

    def on_epoch_begin(self, epoch: int, state: Any) -> None:
        """Count this epoch's steps from where it starts."""
        self._last_in_epoch = self.position.step if epoch == self.position.epoch else 0

    def on_train_batch_end(self, epoch: int, step: int, logs: Any, state: Any) -> None:
        """Write the copy a crossed boundary left at the last call; copy the state if this call crossed one."""
        self._write_pending()
        self._check_writes()
        now = self.step + step - self._last_in_epoch
        crossed = isinstance(self.save_freq, int) and now // self.save_freq > self.step // self.save_freq
        self.step, self._last_in_epoch = now, step
        self.position = dataclasses.replace(self.position, epoch=epoch, step=step)
        if crossed:
            self._pending = self._snapshot(state)

    def on_epoch_end(self, epoch: int, logs: dict[str, float], state: Any) -> None:
        """At an epoch's end (with save_freq 'epoch', or when the epoch's last call crossed a boundary): save."""
        self.position = dataclasses.replace(self.position, epoch=epoch + 1, step=0)
        if self.save_freq == "epoch" or self._pending is not None:
            self._pending = self._snapshot(state)
            self._write_pending()

    def on_train_end(self, logs: dict[str, float], state: Any) -> None:
        """Save where the fit ended or stopped, wait for every write, and release the folder."""
        try:
            self._write_pending()
            if self._saved is None or self.step > self._saved:
                self._pending = self._snapshot(state)
                self._write_pending()
            self._finish()
        finally:
            self._release()

    def _snapshot(self, state: Any) -> _Snapshot | None:
        """A host copy of `state` at the current position; None (with a WARNING) when its params are not finite."""
        payload = store.payload(state)
        if not store.finite(payload["params"]):
            logger.warning(
                "Not saving train step %d (%s): its params hold NaN or infinity; the newest checkpoint in %s "
                "stays step %s",
                self.step,
                self.position.describe(),
                self.directory,
                self._saved,
            )
            return None
        return _Snapshot(self.step, payload, self.position)

    def _write_pending(self) -> None:
        if self._pending is None:
            return
        snapshot, self._pending = self._pending, None
        if self._saved is not None and snapshot.step <= self._saved:
            raise CheckpointError(
                f"cannot save train step {snapshot.step} in {str(self.directory)!r}: this run saved step {self._saved} "
                "already (did a callback give the fit an older state?)"
            )
        args = store.save_args(snapshot.payload, snapshot.position)
        self._finish()  # orbax waits for the previous write anyway; a failure of it is reported as its own
        self._writing = snapshot.step
        with self._failures():
            self._manager.save(snapshot.step, args=args, force=True)
        self._saved = snapshot.step

    def _check_writes(self) -> None:
        """Raise a failed background write as soon as it is known, not at the next save."""
        if self._writing is not None and not self._manager.is_saving_in_progress():
            self._finish()

    def _finish(self) -> None:
        """Wait for the write in flight."""
        with self._failures():
            self._manager.wait_until_finished()
        self._writing = None

    @contextlib.contextmanager
    def _failures(self) -> Iterator[None]:
        """Turn a failed write into one CheckpointWriteError that says what failed; remove its temporary folders."""
        try:
            yield
        except Exception as error:
            failed, self._writing = self._writing, None
            self._release()
            for name in ocp.path.step.tmp_checkpoints(self.directory):
                if ocp.path.step.step_from_checkpoint_name(name) == failed:
                    shutil.rmtree(self.directory / name, ignore_errors=True)
            kept = saved_steps(self.directory)
            newest = f"step {kept[-1]}" if kept else "none"
            if failed in kept:
                raise CheckpointWriteError(
                    f"the checkpoint of train step {failed} in {str(self.directory)!r} was written, but finishing it "
                    f"failed: {store.reason(error)}; the newest checkpoint there is {newest}"
                ) from None
            raise CheckpointWriteError(
                f"could not write the checkpoint of train step {failed} in {str(self.directory)!r}: "
                f"{store.reason(error)}; its temporary folder is removed, the newest checkpoint there is {newest}"
            ) from None


class ModelCheckpoint(BackupAndRestore):
    """Keras's ModelCheckpoint as the port keeps it: the train state after every epoch (and where a fit stops)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        state: Any,
        *,
        initial_epoch: int = 0,
        max_to_keep: int = 2,
        seed: int = 0,
        kind: str = "fit",
    ):
        super().__init__(
            directory,
            state,
            save_freq="epoch",
            max_to_keep=max_to_keep,
            seed=seed,
            initial_epoch=initial_epoch,
            kind=kind,
        )


def save(
    directory: str | os.PathLike, state: Any, epoch: int, *, seed: int = 0, max_to_keep: int = 2, kind: str = "fit"
) -> Path:
    """Save `state` as the checkpoint taken after `epoch` whole epochs, keeping the newest `max_to_keep`; its path.

    Waits for the write. Every process of a multi-process run must call it; process 0 writes. `kind` names the
    run kind the folder serves (`ownership.claim`).
    """
    checks.non_negative_int("epoch", epoch)
    step = int(jax.device_get(state.step))
    if step in saved_steps(directory):
        raise CheckpointError(f"directory {str(directory)!r} already holds a checkpoint of train step {step}")
    saver = BackupAndRestore(directory, state, max_to_keep=max_to_keep, seed=seed, initial_epoch=epoch, kind=kind)
    saver.on_train_end({}, state)
    return Path(directory).absolute() / str(step)
