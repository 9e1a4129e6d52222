"""Several processes, one run: two processes on localhost (`--coordinator_address`), 2 CPU
devices each (CPU collectives through gloo), run experiments/mnist_svhn.py on tiny .npz sources
whose small images get MLP networks.

* 5 steps of two processes give the parameters of one process with 4 devices and of one with
  1 device on the same global batches (relative difference < 1e-5);
* a killed process ends the other with one line within seconds; running both again resumes
  from the last complete checkpoint;
* only process 0 writes files other than checkpoint shards (Python audit hooks record every
  file each process opens for writing).

Opt-in (--runslow): a SIGTERM to one process stops both at the same step after one checkpoint;
a check that fails on process 0 only fails on both; evaluate.py on two processes writes what one
process writes; a killed process 0 (the coordinator) ends the other within seconds.
"""
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import mmvae_jax
from mmvae_jax import multihost, runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "experiments", "mnist_svhn.py")
EVALUATE = os.path.join(REPO, "experiments", "evaluate.py")
PEER_TIMEOUT = 3
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
       multihost.PEER_TIMEOUT_ENV: str(PEER_TIMEOUT)}
# Runs a script with an audit hook that records every file it opens for writing (or renames,
# removes, creates a folder) under MMVAE_TEST_ROOT.
AUDITED = r"""
import os, runpy, sys
log = open(os.environ["MMVAE_TEST_WRITES"], "a", buffering=1)
root = os.path.abspath(os.environ["MMVAE_TEST_ROOT"]) + os.sep
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
  if event == "open":
    path, mode, flags = args
    if mode is not None:
      writing = any(c in mode for c in "wax+")
    else:
      writing = bool(flags & WRITE)
  elif event in ("os.rename", "os.replace"):
    path, writing = args[1], True
  elif event in ("os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
    path, writing = args[0], True
  else:
    return
  if writing and isinstance(path, (str, bytes, os.PathLike)):
    path = os.path.abspath(os.fsdecode(path))
    if path.startswith(root):
      log.write(path + "\n")
sys.addaudithook(hook)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _npz(path, shape, n=240):
  rng = np.random.default_rng(len(str(path)))
  lab = np.arange(n) % 3
  np.savez(path, x_train=rng.integers(0, 256, (n,) + shape, dtype=np.uint8), y_train=lab,
           x_test=rng.integers(0, 256, (n,) + shape, dtype=np.uint8), y_test=lab)
  return str(path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  return {"mnist": _npz(d / "a.npz", (8, 8, 1)), "svhn": _npz(d / "b.npz", (6, 6, 1))}


def _args(workdir, sources, *extra):
  return [f"--workdir={workdir}", f"--mnist={sources['mnist']}", f"--svhn={sources['svhn']}",
          "--k=2", "--batch_size=8", "--partners=1", "--latent_dim=3", "--eval_batches=1",
          "--eval_every=1000", "--nofigures", "--huge_pages=never", *extra]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(script, args, root, tag, n=2):
  """Starts `script` as processes 0..n-1 of one run; each records its writes under `root` in
  root/writes-<tag>-<i>.txt."""
  port = _free_port()
  procs = []
  for i in range(n):
    env = {**ENV, "MMVAE_TEST_ROOT": str(root), "MMVAE_TEST_WRITES": str(root / f"writes-{tag}-{i}.txt")}
    procs.append(subprocess.Popen(
        [sys.executable, "-c", AUDITED, script, *args, f"--coordinator_address=127.0.0.1:{port}",
         f"--num_processes={n}", f"--process_id={i}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
  return procs


def _finish(procs, timeout=180):
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


def _errors(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if ": error: " in l]


def _writes(root, tag, i) -> list[str]:
  path = root / f"writes-{tag}-{i}.txt"
  return path.read_text().split() if path.exists() else []


def _wait_for(path, procs, timeout=120):
  deadline = time.time() + timeout
  while not path.exists():
    assert time.time() < deadline, f"{path} did not appear"
    for p in procs:
      assert p.poll() is None, (p.returncode, p.communicate()[1][-3000:])
    time.sleep(0.05)


def _relative_difference(a, b) -> float:
  a = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
  b = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
  num = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b)))
  return float(num / np.sqrt(sum(np.sum(y ** 2) for y in b)))


def test_two_processes_train_as_one_survive_a_kill_and_resume(tmp_path, sources):
  workdir = tmp_path / "run"
  # Launch 1: a long run; process 1 is killed once checkpoint 2 is complete.
  procs = _launch(SCRIPT, _args(workdir, sources, "--max_steps=1000", "--checkpoint_every=2"),
                  tmp_path, "first")
  _wait_for(workdir / "checkpoints" / "2", procs)
  procs[1].kill()
  killed = time.monotonic()
  survivor = {}
  waiter = threading.Thread(target=lambda: survivor.update(
      result=_finish(procs, timeout=60)[0], elapsed=time.monotonic() - killed))
  waiter.start()
  # Meanwhile: one process with 4 devices, and one with 1 device, 5 steps on the same batches.
  config = dataclasses.replace(runs.config_from_info(runs.read_run_info(str(workdir))),
                               max_steps=5, checkpoint_every=0)
  ones = {}
  for name, devices in (("one_process_4_devices", None), ("one_process_1_device", jax.devices()[:1])):
    runs.train_run(config, str(tmp_path / name), devices=devices, progress=False)
    ones[name] = mmvae_jax.load_run(str(tmp_path / name))
    assert ones[name].step == 5
  waiter.join()
  code, _, err = survivor["result"]
  lines = _errors(err)
  assert code == 1 and len(lines) == 1, err[-3000:]
  assert "process 1 of 2 stopped responding" in lines[0] and "resume" in lines[0], lines
  assert "Traceback" not in err and survivor["elapsed"] < PEER_TIMEOUT + 15, survivor["elapsed"]
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert 2 <= steps[-1] < 5, steps

  # Launch 2: both again (now up to step 5): they resume from the newest complete checkpoint.
  results = _finish(_launch(SCRIPT, _args(workdir, sources, "--max_steps=5", "--checkpoint_every=2"),
                            tmp_path, "second"))
  for i, (code, _, err) in enumerate(results):
    assert code == 0, (i, err[-3000:])
  assert f"resumed from {workdir} at step {steps[-1]}" in results[0][2], results[0][2]
  assert results[1][2].strip() == "", results[1][2]  # process 0 reports for both

  # The parameters of one process with 4 devices, and with 1 device.
  two = mmvae_jax.load_run(str(workdir))
  assert two.step == 5
  for name, one in ones.items():
    diff = _relative_difference(two.params, one.params)
    assert diff < 1e-5, (name, diff)

  # One writer: process 1 opened nothing for writing outside the checkpoint shards.
  ckpt = str(workdir / "checkpoints") + os.sep
  for tag in ("first", "second"):
    assert not [p for p in _writes(tmp_path, tag, 1) if not p.startswith(ckpt)], tag
  written = {os.path.relpath(p, workdir) for p in _writes(tmp_path, "first", 0)}
  assert {"run.json", "metrics.jsonl", "launches.jsonl", ".lock"} <= written, written
  assert len((workdir / "launches.jsonl").read_text().splitlines()) == 2
  assert len(os.listdir(workdir / "tensorboard")) == 2  # one events file per launch


def test_detect_cluster_and_single_process(monkeypatch):
  for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
              "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
              "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert multihost.detect_cluster() is None
  assert multihost.initialize() is False  # nothing to join: nothing happens
  assert not jax.distributed.is_initialized() and not multihost.active()
  assert multihost.initialize(num_processes=1) is False
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  for k, v in slurm.items():
    monkeypatch.setenv(k, v)
  assert multihost.detect_cluster() == ("Slurm", 2)
  monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a batch script's own step: one process
  assert multihost.detect_cluster() is None
  for k in slurm:
    monkeypatch.delenv(k)
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1.0;tcp://10.0.0.1:1234")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
  assert multihost.detect_cluster() == ("Open MPI", 4)
  monkeypatch.delenv("OMPI_MCA_orte_hnp_uri")
  with pytest.raises(multihost.DistributedError, match="--num_processes and --process_id missing"):
    multihost.initialize("127.0.0.1:1")
  with pytest.raises(multihost.DistributedError, match=r"--process_id=2 is not in \[0, 2\)"):
    multihost.initialize("127.0.0.1:1", 2, 2)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(multihost.DistributedError, match="JAX_NUM_PROCESSES='two'"):
    multihost.initialize()
  assert multihost.agree("mine") == "mine" and multihost.agree(None) is None


# ---------------------------------------------------------------------------------------------
# Opt-in.


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_one_checkpoint(tmp_path, sources):
  workdir = tmp_path / "run"
  args = _args(workdir, sources, "--max_steps=1000", "--checkpoint_every=50", "--log_every=50")
  procs = _launch(SCRIPT, args, tmp_path, "first")
  _wait_for(workdir / "checkpoints" / "50", procs)
  procs[1].send_signal(signal.SIGTERM)
  results = _finish(procs, timeout=60)
  stopped = set()
  for code, _, err in results:
    lines = _errors(err)
    assert code == 128 + signal.SIGTERM and len(lines) == 1, err[-3000:]
    assert "stopped by SIGTERM at step" in lines[0] and "on every host" in lines[0], lines
    stopped.add(int(lines[0].split(" at step ")[1].split(";")[0]))
  assert len(stopped) == 1  # the same step on both
  step = stopped.pop()
  assert (workdir / "checkpoints" / str(step)).is_dir()
  results = _finish(_launch(SCRIPT, _args(workdir, sources, f"--max_steps={step + 2}",
                                          "--checkpoint_every=50", "--log_every=50"),
                            tmp_path, "second"))
  assert [r[0] for r in results] == [0, 0], results[0][2][-3000:]
  assert f"resumed from {workdir} at step {step}" in results[0][2]
  assert mmvae_jax.load_run(str(workdir)).step == step + 2


@pytest.mark.slow
def test_a_check_that_fails_on_process_0_fails_on_both(tmp_path, sources):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with runs.WorkdirLock(str(workdir)):
    results = _finish(_launch(SCRIPT, _args(workdir, sources, "--max_steps=2"), tmp_path, "x"))
  for i, (code, _, err) in enumerate(results):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (i, err[-3000:])
    assert f"is in use by process {os.getpid()}" in lines[0]
  assert "process 0 of 2: " in results[1][2]
  assert not (workdir / "run.json").exists()


@pytest.mark.slow
def test_evaluate_on_two_processes_writes_what_one_writes(tmp_path, sources):
  workdir = tmp_path / "run"
  results = _finish(_launch(SCRIPT, _args(workdir, sources, "--max_steps=2"), tmp_path, "train"))
  assert [r[0] for r in results] == [0, 0], results[0][2][-3000:]
  flags = [f"--workdir={workdir}", "--parts=probe", "--probe_num_train=16", "--num_test=16",
           "--batch_size=8"]
  one = subprocess.run([sys.executable, EVALUATE, *flags], capture_output=True, text=True,
                       env=ENV, timeout=180)
  assert one.returncode == 0, one.stderr[-3000:]
  expected = json.loads((workdir / "results.json").read_text())
  (workdir / "results.json").unlink()
  results = _finish(_launch(EVALUATE, flags, tmp_path, "evaluate"))
  assert [r[0] for r in results] == [0, 0], results[0][2][-3000:]
  assert "Table 1" in results[0][1] and "Table 1" in one.stdout
  assert results[1][1] == "" and results[1][2] == ""  # process 1 neither prints nor writes
  assert not _writes(tmp_path, "evaluate", 1)
  got = json.loads((workdir / "results.json").read_text())
  assert {k: v for k, v in got.items() if k != "seconds"} == {
      k: v for k, v in expected.items() if k != "seconds"}


@pytest.mark.slow
def test_killed_coordinator_ends_the_other_process(tmp_path, sources):
  """Process 0 hosts JAX's coordination service: JAX itself ends the others at once."""
  workdir = tmp_path / "run"
  procs = _launch(SCRIPT, _args(workdir, sources, "--max_steps=1000", "--checkpoint_every=1"),
                  tmp_path, "first")
  _wait_for(workdir / "checkpoints" / "2", procs)
  procs[0].kill()
  killed = time.monotonic()
  _, (code, _, err) = _finish(procs, timeout=60)
  assert code != 0 and time.monotonic() - killed < 20, err[-3000:]


def test_a_collective_that_lost_a_peer_waits_for_the_watchdog(monkeypatch):
  """Where a collective fails at once on a lost peer (gloo on newer JAX) instead of waiting,
  the error waits for the watchdog's verdict; any other error does not wait."""
  finished = threading.Event()
  watchdog = threading.Thread(target=lambda: finished.wait(30), daemon=True)
  watchdog.start()
  monkeypatch.setattr(multihost._state, "watchdog", watchdog)
  monkeypatch.setenv(multihost.PEER_TIMEOUT_ENV, "2")
  t0 = time.monotonic()
  multihost.await_watchdog(ValueError("a shape mismatch"))
  assert time.monotonic() - t0 < 0.5
  threading.Timer(0.5, finished.set).start()  # the watchdog ends (here: returns) after 0.5 s
  multihost.await_watchdog(RuntimeError("UNKNOWN: Gloo all-reduce failed: [pair.cc:547] "
                                        "Connection closed by peer [127.0.0.1]:8095"))
  assert 0.4 < time.monotonic() - t0 < 5 and not watchdog.is_alive()
