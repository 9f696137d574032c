import jax
import numpy as np
import pytest

from experiments import distributed
from flaxlesson import checkpoint, training

SETTINGS = {"samples": 52, "features": 8, "classes": 10, "epochs": 2, "batch_size": 30, "seed": 4}


@pytest.mark.parametrize("strategy", ["sharded", "pmap"])
def test_two_processes_of_four_devices_train_as_one_process_of_eight(strategy, tmp_path):
    # Two processes on 127.0.0.1, each with 4 CPU devices and reading only its half of every global batch,
    # save their state each epoch; here, in one process of 8 devices, the same fit must give the same params.
    metrics = distributed.run(
        distributed.Config(
            **SETTINGS,
            strategy=strategy,
            processes=2,
            cpu_devices=4,
            checkpoint_dir=str(tmp_path / "ckpt"),
            out=str(tmp_path / "out"),
            timeout=90.0,
        )
    )
    assert (metrics["num_processes"], metrics["num_devices"]) == (2, 8)
    assert metrics["max_abs_param_diff"] < 1e-5

    x, y = distributed.make_data(SETTINGS["samples"], SETTINGS["features"], SETTINGS["classes"], SETTINGS["seed"])
    start = training.create_train_state(distributed.lesson_model(), x[:1], seed=SETTINGS["seed"])
    one_process, history = training.fit(
        start, x, y, epochs=2, batch_size=30, seed=SETTINGS["seed"], verbose=0, strategy=strategy
    )
    two_processes, epoch = checkpoint.restore(tmp_path / "ckpt", start, strategy=strategy)
    assert epoch == 2 and int(two_processes.step) == int(one_process.step) == 4
    for a, b in zip(
        jax.tree.leaves(jax.device_get(two_processes.params)),
        jax.tree.leaves(jax.device_get(one_process.params)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(metrics["history"]["loss"], history.history["loss"], rtol=1e-5)
