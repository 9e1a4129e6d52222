"""Device meshes for data parallelism.

mmvae_jax runs data-parallel with `jax.jit` over a one-axis mesh named ``"data"``:
batches are global `jax.Array`s sharded along their leading (batch) axis with
``NamedSharding(mesh, P("data"))`` and parameters / optimiser state are replicated with
``NamedSharding(mesh, P())``. XLA inserts the gradient all-reduce. The same code path serves
one CPU, several GPUs, a TPU VM and (through `jax.make_array_from_process_local_data`)
several hosts: after `initialize_distributed` the mesh spans every device of every process.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None
                           ) -> bool:
  """Joins the processes of a run of several (`jax.distributed.initialize`): explicitly, from
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or where JAX detects a cluster
  of several processes (TPU slice, Slurm, Open MPI). A single process is left as it is.
  Returns whether this process is one of several. See `mmvae_jax.multihost.initialize`."""
  from mmvae_jax import multihost
  return multihost.initialize(coordinator_address, num_processes, process_id)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process) named "data".

  With several processes the default devices are ordered by process, so that each process's
  devices hold one contiguous share of every batch (the rows it reads). The axis type is Auto
  so that unsharded (uncommitted) arrays mix freely with sharded ones; the shardings we place
  explicitly are what decides the layout.
  """
  if devices is None:
    devices = list(jax.devices())
    if jax.process_count() > 1:
      devices.sort(key=lambda d: (d.process_index, d.id))
  devices = list(devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device")
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading axis split over the "data" axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters and optimiser state: a full copy on every device."""
  return NamedSharding(mesh, P())


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` on all devices of `mesh`.

  With several processes each process places its own copy (the same values: the same code and
  seed made them), without `jax.device_put`'s cross-process equality check of every leaf.
  """
  sharding = replicated_sharding(mesh)
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)

  def place(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.device_put(x, sharding)
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, tree)


def shard_batch(tree, mesh: Mesh):
  """Places host arrays (global batch, leading axis divisible by the mesh size) on `mesh`.

  Single-process helper; multi-host input pipelines build their global arrays with
  `jax.make_array_from_process_local_data` instead (see `mmvae_jax.data`).
  """
  n = mesh.devices.size
  for leaf in jax.tree.leaves(tree):
    if leaf.shape[0] % n:
      raise ValueError(f"batch of {leaf.shape[0]} examples does not split evenly over {n} devices")
  return jax.device_put(tree, batch_sharding(mesh))
