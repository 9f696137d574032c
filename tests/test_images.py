import gzip
import hashlib
import importlib.abc
import importlib.machinery
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from flaxlesson import data, datasets


def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_idx_dir(folder, n_train=6, n_test=4, size=5, compress=True):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 3).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 3).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in data.IDX_FILES.items():
        raw = _idx_bytes(arrays[key])
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return arrays


def _prepared_tfds_metadata(root, name="mnist", file_format="array_record", lengths=(("train", 6), ("test", 4))):
    """Metadata of a prepared TFDS dataset (no records): what `is_prepared` and the USE_FILES mock read."""
    builder = tfds.builder(name, data_dir=root, file_format=file_format)
    builder.data_path.mkdir(parents=True)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name=name, filetype_suffix=file_format, split="train"
    )
    builder.info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=split, shard_lengths=[n], num_bytes=0, filename_template=template.replace(split=split)
                )
                for split, n in lengths
            ]
        )
    )
    builder.info.write_to_directory(builder.data_path)
    return root


class _NoTensorFlow(importlib.abc.Loader):
    """An import hook under which `import tensorflow` fails as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name.partition(".")[0] == "tensorflow" else None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

    def exec_module(self, module):
        raise ModuleNotFoundError(f"No module named {module.__name__!r}", name=module.__name__)


@pytest.fixture
def without_tensorflow(monkeypatch):
    """TensorFlow cannot be imported during the test, whether or not this machine has it."""
    for name in [m for m in sys.modules if m.partition(".")[0] == "tensorflow"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoTensorFlow(), *sys.meta_path])


# IDX files


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_what_was_written(tmp_path, compress):
    arrays = _write_idx_dir(tmp_path, compress=compress)
    path = tmp_path / (data.IDX_FILES["x_train"] + (".gz" if compress else ""))
    np.testing.assert_array_equal(data.read_idx(path), arrays["x_train"])


def test_read_idx_decodes_big_endian_types(tmp_path):
    values = np.array([[1, -2], [70000, 3]], np.int32)
    (tmp_path / "ints").write_bytes(_idx_bytes(values))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "ints"), values)


def test_read_idx_rejects_a_wrong_magic_number(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="magic number 0x01020801"):
        data.read_idx(tmp_path / "bad")


def test_read_idx_rejects_a_truncated_payload(tmp_path):
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((4, 3, 3), np.uint8))[:-5])
    with pytest.raises(ValueError, match=r"holds 31 bytes.*needs 36.*truncated"):
        data.read_idx(tmp_path / "short")


def test_read_idx_rejects_a_truncated_header(tmp_path):
    (tmp_path / "head").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 4]))
    with pytest.raises(ValueError, match="inside its header"):
        data.read_idx(tmp_path / "head")


def test_read_idx_rejects_a_gz_file_that_is_not_gzip(tmp_path):
    (tmp_path / "x.gz").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match="not a readable gzip file"):
        data.read_idx(tmp_path / "x.gz")


def test_idx_folder_loads_as_unit_nhwc_float_and_int_labels(tmp_path):
    arrays = _write_idx_dir(tmp_path)
    images = data.load_images("idx", tmp_path)
    assert images.x_train.shape == (6, 5, 5, 1) and images.x_train.dtype == np.float32
    np.testing.assert_allclose(images.x_test[..., 0], arrays["x_test"] / 255.0, rtol=1e-6)
    assert images.y_train.dtype == np.int32
    np.testing.assert_array_equal(images.y_train, [0, 1, 2, 0, 1, 2])
    assert (images.name, images.class_names) == ("idx", ("0", "1", "2"))
    assert str(tmp_path) in images.source


def test_idx_folder_with_known_labels_is_named(tmp_path, monkeypatch):
    arrays = _write_idx_dir(tmp_path)
    digest = hashlib.sha256(arrays["y_train"].tobytes()).hexdigest()
    monkeypatch.setitem(data.KNOWN_IDX_LABELS, digest, ("three_things", ("a", "b", "c")))
    images = data.load_images("idx", tmp_path)
    assert (images.name, images.class_names) == ("three_things", ("a", "b", "c"))


def test_idx_folder_missing_a_file_names_it(tmp_path):
    _write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match=r"data_dir: .* lacks t10k-labels-idx1-ubyte\.gz"):
        data.load_images("idx", tmp_path)


def test_idx_folder_with_fewer_labels_than_images_is_rejected(tmp_path):
    _write_idx_dir(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(ValueError, match="holds 6 images but .* 5 labels"):
        data.load_images("idx", tmp_path)


def test_idx_needs_a_data_dir():
    with pytest.raises(ValueError, match="data_dir: dataset='idx' needs"):
        data.load_images("idx")


def test_idx_data_dir_that_is_not_a_folder_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        data.load_images("idx", tmp_path / "nowhere")


# Bundled digits


def test_digits_are_28x28_unit_images_split_by_class():
    images = data.load_images("digits")
    assert images.x_train.shape == (1437, 28, 28, 1) and images.x_test.shape == (360, 28, 28, 1)
    assert images.x_train.dtype == np.float32 and images.y_test.dtype == np.int32
    assert images.x_train.min() == 0.0 and images.x_train.max() == 1.0
    np.testing.assert_array_equal(np.bincount(images.y_test), [36, 36, 35, 37, 36, 37, 36, 36, 35, 36])
    assert images.name == "digits" and images.class_names == tuple("0123456789")


def test_digits_resize_matches_jax_linear_resize():
    small = np.random.default_rng(0).uniform(size=(2, 8, 8))
    resize = datasets._linear_resize_matrix(8, 28)
    ours = np.einsum("oh,nhw,pw->nop", resize, small, resize)
    np.testing.assert_allclose(ours, jax.image.resize(small, (2, 28, 28), "linear"), atol=1e-6)


def test_digits_take_no_data_dir(tmp_path):
    with pytest.raises(ValueError, match="data_dir: dataset='digits'"):
        data.load_images("digits", tmp_path)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"dataset must be one of \['auto', 'mnist', 'fashion_mnist', 'idx', 'digits'\]"
    ):
        data.load_images("cifar10")


# TFDS


def test_tfds_reads_a_prepared_dataset_through_data_source_without_tensorflow(tmp_path, without_tensorflow):
    root = _prepared_tfds_metadata(tmp_path)
    with tfds.testing.mock_data(num_examples=5, data_dir=str(root), policy=tfds.testing.MockPolicy.USE_FILES):
        images = data.load_images("mnist", tmp_path)
        raw = tfds.data_source("mnist", split="test", data_dir=tmp_path, download=False)
        raw_images = np.stack([raw[i]["image"] for i in range(5)])
        raw_labels = [raw[i]["label"] for i in range(5)]
    assert images.x_train.shape == images.x_test.shape == (5, 28, 28, 1)
    np.testing.assert_allclose(images.x_test, raw_images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(images.y_test, raw_labels)
    assert images.y_test.dtype == np.int32 and images.x_test.dtype == np.float32
    assert images.name == "mnist" and images.class_names == tuple("0123456789")


def test_tfds_prepared_is_true_only_for_a_data_source_format(tmp_path):
    _prepared_tfds_metadata(tmp_path / "ar")
    _prepared_tfds_metadata(tmp_path / "tfr", file_format="tfrecord")
    assert data.tfds_prepared("mnist", tmp_path / "ar")
    assert not data.tfds_prepared("mnist", tmp_path / "tfr")
    assert not data.tfds_prepared("mnist", tmp_path / "empty")


def test_tfds_not_prepared_without_tensorflow_says_so_and_names_offline_options(tmp_path, without_tensorflow):
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load_images("fashion_mnist", tmp_path)
    message = str(error.value)
    assert "not prepared" in message and "TensorFlow (not installed here)" in message and "network" in message
    assert "dataset='idx'" in message and "dataset='digits'" in message and data.DEBIAN_FASHION_MNIST in message


def test_tfds_preparation_failure_is_wrapped_with_offline_options(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_tensorflow_importable", lambda: True)

    def no_network(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(tfds, "data_source", no_network)
    with pytest.raises(
        data.DatasetUnavailableError,
        match=r"preparing it failed \(ConnectionError: Name or service"
        r" not known\); preparing needs network.*dataset='digits'",
    ):
        data.load_images("mnist", tmp_path)


def test_tfds_prepared_as_tfrecord_is_explained(tmp_path):
    _prepared_tfds_metadata(tmp_path, file_format="tfrecord")
    with pytest.raises(data.DatasetUnavailableError, match="prepared as tfrecord, which tfds.data_source cannot read"):
        data.load_images("mnist", tmp_path)


# auto


def test_auto_takes_tfds_mnist_when_prepared(tmp_path, without_tensorflow, caplog):
    with tfds.testing.mock_data(
        num_examples=3, data_dir=str(_prepared_tfds_metadata(tmp_path)), policy=tfds.testing.MockPolicy.USE_FILES
    ):
        with caplog.at_level("INFO", logger="flaxlesson"):
            images = data.load_images("auto")
    assert images.name == "mnist" and len(images.x_train) == 3
    assert "because TFDS mnist is prepared locally" in images.source
    assert "auto: using mnist" in caplog.text


def test_auto_takes_the_debian_folder_when_tfds_is_not_prepared(tmp_path, monkeypatch, caplog):
    _write_idx_dir(tmp_path / "fashion-mnist")
    monkeypatch.setattr(datasets, "tfds_prepared", lambda name, data_dir=None: False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(tmp_path / "fashion-mnist"))
    with caplog.at_level("INFO", logger="flaxlesson"):
        images = data.load_images("auto")
    assert images.name == "idx" and images.x_train.shape == (6, 5, 5, 1)
    assert "TFDS mnist is not prepared" in images.source and "holds the four IDX files" in images.source
    assert f"auto: using idx (idx files in {tmp_path / 'fashion-mnist'})" in caplog.text


def test_auto_falls_back_to_digits_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "tfds_prepared", lambda name, data_dir=None: False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    images = data.load_images("auto")
    assert images.name == "digits"
    assert f"{tmp_path / 'absent'} does not exist" in images.source


def test_auto_skips_an_incomplete_debian_folder_naming_what_lacks(tmp_path, monkeypatch):
    _write_idx_dir(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    monkeypatch.setattr(datasets, "tfds_prepared", lambda name, data_dir=None: False)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(tmp_path))
    images = data.load_images("auto")
    assert images.name == "digits" and "lacks train-images-idx3-ubyte.gz" in images.source


def test_auto_with_a_data_dir_reads_its_idx_files(tmp_path, monkeypatch):
    _write_idx_dir(tmp_path)
    monkeypatch.setattr(datasets, "tfds_prepared", lambda name, data_dir=None: True)
    images = data.load_images("auto", tmp_path)
    assert images.name == "idx" and "data_dir" in images.source


def test_image_data_rejects_labels_outside_its_classes():
    x = np.zeros((2, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match=r"y_test: labels must lie in \[0, 2\)"):
        data.ImageData(x, np.array([0, 1], np.int32), x, np.array([0, 2], np.int32), "t", "test", ("a", "b"))


def test_head_keeps_the_first_images_of_each_split():
    images = data.load_images("digits")
    small = images.head(5)
    assert len(small.x_train) == len(small.y_train) == 5 and len(small.x_test) == 5
    np.testing.assert_array_equal(small.y_train, images.y_train[:5])


def test_head_rejects_a_limit_below_one():
    with pytest.raises(ValueError, match="limit"):
        data.load_images("digits").head(0)


def test_auto_without_tensorflow_datasets_takes_the_offline_sources(tmp_path, monkeypatch):
    def missing():
        raise data.DatasetUnavailableError("tensorflow_datasets is not installed")

    monkeypatch.setattr(datasets, "_tfds", missing)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", str(tmp_path / "absent"))
    images = data.load_images("auto")
    assert images.name == "digits" and "tensorflow_datasets is not installed" in images.source


def test_tfds_dataset_without_tensorflow_datasets_names_the_offline_options(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(data.DatasetUnavailableError, match="tensorflow_datasets is not installed.*dataset='idx'"):
        data.load_images("mnist")
