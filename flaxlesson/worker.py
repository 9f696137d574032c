"""The launched side of `flaxlesson.launch`: which attempt a process is in, and the heartbeat its launcher watches.

Standard library only, so a process pays nothing to import it. `launch.launch_local` sets these variables in
every process it starts:

- `FLAXLESSON_RESTART`: the attempt, 0 for the first run and k for the k-th restart of the whole group. A script
  that saves checkpoints should resume from its newest one when this is above 0 (`restart_attempt() > 0`).
- `FLAXLESSON_HEARTBEAT_FD` and `FLAXLESSON_HEARTBEAT_SECONDS`: the write end of a pipe to the launcher and how
  often to write to it. `start_heartbeat`, which a launched script calls as it starts (experiments/distributed.py
  does, before `parallel.initialize`), writes a byte that often from a daemon thread; a process that stops writing
  (stopped by SIGSTOP, frozen) is named by the launcher and the group is stopped. A process that never starts its
  heartbeat is watched by its exit and the launch timeout alone.
"""

import os
import threading
import time

ENV_RESTART = "FLAXLESSON_RESTART"
ENV_HEARTBEAT_FD = "FLAXLESSON_HEARTBEAT_FD"
ENV_HEARTBEAT_SECONDS = "FLAXLESSON_HEARTBEAT_SECONDS"
_THREAD_NAME = "flaxlesson-heartbeat"


def restart_attempt() -> int:
    """The attempt this process is part of: 0 on the first run (or outside a launcher), k on the k-th restart."""
    value = os.environ.get(ENV_RESTART, "")
    if not value:
        return 0
    if not value.isdigit():
        raise ValueError(f"{ENV_RESTART} must be a non-negative integer, got {value!r}")
    return int(value)


def _beat(fd: int, every: float) -> None:
    try:
        while True:
            os.write(fd, b".")
            time.sleep(every)
    except OSError:  # the launcher is gone; this process dies with it
        return


def start_heartbeat() -> bool:
    """Start writing the launcher's heartbeat (once per process); False when no launcher asked for one."""
    fd, every = os.environ.get(ENV_HEARTBEAT_FD, ""), os.environ.get(ENV_HEARTBEAT_SECONDS, "")
    if not fd or not every:
        return False
    if any(thread.name == _THREAD_NAME for thread in threading.enumerate()):
        return True
    try:
        fd_number, seconds = int(fd), float(every)
        os.set_inheritable(fd_number, False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{ENV_HEARTBEAT_FD}={fd!r} and {ENV_HEARTBEAT_SECONDS}={every!r}: {error}") from None
    threading.Thread(target=_beat, args=(fd_number, seconds), name=_THREAD_NAME, daemon=True).start()
    return True
