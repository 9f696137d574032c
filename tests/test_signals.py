"""Issue 23: a script's signal handling spans its whole run, not only its fit."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import flags

ROOT = Path(__file__).resolve().parent.parent

# experiments/mlp_iris.py, its predict (after the fit returned) held until the test has sent its signals.
AFTER_FIT = """
import sys, time
from experiments import mlp_iris
from flaxlesson import training

predict = training.predict


def held_predict(*args, **kwargs):
    print("predicting", flush=True)
    time.sleep(float(sys.argv[2]))  # a signal's handler runs and the sleep goes on (PEP 475)
    return predict(*args, **kwargs)


training.predict = held_predict
mlp_iris.main(["--epochs", "1", "--out", sys.argv[1]])
"""

# The same, predict held in one long compiled call: Python runs no handler until it returns.
IN_A_COMPILED_CALL = AFTER_FIT.replace(
    "time.sleep(float(sys.argv[2]))",
    "import jax, jax.numpy as jnp; a = jnp.ones((1000, 1000)) / 1000; "
    "spin = jax.jit(lambda a: jax.lax.fori_loop(0, 100_000, lambda i, a: jnp.tanh(a @ a), a)).lower(a).compile(); "
    "print('computing', flush=True); spin(a).block_until_ready()",
)


def _script(out, hold_seconds, code=AFTER_FIT):
    return subprocess.Popen(
        [sys.executable, "-c", code, str(out), str(hold_seconds)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(child, line):
    for got in child.stdout:
        if got == line:
            return
    pytest.fail(f"the script ended before printing {line!r}: {child.stderr.read()}")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_after_fit_finishes_the_run_and_exits_with_its_code(tmp_path, sig, code):
    child = _script(tmp_path, 2)
    try:
        _wait_for(child, "predicting\n")
        child.send_signal(sig)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == code, err
    assert out.splitlines()[-1] == f"Interrupted ({sig.name}): {tmp_path} holds what finished"
    assert "Traceback" not in err
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "curves.png").is_file()
    assert f'"interrupted_by": "{sig.name}"' in (tmp_path / "metrics.json").read_text()


def _two_ctrl_cs(child: subprocess.Popen, phase: str, settle: float, between: float) -> tuple[str, float]:
    """Send SIGINT twice once `child` prints `phase`: its stderr, and the seconds it took to exit after the second."""
    try:
        _wait_for(child, phase)
        time.sleep(settle)
        child.send_signal(signal.SIGINT)
        time.sleep(between)
        start = time.monotonic()
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=30)
        return err, time.monotonic() - start
    finally:
        child.kill()


def test_a_second_ctrl_c_exits_at_once_with_one_line(tmp_path):
    child = _script(tmp_path, 120)
    err, seconds = _two_ctrl_cs(child, "predicting\n", 0, 0.5)
    assert child.returncode == flags.INTERRUPTED_EXIT_CODE and seconds < 10
    assert err.strip().splitlines()[-1] == "Stopped at once by a second SIGINT" and "Traceback" not in err


def test_two_ctrl_cs_within_one_compiled_call_exit_at_once(tmp_path):
    child = _script(tmp_path, 0, IN_A_COMPILED_CALL)
    err, seconds = _two_ctrl_cs(child, "computing\n", 0.5, 0.2)
    assert child.returncode == flags.INTERRUPTED_EXIT_CODE and seconds < 5, err
    assert err.strip().splitlines()[-1] == "Stopped at once by a second SIGINT" and "Traceback" not in err
