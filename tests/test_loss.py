"""Correctness of the objectives in `mmvae_jax.loss` against independent float64 references.

The toy model (small random problems; M modalities, K samples, B = 4 data, D = 3 latents):

* experts q_m = Laplace(mu_m, s_m) or Normal(mu_m, s_m), parameters mu, s of shape (M, B, D);
* decoders x_d ~ Normal(A_d z + c_d, sig_d) or Laplace(A_d z + c_d, sig_d), weighted by lam_d;
* prior p(z) = Laplace(0, softmax(l) * D).

The library runs in float32 on these parameters; the references use the same float32 values
promoted to float64 and the same latent samples, drawn with `loss.sample_experts` and the same key.
Everything else (densities, log-mean-exp, mixture density, likelihoods, KLs, gradients) is
recomputed by hand in NumPy float64; the hand-derived gradients are cross-checked against autodiff
of a separate hand-written JAX implementation run in float64 (`jax.enable_x64`).

Gradient semantics (see docs/official-code.md#the-dreg-hook-that-never-fires), with c = 1/M and
w̃ = softmax over K per (m, b) for the stratified ("looser") bound, and c = 1 and w̃ = softmax
over all M·K samples per b for the tight bound:

* decoders and prior (every estimator): Σ_{m,k,b} c·w̃ ∇ lw;
* encoder m, ``legacy``: Σ_{k,b} c·w̃ (∂lw/∂z)(∂z/∂φ_m), every expert's parameters constant inside
  log q_Φ (∂lw/∂z still contains −∂ log q_Φ/∂z);
* encoder m, ``dreg``: the same with c·w̃² instead of c·w̃;
* ``iwae``: the gradient of the bound, i.e. the ``legacy`` path term plus the score term
  −Σ c·w̃ ∂ log q_Φ(z)/∂φ_m at fixed z.

Compile time dominates on small CPUs, so every jitted function here computes many things at once
and is compiled once per shape, with LLVM optimisation off (`FAST`, which changes compile time,
not the arithmetic).
"""
from __future__ import annotations

import functools

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from scipy import stats
from scipy.special import logsumexp

from mmvae_jax import loss
from mmvae_jax.distributions import (FAMILIES, laplace_log_likelihood, normal_log_likelihood,
                                     softmax_scale)

B, D = 4, 3
ENCODER = ("mu", "s")
DECODER = ("A", "c", "l")  # decoders and prior
BOUNDS = (True, False)     # looser, tight
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)

GRAD_RTOL = 1e-4   # float32 library against float64 references, relative to the max abs
VALUE_RTOL = 1e-5
GAP = 5e-2         # a "clear gap": 500 times the gradient tolerance
# The estimators with a NumPy reference here; `dreg_moe` (stratified bound only) has its own
# float64 reference and Monte-Carlo tests in tests/test_estimators.py.
ESTIMATORS = tuple(e for e in loss.ESTIMATORS if e != "dreg_moe")


# ---------------------------------------------------------------------------------------------
# The toy problem.


def _f32(a):
  """float64 copy of the float32-rounded value: library and references use identical numbers."""
  return np.asarray(a, np.float32).astype(np.float64)


def make_problem(num_modalities: int, seed: int, batch: int = B):
  """Random float32-representable parameters and data, as float64 NumPy pytrees."""
  rng = np.random.default_rng(seed)
  sizes = [2 + d for d in range(num_modalities)]
  params = dict(
      mu=_f32(rng.normal(0.0, 0.6, (num_modalities, batch, D))),
      s=_f32(rng.uniform(0.5, 1.5, (num_modalities, batch, D))),
      A=tuple(_f32(rng.normal(0.0, 0.5, (n, D))) for n in sizes),
      c=tuple(_f32(rng.normal(0.0, 0.3, n)) for n in sizes),
      l=_f32(rng.normal(0.0, 0.4, D)),
  )
  data = dict(
      x=tuple(_f32(rng.normal(0.0, 1.0, (batch, n))) for n in sizes),
      sig=_f32(rng.uniform(0.7, 1.3, num_modalities)),
      lam=_f32(rng.uniform(0.5, 2.0, num_modalities)),
  )
  return params, data


def to_jax(tree, dtype=jnp.float32):
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def to_np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def build(params, data, post: str, lik: str):
  """The toy model with the library's distributions: experts, per-modality λ-weighted
  likelihoods, their sum, and the prior."""
  num_modalities = params["mu"].shape[0]
  posteriors = [FAMILIES[post](params["mu"][m], params["s"][m]) for m in range(num_modalities)]
  prior = distrax.Laplace(jnp.zeros_like(params["l"]), softmax_scale(params["l"], eta=0.0))
  lik_fn = normal_log_likelihood if lik == "normal" else laplace_log_likelihood

  def modality(d):
    def log_lik(z):
      mean = z @ params["A"][d].T + params["c"][d]
      return data["lam"][d] * lik_fn(data["x"][d], mean, data["sig"][d], event_ndim=1)
    return log_lik

  log_liks = [modality(d) for d in range(num_modalities)]
  return posteriors, log_liks, (lambda z: sum(f(z) for f in log_liks)), prior


@functools.lru_cache(maxsize=None)
def _sampler(post, num_samples):
  return fast_jit(lambda mu, s, key: loss.sample_experts(
      key, [FAMILIES[post](mu[m], s[m]) for m in range(mu.shape[0])], num_samples))


def draw_z(params, post, key, num_samples, dtype=jnp.float32):
  """The latents the library draws for `key`: (M, K, B, D), as float64 NumPy."""
  mu, s = jnp.asarray(params["mu"], dtype), jnp.asarray(params["s"], dtype)
  return np.asarray(_sampler(post, num_samples)(mu, s, key), np.float64)


# ---------------------------------------------------------------------------------------------
# NumPy float64 reference: values and hand-derived gradients.


def np_lme(a, axis):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  n = np.prod([a.shape[i] for i in axes])
  return logsumexp(a, axis=axes) - np.log(n)


def np_softmax(a, axis):
  return np.exp(a - logsumexp(a, axis=axis, keepdims=True))


def np_density(x, loc, scale, family):
  """Elementwise log density and its derivatives with respect to x, loc and scale."""
  if family == "laplace":
    lp = -np.log(2.0 * scale) - np.abs(x - loc) / scale
    dx = -np.sign(x - loc) / scale
    dscale = -1.0 / scale + np.abs(x - loc) / scale**2
  else:
    lp = -0.5 * np.log(2.0 * np.pi * scale**2) - 0.5 * ((x - loc) / scale)**2
    dx = -(x - loc) / scale**2
    dscale = -1.0 / scale + (x - loc)**2 / scale**3
  return lp, dx, -dx, dscale


def np_log_weights(z, params, data, post, lik):
  """lw (M, K, B) and the pieces of its gradient, all float64."""
  mu, s, l = params["mu"], params["s"], params["l"]
  num_modalities = mu.shape[0]
  # Every expert m' at every sample z[m, k, b]: (M', M, K, B, D).
  lq_el, dlq_dz, dlq_dmu, dlq_ds = np_density(z[None], mu[:, None, None], s[:, None, None], post)
  lq = lq_el.sum(-1)                                  # (M', M, K, B)
  resp = np_softmax(lq, 0)                            # responsibilities r_m'(z)
  bp = np_softmax(l, 0) * D                           # prior Laplace(0, softmax(l) D)
  log_lik, dlik_dz, dlik_dmean = 0.0, 0.0, []
  for d in range(num_modalities):
    mean = z @ params["A"][d].T + params["c"][d]     # (M, K, B, n_d)
    lp, _, dmean, _ = np_density(data["x"][d], mean, data["sig"][d], lik)
    log_lik = log_lik + data["lam"][d] * lp.sum(-1)
    dlik_dz = dlik_dz + data["lam"][d] * dmean @ params["A"][d]
    dlik_dmean.append(dmean)
  lw = np.sum(-np.log(2.0 * bp) - np.abs(z) / bp, -1) + log_lik - np_lme(lq, 0)
  dlw_dz = -np.sign(z) / bp + dlik_dz - np.sum(resp[..., None] * dlq_dz, axis=0)
  return dict(lw=lw, dlw_dz=dlw_dz, dprior_dbp=-1.0 / bp + np.abs(z) / bp**2,
              dlik_dmean=dlik_dmean, resp=resp, dlq_dmu=dlq_dmu, dlq_ds=dlq_ds)


def np_bound(lw, looser):
  return np.mean(np_lme(lw, 1), axis=0) if looser else np_lme(lw, (0, 1))


def np_reference(z, params, data, post, lik, looser):
  """Value (B,) and the `legacy`, `dreg` and `iwae` gradients of the summed bound, float64."""
  num_modalities = z.shape[0]
  pc = np_log_weights(z, params, data, post, lik)
  lw = pc["lw"]
  if looser:
    coef, w = 1.0 / num_modalities, np_softmax(lw, 1)
  else:
    coef, w = 1.0, np_softmax(lw, (0, 1))
  g = coef * w  # ∂ bound / ∂ lw, (M, K, B)
  lam = data["lam"]
  # Decoders and prior: Σ c w̃ ∇θ lw.
  decoder = dict(
      A=tuple(lam[d] * np.einsum("mkb,mkbn,mkbi->ni", g, pc["dlik_dmean"][d], z)
              for d in range(num_modalities)),
      c=tuple(lam[d] * np.einsum("mkb,mkbn->n", g, pc["dlik_dmean"][d])
              for d in range(num_modalities)))
  v = np.einsum("mkb,mkbi->i", g, pc["dprior_dbp"])
  sm = np_softmax(params["l"], 0)
  decoder["l"] = D * (sm * v - sm * np.dot(sm, v))  # chain rule through softmax(l) * D
  # Encoders, path term: ∂z/∂mu = 1, ∂z/∂s = (z - mu)/s.
  eps = (z - params["mu"][:, None]) / params["s"][:, None]

  def path(weight):
    return dict(mu=np.einsum("mkb,mkbi->mbi", weight, pc["dlw_dz"]),
                s=np.einsum("mkb,mkbi->mbi", weight, pc["dlw_dz"] * eps))

  # Score term of the full gradient: −Σ_{m,k} c w̃ r_m'(z) ∂ log q_m'(z)/∂φ_m' at fixed z.
  score = dict(mu=-np.einsum("mkb,jmkb,jmkbi->jbi", g, pc["resp"], pc["dlq_dmu"]),
               s=-np.einsum("mkb,jmkb,jmkbi->jbi", g, pc["resp"], pc["dlq_ds"]))
  legacy, dreg = path(g), path(coef * w**2)
  grads = dict(legacy=dict(legacy, **decoder), dreg=dict(dreg, **decoder),
               iwae=dict({k: legacy[k] + score[k] for k in ENCODER}, **decoder))
  return np_bound(lw, looser), grads


# ---------------------------------------------------------------------------------------------
# Independent float64 JAX reference (hand-written densities, no distrax, no library code):
# autodiff of the bound, the surrogates of `legacy` and `dreg`, and variants with a misplaced
# stop-gradient that a correct implementation must NOT match.


def _ref_log_weights(p, data, z, q_params, post, lik, stop_own=None, z_q=None):
  """lw (M, K, B) with log q_Φ evaluated from `q_params` = (mu, s) at `z_q` (default z).

  stop_own: (mu, s) used instead for each sample's own expert only (diagonal m' = m).
  """
  mu, s = q_params
  z_q = z if z_q is None else z_q

  def elementwise(x, loc, scale, family):
    if family == "laplace":
      return -jnp.log(2.0 * scale) - jnp.abs(x - loc) / scale
    return -0.5 * jnp.log(2.0 * jnp.pi * scale**2) - 0.5 * ((x - loc) / scale)**2

  lq = elementwise(z_q[None], mu[:, None, None], s[:, None, None], post).sum(-1)  # (M', M, K, B)
  if stop_own is not None:
    lq_own = elementwise(z_q[None], stop_own[0][:, None, None], stop_own[1][:, None, None],
                         post).sum(-1)
    lq = jnp.where(jnp.eye(mu.shape[0], dtype=bool)[:, :, None, None], lq_own, lq)
  log_q_mix = jax.nn.logsumexp(lq, axis=0) - jnp.log(mu.shape[0])
  bp = jax.nn.softmax(p["l"]) * D
  log_prior = jnp.sum(-jnp.log(2.0 * bp) - jnp.abs(z) / bp, -1)
  log_lik = 0.0
  for d in range(mu.shape[0]):
    mean = z @ p["A"][d].T + p["c"][d]
    log_lik = log_lik + data["lam"][d] * elementwise(data["x"][d], mean, data["sig"][d],
                                                     lik).sum(-1)
  return log_prior + log_lik - log_q_mix


def _ref_variants(post, lik, looser):
  sg = jax.lax.stop_gradient
  axes = (1,) if looser else (0, 1)

  def bound(lw):
    if looser:
      return jnp.mean(jax.nn.logsumexp(lw, axis=1) - jnp.log(lw.shape[1]), axis=0)
    return jax.nn.logsumexp(lw, axis=(0, 1)) - jnp.log(lw.shape[0] * lw.shape[1])

  def coef(lw):
    return 1.0 / lw.shape[0] if looser else 1.0

  def weights(lw):
    return jax.nn.softmax(lw, axis=axes)

  def stopped(p, names):
    return {k: (jax.tree.map(sg, v) if k in names else v) for k, v in p.items()}

  def lw_of(p, data, eps, q_params, **kw):
    z = p["mu"][:, None] + p["s"][:, None] * eps
    return _ref_log_weights(p, data, z, q_params, post, lik, **kw)

  def q_stopped(p):
    return sg(p["mu"]), sg(p["s"])

  def iwae(p, data, eps):  # live everything
    return bound(lw_of(p, data, eps, (p["mu"], p["s"]))).sum()

  def stl(p, data, eps):  # legacy surrogate: q parameters stopped in log q_Φ, w̃ constant
    lw = lw_of(p, data, eps, q_stopped(p))
    return coef(lw) * jnp.sum(sg(weights(lw)) * lw)

  def dreg(p, data, eps):  # true DReG as two surrogates: decoders/prior and encoders
    lw_dec = lw_of(stopped(p, ENCODER), data, eps, q_stopped(p))  # z constant, θ and ψ live
    lw_enc = lw_of(stopped(p, DECODER), data, eps, q_stopped(p))  # z live, θ and ψ constant
    w = sg(weights(lw_dec))
    return coef(lw_dec) * (jnp.sum(w * lw_dec) + jnp.sum(w**2 * lw_enc))

  # Misplaced stop-gradients. (Not stopping the experts inside log q_Φ at all gives exactly the
  # `iwae` gradient, which the encoder-gap test already separates from `legacy` and `dreg`.)
  def own_only(p, data, eps):  # only the sampling expert's own density stopped
    lw = lw_of(p, data, eps, (p["mu"], p["s"]), stop_own=q_stopped(p))
    return coef(lw) * jnp.sum(sg(weights(lw)) * lw)

  def no_q_path(p, data, eps):  # z stopped inside log q_Φ as well (drops −∂ log q_Φ/∂z)
    z_sg = sg(p["mu"][:, None] + p["s"][:, None] * eps)
    lw = lw_of(p, data, eps, q_stopped(p), z_q=z_sg)
    return coef(lw) * jnp.sum(sg(weights(lw)) * lw)

  def live_weights(p, data, eps):  # w̃ not stopped
    lw = lw_of(p, data, eps, q_stopped(p))
    return coef(lw) * jnp.sum(weights(lw) * lw)

  return dict(iwae=iwae, stl=stl, dreg=dreg, own_only=own_only,
              no_q_path=no_q_path, live_weights=live_weights)


@functools.lru_cache(maxsize=None)
def _ref_grads_fn(post, lik):
  variants = {lo: _ref_variants(post, lik, lo) for lo in BOUNDS}

  @fast_jit
  def run(p, data, eps):
    return {lo: {name: jax.grad(f)(p, data, eps) for name, f in vs.items()}
            for lo, vs in variants.items()}

  return run


def jax_reference_grads(z, params, data, post, lik):
  """{looser: {variant: grads}} by float64 autodiff at the same z."""
  eps = (z - params["mu"][:, None]) / params["s"][:, None]
  with jax.enable_x64(True):
    out = _ref_grads_fn(post, lik)(to_jax(params, jnp.float64), to_jax(data, jnp.float64),
                                   jnp.asarray(eps, jnp.float64))
    return to_np(out)


# ---------------------------------------------------------------------------------------------
# The library under test: one compiled function per configuration, both bounds, all estimators.


def _bound_name(looser):
  return "looser" if looser else "tight"


def lib_raw(num_samples, post, lik, bounds=BOUNDS, estimators=ESTIMATORS):
  """(params, data, key) -> {(looser, estimator): (per-example value (B,), grads of its sum)}."""
  def run(params, data, key):
    out = {}
    for looser in bounds:
      for est in estimators:
        def objective(p):
          posteriors, _, log_lik, prior = build(p, data, post, lik)
          value = loss.moe_iwae(key, posteriors, log_lik, prior, num_samples, looser=looser,
                                estimator=est)
          return value.sum(), value
        (_, value), grads = jax.value_and_grad(objective, has_aux=True)(params)
        out[_bound_name(looser), est] = (value, grads)
    return out
  return run


@functools.lru_cache(maxsize=None)
def lib_fn(num_samples, post, lik, bounds=BOUNDS, estimators=ESTIMATORS):
  """`lib_raw`, jitted once per configuration."""
  return fast_jit(lib_raw(num_samples, post, lik, bounds, estimators))


def by_bool(out):
  """{("looser"|"tight", est): v} -> {(looser: bool, est): v} as float64 NumPy."""
  return {(name == "looser", est): to_np(v) for (name, est), v in out.items()}


def leaves_with_names(tree, names=None):
  tree = {k: tree[k] for k in (names or tree)}
  return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_tree_close(got, want, rtol, names=None, what=""):
  """|got - want| <= rtol * max|want| for every leaf (leaves of the top-level keys `names`)."""
  got_l, want_l = leaves_with_names(got, names), leaves_with_names(want, names)
  assert got_l.keys() == want_l.keys()
  for name, w in want_l.items():
    g = got_l[name]
    assert g.shape == w.shape, (what, name, g.shape, w.shape)
    err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-12)
    assert err <= rtol, f"{what} {name}: relative error {err:.3g} > {rtol:g}"


def rel_gap(a, b, names):
  """max over leaves of max|a - b| / max|b|."""
  a_l, b_l = leaves_with_names(a, names), leaves_with_names(b, names)
  return max(np.max(np.abs(a_l[n] - b_l[n])) / np.max(np.abs(b_l[n])) for n in b_l)


# (M, K, posterior family, likelihood family); every configuration runs both bounds.
CONFIGS = [(m, k, "laplace", "normal") for m in (2, 3) for k in (1, 7)]
CONFIGS += [(2, 7, "normal", "laplace")]
CASES = [(c, lo) for c in CONFIGS for lo in BOUNDS]
CASE_IDS = [f"M{m}-K{k}-q{p}-x{x}-{'looser' if lo else 'tight'}" for (m, k, p, x), lo in CASES]
# The float64 autodiff cross-check (and the misplaced stop-gradient variants) on two of them.
AUTODIFF_CONFIGS = [(3, 7, "laplace", "normal"), (2, 7, "normal", "laplace")]
AUTODIFF_CASES = [(c, lo) for c in AUTODIFF_CONFIGS for lo in BOUNDS]
AUTODIFF_IDS = [f"M{m}-K{k}-q{p}-x{x}-{'looser' if lo else 'tight'}"
                for (m, k, p, x), lo in AUTODIFF_CASES]


@functools.lru_cache(maxsize=None)
def run_config(config):
  """Library outputs and NumPy references for one configuration (shared by tests)."""
  m, k, post, lik = config
  params, data = make_problem(m, seed=10 * m + k)
  key = jax.random.key(100 * m + k)
  lib = by_bool(lib_fn(k, post, lik)(to_jax(params), to_jax(data), key))
  z = draw_z(params, post, key, k)
  ref = {lo: np_reference(z, params, data, post, lik, lo) for lo in BOUNDS}
  return dict(lib=lib, ref=ref, z=z, params=params, data=data)


@functools.lru_cache(maxsize=None)
def run_autodiff(config):
  c = run_config(config)
  _, _, post, lik = config
  return jax_reference_grads(c["z"], c["params"], c["data"], post, lik)


# ---------------------------------------------------------------------------------------------
# 1. Values.


@pytest.mark.parametrize("config,looser", CASES, ids=CASE_IDS)
def test_moe_iwae_value_matches_numpy(config, looser):
  c = run_config(config)
  want = c["ref"][looser][0]
  for est in ESTIMATORS:
    value = c["lib"][looser, est][0]
    assert value.shape == (B,)
    np.testing.assert_allclose(value, want, rtol=VALUE_RTOL, atol=0)
    # The estimator changes the gradient only, never the value.
    np.testing.assert_array_equal(value, c["lib"][looser, "iwae"][0])


@pytest.mark.parametrize("config", CONFIGS, ids=[f"M{m}-K{k}-q{p}" for m, k, p, _ in CONFIGS])
def test_tight_at_least_looser_per_example(config):
  c = run_config(config)
  tight, looser = c["lib"][False, "iwae"][0], c["lib"][True, "iwae"][0]
  assert np.all(tight >= looser - 1e-5)
  assert np.all(c["ref"][False][0] - c["ref"][True][0] > 1e-4)  # really different functions


@functools.lru_cache(maxsize=None)
def _unimodal_fn(num_samples, post):

  @fast_jit
  def run(params, data, key):
    posteriors, _, log_lik, prior = build(params, data, post, "normal")
    out = {est: loss.iwae(key, posteriors[0], log_lik, prior, num_samples, estimator=est)
           for est in ESTIMATORS}
    out["elbo"] = loss.elbo(key, posteriors[0], log_lik, prior)
    # The ELBO's sample: one draw with the first half of the split key.
    out["elbo_z"] = posteriors[0].sample(seed=jax.random.split(key)[0])
    return out

  return run


def np_kl_to_laplace(post, mu, s, scale_p):
  """Closed-form KL(q || Laplace(0, scale_p)) per element, float64."""
  if post == "laplace":
    return (-np.log(s / scale_p) + np.abs(mu) / scale_p + (s / scale_p) * np.exp(-np.abs(mu) / s)
            - 1.0)
  folded = (s * np.sqrt(2 / np.pi) * np.exp(-0.5 * (mu / s)**2)
            + mu * (1.0 - 2.0 * stats.norm.cdf(-mu / s)))
  return -0.5 * np.log(2 * np.pi * np.e * s**2) + np.log(2 * scale_p) + folded / scale_p


@pytest.mark.parametrize("post", ["laplace", "normal"])
@pytest.mark.parametrize("num_samples", [1, 7])
def test_iwae_and_elbo_values_match_numpy(post, num_samples):
  params, data = make_problem(1, seed=3 + num_samples)
  key = jax.random.key(7 + num_samples)
  out = to_np(_unimodal_fn(num_samples, post)(to_jax(params), to_jax(data), key))
  # IWAE (eq. (2)): log-mean-exp over K of the log weights.
  z = draw_z(params, post, key, num_samples)
  lw = np_log_weights(z, params, data, post, "normal")["lw"][0]
  for est in ESTIMATORS:
    np.testing.assert_allclose(out[est], np_lme(lw, 0), rtol=VALUE_RTOL, atol=0)
  # ELBO: λ log p(x | z) − KL(q || p) with the closed-form KL (Laplace-Laplace, Normal-Laplace).
  z1 = out["elbo_z"]
  assert z1.shape == (B, D)
  mean = z1 @ params["A"][0].T + params["c"][0]
  log_lik = data["lam"][0] * np_density(data["x"][0], mean, data["sig"][0], "normal")[0].sum(-1)
  kl = np_kl_to_laplace(post, params["mu"][0], params["s"][0],
                        np_softmax(params["l"], 0) * D).sum(-1)
  np.testing.assert_allclose(out["elbo"], log_lik - kl, rtol=VALUE_RTOL, atol=0)


def np_moe_elbo(params, data, post, lik, z_self):
  """Official m_elbo value from the self samples z_self (M, B, D), float64."""
  num_modalities = z_self.shape[0]
  mu, s = params["mu"], params["s"]
  log_q = lambda r, z: np_density(z, mu[r], s[r], post)[0].sum(-1)
  total = 0.0
  for d in range(num_modalities):
    z = z_self[d]
    mean = z @ params["A"][d].T + params["c"][d]
    recon = data["lam"][d] * np_density(data["x"][d], mean, data["sig"][d], lik)[0].sum(-1)
    weight = 1.0 + sum(np.exp(log_q(r, z) - log_q(d, z)) for r in range(num_modalities) if r != d)
    total = total + weight * recon
  bp = np_softmax(params["l"], 0) * D
  kl = sum(np_kl_to_laplace(post, mu[r], s[r], bp).sum(-1) for r in range(num_modalities))
  return (total - kl) / num_modalities


def _ref_moe_elbo(post, lik):
  """Independent float64 JAX transcription of m_elbo with its stop-gradients."""
  sg = jax.lax.stop_gradient

  def dens(x, loc, scale, family):
    if family == "laplace":
      return -jnp.log(2.0 * scale) - jnp.abs(x - loc) / scale
    return -0.5 * jnp.log(2.0 * jnp.pi * scale**2) - 0.5 * ((x - loc) / scale)**2

  def kl(mu, s, bp):
    if post == "laplace":
      return -jnp.log(s / bp) + jnp.abs(mu) / bp + (s / bp) * jnp.exp(-jnp.abs(mu) / s) - 1
    folded = (s * jnp.sqrt(2 / jnp.pi) * jnp.exp(-0.5 * (mu / s)**2)
              + mu * jax.scipy.special.erf(mu / (s * jnp.sqrt(2.0))))
    return -0.5 * jnp.log(2 * jnp.pi * jnp.e * s**2) + jnp.log(2 * bp) + folded / bp

  def value(p, data, eps):
    mu, s = p["mu"], p["s"]
    num_modalities = mu.shape[0]
    bp = jax.nn.softmax(p["l"]) * D
    total = 0.0
    for d in range(num_modalities):
      z = mu[d] + s[d] * eps[d]
      zs = sg(z)
      denominator = sg(dens(zs, mu[d], s[d], post).sum(-1))
      weight = 1.0
      for r in range(num_modalities):
        if r != d:
          weight = weight + jnp.exp(dens(zs, mu[r], s[r], post).sum(-1) - denominator)
      mean = z @ p["A"][d].T + p["c"][d]
      total = total + weight * data["lam"][d] * dens(data["x"][d], mean, data["sig"][d],
                                                     lik).sum(-1)
    kls = sum(kl(mu[r], s[r], bp).sum(-1) for r in range(num_modalities))
    return jnp.sum((total - kls) / num_modalities)

  return value


@pytest.mark.parametrize("num_modalities,post,lik",
                         [(3, "laplace", "normal"), (2, "normal", "laplace")])
def test_moe_elbo_value_and_gradient(num_modalities, post, lik):
  params, data = make_problem(num_modalities, seed=31 + num_modalities)
  key = jax.random.key(5)

  @fast_jit
  def run(p, dt):
    def objective(q):
      posteriors, log_liks, _, prior = build(q, dt, post, lik)
      value = loss.moe_elbo(key, posteriors, log_liks, prior)
      return value.sum(), value
    out = jax.value_and_grad(objective, has_aux=True)(p)
    # The self samples: expert d uses the d-th of 2M split keys.
    keys = jax.random.split(key, 2 * num_modalities)
    posteriors = build(p, dt, post, lik)[0]
    return out, jnp.stack([q.sample(seed=k) for q, k in zip(posteriors, keys)])

  ((_, value), grads), z_self = to_np(run(to_jax(params), to_jax(data)))
  want = np_moe_elbo(params, data, post, lik, z_self)
  np.testing.assert_allclose(value, want, rtol=VALUE_RTOL, atol=0)
  # The gradient with the official stop-gradients: z_d and the denominator stopped inside the
  # weight; the numerator live in encoder r; the reconstruction live through z_d.
  eps = (z_self - params["mu"]) / params["s"]
  with jax.enable_x64(True):
    ref = fast_jit(jax.grad(_ref_moe_elbo(post, lik)))(
        to_jax(params, jnp.float64), to_jax(data, jnp.float64), jnp.asarray(eps, jnp.float64))
    ref = to_np(ref)
  assert_tree_close(grads, ref, GRAD_RTOL, what="moe_elbo")


# ---------------------------------------------------------------------------------------------
# 2. Bound ordering over many draws.


def test_bounds_ordered_and_increasing_in_k():
  """tight >= looser on every draw and example; the mean IWAE bound (and both MoE bounds)
  increases from K = 1 to 5 to 30 by more than 4 standard errors."""
  params1, data1 = make_problem(1, seed=43)
  params2, data2 = make_problem(2, seed=44)
  n_draws, ks = 256, (1, 5, 30)

  @fast_jit
  def run(p1, d1, p2, d2, keys):
    def one(key):
      post1, _, ll1, prior1 = build(p1, d1, "laplace", "normal")
      post2, _, ll2, prior2 = build(p2, d2, "laplace", "normal")
      out = {}
      for k in ks:
        out["iwae", k] = loss.iwae(key, post1[0], ll1, prior1, k)
        for looser in BOUNDS:
          out[_bound_name(looser), k] = loss.moe_iwae(key, post2, ll2, prior2, k, looser=looser)
      return out
    return jax.vmap(one)(keys)

  out = to_np(run(*to_jax((params1, data1, params2, data2)),
                  jax.random.split(jax.random.key(9), n_draws)))
  for k in ks:
    assert np.all(out["tight", k] >= out["looser", k] - 1e-5)
  for kind in ("iwae", "looser", "tight"):
    per_draw = {k: out[kind, k].mean(-1) for k in ks}
    mean = {k: v.mean() for k, v in per_draw.items()}
    se = {k: v.std(ddof=1) / np.sqrt(n_draws) for k, v in per_draw.items()}
    for lo, hi in ((1, 5), (5, 30)):
      assert mean[hi] - mean[lo] > 4 * np.hypot(se[lo], se[hi]), (kind, mean, se)


# ---------------------------------------------------------------------------------------------
# 3. Gradients.


@pytest.mark.parametrize("config,looser", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_gradient_matches_hand_derived(config, looser, estimator):
  c = run_config(config)
  assert_tree_close(c["lib"][looser, estimator][1], c["ref"][looser][1][estimator], GRAD_RTOL,
                    what=estimator)


@pytest.mark.parametrize("config,looser", AUTODIFF_CASES, ids=AUTODIFF_IDS)
def test_hand_derived_gradients_equal_float64_autodiff(config, looser):
  """Two independent derivations: the NumPy formulas equal float64 autodiff of the bound (iwae)
  and of the surrogates of legacy and dreg; and the library matches the
  autodiff references too."""
  ref = run_config(config)["ref"][looser][1]
  auto = run_autodiff(config)[looser]
  for est, variant in (("legacy", "stl"), ("dreg", "dreg"), ("iwae", "iwae")):
    assert_tree_close(ref[est], auto[variant], 1e-10, what=f"numpy {est} vs autodiff")
    assert_tree_close(run_config(config)["lib"][looser, est][1], auto[variant], GRAD_RTOL,
                      what=f"library {est} vs autodiff")


@pytest.mark.parametrize("config,looser", CASES, ids=CASE_IDS)
def test_estimators_share_decoder_and_prior_gradients(config, looser):
  lib = {est: run_config(config)["lib"][looser, est][1] for est in ESTIMATORS}
  assert_tree_close(lib["legacy"], lib["dreg"], 1e-6, names=DECODER, what="legacy vs dreg")
  assert_tree_close(lib["iwae"], lib["legacy"], GRAD_RTOL, names=DECODER, what="iwae vs legacy")


@pytest.mark.parametrize("config,looser", CASES, ids=CASE_IDS)
def test_estimators_differ_on_encoders(config, looser):
  lib = {est: run_config(config)["lib"][looser, est][1] for est in ESTIMATORS}
  assert rel_gap(lib["legacy"], lib["iwae"], ENCODER) > GAP
  assert rel_gap(lib["dreg"], lib["iwae"], ENCODER) > GAP
  if looser and config[1] == 1:
    # One sample per stratum: w̃ = 1 = w̃², so legacy and dreg coincide.
    assert_tree_close(lib["dreg"], lib["legacy"], 1e-6, names=ENCODER)
  else:
    assert rel_gap(lib["legacy"], lib["dreg"], ENCODER) > GAP


@pytest.mark.parametrize("config,looser", AUTODIFF_CASES, ids=AUTODIFF_IDS)
def test_misplaced_stop_gradients_are_detected(config, looser):
  """Variants with a stop-gradient in the wrong place differ clearly from `legacy`, so the
  tests above catch them; the correct surrogate matches it."""
  auto = run_autodiff(config)[looser]
  legacy = run_config(config)["lib"][looser, "legacy"][1]
  assert_tree_close(legacy, auto["stl"], GRAD_RTOL, what="stl surrogate")
  for variant in ("own_only", "no_q_path"):
    assert rel_gap(auto[variant], legacy, ENCODER) > GAP, variant
  assert rel_gap(auto["live_weights"], legacy, ENCODER + DECODER) > GAP


@pytest.mark.parametrize("config", AUTODIFF_CONFIGS[:1], ids=["M3-K7"])
def test_library_in_float64_to_1e_9(config):
  """The library itself under x64: values and all gradients to 1e-9 relative."""
  m, k, post, lik = config
  params, data = make_problem(m, seed=77)
  key = jax.random.key(3)
  with jax.enable_x64(True):
    lib = by_bool(lib_fn(k, post, lik)(to_jax(params, jnp.float64), to_jax(data, jnp.float64),
                                       key))
    z = draw_z(params, post, key, k, dtype=jnp.float64)
  for looser in BOUNDS:
    value, grads = np_reference(z, params, data, post, lik, looser)
    for est in ESTIMATORS:
      np.testing.assert_allclose(lib[looser, est][0], value, rtol=1e-10, atol=0)
      assert_tree_close(lib[looser, est][1], grads[est], 1e-9, what=f"{est} x64")


# ---------------------------------------------------------------------------------------------
# 4. Unimodal DReG: unbiased, higher SNR than IWAE; the legacy (IWAE-STL) estimator is biased.


def test_dreg_unbiased_and_higher_snr_legacy_biased():
  rng = np.random.default_rng(123)
  batch, n_obs, num_samples, n_draws = 2, 4, 30, 3000
  a = jnp.asarray(rng.normal(size=(n_obs, D)), jnp.float32)
  c0 = jnp.asarray(rng.normal(size=n_obs), jnp.float32)
  x = jnp.asarray(2.0 * rng.normal(size=(batch, n_obs)), jnp.float32)
  # A Normal posterior deliberately away from the true (Gaussian) posterior.
  mu0 = jnp.asarray(rng.normal(size=(batch, D)), jnp.float32)
  s0 = jnp.asarray(np.exp(0.3 * rng.normal(size=(batch, D))), jnp.float32)
  prior = distrax.Normal(jnp.zeros(D), jnp.ones(D))
  log_lik = lambda z: normal_log_likelihood(x, z @ a.T + c0, 1.0, event_ndim=1)

  @fast_jit
  def encoder_grads(keys):
    def per_key(key):
      out = {}
      for est in ESTIMATORS:
        f = lambda mu, s: loss.iwae(key, distrax.Normal(mu, s), log_lik, prior, num_samples,
                                    estimator=est).sum()
        gmu, gs = jax.grad(f, argnums=(0, 1))(mu0, s0)
        out[est] = jnp.concatenate([gmu.ravel(), gs.ravel()])
      return out
    return jax.vmap(per_key)(keys)

  g = to_np(encoder_grads(jax.random.split(jax.random.key(2024), n_draws)))
  snr = {k: float(np.mean(np.abs(v.mean(0)) / v.std(0, ddof=1))) for k, v in g.items()}

  def paired_z(est):  # the estimators share every sample: compare per-draw differences
    diff = g[est] - g["iwae"]
    return diff.mean(0) / (diff.std(0, ddof=1) / np.sqrt(n_draws))

  z_dreg, z_legacy = paired_z("dreg"), paired_z("legacy")
  print(f"\n[M=1, K={num_samples}, {n_draws} draws, {g['iwae'].shape[1]} encoder parameters] "
        f"SNR (mean over parameters of |mean|/std): iwae {snr['iwae']:.3f}, "
        f"dreg {snr['dreg']:.3f}, legacy {snr['legacy']:.3f}; max |paired z| vs iwae: "
        f"dreg {np.max(np.abs(z_dreg)):.2f}, legacy {np.max(np.abs(z_legacy)):.1f}")
  # DReG is unbiased: its mean equals IWAE's within 4 standard errors (paired, and unpaired).
  assert np.all(np.abs(z_dreg) < 4.0), z_dreg
  se = np.sqrt((g["dreg"].var(0, ddof=1) + g["iwae"].var(0, ddof=1)) / n_draws)
  assert np.all(np.abs(g["dreg"].mean(0) - g["iwae"].mean(0)) < 4 * se)
  assert snr["dreg"] > 2.0 * snr["iwae"], snr
  # Legacy (IWAE-STL) is biased for K > 1: far more than 4 standard errors on some parameter.
  assert np.max(np.abs(z_legacy)) > 10.0, z_legacy
  assert np.max(np.abs(g["legacy"].mean(0) - g["iwae"].mean(0)) / se) > 10.0


# ---------------------------------------------------------------------------------------------
# 5. Transformations (everything above runs under jit and grad): vmap over keys and over examples, sharded jit, shard_map.


def test_vmap_over_keys_matches_single_calls():
  config = CONFIGS[1]  # M2-K7, laplace
  c = run_config(config)
  _, k, post, lik = config
  params, data = to_jax(c["params"]), to_jax(c["data"])
  keys = jax.random.split(jax.random.key(2), 3)
  fn = lib_fn(k, post, lik)  # compiled already by run_config
  batched = to_np(fast_jit(jax.vmap(lib_raw(k, post, lik, bounds=(False,)),
                                    in_axes=(None, None, 0)))(params, data, keys))
  for i, key in enumerate(keys):
    single = to_np(fn(params, data, key))
    for name, (value, grads) in single.items():
      if name not in batched:
        continue
      np.testing.assert_allclose(batched[name][0][i], value, rtol=1e-6)
      assert_tree_close(jax.tree.map(lambda v: v[i], batched[name][1]), grads, 1e-5,
                        what=f"vmap {name} key {i}")


def _split_shared(params, data):
  shared = {k: v for k, v in params.items() if k not in ENCODER}
  shared.update(sig=data["sig"], lam=data["lam"])
  return shared


def _per_example_fn(estimator, num_samples=5):
  """Objective of one example (a batch of 1 with its own key), vmapped over examples.

  Arguments: shared (decoders, prior, sig, lam), mu and s (M, B, D), x (tuple of (B, n_d)), keys.
  """
  def one(shared, mu_b, s_b, x_b, key_b):
    params = {k: v for k, v in shared.items() if k not in ("sig", "lam")}
    params.update(mu=mu_b[:, None], s=s_b[:, None])
    data = dict(x=tuple(v[None] for v in x_b), sig=shared["sig"], lam=shared["lam"])
    posteriors, _, log_lik, prior = build(params, data, "laplace", "normal")
    return loss.moe_iwae(key_b, posteriors, log_lik, prior, num_samples,
                         estimator=estimator)[0]
  return jax.vmap(one, in_axes=(None, 1, 1, 0, 0))


def _mesh():
  devices = jax.devices()
  assert len(devices) == 4, "conftest.py should provide 4 fake CPU devices"
  return Mesh(np.asarray(devices), ("data",), axis_types=(AxisType.Auto,))


ESTIMATORS_SHARD_MAP = ("legacy", "dreg", "dreg_moe")  # stop-gradients / a custom_vjp


def test_shard_map_data_parallel_matches_unsharded():
  """Per-device data parallelism with shard_map over 4 devices: the per-example objectives, and
  the gradients of their sum (replicated decoder and prior parameters are reduced over devices),
  equal the unsharded computation; vmap over examples equals a loop."""
  mesh = _mesh()
  params, data = make_problem(2, seed=55, batch=8)
  p, dt = to_jax(params), to_jax(data)
  keys = jax.random.split(jax.random.key(5), 8)
  shared = _split_shared(p, dt)
  specs = (P(), P(None, "data"), P(None, "data"), P("data"), P("data"))

  def runner(sharded):
    @fast_jit
    def run(shared, mu, s, x, keys):
      out = {}
      for est in ESTIMATORS_SHARD_MAP:
        fn = _per_example_fn(est)
        if sharded:
          fn = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P("data"))
        total = lambda a, b, c: (lambda v: (v.sum(), v))(fn(a, b, c, x, keys))
        out[est] = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(shared, mu, s)
      return out
    return run

  ref = to_np(runner(False)(shared, p["mu"], p["s"], dt["x"], keys))
  got = to_np(runner(True)(shared, p["mu"], p["s"], dt["x"], keys))
  for est in ESTIMATORS_SHARD_MAP:
    (_, v_ref), g_ref = ref[est]
    (_, v_got), g_got = got[est]
    np.testing.assert_allclose(v_got, v_ref, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.max(np.abs(b)))
  # vmap over examples equals one call per example (values only).
  single = fast_jit(lambda sh, mu, s, x, key: _per_example_fn("dreg")(
      sh, mu, s, x, key[None])[0])
  for b in (0, 5):
    v = single(shared, p["mu"][:, b:b + 1], p["s"][:, b:b + 1],
               tuple(x[b:b + 1] for x in dt["x"]), keys[b])
    np.testing.assert_allclose(v, ref["dreg"][0][1][b], rtol=1e-6)


def test_sharded_jit_matches_unsharded():
  """The batch (B = 8) sharded over the 4 devices with NamedSharding under plain jit: the same
  per-example values and gradients as unsharded (partitionable threefry: same samples)."""
  mesh = _mesh()
  params, data = make_problem(2, seed=54, batch=8)
  p, dt = to_jax(params), to_jax(data)
  fn = lib_fn(5, "laplace", "normal", bounds=(True,), estimators=("dreg",))
  key = jax.random.key(4)
  ref = to_np(fn(p, dt, key))
  batch_axis1 = NamedSharding(mesh, P(None, "data"))
  p_sh = dict(jax.device_put(p, NamedSharding(mesh, P())),
              mu=jax.device_put(p["mu"], batch_axis1), s=jax.device_put(p["s"], batch_axis1))
  d_sh = dict(jax.device_put(dt, NamedSharding(mesh, P())),
              x=jax.device_put(dt["x"], NamedSharding(mesh, P("data"))))
  assert len(p_sh["mu"].addressable_shards) == 4
  got = fn(p_sh, d_sh, key)
  assert len(got["looser", "dreg"][0].sharding.device_set) == 4
  got = to_np(got)
  for name, (value, grads) in ref.items():
    np.testing.assert_allclose(got[name][0], value, rtol=1e-6)
    assert_tree_close(got[name][1], grads, 1e-5, what=f"sharded {name}")


# ---------------------------------------------------------------------------------------------
# Sampling and mixture helpers.


def test_sample_experts_draws_each_expert_independently():
  params, _ = make_problem(2, seed=61)
  z = draw_z(params, "laplace", jax.random.key(6), 2000)
  assert z.shape == (2, 2000, B, D)
  eps = (z - params["mu"][:, None]) / params["s"][:, None]
  for m in range(2):
    assert stats.kstest(eps[m].ravel(), stats.laplace.cdf).pvalue > 1e-3
  # Different experts use different noise (independent keys).
  assert abs(np.corrcoef(eps[0].ravel(), eps[1].ravel())[0, 1]) < 0.05


def test_moe_log_prob_and_log_mean_exp():
  params, _ = make_problem(3, seed=62)
  z = np.random.default_rng(0).normal(size=(5, B, D))
  a = np.random.default_rng(1).normal(size=(3, 4, 5)) * 10

  @fast_jit
  def run(mu, s, z, a):
    posteriors = [FAMILIES["laplace"](mu[m], s[m]) for m in range(3)]
    return loss.moe_log_prob(posteriors, z), loss.log_mean_exp(a, (0, 2)), loss.log_mean_exp(a, 1)

  got, lme02, lme1 = to_np(run(*to_jax((params["mu"], params["s"], z, a))))
  per = np.stack([stats.laplace.logpdf(z, params["mu"][m], params["s"][m]).sum(-1)
                  for m in range(3)])
  np.testing.assert_allclose(got, logsumexp(per, axis=0) - np.log(3), rtol=1e-5)
  np.testing.assert_allclose(lme02, np.log(np.mean(np.exp(a), axis=(0, 2))), rtol=1e-5)
  np.testing.assert_allclose(lme1, np.log(np.mean(np.exp(a), axis=1)), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# 6. Bad inputs.


def test_bad_inputs():
  params, data = make_problem(2, seed=71)
  posteriors, log_liks, log_lik, prior = build(to_jax(params), to_jax(data), "laplace", "normal")
  key = jax.random.key(0)
  with pytest.raises(ValueError) as err:
    loss.moe_iwae(key, posteriors, log_lik, prior, 3, estimator="stl")
  for name in ("stl", "iwae", "legacy", "dreg"):
    assert name in str(err.value)
  with pytest.raises(ValueError, match="iwae.*legacy.*dreg"):
    loss.iwae(key, posteriors[0], log_lik, prior, 3, estimator="DReG")
  for bad in (0, -1):
    with pytest.raises(ValueError, match="num_samples"):
      loss.moe_iwae(key, posteriors, log_lik, prior, bad)
    with pytest.raises(ValueError, match="num_samples"):
      loss.iwae(key, posteriors[0], log_lik, prior, bad)
  with pytest.raises(ValueError):
    loss.moe_iwae(key, [], log_lik, prior, 3)
  with pytest.raises(ValueError):
    loss.moe_elbo(key, posteriors, log_liks[:1], prior)
