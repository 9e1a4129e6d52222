"""PyTorch-style AMSGrad against a float64 NumPy transcription of torch's update rule."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmvae_jax.optim import torch_amsgrad


def torch_amsgrad_reference(params, grads_seq, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam(amsgrad=True), per element, float64 (max over the raw second moment)."""
  theta = params.astype(np.float64)
  m = np.zeros_like(theta)
  v = np.zeros_like(theta)
  vmax = np.zeros_like(theta)
  for t, g in enumerate(grads_seq, start=1):
    g = g.astype(np.float64)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    vmax = np.maximum(vmax, v)
    theta = theta - (lr / (1 - b1**t)) * m / (np.sqrt(vmax) / np.sqrt(1 - b2**t) + eps)
  return theta


def _run(tx, params, grads_seq):
  state = tx.init(params)
  for g in grads_seq:
    updates, state = tx.update(jnp.asarray(g), state, params)
    params = optax.apply_updates(params, updates)
  return np.asarray(params)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torch_rule(seed):
  rng = np.random.default_rng(seed)
  params = rng.normal(size=(50,)).astype(np.float32)
  # Decreasing gradient magnitudes make the running max differ from the current moment, which
  # is where torch's raw-v max and optax's bias-corrected max part ways.
  grads = [(rng.normal(size=(50,)) * 3.0 / (1 + t)).astype(np.float32) for t in range(40)]
  ours = _run(torch_amsgrad(1e-2), jnp.asarray(params), grads)
  ref = torch_amsgrad_reference(params, grads, lr=1e-2)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
  # optax.amsgrad keeps the max of the bias-corrected moment: measurably different here.
  other = _run(optax.amsgrad(1e-2), jnp.asarray(params), grads)
  assert np.max(np.abs(other - ref)) > 1e-3


def test_jit_and_pytree():
  tx = torch_amsgrad(1e-3)
  params = {"a": jnp.ones((3, 2)), "b": {"c": jnp.zeros((4,))}}
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  # First step: m/(1-b1) = g, sqrt(v)/sqrt(1-b2) = |g| -> update = -lr * g / (|g| + eps).
  np.testing.assert_allclose(updates["a"], -1e-3 * np.ones((3, 2)) / (1 + 1e-8), rtol=1e-5)
  assert int(state[0].count) == 1
