"""Importance-sampled log-likelihoods (the paper's Table 3), streamed over sample chunks.

Every estimate is a log-mean-exp of importance weights under a proposal taken from the model's
own posterior, ``model.posterior(params, observed)``, so it applies to any model of the library:

* the proposal of log p(x_d | x_e) is q(z | x_e), the posterior of modality e alone;
* the proposal of the joint and of log p(x_d | x_{1:M}) is q(z | x_{1:M}), the posterior of all
  modalities.

A proposal that is a `UniformMixture` of C components is sampled stratified: K samples of each
component, C·K in all, each weighted with the density of the whole mixture, and the estimate is
the log-mean-exp over all C·K samples. A plain distribution is one component (K samples). With
P the proposal and z its samples::

  joint (λ)          LME_z [log p(z) + Σ_d λ_d log p(x_d | z) − log q_P(z)]    P = q(z | x_{1:M})
  joint (λ = 1)      the same with every λ_d = 1: an estimate of log p(x_1, ..., x_M)
  log p(x_d | x_{1:M})  LME_z [log p(x_d | z) + log p(z) − log q_P(z)]       P = q(z | x_{1:M})
  log p(x_d | x_e)      LME_z [log p(x_d | z) + log p(z) − log q_P(z)]       P = q(z | x_e)

The "joint (λ)" estimate keeps λ inside the log weights, as the official code's test objective
does, so it is not a normalised log-density (docs/official-code.md, "Likelihood weights inside
the importance weights"). The conditionals are unweighted. For the MMVAE, q(z | x_{1:M}) is the
uniform mixture of its M experts and "joint (λ)" is exactly the official tight MoE-IWAE over
M·K samples; log p(x_d | x_d) is the IWAE estimate of log p(x_d) with the expert q_d. For the
MVAE every proposal is a single product of experts (K samples). With M = 1 the joint proposal is
the single modality's posterior, and its samples serve every estimate.

Memory: the K samples are processed in chunks of `chunk_size` with a running log-sum-exp
(`jax.lax.scan`), so peak memory is O(J · chunk_size · B) decoder outputs whatever K, J being the
number of components of all proposals together. Sample k of component j (the components of every
proposal listed one after another: those of q(z | x_1), ..., q(z | x_M), then those of
q(z | x_{1:M})) is drawn with the key fold_in(fold_in(key, j), k), so the estimates do not depend
on the chunk size (up to floating-point summation order).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmvae_jax.distributions import latent_log_prob
from mmvae_jax.evaluation.common import paired_batches, select_rows
from mmvae_jax.models import components

CONVENTION = (
    "proposals are the model's posteriors: q(z|x_1..x_M) for the joint estimates and "
    "log p(x_d|x_1..x_M), q(z|x_e) for log p(x_d|x_e); a mixture proposal is sampled K times "
    "per component and weighted with the mixture density; joint_weighted = LME of [log p(z) + "
    "sum_d lambda_d log p(x_d|z) - log q(z|x_1..x_M)] (lambda INSIDE, as the official test "
    "objective: not a normalised log-density); joint_unweighted = the same with every "
    "lambda_d = 1; every conditional log p(x_d | ...) is unweighted (lambda = 1)")


def sample_indexed(posteriors, key: jax.Array, indices: jax.Array) -> jax.Array:
  """Samples z[j, k] for k in `indices` (C,), each from its own key: (J, C, B, D).

  Sample k of distribution j always uses fold_in(fold_in(key, j), k), whatever the chunking.
  """
  out = []
  for j, q in enumerate(posteriors):
    kj = jax.random.fold_in(key, j)
    keys = jax.vmap(lambda i, kj=kj: jax.random.fold_in(kj, i))(indices)
    out.append(jax.vmap(lambda k, q=q: q.sample(seed=k))(keys))
  return jnp.stack(out)


def proposals(model, params, xs) -> tuple[list, int]:
  """([q(z | x_1), ..., q(z | x_M), q(z | x_{1:M})], index of the joint proposal).

  With M = 1 the joint proposal is the single posterior (one proposal, index 0).
  """
  model.check_data(xs)
  out = [model.posterior(params, {n: x}) for n, x in zip(model.names, xs)]
  if model.num_modalities == 1:
    return out, 0
  out.append(model.posterior(params, dict(zip(model.names, xs))))
  return out, model.num_modalities


def mixture_log_prob(comps, z: jax.Array) -> jax.Array:
  """log (1/C) Σ_c q_c(z) of the components `comps`: z (..., B, D) -> (..., B)."""
  lq = jnp.stack([latent_log_prob(q, z) for q in comps])
  return jax.nn.logsumexp(lq, axis=0) - jnp.log(len(comps))


def batch_log_likelihoods(model, params, xs, key: jax.Array, num_samples: int,
                          chunk_size: int | None = None) -> dict[str, jax.Array]:
  """Every estimate for one batch, streamed over chunks of samples (pure; jit with static K, C).

  Args:
    model: any model of the library (`mmvae_jax.models.MultimodalVAE`), M modalities.
    params: its parameters.
    xs: M arrays (B, *data_shape_m).
    key: PRNG key of the samples (module docstring for the key of each sample).
    num_samples: K samples per proposal component.
    chunk_size: samples per component decoded at once (default: K, i.e. unchunked).
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
  props, joint = proposals(model, params, xs)
  comps = [tuple(components(p)) for p in props]
  flat = [q for cs in comps for q in cs]
  starts = np.cumsum([0] + [len(cs) for cs in comps])
  prior = model.prior(params)
  lam = jnp.asarray([mod.llik_scale for mod in model.modalities], jnp.float32)
  b = xs[0].shape[0]
  neg_inf = -jnp.inf

  def body(carry, i):
    idx = i * c + jnp.arange(c)
    valid = idx < k_total  # (C,)
    z = sample_indexed(flat, key, jnp.minimum(idx, k_total - 1))  # (J, C, B, D)
    ll = model.log_likelihoods(params, xs, z, weighted=False)  # (M_d, J, C, B)
    lp = latent_log_prob(prior, z)  # (J, C, B)
    lse = lambda t: jax.nn.logsumexp(jnp.where(valid[:, None], t, neg_inf), axis=(-3, -2))
    new = {}
    given_one = []
    for p, cs in enumerate(comps):
      s = slice(int(starts[p]), int(starts[p + 1]))
      base = lp[s] - mixture_log_prob(cs, z[s])  # (C_p, C, B): log p(z) − log q_p(z)
      terms = ll[:, s] + base[None]  # (M_d, C_p, C, B)
      if p < m:
        given_one.append(lse(terms))  # (M_d, B)
      if p == joint:
        new["joint_weighted"] = lse(base + jnp.einsum("d,d...->...", lam, ll[:, s]))
        new["joint_unweighted"] = lse(base + jnp.sum(ll[:, s], axis=0))
        new["given_all"] = lse(terms)
    new["given_one"] = jnp.stack(given_one, axis=1)  # (M_d, M_e, B)
    return jax.tree.map(jnp.logaddexp, carry, new), None

  init = {"joint_weighted": jnp.full((b,), neg_inf), "joint_unweighted": jnp.full((b,), neg_inf),
          "given_all": jnp.full((m, b), neg_inf), "given_one": jnp.full((m, m, b), neg_inf)}
  lse, _ = jax.lax.scan(body, init, jnp.arange(n_chunks))
  log_joint = jnp.log(len(comps[joint]) * k_total)  # samples behind the joint estimates
  log_one = jnp.log(jnp.asarray([len(comps[e]) * k_total for e in range(m)], jnp.float32))
  return {"joint_weighted": lse["joint_weighted"] - log_joint,
          "joint_unweighted": lse["joint_unweighted"] - log_joint,
          "given_all": lse["given_all"] - log_joint,
          "given_one": lse["given_one"] - log_one[None, :, None]}


def log_likelihoods(model, params, dataset, *, key: jax.Array, num_samples: int = 1000,
                    chunk_size: int | None = 100, batch_size: int | None = None,
                    num: int | None = None, seed: int = 0, log=None) -> dict:
  """Table 3 estimates averaged over (a random subset of) the test pairs.

  Args:
    model, params: any model and its parameters (M = 1: the one conditional "log p(d|d)", the
      K-sample IWAE estimate of log p(x_d)).
    dataset: `PairedDataset` of test pairs.
    key: PRNG key (one per batch via fold_in).
    num_samples: K per proposal component (official: 1000).
    chunk_size: samples per component per decoder call (None: all K at once).
    batch_size: pairs per batch (default ⌊12000 / K⌋, at least 1, as the official script).
    num: random subset of that many pairs (None/0: all).
    log: optional callable receiving about ten progress lines.
  Returns:
    {"joint_weighted", "joint_unweighted": floats, "conditional": {"log p(d|a,b)": float, ...},
     "lambda": {name: λ}, "proposals": {subset: number of mixture components}, "convention":
     CONVENTION, "num_samples", "num", "batch_size", "chunk_size"}. Conditional keys are
    "log p(d|<all names>)" (M >= 2) and "log p(d|e)" for every d, e.
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
  counts = None
  for i, (xs, _, mask) in enumerate(paired_batches(dataset, rows, bs)):
    if counts is None:
      counts = component_counts(model, params, xs)
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
    if len(names) > 1:
      conditional[f"log p({nd}|{every})"] = float(mean["given_all"][d])
    for e, ne in enumerate(names):
      conditional[f"log p({nd}|{ne})"] = float(mean["given_one"][d, e])
  return {"joint_weighted": float(mean["joint_weighted"]),
          "joint_unweighted": float(mean["joint_unweighted"]),
          "conditional": conditional,
          "lambda": {mod.name: float(mod.llik_scale) for mod in model.modalities},
          "proposals": counts, "convention": CONVENTION,
          "num_samples": int(num_samples), "num": int(total),
          "batch_size": int(bs), "chunk_size": int(chunk_size or num_samples)}


def component_counts(model, params, xs) -> dict[str, int]:
  """{"e": components of q(z | x_e), ..., "a,b,...": components of q(z | x_{1:M})}, from the
  posteriors' structure only (nothing is computed)."""
  counts = {}

  def count(params, xs):
    props, _ = proposals(model, params, xs)
    keys = [(n,) for n in model.names] + ([tuple(model.names)] if len(props) > len(xs) else [])
    for k, p in zip(keys, props):
      counts[",".join(k)] = len(components(p))
    return 0

  jax.eval_shape(count, params, tuple(jnp.asarray(x) for x in xs))
  return counts
