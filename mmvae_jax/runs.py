"""Runs on disk: run.json (one schema for every experiment), training a run, loading one back.

A run's workdir holds ``run.json``, ``checkpoints/``, ``metrics.jsonl`` and whatever its
experiment writes (figures, CUB's vocabulary, evaluation results). ``run.json``::

    {"schema": 2, "experiment": "three_digits", "model": "mvae",
     "config": {... every RunConfig field ...},
     "data": {... the experiment's data description: sources, shapes, sizes ...},
     "modalities": {name: {"shape": [...], "llik_scale": λ}}, "devices": [...]}

    import mmvae_jax
    run = mmvae_jax.load_run("runs/three_digits")      # latest checkpoint
    run.model, run.params, run.config, run.data_spec
    data = run.data()                                   # train / test sets, built on demand
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable

from mmvae_jax.config import SCHEMA, RunConfig
from mmvae_jax.errors import first_line as _first_line

log = logging.getLogger("mmvae_jax")
RUN_FILE = "run.json"


class RunError(ValueError):
  """A run that cannot be read, built or restored (one-line message)."""



# ---------------------------------------------------------------------------------------------
# run.json


def run_info(config: RunConfig, model, data) -> dict:
  """The contents of run.json for a run of `model` on `data` with `config`."""
  import jax
  return {"schema": SCHEMA, "experiment": config.experiment, "model": config.model,
          "config": config.to_dict(), "data": data.description,
          "modalities": {m.name: {"shape": list(m.data_shape), "llik_scale": m.llik_scale}
                         for m in model.modalities},
          "devices": [str(d) for d in jax.devices()]}


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (a temporary file, then a rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _json_default(o):
  import math
  import numpy as np
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return None if not math.isfinite(float(o)) else float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def read_run_info(workdir: str) -> dict:
  """run.json of `workdir` (RunError when missing, unreadable or of another schema)."""
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.isfile(path):
    raise RunError(f"{path} not found: train a run there first (experiments/mnist_svhn.py, "
                   f"three_digits.py or cub.py with --workdir={workdir})")
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise RunError(f"cannot read {path} ({_first_line(e)})") from None
  if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
    raise RunError(f"{path} is not a run.json of mmvae_jax")
  if info.get("schema") != SCHEMA:
    raise RunError(f"{path} has run.json schema {info.get('schema', 1)}; this version of "
                   f"mmvae_jax reads schema {SCHEMA} (re-train, or load it with the version that "
                   f"wrote it)")
  return info


def config_from_info(info: dict, path: str = RUN_FILE) -> RunConfig:
  try:
    return RunConfig.from_dict(info["config"])
  except (TypeError, ValueError) as e:
    raise RunError(f"{path}: {_first_line(e)}") from None


# ---------------------------------------------------------------------------------------------
# Loading a run.


@dataclasses.dataclass
class Run:
  """A trained run: its model, parameters and configuration.

  Attributes:
    workdir: the run's folder.
    experiment: its `mmvae_jax.experiments.Experiment`.
    config: its `RunConfig`.
    model: the model (any registered model; the protocol of `mmvae_jax.models.MultimodalVAE`).
    params: the restored parameters (with whatever the experiment adds for evaluation, e.g.
      population BatchNorm statistics, once `eval_params` has been called).
    step: the restored checkpoint step.
    position: the data position of that checkpoint, {"epoch", "step_in_epoch"}.
    data_spec: run.json's data description (sources, shapes, sizes).
    info: the whole of run.json.
  """
  workdir: str
  experiment: Any
  config: RunConfig
  model: Any
  params: Any
  step: int
  position: dict
  data_spec: dict
  info: dict
  _data: Any = None

  def data(self):
    """The run's train / test sets (`mmvae_jax.experiments.Data`), built once on demand."""
    if self._data is None:
      try:
        self._data = self.experiment.build_data(self.config, workdir=self.workdir, resume=True)
      except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        raise RunError(f"cannot rebuild the data of {self.workdir} ({_first_line(e)})") from None
    return self._data

  def eval_params(self):
    """Parameters as evaluation needs them (the experiment's `prepare_params`)."""
    return self.experiment.prepare_params(self.model, self.params, self.data(), self.config)


def build_model(info: dict, config: RunConfig, experiment, workdir: str = ""):
  """The model a run.json describes (without data: shapes and sizes come from run.json)."""
  from mmvae_jax.experiments.base import Data
  spec = Data(train=None, test=None, description=dict(info.get("data") or {}))
  try:
    return experiment.build_model(config, spec)
  except (ValueError, KeyError, TypeError) as e:
    raise RunError(f"{os.path.join(workdir, RUN_FILE)}: cannot build model {config.model!r} "
                   f"({_first_line(e)})") from None


def load_run(workdir: str, step: int = -1) -> Run:
  """The model, parameters, config and data spec of checkpoint `step` (-1: latest) of a run.

  Works for runs of every experiment script. Raises `RunError` (one line) when the run or the
  checkpoint cannot be read or does not fit the model run.json describes.
  """
  from mmvae_jax import experiments, train
  workdir = os.fspath(workdir)
  info = read_run_info(workdir)
  path = os.path.join(workdir, RUN_FILE)
  config = config_from_info(info, path)
  try:
    experiment = experiments.get(config.experiment)
  except ValueError as e:
    raise RunError(f"{path}: {e}") from None
  model = build_model(info, config, experiment, workdir)
  try:
    params, chosen, position = train.restore_params(model, config.train_config(), workdir, step)
  except train.CheckpointError as e:
    raise RunError(str(e)) from None
  return Run(workdir=workdir, experiment=experiment, config=config, model=model, params=params,
             step=chosen, position=position, data_spec=dict(info.get("data") or {}), info=info)


# ---------------------------------------------------------------------------------------------
# Training a run: one writer per workdir, the config as the workdir's identity.

LOCK_FILE = ".lock"
LAUNCHES_FILE = "launches.jsonl"
# RunConfig fields that may change between launches of one run (how long, how often, where the
# data lie, how it is computed); every other field defines the run.
MUTABLE_FIELDS = ("epochs", "max_steps", "eval_every", "eval_batches", "eval_batch_size",
                  "checkpoint_every", "log_every", "keep_checkpoints", "figures", "decoder_impl",
                  "data_dir")
MUTABLE_OPTIONS = ("bn_batches", "report_num", "num_examples")


class WorkdirLock:
  """An exclusive lock on a workdir (``flock`` on ``<workdir>/.lock``), released when the
  process exits, however it exits: a lock of a dead process is never stale."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    import fcntl
    import socket
    import time
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise RunError(f"{os.path.dirname(self.path) or '.'} is in use by {holder}: wait for it "
                     f"to finish or give another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (f"process {os.getpid()} on {socket.gethostname()} since "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing releases the flock
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False


def config_changes(old: RunConfig, new: RunConfig) -> dict:
  """{field: [old, new]} of the fields that define a run and differ."""
  a, b = old.to_dict(), new.to_dict()
  out = {}
  for name in a:
    if name in MUTABLE_FIELDS:
      continue
    if name == "options":
      keys = sorted((set(a[name]) | set(b[name])) - set(MUTABLE_OPTIONS))
      for k in keys:
        if a[name].get(k) != b[name].get(k):
          out[f"{k}"] = [a[name].get(k), b[name].get(k)]
    elif a[name] != b[name]:
      out[name] = [a[name], b[name]]
  return out


def _describe(changes: dict) -> str:
  return ", ".join(f"--{k}: {v[0]!r} -> {v[1]!r}" for k, v in changes.items())


def _check_identity(config: RunConfig, workdir: str, override: bool) -> dict:
  """Compares `config` with the workdir's run.json (if any); returns the changes accepted.

  Raises RunError when the run would change and `override` is False, or run.json is unreadable.
  """
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return {}
  try:
    old = config_from_info(read_run_info(workdir), path)
  except RunError as e:
    raise RunError(f"{e}; it records the run trained in {workdir}: give another --workdir") from None
  changes = config_changes(old, config)
  if changes and not override:
    raise RunError(f"{workdir} holds a run trained with other values ({_describe(changes)}): "
                   f"resume it with its own values, give another --workdir, or pass "
                   f"--override_config to continue it with these")
  return changes


def _append_launch(workdir: str, config: RunConfig, changes: dict) -> None:
  import time
  row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(),
         "changes": changes, "config": config.to_dict()}
  with open(os.path.join(workdir, LAUNCHES_FILE), "a") as f:
    f.write(json.dumps(row, default=str) + "\n")


def train_run(config: RunConfig, workdir: str, *, devices=None, progress: bool | None = None,
              override_config: bool = False, before_data: Callable[[], None] | None = None
              ) -> dict:
  """Builds the data and model of `config`, checks them, writes run.json and trains (resuming
  from the workdir's latest readable checkpoint). Returns the final metrics (and the
  experiment's report).

  Nothing is written before every check has passed. `before_data` (the scripts' download of
  missing tfds datasets) runs after the checks of the configuration, before the data are read;
  of several processes, every process calls it. The workdir is locked for the whole call
  (a second launch fails at once); a workdir that already holds a run resumes it only with the
  same run-defining values (`config_changes`) unless `override_config`, which appends the
  change to ``launches.jsonl`` and rewrites run.json.

  One process of several (`mmvae_jax.multihost`; joined here when the environment describes
  such a run and no JAX computation has started yet): every process checks its data, process
  0 alone locks the workdir and writes, every process trains its share; a check that fails on
  any process fails on all of them with the same message.

  Raises:
    RunError: bad data, configuration or workdir (one-line message).
    mmvae_jax.train.NonFiniteLossError: training met a non-finite loss.
    mmvae_jax.train.Interrupted: SIGINT / SIGTERM (the step in flight is checkpointed).
  """
  import jax
  from mmvae_jax import multihost, parallel, train
  try:
    parallel.initialize_distributed()
  except multihost.DistributedError as e:
    raise RunError(str(e)) from None
  several = multihost.is_multiprocess()

  def agreed(error: str | None) -> None:
    error = multihost.agree(error) if several else error
    if error:
      raise RunError(error)

  try:
    experiment, data, model = _prepare(config, workdir, devices, before_data)
  except RunError as e:
    if not several:
      raise
    agreed(str(e))
  agreed(None)
  lock = None
  try:
    if multihost.is_primary():
      try:
        lock = _claim(config, workdir, override_config, experiment, data, model)
      except RunError as e:
        if not several:
          raise
        agreed(str(e))
    agreed(None)
    if several:  # every host must see the workdir process 0 writes (checkpoints included)
      agreed(None if os.path.isfile(os.path.join(workdir, RUN_FILE)) else
             f"--workdir={workdir} is not shared by every host (process {jax.process_index()} "
             f"does not see the run.json process 0 wrote): give a folder on a filesystem all "
             f"hosts mount (NFS, Filestore, a gcsfuse bucket)")
    hosts = f" of {jax.process_count()} processes" if several else ""
    train_set = data.extras.get("training_set", data.train)
    log.info("%s %s on %s: %d train / %d test pairs; %d device(s)%s", config.model,
             list(model.names), config.experiment, len(train_set), len(data.test),
             jax.device_count(), hosts)
    try:
      final = train.train_and_evaluate(model, config.train_config(), workdir, train_set,
                                       data.test, devices=devices, progress=progress)
    except train.CheckpointError as e:
      raise RunError(str(e)) from None
    after = getattr(experiment, "after_training", None)
    if after is not None:
      final = after(model, config, data, workdir, final)
    return final
  finally:
    if lock is not None:
      lock.release()


def _prepare(config: RunConfig, workdir: str, devices,
             before_data: Callable[[], None] | None = None):
  """(experiment, data, model) of `config`, every check before anything is written."""
  import jax
  from mmvae_jax import experiments
  try:
    experiment = experiments.get(config.experiment)
    config.validate()
    config.train_config().validate(jax.device_count() if devices is None else len(devices))
  except ValueError as e:
    raise RunError(str(e)) from None
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise RunError(f"--workdir={workdir} is a file, not a folder: give a folder")
  if before_data is not None:
    before_data()
  try:
    data = experiment.build_data(config, workdir=workdir)
    data.extras["training_set"] = experiment.training_set(config, data)
    model = experiment.build_model(config, data)
    model.resolve_objective(config.objective)
  except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
    raise RunError(_first_line(e)) from None
  return experiment, data, model


def _claim(config: RunConfig, workdir: str, override_config: bool, experiment, data, model
           ) -> WorkdirLock:
  """Locks the workdir, checks its identity and writes run.json, the experiment's files and
  the launch record (the writer's part of `train_run`). Returns the held lock."""
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = WorkdirLock(workdir).acquire()
  except OSError as e:
    raise RunError(f"cannot write to --workdir={workdir} ({e.strerror or _first_line(e)}): give "
                   f"a writable folder") from None
  try:
    try:
      changes = _check_identity(config, workdir, override_config)
    except RunError:
      if created:
        lock.release()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)
      raise
    info_path = os.path.join(workdir, RUN_FILE)
    if changes or not os.path.exists(info_path):
      write_json(info_path, run_info(config, model, data))
    experiment.write_files(data, workdir)
    _append_launch(workdir, config, changes)
  except BaseException:
    lock.release()
    raise
  return lock
