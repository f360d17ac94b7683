"""Running as one of several processes: joining the JAX distributed system, and global batches.

One program runs on every host (every TPU VM worker, every GPU VM, or several processes on one
machine). Each process calls `maybe_initialize` before any JAX computation, reads only its own rows
of every global batch (`data_shard` says which), and turns them into global arrays with
`global_batch`. Logging and exports happen where `is_primary()`. With one process all of this
reduces to the single-host path, so the same config runs on 1 CPU, 1 GPU or a pod with only the mesh
sizes changed.

Joining, explicitly configured (`coordinator_address`, `num_processes`, `process_id`, from the
config or the SDFT_* environment variables): before JAX's own handshake, the processes meet at the
coordinator's port (`sdft_jax.rendezvous`), so that a missing, unreachable or mismatched process
gives a `DistributedError` naming the coordinator and the processes concerned, within
`initialization_timeout_s`, instead of a hang or JAX's bare DEADLINE_EXCEEDED abort.

Joining, auto-detected (Cloud TPU VMs, Slurm, Open MPI; `cluster_detection`): JAX finds the
coordinator and the process ids itself; we only log what is about to happen and bound the wait.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.metadata
import importlib.util
import itertools
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdft_jax import rendezvous
from sdft_jax.models.sharding import DEFAULT_RULES, LogicalRules, batch_shards, logical_to_spec
from sdft_jax.validation import check_choice, check_int

_log = logging.getLogger(__name__)

ENV_COORDINATOR = "SDFT_COORDINATOR"
ENV_NUM_PROCESSES = "SDFT_NUM_PROCESSES"
ENV_PROCESS_ID = "SDFT_PROCESS_ID"
ENV_INIT_TIMEOUT = "SDFT_INIT_TIMEOUT_S"
ENV_CLUSTER_DETECTION = "SDFT_CLUSTER_DETECTION"

# The port JAX itself uses for TPU pods; used when an address names no port.
DEFAULT_PORT = 8482


class DistributedError(RuntimeError):
    """This process could not join the others (a process missing, unreachable or mismatched)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How this process finds the others. A field left None is read from its SDFT_* variable.

    Attributes:
      coordinator_address: `host:port` of process 0, reachable from every process (not `localhost`
        across machines); SDFT_COORDINATOR. A bare host gets DEFAULT_PORT.
      num_processes: processes in the job; None or 1 means single-process unless a cluster is
        auto-detected; SDFT_NUM_PROCESSES.
      process_id: this process, in [0, num_processes); SDFT_PROCESS_ID.
      initialization_timeout_s: how long to wait for every process to join before failing;
        SDFT_INIT_TIMEOUT_S, else 300.
      cpu_collectives: CPU collectives for multi-process CPU runs (`gloo` or `mpi`).
      cluster_detection: with no explicit multi-process setting, let JAX detect the cluster: `auto`
        on a Cloud TPU VM only, `always` (TPU, Slurm, Open MPI, GKE) or `never`;
        SDFT_CLUSTER_DETECTION, else `auto`.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    initialization_timeout_s: int | None = None
    cpu_collectives: str = "gloo"
    cluster_detection: str | None = None

    def __post_init__(self):
        name = type(self).__name__
        if self.num_processes is not None:
            check_int(f"{name}.num_processes", self.num_processes, minimum=1)
        if self.process_id is not None:
            check_int(f"{name}.process_id", self.process_id, minimum=0)
            if self.num_processes is not None and self.process_id >= self.num_processes:
                raise ValueError(f"{name}.process_id {self.process_id} is not below num_processes {self.num_processes}")
        if self.initialization_timeout_s is not None:
            check_int(f"{name}.initialization_timeout_s", self.initialization_timeout_s, minimum=1)
        if self.cluster_detection is not None:
            check_choice(f"{name}.cluster_detection", self.cluster_detection, _DETECTION)
        check_choice(f"{name}.cpu_collectives", self.cpu_collectives, ("gloo", "mpi"))
        if self.coordinator_address is not None:
            try:
                split_address(self.coordinator_address)
            except ValueError as e:
                raise ValueError(f"{name}.coordinator_address: {e}") from None

    @property
    def multi_process(self) -> bool:
        """Explicitly set up as one of several processes."""
        return self.num_processes is not None and self.num_processes > 1

    def resolve(self, environ: Mapping[str, str] | None = None) -> DistributedConfig:
        """This config with every unset field taken from the environment, or its default."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for key, (name, convert) in _ENV.items():
            raw = env.get(name, "").strip()
            if getattr(self, key) is not None or not raw:
                continue
            try:
                values[key] = convert(raw)
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a valid {key}") from None
        out = dataclasses.replace(self, **values)
        return dataclasses.replace(
            out, initialization_timeout_s=out.initialization_timeout_s or DEFAULT_TIMEOUT_S,
            cluster_detection=out.cluster_detection or "auto")


_DETECTION = ("auto", "always", "never")
DEFAULT_TIMEOUT_S = 300
_ENV = {
    "coordinator_address": (ENV_COORDINATOR, str),
    "num_processes": (ENV_NUM_PROCESSES, int),
    "process_id": (ENV_PROCESS_ID, int),
    "initialization_timeout_s": (ENV_INIT_TIMEOUT, int),
    "cluster_detection": (ENV_CLUSTER_DETECTION, str),
}


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of `host:port`, `[v6]:port` or a bare host (DEFAULT_PORT)."""
    host, sep, port = address.rpartition(":")
    if not sep or (address.startswith("[") and not host.endswith("]")) or (":" in host and not host.startswith("[")):
        host, port = address, str(DEFAULT_PORT)  # no port (a bare IPv6 address has colons of its own)
    host = host.strip("[]")
    if not host:
        raise ValueError(f"coordinator address {address!r} names no host")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator address {address!r}: port must be a number in 1..65535")
    return host, int(port)


def tpu_vm_detected() -> bool:
    """True on a Cloud TPU VM: libtpu is installed and a Google TPU PCI device is present."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor, encoding="ascii") as f:
                if f.read().strip() == "0x1ae0":  # Google's PCI vendor id
                    return True
        except OSError:
            continue
    return False


def default_fingerprint() -> str:
    """What must match on every host for them to be running the same program."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "?"
    try:
        ours = importlib.metadata.version("sdft-jax")
    except importlib.metadata.PackageNotFoundError:  # a source checkout on the path, not installed
        ours = "source"
    return f"sdft-jax {ours}, jax {jax.__version__}, python {sys.version_info[0]}.{sys.version_info[1]}, {program}"


def maybe_initialize(cfg: DistributedConfig | None = None, *, fingerprint: str | None = None,
                     environ: Mapping[str, str] | None = None) -> bool:
    """Joins the JAX distributed system if this is one of several processes; True if it is (now or before).

    Call before any JAX computation. Fields of `cfg` left None come from the SDFT_* variables of
    `environ` (default: the process environment). `fingerprint` (default: package, JAX and Python
    versions and the program name) must be equal on every process; pass e.g. a hash of the resolved
    config to also catch hosts started with different configs. Raises DistributedError if the
    processes do not all join within the timeout, or one of them is refused.
    """
    cfg = (DistributedConfig() if cfg is None else cfg).resolve(environ)
    if jax.distributed.is_initialized():
        if cfg.multi_process and jax.process_count() != cfg.num_processes:
            raise DistributedError(f"already initialized with {jax.process_count()} processes, "
                                   f"but configured for {cfg.num_processes}")
        return True
    if cfg.multi_process:
        _initialize_explicit(cfg, fingerprint or default_fingerprint())
        return True
    if cfg.num_processes == 1:
        return False
    if cfg.cluster_detection == "always" or (cfg.cluster_detection == "auto" and tpu_vm_detected()):
        _log.info("joining an auto-detected cluster (cluster_detection=%s); waiting at most %d s for "
                  "every host. A DEADLINE_EXCEEDED abort from RegisterTask means a host did not start "
                  "this program or cannot reach worker 0.", cfg.cluster_detection, cfg.initialization_timeout_s)
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
        jax.distributed.initialize(initialization_timeout=cfg.initialization_timeout_s)
        _log.info("joined as process %d of %d", jax.process_index(), jax.process_count())
        return True
    return False


def _initialize_explicit(cfg: DistributedConfig, fingerprint: str) -> None:
    missing = [f"{name} (or {env})" for name, env in (("coordinator_address", ENV_COORDINATOR),
                                                       ("process_id", ENV_PROCESS_ID)) if getattr(cfg, name) is None]
    if missing:
        raise DistributedError(f"num_processes={cfg.num_processes} also needs " + " and ".join(missing))
    n, i, address = cfg.num_processes, cfg.process_id, cfg.coordinator_address
    assert n is not None and i is not None and address is not None
    host, port = split_address(address)
    _log.info("process %d of %d: meeting the others at coordinator %s:%d (timeout %d s)",
              i, n, host, port, cfg.initialization_timeout_s)
    try:
        rendezvous.meet(host, port, num_processes=n, process_id=i, timeout_s=cfg.initialization_timeout_s,
                        fingerprint=fingerprint, port_hint=f"the coordinator address ({ENV_COORDINATOR})")
    except rendezvous.RendezvousError as e:
        raise DistributedError(str(e)) from None
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    # Every process is known to be up, so JAX's handshake is quick; it gets the full timeout anyway.
    # cluster_detection_method="deactivate": the explicit values are the truth, even on a TPU VM.
    jax.distributed.initialize(coordinator_address=rendezvous.address(host, port), num_processes=n, process_id=i,
                               initialization_timeout=cfg.initialization_timeout_s,
                               cluster_detection_method="deactivate")
    _log.info("joined as process %d of %d (%d local devices)", i, n, jax.local_device_count())


# --- After joining. ---------------------------------------------------------------------------------

def is_primary() -> bool:
    """True in the process that logs, writes reports and exports (process 0)."""
    return jax.process_index() == 0


def to_host(tree):
    """Numpy copies of every array of `tree` on every process (a collective: all processes call it)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def put(x, sharding: jax.sharding.Sharding):
    """A global array of host value `x` (equal on every process) laid out by `sharding`.

    Unlike `jax.device_put`, works when the sharding spans other processes' devices: each process
    fills only its own devices' slices. Typed PRNG keys keep their implementation.
    """
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def agree_max(values: Sequence[int]) -> tuple[int, ...]:
    """Elementwise maximum of `values` over all processes (a collective), e.g. to agree on padded widths."""
    local = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return tuple(int(v) for v in local)
    gathered = multihost_utils.process_allgather(local)  # [processes, len(values)]
    return tuple(int(v) for v in np.max(np.asarray(gathered), axis=0))


@dataclasses.dataclass(frozen=True)
class DataShard:
    """Which rows of each global batch this process supplies.

    The global batch is cut into `count` equal contiguous blocks; this process supplies block `index`.
    Processes whose devices hold the same rows (the batch axes do not span them) share a block, and
    must feed identical rows. Pass these as the data pipeline's `process_index` / `process_count`.
    """

    index: int
    count: int

    def rows(self, global_rows: int) -> slice:
        """This process's rows of a global batch of `global_rows`."""
        if global_rows % self.count:
            raise ValueError(f"a global batch of {global_rows} rows does not split into {self.count} host blocks")
        per = global_rows // self.count
        return slice(self.index * per, (self.index + 1) * per)


def batch_spec(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec of batch arrays: rows over the mesh axes the `batch` rule names, the rest replicated."""
    return logical_to_spec(("batch",), None, mesh, rules)


def data_shard(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, *, process_index: int | None = None) -> DataShard:
    """This process's block of every global batch under `mesh` (index 0 of 1 with one process)."""
    return _data_shard(mesh, rules, jax.process_index() if process_index is None else process_index)


@functools.lru_cache(maxsize=64)  # asked for every batch; a pod's mesh has thousands of devices
def _data_shard(mesh: Mesh, rules: LogicalRules, process_index: int) -> DataShard:
    n = batch_shards(mesh, rules)
    # With one row per batch shard, each device's index tells which shard of the rows it holds.
    sharding = NamedSharding(mesh, batch_spec(mesh, rules))
    rows_of: dict[int, set[int]] = {}
    for device, index in sharding.devices_indices_map((n,)).items():
        rows_of.setdefault(device.process_index, set()).add(index[0].start or 0)
    return data_shard_from_rows(rows_of, n, process_index, dict(mesh.shape))


def data_shard_from_rows(rows_of: Mapping[int, set[int]], n: int, process_index: int,
                         mesh_shape: Mapping[str, int]) -> DataShard:
    """The block of `process_index`, given the batch shards (of `n`) that each process's devices hold."""
    blocks = {p: (min(r), max(r) + 1) for p, r in rows_of.items()}
    distinct = sorted(set(blocks.values()))
    contiguous = all(len(rows_of[p]) == hi - lo for p, (lo, hi) in blocks.items())
    equal = len({hi - lo for lo, hi in distinct}) == 1
    tiles = distinct[0][0] == 0 and distinct[-1][1] == n and all(a[1] == b[0] for a, b in itertools.pairwise(distinct))
    if not (contiguous and equal and tiles):
        raise DistributedError(
            f"mesh {mesh_shape}: the batch axes do not give each process one contiguous, equal block of rows "
            f"(batch shards per process: { {p: sorted(r) for p, r in sorted(rows_of.items())} }); build the "
            f"mesh with make_mesh over jax.devices(), whose order groups each process's devices")
    if process_index not in blocks:
        raise DistributedError(f"process {process_index} holds no device of mesh {mesh_shape}")
    return DataShard(index=distinct.index(blocks[process_index]), count=len(distinct))


def global_batch(local_batch, mesh: Mesh | None, rules: LogicalRules = DEFAULT_RULES):
    """Global arrays, rows sharded over the batch axes, from this process's rows of every array.

    `local_batch` is a pytree of host arrays holding the rows `data_shard(mesh).rows(...)` of the
    global batch; every process must pass the same shapes. With one process this is a device_put.
    `mesh=None` gives arrays on the default device.
    """
    if mesh is None:
        return jax.tree.map(jnp.asarray, local_batch)
    shard = data_shard(mesh, rules)
    n = batch_shards(mesh, rules)
    sharding = NamedSharding(mesh, batch_spec(mesh, rules))

    def one(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError("global_batch: a batch array needs a leading row dimension, got a scalar")
        rows = x.shape[0] * shard.count
        if rows % n:
            raise ValueError(f"global_batch: {rows} global rows do not split over the {n} batch shards of mesh "
                             f"{dict(mesh.shape)}")
        return jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))

    return jax.tree.map(one, local_batch)
