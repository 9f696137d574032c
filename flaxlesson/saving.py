"""Keras's `model.save`, `keras.models.load_model` and `model.export` for a trained `TrainState`.

`save_model` writes one folder: `model.json` (the module's class and fields, the loss, the format version, the
input's shape when known) and `.npz` arrays (params, optionally the optimiser state, and BatchNorm's
`batch_stats`). `load_model` rebuilds the module from its class name without running code from the file: the
library's own models are found in `flaxlesson.models`, any other class only in the caller's `custom_objects`
(Keras's `safe_mode`; nothing named in the file is imported). Arrays are read with `allow_pickle=False`.

`export` serializes the model's predict (probabilities) with `jax.export`, weights included, batch size
polymorphic, for CPU and CUDA: a process with only `jax` and `numpy` loads it with `jax.export.deserialize`.
"""

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from flaxlesson import core, models

log = logging.getLogger(__name__)

FORMAT = "flaxlesson.saving"
VERSION = 1
CONFIG_FILE = "model.json"
LIBRARY_MODULE = models.__name__
# Activations a module field may hold, saved by name (the lesson's RNN takes one).
ACTIVATIONS = {
    name: getattr(nn, name)
    for name in (
        "celu",
        "elu",
        "gelu",
        "hard_sigmoid",
        "hard_tanh",
        "leaky_relu",
        "log_sigmoid",
        "relu",
        "relu6",
        "selu",
        "sigmoid",
        "silu",
        "soft_sign",
        "softplus",
        "swish",
        "tanh",
    )
}
_TREES = ("params", "opt_state", "batch_stats")


class SavedModelError(ValueError):
    """A folder that is not a saved model, or one this code cannot rebuild; the message says why."""


# ---- the module's config ----


def _is_dtype(value: Any) -> bool:
    return isinstance(value, np.dtype) or (
        isinstance(value, type)
        and (issubclass(value, np.generic) or isinstance(getattr(value, "dtype", None), np.dtype))
    )


def _encode(value: Any, where: str) -> Any:
    """A field value as JSON: numbers, strings, None, sequences of them, dtypes and flax activations by name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_encode(item, where) for item in value]
    if _is_dtype(value):
        return {"dtype": jnp.dtype(value).name}
    name = next((n for n, fn in ACTIVATIONS.items() if fn is value), None)
    if name is not None:
        return {"activation": name}
    raise TypeError(
        f"{where} is {value!r} ({type(value).__name__}), which cannot be saved: a model's fields must be numbers, "
        f"strings, bools, None, tuples or lists of them, dtypes, or one of flax.linen's activations "
        f"({', '.join(sorted(ACTIVATIONS))})"
    )


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return tuple(_decode(item, where) for item in value)
    if isinstance(value, dict):
        if value.keys() == {"dtype"}:
            try:
                return jnp.dtype(value["dtype"])
            except TypeError:
                raise SavedModelError(f"{where}: unknown dtype {value['dtype']!r}") from None
        if value.keys() == {"activation"} and value["activation"] in ACTIVATIONS:
            return ACTIVATIONS[value["activation"]]
        raise SavedModelError(f"{where}: cannot read the value {value!r}")
    return value


def _module_of(state: Any) -> nn.Module:
    module = getattr(state, "model", None)
    if not isinstance(module, nn.Module):
        raise TypeError(
            "state: needs the linen module it trains (TrainState.model; training.create_train_state sets it)"
        )
    return module


def _fields(module: nn.Module) -> dict[str, Any]:
    """The module's own dataclass fields (not Flax's `parent` and `name`) as JSON values."""
    kind = type(module).__qualname__
    return {
        f.name: _encode(getattr(module, f.name), f"{kind}.{f.name}")
        for f in dataclasses.fields(module)
        if f.init and f.name not in ("parent", "name")
    }


def _check_custom_objects(custom_objects: Mapping[str, Any] | None) -> dict[str, type]:
    custom_objects = dict(custom_objects or {})
    for name, value in custom_objects.items():
        if not (isinstance(value, type) and issubclass(value, nn.Module)):
            raise TypeError(f"custom_objects[{name!r}] must be a flax.linen Module subclass, got {value!r}")
    return custom_objects


def _module_class(saved: Mapping[str, Any], custom_objects: dict[str, type], where: str) -> type:
    """The class a saved model names: the caller's `custom_objects` entry, else one of `flaxlesson.models`."""
    module, qualname = saved["module"], saved["qualname"]
    if qualname in custom_objects:
        return custom_objects[qualname]
    found = getattr(models, qualname, None) if module == LIBRARY_MODULE else None
    if isinstance(found, type) and issubclass(found, nn.Module):
        return found
    raise SavedModelError(
        f"{where} holds a {module}.{qualname}, which is not one of flaxlesson.models; nothing was imported. "
        f"If you trust it, pass its class: load_model(path, custom_objects={{{qualname!r}: {qualname}}})"
    )


# ---- arrays ----


def _key_name(key: Any) -> str:
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))


def _named_leaves(tree: Any) -> dict[str, Any]:
    """Leaf name ('Dense_0/kernel') -> leaf, in tree order."""
    return {"/".join(map(_key_name, path)): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_host(leaf: Any) -> np.ndarray:
    """A host copy of one array; an array spread over several processes is gathered whole on each first."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        leaf = multihost_utils.process_allgather(leaf, tiled=True)
    return np.array(jax.device_get(leaf), copy=True)


def _storable(array: np.ndarray) -> np.ndarray:
    """`array` as .npz keeps it: ml_dtypes (bfloat16, ...) as unsigned ints of their width, read back by dtype name."""
    if array.dtype.type.__module__.startswith("ml_dtypes"):
        return array.view(np.dtype(f"u{array.dtype.itemsize}"))
    return array


def _spec(leaves: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    return {name: {"shape": list(a.shape), "dtype": a.dtype.name} for name, a in leaves.items()}


def _read_arrays(folder: Path, tree: str, spec: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    if not (folder / f"{tree}.npz").is_file():
        raise SavedModelError(f"{folder} lacks {tree}.npz, which {CONFIG_FILE} lists")
    with np.load(folder / f"{tree}.npz", allow_pickle=False) as stored:
        arrays = {}
        for name, leaf in spec.items():
            if name not in stored:
                raise SavedModelError(f"{folder}/{tree}.npz lacks {name!r}, which {CONFIG_FILE} lists")
            array = stored[name]
            dtype = jnp.dtype(leaf["dtype"])
            arrays[name] = array if array.dtype == dtype else array.view(dtype)
    return arrays


def _differences(saved: Mapping[str, tuple], wanted: Mapping[str, tuple], other: str = "the model") -> list[str]:
    lines = [f"{name}: {other} has it, the saved model does not" for name in sorted(wanted.keys() - saved.keys())]
    lines += [f"{name}: saved, but not in {other}" for name in sorted(saved.keys() - wanted.keys())]
    lines += [
        f"{name}: saved shape {saved[name]}, {other} has {wanted[name]}"
        for name in sorted(saved.keys() & wanted.keys())
        if saved[name] != wanted[name]
    ]
    return lines


def _fill_opt_state(template: Any, arrays: Mapping[str, np.ndarray], where: str) -> Any:
    """`template`'s tree with the saved arrays as leaves; SavedModelError naming each leaf that differs."""
    wanted = {name: tuple(np.shape(leaf)) for name, leaf in _named_leaves(template).items()}
    problems = _differences({name: a.shape for name, a in arrays.items()}, wanted, "this optimizer's state")
    if problems:
        raise SavedModelError(
            f"{where}: the saved optimizer state does not fit this optimizer; pass the one it was saved with "
            f"(optimizer=...) or save with include_optimizer=False:\n  " + "\n  ".join(problems)
        )
    leaves = [jnp.asarray(arrays[name]) for name in _named_leaves(template)]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


# ---- inputs ----


def _input_spec(sample_input: Any) -> dict[str, Any]:
    """The shape (without the batch axis) and dtype of each model input: {'x': ..., and any keyword inputs}."""
    named = sample_input if isinstance(sample_input, Mapping) else {"x": sample_input}
    spec = {}
    for name, value in named.items():
        value = np.asarray(value)
        if value.ndim < 1:
            raise ValueError(f"sample_input: {name!r} needs a batch axis, got shape {value.shape}")
        spec[name] = {"shape": list(value.shape[1:]), "dtype": value.dtype.name}
    return {"inputs": spec, "is_dict": isinstance(sample_input, Mapping)}


def input_structs(saved_input: Mapping[str, Any], batch: int = 1) -> Any:
    """`jax.ShapeDtypeStruct`s of a batch of `batch` inputs as a saved model's `model.json` records them."""
    structs = {
        name: jax.ShapeDtypeStruct((batch, *leaf["shape"]), jnp.dtype(leaf["dtype"]))
        for name, leaf in saved_input["inputs"].items()
    }
    return structs if saved_input["is_dict"] else structs["x"]


def _model_shapes(module: nn.Module, saved_input: Mapping[str, Any]) -> dict[str, dict[str, tuple]]:
    """The variables' shapes `module` makes on the saved input, per collection ('params', 'batch_stats')."""
    extra = {"train": False} if core.takes(module, "train") else {}

    def init(x: Any) -> Any:
        return core.apply_inputs(lambda inputs, **kw: module.init(jax.random.key(0), inputs, **kw, **extra), x)

    variables = jax.eval_shape(init, input_structs(saved_input))
    return {
        tree: {name: tuple(leaf.shape) for name, leaf in _named_leaves(variables.get(tree, {})).items()}
        for tree in ("params", "batch_stats")
    }


# ---- save and load ----


def _primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_path(path: str | os.PathLike) -> None:
    """ValueError unless `path` is free for `save_model`: missing, an empty folder, or a saved model."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"path: {str(folder)!r} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"path: {str(folder)!r} is a folder that holds something else than a saved model")


def save_model(
    path: str | os.PathLike,
    state: Any,
    *,
    sample_input: Any = None,
    include_optimizer: bool = True,
) -> Path:
    """Keras's `model.save`: write `state`'s model (class and fields), params and loss to the folder `path`.

    `include_optimizer` also saves the optimiser state, so a loaded model trains on as if never stopped.
    `sample_input` (an array or a dict of inputs, with a batch axis) records the input's shape, which lets
    `load_model` check the params against the model and `experiments/predict.py` shape images. Every process
    calls this (gathering arrays spread over several processes is collective); the primary process writes.
    A saved model at `path` is replaced.
    """
    folder = Path(path)
    check_path(folder)
    module = _module_of(state)
    core.get_loss(state.loss)
    trees = {"params": state.params}
    if include_optimizer:
        trees["opt_state"] = state.opt_state
    batch_stats = getattr(state, "batch_stats", None)
    if batch_stats:
        trees["batch_stats"] = batch_stats
    config = {
        "format": FORMAT,
        "version": VERSION,
        "module": type(module).__module__,
        "qualname": type(module).__qualname__,
        "config": _fields(module),
        "loss": state.loss,
        "step": int(_to_host(state.step)),
        "input": None if sample_input is None else _input_spec(sample_input),
    }
    arrays = {
        tree: {name: _to_host(leaf) for name, leaf in _named_leaves(value).items()} for tree, value in trees.items()
    }
    config["arrays"] = {tree: _spec(leaves) for tree, leaves in arrays.items()}
    if _primary():
        _write(folder, config, arrays)
    _sync("flaxlesson.saving.save_model")
    log.info("Saved %s (%s) to %s", type(module).__qualname__, ", ".join(arrays), folder)
    return folder


def _write(folder: Path, config: dict, arrays: dict[str, dict[str, np.ndarray]]) -> None:
    """Write the files in a fresh folder beside `folder`, then put it in place, so no half-written model is left."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fresh = folder.parent / f".{folder.name}.writing-{os.getpid()}"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    try:
        for tree, leaves in arrays.items():
            np.savez(fresh / f"{tree}.npz", **{name: _storable(a) for name, a in leaves.items()})
        (fresh / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        fresh.rename(folder)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A saved model's `model.json`; SavedModelError for a missing folder or one that is not a saved model."""
    folder = Path(path)
    if not folder.is_dir():
        raise SavedModelError(f"path: {str(folder)!r} is not a folder" + ("" if folder.exists() else " (not found)"))
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise SavedModelError(f"path: {str(folder)!r} is not a model saved by flaxlesson.saving.save_model")
    if config.get("version") != VERSION:
        raise SavedModelError(
            f"path: {str(folder)!r} is format version {config.get('version')}, this code reads {VERSION}"
        )
    return config


def load_model(
    path: str | os.PathLike,
    custom_objects: Mapping[str, type] | None = None,
    *,
    optimizer: optax.GradientTransformation | None = None,
) -> core.TrainState:
    """Keras's `load_model`: the `TrainState` saved at `path`, ready for fit, evaluate and predict.

    The module is rebuilt from its saved class and fields: a class of `flaxlesson.models` by itself, any other
    only when passed in `custom_objects` as {'ClassName': ClassName}; nothing the file names is imported.
    `optimizer` (Keras's Adam by default) gets the saved optimiser state when there is one, else a fresh one.
    """
    custom_objects = _check_custom_objects(custom_objects)
    folder = Path(path)
    config = read_config(folder)
    where = str(folder)
    cls = _module_class(config, custom_objects, where)
    fields = {name: _decode(value, f"{cls.__qualname__}.{name}") for name, value in config["config"].items()}
    try:
        module = cls(**fields)
    except TypeError as error:
        raise SavedModelError(
            f"{where}: {cls.__qualname__} does not take the saved fields {sorted(fields)}: {error}"
        ) from None
    arrays = {tree: _read_arrays(folder, tree, spec) for tree, spec in config["arrays"].items()}
    if config["input"] is not None:
        wanted = _model_shapes(module, config["input"])
        for tree in ("params", "batch_stats"):
            saved = {name: a.shape for name, a in arrays.get(tree, {}).items()}
            problems = _differences(saved, wanted[tree])
            if problems:
                raise SavedModelError(
                    f"{where}: the saved {tree} do not fit {cls.__qualname__}{fields}:\n  " + "\n  ".join(problems)
                )
    params = _unflatten(arrays["params"])
    extra = {"batch_stats": _unflatten(arrays["batch_stats"])} if "batch_stats" in arrays else {}
    state = core.TrainState.create(
        apply_fn=module.apply,
        params=params,
        tx=optimizer or core.keras_adam(),
        loss=config["loss"],
        model=module,
        **extra,
    )
    if "opt_state" in arrays:
        state = state.replace(opt_state=_fill_opt_state(state.opt_state, arrays["opt_state"], where))
    return state.replace(step=jnp.asarray(config["step"], jnp.int32))


def _unflatten(leaves: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Nested dicts ({'Dense_0': {'kernel': ...}}) from the saved leaf names."""
    tree: dict[str, Any] = {}
    for name, array in leaves.items():
        *parents, last = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = jnp.asarray(array)
    return tree


# ---- export ----


def export(
    path: str | os.PathLike,
    state: Any,
    sample_input: Any,
    *,
    platforms: tuple[str, ...] = ("cpu", "cuda"),
) -> Path:
    """Keras's `model.export`: write the model's predict (probabilities), weights included, as `jax.export` bytes.

    The batch size is symbolic, so any batch runs; the other axes and dtypes are `sample_input`'s (an array or a
    dict of inputs). Load and call it with jax and numpy only::

        exported = jax.export.deserialize(open(path, "rb").read())
        probabilities = np.asarray(exported.call(np.asarray(x, np.float32)))
    """
    _module_of(state)
    predict_step = core.make_predict_step(state.loss)
    state = jax.tree.map(_to_host, state)

    def predict(x: Any) -> jax.Array:
        return predict_step(state, {"x": x})

    sample = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), sample_input)
    (args,) = jax.export.symbolic_args_specs((sample,), "b, ...")
    exported = jax.export.export(jax.jit(predict), platforms=platforms)(args)
    target = Path(path)
    if _primary():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(exported.serialize())
    _sync("flaxlesson.saving.export")
    log.info("Exported %s for %s to %s", type(_module_of(state)).__qualname__, ", ".join(platforms), target)
    return target
