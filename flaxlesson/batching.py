"""The one batch layout and shuffle rule, and Keras's validation split: rows in, fixed-size masked batches out.

Every source (host arrays, arrays resident on the device, streamed records) cuts its epochs with `Layout` and
orders them with `epoch_order`. Batches come out at one fixed size (the last partial batch is padded and carries a
mask), so the jitted steps that consume them compile once. Several processes each read only their share.
"""

import dataclasses
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


def epoch_order(n: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True) -> np.ndarray:
    """The order of epoch `epoch`'s `n` samples: the one shuffle rule of every source.

    A permutation drawn from `np.random.default_rng([seed, epoch])` when `shuffle`, else 0..n-1. It depends on
    nothing but its arguments, so a resumed run, a streamed set and every process draw the same order.
    """
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an epoch of `num_examples` rows is cut into fixed-size masked batches: the one batch layout.

    Each step takes the next `batch_size` rows of the epoch's order, the last step fewer; every batch is padded
    (with copies of its first row) to `size`, `batch_size` rounded up to `pad_multiple` (the device count), and
    its mask is 1.0 on real rows, 0.0 on padding. With `process_count` > 1 each process reads only its
    contiguous `share` of every padded global batch.
    """

    num_examples: int
    batch_size: int
    pad_multiple: int = 1
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        checks.positive_int("batch_size", self.batch_size)
        checks.positive_int("pad_multiple", self.pad_multiple)
        if self.process_count < 1 or self.size % self.process_count:
            raise ValueError(
                f"process_count must be a positive divisor of the padded batch size {self.size}, "
                f"got {self.process_count}"
            )
        checks.integer("process_index", self.process_index, low=0, high=self.process_count - 1)

    @property
    def steps(self) -> int:
        """Steps in an epoch: the last partial batch counts as one."""
        return num_batches(self.num_examples, self.batch_size)

    @property
    def size(self) -> int:
        """Rows of every padded global batch."""
        return padded_size(self.batch_size, self.pad_multiple)

    @property
    def share(self) -> slice:
        """This process's rows of a padded global batch."""
        rows = self.size // self.process_count
        return slice(self.process_index * rows, (self.process_index + 1) * rows)

    def step_rows(self, order: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's rows and mask at step `step` of an epoch in `order`, found without the other steps."""
        rows = order[step * self.batch_size : (step + 1) * self.batch_size]
        mask = np.zeros(self.size, np.float32)
        mask[: len(rows)] = 1.0
        rows = np.concatenate([rows, np.full(self.size - len(rows), rows[0])])
        return rows[self.share], mask[self.share]


def iterate_batches(
    x: Any,
    y: np.ndarray | None,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = False,
    start_step: int = 0,
    pad_multiple: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """The `{'x', 'y', 'mask'}` batches of one epoch over host arrays, in `Layout`'s fixed size.

    Ordered by `epoch_order(seed=, epoch=, shuffle=)`; from step `start_step` on, the steps before it never
    read. With several processes only this process's share of every global batch is yielded and read.
    """
    layout = Layout(num_examples(x), batch_size, pad_multiple, process_index, process_count)
    order = epoch_order(layout.num_examples, seed=seed, epoch=epoch, shuffle=shuffle)
    y = None if y is None else np.asarray(y)
    for step in range(start_step, layout.steps):
        rows, mask = layout.step_rows(order, step)
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
