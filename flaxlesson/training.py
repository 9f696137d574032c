"""Keras's training front end: `fit`, `evaluate` and `predict` over the pure steps of `steps`.

A fit composes three parts: a batch source (`sources`: host arrays, or arrays resident on the device(s) where only
each epoch's index order travels), an executor (K steps per compiled call through `lax.scan`, Keras's
`steps_per_execution`), and callbacks (`callbacks`) at epoch ends and after every call. Every combination gives
the update of the plain one-step loop over the same global batches. SIGINT and SIGTERM stop a fit cleanly after
the call in flight: it returns its state and the epochs that finished, and `History.interrupted` names the signal. In a
run of several processes every process must stop after the same call, so SIGTERM is left to JAX's preemption
service (installed by `jax.distributed.initialize`), which passes the notice to every process and agrees on the
call to stop after (`multihost_utils.reached_preemption_sync_point`, asked once per call).
"""

import contextlib
import itertools
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxlesson import batching, checks, parallel, sources, steps
from flaxlesson.callbacks import Callback, History, LambdaCallback, ProgressBar
from flaxlesson.steps import (
    Loss,
    TrainState,
    create_train_state,
    get_loss,
    keras_adam,
    make_eval_step,
    make_predict_step,
    make_train_step,
    zero_totals,
)

__all__ = [
    "Callback",
    "History",
    "LambdaCallback",
    "Loss",
    "TrainState",
    "create_train_state",
    "evaluate",
    "fit",
    "get_loss",
    "keras_adam",
    "make_eval_step",
    "make_predict_step",
    "make_train_step",
    "predict",
    "zero_totals",
]

StepsPerExecution = int | str


def _check_model_inputs(state: TrainState, x: Any) -> None:
    """Run the model's own `check_inputs(x, **kwargs)` on the whole input when it defines one.

    Values such as sequence lengths can only be checked on the host: inside the jitted step they are tracers.
    """
    check = getattr(getattr(state.apply_fn, "__self__", None), "check_inputs", None)
    if check is not None:
        steps.apply_inputs(check, x)


def _check_xy(state: TrainState, x: Any, y: Any | None) -> None:
    """Clear errors for inputs the model or the loss cannot take."""
    _check_model_inputs(state, x)
    leaves = list(x.values()) if isinstance(x, dict) else [x]
    for leaf in leaves:
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
            raise ValueError("x: inputs must be finite, found NaN or infinity")
    n = batching.num_examples(x)
    if n == 0:
        raise ValueError("x: no samples")
    sample = jax.tree.map(lambda a: np.asarray(a)[:1], x)
    try:
        out = jax.eval_shape(lambda: steps.forward(state, state.params, sample))
    except flax.errors.ScopeParamShapeError as e:
        shape = np.shape(x["x"] if isinstance(x, dict) else x)[1:]
        raise ValueError(
            f"x: samples of shape {shape} do not fit the model's parameters, which were initialised "
            f"on inputs of another shape ({e})"
        ) from e
    if y is None:
        return
    y = np.asarray(y)
    if len(y) != n:
        raise ValueError(f"x and y must have the same number of samples, got {n} and {len(y)}")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        raise ValueError("y: labels must be finite, found NaN or infinity")
    steps.get_loss(state.loss).check_labels(y, math.prod(out.shape[1:]))


def _check_data(state: TrainState, x: Any, y: Any | None) -> None:
    """`_check_xy` for arrays; for a streaming dataset (which holds its labels), its first row."""
    if not isinstance(x, sources.Streamable):
        _check_xy(state, x, y)
        return
    if y is not None:
        raise ValueError("y: a streaming dataset carries its own labels; pass y=None")
    if x.num_examples == 0:
        raise ValueError("x: no samples")
    sample = x.take(np.arange(1))
    _check_xy(state, sample["x"], sample["y"])


def _pair(data: Any) -> tuple[Any, Any]:
    """Validation data as (x, y): a streaming dataset stands for both."""
    return (data, None) if isinstance(data, sources.Streamable) else tuple(data)


def _means(sums: Mapping[str, Any]) -> dict[str, float]:
    """Mean loss and accuracy over the real samples of running totals."""
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}


class _RunningLogs(Mapping):
    """The running means of an epoch's totals, read from the device only when a callback looks at them."""

    def __init__(self, totals: Any, strategy: parallel.Strategy):
        self._totals, self._strategy, self._logs = totals, strategy, None

    def _read(self) -> dict[str, float]:
        if self._logs is None:
            self._logs = _means(jax.device_get(self._strategy.unreplicate(self._totals)))
        return self._logs

    def __getitem__(self, key: str) -> float:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


class _Executor:
    """Compiled calls of K steps for one strategy: the placed `count` of real steps of each call, and zero totals.

    K is `steps_per_execution` for an epoch of `steps` steps. The counts and zeros are placed once and reused (the
    calls do not donate them), so an epoch run as one call moves nothing to the device but its inputs.
    """

    def __init__(self, strategy: parallel.Strategy, steps_per_execution: StepsPerExecution, steps: int):
        self.strategy, self._counts = strategy, {}
        self.k = sources.steps_per_call(steps_per_execution, steps)
        self.zeros = strategy.replicate(zero_totals())

    def count(self, n: int) -> Any:
        if n not in self._counts:
            self._counts[n] = self.strategy.replicate(np.int32(n))
        return self._counts[n]

    def calls(self, inputs: Iterator[batching.Batch]) -> Iterator[tuple[Any, Any, int]]:
        """(placed inputs, placed count, real steps) of each call over `inputs`."""
        for stacked, n in sources.calls(inputs, self.k):
            yield self.strategy.shard_steps(stacked), self.count(n), n


def _source(
    x: Any, y: np.ndarray | None, strategy: parallel.Strategy, data_on_device: bool | None, epochs: int = 1
) -> sources.ArraySource | sources.StreamSource:
    """The batch source for (x, y): a stream read for `epochs` epochs, arrays resident when asked or when they fit."""
    if isinstance(x, sources.Streamable):
        if data_on_device:
            raise ValueError("data_on_device: a streaming dataset is read from the host as it trains")
        return sources.StreamSource(x, strategy, epochs=epochs)
    resident = sources.fits_on_device(x, y, strategy) if data_on_device is None else bool(data_on_device)
    return sources.ArraySource(x, y, strategy, resident=resident)


def _run_totals(
    executor: _Executor, call: Callable, state: Any, source: sources.ArraySource | sources.StreamSource, batch_size: int
) -> dict[str, float]:
    """Run a compiled totals-accumulating call over one pass of `source`; mean loss and accuracy."""
    totals = executor.zeros
    for inputs, count, _ in executor.calls(source.epoch_inputs(batch_size)):
        totals = call(state, totals, source.data, inputs, count)
    return _means(jax.device_get(executor.strategy.unreplicate(totals)))


def _agreed_stops(strategy: parallel.Strategy) -> bool:
    """Whether SIGTERM is left to JAX's preemption service: a strategy over several processes, with the service on."""
    if strategy.process_count == 1:
        return False
    try:
        multihost_utils.reached_preemption_sync_point(0)
    except RuntimeError:  # the service is off (jax_enable_preemption_service)
        return False
    return True


@contextlib.contextmanager
def _stop_requests(signals: tuple[signal.Signals, ...]) -> Iterator[dict[str, str]]:
    """While a fit runs, record the first of `signals` (SIGINT, SIGTERM) to arrive (the fit stops after its call).

    A second SIGINT raises KeyboardInterrupt as usual. Only the main thread takes signals; elsewhere nothing changes.
    """
    requests: dict[str, str] = {}
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def handler(signum: int, frame: Any) -> None:
        if "signal" in requests and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requests["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield requests
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _as_callbacks(callbacks: Sequence[Callback]) -> list[Callback]:
    for i, callback in enumerate(callbacks):
        if not isinstance(callback, Callback):
            raise ValueError(
                f"callbacks[{i}] must be a callbacks.Callback (wrap a function in "
                f"LambdaCallback(on_epoch_end=fn)), got {type(callback).__name__}"
            )
    return list(callbacks)


def fit(
    state: TrainState,
    x: Any,
    y: np.ndarray | None = None,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    initial_epoch: int = 0,
    initial_step: int = 0,
    validation_split: float = 0.0,
    validation_data: tuple[Any, np.ndarray] | sources.Streamable | None = None,
    shuffle: bool = True,
    seed: int = 0,
    verbose: int | str = "auto",
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    strategy: parallel.Strategy | str | None = None,
    callbacks: Sequence[Callback] = (),
    steps_per_execution: StepsPerExecution = 1,
    data_on_device: bool | None = None,
    steps_per_epoch: int | None = None,
) -> tuple[TrainState, History]:
    """Train as Keras's `model.fit` does; returns the trained state and a `History`.

    `x` and `y` are arrays (or `x` a dict of arrays, e.g. with `seq_lengths`), or `x` is a streaming dataset
    (`streaming.StreamingDataset`, labels included, `y` None) read from disk as it trains.
    `validation_split` holds out the last fraction before shuffling; every epoch reshuffles (seeded by `seed`
    and the epoch) and trains the last partial batch. `verbose`: 0 silent, 1 a progress bar and a line per
    epoch, 2 a line per epoch, 'auto' 1 on a terminal else 2. `callbacks` are `callbacks.Callback`s.
    `strategy` ('single', 'sharded', 'pmap' or a `parallel` strategy object) says where the steps run; each gives
    the same update for the same global batch. `initial_epoch`, as in Keras, resumes a run: epochs
    `initial_epoch` .. `epochs - 1` are trained, each shuffled as it would have been in the uninterrupted run.
    `initial_step` resumes inside epoch `initial_epoch`: its order is drawn again from (`seed`, epoch) and its
    first `initial_step` steps are skipped, so with the state saved there the run ends as the uninterrupted one
    does; that epoch's History entry (loss, accuracy, samples/s) then covers only the steps this fit ran.
    `steps_per_execution` (an int, or 'epoch') runs that many steps per compiled call, with the same update.
    `data_on_device` keeps x and y on the device(s), moving only each epoch's index order; None decides by size
    (`sources.RESIDENT_SHARE` of one device's memory). `steps_per_epoch` (Keras's) cuts each epoch to its first
    that many steps, e.g. to train a fixed number of steps on a large streamed set.
    """
    epochs = checks.positive_int("epochs", epochs)
    if steps_per_epoch is not None:
        checks.positive_int("steps_per_epoch", steps_per_epoch)
    checks.positive_int("batch_size", batch_size)
    initial_epoch = checks.integer("initial_epoch", initial_epoch, low=0, high=epochs)
    initial_step = checks.non_negative_int("initial_step", initial_step)
    _check_data(state, x, y)
    callbacks = _as_callbacks(callbacks)
    if isinstance(x, sources.Streamable):
        x, split = x.split(checks.fraction("validation_split", validation_split))
    else:
        y = np.asarray(y)
        (x, y), split = batching.train_validation_split(x, y, validation_split)
    if validation_split:
        validation_data = split
    if validation_data is not None:
        validation_data = _pair(validation_data)
        _check_data(state, *validation_data)
    verbose = (1 if sys.stdout.isatty() else 2) if verbose == "auto" else verbose
    strategy = parallel.get_strategy(strategy)
    source = _source(x, y, strategy, data_on_device, epochs - initial_epoch)
    total_steps = batching.num_batches(source.num_examples, batch_size)
    if steps_per_epoch is not None:
        total_steps = min(total_steps, steps_per_epoch)
    n = min(source.num_examples, total_steps * batch_size)
    if initial_step and not (initial_epoch < epochs and initial_step < total_steps):
        raise ValueError(
            f"initial_step must be below the {total_steps} steps of an epoch, and 0 when no epoch is left to "
            f"train (initial_epoch={initial_epoch}, epochs={epochs}), got {initial_step}"
        )
    executor = _Executor(strategy, steps_per_execution, total_steps)
    agreed = _agreed_stops(strategy)
    calls = 0
    signals = (signal.SIGINT,) if agreed else (signal.SIGINT, signal.SIGTERM)
    # From here a signal is recorded, not raised: one that comes while compiling stops the fit after its first call.
    with _stop_requests(signals) as stop, contextlib.closing(source):
        train_call = strategy.compile(
            steps.scan_train_step(make_train_step(state.loss, axis_name=strategy.axis_name, augment=augment)),
            donate_argnums=(0,),
        )
        state = strategy.replicate(state)
        key = strategy.replicate(jax.random.key(seed))
        first, count, _ = next(executor.calls(iter([source.example_input(batch_size)])))
        start = time.perf_counter()
        train_call = train_call.lower(state, executor.zeros, key, source.data, first, count).compile()
        history = History(compile_seconds=time.perf_counter() - start)
        val_source = val_call = None
        if validation_data is not None:
            val_source = _source(*validation_data, strategy, data_on_device)
            val_call = strategy.compile(steps.scan_eval_step(make_eval_step(state.loss, axis_name=strategy.axis_name)))
            val_executor = _Executor(
                strategy, steps_per_execution, batching.num_batches(val_source.num_examples, batch_size)
            )

        logs: dict[str, float] = {}
        for callback in callbacks:
            callback.set_params({"epochs": epochs, "steps": total_steps, "samples": n, "verbose": verbose})
        for callback in callbacks:
            callback.on_train_begin(strategy.unreplicate(state))
        for epoch in range(initial_epoch, epochs):
            for callback in callbacks:
                callback.on_epoch_begin(epoch, strategy.unreplicate(state))
            progress = ProgressBar(total_steps, enabled=verbose == 1)
            start = time.perf_counter()
            skip = initial_step if epoch == initial_epoch else 0
            totals, done = executor.zeros, skip
            epoch_inputs = source.epoch_inputs(batch_size, seed=seed, epoch=epoch, shuffle=shuffle)
            for inputs, count, real in executor.calls(itertools.islice(epoch_inputs, skip, total_steps)):
                state, totals = train_call(state, totals, key, source.data, inputs, count)
                done += real
                progress.update(done)
                state = _batch_end(callbacks, epoch, done, _RunningLogs(totals, strategy), state, strategy)
                calls += 1
                if agreed and multihost_utils.reached_preemption_sync_point(calls):
                    stop["signal"] = "SIGTERM"
                if stop or _stopping(callbacks):
                    break
            sums = jax.device_get(strategy.unreplicate(totals))
            train_seconds = time.perf_counter() - start
            samples = n - skip * batch_size  # the skipped steps are whole batches
            progress.close()
            if done < total_steps:
                history.interrupted, history.stopped_by = stop.get("signal"), _stopper(callbacks)
                break
            logs = _means(sums)
            if val_source is not None:
                val = _run_totals(val_executor, val_call, state, val_source, batch_size)
                logs |= {f"val_{name}": value for name, value in val.items()}
            if verbose:
                metrics = " - ".join(f"{name}: {value:.4f}" for name, value in logs.items())
                print(
                    f"Epoch {epoch + 1}/{epochs} - {time.perf_counter() - start:.2f}s - "
                    f"{samples / train_seconds:,.0f} samples/s - {metrics}",
                    flush=True,
                )
            for callback in callbacks:
                state = _replace(state, callback.on_epoch_end(epoch, logs, strategy.unreplicate(state)), strategy)
            history.append(epoch, logs, time.perf_counter() - start, samples / train_seconds)
            if stop or _stopping(callbacks):
                if epoch + 1 < epochs:
                    history.interrupted, history.stopped_by = stop.get("signal"), _stopper(callbacks)
                break
        for callback in callbacks:
            state = _replace(state, callback.on_train_end(logs, strategy.unreplicate(state)), strategy)
    return strategy.unreplicate(state), history


def _replace(state: Any, new: Any, strategy: parallel.Strategy) -> Any:
    """The state a hook returned, placed for the strategy; the fit's own when it returned None."""
    return state if new is None else strategy.replicate(new)


def _batch_end(
    callbacks: list[Callback], epoch: int, done: int, logs: Mapping, state: Any, strategy: parallel.Strategy
) -> Any:
    for callback in callbacks:
        state = _replace(state, callback.on_train_batch_end(epoch, done, logs, strategy.unreplicate(state)), strategy)
    return state


def _stopping(callbacks: list[Callback]) -> bool:
    return any(callback.stop_training for callback in callbacks)


def _stopper(callbacks: list[Callback]) -> str | None:
    return next((type(c).__name__ for c in callbacks if c.stop_training), None)


def evaluate(
    state: TrainState,
    x: Any,
    y: np.ndarray | None = None,
    *,
    batch_size: int = 32,
    strategy: parallel.Strategy | str | None = None,
    steps_per_execution: StepsPerExecution = 1,
    data_on_device: bool | None = None,
) -> dict[str, float]:
    """Keras's `model.evaluate`: mean loss and accuracy over (x, y), or over a streaming dataset."""
    checks.positive_int("batch_size", batch_size)
    _check_data(state, x, y)
    if y is None and not isinstance(x, sources.Streamable):
        raise ValueError("y: evaluate needs the labels of x")
    strategy = parallel.get_strategy(strategy)
    source = _source(x, None if y is None else np.asarray(y), strategy, data_on_device)
    executor = _Executor(strategy, steps_per_execution, batching.num_batches(source.num_examples, batch_size))
    call = strategy.compile(steps.scan_eval_step(make_eval_step(state.loss, axis_name=strategy.axis_name)))
    return _run_totals(executor, call, strategy.replicate(state), source, batch_size)


def predict(
    state: TrainState,
    x: Any,
    *,
    batch_size: int = 32,
    strategy: parallel.Strategy | str | None = None,
    steps_per_execution: StepsPerExecution = 1,
    data_on_device: bool | None = None,
) -> np.ndarray:
    """Keras's `model.predict`: output probabilities (softmax or sigmoid), one row per sample."""
    checks.positive_int("batch_size", batch_size)
    _check_data(state, x, None)
    strategy = parallel.get_strategy(strategy)
    source = _source(x, None, strategy, data_on_device)
    executor = _Executor(strategy, steps_per_execution, batching.num_batches(source.num_examples, batch_size))
    call = strategy.compile(steps.scan_predict_step(make_predict_step(state.loss)))
    state = strategy.replicate(state)
    rows = []
    for inputs, count, _ in executor.calls(source.epoch_inputs(batch_size)):
        outputs = strategy.gather_rows(call(state, source.data, inputs, count))
        rows.append(outputs[strategy.gather_rows(inputs["mask"]) > 0])
    return np.concatenate(rows)
