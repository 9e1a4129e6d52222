"""Latent linear probe (the paper's Table 1).

A linear classifier D → 10 (cross-entropy, Adam 1e-3, batch 256) is trained on **one
reparameterised sample** of a posterior of the model, drawn fresh for every batch (not the mean;
no gradient into the VAE), over the paired train set. Test accuracy (%) uses the same sampling on
the paired test pairs. The official code trains 30 epochs over the 1,682,040 train pairs; the
default here is 1 epoch (`epochs`). See docs/official-code.md, "Latent linear probe".

Probes ("views"), for any model of the library (its ``posterior(params, observed)``):

* one per modality m on z ~ q(z | x_m): for the MMVAE (and the single-modality VAE) the expert
  q_m itself (Table 1's "MMVAE" and "single-VAE" columns), for the MVAE the product of the prior
  expert and expert m (Table 1's "MVAE (single)");
* with M >= 2, one per modality's label on z ~ q(z | x_{1:M}), the posterior of all modalities
  (view "<name>@joint"; Table 1's "MVAE (both)" for the MVAE; a sample of the mixture of experts
  for the MMVAE). The labels of a pair are equal, so these probes differ only in their
  initialisation and samples; the paper reports one number per modality.

All probes are trained together in one jitted step (their losses are independent).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmvae_jax.evaluation.common import paired_batches, select_rows

NUM_CLASSES = 10
JOINT_SUFFIX = "@joint"


def probe_views(model) -> list[tuple[str, tuple[str, ...]]]:
  """(probe id, observed modalities) of every probe: one per modality, plus with M >= 2 one
  probe of the posterior of all modalities per modality's label (id "<name>@joint")."""
  views = [(n, (n,)) for n in model.names]
  if len(model.names) > 1:
    views += [(n + JOINT_SUFFIX, tuple(model.names)) for n in model.names]
  return views


def _sample(model, params, xs, key, views):
  """One z per probe view, from its posterior: a list of (B, D), gradients stopped; only the
  shared latent (`shared_latent`) of a model with private latents."""
  keys = jax.random.split(key, len(views))
  params = jax.lax.stop_gradient(params)
  data = dict(zip(model.names, xs))
  return [model.shared_latent(model.posterior(params, {n: data[n] for n in observed})
                              .sample(seed=k))
          for (_, observed), k in zip(views, keys)]


def latent_probe(model, params, train_set, test_set, *, key: jax.Array, epochs: int = 1,
                 batch_size: int = 256, lr: float = 1e-3, num_train: int | None = None,
                 num_test: int | None = None, seed: int = 0, num_classes: int = NUM_CLASSES,
                 log=None) -> dict:
  """Trains linear probes on posterior samples and reports their test accuracy.

  Args:
    model, params: any model of the library and its parameters (not modified).
    train_set, test_set: `PairedDataset`s; the label of a pair is the label of every modality.
    key: PRNG key of the posterior samples and the probes' initialisation.
    epochs: passes over the (subset of the) train pairs, each in a fresh order.
    num_train, num_test: random subsets of that many pairs (None/0: all).
    seed: seed of the subsets and of the visiting orders.
  Returns:
    {"accuracy": {name: % on the test pairs, z ~ q(z | x_name)}, "train_accuracy": {name: %
     over the last epoch's batches}, "epochs", "num_train", "num_test"}; with M >= 2 also
    "accuracy_joint" and "train_accuracy_joint": {name: %} of the probes on z ~ q(z | x_{1:M}).
  """
  if epochs < 1:
    raise ValueError(f"probe epochs must be >= 1, got {epochs}")
  views = probe_views(model)
  ids = [v for v, _ in views]
  dense = nn.Dense(num_classes)
  k_init, k_train, k_test = jax.random.split(key, 3)
  # Probe i keeps the initialisation key of the original per-modality probes (fold_in i).
  probe = {v: dense.init(jax.random.fold_in(k_init, i), jnp.zeros((1, model.latent_dim)))["params"]
           for i, v in enumerate(ids)}
  opt = optax.adam(lr)
  opt_state = opt.init(probe)

  def per_view(probe, zs, y, mask):
    """(V,) masked mean cross-entropies and (V,) correct counts."""
    losses, correct = [], []
    for v, z in zip(ids, zs):
      logits = dense.apply({"params": probe[v]}, z)
      ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
      losses.append(jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0))
      correct.append(jnp.sum((jnp.argmax(logits, -1) == y) * mask))
    return jnp.stack(losses), jnp.stack(correct)

  @jax.jit
  def train_step(probe, opt_state, params, xs, y, mask, key):
    zs = _sample(model, params, xs, key, views)

    def loss_fn(p):
      losses, correct = per_view(p, zs, y, mask)
      return jnp.sum(losses), correct
    (_, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(probe)
    updates, opt_state = opt.update(grads, opt_state, probe)
    return optax.apply_updates(probe, updates), opt_state, correct

  @jax.jit
  def test_step(probe, params, xs, y, mask, key):
    return per_view(probe, _sample(model, params, xs, key, views), y, mask)[1]

  train_rows = select_rows(len(train_set), num_train, seed)
  step = 0
  for epoch in range(epochs):
    order = train_rows[np.random.default_rng([seed, epoch, 31]).permutation(len(train_rows))]
    correct, total = np.zeros(len(ids)), 0.0
    for xs, y, mask in paired_batches(train_set, order, batch_size):
      probe, opt_state, c = train_step(probe, opt_state, params, tuple(xs), y, mask,
                                       jax.random.fold_in(k_train, step))
      correct += np.asarray(c)
      total += float(mask.sum())
      step += 1
    if log is not None:
      log(f"probe epoch {epoch + 1}/{epochs}: train accuracy " +
          ", ".join(f"{v} {100 * c / total:.1f}%" for v, c in zip(ids, correct)))
  train_acc = {v: float(100.0 * c / total) for v, c in zip(ids, correct)}

  test_rows = select_rows(len(test_set), num_test, seed)
  correct, total = np.zeros(len(ids)), 0.0
  for i, (xs, y, mask) in enumerate(paired_batches(test_set, test_rows, batch_size)):
    correct += np.asarray(test_step(probe, params, tuple(xs), y, mask, jax.random.fold_in(k_test, i)))
    total += float(mask.sum())
  test_acc = {v: float(100.0 * c / total) for v, c in zip(ids, correct)}
  out = {"accuracy": {n: test_acc[n] for n in model.names},
         "train_accuracy": {n: train_acc[n] for n in model.names},
         "epochs": epochs, "num_train": int(len(train_rows)), "num_test": int(total)}
  if len(ids) > len(model.names):
    out["accuracy_joint"] = {n: test_acc[n + JOINT_SUFFIX] for n in model.names}
    out["train_accuracy_joint"] = {n: train_acc[n + JOINT_SUFFIX] for n in model.names}
  return out
