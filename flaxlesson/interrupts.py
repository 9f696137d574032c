"""One record of the stop signals (SIGINT, SIGTERM) a whole run received, shared by a script and `training.fit`.

Alone, `fit` records a signal only while it runs (and stops after its call in flight). A script that wraps its
whole run in `whole_run` records the first signal from then until it exits: `fit` reads that same record rather
than installing handlers of its own, so one Ctrl-C is one stop wherever it comes (while loading, training,
evaluating or plotting), and the script finishes what it can and exits as the signal asks. The second signal
calls `on_second`, which is how a script exits at once.

Python runs a signal's handler only between bytecodes, so during a long compiled call two signals would reach
it as one, late. The count is kept instead by a thread reading `signal.set_wakeup_fd`'s pipe, to which the C
handler writes one byte per signal as it arrives: the second is acted on at once, whatever the main thread does.
"""

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_record: dict[str, str] | None = None


def shared() -> dict[str, str] | None:
    """The record of the run's stop signals while `whole_run` is in force ({'signal': name} once one came)."""
    return _record


def _count(read_fd: int, on_second: Callable[[signal.Signals], None]) -> None:
    """Read the signal numbers the C handler writes; call `on_second` at the second stop signal. Ends at EOF."""
    seen = 0
    while chunk := os.read(read_fd, 64):
        for number in chunk:
            if number in STOP_SIGNALS:
                seen += 1
                if seen == 2:
                    on_second(signal.Signals(number))
    os.close(read_fd)


@contextlib.contextmanager
def whole_run(on_second: Callable[[signal.Signals], None]) -> Iterator[dict[str, str]]:
    """Record the first of `STOP_SIGNALS` to arrive; a second one calls `on_second(signal)`. Main thread only."""
    global _record
    if threading.current_thread() is not threading.main_thread() or _record is not None:
        yield {} if _record is None else _record
        return
    record: dict[str, str] = {}

    def handler(signum: int, frame: Any) -> None:
        record.setdefault("signal", signal.Signals(signum).name)

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block on it
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_count, args=(read_fd, on_second), name="flaxlesson-signals", daemon=True).start()
    _record = record
    try:
        yield record
    finally:
        _record = None
        signal.set_wakeup_fd(previous_wakeup)
        for sig, old in previous.items():
            signal.signal(sig, old)
        os.close(write_fd)  # the counting thread reads EOF, closes its end and ends
