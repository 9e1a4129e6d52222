"""Training: a jit-compiled, data-parallel step and the loop around it.

* `train_step(state, batch, rng)` is a pure function. It runs under `jax.jit` with the batch
  sharded over the "data" mesh axis and the state replicated (`mmvae_jax.parallel`); XLA
  averages the gradients across devices. Random numbers are drawn from one key per step for the
  whole global batch (partitionable threefry), so every device draws a distinct stream for its
  own examples and the result does not depend on the number of devices.
* The loss is the official one: −Σ_b objective_b over the (unmasked) examples of the batch.
* A non-finite loss or gradient is never applied: the step keeps the previous parameters and
  records the first bad step; the loop stops with a message naming it and never checkpoints a
  non-finite state.
* Checkpoints (orbax) hold params, optimiser state, step, epoch, position in the epoch and the
  RNG key; the data order is a function of (seed, epoch) and the step key of (seed, step), so a
  resumed run continues the same run bit for bit.
* Several processes (`mmvae_jax.multihost`): one mesh over every device of every process, each
  process reading its share of every batch; process 0 alone writes metrics, events and
  figures; checkpoints are orbax's multi-host save (every process restores); a signal to any
  process stops all of them at the same step, after one checkpoint.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmvae_jax import parallel
from mmvae_jax.errors import first_line as _first_line
from mmvae_jax.models.base import DEFAULT_ESTIMATOR, MultimodalVAE
from mmvae_jax.optim import torch_amsgrad

log = logging.getLogger("mmvae_jax")


@dataclasses.dataclass
class TrainConfig:
  """What the training loop reads; model and data choices live in `mmvae_jax.config.RunConfig`."""
  k: int = 30                     # importance samples per expert (or proposal)
  estimator: str = DEFAULT_ESTIMATOR  # dreg | legacy | iwae | dreg_moe (see mmvae_jax.loss)
  objective: str = "auto"         # a name of the model's `objectives`; auto: its default
  looser: bool = True             # eq. (3), the stratified bound
  batch_size: int = 128           # global batch
  epochs: int = 30
  max_steps: int = 0              # stop after this many steps in total (0: no limit)
  lr: float = 1e-3
  seed: int = 1
  eval_every: int = 0             # steps between test evaluations (0: at each epoch end)
  eval_batches: int = 0           # test batches per evaluation (0: the whole test set)
  eval_batch_size: int = 0        # 0: same as batch_size
  checkpoint_every: int = 1000    # steps between checkpoints (and at each epoch end)
  log_every: int = 10
  keep_checkpoints: int = 3
  figures: bool = True            # generation / reconstruction PNGs at each epoch end

  def validate(self, num_devices: int) -> None:
    """Raises ValueError with a one-line message for the first impossible value."""
    from mmvae_jax.loss import ESTIMATORS
    if self.k < 1:
      raise ValueError(f"--k must be >= 1, got {self.k}")
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"--estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
    if self.estimator == "dreg_moe" and not self.looser:
      raise ValueError("--estimator=dreg_moe is derived for the stratified bound: drop "
                       "--nolooser, or choose --estimator=iwae (docs/estimators.md)")
    if self.batch_size < 1 or self.batch_size % num_devices:
      raise ValueError(f"--batch_size={self.batch_size} must be a positive multiple of the "
                       f"{num_devices} {_devices_text()}")
    eval_bs = self.eval_batch_size or self.batch_size
    if eval_bs % num_devices:
      raise ValueError(f"--eval_batch_size={eval_bs} must be a multiple of the {num_devices} devices")
    if self.epochs < 1:
      raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
    for name in ("log_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
    for name in ("max_steps", "eval_every", "eval_batches", "eval_batch_size", "checkpoint_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
    if not self.lr > 0:
      raise ValueError(f"--lr must be > 0, got {self.lr}")


def _devices_text() -> str:
  from mmvae_jax import multihost
  if multihost.active():
    return f"devices of the {multihost.process_count()} processes"
  return "local device(s)"


@chex.dataclass
class TrainState:
  """Everything a step changes. `bad_step` is -1 until a non-finite step is met."""
  params: Any
  opt_state: Any
  step: jax.Array
  bad_step: jax.Array


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  return torch_amsgrad(config.lr)


def init_state(model: MultimodalVAE, optimizer: optax.GradientTransformation, key: jax.Array
               ) -> TrainState:
  params = model.init(key)
  return TrainState(params=params, opt_state=optimizer.init(params),
                    step=jnp.zeros([], jnp.int32), bad_step=-jnp.ones([], jnp.int32))


def abstract_state(model: MultimodalVAE, optimizer: optax.GradientTransformation, sharding
                   ) -> TrainState:
  """The shapes and dtypes of `init_state` placed with `sharding` (jax.ShapeDtypeStruct leaves),
  without computing it: the template a checkpoint is restored into."""
  shapes = jax.eval_shape(lambda key: init_state(model, optimizer, key), jax.random.key(0))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


_all_finite_jit = jax.jit(_all_finite)  # one program instead of two per leaf


def make_train_step(model: MultimodalVAE, optimizer: optax.GradientTransformation, config: TrainConfig
                    ) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
  """Returns the pure training step ``(state, batch, rng) -> (state, metrics)``.

  batch: {"x": tuple of M arrays (B, *data_shape), "mask": (B,) 1 for real examples}, with
  incomplete data "present": (B, M) bool (modality m of example b observed; the model gets
  its (M, B) transpose: one compiled step serves every mask), and with several processes
  "stop": (devices,) int32, each process's pending signal number (0: none).
  metrics: loss (the official −Σ objective / #examples), objective (the bound itself, mean over
  examples), num_examples, finite (and "stop": the largest of batch["stop"]).
  """

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    mask = batch["mask"].astype(jnp.float32)
    # Incomplete data: the batch's (B, M) mask, passed only when there is one (complete data
    # keep the unmasked computation).
    extra = {} if batch.get("present") is None else {"present": jnp.transpose(batch["present"])}

    def loss_fn(params):
      obj = model.objective(params, batch["x"], rng, config.k, looser=config.looser,
                            estimator=config.estimator, kind=config.objective, **extra)
      return -jnp.sum(obj * mask), obj

    (loss, obj), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    apply = finite & (state.bad_step < 0)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    new_state = TrainState(
        params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
        step=state.step + 1,
        bad_step=jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step))
    metrics = {"loss": loss / n, "objective": jnp.sum(obj * mask) / n, "num_examples": n,
               "finite": finite}
    if "stop" in batch:  # several processes: the largest signal number any of them received
      metrics["stop"] = jnp.max(batch["stop"])
    return new_state, metrics

  return train_step


def make_eval_step(model: MultimodalVAE, num_samples: int) -> Callable[[Any, dict, jax.Array], dict]:
  """The model's test bound (`test_objective`) summed over the unmasked examples."""

  def eval_step(params, batch, rng):
    mask = batch["mask"].astype(jnp.float32)
    obj = model.test_objective(params, batch["x"], rng, num_samples)
    return {"objective_sum": jnp.sum(obj * mask), "count": jnp.sum(mask)}

  return eval_step


def jit_train_step(train_step, mesh):
  """Compiles the step with the state replicated and the batch sharded on `mesh`."""
  rep, shard = parallel.replicated_sharding(mesh), parallel.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(rep, shard, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


@functools.lru_cache(maxsize=8)
def _seed_key(seed: int) -> jax.Array:
  return jax.random.key(seed)


_fold_in = jax.jit(jax.random.fold_in)


def step_key(seed: int, step: int) -> jax.Array:
  """The PRNG key of global step `step`: a pure function of (seed, step) for exact resumes.

  ``fold_in(key(seed), step)``, with the seed's key cached and the fold compiled: one dispatch
  (≈0.01 ms) instead of two eager ops (≈0.85 ms, about 1% of a K = 1 step on the 2-core CPU).
  """
  return _fold_in(_seed_key(seed), step)


# ---------------------------------------------------------------------------------------------
# Logging.


class MetricWriter:
  """Writes every metric to `metrics.jsonl` and to TensorBoard event files in `workdir`."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
    except ImportError:  # pragma: no cover - tensorboardX is a declared dependency
      self._tb = None

  def write(self, step: int, metrics: dict, **context) -> None:
    row = {"step": int(step), **context, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class _NoWriter:
  """The metric writer of processes other than process 0."""

  def write(self, step: int, metrics: dict, **context) -> None:
    del step, metrics, context

  def close(self) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Checkpoints.


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the model (one-line message)."""



class Checkpointer:
  """Orbax checkpoints of the train state plus the data position, one per saved step."""

  def __init__(self, workdir: str, keep: int = 3, *, local: bool = False):
    """`local`: this process alone reads (with several processes, none waits for the others);
    otherwise every process of the run takes part in every save and restore."""
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._shared = not local and jax.process_count() > 1
    if local and jax.process_count() > 1:
      me = jax.process_index()
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=False, multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=me, active_processes={me}))
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    """Saved steps, oldest first (only committed checkpoints: a save cut short is not one)."""
    return sorted(self._mngr.all_steps())

  def restore_newest_readable(self, template: TrainState, extra_template: dict
                              ) -> tuple[TrainState, dict, int] | None:
    """The newest checkpoint that can be read, trying older ones after one warning line per
    unreadable one; None when there is no checkpoint.

    Raises:
      CheckpointError: there are checkpoints but none can be read into `template`.
    """
    from mmvae_jax import multihost
    steps = self.all_steps()
    first = None
    for step in reversed(steps):
      error = None
      try:
        state, extra = self.restore(template, extra_template, step=step)
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
        error = _first_line(e)
      if self._shared:  # every process resumes from the same step
        error = multihost.agree(error)
      if error is None:
        return state, extra, step
      first = first or error
      log.warning("checkpoint step %d in %s is unreadable (%s); trying the previous one",
                  step, self.directory, error)
    if steps:
      raise CheckpointError(f"cannot restore step {steps[-1]} of {self.directory} into this "
                            f"model ({first}), nor any older checkpoint: evaluate it with the "
                            f"model that wrote it, or remove that folder to start afresh")
    return None

  def save(self, state: TrainState, extra: dict) -> None:
    if int(jax.device_get(state.bad_step)) >= 0 or not bool(jax.device_get(_all_finite_jit(state.params))):
      raise FloatingPointError("refusing to checkpoint a non-finite state")
    tree = {"state": state, "extra": {k: np.asarray(v) for k, v in extra.items()}}
    self._mngr.save(int(jax.device_get(state.step)), args=self._ocp.args.StandardSave(tree))
    self._mngr.wait_until_finished()

  def restore(self, template: TrainState, extra_template: dict, step: int | None = None
              ) -> tuple[TrainState, dict]:
    step = self._mngr.latest_step() if step is None else step
    tree = {"state": template, "extra": {k: np.asarray(v) for k, v in extra_template.items()}}
    abstract = jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
                            jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                            if not isinstance(x, jax.Array) else
                            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    out = self._mngr.restore(step, args=self._ocp.args.StandardRestore(abstract))
    return out["state"], {k: int(v) for k, v in out["extra"].items()}

  def close(self) -> None:
    self._mngr.close()


# ---------------------------------------------------------------------------------------------
# The loop.


def restore_params(model: MultimodalVAE, config: dict | TrainConfig, workdir: str, step: int = -1
                   ) -> tuple[Any, int, dict]:
  """Parameters of checkpoint `step` (-1: the latest) of a training workdir.

  Args:
    model: the model the run trained (its ``init`` gives the parameter template).
    config: the run's `TrainConfig`, or a dict of its fields (e.g. run.json's "config"; other
      keys are ignored).
    workdir: the training workdir (checkpoints under ``workdir/checkpoints``).
    step: checkpoint step; -1 for the latest.
  Returns:
    (params, step, extra), extra the data position ``{"epoch", "step_in_epoch"}``.
  Raises:
    CheckpointError: no checkpoint, no such step, or a checkpoint of another model.
  """
  if isinstance(config, dict):
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in config.items() if k in fields})
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = (sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
           if os.path.isdir(ckpt_dir) else [])
  if not steps:
    raise CheckpointError(f"no checkpoint in {ckpt_dir}")
  chosen = steps[-1] if step < 0 else step
  if chosen not in steps:
    raise CheckpointError(f"no checkpoint step {chosen} in {ckpt_dir} (steps: {steps})")
  template = abstract_state(model, make_optimizer(config),
                            jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  ckpt = Checkpointer(workdir, local=True)
  try:
    if step < 0:
      found = ckpt.restore_newest_readable(template, {"epoch": 0, "step_in_epoch": 0})
      state, extra, chosen = found
    else:
      state, extra = ckpt.restore(template, {"epoch": 0, "step_in_epoch": 0}, step=chosen)
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f"cannot restore step {chosen} of {ckpt_dir} into this model ({_first_line(e)})") from None
  finally:
    ckpt.close()
  return state.params, int(chosen), extra


class NonFiniteLossError(FloatingPointError):
  """A training step produced a non-finite loss or gradient."""


def _raise_if_bad(state: TrainState, checkpointer: Checkpointer) -> None:
  bad = int(jax.device_get(state.bad_step))
  if bad >= 0:
    raise NonFiniteLossError(
        f"non-finite loss or gradient at step {bad}: training stopped; the latest checkpoint "
        f"(step {checkpointer.latest_step()}) holds the last good state")


def evaluate(eval_step, params, dataset, mesh, *, batch_size: int, seed: int, max_batches: int = 0
             ) -> dict:
  """Mean tight MoE-IWAE over the test pairs (all of them unless `max_batches`)."""
  from mmvae_jax import data as data_lib
  total, count = 0.0, 0.0
  it = data_lib.batches(dataset, batch_size, mesh, seed=seed, epoch=0, shuffle=False)
  with it:
    for i, batch in enumerate(it):
      if max_batches and i >= max_batches:
        break
      out = eval_step(params, batch, jax.random.fold_in(jax.random.key(seed), i))
      total += float(out["objective_sum"])
      count += float(out["count"])
  return {"test_objective": total / max(count, 1.0), "test_examples": count}


def save_figures(model: MultimodalVAE, params, test_set, workdir: str, tag: str, seed: int) -> list[str]:
  """PNGs: 64 prior samples in every modality side by side; reconstructions and
  cross-generations of the first 8 test pairs (rows: data, then recon[e][d])."""
  from mmvae_jax import visualize
  if jax.process_count() > 1:  # process 0 draws alone, on its own devices
    params = jax.device_get(params)
  key = jax.random.key(seed)
  samples = jax.jit(model.generate, static_argnums=2)(params, key, 64)
  xs, _ = test_set.gather(np.arange(min(8, len(test_set))))
  recon = jax.jit(model.reconstruct)(params, tuple(jnp.asarray(x) for x in xs), key)
  paths = [os.path.join(workdir, f"generation_{tag}.png"), os.path.join(workdir, f"reconstruction_{tag}.png")]
  visualize.save_png(paths[0], visualize.generation_figure([np.asarray(s) for s in samples]))
  visualize.save_png(paths[1], visualize.reconstruction_figure(
      xs, [[np.asarray(r) for r in row] for row in recon]))
  return paths


class Interrupted(KeyboardInterrupt):
  """Training stopped by SIGINT or SIGTERM after checkpointing the step in flight."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    where = " on every host" if jax.process_count() > 1 else ""
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; the checkpoint of "
                     f"step {step} is saved: run the same command{where} to resume")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


class _StopSignals:
  """Within the block, SIGINT and SIGTERM only raise a flag (the loop checkpoints and stops);
  a second signal exits at once (the previous checkpoint stays intact: orbax commits a
  checkpoint by renaming its finished folder). Outside the main thread it does nothing."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      from mmvae_jax import multihost
      if multihost.active():
        multihost.exit_process(128 + signum, f"second {signal.Signals(signum).name}: exiting now",
                               wait_for_others=False)
      print(f"second {signal.Signals(signum).name}: exiting now", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    return False


class _StopFlags:
  """Several processes: every step carries each process's pending signal number into the step
  (a (devices,) int32 batch entry, sharded as the batch) and returns their maximum, so that a
  signal to any process reaches all of them at the same step. The loop reads a step's flag one
  step later, so that it never waits for the step in flight."""

  def __init__(self, mesh):
    self._sharding = parallel.batch_sharding(mesh)
    self._size = mesh.devices.size
    self._local = len(self._sharding.addressable_devices)
    self._arrays = {}
    self._pending = None

  def attach(self, batch: dict, signum: int | None) -> dict:
    value = int(signum or 0)
    if value not in self._arrays:
      self._arrays[value] = jax.make_array_from_process_local_data(
          self._sharding, np.full((self._local,), value, np.int32), (self._size,))
    return {**batch, "stop": self._arrays[value]}

  def after_step(self, metrics: dict) -> int:
    """The signal number (0: none) of the previous step; keeps this step's for the next call."""
    previous, self._pending = self._pending, metrics["stop"]
    return 0 if previous is None else int(jax.device_get(previous))

  def last(self) -> int:
    """The signal number of the last step (waits for it)."""
    previous, self._pending = self._pending, None
    return 0 if previous is None else int(jax.device_get(previous))


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, sec = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def train_and_evaluate(model: MultimodalVAE, config: TrainConfig, workdir: str, train_set, test_set, *,
                       devices=None, progress: bool | None = None, figures: bool | None = None
                       ) -> dict:
  """Trains `model` on the paired `train_set`, resuming from `workdir` when it has a checkpoint.

  Progress: a bar on a terminal (`progress`, default: whether stderr is one), else one log line
  every `log_every` steps or 30 s, whichever comes first. SIGINT / SIGTERM finish the step in
  flight, checkpoint it and raise `Interrupted`. Returns the last logged metrics (train and,
  if evaluated, test).

  One process of several (joined here by `mmvae_jax.parallel.initialize_distributed` when the
  environment describes such a run): every process calls this with the same arguments; each
  reads its share of every batch, process 0 alone logs and writes, a signal to any process
  stops all of them at the same step.
  """
  from mmvae_jax import data as data_lib

  parallel.initialize_distributed()
  mesh = parallel.data_mesh(devices)
  config.validate(mesh.devices.size)
  model.resolve_objective(config.objective)  # ValueError naming the model's objectives
  primary = jax.process_index() == 0
  info = log.info if primary else (lambda *args: None)
  if figures is None:
    figures = config.figures
  if primary:
    os.makedirs(workdir, exist_ok=True)
  optimizer = make_optimizer(config)
  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
  flags = _StopFlags(mesh) if jax.process_count() > 1 else None
  steps_per_epoch = data_lib.num_batches(len(train_set), config.batch_size)
  total_steps = config.epochs * steps_per_epoch
  if config.max_steps:
    total_steps = min(total_steps, config.max_steps)
  found = None
  if checkpointer.all_steps():  # restored into the state's shapes: no initialisation computed
    try:
      found = checkpointer.restore_newest_readable(
          abstract_state(model, optimizer, parallel.replicated_sharding(mesh)),
          {"epoch": 0, "step_in_epoch": 0})
    except CheckpointError:
      checkpointer.close()
      raise
  last_saved = None
  if found is not None:
    state, _, last_saved = found
    info("resumed from %s at step %d", workdir, last_saved)
  else:
    state = parallel.replicate(init_state(model, optimizer, jax.random.key(config.seed)), mesh)
  step = int(jax.device_get(state.step))
  start_step = step

  train_step = jit_train_step(make_train_step(model, optimizer, config), mesh)
  eval_step = jax.jit(make_eval_step(model, config.k))
  eval_bs = config.eval_batch_size or config.batch_size
  writer = MetricWriter(workdir) if primary else _NoWriter()
  if progress is None:
    progress = sys.stderr.isatty()
  progress = progress and primary
  from tqdm import tqdm
  bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
  last = {}
  run_start = last_line = time.perf_counter()

  def save():
    nonlocal last_saved
    _raise_if_bad(state, checkpointer)
    if last_saved != step:
      epoch, pos = divmod(step, steps_per_epoch)
      checkpointer.save(state, {"epoch": epoch, "step_in_epoch": pos})
      last_saved = step

  def run_eval(epoch):
    _raise_if_bad(state, checkpointer)
    out = evaluate(eval_step, state.params, test_set, mesh, batch_size=eval_bs, seed=config.seed,
                   max_batches=config.eval_batches)
    writer.write(step, out, epoch=epoch)
    info("step %d epoch %d test objective %.3f", step, epoch, out["test_objective"])
    return out

  def progress_line():
    elapsed = time.perf_counter() - run_start
    eta = elapsed / max(step - start_step, 1) * (total_steps - step)
    info("step %d/%d loss %.3f %.0f ex/s ETA %s", step, total_steps, last.get("loss", np.nan),
             last.get("examples_per_sec", 0.0), _duration(eta))

  window, window_start = [], time.perf_counter()
  stop = _StopSignals()
  try:
    with stop:
      while step < total_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        it = data_lib.batches(train_set, config.batch_size, mesh, seed=config.seed, epoch=epoch,
                              start_step=pos)
        with it:
          for batch in it:
            if flags is not None:
              batch = flags.attach(batch, stop.signum)
            state, metrics = train_step(state, batch, step_key(config.seed, step))
            step += 1
            window.append(metrics)
            bar.update(1)
            at_log_step = step % config.log_every == 0 or step == total_steps
            due = (time.perf_counter() - last_line) >= 30.0 and not progress and primary
            if at_log_step or due:
              if at_log_step or flags is None:  # processes stop at the same step, never by time
                _raise_if_bad(state, checkpointer)
              fetched = jax.device_get(window)
              elapsed = time.perf_counter() - window_start
              n = sum(float(m["num_examples"]) for m in fetched)
              last = {"loss": float(np.mean([m["loss"] for m in fetched])),
                      "objective": float(np.mean([m["objective"] for m in fetched])),
                      "examples_per_sec": n / max(elapsed, 1e-9)}
              writer.write(step, last, epoch=epoch)
              bar.set_postfix(loss=f"{last['loss']:.2f}", ex_s=f"{last['examples_per_sec']:.0f}")
              if not progress:
                progress_line()
                last_line = time.perf_counter()
              window, window_start = [], time.perf_counter()
            if config.checkpoint_every and step % config.checkpoint_every == 0:
              save()
            if config.eval_every and step % config.eval_every == 0:
              last.update(run_eval(epoch))
            signum = stop.signum if flags is None else flags.after_step(metrics)
            if signum:
              save()
              raise Interrupted(signum, step)
            if step >= total_steps:
              break
        if step % steps_per_epoch == 0 or step >= total_steps:  # epoch end (or the run's end)
          if not config.eval_every:
            last.update(run_eval(epoch))
          save()
          if figures and primary:
            save_figures(model, state.params, test_set, workdir, f"epoch{epoch:03d}", config.seed)
        signum = stop.signum if flags is None else flags.last()
        if signum:
          save()
          raise Interrupted(signum, step)
        window_start = time.perf_counter()
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  return last
