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
  estimator the official code intended (the w̃² weighting per stratum), and it is *biased*: the
  weights divide by the mixture density q_Φ, not by the expert that drew the sample, and w̃²
  converts the score of q_Φ as if that expert were the whole proposal; it is exact only where
  the experts do not overlap (responsibility 1 of a sample's own expert).
``"dreg_moe"``
  the doubly-reparameterised estimator of the stratified mixture bound (eq. (3)), unbiased for
  every M: decoders and prior as in ``legacy``; the score of q_Φ is split over the experts by
  their responsibilities r_m(z) = q_m(z) / Σ_j q_j(z) and each part is turned into a path
  derivative at a sample of the expert it belongs to, using the samples the other strata drew
  in the same step. The cotangent reaching z[j, k] is ``A[j, k] ∂lw/∂z + Σ_m B[m, j, k]
  ∂ log r_m/∂z``, computed from the (M, K, B) log-weights and the experts' densities (one pass
  back through the decoders, as for ``dreg``). With M = 1 it equals ``dreg``. Only for the
  stratified bound (``looser=True``): for the tight bound with M > 1 the same construction
  would need a sample of each expert independent of all M·K samples, i.e. extra draws, and
  ``moe_iwae`` refuses it.

The derivation, the measured bias and signal-to-noise ratio of every estimator, and which one
to choose: docs/estimators.md.

Only ``jax.lax.stop_gradient`` and ``jax.custom_vjp`` identities (which rescale the cotangent
of z) are used: no surrogate loss is needed, because the derivative of log-mean-exp with
respect to the log-weights already is ``w̃``.

Incomplete data: `moe_iwae`, `moe_elbo` and `mixture_elbo` take ``present``, an optional (M, B)
bool mask of the experts each example observes (docs/incomplete-data.md); None runs the
unmasked code unchanged.

Shapes: M modalities (experts), K samples per expert, B data, D latent dimensions.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp

from mmvae_jax.distributions import Distribution, kl_divergence, latent_log_prob

ESTIMATORS = ("iwae", "legacy", "dreg", "dreg_moe")

LogLikelihoodFn = Callable[[jax.Array], jax.Array]


def log_mean_exp(x: jax.Array, axis) -> jax.Array:
  """log (1/n) Σ exp(x) over `axis` (an int or a tuple), computed with logsumexp."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  n = 1
  for a in axes:
    n *= x.shape[a]
  return jax.nn.logsumexp(x, axis=axes) - jnp.log(n)


# ---------------------------------------------------------------------------------------------
# Incomplete data: per-example masks over experts (static shapes, one compilation for any mask).


def check_present(present: jax.Array, num_experts: int, batch: int | None = None) -> jax.Array:
  """`present` as a bool (M, B) array; ValueError when its shape does not fit."""
  present = jnp.asarray(present)
  if present.ndim != 2 or present.shape[0] != num_experts or (
      batch is not None and present.shape[1] != batch):
    want = f"({num_experts}, {'B' if batch is None else batch})"
    raise ValueError(f"present must have shape {want} (experts, examples), got {present.shape}")
  return present.astype(bool)


def _log_count(count: jax.Array, largest: int) -> jax.Array:
  """log(count) for integer counts 1..largest, looked up in a table whose entry n is computed
  as `log_mean_exp` computes its ``jnp.log(n)``: a full count gives the same float."""
  table = jnp.stack([jnp.log(n) for n in range(1, largest + 1)])
  return table[jnp.clip(count, 1, largest) - 1]


def masked_log_mean_exp(x: jax.Array, mask: jax.Array, axis) -> jax.Array:
  """log (1/n) Σ_{i: mask_i} exp(x_i) over `axis` (an int or a tuple), n the number of True
  entries of `mask` (broadcastable against `x`) in each reduced slice.

  Absent entries count for nothing and receive a zero gradient (they must be finite, which the
  callers guarantee). Every reduced slice needs one True entry. With a mask that is True
  everywhere, op by op, the result is `log_mean_exp`'s to the bit (compiled with a runtime
  mask, XLA may fuse it differently: equal to float32 rounding).
  """
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  largest = 1
  for a in axes:
    largest *= x.shape[a]
  count = jnp.sum(jnp.broadcast_to(mask, x.shape).astype(jnp.int32), axis=axes)
  lse = jax.nn.logsumexp(jnp.where(mask, x, -jnp.inf), axis=axes)
  return lse - _log_count(count, largest)


def _expert_mask(present: jax.Array, ndim: int) -> jax.Array:
  """present (M, B) reshaped to (M, 1, ..., 1, B) for arrays (M, ..., B) of `ndim` axes."""
  return present.reshape(present.shape[:1] + (1,) * (ndim - 2) + present.shape[1:])


def masked_mean(x: jax.Array, present: jax.Array) -> jax.Array:
  """Σ_{m: present[m, b]} x[m] / M_b over the first axis: x (M, ..., B), present (M, B) ->
  (..., B). With every expert present it is ``jnp.mean(x, axis=0)`` (op by op, to the bit)."""
  count = jnp.sum(present.astype(x.dtype), axis=0)
  return jnp.sum(jnp.where(_expert_mask(present, x.ndim), x, 0.0), axis=0) / count


def _mask_samples(z: jax.Array, present: jax.Array) -> jax.Array:
  """z (M, ..., B, D) with the samples of absent experts replaced by 0 (finite everywhere, no
  gradient back to the absent experts)."""
  return jnp.where(_expert_mask(present, z.ndim - 1)[..., None], z, 0.0)


def _check_estimator(estimator: str) -> None:
  if estimator not in ESTIMATORS:
    raise ValueError(f"unknown estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")


def sample_experts(key: jax.Array, posteriors: Sequence[Distribution], num_samples: int
                   ) -> jax.Array:
  """K reparameterised samples from each expert, stacked: (M, K, B, D)."""
  keys = jax.random.split(key, len(posteriors))
  return jnp.stack([q.sample(seed=k, sample_shape=(num_samples,))
                    for q, k in zip(posteriors, keys)])


def moe_log_prob(posteriors: Sequence[Distribution], z: jax.Array,
                 present: jax.Array | None = None) -> jax.Array:
  """log q_Φ(z | x_{1:M}) = log (1/M) Σ_m q_m(z) for the uniform mixture of experts.

  With `present`, example b's mixture is the uniform mixture of its present experts only,
  log (1/M_b) Σ_{m: present[m, b]} q_m(z).

  Args:
    posteriors: M experts, batch shape (B, D) (or (B,) with event (D,)).
    z: (..., B, D) latents.
    present: optional (M, B) bool, True where expert m is observed for example b.
  Returns:
    (..., B).
  """
  log_q = jnp.stack([latent_log_prob(q, z) for q in posteriors])
  if present is None:
    return log_mean_exp(log_q, axis=0)
  return masked_log_mean_exp(log_q, _expert_mask(present, log_q.ndim), axis=0)


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
# The mixture DReG path (``dreg_moe``): identity on z whose backward pass gives z[j, k] the
# cotangent A[j, k] ∂lw/∂z + Σ_m B[m, j, k] ∂ log r_m/∂z (docs/estimators.md).


def mixture_dreg_coefficients(lw: jax.Array, log_resp: jax.Array, scale: jax.Array
                              ) -> tuple[jax.Array, jax.Array]:
  """The coefficients of the ``dreg_moe`` cotangent of the samples.

  For the objective Σ_m c_m log (1/K) Σ_k w[m, k] (c_m = 1/M: eq. (3)) the unbiased
  doubly-reparameterised encoder gradient sends to sample z[j, k] (drawn from expert j) the
  cotangent ``A[j, k] ∂lw/∂z + Σ_m B[m, j, k] ∂ log r_m(z)/∂z`` with, writing w̃ for the
  per-stratum softmax of lw and ŵ[m, j, k] = w[j, k] / (w[j, k] + Σ_{k' ≠ k} w[m, k']) for the
  weight of z[j, k] placed in slot k of stratum m (ŵ[j, j, k] = w̃[j, k])::

      A[j, k]    = c_j w̃[j, k] − Σ_m c_m r_m(z[j, k]) ŵ[m, j, k] (1 − ŵ[m, j, k])
      B[m, j, k] = − c_m r_m(z[j, k]) ŵ[m, j, k]

  Args:
    lw: (M, K, B) log weights; lw[j, k] belongs to the k-th sample of stratum j.
    log_resp: (M, M, K, B) log responsibilities, log_resp[m, j, k] = log r_m(z[j, k]) =
      log q_m(z[j, k]) − log Σ_i q_i(z[j, k]).
    scale: (M, B) c_m, the derivative of the objective with respect to stratum m's
      log-mean-exp (per example).
  Returns:
    rho (M, K, B) = A / (c_j w̃), the factor on the ordinary cotangent c_j w̃ ∂lw/∂z that one
    pass back through the decoders gives (finite: its terms are ratios of sums of weights,
    formed in log space; capped at e^80 where c_j w̃ is far below float precision anyway),
    and beta (M, M, K, B) = B.
  """
  m_count, k_count, batch = lw.shape
  chex.assert_shape(log_resp, (m_count, m_count, k_count, batch))
  chex.assert_shape(scale, (m_count, batch))
  # log Σ_{k' ≠ k} w[m, k'] per slot k (−inf when K = 1): (M, K, B).
  own = jnp.eye(k_count, dtype=bool)[None, :, :, None]
  lse_others = jax.nn.logsumexp(jnp.where(own, -jnp.inf, lw[:, None]), axis=2)
  lse = jax.nn.logsumexp(lw, axis=1)                          # (M, B)
  # Stratum m with slot k holding z[j, k]: index [m, j, k, b].
  lse_hybrid = jnp.logaddexp(lw[None], lse_others[:, None])
  w_hat = jnp.exp(lw[None] - lse_hybrid)
  resp = jnp.exp(log_resp)
  c_m = scale[:, None, None, :]
  beta = -c_m * resp * w_hat
  # A / (c_j w̃[j, k]) = 1 − Σ_m (c_m / c_j) r_m (1 − ŵ_m) exp(LSE_j − LSE_hybrid[m, j, k]).
  safe_cj = jnp.where(scale == 0, 1.0, scale)
  ratio = jnp.where(scale[None] == 0, 0.0, scale[:, None] / safe_cj[None])   # (M, M, B) [m, j]
  log_term = log_resp + jnp.log1p(-jnp.minimum(w_hat, 1.0)) + lse[None, :, None] - lse_hybrid
  rho = 1.0 - jnp.sum(ratio[:, :, None] * jnp.exp(jnp.minimum(log_term, 80.0)), axis=0)
  return rho, beta


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _mixture_path(fn, log_resp_fn, num_fn_consts, z, *consts):
  return fn(z, *consts[:num_fn_consts])


def _mixture_path_fwd(fn, log_resp_fn, num_fn_consts, z, *consts):
  log_weights_, vjp = jax.vjp(fn, z, *consts[:num_fn_consts])
  log_resp, vjp_resp = jax.vjp(log_resp_fn, z, *consts[num_fn_consts:])
  return log_weights_, (vjp, vjp_resp, log_weights_, log_resp)


def _mixture_path_bwd(fn, log_resp_fn, num_fn_consts, res, cotangent):
  del fn, log_resp_fn, num_fn_consts
  vjp, vjp_resp, log_weights_, log_resp = res
  # The cotangent of lw[m, k] is c_m w̃[m, k]: the per-stratum sums give c_m.
  rho, beta = mixture_dreg_coefficients(log_weights_, log_resp, cotangent.sum(axis=1))
  grads = vjp(cotangent)
  grads_resp = vjp_resp(beta.astype(log_resp.dtype))
  z_cotangent = grads[0] * rho[..., None].astype(grads[0].dtype) + grads_resp[0]
  # The experts' parameters are constants here (stopped by the caller).
  zeros = tuple(jnp.zeros_like(g) for g in grads_resp[1:])
  return (z_cotangent,) + tuple(grads[1:]) + zeros


_mixture_path.defvjp(_mixture_path_fwd, _mixture_path_bwd)


def _dreg_moe_log_weights(log_weights_fn: LogLikelihoodFn,
                          posteriors: Sequence[Distribution], z: jax.Array) -> jax.Array:
  """log_weights_fn(z) (M, K, B) with the ``dreg_moe`` cotangent reaching z (M, K, B, D).

  `posteriors` are the M experts with their parameters stopped. The decoders and the prior
  (everything `log_weights_fn` closes over) keep the ordinary IWAE gradient.
  """
  def log_resp_fn(z_):
    log_q = jnp.stack([latent_log_prob(q, z_) for q in posteriors])  # (M, M, K, B)
    return log_q - jax.nn.logsumexp(log_q, axis=0, keepdims=True)

  fn, consts = jax.closure_convert(log_weights_fn, z)
  resp_fn, resp_consts = jax.closure_convert(log_resp_fn, z)
  return _mixture_path(fn, resp_fn, len(consts), z, *consts, *resp_consts)


# ---------------------------------------------------------------------------------------------
# Log importance weights and the bounds.


def log_weights(z: jax.Array, posteriors: Sequence[Distribution], log_likelihood: LogLikelihoodFn,
                prior: Distribution, present: jax.Array | None = None) -> jax.Array:
  """log w = log p(z) + Σ_d λ_d log p(x_d | z) − log q_Φ(z | x_{1:M}).

  λ sits inside the weights, as in the official code (see
  docs/official-code.md#likelihood-weights-inside-the-importance-weights).

  Args:
    z: (M, K, B, D) samples, z[m] drawn from expert m (stratum m).
    posteriors: the M experts used in the mixture density q_Φ.
    log_likelihood: maps (..., B, D) latents to the λ-weighted Σ_d log p(x_d | z), (..., B).
    prior: p(z), broadcastable against (B, D).
    present: optional (M, B) bool: q_Φ of example b is the mixture of its present experts
      (the log weights of absent strata are computed but meaningless).
  Returns:
    (M, K, B) log weights.
  """
  lw = latent_log_prob(prior, z) + log_likelihood(z) - moe_log_prob(posteriors, z, present)
  chex.assert_shape(lw, z.shape[:-1])
  return lw


def moe_iwae(key: jax.Array, posteriors: Sequence[Distribution], log_likelihood: LogLikelihoodFn,
             prior: Distribution, num_samples: int, *, looser: bool = True,
             estimator: str = "dreg", present: jax.Array | None = None) -> jax.Array:
  """The mixture-of-experts IWAE bound, stratified over experts (paper eq. (3)).

  With ``looser=True`` (the paper's eq. (3), the official ``m_*_looser``)::

      L = (1/M) Σ_m log (1/K) Σ_k w[m, k],      z[m, k] ~ q_m(z | x_m)

  with ``looser=False`` (the official tight ``m_iwae``, always its test objective)::

      L = log (1/(M K)) Σ_m Σ_k w[m, k]

  where ``log w = log p(z) + Σ_d λ_d log p(x_d | z) − log q_Φ(z | x_{1:M})`` and ``q_Φ`` is the
  uniform mixture of the M experts. By Jensen, looser ≤ tight. With M = 1 both are the IWAE bound.

  Incomplete data (``present``): example b observes only the experts m with present[m, b]
  (M_b ≥ 1 of them). Its q_Φ is the uniform mixture of those M_b experts, the stratified bound
  is the mean over its M_b present strata of log-mean-exp over K, the tight bound the
  log-mean-exp over its M_b·K present samples; the estimators keep their meaning, with w̃
  normalised over present samples only. Absent strata are still sampled (shapes stay static,
  so one compilation serves every mask) but get zero weight and zero gradient.

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
    estimator: ``"dreg"``, ``"legacy"``, ``"iwae"`` or ``"dreg_moe"`` (module docstring;
      docs/estimators.md). It changes the gradient only, never the value. ``"dreg_moe"`` (the
      unbiased doubly-reparameterised gradient for every M) needs ``looser=True`` when M > 1;
      ``"dreg"`` is unbiased only for M = 1.
    present: optional (M, B) bool, True where expert m is observed for example b; every
      example needs at least one. None (default): every expert present, exactly the unmasked
      computation. The caller's `log_likelihood` must itself count only the observed
      modalities (the models' ``objective(..., present=...)`` do so).
  Returns:
    (B,) per-example bound.
  """
  _check_estimator(estimator)
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  if len(posteriors) < 1:
    raise ValueError("moe_iwae needs at least one posterior")
  if estimator == "dreg_moe" and not looser and len(posteriors) > 1:
    raise ValueError("estimator 'dreg_moe' is derived for the stratified bound (looser=True); "
                     "unbiased for the tight bound it would need extra draws of every expert: "
                     "use looser=True, or estimator 'iwae' (see docs/estimators.md)")
  z = sample_experts(key, posteriors, num_samples)  # (M, K, B, D)
  if present is not None:
    return _masked_moe_iwae(z, posteriors, log_likelihood, prior,
                            check_present(present, len(posteriors), z.shape[2]),
                            looser=looser, estimator=estimator)
  # Axes of the importance-weight normalisation: K per stratum, or all M·K samples.
  axes = (1,) if looser else (0, 1)
  if estimator == "iwae":
    lw = log_weights(z, posteriors, log_likelihood, prior)
  else:
    # No score-function term: every expert's parameters are constants inside log q_Φ.
    stopped = [jax.tree.map(jax.lax.stop_gradient, q) for q in posteriors]
    fn = lambda z_: log_weights(z_, stopped, log_likelihood, prior)
    if estimator == "legacy":
      lw = fn(z)
    elif estimator == "dreg":
      lw = _dreg_log_weights(fn, z, axes)
    else:  # dreg_moe
      lw = _dreg_moe_log_weights(fn, stopped, z)
  if looser:
    return jnp.mean(log_mean_exp(lw, axis=1), axis=0)
  return log_mean_exp(lw, axis=(0, 1))


def _masked_moe_iwae(z: jax.Array, posteriors: Sequence[Distribution],
                     log_likelihood: LogLikelihoodFn, prior: Distribution, present: jax.Array,
                     *, looser: bool, estimator: str) -> jax.Array:
  """`moe_iwae` on the samples z (M, K, B, D) with the (M, B) bool mask `present`.

  Absent strata are evaluated at z = 0 (finite whatever their expert), their log weights are
  replaced by a constant before any exp or log (0 for the stratified bound, whose mean leaves
  them out; −inf for the tight one, where they leave the softmax), so neither their values nor
  their gradients can reach the bound.
  """
  if estimator not in ("iwae", "legacy", "dreg"):
    raise ValueError(f"moe_iwae: estimator {estimator!r} does not take a presence mask yet")
  z = _mask_samples(z, present)
  strata = _expert_mask(present, z.ndim - 1)  # (M, 1, B)
  fill = 0.0 if looser else -jnp.inf

  def masked_log_weights(z_, qs):
    lw = log_weights(z_, qs, log_likelihood, prior, present)
    return jnp.where(strata, lw, fill)

  axes = (1,) if looser else (0, 1)
  if estimator == "iwae":
    lw = masked_log_weights(z, posteriors)
  else:
    stopped = [jax.tree.map(jax.lax.stop_gradient, q) for q in posteriors]
    fn = lambda z_: masked_log_weights(z_, stopped)
    lw = fn(z) if estimator == "legacy" else _dreg_log_weights(fn, z, axes)
  if looser:
    return masked_mean(log_mean_exp(lw, axis=1), present)
  return masked_log_mean_exp(lw, strata, axis=(0, 1))


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
             log_likelihoods: Sequence[LogLikelihoodFn], prior: Distribution,
             present: jax.Array | None = None) -> jax.Array:
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
    present: optional (M, B) bool (incomplete data): example b uses only its M_b present
      experts and decoders, L = (1/M_b) [Σ_{r, d present} w[r, d] λ_d log p(x_d | z_d) −
      Σ_{r present} KL(q_r || p)]. None: every expert present (the unmasked computation).
  """
  m_count = len(posteriors)
  if len(log_likelihoods) != m_count:
    raise ValueError(f"moe_elbo: {len(log_likelihoods)} likelihoods for {m_count} posteriors")
  keys = jax.random.split(key, 2 * m_count)
  if present is not None:
    return _masked_moe_elbo(keys, posteriors, log_likelihoods, prior,
                            check_present(present, m_count))
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


def _masked_moe_elbo(keys: jax.Array, posteriors: Sequence[Distribution],
                     log_likelihoods: Sequence[LogLikelihoodFn], prior: Distribution,
                     present: jax.Array) -> jax.Array:
  """`moe_elbo` over the present experts of each example ((M, B) bool `present`)."""
  m_count = len(posteriors)
  total, kl = 0.0, 0.0
  for d in range(m_count):
    z_d = posteriors[d].sample(seed=keys[d])  # (B, D), live
    z_d = jnp.where(present[d][:, None], z_d, 0.0)
    z_sg = jax.lax.stop_gradient(z_d)
    log_q_dd = jax.lax.stop_gradient(latent_log_prob(posteriors[d], z_sg))
    weight = 1.0
    for r in range(m_count):
      if r != d:
        ratio = jnp.where(present[r], latent_log_prob(posteriors[r], z_sg) - log_q_dd, -jnp.inf)
        weight = weight + jnp.exp(ratio)
    total = total + jnp.where(present[d], weight * log_likelihoods[d](z_d), 0.0)
  for r, q in enumerate(posteriors):
    kl = kl + jnp.where(present[r], kl_divergence(q, prior, key=keys[m_count + r]), 0.0)
  return (total - kl) / jnp.sum(present.astype(jnp.float32), axis=0)


def mixture_elbo(key: jax.Array, posteriors: Sequence[Distribution],
                 log_likelihood: LogLikelihoodFn, prior: Distribution,
                 present: jax.Array | None = None) -> jax.Array:
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
    present: optional (C, B) bool (incomplete data): example b's mixture has only the C_b
      components with present[c, b], L = (1/C_b) Σ_{c present} [...]. None: all present.
  Returns:
    (B,) per-example bound.
  """
  num = len(posteriors)
  if num < 1:
    raise ValueError("mixture_elbo needs at least one posterior")
  keys = jax.random.split(key, 2 * num)
  z = jnp.stack([q.sample(seed=keys[c]) for c, q in enumerate(posteriors)])  # (C, B, D)
  if present is not None:
    present = check_present(present, num, z.shape[1])
    z = _mask_samples(z, present)
  ll = log_likelihood(z)
  chex.assert_shape(ll, z.shape[:-1])
  kl = jnp.stack([kl_divergence(q, prior, key=keys[num + c]) for c, q in enumerate(posteriors)])
  if present is not None:
    return masked_mean(ll - kl, present)
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
  if estimator == "dreg_moe":
    raise ValueError("mmvae_plus_iwae: estimator 'dreg_moe' is derived for moe_iwae's mixture "
                     "bound only: use 'iwae', 'dreg' or 'legacy'")
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
