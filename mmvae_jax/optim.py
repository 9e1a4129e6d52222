"""Optimiser: PyTorch's Adam with ``amsgrad=True``, as an optax transformation.

`optax.amsgrad` keeps the running maximum of the *bias-corrected* second moment; PyTorch (and
so the official MMVAE) keeps the maximum of the *raw* second moment and bias-corrects after
(see docs/official-code.md#amsgrad-variant). Per element, at step t >= 1::

    m_t = b1 m_{t-1} + (1 - b1) g_t
    v_t = b2 v_{t-1} + (1 - b2) g_t²
    vmax_t = max(vmax_{t-1}, v_t)
    θ_t = θ_{t-1} - lr / (1 - b1^t) · m_t / (sqrt(vmax_t) / sqrt(1 - b2^t) + eps)
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax


class ScaleByTorchAmsgradState(NamedTuple):
  count: chex.Array  # int32 step counter t
  mu: optax.Updates
  nu: optax.Updates
  nu_max: optax.Updates


def scale_by_torch_amsgrad(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                           ) -> optax.GradientTransformation:
  """Rescales updates as PyTorch's AMSGrad (the max is over the raw second moment)."""

  def init_fn(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return ScaleByTorchAmsgradState(count=jnp.zeros([], jnp.int32), mu=zeros(), nu=zeros(),
                                    nu_max=zeros())

  def update_fn(updates, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
    t = count.astype(jnp.float32)
    bc1 = 1 - b1**t
    sqrt_bc2 = jnp.sqrt(1 - b2**t)
    new_updates = jax.tree.map(lambda m, vm: (m / bc1) / (jnp.sqrt(vm) / sqrt_bc2 + eps), mu, nu_max)
    return new_updates, ScaleByTorchAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)

  return optax.GradientTransformation(init_fn, update_fn)


def torch_amsgrad(learning_rate: float = 1e-3, b1: float = 0.9, b2: float = 0.999,
                  eps: float = 1e-8) -> optax.GradientTransformation:
  """``torch.optim.Adam(lr, betas=(b1, b2), eps, amsgrad=True)`` (the official optimiser)."""
  return optax.chain(scale_by_torch_amsgrad(b1, b2, eps), optax.scale(-learning_rate))
