"""Shards of any fields, one scaling rule, streamed label checks, safe writing and reading, IDX label checks."""

import gzip
import json
import os
import signal
import traceback

import jax
import numpy as np
import pytest
from array_record.python import array_record_module

from flaxlesson import data, models, results, shards, streaming, training
from tests.test_images import _idx_bytes

N = 96
ARRAY_RECORD_WRITER = array_record_module.ArrayRecordWriter
SETTINGS = {"epochs": 2, "batch_size": 16, "seed": 1, "validation_split": 0.25, "verbose": 0}


def _assert_same_fit(state, x, y, folder):
    """A streamed fit of `folder` and the in-memory fit of (x, y) end with the same params and validation losses."""
    streamed, streamed_history = training.fit(state, streaming.StreamingDataset(folder), **SETTINGS)
    held, held_history = training.fit(state, x, y, **SETTINGS)
    assert int(streamed.step) == int(held.step) > 0
    for a, b in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(held.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(streamed_history.history["val_loss"], held_history.history["val_loss"], rtol=1e-5)


def _tabular(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n)


# Any fields


def test_a_streamed_fit_of_float_features_ends_as_the_in_memory_fit(tmp_path):
    x, y = _tabular()
    state = training.create_train_state(models.MLP(num_classes=3), x[:1], seed=0)
    _assert_same_fit(state, x, y, shards.write_arrays(tmp_path / "tabular", x, y, records_per_shard=40))


def test_a_streamed_fit_of_sequences_with_lengths_ends_as_the_in_memory_fit(tmp_path):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 7, N).astype(np.int32)
    sequences = data.pad_sequences([rng.normal(size=n) for n in lengths], maxlen=6, dtype="float32", padding="post")
    x, y = {"x": sequences, "seq_lengths": lengths}, (lengths > 3).astype(np.float32)
    state = training.create_train_state(models.SimpleRNNClassifier(units=4), sequences[:1], loss="binary_crossentropy")
    folder = shards.write_arrays(tmp_path / "sequences", x, y, records_per_shard=30)
    assert sorted(streaming.StreamingDataset(folder).records.fields) == ["label", "seq_lengths", "x"]
    _assert_same_fit(state, x, y, folder)


def test_one_hot_and_multi_dimensional_labels_stream_as_iterate_batches_gives_them(tmp_path):
    x, classes = _tabular(40)
    for name, y in {"one_hot": data.to_categorical(classes, 3), "grid": np.arange(40 * 6).reshape(40, 2, 3)}.items():
        got = streaming.StreamingDataset(shards.write_arrays(tmp_path / name, x, y, records_per_shard=16))
        for a, b in zip(got.batches(16, seed=2), data.iterate_batches(x, y, 16, seed=2, shuffle=True), strict=True):
            np.testing.assert_array_equal(a["x"], b["x"])
            np.testing.assert_array_equal(a["y"], b["y"].astype(a["y"].dtype))
            assert a["y"].dtype == (np.float32 if name == "one_hot" else np.int32)


def test_the_metadata_records_each_fields_dtype_shape_and_range(tmp_path):
    x, y = _tabular(50)
    folder = shards.write_arrays(tmp_path / "s", x, y.astype(np.int64), extra={"weight": np.arange(50.0)})
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["fields"] == {
        "x": {"shape": [5], "dtype": "<f4"},
        "label": {"shape": [], "dtype": "<i4"},
        "weight": {"shape": [], "dtype": "<f8"},
    }
    assert meta["ranges"]["weight"] == {"min": 0.0, "max": 49.0, "min_row": 0, "max_row": 49, "nonfinite_row": None}
    assert meta["ranges"]["label"]["max"] == y.max() and y[meta["ranges"]["label"]["max_row"]] == y.max()
    assert meta["ranges"]["x"]["min"] == x.min() and x[meta["ranges"]["x"]["min_row"]].min() == x.min()


def test_a_string_field_is_refused_when_written_and_no_folder_is_left(tmp_path):
    x, y = _tabular(4)
    with pytest.raises(ValueError, match=r"fields: shards hold numeric arrays only, got \{'name': '<U5'\}.*np.unique"):
        shards.write_arrays(tmp_path / "s", x, y, extra={"name": np.array(["a", "bb", "ccc", "ddddd"])})
    assert not (tmp_path / "s").exists()


# One scaling rule


def test_uint8_images_train_the_same_in_memory_and_streamed(tmp_path):
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (N, 6, 6, 1), dtype=np.uint8), rng.integers(0, 3, N)
    state = training.create_train_state(models.CNN(features=(2,), dense=8, num_classes=3), images[:1] / 255)
    _assert_same_fit(state, images, labels, shards.write_arrays(tmp_path / "images", images, labels))
    scaled, _ = training.fit(state, images.astype(np.float32) / 255, labels, **SETTINGS)
    held, _ = training.fit(state, images, labels, **SETTINGS)
    for a, b in zip(jax.tree.leaves(scaled.params), jax.tree.leaves(held.params), strict=True):
        np.testing.assert_array_equal(a, b)


# Streamed labels and inputs checked as in-memory ones are


@pytest.mark.parametrize("row", [0, 37, N - 1])
def test_streamed_labels_beyond_the_models_classes_are_refused_as_in_memory(tmp_path, row):
    x, y = _tabular()
    y[row] = 5
    state = training.create_train_state(models.MLP(num_classes=3), x[:1])
    message = r"y: labels must lie in \[0, 3\) for a model with 3 outputs, got values from 0 to 5"
    with pytest.raises(ValueError, match=message):
        training.fit(state, x, y, epochs=1, verbose=0)
    dataset = streaming.StreamingDataset(shards.write_arrays(tmp_path / "s", x, y, records_per_shard=40))
    with pytest.raises(ValueError, match=message):
        training.fit(state, dataset, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=message):
        training.evaluate(state, dataset)


def test_a_streamed_nan_feature_is_refused_as_in_memory(tmp_path):
    x, y = _tabular()
    x[61, 2] = np.nan
    state = training.create_train_state(models.MLP(num_classes=3), x[:1])
    dataset = streaming.StreamingDataset(shards.write_arrays(tmp_path / "s", x, y))
    assert 61 in dataset.check_rows()
    with pytest.raises(ValueError, match="x: inputs must be finite"):
        training.fit(state, dataset, epochs=1, verbose=0)


def test_check_rows_of_a_view_are_its_own(tmp_path):
    x, y = _tabular()
    y = y % 2
    y[80] = 2  # the one largest label, in the validation quarter (rows 72 on)
    train, validation = streaming.StreamingDataset(shards.write_arrays(tmp_path / "s", x, y)).split(0.25)
    assert 80 - 72 in validation.check_rows()
    assert validation.take(validation.check_rows())["y"].max() == 2
    assert train.take(train.check_rows())["y"].max() == 1


# Writing: a lock, metadata last, failures removed in one error


def _fields():
    return {"x": streaming.Field((5,), np.dtype(np.float32)), "label": streaming.Field((), np.dtype(np.int32))}


def _chunk(n=10):
    x, y = _tabular(n)
    return {"x": x, "label": y.astype(np.int32)}


def test_a_second_writer_of_a_folder_being_written_is_refused(tmp_path):
    with shards.ShardWriter(tmp_path / "s", _fields(), records_per_shard=4) as first:
        first.write(_chunk())
        with pytest.raises(ValueError, match=f"out_dir: {tmp_path / 's'} is being written by another ShardWriter"):
            shards.ShardWriter(tmp_path / "s", _fields())
        assert not (tmp_path / "s" / "metadata.json").exists()  # written last
        first.write(_chunk())
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["metadata.json"] + [
        shards.shard_name(i) for i in range(5)
    ]
    assert len(streaming.StreamingDataset(tmp_path / "s")) == 20
    with pytest.raises(ValueError, match="already holds shards;"):
        shards.ShardWriter(tmp_path / "s", _fields())
    (tmp_path / "s" / "metadata.json").unlink()  # as a writer killed by SIGKILL leaves it
    with pytest.raises(ValueError, match="already holds shards but no metadata.json \\(a write killed before it ended"):
        shards.ShardWriter(tmp_path / "s", _fields())


class _FullDisk:
    """An ArrayRecordWriter that writes `room` records, then fails as ArrayRecord does on a full disk."""

    room = 0

    def __init__(self, path, options):
        self._writer = ARRAY_RECORD_WRITER(path, options)

    def write(self, record):
        if _FullDisk.room == 0:
            raise RuntimeError("RESOURCE_EXHAUSTED: No space left on device")
        _FullDisk.room -= 1
        self._writer.write(record)

    def close(self):
        self._writer.close()


def test_a_full_disk_removes_the_partial_shards_and_raises_one_error_naming_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(shards.array_record_module, "ArrayRecordWriter", _FullDisk)
    monkeypatch.setattr(_FullDisk, "room", 13)
    x, y = _tabular(40)
    with pytest.raises(shards.ShardWriteError) as error:
        shards.write_arrays(tmp_path / "new" / "s", x, y, records_per_shard=5)
    assert isinstance(error.value, OSError)
    assert str(error.value).startswith(f"{tmp_path / 'new' / 's'}: writing shards failed")
    assert "No space left on device" in str(error.value)
    printed = "".join(traceback.format_exception(error.value))
    assert printed.count("Traceback") == 1 and "During handling" not in printed
    assert not (tmp_path / "new" / "s").exists() and (tmp_path / "new").is_dir()


def test_a_failed_metadata_write_leaves_no_shards_and_no_metadata(tmp_path, monkeypatch):
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's")

    def full(obj, file, **kwargs):
        file.write('{"format": ')
        file.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.json, "dump", full)
    with pytest.raises(shards.ShardWriteError, match=f"{folder}: writing shards failed"):
        with shards.ShardWriter(folder, _fields(), records_per_shard=4) as writer:
            writer.write(_chunk())
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # no shards, metadata or temporary file


def test_every_shard_and_the_folder_are_on_disk_before_the_metadata_names_them(tmp_path, monkeypatch):
    folder, synced = tmp_path / "s", []
    real_fsync = os.fsync

    def recording_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((os.path.basename(path), (folder / streaming.METADATA_FILE).exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    x, y = _tabular(12)
    shards.write_arrays(folder, x, y, records_per_shard=5)
    before_metadata = [name for name, metadata_there in synced if not metadata_there]
    assert before_metadata[:4] == [shards.shard_name(0), shards.shard_name(1), shards.shard_name(2), "s"]
    assert before_metadata[4].endswith(".tmp")  # metadata.json's own bytes, before the rename
    assert synced[-1] == ("s", True)  # and its name


def test_ctrl_c_while_writing_removes_the_partial_shards(tmp_path, monkeypatch):
    class Interrupted(_FullDisk):
        def write(self, record):
            _FullDisk.room -= 1
            if _FullDisk.room == 0:
                os.kill(os.getpid(), signal.SIGINT)
            self._writer.write(record)

    monkeypatch.setattr(shards.array_record_module, "ArrayRecordWriter", Interrupted)
    monkeypatch.setattr(_FullDisk, "room", 12)
    x, y = _tabular(40)
    with pytest.raises(KeyboardInterrupt):
        shards.write_arrays(tmp_path / "s", x, y, records_per_shard=5)
    assert not (tmp_path / "s").exists()


# Reading: damaged shards and paths outside the folder


@pytest.fixture
def folder(tmp_path):
    x, y = _tabular(60)
    return shards.write_arrays(tmp_path / "s", x, y, records_per_shard=30)


@pytest.mark.parametrize("prefetch, workers", [(0, 0), (2, 0), (1, 1)])
def test_a_damaged_shard_is_named_when_read(folder, prefetch, workers):
    shard = folder / shards.shard_name(1)
    raw = bytearray(shard.read_bytes())
    record = streaming.encode_record(
        {name: value[0] for name, value in streaming.ShardReader(folder).read([45]).items()}
    )
    start = raw.find(record)
    assert start > 0
    middle = start + len(record) // 2  # inside record 15 of this shard: the checks made when it opens pass
    raw[middle : middle + 4] = bytes(b ^ 0xFF for b in raw[middle : middle + 4])
    shard.write_bytes(bytes(raw))
    dataset = streaming.StreamingDataset(folder, prefetch=prefetch, worker_count=workers)
    with dataset.batches(60, shuffle=False) as batches:
        with pytest.raises(streaming.ShardError, match=f"{shard}: record 15 cannot be read, a damaged shard"):
            list(batches)


@pytest.mark.parametrize("name", ["../outside.array_record", "/tmp/outside.array_record", "sub/x.array_record"])
def test_shard_files_outside_their_folder_are_refused(folder, name):
    meta = json.loads((folder / "metadata.json").read_text())
    meta["shards"][0]["file"] = name
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(streaming.ShardError, match="shard files must be plain file names inside"):
        streaming.StreamingDataset(folder)


def test_recorded_check_rows_outside_the_set_are_refused(folder):
    meta = json.loads((folder / "metadata.json").read_text())
    meta["ranges"]["label"]["max_row"] = 60
    (folder / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(streaming.ShardError, match=r"field ranges name rows outside \[0, 60\)"):
        streaming.StreamingDataset(folder)


# IDX labels


def _idx_dir(folder, y_train):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (len(y_train), 4, 4), dtype=np.uint8),
        "y_train": np.asarray(y_train, np.uint8),
        "x_test": rng.integers(0, 256, (10, 4, 4), dtype=np.uint8),
        "y_test": np.arange(10, dtype=np.uint8),
    }
    folder.mkdir()
    for key, name in data.IDX_FILES.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(arrays[key])))
    return folder


def test_a_corrupt_idx_label_byte_is_refused_naming_the_file_and_row(tmp_path):
    labels = np.arange(30) % 10
    labels[7] = 200
    folder = _idx_dir(tmp_path / "idx", labels)
    path = folder / "train-labels-idx1-ubyte.gz"
    message = rf"data_dir: {path} holds labels \[200\] \(rows \[7\]\), but classes \[10, 11, 12, 13, 14\]\.\.\."
    with pytest.raises(ValueError, match=message):
        data.load_idx(folder)
    with pytest.raises(ValueError, match=message):
        shards.write_idx(folder, tmp_path / "shards")


def test_idx_labels_of_every_class_load(tmp_path):
    assert data.load_idx(_idx_dir(tmp_path / "idx", np.arange(30) % 10)).num_classes == 10
