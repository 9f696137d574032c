"""One training core for every model: `TrainState`, the step builders, and Keras-style fit/evaluate/predict.

Models return logits. A loss name (Keras's) picks the per-example loss, the accuracy and the output activation.
The steps are pure functions of (state, running totals, batch); a strategy from `parallel` compiles them and
places their inputs, so the same step serves one device, a sharded mesh and pmap. Batches have one fixed size
and a mask, so the last partial batch trains without a second compile.
"""

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from flaxlesson import data, parallel

Totals = dict[str, jax.Array]
Callback = Callable[[int, dict[str, float], "TrainState"], None]


@dataclasses.dataclass(frozen=True)
class Loss:
    """A Keras loss name's per-example loss on logits, its accuracy, and the output activation."""

    per_example: Callable[[jax.Array, jax.Array], jax.Array]
    correct: Callable[[jax.Array, jax.Array], jax.Array]
    probabilities: Callable[[jax.Array], jax.Array]
    check_labels: Callable[[np.ndarray, int], None]


def _check_class_labels(y: np.ndarray, num_classes: int) -> None:
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y: sparse_categorical_crossentropy needs integer class labels, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"y: labels must lie in [0, {num_classes}) for a model with {num_classes} outputs, "
            f"got values from {y.min()} to {y.max()}"
        )


def _check_binary_labels(y: np.ndarray, num_outputs: int) -> None:
    if num_outputs != 1:
        raise ValueError(f"binary_crossentropy needs a model with 1 output, got {num_outputs}")
    if y.ndim not in (1, 2) or y.shape[1:] not in ((), (1,)):
        raise ValueError(f"y: binary labels must have shape (samples,) or (samples, 1), got {y.shape}")
    if y.size and (np.min(y) < 0 or np.max(y) > 1):
        raise ValueError(f"y: binary labels must lie in [0, 1], got values from {np.min(y)} to {np.max(y)}")


def _binary_per_example(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Sigmoid crossentropy of one logit per sample, shape (batch,), for labels of shape (batch,) or (batch, 1)."""
    return optax.sigmoid_binary_cross_entropy(logits.reshape(y.shape[0]), y.reshape(y.shape[0]))


def _binary_correct(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Keras's binary accuracy: probability above 0.5 (logit above 0) against label above 0.5, shape (batch,)."""
    return ((logits.reshape(y.shape[0]) > 0) == (y.reshape(y.shape[0]) > 0.5)).astype(jnp.float32)


LOSSES: dict[str, Loss] = {
    "sparse_categorical_crossentropy": Loss(
        per_example=optax.softmax_cross_entropy_with_integer_labels,
        correct=lambda logits, y: (jnp.argmax(logits, -1) == y).astype(jnp.float32),
        probabilities=nn.softmax,
        check_labels=_check_class_labels,
    ),
    "binary_crossentropy": Loss(
        per_example=_binary_per_example,
        correct=_binary_correct,
        probabilities=nn.sigmoid,
        check_labels=_check_binary_labels,
    ),
}


def get_loss(name: str) -> Loss:
    """The `Loss` for a Keras loss name."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name]


def keras_adam(learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """Keras's `Adam()` defaults: lr 1e-3, betas 0.9/0.999, epsilon 1e-7 (optax's default epsilon is 1e-8)."""
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-7)


class TrainState(train_state.TrainState):
    """Flax's TrainState, plus the Keras loss name that fixes the model's output activation."""

    loss: str = struct.field(pytree_node=False, default="sparse_categorical_crossentropy")


def create_train_state(
    model: nn.Module,
    sample_x: Any,
    *,
    seed: int = 0,
    loss: str = "sparse_categorical_crossentropy",
    optimizer: optax.GradientTransformation | None = None,
) -> TrainState:
    """Initialise `model` on a sample input with PRNG key `seed`; Adam as Keras has it unless told otherwise."""
    get_loss(loss)
    params = _apply_inputs(lambda x, **kw: model.init(jax.random.key(seed), x, **kw), sample_x)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=optimizer or keras_adam(), loss=loss)


def _apply_inputs(fn: Callable, x: Any) -> Any:
    """Call `fn` on model inputs: an array, or a dict whose 'x' is the array and the rest keyword arguments."""
    if isinstance(x, dict):
        rest = {k: v for k, v in x.items() if k != "x"}
        return fn(x["x"], **rest)
    return fn(x)


def _logits(state: TrainState, params: Any, x: Any) -> jax.Array:
    return _apply_inputs(lambda inputs, **kw: state.apply_fn({"params": params}, inputs, **kw), x)


def zero_totals() -> Totals:
    """Running sums of loss, correct predictions and real samples over an epoch."""
    return {"loss": jnp.zeros(()), "correct": jnp.zeros(()), "count": jnp.zeros(())}


def _reducer(axis_name: str | None) -> Callable:
    """Identity on one program; a sum over the pmap axis when there is one."""
    return (lambda tree: tree) if axis_name is None else (lambda tree: jax.lax.psum(tree, axis_name))


def _add_totals(totals: Totals, losses: jax.Array, correct: jax.Array, mask: jax.Array, reduce: Callable) -> Totals:
    batch = reduce({"loss": losses.sum(), "correct": (correct * mask).sum(), "count": mask.sum()})
    return jax.tree.map(jnp.add, totals, batch)


def make_train_step(
    loss: str,
    *,
    axis_name: str | None = None,
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Callable:
    """`train_step(state, totals, batch, key) -> (state, totals)`: one masked Adam step.

    The loss is the mean over the real (mask 1) rows of the global batch, so padding changes nothing. Under
    pmap (`axis_name` set) sums and gradients are psum-ed, giving the same update as on one device.
    `augment(key, images)` runs on the batch inside the step, with a fresh key per step.
    """
    spec = get_loss(loss)
    reduce = _reducer(axis_name)

    def train_step(state: TrainState, totals: Totals, batch: data.Batch, key: jax.Array):
        x, y, mask = batch["x"], batch["y"], batch["mask"]
        if augment is not None:
            key = jax.random.fold_in(key, state.step)
            if axis_name is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
            x = augment(key, x)
        count = jnp.maximum(reduce(mask.sum()), 1.0)

        def objective(params):
            logits = _logits(state, params, x)
            losses = spec.per_example(logits, y) * mask
            return losses.sum() / count, (losses, logits)

        grads, (losses, logits) = jax.grad(objective, has_aux=True)(state.params)
        state = state.apply_gradients(grads=reduce(grads))
        return state, _add_totals(totals, losses, spec.correct(logits, y), mask, reduce)

    return train_step


def make_eval_step(loss: str, *, axis_name: str | None = None) -> Callable:
    """`eval_step(state, totals, batch) -> totals`: loss and accuracy sums, no update."""
    spec = get_loss(loss)
    reduce = _reducer(axis_name)

    def eval_step(state: TrainState, totals: Totals, batch: data.Batch) -> Totals:
        logits = _logits(state, state.params, batch["x"])
        losses = spec.per_example(logits, batch["y"]) * batch["mask"]
        return _add_totals(totals, losses, spec.correct(logits, batch["y"]), batch["mask"], reduce)

    return eval_step


def make_predict_step(loss: str) -> Callable:
    """`predict_step(state, batch) -> probabilities`, the output Keras's softmax/sigmoid layer would give."""
    spec = get_loss(loss)

    def predict_step(state: TrainState, batch: data.Batch) -> jax.Array:
        return spec.probabilities(_logits(state, state.params, batch["x"]))

    return predict_step


@dataclasses.dataclass
class History:
    """What Keras's `fit` returns: `history[key]` per epoch; also each epoch's seconds and training speed."""

    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    epoch: list[int] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    samples_per_second: list[float] = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0

    def append(self, epoch: int, logs: dict[str, float], seconds: float, samples_per_second: float) -> None:
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
        }


class _Progress:
    """A Keras-like progress bar on a terminal; silent elsewhere and on short epochs."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled and sys.stdout.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.start < 1.0 or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        filled = int(30 * done / self.total)
        sys.stdout.write(f"\r{done}/{self.total} [{'=' * filled}{'.' * (30 - filled)}] - {now - self.start:.0f}s")
        sys.stdout.flush()

    def close(self) -> None:
        if self.enabled and self.last > self.start:
            sys.stdout.write("\r\033[K")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_model_inputs(state: TrainState, x: Any) -> None:
    """Run the model's own `check_inputs(x, **kwargs)` on the whole input when it defines one.

    Values such as sequence lengths can only be checked on the host: inside the jitted step they are tracers.
    """
    check = getattr(getattr(state.apply_fn, "__self__", None), "check_inputs", None)
    if check is not None:
        _apply_inputs(check, x)


def _check_xy(state: TrainState, x: Any, y: Any | None) -> None:
    """Clear errors for inputs the model or the loss cannot take."""
    _check_model_inputs(state, x)
    leaves = list(x.values()) if isinstance(x, dict) else [x]
    for leaf in leaves:
        leaf = np.asarray(leaf)
        if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
            raise ValueError("x: inputs must be finite, found NaN or infinity")
    n = data.num_examples(x)
    if n == 0:
        raise ValueError("x: no samples")
    sample = jax.tree.map(lambda a: np.asarray(a)[:1], x)
    try:
        out = jax.eval_shape(lambda: _logits(state, state.params, sample))
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
    get_loss(state.loss).check_labels(y, math.prod(out.shape[1:]))


def _batches(
    strategy: Any, x: Any, y: np.ndarray | None, batch_size: int, rng: np.random.Generator | None = None
) -> Any:
    """The strategy's share of each global batch: padded to a multiple of its replicas, this process's slice."""
    return data.iterate_batches(
        x,
        y,
        batch_size,
        rng=rng,
        pad_multiple=strategy.num_replicas,
        process_index=strategy.process_index,
        process_count=strategy.process_count,
    )


def _run_totals(strategy: Any, step: Callable, state: Any, batches: Any, *extra: Any) -> dict[str, float]:
    """Run a totals-accumulating step over `batches`; mean loss and accuracy over the real samples."""
    totals = strategy.replicate(zero_totals())
    for batch in batches:
        totals = step(state, totals, strategy.shard_batch(batch), *extra)
    sums = jax.device_get(strategy.unreplicate(totals))
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}


def fit(
    state: TrainState,
    x: Any,
    y: np.ndarray,
    *,
    epochs: int = 1,
    batch_size: int = 32,
    initial_epoch: int = 0,
    validation_split: float = 0.0,
    validation_data: tuple[Any, np.ndarray] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    verbose: int | str = "auto",
    augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    strategy: Any = None,
    callbacks: Sequence[Callback] = (),
) -> tuple[TrainState, History]:
    """Train as Keras's `model.fit` does; returns the trained state and a `History`.

    `validation_split` holds out the last fraction before shuffling; every epoch reshuffles (seeded by `seed`
    and the epoch) and trains the last partial batch. `verbose`: 0 silent, 1 a progress bar and a line per
    epoch, 2 a line per epoch, 'auto' 1 on a terminal else 2. Each callback is called as
    `callback(epoch, logs, state)` after every epoch (checkpoints, early stopping by raising, ...).
    `strategy` ('single', 'sharded', 'pmap' or a `parallel` strategy object) says where the steps run; each gives
    the same update for the same global batch. `initial_epoch`, as in Keras, resumes a run: epochs
    `initial_epoch` .. `epochs - 1` are trained, each shuffled as it would have been in the uninterrupted run.
    """
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if (
        isinstance(initial_epoch, bool)
        or not isinstance(initial_epoch, (int, np.integer))
        or not 0 <= initial_epoch <= epochs
    ):
        raise ValueError(f"initial_epoch must be an integer in [0, epochs={epochs}], got {initial_epoch!r}")
    _check_xy(state, x, y)
    y = np.asarray(y)
    (x, y), split = data.train_validation_split(x, y, validation_split)
    if validation_split:
        validation_data = split
    if validation_data is not None:
        _check_xy(state, *validation_data)
    verbose = (1 if sys.stdout.isatty() else 2) if verbose == "auto" else verbose
    strategy = parallel.get_strategy(strategy)
    n = data.num_examples(x)
    steps = -(-n // batch_size)

    train_step = strategy.compile(
        make_train_step(state.loss, axis_name=strategy.axis_name, augment=augment), donate_argnums=(0, 1)
    )
    eval_step = strategy.compile(make_eval_step(state.loss, axis_name=strategy.axis_name), donate_argnums=(1,))
    state = strategy.replicate(state)
    key = strategy.replicate(jax.random.key(seed))
    first = next(_batches(strategy, x, y, batch_size))
    start = time.perf_counter()
    train_step = train_step.lower(state, strategy.replicate(zero_totals()), strategy.shard_batch(first), key).compile()
    history = History(compile_seconds=time.perf_counter() - start)

    for epoch in range(initial_epoch, epochs):
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        progress = _Progress(steps, enabled=verbose == 1)
        start = time.perf_counter()
        totals = strategy.replicate(zero_totals())
        for i, batch in enumerate(_batches(strategy, x, y, batch_size, rng)):
            state, totals = train_step(state, totals, strategy.shard_batch(batch), key)
            progress.update(i + 1)
        sums = jax.device_get(strategy.unreplicate(totals))
        train_seconds = time.perf_counter() - start
        progress.close()
        count = max(float(sums["count"]), 1.0)
        logs = {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}
        if validation_data is not None:
            val = _run_totals(strategy, eval_step, state, _batches(strategy, *validation_data, batch_size))
            logs |= {f"val_{k}": v for k, v in val.items()}
        history.append(epoch, logs, time.perf_counter() - start, n / train_seconds)
        if verbose:
            metrics = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
            print(
                f"Epoch {epoch + 1}/{epochs} - {history.seconds[-1]:.2f}s - {n / train_seconds:,.0f} samples/s"
                f" - {metrics}",
                flush=True,
            )
        for callback in callbacks:
            callback(epoch, logs, strategy.unreplicate(state))
    return strategy.unreplicate(state), history


def evaluate(
    state: TrainState, x: Any, y: np.ndarray, *, batch_size: int = 32, strategy: Any = None
) -> dict[str, float]:
    """Keras's `model.evaluate`: mean loss and accuracy over (x, y)."""
    _check_positive_int("batch_size", batch_size)
    _check_xy(state, x, y)
    strategy = parallel.get_strategy(strategy)
    step = strategy.compile(make_eval_step(state.loss, axis_name=strategy.axis_name), donate_argnums=(1,))
    return _run_totals(strategy, step, strategy.replicate(state), _batches(strategy, x, np.asarray(y), batch_size))


def predict(state: TrainState, x: Any, *, batch_size: int = 32, strategy: Any = None) -> np.ndarray:
    """Keras's `model.predict`: output probabilities (softmax or sigmoid), one row per sample."""
    _check_positive_int("batch_size", batch_size)
    _check_xy(state, x, None)
    strategy = parallel.get_strategy(strategy)
    step = strategy.compile(make_predict_step(state.loss))
    state = strategy.replicate(state)
    rows = []
    for batch in _batches(strategy, x, None, batch_size):
        batch = strategy.shard_batch(batch)
        rows.append(strategy.gather_rows(step(state, batch))[strategy.gather_rows(batch["mask"]) > 0])
    return np.concatenate(rows)
