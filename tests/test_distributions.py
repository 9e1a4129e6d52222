"""`mmvae_jax.distributions` against scipy.stats, numerical integration and closed forms.

Densities and KLs are checked twice: in float32 at the library's default precision, and with the
library run under x64 (`jax.enable_x64`) against float64 references at ~1e-10.
"""
from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from mmvae_jax import distributions as dist

RNG = np.random.default_rng(20191209)


def _np(a):
  return np.asarray(a, np.float64)


# ---------------------------------------------------------------------------------------------
# Scale constraints.


@pytest.mark.parametrize("eta", [dist.ETA, 0.0, 0.1])
def test_softmax_scale(eta):
  logits = RNG.normal(0.0, 2.0, (5, 4, 7))
  got = _np(dist.softmax_scale(jnp.asarray(logits, jnp.float32), eta=eta))
  want = special.softmax(logits, axis=-1) * 7 + eta
  assert got.shape == logits.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # Per datum, over the latent axis only: the D scales sum to D (+ D·eta).
  np.testing.assert_allclose(got.sum(-1), 7 * (1.0 + eta), rtol=1e-6)
  assert np.all(got > 0)


def test_softmax_scale_default_eta_and_shift_invariance():
  logits = jnp.asarray(RNG.normal(size=(3, 5)), jnp.float32)
  np.testing.assert_allclose(_np(dist.softmax_scale(logits)).sum(-1), 5 + 5e-6, rtol=1e-6)
  np.testing.assert_allclose(dist.softmax_scale(logits + 100.0), dist.softmax_scale(logits),
                             rtol=1e-5)
  # Zero logits (the initial prior) give unit scales.
  np.testing.assert_allclose(dist.softmax_scale(jnp.zeros(4), eta=0.0), np.ones(4), rtol=1e-7)


@pytest.mark.parametrize("eta", [dist.ETA, 0.0])
def test_softplus_scale(eta):
  pre = np.concatenate([RNG.normal(0.0, 3.0, 20), [-100.0, -20.0, 0.0, 20.0, 100.0]])
  got = _np(dist.softplus_scale(jnp.asarray(pre, jnp.float32), eta=eta))
  want = np.logaddexp(0.0, pre) + eta
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
  assert np.all(np.isfinite(got)) and np.all(got >= 0)
  np.testing.assert_allclose(_np(dist.softplus_scale(jnp.zeros(()))), np.log(2) + 1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Latent distributions.


def test_families():
  assert set(dist.FAMILIES) == {"laplace", "normal"}
  assert isinstance(dist.FAMILIES["laplace"](jnp.zeros(2), jnp.ones(2)), distrax.Laplace)
  assert isinstance(dist.FAMILIES["normal"](jnp.zeros(2), jnp.ones(2)), distrax.Normal)


SCIPY = {"laplace": stats.laplace, "normal": stats.norm}


@pytest.mark.parametrize("family", ["laplace", "normal"])
@pytest.mark.parametrize("x64", [False, True], ids=["f32", "f64"])
def test_latent_log_prob_against_scipy(family, x64):
  loc = RNG.normal(0.0, 1.0, (4, 3))
  scale = RNG.uniform(0.2, 2.0, (4, 3))
  z = RNG.normal(0.0, 2.0, (6, 4, 3))
  want_el = SCIPY[family].logpdf(z, loc, scale)
  dtype, rtol = (jnp.float64, 1e-12) if x64 else (jnp.float32, 2e-6)
  with jax.enable_x64(x64):
    q = dist.FAMILIES[family](jnp.asarray(loc, dtype), jnp.asarray(scale, dtype))
    np.testing.assert_allclose(_np(q.log_prob(jnp.asarray(z, dtype))), want_el, rtol=rtol)
    got = _np(dist.latent_log_prob(q, jnp.asarray(z, dtype)))
  assert got.shape == (6, 4)
  np.testing.assert_allclose(got, want_el.sum(-1), rtol=rtol)


@pytest.mark.parametrize("family", ["laplace", "normal"])
def test_latent_log_prob_event_vs_batch(family):
  """Batch (B, D) factorised, Independent with event (D,), and a prior with batch (D,) that
  broadcasts against (K, B, D) latents all give the (K, B) sum over the latent axis."""
  loc = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
  scale = jnp.asarray(RNG.uniform(0.5, 1.5, (4, 3)), jnp.float32)
  z = jnp.asarray(RNG.normal(size=(5, 4, 3)), jnp.float32)
  factorised = dist.FAMILIES[family](loc, scale)
  independent = distrax.Independent(factorised, reinterpreted_batch_ndims=1)
  assert independent.event_shape == (3,) and independent.batch_shape == (4,)
  a = dist.latent_log_prob(factorised, z)
  b = dist.latent_log_prob(independent, z)
  assert a.shape == b.shape == (5, 4)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  if family == "normal":
    mvn = distrax.MultivariateNormalDiag(loc, scale)
    np.testing.assert_allclose(dist.latent_log_prob(mvn, z), a, rtol=1e-5)
  # A prior with batch shape (D,), broadcast against (K, B, D).
  prior_scale = dist.softmax_scale(jnp.asarray(RNG.normal(size=3), jnp.float32), eta=0.0)
  prior = dist.FAMILIES[family](jnp.zeros(3), prior_scale)
  got = dist.latent_log_prob(prior, z)
  assert got.shape == (5, 4)
  want = SCIPY[family].logpdf(_np(z), 0.0, _np(prior_scale)).sum(-1)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  # A single latent vector.
  assert dist.latent_log_prob(prior, z[0, 0]).shape == ()


def test_latent_log_prob_when_the_distribution_has_more_batch_axes_than_z():
  z = jnp.asarray(RNG.normal(size=(4, 3)), jnp.float32)
  loc = jnp.asarray(RNG.normal(size=(2, 4, 3)), jnp.float32)
  want = stats.norm.logpdf(_np(z), _np(loc), 1.0).sum(-1)  # (2, 4)
  # Factorised batch (2, 4, 3): returned unsummed, shape (2, 4, 3).
  factorised = dist.latent_log_prob(distrax.Normal(loc, jnp.ones_like(loc)), z)
  # Independent, batch (2, 4), event (3,): log_prob is (2, 4), the same rank as z; it must not
  # be summed again (the decision follows event_shape, not ranks).
  independent = dist.latent_log_prob(
      distrax.Independent(distrax.Normal(loc, jnp.ones_like(loc)), 1), z)
  assert factorised.shape == (2, 4) and independent.shape == (2, 4)
  np.testing.assert_allclose(independent, want, rtol=1e-5)


@pytest.mark.parametrize("family", ["laplace", "normal"])
def test_samples_are_reparameterised_and_correctly_distributed(family):
  loc = jnp.asarray(RNG.normal(size=(2, 3)), jnp.float32)
  scale = jnp.asarray(RNG.uniform(0.5, 2.0, (2, 3)), jnp.float32)
  key = jax.random.key(0)
  sample = lambda l, s: dist.FAMILIES[family](l, s).sample(seed=key, sample_shape=(4000,))
  z = sample(loc, scale)
  assert z.shape == (4000, 2, 3)
  eps = (_np(z) - _np(loc)) / _np(scale)
  assert stats.kstest(eps.ravel(), SCIPY[family].cdf).pvalue > 1e-3
  # z = loc + scale * eps: ∂z/∂loc = 1 elementwise, ∂z/∂scale = eps.
  jac_loc = jax.jacobian(lambda l: sample(l, scale)[:3])(loc)  # (3, 2, 3, 2, 3)
  np.testing.assert_allclose(jac_loc, np.broadcast_to(np.eye(6).reshape(1, 2, 3, 2, 3),
                                                      (3, 2, 3, 2, 3)), atol=1e-6)
  g_loc, g_scale = jax.grad(lambda l, s: jnp.sum(sample(l, s)), argnums=(0, 1))(loc, scale)
  np.testing.assert_allclose(g_loc, 4000 * np.ones((2, 3)), rtol=1e-6)
  np.testing.assert_allclose(g_scale, eps.sum(0), rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# KL divergences.


def _logpdf(family, x, loc, scale):
  return SCIPY[family].logpdf(x, loc, scale)


def kl_by_quadrature(fam_p, loc_p, scale_p, fam_q, loc_q, scale_q):
  """∫ p (log p - log q) over loc_p ± 40 scale_p (beyond, p < e^-40), split at the kinks."""
  def f(x):
    log_p = _logpdf(fam_p, x, loc_p, scale_p)
    return np.exp(log_p) * (log_p - _logpdf(fam_q, x, loc_q, scale_q))
  lo, hi = loc_p - 40.0 * scale_p, loc_p + 40.0 * scale_p
  cuts = sorted({lo, loc_p, hi} | ({loc_q} if lo < loc_q < hi else set()))
  return sum(integrate.quad(f, a, b, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
             for a, b in zip(cuts[:-1], cuts[1:]))


KL_PAIRS = [("laplace", "laplace", dist.kl_laplace), ("normal", "normal", dist.kl_normal),
            ("normal", "laplace", dist.kl_normal_laplace)]
KL_PARAMS = [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.4, 1.7), (-2.0, 1.5, 1.0, 0.4),
             (1.0, 0.1, 1.05, 3.0), (0.7, 2.0, 0.7, 0.6)]


@pytest.mark.parametrize("fam_p,fam_q,fn", KL_PAIRS, ids=[f"{p}-{q}" for p, q, _ in KL_PAIRS])
def test_elementwise_kl_against_quadrature(fam_p, fam_q, fn):
  want = np.array([kl_by_quadrature(fam_p, lp, sp, fam_q, lq, sq)
                   for lp, sp, lq, sq in KL_PARAMS])
  cols = np.array(KL_PARAMS).T
  with jax.enable_x64(True):
    got64 = _np(fn(*[jnp.asarray(c, jnp.float64) for c in cols]))
  np.testing.assert_allclose(got64, want, rtol=1e-9, atol=1e-11)
  got32 = _np(fn(*[jnp.asarray(c, jnp.float32) for c in cols]))
  np.testing.assert_allclose(got32, want, rtol=1e-5, atol=1e-6)
  assert abs(want[0]) < 1e-12 or fam_p != fam_q  # identical distributions: zero


@pytest.mark.parametrize("fam_q,fam_p", [("laplace", "laplace"), ("normal", "normal"),
                                         ("normal", "laplace")])
def test_kl_divergence_dispatch_and_reduction(fam_q, fam_p):
  """kl_divergence: closed form for the three pairs, summed over the latent axis, prior with
  batch shape (D,) broadcast against posteriors with batch (B, D); Independent wrappers too."""
  loc = RNG.normal(size=(4, 3))
  scale = RNG.uniform(0.3, 2.0, (4, 3))
  p_scale = RNG.uniform(0.5, 1.5, 3)
  want = np.array([[kl_by_quadrature(fam_q, loc[b, d], scale[b, d], fam_p, 0.0, p_scale[d])
                    for d in range(3)] for b in range(4)]).sum(-1)
  with jax.enable_x64(True):
    q = dist.FAMILIES[fam_q](jnp.asarray(loc), jnp.asarray(scale))
    p = dist.FAMILIES[fam_p](jnp.zeros(3, jnp.float64), jnp.asarray(p_scale))
    got = _np(dist.kl_divergence(q, p))
    got_ind = _np(dist.kl_divergence(distrax.Independent(q, 1), distrax.Independent(p, 1)))
  assert got.shape == (4,)
  np.testing.assert_allclose(got, want, rtol=1e-9)
  np.testing.assert_allclose(got_ind, want, rtol=1e-9)
  # The closed form needs no key, is deterministic, and works under jit.
  q32 = dist.FAMILIES[fam_q](jnp.asarray(loc, jnp.float32), jnp.asarray(scale, jnp.float32))
  p32 = dist.FAMILIES[fam_p](jnp.zeros(3), jnp.asarray(p_scale, jnp.float32))
  np.testing.assert_allclose(jax.jit(dist.kl_divergence)(q32, p32), want, rtol=1e-5)


def test_kl_divergence_monte_carlo_fallback():
  """Laplace || Normal has no closed form: it needs a key and uses the `num_samples` estimate
  mean_s[log q(z_s) - log p(z_s)] with z_s ~ q."""
  loc = jnp.asarray(RNG.normal(size=(2, 3)), jnp.float32)
  scale = jnp.asarray(RNG.uniform(0.5, 1.5, (2, 3)), jnp.float32)
  q = distrax.Laplace(loc, scale)
  p = distrax.Normal(jnp.zeros(3), jnp.ones(3))
  with pytest.raises(ValueError, match="key"):
    dist.kl_divergence(q, p)
  key = jax.random.key(3)
  exact = np.array([[kl_by_quadrature("laplace", float(loc[b, d]), float(scale[b, d]), "normal",
                                      0.0, 1.0) for d in range(3)] for b in range(2)]).sum(-1)
  n = 20_000
  many = _np(dist.kl_divergence(q, p, key=key, num_samples=n))
  z = _np(q.sample(seed=key, sample_shape=(n,)))
  per_sample = (stats.laplace.logpdf(z, _np(loc), _np(scale))
                - stats.norm.logpdf(z, 0.0, 1.0)).sum(-1)
  np.testing.assert_allclose(many, per_sample.mean(0), rtol=1e-4)  # the same samples
  # Many samples approach the true KL (within 5 standard errors).
  se = per_sample.std(0, ddof=1) / np.sqrt(n)
  assert np.all(se < 0.05)
  assert np.all(np.abs(many - exact) < 5 * se), (many, exact, se)


# ---------------------------------------------------------------------------------------------
# Likelihoods.


@pytest.mark.parametrize("family", ["laplace", "normal"])
@pytest.mark.parametrize("event_ndim", [1, 3])
def test_continuous_likelihoods_against_scipy(family, event_ndim):
  fn = dist.laplace_log_likelihood if family == "laplace" else dist.normal_log_likelihood
  event = (5,) if event_ndim == 1 else (3, 4, 2)
  x = RNG.uniform(0.0, 1.0, (2,) + event)
  mean = RNG.uniform(0.0, 1.0, (6, 2) + event)  # (K, B, *event): x broadcasts
  for scale in (0.75, 0.01):
    want = SCIPY[family].logpdf(x, mean, scale).reshape(6, 2, -1).sum(-1)
    got = _np(fn(jnp.asarray(x, jnp.float32), jnp.asarray(mean, jnp.float32), scale,
                 event_ndim=event_ndim))
    assert got.shape == (6, 2)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    with jax.enable_x64(True):
      got64 = _np(fn(jnp.asarray(x), jnp.asarray(mean), scale, event_ndim=event_ndim))
    np.testing.assert_allclose(got64, want, rtol=1e-12)


def test_likelihood_default_event_ndim_is_images():
  x = RNG.uniform(size=(2, 4, 4, 3))
  mean = RNG.uniform(size=(2, 4, 4, 3))
  got = dist.laplace_log_likelihood(jnp.asarray(x), jnp.asarray(mean), 0.75)
  assert got.shape == (2,)
  np.testing.assert_allclose(got, stats.laplace.logpdf(x, mean, 0.75).sum((1, 2, 3)), rtol=1e-5)


def test_bernoulli_likelihood():
  logits = RNG.normal(0.0, 3.0, (3, 2, 10))
  x_bin = RNG.integers(0, 2, (2, 10)).astype(np.float64)
  want = stats.bernoulli.logpmf(x_bin, special.expit(logits)).sum(-1)
  got = _np(dist.bernoulli_log_likelihood(jnp.asarray(x_bin, jnp.float32),
                                          jnp.asarray(logits, jnp.float32), event_ndim=1))
  assert got.shape == (3, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Non-binary x in [0, 1]: x log σ(l) + (1 - x) log σ(-l).
  x = RNG.uniform(size=(2, 10))
  want = (x * special.log_expit(logits) + (1 - x) * special.log_expit(-logits)).sum(-1)
  with jax.enable_x64(True):
    got = _np(dist.bernoulli_log_likelihood(jnp.asarray(x), jnp.asarray(logits), event_ndim=1))
  np.testing.assert_allclose(got, want, rtol=1e-12)
  # Stable for saturated logits.
  extreme = dist.bernoulli_log_likelihood(jnp.array([1.0, 0.0, 1.0]),
                                          jnp.array([-80.0, 80.0, 80.0]), event_ndim=0)
  np.testing.assert_allclose(extreme, [-80.0, -80.0, 0.0], atol=1e-5)


@pytest.mark.parametrize("ignore_index", [0, 3, None])
def test_categorical_likelihood(ignore_index):
  vocab, length = 7, 6
  tokens = RNG.integers(0, vocab, (2, length))
  tokens[:, -2:] = 0   # padding / <exc>
  tokens[0, 1] = 3
  logits = RNG.normal(0.0, 2.0, (4, 2, length, vocab))  # (K, B, T, V): tokens broadcast
  log_softmax = logits - special.logsumexp(logits, axis=-1, keepdims=True)
  per_token = np.take_along_axis(log_softmax, np.broadcast_to(tokens, (4, 2, length))[..., None],
                                 axis=-1)[..., 0]
  if ignore_index is not None:
    per_token = np.where(tokens == ignore_index, 0.0, per_token)
  kwargs = {} if ignore_index == 0 else {"ignore_index": ignore_index}
  got = _np(dist.categorical_log_likelihood(jnp.asarray(tokens), jnp.asarray(logits, jnp.float32),
                                            **kwargs))
  assert got.shape == (4, 2)
  np.testing.assert_allclose(got, per_token.sum(-1), rtol=1e-5)
  # Compared with scoring every token, ignoring drops exactly the ignored positions.
  if ignore_index is not None:
    every = _np(dist.categorical_log_likelihood(jnp.asarray(tokens),
                                                jnp.asarray(logits, jnp.float32),
                                                ignore_index=None))
    assert np.all(every < got + 1e-6)
    assert not np.allclose(every, got)


def test_laplace_log_prob_abs_has_zero_derivative_at_the_location():
  """Regression: float32 rounds z = loc + scale·ε to loc when the scale sits at the 1e-6 floor
  and |loc| ~ 10; jnp.abs's derivative +1 at 0 then gave ∂(−log q)/∂z = +1/scale = +1e6 in
  every such sample, a systematic push on the encoder's loc under the legacy/dreg estimators
  (training diverged; the official PyTorch code, whose abs has derivative sign(0) = 0, did not)."""
  loc = jnp.full((2, 3), 10.0, jnp.float32)
  scale = jnp.full((2, 3), 1e-6, jnp.float32)
  q = dist.laplace(loc, scale)
  eps = jax.random.laplace(jax.random.key(0), (4096, 2, 3), jnp.float32)
  z = loc + scale * eps
  hit = np.asarray(z == loc)
  assert np.mean(hit) > 0.2  # the rounding that triggers it
  # Values: identical to distrax.
  np.testing.assert_array_equal(_np(dist.latent_log_prob(q, z)), _np(q.log_prob(z).sum(-1)))
  # ∂ log q / ∂z is exactly 0 where z == loc (PyTorch's abs convention), ±1/scale elsewhere.
  g = _np(jax.grad(lambda z_: jnp.sum(dist.latent_log_prob(q, z_)))(z))
  np.testing.assert_array_equal(g[hit], 0.0)
  # The legacy path gradient of −log q(z(loc)) with q's parameters stopped has mean ~0 (it was
  # ≈ +0.4/scale per element with jnp.abs).
  stopped = jax.tree.map(jax.lax.stop_gradient, q)
  path = jax.grad(lambda l: -jnp.mean(dist.latent_log_prob(stopped, l + scale * eps)))(loc)
  assert np.all(np.abs(_np(path)) * 1e-6 < 0.1), _np(path) * 1e-6
  # Likelihoods: the same convention at x == mean.
  x = jnp.array([[0.25, 0.5]])
  gl = jax.grad(lambda m: jnp.sum(dist.laplace_log_likelihood(x, m, 0.75, event_ndim=1)))(x)
  np.testing.assert_array_equal(_np(gl), 0.0)
