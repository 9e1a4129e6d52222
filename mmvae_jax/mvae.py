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

`MVAE` has the same public interface as `mmvae_jax.model.MMVAE`, so `mmvae_jax.train` and the
evaluation functions take either. It uses the same `Modality` objects (encoders, decoders,
likelihoods, λ); only the encoder's second head is read differently (`expert_scale`) and every
expert, whatever its modality's `posterior_family`, is Gaussian (the PoE needs Gaussians).

Single-modality VAE
-------------------
`single_vae` builds an `MMVAE` with one modality: with M = 1 the MoE-IWAE is the IWAE, so every
unimodal objective of the official code is available through the MMVAE's own `objective`.

Shapes: M modalities, K samples, B data, D latent dimensions, E experts.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Sequence

import chex
import distrax
import jax
import jax.numpy as jnp

from mmvae_jax import distributions as dists
from mmvae_jax import loss as losses
from mmvae_jax.model import MMVAE, Modality

ScaleFn = Callable[[jax.Array], jax.Array]

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


# ---------------------------------------------------------------------------------------------
# Scale constraints of the Gaussian experts.


def log_variance_scale(pre: jax.Array, eps: float = VARIANCE_EPS) -> jax.Array:
  """σ = sqrt(exp(pre) + eps): the second head is a log-variance, as in Wu & Goodman's code."""
  return jnp.sqrt(jnp.exp(pre) + eps)


EXPERT_SCALES: dict[str, ScaleFn | None] = {
    "logvar": log_variance_scale,           # Wu & Goodman's public recipe
    "softplus": dists.softplus_scale,       # softplus(v) + 1e-6 (the official CUB experts)
    "modality": None,                       # each Modality's own posterior_scale (MMVAE's)
}


def _poe_with_prior(experts: Sequence[tuple[jax.Array, jax.Array]]) -> distrax.Normal:
  """N(0, I) × Π experts, for experts given as (loc (B, D), scale (B, D)): batch (B, D)."""
  loc0, scale0 = experts[0]
  locs = jnp.stack([jnp.zeros_like(loc0)] + [loc for loc, _ in experts])
  scales = jnp.stack([jnp.ones_like(scale0)] + [scale for _, scale in experts])
  return distrax.Normal(*product_of_experts(locs, scales))


# ---------------------------------------------------------------------------------------------
# The MVAE.

OBJECTIVES = ("joint_iwae", "joint_elbo", "subsampled_elbo", "subsampled_iwae")
# The names `mmvae_jax.train.TrainConfig.objective` accepts, so the MMVAE's flags drive an MVAE.
OBJECTIVE_ALIASES = {"moe_elbo": "subsampled_elbo", "moe_iwae": "subsampled_iwae"}


@dataclasses.dataclass(frozen=True)
class MVAE:
  """Product-of-experts multimodal VAE (Wu & Goodman 2018) with the MMVAE's interface.

  Parameters are ``{"encoders": {name: ...}, "decoders": {name: ...}}``; the prior is the fixed
  N(0, I), which is also the prior expert of every product.

  Attributes:
    modalities: the M modalities, in batch order (the MMVAE's `Modality` objects; their
      `posterior_family` is ignored: every expert is Gaussian).
    latent_dim: D.
    expert_scale: how the encoder's second head v becomes the expert's standard deviation:
      "logvar" (default): σ = sqrt(exp(v) + 1e-8), v a log-variance: Wu & Goodman's public
        recipe (their encoders output a log-variance and their PoE adds 1e-8 to the variances);
      "softplus": σ = softplus(v) + 1e-6; "modality": each modality's `posterior_scale` (the
      MMVAE's softmax(v)·D + 1e-6 for MNIST/SVHN, which forces the D scales of a datum to sum to
      D); or any function (B, D) -> (B, D) positive.
  """
  modalities: tuple[Modality, ...]
  latent_dim: int = 20
  expert_scale: str | ScaleFn = "logvar"

  def __post_init__(self):
    names = [m.name for m in self.modalities]
    if len(names) < 1:
      raise ValueError("an MVAE needs at least one modality")
    if len(set(names)) != len(names):
      raise ValueError(f"modality names must be unique, got {names}")
    if isinstance(self.expert_scale, str) and self.expert_scale not in EXPERT_SCALES:
      raise ValueError(f"unknown expert_scale {self.expert_scale!r}: choose "
                       f"{', '.join(EXPERT_SCALES)} or pass a function")

  # -- bookkeeping (as MMVAE) ----------------------------------------------------------------

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
    """Parameters with the networks' own (PyTorch-default) initialisation; no prior parameters."""
    keys = jax.random.split(key, 2 * self.num_modalities)
    encoders, decoders = {}, {}
    for i, m in enumerate(self.modalities):
      x = jnp.zeros((1,) + tuple(m.data_shape), jnp.float32)
      encoders[m.name] = m.encoder.init(keys[2 * i], x)["params"]
      decoders[m.name] = m.decoder.init(keys[2 * i + 1], jnp.zeros((1, self.latent_dim)))["params"]
    return {"encoders": encoders, "decoders": decoders}

  def _check_data(self, xs: Sequence[jax.Array]) -> None:
    if len(xs) != self.num_modalities:
      raise ValueError(f"expected {self.num_modalities} modalities {list(self.names)}, "
                       f"got {len(xs)} arrays")
    for m, x in zip(self.modalities, xs):
      if tuple(x.shape[1:]) != tuple(m.data_shape):
        raise ValueError(f"modality {m.name!r}: expected data of shape (B, "
                         f"{', '.join(map(str, m.data_shape))}), got {tuple(x.shape)}")

  def _scale_fn(self, m: Modality) -> ScaleFn:
    if callable(self.expert_scale):
      return self.expert_scale
    return EXPERT_SCALES[self.expert_scale] or m.posterior_scale

  # -- distributions -------------------------------------------------------------------------

  def prior(self, params: dict) -> distrax.Normal:
    """p(z) = N(0, I), batch shape (D,) (fixed; `params` is unused)."""
    del params
    return distrax.Normal(jnp.zeros((self.latent_dim,), jnp.float32),
                          jnp.ones((self.latent_dim,), jnp.float32))

  def _expert(self, params: dict, name: str, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    m = self.modality(name)
    loc, pre = m.encoder.apply({"params": params["encoders"][name]}, x)
    chex.assert_shape([loc, pre], (x.shape[0], self.latent_dim))
    return loc, self._scale_fn(m)(pre)

  def encode_one(self, params: dict, name: str, x: jax.Array) -> distrax.Normal:
    """The single expert q_m(z | x_m) (no prior expert): x (B, *data_shape) -> batch (B, D)."""
    return distrax.Normal(*self._expert(params, name, x))

  def encode(self, params: dict, xs: Sequence[jax.Array]) -> list[distrax.Normal]:
    """The M single experts q_m(z | x_m), each with batch shape (B, D) (no prior expert)."""
    self._check_data(xs)
    return [self.encode_one(params, m.name, x) for m, x in zip(self.modalities, xs)]

  def posterior(self, params: dict, observed: Mapping[str, jax.Array]) -> distrax.Normal:
    """PoE posterior q(z | x_S) ∝ N(0, I) Π_{m∈S} q_m(z | x_m) of any non-empty subset S.

    Args:
      observed: {name: x (B, *data_shape)} for the observed modalities (any order).
    Returns:
      Normal with batch shape (B, D).
    """
    if not observed:
      raise ValueError("observe at least one modality")
    return _poe_with_prior([self._expert(params, name, x) for name, x in observed.items()])

  def _subset_posteriors(self, params: dict, xs: Sequence[jax.Array]) -> list[distrax.Normal]:
    """[q(z | x_{1:M}), q(z | x_1), ..., q(z | x_M)], each PoE with the prior expert, (B, D).

    Each encoder runs once; the M + 1 products reuse its outputs.
    """
    self._check_data(xs)
    experts = [self._expert(params, m.name, x) for m, x in zip(self.modalities, xs)]
    return [_poe_with_prior(experts)] + [_poe_with_prior([e]) for e in experts]

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
    """z (..., B, D) -> Σ_d λ_d log p(x_d | z), (..., B)."""
    return lambda z: jnp.sum(self.log_likelihoods(params, xs, z), axis=0)

  def _weighted_ll(self, params: dict, index: int, x: jax.Array, z: jax.Array) -> jax.Array:
    """λ_m log p(x_m | z) of modality `index` only: z (..., B, D) -> (..., B)."""
    m = self.modalities[index]
    mean = m.decoder.apply({"params": params["decoders"][m.name]}, z)
    return m.llik_scale * m.log_likelihood(x, mean)

  # -- objectives ----------------------------------------------------------------------------

  def objective(self, params: dict, xs: Sequence[jax.Array], key: jax.Array, num_samples: int,
                *, looser: bool = True, estimator: str = "iwae", kind: str = "joint_iwae"
                ) -> jax.Array:
    """Per-example objective (B,) (a bound to maximise).

    kind:
      "subsampled_elbo" (alias "moe_elbo"): Wu & Goodman's training objective, the joint ELBO
        plus the M unimodal ELBOs (module docstring), each with one reparameterised sample and
        the closed-form Gaussian KL. K and `estimator` are ignored (as the MMVAE's moe_elbo).
        Term j (0: joint, m + 1: modality m alone) uses the noise
        ε_j = jax.random.normal(jax.random.split(key, M + 1)[j], (B, D)), z_j = μ_j + σ_j ε_j.
      "subsampled_iwae" (alias "moe_iwae"): the same sum with every term the K-sample IWAE bound
        (`mmvae_jax.loss.iwae` with `estimator`: iwae, legacy = STL, dreg).
      "joint_elbo" / "joint_iwae": the joint term alone, a lower bound on the λ-weighted
        log p(x_{1:M}) comparable to the MMVAE's tight m_iwae. "joint_iwae" is the default, so
        the training loop's test evaluation (which passes no `kind`) reports that bound while
        its training step (which passes `TrainConfig.objective`, moe_iwae or moe_elbo) trains
        with the sub-sampled regime.
    `looser` has no meaning for a product posterior and is ignored.
    """
    del looser
    losses._check_estimator(estimator)  # pylint: disable=protected-access
    kind = OBJECTIVE_ALIASES.get(kind, kind)
    if kind not in OBJECTIVES:
      raise ValueError(f"unknown MVAE objective {kind!r}: choose one of "
                       f"{', '.join(OBJECTIVES + tuple(OBJECTIVE_ALIASES))}")
    if num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    posteriors = self._subset_posteriors(params, xs)
    prior = self.prior(params)
    lls = [self.log_likelihood_fn(params, xs)]
    lls += [functools.partial(self._weighted_ll, params, i, x) for i, x in enumerate(xs)]
    if kind.startswith("joint"):
      posteriors, lls = posteriors[:1], lls[:1]
    keys = jax.random.split(key, self.num_modalities + 1)
    total = 0.0
    for q, ll, k in zip(posteriors, lls, keys):
      if kind.endswith("elbo"):
        z = q.loc + q.scale * jax.random.normal(k, q.loc.shape, q.loc.dtype)
        total = total + ll(z) - dists.kl_divergence(q, prior)
      else:
        total = total + losses.iwae(k, q, ll, prior, num_samples, estimator=estimator)
    return total

  # -- generation ----------------------------------------------------------------------------

  def generate(self, params: dict, key: jax.Array, num: int) -> tuple[jax.Array, ...]:
    """Decoder means of `num` samples of N(0, I) in every modality: M arrays (num, *shape)."""
    z = self.prior(params).sample(seed=key, sample_shape=(num,))
    return self.decode(params, z)

  def reconstruct(self, params: dict, xs: Sequence[jax.Array], key: jax.Array
                  ) -> list[tuple[jax.Array, ...]]:
    """recon[e][d]: decoder d on one sample of q(z | x_e) (PoE of the prior and expert e).

    Diagonal entries are reconstructions, off-diagonal ones cross-generations; each
    (B, *data_shape_d).
    """
    q = self._subset_posteriors(params, xs)[1:]
    keys = jax.random.split(key, self.num_modalities)
    z = jnp.stack([qe.sample(seed=k) for qe, k in zip(q, keys)])  # (M, B, D)
    means = self.decode(params, z)
    return [tuple(mean[e] for mean in means) for e in range(self.num_modalities)]

  def mixture_sample(self, params: dict, observed: Mapping[str, jax.Array], key: jax.Array,
                     num_samples: int = 1) -> jax.Array:
    """z ~ the PoE posterior q(z | x_S) of the observed subset S: (K, B, D).

    (The MMVAE's method of the same name samples its MoE; here the product takes its place.)
    """
    return self.posterior(params, observed).sample(seed=key, sample_shape=(num_samples,))

  def cross_generate(self, params: dict, observed: Mapping[str, jax.Array], key: jax.Array,
                     num_samples: int = 1) -> dict[str, jax.Array]:
    """Means of every modality given any non-empty subset: {name: (K, B, *data_shape)}."""
    z = self.mixture_sample(params, observed, key, num_samples)
    return dict(zip(self.names, self.decode(params, z)))


# ---------------------------------------------------------------------------------------------
# Single-modality VAE.


def single_vae(modality: Modality, latent_dim: int = 20, *, llik_scale: float | None = 1.0,
               prior_family: str = "laplace",
               prior_scale: ScaleFn = functools.partial(dists.softmax_scale, eta=0.0),
               learn_prior: bool = True) -> MMVAE:
  """The single-modality VAE of Table 1 ("single-VAE"): an `MMVAE` with one modality.

  With M = 1 the MoE-IWAE is the IWAE (looser and tight coincide) and `moe_elbo` is the ELBO, so
  the official unimodal objectives are selected through `MMVAE.objective`:

    official elbo: ``kind="moe_elbo"`` (one sample, closed-form KL; K and estimator ignored);
    official iwae: ``kind="moe_iwae", estimator="iwae"``;
    official dreg (its effective gradient, IWAE-STL): ``kind="moe_iwae", estimator="legacy"``;
    true DReG (Tucker et al. 2019): ``kind="moe_iwae", estimator="dreg"``.

  `mmvae_jax.train` trains it unchanged (``TrainConfig.objective`` / ``.estimator``) on a
  `PairedDataset` of one source.

  Args:
    modality: the modality (encoder, decoder, likelihood).
    latent_dim: D.
    llik_scale: λ of the likelihood; 1 (default) as the official unimodal models, None keeps
      the modality's own λ (e.g. its MMVAE weight).
    prior_family, prior_scale, learn_prior: as `MMVAE` (default: the official MNIST/SVHN
      prior Laplace(0, softmax(l)·D), learned).
  """
  if llik_scale is not None:
    modality = dataclasses.replace(modality, llik_scale=float(llik_scale))
  return MMVAE(modalities=(modality,), latent_dim=latent_dim, prior_family=prior_family,
               prior_scale=prior_scale, learn_prior=learn_prior)
