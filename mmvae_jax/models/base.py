"""The model interface shared by every multimodal VAE of the library, and its modality.

A model is a frozen dataclass holding configuration only (flax modules and constants). Its
parameters are a plain pytree::

    {"encoders": {name: ...}, "decoders": {name: ...}, **model_specific}   # e.g. "prior"

(an optional ``"batch_stats"`` entry holds population BatchNorm statistics for evaluation), and
every method is a pure function of ``(params, data, key)``. Every model implements the protocol
of `MultimodalVAE`:

======================================  ===================================================
``init(key) -> params``                 parameters from a key
``prior(params)``                       p(z), batch shape (D,)
``expert(params, name, x)``             q_m(z | x_m) of one modality, batch shape (B, D)
``encode(params, xs)``                  the M experts
``posterior(params, observed)``         q(z | x_S) of any non-empty subset S (a mapping
                                        {name: x}): a distribution with batch shape (B, D),
                                        or a `UniformMixture` of such
``decode(params, z)``                   every decoder's likelihood parameter
``objective(params, xs, key, K, ...,    the per-example training bound, (B,), of complete
present=None)``                         data or of incomplete ones (`present`: (M, B) bool)
``test_objective(params, xs, key, K)``  the bound reported on the test set, (B,)
``generate(params, key, num)``          decoder means of prior samples
``cross_generate(params, observed,      decoder means of every modality from samples of
key, K)``                               q(z | x_S)
``reconstruct(params, xs, key)``        recon[e][d]: decoder d on a sample of q(z | x_e)
``shared_latent(z)``                   the part of z every modality shares, (..., D)
======================================  ===================================================

Evaluation and training use only this protocol, so a new model is one file that subclasses
`MultimodalVAE` (see `mmvae_jax.models.mopoe` for the smallest complete example) plus one line in
the registry of `mmvae_jax.models`.

Shapes: M modalities, K samples, B data, D latent dimensions.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmvae_jax import distributions as dists

ScaleFn = Callable[[jax.Array], jax.Array]
Params = Any
DEFAULT_ESTIMATOR = "dreg"


# ---------------------------------------------------------------------------------------------
# Modalities.


def _module_variables(params: Params, side: str, name: str) -> dict:
  """{"params": ..., ["batch_stats": ...]} of modality `name`'s encoder or decoder."""
  variables = {"params": params[side][name]}
  stats = params.get("batch_stats", {}).get(side, {}).get(name) if isinstance(params, Mapping) else None
  if stats:
    variables["batch_stats"] = stats
  return variables


@dataclasses.dataclass(frozen=True)
class Modality:
  """One modality: its networks, its likelihood and its weight λ in the objective.

  A modality owns how its networks are applied (`init`, `encoder_outputs`, `decoder_output`);
  a modality whose networks need more than ``apply(variables, input)`` (the CUB caption
  modality, whose decoder reuses the encoder's embedding) subclasses it.

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

  init_batch: ClassVar[int] = 1  # rows of the dummy input that initialises the encoder

  def init(self, k_enc: jax.Array, k_dec: jax.Array, latent_dim: int
           ) -> tuple[Params, Params]:
    """(encoder parameters, decoder parameters), the networks' own initialisation."""
    x = jnp.zeros((self.init_batch,) + tuple(self.data_shape), jnp.float32)
    enc = self.encoder.init(k_enc, x)["params"]
    dec = self.decoder.init(k_dec, jnp.zeros((1, latent_dim)))["params"]
    return enc, dec

  def encoder_outputs(self, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(loc, scale pre-activation), each (B, D), from the model's whole `params`."""
    return self.encoder.apply(_module_variables(params, "encoders", self.name), x)

  def decoder_inputs(self, params: Params) -> tuple:
    """Arguments the decoder takes after z (none; a tied decoder takes encoder weights)."""
    del params
    return ()

  def decoder_output(self, params: Params, z: jax.Array) -> jax.Array:
    """The likelihood parameter (..., *data_shape) of z (..., D)."""
    return self.decoder.apply(_module_variables(params, "decoders", self.name), z,
                              *self.decoder_inputs(params))

  def check(self, x: jax.Array) -> None:
    if tuple(x.shape[1:]) != tuple(self.data_shape):
      raise ValueError(f"modality {self.name!r}: expected data of shape (B, "
                       f"{', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# The uniform mixture of posteriors.


@dataclasses.dataclass(frozen=True)
class UniformMixture:
  """(1/C) Σ_c q_c(z): a uniform mixture of C distributions with batch shape (B, D).

  `log_prob` is the density of the whole latent vector, (..., B) (its event shape is (D,)), so
  `mmvae_jax.distributions.latent_log_prob` takes it like any other posterior.
  """
  components: tuple

  @property
  def event_shape(self) -> tuple[int, ...]:
    return tuple(self.components[0].batch_shape[-1:])

  def sample(self, *, seed: jax.Array, sample_shape=()) -> jax.Array:
    """z of shape (*sample_shape, B, D): each (sample, datum) from a uniformly chosen component.

    Every component is sampled (C reparameterised draws) and one is kept per (sample, datum).
    """
    sample_shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
    k_comp, k_z = jax.random.split(seed)
    keys = jax.random.split(k_z, len(self.components))
    z = jnp.stack([q.sample(seed=k, sample_shape=sample_shape)
                   for q, k in zip(self.components, keys)])  # (C, *S, B, D)
    comp = jax.random.randint(k_comp, z.shape[1:-1], 0, len(self.components))
    return jnp.take_along_axis(z, comp[None, ..., None], axis=0)[0]

  def log_prob(self, z: jax.Array) -> jax.Array:
    """log (1/C) Σ_c q_c(z): z (..., B, D) -> (..., B)."""
    lq = jnp.stack([dists.latent_log_prob(q, z) for q in self.components])
    return jax.nn.logsumexp(lq, axis=0) - jnp.log(len(self.components))


def components(posterior) -> tuple:
  """The mixture components of a posterior (a plain distribution is its own one component)."""
  return tuple(posterior.components) if isinstance(posterior, UniformMixture) else (posterior,)


# ---------------------------------------------------------------------------------------------
# The base model.


@dataclasses.dataclass(frozen=True)
class MultimodalVAE:
  """Modality bookkeeping and the parts of the protocol every model shares.

  Subclasses implement `posterior`, `objective` and, where they have one, `prior_params`
  (learned prior parameters) and `prior`; they may override `expert` (how an encoder's outputs
  become a distribution) and `test_objective`.

  Attributes:
    modalities: the M modalities, in batch order.
    latent_dim: D.
  """
  modalities: tuple[Modality, ...]
  latent_dim: int = 20

  objectives: ClassVar[tuple[str, ...]] = ()
  default_objective: ClassVar[str] = ""

  def __post_init__(self):
    names = [m.name for m in self.modalities]
    if len(names) < 1:
      raise ValueError(f"a {type(self).__name__} needs at least one modality")
    if len(set(names)) != len(names):
      raise ValueError(f"modality names must be unique, got {names}")
    for m in self.modalities:
      if m.posterior_family not in dists.FAMILIES:
        raise ValueError(f"unknown distribution family {m.posterior_family!r}: choose "
                         f"{sorted(dists.FAMILIES)}")

  def __repr__(self) -> str:
    mods = ", ".join(f"{m.name} {tuple(m.data_shape)} λ={m.llik_scale:.4g}" for m in self.modalities)
    return f"{type(self).__name__}([{mods}], latent_dim={self.latent_dim})"

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

  def check_data(self, xs: Sequence[jax.Array]) -> None:
    """ValueError unless `xs` holds one array (B, *data_shape) per modality, in order."""
    if len(xs) != self.num_modalities:
      raise ValueError(f"expected {self.num_modalities} modalities {list(self.names)}, "
                       f"got {len(xs)} arrays")
    for m, x in zip(self.modalities, xs):
      m.check(x)

  def check_observed(self, observed: Mapping[str, jax.Array]) -> None:
    if not observed:
      raise ValueError("observe at least one modality")
    for name, x in observed.items():
      self.modality(name).check(x)

  def init(self, key: jax.Array) -> Params:
    """Parameters: every modality's networks, then the model's own (`prior_params`)."""
    keys = jax.random.split(key, 2 * self.num_modalities)
    encoders, decoders = {}, {}
    for i, m in enumerate(self.modalities):
      encoders[m.name], decoders[m.name] = m.init(keys[2 * i], keys[2 * i + 1], self.latent_dim)
    return {"encoders": encoders, "decoders": decoders, **self.prior_params()}

  def prior_params(self) -> dict:
    """The model's parameters beyond the networks (default: none)."""
    return {}

  # -- distributions -------------------------------------------------------------------------

  def prior(self, params: Params) -> dists.Distribution:
    """p(z) = N(0, I), batch shape (D,) (models with a learned prior override this)."""
    del params
    return dists.normal(jnp.zeros((self.latent_dim,), jnp.float32),
                        jnp.ones((self.latent_dim,), jnp.float32))

  def expert_loc_scale(self, params: Params, name: str, x: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """(loc, scale), each (B, D), of expert `name` with the modality's scale constraint."""
    m = self.modality(name)
    loc, pre = m.encoder_outputs(params, x)
    chex.assert_shape([loc, pre], (x.shape[0], self.latent_dim))
    return loc, m.posterior_scale(pre)

  def expert(self, params: Params, name: str, x: jax.Array) -> dists.Distribution:
    """q_m(z | x_m) for modality `name`: x (B, *data_shape) -> batch shape (B, D)."""
    return dists.FAMILIES[self.modality(name).posterior_family](
        *self.expert_loc_scale(params, name, x))

  def encode_one(self, params: Params, name: str, x: jax.Array) -> dists.Distribution:
    """Alias of `expert`."""
    return self.expert(params, name, x)

  def encode(self, params: Params, xs: Sequence[jax.Array]) -> list[dists.Distribution]:
    """The M experts q_m(z | x_m), each with batch shape (B, D)."""
    self.check_data(xs)
    return [self.expert(params, m.name, x) for m, x in zip(self.modalities, xs)]

  def posterior(self, params: Params, observed: Mapping[str, jax.Array]):
    """q(z | x_S) of the non-empty subset S = `observed` ({name: x (B, *data_shape)})."""
    raise NotImplementedError

  def shared_latent(self, z: jax.Array) -> jax.Array:
    """The part of a latent sample z (..., *) that all modalities share, (..., D): all of it
    (a model with private latents keeps only the shared columns)."""
    return z

  def decode_one(self, params: Params, name: str, z: jax.Array) -> jax.Array:
    """Decoder `name` on z (..., D): its likelihood parameter (..., *data_shape)."""
    return self.modality(name).decoder_output(params, z)

  def decode(self, params: Params, z: jax.Array) -> tuple[jax.Array, ...]:
    """Every decoder on z (..., D): a tuple of M likelihood parameters."""
    return tuple(m.decoder_output(params, z) for m in self.modalities)

  def log_likelihoods(self, params: Params, xs: Sequence[jax.Array], z: jax.Array,
                      weighted: bool = True) -> jax.Array:
    """log p(x_d | z) for every decoder d: z (..., B, D) -> (M, ..., B); × λ_d if `weighted`."""
    out = []
    for m, x, mean in zip(self.modalities, xs, self.decode(params, z)):
      ll = m.log_likelihood(x, mean)
      out.append(ll * m.llik_scale if weighted else ll)
    return jnp.stack(out)

  def log_likelihood_fn(self, params: Params, xs: Sequence[jax.Array],
                        present: jax.Array | None = None) -> Callable[[jax.Array], jax.Array]:
    """z (..., B, D) -> Σ_d λ_d log p(x_d | z), (..., B).

    With `present` ((M, B) bool), example b sums only its present modalities' terms.
    """
    if present is None:
      return lambda z: jnp.sum(self.log_likelihoods(params, xs, z), axis=0)

    def masked(z):
      lls = self.log_likelihoods(params, xs, z)  # (M, ..., B)
      mask = present.reshape(present.shape[:1] + (1,) * (lls.ndim - 2) + present.shape[1:])
      return jnp.sum(jnp.where(mask, lls, 0.0), axis=0)
    return masked

  # -- incomplete data -----------------------------------------------------------------------

  def check_present(self, present: jax.Array, xs: Sequence[jax.Array]) -> jax.Array:
    """`present` as an (M, B) bool array for the batch `xs` (ValueError on a bad shape)."""
    from mmvae_jax import loss as losses
    return losses.check_present(present, self.num_modalities, xs[0].shape[0])

  def mask_inputs(self, xs: Sequence[jax.Array], present: jax.Array | None
                  ) -> tuple[jax.Array, ...]:
    """xs with every absent entry (present[m, b] False) replaced by zeros, so that hidden data
    never reach an encoder or a likelihood (None: `xs` unchanged)."""
    if present is None:
      return tuple(xs)
    return tuple(jnp.where(p.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
                 for x, p in zip(xs, present))

  def weighted_log_likelihood(self, params: Params, name: str, x: jax.Array, z: jax.Array
                              ) -> jax.Array:
    """λ_m log p(x_m | z) of modality `name` only: z (..., B, D) -> (..., B)."""
    m = self.modality(name)
    return m.llik_scale * m.log_likelihood(x, m.decoder_output(params, z))

  def subset_log_likelihood_fn(self, params: Params, observed: Mapping[str, jax.Array]
                               ) -> Callable[[jax.Array], jax.Array]:
    """z (..., B, D) -> Σ_{d∈S} λ_d log p(x_d | z) over the observed modalities S."""
    return lambda z: sum(self.weighted_log_likelihood(params, n, x, z)
                         for n, x in observed.items())

  # -- objectives ----------------------------------------------------------------------------

  def resolve_objective(self, kind: str | None) -> str:
    """The objective name `kind` stands for (None or "auto": the model's default)."""
    kind = self.default_objective if kind in (None, "auto") else kind
    if kind not in self.objectives:
      raise ValueError(f"unknown {type(self).__name__} objective {kind!r}: choose one of "
                       f"{', '.join(self.objectives)}")
    return kind

  def objective(self, params: Params, xs: Sequence[jax.Array], key: jax.Array,
                num_samples: int, *, kind: str | None = None, looser: bool = True,
                estimator: str = DEFAULT_ESTIMATOR, present: jax.Array | None = None
                ) -> jax.Array:
    """Per-example training objective (B,), a bound to maximise.

    `present`: optional (M, B) bool, True where modality m of example b is observed (at least
    one per example; None: all). Absent data are replaced by zeros before any network sees
    them (`mask_inputs`), their likelihood terms do not count, and the posterior of example b
    is built from its present experts only.
    """
    raise NotImplementedError

  def test_objective(self, params: Params, xs: Sequence[jax.Array], key: jax.Array,
                     num_samples: int) -> jax.Array:
    """The bound on log p(x_{1:M}) (λ inside) reported on the test set, (B,): the IWAE bound
    with the joint posterior as the proposal (default: K samples of each of its components)."""
    from mmvae_jax import loss as losses
    posterior = self.posterior(params, dict(zip(self.names, xs)))
    return losses.moe_iwae(key, list(components(posterior)), self.log_likelihood_fn(params, xs),
                           self.prior(params), num_samples, looser=False, estimator="iwae")

  # -- generation ----------------------------------------------------------------------------

  def generate(self, params: Params, key: jax.Array, num: int) -> tuple[jax.Array, ...]:
    """Decoder means of `num` prior samples in every modality: M arrays (num, *data_shape)."""
    z = self.prior(params).sample(seed=key, sample_shape=(num,))
    return self.decode(params, z)

  def reconstruct(self, params: Params, xs: Sequence[jax.Array], key: jax.Array
                  ) -> list[tuple[jax.Array, ...]]:
    """recon[e][d]: decoder d on one sample of q(z | x_e), each (B, *data_shape_d).

    Diagonal entries are reconstructions, off-diagonal ones cross-generations.
    """
    self.check_data(xs)
    keys = jax.random.split(key, self.num_modalities)
    z = jnp.stack([self.posterior(params, {n: x}).sample(seed=k)
                   for n, x, k in zip(self.names, xs, keys)])  # (M, B, D)
    means = self.decode(params, z)
    return [tuple(mean[e] for mean in means) for e in range(self.num_modalities)]

  def posterior_sample(self, params: Params, observed: Mapping[str, jax.Array],
                       key: jax.Array, num_samples: int = 1) -> jax.Array:
    """z ~ q(z | x_S) of the observed subset S: (K, B, D)."""
    self.check_observed(observed)
    return self.posterior(params, observed).sample(seed=key, sample_shape=(num_samples,))

  def mixture_sample(self, params: Params, observed: Mapping[str, jax.Array], key: jax.Array,
                     num_samples: int = 1) -> jax.Array:
    """Alias of `posterior_sample`."""
    return self.posterior_sample(params, observed, key, num_samples)

  def cross_generate(self, params: Params, observed: Mapping[str, jax.Array], key: jax.Array,
                     num_samples: int = 1) -> dict[str, jax.Array]:
    """Means of every modality given any non-empty subset of observed modalities.

    Returns {name: (K, B, *data_shape)} for every modality (observed ones are reconstructions).
    """
    z = self.posterior_sample(params, observed, key, num_samples)
    return dict(zip(self.names, self.decode(params, z)))
