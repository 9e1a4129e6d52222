"""Training: loss goes down, 4 devices == 1 device, exact resume, NaN guard, flag validation.

Uses a tiny two-modality MMVAE with MLP networks on random data so that each compile is fast.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmvae_jax import data, parallel, train
from tiny_models import tiny_dataset, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _config(**kw):
  base = dict(k=2, batch_size=8, epochs=1, eval_batches=1, checkpoint_every=0, log_every=1,
              seed=3)
  base.update(kw)
  return train.TrainConfig(**base)


@pytest.mark.parametrize("estimator", ["legacy", "dreg", "iwae"])
def test_few_steps_reduce_loss(estimator):
  model = tiny_model()
  config = _config(estimator=estimator, lr=1e-2)
  mesh = parallel.data_mesh(jax.devices()[:1])
  opt = train.make_optimizer(config)
  state = parallel.replicate(train.init_state(model, opt, jax.random.key(0)), mesh)
  step = train.jit_train_step(train.make_train_step(model, opt, config), mesh)
  ds = tiny_dataset()
  xs, _ = ds.gather(np.arange(8))
  batch = parallel.shard_batch({"x": tuple(xs), "mask": np.ones(8, np.float32)}, mesh)
  key = jax.random.key(1)  # fixed noise: the objective then decreases monotonically-ish
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch, key)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses


def _one_step_params(devices, estimator="dreg"):
  model = tiny_model()
  config = _config(estimator=estimator)
  mesh = parallel.data_mesh(devices)
  opt = train.make_optimizer(config)
  state = parallel.replicate(train.init_state(model, opt, jax.random.key(0)), mesh)
  step = train.jit_train_step(train.make_train_step(model, opt, config), mesh)
  ds = tiny_dataset()
  xs, _ = ds.gather(np.arange(8))
  batch = parallel.shard_batch({"x": tuple(xs), "mask": np.ones(8, np.float32)}, mesh)
  for i in range(2):
    state, _ = step(state, batch, train.step_key(5, i))
  return jax.device_get(state.params)


@pytest.mark.parametrize("estimator", ["dreg", "iwae"])
def test_four_devices_equal_one_device(estimator):
  assert jax.device_count() >= 4, "conftest forces 4 CPU devices"
  one = _one_step_params(jax.devices()[:1], estimator)
  four = _one_step_params(jax.devices()[:4], estimator)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _run(workdir, **kw):
  model = tiny_model()
  ds = tiny_dataset()
  return train.train_and_evaluate(model, _config(**kw), str(workdir), ds, ds,
                                  devices=jax.devices()[:2], progress=False, figures=False)


def _params_of(workdir):
  ck = train.Checkpointer(str(workdir))
  model = tiny_model()
  config = _config()
  mesh = parallel.data_mesh(jax.devices()[:2])
  opt = train.make_optimizer(config)
  template = parallel.replicate(train.init_state(model, opt, jax.random.key(0)), mesh)
  state, extra = ck.restore(template, {"epoch": 0, "step_in_epoch": 0})
  ck.close()
  return jax.device_get(state), extra


def test_kill_and_resume_is_exact(tmp_path):
  # ≈80 label-matched pairs (40 instances · 2 partners) in batches of 8: ≈10 steps per epoch.
  total = 2 * data.num_batches(len(tiny_dataset()), _config().batch_size)
  assert total >= 16, total
  _run(tmp_path / "full", epochs=2)
  _run(tmp_path / "split", epochs=2, max_steps=13, checkpoint_every=13)  # "killed" at step 13
  _run(tmp_path / "split", epochs=2)  # same command again: resumes
  full, extra_full = _params_of(tmp_path / "full")
  split, extra_split = _params_of(tmp_path / "split")
  assert int(full.step) == int(split.step) == total
  assert extra_full == extra_split == {"epoch": 2, "step_in_epoch": 0}
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(split.params)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(full.opt_state), jax.tree.leaves(split.opt_state)):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert any("test_objective" in r for r in rows)
  # The library's restore for evaluation: latest step by default, one-line errors otherwise.
  params, step, extra = train.restore_params(tiny_model(), _config(), str(tmp_path / "full"))
  assert step == total and extra == extra_full
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full.params)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(train.CheckpointError, match=r"no checkpoint step 7 in .* \(steps: \["):
    train.restore_params(tiny_model(), _config(), str(tmp_path / "full"), step=7)
  with pytest.raises(train.CheckpointError, match="no checkpoint in"):
    train.restore_params(tiny_model(), {"k": 2, "unknown": 1}, str(tmp_path / "empty"))
  with pytest.raises(train.CheckpointError, match="cannot restore step"):
    train.restore_params(tiny_model(latent_dim=4), _config(), str(tmp_path / "full"))
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
  model = tiny_model()
  ds = tiny_dataset()
  # Poison modality 0 of every pair from the 2nd epoch on by making its images NaN after a
  # first clean epoch: train one epoch, then poison the source and continue.
  config = _config(epochs=1, checkpoint_every=5)
  train.train_and_evaluate(model, config, str(tmp_path), ds, ds, devices=jax.devices()[:2],
                           progress=False, figures=False)
  ds.sources[0].images[...] = np.nan
  first_bad = data.num_batches(len(ds), config.batch_size)  # first step of epoch 2
  with pytest.raises(train.NonFiniteLossError,
                     match=rf"non-finite loss or gradient at step {first_bad}\b"):
    train.train_and_evaluate(model, _config(epochs=2, checkpoint_every=5), str(tmp_path), ds, ds,
                             devices=jax.devices()[:2], progress=False, figures=False)
  state, extra = _params_of(tmp_path)
  assert int(state.step) == first_bad and extra == {"epoch": 1, "step_in_epoch": 0}
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize("args,needle", [
    (["--k=0"], "--k must be >= 1"),
    (["--estimator=foo"], "estimator"),
    (["--batch_size=6"], "must be a positive multiple of the 4"),
    (["--no_such_flag=1"], "no_such_flag"),
    (["--mnist=/nonexistent/x.npz", "--svhn=/nonexistent/y.npz"], "no such .npz file"),
])
def test_flag_validation_one_line(args, needle, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "mnist_svhn.py"),
                         f"--workdir={tmp_path}"] + args, capture_output=True, text=True,
                        env=env, timeout=120)
  assert proc.returncode != 0
  err_lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(err_lines) == 1, proc.stderr
  assert needle in err_lines[0], proc.stderr


def test_step_key_is_fold_in_of_the_seed_key():
  for seed, step in [(0, 0), (5, 7), (1, 123456), (2**40, 3)]:
    want = jax.random.fold_in(jax.random.key(seed), step)
    np.testing.assert_array_equal(jax.random.key_data(train.step_key(seed, step)),
                                  jax.random.key_data(want))
