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


def define_retain_host_memory_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """``--retain_host_memory``: see `mmvae_jax.hostmem`."""
  flags.DEFINE_enum(
      "retain_host_memory", "auto", ["auto", "always", "never"],
      "Keep freed host memory for reuse (glibc malloc settings), so that XLA:CPU's per-step "
      "buffer is not page-faulted in again every step. auto: only for small steps (at most "
      "512 decoded latents, M*K*B), where it is faster at no memory cost; never: glibc's "
      "defaults.", flag_values=flag_values)


def apply_retain_host_memory_flag(latents_per_step: int,
                                  flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """Applies ``--retain_host_memory`` (`hostmem.apply_policy`) for a step decoding
  `latents_per_step` latents; call before JAX creates its threads (no ``jax.devices()`` yet)."""
  from mmvae_jax import hostmem
  return hostmem.apply_policy(flag_values.retain_host_memory, latents_per_step)
