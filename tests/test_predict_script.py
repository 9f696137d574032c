"""experiments/predict.py: the classes of a saved or an exported model, for images and .npy files."""

import numpy as np
import pytest
from PIL import Image

from experiments import predict
from flaxlesson import models, saving, training


@pytest.fixture(scope="module")
def cnn():
    """A tiny CNN on 10x10 grey images and six images of whole grey levels (as PNG files hold them)."""
    pixels = np.random.default_rng(4).integers(0, 256, (6, 10, 10), dtype=np.uint8)
    x = (pixels / 255).astype(np.float32)[..., None]
    state = training.create_train_state(models.CNN(features=(3, 4), dense=8, num_classes=5), x[:1], seed=1)
    return state, pixels, x


def test_a_saved_model_prints_the_class_of_each_image(cnn, tmp_path, capsys):
    state, pixels, x = cnn
    saving.save_model(tmp_path / "model", state, sample_input=x[:1])
    files = []
    for i, image in enumerate(pixels):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(image).save(files[-1])
    result = predict.main(["--model", str(tmp_path / "model"), "--inputs", *files])
    expected = training.predict(state, x)
    assert result["classes"] == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(result["probabilities"], expected.max(axis=1), rtol=1e-6)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{files[0]}\t{expected[0].argmax()}\t{expected[0].max():.4f}"
    assert len(lines) == 6


def test_an_exported_model_prints_the_class_of_each_npy_row(cnn, tmp_path):
    state, _, x = cnn
    saving.export(tmp_path / "cnn.jaxexport", state, x[:1])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "one.npy", x[2])
    result = predict.main(
        ["--model", str(tmp_path / "cnn.jaxexport"), "--inputs", str(tmp_path / "x.npy"), str(tmp_path / "one.npy")]
    )
    expected = training.predict(state, x).argmax(axis=1)
    assert result["classes"] == [*expected.tolist(), int(expected[2])]
    assert result["inputs"][-2:] == [f"{tmp_path}/x.npy[5]", f"{tmp_path}/one.npy[0]"]


def test_one_sigmoid_output_is_class_1_above_one_half():
    labels, probabilities = predict.classes(np.array([[0.2], [0.9]], np.float32))
    assert labels.tolist() == [0, 1]
    np.testing.assert_allclose(probabilities, [0.8, 0.9])


def test_a_missing_model_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        predict.main(["--model", str(tmp_path / "nowhere"), "--inputs", "x.npy"])
    assert stop.value.code == 2
    assert "argument --model:" in capsys.readouterr().err


def test_npy_rows_of_another_shape_are_a_usage_error(cnn, tmp_path, capsys):
    state, _, x = cnn
    saving.save_model(tmp_path / "model", state, sample_input=x[:1])
    np.save(tmp_path / "x.npy", x[:, :8])
    with pytest.raises(SystemExit):
        predict.main(["--model", str(tmp_path / "model"), "--inputs", str(tmp_path / "x.npy")])
    assert "the model takes (samples, *(10, 10, 1))" in capsys.readouterr().err
