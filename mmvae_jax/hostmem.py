"""Host-memory allocator settings for training processes on XLA:CPU (glibc Linux).

XLA:CPU allocates each executable's temporary buffer (65-74 MB for the MNIST-SVHN training step at
K = 1, B = 128; 421 MB at K = 30) with ``posix_memalign`` on one of its worker threads and frees
it when the step ends. glibc serves a block that large from a fresh ``mmap`` (a worker thread's
arena cannot hold more than 64 MB) and unmaps it on ``free``, so every step faults the whole
buffer in again: on the 2-core reference CPU, 18,000 minor page faults and 30-40 ms of kernel
time per K = 1 step (≈6% of the step). The official PyTorch code loses a third of its K = 30
step time the same way (benchmarks/train_step.py's docstring).

`keep_freed_memory` makes every thread allocate from the main heap (``M_ARENA_MAX = 1``), with
no per-block ``mmap`` (``M_MMAP_MAX = 0``), and never gives freed memory back
(``M_TRIM_THRESHOLD`` at its maximum), so the step's buffer is reused in place. It must run at
process start, before JAX creates its threads. It has a price at larger steps, measured with
benchmarks/train_step.py: the heap can fragment (a small allocation landing in the freed
buffer makes the next buffer grow the heap by its whole size), so the peak RSS at K = 10 was
1.34-1.58 GB (1.20 GB without) and at K = 30 1.27-1.65 GB (1.36 GB); and one shared heap
without the other two settings slowed K = 10 by 5-10%. Hence `apply_policy`'s "auto": keep
freed memory only for small steps (≤ ``AUTO_MAX_LATENTS`` decoded latents, M·K·B: K = 1 at
B = 128 with two modalities), where the worst case costs one more small buffer.

The experiment scripts and benchmarks/train_step.py apply "auto" by default
(``--retain_host_memory``); the library itself never changes the allocator.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt accepts (a C int): free memory at the top of the heap is
# only returned to the kernel beyond 2 GiB.
_TRIM_THRESHOLD = 2**31 - 1


# "auto" keeps freed memory when a step decodes at most this many latents (M·K·B).
AUTO_MAX_LATENTS = 512
POLICIES = ("auto", "always", "never")


def _mallopt():
  """glibc's ``mallopt``, or None (not Linux, not glibc)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl): mallopt differs or is absent
    return None
  mallopt = libc.mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return mallopt


def keep_freed_memory() -> bool:
  """Make glibc malloc reuse freed host memory instead of unmapping it; True if applied.

  ``M_ARENA_MAX = 1``, ``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 2 GiB − 1. Call once at
  process start, before JAX creates its CPU client (threads that have already allocated keep
  their own heaps). A no-op returning False where the C library is not glibc (macOS, musl).
  """
  mallopt = _mallopt()
  if not mallopt:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
  return all(mallopt(param, value) == 1 for param, value in settings)


def apply_policy(policy: str, latents_per_step: int) -> bool:
  """`keep_freed_memory` per `policy`: "always", "never", or "auto" = when a training step
  decodes at most ``AUTO_MAX_LATENTS`` latents (M·K·B, global batch). Returns whether applied."""
  if policy not in POLICIES:
    raise ValueError(f"unknown host-memory policy {policy!r}; expected one of {POLICIES}")
  if policy == "never" or (policy == "auto" and latents_per_step > AUTO_MAX_LATENTS):
    return False
  return keep_freed_memory()
