"""A thin store of checkpoints over orbax's public API: save, restore, the steps there are, the newest good one.

A checkpoint holds the train state (step, params, optimiser state, as host arrays: data-parallel state is
replicated, so one copy is the whole state) and the data position (`Position`), numbered by the train step. Each
carries the sha256 of its arrays, checked when read, so a torn or changed checkpoint is skipped, not trusted.
"""

import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flaxlesson import checks, parallel

logger = logging.getLogger("flaxlesson.checkpoint")  # the name users filter on for checkpoint warnings

ITEMS = ("state", "position")
"""The items of every checkpoint: the train state's arrays, and the data position as JSON."""


class CheckpointError(ValueError):
    """A checkpoint folder that does not fit the run: empty, another model's, held by another run, or unwritable."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (a full disk, a folder gone); the checkpoints before it are kept."""


@dataclasses.dataclass(frozen=True)
class Position:
    """Where in the data a checkpoint was taken: `epoch` whole epochs and `step` steps of the next one trained.

    `seed` shuffles every epoch and keys every step, so it and the train step fix the rest of the run; `layout` is
    the fit's data layout (`Callback.params["layout"]`: rows, batch size, validation split, ...), None when the fit
    gave none. A resume with another layout is refused.
    """

    epoch: int
    step: int
    seed: int
    layout: Mapping[str, Any] | None = None

    def describe(self) -> str:
        """'3 epochs' or '2 epochs and 5 steps'."""
        return f"{self.epoch} epochs" + (f" and {self.step} steps" if self.step else "")


def fingerprint(tree: Any) -> str:
    """sha256 (hex) of the bytes of every array in `tree`, in tree order: equal fingerprints mean bit-equal arrays.

    `fingerprint(state.params)` is what experiments report as `params_fingerprint`.
    """
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def payload(state: Any) -> dict[str, Any]:
    """What is saved of a TrainState: everything that changes during training (BatchNorm's batch_stats too), on host.

    A copy, because the fit's next call donates the state's buffers while the checkpoint is still being written.
    """
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    if getattr(state, "batch_stats", None):  # BatchNorm's running statistics; absent for a model without them
        tree["batch_stats"] = state.batch_stats
    return jax.tree.map(lambda leaf: np.array(leaf, copy=True), jax.device_get(jax.tree.map(jnp.asarray, tree)))


def finite(params: Any) -> bool:
    """Whether every float in `params` is finite."""
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


class Damaged(Exception):
    """A checkpoint that cannot be trusted; the message says why."""


@contextlib.contextmanager
def _without_orbax_records(level: int) -> Iterator[None]:
    """Drop orbax's absl log records at `level` and up while the block runs.

    orbax 0.12.8 logs through absl (no level of its own to set) a failed write at ERROR and a damaged step at
    WARNING before raising; the store reports each failure itself, once.
    """
    package = os.path.dirname(ocp.__file__)
    noise = logging.Filter()
    noise.filter = lambda record: record.levelno < level or not record.pathname.startswith(package)
    logging.getLogger("absl").addFilter(noise)
    try:
        yield
    finally:
        logging.getLogger("absl").removeFilter(noise)


@contextlib.contextmanager
def _without_closed_loop_reports() -> Iterator[None]:
    """Ignore tensorstore 0.1.86's unraisable 'Event loop is closed' after a failed write (its futures outlive it)."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


@contextlib.contextmanager
def quiet(level: int = logging.ERROR) -> Iterator[None]:
    """While orbax works for the store: the two library noises above silenced."""
    with _without_orbax_records(level), _without_closed_loop_reports():
        yield


class Manager(ocp.CheckpointManager):
    """Orbax's manager of one checkpoint folder, with the items `ITEMS`."""

    def reached_preemption(self, step: int) -> bool:
        """Never: orbax 0.12.8's `save` asks JAX's preemption service even with force=True; `training.fit` asks it.

        The service keeps the last counter it was given; orbax would give it train steps (from its save thread, too)
        and move the fit's call counter, so the processes could miss the call they agreed to stop after.
        """
        return False


def open_manager(directory: Path, *, write: bool = False, max_to_keep: int | None = None) -> Manager:
    """A manager that writes asynchronously (every process of a run makes it), or one that reads for this process."""
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=write,
        read_only=not write,
        cleanup_tmp_directories=write,
        enable_async_checkpointing=write,
        save_root_metadata=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions() if write else alone,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "position": ocp.JsonCheckpointHandler()}
    return Manager(directory.absolute(), options=options, item_handlers=handlers)


@contextlib.contextmanager
def reading(directory: str | os.PathLike) -> Iterator[Manager | None]:
    """A read-only manager of `directory` for the block, or None when there is no such folder."""
    directory = Path(directory)
    if not directory.is_dir():
        yield None
        return
    with quiet(logging.WARNING):
        manager = open_manager(directory)
        try:
            yield manager
        finally:
            manager.close()


def is_checkpoint(manager: Manager, step: int) -> bool:
    """Whether orbax's step metadata says step `step` was written with this store's items (damaged or not).

    A folder orbax did not write has empty step metadata; one whose metadata names items that no longer read is
    a damaged checkpoint.
    """
    try:
        return "state" in manager.metadata(step).item_handlers
    except Exception:  # noqa: BLE001 - orbax's metadata with items that do not read: a damaged checkpoint
        return True


def save_args(snapshot_payload: dict[str, Any], position: Position) -> ocp.args.Composite:
    """The orbax arguments that save `snapshot_payload` at `position`, with the checksum of its arrays."""
    saved = {**dataclasses.asdict(position), "checksum": fingerprint(snapshot_payload)}
    saved["layout"] = None if position.layout is None else dict(position.layout)
    return ocp.args.Composite(state=ocp.args.StandardSave(snapshot_payload), position=ocp.args.JsonSave(saved))


def _position(saved: Mapping[str, Any]) -> Position:
    return Position(saved["epoch"], saved["step"], saved["seed"], saved.get("layout"))


def read(manager: Manager, step: int, state: Any) -> tuple[dict[str, Any], Position]:
    """The payload and position of checkpoint `step`, checked against `state`'s model and against its own checksum.

    CheckpointError when it holds another model's state; Damaged when it cannot be trusted.
    """
    where = f"checkpoint {manager.directory / str(step)}"
    try:
        metadata = manager.item_metadata(step)["state"]
    except Exception as error:  # noqa: BLE001 - any failure to read means a checkpoint not to trust
        raise Damaged(f"its metadata cannot be read ({reason(error)})") from None
    if metadata is None:
        raise Damaged("it holds no train state")
    target = payload(state)
    _check_compatible(_shapes(metadata.tree), _shapes(target), where)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore())
    try:
        restored = manager.restore(step, args=args)
        position, checksum = _position(restored["position"]), restored["position"]["checksum"]
    except Exception as error:  # noqa: BLE001 - any failure to read means a checkpoint not to trust
        raise Damaged(f"it cannot be read ({reason(error)})") from None
    if fingerprint(restored["state"]) != checksum:
        raise Damaged("its arrays differ from the checksum written with them")
    return restored["state"], position


def reason(error: BaseException) -> str:
    """One line saying why an orbax or tensorstore call failed."""
    text = str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC or "No space left on device" in text:
        return "no space left on the device"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def newest_good(
    manager: Manager, state: Any, wanted: Callable[[Position], bool] | None = None
) -> tuple[int, dict[str, Any], Position] | tuple[None, None, None]:
    """The newest checkpoint that reads back whole (among those `wanted(position)` accepts), skipping damaged ones.

    Each damaged checkpoint is named in a WARNING, and so is each write that never completed (a process killed
    while writing leaves its temporary folder, which the next run that saves here removes). CheckpointError if
    one holds another model's state.
    """
    for name in sorted(ocp.path.step.tmp_checkpoints(manager.directory)):
        logger.warning("Skipping unfinished checkpoint %s: its write never completed", manager.directory / name)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            found, position = read(manager, step, state)
        except Damaged as why:
            logger.warning("Skipping damaged checkpoint %s: %s", manager.directory / str(step), why)
            continue
        if wanted is None or wanted(position):
            return step, found, position
    return None, None, None


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The train steps of the complete checkpoints in `directory` (none when it does not exist); unverified."""
    with reading(directory) as manager:
        return [] if manager is None else sorted(manager.all_steps())


def read_position(directory: str | os.PathLike, step: int) -> Position | None:
    """The position saved with checkpoint `step` in `directory`, None when it does not read; arrays unverified.

    Read with orbax's JSON handler, which starts no JAX backend (scripts check before `parallel.initialize`).
    """
    try:
        with quiet(logging.WARNING):
            return _position(ocp.JsonCheckpointHandler().restore(Path(directory, str(step), "position")))
    except Exception:  # noqa: BLE001 - a position that does not read is skipped, as on resume
        return None


def latest_position(directory: str | os.PathLike) -> Position | None:
    """The position of the newest checkpoint in `directory` whose position reads, None if none; arrays unverified.

    For checks before training (resuming past the epochs asked); `resume_or_start` verifies what it resumes.
    """
    directory = Path(directory)
    found = ocp.path.step.checkpoint_steps(directory) if directory.is_dir() else []
    positions = (read_position(directory, step) for step in sorted(found, reverse=True))
    return next((position for position in positions if position is not None), None)


def place(state: Any, found: dict[str, Any], strategy: Any) -> Any:
    """`state` with a checkpoint's arrays, placed as `fit(..., strategy=strategy)` returns them."""
    strategy = parallel.get_strategy(strategy)
    found = strategy.unreplicate(strategy.replicate(found))
    extra = {"batch_stats": found["batch_stats"]} if "batch_stats" in found else {}
    return state.replace(step=found["step"], params=found["params"], opt_state=found["opt_state"], **extra)


def restore_newest(directory: str | os.PathLike, state: Any, *, strategy: Any = None) -> tuple[Any, Position] | None:
    """`state` with the newest good checkpoint's arrays, and where in the data it was taken; None if there is none.

    `state` is the freshly created state of the same model: it gives the tree, and a checkpoint of another model
    is refused (CheckpointError). Damaged checkpoints are skipped with a WARNING each. The arrays are placed as
    `fit(..., strategy=strategy)` returns them, so a checkpoint written on 8 devices resumes on 1 and back.
    """
    with reading(directory) as manager:
        if manager is None:
            return None
        step, found, position = newest_good(manager, state)
    return None if step is None else (place(state, found, strategy), position)


def restore(
    directory: str | os.PathLike, state: Any, *, epoch: int | None = None, strategy: Any = None
) -> tuple[Any, int]:
    """`state` with the newest good checkpoint taken at an epoch's end (or at the end of `epoch`), and its epochs.

    As `restore_newest`, for whole epochs (what `ModelCheckpoint` writes); CheckpointError when there is none.
    """
    if epoch is not None:
        checks.non_negative_int("epoch", epoch)
    with reading(directory) as manager:
        found = (None, None, None)
        if manager is not None:
            found = newest_good(manager, state, lambda p: p.step == 0 and epoch in (None, p.epoch))
    step, arrays, position = found
    if step is None:
        wanted = "no complete checkpoint" if epoch is None else f"no good checkpoint of epoch {epoch}"
        raise CheckpointError(f"directory: {wanted} in {str(directory)!r}")
    return place(state, arrays, strategy), position.epoch
