import functools
import logging

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from experiments import distributed
from flaxlesson import data, models, parallel, training


def _toy(n=70, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.3).astype(np.int32) + (x[:, 2] > 1).astype(np.int32)
    return x, y


def _state():
    return training.create_train_state(models.MLP(hidden=(16, 16), num_classes=4), np.zeros((1, 6), np.float32))


def _fit(strategy, batch_size, **kwargs):
    x, y = _toy()
    return training.fit(
        _state(),
        x,
        y,
        epochs=2,
        batch_size=batch_size,
        validation_split=0.2,
        seed=3,
        verbose=0,
        strategy=strategy,
        **kwargs,
    )


@functools.cache
def _trained(strategy, batch_size):
    """One fit per (strategy name, batch size), shared by the tests that only read its result."""
    return _fit(strategy, batch_size)


def _assert_params_close(a, b):
    for la, lb in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy", ["sharded", "pmap"])
@pytest.mark.parametrize("batch_size", [32, 30])
def test_multi_device_training_matches_one_device(strategy, batch_size):
    # 30 rows over 8 devices: each global batch is padded to 32 and masked, as the last partial batch is.
    state, history = _trained(strategy, batch_size)
    single, single_history = _trained("single", batch_size)
    assert jax.device_count() == 8 and int(state.step) == 2 * 2
    _assert_params_close(state.params, single.params)
    for key in ("loss", "val_loss", "accuracy"):
        np.testing.assert_allclose(history.history[key], single_history.history[key], rtol=1e-5)


def test_mesh_over_some_devices_matches_one_device():
    state, _ = _fit(parallel.Sharded(num_devices=3), 32)
    _assert_params_close(state.params, _trained("single", 32)[0].params)


def test_sharded_state_is_replicated_over_the_mesh():
    state, _ = _trained("sharded", 32)
    kernel = state.params["Dense_0"]["kernel"]
    assert isinstance(kernel.sharding, NamedSharding) and kernel.sharding.mesh.size == 8
    assert kernel.sharding.is_fully_replicated


def test_sharded_compiles_the_cores_train_step_once(caplog):
    x, y = _toy(n=20)
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        training.fit(_state(), x, y, epochs=2, batch_size=6, verbose=0, strategy="sharded")
    compiles = [r for r in caplog.records if r.getMessage().startswith("Compiling jit(train_one)")]
    assert len(compiles) == 1


def _stacked(batch, count=2):
    """`count` copies of one step's inputs on a leading steps axis, as `fit` places them."""
    return jax.tree.map(lambda a: np.stack([a] * count), batch)


def test_sharded_batch_rows_are_split_over_devices():
    batch = next(data.iterate_batches(np.arange(32.0)[:, None], np.arange(32), 32))
    placed = parallel.Sharded().shard_steps(_stacked(batch))
    shards = sorted(placed["x"].addressable_shards, key=lambda s: s.index[1].start)
    assert [s.data.shape for s in shards] == [(2, 4, 1)] * 8
    np.testing.assert_array_equal(np.asarray(shards[1].data)[1, :, 0], [4, 5, 6, 7])


def test_pmap_batch_has_a_leading_device_axis():
    batch = next(data.iterate_batches(np.arange(32.0)[:, None], np.arange(32), 30, pad_multiple=8))
    placed = parallel.Pmap().shard_steps(_stacked(batch))
    assert placed["x"].shape == (8, 2, 4, 1)
    np.testing.assert_array_equal(np.asarray(placed["mask"])[-1, 1], [1, 1, 0, 0])


@pytest.mark.parametrize("strategy, shape", [("sharded", (2, 16, 3)), ("pmap", (8, 2, 2, 3))])
def test_dict_inputs_are_split_like_arrays(strategy, shape):
    batch = {
        "x": {"x": np.zeros((16, 3), np.float32), "seq_lengths": np.arange(16)},
        "y": np.arange(16),
        "mask": np.ones(16, np.float32),
    }
    strategy = parallel.get_strategy(strategy)
    placed = strategy.shard_steps(_stacked(batch))
    assert placed["x"]["x"].shape == shape and placed["x"]["seq_lengths"].shape == shape[:-1]
    np.testing.assert_array_equal(strategy.gather_rows(placed["x"]["seq_lengths"]), np.tile(np.arange(16), 2))


def test_pmap_replicate_and_unreplicate_round_trip():
    strategy = parallel.Pmap()
    tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "key": jax.random.key(7)}
    placed = strategy.replicate(tree)
    assert placed["w"].shape == (8, 2, 3)
    back = strategy.unreplicate(placed)
    np.testing.assert_array_equal(back["w"], tree["w"])
    np.testing.assert_array_equal(back["key"], jax.random.key_data(tree["key"]))


@pytest.mark.parametrize("strategy", ["sharded", "pmap"])
def test_predict_and_evaluate_match_one_device(strategy):
    x, y = _toy()
    state = _state()
    np.testing.assert_allclose(
        training.predict(state, x, batch_size=30, strategy=strategy),
        training.predict(state, x, batch_size=30),
        rtol=1e-6,
    )
    result, single = training.evaluate(state, x, y, batch_size=30, strategy=strategy), training.evaluate(state, x, y)
    np.testing.assert_allclose([result["loss"], result["accuracy"]], [single["loss"], single["accuracy"]], rtol=1e-6)


@pytest.mark.parametrize("strategy", ["single", "sharded"])
def test_fit_leaves_the_callers_state_usable(strategy):
    # The train step donates its state; placing the state must copy, or a state already in place would be deleted.
    x, y = _toy(n=20)
    placer = parallel.get_strategy(strategy)
    state = placer.unreplicate(placer.replicate(_state()))
    training.fit(state, x, y, batch_size=8, verbose=0, strategy=strategy)
    np.testing.assert_array_equal(state.params["Dense_0"]["bias"], np.zeros(16))


def test_process_shares_tile_each_global_batch():
    x, y = np.arange(22.0)[:, None], np.arange(22)
    whole = list(data.iterate_batches(x, y, 10, seed=1, shuffle=True, pad_multiple=4))
    shares = [
        list(data.iterate_batches(x, y, 10, seed=1, shuffle=True, pad_multiple=4, process_index=i, process_count=2))
        for i in range(2)
    ]
    for b, (first, second) in enumerate(zip(*shares)):
        for key in ("x", "y", "mask"):
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[b][key])
    assert shares[1][-1]["mask"].tolist() == [0.0] * 6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"process_index": 2, "process_count": 2}, "process_index"),
        ({"process_index": 0, "process_count": 3}, "process_count"),
    ],
)
def test_bad_process_share_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        next(data.iterate_batches(np.zeros((8, 1)), np.zeros(8), 4, **kwargs))


def test_unknown_strategy_name_is_rejected():
    x, y = _toy()
    with pytest.raises(ValueError, match=r"strategy must be one of \['pmap', 'sharded', 'single'\]"):
        training.fit(_state(), x, y, verbose=0, strategy="mirrored")


@pytest.mark.parametrize("make", [parallel.Sharded, parallel.Pmap])
@pytest.mark.parametrize("num_devices, match", [(9, "larger than the 8 devices"), (0, "positive integer")])
def test_mesh_of_a_bad_size_is_rejected(make, num_devices, match):
    with pytest.raises(ValueError, match=f"num_devices.*{match}"):
        make(num_devices=num_devices)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 2},
            r"process_id must be in \[0, 2\)",
        ),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": -1}, "process_id"),
        ({"num_processes": 1, "process_id": 1}, "process_id must be 0"),
        ({"num_processes": 2, "process_id": 0}, "coordinator_address"),
        ({"coordinator_address": "127.0.0.1", "num_processes": 2, "process_id": 0}, "host:port"),
        ({"coordinator_address": "127.0.0.1:1234", "num_processes": 0, "process_id": 0}, "num_processes"),
    ],
)
def test_bad_process_settings_are_rejected_before_starting(kwargs, match, monkeypatch):
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("must not start"))
    with pytest.raises(ValueError, match=match):
        parallel.initialize(**kwargs)


def test_process_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, "3")
    monkeypatch.setenv(parallel.ENV_PROCESS_ID, "3")
    monkeypatch.setenv(parallel.ENV_COORDINATOR, "127.0.0.1:1234")
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("must not start"))
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 3\)"):
        parallel.initialize()


def test_one_process_starts_nothing(monkeypatch):
    monkeypatch.delenv(parallel.ENV_NUM_PROCESSES, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("must not start"))
    assert parallel.initialize() == 1


def test_experiment_reports_devices_and_the_difference_from_one_device(tmp_path):
    metrics = distributed.main(
        [
            "--strategy",
            "pmap",
            "--samples",
            "64",
            "--features",
            "8",
            "--epochs",
            "1",
            "--batch-size",
            "30",
            "--out",
            str(tmp_path),
        ]
    )
    assert (metrics["num_devices"], metrics["num_processes"]) == (8, 1)
    assert metrics["max_abs_param_diff"] < 1e-5 and metrics["step_seconds"] > 0
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "curves.png").exists()


@pytest.mark.parametrize(
    "argv", [["--strategy", "mirrored"], ["--processes", "2", "--process-id", "2"], ["--resume"], ["--batch-size", "0"]]
)
def test_experiment_rejects_bad_flags(argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        distributed.main([*argv, "--out", str(tmp_path)])
    assert "error:" in capsys.readouterr().err


def test_experiment_resumes_from_its_checkpoints(tmp_path):
    common = ["--samples", "40", "--features", "8", "--batch-size", "16", f"--checkpoint-dir={tmp_path / 'ckpt'}"]
    distributed.main([*common, "--epochs", "1", "--out", str(tmp_path / "first")])
    metrics = distributed.main([*common, "--epochs", "2", "--resume", "--out", str(tmp_path / "second")])
    assert metrics["initial_epoch"] == 1 and len(metrics["history"]["loss"]) == 1
    assert metrics["max_abs_param_diff"] < 1e-5


def test_experiment_refuses_a_used_checkpoint_directory_without_resume(tmp_path, capsys):
    common = ["--samples", "40", "--features", "8", "--epochs", "1", f"--checkpoint-dir={tmp_path / 'ckpt'}"]
    distributed.main([*common, "--out", str(tmp_path / "first")])
    with pytest.raises(SystemExit):
        distributed.main([*common, "--out", str(tmp_path / "second")])
    assert "already holds checkpoints of epochs [1]" in capsys.readouterr().err
