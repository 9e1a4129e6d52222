"""experiments/make_usps_colour.py on a tiny synthetic usps-like file (a few seconds)."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "make_usps_colour.py"
KEYS = ("x_train", "y_train", "x_test", "y_test")


def _digits(rng, n):
  """(n, 16, 16) float32 in [-1, 1], background -1, a random bar per image."""
  x = np.full((n, 16, 16), -1.0, np.float32)
  for i in range(n):
    r0, c0 = rng.integers(1, 8, size=2)
    x[i, r0:r0 + 8, c0:c0 + 3] = 1.0
    x[i, r0:r0 + 2, c0:c0 + 7] = 0.5
  return x


@pytest.fixture
def usps(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / "usps.npz"
  np.savez(path, x_train=_digits(rng, 20), y_train=np.arange(20, dtype=np.float64) % 10,
           x_test=_digits(rng, 10), y_test=(np.arange(10) * 3) % 10)
  return path


def _run(*args):
  return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                        text=True, timeout=60, check=False)


def test_shapes_dtypes_labels_and_determinism(usps, tmp_path):
  outs = {name: tmp_path / f"{name}.npz" for name in ("a", "b", "c")}
  for name, seed in (("a", 0), ("b", 0), ("c", 1)):
    res = _run(f"--usps={usps}", f"--out={outs[name]}", f"--seed={seed}")
    assert res.returncode == 0, res.stderr
  src = np.load(usps)
  with np.load(outs["a"]) as a, np.load(outs["b"]) as b, np.load(outs["c"]) as c:
    assert sorted(a.files) == sorted(KEYS)
    for split, n in (("train", 20), ("test", 10)):
      x, y = a[f"x_{split}"], a[f"y_{split}"]
      assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
      assert y.shape == (n,) and y.dtype == np.int64
      np.testing.assert_array_equal(y, src[f"y_{split}"].astype(np.int64))
      assert x.std() > 10  # coloured digits, not a constant image
      np.testing.assert_array_equal(x, b[f"x_{split}"])  # same seed: identical
      assert not np.array_equal(x, c[f"x_{split}"])  # another seed: different
  assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz", "c.npz", "usps.npz"]  # no temp files


def test_missing_input_is_a_one_line_error(tmp_path):
  out = tmp_path / "out.npz"
  res = _run(f"--usps={tmp_path / 'absent.npz'}", f"--out={out}")
  assert res.returncode == 2
  assert res.stderr.splitlines() == [
      f"make_usps_colour.py: error: --usps: no such file: {tmp_path / 'absent.npz'}"]
  assert not out.exists()


def test_wrong_keys_is_a_one_line_error_and_keeps_an_existing_output(tmp_path):
  bad = tmp_path / "bad.npz"
  np.savez(bad, x_train=np.zeros((2, 16, 16), np.float32), y_train=np.zeros(2))
  out = tmp_path / "out.npz"
  out.write_bytes(b"previous")
  res = _run(f"--usps={bad}", f"--out={out}")
  assert res.returncode == 2
  lines = res.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("make_usps_colour.py: error: ")
  assert "missing key(s) x_test, y_test" in lines[0]
  assert out.read_bytes() == b"previous"
  assert sorted(os.listdir(tmp_path)) == ["bad.npz", "out.npz"]
