"""Keras's callbacks: hooks a fit calls around its epochs and compiled calls, and the `History` it returns.

A hook gets the train state as the fit has it at that point (valid until the fit's next call, whose step donates
its buffers); `on_train_batch_end`, `on_epoch_end` and `on_train_end` may return a new state (restored weights,
another learning rate), which the fit then trains on or returns. Setting `stop_training` ends the fit cleanly
after the current call: it returns its state and the epochs that finished.

Keras's own callbacks, with Keras 3's arguments, defaults and decisions (read from keras/src/callbacks/):
`EarlyStopping`, `ReduceLROnPlateau`, `TerminateOnNaN`, `CSVLogger` and `TensorBoard` (event files written by
tensorboardX, no TensorFlow). Where they differ from Keras, it is to fail clearly: an unknown `mode` raises at
construction (Keras warns and falls back to 'auto'), and a monitor missing from the logs raises at the epoch end
that lacks it, naming the logs there are (Keras warns and skips the epoch).
"""

import csv
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from flaxlesson import checks, core, parallel

State = Any
Logs = Mapping[str, float]
logger = logging.getLogger(__name__)


class Callback:
    """Keras's `Callback`: subclass it and override the hooks you need; each does nothing by default."""

    stop_training: bool = False
    params: Mapping[str, Any] = {}

    def set_params(self, params: Mapping[str, Any]) -> None:
        """Keras's `set_params`: the fit's settings, given before `on_train_begin`.

        'epochs', 'steps' (per epoch), 'verbose' as in Keras, and 'samples' (training samples per epoch).
        """
        self.params = dict(params)

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

    `interrupted` names the signal that stopped the fit early ('SIGINT', 'SIGTERM'); `stopped_by` the callback that
    ended it early (e.g. 'EarlyStopping'), a normal end of training. Both are None when it ran to the end.
    """

    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    epoch: list[int] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    samples_per_second: list[float] = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0
    interrupted: str | None = None
    stopped_by: str | None = None

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
            "stopped_by": self.stopped_by,
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


# Keras 3 resolves mode 'auto' from the monitored metric's own direction (`MonitorCallback._set_monitor_op`): a
# name that is 'loss' after removing 'val_' is minimised, and a compiled metric goes its `_direction`. These are
# Keras's metric names with a direction; the fit's logs hold 'loss' and 'accuracy' (and their 'val_' forms).
_MAXIMISED = frozenset(
    {
        "accuracy",
        "acc",
        "binary_accuracy",
        "categorical_accuracy",
        "sparse_categorical_accuracy",
        "top_k_categorical_accuracy",
        "sparse_top_k_categorical_accuracy",
        "auc",
        "precision",
        "recall",
        "f1_score",
        "fbeta_score",
        "r2_score",
        "cosine_similarity",
        "pearson_correlation",
        "concordance_correlation",
    }
)
_MINIMISED = frozenset(
    {
        "loss",
        "binary_crossentropy",
        "categorical_crossentropy",
        "sparse_categorical_crossentropy",
        "mean_squared_error",
        "mean_absolute_error",
        "mean_absolute_percentage_error",
        "mean_squared_logarithmic_error",
        "root_mean_squared_error",
        "logcosh",
        "hinge",
        "squared_hinge",
        "categorical_hinge",
    }
)


def monitor_mode(monitor: str, mode: str) -> str:
    """'min' or 'max' for `monitor` under `mode` ('auto', 'min' or 'max'), as Keras 3 decides it.

    'auto' minimises a loss and maximises an accuracy (a name without 'val_'); a name whose direction Keras
    could not infer raises, as Keras does, asking for mode 'min' or 'max'.
    """
    checks.one_of("mode", mode, ("auto", "min", "max"))
    if mode != "auto":
        return mode
    name = monitor.removeprefix("val_")
    if name in _MINIMISED or name in _MAXIMISED:
        return "min" if name in _MINIMISED else "max"
    raise ValueError(
        f"monitor: cannot tell whether {monitor!r} should be minimised or maximised (mode 'auto' knows losses and "
        f"Keras's metrics such as accuracy); pass mode='min' or mode='max'"
    )


class _MonitorCallback(Callback):
    """Keras's `MonitorCallback`: a monitored quantity, its direction, and Keras's test of an improvement."""

    def __init__(self, monitor: str, mode: str, min_delta: float):
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a name in the fit's logs, e.g. 'val_loss', got {monitor!r}")
        self.monitor, self.mode = monitor, mode
        self.monitor_mode = monitor_mode(monitor, mode)
        self.min_delta = abs(_number("min_delta", min_delta))
        self.best: float | None = None

    def _current(self, logs: Mapping[str, float]) -> float:
        """The monitored value in `logs`; a name the logs lack raises, naming those they hold."""
        if self.monitor not in logs:
            raise ValueError(
                f"monitor: {type(self).__name__} watches {self.monitor!r}, which is not in the logs; they hold "
                f"{sorted(logs)}"
                + (" (val_ figures need validation_split or validation_data)" if "val_" in self.monitor else "")
            )
        return float(logs[self.monitor])

    def _is_improvement(self, value: float, reference: float | None) -> bool:
        """Keras's test, in float32 as Keras's `ops.less`/`ops.greater` compare Python floats."""
        if reference is None:
            return True
        if self.monitor_mode == "min":
            return bool(np.float32(value + self.min_delta) < np.float32(reference))
        return bool(np.float32(value - self.min_delta) > np.float32(reference))


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def print_message(message: str) -> None:
    """A callback's `verbose` message, printed to stdout as Keras's `io_utils.print_msg` does (not logged)."""
    print(message, flush=True)


def _device_copy(tree: Any) -> Any:
    """A copy of `tree` in new buffers where it lies, which the fit's next (donating) call cannot take."""
    return jax.tree.map(
        lambda a: jax.device_put(a, a.sharding, may_alias=False) if isinstance(a, jax.Array) else a, tree
    )


class EarlyStopping(_MonitorCallback):
    """Keras's `EarlyStopping`: stop when `monitor` has not improved for `patience` epochs.

    Keras 3's decisions for the same monitored values: an improvement beats the best by more than `min_delta`
    (compared in float32); `wait` counts epochs since the last one and resets only when the value also beats
    `baseline`; the fit stops at the end of an epoch > 0 once `wait >= patience`; epochs before
    `start_from_epoch` are not monitored. With `restore_best_weights`, the params (and BatchNorm's batch_stats)
    at the end of the best epoch (a host copy, taken at each improvement) replace the final ones at the end of
    training, as Keras 3 does whether or not it stopped early. `stopped_epoch` and `best_epoch` are 0-based, as in
    Keras.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ):
        super().__init__(monitor, mode, min_delta)
        self.patience = checks.non_negative_int("patience", patience)
        self.verbose = checks.non_negative_int("verbose", verbose)
        self.baseline = None if baseline is None else _number("baseline", baseline)
        self.restore_best_weights = bool(restore_best_weights)
        self.start_from_epoch = checks.non_negative_int("start_from_epoch", start_from_epoch)
        self.on_train_begin(None)

    def on_train_begin(self, state: State) -> None:
        self.wait, self.stopped_epoch, self.best_epoch = 0, 0, 0
        self.best, self.best_weights, self.stop_training = None, None, False
        self.best_batch_stats = None  # BatchNorm's running statistics, restored with the params as Keras's weights

    def on_epoch_end(self, epoch: int, logs: dict[str, float], state: State) -> None:
        current = self._current(logs)
        if epoch < self.start_from_epoch:
            return
        self.wait += 1
        if self._is_improvement(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = parallel.host_copy(state.params)
                self.best_batch_stats = parallel.host_copy(getattr(state, "batch_stats", None))
            if self.baseline is None or self._is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch, self.stop_training = epoch, True

    def on_train_end(self, logs: dict[str, float], state: State) -> State | None:
        if self.stopped_epoch > 0 and self.verbose > 0:
            print_message(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if not (self.restore_best_weights and self.best_weights is not None):
            return None
        if self.verbose > 0:
            print_message(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
        if self.best_batch_stats:
            return state.replace(params=self.best_weights, batch_stats=self.best_batch_stats)
        return state.replace(params=self.best_weights)


class ReduceLROnPlateau(_MonitorCallback):
    """Keras's `ReduceLROnPlateau`: multiply the learning rate by `factor` after `patience` epochs without gain.

    Keras 3's decisions: logs['learning_rate'] gets the rate the epoch trained with (so History records it); an
    improvement beats the best by more than `min_delta`; during `cooldown` epochs after a reduction nothing
    counts; a reduction happens only while the rate is above `min_lr`, to max(rate * factor, min_lr). The rate
    lives in the optimiser state (`core.keras_adam`), so changing it needs no recompile.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ):
        super().__init__(monitor, mode, min_delta)
        self.factor = _number("factor", factor)
        if not 0 <= self.factor < 1:
            raise ValueError(f"factor: ReduceLROnPlateau needs a factor in [0, 1), got {factor!r}")
        self.patience = checks.non_negative_int("patience", patience)
        self.verbose = checks.non_negative_int("verbose", verbose)
        self.cooldown = checks.non_negative_int("cooldown", cooldown)
        self.min_lr = _number("min_lr", min_lr)
        if self.min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {min_lr!r}")
        self.on_train_begin(None)

    def on_train_begin(self, state: State) -> None:
        if state is not None and core.learning_rate(state) is None:
            raise ValueError(
                "state: ReduceLROnPlateau needs the learning rate in the optimiser state; build the optimiser with "
                "core.keras_adam or optax.inject_hyperparams"
            )
        self.best, self.cooldown_counter, self.wait, self.stop_training = None, 0, 0, False

    def in_cooldown(self) -> bool:
        """Whether the epochs after a reduction are still being waited out."""
        return self.cooldown_counter > 0

    def on_epoch_end(self, epoch: int, logs: dict[str, float], state: State) -> State | None:
        rate = core.learning_rate(state)
        logs["learning_rate"] = rate
        current = self._current(logs)
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self._is_improvement(current, self.best):
            self.best, self.wait = current, 0
            return None
        if self.in_cooldown():
            return None
        self.wait += 1
        if self.wait < self.patience or not np.float32(rate) > np.float32(self.min_lr):
            return None
        new_rate = max(rate * self.factor, self.min_lr)
        if self.verbose > 0:
            print_message(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new_rate}.")
        self.cooldown_counter, self.wait = self.cooldown, 0
        return core.set_learning_rate(state, new_rate)


class TerminateOnNaN(Callback):
    """Keras's `TerminateOnNaN`: stop at the first compiled call whose running loss is NaN or infinite.

    The fit then returns the state at the end of the previous call: the last one whose loss was finite (the
    weights the bad step started from). The train step donates its state, so keeping that state costs one
    extra copy of the train state in device memory, refreshed after every call (a device-to-device copy, no
    transfer to the host), plus reading the loss after every call. With `steps_per_execution=K` the check and
    the returned state are per call of K steps. `raise_error=True` raises a RuntimeError instead, as in Keras 3.
    """

    def __init__(self, raise_error: bool = False):
        self.raise_error = bool(raise_error)
        self.last_finite: State | None = None

    def on_train_begin(self, state: State) -> None:
        self.stop_training, self.last_finite = False, None

    def on_epoch_begin(self, epoch: int, state: State) -> None:
        self.last_finite = _device_copy(state)

    def on_train_batch_end(self, epoch: int, step: int, logs: Logs, state: State) -> State | None:
        loss = float(logs["loss"])
        if math.isfinite(loss):
            self.last_finite = _device_copy(state)
            return None
        message = f"Epoch {epoch + 1}, step {step}: invalid loss {loss}, terminating training"
        if self.raise_error:
            raise RuntimeError(message)
        logger.warning("%s; returning the state after the last finite step", message)
        self.stop_training = True
        return self.last_finite


class CSVLogger(Callback):
    """Keras's `CSVLogger`: one row per epoch, columns 'epoch' (0-based) then the logs' keys, sorted.

    As Keras 3: the columns are fixed by the first epoch's logs; when those hold no 'val_' key, the 'val_' form
    of every key is added too (written 'NA' while missing); `append=True` adds to an existing file, writing the
    header only when the file was empty. Put it after callbacks that add to the logs (e.g. ReduceLROnPlateau).
    """

    def __init__(self, filename: str | os.PathLike, separator: str = ",", append: bool = False):
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"separator must be one character, got {separator!r}")
        self.filename, self.separator, self.append = os.fspath(filename), separator, bool(append)
        self.keys: list[str] | None = None
        self._file = self._writer = None
        self._header = True

    def on_train_begin(self, state: State) -> None:
        header = not (self.append and os.path.exists(self.filename) and os.path.getsize(self.filename) > 0)
        self.close()
        self._file = open(self.filename, "a" if self.append else "w", newline="")
        self.keys, self._writer, self._header = None, None, header

    def on_epoch_end(self, epoch: int, logs: dict[str, float], state: State) -> None:
        if self.keys is None:
            self.keys = sorted(logs)
            if self.keys and not any(key.startswith("val_") for key in self.keys):
                self.keys += [f"val_{key}" for key in self.keys]
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=["epoch", *self.keys], delimiter=self.separator)
            if self._header:
                self._writer.writeheader()
        self._writer.writerow({"epoch": epoch, **{key: logs.get(key, "NA") for key in self.keys}})
        self._file.flush()

    def on_train_end(self, logs: dict[str, float], state: State) -> None:
        self.close()

    def close(self) -> None:
        """Close the file, if open."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        self._writer = None


class TensorBoard(Callback):
    """Keras's `TensorBoard` callback's scalars, in event files TensorBoard reads, written without TensorFlow.

    As Keras 3: `log_dir/train` gets 'epoch_loss', 'epoch_accuracy' and 'epoch_learning_rate' (the optimiser's
    rate when the epoch ends) at step `epoch`, `log_dir/validation` the 'val_' figures under the same tags.
    Also 'epoch_samples_per_second' (training samples over the epoch's training time, validation excluded).
    `update_freq=N` (or 'batch', N=1) also writes 'batch_loss' and 'batch_accuracy' (the epoch's running means)
    at every N-th global step, counted as `epoch * steps_per_epoch + step`; with `steps_per_execution=K` at the
    end of each call that reaches a multiple of N. Those are read and written at the epoch's end, so logging every
    step does not make each step wait for the device.
    """

    def __init__(self, log_dir: str | os.PathLike = "logs", update_freq: str | int = "epoch"):
        update_freq = checks.count_or_epoch("update_freq (or 'batch')", 1 if update_freq == "batch" else update_freq)
        self.log_dir, self.update_freq = os.fspath(log_dir), update_freq
        self._writers: dict[str, Any] = {}
        self._epoch_start, self._trained_at, self._global = 0.0, None, 0
        self._pending: list[tuple[int, Logs]] = []

    def on_train_begin(self, state: State) -> None:
        # Imported here: tensorboardX (protobuf) loads only when a fit writes event files.
        from tensorboardX import SummaryWriter

        self.close()
        self._writers = {name: SummaryWriter(os.path.join(self.log_dir, name)) for name in ("train", "validation")}

    def on_epoch_begin(self, epoch: int, state: State) -> None:
        self._epoch_start = time.perf_counter()
        self._trained_at = None
        self._global = epoch * self.params.get("steps", 0)

    def on_train_batch_end(self, epoch: int, step: int, logs: Logs, state: State) -> None:
        steps_per_epoch = self.params.get("steps")
        if step == steps_per_epoch:
            float(logs["loss"])  # waits for the epoch's last call, so the time below is the training time
            self._trained_at = time.perf_counter()
        if self.update_freq == "epoch":
            return
        now = epoch * (steps_per_epoch or 0) + step
        if now // self.update_freq > self._global // self.update_freq:
            self._pending.append((now, logs))
        self._global = now

    def _write_pending(self) -> None:
        """Write the batch scalars held since the last epoch end: read only now, so no step waited for them."""
        for now, logs in self._pending:
            for name, value in logs.items():
                self._writers["train"].add_scalar(f"batch_{name}", value, now)
        self._pending = []

    def on_epoch_end(self, epoch: int, logs: dict[str, float], state: State) -> None:
        self._write_pending()
        train = {key: value for key, value in logs.items() if not key.startswith("val_")}
        rate = core.learning_rate(state)
        if rate is not None:
            train["learning_rate"] = rate
        if self._trained_at is not None and "samples" in self.params:
            train["samples_per_second"] = self.params["samples"] / (self._trained_at - self._epoch_start)
        for name, figures in (("train", train), ("validation", {k[4:]: v for k, v in logs.items() if k[:4] == "val_"})):
            for key, value in figures.items():
                self._writers[name].add_scalar(f"epoch_{key}", value, epoch)
            self._writers[name].flush()

    def on_train_end(self, logs: dict[str, float], state: State) -> None:
        if self._writers:
            self._write_pending()
        self.close()

    def close(self) -> None:
        """Close the event files, if open."""
        for writer in self._writers.values():
            writer.close()
        self._writers = {}
