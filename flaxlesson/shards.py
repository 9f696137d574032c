"""Writing datasets as ArrayRecord shards that `streaming.StreamingDataset` reads.

Each example is one record (see `streaming.encode_record`) of numeric fields: the model's input ('image', uint8
(height, width, channels) images, or 'x', any array), its 'label' (a class index, a one-hot row, any shape) and
any extra fields, e.g. an RNN's 'seq_lengths'. Examples are written as they come, a shard at a time, so a set
larger than memory can be written from chunks. A writer holds a lock on its folder; metadata.json (each field's
shape, dtype and range) is written last and atomically, once every shard is on disk (fsync), so a folder whose
writing did not finish, or was lost to a crash, is refused by the reader rather than read short, and a write
that fails (a full disk, Ctrl-C) removes its shards. Flushing each shard as it closes also pays the disk writes
inside the write: a set written just before training is not written back to disk while the training runs. Sources:
arrays, an IDX folder, a TFDS split.
"""

import contextlib
import dataclasses
import fcntl
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python import array_record_module

from flaxlesson import data, datasets, results, streaming

log = logging.getLogger(__name__)

# One record per group: a random read then decompresses only its record (grain's advice for random access).
DEFAULT_OPTIONS = "group_size:1,uncompressed"
DEFAULT_RECORDS_PER_SHARD = 10_000
LOCK_FILE = ".writing.lock"  # held (flock) by the one writer of a folder while it writes


class ShardWriteError(OSError):
    """Shards that could not be written (a full disk, a failing device): names the folder; partial files removed."""


def shard_name(index: int) -> str:
    """The file name of shard `index`."""
    return f"shard-{index:05d}.array_record"


def _lock(folder: Path) -> int:
    """An exclusive lock on `folder`'s lock file (released by the kernel if this process dies); its descriptor."""
    fd = os.open(folder / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"out_dir: {folder} is being written by another ShardWriter (it holds {LOCK_FILE}); "
            "wait for it to finish or choose another folder"
        ) from None
    return fd


def _check_fields(fields: Mapping[str, streaming.Field]) -> dict[str, streaming.Field]:
    """Fields a record can hold: numeric arrays (a string field would not read back; encode it as ids)."""
    other = {name: field.dtype.str for name, field in fields.items() if field.dtype.kind not in streaming.NUMERIC_KINDS}
    if other:
        raise ValueError(
            f"fields: shards hold numeric arrays only, got {other}; encode strings as integer ids, e.g. "
            "names, ids = np.unique(values, return_inverse=True)"
        )
    if not fields:
        raise ValueError("fields: a record needs at least one field")
    return dict(fields)


@dataclasses.dataclass
class _Range:
    """One field's smallest and largest finite value so far, the rows holding them, and its first non-finite row."""

    low: Any = None
    high: Any = None
    min_row: int | None = None
    max_row: int | None = None
    nonfinite_row: int | None = None

    def update(self, values: np.ndarray, first_row: int) -> None:
        """Take in a chunk of rows that begins at row `first_row`."""
        flat = values.reshape(len(values), -1)
        if not flat.size:
            return
        lows = highs = flat
        if flat.dtype.kind == "f" and not np.isfinite(flat).all():
            finite = np.isfinite(flat)
            if self.nonfinite_row is None:
                self.nonfinite_row = first_row + int(np.argmin(finite.all(axis=1)))
            if not finite.any():
                return
            lows, highs = np.where(finite, flat, np.inf), np.where(finite, flat, -np.inf)
        lows, highs = lows.min(axis=1), highs.max(axis=1)
        i, j = int(np.argmin(lows)), int(np.argmax(highs))
        if self.low is None or lows[i] < self.low:
            self.low, self.min_row = lows[i].item(), first_row + i
        if self.high is None or highs[j] > self.high:
            self.high, self.max_row = highs[j].item(), first_row + j

    def to_json(self) -> dict[str, Any]:
        """As stored in metadata.json's "ranges"."""
        return {
            "min": self.low,
            "max": self.high,
            "min_row": self.min_row,
            "max_row": self.max_row,
            "nonfinite_row": self.nonfinite_row,
        }


class ShardWriter:
    """Writes examples, a chunk at a time, into shards of `records_per_shard` records, then metadata.json.

    `fields` maps each field name to its `streaming.Field`; every chunk passed to `write` holds each field with
    one more leading (example) axis. Use it as a context manager: leaving the block without an error closes the
    last shard and writes the metadata; leaving it with one (Ctrl-C included) removes the shards it wrote. A
    folder is written by one writer at a time (a lock), and never into one that already holds shards.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        fields: Mapping[str, streaming.Field],
        *,
        records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
        options: str = DEFAULT_OPTIONS,
        class_names: tuple[str, ...] | None = None,
        source: str = "",
    ):
        if isinstance(records_per_shard, bool) or not isinstance(records_per_shard, int) or records_per_shard < 1:
            raise ValueError(f"records_per_shard must be a positive integer, got {records_per_shard!r}")
        self.fields = _check_fields(fields)
        self.out_dir = Path(out_dir)
        self.records_per_shard, self.options = records_per_shard, options
        self.class_names, self.source = class_names, source
        self.counts: list[int] = []
        self.ranges = {name: _Range() for name in self.fields}
        self._writer: Any = None
        self._created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock: int | None = _lock(self.out_dir)
        finished = (self.out_dir / streaming.METADATA_FILE).exists()
        if finished or any(self.out_dir.glob("shard-*.array_record")):
            self._release()
            what = "shards" if finished else f"shards but no {streaming.METADATA_FILE} (a write killed before it ended)"
            raise ValueError(f"out_dir: {out_dir} already holds {what}; remove them or choose another folder")

    def write(self, examples: Mapping[str, np.ndarray]) -> None:
        """Append a chunk of examples: each field an array of shape (n, *field.shape) of the field's dtype."""
        if self._lock is None:
            raise ValueError(f"out_dir: the writer of {self.out_dir} is closed")
        arrays = self._checked(examples)
        first = sum(self.counts)
        for name, value in arrays.items():
            self.ranges[name].update(value, first)
        with self._removed_on_failure():
            for i in range(len(next(iter(arrays.values())))):
                if self._writer is None or self.counts[-1] == self.records_per_shard:
                    self._next_shard()
                self._writer.write(streaming.encode_record({name: arrays[name][i] for name in self.fields}))
                self.counts[-1] += 1

    def _checked(self, examples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A chunk's arrays, each of its field's shape and dtype, all of one length."""
        if set(examples) != set(self.fields):
            raise ValueError(f"examples: fields {sorted(examples)}, expected {sorted(self.fields)}")
        arrays = {name: np.asarray(value) for name, value in examples.items()}
        lengths = {len(value) if value.ndim else -1 for value in arrays.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise ValueError(f"examples: every field needs the same leading length, got {sorted(lengths)}")
        for name, field in self.fields.items():
            if arrays[name].shape[1:] != field.shape or arrays[name].dtype != field.dtype:
                raise ValueError(
                    f"examples: {name!r} is {arrays[name].dtype.name}{arrays[name].shape[1:]} per example, "
                    f"expected {field.dtype.name}{field.shape}"
                )
        return arrays

    def _close_shard(self) -> None:
        """Close the open shard and flush it to disk."""
        writer, self._writer = self._writer, None
        writer.close()
        results.sync(self.out_dir / shard_name(len(self.counts) - 1))

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._close_shard()
        self.counts.append(0)
        self._writer = array_record_module.ArrayRecordWriter(
            str(self.out_dir / shard_name(len(self.counts) - 1)), self.options
        )

    @contextlib.contextmanager
    def _removed_on_failure(self) -> Iterator[None]:
        """Writing to disk: a failure (a full disk) removes what was written and raises one ShardWriteError."""
        try:
            yield
        except (OSError, RuntimeError) as e:  # ArrayRecord reports a failed write as a RuntimeError
            self.abort()
            raise ShardWriteError(f"{self.out_dir}: writing shards failed, the partial shards removed ({e})") from None

    def close(self) -> Path:
        """Close the last shard and write metadata.json (atomically, last); returns the folder."""
        if self._lock is None:
            raise ValueError(f"out_dir: the writer of {self.out_dir} is closed")
        if not self.counts:
            self.abort()
            raise ValueError("examples: nothing was written; a shard folder needs at least one example")
        with self._removed_on_failure():
            self._close_shard()
            results.sync(self.out_dir)  # the shards' names, before the metadata that lists them
            results.write_json(self.out_dir / streaming.METADATA_FILE, self._metadata())
        self._release()
        log.info("wrote %d examples in %d shards to %s", sum(self.counts), len(self.counts), self.out_dir)
        return self.out_dir

    def _metadata(self) -> dict[str, Any]:
        return {
            "format": streaming.FORMAT,
            "num_examples": sum(self.counts),
            "fields": {name: field.to_json() for name, field in self.fields.items()},
            "ranges": {name: value.to_json() for name, value in self.ranges.items()},
            "shards": [{"file": shard_name(i), "num_records": n} for i, n in enumerate(self.counts)],
            "class_names": list(self.class_names) if self.class_names else None,
            "source": self.source,
            "options": self.options,
        }

    def abort(self) -> None:
        """Stop writing: close the open shard (its own error, e.g. the disk still full, ignored), remove the shards.

        A writer already closed keeps its finished set.
        """
        if self._lock is None:
            return
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with contextlib.suppress(RuntimeError, OSError):
                writer.close()
        for index in range(len(self.counts)):
            (self.out_dir / shard_name(index)).unlink(missing_ok=True)
        self.counts = []
        self._release()
        if self._created:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                self.out_dir.rmdir()

    def _release(self) -> None:
        """Remove the lock file, then unlock: a writer that opened it meanwhile finds the folder's state itself."""
        if self._lock is not None:
            (self.out_dir / LOCK_FILE).unlink(missing_ok=True)
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if self._lock is None:  # closed, or aborted by the failure now leaving the block
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()


def image_fields(image_shape: tuple[int, ...], extra: Mapping[str, np.ndarray] | None = None) -> dict:
    """The fields of an image dataset: uint8 images of `image_shape` (HWC), int32 labels, and `extra`'s rows."""
    extra = extra or {}
    _check_extra_names(extra, ())
    return {
        streaming.IMAGE: streaming.Field(tuple(image_shape), np.dtype(np.uint8)),
        streaming.LABEL: streaming.Field((), np.dtype(np.int32)),
        **{name: streaming.Field(np.shape(value)[1:], np.asarray(value).dtype) for name, value in extra.items()},
    }


def _check_extra_names(extra: Mapping[str, Any], inputs: Any) -> None:
    clash = set(extra) & (set(streaming.RESERVED_FIELDS) | set(inputs))
    if clash:
        raise ValueError(
            f"extra: field names {sorted(clash)} are reserved or taken by x ({list(streaming.RESERVED_FIELDS)})"
        )


def _input_field(x: Any) -> tuple[str, np.ndarray]:
    """The main input's field: uint8 (N, H, W[, C]) images as 'image' (NHWC), any other numeric array as 'x'."""
    x = np.asarray(x)
    if x.dtype == np.uint8 and x.ndim in (3, 4):
        return streaming.IMAGE, x[..., None] if x.ndim == 3 else x
    return streaming.INPUT, x


def _labels(y: Any, n: int) -> np.ndarray:
    """One label per example, any shape: integer labels as int32 (checked to lie in [0, 2**31)), others as given."""
    y = np.asarray(y)
    if y.ndim == 0 or len(y) != n or y.dtype.kind not in streaming.NUMERIC_KINDS:
        raise ValueError(f"y: needs {n} numeric labels (one per example), got {y.dtype}{y.shape}")
    if y.dtype.kind in "iu":
        if y.size and (y.min() < 0 or y.max() > np.iinfo(np.int32).max):
            raise ValueError(f"y: integer labels must lie in [0, 2**31), got {y.min()} to {y.max()}")
        return y.astype(np.int32)
    return y


def _columns(x: Any, y: Any, extra: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """`fit`'s (x, y) and `extra` as the shards' fields, one row per example each."""
    inputs = dict(x) if isinstance(x, Mapping) else {streaming.INPUT: x}
    if streaming.INPUT not in inputs:
        raise ValueError(f"x: a dict of inputs needs its main input under 'x', as fit takes it; got {sorted(inputs)}")
    extra = dict(extra or {})
    _check_extra_names(extra, inputs)
    name, main = _input_field(inputs.pop(streaming.INPUT))
    if main.ndim == 0:
        raise ValueError(f"x: needs one row per example, got shape {main.shape}")
    columns = {name: main, streaming.LABEL: _labels(y, len(main))}
    for key, value in {**inputs, **extra}.items():
        value = np.asarray(value)
        if value.ndim == 0 or len(value) != len(main):
            raise ValueError(f"{key}: needs one row per example ({len(main)}), got shape {value.shape}")
        columns[key] = value
    return columns


def write_arrays(
    out_dir: str | os.PathLike,
    x: Any,
    y: Any,
    *,
    extra: Mapping[str, np.ndarray] | None = None,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    class_names: tuple[str, ...] | None = None,
    source: str = "arrays",
) -> Path:
    """`fit`'s in-memory (x, y) as a shard folder, whose streamed fit trains as `fit(x, y)` does.

    `x` is an array (uint8 (N, H, W[, C]) images are stored as the 'image' field, a channel axis added; any other
    numeric array as 'x': float features, sequences) or a dict whose 'x' is the input and the rest its keyword
    inputs (an RNN's 'seq_lengths'); `y` is one label per example of any shape (class indices, one-hot rows);
    `extra` adds per-example fields. Non-numeric fields (strings) are refused: they would not read back.
    """
    columns = _columns(x, y, extra)
    fields = {name: streaming.Field(value.shape[1:], value.dtype) for name, value in columns.items()}
    n = len(columns[streaming.LABEL])
    with ShardWriter(
        out_dir, fields, records_per_shard=records_per_shard, class_names=class_names, source=source
    ) as writer:
        for start in range(0, n, records_per_shard):
            writer.write({name: value[start : start + records_per_shard] for name, value in columns.items()})
    return Path(out_dir)


def write_idx(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "train",
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
) -> Path:
    """One split ('train' or 'test') of a folder of MNIST-format IDX files (as `data.load_idx` reads) as shards."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths, missing = data.idx_paths(data_dir)
    if missing:
        raise ValueError(f"data_dir: {data_dir} lacks {', '.join(missing)} (or the same without .gz)")
    images, labels = data.read_idx(paths[f"x_{split}"]), data.read_idx(paths[f"y_{split}"])
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"data_dir: {paths[f'x_{split}']} holds {images.dtype}{images.shape}, not uint8 (N, H, W)")
    datasets.check_idx_labels({paths[f"y_{split}"]: labels})
    return write_arrays(
        out_dir, images, labels, records_per_shard=records_per_shard, source=f"idx files in {data_dir}, {split}"
    )


def write_tfds(
    name: str,
    split: str,
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
) -> Path:
    """A prepared TFDS split's images and labels as shards, read through `tfds.data_source` a shard at a time."""
    records = streaming.TfdsReader(name, split, data_dir)
    image = records.fields[streaming.IMAGE]
    if image.dtype != np.uint8 or len(image.shape) != 3:
        raise ValueError(f"name: TFDS dataset {name!r} has {image.dtype.name}{image.shape} images, not uint8 HWC")
    with ShardWriter(
        out_dir,
        image_fields(image.shape),
        records_per_shard=records_per_shard,
        class_names=records.class_names,
        source=f"TFDS {name} {split} in {data_dir}",
    ) as writer:
        for start in range(0, len(records), records_per_shard):
            chunk = records.read(np.arange(start, min(start + records_per_shard, len(records))))
            labels = _labels(chunk[streaming.LABEL], len(chunk[streaming.IMAGE]))
            writer.write({streaming.IMAGE: chunk[streaming.IMAGE], streaming.LABEL: labels})
    return Path(out_dir)
