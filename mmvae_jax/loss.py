"""Objectives of the MMVAE: ELBO, IWAE and the stratified mixture-of-experts IWAE (eq. (3)).

Every function returns the per-example objective (a bound to *maximise*) of shape (B,); the
training loss is its negative mean or sum. The returned value is always the bound itself, so it
can be logged; what the gradient estimates is chosen by ``estimator``:

``"iwae"``
  the plain reparameterised gradient of the bound (autodiff of the returned value).
``"legacy"``
  the gradient the official PyTorch code actually computes for its ``dreg`` objectives: every
  expert's parameters are stopped inside ``log q_Φ``, the sample path ``z(φ)`` stays live, and
  the importance weights ``w̃ = softmax(log_weights)`` are constants. The decoders and the prior
  get the ordinary IWAE gradient ``Σ w̃ ∇ log_weights``; each encoder gets the path derivative
  weighted by ``w̃``. This is the "sticking-the-landing" IWAE estimator
  (Roeder et al. 2017): the official DReG hook never fires, so the paper's numbers come from it.
  It is biased for K > 1. See docs/official-code.md#the-dreg-hook-that-never-fires.
``"dreg"``
  doubly-reparameterised gradients (Tucker et al. 2019) as the paper describes them: decoders and
  prior as in ``legacy``; the encoder path derivative weighted by ``w̃²``. For one modality this
  is an unbiased estimator of the IWAE encoder gradient with lower variance. For M > 1 it is the
  estimator the official code intended (the w̃² weighting per stratum); its exact unbiasedness
  under the mixture proposal is not established.

Only ``jax.lax.stop_gradient`` and one ``jax.custom_vjp`` identity (which multiplies the
cotangent of z by ``w̃``) are used: no surrogate loss is needed, because the derivative of
log-mean-exp with respect to the log-weights already is ``w̃``.

Shapes: M modalities (experts), K samples per expert, B data, D latent dimensions.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp

from mmvae_jax.distributions import Distribution, kl_divergence, latent_log_prob

ESTIMATORS = ("iwae", "legacy", "dreg")

LogLikelihoodFn = Callable[[jax.Array], jax.Array]


def log_mean_exp(x: jax.Array, axis) -> jax.Array:
  """log (1/n) Σ exp(x) over `axis` (an int or a tuple), computed with logsumexp."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  n = 1
  for a in axes:
    n *= x.shape[a]
  return jax.nn.logsumexp(x, axis=axes) - jnp.log(n)


def _check_estimator(estimator: str) -> None:
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")


def sample_experts(key: jax.Array, posteriors: Sequence[Distribution], num_samples: int
                   ) -> jax.Array:
  """K reparameterised samples from each expert, stacked: (M, K, B, D)."""
  keys = jax.random.split(key, len(posteriors))
  return jnp.stack([q.sample(seed=k, sample_shape=(num_samples,))
                    for q, k in zip(posteriors, keys)])


def moe_log_prob(posteriors: Sequence[Distribution], z: jax.Array) -> jax.Array:
  """log q_Φ(z | x_{1:M}) = log (1/M) Σ_m q_m(z) for the uniform mixture of experts.

  Args:
    posteriors: M experts, batch shape (B, D) (or (B,) with event (D,)).
    z: (..., B, D) latents.
  Returns:
    (..., B).
  """
  log_q = jnp.stack([latent_log_prob(q, z) for q in posteriors])
  return log_mean_exp(log_q, axis=0)


# ---------------------------------------------------------------------------------------------
# The DReG path weighting: identity on z whose backward pass multiplies z's cotangent by w̃.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _weighted_path(fn, weight_axes, z, *consts):
  return fn(z, *consts)


def _weighted_path_fwd(fn, weight_axes, z, *consts):
  log_weights, vjp = jax.vjp(fn, z, *consts)
  return log_weights, (vjp, log_weights)


def _weighted_path_bwd(fn, weight_axes, res, cotangent):
  vjp, log_weights = res
  w = jax.nn.softmax(log_weights, axis=weight_axes)
  grads = vjp(cotangent)
  return (grads[0] * w[..., None],) + tuple(grads[1:])


_weighted_path.defvjp(_weighted_path_fwd, _weighted_path_bwd)


def _dreg_log_weights(log_weights_fn: LogLikelihoodFn, z: jax.Array, weight_axes) -> jax.Array:
  """log_weights_fn(z), with the cotangent reaching z multiplied by softmax(log_weights).

  Everything `log_weights_fn` closes over (decoder and prior parameters) keeps its ordinary
  gradient; only the path into z is reweighted, so the encoders receive Σ w̃·(w̃ ∂lw/∂z)∂z/∂φ.
  """
  fn, consts = jax.closure_convert(log_weights_fn, z)
  return _weighted_path(fn, weight_axes, z, *consts)


# ---------------------------------------------------------------------------------------------
# Log importance weights and the bounds.


def log_weights(z: jax.Array, posteriors: Sequence[Distribution], log_likelihood: LogLikelihoodFn,
                prior: Distribution) -> jax.Array:
  """log w = log p(z) + Σ_d λ_d log p(x_d | z) − log q_Φ(z | x_{1:M}).

  λ sits inside the weights, as in the official code (see
  docs/official-code.md#likelihood-weights-inside-the-importance-weights).

  Args:
    z: (M, K, B, D) samples, z[m] drawn from expert m (stratum m).
    posteriors: the M experts used in the mixture density q_Φ.
    log_likelihood: maps (..., B, D) latents to the λ-weighted Σ_d log p(x_d | z), (..., B).
    prior: p(z), broadcastable against (B, D).
  Returns:
    (M, K, B) log weights.
  """
  lw = latent_log_prob(prior, z) + log_likelihood(z) - moe_log_prob(posteriors, z)
  chex.assert_shape(lw, z.shape[:-1])
  return lw


def moe_iwae(key: jax.Array, posteriors: Sequence[Distribution], log_likelihood: LogLikelihoodFn,
             prior: Distribution, num_samples: int, *, looser: bool = True,
             estimator: str = "dreg") -> jax.Array:
  """The mixture-of-experts IWAE bound, stratified over experts (paper eq. (3)).

  With ``looser=True`` (the paper's eq. (3), the official ``m_*_looser``)::

      L = (1/M) Σ_m log (1/K) Σ_k w[m, k],      z[m, k] ~ q_m(z | x_m)

  with ``looser=False`` (the official tight ``m_iwae``, always its test objective)::

      L = log (1/(M K)) Σ_m Σ_k w[m, k]

  where ``log w = log p(z) + Σ_d λ_d log p(x_d | z) − log q_Φ(z | x_{1:M})`` and ``q_Φ`` is the
  uniform mixture of the M experts. By Jensen, looser ≤ tight. With M = 1 both are the IWAE bound.

  Args:
    key: PRNG key for the reparameterised samples.
    posteriors: sequence of M reparameterisable distributions over z with batch shape (B, D)
      (or batch (B,) and event (D,)), e.g. `distrax.Laplace` / `distrax.Normal`; each is sampled
      with its own ``sample(seed=..., sample_shape=(K,))``.
    log_likelihood: function mapping latents of shape (..., B, D) to the λ-weighted sum over
      decoders of log p(x_d | z), shape (...,  B). It is called once with (M, K, B, D).
    prior: distribution over z, broadcastable against (B, D) (e.g. batch shape (D,)).
    num_samples: K, samples per expert.
    looser: stratified bound (True) or the tight bound over all M·K samples (False).
    estimator: ``"dreg"``, ``"legacy"`` or ``"iwae"`` (module docstring). It changes the
      gradient only, never the value.
  Returns:
    (B,) per-example bound.
  """
  _check_estimator(estimator)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if len(posteriors) < 1:
    raise ValueError("moe_iwae needs at least one posterior")
  z = sample_experts(key, posteriors, num_samples)  # (M, K, B, D)
  # Axes of the importance-weight normalisation: K per stratum, or all M·K samples.
  axes = (1,) if looser else (0, 1)
  if estimator == "iwae":
    lw = log_weights(z, posteriors, log_likelihood, prior)
  else:
    # No score-function term: every expert's parameters are constants inside log q_Φ.
    stopped = [jax.tree.map(jax.lax.stop_gradient, q) for q in posteriors]
    fn = lambda z_: log_weights(z_, stopped, log_likelihood, prior)
    lw = fn(z) if estimator == "legacy" else _dreg_log_weights(fn, z, axes)
  if looser:
    return jnp.mean(log_mean_exp(lw, axis=1), axis=0)
  return log_mean_exp(lw, axis=(0, 1))


def iwae(key: jax.Array, posterior: Distribution, log_likelihood: LogLikelihoodFn,
         prior: Distribution, num_samples: int, *, estimator: str = "dreg") -> jax.Array:
  """Unimodal IWAE bound log (1/K) Σ_k p(x, z_k)/q(z_k | x) (paper eq. (2)), shape (B,).

  The official unimodal ``dreg`` objective is ``estimator="legacy"``; see `moe_iwae`.
  """
  return moe_iwae(key, [posterior], log_likelihood, prior, num_samples, looser=False,
                  estimator=estimator)


def elbo(key: jax.Array, posterior: Distribution, log_likelihood: LogLikelihoodFn,
         prior: Distribution) -> jax.Array:
  """Unimodal ELBO with one sample and the KL in closed form where one exists (official ``elbo``).

  value = λ log p(x | z) − KL(q(z | x) || p(z)),  z ~ q. Shape (B,).
  """
  k_sample, k_kl = jax.random.split(key)
  z = posterior.sample(seed=k_sample)
  return log_likelihood(z) - kl_divergence(posterior, prior, key=k_kl)


def moe_elbo(key: jax.Array, posteriors: Sequence[Distribution],
             log_likelihoods: Sequence[LogLikelihoodFn], prior: Distribution) -> jax.Array:
  """The official multimodal ELBO (``m_elbo``), shape (B,).

  See docs/official-code.md#the-elbo-objective.

  One sample z_d ~ q_d per expert; only self-reconstructions are decoded, and the cross terms
  are importance-reweighted::

      L = (1/M) [ Σ_r Σ_d w[r, d] λ_d log p(x_d | z_d) − Σ_r KL(q_r || p) ]
      w[r, r] = 1,  w[r, d] = exp(log q_r(sg z_d) − sg(log q_d(sg z_d)))  (d ≠ r)

  Its expectation is the per-expert-KL MoE ELBO (1/M) Σ_r (E_{q_r}[Σ_d λ_d log p(x_d|z)] −
  KL(q_r || p)), which is below the true MoE ELBO. The paper describes a different linear-in-M
  scheme (its Appendix B); this follows the code.

  Args:
    posteriors: M experts, batch shape (B, D).
    log_likelihoods: M functions, `log_likelihoods[d](z)` = λ_d log p(x_d | z) for z (..., B, D),
      returning (..., B).
    prior: p(z).
  """
  m_count = len(posteriors)
  if len(log_likelihoods) != m_count:
    raise ValueError(f"moe_elbo: {len(log_likelihoods)} likelihoods for {m_count} posteriors")
  keys = jax.random.split(key, 2 * m_count)
  total = 0.0
  for d in range(m_count):
    z_d = posteriors[d].sample(seed=keys[d])  # (B, D), live
    z_sg = jax.lax.stop_gradient(z_d)
    log_q_dd = jax.lax.stop_gradient(latent_log_prob(posteriors[d], z_sg))
    weight = 1.0
    for r in range(m_count):
      if r != d:
        weight = weight + jnp.exp(latent_log_prob(posteriors[r], z_sg) - log_q_dd)
    total = total + weight * log_likelihoods[d](z_d)
  kl = sum(kl_divergence(q, prior, key=keys[m_count + r]) for r, q in enumerate(posteriors))
  return (total - kl) / m_count


def mixture_elbo(key: jax.Array, posteriors: Sequence[Distribution],
                 log_likelihood: LogLikelihoodFn, prior: Distribution) -> jax.Array:
  """The stratified ELBO of a uniform mixture posterior (1/C) Σ_c q_c, shape (B,).

  One reparameterised sample per component, every decoder scoring every component's sample,
  and the per-component KL in closed form where one exists::

      L = (1/C) Σ_c [ Σ_d λ_d log p(x_d | z_c) − KL(q_c || p) ],   z_c ~ q_c.

  This is the training objective of MoPoE (Sutter et al. 2021), whose components are the
  products of experts of the 2^M − 1 subsets, and with the M experts as components it is the
  expectation of `moe_elbo`. By the convexity of the KL, KL((1/C) Σ_c q_c || p) ≤
  (1/C) Σ_c KL(q_c || p), so L is a lower bound on the ELBO of the mixture itself and hence on
  the λ-weighted log p(x_{1:M}).

  Sampling: with ``keys = jax.random.split(key, 2 C)``, z_c = ``q_c.sample(seed=keys[c])``
  (for a `distrax.Normal`: loc_c + scale_c · ε_c, ε_c = ``jax.random.normal(keys[c], (B, D))``);
  ``keys[C + c]`` is the key of a Monte-Carlo KL where no closed form exists. The value is
  differentiated as is (the plain reparameterised gradient).

  Args:
    key: PRNG key.
    posteriors: the C components q_c, each reparameterisable with batch shape (B, D) (or
      batch (B,) and event (D,)).
    log_likelihood: maps latents (..., B, D) to the λ-weighted Σ_d log p(x_d | z), (..., B);
      called once, on the stacked samples (C, B, D).
    prior: p(z), broadcastable against (B, D).
  Returns:
    (B,) per-example bound.
  """
  num = len(posteriors)
  if num < 1:
    raise ValueError("mixture_elbo needs at least one posterior")
  keys = jax.random.split(key, 2 * num)
  z = jnp.stack([q.sample(seed=keys[c]) for c, q in enumerate(posteriors)])  # (C, B, D)
  ll = log_likelihood(z)
  chex.assert_shape(ll, z.shape[:-1])
  kl = jnp.stack([kl_divergence(q, prior, key=keys[num + c]) for c, q in enumerate(posteriors)])
  return jnp.mean(ll - kl, axis=0)


def mmvae_plus_iwae(key: jax.Array, shared: Sequence[Distribution],
                    private: Sequence[Distribution], auxiliary: Sequence[Distribution],
                    log_likelihood: Callable[[jax.Array, jax.Array], jax.Array],
                    prior_shared: Distribution, prior_private: Distribution, num_samples: int,
                    *, beta: float = 1.0, looser: bool = True, estimator: str = "dreg"
                    ) -> jax.Array:
  """The MMVAE+ objective (Palumbo, Daunhawer & Vogt 2023), stratified over experts, (B,).

  Every modality m has a shared latent z (experts q_m(z | x_m), mixed uniformly into
  q(z | x_{1:M})) and a private latent w_m (posterior q(w_m | x_m), prior p(w_m), auxiliary
  prior r_m(w_m) with a learned scale). Stratum m draws K samples::

      z ~ q_m(z | x_m),   w_m ~ q(w_m | x_m),   w̃_n ~ r_n(w_n) for n ≠ m,

  and decoder d reads (z, w_d) where w_d = w_m if d = m, else w̃_d. The log weights are::

      log w = Σ_d λ_d log p(x_d | z, w_d)
              + β [log p(z) + log p(w_m) − log q(z | x_{1:M}) − log q(w_m | x_m)]

  (the r_n samples carry no density term: they stand in for the missing modality's private
  information). ``looser`` (the paper's objective): (1/M) Σ_m log (1/K) Σ_k w[m, k]; otherwise
  log (1/(M K)) Σ_{m,k} w[m, k]. With K = 1 and looser it is the single-sample ELBO the
  official code trains PolyMNIST with.

  Gradient (``estimator``): ``"iwae"`` differentiates the value; ``"legacy"`` stops every
  posterior's parameters inside log q (z and w_m keep their sample paths); ``"dreg"`` further
  weights the path derivative of (z, w_m) by the normalised weights, as `moe_iwae` does. The
  auxiliary samples w̃_n keep their plain reparameterised path to r_n's scale in every case.

  Sampling: ``k_z, k_w, k_r = jax.random.split(key, 3)``; z = `sample_experts(k_z, shared, K)`,
  w_m = `sample_experts(k_w, private, K)`; w̃ for decoder d is
  ``auxiliary[d].sample(seed=split(k_r, M)[d], sample_shape=(M, K, B))`` (the entry of stratum d
  itself is drawn and unused).

  Args:
    key: PRNG key.
    shared: M experts q_m(z | x_m), batch shape (B, Dz).
    private: M posteriors q(w_m | x_m), batch shape (B, Dw).
    auxiliary: M auxiliary priors r_m(w_m), batch shape (Dw,).
    log_likelihood: (z (M, K, B, Dz), w (M_d, M, K, B, Dw)) -> (M, K, B), the λ-weighted
      Σ_d log p(x_d | z[m], w[d, m]).
    prior_shared, prior_private: p(z) (batch (Dz,)) and p(w_m) (batch (Dw,)).
    num_samples: K.
    beta: β, the weight of the regularisation terms.
    looser: stratified bound (True) or the bound over all M·K samples (False).
    estimator: "dreg", "legacy" or "iwae"; changes the gradient only.
  """
  _check_estimator(estimator)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  m_count = len(shared)
  if m_count < 1 or len(private) != m_count or len(auxiliary) != m_count:
    raise ValueError(f"mmvae_plus_iwae needs M >= 1 shared, private and auxiliary "
                     f"distributions alike, got {len(shared)}, {len(private)}, {len(auxiliary)}")
  k_z, k_w, k_r = jax.random.split(key, 3)
  z = sample_experts(k_z, shared, num_samples)      # (M, K, B, Dz)
  w = sample_experts(k_w, private, num_samples)     # (M, K, B, Dw)
  d_z = z.shape[-1]
  keys_r = jax.random.split(k_r, m_count)
  w_aux = jnp.stack([r.sample(seed=k, sample_shape=z.shape[:-1])
                     for r, k in zip(auxiliary, keys_r)])  # (M_d, M, K, B, Dw)
  own = jnp.eye(m_count, dtype=bool)[:, :, None, None, None]

  if estimator != "iwae":
    shared = [jax.tree.map(jax.lax.stop_gradient, q) for q in shared]
    private = [jax.tree.map(jax.lax.stop_gradient, q) for q in private]

  def fn(path):
    z_, w_ = path[..., :d_z], path[..., d_z:]
    w_in = jnp.where(own, w_[None], w_aux)  # (M_d, M, K, B, Dw)
    ll = log_likelihood(z_, w_in)
    chex.assert_shape(ll, z_.shape[:-1])
    log_q_w = jnp.stack([latent_log_prob(q, w_[i]) for i, q in enumerate(private)])
    reg = (latent_log_prob(prior_shared, z_) + latent_log_prob(prior_private, w_)
           - moe_log_prob(shared, z_) - log_q_w)
    return ll + beta * reg

  axes = (1,) if looser else (0, 1)
  path = jnp.concatenate([z, w], axis=-1)
  lw = _dreg_log_weights(fn, path, axes) if estimator == "dreg" else fn(path)
  if looser:
    return jnp.mean(log_mean_exp(lw, axis=1), axis=0)
  return log_mean_exp(lw, axis=(0, 1))
