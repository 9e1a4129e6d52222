"""Command-line plumbing shared by the experiment scripts: one-line errors and flag parsing.

Every script fails the same way on bad input: ``<script>: error: <cause>`` on stderr and exit
code 2 (1 for a failure while running), never a traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import flags


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
  """Print ``prog: error: message`` to stderr and exit with `code`."""
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(code)


def flags_parser(prog: str, flag_values: flags.FlagValues = flags.FLAGS
                 ) -> Callable[[list[str]], list[str]]:
  """An ``app.run(flags_parser=...)`` that fails with one line on an unknown or bad flag."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flag_values(argv)
    except flags.Error as e:
      fail(prog, str(e))

  return parse


def define_host_memory_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``--retain_host_memory`` and ``--huge_pages``: see `mmvae_jax.hostmem`."""
  flags.DEFINE_enum(
      "retain_host_memory", "auto", ["auto", "always", "never"],
      "Keep freed host memory for reuse (glibc malloc settings), so that XLA:CPU's per-step "
      "buffer is not page-faulted in again every step. auto: only for small steps (at most "
      "512 decoded latents, M*K*B), where it is faster at no memory cost; never: glibc's "
      "defaults.", flag_values=flag_values)
  flags.DEFINE_enum(
      "huge_pages", "auto", ["auto", "never"],
      "Restart once with glibc malloc asking for transparent huge pages (GLIBC_TUNABLES="
      "glibc.malloc.hugetlb=1), so that large host buffers are faulted in 2 MiB at a time. "
      "auto: where the kernel's THP mode is 'madvise' and glibc >= 2.35; never: as started.",
      flag_values=flag_values)


def apply_host_memory_flags(latents_per_step: int,
                            flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Applies ``--huge_pages`` (`hostmem.restart_with_huge_pages`: may re-execute the program)
  and ``--retain_host_memory`` (`hostmem.apply_policy`) for a step decoding `latents_per_step`
  latents. Call first thing in main, before JAX creates its threads (no ``jax.devices()`` yet)."""
  from mmvae_jax import hostmem
  hostmem.restart_with_huge_pages(flag_values.huge_pages)
  hostmem.apply_policy(flag_values.retain_host_memory, latents_per_step)
