"""Fault-tolerant checkpoints with orbax: save every N steps while training goes on, resume mid-epoch exactly.

A checkpoint holds the train state (step, params, optimiser state, as host arrays: data-parallel state is
replicated, so one copy is the whole state) AND the data position (`Position`: epoch, step within it, the seed
that shuffles the epochs and keys the steps, and a JSON slot for a streaming iterator's state), numbered by the
train step. `fit(..., initial_epoch=p.epoch, initial_step=p.step)` from it ends bit for bit where the
uninterrupted run does on the same devices, and restores onto any device count.

`BackupAndRestore` (Keras's name) keeps ONE orbax CheckpointManager for the life of a fit and writes
asynchronously every `save_freq` steps, at epoch ends, and when the fit stops (SIGTERM, Ctrl-C, a callback).
What is kept is what can be trusted:

- a checkpoint is written under a temporary name and renamed when complete; a damaged one (killed mid-write, a
  truncated or missing file, an empty folder) is skipped on resume with a WARNING naming it, and the run
  resumes from the one before it (each carries the sha256 of its arrays, checked when read);
- a state with NaN or infinite params is never saved, so keeping the newest `max_to_keep` never drops the last
  good checkpoints for bad ones;
- a folder serves one run at a time: a lock file (`LOCK_NAME`, `fcntl.flock`, released at the end of the fit or
  when the process dies) refuses a second run, naming the holder; a folder that cannot be written is refused
  before training, and a write that fails (a full disk) raises one `CheckpointWriteError` and leaves no
  temporary folder behind.
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from flaxlesson import checks, parallel, results
from flaxlesson.callbacks import Callback

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
"""The file in a checkpoint folder that the run writing there holds (`fcntl.flock`); it names that run."""

DAMAGED_PREFIX = "damaged."
"""Damaged checkpoints past a run's start are renamed `damaged.<step>.<time>`: out of orbax's sight, kept to look at."""

_TEMPORARY = ".orbax-checkpoint-tmp"  # what orbax appends to a checkpoint's folder name while writing it
_POSITION_FILE = Path("position", "metadata")  # where orbax's JsonSave writes a checkpoint's 'position' item


class CheckpointError(ValueError):
    """A checkpoint folder that does not fit the run: empty, another model's, held by another run, or unwritable."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a folder gone); the checkpoints before it are kept."""


@dataclasses.dataclass(frozen=True)
class Position:
    """Where in the data a checkpoint was taken: `epoch` whole epochs and `step` steps of the next one trained.

    `seed` shuffles every epoch (`np.random.default_rng([seed, epoch])`) and keys every step (`jax.random.key`,
    folded with the train step), so it and the train step fix the rest of the run. `iterator` is the JSON state
    of a streaming input pipeline ({} for in-memory arrays).
    """

    epoch: int
    step: int
    seed: int
    iterator: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """'3 epochs' or '2 epochs and 5 steps'."""
        return f"{self.epoch} epochs" + (f" and {self.step} steps" if self.step else "")


class Start(NamedTuple):
    """What `fit` needs to start or resume a run: `fit(state, ..., initial_epoch=, initial_step=, callbacks=)`."""

    state: Any
    initial_epoch: int
    initial_step: int
    callbacks: list[Callback]


def fingerprint(tree: Any) -> str:
    """sha256 (hex) of the bytes of every array in `tree`, in tree order: equal fingerprints mean bit-equal arrays.

    `fingerprint(state.params)` is what experiments report as `params_fingerprint`.
    """
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def _payload(state: Any) -> dict[str, Any]:
    """What is saved of a TrainState: everything that changes during training, copied to host arrays.

    A copy, because the fit's next call donates the state's buffers while the checkpoint is still being written.
    """
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), jax.device_get(jax.tree.map(jnp.asarray, tree)))


def _finite(params: Any) -> bool:
    return all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params) if np.issubdtype(leaf.dtype, np.inexact))


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Leaf name ('params/Dense_0/kernel') -> shape, for a state payload or orbax's metadata of one."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(map(_key_name, path)): tuple(leaf.shape) for path, leaf in leaves}


def _differences(saved: dict, wanted: dict, limit: int = 6) -> list[str]:
    lines = [f"{name}: missing from the checkpoint" for name in sorted(wanted.keys() - saved.keys())]
    lines += [f"{name}: in the checkpoint, not in the model" for name in sorted(saved.keys() - wanted.keys())]
    lines += [
        f"{name}: checkpoint shape {saved[name]}, model shape {wanted[name]}"
        for name in sorted(saved.keys() & wanted.keys())
        if saved[name] != wanted[name]
    ]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _check_compatible(saved: dict, wanted: dict, where: str) -> None:
    """CheckpointError unless the saved leaf shapes are the model's: params first, then the optimiser state."""
    params = _differences(*({k: v for k, v in shapes.items() if k.startswith("params/")} for shapes in (saved, wanted)))
    if params:
        raise CheckpointError(
            f"{where} holds another model's state; its params differ from this model's:\n  " + "\n  ".join(params)
        )
    rest = _differences(saved, wanted)
    if rest:
        raise CheckpointError(f"{where} holds this model's params but other optimiser state:\n  " + "\n  ".join(rest))


class _Damaged(Exception):
    """A checkpoint that cannot be trusted; the message says why."""


class _OrbaxNoise(logging.Filter):
    """Drops orbax's own log records at `level` and above: the failures they report reach this module as exceptions."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level or f"{os.sep}orbax{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_orbax(level: int = logging.ERROR) -> Iterator[None]:
    """While orbax works for this module: its log records at `level` and above dropped, and so is tensorstore's.

    Tensorstore prints an 'Event loop is closed' traceback after a failed write; this module raises the failure
    itself, once.
    """
    noise = _OrbaxNoise(level)
    absl = logging.getLogger("absl")
    absl.addFilter(noise)
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        absl.removeFilter(noise)
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


class _Manager(ocp.CheckpointManager):
    """Orbax's manager of one checkpoint folder, items 'state', 'position' and 'iterator'."""

    def reached_preemption(self, step: int) -> bool:
        """Never: `training.fit` alone asks JAX's preemption service, once per compiled call.

        The service keeps the last counter it was given; orbax would give it train steps (from its save thread, too)
        and move the fit's call counter, so the processes could miss the call they agreed to stop after.
        """
        return False


def _manager(directory: Path, *, write: bool = False, max_to_keep: int | None = None) -> _Manager:
    """A manager that writes asynchronously, or one that only reads, for this process alone.

    Every process of a run makes the writing one, which first clears a killed run's temporary folders; only a run
    holding the folder's lock may make it.
    """
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=write,
        read_only=not write,
        cleanup_tmp_directories=write,
        enable_async_checkpointing=write,
        save_root_metadata=write,
        multiprocessing_options=ocp.options.MultiprocessingOptions() if write else alone,
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "position": ocp.JsonCheckpointHandler(),
        "iterator": ocp.JsonCheckpointHandler(),
    }
    return _Manager(directory.absolute(), options=options, item_handlers=handlers)


@contextlib.contextmanager
def _reading(directory: str | os.PathLike) -> Iterator[_Manager | None]:
    """A read-only manager of `directory` for the block, or None when there is no such folder."""
    directory = Path(directory)
    if not directory.is_dir():
        yield None
        return
    with _quiet_orbax(logging.WARNING):
        manager = _manager(directory)
        try:
            yield manager
        finally:
            manager.close()


def _read(manager: _Manager, step: int, state: Any) -> tuple[dict[str, Any], Position]:
    """The payload and position of checkpoint `step`, checked against `state`'s model and against its own checksum.

    CheckpointError when it holds another model's state; _Damaged when it cannot be trusted.
    """
    where = f"checkpoint {manager.directory / str(step)}"
    try:
        metadata = manager.item_metadata(step)["state"]
    except Exception as error:  # noqa: BLE001 - any failure to read means a checkpoint not to trust
        raise _Damaged(f"its metadata cannot be read ({_reason(error)})") from None
    if metadata is None:
        raise _Damaged("it holds no train state")
    target = _payload(state)
    _check_compatible(_shapes(metadata.tree), _shapes(target), where)
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore(), iterator=ocp.args.JsonRestore()
    )
    try:
        restored = manager.restore(step, args=args)
        saved = restored["position"]
        position = Position(saved["epoch"], saved["step"], saved["seed"], dict(restored["iterator"] or {}))
        checksum = saved["checksum"]
    except Exception as error:  # noqa: BLE001 - any failure to read means a checkpoint not to trust
        raise _Damaged(f"it cannot be read ({_reason(error)})") from None
    if fingerprint(restored["state"]) != checksum:
        raise _Damaged("its arrays differ from the checksum written with them")
    return restored["state"], position


def _reason(error: BaseException) -> str:
    """One line saying why an orbax or tensorstore call failed."""
    text = str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in text:
        return "no space left on the device"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _newest_good(
    manager: _Manager, state: Any, wanted: Any = None
) -> tuple[int, dict[str, Any], Position] | tuple[None, None, None]:
    """The newest checkpoint that reads back whole (among those `wanted(position)` accepts), skipping damaged ones.

    Each damaged checkpoint is named in a WARNING, and so is each write that never completed (a process killed
    while writing leaves its temporary folder, which the next run that saves here removes). CheckpointError if
    one holds another model's state.
    """
    for folder in sorted(manager.directory.glob(f"*{_TEMPORARY}*")):
        logger.warning("Skipping unfinished checkpoint %s: its write never completed", folder)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            payload, position = _read(manager, step, state)
        except _Damaged as why:
            logger.warning("Skipping damaged checkpoint %s: %s", manager.directory / str(step), why)
            continue
        if wanted is None or wanted(position):
            return step, payload, position
    return None, None, None


def steps(directory: str | os.PathLike) -> list[int]:
    """The train steps of the complete checkpoints in `directory` (none when it does not exist); unverified."""
    with _reading(directory) as manager:
        return [] if manager is None else sorted(manager.all_steps())


def latest_position(directory: str | os.PathLike) -> Position | None:
    """The position of the newest checkpoint in `directory` whose position reads, None if none; arrays unverified.

    For checks before training (resuming past the epochs asked); `resume_or_start` verifies what it resumes. Read
    straight from the files: an orbax manager would start JAX's backend, and scripts check this before
    `parallel.initialize`, which must come first.
    """
    directory = Path(directory)
    found = [p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()] if directory.is_dir() else []
    for folder in sorted(found, key=lambda p: int(p.name), reverse=True):
        try:
            saved = json.loads((folder / _POSITION_FILE).read_text())
            return Position(saved["epoch"], saved["step"], saved["seed"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _place(state: Any, payload: dict[str, Any], strategy: Any) -> Any:
    """`state` with a checkpoint's arrays, placed as `fit(..., strategy=strategy)` returns them."""
    strategy = parallel.get_strategy(strategy)
    payload = strategy.unreplicate(strategy.replicate(payload))
    return state.replace(step=payload["step"], params=payload["params"], opt_state=payload["opt_state"])


def restore_newest(directory: str | os.PathLike, state: Any, *, strategy: Any = None) -> tuple[Any, Position] | None:
    """`state` with the newest good checkpoint's arrays, and where in the data it was taken; None if there is none.

    `state` is the freshly created state of the same model: it gives the tree, and a checkpoint of another model
    is refused (CheckpointError). Damaged checkpoints are skipped with a WARNING each. The arrays are placed as
    `fit(..., strategy=strategy)` returns them, so a checkpoint written on 8 devices resumes on 1 and back.
    """
    with _reading(directory) as manager:
        if manager is None:
            return None
        step, payload, position = _newest_good(manager, state)
    return None if step is None else (_place(state, payload, strategy), position)


def restore(
    directory: str | os.PathLike, state: Any, *, epoch: int | None = None, strategy: Any = None
) -> tuple[Any, int]:
    """`state` with the newest good checkpoint taken at an epoch's end (or at the end of `epoch`), and its epochs.

    As `restore_newest`, for whole epochs (what `ModelCheckpoint` writes); CheckpointError when there is none.
    """
    if epoch is not None:
        checks.non_negative_int("epoch", epoch)
    with _reading(directory) as manager:
        found = (None, None, None)
        if manager is not None:
            found = _newest_good(manager, state, lambda p: p.step == 0 and epoch in (None, p.epoch))
    step, payload, position = found
    if step is None:
        wanted = "no complete checkpoint" if epoch is None else f"no good checkpoint of epoch {epoch}"
        raise CheckpointError(f"directory: {wanted} in {str(directory)!r}")
    return _place(state, payload, strategy), position.epoch


_HELD: dict[Path, Callable[[], None]] = {}
"""The lock files this process holds, each with how its holder lets go (closing its manager, then the lock)."""


def _let_go_earlier(directory: Path) -> None:
    """Make an earlier holder of `directory` in this process finish its writes and let go.

    That holder's fit was cut short by an exception (which skips `on_train_end`); once it has let go, what is read
    in `directory` is final.
    """
    earlier = _HELD.pop((directory / LOCK_NAME).resolve(), None)
    if earlier is not None:
        earlier()


class _Lock:
    """A run's hold on a checkpoint folder: `fcntl.flock` on `LOCK_NAME`, which says who holds it.

    The kernel releases it when the process dies, however it dies. Within one process a new holder takes the
    folder over from an earlier one, whose fit has ended or was cut short by an exception (which skips
    `on_train_end`); `let_go` is how this holder is made to let go then.
    """

    def __init__(self, directory: Path, let_go: Callable[[], None]):
        self.path, self.let_go = (directory / LOCK_NAME).resolve(), let_go
        _let_go_earlier(directory)
        self.file = open(self.path, "a+")  # noqa: SIM115 - held open for the run
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "a process that has not yet written its name"
            self.file.close()
            raise CheckpointError(
                f"directory {str(directory)!r} is in use by another run ({holder}); wait for it to end, "
                "or give this run another folder"
            ) from None
        self.file.truncate(0)
        self.file.write(
            f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
        )
        self.file.flush()
        _HELD[self.path] = let_go

    def release(self) -> None:
        """Let another run have the folder."""
        if _HELD.get(self.path) is self.let_go:
            del _HELD[self.path]
        if not self.file.closed:
            self.file.truncate(0)
            self.file.close()


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


class BackupAndRestore(Callback):
    """Keras's BackupAndRestore: save the train state and data position every `save_freq` steps, asynchronously.

    `save_freq` is an int N (save after the compiled call that crosses a multiple of N train steps) or 'epoch'.
    Either way it also saves when the fit ends or stops (SIGTERM, Ctrl-C, a callback), waits for the write, and
    lets go of the folder. `state` is the state the fit starts from and `initial_epoch`/`initial_step` where it
    starts (what `resume_or_start` returns); `seed` is the fit's. Made before training, it takes the folder's lock
    and refuses (CheckpointError, folder untouched) a folder it cannot write, one held by another run, another
    model's checkpoints, and good checkpoints past its start (this run would write over them); damaged ones past
    its start are renamed `damaged.<step>.<time>` with a WARNING. It serves one fit. Unlike Keras's, it keeps its
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
    ):
        if save_freq != "epoch" and not (checks.is_int(save_freq) and save_freq >= 1):
            raise ValueError(f"save_freq must be a positive integer or 'epoch', got {save_freq!r}")
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
        self._lock = _Lock(self.directory, self._release) if _primary() else None
        try:
            if self._lock is not None:
                self._set_aside_newer(state)
            _sync("flaxlesson.checkpoint.open")
            self._quiet = contextlib.ExitStack()
            self._quiet.enter_context(_quiet_orbax())
            self._manager = _manager(self.directory, write=True, max_to_keep=max_to_keep)
        except BaseException:
            self._release()
            raise
        self._saved = self.step if self.step in self._manager.all_steps() else None

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
        with _reading(self.directory) as manager:
            if manager is None:
                return
            newer = [step for step in sorted(manager.all_steps()) if step > self.step]
            good, damaged = {}, {}
            for step in newer:
                try:
                    good[step] = _read(manager, step, state)[1]
                except _Damaged as why:
                    damaged[step] = why
            if not good and self.step in manager.all_steps():
                _read(manager, self.step, state)  # another model's checkpoint at the start is refused too
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

    def on_train_begin(self, state: Any) -> None:
        """Check that the fit starts where this callback was made for."""
        if self._manager is None:
            raise CheckpointError("a BackupAndRestore serves one fit; make a new one (resume_or_start) for the next")
        if int(jax.device_get(state.step)) != self.step:
            raise CheckpointError(
                f"the fit starts at train step {int(jax.device_get(state.step))}, this BackupAndRestore was made "
                f"for step {self.step}"
            )

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
        payload = _payload(state)
        if not _finite(payload["params"]):
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
        position = {**dataclasses.asdict(snapshot.position), "checksum": fingerprint(snapshot.payload)}
        iterator = position.pop("iterator")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(snapshot.payload),
            position=ocp.args.JsonSave(position),
            iterator=ocp.args.JsonSave(iterator),
        )
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
        """Turn a failed write into one CheckpointWriteError, after removing its temporary folders."""
        try:
            yield
        except Exception as error:
            failed, self._writing = self._writing, None
            self._release()
            for folder in self.directory.glob(f"{failed}{_TEMPORARY}*"):
                shutil.rmtree(folder, ignore_errors=True)
            kept = steps(self.directory)
            raise CheckpointWriteError(
                f"could not write the checkpoint of train step {failed} in {str(self.directory)!r}: "
                f"{_reason(error)}; its temporary folder is removed, the newest checkpoint there is "
                + (f"step {kept[-1]}" if kept else "none")
            ) from None


class ModelCheckpoint(BackupAndRestore):
    """Keras's ModelCheckpoint as the port keeps it: the train state after every epoch (and where a fit stops)."""

    def __init__(
        self, directory: str | os.PathLike, state: Any, *, initial_epoch: int = 0, max_to_keep: int = 2, seed: int = 0
    ):
        super().__init__(
            directory, state, save_freq="epoch", max_to_keep=max_to_keep, seed=seed, initial_epoch=initial_epoch
        )


def save(directory: str | os.PathLike, state: Any, epoch: int, *, seed: int = 0, max_to_keep: int = 2) -> Path:
    """Save `state` as the checkpoint taken after `epoch` whole epochs, keeping the newest `max_to_keep`; its path.

    Waits for the write. Every process of a multi-process run must call it; process 0 writes.
    """
    checks.non_negative_int("epoch", epoch)
    step = int(jax.device_get(state.step))
    if step in steps(directory):
        raise CheckpointError(f"directory {str(directory)!r} already holds a checkpoint of train step {step}")
    BackupAndRestore(directory, state, max_to_keep=max_to_keep, seed=seed, initial_epoch=epoch).on_train_end({}, state)
    return Path(directory).absolute() / str(step)


def resume_or_start(
    directory: str | os.PathLike | None,
    state: Any,
    *,
    resume: bool = False,
    strategy: Any = None,
    seed: int = 0,
    save_freq: int | str = "epoch",
    max_to_keep: int = 3,
) -> Start:
    """A script's `--checkpoint-dir`/`--resume`/`--save-freq`: the state to train from, where, and fit's callbacks.

    With `resume`, the newest good checkpoint in `directory` (if any; damaged ones are skipped with a WARNING)
    replaces `state`, and the fit starts at its position, mid-epoch included; it must have been trained with this
    `seed`. With a directory, a `BackupAndRestore` saves there every `save_freq` steps. Without one, `state` is
    returned as it is and nothing is saved.
    """
    if directory is None:
        if resume:
            raise ValueError("resume needs a checkpoint directory")
        return Start(state, 0, 0, [])
    _let_go_earlier(Path(directory))
    found = restore_newest(directory, state, strategy=strategy) if resume else None
    position = Position(0, 0, seed)
    if found is not None:
        state, position = found
        if position.seed != seed:
            raise CheckpointError(
                f"directory {str(directory)!r}: its newest checkpoint was trained with seed {position.seed}, this "
                f"run has seed {seed}; a resume must keep the seed (it orders the data and keys the steps)"
            )
        logger.info("Resumed from %s after %s (train step %d)", directory, position.describe(), int(state.step))
    saver = BackupAndRestore(
        directory,
        state,
        save_freq=save_freq,
        max_to_keep=max_to_keep,
        seed=seed,
        initial_epoch=position.epoch,
        initial_step=position.step,
    )
    return Start(state, position.epoch, position.step, [saver])
