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


# Restart with huge pages (if "auto" decides so), then malloc + touch + free a 96 MB block on a
# worker thread and count the minor page faults that took: 4 KiB pages fault 24,576 times.
_HUGE_PAGE_PROBE = """
import ctypes, json, os, resource, sys, threading
from mmvae_jax import hostmem
active = hostmem.restart_with_huge_pages(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 96 << 20
def work():
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=work); t.start(); t.join()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"active": active, "faults": faults, "argv": sys.argv[1:],
                  "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""


def _huge_page_probe(policy: str, tunables: str | None = None) -> dict:
  import json
  import os
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", _HUGE_PAGE_PROBE, policy, "--keep=this"],
                       check=True, capture_output=True, text=True, env=env, timeout=60).stdout
  return json.loads(out)


def test_restart_with_huge_pages_faults_a_large_block_in_huge_pages():
  from mmvae_jax import hostmem
  if hostmem.huge_pages_environment({}) is None:
    pytest.skip("needs glibc >= 2.35 and the kernel's transparent huge pages in 'madvise' mode")
  block_pages = (96 << 20) // 4096
  default = _huge_page_probe("never")
  assert not default["active"] and default["faults"] > block_pages * 9 // 10, default
  restarted = _huge_page_probe("auto", tunables="glibc.malloc.check=0")
  assert restarted["active"], restarted
  assert restarted["argv"] == ["auto", "--keep=this"]  # same command line after the restart
  assert restarted["tunables"] == "glibc.malloc.check=0:" + hostmem.HUGE_PAGES_TUNABLE
  # 2 MiB pages: ~50 faults (the bound leaves room for 4 KiB fallbacks under fragmentation)
  assert restarted["faults"] < block_pages // 2, restarted


def test_huge_pages_environment_only_where_a_restart_changes_something(monkeypatch):
  from mmvae_jax import hostmem
  tunable = hostmem.HUGE_PAGES_TUNABLE
  env = hostmem.huge_pages_environment({"A": "1"}, thp_mode="madvise", glibc=(2, 36))
  assert env == {"A": "1", "GLIBC_TUNABLES": tunable}
  env = hostmem.huge_pages_environment({"GLIBC_TUNABLES": "x=1"}, "madvise", (2, 35))
  assert env == {"GLIBC_TUNABLES": "x=1:" + tunable}
  assert hostmem.huge_pages_environment({"GLIBC_TUNABLES": "x=1:" + tunable}, "madvise",
                                        (2, 36)) is None  # already restarted: no loop
  for mode, glibc in (("always", (2, 36)), ("never", (2, 36)),
                      ("madvise", (2, 34))):
    assert hostmem.huge_pages_environment({}, mode, glibc) is None, (mode, glibc)
  monkeypatch.setattr(hostmem, "_glibc_version", lambda: None)  # musl, macOS
  assert hostmem.huge_pages_environment({}, "madvise") is None
  with pytest.raises(ValueError, match="unknown huge-page policy"):
    hostmem.restart_with_huge_pages("always")


def test_transparent_huge_page_mode_reads_the_bracketed_word(tmp_path):
  from mmvae_jax import hostmem
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hostmem.transparent_huge_page_mode(str(path)) == "madvise"
  assert hostmem.transparent_huge_page_mode(str(tmp_path / "missing")) is None
