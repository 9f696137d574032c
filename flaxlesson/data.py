"""The data layer's public face: `data.X` for everything a lesson script reads, wherever it lives.

`batching` holds the one batch iterator, Keras's validation split and `to_categorical`, `datasets` the sources
(Iris, images), `folders` Keras's `image_dataset_from_directory`, `sequences` Keras's `pad_sequences`. This
module only gathers their public names.
"""

from flaxlesson.batching import (
    Batch,
    iterate_batches,
    num_batches,
    num_examples,
    padded_size,
    take,
    to_categorical,
    train_validation_split,
)
from flaxlesson.datasets import (
    DEBIAN_FASHION_MNIST,
    FASHION_MNIST_CLASSES,
    IDX_FILES,
    IMAGE_DATASETS,
    KNOWN_IDX_LABELS,
    OFFLINE_OPTIONS,
    TFDS_DATASETS,
    DatasetUnavailableError,
    ImageData,
    idx_paths,
    load_digits,
    load_idx,
    load_images,
    load_iris,
    load_tfds,
    read_idx,
    tfds_prepared,
)
from flaxlesson.folders import FolderDataset, ImageFileError, image_dataset_from_directory
from flaxlesson.sequences import pad_sequences

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "IDX_FILES",
    "IMAGE_DATASETS",
    "KNOWN_IDX_LABELS",
    "OFFLINE_OPTIONS",
    "TFDS_DATASETS",
    "Batch",
    "DatasetUnavailableError",
    "FolderDataset",
    "ImageData",
    "ImageFileError",
    "idx_paths",
    "image_dataset_from_directory",
    "iterate_batches",
    "load_digits",
    "load_idx",
    "load_images",
    "load_iris",
    "load_tfds",
    "num_batches",
    "num_examples",
    "pad_sequences",
    "padded_size",
    "read_idx",
    "take",
    "tfds_prepared",
    "to_categorical",
    "train_validation_split",
]
