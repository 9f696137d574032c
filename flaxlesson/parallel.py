"""Where computation runs: the only module that names devices.

A strategy tells the training core how to compile its step functions and where to put state and batches.
`fit(..., strategy=...)` takes one of these or its name.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


class SingleDevice:
    """Everything on one device: the plain jitted step."""

    name = "single"
    num_replicas = 1
    axis_name = None

    def __init__(self, device: jax.Device | None = None):
        self.device = device or jax.local_devices()[0]

    def compile(self, step: Callable, donate_argnums: tuple[int, ...] = ()) -> Callable:
        """`step` jitted for this device, donating the named arguments' buffers."""
        return jax.jit(step, donate_argnums=donate_argnums)

    def replicate(self, tree: Any) -> Any:
        """Put state (params, optimiser state, running totals, keys) where the step reads it."""
        return jax.device_put(tree, self.device)

    def shard_batch(self, batch: Any) -> Any:
        """Put one global batch where the step reads it."""
        return jax.device_put(batch, self.device)

    def unreplicate(self, tree: Any) -> Any:
        """One copy of replicated state, as an ordinary pytree."""
        return tree

    def gather_rows(self, rows: Any) -> np.ndarray:
        """A per-example output of a step as one host array in batch order."""
        return np.asarray(rows)


STRATEGIES: dict[str, Callable[[], Any]] = {"single": SingleDevice}


def get_strategy(strategy: Any = None) -> Any:
    """A strategy object from a name in `STRATEGIES`, an existing strategy, or None (one device)."""
    if strategy is None:
        return SingleDevice()
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        return STRATEGIES[strategy]()
    return strategy
