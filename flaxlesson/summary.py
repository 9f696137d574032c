"""Keras's `model.summary()` for a Flax module: one row per layer (name, type, output shape, params) and totals.

A row is a direct submodule of the model, in the order the model first calls it; the params of its own
submodules count in its row. A submodule that only runs inside another one (the cell that `nn.RNN` scans) is
folded into that one's row, as Keras shows a SimpleRNN as one layer. The shapes come from tracing the model on
the sample (`jax.eval_shape`: nothing is computed) and show the batch axis as None, as Keras does.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from flaxlesson import checks, core


@dataclasses.dataclass(frozen=True)
class Row:
    """One layer of the table: its Flax name, its module type, its output shape and its parameter count."""

    name: str
    type: str
    output_shape: str
    params: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """Keras's summary of a model: `rows`, the totals, and the table as Keras prints it (`str(summary)`)."""

    model: str
    rows: tuple[Row, ...]
    trainable_params: int
    non_trainable_params: int
    trainable_bytes: int
    non_trainable_bytes: int

    @property
    def total_params(self) -> int:
        """Every parameter, trainable or not (Keras's "Total params")."""
        return self.trainable_params + self.non_trainable_params

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready data, for metrics.json and reports."""
        return {
            "model": self.model,
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.non_trainable_params,
        }

    def __str__(self) -> str:
        header = ("Layer (type)", "Output Shape", "Param #")
        cells = [header] + [(f"{r.name} ({r.type})", r.output_shape, f"{r.params:,}") for r in self.rows]
        widths = [max(len(row[i]) for row in cells) + 4 for i in range(3)]
        width = sum(widths)

        def line(row: tuple[str, str, str]) -> str:
            return (" " + row[0].ljust(widths[0]) + row[1].ljust(widths[1]) + row[2].rjust(widths[2] - 4)).rstrip()

        total_bytes = self.trainable_bytes + self.non_trainable_bytes
        return "\n".join(
            [f'Model: "{self.model}"', "_" * width, line(header), "=" * width]
            + [line(row) for row in cells[1:]]
            + [
                "=" * width,
                f"Total params: {self.total_params:,} ({readable_memory_size(total_bytes)})",
                f"Trainable params: {self.trainable_params:,} ({readable_memory_size(self.trainable_bytes)})",
                f"Non-trainable params: {self.non_trainable_params:,} "
                f"({readable_memory_size(self.non_trainable_bytes)})",
                "_" * width,
            ]
        )


def readable_memory_size(num_bytes: float) -> str:
    """Bytes as Keras's summary writes them: two decimals and the largest unit of 1024 below the size."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes / 1024 < 1:
            return f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.2f} PB"


def _count(tree: Any) -> tuple[int, int]:
    """(values, bytes) of the arrays (or shape structs) in `tree`."""
    leaves = jax.tree.leaves(tree)
    return sum(math.prod(a.shape) for a in leaves), sum(math.prod(a.shape) * a.dtype.itemsize for a in leaves)


def _shape(out: Any) -> str:
    """Keras's output shape: the batch axis as None; several outputs as a list."""
    shapes = [f"({', '.join(['None', *map(str, leaf.shape[1:])])}{',' if leaf.ndim == 1 else ''})" for leaf in out]
    return shapes[0] if len(shapes) == 1 else f"[{', '.join(shapes)}]"


def _recorder() -> tuple[Callable, dict[str, dict[str, Any]]]:
    """A method interceptor that records each direct submodule: type, first output, and the one it runs inside."""
    layers: dict[str, dict[str, Any]] = {}
    running: list[str] = []

    def interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        path = context.module.path
        if context.method_name != "__call__" or len(path) != 1:
            return next_fun(*args, **kwargs)
        name = path[0]
        if name not in layers:
            layers[name] = {"type": type(context.module).__name__, "inside": running[0] if running else None}
        running.append(name)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            running.pop()
        layers[name].setdefault("output", jax.tree.leaves(out))
        return out

    return interceptor, layers


def summary(model: nn.Module, sample_input: Any, *, seed: int = 0) -> Summary:
    """Keras's `model.summary()` for `model` on `sample_input` (an array, or a dict as `training.fit` takes).

    `str(result)` is the table Keras prints; `result.rows` and the totals are its data. Params are the 'params'
    collection (trainable); any other collection (e.g. batch statistics) counts as non-trainable.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a flax.linen Module, got {type(model).__name__}")
    if sample_input is None or not jax.tree.leaves(sample_input):
        raise ValueError(
            f"sample_input must be a batch of inputs (an array, or a dict as fit takes), got {sample_input!r}"
        )
    sample_input = checks.inputs("sample_input", sample_input)
    interceptor, layers = _recorder()

    def init(inputs: Any, **kwargs: Any) -> Any:
        return model.init(jax.random.key(seed), inputs, **kwargs)

    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(lambda: core.apply_inputs(init, sample_input))
    params = dict(variables.get("params", {}))
    owner = {name: layer["inside"] or name for name, layer in layers.items()}
    rows = []
    for name, layer in layers.items():
        if layer["inside"] is not None:
            continue
        folded = [inner for inner, top in owner.items() if top == name and inner != name]
        kind = layer["type"] + "".join(f"[{layers[inner]['type']}]" for inner in folded)
        count = sum(_count(params.get(part, {}))[0] for part in (name, *folded))
        rows.append(Row(name, kind, _shape(layer["output"]), count))
    rows += [Row(name, "params", "-", _count(tree)[0]) for name, tree in params.items() if name not in owner]
    trainable, trainable_bytes = _count(params)
    others = {k: v for k, v in variables.items() if k != "params"}
    non_trainable, non_trainable_bytes = _count(others)
    return Summary(type(model).__name__, tuple(rows), trainable, non_trainable, trainable_bytes, non_trainable_bytes)
