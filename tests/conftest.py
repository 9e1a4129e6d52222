"""Test configuration: 4 fake CPU devices for the data-parallel tests, opt-in slow tests."""
import os

# Must happen before jax initialises its backends (first jax import below this point).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared with the scripts the tests start:
# the many short runs of the same tiny models compile once (a run: 11 s -> 5 s on 2 cores).
import shutil
import tempfile

_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="mmvae_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib

import pytest

import mmvae_jax  # noqa: F401,E402  (before any distrax import: keeps TensorFlow out of tfp)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _XLA_CACHE:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip_slow = pytest.mark.skip(reason="slow test: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_data():
  """Folder of the real data arrays (mnist.npz, usps.npz, usps_colour.npz, ...) beside the
  repository; skips when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data arrays not found at {SHARED_DATA} (a plain checkout has none)")
  return SHARED_DATA
