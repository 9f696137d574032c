"""Start and supervise the processes of one multi-process run on this machine, for trying several hosts locally.

`launch_local` runs one script as N CPU processes joined on 127.0.0.1 and watches them: a process that exits
non-zero, is killed, stops sending its heartbeat, or outlives the timeout stops the whole group, which then starts
again on a new coordinator port up to `max_restarts` times (the script resumes from its checkpoints; see
`flaxlesson.worker`). The workers never outlive the launcher: SIGTERM to it is passed on to them, and on Linux
each worker is killed by the kernel when the launcher dies, even by SIGKILL. Their output goes to unnamed
temporary files, so nothing is left on disk whatever stops the launcher.

On a cluster, use its own launcher instead (`mpirun`, `srun`): `parallel.initialize` reads what it sets.
"""

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flaxlesson import checks, parallel, worker

logger = logging.getLogger(__name__)

_DIE_WITH_LAUNCHER = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, int(signal.SIGKILL)); "  # 1: PR_SET_PDEATHSIG
    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execv(sys.argv[2], sys.argv[2:])"
)
_POLL_SECONDS = 0.05
_TAIL_LINES = 30


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_env(devices_per_process: int, num_processes: int, process_id: int, port: int) -> dict[str, str]:
    """The environment of one loopback process: CPU only, its device count, and where the coordinator is."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    root = str(Path(__file__).resolve().parent.parent)
    return {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip(),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        parallel.ENV_COORDINATOR: f"127.0.0.1:{port}",
        parallel.ENV_NUM_PROCESSES: str(num_processes),
        parallel.ENV_PROCESS_ID: str(process_id),
    }


def _command(argv: Sequence[str]) -> list[str]:
    """`python argv...`, on Linux behind a small program that asks the kernel to SIGKILL it when the launcher dies.

    That program (stdlib only, no site) sets PR_SET_PDEATHSIG, which outlives `exec`, then becomes `python argv...`
    in the same process. Doing it there rather than in a `preexec_fn` keeps the launcher from forking a
    multithreaded (JAX) process.
    """
    python = [sys.executable, *argv]
    if not sys.platform.startswith("linux"):
        return python
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_LAUNCHER, str(os.getpid()), *python]


@dataclass
class _Worker:
    """One launched process: its handle, its output file, and the read end of its heartbeat pipe."""

    process: subprocess.Popen
    log: IO[bytes]
    heartbeat: int
    last_beat: float | None = None

    def read_heartbeat(self, now: float) -> None:
        try:
            if os.read(self.heartbeat, 4096):
                self.last_beat = now
        except BlockingIOError:
            pass

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def close(self) -> None:
        os.close(self.heartbeat)
        self.log.close()


@dataclass(frozen=True)
class _Limits:
    """Seconds an attempt may run, a started heartbeat may lapse, and a stopped process may take to exit."""

    timeout: float
    heartbeat_timeout: float
    grace: float


@dataclass(frozen=True)
class _Failure:
    """How one attempt of a launch ended badly: which process, what happened to it, and its last output."""

    attempt: int
    process_id: int
    reason: str
    output: str

    def describe(self, num_processes: int) -> str:
        return f"process {self.process_id} of {num_processes} {self.reason}"


def _start(argv: Sequence[str], env: dict[str, str], every: float) -> _Worker:
    read, write = os.pipe()
    os.set_blocking(read, False)
    log = tempfile.TemporaryFile()
    try:
        env = {**env, worker.ENV_HEARTBEAT_FD: str(write), worker.ENV_HEARTBEAT_SECONDS: f"{every:g}"}
        process = subprocess.Popen(
            _command(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            pass_fds=(write,),
            start_new_session=True,
        )
    except BaseException:
        os.close(read)
        log.close()
        raise
    finally:
        os.close(write)
    return _Worker(process, log, read)


def _stop(workers: list[_Worker], grace: float) -> None:
    """SIGTERM each worker's process group (resumed, so a stopped one sees it), then SIGKILL what is left."""

    def signal_all(signals: tuple[signal.Signals, ...]) -> None:
        for w in workers:
            for sig in signals:
                try:
                    os.killpg(w.process.pid, sig)
                except ProcessLookupError:
                    break

    signal_all((signal.SIGTERM, signal.SIGCONT))
    deadline = time.monotonic() + grace
    while any(w.process.poll() is None for w in workers) and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
    signal_all((signal.SIGKILL,))
    for w in workers:
        w.process.wait()


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _watch(workers: list[_Worker], timeout: float, heartbeat_timeout: float) -> tuple[int, str] | None:
    """Wait for every worker to exit 0 (None), or the first that fails: its index and what happened."""
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        codes = [w.process.poll() for w in workers]
        if all(code == 0 for code in codes):
            return None
        failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None:
            return failed, _exit_reason(codes[failed])
        for i, w in enumerate(workers):
            w.read_heartbeat(now)
            if codes[i] is None and w.last_beat is not None and now - w.last_beat > heartbeat_timeout:
                return i, f"sent no heartbeat for {heartbeat_timeout:g}s (stopped or hung)"
        if now > deadline:
            return codes.index(None), f"timed out after {timeout:g}s"
        time.sleep(_POLL_SECONDS)


def _attempt(
    argv: Sequence[str], num_processes: int, devices_per_process: int, attempt: int, limits: _Limits
) -> tuple[list[str], _Failure | None]:
    """Run the group once on a new coordinator port; returns every process's output and the failure, if any."""
    port, workers = _free_port(), []
    try:
        try:
            for i in range(num_processes):
                env = {**_cpu_env(devices_per_process, num_processes, i, port), worker.ENV_RESTART: str(attempt)}
                workers.append(_start(argv, env, limits.heartbeat_timeout / 4))
            failed = _watch(workers, limits.timeout, limits.heartbeat_timeout)
        finally:
            _stop(workers, limits.grace)
        outputs = [w.output() for w in workers]
    finally:
        for w in workers:
            w.close()
    return outputs, None if failed is None else _Failure(attempt, failed[0], failed[1], outputs[failed[0]])


class LaunchError(RuntimeError):
    """The run's processes failed on their last attempt: `summary` says which and how, `output` its last lines."""

    def __init__(self, summary: str, output: str, max_restarts: int):
        super().__init__(f"{summary}\nits last output:\n{output}")
        self.summary, self.output, self.max_restarts = summary, output, max_restarts


class _Terminated(BaseException):
    """SIGTERM reached the launcher: stop the workers, then terminate as the signal asks."""


@contextmanager
def _forward_sigterm():
    """Turn SIGTERM into `_Terminated` (main thread only) so the workers are stopped, then re-raise the signal."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous in (None, signal.SIG_IGN):
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        raise _Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)
        raise RuntimeError("the launch was stopped by SIGTERM") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch_local(
    argv: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int = 1,
    timeout: float = 600.0,
    max_restarts: int = 0,
    heartbeat_timeout: float = 60.0,
    grace: float = 5.0,
) -> list[str]:
    """Run `python argv...` as `num_processes` CPU processes joined on 127.0.0.1; returns each one's output.

    Each process gets `devices_per_process` virtual CPU devices, finds the others through the environment that
    `parallel.initialize` reads, and is told its attempt in `FLAXLESSON_RESTART`. When one exits non-zero, is
    killed, sends no heartbeat for `heartbeat_timeout` seconds (once the script has started it with
    `worker.start_heartbeat`), or the attempt passes `timeout` seconds, the others get SIGTERM and, `grace` seconds
    later, SIGKILL; the group then starts again, up to `max_restarts` times. After the last failure a `LaunchError`
    names the process, how it failed, and carries its last output. `heartbeat_timeout` is below JAX's own (100 s),
    so a stopped process is named before its peers' runtime aborts.
    """
    checks.positive_int("num_processes", num_processes)
    checks.positive_int("devices_per_process", devices_per_process)
    checks.non_negative_int("max_restarts", max_restarts)
    for name, value in (("timeout", timeout), ("heartbeat_timeout", heartbeat_timeout), ("grace", grace)):
        checks.positive_number(name, value)
    limits = _Limits(timeout, heartbeat_timeout, grace)
    failures: list[_Failure] = []
    with _forward_sigterm():
        for attempt in range(max_restarts + 1):
            outputs, failure = _attempt(argv, num_processes, devices_per_process, attempt, limits)
            if failure is None:
                return outputs
            failures.append(failure)
            if attempt < max_restarts:
                logger.warning(
                    "attempt %d of %d: %s; restarting every process",
                    attempt + 1,
                    max_restarts + 1,
                    failure.describe(num_processes),
                )
    last = failures[-1]
    earlier = "".join(f"\nattempt {f.attempt + 1}: {f.describe(num_processes)}" for f in failures[:-1])
    tail = "\n".join(last.output.splitlines()[-_TAIL_LINES:])
    raise LaunchError(
        f"{last.describe(num_processes)} (attempt {last.attempt + 1} of {max_restarts + 1}){earlier}",
        tail,
        max_restarts,
    )
