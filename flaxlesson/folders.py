"""Image folders as Keras reads them: `image_dataset_from_directory`, files decoded by grain as they are needed.

A folder of images, one subfolder per class, is the most common form of a user's own large dataset. Keras's
`keras.utils.image_dataset_from_directory` lists it and this module keeps its decisions: the class names are the
sorted subfolder names (or `class_names`, in its order); the files of each class folder are walked recursively in
sorted order and taken by extension alone (.bmp .gif .jpeg .jpg .png); with `shuffle` the whole list is shuffled
once by `np.random.RandomState(seed)` before `validation_split` takes its LAST fraction for 'validation'. So the
same folder and seed give the same files, in the same order, on the same side of the split as Keras does.

What differs: images are decoded and resized by PIL (Keras's TensorFlow path uses tf.image, whose resized pixel
values differ slightly; an image already of `image_size` is its exact pixels either way), and the batches are cut
by `batching.Layout` in `batching.epoch_order`, the one batch and shuffle rule of every source here, so `fit`
reshuffles each epoch by its own `seed` (Keras's tf.data reshuffles within a buffer). Images come as float32 in
[0, 255], as Keras gives them: rescale in the model, as Keras's `Rescaling(1 / 255)` does, or write shards
(`write_directory`), which `streaming.StreamingDataset` reads scaled to [0, 1]. A file that cannot be decoded
(a corrupt .png) raises an `ImageFileError` that names it, when it is read, as Keras's tf.data raises.
"""

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flaxlesson import batching, checks, datasets, streaming

logger = logging.getLogger(__name__)

ALLOWLIST_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
"""The file types Keras's `image_dataset_from_directory` takes, matched on the lower-cased name's end."""

COLOR_MODES = {"grayscale": "L", "rgb": "RGB", "rgba": "RGBA"}
"""Keras's `color_mode` -> the PIL mode every image is converted to (1, 3 or 4 channels)."""

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos3": Image.Resampling.LANCZOS,
}
"""Keras's `interpolation` names that PIL has (its lanczos5, gaussian and mitchellcubic it has not)."""

LABEL_MODES = ("int", "categorical", "binary", None)
SUBSETS = ("training", "validation", "both")


class ImageFileError(ValueError):
    """A listed image file that PIL cannot decode; names the file."""


@dataclasses.dataclass(frozen=True)
class Decoder:
    """How each file becomes an image: PIL-decoded, converted to `mode`, resized to `image_size` (height, width)."""

    image_size: tuple[int, int]
    mode: str
    interpolation: str = "bilinear"
    crop_to_aspect_ratio: bool = False

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The centred box of the target's aspect ratio, as large as fits: Keras's `smart_resize` crop."""
        target_h, target_w = self.image_size
        crop_h = min(height, int(width * target_h / target_w))
        crop_w = min(width, int(height * target_w / target_h))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        return left, top, left + crop_w, top + crop_h

    def uint8(self, path: str) -> np.ndarray:
        """The image at `path` as uint8 (height, width, channels); an ImageFileError names a file PIL cannot read."""
        try:
            with Image.open(path) as image:  # a GIF opens at its first frame, as Keras truncates animations
                image = image.convert(self.mode)
                if self.crop_to_aspect_ratio:
                    image = image.crop(self.crop_box(*image.size))
                size = (self.image_size[1], self.image_size[0])  # PIL's (width, height)
                if image.size != size:
                    image = image.resize(size, INTERPOLATIONS[self.interpolation])
                pixels = np.asarray(image, np.uint8)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for truncated or unknown data
            raise ImageFileError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
        return pixels.reshape(*self.image_size, -1)

    def __call__(self, path: str) -> np.ndarray:
        """The image at `path` as float32 in [0, 255], as Keras's loader gives it."""
        return self.uint8(path).astype(np.float32)


@functools.lru_cache(maxsize=4)
@dataclasses.dataclass(frozen=True)
class _LoadBatch:
    """Grain's map from a position (epoch * steps + step) to that batch: this process's rows, decoded."""

    dataset: "FolderDataset"
    plan: streaming.Plan

    def __call__(self, position: int) -> batching.Batch:
        rows, mask = self.plan.step_rows(*divmod(position, self.plan.layout.steps))
        return {**self.dataset.take(rows), "mask": mask}


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed as itself: its labels are an array
class FolderDataset:
    """Image files and their labels, decoded as they are read: what `image_dataset_from_directory` returns.

    A `sources.Streamable`, so `fit`, `evaluate` and `predict` read it as they read a `StreamingDataset`:
    `batch_size` rows a step (Keras's dataset is batched; None leaves it to fit's `batch_size`), decoded by
    grain in this process (`prefetch` batches ahead on a thread) or in `worker_count` processes.
    `file_paths` and `class_names` are Keras's attributes; `labels` the class index of each file (None when
    `label_mode` is None), `label_mode` how a batch carries them. `shuffle` False keeps the files' order in every
    epoch whatever fit's `shuffle`, as Keras's unshuffled dataset does; True lets fit reshuffle each epoch.
    """

    file_paths: tuple[str, ...]
    labels: np.ndarray | None
    class_names: tuple[str, ...] | None
    label_mode: str | None
    decoder: Decoder
    batch_size: int | None = 32
    worker_count: int = 0
    prefetch: int = 0
    shuffle: bool = True

    @property
    def num_examples(self) -> int:
        """Files in this dataset (or this split of one)."""
        return len(self.file_paths)

    def __len__(self) -> int:
        return self.num_examples

    @property
    def has_labels(self) -> bool:
        """Whether batches carry 'y' (label_mode is not None)."""
        return self.label_mode is not None

    def encoded_labels(self, indices: np.ndarray) -> np.ndarray:
        """The labels of rows `indices` as `label_mode` says: int32 indices, one-hot float32, or float32 (n, 1)."""
        labels = self.labels[indices]
        if self.label_mode == "categorical":
            return batching.to_categorical(labels, len(self.class_names))
        if self.label_mode == "binary":
            return labels.astype(np.float32)[:, None]
        return labels.astype(np.int32)

    def take(self, indices: Sequence[int] | np.ndarray) -> batching.Batch:
        """Rows `indices` decoded in memory ({'x'} and, with labels, {'y'}; no mask): e.g. a model's sample."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if indices.size and not (0 <= indices.min() and indices.max() < self.num_examples):
            raise ValueError(f"indices must lie in [0, {self.num_examples}), got {indices.min()} to {indices.max()}")
        x = np.stack([self.decoder(self.file_paths[i]) for i in indices.tolist()])
        return {"x": x, "y": self.encoded_labels(indices)} if self.has_labels else {"x": x}

    def rows(self, rows: slice) -> "FolderDataset":
        """The files `rows` (a slice) as a dataset of their own, with the same settings."""
        labels = None if self.labels is None else self.labels[rows]
        return dataclasses.replace(self, file_paths=self.file_paths[rows], labels=labels)

    def split(self, validation_split: float) -> tuple["FolderDataset", "FolderDataset | None"]:
        """(train, validation): the LAST `validation_split` of the files held out, as fit's validation_split does."""
        n = self.num_examples
        (train, _), (validation, _) = batching.train_validation_split(np.arange(n), np.arange(n), validation_split)
        if not len(validation):
            return self, None
        return self.rows(slice(0, len(train))), self.rows(slice(len(train), n))

    def batches(self, batch_size: int, *, shuffle: bool = True, **layout: Any) -> streaming.BatchIterator:
        """Epoch `epoch`'s batches, as `streaming.StreamingDataset.batches` takes `layout` and cuts them."""
        plan, start, stop = streaming.plan_batches(
            self.num_examples, batch_size, shuffle=bool(shuffle) and self.shuffle, **layout
        )
        load = _LoadBatch(self, plan)
        return streaming.read_batches(load, start, stop, prefetch=self.prefetch, worker_count=self.worker_count)


def _class_folders(directory: str, class_names: Sequence[str] | None) -> list[str]:
    """Keras's classes: the sorted subfolders not starting with '.', or `class_names` (a subset, its order kept)."""
    subdirs = sorted(
        name for name in os.listdir(directory) if os.path.isdir(os.path.join(directory, name)) and name[0] != "."
    )
    if class_names is None:
        return subdirs
    if not set(class_names) <= set(subdirs):
        raise ValueError(f"class_names: {list(class_names)} are not all subfolders of {directory} ({subdirs})")
    return list(class_names)


def _image_files(folder: str, follow_links: bool) -> list[str]:
    """The image files under `folder`, walked recursively: folders in sorted order, files sorted in each."""
    walk = sorted(os.walk(folder, followlinks=follow_links), key=lambda entry: entry[0])
    return [
        os.path.join(root, name)
        for root, _, files in walk
        for name in sorted(files)
        if name.lower().endswith(ALLOWLIST_FORMATS)
    ]


def index_directory(
    directory: str | os.PathLike,
    labels: Any = "inferred",
    class_names: Sequence[str] | None = None,
    *,
    shuffle: bool = True,
    seed: int = 0,
    follow_links: bool = False,
) -> tuple[list[str], np.ndarray | None, tuple[str, ...] | None]:
    """(file paths, labels, class names) of a folder, listed and shuffled as Keras's loader lists them.

    `labels` 'inferred': a class per subfolder; a list: one integer per file of the whole folder in sorted walk
    order; None: no labels. With `shuffle`, paths and labels are permuted together by `np.random.RandomState(seed)`.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ValueError(f"directory: {directory} is not a folder")
    inferred = isinstance(labels, str) and labels == "inferred"
    folders = _class_folders(directory, class_names) if inferred else [""]
    per_class = [_image_files(os.path.join(directory, name), follow_links) for name in folders]
    paths = [path for files in per_class for path in files]
    if inferred:
        names = tuple(folders)
        labels = np.repeat(np.arange(len(folders), dtype=np.int32), [len(files) for files in per_class])
    elif labels is None:
        names = None
    else:
        if len(labels) != len(paths):
            raise ValueError(f"labels: {len(labels)} labels for the {len(paths)} image files in {directory}")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise ValueError(f"labels: must be integers, got dtype {labels.dtype}")
        names = tuple(str(label) for label in sorted(set(labels.tolist())))
        labels = labels.astype(np.int32)
    logger.info("Found %d files%s.", len(paths), "" if names is None else f" belonging to {len(names)} classes")
    if shuffle:
        order = np.arange(len(paths))
        np.random.RandomState(seed).shuffle(order)
        paths = [paths[i] for i in order]
        labels = None if labels is None else labels[order]
    return paths, labels, names


def _check_split(validation_split: float | None, subset: str | None, shuffle: bool, seed: int | None) -> None:
    """Keras's rules for `validation_split` and `subset`; each error names the argument."""
    if validation_split and not 0 < validation_split < 1:
        raise ValueError(f"validation_split must be between 0 and 1, got {validation_split!r}")
    if bool(validation_split) != bool(subset):
        raise ValueError(f"subset: is set exactly when validation_split is, got {subset=} and {validation_split=}")
    if subset is not None:
        checks.one_of("subset", subset, SUBSETS)
    if validation_split and shuffle and seed is None:
        raise ValueError(
            "seed: validation_split with shuffle needs a seed, so that the training and the validation subsets, "
            "listed by two calls, do not overlap"
        )


def _side(paths: list[str], labels: np.ndarray | None, validation_split: float, subset: str) -> tuple[list, Any]:
    """Keras's split of the listed files: the last int(validation_split * n) for 'validation', the rest 'training'."""
    held = int(validation_split * len(paths))
    if held == 0:
        raise ValueError(f"validation_split={validation_split} of {len(paths)} files holds out none")
    rows = slice(-held, None) if subset == "validation" else slice(0, -held)
    logger.info("Using %d files for %s.", len(paths[rows]), subset)
    return paths[rows], None if labels is None else labels[rows]


def _image_size(image_size: Any) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if not isinstance(image_size, (list, tuple)) or len(image_size) != 2:
        raise ValueError(f"image_size must be (height, width), two positive integers, got {image_size!r}")
    return checks.positive_int("image_size[0]", image_size[0]), checks.positive_int("image_size[1]", image_size[1])


def _check_labels(labels: Any, label_mode: Any, class_names: Any) -> None:
    """Keras's rules for `labels`, `class_names` and `label_mode`."""
    inferred = isinstance(labels, str) and labels == "inferred"
    if not (inferred or labels is None or isinstance(labels, (list, tuple, np.ndarray))):
        raise ValueError(f"labels must be 'inferred', None, or a list of integer labels, got {labels!r}")
    if class_names is not None and not inferred:
        raise ValueError("class_names: can only be passed with labels='inferred'")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {list(LABEL_MODES)}, got {label_mode!r}")


def image_dataset_from_directory(
    directory: str | os.PathLike,
    labels: Any = "inferred",
    label_mode: str | None = "int",
    class_names: Sequence[str] | None = None,
    color_mode: str = "rgb",
    batch_size: int | None = 32,
    image_size: tuple[int, int] | int = (256, 256),
    shuffle: bool = True,
    seed: int | None = None,
    validation_split: float | None = None,
    subset: str | None = None,
    interpolation: str = "bilinear",
    follow_links: bool = False,
    crop_to_aspect_ratio: bool = False,
    *,
    worker_count: int = 0,
    prefetch: int = 0,
) -> FolderDataset | tuple[FolderDataset, FolderDataset]:
    """Keras's `image_dataset_from_directory`: a folder's images, labelled by subfolder, as a `FolderDataset`.

    Keras's arguments, defaults and decisions (see the module's docstring); `subset='both'` returns
    (training, validation). Without a seed one is drawn from numpy's global generator, as Keras draws it.
    `label_mode`: 'int' (int32 class indices, for sparse_categorical_crossentropy), 'categorical' (one-hot),
    'binary' (float32 (n, 1), two classes), None (images only). `color_mode` 'grayscale', 'rgb', 'rgba' give 1,
    3, 4 channels. Files are listed by extension alone; one that PIL cannot decode raises an `ImageFileError`
    naming it when it is read. Unlike Keras, a `validation_split` that holds out no file raises.
    `worker_count` and `prefetch` say where grain decodes (as `streaming.StreamingDataset`'s).
    """
    _check_labels(labels, label_mode, class_names)
    mode = COLOR_MODES.get(color_mode)
    if mode is None:
        raise ValueError(f"color_mode must be one of {list(COLOR_MODES)}, got {color_mode!r}")
    interpolation = str(interpolation).lower()
    checks.one_of("interpolation", interpolation, INTERPOLATIONS)
    decoder = Decoder(_image_size(image_size), mode, interpolation, bool(crop_to_aspect_ratio))
    if batch_size is not None:
        checks.positive_int("batch_size", batch_size)
    _check_split(validation_split, subset, shuffle, seed)
    seed = int(np.random.randint(1e6)) if seed is None else checks.non_negative_int("seed", seed)
    paths, indices, names = index_directory(
        directory, labels, class_names, shuffle=shuffle, seed=seed, follow_links=follow_links
    )
    if labels is None or label_mode is None:
        indices, label_mode = None, None
    if label_mode == "binary" and len(names) != 2:
        raise ValueError(f"label_mode: 'binary' needs exactly 2 classes, got class_names {list(names)}")
    if not paths:
        raise ValueError(f"directory: no images found in {directory}; allowed formats: {ALLOWLIST_FORMATS}")

    def dataset(side: str | None) -> FolderDataset:
        files, side_labels = (paths, indices) if side is None else _side(paths, indices, validation_split, side)
        return FolderDataset(
            tuple(files), side_labels, names, label_mode, decoder, batch_size, worker_count, prefetch, bool(shuffle)
        )

    if subset == "both":
        return dataset("training"), dataset("validation")
    return dataset(subset)


def write_directory(
    directory: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    color_mode: str = "rgb",
    image_size: tuple[int, int] | int = (256, 256),
    interpolation: str = "bilinear",
    crop_to_aspect_ratio: bool = False,
    shuffle: bool = True,
    seed: int = 0,
    records_per_shard: int | None = None,
) -> Path:
    """Decode a class-per-subfolder image folder once into ArrayRecord shards, for datasets read many times.

    Files listed (and, with `shuffle`, ordered by `seed`) as `image_dataset_from_directory` lists them, decoded
    and resized as it decodes them, stored as uint8 images with their class index (`shards.ShardWriter`), the
    class names in the metadata. `streaming.StreamingDataset(out_dir)` reads them back (scaled to [0, 1]).
    `records_per_shard` defaults to `shards.DEFAULT_RECORDS_PER_SHARD`.
    """
    from flaxlesson import shards  # here, not above: shards imports data, which gathers this module's names

    records_per_shard = records_per_shard or shards.DEFAULT_RECORDS_PER_SHARD
    folder = image_dataset_from_directory(
        directory,
        color_mode=color_mode,
        image_size=image_size,
        interpolation=interpolation,
        crop_to_aspect_ratio=crop_to_aspect_ratio,
        shuffle=shuffle,
        seed=seed,
    )
    height, width = folder.decoder.image_size
    fields = shards.image_fields((height, width, len(folder.decoder.mode)))
    with shards.ShardWriter(
        out_dir,
        fields,
        records_per_shard=records_per_shard,
        class_names=folder.class_names,
        source=f"image folder {directory}",
    ) as writer:
        for start in range(0, folder.num_examples, records_per_shard):
            rows = range(start, min(start + records_per_shard, folder.num_examples))
            images = np.stack([folder.decoder.uint8(folder.file_paths[i]) for i in rows])
            writer.write({streaming.IMAGE: images, streaming.LABEL: folder.labels[start : rows.stop]})
    return Path(out_dir)


TEST_SPLIT = 0.1
"""The share of a single image folder that `load_image_folder` holds out as its test set (Keras's last fraction)."""


def load_image_folder(
    directory: str | os.PathLike,
    *,
    image_size: tuple[int, int] = (28, 28),
    color_mode: str = "grayscale",
    seed: int = 0,
    test_split: float = TEST_SPLIT,
) -> datasets.ImageData:
    """A class-per-subfolder image folder in memory as `data.ImageData` (float32 in [0, 1]), for the lesson scripts.

    A folder holding `train/` and `test/` (each with a subfolder per class) gives those two sets; any other
    folder is split as `image_dataset_from_directory(subset='both', validation_split=test_split, seed=seed)`
    splits it. Images are decoded as that loader decodes them and scaled by 1/255, as every image source is.
    """
    options = {"image_size": image_size, "color_mode": color_mode, "seed": seed, "batch_size": None}
    root = Path(directory)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = image_dataset_from_directory(root / "train", **options)
        test = image_dataset_from_directory(root / "test", class_names=train.class_names, **options)
        how = f"{root}/train and {root}/test"
    else:
        train, test = image_dataset_from_directory(root, validation_split=test_split, subset="both", **options)
        how = f"{root}, its last {test_split:.0%} (seed {seed}) as the test set"
    train_rows, test_rows = train.take(np.arange(train.num_examples)), test.take(np.arange(test.num_examples))
    return datasets.ImageData(
        np.divide(train_rows["x"], np.float32(255), dtype=np.float32),
        train_rows["y"],
        np.divide(test_rows["x"], np.float32(255), dtype=np.float32),
        test_rows["y"],
        name=f"folder {root.name}",
        source=f"image folder {how}",
        class_names=train.class_names,
    )
