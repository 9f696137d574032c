"""Dataset sources: the lesson's Iris split, and MNIST-style images from TFDS, IDX files or scikit-learn's digits.

Everything here is numpy on the host. Images come from one function, `load_images`, whatever their source.
"""

import dataclasses
import gzip
import hashlib
import logging
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import sklearn.datasets
import sklearn.model_selection
import sklearn.preprocessing

from flaxlesson import checks

logger = logging.getLogger(__name__)


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
        checks.positive_int("limit", limit)
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


def check_idx_labels(labels: dict[Path, np.ndarray]) -> int:
    """The class count K of IDX label files, whose values together must be 0..K-1, each present; else a ValueError.

    One corrupt byte (200 in a 10-class file) would otherwise make a silent 201-class problem; the error names
    the file and rows holding the values past the classes' gap.
    """
    values = np.unique(np.concatenate([np.asarray(y).reshape(-1) for y in labels.values()]))
    num_classes = len(values)
    if np.array_equal(values, np.arange(num_classes)):
        return num_classes
    outside = values[values >= num_classes]
    missing = sorted(set(range(int(values.max()) + 1)) - set(values.tolist()))
    path, y = next((path, y) for path, y in labels.items() if np.isin(y, outside).any())
    rows = np.flatnonzero(np.isin(y, outside))
    raise ValueError(
        f"data_dir: {path} holds labels {outside[:5].tolist()} (rows {rows[:5].tolist()}), but classes "
        f"{missing[:5]}{'...' if len(missing) > 5 else ''} have no examples: IDX labels must be the classes "
        f"0..K-1, each present (a corrupt or one-based label file?)"
    )


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
    num_classes = check_idx_labels({paths[key]: arrays[key] for key in ("y_train", "y_test")})
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
    checks.positive_int("size", size)
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
    (bundled), or 'auto' (logs and records what it chose and why).
    """
    if dataset not in IMAGE_DATASETS:
        raise ValueError(f"dataset must be one of {list(IMAGE_DATASETS)}, got {dataset!r}")
    if dataset == "auto":
        dataset, data_dir, why = _choose_auto(data_dir)
        images = load_images(dataset, data_dir)
        logger.info("auto: using %s (%s) because %s", images.name, images.source, why)
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
