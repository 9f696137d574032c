import numpy as np
import pytest

from flaxlesson import batching, data


def test_validation_split_holds_out_the_last_fraction():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.arange(10)
    (x_train, y_train), (x_val, y_val) = data.train_validation_split(x, y, 0.2)
    np.testing.assert_array_equal(y_train, np.arange(8))
    np.testing.assert_array_equal(y_val, [8, 9])
    np.testing.assert_array_equal(x_val[:, 0], [8.0, 9.0])


def test_validation_split_floors_the_training_part_like_keras():
    (_, y_train), (_, y_val) = data.train_validation_split(np.zeros((105, 4)), np.arange(105), 0.2)
    assert (len(y_train), len(y_val)) == (84, 21)


def test_validation_split_zero_keeps_everything():
    (_, y_train), (_, y_val) = data.train_validation_split(np.zeros((5, 1)), np.arange(5), 0.0)
    assert len(y_train) == 5 and len(y_val) == 0


def test_validation_split_returns_views_not_copies():
    x, y = np.zeros((10, 3)), np.arange(10)
    (x_train, y_train), (x_val, _) = data.train_validation_split(x, y, 0.2)
    assert np.shares_memory(x_train, x) and np.shares_memory(x_val, x) and np.shares_memory(y_train, y)


@pytest.mark.parametrize("split", [-0.1, 1.0, 1.5])
def test_validation_split_outside_unit_interval_is_rejected(split):
    with pytest.raises(ValueError, match="validation_split"):
        data.train_validation_split(np.zeros((10, 1)), np.arange(10), split)


def test_batches_have_one_size_and_mask_the_partial_last():
    batches = list(data.iterate_batches(np.arange(7)[:, None], np.arange(7), 3))
    assert [b["x"].shape for b in batches] == [(3, 1)] * 3
    np.testing.assert_array_equal(batches[-1]["mask"], [1, 0, 0])
    np.testing.assert_array_equal(batches[-1]["y"][:1], [6])


def test_batches_pad_to_a_multiple_of_devices():
    batches = list(data.iterate_batches(np.zeros((30, 2)), np.zeros(30), 30, pad_multiple=8))
    assert batches[0]["x"].shape == (32, 2)
    assert batches[0]["mask"].sum() == 30


def test_shuffled_batches_cover_every_sample_once():
    batches = data.iterate_batches(np.zeros((11, 1)), np.arange(11), 4, seed=0, shuffle=True)
    ys = np.concatenate([b["y"][b["mask"] > 0] for b in batches])
    assert sorted(ys.tolist()) == list(range(11))
    assert ys.tolist() != list(range(11))


def test_batches_of_dict_inputs_slice_every_array():
    x = {"x": np.arange(5)[:, None], "seq_lengths": np.arange(5) + 1}
    batch = next(data.iterate_batches(x, np.arange(5), 2))
    np.testing.assert_array_equal(batch["x"]["seq_lengths"], [1, 2])


def test_the_epoch_order_is_default_rng_of_seed_and_epoch():
    np.testing.assert_array_equal(
        batching.epoch_order(10, seed=3, epoch=2), np.random.default_rng([3, 2]).permutation(10)
    )
    np.testing.assert_array_equal(batching.epoch_order(4, seed=3, epoch=2, shuffle=False), [0, 1, 2, 3])


def test_a_layout_step_is_its_slice_of_the_order_padded_and_shared():
    # 10 rows, batches of 4 padded to 6 (a multiple of 3 devices), process 1 of 3 reads rows 2..3 of each batch.
    layout = batching.Layout(10, 4, pad_multiple=3, process_index=1, process_count=3)
    order = np.array([9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    rows, mask = layout.step_rows(order, 1)
    np.testing.assert_array_equal(rows, [3, 2])
    np.testing.assert_array_equal(mask, [1, 1])
    rows, mask = layout.step_rows(order, 2)  # the last batch: rows 1, 0, then copies of its first row
    np.testing.assert_array_equal(rows, [1, 1])
    np.testing.assert_array_equal(mask, [0, 0])
    assert layout.steps == 3 and layout.size == 6


def test_iterate_batches_from_a_start_step_gives_the_rest_of_the_epoch():
    x, y = np.arange(10)[:, None], np.arange(10)
    whole = list(data.iterate_batches(x, y, 3, seed=1, epoch=2, shuffle=True))
    rest = list(data.iterate_batches(x, y, 3, seed=1, epoch=2, shuffle=True, start_step=2))
    assert len(rest) == 2
    for a, b in zip(rest, whole[2:]):
        np.testing.assert_array_equal(a["y"], b["y"])


@pytest.mark.parametrize("batch_size", [0, -3])
def test_batch_size_below_one_is_rejected(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        next(data.iterate_batches(np.zeros((3, 1)), np.zeros(3), batch_size))


def test_iris_split_matches_the_lesson():
    (x_train, y_train), (x_test, y_test) = data.load_iris()
    assert x_train.shape == (105, 4) and x_test.shape == (45, 4)
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(x_train.std(axis=0), 1.0, atol=1e-5)
