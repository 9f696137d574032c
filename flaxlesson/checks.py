"""Argument checks shared by every public entry point: each raises a ValueError that names the argument."""

from collections.abc import Iterable
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """Whether `value` is a Python or numpy integer (bools are not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int, checked to lie in [low, high] (either bound optional)."""
    if is_int(value) and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    if high is not None:
        wanted = f"an integer in [{low if low is not None else '-inf'}, {high}]"
    elif low is not None:
        wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    else:
        wanted = "an integer"
    raise ValueError(f"{name} must be {wanted}, got {value!r}")


def positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1."""
    return integer(name, value, low=1)


def non_negative_int(name: str, value: Any) -> int:
    """`value` as an int >= 0."""
    return integer(name, value, low=0)


def positive_number(name: str, value: Any) -> float:
    """`value` as a float > 0: a time, a rate, a factor."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """`value` as a float in [0, 1): a share held out or dropped."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def one_of(name: str, value: Any, choices: Any) -> Any:
    """`value`, checked to be one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def count_or_epoch(name: str, value: Any) -> int | str:
    """`value` as an int >= 1, or the string 'epoch': how often something happens, in steps or once an epoch."""
    if value == "epoch":
        return value
    if isinstance(value, str) or not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer or 'epoch', got {value!r}")
    return int(value)


def flag(name: str, value: Any) -> bool:
    """`value` as a bool: True or False only, so that 'no' or 1 is not read by its truthiness."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def optional_flag(name: str, value: Any) -> bool | None:
    """`value` as a bool, or None where None means 'decide for me'."""
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")
    return None if value is None else bool(value)


def prng_seed(name: str, value: Any) -> int:
    """`value` as a PRNG seed: an integer in [0, 2**63 - 1], what `jax.random.key` and numpy's generators take."""
    return integer(name, value, low=0, high=2**63 - 1)


def verbosity(name: str, value: Any, allowed: tuple = (0, 1, 2, "auto")) -> int | str:
    """`value` as one of Keras's verbosity settings (for fit: 0 silent, 1 progress bar, 2 a line per epoch, 'auto')."""
    words = [a for a in allowed if isinstance(a, str)]
    if (value in words) if isinstance(value, str) else (is_int(value) and int(value) in allowed):
        return value if isinstance(value, str) else int(value)
    raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _numeric(name: str, value: Any) -> Any:
    """`value` unchanged if it holds numbers (a list becomes an array); a TypeError naming `name` otherwise."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be an array of numbers, got a {type(value).__name__}")
    if isinstance(value, (list, tuple)):
        try:
            value = np.asarray(value)
        except ValueError:  # rows of different lengths
            raise ValueError(
                f"{name}: ragged sequences (rows of different lengths); pad them to one length with "
                "flaxlesson.data.pad_sequences, or pass a rectangular array"
            ) from None
    dtype = getattr(value, "dtype", None)
    if dtype is not None and np.dtype(dtype).kind not in "biuf" and str(dtype) != "bfloat16":
        raise TypeError(
            f"{name} must hold numbers, got dtype {dtype}; convert it first, e.g. np.asarray({name}, np.float32)"
        )
    return value


def is_batches(x: Any) -> bool:
    """Whether `x` is an iterable of batches: no array, dict or string, and a list or tuple only of (x, y) tuples."""
    if isinstance(x, (np.ndarray, dict, str, bytes)) or hasattr(x, "__array__"):
        return False
    if isinstance(x, (list, tuple)):
        return bool(x) and isinstance(x[0], tuple) and len(x[0]) in (1, 2) and not np.isscalar(x[0][0])
    return isinstance(x, Iterable)


def inputs(name: str, value: Any) -> Any:
    """Model inputs `x`: an array of numbers (a list of lists is turned into one), a dict of them, or a dataset."""
    if is_batches(value):
        return value
    if isinstance(value, dict):
        return {key: _numeric(f"{name}[{key!r}]", leaf) for key, leaf in value.items()}
    return _numeric(name, value)


def labels(name: str, value: Any, loss: str) -> Any:
    """Labels `y` as numbers; class indices of shape (samples, 1) become (samples,), as Keras's sparse loss takes."""
    if value is None:
        return None
    value = np.asarray(_numeric(name, value))
    if loss == "sparse_categorical_crossentropy" and value.ndim == 2 and value.shape[1] == 1:
        return value[:, 0]
    return value


def in_memory(x: Any) -> bool:
    """Whether `x` is arrays in memory (an array, or a dict of them) rather than a dataset that holds its labels."""
    return isinstance(x, dict) or hasattr(x, "dtype")


def train_state(name: str, value: Any) -> Any:
    """`value`, checked to be a train state: params and the function that applies them (a `core.TrainState`)."""
    if not all(hasattr(value, attr) for attr in ("params", "apply_fn", "loss")):
        raise TypeError(f"{name} must be a TrainState (from training.create_train_state), got {type(value).__name__}")
    return value


def validation_pair(name: str, value: Any, loss: str) -> Any:
    """Keras's `validation_data` as an (x, y) pair of checked arrays; a dataset passes through unchanged."""
    if not isinstance(value, (tuple, list)) or is_batches(value):
        return value
    if len(value) == 3:
        raise ValueError(
            f"{name}: an (x, y, sample_weight) triple is not supported, since fit takes no sample weights; pass (x, y)"
        )
    if len(value) != 2:
        raise ValueError(f"{name} must be an (x, y) pair, got a {type(value).__name__} of {len(value)} items")
    x, y = value
    if y is None:
        raise ValueError(f"{name}: (x, None) has no labels to validate against; pass (x, y)")
    return inputs(f"{name}[0]", x), labels(f"{name}[1]", y, loss)


def instances(name: str, value: Any, kind: type, hint: str = "") -> list:
    """`value` as a list of `kind`: None is none, one `kind` is a list of one, as Keras's `callbacks=` takes."""
    if value is None:
        return []
    items = [value] if isinstance(value, kind) else value
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be a {kind.__name__} or a list of them, got {type(value).__name__}{hint}")
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise TypeError(f"{name}[{i}] must be a {kind.__name__}, got {type(item).__name__}{hint}")
    return list(items)


def model_outputs(name: str, sample_shape: tuple, output_shape: tuple) -> None:
    """Refuse inputs on which a model gives outputs other than one row of class scores per sample."""
    if len(output_shape) != 2:
        raise ValueError(
            f"{name}: samples of shape {tuple(sample_shape)} give model outputs of shape {tuple(output_shape)}, "
            f"not (batch, classes); pass inputs of the rank the model was built for"
        )


def model_config(model: Any) -> None:
    """Refuse a model configured to give no outputs (`num_classes` below 1), before its initialiser divides by 0."""
    if hasattr(model, "num_classes"):
        integer(f"{type(model).__name__}.num_classes", model.num_classes, low=1)


_CALLBACK_HINT = " (wrap a function in LambdaCallback(on_epoch_end=fn))"


def fit_arguments(
    state: Any,
    x: Any,
    y: Any,
    *,
    seed: Any,
    verbose: Any,
    shuffle: Any,
    data_on_device: Any,
    validation_data: Any,
    callbacks: Any,
    callback_kind: type,
) -> tuple[Any, Any, Any, list]:
    """`fit`'s arguments checked before anything compiles: (x, y, validation_data, callbacks) as fit reads them."""
    x, y = evaluate_arguments(state, x, y, data_on_device=data_on_device)
    if y is None and in_memory(x):
        raise ValueError("y: fit needs the labels of x (y=None is for a streaming dataset, which holds its labels)")
    prng_seed("seed", seed)
    verbosity("verbose", verbose)
    flag("shuffle", shuffle)
    if validation_data is not None:
        validation_data = validation_pair("validation_data", validation_data, state.loss)
    return x, y, validation_data, instances("callbacks", callbacks, callback_kind, _CALLBACK_HINT)


def evaluate_arguments(state: Any, x: Any, y: Any, *, data_on_device: Any) -> tuple[Any, Any]:
    """`evaluate`'s (and `fit`'s) state, data and placement checked: (x, y) as they are read."""
    x = predict_arguments(state, x, data_on_device=data_on_device)
    return x, labels("y", y, state.loss)


def predict_arguments(state: Any, x: Any, *, data_on_device: Any) -> Any:
    """`predict`'s state, inputs and placement checked: x as it is read."""
    train_state("state", state)
    optional_flag("data_on_device", data_on_device)
    return inputs("x", x)
