"""Baselines of the MMVAE paper: the MVAE (product of experts) and the single-modality VAE.

MVAE (Wu & Goodman, NeurIPS 2018)
---------------------------------
The joint posterior of any non-empty subset S of observed modalities is the product of Gaussian
experts times a prior expert N(0, I), in closed form (precision weighting)::

    T = 1 + Σ_{m∈S} 1/σ_m²,   μ = (Σ_{m∈S} μ_m/σ_m²) / T,   σ² = 1/T.

Training is the MVAE's sub-sampled regime: the ELBO with every modality observed plus the ELBO of
each modality alone (the PoE of the prior expert and that one expert, reconstructing only that
modality), summed::

    L(x_{1:M}) = ELBO(x_{1:M} | q_{1:M}) + Σ_m ELBO(x_m | q_{m}),
    ELBO(x_S | q_S) = E_{q_S}[Σ_{d∈S} λ_d log p(x_d | z)] − KL(q_S(z | x_S) || N(0, I)).

(For M > 2 the MVAE paper optionally adds ELBOs of random further subsets; that is not done here.)
The K-sample variant replaces each ELBO by the IWAE bound of the same term.

Every expert, whatever its modality's `posterior_family`, is Gaussian (the PoE needs Gaussians);
only the encoder's second head is read differently (`MVAE.expert_scale`).

Single-modality VAE
-------------------
`single_vae` builds an `MMVAE` with one modality: with M = 1 the MoE-IWAE is the IWAE, so every
unimodal objective is available through the MMVAE's own `objective`.

Shapes: M modalities, K samples, B data, D latent dimensions, E experts.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import distrax
import jax
import jax.numpy as jnp

from mmvae_jax import distributions as dists
from mmvae_jax import loss as losses
from mmvae_jax.models.base import DEFAULT_ESTIMATOR, Modality, MultimodalVAE, Params, ScaleFn
from mmvae_jax.models.mmvae import MMVAE

VARIANCE_EPS = 1e-8  # added to exp(log-variance) inside the PoE, as in Wu & Goodman's code


# ---------------------------------------------------------------------------------------------
# The product of Gaussian experts.


def product_of_experts(locs: jax.Array, scales: jax.Array, mask: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Closed-form product of E factorised Gaussian experts N(locs[e], scales[e]²).

  The product of Gaussian densities is, up to normalisation, the Gaussian with precision
  T = Σ_e 1/σ_e² and mean (Σ_e μ_e/σ_e²)/T. No prior expert is added here: stack N(0, 1) into
  `locs`/`scales` to include one (as `MVAE.posterior` does).

  Args:
    locs: (E, ..., D) expert means.
    scales: (E, ..., D) expert standard deviations (> 0).
    mask: optional (E, ...) or (E, ..., D) weights in {0, 1}; expert e is left out where
      mask[e] = 0 (per datum missing modalities). Every datum must keep at least one expert.
  Returns:
    (loc, scale), each (..., D): mean and standard deviation of the product.
  """
  locs, scales = jnp.asarray(locs), jnp.asarray(scales)
  if locs.shape != scales.shape or locs.ndim < 2:
    raise ValueError(f"product_of_experts: locs {locs.shape} and scales {scales.shape} must "
                     f"have the same shape (E, ..., D)")
  precision = 1.0 / jnp.square(scales)
  if mask is not None:
    mask = jnp.asarray(mask, precision.dtype)
    if mask.ndim == locs.ndim - 1:
      mask = mask[..., None]
    precision = precision * mask
  total = jnp.sum(precision, axis=0)
  loc = jnp.sum(precision * locs, axis=0) / total
  return loc, jax.lax.rsqrt(total)


def poe(experts: Sequence[tuple[jax.Array, jax.Array]], prior_expert: bool = True,
        present: jax.Array | None = None) -> distrax.Normal:
  """[N(0, I) ×] Π experts, for experts given as (loc (B, D), scale (B, D)): batch (B, D).

  `present`: optional (E, B) bool over `experts` (incomplete data): expert e leaves the
  product of example b (precision 0) where present[e, b] is False; the prior expert always
  stays. Without a prior expert every example needs one present expert.
  """
  locs = [loc for loc, _ in experts]
  scales = [scale for _, scale in experts]
  if prior_expert:
    locs, scales = [jnp.zeros_like(locs[0])] + locs, [jnp.ones_like(scales[0])] + scales
    if present is not None:
      present = jnp.concatenate([jnp.ones_like(present[:1]), present], axis=0)
  return distrax.Normal(*product_of_experts(jnp.stack(locs), jnp.stack(scales), present))


# ---------------------------------------------------------------------------------------------
# Scale constraints of the Gaussian experts.


def log_variance_scale(pre: jax.Array, eps: float = VARIANCE_EPS) -> jax.Array:
  """σ = sqrt(exp(pre) + eps): the second head is a log-variance, as in Wu & Goodman's code."""
  return jnp.sqrt(jnp.exp(pre) + eps)


EXPERT_SCALES: dict[str, ScaleFn | None] = {
    "logvar": log_variance_scale,           # Wu & Goodman's public recipe
    "softplus": dists.softplus_scale,       # softplus(v) + 1e-6
    "modality": None,                       # each Modality's own posterior_scale (MMVAE's)
}


@dataclasses.dataclass(frozen=True, repr=False)
class GaussianExperts(MultimodalVAE):
  """A model whose experts are Gaussian with a chosen scale constraint (the PoE models).

  Attributes:
    expert_scale: how the encoder's second head v becomes the expert's standard deviation:
      "logvar" (default): σ = sqrt(exp(v) + 1e-8), v a log-variance (Wu & Goodman);
      "softplus": σ = softplus(v) + 1e-6; "modality": each modality's `posterior_scale` (the
      MMVAE's softmax(v)·D + 1e-6 for MNIST/SVHN); or any function (B, D) -> (B, D) positive.
  """
  expert_scale: str | ScaleFn = "logvar"

  def __post_init__(self):
    super().__post_init__()
    if isinstance(self.expert_scale, str) and self.expert_scale not in EXPERT_SCALES:
      raise ValueError(f"unknown expert_scale {self.expert_scale!r}: choose "
                       f"{', '.join(EXPERT_SCALES)} or pass a function")

  def expert_loc_scale(self, params: Params, name: str, x: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    m = self.modality(name)
    loc, pre = m.encoder_outputs(params, x)
    if callable(self.expert_scale):
      fn = self.expert_scale
    else:
      fn = EXPERT_SCALES[self.expert_scale] or m.posterior_scale
    return loc, fn(pre)

  def expert(self, params: Params, name: str, x: jax.Array) -> distrax.Normal:
    """The single Gaussian expert q_m(z | x_m) (no prior expert): batch (B, D)."""
    return distrax.Normal(*self.expert_loc_scale(params, name, x))


# ---------------------------------------------------------------------------------------------
# The MVAE.

# Older names of the sub-sampled objectives (the MMVAE's objective names), still accepted.
OBJECTIVE_ALIASES = {"moe_elbo": "subsampled_elbo", "moe_iwae": "subsampled_iwae"}


@dataclasses.dataclass(frozen=True, repr=False)
class MVAE(GaussianExperts):
  """Product-of-experts multimodal VAE (Wu & Goodman 2018).

  Parameters are ``{"encoders": {name: ...}, "decoders": {name: ...}}``; the prior is the fixed
  N(0, I), which is also the prior expert of every product.
  """
  objectives = ("subsampled_elbo", "subsampled_iwae", "joint_elbo", "joint_iwae")
  default_objective = "subsampled_elbo"

  def resolve_objective(self, kind: str | None) -> str:
    return super().resolve_objective(OBJECTIVE_ALIASES.get(kind, kind))

  def posterior(self, params: Params, observed: Mapping[str, jax.Array]) -> distrax.Normal:
    """PoE posterior q(z | x_S) ∝ N(0, I) Π_{m∈S} q_m(z | x_m) of any non-empty subset S."""
    self.check_observed(observed)
    return poe([self.expert_loc_scale(params, n, x) for n, x in observed.items()])

  def subset_posteriors(self, params: Params, xs: Sequence[jax.Array],
                        present: jax.Array | None = None) -> list[distrax.Normal]:
    """[q(z | x_{1:M}), q(z | x_1), ..., q(z | x_M)], each PoE with the prior expert, (B, D).

    Each encoder runs once; the M + 1 products reuse its outputs. With `present` ((M, B)
    bool), the joint product of example b has its present experts only.
    """
    self.check_data(xs)
    experts = [self.expert_loc_scale(params, n, x) for n, x in zip(self.names, xs)]
    return [poe(experts, present=present)] + [poe([e]) for e in experts]

  def objective(self, params: Params, xs: Sequence[jax.Array], key: jax.Array,
                num_samples: int, *, kind: str | None = None, looser: bool = True,
                estimator: str = DEFAULT_ESTIMATOR, present: jax.Array | None = None
                ) -> jax.Array:
    """Per-example objective (B,) (a bound to maximise).

    kind:
      "subsampled_elbo" (default; alias "moe_elbo"): Wu & Goodman's training objective, the
        joint ELBO plus the M unimodal ELBOs (module docstring), each with one reparameterised
        sample and the closed-form Gaussian KL. K and `estimator` are ignored.
        Term j (0: joint, m + 1: modality m alone) uses the noise
        ε_j = jax.random.normal(jax.random.split(key, M + 1)[j], (B, D)), z_j = μ_j + σ_j ε_j.
      "subsampled_iwae" (alias "moe_iwae"): the same sum with every term the K-sample IWAE bound
        (`mmvae_jax.loss.iwae` with `estimator`).
      "joint_elbo" / "joint_iwae": the joint term alone, a lower bound on the λ-weighted
        log p(x_{1:M}).
    `looser` has no meaning for a product posterior and is ignored.
    `present` ((M, B) bool, incomplete data): the joint term of example b is the PoE of the
    prior expert and its present experts, scoring its present modalities; the unimodal term of
    an absent modality is left out (absent experts leave every product).
    """
    del looser
    losses._check_estimator(estimator)  # pylint: disable=protected-access
    kind = self.resolve_objective(kind)
    if num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if present is not None:
      present = self.check_present(present, xs)
      xs = self.mask_inputs(xs, present)
    posteriors = self.subset_posteriors(params, xs, present)
    prior = self.prior(params)
    lls = [self.log_likelihood_fn(params, xs, present)]
    lls += [functools.partial(self.weighted_log_likelihood, params, n, x)
            for n, x in zip(self.names, xs)]
    if kind.startswith("joint"):
      posteriors, lls = posteriors[:1], lls[:1]
    keys = jax.random.split(key, self.num_modalities + 1)
    total = 0.0
    for j, (q, ll, k) in enumerate(zip(posteriors, lls, keys)):
      if kind.endswith("elbo"):
        z = q.loc + q.scale * jax.random.normal(k, q.loc.shape, q.loc.dtype)
        term = ll(z) - dists.kl_divergence(q, prior)
      else:
        term = losses.iwae(k, q, ll, prior, num_samples, estimator=estimator)
      if present is not None and j > 0:  # modality j - 1 alone: only where it is observed
        term = jnp.where(present[j - 1], term, 0.0)
      total = total + term
    return total

  def test_objective(self, params: Params, xs: Sequence[jax.Array], key: jax.Array,
                     num_samples: int) -> jax.Array:
    """The IWAE bound of the joint PoE posterior (λ inside)."""
    return self.objective(params, xs, key, num_samples, kind="joint_iwae", estimator="iwae")


def build(modalities: tuple[Modality, ...], options) -> MVAE:
  """The registry's constructor: an MVAE over `modalities` with `options` (`ModelOptions`)."""
  return MVAE(modalities=tuple(modalities), latent_dim=options.latent_dim,
              expert_scale=options.expert_scale)


# ---------------------------------------------------------------------------------------------
# Single-modality VAE.


def single_vae(modality: Modality, latent_dim: int = 20, *, llik_scale: float | None = 1.0,
               prior_family: str = "laplace",
               prior_scale: ScaleFn = functools.partial(dists.softmax_scale, eta=0.0),
               learn_prior: bool = True) -> MMVAE:
  """The single-modality VAE of Table 1 ("single-VAE"): an `MMVAE` with one modality.

  With M = 1 the MoE-IWAE is the IWAE (looser and tight coincide) and `moe_elbo` is the ELBO, so
  the unimodal objectives are selected through `MMVAE.objective`:

    ELBO: ``kind="moe_elbo"`` (one sample, closed-form KL; K and estimator ignored);
    IWAE: ``kind="moe_iwae", estimator="iwae"``;
    IWAE "sticking the landing" (what the official code's dreg computes): ``estimator="legacy"``;
    DReG (Tucker et al. 2019): ``kind="moe_iwae", estimator="dreg"`` (``"dreg_moe"`` is the
    same estimator when M = 1).

  Args:
    modality: the modality (encoder, decoder, likelihood).
    latent_dim: D.
    llik_scale: λ of the likelihood; 1 (default) as the official unimodal models, None keeps
      the modality's own λ (e.g. its MMVAE weight).
    prior_family, prior_scale, learn_prior: as `MMVAE`.
  """
  if llik_scale is not None:
    modality = dataclasses.replace(modality, llik_scale=float(llik_scale))
  return MMVAE(modalities=(modality,), latent_dim=latent_dim, prior_family=prior_family,
               prior_scale=prior_scale, learn_prior=learn_prior)
