"""Keras's callbacks: hooks a fit calls around its epochs and compiled calls, and the `History` it returns.

A hook gets the train state as the fit has it at that point (valid until the fit's next call, whose step donates
its buffers); `on_train_batch_end`, `on_epoch_end` and `on_train_end` may return a new state (restored weights,
another learning rate), which the fit then trains on or returns. Setting `stop_training` ends the fit cleanly
after the current call: it returns its state and the epochs that finished.
"""

import dataclasses
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

State = Any
Logs = Mapping[str, float]


class Callback:
    """Keras's `Callback`: subclass it and override the hooks you need; each does nothing by default."""

    stop_training: bool = False

    def on_train_begin(self, state: State) -> None:
        """Before the first epoch."""

    def on_epoch_begin(self, epoch: int, state: State) -> None:
        """Before epoch `epoch` (0-based)."""

    def on_train_batch_end(self, epoch: int, step: int, logs: Logs, state: State) -> State | None:
        """After each compiled call: `step` steps of `epoch` are done; `logs` are the running means so far.

        With `steps_per_execution=K` this runs once per K steps, as in Keras. Reading `logs` waits for the
        device; a callback that does not read them costs nothing.
        """

    def on_epoch_end(self, epoch: int, logs: dict[str, float], state: State) -> State | None:
        """After epoch `epoch` with its training (and validation) means; callbacks may add entries to `logs`."""

    def on_train_end(self, logs: dict[str, float], state: State) -> State | None:
        """After the last epoch, or when the fit stops early; `logs` are the last epoch's."""


class LambdaCallback(Callback):
    """Keras's `LambdaCallback`: a callback from plain functions, e.g. `LambdaCallback(on_epoch_end=fn)`."""

    def __init__(
        self,
        on_train_begin: Callable | None = None,
        on_epoch_begin: Callable | None = None,
        on_train_batch_end: Callable | None = None,
        on_epoch_end: Callable | None = None,
        on_train_end: Callable | None = None,
    ):
        for name, fn in locals().items():
            if name != "self" and fn is not None:
                setattr(self, name, fn)


@dataclasses.dataclass
class History:
    """What Keras's `fit` returns: `history[key]` per epoch; also each epoch's seconds and training speed.

    `interrupted` names what stopped the fit before its last epoch ('SIGINT', 'SIGTERM' or a callback's class),
    None when it ran to the end.
    """

    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    epoch: list[int] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    samples_per_second: list[float] = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0
    interrupted: str | None = None

    def append(self, epoch: int, logs: Mapping[str, float], seconds: float, samples_per_second: float) -> None:
        """Record one finished epoch."""
        self.epoch.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)
        self.seconds.append(seconds)
        self.samples_per_second.append(samples_per_second)

    def summary(self) -> dict[str, Any]:
        """The figures every experiment reports of a fit: curves, speed (median epoch; None if none ran), times."""
        return {
            "history": self.history,
            "train_samples_per_second": float(np.median(self.samples_per_second)) if self.epoch else None,
            "samples_per_second_per_epoch": self.samples_per_second,
            "train_seconds": float(np.sum(self.seconds)),
            "compile_seconds": self.compile_seconds,
            "interrupted": self.interrupted,
        }


class ProgressBar:
    """A Keras-like progress bar on a terminal, updated after each compiled call; silent elsewhere and when short."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and sys.stdout.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        """Show `done` of `total` steps, at most five times a second."""
        now = time.perf_counter()
        if not self.enabled or now - self.start < 1.0 or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        filled = int(30 * done / self.total)
        sys.stdout.write(f"\r{done}/{self.total} [{'=' * filled}{'.' * (30 - filled)}] - {now - self.start:.0f}s")
        sys.stdout.flush()

    def close(self) -> None:
        """Clear the bar's line, if it was drawn."""
        if self.enabled and self.last > self.start:
            sys.stdout.write("\r\033[K")
