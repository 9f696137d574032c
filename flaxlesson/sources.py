"""Batch sources: what `fit`, `evaluate` and `predict` read each step's input from, behind one protocol.

A source yields one input per step, cut by `batching.Layout` in `batching.epoch_order` to this process's share of
the global batch: a host batch {'x', 'y', 'mask'}, or, when the arrays are resident on the device(s), only the
rows {'index', 'mask'} that the compiled call gathers there. Every source starts an epoch at any step without
reading the steps before it. `from_data` is the one place that asks what kind of data it was given.
"""

import hashlib
import itertools
from collections.abc import Iterator
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


def nbytes(tree: Any) -> int:
    """Bytes of every array in `tree`."""
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


class Source(Protocol):
    """What the training loop asks of its data, whatever it is: host arrays, resident arrays, a stream."""

    num_examples: int
    has_labels: bool
    data: Batch | None
    """The arrays resident on the devices that every compiled call reads rows from; None when inputs are batches."""

    def rows_to_check(self) -> tuple[Any, Any]:
        """(x, y) to check against the model before training: all rows in memory, a stream's first row."""

    def take(self, indices: np.ndarray) -> tuple[Any, Any]:
        """Rows `indices` in memory as (x, y)."""

    def split(self, validation_split: float) -> tuple["Source", "Source | None"]:
        """(train, validation), the LAST `validation_split` held out before any shuffling, as Keras's fit does."""

    def placed(self, strategy: parallel.Strategy, data_on_device: bool | None, epochs: int = 1) -> "Source":
        """This source as the strategy reads it for `epochs` epochs: resident on its devices where asked or fitting."""

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


def from_data(x: Any, y: Any | None = None) -> Source:
    """The source of `x` (and labels `y`): arrays in memory, or a streaming dataset that holds its labels."""
    if isinstance(x, Streamable):
        if y is not None:
            raise ValueError("y: a streaming dataset carries its own labels; pass y=None")
        return StreamSource(x)
    return ArraySource(x, None if y is None else np.asarray(y))


def from_validation_data(validation_data: Any) -> Source:
    """Keras's `validation_data`: an (x, y) pair, or a streaming dataset standing for both."""
    if isinstance(validation_data, Streamable):
        return StreamSource(validation_data)
    x, y = validation_data
    return from_data(x, y)


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

    def __init__(self, x: Any, y: np.ndarray | None):
        self.x, self.y = x, y
        self.num_examples = batching.num_examples(x)
        self.has_labels = y is not None

    def rows_to_check(self) -> tuple[Any, Any]:
        return self.x, self.y

    def take(self, indices: np.ndarray) -> tuple[Any, Any]:
        return batching.take(self.x, indices), None if self.y is None else self.y[indices]

    def split(self, validation_split: float) -> tuple["ArraySource", "ArraySource | None"]:
        if not checks.fraction("validation_split", validation_split):
            return self, None
        (x, y), (x_val, y_val) = batching.train_validation_split(self.x, self.y, validation_split)
        return ArraySource(x, y), ArraySource(x_val, y_val)

    def placed(self, strategy: parallel.Strategy, data_on_device: bool | None, epochs: int = 1) -> "ArraySource":
        if data_on_device:
            check_host_copies(self.x, self.y, strategy)
        resident = fits_on_device(self.x, self.y, strategy) if data_on_device is None else data_on_device
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
    has_labels = True

    def __init__(self, dataset: Streamable, epochs: int = 1):
        self.dataset, self.epochs = dataset, epochs
        self.num_examples = dataset.num_examples
        self._open: tuple[Any, tuple, int] | None = None  # iterator, (layout, seed, shuffle), position of its next

    def rows_to_check(self) -> tuple[Any, Any]:
        return self.take(np.arange(1))

    def take(self, indices: np.ndarray) -> tuple[Any, Any]:
        rows = self.dataset.take(indices)
        return rows["x"], rows["y"]

    def split(self, validation_split: float) -> tuple["StreamSource", "StreamSource | None"]:
        train, validation = self.dataset.split(validation_split)
        return StreamSource(train), None if validation is None else StreamSource(validation)

    def placed(self, strategy: parallel.Strategy, data_on_device: bool | None, epochs: int = 1) -> "StreamSource":
        if data_on_device:
            raise ValueError("data_on_device: a streaming dataset is read from the host as it trains")
        return StreamSource(self.dataset, epochs)

    def example_input(self, layout: Layout) -> Batch:
        """The first rows, read directly (no iterator is opened)."""
        size = layout.size // layout.process_count
        x, y = self.take(np.arange(size) % self.num_examples)
        return {"x": x, "y": y, "mask": np.ones(size, np.float32)}

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


def _on_cpu(strategy: parallel.Strategy) -> bool:
    """Whether every device of the strategy is a CPU device, whose memory is the host's own RAM."""
    return all(device.platform == "cpu" for device in strategy.devices)


def fits_on_device(x: Any, y: Any, strategy: parallel.Strategy, share: float = RESIDENT_SHARE) -> bool:
    """Whether (x, y) should stay resident by default: one process, accelerators, at most `share` of one's memory.

    Each device holds a whole copy. On CPU devices nothing is placed: the host arrays already lie in the memory
    those devices read, each batch is taken from them as it is, and a resident copy would add one copy of the whole
    set per device to the same RAM. With several processes each reads only its share of every batch from the host
    instead, so no process needs the whole set on its devices.
    """
    if strategy.process_count > 1 or _on_cpu(strategy):
        return False
    return nbytes((x, y)) <= share * parallel.device_memory_bytes(strategy)


def check_host_copies(x: Any, y: Any, strategy: parallel.Strategy) -> None:
    """Refuse `data_on_device=True` on CPU devices when their copies (one per device) exceed the available RAM."""
    if not _on_cpu(strategy):
        return
    copies, size = len(strategy.devices), nbytes((x, y))
    available = psutil.virtual_memory().available
    if copies * size > available:
        raise ValueError(
            f"data_on_device: {copies} resident copies of {size / 2**30:.2f} GiB (one per CPU device) exceed the "
            f"{available / 2**30:.2f} GiB of memory available; leave data_on_device=None to read batches from the "
            "host arrays"
        )
