"""Models by name: every model implements the protocol of `mmvae_jax.models.base.MultimodalVAE`.

    from mmvae_jax import models
    model = models.build("mmvae", modalities, models.ModelOptions(latent_dim=20))

A registry entry maps a name to ``build(modalities, options) -> model``. Besides the registered
names, ``"vae_<modality>"`` builds the single-modality VAE of that modality (an MMVAE with
M = 1, λ = 1). Adding a model is one file under this package and one line in `MODELS` (and
one in `NETWORK_LATENT_DIMS` if its networks read more than `latent_dim` latent columns).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from mmvae_jax import distributions as dists
from mmvae_jax.models import mmvae, mmvae_plus, mopoe, mvae
from mmvae_jax.models.base import (DEFAULT_ESTIMATOR, Modality, MultimodalVAE, UniformMixture,
                                   components)
from mmvae_jax.models.mmvae import MMVAE
from mmvae_jax.models.mmvae_plus import MMVAEPlus
from mmvae_jax.models.mvae import MVAE, single_vae


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """What a model constructor reads besides the modalities.

  Attributes:
    latent_dim: D.
    learn_prior: learn the prior's scale logits (models with a learned prior).
    prior_family, prior_scale: the learned prior's family and scale map (MMVAE; an experiment
      sets them: Laplace/softmax·D for the digits, Normal/softplus for CUB).
    expert_scale: the scale constraint of Gaussian experts (product-of-experts models).
    private_dim: each modality's private latent size (models with private latents: MMVAE+).
    beta: the weight β of the regularisation terms (MMVAE+).
  """
  latent_dim: int = 20
  learn_prior: bool = True
  prior_family: str = "laplace"
  prior_scale: Callable = functools.partial(dists.softmax_scale, eta=0.0)
  expert_scale: str = "logvar"
  private_dim: int = 10
  beta: float = 1.0


MODELS: dict[str, Callable[..., MultimodalVAE]] = {
    "mmvae": mmvae.build,
    "mvae": mvae.build,
    "mopoe": mopoe.build,
    "mmvae_plus": mmvae_plus.build,
}

# Models whose networks read more latent columns than `latent_dim` (default: latent_dim).
NETWORK_LATENT_DIMS: dict[str, Callable[[ModelOptions], int]] = {
    "mmvae_plus": mmvae_plus.network_latent_dim,
}

SINGLE_PREFIX = "vae_"


def names(modalities: tuple[str, ...] = ()) -> list[str]:
  """Every model name: the registry's, then ``vae_<name>`` for each of `modalities`."""
  return list(MODELS) + [SINGLE_PREFIX + n for n in modalities]


def build(name: str, modalities: tuple[Modality, ...], options: ModelOptions) -> MultimodalVAE:
  """The model `name` over `modalities` (ValueError naming the choices when unknown)."""
  if name in MODELS:
    return MODELS[name](tuple(modalities), options)
  if name.startswith(SINGLE_PREFIX):
    slot = name[len(SINGLE_PREFIX):]
    for m in modalities:
      if m.name == slot:
        return single_vae(m, options.latent_dim, prior_family=options.prior_family,
                          prior_scale=options.prior_scale, learn_prior=options.learn_prior)
  raise ValueError(f"unknown model {name!r}: choose one of "
                   f"{', '.join(names(tuple(m.name for m in modalities)))}")


def network_latent_dim(name: str, options: ModelOptions) -> int:
  """The latent width the networks of model `name` read and write (encoder heads, decoder
  input): `options.latent_dim`, or more for a model with private latents."""
  fn = NETWORK_LATENT_DIMS.get(name)
  return fn(options) if fn is not None else options.latent_dim


def used_modalities(name: str, all_names: tuple[str, ...]) -> tuple[str, ...]:
  """The modalities model `name` reads: one for ``vae_<name>``, else all of them."""
  if name.startswith(SINGLE_PREFIX) and name not in MODELS:
    slot = name[len(SINGLE_PREFIX):]
    if slot not in all_names:
      raise ValueError(f"unknown model {name!r}: choose one of {', '.join(names(all_names))}")
    return (slot,)
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(names(all_names))}")
  return tuple(all_names)


__all__ = ["DEFAULT_ESTIMATOR", "MMVAE", "MMVAEPlus", "MODELS", "MVAE", "ModelOptions",
           "Modality", "MultimodalVAE", "UniformMixture", "build", "components", "names",
           "network_latent_dim", "single_vae", "used_modalities"]
