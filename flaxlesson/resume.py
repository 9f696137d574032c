"""A script's `--checkpoint-dir`/`--resume`/`--save-freq`: the state to train from, where, and fit's callbacks."""

import logging
import os
from pathlib import Path
from typing import Any, NamedTuple

from flaxlesson import ownership, store
from flaxlesson.callbacks import Callback
from flaxlesson.checkpoint import BackupAndRestore

logger = logging.getLogger("flaxlesson.checkpoint")  # the name users filter on for checkpoint warnings


class Start(NamedTuple):
    """What `fit` needs to start or resume a run: `fit(state, ..., initial_epoch=, initial_step=, callbacks=)`."""

    state: Any
    initial_epoch: int
    initial_step: int
    callbacks: list[Callback]


def resume_or_start(
    directory: str | os.PathLike | None,
    state: Any,
    *,
    resume: bool = False,
    strategy: Any = None,
    seed: int = 0,
    save_freq: int | str = "epoch",
    max_to_keep: int = 3,
    kind: str = "fit",
) -> Start:
    """The state to train from, where in the data, and the `BackupAndRestore` that saves in `directory`.

    With `resume`, the newest good checkpoint in `directory` (if any; damaged ones are skipped with a WARNING)
    replaces `state`, and the fit starts at its position, mid-epoch included; it must have been trained with this
    `seed` and the fit's data laid out as it was (checked when the fit begins). A `directory` that does not exist
    is refused then: there is nothing to resume. Without a directory, `state` is returned as it is and nothing is
    saved. `kind` names the run kind the folder serves (a script's name).
    """
    if directory is None:
        if resume:
            raise ValueError("resume needs a checkpoint directory")
        return Start(state, 0, 0, [])
    if resume and not Path(directory).is_dir():
        raise store.CheckpointError(
            f"{str(directory)!r} does not exist, so there is nothing to resume; drop the resume to start afresh there"
        )
    ownership.let_go_earlier(Path(directory))
    if Path(directory).is_dir():
        ownership.check(Path(directory), kind)
    found = store.restore_newest(directory, state, strategy=strategy) if resume else None
    position = store.Position(0, 0, seed)
    if found is not None:
        state, position = found
        if position.seed != seed:
            raise store.CheckpointError(
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
        kind=kind,
    )
    return Start(state, position.epoch, position.step, [saver])
