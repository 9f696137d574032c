"""Argument checks shared by every public entry point: each raises a ValueError that names the argument."""

from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """Whether `value` is a Python or numpy integer (bools are not)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int, checked to lie in [low, high] (either bound optional)."""
    if is_int(value) and (low is None or value >= low) and (high is None or value <= high):
        return int(value)
    if high is not None:
        wanted = f"an integer in [{low if low is not None else '-inf'}, {high}]"
    elif low is not None:
        wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    else:
        wanted = "an integer"
    raise ValueError(f"{name} must be {wanted}, got {value!r}")


def positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1."""
    return integer(name, value, low=1)


def non_negative_int(name: str, value: Any) -> int:
    """`value` as an int >= 0."""
    return integer(name, value, low=0)


def positive_number(name: str, value: Any) -> float:
    """`value` as a float > 0: a time, a rate, a factor."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """`value` as a float in [0, 1): a share held out or dropped."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def one_of(name: str, value: Any, choices: Any) -> Any:
    """`value`, checked to be one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def count_or_epoch(name: str, value: Any) -> int | str:
    """`value` as an int >= 1, or the string 'epoch': how often something happens, in steps or once an epoch."""
    if value == "epoch":
        return value
    if isinstance(value, str) or not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer or 'epoch', got {value!r}")
    return int(value)
