"""Host-memory allocator setting for training processes on XLA:CPU (glibc Linux).

XLA:CPU allocates each executable's temporary buffer (74 MB for the MNIST-SVHN training step at
K = 1, B = 128) with ``posix_memalign`` on one of its worker threads and frees it when the step
ends. glibc serves a block that large from a fresh ``mmap`` (a worker thread's arena cannot hold
it) and unmaps it on ``free``, so every step faults the whole buffer in again: on the 2-core
reference CPU, 18,000 minor page faults and 30-40 ms of kernel time per K = 1 step, on the
critical path. The official PyTorch code loses a third of its K = 30 step time the same way
(benchmarks/train_step.py's docstring).

`retain_freed_memory` tells glibc to serve every allocation from the main heap and never give
freed memory back to the kernel, so the buffer is reused in place from the second step on. The
process keeps its high-water mark of host memory (peak RSS, which benchmarks/train_step.py
reports, is unchanged); it is meant for long-running training and benchmark processes, and is
called by the experiment scripts and the step benchmark before JAX starts its threads.
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


def retain_freed_memory() -> bool:
  """Make glibc malloc reuse freed host memory instead of unmapping it; True if applied.

  Sets ``M_ARENA_MAX = 1`` (every thread allocates from the main heap, so a block larger than a
  thread arena's 64 MB is not mapped separately), ``M_MMAP_MAX = 0`` (no per-block ``mmap``) and
  ``M_TRIM_THRESHOLD`` to its maximum (freed memory stays in the heap). Call it once at process
  start, before JAX creates its CPU client: threads that have already allocated keep their
  arenas. A no-op returning False where the C library is not glibc (macOS, musl) or on error.
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only
  except (OSError, AttributeError):
    return False
  del gnu_get_libc_version
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
  return all(mallopt(param, value) == 1 for param, value in settings)
