"""Train-state checkpoints with orbax: save every epoch, resume, and move a run between device counts.

A checkpoint holds the step, params and optimiser state as host arrays (data-parallel state is replicated, so
one copy is the whole state), numbered by the epochs it has trained. Orbax writes each one into a temporary
directory and renames it when complete, so an interrupted run keeps its last good checkpoint. Restoring checks
the names and shapes against the model at hand and places the arrays the way a strategy's `fit` returns them,
whatever device count the checkpoint was written on.
"""

import logging
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxlesson import checks, parallel
from flaxlesson.callbacks import Callback

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory that does not fit the run: empty, another model's, or one the run would overwrite."""


def _payload(state: Any) -> dict[str, Any]:
    """What is saved of a TrainState: everything that changes during training, as host arrays."""
    return jax.tree.map(
        np.asarray, jax.device_get({"step": state.step, "params": state.params, "opt_state": state.opt_state})
    )


def _manager(directory: str | os.PathLike, *, create: bool, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    """A synchronous orbax manager of one standard pytree item; `create=False` for reading an existing directory."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(
        Path(directory).absolute(), options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def all_epochs(directory: str | os.PathLike) -> list[int]:
    """The epoch counts of the complete checkpoints in `directory` (none when it does not exist)."""
    if not Path(directory).is_dir():
        return []
    manager = _manager(directory, create=False)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def latest_epoch(directory: str | os.PathLike) -> int | None:
    """How many epochs the newest complete checkpoint in `directory` has trained; None if there is none."""
    epochs = all_epochs(directory)
    return epochs[-1] if epochs else None


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


def check_compatible(directory: str | os.PathLike, state: Any, epoch: int | None = None) -> int:
    """Raise CheckpointError unless the checkpoint of `epoch` (the newest by default) fits `state`'s model.

    CheckpointError is a ValueError. Compares every leaf's name and shape, params first; returns the epoch
    checked. Reads only.
    """
    epochs = all_epochs(directory)
    if not epochs:
        raise CheckpointError(f"directory: no complete checkpoint in {str(directory)!r}")
    epoch = epochs[-1] if epoch is None else epoch
    if epoch not in epochs:
        raise CheckpointError(f"epoch: no checkpoint of epoch {epoch} in {str(directory)!r}; there are {epochs}")
    manager = _manager(directory, create=False)
    try:
        saved = _shapes(manager.item_metadata(epoch).tree)
    finally:
        manager.close()
    wanted = _shapes(_payload(state))
    params = _differences(*({k: v for k, v in shapes.items() if k.startswith("params/")} for shapes in (saved, wanted)))
    if params:
        raise CheckpointError(
            f"directory {str(directory)!r} holds another model's state (epoch {epoch}); its params "
            f"differ from this model's:\n  " + "\n  ".join(params)
        )
    rest = _differences(saved, wanted)
    if rest:
        raise CheckpointError(
            f"directory {str(directory)!r} holds this model's params but other optimiser state "
            f"(epoch {epoch}):\n  " + "\n  ".join(rest)
        )
    return epoch


def save(directory: str | os.PathLike, state: Any, epoch: int, *, max_to_keep: int | None = 2) -> Path:
    """Save `state` as the checkpoint of `epoch` trained epochs, keeping the newest `max_to_keep`; returns its path.

    Every process of a multi-process run must call it; process 0 writes.
    """
    checks.non_negative_int("epoch", epoch)
    manager = _manager(directory, create=True, max_to_keep=max_to_keep)
    try:
        manager.save(int(epoch), args=ocp.args.StandardSave(_payload(state)))
        manager.wait_until_finished()
    finally:
        manager.close()
    return Path(directory).absolute() / str(epoch)


def restore(
    directory: str | os.PathLike, state: Any, *, epoch: int | None = None, strategy: Any = None
) -> tuple[Any, int]:
    """`state` with the step, params and optimiser state of a checkpoint, and the epochs that checkpoint trained.

    `state` is the freshly created state of the same model (it gives the tree and checks the checkpoint against
    it). The arrays are placed as `fit(..., strategy=strategy)` returns them, so a checkpoint written on 8 devices
    resumes on 1 and the other way round.
    """
    epoch = check_compatible(directory, state, epoch)
    target = _payload(state)
    manager = _manager(directory, create=False)
    try:
        restored = manager.restore(epoch, args=ocp.args.StandardRestore(target))
    finally:
        manager.close()
    strategy = parallel.get_strategy(strategy)
    restored = strategy.unreplicate(strategy.replicate(restored))
    return state.replace(step=restored["step"], params=restored["params"], opt_state=restored["opt_state"]), epoch


class ModelCheckpoint(Callback):
    """A `fit` callback that saves the train state after every epoch, as Keras's ModelCheckpoint does.

    Made before training starts, it refuses (with a CheckpointError, leaving the directory alone) a directory that
    holds another model's state, or checkpoints past `initial_epoch` that this run would overwrite.
    """

    def __init__(self, directory: str | os.PathLike, state: Any, *, initial_epoch: int = 0, max_to_keep: int = 2):
        checks.positive_int("max_to_keep", max_to_keep)
        checks.non_negative_int("initial_epoch", initial_epoch)
        self.directory, self.max_to_keep = Path(directory), max_to_keep
        if Path(directory).exists() and not Path(directory).is_dir():
            raise CheckpointError(f"directory: {str(directory)!r} is a file, not a directory")
        epochs = all_epochs(directory)
        if epochs:
            check_compatible(directory, state)
        later = [e for e in epochs if e > initial_epoch]
        if later:
            raise CheckpointError(
                f"directory {str(directory)!r} already holds checkpoints of epochs {later}, past "
                f"initial_epoch={initial_epoch}; resume from the newest or use another directory"
            )

    def on_epoch_end(self, epoch: int, logs: dict[str, float], state: Any) -> None:
        """Save the state after `epoch` (0-based), as the checkpoint of `epoch + 1` trained epochs."""
        save(self.directory, state, epoch + 1, max_to_keep=self.max_to_keep)


def resume_or_start(
    directory: str | os.PathLike | None, state: Any, *, resume: bool = False, strategy: Any = None
) -> tuple[Any, int, list[ModelCheckpoint]]:
    """A script's `--checkpoint-dir`/`--resume`: the state to train from, its `initial_epoch`, and fit's callbacks.

    With `resume`, the newest checkpoint in `directory` (if any) replaces `state`; with a directory, every epoch
    is saved there. Without one, `state` is returned as it is and nothing is saved.
    """
    if directory is None:
        if resume:
            raise ValueError("resume needs a checkpoint directory")
        return state, 0, []
    initial_epoch = 0
    if resume and latest_epoch(directory) is not None:
        state, initial_epoch = restore(directory, state, strategy=strategy)
        logger.info("Resumed from %s after epoch %d", directory, initial_epoch)
    return state, initial_epoch, [ModelCheckpoint(directory, state, initial_epoch=initial_epoch)]
