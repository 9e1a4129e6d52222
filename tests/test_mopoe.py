"""MoPoE (mixture of products of experts, Sutter et al. 2021): float64 references, gradients,
structure and a training smoke test.

The reference problem (M = 3, B = 2, D = 2): every encoder is a parameter table returning fixed
(loc, log-variance) per datum, every decoder is linear, mean_d = A_d z + c_d, with a Normal
likelihood of scale sig_d and weight λ_d; the prior is N(0, I). The library runs under
``jax.enable_x64`` on these float64 numbers; the references recompute subsets, products,
likelihoods, KLs and both objectives in NumPy float64 from the same standard-normal noise, drawn
with the keys the library documents (`mmvae_jax.loss.mixture_elbo`, `mmvae_jax.loss.moe_iwae`).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from mmvae_jax import loss, models, train
from mmvae_jax import distributions as dists
from mmvae_jax.models.base import Modality, UniformMixture
from mmvae_jax.models.mopoe import MoPoE, subsets
from mmvae_jax.models.mvae import GaussianExperts
import tiny_models

SHAPES = ((4, 4, 1), (4, 4, 3), (3, 3, 1))
NAMES = ("m0", "m1", "m2")
# The documented subset order for M = 3, written out (by size, then combinations order).
ORDER = [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
B, D, K = 2, 2, 3
SIZES = (2, 3, 1)     # data size of each reference modality
RTOL = 1e-10
# The base model's prior N(0, I) holds float32 parameters, so even under x64 its log-normaliser
# 0.5·log(2π) per dimension is rounded to float32 (1.6e-8 off); the reference rounds it alike.
LOG_NORM_F32 = float(np.float32(0.5 * np.log(2 * np.pi)))
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


# ---------------------------------------------------------------------------------------------
# The reference problem.


class TableEncoder(nn.Module):
  """Ignores x: returns its parameters (loc (B, D), log-variance (B, D))."""

  @nn.compact
  def __call__(self, x):
    loc = self.param("loc", nn.initializers.zeros, (B, D))
    pre = self.param("pre", nn.initializers.zeros, (B, D))
    return loc + 0.0 * x[:, :1], pre


class LinearDecoder(nn.Module):
  """z (..., D) -> z A^T + c, (..., n)."""
  n: int

  @nn.compact
  def __call__(self, z):
    a = self.param("A", nn.initializers.zeros, (self.n, D))
    c = self.param("c", nn.initializers.zeros, (self.n,))
    return z @ a.T + c


def make_problem(seed=0):
  rng = np.random.default_rng(seed)
  sig = rng.uniform(0.7, 1.3, 3)
  lam = rng.uniform(0.5, 2.0, 3)
  mods = tuple(
      Modality(name=n, encoder=TableEncoder(), decoder=LinearDecoder(s), data_shape=(s,),
               llik_scale=float(lam[i]), posterior_family="normal",
               log_likelihood=functools.partial(dists.normal_log_likelihood,
                                                scale=float(sig[i]), event_ndim=1))
      for i, (n, s) in enumerate(zip(NAMES, SIZES)))
  p = dict(loc=rng.normal(0.0, 0.8, (3, B, D)), pre=rng.normal(0.0, 0.6, (3, B, D)),
           A=[rng.normal(0.0, 0.5, (s, D)) for s in SIZES],
           c=[rng.normal(0.0, 0.3, s) for s in SIZES])
  xs = [rng.normal(0.0, 1.0, (B, s)) for s in SIZES]
  return MoPoE(mods, latent_dim=D), p, xs, sig, lam


def lib_params(p):
  return {"encoders": {n: {"loc": jnp.asarray(p["loc"][i]), "pre": jnp.asarray(p["pre"][i])}
                       for i, n in enumerate(NAMES)},
          "decoders": {n: {"A": jnp.asarray(p["A"][i]), "c": jnp.asarray(p["c"][i])}
                       for i, n in enumerate(NAMES)}}


def noise(key, shape, count):
  """The standard-normal noise of `count` components for `key`, as the library draws it."""
  keys = jax.random.split(key, count)
  return np.stack([np.asarray(jax.random.normal(k, shape, jnp.float64)) for k in keys])


# NumPy float64, independent of the library.


def np_experts(p):
  return p["loc"], np.sqrt(np.exp(p["pre"]) + 1e-8)  # the "logvar" head


def np_products(p):
  """[(loc, scale)] of the 7 subset products, no prior expert, in ORDER."""
  locs, scales = np_experts(p)
  out = []
  for s in ORDER:
    prec = sum(1.0 / scales[m]**2 for m in s)
    out.append((sum(locs[m] / scales[m]**2 for m in s) / prec, 1.0 / np.sqrt(prec)))
  return out


def np_log_normal(z, loc, scale):
  return np.sum(-0.5 * np.log(2 * np.pi * scale**2) - 0.5 * ((z - loc) / scale)**2, axis=-1)


def np_log_lik(p, xs, sig, lam, z):
  """Σ_d λ_d log N(x_d; A_d z + c_d, sig_d²): z (..., B, D) -> (..., B)."""
  total = 0.0
  for d in range(3):
    mean = z @ p["A"][d].T + p["c"][d]
    total = total + lam[d] * np.sum(-0.5 * np.log(2 * np.pi * sig[d]**2)
                                    - 0.5 * ((xs[d] - mean) / sig[d])**2, axis=-1)
  return total


def np_mopoe_elbo(p, xs, sig, lam, eps):
  """(1/7) Σ_S [ll(μ_S + σ_S ε_S) − KL(N(μ_S, σ_S²) || N(0, I))], eps (7, B, D)."""
  terms = []
  for (mu, s), e in zip(np_products(p), eps):
    kl = np.sum(0.5 * (s**2 + mu**2 - 1.0) - np.log(s), axis=-1)
    terms.append(np_log_lik(p, xs, sig, lam, mu + s * e) - kl)
  return np.mean(terms, axis=0)


def np_mopoe_iwae(p, xs, sig, lam, eps, looser):
  """Stratified / tight MoE-IWAE over the 7 products, eps (7, K, B, D)."""
  prods = np_products(p)
  z = np.stack([mu + s * e for (mu, s), e in zip(prods, eps)])  # (7, K, B, D)
  log_q = logsumexp(np.stack([np_log_normal(z, mu, s) for mu, s in prods]), axis=0) - np.log(7)
  log_prior = np.sum(-LOG_NORM_F32 - 0.5 * z**2, axis=-1)
  lw = log_prior + np_log_lik(p, xs, sig, lam, z) - log_q  # (7, K, B)
  if looser:
    return np.mean(logsumexp(lw, axis=1) - np.log(lw.shape[1]), axis=0)
  return logsumexp(lw, axis=(0, 1)) - np.log(lw.shape[0] * lw.shape[1])


# ---------------------------------------------------------------------------------------------
# (a) float64 references.


def test_subsets_order_and_count():
  assert subsets(NAMES) == [tuple(NAMES[i] for i in s) for s in ORDER]
  assert len(subsets("abcd")) == 15 and len(subsets("a")) == 1
  assert list(itertools.chain(*subsets(("x", "y"))[:2])) == ["x", "y"]


def test_posteriors_and_objectives_match_numpy_float64():
  model, p, xs, sig, lam = make_problem()
  key = jax.random.key(7)
  z = np.random.default_rng(1).normal(size=(4, B, D))

  def run(params, jxs, z):
    post = model.posterior(params, dict(zip(NAMES, jxs)))
    # An observed subset in reverse mapping order: components (m0), (m2), (m0, m2).
    sub = model.posterior(params, {"m2": jxs[2], "m0": jxs[0]})
    assert isinstance(post, UniformMixture) and len(post.components) == 7
    assert isinstance(sub, UniformMixture) and len(sub.components) == 3
    return dict(
        full=[(q.loc, q.scale) for q in post.components],
        sub=[(q.loc, q.scale) for q in sub.components],
        log_q=post.log_prob(z),
        elbo=model.objective(params, jxs, key, K),  # default: mopoe_elbo
        looser=model.objective(params, jxs, key, K, kind="mopoe_iwae", looser=True),
        tight=model.objective(params, jxs, key, K, kind="mopoe_iwae", looser=False,
                              estimator="iwae"))

  with jax.enable_x64(True):
    out = fast_jit(run)(lib_params(p), [jnp.asarray(x) for x in xs], jnp.asarray(z))
    eps_elbo = noise(key, (B, D), 14)[:7]   # keys[c] of split(key, 2C)
    eps_iw = noise(key, (K, B, D), 7)        # sample_experts: keys[c] of split(key, C)
  assert out["elbo"].dtype == jnp.float64
  out = jax.tree.map(np.asarray, out)
  prods = np_products(p)
  for (loc, scale), (mu, s) in zip(out["full"] + out["sub"], prods + [prods[i] for i in (0, 2, 4)]):
    np.testing.assert_allclose(loc, mu, rtol=RTOL, atol=1e-12)
    np.testing.assert_allclose(scale, s, rtol=RTOL)
  ref_lq = logsumexp([np_log_normal(z, mu, s) for mu, s in prods], axis=0) - np.log(7)
  np.testing.assert_allclose(out["log_q"], ref_lq, rtol=RTOL)
  assert out["elbo"].shape == (B,)
  np.testing.assert_allclose(out["elbo"], np_mopoe_elbo(p, xs, sig, lam, eps_elbo), rtol=RTOL)
  for lo in (True, False):
    ref = np_mopoe_iwae(p, xs, sig, lam, eps_iw, lo)
    np.testing.assert_allclose(out["looser" if lo else "tight"], ref, rtol=RTOL)
  assert np.all(out["looser"] <= out["tight"])


# ---------------------------------------------------------------------------------------------
# (b) gradients.


def _jnp_mixture_elbo(locs, scales, a, eps, x, sig):
  """Independent jax.numpy formula: (1/C) Σ_c [log N(x; A z_c, sig²) − KL_c], summed over B."""
  z = locs + scales * eps                                   # (C, B, D)
  mean = z @ a.T                                            # (C, B, n)
  ll = jnp.sum(-0.5 * jnp.log(2 * jnp.pi * sig**2) - 0.5 * ((x - mean) / sig)**2, axis=-1)
  kl = jnp.sum(0.5 * (scales**2 + locs**2 - 1.0) - jnp.log(scales), axis=-1)
  return jnp.sum(jnp.mean(ll - kl, axis=0))


def test_mixture_elbo_gradient_float64():
  rng = np.random.default_rng(3)
  c_count, n = 4, 3
  locs = rng.normal(size=(c_count, B, D))
  scales = rng.uniform(0.5, 1.5, (c_count, B, D))
  a = rng.normal(0.0, 0.5, (n, D))
  x = rng.normal(size=(B, n))
  sig = 0.9
  key = jax.random.key(11)

  def lib(locs, scales, a):
    posts = [distrax.Normal(locs[c], scales[c]) for c in range(c_count)]
    ll = lambda z: dists.normal_log_likelihood(x, z @ a.T, sig, event_ndim=1)
    prior = distrax.Normal(jnp.zeros(D), jnp.ones(D))
    return jnp.sum(loss.mixture_elbo(key, posts, ll, prior))

  with jax.enable_x64(True):
    args = tuple(jnp.asarray(v) for v in (locs, scales, a))
    eps = jnp.asarray(noise(key, (B, D), 2 * c_count)[:c_count])
    ref_fn = lambda *v: _jnp_mixture_elbo(*v, eps, jnp.asarray(x), sig)
    both = fast_jit(lambda *v: (jax.value_and_grad(lib, argnums=(0, 1, 2))(*v),
                                jax.value_and_grad(ref_fn, argnums=(0, 1, 2))(*v)))
    (value, grads), (ref_value, ref_grads) = both(*args)
    ref = fast_jit(ref_fn)
    np.testing.assert_allclose(value, ref_value, rtol=RTOL)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)
    # The reference gradient itself against central differences, a few coordinates each.
    h = 1e-6
    for i, arr in enumerate(args):
      for flat in (0, arr.size - 1):
        idx = np.unravel_index(flat, arr.shape)
        bump = [np.asarray(v) for v in args]
        bump[i] = bump[i].copy(); bump[i][idx] += h
        up = float(ref(*map(jnp.asarray, bump)))
        bump[i][idx] -= 2 * h
        down = float(ref(*map(jnp.asarray, bump)))
        np.testing.assert_allclose(grads[i][idx], (up - down) / (2 * h), rtol=1e-6, atol=1e-7)


def test_model_elbo_gradient_against_finite_differences_of_numpy():
  """∂ mopoe_elbo / ∂ (encoder loc, log-variance, decoder A, c) through the whole model."""
  model, p, xs, sig, lam = make_problem(seed=1)
  key = jax.random.key(2)
  with jax.enable_x64(True):
    jxs = [jnp.asarray(x) for x in xs]
    grads = fast_jit(jax.grad(lambda q: jnp.sum(model.objective(q, jxs, key, 1))))(
        lib_params(p))
    eps = noise(key, (B, D), 14)[:7]
  value = lambda q: float(np.sum(np_mopoe_elbo(q, xs, sig, lam, eps)))
  h = 1e-6
  checked = 0
  for field, side in (("loc", "encoders"), ("pre", "encoders"), ("A", "decoders"),
                      ("c", "decoders")):
    for m, name in enumerate(NAMES):
      arr = np.asarray(p[field][m])
      for flat in range(arr.size):
        idx = np.unravel_index(flat, arr.shape)
        q = {k: [np.array(v) for v in vs] for k, vs in p.items()}
        q[field][m][idx] += h
        up = value(q)
        q[field][m][idx] -= 2 * h
        down = value(q)
        got = np.asarray(grads[side][name][field])[idx]
        np.testing.assert_allclose(got, (up - down) / (2 * h), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{field} {name} {idx}")
        checked += 1
  assert checked == 3 * (2 * B * D) + sum(n * D + n for n in SIZES)


# ---------------------------------------------------------------------------------------------
# (c) structure.


class CountingModality(Modality):
  """Counts encoder and decoder applications (at trace time)."""
  calls = {"enc": 0, "dec": 0}

  def encoder_outputs(self, params, x):
    CountingModality.calls["enc"] += 1
    return super().encoder_outputs(params, x)

  def decoder_output(self, params, z):
    CountingModality.calls["dec"] += 1
    return super().decoder_output(params, z)


def _counting_model():
  mods = tuple(CountingModality(**{f.name: getattr(m, f.name) for f in dataclasses.fields(m)})
               for m in tiny_models.tiny_modalities(3, SHAPES))
  return MoPoE(mods, latent_dim=3)


def test_structure_of_the_tiny_model():
  model = _counting_model()
  assert isinstance(model, GaussianExperts) and model.expert_scale == "logvar"
  assert model.resolve_objective("auto") == model.resolve_objective(None) == "mopoe_elbo"
  with pytest.raises(ValueError, match="mopoe_elbo, mopoe_iwae"):
    model.resolve_objective("moe_iwae")
  params = model.init(jax.random.key(0))
  assert set(params) == {"encoders", "decoders"}
  xs = tiny_models.tiny_xs(b=3, shapes=SHAPES)
  key = jax.random.key(4)

  # Each encoder once and each decoder once per objective call.
  for kind in model.objectives:
    CountingModality.calls.update(enc=0, dec=0)
    jax.make_jaxpr(lambda p: model.objective(p, xs, key, 2, kind=kind))(params)
    assert CountingModality.calls == {"enc": 3, "dec": 3}, (kind, CountingModality.calls)

  @fast_jit
  def run(params, xs):
    experts = [model.expert(params, n, x) for n, x in zip(NAMES, xs)]
    full = model.posterior(params, dict(zip(NAMES, xs)))
    single = model.posterior(params, {"m1": xs[1]})
    return dict(
        experts=[(q.loc, q.scale) for q in experts],
        full=[(q.loc, q.scale) for q in full.components],
        single=(single.loc, single.scale),
        elbo=model.objective(params, xs, key, 1),
        elbo_k=model.objective(params, xs, key, 5, estimator="iwae"),
        looser=model.objective(params, xs, key, 1, kind="mopoe_iwae", looser=True),
        tight=model.objective(params, xs, key, 1, kind="mopoe_iwae", looser=False),
        test=model.test_objective(params, xs, key, 2),
        cross=model.cross_generate(params, {"m0": xs[0], "m2": xs[2]}, key, 2))

  out = jax.device_get(run(params, xs))
  assert len(out["full"]) == 7
  # A single modality's posterior is its expert, exactly (no prior expert).
  np.testing.assert_array_equal(out["single"][0], out["experts"][1][0])
  np.testing.assert_array_equal(out["single"][1], out["experts"][1][1])
  # Product precision = Σ expert precisions of the subset (no prior expert's + 1); loc = the
  # precision-weighted mean of the experts' locs.
  for (loc, scale), s in zip(out["full"], ORDER):
    prec = sum(1.0 / np.float64(out["experts"][m][1])**2 for m in s)
    mean = sum(np.float64(out["experts"][m][0]) / np.float64(out["experts"][m][1])**2
               for m in s) / prec
    np.testing.assert_allclose(1.0 / np.float64(scale)**2, prec, rtol=1e-5)
    np.testing.assert_allclose(loc, mean, rtol=1e-5, atol=1e-6)
  for name in ("elbo", "elbo_k", "looser", "tight", "test"):
    assert out[name].shape == (3,) and np.all(np.isfinite(out[name])), name
  # The ELBO ignores K and the estimator.
  np.testing.assert_array_equal(out["elbo"], out["elbo_k"])
  # K = 1, same samples: looser = mean_S log w_S ≤ tight = log mean_S w_S (Jensen), and not
  # equal (the 7 weights differ).
  assert np.all(out["looser"] <= out["tight"] + 1e-5), (out["looser"], out["tight"])
  assert np.all(out["tight"] - out["looser"] > 1e-3)
  assert {n: v.shape for n, v in out["cross"].items()} == {
      "m0": (2, 3, 4, 4, 1), "m1": (2, 3, 4, 4, 3), "m2": (2, 3, 3, 3, 1)}


def test_registry_builds_mopoe():
  assert "mopoe" in models.names()
  model = models.build("mopoe", tiny_models.tiny_modalities(4, SHAPES),
                       models.ModelOptions(latent_dim=4, expert_scale="softplus"))
  assert isinstance(model, MoPoE) and model.latent_dim == 4
  assert model.expert_scale == "softplus" and model.names == NAMES


# ---------------------------------------------------------------------------------------------
# (d) training.


def test_train_and_evaluate_smoke(tmp_path):
  """Two epochs (≈ 9 steps each) with the default objective: finite losses, and the test bound
  (same evaluation batch and noise at each epoch end) rises."""
  model = MoPoE(tiny_models.tiny_modalities(3, SHAPES), latent_dim=3)
  ds = tiny_models.tiny_dataset(shapes=SHAPES)
  config = train.TrainConfig(k=1, batch_size=8, epochs=2, eval_batches=1, checkpoint_every=0,
                             log_every=1, seed=3, lr=3e-2, figures=False)
  assert config.objective == "auto"
  train.train_and_evaluate(model, config, str(tmp_path), ds, ds, devices=jax.devices()[:1],
                           progress=False, figures=False)
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  tests = [r["test_objective"] for r in rows if "test_objective" in r]
  assert len(losses) >= 10 and np.all(np.isfinite(losses)), losses
  assert len(tests) == 2 and np.all(np.isfinite(tests)), tests
  assert tests[1] > tests[0] + 1.0, tests
  with pytest.raises(ValueError, match="unknown MoPoE objective 'moe_iwae'"):
    train.train_and_evaluate(model, train.TrainConfig(objective="moe_iwae"), str(tmp_path / "x"),
                             ds, ds, devices=jax.devices()[:1], progress=False, figures=False)
