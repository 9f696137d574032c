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
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Yield `{'x', 'y', 'mask'}` batches of one fixed size, shuffled by `rng` when given.

    Each batch holds `batch_size` samples, the last one fewer; every batch is padded (with copies of its first
    row) to `padded_size(batch_size, pad_multiple)` rows, and `mask` is 1.0 on real rows, 0.0 on padding.
    With `process_count` > 1 (several processes, the same `rng` seed in each), only process `process_index`'s
    contiguous share of every padded global batch is yielded, and only those rows of `x` and `y` are read.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    size = padded_size(batch_size, pad_multiple)
    if process_count < 1 or size % process_count:
        raise ValueError(f"process_count must be a positive divisor of the padded batch size {size}, "
                         f"got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    n = num_examples(x)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    share = slice(process_index * size // process_count, (process_index + 1) * size // process_count)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        mask = np.zeros(size, np.float32)
        mask[:len(idx)] = 1.0
        idx = np.concatenate([idx, np.full(size - len(idx), idx[0])])[share]
        mask = mask[share]
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
