"""Helpers shared by the evaluation modules: subsets of pairs and padded host batches."""
from __future__ import annotations

from typing import Iterator

import numpy as np


def select_rows(n: int, num: int | None, seed: int) -> np.ndarray:
  """Rows of a random subset of `num` of `n` pairs (all n, in stored order, when num is None/0
  or >= n).

  Paired sets are stored class by class, so a subset must be random, never the first rows.
  """
  if n < 1:
    raise ValueError("the dataset has no pairs")
  if not num or num >= n:
    return np.arange(n, dtype=np.int64)
  if num < 0:
    raise ValueError(f"the number of pairs must be >= 0, got {num}")
  return np.sort(np.random.default_rng([seed, 7919]).choice(n, size=num, replace=False))


def padded_rows(rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """rows (b,) with 1 <= b <= size -> (rows padded to (size,) by repeating rows[0], (size,)
  float32 mask: 1 for real rows)."""
  rows = np.asarray(rows)
  if not 1 <= len(rows) <= size:
    raise ValueError(f"padded_rows: need 1..{size} rows, got {len(rows)}")
  mask = np.zeros((size,), np.float32)
  mask[:len(rows)] = 1.0
  if len(rows) == size:
    return rows, mask
  out = np.full((size,), rows[0], rows.dtype)
  out[:len(rows)] = rows
  return out, mask


def paired_batches(dataset, rows: np.ndarray, batch_size: int
                   ) -> Iterator[tuple[tuple[np.ndarray, ...], np.ndarray, np.ndarray]]:
  """Batches of a `PairedDataset` at `rows`, all of shape (B, ...) (the last one padded).

  Yields:
    (xs: M float32 arrays (B, *data_shape_m), labels (B,) int32, mask (B,) float32).
  """
  bs = min(batch_size, len(rows))
  if bs < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  for start in range(0, len(rows), bs):
    r, mask = padded_rows(rows[start:start + bs], bs)
    xs, y = dataset.gather(r)
    yield xs, y, mask


def as_float(x: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 / 255; anything else -> float32."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    return np.divide(x, np.float32(255), dtype=np.float32)
  return x.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Which posterior a model offers (duck typing: MMVAE, MVAE, single-modality VAE).


def has_product_posterior(model) -> bool:
  """Whether `model` has a closed-form posterior of any subset, ``model.posterior(params,
  {name: x})`` (the MVAE's product of experts with the prior expert); the MMVAE has none (its
  joint posterior is the mixture of its experts)."""
  return callable(getattr(model, "posterior", None))


def subset_posterior(model, params, observed):
  """q(z | x_S) as one distribution with batch shape (B, D).

  For a model with `posterior` (the MVAE): that product of experts, for any non-empty S. For an
  MMVAE: the expert `encode_one` of a single observed modality (the mixture of several experts is
  no single distribution here: use `model.mixture_sample` to sample it).
  """
  if not observed:
    raise ValueError("observe at least one modality")
  if has_product_posterior(model):
    return model.posterior(params, dict(observed))
  if len(observed) != 1:
    raise ValueError(f"{type(model).__name__} has no closed-form posterior of several "
                     f"modalities ({sorted(observed)}): sample its mixture instead")
  (name, x), = observed.items()
  return model.encode_one(params, name, x)
