"""The one batch iterator, and Keras's validation split: host arrays in, fixed-size masked batches out.

Batches come out at one fixed size (the last partial batch is padded and carries a mask), so the jitted steps that
consume them compile once. Several processes each read only their share of every global batch.
"""

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from flaxlesson import checks

Batch = dict[str, Any]


def num_examples(x: Any) -> int:
    """Leading-axis length of `x`, an array or a dict of arrays that share it (e.g. inputs and seq_lengths)."""
    leaves = list(x.values()) if isinstance(x, dict) else [x]
    lengths = {len(leaf) for leaf in leaves}
    if len(lengths) != 1:
        raise ValueError(f"x: arrays of a dict input must share their leading length, got lengths {sorted(lengths)}")
    return lengths.pop()


def take(x: Any, indices: np.ndarray | slice) -> Any:
    """Rows `indices` (an index array, or a slice for a view) of an array or of every array in a dict."""
    if isinstance(x, dict):
        return {k: np.asarray(v)[indices] for k, v in x.items()}
    return np.asarray(x)[indices]


def train_validation_split(x: Any, y: np.ndarray, validation_split: float) -> tuple[tuple, tuple]:
    """Hold out the LAST `validation_split` of the data, before any shuffling, as Keras's `fit` does."""
    checks.fraction("validation_split", validation_split)
    n = num_examples(x)
    split_at = int(math.floor(n * (1.0 - validation_split)))
    if validation_split and split_at in (0, n):
        raise ValueError(
            f"validation_split={validation_split} leaves no training or no validation data from {n} samples"
        )
    first, rest = slice(0, split_at), slice(split_at, n)  # views: the data set is not copied
    return (take(x, first), y[first]), (take(x, rest), y[rest])


def num_batches(num_examples: int, batch_size: int) -> int:
    """Batches (steps) in an epoch of `num_examples` samples: the last partial batch counts as one."""
    return -(-num_examples // batch_size)


def padded_size(batch_size: int, multiple: int = 1) -> int:
    """`batch_size` rounded up to a multiple of `multiple` (e.g. the device count)."""
    return -(-batch_size // multiple) * multiple


def epoch_order(n: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The order of an epoch's `n` samples: `rng`'s permutation, or 0..n-1 unshuffled."""
    return rng.permutation(n) if rng is not None else np.arange(n)


def _layout(batch_size: int, pad_multiple: int, process_index: int, process_count: int) -> tuple[int, slice]:
    """The padded global batch size, and this process's share of a batch's rows; errors name the bad argument."""
    checks.positive_int("batch_size", batch_size)
    size = padded_size(batch_size, pad_multiple)
    if process_count < 1 or size % process_count:
        raise ValueError(
            f"process_count must be a positive divisor of the padded batch size {size}, got {process_count}"
        )
    checks.integer("process_index", process_index, low=0, high=process_count - 1)
    return size, slice(process_index * size // process_count, (process_index + 1) * size // process_count)


def _padded_rows(
    order: np.ndarray, step: int, batch_size: int, size: int, share: slice
) -> tuple[np.ndarray, np.ndarray]:
    rows = order[step * batch_size : (step + 1) * batch_size]
    mask = np.zeros(size, np.float32)
    mask[: len(rows)] = 1.0
    rows = np.concatenate([rows, np.full(size - len(rows), rows[0])])
    return rows[share], mask[share]


def step_rows(
    order: np.ndarray,
    step: int,
    batch_size: int,
    *,
    pad_multiple: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The rows and mask of step `step` of an epoch in `order`: what `batch_indices` yields at that step.

    Found without the epoch's other steps, so a stream can start (or resume) anywhere in an epoch of any size.
    """
    return _padded_rows(order, step, batch_size, *_layout(batch_size, pad_multiple, process_index, process_count))


def batch_indices(
    n: int,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    pad_multiple: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The rows and mask of each fixed-size batch of an epoch over `n` samples, shuffled by `rng` when given.

    Each batch holds `batch_size` samples, the last one fewer; every batch is padded (with copies of its first
    row) to `padded_size(batch_size, pad_multiple)` rows, and the mask is 1.0 on real rows, 0.0 on padding.
    With `process_count` > 1 (several processes, the same `rng` seed in each), only process `process_index`'s
    contiguous share of every padded global batch is yielded.
    """
    size, share = _layout(batch_size, pad_multiple, process_index, process_count)
    order = epoch_order(n, rng)
    for step in range(num_batches(n, batch_size)):
        yield _padded_rows(order, step, batch_size, size, share)


def iterate_batches(
    x: Any,
    y: np.ndarray | None,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    pad_multiple: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Yield `{'x', 'y', 'mask'}` batches of one fixed size, shuffled by `rng` when given (see `batch_indices`).

    With several processes only this process's share of every global batch is yielded, and only those rows of
    `x` and `y` are read.
    """
    shares = batch_indices(
        num_examples(x),
        batch_size,
        rng=rng,
        pad_multiple=pad_multiple,
        process_index=process_index,
        process_count=process_count,
    )
    for rows, mask in shares:
        batch = {"x": take(x, rows), "mask": mask}
        if y is not None:
            batch["y"] = y[rows]
        yield batch


def to_categorical(y: Any, num_classes: int | None = None) -> np.ndarray:
    """Keras's `to_categorical`: class indices as one-hot rows, for loss 'categorical_crossentropy'.

    As Keras: a trailing axis of size 1 is dropped, `num_classes` defaults to max(y) + 1 and the class axis is
    last. Unlike Keras (float64) the rows are float32, the dtype the model computes in; indices outside
    [0, num_classes) raise instead of wrapping or failing deep in numpy.
    """
    y = np.asarray(y)
    if y.dtype.kind not in "biuf" or y.dtype.kind == "b":
        raise ValueError(f"y: class indices must be integers, got dtype {y.dtype}")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ValueError("y: class indices must be whole numbers, got non-integer values")
    shape = y.shape[:-1] if y.ndim > 1 and y.shape[-1] == 1 else y.shape
    flat = y.reshape(-1).astype(np.int64)
    if num_classes is None:
        if flat.size == 0:
            raise ValueError("num_classes: cannot be inferred from empty labels; pass it")
        num_classes = int(flat.max()) + 1
    num_classes = checks.positive_int("num_classes", num_classes)
    if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(
            f"y: class indices must lie in [0, {num_classes}) for num_classes={num_classes}, "
            f"got values from {flat.min()} to {flat.max()}"
        )
    categorical = np.zeros((flat.size, num_classes), np.float32)
    categorical[np.arange(flat.size), flat] = 1
    return categorical.reshape(*shape, num_classes)
