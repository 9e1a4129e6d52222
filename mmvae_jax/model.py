"""The MMVAE: M modalities (M >= 2; M = 1 is a plain VAE), each an (encoder, decoder, likelihood,
λ), one shared prior.

The model object holds only configuration (flax modules and constants); parameters are a plain
pytree ``{"encoders": {name: ...}, "decoders": {name: ...}, "prior": {"scale_logits": (D,)}}``
and every method is a pure function of ``(params, data, key)``.

Decoding is vectorised over experts: each decoder d runs once on the stacked samples of all M
experts, shape (M, K, B, D), which yields the whole M×M matrix of (encoder e, decoder d)
reconstructions of the official forward pass (spec §6.9) with M decoder calls and no Python
double loop.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmvae_jax import distributions as dists
from mmvae_jax import loss as losses

ScaleFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Modality:
  """One modality of the MMVAE.

  Attributes:
    name: unique key used in parameters, batches and results (e.g. "mnist").
    encoder: flax module, x (B, *data_shape) -> (loc (B, D), scale pre-activation (B, D)).
    decoder: flax module, z (..., D) -> likelihood parameter (..., *data_shape) (the mean).
    data_shape: shape of one datum, e.g. (28, 28, 1).
    llik_scale: λ, the weight of this modality's log-likelihood inside the log weights.
    log_likelihood: (x (B, *data_shape), mean (..., B, *data_shape)) -> (..., B), summed over
      the datum's axes.
    posterior_family: "laplace" or "normal".
    posterior_scale: maps the encoder's second head to positive scales (softmax·D + 1e-6 for
      MNIST/SVHN, softplus + 1e-6 for CUB).
  """
  name: str
  encoder: nn.Module
  decoder: nn.Module
  data_shape: tuple[int, ...]
  llik_scale: float = 1.0
  log_likelihood: Callable[[jax.Array, jax.Array], jax.Array] = dataclasses.field(
      default=functools.partial(dists.laplace_log_likelihood, scale=0.75))
  posterior_family: str = "laplace"
  posterior_scale: ScaleFn = dists.softmax_scale


@dataclasses.dataclass(frozen=True)
class MMVAE:
  """Mixture-of-experts multimodal VAE (Shi et al. 2019).

  Attributes:
    modalities: the M modalities, in batch order.
    latent_dim: D.
    prior_family: "laplace" (MNIST-SVHN) or "normal" (cubISft).
    prior_scale: maps the (D,) prior scale logits to scales; default softmax·D with no 1e-6
      (the MNIST-SVHN prior). The prior mean is fixed at 0.
    learn_prior: train the prior scale logits (the official ``--learn-prior``); otherwise their
      gradient is stopped and the prior stays at its initial value (Laplace(0, 1) per dim).
  """
  modalities: tuple[Modality, ...]
  latent_dim: int = 20
  prior_family: str = "laplace"
  prior_scale: ScaleFn = functools.partial(dists.softmax_scale, eta=0.0)
  learn_prior: bool = True

  def __post_init__(self):
    names = [m.name for m in self.modalities]
    if len(names) < 1:
      raise ValueError("an MMVAE needs at least one modality")
    if len(set(names)) != len(names):
      raise ValueError(f"modality names must be unique, got {names}")
    for fam in [self.prior_family] + [m.posterior_family for m in self.modalities]:
      if fam not in dists.FAMILIES:
        raise ValueError(f"unknown distribution family {fam!r}: choose {sorted(dists.FAMILIES)}")

  # -- bookkeeping ---------------------------------------------------------------------------

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(m.name for m in self.modalities)

  @property
  def num_modalities(self) -> int:
    return len(self.modalities)

  def modality(self, name: str) -> Modality:
    for m in self.modalities:
      if m.name == name:
        return m
    raise KeyError(f"unknown modality {name!r}: this model has {list(self.names)}")

  def init(self, key: jax.Array) -> dict:
    """Parameters with PyTorch's default initialisation; prior logits zero (Laplace(0, 1))."""
    keys = jax.random.split(key, 2 * self.num_modalities)
    encoders, decoders = {}, {}
    for i, m in enumerate(self.modalities):
      x = jnp.zeros((1,) + tuple(m.data_shape), jnp.float32)
      encoders[m.name] = m.encoder.init(keys[2 * i], x)["params"]
      decoders[m.name] = m.decoder.init(keys[2 * i + 1], jnp.zeros((1, self.latent_dim)))["params"]
    prior = {"scale_logits": jnp.zeros((self.latent_dim,), jnp.float32)}
    return {"encoders": encoders, "decoders": decoders, "prior": prior}

  def _check_data(self, xs: Sequence[jax.Array]) -> None:
    if len(xs) != self.num_modalities:
      raise ValueError(f"expected {self.num_modalities} modalities {list(self.names)}, "
                       f"got {len(xs)} arrays")
    for m, x in zip(self.modalities, xs):
      if tuple(x.shape[1:]) != tuple(m.data_shape):
        raise ValueError(f"modality {m.name!r}: expected data of shape (B, "
                         f"{', '.join(map(str, m.data_shape))}), got {tuple(x.shape)}")

  # -- distributions -------------------------------------------------------------------------

  def prior(self, params: dict) -> dists.Distribution:
    """p(z): batch shape (D,), mean 0."""
    logits = params["prior"]["scale_logits"]
    if not self.learn_prior:
      logits = jax.lax.stop_gradient(logits)
    scale = self.prior_scale(logits)
    return dists.FAMILIES[self.prior_family](jnp.zeros_like(scale), scale)

  def encode_one(self, params: dict, name: str, x: jax.Array) -> dists.Distribution:
    """q_m(z | x_m) for modality `name`: x (B, *data_shape) -> batch shape (B, D)."""
    m = self.modality(name)
    loc, pre = m.encoder.apply({"params": params["encoders"][name]}, x)
    chex.assert_shape([loc, pre], (x.shape[0], self.latent_dim))
    return dists.FAMILIES[m.posterior_family](loc, m.posterior_scale(pre))

  def encode(self, params: dict, xs: Sequence[jax.Array]) -> list[dists.Distribution]:
    """The M experts q_m(z | x_m), each with batch shape (B, D)."""
    self._check_data(xs)
    return [self.encode_one(params, m.name, x) for m, x in zip(self.modalities, xs)]

  def decode(self, params: dict, z: jax.Array) -> tuple[jax.Array, ...]:
    """Every decoder on z (..., D): a tuple of M means, each (..., *data_shape)."""
    return tuple(m.decoder.apply({"params": params["decoders"][m.name]}, z)
                 for m in self.modalities)

  def log_likelihoods(self, params: dict, xs: Sequence[jax.Array], z: jax.Array,
                      weighted: bool = True) -> jax.Array:
    """log p(x_d | z) for every decoder d: z (..., B, D) -> (M, ..., B); × λ_d if `weighted`."""
    out = []
    for m, x, mean in zip(self.modalities, xs, self.decode(params, z)):
      ll = m.log_likelihood(x, mean)
      out.append(ll * m.llik_scale if weighted else ll)
    return jnp.stack(out)

  def log_likelihood_fn(self, params: dict, xs: Sequence[jax.Array]
                        ) -> Callable[[jax.Array], jax.Array]:
    """z (..., B, D) -> Σ_d λ_d log p(x_d | z), (..., B): the `log_likelihood` of `moe_iwae`."""
    return lambda z: jnp.sum(self.log_likelihoods(params, xs, z), axis=0)

  # -- objectives ----------------------------------------------------------------------------

  def objective(self, params: dict, xs: Sequence[jax.Array], key: jax.Array, num_samples: int,
                *, looser: bool = True, estimator: str = "dreg", kind: str = "moe_iwae"
                ) -> jax.Array:
    """Per-example training objective (B,) (a bound to maximise).

    kind="moe_iwae" is `mmvae_jax.loss.moe_iwae` (eq. (3) when looser); kind="moe_elbo" is the
    official ``m_elbo`` (K, looser and estimator are ignored, as in the official code).
    """
    posteriors = self.encode(params, xs)
    prior = self.prior(params)
    if kind == "moe_iwae":
      return losses.moe_iwae(key, posteriors, self.log_likelihood_fn(params, xs), prior,
                             num_samples, looser=looser, estimator=estimator)
    if kind == "moe_elbo":
      lls = [functools.partial(self._weighted_ll, params, i, x) for i, x in enumerate(xs)]
      return losses.moe_elbo(key, posteriors, lls, prior)
    raise ValueError(f"unknown objective {kind!r}: choose moe_iwae or moe_elbo")

  def _weighted_ll(self, params, index, x, z):
    m = self.modalities[index]
    mean = m.decoder.apply({"params": params["decoders"][m.name]}, z)
    return m.llik_scale * m.log_likelihood(x, mean)

  # -- generation ----------------------------------------------------------------------------

  def generate(self, params: dict, key: jax.Array, num: int) -> tuple[jax.Array, ...]:
    """Decoder means of `num` prior samples in every modality: M arrays (num, *data_shape)."""
    z = self.prior(params).sample(seed=key, sample_shape=(num,))
    return self.decode(params, z)

  def reconstruct(self, params: dict, xs: Sequence[jax.Array], key: jax.Array
                  ) -> list[tuple[jax.Array, ...]]:
    """The M×M matrix of means from one posterior sample per expert (official reconstruct).

    Returns ``recon[e][d]``: decoder d applied to a sample of encoder e, (B, *data_shape_d).
    Diagonal entries are reconstructions, off-diagonal ones cross-generations.
    """
    posteriors = self.encode(params, xs)
    z = losses.sample_experts(key, posteriors, 1)[:, 0]  # (M, B, D)
    means = self.decode(params, z)  # M arrays (M_e, B, ...)
    return [tuple(mean[e] for mean in means) for e in range(self.num_modalities)]

  def mixture_sample(self, params: dict, observed: Mapping[str, jax.Array], key: jax.Array,
                     num_samples: int = 1) -> jax.Array:
    """z ~ the uniform mixture of the observed experts: (K, B, D).

    With one observed modality this is that expert; with all of them it is q_Φ.
    """
    if not observed:
      raise ValueError("observe at least one modality")
    posteriors = [self.encode_one(params, name, x) for name, x in observed.items()]
    k_comp, k_z = jax.random.split(key)
    z = losses.sample_experts(k_z, posteriors, num_samples)  # (S, K, B, D)
    batch = z.shape[2]
    comp = jax.random.randint(k_comp, (num_samples, batch), 0, len(posteriors))
    return jnp.take_along_axis(z, comp[None, :, :, None], axis=0)[0]

  def cross_generate(self, params: dict, observed: Mapping[str, jax.Array], key: jax.Array,
                     num_samples: int = 1) -> dict[str, jax.Array]:
    """Means of every modality given any non-empty subset of observed modalities.

    Returns {name: (K, B, *data_shape)} for every modality of the model (observed ones are
    reconstructions).
    """
    for name in observed:
      self.modality(name)  # raises KeyError naming the unknown modality
    z = self.mixture_sample(params, observed, key, num_samples)
    return dict(zip(self.names, self.decode(params, z)))


def mnist_svhn(latent_dim: int = 20, *, llik_scaling: float = 0.0, learn_prior: bool = True,
               decoder_impl: str = "auto", mnist_shape=(28, 28, 1), svhn_shape=(32, 32, 3)
               ) -> MMVAE:
  """The official MNIST-SVHN MMVAE (spec §6.1-6.3, §5.5).

  Laplace experts with softmax(v)·D + 1e-6 scales, a Laplace(0, softmax(l)·D) prior, Laplace
  likelihoods with scale 0.75, λ_MNIST = 3072/784 (or `llik_scaling` when nonzero, as the
  official ``--llik_scaling``, which sets the first modality's λ), λ_SVHN = 1.
  """
  from mmvae_jax import networks  # local import keeps model.py importable on its own

  lam = llik_scaling if llik_scaling else float(np.prod(svhn_shape)) / float(np.prod(mnist_shape))
  mnist = Modality(
      name="mnist", encoder=networks.MnistEncoder(latent_dim=latent_dim),
      decoder=networks.MnistDecoder(latent_dim=latent_dim), data_shape=tuple(mnist_shape),
      llik_scale=lam)
  svhn = Modality(
      name="svhn", encoder=networks.SvhnEncoder(latent_dim=latent_dim),
      decoder=networks.SvhnDecoder(latent_dim=latent_dim, impl=decoder_impl),
      data_shape=tuple(svhn_shape), llik_scale=1.0)
  return MMVAE(modalities=(mnist, svhn), latent_dim=latent_dim, learn_prior=learn_prior)
