"""The pure training core: losses as Keras names them, `TrainState`, and the step builders.

Models return logits. A loss name (Keras's) picks the per-example loss, the accuracy and the output activation:
'sparse_categorical_crossentropy' takes class indices, 'categorical_crossentropy' one-hot or soft label rows
(Keras's `to_categorical`), 'binary_crossentropy' one logit per sample.
The steps are pure functions of (state, running totals, batch); a strategy from `parallel` compiles them and
places their inputs, so the same step serves one device, a sharded mesh and pmap. Batches have one fixed size
and a mask, so the last partial batch trains without a second compile. `one_*_step` is one step per compiled
call (the plain loop); `scan_*_step` runs several steps as one compiled call through `lax.scan`.

A model whose `__call__` takes `train` (the flax examples' convention, Keras's `training=`) gets `train=True` in
the train step, with a fresh 'dropout' key each step, and `train=False` in evaluation and prediction. One that
also takes `mask` gets the batch's row mask (1 real row, 0 padding) in training, so its batch statistics (e.g.
`models.BatchNorm`'s) cover the real rows only. A model with a 'batch_stats' collection (BatchNorm) has it in
`TrainState.batch_stats`, updated by every train step and read, as running averages, by evaluation.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from flaxlesson import checks

Batch = dict[str, Any]
Totals = dict[str, jax.Array]


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


def _check_categorical_labels(y: np.ndarray, num_classes: int) -> None:
    if y.ndim != 2:
        raise ValueError(
            f"y: categorical_crossentropy needs one-hot or soft labels of shape (samples, classes), got shape "
            f"{y.shape}; turn class indices into one-hot rows with data.to_categorical, or use "
            f"loss='sparse_categorical_crossentropy'"
        )
    if y.shape[1] != num_classes:
        raise ValueError(
            f"y: labels are {y.shape[1]} wide but the model has {num_classes} outputs; "
            f"pass num_classes={num_classes} to data.to_categorical"
        )
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"y: categorical_crossentropy needs numeric labels, got dtype {y.dtype}")


def _categorical_correct(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Keras's categorical accuracy: the labels' argmax equals the logits' argmax (first index on ties)."""
    return (jnp.argmax(logits, -1) == jnp.argmax(y, -1)).astype(jnp.float32)


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
    "categorical_crossentropy": Loss(
        per_example=optax.softmax_cross_entropy,
        correct=_categorical_correct,
        probabilities=nn.softmax,
        check_labels=_check_categorical_labels,
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


def _adam(learning_rate: float) -> optax.GradientTransformation:
    return optax.adam(learning_rate, b1=0.9, b2=0.999, eps=1e-7)


def keras_adam(learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """Keras's `Adam()` defaults: lr 1e-3, betas 0.9/0.999, epsilon 1e-7 (optax's default epsilon is 1e-8).

    The learning rate lives in the optimiser state (`optax.inject_hyperparams`), so a callback can change it
    between steps without a recompile: see `learning_rate` and `set_learning_rate`.
    """
    return optax.inject_hyperparams(_adam)(learning_rate=learning_rate)


def _hyperparams(state: Any) -> dict | None:
    """The injected hyperparameters of `state`'s optimiser, or None when it has none."""
    return getattr(state.opt_state, "hyperparams", None)


def learning_rate(state: Any) -> float | None:
    """The learning rate a state's optimiser uses now (None when the optimiser does not expose it)."""
    hyperparams = _hyperparams(state)
    if hyperparams is None or "learning_rate" not in hyperparams:
        return None
    return float(jax.device_get(hyperparams["learning_rate"]))


def set_learning_rate(state: Any, value: float) -> Any:
    """`state` with its optimiser's learning rate set to `value`; same shapes, so the compiled step is reused."""
    hyperparams = _hyperparams(state)
    if hyperparams is None or "learning_rate" not in hyperparams:
        raise ValueError("state: its optimiser has no injected learning_rate; build it with optax.inject_hyperparams")
    old = hyperparams["learning_rate"]
    new = jax.device_put(jnp.asarray(value, old.dtype), old.sharding) if isinstance(old, jax.Array) else value
    return state.replace(opt_state=state.opt_state._replace(hyperparams={**hyperparams, "learning_rate": new}))


class TrainState(train_state.TrainState):
    """Flax's TrainState, plus the Keras loss name that fixes the model's output activation, and the model itself.

    `model` is the linen module `apply_fn` belongs to (static: its fields are its config), so code that checks
    inputs or saves the model reads it here rather than from inside `apply_fn`. `batch_stats` is the model's
    'batch_stats' collection (BatchNorm's running means and variances; empty for a model without one): state
    that training changes but the gradient does not, as in flax's imagenet example.
    """

    loss: str = struct.field(pytree_node=False, default="sparse_categorical_crossentropy")
    model: nn.Module | None = struct.field(pytree_node=False, default=None)
    batch_stats: Any = struct.field(default_factory=dict)


@functools.cache
def _call_parameters(module_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(module_class.__call__).parameters)


def takes(model: nn.Module | None, argument: str) -> bool:
    """Whether `model.__call__` has a parameter named `argument` ('train', 'mask'): read once per model class."""
    return model is not None and argument in _call_parameters(type(model))


def create_train_state(
    model: nn.Module,
    sample_x: Any,
    *,
    seed: int = 0,
    loss: str = "sparse_categorical_crossentropy",
    optimizer: optax.GradientTransformation | None = None,
) -> TrainState:
    """Initialise `model` on a sample input with PRNG key `seed`; Adam as Keras has it unless told otherwise.

    The initialisation is jitted: run op by op, the fast conv forms of `ops` took seconds for the CNN.
    """
    get_loss(loss)
    checks.model_config(model)
    extra = {"train": False} if takes(model, "train") else {}
    init = jax.jit(lambda key, x: apply_inputs(lambda inputs, **kw: model.init(key, inputs, **kw, **extra), x))
    variables = init(jax.random.key(seed), sample_x)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optimizer or keras_adam(),
        loss=loss,
        model=model,
        batch_stats=variables.get("batch_stats", {}),
    )


def apply_inputs(fn: Callable, x: Any) -> Any:
    """Call `fn` on model inputs: an array, or a dict whose 'x' is the array and the rest keyword arguments."""
    if isinstance(x, dict):
        rest = {k: v for k, v in x.items() if k != "x"}
        return fn(x["x"], **rest)
    return fn(x)


def _variables(state: TrainState, params: Any) -> dict[str, Any]:
    batch_stats = getattr(state, "batch_stats", None)
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def _as_float32(logits: jax.Array) -> jax.Array:
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def forward(state: TrainState, params: Any, x: Any) -> jax.Array:
    """The model's logits for inputs `x` (see `apply_inputs`) under `params`, in inference mode, in at least float32.

    Inference mode: `train=False` for a model that takes it (Dropout off, BatchNorm's running averages).
    A model that computes in bfloat16 (Keras's `mixed_bfloat16`) gives bfloat16 logits; the loss, the accuracy
    and the probabilities are taken in float32, as Keras's mixed precision keeps its softmax output in float32.
    """
    extra = {"train": False} if takes(getattr(state, "model", None), "train") else {}
    logits = apply_inputs(lambda inputs, **kw: state.apply_fn(_variables(state, params), inputs, **kw, **extra), x)
    return _as_float32(logits)


def train_forward(state: TrainState, params: Any, x: Any, mask: jax.Array, key: jax.Array) -> tuple[jax.Array, Any]:
    """(logits, new batch_stats) in training mode: what `forward` is for inference, for a model that takes `train`.

    `train=True`, `key` as the 'dropout' key, the row `mask` for a model that takes `mask`, and 'batch_stats'
    mutable when the model has them. A model with neither `train` nor batch_stats is run exactly as `forward` runs it.
    """
    model = getattr(state, "model", None)
    if not (takes(model, "train") or state.batch_stats):
        return forward(state, params, x), state.batch_stats
    extra = {"train": True} if takes(model, "train") else {}
    extra |= {"mask": mask} if takes(model, "mask") else {}
    mutable = ["batch_stats"] if state.batch_stats else False

    def apply(inputs: jax.Array, **kw: Any) -> Any:
        return state.apply_fn(_variables(state, params), inputs, **kw, **extra, rngs={"dropout": key}, mutable=mutable)

    out = apply_inputs(apply, x)
    logits, updates = out if mutable else (out, {"batch_stats": state.batch_stats})
    return _as_float32(logits), updates["batch_stats"]


DROPOUT_STREAM = 1
"""What `dropout_key` folds into the step's key, so that dropout's and augmentation's randomness differ."""


def dropout_key(key: jax.Array, step: jax.Array, axis_name: str | None) -> jax.Array:
    """The train step's 'dropout' key: the fit's `key` folded with the global step, and the device under pmap.

    Derived from the step number (not carried from step to step), so a fit resumed at step n draws what the
    uninterrupted one drew there. Under pmap each device draws its own rows' masks, so the device's index on the
    axis is folded in; that index counts the devices of every process, so processes differ too. Under jit over a
    sharded batch (and on one device) one key draws the mask of the whole global batch, row by row: rows on other
    devices and processes already get other bits (JAX's partitionable threefry gives the same bits as one device).
    The stream is kept apart from augmentation's key, `fold_in(key, step)`, by one more fold_in.
    """
    key = jax.random.fold_in(jax.random.fold_in(key, step), DROPOUT_STREAM)
    return key if axis_name is None else jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def zero_totals() -> Totals:
    """Running sums of loss, correct predictions and real samples over an epoch (host zeros, placed by the caller)."""
    return {name: np.zeros((), np.float32) for name in ("loss", "correct", "count")}


def means(sums: dict[str, Any]) -> dict[str, float]:
    """Mean loss and accuracy over the real samples of running totals (host values)."""
    count = max(float(sums["count"]), 1.0)
    return {"loss": float(sums["loss"]) / count, "accuracy": float(sums["correct"]) / count}


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
    `augment(key, images)` runs on the batch inside the step, with a fresh key per step. A model that takes
    `train` runs with `train=True` and a 'dropout' key of its own each step (`dropout_key`); its new
    `batch_stats` are stored in the state.
    """
    spec = get_loss(loss)
    reduce = _reducer(axis_name)

    def train_step(state: TrainState, totals: Totals, batch: Batch, key: jax.Array):
        x, y, mask = batch["x"], batch["y"], batch["mask"]
        dropout = dropout_key(key, state.step, axis_name)
        if augment is not None:
            key = jax.random.fold_in(key, state.step)
            if axis_name is not None:
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
            x = augment(key, x)
        count = jnp.maximum(reduce(mask.sum()), 1.0)

        def objective(params):
            logits, batch_stats = train_forward(state, params, x, mask, dropout)
            losses = spec.per_example(logits, y) * mask
            return losses.sum() / count, (losses, logits, batch_stats)

        grads, (losses, logits, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
        state = state.apply_gradients(grads=reduce(grads), batch_stats=batch_stats)
        return state, _add_totals(totals, losses, spec.correct(logits, y), mask, reduce)

    return train_step


def make_eval_step(loss: str, *, axis_name: str | None = None) -> Callable:
    """`eval_step(state, totals, batch) -> totals`: loss and accuracy sums, no update."""
    spec = get_loss(loss)
    reduce = _reducer(axis_name)

    def eval_step(state: TrainState, totals: Totals, batch: Batch) -> Totals:
        logits = forward(state, state.params, batch["x"])
        losses = spec.per_example(logits, batch["y"]) * batch["mask"]
        return _add_totals(totals, losses, spec.correct(logits, batch["y"]), batch["mask"], reduce)

    return eval_step


def make_predict_step(loss: str) -> Callable:
    """`predict_step(state, batch) -> probabilities`, the output Keras's softmax/sigmoid layer would give."""
    spec = get_loss(loss)

    def predict_step(state: TrainState, batch: Batch) -> jax.Array:
        return spec.probabilities(forward(state, state.params, batch["x"]))

    return predict_step


def gather_batch(data: Batch, inputs: Batch) -> Batch:
    """The batch of resident `data` rows that `inputs` name: {'index', 'mask'} -> {'x', 'y', 'mask'}.

    Runs inside the compiled call, so a resident epoch moves only its index order to the device.
    """
    rows = jax.tree.map(lambda a: jnp.take(a, inputs["index"], axis=0), data)
    return {**rows, "mask": inputs["mask"]}


def batch_of(data: Batch | None, inputs: Batch) -> Batch:
    """The batch a step runs on: `inputs` itself, or the rows of resident `data` that `inputs` name."""
    return inputs if data is None else gather_batch(data, inputs)


def one_train_step(train_step: Callable) -> Callable:
    """`call(state, totals, key, data, inputs) -> (state, totals)`: `train_step` on one step's inputs."""

    def train_one(state: TrainState, totals: Totals, key: jax.Array, data: Batch | None, inputs: Batch):
        return train_step(state, totals, batch_of(data, inputs), key)

    return train_one


def one_eval_step(eval_step: Callable) -> Callable:
    """`call(state, totals, data, inputs) -> totals`: `eval_step` on one step's inputs."""

    def eval_one(state: TrainState, totals: Totals, data: Batch | None, inputs: Batch) -> Totals:
        return eval_step(state, totals, batch_of(data, inputs))

    return eval_one


def one_predict_step(predict_step: Callable) -> Callable:
    """`call(state, data, inputs) -> outputs`: `predict_step` on one step's inputs."""

    def predict_one(state: TrainState, data: Batch | None, inputs: Batch) -> jax.Array:
        return predict_step(state, batch_of(data, inputs))

    return predict_one


def _scan(step: Callable, carry: Any, data: Batch | None, inputs: Batch, count: jax.Array) -> tuple[Any, Any]:
    """`step(carry, batch) -> (carry, out)` over the leading axis of `inputs`; steps at index >= `count` are skipped.

    `lax.scan` keeps the compiled program the size of one step whatever the number of steps. Skipped steps (the
    padding of an epoch's last, shorter call) leave the carry as it is and give zeros, so one compiled call of K
    steps also serves the remainder of an epoch that K does not divide.
    """

    def body(carry: Any, indexed: tuple[jax.Array, Batch]) -> tuple[Any, Any]:
        i, inp = indexed
        batch = batch_of(data, inp)
        out_shape = jax.eval_shape(step, carry, batch)[1]

        def skip(carry: Any, batch: Batch) -> tuple[Any, Any]:
            return carry, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

        return jax.lax.cond(i < count, step, skip, carry, batch)

    length = jax.tree.leaves(inputs)[0].shape[0]
    return jax.lax.scan(body, carry, (jnp.arange(length), inputs))


def scan_train_step(train_step: Callable) -> Callable:
    """`call(state, totals, key, data, inputs, count) -> (state, totals)`: `train_step` over stacked inputs.

    `inputs` has a leading steps axis: batches, or {'index', 'mask'} rows of the resident `data` (None otherwise).
    The first `count` steps run; the update equals that many separate `train_step` calls.
    """

    def train_steps(
        state: TrainState, totals: Totals, key: jax.Array, data: Batch | None, inputs: Batch, count: jax.Array
    ) -> tuple[TrainState, Totals]:
        def step(carry: tuple, batch: Batch) -> tuple[tuple, None]:
            return train_step(*carry, batch, key), None

        return _scan(step, (state, totals), data, inputs, count)[0]

    return train_steps


def scan_eval_step(eval_step: Callable) -> Callable:
    """`call(state, totals, data, inputs, count) -> totals`: `eval_step` over stacked inputs (see `scan_train_step`)."""

    def eval_steps(state: TrainState, totals: Totals, data: Batch | None, inputs: Batch, count: jax.Array) -> Totals:
        return _scan(lambda totals, batch: (eval_step(state, totals, batch), None), totals, data, inputs, count)[0]

    return eval_steps


def scan_predict_step(predict_step: Callable) -> Callable:
    """`call(state, data, inputs, count) -> outputs`: `predict_step` over stacked inputs, outputs stacked likewise."""

    def predict_steps(state: TrainState, data: Batch | None, inputs: Batch, count: jax.Array) -> jax.Array:
        return _scan(lambda carry, batch: (carry, predict_step(state, batch)), (), data, inputs, count)[1]

    return predict_steps
