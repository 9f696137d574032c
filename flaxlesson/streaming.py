"""Datasets larger than memory: records on disk, streamed as the batches `data.iterate_batches` makes.

A `StreamingDataset` reads a folder of ArrayRecord shards (written by `flaxlesson.shards`) or a prepared TFDS
split (through `tfds.data_source`), and never holds more than the batches in flight. Each record holds a model
input (field 'image' or 'x'), a 'label' and any other fields (e.g. an RNN's 'seq_lengths'), which join the input
as the dict `fit` takes. Its `batches(...)` yields exactly the dicts that `data.iterate_batches` yields over the
same arrays held in memory, uint8 inputs scaled to [0, 1] on both paths (`sources.scaled_inputs`): the same
order, padding, mask and per-process share, since both cut the row numbers with `batching.Layout` in
`batching.epoch_order`. So a streaming fit and an in-memory fit are the same computation and can be checked against
each other to rounding, and an in-memory run resumed from a streaming one (or back) continues the same sequence.
Grain runs the reading and decoding, in worker processes when asked, ahead of use.

A shard folder holds `metadata.json` (fields with their shapes and dtypes, the example count, each shard's file
and record count, each field's range and the rows holding its extremes) beside its shards; opening checks every
shard against it, and reading checks every record, so a missing, truncated or damaged shard, or records of
another shape, raise a `ShardError` that names the file.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import absl.flags
import grain
import msgpack
import numpy as np
from array_record.python import array_record_module

from flaxlesson import batching, checks, datasets, sources

METADATA_FILE = "metadata.json"
FORMAT = "flaxlesson-shards/1"
IMAGE, LABEL, INPUT = "image", "label", "x"
# Names an extra field cannot take: the input fields ("x" is also the input's key in a batch's dict), the label.
RESERVED_FIELDS = (INPUT, IMAGE, LABEL)
NUMERIC_KINDS = "biuf"  # dtype kinds a record may hold: what a model takes (strings do not round-trip as fields)


class ShardError(ValueError):
    """Shards on disk that disagree with their metadata (missing, truncated, other records); names the file."""


@dataclasses.dataclass(frozen=True)
class Field:
    """The shape and dtype of one field of every record (an example's image, label, or extra value)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def to_json(self) -> dict[str, Any]:
        """As stored in metadata.json: the shape as a list, the dtype as numpy's exact string (e.g. '|u1')."""
        return {"shape": list(self.shape), "dtype": np.dtype(self.dtype).str}

    @classmethod
    def from_json(cls, spec: Mapping[str, Any]) -> "Field":
        """The inverse of `to_json`."""
        return cls(tuple(int(n) for n in spec["shape"]), np.dtype(spec["dtype"]))


def encode_record(example: Mapping[str, np.ndarray]) -> bytes:
    """One example (field name -> array) as one record: msgpack of [shape, dtype, raw bytes] per field."""
    return msgpack.packb(
        {
            name: [list(value.shape), value.dtype.str, np.ascontiguousarray(value).tobytes()]
            for name, value in example.items()
        },
        use_bin_type=True,
    )


def decode_record(raw: bytes, fields: Mapping[str, Field]) -> dict[str, np.ndarray]:
    """The arrays of one record, checked against `fields`; a ValueError says what differs."""
    try:
        stored = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise ValueError(f"not a record of this format ({type(e).__name__}: {e})") from e
    if not isinstance(stored, dict) or set(stored) != set(fields):
        names = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
        raise ValueError(f"holds fields {names}, expected {sorted(fields)}")
    example = {}
    for name, field in fields.items():
        shape, dtype, raw_value = stored[name]
        if tuple(shape) != field.shape or dtype != field.dtype.str:
            raise ValueError(
                f"field {name!r} is {np.dtype(dtype).name} of shape {tuple(shape)}, "
                f"expected {field.dtype.name} of shape {field.shape}"
            )
        if len(raw_value) != math.prod(field.shape) * field.dtype.itemsize:
            raise ValueError(f"field {name!r} holds {len(raw_value)} bytes, not one {field.dtype.name}{field.shape}")
        example[name] = np.frombuffer(raw_value, field.dtype).reshape(field.shape)
    return example


class RecordLayout:
    """Where each field's bytes lie in the records `encode_record` makes of examples of `fields`, in their order.

    Those records differ only in the fields' bytes, so a batch of them is checked by comparing every other byte
    with one template record, and decoded by slicing one array: no record is parsed on its own.
    """

    def __init__(self, fields: Mapping[str, Field]):
        self.fields = dict(fields)
        sizes = {name: math.prod(field.shape) * field.dtype.itemsize for name, field in self.fields.items()}

        def encoded(marked: str | None) -> np.ndarray:
            """A record whose `marked` field's bytes are all 0xff, every other field's 0."""
            example = {
                name: np.frombuffer((b"\xff" if name == marked else b"\x00") * sizes[name], field.dtype).reshape(
                    field.shape
                )
                for name, field in self.fields.items()
            }
            return np.frombuffer(encode_record(example), np.uint8)

        self.template = encoded(None)
        self.spans, self.header = {}, np.ones(self.template.size, bool)
        for name in self.fields:
            start = int(np.argmax(encoded(name) != self.template))  # where the field's bytes begin
            self.spans[name] = slice(start, start + sizes[name])
            self.header[self.spans[name]] = False

    def decode(self, raws: Sequence[bytes]) -> dict[str, np.ndarray] | None:
        """The records' fields stacked, or None when any record is not laid out so (`decode_record` says why)."""
        if any(len(raw) != self.template.size for raw in raws):
            return None
        rows = np.frombuffer(b"".join(raws), np.uint8).reshape(len(raws), self.template.size)
        if not (rows[:, self.header] == self.template[self.header]).all():
            return None
        return {
            name: rows[:, self.spans[name]].copy().view(field.dtype).reshape(len(raws), *field.shape)
            for name, field in self.fields.items()
        }


class Records(Protocol):
    """Random access to stored examples: what a `StreamingDataset` reads from."""

    fields: dict[str, Field]
    class_names: tuple[str, ...] | None

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, each field stacked along a new leading axis."""
        ...


def _stack(examples: Sequence[Mapping[str, np.ndarray]], fields: Mapping[str, Field]) -> dict[str, np.ndarray]:
    out = {name: np.empty((len(examples), *field.shape), field.dtype) for name, field in fields.items()}
    for i, example in enumerate(examples):
        for name in fields:
            out[name][i] = example[name]
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """A shard folder's metadata.json, checked for the keys and counts readers rely on; errors name the file."""
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise ShardError(f"{file}: no such file; a shard folder needs the metadata.json that flaxlesson.shards writes")
    try:
        meta = json.loads(file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        fields = {name: Field.from_json(spec) for name, spec in meta["fields"].items()}
        counts = [int(shard["num_records"]) for shard in meta["shards"]]
        files = [str(shard["file"]) for shard in meta["shards"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{file}: not valid shard metadata ({type(e).__name__}: {e})") from e
    if not fields or not files or sum(counts) != meta.get("num_examples") or min(counts) < 1:
        raise ShardError(
            f"{file}: needs fields and shards of at least one record each that add up to num_examples; "
            f"got fields {sorted(fields)}, shard record counts {counts}, num_examples {meta.get('num_examples')}"
        )
    outside = [name for name in files if Path(name).name != name or name in ("", ".", "..")]
    if outside:
        raise ShardError(f"{file}: shard files must be plain file names inside {file.parent}, got {outside}")
    return {**meta, "fields": fields, "counts": counts, "files": files, "check_rows": _check_rows(file, meta)}


def _check_rows(file: Path, meta: Mapping[str, Any]) -> list[int]:
    """The rows `ranges` names (each field's smallest, largest and first non-finite value), checked; [] if none."""
    ranges = meta.get("ranges") or {}
    try:
        rows = [spec[key] for spec in ranges.values() for key in ("min_row", "max_row", "nonfinite_row")]
    except (TypeError, KeyError, AttributeError) as e:
        raise ShardError(f"{file}: not valid field ranges ({type(e).__name__}: {e})") from e
    rows = [row for row in rows if row is not None]
    if any(isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < meta["num_examples"] for row in rows):
        raise ShardError(f"{file}: field ranges name rows outside [0, {meta['num_examples']}): {rows}")
    return sorted(set(rows))


def _open_shard(file: Path, count: int, fields: Mapping[str, Field], options: str) -> Any:
    """An open reader of one shard, once checked: the file holds `count` records and its first fits `fields`.

    A truncated file holds none; a missing, short or foreign one raises a ShardError naming it.
    """
    if not file.is_file():
        raise ShardError(f"{file}: missing shard ({METADATA_FILE} lists it with {count} records)")
    try:
        reader = array_record_module.ArrayRecordReader(str(file), options)
        found = reader.num_records()
        first = reader.read([0])[0] if found == count else None
    except RuntimeError as e:
        raise ShardError(f"{file}: not a readable ArrayRecord file, e.g. a truncated one ({e})") from e
    problem = None
    if found != count:
        problem = (
            f"holds {found} readable records but {METADATA_FILE} says {count} "
            "(a truncated, partly written or replaced shard)"
        )
    else:
        try:
            decode_record(first, fields)
        except ValueError as e:
            problem = f"record 0 {e}"
    if problem:
        with contextlib.suppress(RuntimeError):  # a damaged file's reader may refuse to close
            reader.close()
        raise ShardError(f"{file}: {problem}")
    return reader


class ShardReader:
    """Random access to the records of a shard folder, checked against its metadata.json when opened.

    Each thread (and each grain worker process) reads through its own open readers: a reader's seek-then-read
    is stateful. The thread that opens the folder keeps the readers that checked it (240 of them for a 2.4
    million-image set took 0.2-0.4 s to open, once); any other thread opens its own on first use. Picklable: a
    worker process gets a copy without the open readers.
    """

    # ArrayRecord's advice for random access. Its batched `read(indices)` hands every record to a global pool of
    # threads; one seek and read at a time, in the calling thread, read 64 random records 3.7x faster on a 2-core
    # machine, and leaves the other cores to the training step.
    OPTIONS = "readahead_buffer_size:0,max_parallelism:0"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"path: {path} is not a directory of shards")
        meta = read_metadata(self.path)
        self.fields: dict[str, Field] = meta["fields"]
        self.class_names = tuple(meta["class_names"]) if meta.get("class_names") else None
        self.files = [self.path / name for name in meta["files"]]
        self.counts = meta["counts"]
        self.check_rows: list[int] = meta["check_rows"]
        """Rows holding each field's smallest, largest and first non-finite value, as the writer recorded them."""
        self._local = threading.local()
        self._local.readers = [
            _open_shard(file, count, self.fields, self.OPTIONS) for file, count in zip(self.files, self.counts)
        ]
        self._ends = np.cumsum(self.counts)
        self._starts = self._ends - np.asarray(self.counts)  # each shard's first record
        self._layout = RecordLayout(self.fields)

    def __getstate__(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if key != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=threading.local())

    def _readers(self) -> list:
        """This thread's reader of each shard (None until first used)."""
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = [None] * len(self.files)
        return readers

    def __len__(self) -> int:
        return int(self._ends[-1])

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The records at `indices`, decoded and stacked; a ShardError names the file of a record that does not fit."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        shards = np.searchsorted(self._ends, indices, side="right")
        positions = (indices - self._starts[shards]).tolist()
        raws, readers = [], self._readers()
        for shard, position in zip(shards.tolist(), positions, strict=True):
            try:
                reader = readers[shard]
                if reader is None:
                    reader = readers[shard] = array_record_module.ArrayRecordReader(
                        str(self.files[shard]), self.OPTIONS
                    )
                reader.seek(position)
                raws.append(reader.read())
            except RuntimeError as e:  # a damaged or replaced file: ArrayRecord's checksums refuse the chunk
                raise ShardError(f"{self.files[shard]}: record {position} cannot be read, a damaged shard ({e})") from e
        decoded = self._layout.decode(raws)
        if decoded is not None:
            return decoded
        examples = []
        for shard, position, raw in zip(shards.tolist(), positions, raws, strict=True):
            try:
                examples.append(decode_record(raw, self.fields))
            except ValueError as e:
                raise ShardError(f"{self.files[shard]}: record {position} {e}") from e
        return _stack(examples, self.fields)


class TfdsReader:
    """Random access to a prepared TFDS split through `tfds.data_source`: its image and label features.

    Nothing is converted or copied: records are read from TFDS's own ArrayRecord files as they are needed.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None):
        import tensorflow_datasets as tfds

        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # any failure to find or open it: say what it needs
            raise datasets.DatasetUnavailableError(
                f"TFDS dataset {name!r} split {split!r} cannot be read from data_dir {data_dir} "
                f"({type(e).__name__}: {e}); it must be prepared there as array_record"
            ) from e
        if not len(self._source):
            raise ValueError(f"split: TFDS dataset {name!r} split {split!r} holds no examples")
        first = self._source[0]
        missing = {IMAGE, LABEL} - set(first)
        if missing:
            raise ValueError(f"name: TFDS dataset {name!r} has no {sorted(missing)} feature, got {sorted(first)}")
        self.fields = {key: Field(np.shape(first[key]), np.asarray(first[key]).dtype) for key in (IMAGE, LABEL)}
        features = self._source.dataset_info.features
        self.class_names = tuple(features[LABEL].names) if hasattr(features[LABEL], "names") else None

    def __len__(self) -> int:
        return len(self._source)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `indices`, their image and label stacked."""
        return _stack([self._source[int(i)] for i in indices], self.fields)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a batch iterator reads: every epoch's rows, cut by `batching.Layout` in `batching.epoch_order`."""

    layout: batching.Layout
    seed: int
    shuffle: bool

    def step_rows(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The row numbers and mask of one step of one epoch."""
        return self.layout.step_rows(_epoch_order(self, epoch), step)


@functools.lru_cache(maxsize=2)
def _epoch_order(plan: Plan, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s order of the row numbers (n int64s, never the data), kept while its steps are read."""
    return batching.epoch_order(plan.layout.num_examples, seed=plan.seed, epoch=epoch, shuffle=plan.shuffle)


def _to_batch(examples: dict[str, np.ndarray]) -> batching.Batch:
    """Decoded examples as `iterate_batches` gives them from `fit`'s arrays: the input, alone or as a dict, under 'x'.

    The input field ('image' or 'x') goes under 'x', uint8 scaled to [0, 1] as in memory; other fields join it as
    a dict's keyword inputs (e.g. 'seq_lengths'); integer labels are int32, as `write_arrays` checked they fit.
    """
    main = IMAGE if IMAGE in examples else INPUT
    x = sources.scaled_images(examples[main])
    extras = {name: value for name, value in examples.items() if name not in (main, LABEL)}
    y = examples[LABEL]
    return {"x": {"x": x, **extras} if extras else x, "y": y.astype(np.int32) if y.dtype.kind in "iu" else y}


@dataclasses.dataclass(frozen=True)
class _LoadBatch:
    """Grain's map from a position (epoch * steps + step) to that batch: reads this process's rows, decodes."""

    records: Records
    first_row: int
    plan: Plan

    def __call__(self, position: int) -> batching.Batch:
        epoch, step = divmod(position, self.plan.layout.steps)
        rows, mask = self.plan.step_rows(epoch, step)
        batch = _to_batch(self.records.read(rows + self.first_row))
        return {"x": batch["x"], "mask": mask, "y": batch["y"]}


def _grain_worker_profiling_flag_readable() -> None:
    """Work around grain 0.2.18 reading an absl flag before absl parsed any (google/grain#1355, fixed after it).

    With JAX imported, `mp_prefetch` reads --grain_enable_multiprocess_worker_profiling, which absl refuses in a
    program that never parses flags; marking that one flag present keeps its default (off) and lets it be read,
    as grain itself does for the flags it passes to its workers.
    """
    flag = absl.flags.FLAGS["grain_enable_multiprocess_worker_profiling"]
    if not absl.flags.FLAGS.is_parsed():
        flag.present = True


def _owned(tree: Any) -> Any:
    """Plain numpy arrays of a batch: grain's workers hand over shared-memory arrays, released once copied."""
    if isinstance(tree, dict):
        return {key: _owned(value) for key, value in tree.items()}
    return tree if type(tree) is np.ndarray else np.array(tree)


def _check_count(name: str, value: Any, minimum: int) -> int:
    return checks.integer(name, value, low=minimum)


def _check_fields(fields: Mapping[str, Field]) -> None:
    """A streamable record: one input field ('image' or 'x'), a 'label', numeric fields only."""
    inputs = [name for name in (IMAGE, INPUT) if name in fields]
    if len(inputs) != 1:
        raise ValueError(f"source: needs one input field, {IMAGE!r} or {INPUT!r}, got fields {sorted(fields)}")
    if LABEL not in fields:
        raise ValueError(f"source: needs a {LABEL!r} field, got fields {sorted(fields)}")
    other = {name: field.dtype.name for name, field in fields.items() if field.dtype.kind not in NUMERIC_KINDS}
    if other:
        raise ValueError(f"source: fields must be numeric, got {other}")


def plan_batches(
    num_examples: int,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    pad_multiple: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
    num_epochs: int = 1,
) -> tuple[Plan, int, int]:
    """The `Plan` of a dataset's batches and the positions [start, stop) (epoch * steps + step) they cover, checked.

    Every streamed dataset (shards, an image folder) cuts its epochs here, as `data.iterate_batches` cuts arrays.
    """
    layout = batching.Layout(
        num_examples,
        _check_count("batch_size", batch_size, 1),
        _check_count("pad_multiple", pad_multiple, 1),
        _check_count("process_index", process_index, 0),
        _check_count("process_count", process_count, 1),
    )
    epoch, start_step = _check_count("epoch", epoch, 0), _check_count("start_step", start_step, 0)
    if start_step > layout.steps:
        raise ValueError(f"start_step must be at most the {layout.steps} steps of an epoch, got {start_step}")
    stop = (epoch + _check_count("num_epochs", num_epochs, 1)) * layout.steps
    return Plan(layout, _check_count("seed", seed, 0), bool(shuffle)), epoch * layout.steps + start_step, stop


def read_batches(
    load: Callable[[int], batching.Batch], start: int, stop: int, *, prefetch: int, worker_count: int
) -> "BatchIterator":
    """The batches `load(position)` gives at positions [start, stop), read by grain.

    `load` runs in grain's reading thread (`prefetch` batches ahead) or in `worker_count` worker processes.
    """
    loaded = grain.MapDataset.range(start, stop).map(load)
    threads = 1 if prefetch else 0
    pipeline = loaded.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    if worker_count:
        _grain_worker_profiling_flag_readable()
        pipeline = pipeline.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1))
        )
    return BatchIterator(pipeline, start, stop)


class BatchIterator(Iterator[batching.Batch]):
    """One process's batches of one or more epochs, from a grain pipeline started at the first one asked for.

    Every batch is a pure function of (seed, epoch, step, layout), so the pipeline starts at any position
    without reading the batches before it.
    """

    def __init__(self, pipeline: grain.IterDataset, position: int, stop: int):
        self._pipeline, self._position, self._stop = pipeline, position, stop
        self._iterator: Any = None

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> batching.Batch:
        if self._position >= self._stop:
            self.close()
            raise StopIteration
        if self._iterator is None:
            self._iterator = iter(self._pipeline)
        batch = _owned(next(self._iterator))
        self._position += 1
        return batch

    def __len__(self) -> int:
        """Batches left."""
        return self._stop - self._position

    def close(self) -> None:
        """Stop grain's prefetching (and its worker processes, if any)."""
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class StreamingDataset:
    """Inputs and labels read from disk as they are needed, batched exactly as `data.iterate_batches` does.

    `source` is a shard folder (see `flaxlesson.shards`) or any `Records`, e.g. `StreamingDataset.from_tfds`'s.
    `worker_count` grain processes read and decode batches (0: this process does, on a thread when
    `prefetch` > 0); `prefetch` batches are read ahead per worker. `rows` restricts it to a contiguous range
    of records (what `split` returns).

    The defaults read each batch in the calling thread when it is asked for. JAX dispatches steps
    asynchronously, so a fit reads the next batch while the device runs the last step: where the device is the
    host's own CPU that was the fastest setting (a reading thread took the cores from the step). An
    accelerator leaves the host's cores idle: give them `worker_count` processes there.
    """

    def __init__(
        self,
        source: str | os.PathLike | Records,
        *,
        worker_count: int = 0,
        prefetch: int = 0,
        rows: range | None = None,
    ):
        self.records = ShardReader(source) if isinstance(source, (str, os.PathLike)) else source
        self.worker_count = _check_count("worker_count", worker_count, 0)
        self.prefetch = _check_count("prefetch", prefetch, 0)
        _check_fields(self.records.fields)
        rows = range(len(self.records)) if rows is None else rows
        if rows.step != 1 or not 0 <= rows.start < rows.stop <= len(self.records):
            raise ValueError(f"rows: must be a non-empty range of step 1 within [0, {len(self.records)}), got {rows}")
        self.rows = rows

    @classmethod
    def from_tfds(
        cls,
        name: str,
        split: str,
        *,
        data_dir: str | os.PathLike | None = None,
        worker_count: int = 0,
        prefetch: int = 0,
    ) -> "StreamingDataset":
        """A prepared TFDS split (e.g. 'fashion_mnist', 'train'), read through `tfds.data_source`."""
        return cls(TfdsReader(name, split, data_dir), worker_count=worker_count, prefetch=prefetch)

    @property
    def num_examples(self) -> int:
        """How many examples (rows) this dataset, or this view of one, holds."""
        return len(self.rows)

    def __len__(self) -> int:
        return self.num_examples

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The label names, when the source records them."""
        return self.records.class_names

    def check_rows(self) -> np.ndarray:
        """This view's first row and those holding a field's extreme or first non-finite value, as recorded.

        What `fit` checks against the model before training, as it checks every row of arrays in memory: labels
        beyond the model's classes or NaN inputs are found from the writer's record without reading the set.
        """
        recorded = np.asarray(getattr(self.records, "check_rows", ()), np.int64)
        inside = recorded[(recorded >= self.rows.start) & (recorded < self.rows.stop)] - self.rows.start
        return np.unique(np.concatenate([[0], inside]))

    def take(self, indices: Sequence[int] | np.ndarray) -> batching.Batch:
        """Rows `indices` of this view in memory, decoded as in a batch ({'x', 'y'}, no mask): e.g. a model's sample."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and not (0 <= indices.min() and indices.max() < self.num_examples):
            raise ValueError(f"indices must lie in [0, {self.num_examples}), got {indices.min()} to {indices.max()}")
        return _to_batch(self.records.read(indices + self.rows.start))

    def split(self, validation_split: float) -> tuple["StreamingDataset", "StreamingDataset | None"]:
        """(train, validation) views: the LAST `validation_split` of the rows held out, as Keras's fit does.

        The rows are the ones `batching.train_validation_split` keeps for arrays (it is called on row numbers);
        the validation view is None when `validation_split` is 0.
        """
        n = self.num_examples
        (train, _), (validation, _) = batching.train_validation_split(np.arange(n), np.arange(n), validation_split)
        start = self.rows.start
        views = [
            StreamingDataset(
                self.records,
                worker_count=self.worker_count,
                prefetch=self.prefetch,
                rows=range(start + int(part[0]), start + int(part[-1]) + 1),
            )
            if len(part)
            else None
            for part in (train, validation)
        ]
        return views[0], views[1]

    def batches(self, batch_size: int, **layout: Any) -> BatchIterator:
        """Epoch `epoch`'s batches (and the next ones', up to `num_epochs`), from step `start_step` on.

        `layout` is `plan_batches`'s keywords (seed, epoch, shuffle, pad_multiple, process_index, process_count,
        start_step, num_epochs). The same dicts, in the same order, as `data.iterate_batches(x, y, batch_size,
        seed=, epoch=, shuffle=, ...)` over this data in memory; the batches before `start_step` are never read;
        each process reads only its own share of every global batch. Several epochs in one iterator keep its
        worker processes alive between them.
        """
        plan, start, stop = plan_batches(self.num_examples, batch_size, **layout)
        load = _LoadBatch(self.records, self.rows.start, plan)
        return read_batches(load, start, stop, prefetch=self.prefetch, worker_count=self.worker_count)
