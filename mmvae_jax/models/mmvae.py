"""The MMVAE (Shi, Siddharth, Paige, Torr, NeurIPS 2019): a mixture-of-experts posterior.

q_Φ(z | x_{1:M}) = (1/M) Σ_m q_m(z | x_m); the posterior of any non-empty subset S of the
modalities is the uniform mixture of the experts of S. Trained with the stratified MoE-IWAE of
the paper's eq. (3) (`mmvae_jax.loss.moe_iwae`) or the official multimodal ELBO
(`mmvae_jax.loss.moe_elbo`).

Decoding is vectorised over experts: each decoder runs once on the stacked samples of all M
experts, shape (M, K, B, D), which yields the whole M×M matrix of (encoder e, decoder d)
reconstructions with M decoder calls and no Python double loop.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from mmvae_jax import distributions as dists
from mmvae_jax import loss as losses
from mmvae_jax.models.base import (DEFAULT_ESTIMATOR, Modality, MultimodalVAE, Params, ScaleFn,
                                   UniformMixture)


@dataclasses.dataclass(frozen=True, repr=False)
class MMVAE(MultimodalVAE):
  """Mixture-of-experts multimodal VAE; with one modality it is a plain VAE (IWAE / ELBO).

  Parameters: ``{"encoders", "decoders", "prior": {"scale_logits": (D,)}}``.

  Attributes:
    modalities, latent_dim: as `MultimodalVAE`.
    prior_family: "laplace" (MNIST-SVHN) or "normal" (CUB).
    prior_scale: maps the (D,) prior scale logits to scales; default softmax·D with no 1e-6
      (the MNIST-SVHN prior). The prior mean is fixed at 0.
    learn_prior: train the prior scale logits; otherwise their gradient is stopped and the
      prior stays at its initial value.
  """
  prior_family: str = "laplace"
  prior_scale: ScaleFn = functools.partial(dists.softmax_scale, eta=0.0)
  learn_prior: bool = True

  objectives = ("moe_iwae", "moe_elbo")
  default_objective = "moe_iwae"

  def __post_init__(self):
    super().__post_init__()
    if self.prior_family not in dists.FAMILIES:
      raise ValueError(f"unknown distribution family {self.prior_family!r}: choose "
                       f"{sorted(dists.FAMILIES)}")

  def prior_params(self) -> dict:
    """Prior scale logits, zero (Laplace(0, 1) per dimension for the softmax·D scale)."""
    return {"prior": {"scale_logits": jnp.zeros((self.latent_dim,), jnp.float32)}}

  def prior(self, params: Params) -> dists.Distribution:
    """p(z): batch shape (D,), mean 0."""
    logits = params["prior"]["scale_logits"]
    if not self.learn_prior:
      logits = jax.lax.stop_gradient(logits)
    scale = self.prior_scale(logits)
    return dists.FAMILIES[self.prior_family](jnp.zeros_like(scale), scale)

  def posterior(self, params: Params, observed: Mapping[str, jax.Array]):
    """The expert of a single observed modality, else the uniform mixture of the observed
    experts (with every modality observed, q_Φ)."""
    self.check_observed(observed)
    experts = tuple(self.expert(params, n, x) for n, x in observed.items())
    return experts[0] if len(experts) == 1 else UniformMixture(experts)

  def objective(self, params: Params, xs: Sequence[jax.Array], key: jax.Array,
                num_samples: int, *, kind: str | None = None, looser: bool = True,
                estimator: str = DEFAULT_ESTIMATOR, present: jax.Array | None = None
                ) -> jax.Array:
    """Per-example training objective (B,) (a bound to maximise).

    kind="moe_iwae" (default) is `mmvae_jax.loss.moe_iwae` (eq. (3) when looser);
    kind="moe_elbo" is the official multimodal ELBO (K, looser and estimator are ignored).
    `estimator` chooses the gradient (`mmvae_jax.loss`, docs/estimators.md): for M >= 2 only
    "iwae" and "dreg_moe" (stratified bound only) are unbiased.
    `present` ((M, B) bool, incomplete data): each example's q_Φ is the mixture of its present
    experts and only its present modalities are scored (`MultimodalVAE.objective`).
    """
    kind = self.resolve_objective(kind)
    if present is not None:
      present = self.check_present(present, xs)
      xs = self.mask_inputs(xs, present)
    posteriors = self.encode(params, xs)
    prior = self.prior(params)
    if kind == "moe_iwae":
      return losses.moe_iwae(key, posteriors, self.log_likelihood_fn(params, xs, present), prior,
                             num_samples, looser=looser, estimator=estimator, present=present)
    lls = [functools.partial(self.weighted_log_likelihood, params, n, x)
           for n, x in zip(self.names, xs)]
    if present is None:
      return losses.moe_elbo(key, posteriors, lls, prior)
    return losses.moe_elbo(key, posteriors, lls, prior, present=present)

  def test_objective(self, params: Params, xs: Sequence[jax.Array], key: jax.Array,
                     num_samples: int) -> jax.Array:
    """The tight MoE-IWAE over all M·K samples (the official test objective)."""
    return self.objective(params, xs, key, num_samples, kind="moe_iwae", looser=False,
                          estimator="iwae")

  def reconstruct(self, params: Params, xs: Sequence[jax.Array], key: jax.Array
                  ) -> list[tuple[jax.Array, ...]]:
    """recon[e][d]: decoder d on one sample of expert e, (B, *data_shape_d); one decoder call
    per modality on the stacked samples of all experts."""
    posteriors = self.encode(params, xs)
    z = losses.sample_experts(key, posteriors, 1)[:, 0]  # (M, B, D)
    means = self.decode(params, z)  # M arrays (M_e, B, ...)
    return [tuple(mean[e] for mean in means) for e in range(self.num_modalities)]


def build(modalities: tuple[Modality, ...], options) -> MMVAE:
  """The registry's constructor: an MMVAE over `modalities` with `options` (`ModelOptions`)."""
  return MMVAE(modalities=tuple(modalities), latent_dim=options.latent_dim,
               prior_family=options.prior_family, prior_scale=options.prior_scale,
               learn_prior=options.learn_prior)
