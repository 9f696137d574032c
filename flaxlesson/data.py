"""Data for every experiment: loading, Keras's validation split, and the one batch iterator.

Everything here is numpy on the host. Batches come out at one fixed size (the last partial batch is padded and
carries a mask), so the jitted steps that consume them compile once. Images come from one function,
`load_images`, whatever their source: TFDS, local IDX files, or scikit-learn's bundled digits.
"""

import dataclasses
import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sklearn.datasets
import sklearn.model_selection
import sklearn.preprocessing

Batch = dict[str, Any]


def num_examples(x: Any) -> int:
    """Leading-axis length of `x`, an array or a dict of arrays that share it (e.g. inputs and seq_lengths)."""
    leaves = list(x.values()) if isinstance(x, dict) else [x]
    lengths = {len(leaf) for leaf in leaves}
    if len(lengths) != 1:
        raise ValueError(f"x: arrays of a dict input must share their leading length, got lengths {sorted(lengths)}")
    return lengths.pop()


def take(x: Any, indices: np.ndarray) -> Any:
    """Rows `indices` of an array or of every array in a dict."""
    if isinstance(x, dict):
        return {k: np.asarray(v)[indices] for k, v in x.items()}
    return np.asarray(x)[indices]


def train_validation_split(x: Any, y: np.ndarray, validation_split: float) -> tuple[tuple, tuple]:
    """Hold out the LAST `validation_split` of the data, before any shuffling, as Keras's `fit` does."""
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {validation_split}")
    n = num_examples(x)
    split_at = int(math.floor(n * (1.0 - validation_split)))
    if validation_split and split_at in (0, n):
        raise ValueError(
            f"validation_split={validation_split} leaves no training or no validation data from {n} samples"
        )
    first, rest = np.arange(split_at), np.arange(split_at, n)
    return (take(x, first), y[first]), (take(x, rest), y[rest])


def padded_size(batch_size: int, multiple: int = 1) -> int:
    """`batch_size` rounded up to a multiple of `multiple` (e.g. the device count)."""
    return -(-batch_size // multiple) * multiple


def iterate_batches(
    x: Any,
    y: np.ndarray | None,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    pad_multiple: int = 1,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """Yield `{'x', 'y', 'mask'}` batches of one fixed size, shuffled by `rng` when given.

    Each batch holds `batch_size` samples, the last one fewer; every batch is padded (with copies of its first
    row) to `padded_size(batch_size, pad_multiple)` rows, and `mask` is 1.0 on real rows, 0.0 on padding.
    With `process_count` > 1 (several processes, the same `rng` seed in each), only process `process_index`'s
    contiguous share of every padded global batch is yielded, and only those rows of `x` and `y` are read.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    size = padded_size(batch_size, pad_multiple)
    if process_count < 1 or size % process_count:
        raise ValueError(
            f"process_count must be a positive divisor of the padded batch size {size}, got {process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    n = num_examples(x)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    share = slice(process_index * size // process_count, (process_index + 1) * size // process_count)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        mask = np.zeros(size, np.float32)
        mask[: len(idx)] = 1.0
        idx = np.concatenate([idx, np.full(size - len(idx), idx[0])])[share]
        mask = mask[share]
        batch = {"x": take(x, idx), "mask": mask}
        if y is not None:
            batch["y"] = y[idx]
        yield batch


def load_iris(test_size: float = 0.3, random_state: int = 42) -> tuple[tuple, tuple]:
    """The lesson's Iris split, standardised on the training part: ((x_train, y_train), (x_test, y_test))."""
    iris = sklearn.datasets.load_iris()
    x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
        iris.data, iris.target, test_size=test_size, random_state=random_state
    )
    scaler = sklearn.preprocessing.StandardScaler()
    x_train = scaler.fit_transform(x_train).astype(np.float32)
    x_test = scaler.transform(x_test).astype(np.float32)
    return (x_train, y_train.astype(np.int32)), (x_test, y_test.astype(np.int32))


TFDS_DATASETS = ("mnist", "fashion_mnist")
IMAGE_DATASETS = ("auto", *TFDS_DATASETS, "idx", "digits")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# SHA-256 of the decoded payload of a known train-labels IDX file: names the dataset whatever its folder or gzip.
KNOWN_IDX_LABELS = {
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7": ("fashion_mnist", FASHION_MNIST_CLASSES),
}
OFFLINE_OPTIONS = (
    f"Offline options: dataset='idx' with data_dir set to a folder holding the four MNIST-format IDX files "
    f"({', '.join(name + '[.gz]' for name in IDX_FILES.values())}; Debian's package dataset-fashion-mnist installs "
    f"them at {DEBIAN_FASHION_MNIST}), dataset='digits' (scikit-learn's bundled 8x8 digits, resized to 28x28), "
    "or dataset='auto' (TFDS mnist if prepared, else that Debian folder, else digits)."
)
# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetUnavailableError(RuntimeError):
    """A named dataset is not on this machine and cannot be prepared here (no TensorFlow or no network)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """Train and test images (NHWC float32 in [0, 1]) and int32 labels; `name` is the dataset used, `source` why."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    source: str
    class_names: tuple[str, ...]

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.ndim != 4 or x.dtype != np.float32 or y.ndim != 1 or y.dtype != np.int32 or len(x) != len(y):
                raise ValueError(
                    f"{split}: expected NHWC float32 images and as many int32 labels, got "
                    f"{x.dtype}{x.shape} and {y.dtype}{y.shape}"
                )
            if y.size and not 0 <= y.min() <= y.max() < len(self.class_names):
                raise ValueError(
                    f"y_{split}: labels must lie in [0, {len(self.class_names)}), got {y.min()} to {y.max()}"
                )

    @property
    def num_classes(self) -> int:
        """How many classes the labels index."""
        return len(self.class_names)

    def head(self, limit: int | None) -> "ImageData":
        """The first `limit` training and first `limit` test images (all when None): for quick runs."""
        if limit is None:
            return self
        if limit < 1:
            raise ValueError(f"limit must be a positive number of images, got {limit}")
        return dataclasses.replace(
            self,
            x_train=self.x_train[:limit],
            y_train=self.y_train[:limit],
            x_test=self.x_test[:limit],
            y_test=self.y_test[:limit],
        )


def _unit_nhwc(images: np.ndarray, max_value: float) -> np.ndarray:
    """Integer (N, H, W) or (N, H, W, C) images as NHWC float32 in [0, 1]."""
    images = images[..., None] if images.ndim == 3 else images
    return (images.astype(np.float32) / np.float32(max_value)).clip(0.0, 1.0)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (the MNIST format; gzip-compressed when its name ends in .gz) as a native-endian array."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError as e:
        raise ValueError(f"path: no IDX file at {path}") from e
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"path: {path} is not a readable gzip file ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"path: {path} is not an IDX file: magic number 0x{raw[:4].hex()}, expected 0x0000 then "
            f"a type code in {[hex(c) for c in _IDX_DTYPES]} and a dimension count >= 1"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"path: {path} is truncated inside its header ({len(raw)} of {header} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"path: {path} holds {len(raw) - header} bytes of data, but its header's shape {shape} "
            f"of {dtype.name} needs {expected} (a truncated or corrupt file)"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def idx_paths(data_dir: str | os.PathLike) -> tuple[dict[str, Path], list[str]]:
    """The four IDX files in `data_dir` (each name with or without .gz), and the names of those missing."""
    found, missing = {}, []
    for key, name in IDX_FILES.items():
        candidates = [Path(data_dir) / f"{name}.gz", Path(data_dir) / name]
        present = [p for p in candidates if p.is_file()]
        if present:
            found[key] = present[0]
        else:
            missing.append(f"{name}.gz")
    return found, missing


def load_idx(data_dir: str | os.PathLike) -> ImageData:
    """MNIST-format IDX files from a folder; Fashion-MNIST is recognised by its labels, anything else is 'idx'."""
    if not Path(data_dir).is_dir():
        raise ValueError(f"data_dir: {data_dir} is not a directory. {OFFLINE_OPTIONS}")
    paths, missing = idx_paths(data_dir)
    if missing:
        raise ValueError(f"data_dir: {data_dir} lacks {', '.join(missing)} (or the same without .gz)")
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for key, ndim in (("x_train", 3), ("y_train", 1), ("x_test", 3), ("y_test", 1)):
        if arrays[key].ndim != ndim or arrays[key].dtype != np.uint8:
            raise ValueError(
                f"data_dir: {paths[key]} holds {arrays[key].dtype} of shape {arrays[key].shape}, "
                f"expected uint8 {'images (N, H, W)' if ndim == 3 else 'labels (N,)'}"
            )
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise ValueError(
                f"data_dir: {paths[f'x_{split}']} holds {len(arrays[f'x_{split}'])} images but "
                f"{paths[f'y_{split}']} {len(arrays[f'y_{split}'])} labels"
            )
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise ValueError(
            f"data_dir: train images are {arrays['x_train'].shape[1:]} but test images {arrays['x_test'].shape[1:]}"
        )
    digest = hashlib.sha256(arrays["y_train"].tobytes()).hexdigest()
    num_classes = int(max(arrays["y_train"].max(initial=0), arrays["y_test"].max(initial=0))) + 1
    name, class_names = KNOWN_IDX_LABELS.get(digest, ("idx", tuple(str(c) for c in range(num_classes))))
    return ImageData(
        _unit_nhwc(arrays["x_train"], 255),
        arrays["y_train"].astype(np.int32),
        _unit_nhwc(arrays["x_test"], 255),
        arrays["y_test"].astype(np.int32),
        name=name,
        source=f"idx files in {data_dir}",
        class_names=class_names,
    )


def load_digits(size: int = 28, test_size: float = 0.2, random_state: int = 0) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images), resized to `size` x `size`: image data with no download."""
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    digits = sklearn.datasets.load_digits()
    resize = _linear_resize_matrix(8, size)
    images = np.einsum("oh,nhw,pw->nop", resize, digits.images / 16.0, resize)
    x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
        images, digits.target, test_size=test_size, random_state=random_state, stratify=digits.target
    )
    return ImageData(
        _unit_nhwc(x_train, 1.0),
        y_train.astype(np.int32),
        _unit_nhwc(x_test, 1.0),
        y_test.astype(np.int32),
        name="digits",
        source=f"scikit-learn's bundled load_digits, 8x8 resized to {size}x{size}",
        class_names=tuple(str(c) for c in range(10)),
    )


def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation between pixel centres, edges clamped (as jax.image.resize)."""
    centres = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, n_in - 1)
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), low), 1.0 - (centres - low))
    np.add.at(weights, (np.arange(n_out), high), centres - low)
    return weights


def _tfds() -> Any:
    """tensorflow_datasets, imported on first use: only the TFDS sources need it, and it is slow to import."""
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise DatasetUnavailableError(f"tensorflow_datasets is not installed ({e}). {OFFLINE_OPTIONS}") from e
    return tensorflow_datasets


def _readable_format(builder: Any) -> bool:
    return builder.info.file_format in _tfds().core.FileFormat.with_random_access()


def tfds_prepared(name: str, data_dir: str | os.PathLike | None = None) -> bool:
    """Whether TFDS dataset `name` is already prepared in `data_dir` in a format `tfds.data_source` reads."""
    builder = _tfds().builder(name, data_dir=data_dir)
    return builder.is_prepared() and _readable_format(builder)


def _tensorflow_importable() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _prepare_tfds(name: str, data_dir: str | os.PathLike | None, where: str) -> None:
    """Download and prepare a TFDS dataset as array_record, or say why it cannot be done here and what can."""
    if not _tensorflow_importable():
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} is not prepared in {where}, and preparing it needs TensorFlow (not installed "
            f"here) and network access; reading a prepared one needs neither. {OFFLINE_OPTIONS}"
        )
    try:
        _tfds().data_source(name, data_dir=data_dir, download=True, builder_kwargs={"file_format": "array_record"})
    except Exception as e:  # any failure to fetch or build: say what preparing needs and what works offline
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} is not prepared in {where}, and preparing it failed "
            f"({type(e).__name__}: {e}); preparing needs network access and TensorFlow. {OFFLINE_OPTIONS}"
        ) from e


def load_tfds(name: str, data_dir: str | os.PathLike | None = None) -> ImageData:
    """A TFDS image dataset read as numpy through `tfds.data_source`, prepared first if it is not yet."""
    if name not in TFDS_DATASETS:
        raise ValueError(f"name must be one of {list(TFDS_DATASETS)}, got {name!r}")
    builder = _tfds().builder(name, data_dir=data_dir)
    where = str(builder.data_path)
    if builder.is_prepared() and not _readable_format(builder):
        raise DatasetUnavailableError(
            f"TFDS dataset {name!r} in {where} is prepared as {builder.info.file_format.value}, which "
            f"tfds.data_source cannot read; prepare it as array_record (tfds.data_source({name!r}) does). "
            f"{OFFLINE_OPTIONS}"
        )
    if not builder.is_prepared():
        _prepare_tfds(name, data_dir, where)
        builder = _tfds().builder(name, data_dir=data_dir)
    sources = _tfds().data_source(
        name,
        split=["train", "test"],
        data_dir=data_dir,
        download=False,
        builder_kwargs={"file_format": builder.info.file_format.value},
    )
    arrays = []
    for source in sources:
        examples = [source[i] for i in range(len(source))]
        arrays += [
            _unit_nhwc(np.stack([np.asarray(ex["image"]) for ex in examples]), 255),
            np.array([ex["label"] for ex in examples], np.int32),
        ]
    return ImageData(
        *arrays,
        name=name,
        source=f"TFDS {name} {builder.info.version} in {where}",
        class_names=tuple(builder.info.features["label"].names),
    )


def _choose_auto(data_dir: str | os.PathLike | None) -> tuple[str, str | os.PathLike | None, str]:
    """`auto`'s choice (dataset, data_dir, why): a given data_dir, else TFDS mnist, the Debian folder, digits."""
    if data_dir is not None:
        return "idx", data_dir, f"data_dir {data_dir} was given"
    try:
        if tfds_prepared("mnist"):
            return "mnist", None, "TFDS mnist is prepared locally"
        why = f"TFDS mnist is not prepared in {_tfds().builder('mnist').data_path}"
    except DatasetUnavailableError:
        why = "tensorflow_datasets is not installed"
    if not Path(DEBIAN_FASHION_MNIST).is_dir():
        return "digits", None, f"{why}, and {DEBIAN_FASHION_MNIST} does not exist"
    _, missing = idx_paths(DEBIAN_FASHION_MNIST)
    if missing:
        return "digits", None, f"{why}, and {DEBIAN_FASHION_MNIST} lacks {', '.join(missing)}"
    return "idx", DEBIAN_FASHION_MNIST, f"{why}; {DEBIAN_FASHION_MNIST} holds the four IDX files"


def load_images(dataset: str = "auto", data_dir: str | os.PathLike | None = None) -> ImageData:
    """Images by source name, one interface for all.

    'mnist' or 'fashion_mnist' (TFDS, in TFDS's `data_dir`), 'idx' (IDX files in `data_dir`), 'digits'
    (bundled), or 'auto' (prints and records what it chose and why).
    """
    if dataset not in IMAGE_DATASETS:
        raise ValueError(f"dataset must be one of {list(IMAGE_DATASETS)}, got {dataset!r}")
    if dataset == "auto":
        dataset, data_dir, why = _choose_auto(data_dir)
        images = load_images(dataset, data_dir)
        print(f"auto: using {images.name} ({images.source}) because {why}", flush=True)
        return dataclasses.replace(images, source=f"auto chose {images.source} because {why}")
    if dataset in TFDS_DATASETS:
        return load_tfds(dataset, data_dir)
    if dataset == "idx":
        if data_dir is None:
            raise ValueError(f"data_dir: dataset='idx' needs the folder of IDX files. {OFFLINE_OPTIONS}")
        return load_idx(data_dir)
    if data_dir is not None:
        raise ValueError(
            f"data_dir: dataset='digits' is bundled with scikit-learn and takes no data_dir, got {data_dir}"
        )
    return load_digits()


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
    if maxlen is not None and (isinstance(maxlen, bool) or not isinstance(maxlen, (int, np.integer)) or maxlen < 0):
        raise ValueError(f"maxlen must be None or a non-negative integer, got {maxlen!r}")
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
