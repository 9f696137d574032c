import concurrent.futures
import json
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from experiments import streaming as experiment
from flaxlesson import data, launch, models, shards, streaming, training
from tests.test_images import _prepared_tfds_metadata, _write_idx_dir

N, SIZE = 300, 8


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("idx")
    _write_idx_dir(folder, n_train=N, n_test=20, size=SIZE)
    return folder


@pytest.fixture(scope="module")
def in_memory(idx_dir):
    return data.load_idx(idx_dir)


@pytest.fixture(scope="module")
def shard_dir(idx_dir, tmp_path_factory):
    return shards.write_idx(idx_dir, tmp_path_factory.mktemp("shards") / "train", records_per_shard=64)


@pytest.fixture(scope="module")
def id_shard_dir(idx_dir, tmp_path_factory):
    """The same images with an extra 'id' field: each record's row number."""
    images, labels = (
        data.read_idx(idx_dir / "train-images-idx3-ubyte.gz"),
        data.read_idx(idx_dir / "train-labels-idx1-ubyte.gz"),
    )
    return shards.write_arrays(
        tmp_path_factory.mktemp("ids") / "train", images, labels, extra={"id": np.arange(N)}, records_per_shard=50
    )


def _assert_same_batches(got, expected):
    got, expected = list(got), list(expected)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in b:
            leaves_a, leaves_b = jax.tree.leaves(a[key]), jax.tree.leaves(b[key])
            assert jax.tree.structure(a[key]) == jax.tree.structure(b[key])
            for leaf_a, leaf_b in zip(leaves_a, leaves_b):
                assert type(leaf_a) is np.ndarray and leaf_a.dtype == leaf_b.dtype
                np.testing.assert_array_equal(leaf_a, leaf_b)


def _order(seed, epoch, shuffle=True):
    return {"seed": seed, "epoch": epoch, "shuffle": shuffle}


# Batches as data.iterate_batches makes them


@pytest.mark.parametrize(
    "batch_size, pad_multiple, shuffle, epoch",
    [(32, 1, True, 0), (32, 1, True, 2), (32, 1, False, 0), (28, 8, True, 1), (60, 1, True, 0)],
)
def test_batches_equal_iterate_batches_over_the_arrays_in_memory(
    shard_dir, in_memory, batch_size, pad_multiple, shuffle, epoch
):
    dataset = streaming.StreamingDataset(shard_dir, prefetch=2)
    got = dataset.batches(batch_size, seed=7, epoch=epoch, shuffle=shuffle, pad_multiple=pad_multiple)
    expected = data.iterate_batches(
        in_memory.x_train, in_memory.y_train, batch_size, **_order(7, epoch, shuffle), pad_multiple=pad_multiple
    )
    _assert_same_batches(got, expected)


def test_the_last_partial_batch_is_padded_with_its_first_row_and_masked(shard_dir, in_memory):
    last = list(streaming.StreamingDataset(shard_dir).batches(64, seed=1, pad_multiple=8))[-1]
    real = N % 64
    assert last["mask"].tolist() == [1.0] * real + [0.0] * (64 - real)
    np.testing.assert_array_equal(last["x"][real:], np.broadcast_to(last["x"][0], (64 - real, SIZE, SIZE, 1)))


def test_worker_processes_give_the_same_batches(shard_dir, in_memory):
    dataset = streaming.StreamingDataset(shard_dir, worker_count=1, prefetch=1)
    with dataset.batches(64, seed=3, epoch=1) as got:
        _assert_same_batches(got, data.iterate_batches(in_memory.x_train, in_memory.y_train, 64, **_order(3, 1)))


def test_several_epochs_in_one_iterator_follow_each_other(shard_dir, in_memory):
    got = streaming.StreamingDataset(shard_dir).batches(64, seed=2, epoch=1, num_epochs=2)
    expected = [
        batch
        for epoch in (1, 2)
        for batch in data.iterate_batches(in_memory.x_train, in_memory.y_train, 64, **_order(2, epoch))
    ]
    _assert_same_batches(got, expected)


def test_extra_fields_join_the_images_as_a_dict_input(id_shard_dir, in_memory):
    got = streaming.StreamingDataset(id_shard_dir).batches(48, seed=4)
    x = {"x": in_memory.x_train, "id": np.arange(N)}
    _assert_same_batches(got, data.iterate_batches(x, in_memory.y_train, 48, **_order(4, 0)))


def test_length_and_rows_describe_the_records(id_shard_dir):
    dataset = streaming.StreamingDataset(id_shard_dir)
    rows = dataset.take([0, 5])
    assert len(dataset) == dataset.num_examples == N
    assert rows["x"]["x"].shape == (2, SIZE, SIZE, 1) and rows["x"]["x"].dtype == np.float32
    assert rows["x"]["id"].dtype == np.int64 and rows["y"].dtype == np.int32


# Processes


def test_processes_get_their_share_of_every_global_batch(id_shard_dir, in_memory):
    dataset = streaming.StreamingDataset(id_shard_dir)
    x = {"x": in_memory.x_train, "id": np.arange(N)}
    for index in range(2):
        got = dataset.batches(30, seed=5, pad_multiple=8, process_index=index, process_count=2)
        expected = data.iterate_batches(
            x, in_memory.y_train, 30, **_order(5, 0), pad_multiple=8, process_index=index, process_count=2
        )
        _assert_same_batches(got, expected)


def test_two_processes_cover_each_epoch_exactly_once(id_shard_dir):
    dataset = streaming.StreamingDataset(id_shard_dir)
    for epoch in range(2):
        ids = []
        for index in range(2):
            for batch in dataset.batches(32, seed=5, epoch=epoch, pad_multiple=8, process_index=index, process_count=2):
                ids += batch["x"]["id"][batch["mask"] > 0].tolist()
        assert sorted(ids) == list(range(N))


def test_each_process_reads_only_its_share(shard_dir, monkeypatch):
    dataset = streaming.StreamingDataset(shard_dir, prefetch=0)
    read, original = [], dataset.records.read
    monkeypatch.setattr(dataset.records, "read", lambda indices: read.append(np.asarray(indices)) or original(indices))
    batches = list(dataset.batches(32, seed=1, process_index=1, process_count=2))
    assert [len(rows) for rows in read] == [16] * len(batches)
    shares = [batch["x"][16:] for batch in data.iterate_batches(np.arange(N), None, 32, **_order(1, 0))]
    np.testing.assert_array_equal(np.concatenate(read), np.concatenate(shares))


def test_two_real_processes_on_loopback_read_disjoint_shares(id_shard_dir):
    code = (
        "import json, jax\n"
        "from flaxlesson import parallel, streaming\n"
        "parallel.initialize()\n"
        f"dataset = streaming.StreamingDataset({str(id_shard_dir)!r})\n"
        "ids = []\n"
        "for batch in dataset.batches(32, seed=6, pad_multiple=8, process_index=jax.process_index(),\n"
        "                             process_count=jax.process_count()):\n"
        "    ids.append(batch['x']['id'][batch['mask'] > 0].tolist())\n"
        "print('IDS', json.dumps([jax.process_index(), ids]))\n"
    )
    outputs = launch.launch_local(["-c", code], 2, timeout=120)
    shares = dict(json.loads(line.split(" ", 1)[1]) for out in outputs for line in out.splitlines() if "IDS" in line)
    for index in range(2):
        expected = data.iterate_batches(
            np.arange(N), None, 32, **_order(6, 0), pad_multiple=8, process_index=index, process_count=2
        )
        assert shares[index] == [batch["x"][batch["mask"] > 0].tolist() for batch in expected]
    assert sorted(i for share in shares.values() for batch in share for i in batch) == list(range(N))


# Resuming


def test_start_step_continues_mid_epoch_exactly_across_epochs(shard_dir):
    dataset = streaming.StreamingDataset(shard_dir)
    uninterrupted = list(dataset.batches(32, seed=9, epoch=1, num_epochs=2))
    resumed = dataset.batches(32, seed=9, epoch=1, start_step=4, num_epochs=2)
    assert len(resumed) == len(uninterrupted) - 4
    _assert_same_batches(resumed, uninterrupted[4:])


def test_start_step_past_the_epoch_is_refused(shard_dir):
    with pytest.raises(ValueError, match="start_step"):
        streaming.StreamingDataset(shard_dir).batches(32, start_step=N)


# Validation split


def test_split_holds_out_the_last_fraction_as_train_validation_split_does(shard_dir, in_memory):
    train, validation = streaming.StreamingDataset(shard_dir).split(0.25)
    (x_train, y_train), (x_val, y_val) = data.train_validation_split(in_memory.x_train, in_memory.y_train, 0.25)
    assert (len(train), len(validation)) == (len(x_train), len(x_val))
    _assert_same_batches(train.batches(32, seed=2), data.iterate_batches(x_train, y_train, 32, **_order(2, 0)))
    _assert_same_batches(validation.batches(32, shuffle=False), data.iterate_batches(x_val, y_val, 32))


def test_split_of_zero_has_no_validation_view(shard_dir):
    train, validation = streaming.StreamingDataset(shard_dir).split(0.0)
    assert len(train) == N and validation is None


def test_records_of_fields_in_another_order_read_as_the_writer_orders_them(shard_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    reader = streaming.ShardReader(shard_dir)
    expected = reader.read(np.arange(64))
    writer = array_record_module.ArrayRecordWriter(str(copy / "shard-00000.array_record"), shards.DEFAULT_OPTIONS)
    for image, label in zip(expected["image"], expected["label"]):
        writer.write(streaming.encode_record({"label": label, "image": image}))
    writer.close()
    got = streaming.ShardReader(copy).read(np.arange(64))
    np.testing.assert_array_equal(got["image"], expected["image"])
    np.testing.assert_array_equal(got["label"], expected["label"])


def test_record_layout_decodes_a_batch_as_decode_record_does_each(shard_dir):
    reader = streaming.ShardReader(shard_dir)
    examples = [{"image": np.full((SIZE, SIZE, 1), i, np.uint8), "label": np.int32(i)} for i in (3, 250)]
    decoded = streaming.RecordLayout(reader.fields).decode([streaming.encode_record(e) for e in examples])
    np.testing.assert_array_equal(decoded["image"], np.stack([e["image"] for e in examples]))
    np.testing.assert_array_equal(decoded["label"], [3, 250])
    assert decoded["label"].dtype == np.int32


def test_threads_reading_one_reader_at_once_each_get_their_records(shard_dir, in_memory):
    reader = streaming.ShardReader(shard_dir)
    orders = [np.random.default_rng(seed).permutation(N) for seed in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda order: [reader.read(order[i : i + 8]) for i in range(0, N, 8)], orders))
    for order, batches in zip(orders, results):
        labels = np.concatenate([batch["label"] for batch in batches])
        np.testing.assert_array_equal(labels, in_memory.y_train[order])


def test_the_opening_thread_reads_through_the_readers_that_checked_the_shards(shard_dir, in_memory, monkeypatch):
    opened = []

    class Counted(array_record_module.ArrayRecordReader):
        def __init__(self, path, *args):
            opened.append(path)
            super().__init__(path, *args)

    monkeypatch.setattr(streaming.array_record_module, "ArrayRecordReader", Counted)
    reader = streaming.ShardReader(shard_dir)
    checked = len(opened)
    batch = reader.read(np.arange(N)[::-1])
    np.testing.assert_array_equal(batch["label"], in_memory.y_train[::-1])
    assert checked == len(reader.files) > 1 and len(opened) == checked  # every shard read, none opened again


# Errors that name the file


@pytest.fixture
def damaged(shard_dir, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    return copy


def test_a_missing_metadata_file_is_named(damaged):
    (damaged / "metadata.json").unlink()
    with pytest.raises(streaming.ShardError, match=f"{damaged / 'metadata.json'}: no such file"):
        streaming.StreamingDataset(damaged)


def test_a_missing_shard_is_named(damaged):
    (damaged / "shard-00002.array_record").unlink()
    with pytest.raises(streaming.ShardError, match=f"{damaged / 'shard-00002.array_record'}: missing shard"):
        streaming.StreamingDataset(damaged)


@pytest.mark.parametrize("size", [4000, 100_000])
def test_a_truncated_shard_is_named(damaged, size):
    shard = damaged / "shard-00001.array_record"
    shard.write_bytes(shard.read_bytes()[:size])
    with pytest.raises(streaming.ShardError, match=f"{shard}: .*truncated"):
        streaming.StreamingDataset(damaged)


def test_a_shard_of_other_shapes_is_named_when_opened(damaged, tmp_path):
    other = shards.write_arrays(tmp_path / "other", np.zeros((64, 4, 16), np.uint8), np.zeros(64, np.int32))
    shutil.copy(other / "shard-00000.array_record", damaged / "shard-00003.array_record")
    with pytest.raises(
        streaming.ShardError, match=r"shard-00003.array_record: record 0 field 'image' is .* \(4, 16, 1\)"
    ):
        streaming.StreamingDataset(damaged)


def test_a_record_of_another_shape_inside_a_shard_is_named_when_read(damaged):
    shard = damaged / "shard-00001.array_record"
    writer = array_record_module.ArrayRecordWriter(str(shard), shards.DEFAULT_OPTIONS)
    for i in range(64):
        image = np.zeros((2, 32, 1) if i == 5 else (SIZE, SIZE, 1), np.uint8)
        writer.write(streaming.encode_record({"image": image, "label": np.int32(0)}))
    writer.close()
    dataset = streaming.StreamingDataset(damaged, prefetch=0)
    with pytest.raises(streaming.ShardError, match=f"{shard}: record 5 field 'image' is uint8 of shape \\(2, 32, 1\\)"):
        list(dataset.batches(64, shuffle=False))


def test_writing_into_a_folder_that_holds_shards_is_refused(shard_dir):
    with pytest.raises(ValueError, match="out_dir: .* already holds shards"):
        shards.write_arrays(shard_dir, np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int32))


@pytest.mark.parametrize("kwargs, match", [({"batch_size": 0}, "batch_size"), ({"process_count": 3}, "process_count")])
def test_bad_batch_settings_are_rejected_by_name(shard_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        streaming.StreamingDataset(shard_dir).batches(**{"batch_size": 32, **kwargs})


# TFDS


@pytest.fixture
def prepared_mnist(tmp_path):
    root = _prepared_tfds_metadata(tmp_path / "tfds", lengths=(("train", 40), ("test", 4)))
    with tfds.testing.mock_data(num_examples=40, data_dir=str(root), policy=tfds.testing.MockPolicy.USE_FILES):
        yield root


def test_a_prepared_tfds_split_streams_as_load_tfds_reads_it(prepared_mnist):
    images = data.load_tfds("mnist", prepared_mnist)
    dataset = streaming.StreamingDataset.from_tfds("mnist", "train", data_dir=prepared_mnist, prefetch=0)
    assert dataset.class_names == images.class_names
    _assert_same_batches(
        dataset.batches(16, seed=1), data.iterate_batches(images.x_train, images.y_train, 16, **_order(1, 0))
    )


def test_a_tfds_split_written_as_shards_reads_back_the_same(prepared_mnist, tmp_path):
    images = data.load_tfds("mnist", prepared_mnist)
    out = shards.write_tfds("mnist", "train", tmp_path / "mnist", data_dir=prepared_mnist, records_per_shard=16)
    dataset = streaming.StreamingDataset(out)
    assert len(dataset.records.files) == 3 and dataset.class_names == images.class_names
    _assert_same_batches(dataset.batches(16, shuffle=False), data.iterate_batches(images.x_train, images.y_train, 16))


# The experiment


@pytest.mark.parametrize("steps_per_execution", [1, 3])
def test_a_streaming_fit_and_an_in_memory_fit_end_with_the_same_params(shard_dir, in_memory, steps_per_execution):
    model = models.CNN(features=(4,), dense=16, num_classes=3)
    start = training.create_train_state(model, in_memory.x_train[:1], seed=0)
    settings = {"epochs": 2, "batch_size": 32, "seed": 3, "validation_split": 0.2, "verbose": 0}
    streamed, history = training.fit(
        start, streaming.StreamingDataset(shard_dir), steps_per_execution=steps_per_execution, **settings
    )
    held, held_history = training.fit(start, in_memory.x_train, in_memory.y_train, **settings)
    assert int(streamed.step) == int(held.step)
    for a, b in zip(jax.tree.leaves(streamed.params), jax.tree.leaves(held.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(history.history["val_loss"], held_history.history["val_loss"], rtol=1e-5)


def test_a_streamed_fit_resumed_at_step_n_reads_only_the_steps_from_n_on(shard_dir, in_memory, monkeypatch):
    read, load = [], streaming._LoadBatch.__call__

    def counted(self, position):
        read.append(position)
        return load(self, position)

    monkeypatch.setattr(streaming._LoadBatch, "__call__", counted)
    start = training.create_train_state(models.CNN(features=(4,), dense=16, num_classes=3), in_memory.x_train[:1])
    training.fit(
        start,
        streaming.StreamingDataset(shard_dir),
        epochs=2,
        batch_size=32,
        initial_epoch=1,
        initial_step=6,
        verbose=0,
    )
    steps = -(-N // 32)  # 10 steps an epoch: epoch 1's steps 6..9 are positions 16..19
    assert read == list(range(steps + 6, 2 * steps))


def test_evaluate_and_predict_take_a_streaming_dataset(shard_dir, in_memory):
    state = training.create_train_state(models.CNN(features=(4,), dense=16, num_classes=3), in_memory.x_train[:1])
    dataset = streaming.StreamingDataset(shard_dir)
    np.testing.assert_allclose(
        training.predict(state, dataset), training.predict(state, in_memory.x_train), rtol=1e-6, atol=1e-7
    )
    result, held = training.evaluate(state, dataset), training.evaluate(state, in_memory.x_train, in_memory.y_train)
    np.testing.assert_allclose([result["loss"], result["accuracy"]], [held["loss"], held["accuracy"]], rtol=1e-6)


def test_the_experiment_writes_its_metrics(tmp_path):
    metrics = experiment.main(
        ["--copies=2", "--steps=4", "--rounds=2", "--dataset=digits", "--limit=50", "--workers=0", "--prefetch=0"]
        + [f"--out={tmp_path}"]
    )
    assert metrics["num_examples"] == 100 and metrics["dataset_bytes"] > 100 * 28 * 28
    assert metrics["peak_rss_bytes"] >= metrics["peak_rss_main_bytes"] > 0
    assert metrics["samples_per_second"] > 0 and metrics["in_memory_samples_per_second"] > 0
    assert len(metrics["samples_per_second_per_round"]) == len(metrics["in_memory_samples_per_second_per_round"]) == 2
    ratios = np.divide(metrics["samples_per_second_per_round"], metrics["in_memory_samples_per_second_per_round"])
    assert metrics["relative_speed"] == pytest.approx(np.median(ratios))
    # Scored over the 50 real test images only (a padded batch's extra rows do not count): a whole count of 50.
    correct = metrics["test_accuracy"] * 50
    assert correct == pytest.approx(round(correct), abs=1e-4) and metrics["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["num_examples"] == 100


def test_an_interrupted_experiment_writes_what_ran_and_exits_130(tmp_path, monkeypatch):
    fit = training.fit

    def interrupted_in_its_second_call(*args, **kwargs):
        state, history = fit(*args, **kwargs)
        history.interrupted = "SIGINT" if kwargs["initial_epoch"] else None
        return state, history

    monkeypatch.setattr(training, "fit", interrupted_in_its_second_call)
    with pytest.raises(SystemExit) as exit_:
        experiment.main(
            ["--copies=1", "--steps=4", "--rounds=2", "--dataset=digits", "--limit=50", f"--out={tmp_path}"]
        )
    assert exit_.value.code == 130
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["interrupted"] is True and len(written["samples_per_second_per_round"]) == 1
    assert written["relative_speed"] > 0 and written["dataset_bytes"] > 50 * 28 * 28


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--copies=0", "argument --copies: must be a positive integer"),
        ("--steps=x", "argument --steps: must be an integer"),
    ],
)
def test_the_experiment_rejects_a_bad_flag_with_one_error_line(flag, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        experiment.main([flag])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0]


SMALL_RUN = ["--copies=1", "--steps=4", "--rounds=1", "--dataset=digits", "--limit=50"]


def test_the_experiment_refuses_a_train_shards_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "train_shards").mkdir()
    (tmp_path / "train_shards" / "mine.txt").write_text("a user's file")
    with pytest.raises(SystemExit) as exit_:
        experiment.main([*SMALL_RUN, f"--out={tmp_path}"])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "argument --out:" in errors[0] and "did not write (['mine.txt'])" in errors[0]
    assert (tmp_path / "train_shards" / "mine.txt").read_text() == "a user's file"


def test_the_experiment_replaces_only_a_set_it_wrote(tmp_path):
    shard_dir = experiment.fresh_shard_dir(tmp_path)
    shards.write_arrays(shard_dir, np.zeros((4, 2, 2), np.uint8), np.zeros(4, np.int32), records_per_shard=2)
    assert experiment.fresh_shard_dir(tmp_path) == shard_dir
    assert [p.name for p in shard_dir.iterdir()] == [experiment.MARKER]
    shutil.copytree(shard_dir, tmp_path / "copy")
    (tmp_path / "copy" / experiment.MARKER).unlink()
    shards.write_arrays(tmp_path / "copy", np.zeros((4, 2, 2), np.uint8), np.zeros(4, np.int32))
    shutil.rmtree(shard_dir)
    (tmp_path / "copy").rename(shard_dir)  # a set of shards this experiment did not mark
    with pytest.raises(experiment.flags.ConfigError, match="no written-by-experiments-streaming.json"):
        experiment.fresh_shard_dir(tmp_path)
    assert len(streaming.StreamingDataset(shard_dir)) == 4


def test_the_experiment_on_a_full_disk_exits_1_with_one_line_and_no_partial_shards(tmp_path, monkeypatch, capsys):
    class FullDisk:
        def __init__(self, path, options):
            open(path, "wb").close()

        def write(self, record):
            raise RuntimeError("RESOURCE_EXHAUSTED: No space left on device")

        def close(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: No space left on device")

    monkeypatch.setattr(shards.array_record_module, "ArrayRecordWriter", FullDisk)
    with pytest.raises(SystemExit) as exit_:
        experiment.main([*SMALL_RUN, f"--out={tmp_path}"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert f"{tmp_path / 'train_shards'}: writing shards failed" in err
    assert [p.name for p in (tmp_path / "train_shards").iterdir()] == [experiment.MARKER]


def test_rounds_continue_one_epoch_where_the_whole_run_fits_in_it():
    config = experiment.Config(steps=1280, rounds=4)
    large = [experiment.round_settings(2_400_000, config, r) for r in range(4)]
    assert large == [
        {"initial_epoch": 0, "epochs": 1, "initial_step": 320 * r, "steps_per_epoch": 320 * (r + 1)} for r in range(4)
    ]
    assert experiment.round_settings(60_000, config, 2) == {"initial_epoch": 2, "epochs": 3, "steps_per_epoch": 320}


def test_rounds_inside_one_epoch_train_as_one_fit_of_their_steps(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 4)).astype(np.float32), rng.integers(0, 3, 200)
    dataset = streaming.StreamingDataset(shards.write_arrays(tmp_path / "s", x, y))
    config = experiment.Config(steps=8, rounds=2, batch_size=8, steps_per_execution=1)
    start = state = training.create_train_state(models.MLP(num_classes=3), x[:1])
    for round_ in range(2):
        state, _ = experiment.train(state, dataset, None, config, round_)
    whole, _ = training.fit(start, dataset, epochs=1, steps_per_epoch=8, batch_size=8, verbose=0)
    assert int(state.step) == int(whole.step) == 8
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(whole.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
