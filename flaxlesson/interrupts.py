"""One record of the stop signals (SIGINT, SIGTERM) a whole run received, shared by a script and `training.fit`.

Alone, `fit` records a signal only while it runs (and stops after its call in flight). A script that wraps its
whole run in `whole_run` records the first signal from then until it exits: `fit` reads that same record rather
than installing handlers of its own, so one Ctrl-C is one stop wherever it comes (while loading, training,
evaluating or plotting), and the script finishes what it can and exits as the signal asks. The second signal
calls `on_second`, which is how a script exits at once.
"""

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_record: dict[str, str] | None = None


def shared() -> dict[str, str] | None:
    """The record of the run's stop signals while `whole_run` is in force ({'signal': name} once one came)."""
    return _record


@contextlib.contextmanager
def whole_run(on_second: Callable[[signal.Signals], None]) -> Iterator[dict[str, str]]:
    """Record the first of `STOP_SIGNALS` to arrive; a second one calls `on_second(signal)`. Main thread only."""
    global _record
    if threading.current_thread() is not threading.main_thread() or _record is not None:
        yield {} if _record is None else _record
        return
    record: dict[str, str] = {}

    def handler(signum: int, frame: Any) -> None:
        if "signal" in record:
            on_second(signal.Signals(signum))
        record.setdefault("signal", signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    _record = record
    try:
        yield record
    finally:
        _record = None
        for sig, old in previous.items():
            signal.signal(sig, old)
