"""What a shared cluster does to a run: bad input, a second launch, a changed flag, a corrupt
checkpoint, SIGTERM / SIGINT; each fails in one line or recovers (experiments/mnist_svhn.py on
tiny .npz sources whose small images get MLP networks, so that every run compiles quickly)."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import mmvae_jax
from mmvae_jax import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "mnist_svhn.py")
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _npz(path, shape=(8, 8, 1), n=24, labels=None, test_shape=None, n_train=None):
  rng = np.random.default_rng(len(str(path)))
  lab = np.arange(n) % 3 if labels is None else np.asarray(labels)
  n_tr = n if n_train is None else n_train
  np.savez(path, x_train=rng.integers(0, 256, (n_tr,) + shape, dtype=np.uint8),
           y_train=lab[:n_tr], x_test=rng.integers(0, 256, (n,) + (test_shape or shape), dtype=np.uint8),
           y_test=lab)
  return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  return {"mnist": _npz(d / "a.npz", n=240), "svhn": _npz(d / "b.npz", shape=(6, 6, 1), n=240)}


def _args(workdir, sources, *extra):
  return [f"--workdir={workdir}", f"--mnist={sources['mnist']}", f"--svhn={sources['svhn']}",
          "--k=2", "--batch_size=4", "--partners=1", "--latent_dim=3", "--eval_batches=1",
          "--nofigures", "--huge_pages=never", *extra]


def _run(args, timeout=180):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        env=ENV, timeout=timeout)


def _params(workdir):
  return jax.tree.leaves(mmvae_jax.load_run(str(workdir)).params)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sources):
  """A finished 4-step run (checkpoints at 2 and 4)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  proc = _run(_args(workdir, sources, "--max_steps=4", "--checkpoint_every=2"))
  assert proc.returncode == 0, proc.stderr
  return workdir


def test_bad_input_table(tmp_path, sources, trained):
  """Every row fails with exit 2 and one line naming the cause; nothing is left behind."""
  d = tmp_path
  a_file = d / "a_file"
  a_file.write_text("x")
  corrupt = d / "corrupt"
  corrupt.mkdir()
  (corrupt / "run.json").write_text("{not json")
  bad = {"no class in common": _npz(d / "c.npz", labels=np.arange(24) % 3 + 3),
         "labels 42": _npz(d / "l.npz", labels=np.where(np.arange(24) == 5, 42, np.arange(24) % 3)),
         "labels -1": _npz(d / "m.npz", labels=np.where(np.arange(24) == 5, -1, np.arange(24) % 3)),
         "shapes": _npz(d / "s.npz", shape=(8, 8, 1), test_shape=(9, 9, 1)),
         "empty": _npz(d / "e.npz", n_train=0)}
  rows = [  # (what, workdir, extra flags, expected words)
      ("no class in common", d / "w1", [f"--svhn={bad['no class in common']}"], "share no class"),
      ("labels 42", d / "w2", [f"--svhn={bad['labels 42']}"], "outside the digits"),
      ("labels -1", d / "w3", [f"--svhn={bad['labels -1']}"], "outside the digits"),
      ("train/test shapes", d / "w4", [f"--svhn={bad['shapes']}"], "differ in shape"),
      ("empty train split", d / "w5", [f"--svhn={bad['empty']}"], "is empty"),
      ("path that is no file", d / "w6", ["--svhn=/nonexistent/svhn"], "no such"),
      ("--log_every=0", d / "w7", ["--log_every=0"], "--log_every must be >= 1"),
      ("corrupt run.json", corrupt, [], "cannot read"),
      ("workdir is a file", a_file, [], "is a file"),
      ("workdir under a file", a_file / "sub", [], "cannot write to --workdir"),
      ("changed --k", trained, ["--k=5"], "--k: 2 -> 5"),
      ("changed --latent_dim", trained, ["--latent_dim=10"], "--latent_dim: 3 -> 10"),
  ]
  before = (trained / "run.json").read_text()

  def one(row):
    what, workdir, extra, needle = row
    return row, _run(_args(workdir, sources, "--max_steps=2", *extra))

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(one, rows))
  for (what, workdir, extra, needle), proc in results:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (what, proc.stderr[-2000:])
    assert len(lines) == 1 and needle in lines[0], (what, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    if workdir.name.startswith("w"):
      assert not workdir.exists(), what  # nothing written
  assert (trained / "run.json").read_text() == before  # the record of the run is kept


def test_second_launch_fails_at_once(tmp_path, sources):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with runs.WorkdirLock(str(workdir)):
    proc = _run(_args(workdir, sources, "--max_steps=2"))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert f"is in use by process {os.getpid()}" in lines[0]
  assert not (workdir / "run.json").exists()


def test_override_config_records_the_launch(tmp_path, sources):
  workdir = tmp_path / "run"
  assert _run(_args(workdir, sources, "--max_steps=2", "--checkpoint_every=2")).returncode == 0
  proc = _run(_args(workdir, sources, "--max_steps=4", "--lr=0.01", "--override_config"))
  assert proc.returncode == 0, proc.stderr
  launches = [json.loads(l) for l in open(workdir / "launches.jsonl")]
  assert [l["changes"] for l in launches] == [{}, {"lr": [0.001, 0.01]}]
  assert json.load(open(workdir / "run.json"))["config"]["lr"] == 0.01


SIGNAL_RUN = ["--max_steps=300", "--checkpoint_every=50", "--log_every=50"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sources):
  """An uninterrupted run of 300 steps."""
  ref = tmp_path_factory.mktemp("ref") / "run"
  proc = _run(_args(ref, sources, *SIGNAL_RUN))
  assert proc.returncode == 0, proc.stderr
  return ref


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_then_resume_is_exact(sig, tmp_path, sources, reference):
  flags = SIGNAL_RUN
  ref = reference
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, SCRIPT, *_args(workdir, sources, *flags)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
  deadline = time.time() + 120
  while not (workdir / "checkpoints" / "50").exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  lines = [l for l in err.strip().splitlines() if "error:" in l]
  assert proc.returncode == 128 + sig, err
  assert len(lines) == 1 and f"stopped by {sig.name} at step" in lines[0], err
  assert "Traceback" not in err
  stopped = int(lines[0].split(" at step ")[1].split(";")[0])
  assert (workdir / "checkpoints" / str(stopped)).exists()
  assert stopped < 300
  if stopped < 300:  # resume and finish: the same parameters as the uninterrupted run
    assert _run(_args(workdir, sources, *flags)).returncode == 0
  for a, b in zip(_params(ref), _params(workdir)):
    np.testing.assert_array_equal(a, b)


def test_truncated_newest_checkpoint_falls_back_with_one_warning(tmp_path, sources):
  workdir = tmp_path / "run"
  assert _run(_args(workdir, sources, "--max_steps=4", "--checkpoint_every=2")).returncode == 0
  for root, _, files in os.walk(workdir / "checkpoints" / "4"):
    for f in files:
      open(os.path.join(root, f), "w").close()  # truncated to nothing
  run = mmvae_jax.load_run(str(workdir))
  assert run.step == 2
  proc = _run(_args(workdir, sources, "--max_steps=6", "--checkpoint_every=2"))
  assert proc.returncode == 0, proc.stderr
  warnings = [l for l in proc.stderr.splitlines() if "unreadable" in l]
  assert len(warnings) == 1 and "step 4" in warnings[0], proc.stderr
  assert mmvae_jax.load_run(str(workdir)).step == 6


def test_quiet_terminal(tmp_path, sources):
  proc = _run(_args(tmp_path / "run", sources, "--max_steps=30", "--checkpoint_every=5",
                    "--log_every=10"))
  assert proc.returncode == 0, proc.stderr
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  assert len(lines) <= 30, "\n".join(lines)
  assert any("step 10/30 loss" in l and "ETA" in l for l in lines), "\n".join(lines)
