"""Print the classes a saved model (saving.save_model) or an exported one (saving.export) predicts for its inputs.

python experiments/predict.py --model runs/cnn_model --inputs shirt.png boot.jpg   # images: the model's size
python experiments/predict.py --model runs/cnn.jaxexport --inputs x_test.npy        # .npy: one sample per row
"""

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments import flags  # noqa: E402
from flaxlesson import saving, training  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config(flags.Config):
    """What to run on what."""

    FLAGS = {
        "model": flags.Flag("a folder saving.save_model wrote (--save-model), or a file saving.export wrote"),
        "inputs": flags.Flag(".npy files (one sample per row, or one sample) or images (png, jpg, ...)", nargs="+"),
    }

    model: str | None = None
    inputs: tuple[str, ...] = ()
    batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A model's probabilities for a batch of inputs, and the shape (without the batch axis) and dtype it takes."""

    probabilities: Callable[[np.ndarray], np.ndarray]
    shape: tuple[int, ...] | None
    dtype: np.dtype


def _exported(path: Path, batch_size: int) -> Predictor:
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception as error:  # the deserializer's errors depend on how the bytes are wrong
        raise flags.ConfigError("model", f"{str(path)!r} is not a file saving.export wrote ({error})") from None
    if len(exported.in_avals) != 1:
        raise flags.ConfigError("model", f"{str(path)!r} takes {len(exported.in_avals)} inputs; this reads one")
    aval = exported.in_avals[0]

    def probabilities(x: np.ndarray) -> np.ndarray:
        return np.concatenate([exported.call(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])

    return Predictor(probabilities, tuple(aval.shape[1:]), np.dtype(aval.dtype))


def _saved(path: Path, batch_size: int) -> Predictor:
    try:
        config = saving.read_config(path)
        state = saving.load_model(path)
    except (ValueError, TypeError) as error:
        raise flags.ConfigError("model", str(error)) from None
    spec = (config["input"] or {}).get("inputs", {})
    if set(spec) - {"x"}:
        raise flags.ConfigError("model", f"{str(path)!r} takes the inputs {sorted(spec)}; this reads one array")
    x = spec.get("x")
    return Predictor(
        lambda inputs: training.predict(state, inputs, batch_size=batch_size),
        None if x is None else tuple(x["shape"]),
        np.dtype(x["dtype"]) if x else np.dtype(np.float32),
    )


def predictor(path: str, batch_size: int) -> Predictor:
    """The predictor of a saved folder or an exported file."""
    model = Path(path)
    if model.is_dir():
        return _saved(model, batch_size)
    if model.is_file():
        return _exported(model, batch_size)
    raise flags.ConfigError("model", f"{path!r} not found")


def _image(path: Path, shape: tuple[int, ...] | None) -> np.ndarray:
    """An image as the model's (height, width, channels) input, pixels scaled to [0, 1] as the datasets are."""
    if shape is None or len(shape) != 3 or shape[2] not in (1, 3):
        raise flags.ConfigError(
            "inputs", f"{str(path)!r}: images need a model of (height, width, 1 or 3) inputs; this takes {shape}"
        )
    try:
        with Image.open(path) as image:
            pixels = image.convert("L" if shape[2] == 1 else "RGB").resize((shape[1], shape[0]))
    except OSError as error:
        raise flags.ConfigError("inputs", f"{str(path)!r} is not an image or .npy file ({error})") from None
    return (np.asarray(pixels, np.float32) / 255).reshape(shape)


def read_inputs(paths: tuple[str, ...], shape: tuple[int, ...] | None) -> tuple[list[str], np.ndarray]:
    """Each sample's name ('file.png', 'x.npy[3]') and the samples stacked; a .npy of one sample gets a batch axis."""
    names, rows = [], []
    for text in paths:
        path = Path(text)
        if not path.is_file():
            raise flags.ConfigError("inputs", f"{text!r} not found")
        if path.suffix != ".npy":
            names.append(text)
            rows.append(_image(path, shape)[None])
            continue
        array = np.load(path, allow_pickle=False)
        array = array[None] if shape is not None and array.shape == shape else array
        if array.ndim == 0 or (shape is not None and array.shape[1:] != shape):
            raise flags.ConfigError(
                "inputs", f"{text!r} holds shape {array.shape}; the model takes (samples, *{shape})"
            )
        names += [f"{text}[{i}]" for i in range(len(array))]
        rows.append(array)
    return names, np.concatenate(rows)


def classes(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The predicted class of each row and its probability; one sigmoid output is class 1 above 0.5."""
    if probabilities.shape[1] == 1:
        p = probabilities[:, 0]
        return (p > 0.5).astype(int), np.where(p > 0.5, p, 1 - p)
    return probabilities.argmax(axis=1), probabilities.max(axis=1)


def run(config: Config) -> dict:
    """Predict every input; print one line per sample: its name, class and that class's probability."""
    if config.model is None:
        raise flags.ConfigError("model", "is required: a saved model folder or an exported file")
    if not config.inputs:
        raise flags.ConfigError("inputs", "is required: one or more .npy or image files")
    model = predictor(config.model, config.batch_size)
    names, x = read_inputs(tuple(config.inputs), model.shape)
    predicted, probability = classes(np.asarray(model.probabilities(x.astype(model.dtype))))
    for name, label, p in zip(names, predicted, probability):
        print(f"{name}\t{label}\t{p:.4f}")
    return {"inputs": names, "classes": predicted.tolist(), "probabilities": probability.tolist()}


def main(argv: list[str] | None = None) -> dict:
    """Flags -> Config -> run."""
    parser = flags.parser(__doc__, Config())
    return flags.execute(parser, run, flags.config(parser, Config, parser.parse_args(argv)))


if __name__ == "__main__":
    flags.setup_logging()
    main()
