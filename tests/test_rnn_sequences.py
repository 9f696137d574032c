"""experiments/rnn_sequences.py end to end on tiny settings: the lesson's toy, and the rows task on bundled digits."""

import json

import numpy as np
import pytest

from experiments import flags, rnn_sequences
from flaxlesson import data, saving, training


def test_lesson_task_pads_fits_and_predicts(tmp_path):
    metrics = rnn_sequences.run(rnn_sequences.LessonConfig(epochs=2, out=str(tmp_path)))
    np.testing.assert_array_equal(metrics["padded_x"], [[1, 2, 3, 0, 0], [4, 5, 6, 0, 0], [7, 8, 9, 0, 0]])
    predictions = np.asarray(metrics["predictions"])
    again = rnn_sequences.run(rnn_sequences.LessonConfig(epochs=2, out=str(tmp_path / "again")))
    assert predictions.shape == (3, 1) and len(np.unique(predictions)) == 3  # one probability per sequence
    np.testing.assert_array_equal(predictions, again["predictions"])  # the seed fixes the run
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["settings"]["batch_size"] == 1 and len(written["history"]["loss"]) == 2
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_rows_task_shows_seq_lengths_ignore_extra_padding(tmp_path):
    config = rnn_sequences.RowsConfig(
        dataset="digits", units=8, epochs=1, masking_epochs=1, extra_padding=5, validation_split=0, out=str(tmp_path)
    )
    metrics = rnn_sequences.run(config)
    masking = metrics["masking"]
    assert masking["with_seq_lengths"]["max_probability_change_from_extra_padding"] < 1e-5
    assert masking["without_seq_lengths"]["max_probability_change_from_extra_padding"] > 1e-3
    for name in ("curves.png", "curves_cut_with_seq_lengths.png", "curves_cut_without_seq_lengths.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_rows_task_reports_the_saved_models_accuracy_on_the_test_rows(tmp_path):
    config = rnn_sequences.RowsConfig(
        dataset="digits",
        units=32,
        epochs=8,
        masking_epochs=0,
        validation_split=0,
        out=str(tmp_path / "out"),
        save_model=str(tmp_path / "model"),
    )
    metrics = rnn_sequences.run(config)
    images = data.load_images("digits")
    probabilities = training.predict(saving.load_model(config.save_model), rnn_sequences.image_rows(images.x_test))
    accuracy = np.mean(np.argmax(probabilities, -1) == images.y_test)
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 2 / images.num_classes  # ten epochs learn: well above chance


def test_image_rows_are_steps_of_pixels():
    images = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4, 1)
    np.testing.assert_array_equal(rnn_sequences.image_rows(images)[1, 2], [20, 21, 22, 23])


def test_cut_rows_keeps_the_first_rows_and_pads_after():
    sequences = np.arange(1, 13, dtype=np.float32).reshape(2, 3, 2)
    out = rnn_sequences.cut_rows(sequences, np.array([1, 3]), maxlen=4)
    np.testing.assert_array_equal(out, [[[1, 2], [0, 0], [0, 0], [0, 0]], [[7, 8], [9, 10], [11, 12], [0, 0]]])


def test_more_rows_kept_than_the_images_have_is_an_error_of_min_rows(tmp_path):
    config = rnn_sequences.RowsConfig(dataset="digits", min_rows=29, out=str(tmp_path))
    with pytest.raises(flags.ConfigError, match=r"min_rows: must lie in \[1, 28\], got 29"):
        rnn_sequences.run(config)
