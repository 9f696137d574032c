"""How steps become compiled calls: Keras's `steps_per_execution`.

At one step a call each call is the jitted step itself on one placed batch: the plain training loop. At K > 1
steps a call, K steps' inputs are stacked and one compiled `lax.scan` runs them (`core.scan_*_step`) with the
count of real steps, so one compiled program also serves an epoch's shorter remainder. Both give the same update.
"""

from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from flaxlesson import checks, core, parallel
from flaxlesson.batching import Batch

StepsPerExecution = int | str


def steps_per_call(steps_per_execution: StepsPerExecution, steps_in_epoch: int) -> int:
    """Keras's `steps_per_execution` (an int >= 1, or 'epoch') as a count for an epoch of `steps_in_epoch` steps."""
    if checks.count_or_epoch("steps_per_execution", steps_per_execution) == "epoch":
        return steps_in_epoch
    return min(int(steps_per_execution), steps_in_epoch)


def stack_steps(inputs: Iterator[Batch], k: int) -> Iterator[tuple[Batch, int]]:
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


class Executor:
    """Compiled calls of K steps for one strategy, their placed inputs, and placed zero totals.

    A call takes its inputs as the trailing arguments that `inputs` yields: one placed batch at K = 1; at K > 1
    the stacked batches and the placed count of real steps (placed once per count and reused).
    """

    def __init__(self, strategy: parallel.Strategy, steps_per_execution: StepsPerExecution, steps_in_epoch: int):
        self.strategy, self._counts = strategy, {}
        self.k = steps_per_call(steps_per_execution, steps_in_epoch)
        self.zeros = strategy.replicate(core.zero_totals())

    def train_call(self, train_step: Callable) -> Callable:
        """`call(state, totals, key, data, *inputs) -> (state, totals)`, donating the state."""
        call = core.scan_train_step(train_step) if self.k > 1 else core.one_train_step(train_step)
        return self.strategy.compile(call, donate_argnums=(0,))

    def eval_call(self, eval_step: Callable) -> Callable:
        """`call(state, totals, data, *inputs) -> totals`."""
        return self.strategy.compile(core.scan_eval_step(eval_step) if self.k > 1 else core.one_eval_step(eval_step))

    def predict_call(self, predict_step: Callable) -> Callable:
        """`call(state, data, *inputs) -> outputs`."""
        call = core.scan_predict_step(predict_step) if self.k > 1 else core.one_predict_step(predict_step)
        return self.strategy.compile(call)

    def _count(self, n: int) -> Any:
        if n not in self._counts:
            self._counts[n] = self.strategy.replicate(np.int32(n))
        return self._counts[n]

    def inputs(self, step_inputs: Iterator[Batch]) -> Iterator[tuple[tuple, int]]:
        """(placed inputs of a call, real steps in it) for each call over `step_inputs`."""
        if self.k == 1:
            for batch in step_inputs:
                yield (self.strategy.shard_batch(batch),), 1
            return
        for stacked, n in stack_steps(step_inputs, self.k):
            yield (self.strategy.shard_steps(stacked), self._count(n)), n

    def gather_rows(self, rows: Any) -> np.ndarray:
        """A call's per-example outputs (or its inputs' masks) as one host array in batch order."""
        return self.strategy.gather_rows(rows, stacked=self.k > 1)

    def totals(self, call: Callable, state: Any, source: Any, layout: Any) -> dict[str, float]:
        """Run a totals-accumulating `eval_call` over one unshuffled pass of `source`; its mean loss and accuracy."""
        totals = self.zeros
        for inputs, _ in self.inputs(source.epoch_inputs(layout)):
            totals = call(state, totals, source.data, *inputs)
        return core.means(jax.device_get(self.strategy.unreplicate(totals)))
