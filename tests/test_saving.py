"""saving: save_model -> load_model in a fresh process predicts bit for bit; export runs with only jax and numpy."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlesson import core, models, saving, training

ROOT = Path(__file__).resolve().parent.parent
USER_NET = '''
import flax.linen as nn

class UserNet(nn.Module):
    """A user's own module: Dense(width, activation) -> Dense(classes)."""

    width: int = 6
    classes: int = 3
    activation: object = nn.tanh

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.classes)(self.activation(nn.Dense(self.width)(x)))
'''


def _python(code: str, *paths: Path) -> str:
    """Run `code` in a fresh interpreter that imports this checkout (and `paths`); its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (ROOT, *paths)))}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _user_module(folder: Path):
    (folder / "usernet.py").write_text(USER_NET)
    spec = importlib.util.spec_from_file_location("usernet", folder / "usernet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _images(n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).random((n, 10, 10, 1), np.float32)


def _mlp_state(seed: int = 0) -> training.TrainState:
    return training.create_train_state(models.MLP(hidden=(4,), num_classes=3), np.zeros((1, 6), np.float32), seed=seed)


def _cases(user_net) -> dict:
    x = _images()
    return {
        "mlp": (models.MLP(hidden=(5, 4), num_classes=3), x.reshape(5, -1), "sparse_categorical_crossentropy"),
        "cnn": (models.CNN(features=(3, 4), dense=8, num_classes=4), x, "sparse_categorical_crossentropy"),
        "rnn": (models.SimpleRNNClassifier(units=4, activation=nn.tanh), x[:, :, 0, 0], "binary_crossentropy"),
        "user": (user_net.UserNet(width=5), x.reshape(5, -1), "categorical_crossentropy"),
    }


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Each case's saver predictions and those of the same model loaded in a fresh process."""
    folder = tmp_path_factory.mktemp("saved")
    cases = _cases(_user_module(folder))
    expected = {}
    for name, (model, x, loss) in cases.items():
        state = training.create_train_state(model, x[:1], seed=3, loss=loss)
        saving.save_model(folder / name, state, sample_input=x[:1])
        np.save(folder / f"{name}_x.npy", x)
        expected[name] = training.predict(state, x)
    _python(
        f"""
        import numpy as np
        from flaxlesson import saving, training
        from usernet import UserNet
        for name in {list(cases)}:
            state = saving.load_model("{folder}/" + name, custom_objects={{"UserNet": UserNet}})
            np.save("{folder}/" + name + "_p.npy", training.predict(state, np.load("{folder}/" + name + "_x.npy")))
        """,
        folder,
    )
    return {name: (expected[name], np.load(folder / f"{name}_p.npy")) for name in cases}


@pytest.mark.parametrize("name", ["mlp", "cnn", "rnn", "user"])
def test_a_model_loaded_in_a_fresh_process_predicts_bit_for_bit_as_the_saver(reloaded, name):
    saved, loaded = reloaded[name]
    assert saved.shape[0] == 5
    np.testing.assert_array_equal(loaded, saved)


def test_the_module_is_rebuilt_from_its_fields_dtype_and_activation_included(tmp_path):
    model = models.SimpleRNNClassifier(units=3, num_classes=2, activation=nn.tanh, dtype=jnp.bfloat16)
    state = training.create_train_state(model, np.zeros((1, 4), np.float32))
    loaded = saving.load_model(saving.save_model(tmp_path / "m", state))
    rebuilt = loaded.model
    assert (rebuilt.units, rebuilt.num_classes, rebuilt.activation) == (3, 2, nn.tanh)
    assert jnp.dtype(rebuilt.dtype) == jnp.bfloat16


def test_the_optimizer_state_is_restored_so_training_continues_as_if_never_stopped(tmp_path):
    x = np.random.default_rng(1).random((16, 6), np.float32)
    y = np.arange(16) % 3
    state, _ = training.fit(_mlp_state(), x, y, epochs=1, batch_size=8, verbose=0)
    loaded = saving.load_model(saving.save_model(tmp_path / "m", state))
    assert int(loaded.step) == 2
    go_on, _ = training.fit(state, x, y, epochs=1, batch_size=8, verbose=0)
    resumed, _ = training.fit(loaded, x, y, epochs=1, batch_size=8, verbose=0)
    jax.tree.map(np.testing.assert_array_equal, resumed.params, go_on.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.opt_state, go_on.opt_state)


def test_without_the_optimizer_the_loaded_state_has_a_fresh_one(tmp_path):
    x, y = np.ones((8, 6), np.float32), np.zeros(8, int)
    state, _ = training.fit(_mlp_state(), x, y, epochs=1, batch_size=8, verbose=0)
    folder = saving.save_model(tmp_path / "m", state, include_optimizer=False)
    assert not (folder / "opt_state.npz").exists()
    loaded = saving.load_model(folder)
    fresh = _mlp_state().opt_state
    jax.tree.map(np.testing.assert_array_equal, loaded.opt_state, fresh)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, state.params)


def test_a_class_not_allowed_is_refused_and_nothing_is_imported(tmp_path):
    (tmp_path / "sentinel_saving_module.py").write_text("class Net:\n    pass\n")
    folder = saving.save_model(tmp_path / "m", _mlp_state())
    config = json.loads((folder / saving.CONFIG_FILE).read_text())
    (folder / saving.CONFIG_FILE).write_text(
        json.dumps({**config, "module": "sentinel_saving_module", "qualname": "Net"})
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(saving.SavedModelError, match=r"sentinel_saving_module\.Net.*nothing was imported"):
            saving.load_model(folder)
    finally:
        sys.path.remove(str(tmp_path))
    assert "sentinel_saving_module" not in sys.modules


def test_a_name_of_the_library_that_is_not_a_module_class_is_refused(tmp_path):
    folder = saving.save_model(tmp_path / "m", _mlp_state())
    config = json.loads((folder / saving.CONFIG_FILE).read_text())
    (folder / saving.CONFIG_FILE).write_text(json.dumps({**config, "qualname": "Dense"}))
    with pytest.raises(saving.SavedModelError, match="flaxlesson.models.Dense, which is not one of"):
        saving.load_model(folder)


def test_a_user_class_needs_custom_objects(tmp_path):
    user = _user_module(tmp_path)
    state = training.create_train_state(user.UserNet(), np.zeros((1, 6), np.float32))
    folder = saving.save_model(tmp_path / "m", state)
    with pytest.raises(saving.SavedModelError, match=r"custom_objects=\{'UserNet': UserNet\}"):
        saving.load_model(folder)


def test_a_custom_object_that_is_not_a_linen_module_is_a_type_error(tmp_path):
    folder = saving.save_model(tmp_path / "m", _mlp_state())
    with pytest.raises(TypeError, match=r"custom_objects\['MyNet'\] must be a flax.linen Module subclass"):
        saving.load_model(folder, custom_objects={"MyNet": lambda x: x})


def test_params_that_do_not_fit_the_model_are_named(tmp_path):
    x = np.zeros((1, 6), np.float32)
    folder = saving.save_model(tmp_path / "m", _mlp_state(), sample_input=x)
    config = json.loads((folder / saving.CONFIG_FILE).read_text())
    config["config"]["hidden"] = [7]
    (folder / saving.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(saving.SavedModelError, match="do not fit") as error:
        saving.load_model(folder)
    message = str(error.value)
    assert "Dense_0/kernel: saved shape (6, 4), the model has (6, 7)" in message
    assert "Dense_1/kernel: saved shape (4, 3), the model has (7, 3)" in message
    assert "Dense_0/bias: saved shape (4,), the model has (7,)" in message


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(saving.SavedModelError, match="not found"):
        saving.load_model(tmp_path / "nowhere")


def test_a_foreign_folder_is_refused_by_load_and_left_alone_by_save(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(saving.SavedModelError, match="is not a model saved by"):
        saving.load_model(tmp_path)
    with pytest.raises(ValueError, match="holds something else than a saved model"):
        saving.save_model(tmp_path, _mlp_state())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_saving_over_a_saved_model_replaces_it(tmp_path):
    saving.save_model(tmp_path / "m", _mlp_state(seed=0))
    second = _mlp_state(seed=1)
    loaded = saving.load_model(saving.save_model(tmp_path / "m", second))
    jax.tree.map(np.testing.assert_array_equal, loaded.params, second.params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_field_that_cannot_be_saved_is_a_type_error_naming_it(tmp_path):
    user = _user_module(tmp_path)
    state = training.create_train_state(user.UserNet(activation=lambda v: v), np.zeros((1, 6), np.float32))
    with pytest.raises(TypeError, match=r"UserNet.activation is <function"):
        saving.save_model(tmp_path / "m", state)
    assert not (tmp_path / "m").exists()


def test_batch_stats_are_saved_beside_the_params(tmp_path):
    class StatsState(core.TrainState):
        batch_stats: Any = None

    plain = _mlp_state()
    stats = {"BatchNorm_0": {"mean": jnp.arange(3.0), "var": jnp.ones(3)}}
    state = StatsState.create(
        apply_fn=plain.apply_fn, params=plain.params, tx=plain.tx, model=plain.model, batch_stats=stats
    )
    folder = saving.save_model(tmp_path / "m", state)
    with np.load(folder / "batch_stats.npz") as stored:
        np.testing.assert_array_equal(stored["BatchNorm_0/mean"], [0.0, 1.0, 2.0])
    assert json.loads((folder / saving.CONFIG_FILE).read_text())["arrays"]["batch_stats"]["BatchNorm_0/var"] == {
        "shape": [3],
        "dtype": "float32",
    }


def test_the_exported_model_runs_with_only_jax_and_numpy_at_any_batch_size(tmp_path):
    x = _images(7)
    state = training.create_train_state(models.CNN(features=(3, 4), dense=8, num_classes=4), x[:1], seed=2)
    path = saving.export(tmp_path / "cnn.jaxexport", state, x[:2])
    np.save(tmp_path / "x.npy", x)
    _python(
        f"""
        import sys
        import jax, numpy as np
        exported = jax.export.deserialize(bytearray(open("{path}", "rb").read()))
        x = np.load("{tmp_path}/x.npy")
        np.save("{tmp_path}/p7.npy", np.asarray(exported.call(x)))
        np.save("{tmp_path}/p3.npy", np.asarray(exported.call(x[:3])))
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "optax", "flaxlesson"))
        assert not loaded, loaded
        assert exported.platforms == ("cpu", "cuda"), exported.platforms
        """
    )
    expected = training.predict(state, x)
    np.testing.assert_allclose(np.load(tmp_path / "p7.npy"), expected, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "p3.npy"), expected[:3], atol=1e-6)


def test_save_model_flag_keeps_the_scripts_trained_model(tmp_path):
    from experiments import mlp_iris
    from flaxlesson import data

    config = mlp_iris.Config(epochs=2, out=str(tmp_path / "out"), save_model=str(tmp_path / "iris"))
    metrics = mlp_iris.run(config)
    assert metrics["saved_model"] == str(tmp_path / "iris")
    (_, _), (x_test, y_test) = data.load_iris(test_size=0.3, random_state=42)
    state = saving.load_model(tmp_path / "iris")
    accuracy = float(np.mean(training.predict(state, x_test).argmax(axis=1) == y_test))
    assert accuracy == metrics["test_accuracy_per_seed"][0]


def test_save_model_flag_on_a_foreign_folder_is_a_usage_error_before_training(tmp_path, capsys):
    from experiments import mlp_iris

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as stop:
        mlp_iris.main(["--save-model", str(tmp_path), "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    assert "argument --save-model:" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_an_optimizer_state_of_another_optimizer_is_refused_naming_its_leaves(tmp_path):
    import optax

    folder = saving.save_model(tmp_path / "m", _mlp_state())
    with pytest.raises(saving.SavedModelError, match="does not fit this optimizer") as error:
        saving.load_model(folder, optimizer=optax.sgd(0.1, momentum=0.9))
    assert "0/mu/Dense_0/kernel: saved, but not in this optimizer's state" in str(error.value)


WORKER = """
import sys
sys.path.insert(0, sys.argv[2])
import jax
import numpy as np
from flaxlesson import models, parallel, saving, training

parallel.initialize()
folder = sys.argv[1]
x = np.random.default_rng(0).random((16, 6), np.float32)
state = training.create_train_state(models.MLP(hidden=(4,)), x[:1], seed=0)
state, _ = training.fit(state, x, np.arange(16) % 3, epochs=1, batch_size=8, strategy="sharded", verbose=0)
saving.save_model(folder, state, sample_input=x[:1])
loaded = saving.load_model(folder)
me = jax.process_index()
np.save(f"{folder}_saver{me}.npy", training.predict(state, x, strategy="sharded"))
np.save(f"{folder}_loaded{me}.npy", training.predict(loaded, x, strategy="sharded"))
"""


def test_two_processes_save_one_model_and_each_loads_it(tmp_path):
    from flaxlesson import launch

    (tmp_path / "worker.py").write_text(WORKER)
    folder = tmp_path / "model"
    launch.launch_local([str(tmp_path / "worker.py"), str(folder), str(ROOT)], 2, devices_per_process=2, timeout=120)
    saver = np.load(f"{folder}_saver0.npy")
    assert saver.shape == (16, 3)
    for process in (0, 1):
        np.testing.assert_array_equal(np.load(f"{folder}_saver{process}.npy"), saver)
        np.testing.assert_array_equal(np.load(f"{folder}_loaded{process}.npy"), saver)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".npy")) == ["model", "worker.py"]
