"""`summary.summary`: Keras's model.summary() table, with Keras's parameter counts for the lesson's models."""

import numpy as np
import pytest

from experiments import distributed
from flaxlesson import models, summary

LESSON_MODELS = {
    # Keras's model.summary() totals for the lesson's networks, as the lesson's own Keras code prints them.
    "mlp": (models.MLP(num_classes=3), np.zeros((1, 4), np.float32), 193),
    "cnn": (models.CNN(), np.zeros((1, 28, 28, 1), np.float32), 225_034),
    "rnn": (models.SimpleRNNClassifier(50, num_classes=1), np.zeros((1, 5), np.float32), 2_651),
    "mirrored_mlp": (distributed.lesson_model(), np.zeros((1, 784), np.float32), 55_050),
}


@pytest.mark.parametrize("key", LESSON_MODELS)
def test_lesson_models_have_keras_parameter_counts(key):
    model, sample, keras_total = LESSON_MODELS[key]
    result = summary.summary(model, sample)
    assert result.total_params == result.trainable_params == keras_total
    assert sum(row.params for row in result.rows) == keras_total
    assert result.non_trainable_params == 0


def test_cnn_rows_are_its_layers_with_keras_counts_and_shapes():
    result = summary.summary(models.CNN(), np.zeros((2, 28, 28, 1), np.float32))
    assert [(r.name, r.type, r.output_shape, r.params) for r in result.rows] == [
        ("Conv_0", "ConvMaxPool", "(None, 13, 13, 32)", 320),
        ("Conv_1", "ConvMaxPool", "(None, 5, 5, 64)", 18_496),
        ("Dense_0", "Dense", "(None, 128)", 204_928),
        ("Dense_1", "Dense", "(None, 10)", 1_290),
    ]


def test_the_rnn_cell_is_folded_into_its_layer_as_keras_shows_simple_rnn():
    result = summary.summary(models.SimpleRNNClassifier(50, num_classes=1), np.zeros((1, 5), np.float32))
    assert [(r.name, r.type, r.params) for r in result.rows] == [
        ("RNN_0", "RNN[SimpleCell]", 2_600),
        ("Dense_0", "Dense", 51),
    ]


def test_the_table_reads_as_keras_prints_it():
    text = str(summary.summary(models.CNN(), np.zeros((1, 28, 28, 1), np.float32)))
    assert text.splitlines()[0] == 'Model: "CNN"'
    assert "Layer (type)" in text and "Output Shape" in text and "Param #" in text
    assert " Dense_0 (Dense)" in text and "204,928" in text
    assert "Total params: 225,034 (879.04 KB)" in text
    assert "Trainable params: 225,034 (879.04 KB)" in text
    assert "Non-trainable params: 0 (0.00 B)" in text


def test_dict_inputs_as_fit_takes_them():
    x = {"x": np.zeros((1, 28, 28), np.float32), "seq_lengths": np.ones((1,), np.int32)}
    result = summary.summary(models.SimpleRNNClassifier(50, num_classes=10), x)
    assert result.total_params == 28 * 50 + 50 * 50 + 50 + 50 * 10 + 10


def test_as_dict_is_the_rows_and_totals():
    data = summary.summary(models.MLP(num_classes=3), np.zeros((1, 4), np.float32)).as_dict()
    assert data["total_params"] == 193 and [row["params"] for row in data["rows"]] == [50, 110, 33]


def test_readable_memory_size_as_keras():
    assert summary.readable_memory_size(772) == "772.00 B"
    assert summary.readable_memory_size(900_136) == "879.04 KB"
    assert summary.readable_memory_size(3 * 1024**3) == "3.00 GB"


def test_a_non_module_is_refused():
    with pytest.raises(ValueError, match="model must be a flax.linen Module, got function"):
        summary.summary(lambda x: x, np.zeros((1, 4)))
