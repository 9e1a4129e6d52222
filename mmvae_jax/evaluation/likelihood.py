"""Importance-sampled log-likelihoods (paper Table 3; spec §9.6), streamed over sample chunks.

For one batch, K samples are drawn from every expert (the same samples serve every estimate, as
in the official script) and, with M experts, D decoders::

  lw_w[e,k]       = log p(z) + Σ_d λ_d log p(x_d | z) − log q_Φ(z | x_{1:M})     z = z[e,k]
  joint (λ)       = LME over all (e, k) of lw_w                 "log p(x_1, ..., x_M)" as the
                    official tight m_iwae reports it: **λ inside**, so not a normalised density
  joint (λ = 1)   = the same with every λ_d = 1: a genuine estimate of log p(x_1, ..., x_M)
  log p(x_d | x_{1:M}) = LME over all (e, k) of [log p(x_d | z) + log p(z) − log q_Φ(z | x)]
  log p(x_d | x_e)     = LME over k of [log p(x_d | z[e,k]) + log p(z[e,k]) − log q_e(z[e,k] | x_e)]

The conditionals are unweighted (no λ), as in the official script. "log p(x_d | x_d)" is the
IWAE estimate of the marginal log p(x_d) with the single proposal q_d; "log p(x_d | x_e)" uses
the other modality's expert as the proposal; "log p(x_d | x_{1:M})" the mixture q_Φ.

For a product-of-experts model (the MVAE, any model with ``posterior(params, observed)``; see
`common.has_product_posterior`) the proposals are its closed-form subset posteriors: K samples
z[J,k] of the joint PoE q(z | x_{1:M}) serve the joint and log p(x_d | x_{1:M}) (LME over k, no
strata), and K samples z[e,k] of q(z | x_e) (the PoE of the prior expert and expert e) serve
log p(x_d | x_e); every log weight is log p(x_d | z) + log p(z) − log q(z) of that proposal.

Memory: the K samples are processed in chunks of `chunk_size` with a running log-sum-exp
(`jax.lax.scan`), so peak memory is O(M · chunk_size · B) decoder outputs whatever K. Sample k
of expert e is drawn with the key fold_in(fold_in(key, e), k), so the estimates do not depend on
the chunk size (up to floating-point summation order).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmvae_jax.distributions import latent_log_prob
from mmvae_jax.evaluation.common import has_product_posterior, paired_batches, select_rows

LAMBDA_CONVENTION = (
    "joint_weighted = LME over all M*K MoE samples of [log p(z) + sum_d lambda_d log p(x_d|z) - "
    "log q_Phi(z|x)] (the official tight m_iwae, lambda INSIDE: not a normalised log-density); "
    "joint_unweighted = the same with every lambda_d = 1; every conditional log p(x_d | ...) is "
    "unweighted (lambda = 1)")
POE_CONVENTION = (
    "product of experts: joint_weighted = LME over K samples of the joint PoE posterior "
    "q(z|x_1..x_M) of [log p(z) + sum_d lambda_d log p(x_d|z) - log q(z|x_1..x_M)] (lambda "
    "INSIDE: not a normalised log-density); joint_unweighted = the same with every lambda_d = 1; "
    "log p(x_d|x_1..x_M) uses the same samples and proposal, log p(x_d|x_e) K samples of the PoE "
    "q(z|x_e) of the prior expert and expert e; every conditional is unweighted (lambda = 1)")


def sample_indexed(posteriors, key: jax.Array, indices: jax.Array) -> jax.Array:
  """Samples z[e, k] for k in `indices` (C,), each from its own key: (M, C, B, D).

  Sample k of expert e always uses fold_in(fold_in(key, e), k), whatever the chunking.
  """
  out = []
  for e, q in enumerate(posteriors):
    ke = jax.random.fold_in(key, e)
    keys = jax.vmap(lambda i: jax.random.fold_in(ke, i))(indices)
    out.append(jax.vmap(lambda k: q.sample(seed=k))(keys))
  return jnp.stack(out)


def _chunk_terms(model, params, xs, posteriors, prior, z, ll=None, lp=None):
  """Log-weight terms for z (M, C, B, D) of an MMVAE (`ll`, `lp`: already computed terms).

  Returns:
    ll: (M_d, M, C, B) unweighted log p(x_d | z); lp: (M, C, B) log p(z);
    lq: (M_q, M, C, B) log q_q(z | x_q) of every expert q; lqmix: (M, C, B) log q_Φ(z | x).
  """
  ll = model.log_likelihoods(params, xs, z, weighted=False) if ll is None else ll
  lp = latent_log_prob(prior, z) if lp is None else lp
  lq = jnp.stack([latent_log_prob(q, z) for q in posteriors])
  lqmix = jax.nn.logsumexp(lq, axis=0) - jnp.log(len(posteriors))
  return ll, lp, lq, lqmix


def batch_log_likelihoods(model, params, xs, key: jax.Array, num_samples: int,
                          chunk_size: int | None = None) -> dict[str, jax.Array]:
  """Every estimate for one batch, streamed over chunks of samples (pure; jit with static K, C).

  Args:
    model: an `MMVAE` (mixture proposal, module docstring) or a product-of-experts model such
      as the `MVAE` (PoE proposals) with M modalities.
    params: its parameters.
    xs: M arrays (B, *data_shape_m).
    key: PRNG key of the samples.
    num_samples: K samples per expert (MMVAE) or per proposal (MVAE).
    chunk_size: samples per proposal decoded at once (default: K, i.e. unchunked).
  Returns:
    {"joint_weighted": (B,), "joint_unweighted": (B,), "given_all": (M_d, B),
     "given_one": (M_d, M_e, B)} where given_one[d, e] estimates log p(x_d | x_e).
  """
  k_total = int(num_samples)
  if k_total < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")
  c = k_total if not chunk_size else min(int(chunk_size), k_total)
  n_chunks = -(-k_total // c)
  m = model.num_modalities
  product = has_product_posterior(model)
  if product:
    model._check_data(xs)  # pylint: disable=protected-access
    # Proposals 0..M-1: q(z | x_e); proposal M: the joint q(z | x_{1:M}).
    proposals = [model.posterior(params, {n: x}) for n, x in zip(model.names, xs)]
    proposals.append(model.posterior(params, dict(zip(model.names, xs))))
  else:
    proposals = model.encode(params, xs)
  prior = model.prior(params)
  lam = jnp.asarray([mod.llik_scale for mod in model.modalities], jnp.float32)
  b = xs[0].shape[0]
  neg_inf = -jnp.inf

  def terms(z):
    """The four log-weight sets of a chunk z (P, C, B, D), each (..., C, B), and the sample
    axes each is log-sum-exp reduced over ((expert, k) for the mixture, k for a product)."""
    ll = model.log_likelihoods(params, xs, z, weighted=False)  # (M_d, P, C, B)
    lp = latent_log_prob(prior, z)  # (P, C, B)
    if product:
      lq = jnp.stack([latent_log_prob(q, z[j]) for j, q in enumerate(proposals)])  # (P, C, B)
      base = lp - lq
      joint_w = base[m] + jnp.einsum("d,d...->...", lam, ll[:, m])         # (C, B)
      joint_u = base[m] + jnp.sum(ll[:, m], axis=0)                         # (C, B)
      given_all = ll[:, m] + base[m][None]                                  # (M_d, C, B)
      given_one = ll[:, :m] + base[:m][None]                                # (M_d, M_e, C, B)
      return (joint_w, joint_u, given_all, given_one), ((0,), (0,), (1,), (2,))
    _, _, lq, lqmix = _chunk_terms(model, params, xs, proposals, prior, z, ll=ll, lp=lp)
    joint_w = lp + jnp.einsum("d,d...->...", lam, ll) - lqmix              # (M, C, B)
    joint_u = lp + jnp.sum(ll, axis=0) - lqmix                              # (M, C, B)
    given_all = ll + (lp - lqmix)[None]                                     # (M_d, M, C, B)
    own = jnp.stack([lq[e, e] for e in range(m)])                           # (M, C, B)
    given_one = ll + (lp - own)[None]                                       # (M_d, M_e, C, B)
    return (joint_w, joint_u, given_all, given_one), ((0, 1), (0, 1), (1, 2), (2,))

  def body(carry, i):
    idx = i * c + jnp.arange(c)
    valid = idx < k_total  # (C,)
    z = sample_indexed(proposals, key, jnp.minimum(idx, k_total - 1))
    values, axes = terms(z)
    mask = lambda t: jnp.where(valid[:, None], t, neg_inf)  # t (..., C, B)
    names = ("joint_weighted", "joint_unweighted", "given_all", "given_one")
    new = {k: jax.nn.logsumexp(mask(t), axis=a) for k, t, a in zip(names, values, axes)}
    return jax.tree.map(jnp.logaddexp, carry, new), None

  init = {"joint_weighted": jnp.full((b,), neg_inf), "joint_unweighted": jnp.full((b,), neg_inf),
          "given_all": jnp.full((m, b), neg_inf), "given_one": jnp.full((m, m, b), neg_inf)}
  lse, _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
  log_k = jnp.log(k_total)
  log_joint = log_k if product else jnp.log(m * k_total)  # samples behind the joint estimates
  return {"joint_weighted": lse["joint_weighted"] - log_joint,
          "joint_unweighted": lse["joint_unweighted"] - log_joint,
          "given_all": lse["given_all"] - log_joint,
          "given_one": lse["given_one"] - log_k}


def log_likelihoods(model, params, dataset, *, key: jax.Array, num_samples: int = 1000,
                    chunk_size: int | None = 100, batch_size: int | None = None,
                    num: int | None = None, seed: int = 0, log=None) -> dict:
  """Table 3 estimates averaged over (a random subset of) the test pairs.

  Args:
    model, params: the MMVAE, MVAE or single-modality VAE (M = 1: the one key "log p(d|d)",
      the K-sample IWAE estimate of log p(x_d)).
    dataset: `PairedDataset` of test pairs.
    key: PRNG key (one per batch via fold_in).
    num_samples: K (official: 1000).
    chunk_size: samples per expert per decoder call (None: all K at once).
    batch_size: pairs per batch (default ⌊12000 / K⌋, at least 1, as the official script).
    num: random subset of that many pairs (None/0: all).
    log: optional callable receiving about ten progress lines.
  Returns:
    {"joint_weighted", "joint_unweighted": floats, "conditional": {"log p(d|a,b)": float, ...},
     "lambda": {name: λ}, "proposal": "moe" (MMVAE) or "poe" (MVAE), "convention":
     LAMBDA_CONVENTION or POE_CONVENTION, "num_samples", "num"}. Conditional
    keys are "log p(d|<all names>)" and "log p(d|e)" for every d, e.
  """
  names = model.names
  bs = batch_size or max(1, 12000 // int(num_samples))
  fn = jax.jit(functools.partial(batch_log_likelihoods, model, num_samples=num_samples,
                                 chunk_size=chunk_size))
  rows = select_rows(len(dataset), num, seed)
  sums = None
  total = 0.0
  n_batches = -(-len(rows) // min(bs, len(rows)))
  start = time.perf_counter()
  for i, (xs, _, mask) in enumerate(paired_batches(dataset, rows, bs)):
    out = jax.device_get(fn(params, tuple(xs), jax.random.fold_in(key, i)))
    masked = {k: np.sum(np.asarray(v, np.float64) * mask, axis=-1) for k, v in out.items()}
    sums = masked if sums is None else {k: sums[k] + masked[k] for k in sums}
    total += float(mask.sum())
    if log is not None and ((i + 1) % -(-n_batches // 10) == 0 or i + 1 == n_batches):
      log(f"likelihood: {int(total)}/{len(rows)} pairs, {time.perf_counter() - start:.0f}s")
  mean = {k: v / total for k, v in sums.items()}
  every = ",".join(names)
  conditional = {}
  for d, nd in enumerate(names):
    conditional[f"log p({nd}|{every})"] = float(mean["given_all"][d])
    for e, ne in enumerate(names):
      conditional[f"log p({nd}|{ne})"] = float(mean["given_one"][d, e])
  return {"joint_weighted": float(mean["joint_weighted"]),
          "joint_unweighted": float(mean["joint_unweighted"]),
          "conditional": conditional,
          "lambda": {mod.name: float(mod.llik_scale) for mod in model.modalities},
          "proposal": "poe" if has_product_posterior(model) else "moe",
          "convention": POE_CONVENTION if has_product_posterior(model) else LAMBDA_CONVENTION,
          "num_samples": int(num_samples), "num": int(total),
          "batch_size": int(bs), "chunk_size": int(chunk_size or num_samples)}
