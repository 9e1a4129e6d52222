"""Tiny MLP modalities and data shared by the tests: every compile takes a second or two.

Two image-shaped modalities by default, ``(4, 4, 1)`` and ``(4, 4, 3)``; any shapes can be asked
for (e.g. a third ``(3, 3, 1)`` one for M = 3). Likelihood scales follow the MNIST-SVHN
convention: λ_m = (largest modality size) / (size of m).
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mmvae_jax import data
from mmvae_jax.model import MMVAE, Modality

TWO_SHAPES = ((4, 4, 1), (4, 4, 3))


class TinyEncoder(nn.Module):
  """x (B, ...) → (loc, scale_logits), each (B, latent_dim)."""
  latent_dim: int

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.latent_dim)(h), nn.Dense(self.latent_dim)(h)


class TinyDecoder(nn.Module):
  """z (..., latent_dim) → mean (..., *shape) in (0, 1)."""
  shape: tuple

  @nn.compact
  def __call__(self, z):
    h = nn.relu(nn.Dense(16)(z))
    out = nn.sigmoid(nn.Dense(int(np.prod(self.shape)))(h))
    return out.reshape(z.shape[:-1] + tuple(self.shape))


def tiny_modalities(latent_dim=3, shapes=TWO_SHAPES):
  """One `Modality` ``m{i}`` per shape."""
  largest = max(np.prod(s) for s in shapes)
  return tuple(Modality(name=f"m{i}", encoder=TinyEncoder(latent_dim), decoder=TinyDecoder(s),
                        data_shape=s, llik_scale=float(largest / np.prod(s)))
               for i, s in enumerate(shapes))


def tiny_model(latent_dim=3, shapes=TWO_SHAPES):
  """An MMVAE over `tiny_modalities`."""
  return MMVAE(modalities=tiny_modalities(latent_dim, shapes), latent_dim=latent_dim)


def tiny_xs(b=5, seed=0, shapes=TWO_SHAPES):
  """Uniform random data, one (b, *shape) array per modality."""
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.uniform(0, 1, size=(b,) + s).astype(np.float32)) for s in shapes)


def tiny_dataset(n=40, seed=0, partners=2, shapes=TWO_SHAPES):
  """A `PairedDataset` of n instances per source whose pixels carry their label (3 classes).

  Each source draws its own labels, so the pairing has to match classes across sources.
  """
  rng = np.random.default_rng(seed)
  srcs = []
  for i, s in enumerate(shapes):
    labels = rng.integers(0, 3, size=n)
    base = rng.uniform(0, 0.3, size=(n,) + s) + labels.reshape(-1, 1, 1, 1) / 3.0
    srcs.append(data.source_from_arrays(np.clip(base, 0, 1).astype(np.float32), labels, f"m{i}"))
  return data.PairedDataset(srcs, partners=partners, seed=seed)


def digits_npz(path, shape, n_train, n_test, seed, num_classes=10):
  """An .npz source (x_train, y_train, x_test, y_test) of random uint8 images of `shape` whose
  labels cycle through 0..num_classes-1; returns its path as a string."""
  rng = np.random.default_rng(seed)
  np.savez(path, x_train=rng.integers(0, 256, (n_train,) + tuple(shape), dtype=np.uint8),
           y_train=np.arange(n_train) % num_classes,
           x_test=rng.integers(0, 256, (n_test,) + tuple(shape), dtype=np.uint8),
           y_test=np.arange(n_test) % num_classes)
  return str(path)
