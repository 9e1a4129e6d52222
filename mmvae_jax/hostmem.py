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

`restart_with_huge_pages` attacks the same faults at every step size, without keeping memory:
it re-executes the program with glibc's ``glibc.malloc.hugetlb=1`` tunable, so that malloc asks
the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on the large blocks it maps,
and a step's buffer is faulted in 2 MiB at a time instead of 4 KiB. Tunables are read only when
a process starts, hence the re-execution; it is needed (and done) only where the kernel gives
huge pages on request ("madvise" in /sys/kernel/mm/transparent_hugepage/enabled) and glibc is
2.35 or newer. Measured on the 2-core AMD EPYC reference VM (benchmarks/train_step.py, pairs of
runs with and without, 4 Dec 2026): K = 30 1.37/1.31 → 1.25/1.11 s per step, K = 10
0.386/0.400 → 0.340/0.330 s, K = 1 0.070/0.072 → 0.063/0.058 s, peak RSS unchanged
(1.27-1.35 GB at K = 30).

The experiment scripts and benchmarks/train_step.py apply both by default
(``--retain_host_memory=auto``, ``--huge_pages=auto``); the library itself never changes the
allocator.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt accepts (a C int): free memory at the top of the heap is
# only returned to the kernel beyond 2 GiB.
_TRIM_THRESHOLD = 2**31 - 1


# glibc's tunable asking malloc for transparent huge pages on the blocks it maps (glibc >= 2.35).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
HUGE_PAGES_POLICIES = ("auto", "never")
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"

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


def _glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, or None (not Linux/glibc)."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, OSError, ValueError):
    return None
  if name != "glibc":
    return None
  major, minor = version.split(".")[:2]
  return int(major), int(minor)


def transparent_huge_page_mode(path: str = _THP_ENABLED) -> str | None:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or None."""
  try:
    with open(path) as f:
      words = f.read().split()
  except OSError:
    return None
  return next((w[1:-1] for w in words if w.startswith("[") and w.endswith("]")), None)


def huge_pages_environment(environ: Mapping[str, str], thp_mode: str | None = None,
                           glibc: tuple[int, int] | None = None) -> dict[str, str] | None:
  """`environ` with ``HUGE_PAGES_TUNABLE`` added to ``GLIBC_TUNABLES``, or None when a restart
  would change nothing: the tunable is already there, glibc is older than 2.35 (or absent), or
  the kernel's mode (`thp_mode`, read from sysfs when None) is not "madvise" ("always" already
  backs large mappings with huge pages; "never" refuses them)."""
  thp_mode = transparent_huge_page_mode() if thp_mode is None else thp_mode
  glibc = _glibc_version() if glibc is None else glibc
  tunables = environ.get("GLIBC_TUNABLES", "")
  if (HUGE_PAGES_TUNABLE in tunables.split(":") or glibc is None or glibc < (2, 35)
      or thp_mode != "madvise"):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE]))}


def huge_pages_active() -> bool:
  """Whether this process was started with ``HUGE_PAGES_TUNABLE`` in ``GLIBC_TUNABLES``."""
  return HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def restart_with_huge_pages(policy: str = "auto") -> bool:
  """Per `policy` ("auto" or "never"), re-execute this program (same interpreter, same command
  line, ``sys.orig_argv``) with glibc malloc asking for transparent huge pages; returns whether
  they are active, without returning at all when it re-executes.

  "auto" re-executes only where `huge_pages_environment` says it changes something, and at most
  once (the restarted process finds the tunable set). Call it first thing in a program's main,
  before any work worth keeping: the process image is replaced.
  """
  if policy not in HUGE_PAGES_POLICIES:
    raise ValueError(f"unknown huge-page policy {policy!r}; expected one of "
                     f"{HUGE_PAGES_POLICIES}")
  if policy == "never":
    return huge_pages_active()
  environ = huge_pages_environment(os.environ)
  if environ is None or not sys.executable:  # nothing to gain, or no interpreter to restart
    return huge_pages_active()
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, environ)
  except OSError:  # the interpreter cannot be executed again (sandboxing): run as started
    return huge_pages_active()
