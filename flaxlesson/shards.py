"""Writing image datasets as ArrayRecord shards that `streaming.StreamingDataset` reads.

Each example is one record (see `streaming.encode_record`): a uint8 (height, width, channels) image, an int32
label, and any extra fields. Examples are written as they come, a shard at a time, so a set larger than memory
can be written from chunks; metadata.json is written last, beside the shards, so a folder whose writing did not
finish is refused by the reader rather than read short. Sources: arrays, an IDX folder, a TFDS split.
"""

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python import array_record_module

from flaxlesson import data, results, streaming

log = logging.getLogger(__name__)

# One record per group: a random read then decompresses only its record (grain's advice for random access).
DEFAULT_OPTIONS = "group_size:1,uncompressed"
DEFAULT_RECORDS_PER_SHARD = 10_000


def shard_name(index: int) -> str:
    """The file name of shard `index`."""
    return f"shard-{index:05d}.array_record"


class ShardWriter:
    """Writes examples, a chunk at a time, into shards of `records_per_shard` records, then metadata.json.

    `fields` maps each field name to its `streaming.Field`; every chunk passed to `write` holds each field with
    one more leading (example) axis. Use it as a context manager: leaving the block without an error closes the
    last shard and writes the metadata; leaving it with one writes no metadata.
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
        self.out_dir = Path(out_dir)
        if (self.out_dir / streaming.METADATA_FILE).exists() or any(self.out_dir.glob("shard-*.array_record")):
            raise ValueError(f"out_dir: {out_dir} already holds shards; remove them or choose another folder")
        if isinstance(records_per_shard, bool) or not isinstance(records_per_shard, int) or records_per_shard < 1:
            raise ValueError(f"records_per_shard must be a positive integer, got {records_per_shard!r}")
        self.fields = dict(fields)
        self.records_per_shard, self.options = records_per_shard, options
        self.class_names, self.source = class_names, source
        self.counts: list[int] = []
        self._writer: Any = None
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, examples: Mapping[str, np.ndarray]) -> None:
        """Append a chunk of examples: each field an array of shape (n, *field.shape) of the field's dtype."""
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
        for i in range(lengths.pop()):
            if self._writer is None or self.counts[-1] == self.records_per_shard:
                self._next_shard()
            self._writer.write(streaming.encode_record({name: arrays[name][i] for name in self.fields}))
            self.counts[-1] += 1

    def _next_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = array_record_module.ArrayRecordWriter(
            str(self.out_dir / shard_name(len(self.counts))), self.options
        )
        self.counts.append(0)

    def close(self) -> Path:
        """Close the last shard and write metadata.json; returns the folder."""
        if not self.counts:
            raise ValueError("examples: nothing was written; a shard folder needs at least one example")
        self._writer.close()
        self._writer = None
        results.write_json(
            self.out_dir / streaming.METADATA_FILE,
            {
                "format": streaming.FORMAT,
                "num_examples": sum(self.counts),
                "fields": {name: field.to_json() for name, field in self.fields.items()},
                "shards": [{"file": shard_name(i), "num_records": n} for i, n in enumerate(self.counts)],
                "class_names": list(self.class_names) if self.class_names else None,
                "source": self.source,
                "options": self.options,
            },
        )
        log.info("wrote %d examples in %d shards to %s", sum(self.counts), len(self.counts), self.out_dir)
        return self.out_dir

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:
            self._writer.close()


def image_fields(image_shape: tuple[int, ...], extra: Mapping[str, np.ndarray] | None = None) -> dict:
    """The fields of an image dataset: uint8 images of `image_shape` (HWC), int32 labels, and `extra`'s rows."""
    extra = extra or {}
    clash = set(extra) & set(streaming.RESERVED_FIELDS)
    if clash:
        raise ValueError(f"extra: field names {sorted(clash)} are reserved ({list(streaming.RESERVED_FIELDS)})")
    return {
        streaming.IMAGE: streaming.Field(tuple(image_shape), np.dtype(np.uint8)),
        streaming.LABEL: streaming.Field((), np.dtype(np.int32)),
        **{name: streaming.Field(np.shape(value)[1:], np.asarray(value).dtype) for name, value in extra.items()},
    }


def _images_and_labels(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images (a channel axis added to NHW) and int32 labels, checked."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(
            f"images must be uint8 (N, H, W) or (N, H, W, C), got {images.dtype}{images.shape}; "
            "convert [0, 1] floats with (x * 255).round().astype(np.uint8)"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
        raise ValueError(f"labels must be {len(images)} integers (one per image), got {labels.dtype}{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise ValueError(f"labels must lie in [0, 2**31), got {labels.min()} to {labels.max()}")
    return (images[..., None] if images.ndim == 3 else images), labels.astype(np.int32)


def write_arrays(
    out_dir: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    extra: Mapping[str, np.ndarray] | None = None,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    class_names: tuple[str, ...] | None = None,
    source: str = "arrays",
) -> Path:
    """In-memory uint8 images, integer labels and optional extra per-example arrays, as a shard folder."""
    images, labels = _images_and_labels(images, labels)
    extra = {name: np.asarray(value) for name, value in (extra or {}).items()}
    for name, value in extra.items():
        if value.ndim == 0 or len(value) != len(images):
            raise ValueError(f"extra: {name!r} needs one row per image ({len(images)}), got shape {value.shape}")
    fields = image_fields(images.shape[1:], extra)
    with ShardWriter(
        out_dir, fields, records_per_shard=records_per_shard, class_names=class_names, source=source
    ) as writer:
        for start in range(0, len(images), records_per_shard):
            chunk = slice(start, start + records_per_shard)
            writer.write(
                {
                    streaming.IMAGE: images[chunk],
                    streaming.LABEL: labels[chunk],
                    **{name: value[chunk] for name, value in extra.items()},
                }
            )
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
            images, labels = _images_and_labels(chunk[streaming.IMAGE], chunk[streaming.LABEL])
            writer.write({streaming.IMAGE: images, streaming.LABEL: labels})
    return Path(out_dir)
