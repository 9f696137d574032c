"""Batch sources: what feeds a fit's compiled calls, and how steps are grouped into calls.

A source yields one input per step, already cut to this process's share of the global batch: a host batch
{'x', 'y', 'mask'}, or, when the arrays are resident on the device(s), only the rows {'index', 'mask'} that the
compiled call gathers there. `calls` stacks those inputs K at a time for `steps_per_execution=K`.
"""

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from flaxlesson import batching, checks, parallel
from flaxlesson.batching import Batch

RESIDENT_SHARE = 0.25
"""The share of one device's memory that a training set may fill to be kept resident there by default."""


def nbytes(tree: Any) -> int:
    """Bytes of every array in `tree`."""
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


class ArraySource:
    """In-memory arrays as a batch source; resident on every device when `resident`, so only indices travel.

    The epoch's order and batches are `batching.batch_indices`'s, whichever form travels, so a resident fit and a
    host-fed fit train on the same batches and end with the same params.
    """

    def __init__(self, x: Any, y: np.ndarray | None, strategy: parallel.Strategy, *, resident: bool):
        self.x, self.y, self.strategy = x, y, strategy
        self.num_examples = batching.num_examples(x)
        arrays = {"x": x} if y is None else {"x": x, "y": y}
        self.data = strategy.replicate(arrays) if resident else None

    def example_input(self, batch_size: int) -> Batch:
        """One step's input of the right shapes (the first unshuffled step's): what a compile needs."""
        return next(self.epoch_inputs(batch_size))

    def close(self) -> None:
        """Nothing to end: arrays hold no open reader."""

    def epoch_inputs(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = False) -> Iterator[Batch]:
        """This process's input of each step of epoch `epoch`, shuffled by `default_rng([seed, epoch])` if asked."""
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        shares = batching.batch_indices(
            self.num_examples,
            batch_size,
            rng=rng,
            pad_multiple=self.strategy.num_replicas,
            process_index=self.strategy.process_index,
            process_count=self.strategy.process_count,
        )
        for rows, mask in shares:
            if self.data is not None:
                yield {"index": rows.astype(np.int32), "mask": mask}
            else:
                batch = {"x": batching.take(self.x, rows), "mask": mask}
                if self.y is not None:
                    batch["y"] = self.y[rows]
                yield batch


@runtime_checkable
class Streamable(Protocol):
    """What a fit needs of a dataset it streams (`streaming.StreamingDataset`): its size, rows, views, batches."""

    @property
    def num_examples(self) -> int:
        """Rows in the dataset."""

    def take(self, indices: Any) -> Batch:
        """Rows `indices` in memory, as a batch without its mask."""

    def split(self, validation_split: float) -> tuple[Any, Any]:
        """(train, validation) views, the last `validation_split` held out."""

    def batches(self, batch_size: int, **layout: Any) -> Any:
        """An epoch's batches, laid out as `batching.batch_indices` lays them out."""


class StreamSource:
    """A `streaming.StreamingDataset` as a batch source: host batches read (and decoded by grain) as they are needed.

    Its epochs are `ArraySource`'s over the same data in memory, batch for batch, so a streamed fit ends with the
    params of an in-memory one. One grain iterator serves consecutive whole epochs (`epochs` of them), so its
    worker processes start once per fit, not once per epoch; `close` ends it.
    """

    data = None

    def __init__(self, dataset: Streamable, strategy: parallel.Strategy, *, epochs: int = 1):
        self.dataset, self.strategy, self.epochs = dataset, strategy, epochs
        self.num_examples = dataset.num_examples
        self._open: tuple[Any, tuple, int, int] | None = None  # iterator, layout, next epoch, end epoch

    def example_input(self, batch_size: int) -> Batch:
        """One step's input of the right shapes (its first rows), read directly: what a compile needs."""
        size = batching.padded_size(batch_size, self.strategy.num_replicas) // self.strategy.process_count
        return {**self.dataset.take(np.arange(size) % self.num_examples), "mask": np.ones(size, np.float32)}

    def epoch_inputs(self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = False) -> Iterator[Batch]:
        """This process's batch of each step of epoch `epoch`, shuffled as `ArraySource` shuffles."""
        layout = (batch_size, seed, shuffle)
        if self._open is None or self._open[1:3] != (layout, epoch):
            self.close()
            iterator = self.dataset.batches(
                batch_size,
                seed=seed,
                epoch=epoch,
                shuffle=shuffle,
                num_epochs=self.epochs,
                pad_multiple=self.strategy.num_replicas,
                process_index=self.strategy.process_index,
                process_count=self.strategy.process_count,
            )
            self._open = (iterator, layout, epoch, epoch + self.epochs)
        iterator, end = self._open[0], self._open[3]
        steps, done = batching.num_batches(self.num_examples, batch_size), 0
        try:
            for _ in range(steps):
                yield next(iterator)
                done += 1
        finally:
            # A whole epoch leaves the iterator at the next one; an epoch cut short leaves it nowhere useful.
            if done == steps and epoch + 1 < end:
                self._open = (iterator, layout, epoch + 1, end)
            else:
                self.close()

    def close(self) -> None:
        """End the grain iterator (and its worker processes), if one is open."""
        if self._open is not None:
            self._open[0].close()
            self._open = None


def fits_on_device(x: Any, y: Any, strategy: parallel.Strategy, share: float = RESIDENT_SHARE) -> bool:
    """Whether (x, y) should stay resident by default: one process, and at most `share` of one device's memory.

    Each device holds a whole copy. With several processes each reads only its share of every batch from the
    host instead, so no process needs the whole set on its devices.
    """
    if strategy.process_count > 1:
        return False
    return nbytes((x, y)) <= share * parallel.device_memory_bytes(strategy)


def steps_per_call(steps_per_execution: int | str, steps: int) -> int:
    """Keras's `steps_per_execution` (an int >= 1, or 'epoch') as a count for an epoch of `steps` steps."""
    if steps_per_execution == "epoch":
        return steps
    if isinstance(steps_per_execution, str) or not checks.is_int(steps_per_execution) or steps_per_execution < 1:
        raise ValueError(f"steps_per_execution must be a positive integer or 'epoch', got {steps_per_execution!r}")
    return min(int(steps_per_execution), steps)


def calls(inputs: Iterator[Batch], k: int) -> Iterator[tuple[Batch, int]]:
    """Per-step inputs stacked `k` at a time, with how many of them are real.

    The last, shorter group is filled up to `k` with copies of its last step whose mask is zero: the compiled call
    skips them, so one compiled program serves every call of the epoch.
    """
    group: list[Batch] = []
    for step in inputs:
        group.append(step)
        if len(group) == k:
            yield jax.tree.map(lambda *a: np.stack(a), *group), k
            group = []
    if group:
        count = len(group)
        filler = {**group[-1], "mask": np.zeros_like(group[-1]["mask"])}
        group += [filler] * (k - count)
        yield jax.tree.map(lambda *a: np.stack(a), *group), count
