"""Latent linear probe (paper Table 1; spec §9.2).

For each modality m separately: a linear classifier D → 10 (cross-entropy, Adam 1e-3,
batch 256) on **one reparameterised sample** z ~ q_m(z | x_m) of that modality's own encoder,
drawn fresh for every batch (not the mean; no gradient into the VAE), over the paired train
set. Test accuracy (%) uses the same sampling on the paired test pairs. The official code trains
30 epochs over the 1,682,040 train pairs; the default here is 1 epoch (`epochs`).

All M probes are trained together in one jitted step (their losses are independent).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmvae_jax.evaluation.common import paired_batches, select_rows

NUM_CLASSES = 10


def _sample(model, params, xs, key):
  """One z ~ q_m(z | x_m) per modality: M arrays (B, D), gradients stopped."""
  keys = jax.random.split(key, model.num_modalities)
  params = jax.lax.stop_gradient(params)
  return [model.encode_one(params, name, x).sample(seed=k)
          for name, x, k in zip(model.names, xs, keys)]


def latent_probe(model, params, train_set, test_set, *, key: jax.Array, epochs: int = 1,
                 batch_size: int = 256, lr: float = 1e-3, num_train: int | None = None,
                 num_test: int | None = None, seed: int = 0, num_classes: int = NUM_CLASSES,
                 log=None) -> dict:
  """Trains one linear probe per modality on posterior samples and reports test accuracy.

  Args:
    model, params: the MMVAE and its parameters (not modified).
    train_set, test_set: `PairedDataset`s; the label of a pair is the label of every modality.
    key: PRNG key of the posterior samples and the probes' initialisation.
    epochs: passes over the (subset of the) train pairs, each in a fresh order.
    num_train, num_test: random subsets of that many pairs (None/0: all).
    seed: seed of the subsets and of the visiting orders.
  Returns:
    {"accuracy": {name: % on the test pairs}, "train_accuracy": {name: % over the last
     epoch's batches}, "epochs", "num_train", "num_test"}.
  """
  if epochs < 1:
    raise ValueError(f"probe epochs must be >= 1, got {epochs}")
  names = model.names
  dense = nn.Dense(num_classes)
  k_init, k_train, k_test = jax.random.split(key, 3)
  probe = {n: dense.init(jax.random.fold_in(k_init, i), jnp.zeros((1, model.latent_dim)))["params"]
           for i, n in enumerate(names)}
  opt = optax.adam(lr)
  opt_state = opt.init(probe)

  def per_modality(probe, zs, y, mask):
    """(M,) masked mean cross-entropies and (M,) correct counts."""
    losses, correct = [], []
    for n, z in zip(names, zs):
      logits = dense.apply({"params": probe[n]}, z)
      ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
      losses.append(jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0))
      correct.append(jnp.sum((jnp.argmax(logits, -1) == y) * mask))
    return jnp.stack(losses), jnp.stack(correct)

  @jax.jit
  def train_step(probe, opt_state, params, xs, y, mask, key):
    zs = _sample(model, params, xs, key)

    def loss_fn(p):
      losses, correct = per_modality(p, zs, y, mask)
      return jnp.sum(losses), correct
    (_, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe)
    updates, opt_state = opt.update(grads, opt_state, probe)
    return optax.apply_updates(probe, updates), opt_state, correct

  @jax.jit
  def test_step(probe, params, xs, y, mask, key):
    return per_modality(probe, _sample(model, params, xs, key), y, mask)[1]

  train_rows = select_rows(len(train_set), num_train, seed)
  step = 0
  for epoch in range(epochs):
    order = train_rows[np.random.default_rng([seed, epoch, 31]).permutation(len(train_rows))]
    correct, total = np.zeros(len(names)), 0.0
    for xs, y, mask in paired_batches(train_set, order, batch_size):
      probe, opt_state, c = train_step(probe, opt_state, params, tuple(xs), y, mask,
                                       jax.random.fold_in(k_train, step))
      correct += np.asarray(c)
      total += float(mask.sum())
      step += 1
    if log is not None:
      log(f"probe epoch {epoch + 1}/{epochs}: train accuracy " +
          ", ".join(f"{n} {100 * c / total:.1f}%" for n, c in zip(names, correct)))
  train_acc = {n: float(100.0 * c / total) for n, c in zip(names, correct)}

  test_rows = select_rows(len(test_set), num_test, seed)
  correct, total = np.zeros(len(names)), 0.0
  for i, (xs, y, mask) in enumerate(paired_batches(test_set, test_rows, batch_size)):
    correct += np.asarray(test_step(probe, params, tuple(xs), y, mask, jax.random.fold_in(k_test, i)))
    total += float(mask.sum())
  return {"accuracy": {n: float(100.0 * c / total) for n, c in zip(names, correct)},
          "train_accuracy": train_acc, "epochs": epochs, "num_train": int(len(train_rows)),
          "num_test": int(total)}
