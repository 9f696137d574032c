"""Batch sources: what `fit`, `evaluate` and `predict` read each step's input from, behind one protocol.

A source yields one input per step, cut by `batching.Layout` in `batching.epoch_order` to this process's share of
the global batch: a host batch {'x', 'y', 'mask'}, or, when the arrays are resident on the device(s), only the
rows {'index', 'mask'} that the compiled call gathers there. Every source but an iterable of batches starts an epoch
at any step without reading the steps before it. `from_data` is the one place that asks what kind of data it was
given: arrays, a streamed dataset, or any iterable of (x, y) batches (a generator, a torch DataLoader, ...).
"""

import hashlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np
import psutil

from flaxlesson import batching, checks, parallel
from flaxlesson.batching import Batch, Layout

RESIDENT_SHARE = 0.25
"""The share of one device's memory that a training set may fill to be kept resident there by default."""

FINGERPRINT_ROWS = 64
"""Rows, evenly spread, that a source's fingerprint reads beside its size and shapes."""

logger = logging.getLogger(__name__)


def nbytes(tree: Any) -> int:
    """Bytes of every array in `tree`."""
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


class Source(Protocol):
    """What the training loop asks of its data, whatever it is: host arrays, resident arrays, a stream."""

    num_examples: int
    has_labels: bool
    batch_size: int | None
    """The rows of each batch when the data decides them (an iterable's, a folder dataset's); None: fit's batch_size."""
    data: Batch | None
    """The arrays resident on the devices that every compiled call reads rows from; None when inputs are batches."""
    labels: Any
    """All the labels when they are at hand without reading the inputs (arrays', a folder's); None otherwise."""

    def rows_to_check(self) -> tuple[Any, Any]:
        """(x, y) to check before training: all rows in memory, a stream's `check_rows` (else its first)."""

    def take(self, indices: np.ndarray) -> tuple[Any, Any]:
        """Rows `indices` in memory as (x, y)."""

    def split(self, validation_split: float) -> tuple["Source", "Source | None"]:
        """(train, validation), the LAST `validation_split` held out before any shuffling, as Keras's fit does."""

    def placed(
        self, strategy: parallel.Strategy, data_on_device: bool | None, epochs: int = 1, rows_read: int | None = None
    ) -> "Source":
        """This source as the strategy reads it for `epochs` epochs: resident on its devices where asked or worth it.

        `rows_read`: the rows the fit reads in all (None: every row each epoch).
        """

    def example_input(self, layout: Layout) -> Batch:
        """One step's input of the right shapes: what a compile needs."""

    def epoch_inputs(
        self, layout: Layout, *, seed: int = 0, epoch: int = 0, shuffle: bool = False, start_step: int = 0
    ) -> Iterator[Batch]:
        """This process's input of each step of epoch `epoch` from `start_step` on, the steps before it unread."""

    def close(self) -> None:
        """End any reader the source holds open."""


@runtime_checkable
class Streamable(Protocol):
    """What a source needs of a dataset it streams (`streaming.StreamingDataset`): its size, rows, views, batches."""

    @property
    def num_examples(self) -> int:
        """Rows in the dataset."""

    def take(self, indices: Any) -> Batch:
        """Rows `indices` in memory, as a batch without its mask."""

    def split(self, validation_split: float) -> tuple[Any, Any]:
        """(train, validation) views, the last `validation_split` held out."""

    def batches(self, batch_size: int, **layout: Any) -> Any:
        """An epoch's batches, laid out by `batching.Layout`."""


def scaled_images(x: Any) -> Any:
    """uint8 inputs as float32 in [0, 1] (x / 255), others unchanged: the one scaling rule, in memory and streamed.

    uint8 is how images are stored (IDX files, PNGs, shards); a model trains on them scaled, as the lesson's
    `x / 255` does, so the same arrays train the same way whether `fit` is given them or shards written from them.
    """
    return np.divide(x, np.float32(255), dtype=np.float32) if getattr(x, "dtype", None) == np.uint8 else x


def scaled_inputs(x: Any) -> Any:
    """A model input (an array, or a dict whose 'x' is the array) with a uint8 'x' scaled by `scaled_images`."""
    if isinstance(x, dict):
        return {**x, "x": scaled_images(x["x"])} if "x" in x else x
    return scaled_images(x)


def from_data(x: Any, y: Any | None = None, *, steps: int | None = None, steps_name: str = "steps_per_epoch") -> Source:
    """The source of `x` (and labels `y`): arrays in memory (uint8 inputs scaled), a stream, or batches.

    `steps` (Keras's `steps_per_epoch`, `validation_steps` or `steps`, named by `steps_name` in errors) is the
    batches an epoch reads from an iterable without a length.
    """
    if isinstance(x, Streamable) or checks.is_batches(x):
        if y is not None:
            raise ValueError("y: a streaming dataset or an iterable of batches carries its own labels; pass y=None")
        return StreamSource(x) if isinstance(x, Streamable) else IterableSource(x, steps, steps_name)
    return ArraySource(scaled_inputs(x), None if y is None else np.asarray(y))


def from_validation_data(validation_data: Any, steps: int | None = None) -> Source:
    """Keras's `validation_data`: an (x, y) tuple, a streaming dataset, or an iterable of batches (`steps` of them)."""
    if isinstance(validation_data, Streamable) or checks.is_batches(validation_data):
        return from_data(validation_data, steps=steps, steps_name="validation_steps")
    x, y = validation_data
    return from_data(x, y)


def _classes(y: Any) -> np.ndarray | None:
    """The classes labels `y` hold (class indices, one-hot or binary rows); None for labels that are not classes."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        return np.unique(y.argmax(axis=1))
    if y.ndim not in (1, 2) or y.size != len(y) or y.dtype.kind not in "biuf":
        return None
    if y.dtype.kind == "f" and not np.all(y == np.round(y)):
        return None
    return np.unique(y)


def warn_if_one_class(train: "Source", validation: "Source | None") -> None:
    """Warn when the held-out validation labels hold one class while the training labels hold several.

    `validation_split` takes the last fraction before any shuffle, as Keras's; a set ordered by class then
    validates on its last class alone.
    """
    if validation is None:
        return
    train_labels, held_labels = train.labels, validation.labels
    if train_labels is None or held_labels is None:
        return
    held, kept = _classes(held_labels), _classes(train_labels)
    if held is not None and kept is not None and len(held) == 1 and len(kept) > 1:
        logger.warning(
            "validation_split: the held-out validation samples (the last %d) all hold class %s while the training "
            "samples hold %d classes: the data looks ordered by class; shuffle it before fit (validation_split "
            "takes the last fraction before shuffling, as in Keras)",
            validation.num_examples,
            held[0],
            len(kept),
        )


def fingerprint(source: Source) -> str:
    """A short hash of a source's size, shapes and `FINGERPRINT_ROWS` evenly spread rows: what its data is."""
    rows = np.unique(np.linspace(0, source.num_examples - 1, FINGERPRINT_ROWS).astype(np.int64))
    digest = hashlib.sha256(str(source.num_examples).encode())
    for leaf in jax.tree.leaves(source.take(rows)):
        leaf = np.ascontiguousarray(leaf)
        digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


class ArraySource:
    """Arrays in host memory: each step's batch is sliced from them on the host and placed by the strategy."""

    data = None
    batch_size = None

    def __init__(self, x: Any, y: np.ndarray | None):
        self.x, self.y = x, y
        self.num_examples = batching.num_examples(x)
        self.has_labels = y is not None

    @property
    def labels(self) -> np.ndarray | None:
        return self.y

    def rows_to_check(self) -> tuple[Any, Any]:
        return self.x, self.y

    def take(self, indices: np.ndarray) -> tuple[Any, Any]:
        return batching.take(self.x, indices), None if self.y is None else self.y[indices]

    def split(self, validation_split: float) -> tuple["ArraySource", "ArraySource | None"]:
        if not checks.fraction("validation_split", validation_split):
            return self, None
        (x, y), (x_val, y_val) = batching.train_validation_split(self.x, self.y, validation_split)
        return ArraySource(x, y), ArraySource(x_val, y_val)

    def placed(
        self, strategy: parallel.Strategy, data_on_device: bool | None, epochs: int = 1, rows_read: int | None = None
    ) -> "ArraySource":
        if data_on_device:
            check_host_copies(self.x, self.y, strategy)
        resident = (
            fits_on_device(self.x, self.y, strategy, rows_read=rows_read) if data_on_device is None else data_on_device
        )
        return ResidentSource(self.x, self.y, strategy) if resident else self

    def example_input(self, layout: Layout) -> Batch:
        return next(self.epoch_inputs(layout))

    def epoch_inputs(
        self, layout: Layout, *, seed: int = 0, epoch: int = 0, shuffle: bool = False, start_step: int = 0
    ) -> Iterator[Batch]:
        return batching.iterate_batches(
            self.x,
            self.y,
            layout.batch_size,
            seed=seed,
            epoch=epoch,
            shuffle=shuffle,
            start_step=start_step,
            pad_multiple=layout.pad_multiple,
            process_index=layout.process_index,
            process_count=layout.process_count,
        )

    def close(self) -> None:
        """Nothing to end: arrays hold no open reader."""


class ResidentSource(ArraySource):
    """Arrays resident on every device: each step moves only its rows {'index', 'mask'}, gathered on the device.

    The rows are `batching.Layout`'s, so a resident fit trains on the batches of a host-fed one, to the bit.
    """

    def __init__(self, x: Any, y: np.ndarray | None, strategy: parallel.Strategy):
        super().__init__(x, y)
        self.data = strategy.replicate({"x": x} if y is None else {"x": x, "y": y})

    def epoch_inputs(
        self, layout: Layout, *, seed: int = 0, epoch: int = 0, shuffle: bool = False, start_step: int = 0
    ) -> Iterator[Batch]:
        order = batching.epoch_order(layout.num_examples, seed=seed, epoch=epoch, shuffle=shuffle)
        for step in range(start_step, layout.steps):
            rows, mask = layout.step_rows(order, step)
            yield {"index": rows.astype(np.int32), "mask": mask}


class StreamSource:
    """A `streaming.StreamingDataset`: host batches read (and decoded by grain) as they are needed.

    Its epochs are `ArraySource`'s over the same data in memory, batch for batch, so a streamed fit ends with the
    params of an in-memory one. One grain iterator serves consecutive whole epochs (`epochs` of them), so its
    worker processes start once per fit, not once per epoch; `close` ends it.
    """

    data = None

    def __init__(self, dataset: Streamable, epochs: int = 1):
        self.dataset, self.epochs = dataset, epochs
        self.num_examples = dataset.num_examples
        self.has_labels = getattr(dataset, "has_labels", True)
        self.labels = getattr(dataset, "labels", None)
        self.batch_size = getattr(dataset, "batch_size", None)
        self._open: tuple[Any, tuple, int] | None = None  # iterator, (layout, seed, shuffle), position of its next

    def rows_to_check(self) -> tuple[Any, Any]:
        check_rows = getattr(self.dataset, "check_rows", None)
        return self.take(np.arange(1) if check_rows is None else check_rows())

    def take(self, indices: np.ndarray) -> tuple[Any, Any]:
        rows = self.dataset.take(indices)
        return rows["x"], rows.get("y")

    def split(self, validation_split: float) -> tuple["StreamSource", "StreamSource | None"]:
        train, validation = self.dataset.split(validation_split)
        return StreamSource(train), None if validation is None else StreamSource(validation)

    def placed(
        self, strategy: parallel.Strategy, data_on_device: bool | None, epochs: int = 1, rows_read: int | None = None
    ) -> "StreamSource":
        if data_on_device:
            raise ValueError("data_on_device: a streaming dataset is read from the host as it trains")
        return StreamSource(self.dataset, epochs)

    def example_input(self, layout: Layout) -> Batch:
        """The first rows, read directly (no iterator is opened)."""
        size = layout.size // layout.process_count
        x, y = self.take(np.arange(size) % self.num_examples)
        batch = {"x": x, "mask": np.ones(size, np.float32)}
        return batch if y is None else {**batch, "y": y}

    def epoch_inputs(
        self, layout: Layout, *, seed: int = 0, epoch: int = 0, shuffle: bool = False, start_step: int = 0
    ) -> Iterator[Batch]:
        key, position = (layout, seed, shuffle), epoch * layout.steps + start_step
        left = layout.steps - start_step
        if self._open is None or self._open[1:] != (key, position) or len(self._open[0]) < left:
            self.close()
            iterator = self.dataset.batches(
                layout.batch_size,
                seed=seed,
                epoch=epoch,
                shuffle=shuffle,
                start_step=start_step,
                num_epochs=self.epochs,
                pad_multiple=layout.pad_multiple,
                process_index=layout.process_index,
                process_count=layout.process_count,
            )
            self._open = (iterator, key, position)
        iterator, done = self._open[0], 0
        try:
            for batch in itertools.islice(iterator, left):
                yield batch
                done += 1
        finally:
            # The rest of an epoch read leaves the iterator at the next one; an epoch cut short, nowhere useful.
            if done == left:
                self._open = (iterator, key, (epoch + 1) * layout.steps)
            else:
                self.close()

    def close(self) -> None:
        """End the grain iterator (and its worker processes), if one is open."""
        if self._open is not None:
            self._open[0].close()
            self._open = None


def fits_on_device(
    x: Any, y: Any, strategy: parallel.Strategy, share: float = RESIDENT_SHARE, rows_read: int | None = None
) -> bool:
    """Whether (x, y) should stay resident by default: one process, accelerators, at most `share` of one's memory.

    Each device holds a whole copy. On CPU devices nothing is placed: the host arrays already lie in the memory
    those devices read, each batch is taken from them as it is, and a resident copy would add one copy of the whole
    set per device to the same RAM. With several processes each reads only its share of every batch from the host
    instead, so no process needs the whole set on its devices. A fit that reads fewer rows than the set holds
    (`rows_read`, e.g. a short `steps_per_epoch`) would copy more than it reads, so it reads from the host too.
    """
    if strategy.process_count > 1 or parallel.on_cpu(strategy):
        return False
    if rows_read is not None and rows_read < batching.num_examples(x):
        return False
    return nbytes((x, y)) <= share * parallel.device_memory_bytes(strategy)


def check_host_copies(x: Any, y: Any, strategy: parallel.Strategy) -> None:
    """Refuse `data_on_device=True` on CPU devices when their copies (one per device) exceed the available RAM."""
    if not parallel.on_cpu(strategy):
        return
    copies, size = len(strategy.devices), nbytes((x, y))
    available = psutil.virtual_memory().available
    if copies * size > available:
        raise ValueError(
            f"data_on_device: {copies} resident copies of {size / 2**30:.2f} GiB (one per CPU device) exceed the "
            f"{available / 2**30:.2f} GiB of memory available; leave data_on_device=None to read batches from the "
            "host arrays"
        )


def _as_batch(item: Any) -> tuple[Any, Any]:
    """One batch an iterable yields, (x, y), (x,) or x (a dict of arrays too), as host arrays (x, y or None)."""
    if isinstance(item, (tuple, list)):
        if len(item) == 3:
            raise ValueError("x: batches of (x, y, sample_weight) are not supported; yield (x, y)")
        if len(item) not in (1, 2):
            raise ValueError(f"x: an iterable's batches must be (x, y), (x,) or x, got a sequence of {len(item)}")
        x, y = item[0], item[1] if len(item) == 2 else None
    else:
        x, y = item, None
    x = scaled_inputs(jax.tree.map(np.asarray, x))
    return x, None if y is None else np.asarray(y)


class IterableSource:
    """Any iterable of (x, y) batches: a generator, a grain dataset, a tf.data `as_numpy_iterator()`, a DataLoader.

    Its first batch's size is every step's compiled size: a smaller batch (a last short one) is padded by
    `batching.Layout` with copies of its first row and masked, as an array's last batch is. An epoch is `len()`
    batches, or `steps` (Keras's `steps_per_epoch`) for an iterable without a length. An iterable that restarts
    (a list, a DataLoader) starts again each epoch; an iterator (a generator) goes on where the last epoch
    stopped, and when it runs out, a warning says so and the fit stops, as Keras's does. The batches keep their
    own order (`shuffle` does not apply), and a resumed epoch reads and drops the batches before its step.
    """

    data = labels = None

    def __init__(self, batches: Iterable, steps: int | None = None, steps_name: str = "steps_per_epoch"):
        self.batches, self.one_shot = batches, iter(batches) is batches
        iterator = iter(batches)
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError("x: the iterable yields no batches") from None
        self._iterator = itertools.chain([first], iterator) if self.one_shot else None
        self.first = _as_batch(first)
        if hasattr(batches, "__len__"):
            steps = len(batches)
        elif steps is None:
            raise ValueError(f"{steps_name}: an iterable without a length (e.g. a generator) needs {steps_name}")
        self.steps = checks.positive_int(steps_name, steps)
        self.batch_size = batching.num_examples(self.first[0])
        self.num_examples = self.steps * self.batch_size  # at most: a short batch holds fewer
        self.has_labels = self.first[1] is not None

    def rows_to_check(self) -> tuple[Any, Any]:
        return self.first

    def take(self, indices: np.ndarray) -> tuple[Any, Any]:
        """Rows of the first batch (indices taken modulo its size): an iterable has no other random access."""
        rows = np.asarray(indices) % self.batch_size
        x, y = self.first
        return batching.take(x, rows), None if y is None else y[rows]

    def split(self, validation_split: float) -> tuple["IterableSource", None]:
        if validation_split:
            raise ValueError(
                "validation_split: an iterable of batches cannot be split, as in Keras; pass validation_data"
            )
        return self, None

    def placed(
        self, strategy: parallel.Strategy, data_on_device: bool | None, epochs: int = 1, rows_read: int | None = None
    ) -> "IterableSource":
        if data_on_device:
            raise ValueError("data_on_device: an iterable of batches is read from the host as it trains")
        return self

    def padded(self, x: Any, y: Any, layout: Layout, step: int) -> Batch:
        """One batch as `Layout` lays out a batch: padded to its size, masked, this process's share."""
        n = batching.num_examples(x)
        if n > layout.batch_size or (y is not None and len(y) != n):
            raise ValueError(
                f"x: batch {step} of the iterable holds {n} inputs and {n if y is None else len(y)} labels; every "
                f"batch needs as many of each, at most the first batch's {layout.batch_size}"
            )
        rows, mask = layout.step_rows(np.arange(n), 0)
        batch = {"x": batching.take(x, rows), "mask": mask}
        return batch if y is None else {**batch, "y": y[rows]}

    def example_input(self, layout: Layout) -> Batch:
        return self.padded(*self.first, layout, 0)

    def epoch_inputs(
        self, layout: Layout, *, seed: int = 0, epoch: int = 0, shuffle: bool = False, start_step: int = 0
    ) -> Iterator[Batch]:
        iterator = self._iterator if self.one_shot else iter(self.batches)
        for step in range(layout.steps):
            try:
                item = next(iterator)
            except StopIteration:
                logger.warning(
                    "x: the iterable ran out of batches at step %d of the %d of epoch %d; training stops here "
                    "(give an iterable that restarts, such as a list or a DataLoader, or fewer steps_per_epoch)",
                    step,
                    layout.steps,
                    epoch,
                )
                return
            if step >= start_step:
                yield self.padded(*_as_batch(item), layout, step)

    def close(self) -> None:
        """Nothing to end: the iterable is the caller's."""
