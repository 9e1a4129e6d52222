"""The MMVAE and its modality (`mmvae_jax.models`), and the MNIST-SVHN model of the paper."""
from __future__ import annotations

from mmvae_jax.models.base import Modality, ScaleFn  # noqa: F401
from mmvae_jax.models.mmvae import MMVAE  # noqa: F401


def mnist_svhn(latent_dim: int = 20, *, llik_scaling: float = 0.0, learn_prior: bool = True,
               decoder_impl: str = "auto", mnist_shape=(28, 28, 1), svhn_shape=(32, 32, 3)
               ) -> MMVAE:
  """The MNIST-SVHN MMVAE of the paper (see `mmvae_jax.experiments.digits.mnist_svhn_modalities`).

  Laplace experts with softmax(v)·D + 1e-6 scales, a Laplace(0, softmax(l)·D) prior, Laplace
  likelihoods with scale 0.75, λ_MNIST = 3072/784 (or `llik_scaling` when nonzero), λ_SVHN = 1.
  """
  from mmvae_jax.experiments import digits
  mods = digits.mnist_svhn_modalities(latent_dim, llik_scaling=llik_scaling,
                                      decoder_impl=decoder_impl,
                                      shapes={"mnist": mnist_shape, "svhn": svhn_shape})
  return MMVAE(modalities=mods, latent_dim=latent_dim, learn_prior=learn_prior)
