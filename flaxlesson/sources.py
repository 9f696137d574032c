"""Batch sources: what feeds a fit's compiled calls, and how steps are grouped into calls.

A source yields one input per step, already cut to this process's share of the global batch: a host batch
{'x', 'y', 'mask'}, or, when the arrays are resident on the device(s), only the rows {'index', 'mask'} that the
compiled call gathers there. `calls` stacks those inputs K at a time for `steps_per_execution=K`.
"""

import math
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from flaxlesson import batching, parallel
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

    def step_inputs(self, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[Batch]:
        """This process's input of each step of one epoch, shuffled by `rng` when given."""
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
    if isinstance(steps_per_execution, str) or not isinstance(steps_per_execution, (int, np.integer)):
        raise ValueError(f"steps_per_execution must be a positive integer or 'epoch', got {steps_per_execution!r}")
    if isinstance(steps_per_execution, bool) or steps_per_execution < 1:
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


def num_steps(num_examples: int, batch_size: int) -> int:
    """Steps in an epoch of `num_examples` samples: the last partial batch is a step too."""
    return math.ceil(num_examples / batch_size)
