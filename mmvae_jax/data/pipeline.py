"""Epochs of sharded global batches from a `PairedDataset`, prefetched to the devices.

One epoch visits every pair once, in the order of a permutation that depends on (seed, epoch)
only, so a run resumed at (epoch, step_in_epoch) sees exactly the batches it would have seen.

A batch is a dict of global `jax.Array`s sharded over the mesh's "data" axis
(`NamedSharding(mesh, P("data"))`, see `mmvae_jax.parallel`):

  {"x": tuple of M float32 (B, H_m, W_m, C_m) in [0, 1],
   "y": int32 (B,) class labels (of modality 0; equal across modalities by construction),
   "mask": float32 (B,) 1 for real rows, 0 for padding,
   "present": bool (B, M), only for a dataset with a ``present`` (M, N) mask that is not all
     True (incomplete data, `mmvae_jax.data.missing`): modality m of row b observed; hidden
     entries of "x" are 0}

The last batch of an epoch is padded to the full global batch size B with rows that repeat a
valid pair and carry mask 0 (a loss must weight rows by the mask, never silently average over
padding); `drop_remainder=True` drops it instead.

Multi-host: process p (of P) gathers only rows [p*B/P, (p+1)*B/P) of each global batch and the
global array is assembled with `jax.make_array_from_process_local_data`. `host_batches` is the
host-side half (numpy, process-local rows) and can be run with any faked process counts.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from mmvae_jax.data.pairing import PairedDataset
from mmvae_jax.parallel import batch_sharding


def num_batches(n: int, global_batch_size: int, drop_remainder: bool = False) -> int:
  """Batches per epoch of `n` examples: floor(n / B) with drop_remainder, else ceil(n / B)."""
  if global_batch_size < 1:
    raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
  return n // global_batch_size if drop_remainder else -(-n // global_batch_size)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """(n,) int64 visiting order of epoch `epoch`: a permutation seeded by (seed, epoch) only."""
  if not shuffle:
    return np.arange(n, dtype=np.int64)
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
  return np.random.default_rng([seed, epoch]).permutation(n)


def global_batch_rows(order: np.ndarray, step: int, global_batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pair rows and mask of global batch `step` of an epoch with visiting order `order`.

  Returns:
    rows: (B,) int64 indices into the pair list; a short last batch is padded by repeating its
      first row.
    mask: (B,) float32, 1 for real rows and 0 for padding.
  """
  real = order[step * global_batch_size:(step + 1) * global_batch_size]
  if real.size == 0:
    raise ValueError(f"step {step} is past the end of an epoch of {order.size} examples")
  mask = np.zeros((global_batch_size,), np.float32)
  mask[:real.size] = 1
  if real.size == global_batch_size:
    return real, mask
  rows = np.full((global_batch_size,), real[0], dtype=order.dtype)
  rows[:real.size] = real
  return rows, mask


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """Rows [p*B/P, (p+1)*B/P) of every global batch that process p of P gathers."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch_size % process_count:
    raise ValueError(f"global batch {global_batch_size} does not split evenly over "
                     f"{process_count} processes")
  per = global_batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def host_batches(dataset: PairedDataset, global_batch_size: int, *, seed: int, epoch: int,
                 start_step: int = 0, shuffle: bool = True, drop_remainder: bool = False,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, Any]]:
  """This process's rows of global batches start_step.. of one epoch, as numpy arrays.

  Yields:
    {"x": tuple of M float32 (B/P, H_m, W_m, C_m), "y": int32 (B/P,), "mask": float32 (B/P,),
     "rows": int64 (B/P,) the pair indices (padding rows repeat a real one), and for a dataset
     with a ``present`` (M, N) mask "present": bool (B/P, M)}
  """
  n = len(dataset)
  total = num_batches(n, global_batch_size, drop_remainder)
  if not 0 <= start_step <= total:
    raise ValueError(f"start_step {start_step} is outside [0, {total}] for {n} pairs at "
                     f"global batch {global_batch_size}")
  local = process_rows(global_batch_size, process_index, process_count)
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")

  present = getattr(dataset, "present", None)
  if present is not None and np.all(present):
    present = None  # complete data: batches without a mask, the unmasked computation

  def gen():
    if start_step == total:
      return
    order = epoch_order(n, seed, epoch, shuffle)
    for step in range(start_step, total):
      rows, mask = global_batch_rows(order, step, global_batch_size)
      rows, mask = rows[local], mask[local]
      xs, y = dataset.gather(rows)
      item = {"x": xs, "y": y, "mask": mask, "rows": rows}
      if present is not None:
        item["present"] = np.ascontiguousarray(present[:, rows].T)
      yield item
  return gen()


def _check_mesh_rows(sharding, global_batch_size: int, local: slice) -> None:
  """The devices of this process must hold exactly rows `local` of a global batch."""
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  spans = sorted({(s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                  for s in index_map.values()})
  covered = (spans[0][0], spans[-1][1])
  contiguous = all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
  if not contiguous or covered != (local.start, local.stop):
    raise ValueError(f"this process's devices hold rows {spans} of a global batch but its input "
                     f"shard is rows [{local.start}, {local.stop}); build the mesh with devices "
                     f"ordered by process and pass the real process_index/process_count")


class BatchIterator:
  """Iterator over the device batches of one epoch, optionally filled by a background thread.

  With prefetch > 0 a thread gathers batch n+1 on the host and starts its transfer while the
  consumer runs batch n; at most `prefetch` batches wait in the queue. An exception raised in the
  thread is re-raised by `next()`. `close()` (also via `with` or garbage collection) stops the
  thread. Attributes: `num_batches` (batches in a full epoch), `epoch`, `step` (index in the
  epoch of the next batch `next()` returns).
  """
  def __init__(self, items: Iterator[Any], *, num_batches: int, epoch: int, start_step: int,
               prefetch: int):
    self.num_batches, self.epoch, self.step = num_batches, epoch, start_step
    self._items = items
    self._closed = False
    self._thread = None
    if prefetch < 0:
      raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    if prefetch:
      self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
      self._stop = threading.Event()
      # The thread must not reference `self`, so that an abandoned iterator is collected (and
      # its __del__ stops the thread).
      self._thread = threading.Thread(target=_prefetch_worker, args=(items, self._queue, self._stop),
                                      name="mmvae-data-prefetch", daemon=True)
      self._thread.start()

  def __len__(self) -> int:
    """Batches left to deliver."""
    return max(0, self.num_batches - self.step) if not self._closed else 0

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self):
    if self._closed:
      raise StopIteration
    if self._thread is None:
      try:
        item = next(self._items)
      except BaseException:  # StopIteration included: done either way
        self.close()
        raise
    else:
      item = self._queue.get()
      if item is _END:
        self.close()
        raise StopIteration
      if isinstance(item, _Raised):
        self.close()
        raise item.error
    self.step += 1
    return item

  def close(self) -> None:
    """Stops the prefetch thread and drops the batches still queued; idempotent."""
    if self._closed:
      return
    self._closed = True
    if self._thread is not None:
      self._stop.set()
      while True:
        try:
          self._queue.get_nowait()
        except queue.Empty:
          break
      self._thread.join()
    close = getattr(self._items, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> "BatchIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


_END = object()


class _Raised:
  def __init__(self, error: BaseException):
    self.error = error


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
  """Puts `item` unless `stop` gets set first; returns whether it was put."""
  while not stop.is_set():
    try:
      q.put(item, timeout=0.05)
      return True
    except queue.Full:
      pass
  return False


def _prefetch_worker(items: Iterator[Any], q: queue.Queue, stop: threading.Event) -> None:
  try:
    for item in items:
      if not _put(q, stop, item):
        return
    _put(q, stop, _END)
  except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
    _put(q, stop, _Raised(e))


def _to_device(sharding, global_batch_size: int) -> Callable[[dict], dict]:
  def place(arr: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, arr, (global_batch_size,) + arr.shape[1:])

  def put(host: dict) -> dict:
    out = {"x": tuple(place(x) for x in host["x"]), "y": place(host["y"]), "mask": place(host["mask"])}
    if "present" in host:
      out["present"] = place(host["present"])
    return out
  return put


def batches(dataset: PairedDataset, global_batch_size: int, mesh: Mesh, *, seed: int, epoch: int,
            start_step: int = 0, shuffle: bool = True, drop_remainder: bool = False,
            prefetch: int = 2, process_index: int | None = None,
            process_count: int | None = None) -> BatchIterator:
  """Global batches start_step, ..., num_batches-1 of epoch `epoch`, sharded over `mesh`.

  Args:
    dataset: the pairs.
    global_batch_size: B, summed over all devices of all processes; must split evenly over
      the mesh's devices and over the processes.
    mesh: a 1-D mesh with axis "data" (`mmvae_jax.parallel.data_mesh`).
    seed, epoch: the visiting order is a function of these two only.
    start_step: first batch of the epoch to deliver (resume point).
    shuffle: False visits the pairs in their stored order.
    drop_remainder: drop the last partial batch instead of padding it (mask 0 rows).
    prefetch: batches prepared ahead by a background thread (0: synchronous).
    process_index, process_count: default jax.process_index() / jax.process_count().

  Returns:
    A `BatchIterator` of {"x": M float32 (B, H, W, C), "y": int32 (B,), "mask": float32 (B,)}
    global jax.Arrays with sharding NamedSharding(mesh, P("data")).
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  n_dev = mesh.devices.size
  if global_batch_size % n_dev:
    raise ValueError(f"global batch {global_batch_size} does not split evenly over {n_dev} devices")
  sharding = batch_sharding(mesh)
  _check_mesh_rows(sharding, global_batch_size, process_rows(global_batch_size, pi, pc))
  put = _to_device(sharding, global_batch_size)
  host = host_batches(dataset, global_batch_size, seed=seed, epoch=epoch, start_step=start_step,
                      shuffle=shuffle, drop_remainder=drop_remainder, process_index=pi,
                      process_count=pc)
  items = (put(b) for b in host)
  return BatchIterator(items, num_batches=num_batches(len(dataset), global_batch_size, drop_remainder),
                       epoch=epoch, start_step=start_step, prefetch=prefetch)
