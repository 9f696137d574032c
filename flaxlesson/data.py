"""Data for every experiment: loading, Keras's validation split, and the one batch iterator.

Everything here is numpy on the host. Batches come out at one fixed size (the last partial batch is padded and
carries a mask), so the jitted steps that consume them compile once.
"""

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import sklearn.datasets
import sklearn.model_selection
import sklearn.preprocessing

Batch = dict[str, Any]


def num_examples(x: Any) -> int:
    """Leading-axis length of `x`, an array or a dict of arrays that share it (e.g. inputs and seq_lengths)."""
    leaves = list(x.values()) if isinstance(x, dict) else [x]
    lengths = {len(leaf) for leaf in leaves}
    if len(lengths) != 1:
        raise ValueError(f"x: arrays of a dict input must share their leading length, got lengths {sorted(lengths)}")
    return lengths.pop()


def take(x: Any, indices: np.ndarray) -> Any:
    """Rows `indices` of an array or of every array in a dict."""
    if isinstance(x, dict):
        return {k: np.asarray(v)[indices] for k, v in x.items()}
    return np.asarray(x)[indices]


def train_validation_split(x: Any, y: np.ndarray, validation_split: float) -> tuple[tuple, tuple]:
    """Hold out the LAST `validation_split` of the data, before any shuffling, as Keras's `fit` does."""
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    n = num_examples(x)
    split_at = int(math.floor(n * (1.0 - validation_split)))
    if validation_split and split_at in (0, n):
        raise ValueError(f"validation_split={validation_split} leaves no training or no validation data from {n} samples")
    first, rest = np.arange(split_at), np.arange(split_at, n)
    return (take(x, first), y[first]), (take(x, rest), y[rest])


def padded_size(batch_size: int, multiple: int = 1) -> int:
    """`batch_size` rounded up to a multiple of `multiple` (e.g. the device count)."""
    return -(-batch_size // multiple) * multiple


def iterate_batches(
    x: Any,
    y: np.ndarray | None,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    pad_multiple: int = 1,
) -> Iterator[Batch]:
    """Yield `{'x', 'y', 'mask'}` batches of one fixed size, shuffled by `rng` when given.

    Each batch holds `batch_size` samples, the last one fewer; every batch is padded (with copies of its first
    row) to `padded_size(batch_size, pad_multiple)` rows, and `mask` is 1.0 on real rows, 0.0 on padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    n = num_examples(x)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    size = padded_size(batch_size, pad_multiple)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        mask = np.zeros(size, np.float32)
        mask[:len(idx)] = 1.0
        idx = np.concatenate([idx, np.full(size - len(idx), idx[0])])
        batch = {"x": take(x, idx), "mask": mask}
        if y is not None:
            batch["y"] = y[idx]
        yield batch


def load_iris(test_size: float = 0.3, random_state: int = 42) -> tuple[tuple, tuple]:
    """The lesson's Iris split, standardised on the training part: ((x_train, y_train), (x_test, y_test))."""
    iris = sklearn.datasets.load_iris()
    x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
        iris.data, iris.target, test_size=test_size, random_state=random_state)
    scaler = sklearn.preprocessing.StandardScaler()
    x_train = scaler.fit_transform(x_train).astype(np.float32)
    x_test = scaler.transform(x_test).astype(np.float32)
    return (x_train, y_train.astype(np.int32)), (x_test, y_test.astype(np.int32))


def _check_side(name: str, side: Any) -> None:
    if side not in ("pre", "post"):
        raise ValueError(f'{name}: {name.capitalize()} type "{side}" not understood, expected "pre" or "post"')


def _check_fits_integer(name: str, values: Any, dtype: np.dtype) -> None:
    """Values bound for an integer dtype must be whole numbers in its range (where Keras would cut them silently)."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf" or values.size == 0:
        return
    if values.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise ValueError(f"{name}: dtype {dtype} needs whole numbers, got non-integer values such as "
                         f"{values[~(np.isfinite(values) & (values == np.round(values)))].flat[0]!r}; "
                         f"pass dtype='float32' to keep them")
    info = np.iinfo(dtype)
    if values.min() < info.min or values.max() > info.max:
        raise ValueError(f"{name}: values from {values.min()} to {values.max()} do not fit dtype {dtype}")


def pad_sequences(
    sequences: Any,
    maxlen: int | None = None,
    dtype: Any = "int32",
    padding: str = "pre",
    truncating: str = "pre",
    value: Any = 0.0,
) -> np.ndarray:
    """Keras's `pad_sequences`: a list of sequences as one (num_samples, maxlen, ...) array, padded with `value`.

    Same results as Keras for every padding/truncating mode; where Keras would silently cut non-integer values
    to an integer `dtype`, this raises. `maxlen=0` gives an empty (n, 0) array in every mode.
    """
    _check_side("padding", padding)
    _check_side("truncating", truncating)
    if maxlen is not None and (isinstance(maxlen, bool) or not isinstance(maxlen, (int, np.integer)) or maxlen < 0):
        raise ValueError(f"maxlen must be None or a non-negative integer, got {maxlen!r}")
    try:
        dtype = np.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"dtype: not a numpy dtype: {dtype!r}") from error
    if isinstance(value, str) and dtype.kind not in "OSU":
        raise ValueError(f"value: a string needs dtype=object (or a string dtype), got dtype {dtype}")
    if dtype.kind in "iu":
        _check_fits_integer("value", value, dtype)
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__"):
        raise ValueError(f"sequences must be a list of sequences, got {type(sequences).__name__}")

    lengths, sample_shape = [], None
    for i, sequence in enumerate(sequences):
        if isinstance(sequence, (str, bytes)) or not hasattr(sequence, "__len__"):
            raise ValueError(f"sequences[{i}] must be a sequence (list or array), got {sequence!r}")
        lengths.append(len(sequence))
        if sample_shape is None and len(sequence):
            sample_shape = np.asarray(sequence).shape[1:]
    sample_shape = sample_shape or ()
    if maxlen is None:
        if not lengths:
            raise ValueError("sequences: no sequences and no maxlen, so there is no length to pad to")
        maxlen = max(lengths)

    padded = np.full((len(lengths), maxlen, *sample_shape), value, dtype=dtype)
    for i, (sequence, length) in enumerate(zip(sequences, lengths)):
        kept = min(length, maxlen)
        if kept == 0:
            continue
        part = sequence[length - kept:] if truncating == "pre" else sequence[:kept]
        if dtype.kind in "iu":
            _check_fits_integer(f"sequences[{i}]", part, dtype)
        part = np.asarray(part, dtype=dtype)
        if part.shape[1:] != sample_shape:
            raise ValueError(f"sequences[{i}]: items of shape {part.shape[1:]}, expected {sample_shape} "
                             f"as in the first non-empty sequence")
        if padding == "post":
            padded[i, :kept] = part
        else:
            padded[i, maxlen - kept:] = part
    return padded
