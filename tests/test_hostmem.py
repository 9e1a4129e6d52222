"""mmvae_jax.hostmem: freed host memory stays in the process for reuse."""
import subprocess
import sys

import pytest

# malloc + touch + free a 96 MB block on a worker thread (as XLA:CPU does with its per-step
# buffer) and report how much of it the process still holds afterwards (resident KiB).
_PROBE = """
import ctypes, sys, threading
from mmvae_jax import hostmem
applied = hostmem.apply_policy("auto", 256) if sys.argv[1] == "1" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def rss_kib():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
n = 96 << 20
def work():
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(p)
before = rss_kib()
t = threading.Thread(target=work); t.start(); t.join()
print(int(applied), rss_kib() - before)
"""


def _kept_kib(retain: bool) -> tuple[bool, int]:
  out = subprocess.run([sys.executable, "-c", _PROBE, "1" if retain else "0"], check=True,
                       capture_output=True, text=True).stdout.split()
  return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retain_freed_memory_keeps_a_large_block_freed_by_a_worker_thread():
  applied, kept = _kept_kib(retain=True)
  if not applied:
    pytest.skip("not glibc")
  _, kept_default = _kept_kib(retain=False)
  block_kib = 96 << 10
  assert kept_default < block_kib // 10  # glibc's default: unmapped on free
  assert kept > block_kib * 9 // 10, (kept, kept_default)  # kept for the next allocation


def test_apply_policy_auto_skips_large_steps_and_rejects_unknown_policies():
  from mmvae_jax import hostmem
  # Neither call touches this process's allocator.
  assert not hostmem.apply_policy("auto", hostmem.AUTO_MAX_LATENTS + 1)
  assert not hostmem.apply_policy("never", 1)
  with pytest.raises(ValueError, match="unknown host-memory policy"):
    hostmem.apply_policy("sometimes", 1)
