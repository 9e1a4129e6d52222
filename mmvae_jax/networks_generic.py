"""MLP encoder and decoder for images of any shape (the official MNIST MLP, shape-generic).

Layer widths and activations are those of the official MNIST MLP: a 400-unit hidden
layer with ReLU (`num_hidden_layers` of them), two linear heads for the latent mean and the
scale pre-activation; the decoder mirrors it and ends in a sigmoid, clamped to
[1e-6, 1 − 1e-6] as the official MNIST decoder (set `clamp=0` to skip the clamp). Every linear
layer has PyTorch's default initialisation, U(±1/sqrt(fan_in)) for weights and biases.

Used for the 16×16 USPS modality of experiments/three_digits.py; with data_shape (28, 28, 1) it
is the official MNIST MLP.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmvae_jax.layers import Dense

HIDDEN = 400
CLAMP = 1e-6


class MLPEncoder(nn.Module):
  """x (B, *data_shape) in [0, 1] -> (loc (B, D), scale pre-activation (B, D))."""
  latent_dim: int = 20
  hidden: int = HIDDEN
  num_hidden_layers: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = x.reshape(x.shape[0], -1)
    for i in range(self.num_hidden_layers):
      h = nn.relu(Dense(self.hidden, name=f"fc{i}")(h))
    return (Dense(self.latent_dim, name="loc")(h),
            Dense(self.latent_dim, name="scale")(h))


class MLPDecoder(nn.Module):
  """z (..., D) -> means (..., *data_shape) in [clamp, 1 − clamp]."""
  data_shape: tuple[int, ...]
  hidden: int = HIDDEN
  num_hidden_layers: int = 1
  clamp: float = CLAMP

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    h = z
    for i in range(self.num_hidden_layers):
      h = nn.relu(Dense(self.hidden, name=f"fc{i}")(h))
    size = math.prod(self.data_shape)
    out = nn.sigmoid(Dense(size, name="out")(h))
    if self.clamp:
      out = jnp.clip(out, self.clamp, 1.0 - self.clamp)
    return out.reshape(z.shape[:-1] + tuple(self.data_shape))
