"""Device meshes for data parallelism.

mmvae_jax runs data-parallel with `jax.jit` over a one-axis mesh named ``"data"``:
batches are global `jax.Array`s sharded along their leading (batch) axis with
``NamedSharding(mesh, P("data"))`` and parameters / optimiser state are replicated with
``NamedSharding(mesh, P())``. XLA inserts the gradient all-reduce. The same code path serves
one CPU, several GPUs, a TPU VM and (through `jax.make_array_from_process_local_data`)
several hosts.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process) named "data".

  The axis type is Auto so that unsharded (uncommitted) arrays mix freely with sharded
  ones; the shardings we place explicitly are what decides the layout.
  """
  devices = list(jax.devices()) if devices is None else list(devices)
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
  """Places every leaf of `tree` on all devices of `mesh`."""
  return jax.device_put(tree, replicated_sharding(mesh))


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
