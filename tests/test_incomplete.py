"""Training on incomplete data: presence masks in the objectives, the models and the data.

The masked MoE-IWAE is checked against a NumPy float64 computation written from the definition
(q_Φ of example b = the uniform mixture of its present experts; stratified bound = mean over its
present strata of log-mean-exp over K; tight bound = log-mean-exp over its present M_b·K samples).
Its gradients are central finite differences, in float64, of NumPy functions whose gradient is
the estimator's by definition: the bound itself (``iwae``), and for ``legacy`` / ``dreg`` the
surrogates Σ c·w̃₀·lw(z(φ), q₀, θ) and Σ c·w̃₀·lw(z₀, q₀, θ) + Σ c·w̃₀²·lw(z(φ), q₀, θ₀), with
w̃₀, q₀ (every expert inside log q_Φ), z₀ and θ₀ held at the evaluation point, c = 1/M_b
(stratified) or 1 (tight), and w̃ normalised over present samples only.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from mmvae_jax import data, distributions as dists, loss, models, parallel, runs, train
from mmvae_jax.data import missing
from mmvae_jax.models.mopoe import MoPoE
from mmvae_jax.models.mvae import MVAE
from tiny_models import digits_npz, tiny_dataset, tiny_modalities, tiny_model, tiny_xs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)
ESTIMATORS = ("iwae", "legacy", "dreg")
M, K, B, D = 3, 4, 5, 2
SIZES = (3, 2, 4)  # datum size of each toy modality
# Example 0 has all three experts, 1 and 2 two, 3 and 4 one.
PRESENT = np.array([[1, 1, 0, 1, 0],
                    [1, 0, 1, 0, 0],
                    [1, 1, 1, 0, 1]], bool)


# ---------------------------------------------------------------------------------------------
# The toy problem: Laplace experts (mu, s), linear-Normal decoders (A, c), a Normal prior.


def _f32(a):
  return np.asarray(a, np.float32).astype(np.float64)


def toy_problem(seed=0):
  rng = np.random.default_rng(seed)
  enc = {"mu": _f32(rng.normal(0, 0.7, (M, B, D))), "s": _f32(rng.uniform(0.5, 1.4, (M, B, D)))}
  dec = {"A": tuple(_f32(rng.normal(0, 0.6, (n, D))) for n in SIZES),
         "c": tuple(_f32(rng.normal(0, 0.3, n)) for n in SIZES)}
  x = tuple(_f32(rng.normal(0, 1, (B, n))) for n in SIZES)
  lam = _f32(rng.uniform(0.5, 2.0, M))
  return enc, dec, x, lam


def library_objective(enc, dec, x, lam, key, present, looser, estimator):
  """Σ_b of the library's bound on the toy problem (float32 jax arrays in)."""
  qs = [distrax.Laplace(enc["mu"][m], enc["s"][m]) for m in range(M)]

  def log_lik(z):
    total = 0.0
    for d in range(M):
      mean = z @ dec["A"][d].T + dec["c"][d]
      ll = lam[d] * dists.normal_log_likelihood(x[d], mean, 1.0, event_ndim=1)
      total = total + (ll if present is None else jnp.where(present[d], ll, 0.0))
    return total

  prior = distrax.Normal(jnp.zeros(D), jnp.ones(D))
  return jnp.sum(loss.moe_iwae(key, qs, log_lik, prior, K, looser=looser, estimator=estimator,
                               present=present))


@fast_jit
def library_all(enc, dec, x, lam, key, present):
  """{(looser, estimator): (value, (grad enc, grad dec))} in one compilation."""
  out = {}
  for looser in (True, False):
    for est in ESTIMATORS:
      f = functools.partial(library_objective, looser=looser, estimator=est)
      out[(looser, est)] = jax.value_and_grad(f, argnums=(0, 1))(enc, dec, x, lam, key, present)
  return out


def library_noise(enc, key):
  """ε (M, K, B, D) of the library's samples z = mu + s ε for `key` (float64)."""
  qs = [distrax.Laplace(jnp.asarray(enc["mu"][m], jnp.float32), jnp.asarray(enc["s"][m], jnp.float32))
        for m in range(M)]
  z = np.asarray(loss.sample_experts(key, qs, K), np.float64)
  return (z - enc["mu"][:, None]) / enc["s"][:, None]


# ---------------------------------------------------------------------------------------------
# NumPy float64 reference.


def np_log_weights(z, q_enc, dec, x, lam, present):
  """lw (M, K, B) with q_Φ the mixture of each example's present experts (from q_enc)."""
  mu, s = q_enc["mu"], q_enc["s"]
  lq = np.sum(-np.log(2 * s[:, None, None]) - np.abs(z[None] - mu[:, None, None])
              / s[:, None, None], -1)  # (M', M, K, B): expert m' at z[m]
  lq = np.where(present[:, None, None, :], lq, -np.inf)
  log_q = logsumexp(lq, axis=0) - np.log(present.sum(0))
  log_prior = np.sum(-0.5 * np.log(2 * np.pi) - 0.5 * z**2, -1)
  log_lik = 0.0
  for d in range(M):
    mean = z @ dec["A"][d].T + dec["c"][d]
    ll = np.sum(-0.5 * np.log(2 * np.pi) - 0.5 * (x[d] - mean)**2, -1)
    log_lik = log_lik + np.where(present[d], lam[d] * ll, 0.0)
  return log_prior + log_lik - log_q


def np_weights(lw, present, looser):
  """(c·w̃) (M, K, B): w̃ over K per present stratum (c = 1/M_b) or over all present samples."""
  keep = np.broadcast_to(present[:, None, :], lw.shape)
  if looser:
    w = np.exp(lw - logsumexp(lw, axis=1, keepdims=True))
    return np.where(keep, w, 0.0) / present.sum(0)
  lw = np.where(keep, lw, -np.inf)
  return np.exp(lw - logsumexp(lw, axis=(0, 1), keepdims=True))


def np_bound(lw, present, looser):
  if looser:
    per = logsumexp(lw, axis=1) - np.log(K)
    return np.sum(np.where(present, per, 0.0), 0) / present.sum(0)
  lw = np.where(np.broadcast_to(present[:, None, :], lw.shape), lw, -np.inf)
  return logsumexp(lw, axis=(0, 1)) - np.log(K * present.sum(0))


def _flat(enc, dec):
  return np.concatenate([enc["mu"].ravel(), enc["s"].ravel()] + [a.ravel() for a in dec["A"]]
                        + [c.ravel() for c in dec["c"]])


def _unflat(v):
  out, i = [], 0
  shapes = [(M, B, D), (M, B, D)] + [(n, D) for n in SIZES] + [(n,) for n in SIZES]
  for shp in shapes:
    n = int(np.prod(shp))
    out.append(v[i:i + n].reshape(shp))
    i += n
  return {"mu": out[0], "s": out[1]}, {"A": tuple(out[2:2 + M]), "c": tuple(out[2 + M:])}


def np_reference(enc0, dec0, x, lam, eps, present, looser):
  """Value (summed over b) and {estimator: flat gradient} by float64 central differences."""
  z_of = lambda e: e["mu"][:, None] + e["s"][:, None] * eps
  lw0 = np_log_weights(z_of(enc0), enc0, dec0, x, lam, present)
  w0 = np_weights(lw0, present, looser)
  keep = np.broadcast_to(present[:, None, :], lw0.shape)

  def masked_sum(weight, lw):
    return np.sum(np.where(keep, weight * lw, 0.0))

  funcs = {
      "iwae": lambda e, d: np.sum(np_bound(np_log_weights(z_of(e), e, d, x, lam, present),
                                           present, looser)),
      "legacy": lambda e, d: masked_sum(w0, np_log_weights(z_of(e), enc0, d, x, lam, present)),
      "dreg": lambda e, d: (masked_sum(w0, np_log_weights(z_of(enc0), enc0, d, x, lam, present))
                            + masked_sum(w0 * w0 * (present.sum(0) if looser else 1.0),
                                         np_log_weights(z_of(e), enc0, dec0, x, lam, present))),
  }
  theta0, h = _flat(enc0, dec0), 1e-6
  grads = {}
  for name, f in funcs.items():
    g = np.zeros_like(theta0)
    for i in range(theta0.size):
      up, down = theta0.copy(), theta0.copy()
      up[i] += h
      down[i] -= h
      g[i] = (f(*_unflat(up)) - f(*_unflat(down))) / (2 * h)
    grads[name] = g
  return float(np.sum(np_bound(lw0, present, looser))), grads


def _library_flat(grads):
  g_enc, g_dec = jax.tree.map(lambda a: np.asarray(a, np.float64), grads)
  return _flat(g_enc, g_dec)


def test_masked_bound_and_gradients_match_float64_reference():
  enc, dec, x, lam = toy_problem()
  key = jax.random.key(3)
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  out = library_all(f32(enc), f32(dec), f32(x), f32(lam), key, jnp.asarray(PRESENT))
  eps = library_noise(enc, key)
  for looser in (True, False):
    value, ref = np_reference(enc, dec, x, lam, eps, PRESENT, looser)
    for est in ESTIMATORS:
      got_value, got_grads = out[(looser, est)]
      np.testing.assert_allclose(float(got_value), value, rtol=1e-5)
      got = _library_flat(got_grads)
      scale = np.max(np.abs(ref[est]))
      np.testing.assert_allclose(got, ref[est], rtol=0, atol=2e-4 * scale,
                                 err_msg=f"looser={looser} estimator={est}")
      # Absent experts get exactly zero gradient.
      g_enc = jax.tree.map(np.asarray, got_grads[0])
      for name in ("mu", "s"):
        assert np.all(g_enc[name][~PRESENT] == 0.0), (looser, est, name)
  # The estimators differ on the encoders: the comparison above can tell them apart.
  _, ref = np_reference(enc, dec, x, lam, eps, PRESENT, True)
  assert np.max(np.abs(ref["dreg"] - ref["legacy"])) > 1e-2 * np.max(np.abs(ref["legacy"]))


def test_all_true_mask_is_bit_identical_to_no_mask():
  """Op by op (eagerly) an all-True mask gives the unmasked floats exactly, values and every
  estimator's gradients. Compiled with the mask as a runtime argument, XLA fuses the masked
  program differently, so there it agrees to float32 rounding."""
  enc, dec, x, lam = toy_problem(seed=1)
  f32 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
  args = (f32(enc), f32(dec), f32(x), f32(lam), jax.random.key(5))
  all_true = jnp.ones((M, B), bool)
  compiled = library_all(*args, all_true)
  for lo, est in ((True, "dreg"), (False, "iwae")):  # eager dispatch is slow: two of the six
    if True:
      f = jax.value_and_grad(functools.partial(library_objective, looser=lo, estimator=est),
                             argnums=(0, 1))
      unmasked, masked = f(*args, None), f(*args, all_true)
      for a, b, c in zip(jax.tree.leaves(unmasked), jax.tree.leaves(masked),
                         jax.tree.leaves(compiled[(lo, est)])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{lo} {est}")
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_one_present_expert_is_the_unimodal_iwae(monkeypatch):
  """Experts (q_a, q_b) with only q_a present equal `loss.iwae` of q_a on the same samples."""
  enc, dec, x, lam = toy_problem(seed=2)
  eps = jnp.asarray(np.random.default_rng(0).laplace(size=(2, K, B, D)), jnp.float32)
  monkeypatch.setattr(loss, "sample_experts", lambda key, qs, n: jnp.stack(
      [q.loc + q.scale * eps[i] for i, q in enumerate(qs)]))
  mu, s = jnp.asarray(enc["mu"][:2], jnp.float32), jnp.asarray(enc["s"][:2], jnp.float32)
  a_mat = jnp.asarray(dec["A"][0], jnp.float32)
  xd = jnp.asarray(x[0], jnp.float32)
  log_lik = lambda a: (lambda z: dists.normal_log_likelihood(xd, z @ a.T, 1.0, event_ndim=1))
  prior = distrax.Normal(jnp.zeros(D), jnp.ones(D))
  present = jnp.asarray([[True] * B, [False] * B])

  def both(mu, s, a, looser, est):
    qs = [distrax.Laplace(mu[m], s[m]) for m in range(2)]
    return jnp.sum(loss.moe_iwae(jax.random.key(0), qs, log_lik(a), prior, K, looser=looser,
                                 estimator=est, present=present))

  def one(mu, s, a, est):
    return jnp.sum(loss.iwae(jax.random.key(0), distrax.Laplace(mu[0], s[0]), log_lik(a), prior,
                             K, estimator=est))

  @fast_jit
  def run(mu, s, a):
    grad = lambda f, *args: jax.value_and_grad(f, argnums=(0, 1, 2))(mu, s, a, *args)
    return {est: (grad(one, est), grad(both, True, est), grad(both, False, est))
            for est in ESTIMATORS}

  for est, (ref, *masked) in run(mu, s, a_mat).items():
    for (v1, g1), (v2, g2) in zip(masked, [ref, ref]):
      np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
      np.testing.assert_allclose(g1[0][0], g2[0][0], rtol=1e-5, atol=1e-6, err_msg=est)
      np.testing.assert_allclose(g1[1][0], g2[1][0], rtol=1e-5, atol=1e-6, err_msg=est)
      np.testing.assert_allclose(g1[2], g2[2], rtol=1e-5, atol=1e-6, err_msg=est)
      assert np.all(np.asarray(g1[0][1]) == 0) and np.all(np.asarray(g1[1][1]) == 0)


def test_masked_moe_elbo_with_one_present_expert_is_its_elbo():
  """`moe_elbo` of an example with expert d alone = λ_d log p(x_d | z_d) − KL(q_d || p)."""
  enc, dec, x, lam = toy_problem(seed=4)
  qs = [distrax.Laplace(jnp.asarray(enc["mu"][m], jnp.float32),
                        jnp.asarray(enc["s"][m], jnp.float32)) for m in range(M)]
  lls = [functools.partial(lambda d, z: lam[d] * dists.normal_log_likelihood(
      jnp.asarray(x[d], jnp.float32), z @ jnp.asarray(dec["A"][d], jnp.float32).T, 1.0,
      event_ndim=1), d) for d in range(M)]
  prior = distrax.Laplace(jnp.zeros(D), jnp.ones(D))
  key = jax.random.key(8)
  got = np.asarray(loss.moe_elbo(key, qs, lls, prior, present=jnp.asarray(PRESENT)))
  keys = jax.random.split(key, 2 * M)
  for b, d in ((3, 0), (4, 2)):  # the single-expert examples of PRESENT
    assert PRESENT[:, b].sum() == 1 and PRESENT[d, b]
    z = qs[d].sample(seed=keys[d])
    ref = lls[d](z) - dists.kl_divergence(qs[d], prior, key=keys[M + d])
    np.testing.assert_allclose(got[b], float(ref[b]), rtol=1e-5)
  full = np.asarray(loss.moe_elbo(key, qs, lls, prior))
  assert np.all(np.isfinite(got)) and not np.allclose(got[1:], full[1:])


def test_help_documents_present():
  assert "present" in loss.moe_iwae.__doc__ and "(M, B)" in loss.moe_iwae.__doc__


# ---------------------------------------------------------------------------------------------
# Models: hidden data never count; MVAE and MoPoE against their observed-subset posteriors.

TINY_PRESENT = jnp.asarray([[True, True, False, True], [True, False, True, True]])


def _model(kind):
  mods = tiny_modalities(latent_dim=3)
  if kind == "mmvae":
    return tiny_model(latent_dim=3)
  return {"mvae": MVAE, "mopoe": MoPoE}[kind](modalities=mods, latent_dim=3)


@pytest.mark.parametrize("kind,objective", [("mmvae", "moe_iwae"), ("mmvae", "moe_elbo"),
                                            ("mvae", "subsampled_iwae"),
                                            ("mopoe", "mopoe_elbo")])
def test_hidden_pixels_change_nothing(kind, objective):
  model = _model(kind)
  params = model.init(jax.random.key(0))
  xs = tiny_xs(b=4, seed=1)
  # Other pixels wherever a modality is hidden (the observed entries unchanged).
  other = tiny_xs(b=4, seed=9)
  xs2 = tuple(jnp.where(p.reshape(-1, 1, 1, 1), x, y) for x, y, p in zip(xs, other, TINY_PRESENT))
  assert not np.array_equal(np.asarray(xs[0]), np.asarray(xs2[0]))

  @fast_jit
  def value_grads(params, xs):
    f = lambda p, xs: jnp.sum(model.objective(p, xs, jax.random.key(1), 2, kind=objective,
                                              present=TINY_PRESENT))
    return jax.value_and_grad(f, argnums=(0, 1))(params, xs)

  (v1, (gp1, gx1)), (v2, (gp2, gx2)) = value_grads(params, xs), value_grads(params, xs2)
  assert np.isfinite(float(v1)) and float(v1) == float(v2)
  for a, b in zip(jax.tree.leaves(gp1), jax.tree.leaves(gp2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for g1, g2, p in zip(gx1, gx2, TINY_PRESENT):  # no gradient reaches a hidden pixel
    for g in (g1, g2):
      assert np.all(np.asarray(g)[~np.asarray(p)] == 0)
      assert np.any(np.asarray(g)[np.asarray(p)] != 0)
    np.testing.assert_array_equal(np.asarray(g1)[np.asarray(p)], np.asarray(g2)[np.asarray(p)])


@pytest.mark.parametrize("kind,objective", [("mvae", "subsampled_elbo"), ("mopoe", "mopoe_iwae")])
def test_model_all_true_mask_equals_no_mask(kind, objective):
  model = _model(kind)
  params = model.init(jax.random.key(0))
  xs = tiny_xs(b=4, seed=1)

  @fast_jit
  def both(params):
    f = lambda p, present: jnp.sum(model.objective(p, xs, jax.random.key(2), 2, kind=objective,
                                                   present=present))
    return (jax.value_and_grad(f)(params, None),
            jax.value_and_grad(f)(params, jnp.ones((2, 4), bool)))

  a, b = both(params)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-6)


def test_mvae_masked_objective_against_observed_subsets():
  """subsampled_elbo of each example = ELBO of its observed PoE + its present unimodal ELBOs."""
  model = _model("mvae")
  params = model.init(jax.random.key(0))
  xs = tiny_xs(b=4, seed=3)
  key = jax.random.key(4)
  got = np.asarray(model.objective(params, xs, key, 1, present=TINY_PRESENT))
  keys = jax.random.split(key, model.num_modalities + 1)
  present = np.asarray(TINY_PRESENT)
  prior = model.prior(params)
  for b in range(3):  # both modalities, the first alone, the second alone
    names = [n for m, n in enumerate(model.names) if present[m, b]]
    terms = [(keys[0], {n: xs[model.names.index(n)][b:b + 1] for n in names})]
    terms += [(keys[1 + model.names.index(n)], {n: xs[model.names.index(n)][b:b + 1]})
              for n in names]
    ref = 0.0
    for k, observed in terms:
      q = model.posterior(params, observed)  # the PoE of the observed subset, prior expert in
      eps = jax.random.normal(k, (4, model.latent_dim))[b:b + 1]
      z = q.loc + q.scale * eps
      ll = sum(model.weighted_log_likelihood(params, n, x, z) for n, x in observed.items())
      ref += float((ll - dists.kl_divergence(q, prior))[0])
    np.testing.assert_allclose(got[b], ref, rtol=1e-5)


def test_mopoe_masked_objective_against_observed_subsets():
  """mopoe_elbo of each example = mean over the subsets of its present modalities."""
  model = _model("mopoe")
  params = model.init(jax.random.key(0))
  xs = tiny_xs(b=4, seed=5)
  key = jax.random.key(6)
  got = np.asarray(model.objective(params, xs, key, 1, present=TINY_PRESENT))
  present = np.asarray(TINY_PRESENT)
  experts = {n: model.expert_loc_scale(params, n, x) for n, x in zip(model.names, xs)}
  subs, comps = model.subset_products(experts)
  keys = jax.random.split(key, 2 * len(subs))
  prior = model.prior(params)
  for b in range(3):
    observed = {n: xs[m][b:b + 1] for m, n in enumerate(model.names) if present[m, b]}
    mixture = models.components(model.posterior(params, observed))
    valid = [c for c, s in enumerate(subs) if all(n in observed for n in s)]
    assert len(mixture) == len(valid) == 2 ** len(observed) - 1
    ref = []
    for q_obs, c in zip(mixture, valid):  # same component, same order as the full set's
      np.testing.assert_allclose(q_obs.loc[0], comps[c].loc[b], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(q_obs.scale[0], comps[c].scale[b], rtol=1e-5, atol=1e-6)
      z = comps[c].sample(seed=keys[c])[b:b + 1]
      ll = sum(model.weighted_log_likelihood(params, n, x, z) for n, x in observed.items())
      ref.append(float((ll - dists.kl_divergence(q_obs, prior))[0]))
    np.testing.assert_allclose(got[b], np.mean(ref), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Data: --missing, the masked pairs and their batches.


def test_parse_missing_errors_are_one_line():
  assert missing.parse_missing("svhn:0.5, mnist:0") == {"svhn": 0.5, "mnist": 0.0}
  assert missing.parse_missing("") == {}
  for spec, needle in [("svhn", "name:fraction"), ("svhn:1", r"\[0, 1\)"),
                       ("svhn:-0.1", r"\[0, 1\)"), ("svhn:x", "number"),
                       ("svhn:0.1,svhn:0.2", "twice")]:
    with pytest.raises(ValueError, match=needle):
      missing.parse_missing(spec)
  with pytest.raises(ValueError, match="unknown modality 'sv'"):
    missing.parse_missing("sv:0.5", names=("mnist", "svhn"))


def test_missing_fraction_determinism_and_never_empty():
  ds = tiny_dataset(n=60, partners=3, seed=1)
  names = ("m0", "m1")
  p1 = missing.hidden_mask(ds, names, {"m1": 0.5}, seed=7)
  assert np.array_equal(p1, missing.hidden_mask(ds, names, {"m1": 0.5}, seed=7))
  assert not np.array_equal(p1, missing.hidden_mask(ds, names, {"m1": 0.5}, seed=8))
  assert p1[0].all()
  # Half of the used m1 instances are hidden, in every pair that holds one: exactly half the pairs.
  used = np.unique(ds.indices[1])
  hidden = np.unique(ds.indices[1][~p1[1]])
  assert hidden.size == round(0.5 * used.size)
  assert not np.isin(ds.indices[1][p1[1]], hidden).any()
  assert (~p1[1]).sum() == hidden.size * ds.partners
  # Both modalities hidden at high rates: no example is left with nothing.
  kept, desc = missing.hide_modalities(ds, names, {"m0": 0.7, "m1": 0.7}, seed=0)
  assert kept.present.any(axis=0).all() and len(kept) < len(ds)
  assert desc["examples"] == len(kept) and desc["hidden"]["m0"] > 0
  dropped, desc = missing.hide_modalities(ds, names, {"m1": 0.5}, seed=7, mode="drop")
  assert dropped.present.all() and len(dropped) == p1[1].sum() == desc["complete"]
  # Hidden entries are zeros in gathered examples; batches carry the (B, M) mask.
  incomplete, _ = missing.hide_modalities(ds, names, {"m1": 0.5}, seed=7)
  xs, _ = incomplete.gather(np.arange(len(incomplete)))
  assert np.all(xs[1][~incomplete.present[1]] == 0) and np.any(xs[1][incomplete.present[1]] != 0)
  batch = next(data.host_batches(incomplete, 8, seed=0, epoch=0))
  rows = batch["rows"]
  assert batch["present"].shape == (8, 2)
  assert np.array_equal(batch["present"], incomplete.present[:, rows].T)
  assert "present" not in next(data.host_batches(dropped, 8, seed=0, epoch=0))


def test_train_step_with_masks_compiles_once():
  model = tiny_model()
  config = train.TrainConfig(k=2, batch_size=8, epochs=1, seed=0)
  mesh = parallel.data_mesh(jax.devices()[:1])
  opt = train.make_optimizer(config)
  state = parallel.replicate(train.init_state(model, opt, jax.random.key(0)), mesh)
  step = train.jit_train_step(train.make_train_step(model, opt, config), mesh)
  xs, _ = tiny_dataset().gather(np.arange(8))
  rng = np.random.default_rng(0)
  for i in range(3):
    present = rng.random((8, 2)) < 0.6
    present[~present.any(1), 0] = True
    batch = parallel.shard_batch({"x": tuple(xs), "mask": np.ones(8, np.float32),
                                  "present": present}, mesh)
    state, metrics = step(state, batch, train.step_key(0, i))
    assert bool(metrics["finite"])
  assert step._cache_size() == 1


def _npz_sources(tmp_path):
  """Two small sources: shapes other than 28×28×1 and 32×32×3 get small MLPs (fast compiles)."""
  return {"mnist": digits_npz(tmp_path / "a.npz", (6, 6, 1), 30, 10, 0),
          "svhn": digits_npz(tmp_path / "b.npz", (6, 6, 3), 30, 10, 1)}


def test_train_run_with_missing(tmp_path):
  from mmvae_jax import experiments
  config = experiments.get("mnist_svhn").config(
      model="mmvae", sources=_npz_sources(tmp_path), k=1, batch_size=8, max_steps=2,
      checkpoint_every=0, log_every=1, eval_batches=1, figures=False, partners=2, latent_dim=4,
      missing="svhn:0.5", seed=0)
  workdir = str(tmp_path / "run")
  runs.train_run(config, workdir, devices=jax.devices()[:1], progress=False)
  info = json.load(open(os.path.join(workdir, "run.json")))
  desc = info["data"]["missing"]
  assert info["config"]["missing"] == "svhn:0.5" and desc["mode"] == "keep"
  assert desc["hidden"]["svhn"] == desc["examples"] // 2 and desc["hidden"]["mnist"] == 0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  with pytest.raises(runs.RunError, match="other values"):  # the mask is part of the run
    runs.train_run(config.__class__(**{**config.to_dict(), "missing": "svhn:0.4"}), workdir,
                   devices=jax.devices()[:1], progress=False)


def test_missing_flag_errors_are_one_line(tmp_path):
  for flag, needle in [("--missing=svhn:0.5,sv:0.5", "unknown modality 'sv'")]:
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "mnist_svhn.py"),
                           flag, f"--workdir={tmp_path / 'w'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "error" in lines[0], proc.stderr
