"""MVAE (product of experts), single-modality VAE, M = 3 modalities and missing modalities.

Tiny MLP / linear networks on random data, so that every compile is fast.
"""
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmvae_jax import parallel, train
from mmvae_jax import distributions as dists
from mmvae_jax.model import MMVAE, Modality
from mmvae_jax.mvae import MVAE, log_variance_scale, product_of_experts, single_vae
import tiny_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((4, 4, 1), (4, 4, 3), (3, 3, 1))
NAMES = ("m0", "m1", "m2")


def tiny_modalities(latent_dim=3, shapes=SHAPES):
  return tiny_models.tiny_modalities(latent_dim, shapes)


def tiny_dataset(n=40, seed=0, partners=2, shapes=SHAPES):
  return tiny_models.tiny_dataset(n, seed, partners, shapes)


def _config(**kw):
  base = dict(k=2, batch_size=8, epochs=1, eval_batches=1, checkpoint_every=0, log_every=1,
              seed=3, lr=1e-2)
  base.update(kw)
  return train.TrainConfig(**base)


def _train_losses(model, config, steps=15):
  """Losses of `steps` jitted train steps on one fixed batch with fixed noise."""
  mesh = parallel.data_mesh(jax.devices()[:1])
  opt = train.make_optimizer(config)
  state = parallel.replicate(train.init_state(model, opt, jax.random.key(0)), mesh)
  step = train.jit_train_step(train.make_train_step(model, opt, config), mesh)
  ds = tiny_dataset(shapes=tuple(m.data_shape for m in model.modalities))
  xs, _ = ds.gather(np.arange(8))
  batch = parallel.shard_batch({"x": tuple(xs), "mask": np.ones(8, np.float32)}, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  return np.asarray(losses)


# ---------------------------------------------------------------------------------------------
# Product of experts.


def _np_poe(locs, scales):
  locs, scales = np.asarray(locs, np.float64), np.asarray(scales, np.float64)
  prec = 1.0 / np.square(scales)
  total = prec.sum(0)
  return (prec * locs).sum(0) / total, 1.0 / np.sqrt(total)


@pytest.mark.parametrize("num_experts", [1, 2, 3, 4])
def test_product_of_experts_matches_numpy_float64(num_experts):
  rng = np.random.default_rng(num_experts)
  locs = rng.normal(0, 2, size=(num_experts, 5, 3))
  scales = np.exp(rng.normal(0, 1, size=(num_experts, 5, 3)))
  # With the prior expert N(0, 1) stacked in front, as the MVAE posterior does.
  locs_p = np.concatenate([np.zeros((1, 5, 3)), locs])
  scales_p = np.concatenate([np.ones((1, 5, 3)), scales])
  for lo, sc in ((locs, scales), (locs_p, scales_p)):
    loc, scale = product_of_experts(jnp.asarray(lo, jnp.float32), jnp.asarray(sc, jnp.float32))
    ref_loc, ref_scale = _np_poe(lo, sc)
    np.testing.assert_allclose(loc, ref_loc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-5)
  # Closed form by hand for the prior and one expert.
  if num_experts == 1:
    var = scales[0]**2
    np.testing.assert_allclose(loc, locs[0] / (1.0 + var), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale, np.sqrt(var / (1.0 + var)), rtol=1e-5)


def test_product_of_experts_mask_drops_experts():
  rng = np.random.default_rng(0)
  locs, scales = rng.normal(size=(3, 4, 2)), np.exp(rng.normal(size=(3, 4, 2)))
  mask = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0]], np.float32)
  loc, scale = product_of_experts(locs, scales, mask)
  for b in range(4):
    keep = mask[:, b] > 0
    ref_loc, ref_scale = _np_poe(locs[keep, b], scales[keep, b])
    np.testing.assert_allclose(loc[b], ref_loc, rtol=1e-5)
    np.testing.assert_allclose(scale[b], ref_scale, rtol=1e-5)


def test_product_of_experts_bad_shapes_one_line():
  with pytest.raises(ValueError, match=r"same shape \(E, \.\.\., D\)"):
    product_of_experts(jnp.zeros((2, 3)), jnp.ones((3, 3)))


def test_prior_times_huge_variance_expert_is_prior():
  locs = jnp.asarray([[[0.0, 0.0, 0.0]], [[3.0, -5.0, 100.0]]])
  scales = jnp.asarray([[[1.0, 1.0, 1.0]], [[1e4, 1e5, 1e6]]])
  loc, scale = product_of_experts(locs, scales)
  np.testing.assert_allclose(loc, 0.0, atol=1e-6)
  np.testing.assert_allclose(scale, 1.0, rtol=1e-6)
  # Through the MVAE's log-variance head: v = 40 means σ² = e^40.
  sigma = log_variance_scale(jnp.full((1, 3), 40.0))
  loc, scale = product_of_experts(jnp.stack([jnp.zeros((1, 3)), jnp.full((1, 3), 7.0)]),
                                  jnp.stack([jnp.ones((1, 3)), sigma]))
  np.testing.assert_allclose(loc, 0.0, atol=1e-6)
  np.testing.assert_allclose(scale, 1.0, rtol=1e-6)


def test_mvae_posterior_is_poe_with_prior_for_every_subset():
  model = MVAE(tiny_modalities(), latent_dim=3)
  params = model.init(jax.random.key(0))
  xs, _ = tiny_dataset().gather(np.arange(6))
  subsets = (("m1",), ("m0", "m2"), NAMES)

  @jax.jit
  def run(params, xs):
    experts = {n: model.encode_one(params, n, x) for n, x in zip(NAMES, xs)}
    posts = [model.posterior(params, {n: xs[NAMES.index(n)] for n in reversed(s)})
             for s in subsets]
    return ({n: (q.loc, q.scale) for n, q in experts.items()},
            [(q.loc, q.scale) for q in posts])

  experts, posts = run(params, xs)
  for subset, (loc, scale) in zip(subsets, posts):
    locs = [np.zeros((6, 3))] + [np.asarray(experts[n][0], np.float64) for n in subset]
    scales = [np.ones((6, 3))] + [np.asarray(experts[n][1], np.float64) for n in subset]
    ref_loc, ref_scale = _np_poe(np.stack(locs), np.stack(scales))
    np.testing.assert_allclose(loc, ref_loc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-5)
  with pytest.raises(ValueError, match="observe at least one modality"):
    model.posterior(params, {})
  with pytest.raises(KeyError, match="unknown modality 'nope'"):
    model.posterior(params, {"nope": xs[0]})


# ---------------------------------------------------------------------------------------------
# Missing modalities.


def test_mmvae_mixture_sample_with_one_observed_is_that_expert():
  model = MMVAE(tiny_modalities(), latent_dim=3)
  params = model.init(jax.random.key(0))
  xs, _ = tiny_dataset().gather(np.arange(4))
  q = model.encode_one(params, "m1", xs[1])  # Laplace(loc, b): mean loc, std √2·b
  k = 40000
  z = np.asarray(model.mixture_sample(params, {"m1": xs[1]}, jax.random.key(5), k))
  assert z.shape == (k, 4, 3)
  std = np.sqrt(2.0) * np.asarray(q.scale)
  np.testing.assert_allclose(z.mean(0), q.loc, atol=float(5 * std.max() / np.sqrt(k)))
  np.testing.assert_allclose(z.std(0), std, rtol=0.03)
  # Two observed experts: the equal mixture (mean = mean of the two means).
  q2 = model.encode_one(params, "m2", xs[2])
  z2 = np.asarray(model.mixture_sample(params, {"m1": xs[1], "m2": xs[2]}, jax.random.key(6), k))
  mix_std = np.sqrt(0.5 * (std**2 + 2 * np.asarray(q2.scale)**2)
                    + 0.25 * (np.asarray(q.loc) - np.asarray(q2.loc))**2)
  np.testing.assert_allclose(z2.mean(0), 0.5 * (np.asarray(q.loc) + np.asarray(q2.loc)),
                             atol=float(5 * mix_std.max() / np.sqrt(k)))
  # Cross-generation from the one observed modality decodes into every modality.
  gen = model.cross_generate(params, {"m2": xs[2]}, jax.random.key(1), 2)
  assert {n: g.shape for n, g in gen.items()} == {
      n: (2, 4) + s for n, s in zip(NAMES, SHAPES)}


def test_mvae_mixture_sample_is_the_poe_of_the_subset():
  model = MVAE(tiny_modalities(), latent_dim=3)
  params = model.init(jax.random.key(0))
  xs, _ = tiny_dataset().gather(np.arange(4))
  observed = {"m0": xs[0], "m2": xs[2]}
  q = model.posterior(params, observed)
  k = 40000
  z = np.asarray(model.mixture_sample(params, observed, jax.random.key(3), k))
  assert z.shape == (k, 4, 3)
  np.testing.assert_allclose(z.mean(0), q.loc, atol=float(5 * np.max(q.scale) / np.sqrt(k)))
  np.testing.assert_allclose(z.std(0), q.scale, rtol=0.03)
  gen = model.cross_generate(params, {"m1": xs[1]}, jax.random.key(1), 1)
  assert {n: g.shape for n, g in gen.items()} == {n: (1, 4) + s for n, s in zip(NAMES, SHAPES)}
  recon = model.reconstruct(params, xs, jax.random.key(2))
  assert [[r.shape for r in row] for row in recon] == [[(4,) + s for s in SHAPES]] * 3


# ---------------------------------------------------------------------------------------------
# MVAE objective against NumPy on a linear-Gaussian toy problem.


class LinearEncoder(nn.Module):
  latent_dim: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.latent_dim, name="loc")(x), nn.Dense(self.latent_dim, name="pre")(x)


class LinearDecoder(nn.Module):
  size: int

  @nn.compact
  def __call__(self, z):
    return nn.Dense(self.size, name="out")(z)


LIN_SIZES, LIN_LAMBDAS, LIN_SCALE = (4, 3, 5), (2.0, 1.0, 0.5), 0.7


def _linear_mvae(latent_dim=2):
  ll = functools.partial(dists.normal_log_likelihood, scale=LIN_SCALE, event_ndim=1)
  mods = tuple(Modality(name=f"m{i}", encoder=LinearEncoder(latent_dim),
                        decoder=LinearDecoder(n), data_shape=(n,), llik_scale=lam,
                        log_likelihood=ll)
               for i, (n, lam) in enumerate(zip(LIN_SIZES, LIN_LAMBDAS)))
  return MVAE(mods, latent_dim=latent_dim)


def _np_normal_ll(x, mean):
  return np.sum(-0.5 * np.log(2 * np.pi * LIN_SCALE**2) - 0.5 * ((x - mean) / LIN_SCALE)**2, -1)


def test_mvae_subsampled_elbo_matches_numpy():
  model = _linear_mvae()
  params = jax.device_get(model.init(jax.random.key(0)))
  rng = np.random.default_rng(0)
  b, d, m = 6, 2, 3
  xs = [rng.normal(size=(b, n)).astype(np.float32) for n in LIN_SIZES]
  key = jax.random.key(11)
  value, joint, alias = np.asarray(jax.jit(lambda p, x, k: jnp.stack([
      model.objective(p, x, k, 1, kind="subsampled_elbo"),
      model.objective(p, x, k, 1, kind="joint_elbo"),
      model.objective(p, x, k, 7, kind="moe_elbo", estimator="dreg")]))(params, xs, key))
  assert value.shape == (b,)

  f64 = lambda a: np.asarray(a, np.float64)
  enc = [params["encoders"][f"m{i}"] for i in range(m)]
  dec = [params["decoders"][f"m{i}"] for i in range(m)]
  locs = [f64(x) @ f64(e["loc"]["kernel"]) + f64(e["loc"]["bias"]) for x, e in zip(xs, enc)]
  pres = [f64(x) @ f64(e["pre"]["kernel"]) + f64(e["pre"]["bias"]) for x, e in zip(xs, enc)]
  variances = [np.exp(p) + 1e-8 for p in pres]  # Wu & Goodman's log-variance head

  def poe(idx):
    prec = 1.0 + sum(1.0 / variances[i] for i in idx)
    return sum(locs[i] / variances[i] for i in idx) / prec, 1.0 / np.sqrt(prec)

  def term(idx, noise):
    mu, s = poe(idx)
    z = mu + s * noise
    ll = sum(LIN_LAMBDAS[i] * _np_normal_ll(
        f64(xs[i]), z @ f64(dec[i]["out"]["kernel"]) + f64(dec[i]["out"]["bias"])) for i in idx)
    kl = np.sum(0.5 * (s**2 + mu**2 - 1.0) - np.log(s), axis=-1)
    return ll - kl

  noise = [f64(jax.random.normal(k, (b, d))) for k in jax.random.split(key, m + 1)]
  ref_joint = term(range(m), noise[0])
  ref = ref_joint + sum(term([i], noise[i + 1]) for i in range(m))
  np.testing.assert_allclose(value, ref, rtol=2e-5, atol=1e-3)
  np.testing.assert_allclose(joint, ref_joint, rtol=2e-5, atol=1e-3)
  np.testing.assert_allclose(alias, value, rtol=1e-6)


def test_mvae_iwae_terms_and_errors():
  model = _linear_mvae()
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(1)
  xs = [rng.normal(size=(5, n)).astype(np.float32) for n in LIN_SIZES]
  key = jax.random.key(2)

  @jax.jit
  def values(params, xs, key):
    sub = [model.objective(params, xs, key, 8, kind="subsampled_iwae", estimator=e)
           for e in ("iwae", "legacy", "dreg")]
    alias = model.objective(params, xs, key, 8, kind="moe_iwae")
    joint_iwae = model.test_objective(params, xs, key, 500)
    elbos = jax.vmap(lambda k: model.objective(params, xs, k, 1, kind="joint_elbo"))(
        jax.random.split(key, 64))
    return jnp.stack(sub + [alias]), joint_iwae, elbos

  sub, joint_iwae, elbos = values(params, xs, key)
  np.testing.assert_allclose(sub, jnp.broadcast_to(sub[0], sub.shape), rtol=1e-6)  # value same
  # The test bound (what the training loop's test evaluation calls) is the joint IWAE bound, which
  # with many samples is above the joint ELBO on average.
  assert float(jnp.mean(joint_iwae)) > float(jnp.mean(elbos))
  with pytest.raises(ValueError, match="unknown MVAE objective 'foo'"):
    model.objective(params, xs, key, 2, kind="foo")
  with pytest.raises(ValueError, match="unknown estimator"):
    model.objective(params, xs, key, 2, estimator="foo")
  with pytest.raises(ValueError, match="expected 3 modalities"):
    model.objective(params, xs[:2], key, 2)
  with pytest.raises(ValueError, match="unknown expert_scale"):
    MVAE(model.modalities, 2, expert_scale="bad")


# ---------------------------------------------------------------------------------------------
# Training: M = 3 MMVAE with every estimator, the MVAE, the single-modality VAE.


@pytest.mark.parametrize("estimator", ["legacy", "dreg", "iwae"])
def test_three_modality_mmvae_trains(estimator):
  losses = _train_losses(MMVAE(tiny_modalities(), latent_dim=3), _config(estimator=estimator))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses


def test_mvae_trains_with_the_subsampled_elbo():
  model = MVAE(tiny_modalities(), latent_dim=3)
  losses = _train_losses(model, _config(objective="moe_elbo"))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses


def test_single_vae_is_an_iwae_and_trains():
  mod = tiny_modalities()[0]
  model = single_vae(mod, latent_dim=3)
  assert isinstance(model, MMVAE) and model.names == ("m0",)
  assert model.modalities[0].llik_scale == 1.0
  assert single_vae(mod, 3, llik_scale=None).modalities[0].llik_scale == mod.llik_scale
  params = model.init(jax.random.key(0))
  xs, _ = tiny_dataset(shapes=SHAPES[:1]).gather(np.arange(4))
  key = jax.random.key(1)
  obj = jax.jit(lambda p, x, k: jnp.stack([
      model.objective(p, x, k, 5, looser=False, estimator="iwae"),
      model.objective(p, x, k, 5, looser=True, estimator="legacy"),
      model.objective(p, x, k, 5, kind="moe_elbo")]))
  tight, looser, elbo = obj(params, xs, key)
  np.testing.assert_allclose(tight, looser, rtol=1e-6)  # M = 1: both are the IWAE bound
  assert elbo.shape == (4,) and np.all(np.isfinite(elbo))
  losses = _train_losses(model, _config(estimator="dreg"))
  assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < losses[0] - 1.0, losses


@pytest.mark.parametrize("which", ["mmvae", "mvae"])
def test_train_and_evaluate_three_modalities(which, tmp_path):
  mods = tiny_modalities()
  model = MMVAE(mods, latent_dim=3) if which == "mmvae" else MVAE(mods, latent_dim=3)
  ds = tiny_dataset()
  assert ds.num_modalities == 3
  _, y = ds.gather(np.arange(len(ds)))
  for i, s in enumerate(ds.sources):  # pairing: every modality of a pair has the same label
    np.testing.assert_array_equal(s.labels[ds.indices[i]], y)
  # The MVAE with its K-sample variant and true DReG (its ELBO variant is tested above).
  config = _config(max_steps=2, estimator="dreg" if which == "mvae" else "legacy")
  out = train.train_and_evaluate(model, config, str(tmp_path), ds, ds, devices=jax.devices()[:2],
                                 progress=False, figures=(which == "mvae"))
  assert np.isfinite(out["loss"]) and np.isfinite(out["test_objective"])
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert max(r["step"] for r in rows) == 2
  if which == "mvae":
    assert (tmp_path / "generation_epoch000.png").exists()


# ---------------------------------------------------------------------------------------------
# The three-modality experiment script (real data; slow: run with --runslow).


@pytest.mark.slow
@pytest.mark.parametrize("which", ["mmvae", "mvae"])
def test_three_digits_script_runs(which, tmp_path, shared_data):
  script = os.path.join(REPO, "experiments", "three_digits.py")
  proc = subprocess.run(
      [sys.executable, script, f"--model={which}", f"--workdir={tmp_path}", "--max_steps=2",
       "--k=2", "--batch_size=8", "--eval_batches=1", "--log_every=1", "--partners=1",
       f"--mnist={shared_data / 'mnist.npz'}", f"--usps={shared_data / 'usps.npz'}",
       f"--usps_colour={shared_data / 'usps_colour.npz'}"],
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert any("test_objective" in r for r in rows)
  assert all(np.isfinite(r.get("loss", 0.0)) for r in rows)
  info = json.load(open(tmp_path / "run.json"))
  assert {k: v["llik_scale"] for k, v in info["modalities"].items()} == pytest.approx(
      {"mnist": 3072 / 784, "usps_colour": 1.0, "usps": 12.0})


def test_three_digits_bad_flag_one_line(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "three_digits.py"),
                         f"--workdir={tmp_path}", "--model=foo"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and "model" in lines[0], proc.stderr
