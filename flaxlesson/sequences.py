"""Keras's `pad_sequences`: variable-length sequences as one padded array."""

from typing import Any

import numpy as np

from flaxlesson import checks


def _check_side(name: str, side: Any) -> None:
    if side not in ("pre", "post"):
        raise ValueError(f'{name}: {name.capitalize()} type "{side}" not understood, expected "pre" or "post"')


def _check_fits_integer(name: str, values: Any, dtype: np.dtype) -> None:
    """Values bound for an integer dtype must be whole numbers in its range (where Keras would cut them silently)."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf" or values.size == 0:
        return
    if values.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
        raise ValueError(
            f"{name}: dtype {dtype} needs whole numbers, got non-integer values such as "
            f"{values[~(np.isfinite(values) & (values == np.round(values)))].flat[0]!r}; "
            f"pass dtype='float32' to keep them"
        )
    info = np.iinfo(dtype)
    if values.min() < info.min or values.max() > info.max:
        raise ValueError(f"{name}: values from {values.min()} to {values.max()} do not fit dtype {dtype}")


def pad_sequences(
    sequences: Any,
    maxlen: int | None = None,
    dtype: Any = "int32",
    padding: str = "pre",
    truncating: str = "pre",
    value: Any = 0.0,
) -> np.ndarray:
    """Keras's `pad_sequences`: a list of sequences as one (num_samples, maxlen, ...) array, padded with `value`.

    Same results as Keras for every padding/truncating mode. Where Keras would silently cut non-integer values to
    an integer `dtype`, this raises; a bad `padding`/`truncating` raises even when every sequence is empty (Keras
    only notices at a non-empty one); `maxlen=0` gives an empty (n, 0) array in every mode.
    """
    _check_side("padding", padding)
    _check_side("truncating", truncating)
    if maxlen is not None:
        checks.non_negative_int("maxlen", maxlen)
    try:
        dtype = np.dtype(dtype)
    except TypeError as error:
        raise ValueError(f"dtype: not a numpy dtype: {dtype!r}") from error
    if isinstance(value, str) and dtype.kind not in "OSU":
        raise ValueError(f"value: a string needs dtype=object (or a string dtype), got dtype {dtype}")
    if dtype.kind in "iu":
        _check_fits_integer("value", value, dtype)
    if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__"):
        raise ValueError(f"sequences must be a list of sequences, got {type(sequences).__name__}")

    lengths, sample_shape = [], None
    for i, sequence in enumerate(sequences):
        if isinstance(sequence, (str, bytes)) or not hasattr(sequence, "__len__"):
            raise ValueError(f"sequences[{i}] must be a sequence (list or array), got {sequence!r}")
        lengths.append(len(sequence))
        if sample_shape is None and len(sequence):
            sample_shape = np.asarray(sequence).shape[1:]
    sample_shape = sample_shape or ()
    if maxlen is None:
        if not lengths:
            raise ValueError("sequences: no sequences and no maxlen, so there is no length to pad to")
        maxlen = max(lengths)

    padded = np.full((len(lengths), maxlen, *sample_shape), value, dtype=dtype)
    for i, (sequence, length) in enumerate(zip(sequences, lengths)):
        kept = min(length, maxlen)
        if kept == 0:
            continue
        part = sequence[length - kept :] if truncating == "pre" else sequence[:kept]
        if dtype.kind in "iu":
            _check_fits_integer(f"sequences[{i}]", part, dtype)
        part = np.asarray(part, dtype=dtype)
        if part.shape[1:] != sample_shape:
            raise ValueError(
                f"sequences[{i}]: items of shape {part.shape[1:]}, expected {sample_shape} "
                f"as in the first non-empty sequence"
            )
        if padding == "post":
            padded[i, :kept] = part
        else:
            padded[i, maxlen - kept :] = part
    return padded
