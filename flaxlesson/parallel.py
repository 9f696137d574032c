"""Where computation runs: the only module that names devices.

A strategy tells the training core how to compile its step functions and where to put state and batches;
`fit(..., strategy=...)` takes one of these or its name. `single` is one device; `sharded` is a 1-D data mesh
over every device (jit + NamedSharding, JAX's recommended path); `pmap` is the older `jax.pmap` form. Both
multi-device strategies give the single-device update for the same global batch, and both span several
processes once `initialize` has started JAX's multi-controller runtime: every process runs the same program,
reads its own slice of each global batch, and the global arrays are built from those slices.
"""

import math
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flaxlesson import checks

AXIS = "data"
"""The mesh axis, and the pmap axis, that the global batch is split over."""

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"

CLUSTER_SIZE_VARIABLES = {"Open MPI": "OMPI_COMM_WORLD_SIZE", "SLURM": "SLURM_NTASKS"}
"""The process count each cluster launcher that `jax.distributed.initialize` detects by itself sets."""


class Strategy(Protocol):
    """Where a fit's steps run: how they are compiled, and where state and per-step inputs are placed.

    Every strategy gives the single-device update for the same global batches; `fit`, `evaluate`, `predict` and
    checkpoints take one (or its name in `STRATEGIES`).
    """

    name: str
    num_replicas: int
    axis_name: str | None
    process_index: int
    process_count: int
    devices: list[jax.Device]

    def compile(self, step: Callable, donate_argnums: tuple[int, ...] = ()) -> Callable:
        """`step` compiled for this strategy's devices, donating the named arguments' buffers."""

    def replicate(self, tree: Any) -> Any:
        """A copy of `tree` (state, totals, keys, resident data) wherever the step reads it."""

    def unreplicate(self, tree: Any) -> Any:
        """One copy of replicated state, as an ordinary pytree."""

    def shard_batch(self, batch: Any) -> Any:
        """One step's input, (this process's rows, ...), placed with the rows split over devices."""

    def shard_steps(self, inputs: Any) -> Any:
        """Inputs of several steps, (steps, this process's rows, ...), placed with the rows split over devices."""

    def gather_rows(self, rows: Any, stacked: bool = True) -> np.ndarray:
        """A per-example output as one host array, (steps * global rows, ...) in batch order; `stacked`: of K steps."""


class SingleDevice:
    """Everything on one device: the plain jitted step."""

    name = "single"
    num_replicas = 1
    axis_name = None
    process_index = 0
    process_count = 1

    def __init__(self, device: jax.Device | None = None):
        self.device = device or jax.local_devices()[0]
        self.devices = [self.device]

    def compile(self, step: Callable, donate_argnums: tuple[int, ...] = ()) -> Callable:
        """`step` jitted for this device, donating the named arguments' buffers."""
        return jax.jit(step, donate_argnums=donate_argnums)

    def replicate(self, tree: Any) -> Any:
        """A copy of state (params, optimiser state, running totals, keys) where the step reads it.

        A copy, because the train step donates its state: the caller's arrays stay usable after `fit`.
        """
        return jax.device_put(tree, self.device, may_alias=False)

    def shard_batch(self, batch: Any) -> Any:
        """Put one step's input where the step reads it."""
        return jax.device_put(batch, self.device)

    def shard_steps(self, inputs: Any) -> Any:
        """Put the stacked inputs of several steps where the step reads them."""
        return jax.device_put(inputs, self.device)

    def unreplicate(self, tree: Any) -> Any:
        """One copy of replicated state, as an ordinary pytree."""
        return tree

    def gather_rows(self, rows: Any, stacked: bool = True) -> np.ndarray:
        """Per-example outputs (of stacked steps when `stacked`) as one host array in batch order."""
        rows = np.asarray(rows)
        return rows.reshape(-1, *rows.shape[2:]) if stacked else rows


def _check_num_devices(num_devices: int | None) -> int:
    available = jax.device_count()
    if jax.local_device_count() * jax.process_count() != available:
        raise ValueError(
            f"every process must hold as many devices as the others: {available} devices over "
            f"{jax.process_count()} processes, {jax.local_device_count()} of them here"
        )
    if num_devices is None:
        return available
    checks.positive_int("num_devices", num_devices)
    if num_devices > available:
        raise ValueError(
            f"num_devices={num_devices} is larger than the {available} devices there are ({jax.devices()[0].platform})"
        )
    if jax.process_count() > 1 and num_devices != available:
        raise ValueError(
            f"num_devices: with {jax.process_count()} processes the mesh spans all {available} devices, "
            f"got {num_devices}"
        )
    return int(num_devices)


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named `AXIS` over the first `num_devices` devices (all by default), grouped by process.

    Grouping by process puts each process's devices side by side, so its share of a batch is one contiguous slice.
    """
    count = _check_num_devices(num_devices)
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))[:count]
    return Mesh(np.asarray(devices), (AXIS,))


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key)


def _put(leaf: Any, sharding: NamedSharding, copies: int | None) -> jax.Array:
    """`leaf` (stacked `copies` times on a new leading axis when given) as a global array with `sharding`.

    The value goes through a host copy: so the result never shares a buffer with `leaf` (which a step donating
    it would delete; `jax.device_put` reuses the source buffer on its own device), and across processes a device
    array of one process cannot be sent to another's devices. `jax.device_put` then checks, across processes,
    that every process passed the same value.
    """
    if _is_key(leaf):
        impl = jax.random.key_impl(leaf)
        return jax.random.wrap_key_data(_put(jax.random.key_data(leaf), sharding, copies), impl=impl)
    value = np.array(leaf)
    return jax.device_put(value if copies is None else np.broadcast_to(value, (copies, *value.shape)), sharding)


class _MeshStrategy:
    """What the two multi-device strategies share: a 1-D data mesh over `num_devices` devices of every process."""

    def __init__(self, num_devices: int | None = None):
        self.mesh = data_mesh(num_devices)
        self.devices = list(self.mesh.devices.flat)
        self.num_replicas = self.mesh.size
        self.process_index, self.process_count = jax.process_index(), jax.process_count()


class Sharded(_MeshStrategy):
    """Data parallel over a 1-D mesh: params and optimiser state replicated, each batch split on its leading axis.

    The core's step is jitted as it is; XLA reads the shardings of the arguments and inserts the all-reduce that
    sums the gradients, so the update is the single-device one for the same global batch.
    """

    name = "sharded"
    axis_name = None

    def __init__(self, num_devices: int | None = None):
        super().__init__(num_devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.steps_sharding = NamedSharding(self.mesh, PartitionSpec(None, AXIS))

    def compile(self, step: Callable, donate_argnums: tuple[int, ...] = ()) -> Callable:
        """`step` jitted once for the whole mesh; shardings come from the placed arguments."""
        return jax.jit(step, donate_argnums=donate_argnums)

    def replicate(self, tree: Any) -> Any:
        """A full copy of `tree` on every device of the mesh."""
        return jax.tree.map(lambda leaf: _put(leaf, self.replicated, None), tree)

    def shard_batch(self, batch: Any) -> Any:
        """A global (batch, ...) array built from this process's contiguous slice of the batch."""
        return jax.make_array_from_process_local_data(self.batch_sharding, batch)

    def shard_steps(self, inputs: Any) -> Any:
        """Global (steps, batch, ...) arrays built from this process's contiguous slice of every batch."""
        return jax.make_array_from_process_local_data(self.steps_sharding, inputs)

    def unreplicate(self, tree: Any) -> Any:
        """Replicated arrays are already ordinary (global) arrays."""
        return tree

    def gather_rows(self, rows: jax.Array, stacked: bool = True) -> np.ndarray:
        """Batch-sharded outputs (of stacked steps when `stacked`) as one host array in batch order, everywhere."""
        rows = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
        return rows.reshape(-1, *rows.shape[2:]) if stacked else rows


class Pmap(_MeshStrategy):
    """The `jax.pmap` form: state copied along a leading device axis, each device a slice of the batch.

    The core's step, built with `axis_name`, psums gradients and totals over that axis, which is the pmean of
    per-device mean gradients weighted by their real rows: the single-device update for the same global batch.
    """

    name = "pmap"
    axis_name = AXIS

    def __init__(self, num_devices: int | None = None):
        super().__init__(num_devices)
        self.sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.local_count = self.num_replicas // self.process_count

    def compile(self, step: Callable, donate_argnums: tuple[int, ...] = ()) -> Callable:
        """`step` pmapped over the mesh's devices, with gradients and totals psum-ed over `AXIS`."""
        return jax.pmap(
            step,
            axis_name=AXIS,
            donate_argnums=donate_argnums,
            devices=list(self.mesh.devices.flat),
            axis_size=self.num_replicas,
        )

    def replicate(self, tree: Any) -> Any:
        """One copy of `tree` per device, stacked on a new leading axis.

        PRNG keys go as their raw uint32 data, which `jax.random` takes alike: pmap across processes cannot take
        a typed key array that spans them.
        """
        raw = jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)
        return jax.tree.map(lambda leaf: _put(leaf, self.sharding, self.num_replicas), raw)

    def shard_batch(self, batch: Any) -> Any:
        """This process's (rows, ...) input as (local devices, rows per device, ...)."""

        def split(a: np.ndarray) -> np.ndarray:
            return np.reshape(a, (self.local_count, -1, *np.shape(a)[1:]))

        return jax.make_array_from_process_local_data(self.sharding, jax.tree.map(split, batch))

    def shard_steps(self, inputs: Any) -> Any:
        """This process's (steps, rows, ...) inputs as (local devices, steps, rows per device, ...)."""

        def split(a: np.ndarray) -> np.ndarray:
            a = np.reshape(a, (a.shape[0], self.local_count, -1, *np.shape(a)[2:]))
            return np.swapaxes(a, 0, 1)

        return jax.make_array_from_process_local_data(self.sharding, jax.tree.map(split, inputs))

    def unreplicate(self, tree: Any) -> Any:
        """The first local device's copy, without the device axis."""
        return jax.tree.map(lambda leaf: leaf.addressable_shards[0].data[0], tree)

    def gather_rows(self, rows: jax.Array, stacked: bool = True) -> np.ndarray:
        """Per-device outputs, (devices, [steps,] rows, ...), as one host array in batch order."""
        rows = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
        if not stacked:
            return rows.reshape(-1, *rows.shape[2:])
        return np.swapaxes(rows, 0, 1).reshape(-1, *rows.shape[3:])


STRATEGIES: dict[str, Callable[[], Strategy]] = {"single": SingleDevice, "sharded": Sharded, "pmap": Pmap}


def get_strategy(strategy: Strategy | str | None = None) -> Strategy:
    """A strategy object from a name in `STRATEGIES`, an existing strategy, or None (one device)."""
    if strategy is None:
        return SingleDevice()
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        return STRATEGIES[strategy]()
    return strategy


def host_copy(tree: Any) -> Any:
    """A host (numpy) copy of state as `Strategy.unreplicate` gives it, readable in every process of a run.

    Each array's copy on this process's first device: a replicated global array is not fully addressable there.
    """
    return jax.tree.map(
        lambda a: np.array(a.addressable_shards[0].data) if isinstance(a, jax.Array) else np.array(a), tree
    )


def on_cpu(strategy: Strategy) -> bool:
    """Whether every device of the strategy is a CPU device, whose memory is the host's own RAM."""
    return all(device.platform == "cpu" for device in strategy.devices)


def device_memory_bytes(strategy: Strategy) -> int:
    """Memory of one device the strategy runs on: its allocator's limit, or on a CPU the host's RAM per device."""
    stats = strategy.devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // jax.local_device_count()


def _env_int(name: str, value: int | None) -> int | None:
    if value is not None or os.environ.get(name) in (None, ""):
        return value
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {os.environ[name]!r}") from None


def _cluster_size() -> int | None:
    """The process count a cluster launcher (mpirun, srun) set in the environment, None outside one."""
    for launcher, name in CLUSTER_SIZE_VARIABLES.items():
        value = os.environ.get(name, "")
        if value and not value.isdigit():
            raise ValueError(f"{name} (set by {launcher}) must be a process count, got {value!r}")
        if value:
            return int(value)
    return None


STARTUP_TIMEOUT = 300.0
"""Seconds every process waits for the whole run to join before it gives up (JAX's `initialization_timeout`)."""


def _port_in_use(port: int) -> bool:
    """Whether something on this host listens on TCP `port` already (process 0's coordinator could not start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free for a server
        try:
            probe.bind(("", port))
        except OSError:
            return True
    return False


def _wait_for_coordinator(host: str, port: int, timeout: float) -> None:
    """Wait until process 0's coordinator accepts connections; a TimeoutError after `timeout` seconds.

    JAX's own wait ends in an abort (a C++ check failure and its stack), so the common case, process 0 not there
    yet or at all, is waited for here, where it can end in one line.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no coordinator answered at {host}:{port} within {timeout:g}s; start process 0 there "
                    "(with the same coordinator address), or allow a longer start-up"
                ) from None
            time.sleep(0.1)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: float = STARTUP_TIMEOUT,
) -> int:
    """Join a run of several processes through `jax.distributed.initialize`; returns the process count.

    Each argument left None is read from the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`). When the count is in neither, a cluster launcher's is used (Open MPI's `mpirun`, SLURM's
    `srun`) and JAX works out the rest from that launcher's variables. With one process nothing is started. Call it
    before anything else in JAX. Every process gives up after `timeout` seconds without the whole run (JAX's
    `initialization_timeout`); process 0 first refuses a coordinator port already in use on its host (ValueError),
    and the others wait for the coordinator to answer (TimeoutError), each in one line.
    """
    timeout = checks.positive_number("timeout", timeout)
    num_processes = _env_int(ENV_NUM_PROCESSES, num_processes)
    process_id = _env_int(ENV_PROCESS_ID, process_id)
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    startup = {"initialization_timeout": max(1, math.ceil(timeout))}
    if num_processes is None and (_cluster_size() or 1) > 1:
        jax.distributed.initialize(coordinator_address=coordinator_address, process_id=process_id, **startup)
        return jax.process_count()
    if num_processes is None or num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"process_id must be 0 in a run of one process, got {process_id}")
        return 1
    checks.positive_int("num_processes", num_processes)
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}) for {num_processes} processes, got {process_id}")
    if not coordinator_address or not re.fullmatch(r"\S+:\d+", coordinator_address):
        raise ValueError(f"coordinator_address must be 'host:port' (process 0's address), got {coordinator_address!r}")
    host, port = coordinator_address.rsplit(":", 1)
    if process_id == 0 and _port_in_use(int(port)):
        raise ValueError(
            f"coordinator_address: port {port} is in use on this host, so process 0 cannot run the coordinator "
            "there; pick another port"
        )
    if process_id != 0:
        _wait_for_coordinator(host.strip("[]"), int(port), timeout)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id, **startup
    )
    return num_processes
