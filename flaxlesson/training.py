"""Keras's training front end: `fit`, `evaluate` and `predict` over the pure steps of `core`.

At one step a call, `fit` is the plain JAX loop: for each epoch, for each shuffled batch, `state, totals =
train_step(state, totals, key, data, batch)`, the jitted step of `core.make_train_step`. Around that loop sit the
conveniences: a batch source (`sources`: host arrays, arrays resident on the device(s), a stream), an executor
(`execution`: K steps per compiled call through `lax.scan`, Keras's `steps_per_execution`, with the same update),
callbacks (`callbacks`) at epoch ends and after every call, and a clean stop on SIGINT or SIGTERM after the call in
flight: the fit returns its state and the epochs that finished, and `History.interrupted` names the signal. In a
run of several processes every process must stop after the same call, so SIGTERM is left to JAX's preemption
service (installed by `jax.distributed.initialize`), which passes the notice to every process and agrees on the
call to stop after (`multihost_utils.reached_preemption_sync_point`, asked once per call).
"""

import contextlib
import dataclasses
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

from flaxlesson import batching, checks, core, interrupts, parallel, sources
from flaxlesson.callbacks import Callback, History, LambdaCallback, ProgressBar
from flaxlesson.core import (
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
from flaxlesson.execution import Executor, StepsPerExecution

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


def _check_xy(state: TrainState, x: Any, y: Any | None) -> None:
    """Clear errors for inputs the model or the loss cannot take, before anything compiles."""
    check = getattr(state.model, "check_inputs", None)  # values a traced step cannot check, e.g. sequence lengths
    if check is not None:
        core.apply_inputs(check, x)
    leaves = list(x.values()) if isinstance(x, dict) else [x]
    for leaf in leaves:
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
            raise ValueError("x: inputs must be finite, found NaN or infinity")
    n = batching.num_examples(x)  # at least 1: `_checked` refused an empty source
    sample = jax.tree.map(lambda a: np.asarray(a)[:1], x)
    try:
        out = jax.eval_shape(lambda: core.forward(state, state.params, sample))
    except (flax.errors.ScopeParamShapeError, flax.errors.ScopeParamNotFoundError) as e:
        raise _params_mismatch(state, sample, e) from e
    checks.model_outputs("x", np.shape(sample["x"] if isinstance(sample, dict) else sample)[1:], out.shape)
    if y is None:
        return
    y = np.asarray(y)
    if len(y) != n:
        raise ValueError(f"x and y must have the same number of samples, got {n} and {len(y)}")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        raise ValueError("y: labels must be finite, found NaN or infinity")
    core.get_loss(state.loss).check_labels(y, math.prod(out.shape[1:]))


def _params_mismatch(state: TrainState, sample: Any, error: Exception) -> ValueError:
    """Whom to blame when `state.params` do not fit its model on `sample`: the state, or the inputs x.

    The model is initialised abstractly (`jax.eval_shape`, nothing computed) on `sample`: params of other layers,
    or of more than one other shape, belong to another model; inputs of another shape change only the one kernel
    their trailing axis reaches (the first layer's, or the first Dense after a flatten).
    """
    shape = np.shape(sample["x"] if isinstance(sample, dict) else sample)[1:]
    if state.model is not None:

        def init(inputs: Any, **kwargs: Any) -> Any:
            return state.model.init(jax.random.key(0), inputs, **kwargs)

        wanted = jax.eval_shape(lambda: core.apply_inputs(init, sample))["params"]
        changed = sum(
            np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(wanted), jax.tree.leaves(state.params))
        )
        if jax.tree.structure(wanted) != jax.tree.structure(state.params) or changed > 1:
            return ValueError(
                f"state: its params belong to another model than its {type(state.model).__name__}; pass the "
                f"state that create_train_state made for this model ({error})"
            )
    return ValueError(
        f"x: samples of shape {shape} do not fit the model's parameters, which were initialised on inputs of "
        f"another shape ({error})"
    )


def _checked(state: TrainState, source: sources.Source) -> sources.Source:
    if source.num_examples == 0:
        raise ValueError("x: no samples")
    _check_xy(state, *source.rows_to_check())
    return source


def _layout(source: sources.Source, batch_size: int, strategy: parallel.Strategy) -> batching.Layout:
    """The batch layout of `source` for this strategy: padded to its device count, this process's share.

    A source whose data decides its batch size (an iterable's, a folder dataset's) is cut at that size, as Keras
    takes a dataset's batches whatever fit's `batch_size`.
    """
    return batching.Layout(
        source.num_examples,
        source.batch_size or batch_size,
        strategy.num_replicas,
        strategy.process_index,
        strategy.process_count,
    )


class _RunningLogs(Mapping):
    """The running means of an epoch's totals, read from the device only when a callback looks at them."""

    def __init__(self, totals: Any, strategy: parallel.Strategy):
        self._totals, self._strategy, self._logs = totals, strategy, None

    def _read(self) -> dict[str, float]:
        if self._logs is None:
            self._logs = core.means(jax.device_get(self._strategy.unreplicate(self._totals)))
        return self._logs

    def __getitem__(self, key: str) -> float:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())


def _preemption_service_on(strategy: parallel.Strategy) -> bool:
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
    Where a script records signals for its whole run (`interrupts.whole_run`), the fit reads that record instead.
    """
    if interrupts.shared() is not None:
        yield interrupts.shared()
        return
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


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclasses.dataclass
class _Run:
    """What every epoch of one fit shares: where it runs, what it reads, its compiled calls and its stop signals."""

    strategy: parallel.Strategy
    source: sources.Source
    layout: batching.Layout
    steps_in_epoch: int
    executor: Executor
    train_call: Callable
    key: jax.Array
    callbacks: list[Callback]
    stop: dict[str, str]
    preemption_service: bool = False
    verbose: int = 0
    validation: tuple[sources.Source, batching.Layout, Executor, Callable] | None = None
    executions: int = 0

    def stopping(self) -> bool:
        return bool(self.stop) or any(callback.stop_training for callback in self.callbacks)

    def stopped_by(self) -> str | None:
        return next((type(c).__name__ for c in self.callbacks if c.stop_training), None)

    def replace(self, state: Any, new: Any) -> Any:
        """The state a hook returned, placed for the strategy; the fit's own when it returned None."""
        return state if new is None else self.strategy.replicate(new)

    def validate(self, state: Any) -> dict[str, float]:
        if self.validation is None:
            return {}
        source, layout, executor, call = self.validation
        return {f"val_{name}": value for name, value in executor.totals(call, state, source, layout).items()}


def _train_epoch(run: _Run, state: Any, epoch: int, seed: int, shuffle: bool, skip: int) -> tuple:
    """Train one epoch from step `skip`: (state, its mean loss and accuracy, steps done, training seconds)."""
    progress = ProgressBar(run.steps_in_epoch, enabled=run.verbose == 1)
    start = time.perf_counter()
    totals, done = run.executor.zeros, skip
    step_inputs = run.source.epoch_inputs(run.layout, seed=seed, epoch=epoch, shuffle=shuffle, start_step=skip)
    for inputs, real in run.executor.inputs(itertools.islice(step_inputs, run.steps_in_epoch - skip)):
        state, totals = run.train_call(state, totals, run.key, run.source.data, *inputs)
        done += real
        progress.update(done)
        for callback in run.callbacks:
            logs = callback.on_train_batch_end(
                epoch, done, _RunningLogs(totals, run.strategy), run.strategy.unreplicate(state)
            )
            state = run.replace(state, logs)
        run.executions += 1
        if run.preemption_service and multihost_utils.reached_preemption_sync_point(run.executions):
            run.stop["signal"] = "SIGTERM"
        if run.stopping():
            break
    means = core.means(jax.device_get(run.strategy.unreplicate(totals)))
    progress.close()
    return state, means, done, time.perf_counter() - start


def _checked_counts(
    epochs: int, batch_size: int, initial_epoch: int, initial_step: int, steps_per_epoch: int | None
) -> tuple[int, int, int]:
    """`fit`'s counts checked (ValueError naming the argument): epochs, initial_epoch and initial_step as ints."""
    epochs = checks.positive_int("epochs", epochs)
    if steps_per_epoch is not None:
        checks.positive_int("steps_per_epoch", steps_per_epoch)
    checks.positive_int("batch_size", batch_size)
    initial_epoch = checks.integer("initial_epoch", initial_epoch, low=0, high=epochs)
    return epochs, initial_epoch, checks.non_negative_int("initial_step", initial_step)


def _fit_sources(
    state: TrainState,
    x: Any,
    y: Any,
    validation_split: float,
    validation_data: Any,
    steps_per_epoch: int | None,
    validation_steps: int | None,
) -> tuple[sources.Source, sources.Source, sources.Source | None]:
    """What fit reads, checked: all it was given, the part it trains on, and the held-out part (or None).

    The held-out part is `validation_split`'s last fraction, else `validation_data`.
    """
    given = _checked(state, sources.from_data(x, y, steps=steps_per_epoch))
    train, held_out = given.split(checks.fraction("validation_split", validation_split))
    sources.warn_if_one_class(train, held_out)
    if validation_data is not None and held_out is None:
        held_out = _checked(state, sources.from_validation_data(validation_data, validation_steps))
    return given, train, held_out


def _begin_callbacks(run: _Run, state: TrainState, params: dict[str, Any]) -> None:
    """Give each callback Keras's `params` (plus the data layout) and call its `on_train_begin`."""
    params = {**params, "steps": run.steps_in_epoch, "verbose": run.verbose}
    for callback in run.callbacks:
        callback.set_params(params)
    for callback in run.callbacks:
        callback.on_train_begin(run.strategy.unreplicate(state))


def _check_initial_step(initial_step: int, initial_epoch: int, epochs: int, steps_in_epoch: int) -> None:
    if initial_step and not (initial_epoch < epochs and initial_step < steps_in_epoch):
        raise ValueError(
            f"initial_step must be below the {steps_in_epoch} steps of an epoch, and 0 when no epoch is left to "
            f"train (initial_epoch={initial_epoch}, epochs={epochs}), got {initial_step}"
        )


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
    callbacks: Sequence[Callback] | Callback | None = (),
    steps_per_execution: StepsPerExecution = 1,
    data_on_device: bool | None = None,
    steps_per_epoch: int | None = None,
    validation_steps: int | None = None,
) -> tuple[TrainState, History]:
    """Train as Keras's `model.fit` does; returns the trained state and a `History`.

    `x` and `y` are arrays (or `x` a dict of arrays, e.g. with `seq_lengths`); or `x` alone is a streaming dataset
    (`streaming.StreamingDataset`, an image folder) or any iterable of (x, y) batches (a generator, a grain dataset,
    a torch DataLoader; `len(x)` or `steps_per_epoch` batches an epoch, `validation_steps` for `validation_data`).
    `validation_split` holds out the last fraction before shuffling; every epoch reshuffles (seeded by `seed` and
    the epoch) and trains the last partial batch. `verbose`: 0 silent, 1 a progress bar and a line per epoch, 2 a
    line per epoch, 'auto' 1 on a terminal else 2. `strategy` ('single', 'sharded', 'pmap' or a `parallel` strategy)
    says where the steps run, each with the same update for the same global batch. `initial_epoch`, as in Keras,
    resumes at that epoch, shuffled as in the uninterrupted run; `initial_step` resumes inside it (the steps before
    are not read), so with the state saved there the run ends as the uninterrupted one does.
    `steps_per_execution` (an int, or 'epoch') runs that many steps per compiled call, with the same update.
    `data_on_device` keeps x and y on the device(s); None decides by size (`sources.fits_on_device`).
    """
    x, y, validation_data, callbacks = checks.fit_arguments(
        state,
        x,
        y,
        seed=seed,
        verbose=verbose,
        shuffle=shuffle,
        data_on_device=data_on_device,
        validation_data=validation_data,
        callbacks=callbacks,
        callback_kind=Callback,
    )
    epochs, initial_epoch, initial_step = _checked_counts(
        epochs, batch_size, initial_epoch, initial_step, steps_per_epoch
    )
    given, train, held_out = _fit_sources(
        state, x, y, validation_split, validation_data, steps_per_epoch, validation_steps
    )
    verbose = (1 if sys.stdout.isatty() else 2) if verbose == "auto" else verbose
    strategy = parallel.get_strategy(strategy)
    layout = _layout(train, batch_size, strategy)
    steps_in_epoch = layout.steps if steps_per_epoch is None else min(layout.steps, steps_per_epoch)
    n = min(train.num_examples, steps_in_epoch * layout.batch_size)
    train = train.placed(strategy, data_on_device, epochs - initial_epoch, (epochs - initial_epoch) * n)
    executor = Executor(strategy, steps_per_execution, steps_in_epoch)
    preemption_service = _preemption_service_on(strategy)  # if on, SIGTERM is the service's
    # From here a signal is recorded, not raised: one that comes while compiling stops the fit after its first call.
    with _stop_requests((signal.SIGINT,) if preemption_service else _SIGNALS) as stop, contextlib.closing(train):
        start = time.perf_counter()
        train_call, state, key = _compiled_train_call(state, train, layout, executor, augment, seed)
        history = History(compile_seconds=time.perf_counter() - start)
        run = _Run(strategy, train, layout, steps_in_epoch, executor, train_call, key, callbacks, stop)
        run.preemption_service, run.verbose = preemption_service, verbose
        if held_out is not None:
            run.validation = _validation(
                state.loss, held_out, strategy, batch_size, steps_per_execution, data_on_device
            )
        if callbacks:
            layout_of_data = _data_layout(given, train, validation_split, shuffle, seed, run)
            _begin_callbacks(run, state, {"epochs": epochs, "samples": n, "layout": layout_of_data})
        # After on_train_begin, so that a checkpoint of other data settings is refused for what changed.
        _check_initial_step(initial_step, initial_epoch, epochs, steps_in_epoch)
        state, history = _epochs(run, state, history, range(initial_epoch, epochs), initial_step, seed, shuffle, n)
    return strategy.unreplicate(state), history


def _compiled_train_call(
    state: TrainState,
    train: sources.Source,
    layout: batching.Layout,
    executor: Executor,
    augment: Callable | None,
    seed: int,
) -> tuple[Callable, Any, jax.Array]:
    """The train call compiled for the strategy's devices, with the state and the fit's key placed for it.

    The key is `seed`'s; each step folds its step number into it (augmentation's and dropout's keys, see `core`).
    """
    strategy = executor.strategy
    train_call = executor.train_call(make_train_step(state.loss, axis_name=strategy.axis_name, augment=augment))
    state = strategy.replicate(state)
    key = strategy.replicate(jax.random.key(seed))
    first, _ = next(executor.inputs(iter([train.example_input(layout)])))
    return train_call.lower(state, executor.zeros, key, train.data, *first).compile(), state, key


def _validation(
    loss: str,
    held_out: sources.Source,
    strategy: parallel.Strategy,
    batch_size: int,
    steps_per_execution: StepsPerExecution,
    data_on_device: bool | None,
) -> tuple[sources.Source, batching.Layout, Executor, Callable]:
    """What `_Run.validate` runs at each epoch's end: the placed held-out data, its layout, executor and eval call."""
    held_out = held_out.placed(strategy, data_on_device)
    layout = _layout(held_out, batch_size, strategy)
    executor = Executor(strategy, steps_per_execution, layout.steps)
    return held_out, layout, executor, executor.eval_call(make_eval_step(loss, axis_name=strategy.axis_name))


def _data_layout(
    given: sources.Source,
    train: sources.Source,
    validation_split: float,
    shuffle: bool,
    seed: int,
    run: _Run,
) -> dict[str, Any]:
    """What a checkpoint's data position depends on: the data, how it is split and batched, and by how many.

    The fingerprint reads rows, so `fit` asks for this only when a callback will look.
    """
    return {
        "num_examples": given.num_examples,
        "batch_size": run.layout.batch_size,
        "validation_split": float(validation_split),
        "shuffle": bool(shuffle),
        "seed": seed,
        "steps_per_epoch": run.steps_in_epoch,
        "process_count": run.strategy.process_count,
        "data": sources.fingerprint(train),
    }


def _epochs(
    run: _Run, state: Any, history: History, epochs: range, initial_step: int, seed: int, shuffle: bool, n: int
) -> tuple[Any, History]:
    """The epoch loop of `fit`: train, validate, report and call back each epoch until the last or a stop."""
    logs: dict[str, float] = {}
    for epoch in epochs:
        for callback in run.callbacks:
            callback.on_epoch_begin(epoch, run.strategy.unreplicate(state))
        skip = initial_step if epoch == epochs.start else 0
        start = time.perf_counter()
        state, logs, done, train_seconds = _train_epoch(run, state, epoch, seed, shuffle, skip)
        samples = n - skip * run.layout.batch_size  # the skipped steps are whole batches
        if done < run.steps_in_epoch:
            history.interrupted, history.stopped_by = run.stop.get("signal"), run.stopped_by()
            break
        logs |= run.validate(state)
        if run.verbose:
            metrics = " - ".join(f"{name}: {value:.4f}" for name, value in logs.items())
            print(
                f"Epoch {epoch + 1}/{epochs.stop} - {time.perf_counter() - start:.2f}s - "
                f"{samples / train_seconds:,.0f} samples/s - {metrics}",
                flush=True,
            )
        for callback in run.callbacks:
            state = run.replace(state, callback.on_epoch_end(epoch, logs, run.strategy.unreplicate(state)))
        history.append(epoch, logs, time.perf_counter() - start, samples / train_seconds)
        if run.stopping():
            if epoch + 1 < epochs.stop:
                history.interrupted, history.stopped_by = run.stop.get("signal"), run.stopped_by()
            break
    for callback in run.callbacks:
        state = run.replace(state, callback.on_train_end(logs, run.strategy.unreplicate(state)))
    return state, history


def evaluate(
    state: TrainState,
    x: Any,
    y: np.ndarray | None = None,
    *,
    batch_size: int = 32,
    strategy: parallel.Strategy | str | None = None,
    steps_per_execution: StepsPerExecution = 1,
    data_on_device: bool | None = None,
    steps: int | None = None,
) -> dict[str, float]:
    """Keras's `model.evaluate`: mean loss and accuracy over (x, y), a streaming dataset or an iterable of batches.

    `steps`: the batches to read from an iterable without a length (e.g. a generator).
    """
    x, y = checks.evaluate_arguments(state, x, y, data_on_device=data_on_device)
    checks.positive_int("batch_size", batch_size)
    source = _checked(state, sources.from_data(x, y, steps=steps, steps_name="steps"))
    if not source.has_labels:
        raise ValueError("y: evaluate needs the labels of x")
    strategy = parallel.get_strategy(strategy)
    source = source.placed(strategy, data_on_device)
    layout = _layout(source, batch_size, strategy)
    executor = Executor(strategy, steps_per_execution, layout.steps)
    call = executor.eval_call(make_eval_step(state.loss, axis_name=strategy.axis_name))
    with contextlib.closing(source):
        return executor.totals(call, strategy.replicate(state), source, layout)


def predict(
    state: TrainState,
    x: Any,
    *,
    batch_size: int = 32,
    strategy: parallel.Strategy | str | None = None,
    steps_per_execution: StepsPerExecution = 1,
    data_on_device: bool | None = None,
    steps: int | None = None,
) -> np.ndarray:
    """Keras's `model.predict`: output probabilities (softmax or sigmoid), one row per sample.

    `x` as `evaluate` takes it (labels in it are not read); `steps` as there.
    """
    x = checks.predict_arguments(state, x, data_on_device=data_on_device)
    checks.positive_int("batch_size", batch_size)
    source = _checked(state, sources.from_data(x, steps=steps, steps_name="steps"))
    strategy = parallel.get_strategy(strategy)
    source = source.placed(strategy, data_on_device)
    layout = _layout(source, batch_size, strategy)
    executor = Executor(strategy, steps_per_execution, layout.steps)
    call = executor.predict_call(make_predict_step(state.loss))
    state = strategy.replicate(state)
    rows = []
    with contextlib.closing(source):
        for inputs, _ in executor.inputs(source.epoch_inputs(layout)):
            outputs = executor.gather_rows(call(state, source.data, *inputs))
            rows.append(outputs[executor.gather_rows(inputs[0]["mask"]) > 0])
    return np.concatenate(rows)
