"""The gradient estimators of the stratified mixture bound (eq. (3)) for M >= 2, in float64.

The toy: Normal experts q_m = N(mu_m, s_m) whose parameters mu, s (M, B, D) are the "encoder"
parameters; linear-Gaussian decoders x_d ~ N(A_d z + c_d, 1) (the "decoder" parameters A, c);
prior N(0, I). The plain reparameterised gradient (``iwae``) is unbiased by construction, so an
estimator is unbiased when its Monte-Carlo mean equals ``iwae``'s; the draws are shared (paired
differences), which makes the test sharp.

* ``dreg_moe`` equals a hand-derived float64 reference at fixed samples (the coefficients A and
  B of docs/estimators.md computed by explicit sums, the derivatives by autodiff of hand-written
  densities), equals ``dreg`` for M = 1, and is refused for the tight bound with M >= 2;
* at M = 2 its Monte-Carlo mean is within 4 standard errors of ``iwae``'s on every encoder
  parameter, while ``dreg`` (w̃²) and ``legacy`` (w̃) are detected as biased: exchanging the
  weightings of any two estimators fails these tests;
* (slow) the same at M = 3 and K = 30 with more draws, and its signal-to-noise ratio.
"""
from __future__ import annotations

import functools

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmvae_jax import loss

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)
D, N_OBS = 2, 3


def make_problem(num_modalities: int, batch: int, seed: int):
  """Parameters (float64 NumPy) and data of the toy; experts centred away from each other."""
  rng = np.random.default_rng(seed)
  params = dict(
      mu=rng.normal(0.0, 0.8, (num_modalities, batch, D)),
      s=rng.uniform(0.6, 1.2, (num_modalities, batch, D)),
      A=tuple(rng.normal(0.0, 0.7, (N_OBS, D)) for _ in range(num_modalities)),
      c=tuple(rng.normal(0.0, 0.3, N_OBS) for _ in range(num_modalities)))
  x = tuple(rng.normal(0.0, 1.5, (batch, N_OBS)) for _ in range(num_modalities))
  return params, x


def log_likelihood(params, x, z):
  """Σ_d log N(x_d; A_d z + c_d, 1) for z (..., B, D): (..., B)."""
  total = 0.0
  for a, c, xd in zip(params["A"], params["c"], x):
    mean = z @ a.T + c
    total = total + jnp.sum(-0.5 * (xd - mean)**2 - 0.5 * jnp.log(2 * jnp.pi), -1)
  return total


def objective(params, x, key, num_samples, estimator, looser=True):
  experts = [distrax.Normal(params["mu"][m], params["s"][m])
             for m in range(params["mu"].shape[0])]
  prior = distrax.Normal(jnp.zeros(D), jnp.ones(D))
  ll = functools.partial(log_likelihood, params, x)
  return loss.moe_iwae(key, experts, ll, prior, num_samples, looser=looser,
                       estimator=estimator).sum()


def flat(tree, names):
  """The leaves of tree[n] for n in names, per draw: (N, P)."""
  leaves = [leaf for n in names for leaf in jax.tree.leaves(tree[n])]
  return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


# ---------------------------------------------------------------------------------------------
# Exactness at fixed samples.


def _normal_log_prob(z, loc, scale):
  return jnp.sum(-0.5 * ((z - loc) / scale)**2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi), -1)


def reference_dreg_moe(params, x, z):
  """The ``dreg_moe`` encoder gradient of the summed bound at samples z (M, K, B, D), float64.

  Independent of the library: hand-written densities, ŵ by explicit sums over the samples, the
  cotangent A ∂lw/∂z + Σ_m B_m ∂ log r_m/∂z, and the chain rule ∂z/∂mu = 1, ∂z/∂s = ε.
  """
  mu, s = params["mu"], params["s"]
  m_count, k_count = z.shape[:2]

  def log_q(z_):  # (M', M, K, B): every expert at every sample
    return jnp.stack([_normal_log_prob(z_, mu[i], s[i]) for i in range(m_count)])

  def lw_fn(z_):
    lq = log_q(z_)
    log_mix = jnp.log(jnp.mean(jnp.exp(lq), axis=0))
    return _normal_log_prob(z_, 0.0, 1.0) + log_likelihood(params, x, z_) - log_mix

  def log_r_fn(z_):
    lq = log_q(z_)
    return lq - jnp.log(jnp.sum(jnp.exp(lq), axis=0, keepdims=True))

  @fast_jit
  def derivatives(zj):
    dlog_r = jnp.stack([jax.grad(lambda v, i=i: log_r_fn(v)[i].sum())(zj)
                        for i in range(m_count)])                              # (M', M, K, B, D)
    return (lw_fn(zj), jax.grad(lambda v: lw_fn(v).sum())(zj),                 # (M, K, B, D)
            jnp.exp(log_r_fn(zj)), dlog_r)                                     # r: (M', M, K, B)

  with jax.enable_x64(True):
    lw, dlw, r, dlog_r = map(np.asarray, derivatives(jnp.asarray(z, jnp.float64)))
  w = np.exp(lw)
  w_tilde = w / w.sum(axis=1, keepdims=True)
  cot = np.zeros_like(z)
  for j in range(m_count):
    for k in range(k_count):
      a = w_tilde[j, k].copy()
      for m in range(m_count):
        others = w[m].sum(axis=0) - w[m, k]
        w_hat = w[j, k] / (w[j, k] + others)
        a -= r[m, j, k] * w_hat * (1.0 - w_hat)
        cot[j, k] -= (r[m, j, k] * w_hat)[:, None] * dlog_r[m, j, k] / m_count
      cot[j, k] += (a / m_count)[:, None] * dlw[j, k]
  eps = (z - mu[:, None]) / s[:, None]
  return dict(mu=cot.sum(axis=1), s=(cot * eps).sum(axis=1))


@functools.lru_cache(maxsize=None)
def _fixed_sample_fn(num_samples):
  @fast_jit
  def run(params, x, key):
    experts = [distrax.Normal(params["mu"][m], params["s"][m])
               for m in range(params["mu"].shape[0])]
    z = loss.sample_experts(key, experts, num_samples)
    grads = {est: jax.grad(objective)(params, x, key, num_samples, est)
             for est in loss.ESTIMATORS}
    return z, grads
  return run


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_dreg_moe_matches_hand_derived_reference(num_modalities):
  params, x = make_problem(num_modalities, batch=2, seed=num_modalities)
  key = jax.random.key(11)
  with jax.enable_x64(True):
    z, grads = _fixed_sample_fn(4)(jax.tree.map(jnp.asarray, params), tuple(map(jnp.asarray, x)),
                                   key)
    z, grads = np.asarray(z), jax.tree.map(np.asarray, grads)
  want = reference_dreg_moe(params, x, z)
  for name in ("mu", "s"):
    np.testing.assert_allclose(grads["dreg_moe"][name], want[name], rtol=1e-9,
                               atol=1e-12 * np.abs(want[name]).max())
    # A different weighting is far from it.
    for other in ("dreg", "legacy", "iwae"):
      assert np.abs(grads[other][name] - want[name]).max() > 1e-3 * np.abs(want[name]).max()
  # Decoders: the plain IWAE gradient for every estimator.
  for name in ("A", "c"):
    for est in loss.ESTIMATORS:
      for got, ref in zip(grads[est][name], grads["iwae"][name]):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)


def test_dreg_moe_is_dreg_for_one_modality_and_refused_for_the_tight_bound():
  params, x = make_problem(1, batch=2, seed=5)
  key = jax.random.key(3)
  @fast_jit
  def grads(p, xs):
    return {(looser, est): jax.grad(objective)(p, xs, key, 5, est, looser)
            for looser in (True, False) for est in ("dreg", "dreg_moe")}

  with jax.enable_x64(True):
    g = grads(jax.tree.map(jnp.asarray, params), tuple(map(jnp.asarray, x)))
    for looser in (True, False):  # one expert: the two bounds are the same
      for a, b in zip(jax.tree.leaves(g[looser, "dreg"]), jax.tree.leaves(g[looser, "dreg_moe"])):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    params2, x2 = make_problem(2, batch=2, seed=5)
    with pytest.raises(ValueError, match="dreg_moe.*stratified bound.*looser=True"):
      objective(jax.tree.map(jnp.asarray, params2), tuple(map(jnp.asarray, x2)), key, 5,
                "dreg_moe", looser=False)


# ---------------------------------------------------------------------------------------------
# Bias and SNR by Monte Carlo (float64, paired with iwae on the same draws).


@functools.lru_cache(maxsize=None)
def _mc_fn(num_samples):
  @fast_jit
  def run(params, x, keys):
    def one(key):
      return {est: jax.grad(objective)(params, x, key, num_samples, est)
              for est in loss.ESTIMATORS}
    return jax.vmap(one)(keys)
  return run


def monte_carlo(num_modalities, num_samples, num_draws, batch=2, seed=0):
  """{estimator: (encoder (N, P_enc), decoder (N, P_dec))} per-draw gradients, float64."""
  params, x = make_problem(num_modalities, batch, seed)
  with jax.enable_x64(True):
    out = _mc_fn(num_samples)(jax.tree.map(jnp.asarray, params), tuple(map(jnp.asarray, x)),
                              jax.random.split(jax.random.key(seed + 100), num_draws))
    return {est: (np.asarray(flat(g, ("mu", "s"))), np.asarray(flat(g, ("A", "c"))))
            for est, g in out.items()}


def paired_z(g, est):
  """Per-parameter (mean of g[est] − g[iwae]) / its standard error."""
  diff = g[est] - g["iwae"]
  return diff.mean(0) / (diff.std(0, ddof=1) / np.sqrt(len(diff)))


def snr(g):
  """Mean over parameters of |mean| / std of one draw."""
  return float(np.mean(np.abs(g.mean(0)) / g.std(0, ddof=1)))


def _check_bias(num_modalities, num_samples, num_draws, dreg_min_z):
  out = monte_carlo(num_modalities, num_samples, num_draws)
  enc = {est: v[0] for est, v in out.items()}
  z = {est: paired_z(enc, est) for est in ("dreg_moe", "dreg", "legacy")}
  print(f"\n[M={num_modalities}, K={num_samples}, {num_draws} draws, {enc['iwae'].shape[1]} "
        f"encoder parameters] max |z| vs iwae: " +
        ", ".join(f"{e} {np.abs(v).max():.1f}" for e, v in z.items()) +
        "; SNR: " + ", ".join(f"{e} {snr(v):.3f}" for e, v in enc.items()))
  # Unbiased: within 4 standard errors on every encoder parameter (paired and unpaired).
  assert np.all(np.abs(z["dreg_moe"]) < 4.0), z["dreg_moe"]
  se = np.sqrt((enc["dreg_moe"].var(0, ddof=1) + enc["iwae"].var(0, ddof=1)) / num_draws)
  assert np.all(np.abs(enc["dreg_moe"].mean(0) - enc["iwae"].mean(0)) < 4 * se)
  # The w̃² rule of Tucker et al. is biased under the mixture proposal, w̃ (legacy) more so.
  assert np.abs(z["dreg"]).max() > dreg_min_z, z["dreg"]
  assert np.abs(z["legacy"]).max() > 2 * dreg_min_z, z["legacy"]
  # Decoders: the same gradient for every estimator, draw by draw.
  for est in loss.ESTIMATORS:
    np.testing.assert_allclose(out[est][1], out["iwae"][1], rtol=1e-9, atol=1e-12)
  return enc


def test_mixture_bias_m2():
  """M = 2, K = 4: dreg_moe unbiased, dreg and legacy biased."""
  enc = _check_bias(2, 4, 3000, dreg_min_z=6.0)
  assert snr(enc["dreg_moe"]) > snr(enc["iwae"]), {e: snr(v) for e, v in enc.items()}


@pytest.mark.slow
@pytest.mark.parametrize("num_modalities,num_samples", [(2, 30), (3, 10)])
def test_mixture_bias_and_snr_large(num_modalities, num_samples):
  """More draws, larger K and M = 3: dreg_moe unbiased with a higher SNR than iwae."""
  enc = _check_bias(num_modalities, num_samples, 20000, dreg_min_z=8.0)
  assert snr(enc["dreg_moe"]) > 1.1 * snr(enc["iwae"]), {e: snr(v) for e, v in enc.items()}


# ---------------------------------------------------------------------------------------------
# The models pass the estimator through.


def test_models_train_with_dreg_moe():
  """MMVAE (eq. (3)) and MoPoE (mopoe_iwae, a mixture of 3 products of experts) accept
  dreg_moe: the value is the bound's, the decoders get iwae's gradient, the encoders another."""
  import tiny_models
  from mmvae_jax.models.mopoe import MoPoE

  xs = tiny_models.tiny_xs(b=3)
  models = {"mmvae": (tiny_models.tiny_model(), "moe_iwae"),
            "mopoe": (MoPoE(tiny_models.tiny_modalities(3), latent_dim=3), "mopoe_iwae")}

  @fast_jit
  def run(params_by_model, key):
    out = {}
    for name, (model, kind) in models.items():
      for est in ("iwae", "dreg_moe"):
        f = lambda p, m=model, k=kind, e=est: model_objective(m, p, xs, key, k, e)
        out[name, est] = jax.value_and_grad(f)(params_by_model[name])
    return out

  def model_objective(model, params, xs_, key, kind, est):
    return model.objective(params, xs_, key, 4, kind=kind, estimator=est).mean()

  params = {name: m.init(jax.random.key(0)) for name, (m, _) in models.items()}
  out = run(params, jax.random.key(1))
  for name in models:
    (v_iwae, g_iwae), (v_new, g_new) = out[name, "iwae"], out[name, "dreg_moe"]
    assert v_new == v_iwae
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g_new))
    for a, b in zip(jax.tree.leaves(g_new["decoders"]), jax.tree.leaves(g_iwae["decoders"])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    gap = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(g_new["encoders"]), jax.tree.leaves(g_iwae["encoders"])))
    assert gap > 1e-4, name


def test_training_config_refuses_dreg_moe_with_the_tight_bound():
  from mmvae_jax import train
  with pytest.raises(ValueError, match="dreg_moe.*stratified bound.*--nolooser"):
    train.TrainConfig(estimator="dreg_moe", looser=False).validate(1)
  train.TrainConfig(estimator="dreg_moe").validate(1)
