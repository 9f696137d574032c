import logging
import os

import jax
import numpy as np
import pytest
from PIL import Image

from flaxlesson import batching, data, folders, models, streaming, training

SIZE = (6, 5)  # (height, width) of the images that are not resized


def _save(path, pixels, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes (created out of order), PNG and JPEG, RGB and grayscale, odd sizes, a nested folder, and
    files that are not images: what each class folder should list, in Keras's walk order."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)

    def rgb(h=SIZE[0], w=SIZE[1]):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    listed = {
        "zebra": [
            _save(root / "zebra" / "b.png", rgb()),
            _save(root / "zebra" / "c.PNG", rng.integers(0, 256, SIZE, dtype=np.uint8)),  # grayscale, upper case
            _save(root / "zebra" / "deep" / "a.png", rgb()),  # a nested folder comes after its parent's files
        ],
        "cat": [
            _save(root / "cat" / "a.jpg", rgb(9, 7), quality=95),
            _save(root / "cat" / "b.png", rgb(3, 11)),
            _save(root / "cat" / "c.png", rgb()),
        ],
        "dog": [_save(root / "dog" / f"{i:02d}.png", rgb()) for i in range(4)]
        + [_save(root / "dog" / "x.jpeg", rgb())],
    }
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "cat" / "image.png.bak").write_bytes(b"\x89PNG")
    _save(root / ".hidden" / "a.png", rgb())  # a hidden folder is no class
    return root, listed


def _dataset(root, **kwargs):
    return data.image_dataset_from_directory(root, image_size=SIZE, **kwargs)


def test_class_names_are_the_sorted_subfolders_and_files_are_listed_by_extension_in_walk_order(folder):
    root, listed = folder
    dataset = _dataset(root, shuffle=False)
    assert dataset.class_names == ("cat", "dog", "zebra")
    assert list(dataset.file_paths) == listed["cat"] + listed["dog"] + listed["zebra"]
    np.testing.assert_array_equal(dataset.labels, [0] * 3 + [1] * 5 + [2] * 3)
    assert all(os.path.exists(path) for path in dataset.file_paths)


def test_shuffle_orders_files_and_labels_as_keras_random_state_does(folder):
    root, listed = folder
    paths = listed["cat"] + listed["dog"] + listed["zebra"]
    labels = [0] * 3 + [1] * 5 + [2] * 3
    for seed in (1, 1234):
        np.random.RandomState(seed).shuffle(paths)  # Keras's rule: the same seed shuffles paths, then labels
        np.random.RandomState(seed).shuffle(labels)
        dataset = _dataset(root, seed=seed)
        assert list(dataset.file_paths) == paths
        np.testing.assert_array_equal(dataset.labels, labels)
        paths = listed["cat"] + listed["dog"] + listed["zebra"]
        labels = [0] * 3 + [1] * 5 + [2] * 3


def test_validation_split_takes_the_last_fraction_of_the_shuffled_files(folder):
    root, _ = folder
    everything = _dataset(root, seed=3)
    held = int(0.3 * everything.num_examples)  # 3 of 11
    train = _dataset(root, seed=3, validation_split=0.3, subset="training")
    validation = _dataset(root, seed=3, validation_split=0.3, subset="validation")
    assert train.file_paths == everything.file_paths[:-held] and validation.file_paths == everything.file_paths[-held:]
    np.testing.assert_array_equal(validation.labels, everything.labels[-held:])
    both = _dataset(root, seed=3, validation_split=0.3, subset="both")
    assert [d.file_paths for d in both] == [train.file_paths, validation.file_paths]


def test_class_names_given_fix_the_label_order_and_may_be_a_subset(folder):
    root, listed = folder
    dataset = _dataset(root, shuffle=False, class_names=["zebra", "cat"])
    assert dataset.class_names == ("zebra", "cat")
    assert list(dataset.file_paths) == listed["zebra"] + listed["cat"]
    np.testing.assert_array_equal(dataset.labels, [0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="class_names"):
        _dataset(root, class_names=["cat", "horse"])


def test_label_modes_int_categorical_binary_and_none(folder):
    root, _ = folder
    rows = np.arange(11)
    ints = _dataset(root, seed=0).take(rows)["y"]
    assert ints.dtype == np.int32
    one_hot = _dataset(root, seed=0, label_mode="categorical").take(rows)["y"]
    np.testing.assert_array_equal(one_hot, np.eye(3, dtype=np.float32)[ints])
    binary = _dataset(root, seed=0, label_mode="binary", class_names=["cat", "dog"])
    assert binary.take(rows[:8])["y"].dtype == np.float32 and binary.take(rows[:8])["y"].shape == (8, 1)
    np.testing.assert_array_equal(binary.take(rows[:8])["y"][:, 0], binary.labels)
    with pytest.raises(ValueError, match="binary"):
        _dataset(root, label_mode="binary")
    unlabelled = _dataset(root, seed=0, label_mode=None)
    assert not unlabelled.has_labels and set(unlabelled.take(rows)) == {"x"}


def test_color_modes_give_1_3_4_channels_float32_pixels_and_resize_to_image_size(folder):
    root, listed = folder
    row = list(_dataset(root, shuffle=False).file_paths).index(listed["cat"][2])  # an RGB PNG already of SIZE
    expected = np.asarray(Image.open(listed["cat"][2]), np.float32)
    for mode, channels in (("grayscale", 1), ("rgb", 3), ("rgba", 4)):
        x = _dataset(root, shuffle=False, color_mode=mode).take(np.arange(11))["x"]
        assert x.shape == (11, *SIZE, channels) and x.dtype == np.float32
        assert x.max() > 1 and x.min() >= 0 and x.max() <= 255  # Keras's [0, 255], not rescaled
    rgb = _dataset(root, shuffle=False).take([row])["x"][0]
    np.testing.assert_array_equal(rgb, expected)
    rgba = _dataset(root, shuffle=False, color_mode="rgba").take([row])["x"][0]
    np.testing.assert_array_equal(rgba[..., 3], 255)
    big = data.image_dataset_from_directory(root, image_size=(10, 3), shuffle=False, crop_to_aspect_ratio=True)
    assert big.take(np.arange(11))["x"].shape == (11, 10, 3, 3)


def test_crop_to_aspect_ratio_takes_the_centred_box_of_the_target_ratio():
    decoder = folders.Decoder((10, 10), "RGB", crop_to_aspect_ratio=True)
    assert decoder.crop_box(width=20, height=10) == (5, 0, 15, 10)
    assert decoder.crop_box(width=6, height=9) == (0, 1, 6, 7)


def test_a_corrupt_image_raises_an_error_that_names_the_file(tmp_path):
    _save(tmp_path / "a" / "good.png", np.zeros((4, 4, 3), np.uint8))
    bad = tmp_path / "b" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    dataset = data.image_dataset_from_directory(tmp_path, image_size=(4, 4), shuffle=False)
    assert dataset.num_examples == 2  # listed by extension, as Keras lists files
    with pytest.raises(data.ImageFileError, match="broken.png"):
        next(dataset.batches(2, shuffle=False))


def test_arguments_are_checked_with_keras_rules(folder, tmp_path):
    root, _ = folder
    with pytest.raises(ValueError, match="seed"):
        _dataset(root, validation_split=0.2, subset="training")
    with pytest.raises(ValueError, match="subset"):
        _dataset(root, validation_split=0.2, seed=1)
    with pytest.raises(ValueError, match="subset"):
        _dataset(root, validation_split=0.2, subset="test", seed=1)
    with pytest.raises(ValueError, match="color_mode"):
        _dataset(root, color_mode="hsv")
    with pytest.raises(ValueError, match="interpolation"):
        _dataset(root, interpolation="gaussian")
    with pytest.raises(ValueError, match="label_mode"):
        _dataset(root, label_mode="sparse")
    (tmp_path / "only" / "notes.txt").parent.mkdir()
    (tmp_path / "only" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        data.image_dataset_from_directory(tmp_path, image_size=SIZE)


def test_explicit_labels_follow_the_sorted_walk_of_the_whole_folder(folder):
    root, listed = folder
    n = 12  # the hidden folder's file too: with explicit labels Keras walks the whole folder
    labelled = _dataset(root, labels=list(range(n)), shuffle=False)
    assert (
        list(labelled.file_paths) == [str(root / ".hidden" / "a.png")] + listed["cat"] + listed["dog"] + listed["zebra"]
    )
    assert labelled.class_names == tuple(str(i) for i in range(n))
    with pytest.raises(ValueError, match="labels"):
        _dataset(root, labels=[0, 1])


def test_batches_are_iterate_batches_over_the_decoded_files(folder):
    root, _ = folder
    dataset = _dataset(root, seed=5, color_mode="grayscale", prefetch=2)
    everything = dataset.take(np.arange(dataset.num_examples))
    expected = batching.iterate_batches(everything["x"], everything["y"], 4, seed=9, epoch=1, shuffle=True)
    got = list(dataset.batches(4, seed=9, epoch=1, shuffle=True))
    assert len(got) == 3
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in b:
            np.testing.assert_array_equal(a[key], b[key])


def test_worker_processes_decode_the_same_batches(folder):
    root, _ = folder
    expected = list(_dataset(root, seed=5).batches(4, seed=2))
    got = list(_dataset(root, seed=5, worker_count=1).batches(4, seed=2))
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        for key in b:
            np.testing.assert_array_equal(a[key], b[key])


def test_an_unshuffled_folder_keeps_its_order_whatever_the_shuffle_asked_of_its_batches(folder):
    root, _ = folder
    dataset = _dataset(root, shuffle=False)
    got = np.concatenate([batch["y"] for batch in dataset.batches(4, seed=3, shuffle=True)])
    np.testing.assert_array_equal(got[: dataset.num_examples], dataset.labels)


def _grayscale(root, **kwargs):
    """The folder as 12x12 grayscale images in batches of 4: what the small CNN below trains on."""
    return data.image_dataset_from_directory(root, color_mode="grayscale", image_size=(12, 12), batch_size=4, **kwargs)


def _small_cnn(dataset):
    return training.create_train_state(models.CNN(features=(4, 8), dense=8, num_classes=3), dataset.take([0])["x"])


def test_fit_evaluate_and_predict_train_the_lesson_cnn_on_a_folder(folder):
    root, _ = folder
    dataset = _grayscale(root, seed=0)
    state = _small_cnn(dataset)
    trained, history = training.fit(state, dataset, epochs=1, validation_split=0.3, verbose=0)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), state.params, trained.params)
    assert all(jax.tree.leaves(changed))
    assert np.isfinite(history.history["loss"][0]) and "val_loss" in history.history
    assert set(training.evaluate(trained, dataset)) >= {"loss", "accuracy"}
    assert training.predict(trained, dataset).shape == (11, 3)


def test_validation_split_of_an_unshuffled_folder_warns_that_it_validates_on_one_class(folder, caplog):
    root, _ = folder
    dataset = _grayscale(root, shuffle=False)
    state = _small_cnn(dataset)
    with caplog.at_level(logging.WARNING, logger="flaxlesson.sources"):
        training.fit(state, dataset, epochs=1, validation_split=0.25, verbose=0)  # the last 3 files: zebra
    assert "the last 3) all hold class 2 while the training samples hold 2 classes" in caplog.text


def test_write_directory_stores_the_decoded_images_as_shards(folder, tmp_path):
    root, _ = folder
    out = folders.write_directory(root, tmp_path / "shards", image_size=SIZE, seed=2, records_per_shard=4)
    stored = streaming.StreamingDataset(out)
    dataset = _dataset(root, seed=2)
    everything = dataset.take(np.arange(11))
    assert stored.class_names == dataset.class_names and stored.num_examples == 11
    read = stored.take(np.arange(11))
    np.testing.assert_array_equal(np.round(read["x"] * 255), everything["x"])
    np.testing.assert_array_equal(read["y"], everything["y"])


def test_listing_logs_keras_found_message(folder, caplog):
    root, _ = folder
    with caplog.at_level(logging.INFO, logger="flaxlesson.folders"):
        _dataset(root, seed=1)
    assert "Found 11 files belonging to 3 classes." in caplog.text


def _class_folder(root, per_class=5, classes=("ankle", "bag", "coat"), size=28):
    rng = np.random.default_rng(1)
    for label, name in enumerate(classes):
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size + i, size), dtype=np.uint8) + np.uint8(60 * label)
            _save(root / name / f"{i}.png", pixels)
    return root


def test_load_image_folder_reads_train_and_test_subfolders_scaled_to_0_1(tmp_path):
    _class_folder(tmp_path / "train", per_class=3)
    _class_folder(tmp_path / "test", per_class=2)
    images = folders.load_image_folder(tmp_path)
    assert images.x_train.shape == (9, 28, 28, 1) and images.x_test.shape == (6, 28, 28, 1)
    assert images.class_names == ("ankle", "bag", "coat") and 0 <= images.x_train.min() <= images.x_train.max() <= 1
    assert sorted(images.y_test.tolist()) == [0, 0, 1, 1, 2, 2]


def test_cnn_mnist_script_trains_the_lesson_cnn_on_a_folder(tmp_path):
    from experiments import cnn_mnist

    root = _class_folder(tmp_path / "images", per_class=10)
    config = cnn_mnist.Config(dataset="folder", data_dir=str(root), epochs=1, batch_size=8, out=str(tmp_path / "out"))
    metrics = cnn_mnist.run(config)
    assert metrics["train_test_sizes"] == [27, 3]  # the last 10% of the 30 shuffled files is the test set
    assert list(metrics["class_names"]) == ["ankle", "bag", "coat"]
    assert np.isfinite(metrics["test_loss"]) and metrics["dataset"] == "folder images"


def test_folder_benchmark_trains_from_the_folder_its_shards_and_memory(tmp_path):
    from experiments import folder_benchmark

    config = folder_benchmark.Config(
        dataset="digits", data_dir=None, images=60, steps=2, rounds=1, batch_size=16, steps_per_execution=1,
        out=str(tmp_path),
    )  # fmt: skip
    metrics = folder_benchmark.run(config)
    for name in folder_benchmark.SOURCES:
        assert len(metrics[f"{name}_samples_per_second_per_round"]) == 1 and metrics[f"{name}_peak_rss_bytes"] > 0
    assert metrics["num_images"] == 60 and len(list((tmp_path / "folder").rglob("*.png"))) == 60
    assert metrics["folder_profile"]["decode_png_us_per_image"] > 0
