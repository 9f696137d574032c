"""Which run owns a checkpoint folder: the mark naming the run kind that first used it, and the one-run lock.

A checkpoint folder holds only what flaxlesson wrote there: its mark (`MARK_NAME`), the lock (`LOCK_NAME`), the
run's checkpoints, and checkpoints it set aside as damaged. `claim` refuses, before training and touching
nothing, a folder with anything else in it, one marked by another run kind, and symbolic links.
"""

import datetime
import fcntl
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import orbax.checkpoint as ocp

from flaxlesson import store

LOCK_NAME = "run.lock"
"""The file in a checkpoint folder that the run writing there holds (`fcntl.flock`); it names that run."""

MARK_NAME = "flaxlesson.json"
"""The file that marks a checkpoint folder as flaxlesson's and names the run kind that first used it."""

DAMAGED_PREFIX = "damaged."
"""Damaged checkpoints past a run's start are renamed `damaged.<step>.<time>`: out of orbax's sight, kept to look at."""

_HELD: dict[Path, Callable[[], None]] = {}
"""The lock files this process holds, each with how its holder lets go (closing its manager, then the lock)."""


def let_go_earlier(directory: Path) -> None:
    """Make an earlier holder of `directory` in this process finish its writes and let go.

    That holder's fit was cut short by an exception (which skips `on_train_end`); once it has let go, what is read
    in `directory` is final.
    """
    earlier = _HELD.pop((directory / LOCK_NAME).resolve(), None)
    if earlier is not None:
        earlier()


class Lock:
    """A run's hold on a checkpoint folder: `fcntl.flock` on `LOCK_NAME`, which says who holds it.

    The kernel releases it when the process dies, however it dies. Within one process a new holder takes the
    folder over from an earlier one, whose fit has ended or was cut short by an exception (which skips
    `on_train_end`); `let_go` is how this holder is made to let go then.
    """

    def __init__(self, directory: Path, let_go: Callable[[], None]):
        self.path, self.let_go = (directory / LOCK_NAME).resolve(), let_go
        let_go_earlier(directory)
        self.created = not self.path.exists()
        self.file = open(self.path, "a+")  # noqa: SIM115 - held open for the run
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "a process that has not yet written its name"
            self.file.close()
            raise store.CheckpointError(
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

    def abandon(self) -> None:
        """Let go of a folder this run refused, leaving it as it was: without the lock file if this lock made it."""
        if self.created and not self.file.closed:
            self.path.unlink(missing_ok=True)
        self.release()


def _links(directory: Path) -> list[Path]:
    """The symbolic links under `directory`, not followed."""
    found = []
    for root, folders, files in os.walk(directory):
        found += [Path(root, name) for name in folders + files if os.path.islink(os.path.join(root, name))]
    return found


def _kind(directory: Path) -> str | None:
    """The run kind `directory`'s mark names; None when it has no mark."""
    try:
        return str(json.loads((directory / MARK_NAME).read_text())["kind"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise store.CheckpointError(f"directory {str(directory)!r}: its {MARK_NAME} does not read ({error})") from None


def _foreign(directory: Path, marked: bool) -> list[str]:
    """The entries of `directory` that flaxlesson did not write there.

    A marked folder may also hold a killed write's temporary folder and an empty step folder: orbax's own, gone
    when this run saves.
    """
    with store.reading(directory) as manager:
        steps = set(manager.all_steps())
        ours = {str(step) for step in steps if store.is_checkpoint(manager, step)}
        if marked:
            ours |= {str(step) for step in steps if not any((directory / str(step)).iterdir())}
            ours |= set(ocp.path.step.tmp_checkpoints(directory))
    ours |= {LOCK_NAME, MARK_NAME}
    return sorted(p.name for p in directory.iterdir() if p.name not in ours and not p.name.startswith(DAMAGED_PREFIX))


def check(directory: Path, kind: str) -> str | None:
    """Refuse a folder flaxlesson's `kind` runs may not use (CheckpointError, folder untouched); the kind it names.

    Read-only: `resume_or_start` asks before it restores, so a folder of another kind is named as such.
    """
    links = _links(directory)
    if links:
        raise store.CheckpointError(
            f"directory {str(directory)!r} holds a symbolic link, {str(links[0])!r}; a checkpoint folder holds only "
            "the files flaxlesson wrote there: remove the link, or give this run another folder"
        )
    marked = _kind(directory)
    if marked is not None and marked != kind:
        raise store.CheckpointError(
            f"directory {str(directory)!r} holds the checkpoints of a {marked!r} run, not of a {kind!r} run; "
            "give this run another folder"
        )
    foreign = _foreign(directory, marked is not None)
    if foreign:
        shown = ", ".join(map(repr, foreign[:5])) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise store.CheckpointError(
            f"directory {str(directory)!r} holds entries flaxlesson did not write ({shown}); a checkpoint folder "
            "holds only a run's checkpoints: give this run an empty or new folder"
        )
    return marked


def claim(directory: Path, kind: str) -> None:
    """`check` the folder, then mark an unmarked one as `kind`'s. For the lock holder, before training."""
    if check(directory, kind) is None:
        temporary = directory / f".{MARK_NAME}.tmp"
        temporary.write_text(json.dumps({"written_by": "flaxlesson", "kind": kind}) + "\n")
        os.replace(temporary, directory / MARK_NAME)
