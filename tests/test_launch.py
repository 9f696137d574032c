import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flaxlesson import launch, parallel

ROOT = Path(__file__).resolve().parent.parent
RANK = "import os, sys, time; rank = int(os.environ['JAX_PROCESS_ID']); "


def _alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_a_failing_process_stops_the_launch_with_its_output():
    code = RANK + "print('process', rank); sys.exit(rank * 3)"
    with pytest.raises(RuntimeError, match=r"process 1 of 2 exited with code 3 \(attempt 1 of 1\)(.|\n)*process 1"):
        launch.launch_local(["-c", code], 2, timeout=30)


def test_a_killed_process_stops_the_group_promptly_and_is_named():
    code = RANK + "print('process', rank, flush=True); time.sleep(0.5 + 60 * (rank == 0)); os.kill(os.getpid(), 9)"
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"process 1 of 2 was killed by SIGKILL(.|\n)*process 1"):
        launch.launch_local(["-c", code], 2, timeout=60, grace=1)
    assert time.monotonic() - start < 20  # not the 60 s that process 0 sleeps


def test_a_launch_past_its_timeout_is_stopped():
    with pytest.raises(RuntimeError, match="process 0 of 2 timed out after 1s"):
        launch.launch_local(["-c", "import time; time.sleep(60)"], 2, timeout=1, grace=1)


def test_a_group_that_fails_once_completes_on_its_restart():
    code = (
        "import os, sys; from flaxlesson import worker; attempt = worker.restart_attempt(); print('attempt', attempt); "
        "sys.exit(attempt == 0 and os.environ['JAX_PROCESS_ID'] == '1')"
    )
    outputs = launch.launch_local(["-c", code], 2, timeout=30, max_restarts=1)
    assert outputs == ["attempt 1\n", "attempt 1\n"]


def test_a_group_failing_every_attempt_raises_after_its_restarts():
    code = RANK + "print('attempt', os.environ['FLAXLESSON_RESTART']); sys.exit(5 * (rank == 0))"
    with pytest.raises(RuntimeError) as error:
        launch.launch_local(["-c", code], 2, timeout=30, max_restarts=2)
    message = str(error.value)
    assert message.startswith("process 0 of 2 exited with code 5 (attempt 3 of 3)")
    assert "attempt 1: process 0 of 2 exited with code 5\nattempt 2: process 0 of 2 exited with code 5" in message
    assert message.endswith("its last output:\nattempt 2")


def test_a_stopped_process_is_named_by_its_heartbeat_not_its_peer():
    # Both start their heartbeat and join JAX's runtime through parallel.initialize; process 1 then stops, which
    # leaves process 0 waiting on it: the launcher must blame process 1.
    code = (
        "import os, signal, time; from flaxlesson import parallel, worker; worker.start_heartbeat(); "
        "parallel.initialize(); import jax; "
        "print('joined', jax.process_index(), jax.process_count(), flush=True); time.sleep(1); "
        "jax.process_index() == 1 and os.kill(os.getpid(), signal.SIGSTOP); time.sleep(60)"
    )
    with pytest.raises(RuntimeError, match=r"process 1 of 2 sent no heartbeat for 2s(.|\n)*joined 1 2"):
        launch.launch_local(["-c", code], 2, timeout=60, heartbeat_timeout=2, grace=1)


def test_a_process_that_never_starts_its_heartbeat_is_not_stopped_for_it():
    outputs = launch.launch_local(["-c", "import time; time.sleep(1); print('done')"], 2, heartbeat_timeout=0.2)
    assert outputs == ["done\n", "done\n"]


def _launcher(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """`launch_local` in a process of its own, once both of its workers run; returns it and the workers' pids."""
    worker = RANK + f"open(f'{tmp_path}/{{rank}}.pid', 'w').write(str(os.getpid())); time.sleep(60)"
    code = f"from flaxlesson import launch; launch.launch_local(['-c', {worker!r}], 2, timeout=60)"
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path / "tmp")}
    launcher = subprocess.Popen([sys.executable, "-c", code], env=env)
    pid_files = [tmp_path / f"{rank}.pid" for rank in range(2)]
    assert _wait_until(lambda: all(f.exists() and f.read_text() for f in pid_files))
    return launcher, [int(f.read_text()) for f in pid_files]


def test_killing_the_launcher_kills_its_workers(tmp_path):
    launcher, pids = _launcher(tmp_path)
    launcher.kill()
    assert launcher.wait(timeout=20) == -signal.SIGKILL
    assert _wait_until(lambda: not any(_alive(pid) for pid in pids))
    assert list((tmp_path / "tmp").iterdir()) == []


def test_sigterm_to_the_launcher_stops_its_workers_and_leaves_no_files(tmp_path):
    launcher, pids = _launcher(tmp_path)
    launcher.terminate()
    assert launcher.wait(timeout=20) == -signal.SIGTERM
    assert not any(_alive(pid) for pid in pids)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_launched_processes_see_their_devices_and_rank():
    code = (
        "import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], "
        "os.environ['JAX_COORDINATOR_ADDRESS'].startswith('127.0.0.1:'), os.environ['FLAXLESSON_RESTART'], "
        "os.environ['XLA_FLAGS'])"
    )
    outputs = launch.launch_local(["-c", code], 3, devices_per_process=2, timeout=30)
    assert [o.split()[:4] for o in outputs] == [[str(i), "3", "True", "0"] for i in range(3)]
    assert all(o.split()[-1] == "--xla_force_host_platform_device_count=2" for o in outputs)
    assert all(o.count("device_count") == 1 for o in outputs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_processes": 0}, "num_processes"),
        ({"num_processes": 2, "devices_per_process": 0}, "devices_per_process"),
        ({"num_processes": 2, "timeout": 0}, "timeout"),
        ({"num_processes": 2, "max_restarts": -1}, "max_restarts"),
        ({"num_processes": 2, "heartbeat_timeout": 0}, "heartbeat_timeout"),
        ({"num_processes": 2, "grace": -1.0}, "grace"),
    ],
)
def test_bad_launch_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        launch.launch_local(["-c", "pass"], **kwargs)


def test_initialize_leaves_a_slurm_run_to_jax_detection(monkeypatch):
    calls = []
    monkeypatch.setenv("SLURM_NTASKS", "4")
    for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(parallel.jax, "process_count", lambda: 4)
    assert parallel.initialize() == 4
    assert calls == [{"coordinator_address": None, "process_id": None, "initialization_timeout": 300}]


def test_initialize_starts_nothing_in_a_cluster_run_of_one_process(monkeypatch):
    monkeypatch.setenv("SLURM_NTASKS", "1")
    for name in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kwargs: pytest.fail("started"))
    assert parallel.initialize() == 1


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun (Debian: openmpi-bin)")
def test_initialize_joins_a_run_started_by_mpirun(tmp_path):
    # Two processes started by mpirun on loopback, nothing but Open MPI's variables to go on, sum an array built
    # from their local halves: process p holds [2p, 2p + 1], so the global array is 0..3 and its sum 6. Each
    # writes its line to a file of its own: mpirun forwards the two processes' output in pieces that interleave.
    code = (
        "import sys, jax, jax.numpy as jnp, numpy as np; from flaxlesson import parallel; n = parallel.initialize(); "
        "strategy = parallel.Sharded(); rank = jax.process_index(); "
        "x = strategy.shard_steps(np.arange(2 * rank, 2 * rank + 2, dtype=np.float32)[None]); "
        "line = f'sum {n} {rank} {jax.device_count()} {float(jax.jit(jnp.sum)(x))}'; "
        "open(f'{sys.argv[1]}/rank{rank}', 'w').write(line)"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (parallel.ENV_COORDINATOR, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID)
    }
    env.update(
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_COORDINATOR_PORT=str(launch._free_port()),
    )
    mpirun = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "oob_tcp_if_include", "lo", "-np", "2"]
    done = subprocess.run(
        [*mpirun, sys.executable, "-c", code, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [(tmp_path / f"rank{rank}").read_text() for rank in (0, 1)]
    assert lines == ["sum 2 0 2 6.0", "sum 2 1 2 6.0"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_process_0_names_a_coordinator_port_in_use_before_starting(monkeypatch):
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kwargs: pytest.fail("started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^coordinator_address: port {port} is in use on this host"):
            parallel.initialize(f"127.0.0.1:{port}", 2, 0)


def test_a_process_without_a_coordinator_gives_up_after_its_startup_timeout(monkeypatch):
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kwargs: pytest.fail("started"))
    port, start = _free_port(), time.monotonic()
    with pytest.raises(TimeoutError, match=rf"no coordinator answered at 127.0.0.1:{port} within 0.5s"):
        parallel.initialize(f"127.0.0.1:{port}", 2, 1, timeout=0.5)
    assert time.monotonic() - start < 3


def test_the_startup_timeout_reaches_jax_as_its_initialization_timeout(monkeypatch):
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    parallel.initialize(f"127.0.0.1:{_free_port()}", 2, 0, timeout=12.5)
    assert calls[0]["initialization_timeout"] == 13 and calls[0]["process_id"] == 0


def test_distributed_names_the_port_in_use_in_one_usage_line(tmp_path, capsys):
    from experiments import distributed

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--processes", "2", "--process-id", "0", "--coordinator", f"127.0.0.1:{port}", "--out", str(tmp_path)]
        with pytest.raises(SystemExit) as exit_:
            distributed.main(argv)
    assert exit_.value.code == 2
    assert f"error: argument --coordinator: port {port} is in use on this host" in capsys.readouterr().err


def test_distributed_says_how_to_survive_a_dead_process_without_a_traceback(tmp_path, monkeypatch, capsys):
    from experiments import distributed

    with pytest.raises(launch.LaunchError) as died:
        launch.launch_local(["-c", RANK + "sys.exit(3 * (rank == 1))"], 2, timeout=30)

    def launch_local(*args, **kwargs):
        raise died.value

    monkeypatch.setattr(distributed.launch, "launch_local", launch_local)
    with pytest.raises(SystemExit) as exit_:
        distributed.main(["--processes", "2", "--out", str(tmp_path)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0].endswith(
        ": error: process 1 of 2 exited with code 3 (attempt 1 of 1); to survive a dead process, pass --max-restarts N "
        "(with --checkpoint-dir, to resume from it)"
    )
    assert "Traceback" not in err
