"""Coherence of cross and joint generations (the paper's Table 2), for any model of the library.

* Cross coherence e->d: one sample z of q(z | x_e) per test pair (K = 1, `model.reconstruct`),
  decoded by modality d's decoder (the mean), classified by d's digit classifier, compared with
  the pair's label. Reported per ordered pair as "source->target" (e.g. "mnist->svhn"); the
  diagonal e->e (reconstructions) is reported separately. The paper's direction labels are
  ambiguous (docs/official-code.md, "Table 2 direction labels"), so every number here carries its
  direction explicitly.
* Subset coherence: z ~ q(z | x_S), the model's posterior of a non-empty proper subset S of the
  modalities (`model.cross_generate`), decoded in every modality t outside S and classified;
  keys "a+b->t".
* Joint coherence: `num` (10,000) prior samples (`model.generate`) decoded in every modality;
  the % where all the predicted digits agree.

Which posterior is sampled is the model's: the MMVAE's expert q_e (a subset: the mixture of its
experts), the MVAE's product of the prior expert and the observed experts.

All accuracies are percentages. Classifiers are `mmvae_jax.evaluation.classifiers.Classifier`
objects keyed by modality name. Keys are plain ASCII.
"""
from __future__ import annotations

import itertools
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmvae_jax.evaluation.classifiers import Classifier
from mmvae_jax.evaluation.common import paired_batches, select_rows

ARROW = "->"


def direction(sources: Sequence[str], target: str) -> str:
  """"mnist->svhn" (one source) or "mnist+usps->svhn" (a subset)."""
  return "+".join(sources) + ARROW + target


def _check_classifiers(model, classifiers: Mapping[str, Classifier], needed) -> None:
  missing = [n for n in needed if n not in classifiers]
  if missing:
    raise ValueError(f"no classifier for modality {missing[0]!r} (have {sorted(classifiers)})")


def _cparams(model, classifiers, names):
  return {n: classifiers[n].params for n in names}


def cross_predictions_fn(model, classifiers: Mapping[str, Classifier]):
  """Jitted (params, cparams, xs, key) -> (M_e, M_d, B) int32 predicted classes of recon[e][d]."""
  names = model.names

  def fn(params, cparams, xs, key):
    recon = model.reconstruct(params, xs, key)  # recon[e][d] (B, *shape_d), one z per expert
    return jnp.stack([
        jnp.stack([jnp.argmax(classifiers[d].logits(cparams[d], recon[e][j]), axis=-1)
                   for j, d in enumerate(names)])
        for e in range(len(names))]).astype(jnp.int32)

  return jax.jit(fn)


def cross_coherence(model, params, dataset, classifiers: Mapping[str, Classifier], *,
                    key: jax.Array, num: int | None = None, batch_size: int = 256,
                    seed: int = 0, log=None) -> dict:
  """Cross coherence for every ordered pair of modalities (K = 1, decoder means).

  Args:
    model: any model of the library (module docstring).
    params: its parameters.
    dataset: a `PairedDataset` (the test pairs); labels are the pairs' labels.
    classifiers: {modality name: Classifier} for every modality.
    key: PRNG key of the posterior samples (one per batch via fold_in).
    num: evaluate a random subset of this many pairs (None/0: all pairs).
    batch_size: B.
    seed: seed of the subset.
    log: optional callable receiving about ten progress lines.
  Returns:
    {"cross": {"e->d": % for e != d}, "reconstruction": {"e->e": %}, "num": pairs evaluated}.
  """
  names = model.names
  _check_classifiers(model, classifiers, names)
  fn = cross_predictions_fn(model, classifiers)
  cparams = _cparams(model, classifiers, names)
  rows = select_rows(len(dataset), num, seed)
  m = len(names)
  correct = np.zeros((m, m), np.float64)
  total = 0.0
  n_batches = -(-len(rows) // min(batch_size, len(rows)))
  start = time.perf_counter()
  for i, (xs, y, mask) in enumerate(paired_batches(dataset, rows, batch_size)):
    pred = np.asarray(fn(params, cparams, tuple(xs), jax.random.fold_in(key, i)))
    correct += np.sum((pred == y[None, None, :]) * mask[None, None, :], axis=-1)
    total += float(mask.sum())
    if log is not None and ((i + 1) % -(-n_batches // 10) == 0 or i + 1 == n_batches):
      log(f"cross coherence: {int(total)}/{len(rows)} pairs, {time.perf_counter() - start:.0f}s")
  pct = 100.0 * correct / total
  cross = {direction([names[e]], names[d]): float(pct[e, d])
           for e in range(m) for d in range(m) if e != d}
  recon = {direction([names[e]], names[e]): float(pct[e, e]) for e in range(m)}
  return {"cross": cross, "reconstruction": recon, "num": int(total)}


def proper_subsets(names: Sequence[str]) -> list[tuple[str, ...]]:
  """Every non-empty proper subset of `names`, by size, in the models' order."""
  return [s for r in range(1, len(names)) for s in itertools.combinations(names, r)]


def subset_coherence(model, params, dataset, classifiers: Mapping[str, Classifier], *,
                     key: jax.Array, num: int | None = None, batch_size: int = 256,
                     seed: int = 0) -> dict:
  """Coherence of generation from every non-empty proper subset S to every target t ∉ S.

  z ~ q(z | x_S), the model's posterior of S (one sample per pair), decoded by t's decoder
  (mean), classified by t's classifier, compared with the pair's label. With one observed
  modality this is cross coherence (with its own samples).

  Returns:
    {"by_subset": {"S->t": %, S joined by "+"}, "by_size": {"|S|": mean % over the (S, t) of
     that size}, "num": pairs evaluated}.
  """
  names = model.names
  if len(names) < 2:
    raise ValueError("subset coherence needs at least two modalities")
  _check_classifiers(model, classifiers, names)
  cparams = _cparams(model, classifiers, names)
  rows = select_rows(len(dataset), num, seed)
  subsets = proper_subsets(names)

  def make(subset):
    targets = [n for n in names if n not in subset]

    def fn(params, cparams, xs, key):
      observed = {n: xs[names.index(n)] for n in subset}
      gen = model.cross_generate(params, observed, key, 1)  # {name: (1, B, ...)}
      return jnp.stack([jnp.argmax(classifiers[t].logits(cparams[t], gen[t][0]), axis=-1)
                        for t in targets]).astype(jnp.int32)
    return targets, jax.jit(fn)

  fns = [make(s) for s in subsets]
  correct = [np.zeros((len(t),)) for t, _ in fns]
  total = 0.0
  for i, (xs, y, mask) in enumerate(paired_batches(dataset, rows, batch_size)):
    k = jax.random.fold_in(key, i)
    for j, (_, fn) in enumerate(fns):
      pred = np.asarray(fn(params, cparams, tuple(xs), jax.random.fold_in(k, j)))
      correct[j] += np.sum((pred == y[None]) * mask[None], axis=-1)
    total += float(mask.sum())
  by_subset, by_size = {}, {}
  for s, (targets, _), c in zip(subsets, fns, correct):
    for t, ct in zip(targets, c):
      acc = float(100.0 * ct / total)
      by_subset[direction(s, t)] = acc
      by_size.setdefault(str(len(s)), []).append(acc)
  return {"by_subset": by_subset, "by_size": {k: float(np.mean(v)) for k, v in by_size.items()},
          "num": int(total)}


def joint_coherence(model, params, classifiers: Mapping[str, Classifier], *, key: jax.Array,
                    num: int = 10000, batch_size: int = 1000) -> dict:
  """Joint coherence: `num` prior samples decoded (means) in every modality and classified.

  Returns:
    {"joint": % of samples whose predicted digits agree in all modalities,
     "pairwise": {"a=b": % agreeing for each pair of modalities},
     "class_counts": {name: (10,) counts of predicted digits}, "num": num}.
  """
  names = model.names
  _check_classifiers(model, classifiers, names)
  if num < 1:
    raise ValueError(f"joint coherence needs num >= 1 prior samples, got {num}")
  cparams = _cparams(model, classifiers, names)
  bs = min(batch_size, num)

  @jax.jit
  def fn(params, cparams, key):
    means = model.generate(params, key, bs)
    return jnp.stack([jnp.argmax(classifiers[n].logits(cparams[n], x), axis=-1)
                      for n, x in zip(names, means)]).astype(jnp.int32)

  preds = []
  for i in range(-(-num // bs)):
    preds.append(np.asarray(fn(params, cparams, jax.random.fold_in(key, i))))
  pred = np.concatenate(preds, axis=1)[:, :num]  # (M, num)
  agree = np.all(pred == pred[:1], axis=0)
  pairwise = {f"{names[a]}={names[b]}": float(100.0 * np.mean(pred[a] == pred[b]))
              for a, b in itertools.combinations(range(len(names)), 2)}
  ncls = max(int(pred.max()) + 1, 10)
  counts = {n: np.bincount(pred[i], minlength=ncls).tolist() for i, n in enumerate(names)}
  return {"joint": float(100.0 * np.mean(agree)), "pairwise": pairwise, "class_counts": counts,
          "num": int(num)}
