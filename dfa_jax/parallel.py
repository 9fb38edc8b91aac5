"""Data-parallel DFA training on JAX: one compiled program over a mesh of devices, each batch sharded by rows.

Mirrors ``dfa_torch.parallel`` name for name. JAX runs ONE process over all devices: the
parameters, feedback, optimizer state and training set are replicated over a 1-D
``jax.sharding.Mesh`` (axis ``dfa_core.parallel.DATA_AXIS``), every gathered batch is
constrained to be sharded along its rows, and XLA's SPMD partitioner inserts the
all-reduces. The update is therefore the one-device update of the global batch, with
every grouping mode ('batch_mean', 'class_mean') and reduction ('sum', 'mean') global.

    dp = data_parallel(4)                                  # first 4 of jax.devices()
    epoch = train_epoch(spec, opt, "dfa", "class_mean", batch_size=512, parallel=dp)
    params, state, losses, _ = epoch(*dp.replicate((params, feedback, state, x, y)), order)

Simulated devices on one CPU: set ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
before JAX starts (before ``import jax`` runs its backend). Several hosts: call
``jax.distributed.initialize()`` (coordinator address, process count and id, or the
cluster's environment) in every host's process before anything else touches JAX;
``jax.devices()`` then spans the hosts and ``data_parallel(N)`` takes the first N of them.

Simulated CPU devices share the machine's cores, so they test the program, not the speed:
each device computes its rows with fewer threads and every step all-reduces the gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dfa_core import parallel as core_parallel
from dfa_core.parallel import DATA_AXIS

Array = jax.Array

SIMULATE_HINT = (
    "to simulate N devices on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N "
    "in the environment before JAX starts"
)


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """A data-parallel setup: a 1-D mesh of devices along ``DATA_AXIS``. Frozen and hashable
    (the compiled steps and epochs are cached per setup).

    JAX runs one process over all devices, so ``rank`` is 0 and ``is_main`` True; with several
    hosts (``jax.distributed``) every host runs the same program and ``rank`` is its
    ``jax.process_index()``, so that only host 0 writes files.
    """

    mesh: Mesh  # 1-D, axis DATA_AXIS: the devices a batch is sharded over

    @property
    def size(self) -> int:
        """Devices in the mesh."""
        return int(self.mesh.devices.size)

    @property
    def rank(self) -> int:
        """This process's rank: 0 (one process drives every device; the host's index with several)."""
        return int(jax.process_index())

    @property
    def is_main(self) -> bool:
        """True: the one process is the main one."""
        return self.rank == 0

    @property
    def replicated(self) -> NamedSharding:
        """Every device holds the whole array."""
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def rows(self) -> NamedSharding:
        """Device r holds rows shard_bounds(n, size, r) of an (n, ...) array."""
        return NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    def replicate(self, tree: Any) -> Any:
        """``jax.device_put`` of every leaf, replicated over the mesh (a no-op for leaves already there)."""
        return jax.device_put(tree, self.replicated)

    def batch_sharding(self, rows: int) -> NamedSharding:
        """The sharding of a batch of ``rows`` rows: by rows when the devices divide them, else replicated.

        A ragged batch (rows % size != 0, e.g. an epoch's last one) runs replicated: every device
        computes the whole batch, which is exact and costs only that one step's speed-up.
        """
        return self.rows if rows % self.size == 0 else self.replicated

    def constrain_batch(self, x_Bx: Array) -> Array:
        """Inside a traced function: ``x_Bx`` (batch, ...) constrained to ``batch_sharding(batch)``."""
        return jax.lax.with_sharding_constraint(x_Bx, self.batch_sharding(x_Bx.shape[0]))

    def settle(self, out: Any) -> Any:
        """``out`` (a program's outputs), waited for on CPU devices; as is elsewhere.

        XLA:CPU runs each device's part of a program on a thread of pools sized by the cores
        (``PJRT_NPROC`` overrides it), and an all-reduce holds its thread until every device
        arrives. Programs queued behind one another (JAX dispatches asynchronously) can take
        the threads while a device of the earlier program still waits for one: 4 simulated
        devices on a 2-core machine hung with two epochs in flight, and never with one (even
        with PJRT_NPROC=1). One program in flight costs nothing that counts on a CPU.
        """
        if self.mesh.devices.flat[0].platform == "cpu":
            return jax.block_until_ready(out)
        return out

    def shard_batch(self, x_Bx: Any) -> Array:
        """Outside a trace: ``x_Bx`` (batch, ...) placed on the mesh with ``batch_sharding(batch)``."""
        return jax.device_put(x_Bx, self.batch_sharding(len(x_Bx)))


def data_parallel(devices: Union[None, int, Sequence[Any]] = None) -> Optional[DataParallel]:
    """The data-parallel setup for ``train_step`` / ``train_epoch``'s ``parallel`` argument.

    Args:
      devices: None: one device, today's path (returns None). An int N >= 1: a mesh over the
        first N of ``jax.devices()``. A sequence of ``jax.Device``: a mesh over exactly those.
        With several hosts, call ``jax.distributed.initialize()`` first; ``jax.devices()`` then
        lists every host's devices.

    Returns:
      A ``DataParallel`` over the devices, or None for ``devices=None``.

    Raises:
      ValueError: N < 1, more devices than exist (simulate them with
        XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts), a repeated
        device, or a torchrun launch (WORLD_SIZE > 1): JAX runs one process over all devices.
      TypeError: ``devices`` is neither None, an int, nor a sequence of jax devices.
    """
    world = core_parallel.launched_world_size()
    if world > 1:
        raise ValueError(
            f"this process was launched by torchrun (WORLD_SIZE={world}): JAX runs one process over all devices; "
            "use devices=N, not torchrun"
        )
    if devices is None:
        return None
    available = jax.devices()
    if isinstance(devices, bool):
        raise TypeError(f"devices must be None, an int or a sequence of jax devices, got {devices!r}")
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"devices must be an int >= 1, got {devices}")
        if devices > len(available):
            raise ValueError(
                f"devices={devices} asked for, but JAX sees only {len(available)} device(s) "
                f"({available[0].platform}); {SIMULATE_HINT}"
            )
        chosen = list(available[:devices])
    elif isinstance(devices, Sequence) and not isinstance(devices, (str, bytes)):
        chosen = list(devices)
        if not chosen:
            raise ValueError("devices must hold at least one jax device, got an empty sequence")
        bad = [d for d in chosen if not isinstance(d, jax.Device)]
        if bad:
            raise TypeError(f"devices must be jax.Device objects (from jax.devices()), got {bad[0]!r}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"devices lists a device more than once: {chosen}")
    else:
        raise TypeError(f"devices must be None, an int or a sequence of jax devices, got {type(devices).__name__}")
    return DataParallel(Mesh(chosen, (DATA_AXIS,)))


def _check_parallel(parallel: object, batch_size: Optional[int] = None) -> Optional[DataParallel]:
    """Checks ``train_step`` / ``train_epoch``'s ``parallel`` argument before anything is traced.

    Raises:
      TypeError: not None nor a ``DataParallel`` of this backend (e.g. a torch one).
      ValueError: a ``batch_size`` the devices do not divide (``check_data_parallel``).
    """
    if parallel is None:
        return None
    if not isinstance(parallel, DataParallel):
        raise TypeError(
            f"parallel must be None or dfa_jax.parallel.data_parallel(devices)'s DataParallel, "
            f"got {type(parallel).__module__}.{type(parallel).__name__}"
        )
    if batch_size is not None:
        core_parallel.check_data_parallel(parallel.size, batch_size)
    return parallel


__all__ = ["DataParallel", "data_parallel"]
