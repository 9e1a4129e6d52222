"""MoPoE (Sutter, Daunhawer, Vogt, "Generalized Multimodal ELBO", ICLR 2021): a mixture of
products of experts.

The joint posterior is the uniform mixture, over all 2^M − 1 non-empty subsets S of the M
modalities, of the product of the Gaussian experts of S (no prior expert in the product, as in
the MoPoE paper and code)::

    q(z | x_{1:M}) = (1 / (2^M − 1)) Σ_{S ≠ ∅} q_S(z | x_S),   q_S = Π_{m∈S} q_m(z | x_m),
    q_S = N(μ_S, σ_S²),   1/σ_S² = Σ_{m∈S} 1/σ_m²,   μ_S = σ_S² Σ_{m∈S} μ_m/σ_m².

The posterior of an observed subset T is the same construction restricted to T: the uniform
mixture over the 2^|T| − 1 non-empty subsets of T (a single Normal, the expert itself, when
|T| = 1). The MoPoE thus contains both the MMVAE (the M singleton components) and the MVAE-style
product (the component S = {1..M}).

Subset order (fixed; the components of every mixture and of the objectives come in this order):
by size, then in `itertools.combinations` order of the model's modality names, e.g. for
(a, b, c): (a), (b), (c), (a, b), (a, c), (b, c), (a, b, c). An observed subset T is ordered by
the model's names whatever the order of the mapping.

Objectives (per example, a bound to maximise, λ_d the modality weights, C = 2^M − 1 components):

``"mopoe_elbo"`` (default)
  the MoPoE training objective in its stratified form (`mmvae_jax.loss.mixture_elbo`)::

      L = (1/C) Σ_S [ Σ_d λ_d log p(x_d | z_S) − KL(q_S || N(0, I)) ],   z_S ~ q_S,

  one reparameterised sample per subset, every decoder scoring every subset's sample, and the
  closed-form Gaussian KL. The KL of the mixture is bounded by the mean of the components'
  KLs, so L lower-bounds the ELBO of q. K, `looser` and `estimator` are ignored.
``"mopoe_iwae"``
  `mmvae_jax.loss.moe_iwae` with the C subset products as the mixture components: stratified
  over subsets, (1/C) Σ_S log (1/K) Σ_k w[S, k] when `looser`, else the tight
  log (1/(C K)) Σ_{S,k} w[S, k], where log w = log p(z) + Σ_d λ_d log p(x_d | z) − log q(z | x)
  with the full mixture density q; the gradient follows `estimator`.

The test objective is the base model's: the tight IWAE bound with the full mixture as proposal.

Each encoder runs once per call: the M experts' (loc, scale) are computed once and the C products
are built from them; each decoder runs once on the stacked samples of all components.

Shapes: M modalities, C = 2^M − 1 subsets, K samples, B data, D latent dimensions.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

import distrax
import jax
import jax.numpy as jnp

from mmvae_jax import loss as losses
from mmvae_jax.models.base import DEFAULT_ESTIMATOR, Modality, Params, UniformMixture
from mmvae_jax.models.mvae import GaussianExperts, poe


def subsets(names: Sequence[str]) -> list[tuple[str, ...]]:
  """The 2^n − 1 non-empty subsets of `names`: by size, then `itertools.combinations` order."""
  names = tuple(names)
  return [s for r in range(1, len(names) + 1) for s in itertools.combinations(names, r)]


def subset_product(experts: Sequence[tuple[jax.Array, jax.Array]]) -> distrax.Normal:
  """Π experts without a prior expert, for experts (loc (B, D), scale (B, D)): batch (B, D).

  A single expert is returned as it is (not re-derived through its precision).
  """
  if len(experts) == 1:
    return distrax.Normal(*experts[0])
  return poe(experts, prior_expert=False)


@dataclasses.dataclass(frozen=True, repr=False)
class MoPoE(GaussianExperts):
  """Mixture-of-products-of-experts multimodal VAE (Sutter et al. 2021).

  Parameters are ``{"encoders": {name: ...}, "decoders": {name: ...}}``; the prior is the fixed
  N(0, I) of the base model. Experts are Gaussian with `expert_scale` (default "logvar": the
  encoder's second head is a log-variance).
  """
  objectives = ("mopoe_elbo", "mopoe_iwae")
  default_objective = "mopoe_elbo"

  def subset_products(self, experts: Mapping[str, tuple[jax.Array, jax.Array]]
                      ) -> tuple[list[tuple[str, ...]], list[distrax.Normal]]:
    """(the subsets of the experts' modalities in the module's order, their products q_S).

    Args:
      experts: {name: (loc (B, D), scale (B, D))} of the observed modalities.
    """
    order = [n for n in self.names if n in experts]
    subs = subsets(order)
    return subs, [subset_product([experts[n] for n in s]) for s in subs]

  def posterior(self, params: Params, observed: Mapping[str, jax.Array]):
    """q(z | x_T): the uniform mixture over the non-empty subsets S of T = `observed` of the
    products Π_{m∈S} q_m (components in the module's subset order); the expert when |T| = 1."""
    self.check_observed(observed)
    experts = {n: self.expert_loc_scale(params, n, x) for n, x in observed.items()}
    _, posteriors = self.subset_products(experts)
    return posteriors[0] if len(posteriors) == 1 else UniformMixture(tuple(posteriors))

  def objective(self, params: Params, xs: Sequence[jax.Array], key: jax.Array,
                num_samples: int, *, kind: str | None = None, looser: bool = True,
                estimator: str = DEFAULT_ESTIMATOR, present: jax.Array | None = None
                ) -> jax.Array:
    """Per-example objective (B,) (a bound to maximise); the formulas are in the module
    docstring.

    kind:
      "mopoe_elbo" (default): `mmvae_jax.loss.mixture_elbo` over the 2^M − 1 subset products
        (one sample each, closed-form KL); K, `looser` and `estimator` are ignored.
      "mopoe_iwae": `mmvae_jax.loss.moe_iwae` over the same components, K samples per subset,
        stratified when `looser`, tight otherwise, gradient by `estimator`.
    `present` ((M, B) bool, incomplete data): example b's mixture has only the subsets of its
    present modalities (`subset_presence`), and only those modalities are scored.
    """
    losses._check_estimator(estimator)  # pylint: disable=protected-access
    kind = self.resolve_objective(kind)
    if num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    self.check_data(xs)
    components = None
    if present is not None:
      present = self.check_present(present, xs)
      xs = self.mask_inputs(xs, present)
    experts = {n: self.expert_loc_scale(params, n, x) for n, x in zip(self.names, xs)}
    subs, posteriors = self.subset_products(experts)
    if present is not None:
      components = self.subset_presence(subs, present)
    log_likelihood = self.log_likelihood_fn(params, xs, present)
    prior = self.prior(params)
    if kind == "mopoe_elbo":
      return losses.mixture_elbo(key, posteriors, log_likelihood, prior, present=components)
    return losses.moe_iwae(key, posteriors, log_likelihood, prior, num_samples, looser=looser,
                           estimator=estimator, present=components)

  def subset_presence(self, subs: Sequence[tuple[str, ...]], present: jax.Array) -> jax.Array:
    """(C, B) bool: subset S is a component of example b's mixture iff every modality of S
    is present in b. `present` is (M, B) over the model's modalities."""
    index = {n: i for i, n in enumerate(self.names)}
    return jnp.stack([jnp.all(jnp.stack([present[index[n]] for n in s]), axis=0) for s in subs])


def build(modalities: tuple[Modality, ...], options) -> MoPoE:
  """The registry's constructor: a MoPoE over `modalities` with `options` (`ModelOptions`)."""
  return MoPoE(modalities=tuple(modalities), latent_dim=options.latent_dim,
               expert_scale=options.expert_scale)
