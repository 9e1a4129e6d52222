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
