"""MMVAE+ (Palumbo, Daunhawer, Vogt, "MMVAE+: Enhancing the generative quality of multimodal
VAEs without compromises", ICLR 2023): a shared latent mixed over experts and a private latent
per modality.

Latents: a shared z (Dz = ``latent_dim``) and, for every modality m, a private w_m
(Dw = ``private_dim``). Each encoder returns both: its two heads (loc, scale pre-activation) have
Dz + Dw columns, the first Dz for q_m(z | x_m), the last Dw for q(w_m | x_m), each part through
the modality's scale constraint on its own (softmax·D + 1e-6 over Dz, resp. Dw, columns for the
digits). Decoder d reads the concatenation (z, w_d) of Dz + Dw columns. Priors: p(z) and p(w_m)
are fixed (zero location, the experiment's prior scale map at zero logits: Laplace(0, 1) for
the digits); the auxiliary prior r_m(w_m) has a zero location and a learned scale (parameters
``{"auxiliary": {name: {"scale_logits": (Dw,)}}}``).

Generative model and the protocol's latent. The model's joint latent is u = (z, w_1, ..., w_M),
of Dz + M·Dw columns in that order, with p(u) = p(z) Π_m p(w_m) and decoder d reading
(z, w_d). Every method of the protocol speaks of u:

* ``prior(params)``: p(u) (batch (Dz + M·Dw,)); ``generate`` decodes u ~ p(u), i.e. z ~ p(z),
  w_m ~ p(w_m), as the paper and the official code do.
* ``posterior(params, observed)``: for an observed subset S, the uniform mixture over m ∈ S of
  q_m(z | x_m) Π_{n∈S} q(w_n | x_n) Π_{n∉S} r_n(w_n): the shared part mixes the observed experts,
  an observed modality's private part is its own posterior, an unobserved one's comes from its
  auxiliary prior. A single observed modality gives one component.
* ``decode(params, u)``, ``reconstruct`` and ``cross_generate`` therefore follow the paper:
  self-reconstruction decodes x_m from (z ~ q_m, w_m ~ q(w_m | x_m)), cross-generation into an
  unobserved n from (z from the observed experts, w_n ~ r_n). (The official code's test-time
  cross reconstructions sample w_n from p(w_n) instead; its training uses r_n, as here.)
* ``shared_latent(u)``: the first Dz columns, z (the latent probe reads it).
* ``test_objective``: the base model's tight IWAE bound with p(u) and the joint posterior above
  as proposal (all private parts from their own posteriors): a bound on the λ-weighted
  log p(x_{1:M}) of this generative model, whatever β.

Training objective ``"mmvae_plus_iwae"`` (the only one; `mmvae_jax.loss.mmvae_plus_iwae`): per
stratum m, z ~ q_m(z | x_m), w_m ~ q(w_m | x_m), w̃_n ~ r_n(w_n) for n ≠ m, and::

    log w = Σ_d λ_d log p(x_d | z, w_d) + β [log p(z) + log p(w_m) − log q(z | x_{1:M})
                                             − log q(w_m | x_m)],   w_d = w_m (d = m), w̃_d,

stratified over m when ``looser`` (the paper), the gradient by ``estimator`` (the official code
trains PolyMNIST with K = 1, i.e. this ELBO, and CUB with DReG). Each encoder and each decoder
runs once per call (a decoder on the stacked (M, K, B, Dz + Dw) inputs of all strata).

Shapes: M modalities, K samples, B data, Dz shared and Dw private latent dimensions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import chex
import jax
import jax.numpy as jnp

from mmvae_jax import distributions as dists
from mmvae_jax import loss as losses
from mmvae_jax.models.base import (DEFAULT_ESTIMATOR, Modality, MultimodalVAE, Params, ScaleFn,
                                   UniformMixture)


@dataclasses.dataclass(frozen=True, repr=False)
class MMVAEPlus(MultimodalVAE):
  """Mixture-of-experts multimodal VAE with shared and private latents (module docstring).

  Attributes:
    modalities: as `MultimodalVAE`; every encoder outputs Dz + Dw columns per head and every
      decoder reads Dz + Dw (`network_latent_dim`).
    latent_dim: Dz, the shared latent.
    private_dim: Dw, each modality's private latent.
    beta: β, the weight of the regularisation terms of the objective.
    prior_family: family of p(z), p(w_m) and r_m; must be every modality's posterior family.
    prior_scale: maps zero logits to the scales of p, and r's logits to r's scales.
    learn_prior: learn the auxiliary priors' scales (p is always fixed).
  """
  private_dim: int = 10
  beta: float = 1.0
  prior_family: str = "laplace"
  prior_scale: ScaleFn = functools.partial(dists.softmax_scale, eta=0.0)
  learn_prior: bool = True

  objectives = ("mmvae_plus_iwae",)
  default_objective = "mmvae_plus_iwae"

  def __post_init__(self):
    super().__post_init__()
    if self.prior_family not in dists.FAMILIES:
      raise ValueError(f"unknown distribution family {self.prior_family!r}: choose "
                       f"{sorted(dists.FAMILIES)}")
    if self.private_dim < 1:
      raise ValueError(f"MMVAE+ needs a private latent: private_dim >= 1, got {self.private_dim}")
    if self.beta <= 0:
      raise ValueError(f"MMVAE+ needs beta > 0, got {self.beta}")
    for m in self.modalities:
      if m.posterior_family != self.prior_family:
        raise ValueError(f"MMVAE+: modality {m.name!r} has {m.posterior_family} posteriors but "
                         f"the priors are {self.prior_family}; use one family for both")

  def __repr__(self) -> str:
    return (super().__repr__()[:-1] + f", private_dim={self.private_dim}, beta={self.beta:g})")

  # -- sizes and parameters ------------------------------------------------------------------

  @property
  def network_latent_dim(self) -> int:
    """Dz + Dw: the width of each encoder head and of each decoder's input."""
    return self.latent_dim + self.private_dim

  @property
  def joint_latent_dim(self) -> int:
    """Dz + M·Dw: the width of u = (z, w_1, ..., w_M)."""
    return self.latent_dim + self.num_modalities * self.private_dim

  def init(self, key: jax.Array) -> Params:
    """Networks of Dz + Dw latent columns, then the auxiliary priors' scale logits (zero)."""
    keys = jax.random.split(key, 2 * self.num_modalities)
    encoders, decoders = {}, {}
    for i, m in enumerate(self.modalities):
      encoders[m.name], decoders[m.name] = m.init(keys[2 * i], keys[2 * i + 1],
                                                  self.network_latent_dim)
    return {"encoders": encoders, "decoders": decoders, **self.prior_params()}

  def prior_params(self) -> dict:
    return {"auxiliary": {n: {"scale_logits": jnp.zeros((self.private_dim,), jnp.float32)}
                          for n in self.names}}

  # -- distributions -------------------------------------------------------------------------

  def _fixed(self, dim: int) -> dists.Distribution:
    scale = self.prior_scale(jnp.zeros((dim,)))  # float64 under jax.enable_x64
    return dists.FAMILIES[self.prior_family](jnp.zeros_like(scale), scale)

  def shared_prior(self) -> dists.Distribution:
    """p(z), batch (Dz,)."""
    return self._fixed(self.latent_dim)

  def private_prior(self) -> dists.Distribution:
    """p(w_m) (the same for every m), batch (Dw,)."""
    return self._fixed(self.private_dim)

  def auxiliary_loc_scale(self, params: Params, name: str) -> tuple[jax.Array, jax.Array]:
    """(loc, scale) of r_name(w), each (Dw,): zero location, learned scale."""
    logits = params["auxiliary"][name]["scale_logits"]
    if not self.learn_prior:
      logits = jax.lax.stop_gradient(logits)
    scale = self.prior_scale(logits)
    return jnp.zeros_like(scale), scale

  def auxiliary(self, params: Params, name: str) -> dists.Distribution:
    """r_name(w), batch (Dw,)."""
    return dists.FAMILIES[self.prior_family](*self.auxiliary_loc_scale(params, name))

  def prior(self, params: Params) -> dists.Distribution:
    """p(u) = p(z) Π_m p(w_m), batch (Dz + M·Dw,)."""
    del params
    return self._fixed_joint()

  def _fixed_joint(self) -> dists.Distribution:
    p_z, p_w = self.shared_prior(), self.private_prior()
    loc = jnp.concatenate([p_z.loc] + [p_w.loc] * self.num_modalities)
    scale = jnp.concatenate([p_z.scale] + [p_w.scale] * self.num_modalities)
    return dists.FAMILIES[self.prior_family](loc, scale)

  def encoder_loc_scale(self, params: Params, name: str, x: jax.Array
                        ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """((loc, scale) of q_m(z | x_m), each (B, Dz); (loc, scale) of q(w_m | x_m), (B, Dw))."""
    m = self.modality(name)
    loc, pre = m.encoder_outputs(params, x)
    chex.assert_shape([loc, pre], (x.shape[0], self.network_latent_dim))
    dz = self.latent_dim
    return ((loc[:, :dz], m.posterior_scale(pre[:, :dz])),
            (loc[:, dz:], m.posterior_scale(pre[:, dz:])))

  def expert_loc_scale(self, params: Params, name: str, x: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """(loc, scale), each (B, Dz), of the shared expert q_m(z | x_m)."""
    return self.encoder_loc_scale(params, name, x)[0]

  def private_posterior(self, params: Params, name: str, x: jax.Array) -> dists.Distribution:
    """q(w_m | x_m), batch (B, Dw)."""
    return dists.FAMILIES[self.modality(name).posterior_family](
        *self.encoder_loc_scale(params, name, x)[1])

  def posterior(self, params: Params, observed: Mapping[str, jax.Array]):
    """q(u | x_S) over u = (z, w_1, ..., w_M), batch (B, Dz + M·Dw) (module docstring): one
    component per observed modality (in the model's order), a `UniformMixture` when |S| > 1."""
    self.check_observed(observed)
    order = [n for n in self.names if n in observed]
    heads = {n: self.encoder_loc_scale(params, n, observed[n]) for n in order}
    b = observed[order[0]].shape[0]
    private = []
    for n in self.names:
      if n in heads:
        private.append(heads[n][1])
      else:
        loc, scale = self.auxiliary_loc_scale(params, n)
        private.append((jnp.broadcast_to(loc, (b, self.private_dim)),
                        jnp.broadcast_to(scale, (b, self.private_dim))))
    family = dists.FAMILIES[self.prior_family]
    comps = tuple(
        family(jnp.concatenate([heads[e][0][0]] + [p[0] for p in private], axis=-1),
               jnp.concatenate([heads[e][0][1]] + [p[1] for p in private], axis=-1))
        for e in order)
    return comps[0] if len(comps) == 1 else UniformMixture(comps)

  def shared_latent(self, u: jax.Array) -> jax.Array:
    """z, the first Dz columns of u (..., Dz + M·Dw)."""
    return u[..., :self.latent_dim]

  # -- decoding ------------------------------------------------------------------------------

  def decoder_input(self, u: jax.Array, name: str) -> jax.Array:
    """(z, w_name) of u (..., Dz + M·Dw): (..., Dz + Dw)."""
    chex.assert_axis_dimension(u, -1, self.joint_latent_dim)
    start = self.latent_dim + self.names.index(name) * self.private_dim
    return jnp.concatenate([u[..., :self.latent_dim], u[..., start:start + self.private_dim]],
                           axis=-1)

  def decode_one(self, params: Params, name: str, u: jax.Array) -> jax.Array:
    return self.modality(name).decoder_output(params, self.decoder_input(u, name))

  def decode(self, params: Params, u: jax.Array) -> tuple[jax.Array, ...]:
    """Decoder d on (z, w_d) of u (..., Dz + M·Dw): M likelihood parameters."""
    return tuple(self.decode_one(params, n, u) for n in self.names)

  def weighted_log_likelihood(self, params: Params, name: str, x: jax.Array, u: jax.Array
                              ) -> jax.Array:
    m = self.modality(name)
    return m.llik_scale * m.log_likelihood(x, self.decode_one(params, name, u))

  # -- objective -----------------------------------------------------------------------------

  def objective(self, params: Params, xs: Sequence[jax.Array], key: jax.Array,
                num_samples: int, *, kind: str | None = None, looser: bool = True,
                estimator: str = DEFAULT_ESTIMATOR) -> jax.Array:
    """Per-example objective (B,): `mmvae_jax.loss.mmvae_plus_iwae` with this model's β."""
    self.resolve_objective(kind)
    self.check_data(xs)
    heads = [self.encoder_loc_scale(params, n, x) for n, x in zip(self.names, xs)]
    families = [dists.FAMILIES[m.posterior_family] for m in self.modalities]
    shared = [f(*h[0]) for f, h in zip(families, heads)]
    private = [f(*h[1]) for f, h in zip(families, heads)]
    auxiliary = [self.auxiliary(params, n) for n in self.names]

    def log_likelihood(z, w):
      total = 0.0
      for d, (m, x) in enumerate(zip(self.modalities, xs)):
        mean = m.decoder_output(params, jnp.concatenate([z, w[d]], axis=-1))
        total = total + m.llik_scale * m.log_likelihood(x, mean)
      return total

    return losses.mmvae_plus_iwae(key, shared, private, auxiliary, log_likelihood,
                                  self.shared_prior(), self.private_prior(), num_samples,
                                  beta=self.beta, looser=looser, estimator=estimator)


def network_latent_dim(options) -> int:
  """The networks' latent width for `options` (`ModelOptions`): Dz + Dw."""
  return options.latent_dim + options.private_dim


def build(modalities: tuple[Modality, ...], options) -> MMVAEPlus:
  """The registry's constructor: an MMVAE+ over `modalities` with `options` (`ModelOptions`)."""
  return MMVAEPlus(modalities=tuple(modalities), latent_dim=options.latent_dim,
                   private_dim=options.private_dim, beta=options.beta,
                   prior_family=options.prior_family, prior_scale=options.prior_scale,
                   learn_prior=options.learn_prior)
