"""Incomplete training data: a per-example presence mask over the modalities of a paired set.

An example of an `IncompletePairs` lacks some of its modalities: ``present[m, i]`` is False
where modality m of example i is not observed. Its `gather` returns zeros in place of every
absent entry, and `mmvae_jax.data.batches` adds the batch's mask (``"present"``, (B, M) bool),
so that the hidden data never reach the device; the models' ``objective(..., present=...)``
leave absent modalities out of the posterior and the likelihood.

``--missing=svhn:0.5`` (`parse_missing`, `hide_modalities`) hides modality ``svhn`` in half
of the training examples. For label-paired sources (`PairedDataset`, where each used source
instance appears in exactly `partners` pairs) the hidden unit is the *source instance*: a
fraction f of the used svhn images is drawn, and every pair holding one of them lacks its
svhn slot. A hidden image is thus never seen at all, and exactly the fraction f of the pairs
lacks the modality. For any other paired set each row is its own instance. Several modalities
are hidden independently (one seeded draw each, from the run's seed and the modality's name);
an example left with nothing observed is removed, so no example is ever empty.

``missing_mode``: "keep" trains on every example that has at least one modality (the
incomplete ones included); "drop" trains on the complete examples only (the usual remedy
without a model for incomplete data). Test sets are never masked.
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np

MODES = ("keep", "drop")


def parse_missing(spec: str, names: Sequence[str] | None = None) -> dict[str, float]:
  """{modality: fraction} of ``"name:fraction,name:fraction"`` ("" or None: {}).

  Raises ValueError (one line) on bad syntax, a fraction outside [0, 1), a repeated name, or
  a name not in `names` (when given).
  """
  out: dict[str, float] = {}
  if not spec:
    return out
  for part in str(spec).split(","):
    name, sep, value = part.strip().partition(":")
    name = name.strip()
    if not sep or not name:
      raise ValueError(f"--missing={spec!r}: expected comma-separated name:fraction entries, "
                       f"e.g. --missing=svhn:0.5")
    try:
      fraction = float(value)
    except ValueError:
      raise ValueError(f"--missing: the fraction of {name!r} must be a number in [0, 1), got "
                       f"{value.strip()!r}") from None
    if not 0.0 <= fraction < 1.0:
      raise ValueError(f"--missing: the fraction of {name!r} must be in [0, 1), got {value.strip()}")
    if name in out:
      raise ValueError(f"--missing names {name!r} twice: give each modality once")
    if names is not None and name not in names:
      raise ValueError(f"--missing: unknown modality {name!r}: choose among "
                       f"{', '.join(names)}")
    out[name] = fraction
  return out


def _instances(dataset, m: int) -> np.ndarray | None:
  """(N,) instance ids of modality m's entries (the source index for label-paired sets), or
  None when each row is its own instance."""
  indices = getattr(dataset, "indices", None)
  if indices is None or np.ndim(indices) != 2 or np.shape(indices)[1] != len(dataset):
    return None
  return np.asarray(indices[m])


def hidden_mask(dataset, names: Sequence[str], fractions: dict[str, float], seed: int
                ) -> np.ndarray:
  """(M, N) bool presence of the examples of `dataset` (modalities `names`, in order) with a
  fraction of the instances of each modality of `fractions` hidden.

  Modality m hides round(f · U_m) of its U_m used instances, drawn uniformly without
  replacement by ``np.random.default_rng([seed, crc32(name)])``: a pure function of the seed,
  the modality's name and the data.
  """
  n = len(dataset)
  present = np.ones((len(names), n), bool)
  for m, name in enumerate(names):
    fraction = fractions.get(name, 0.0)
    if not fraction:
      continue
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    inst = _instances(dataset, m)
    if inst is None:
      hide = rng.permutation(n)[:int(round(fraction * n))]
      present[m, hide] = False
    else:
      used = np.unique(inst)
      hidden = rng.choice(used, size=int(round(fraction * used.size)), replace=False)
      present[m] = ~np.isin(inst, hidden)
  return present


class IncompletePairs:
  """The rows `rows` of a paired set with the presence mask `present`.

  Follows the paired-set interface (``len``, ``gather(rows) -> (xs, labels)``, ``labels``);
  `gather` returns zeros in every absent entry, and ``present`` ((M, len) bool) is read by
  `mmvae_jax.data.batches`, which adds it to the batch.

  Attributes:
    base: the complete paired set.
    rows: (N,) int64 rows of `base` kept.
    present: (M, N) bool, True where modality m of example i is observed.
  """

  def __init__(self, base, rows: np.ndarray, present: np.ndarray):
    rows = np.asarray(rows, np.int64)
    present = np.asarray(present, bool)
    if present.ndim != 2 or present.shape[1] != rows.size:
      raise ValueError(f"IncompletePairs: present must be (M, {rows.size}), got {present.shape}")
    if rows.size and not present.any(axis=0).all():
      raise ValueError("IncompletePairs: every example needs at least one present modality")
    self.base, self.rows, self.present = base, rows, present
    self.labels = np.asarray(base.labels)[rows]

  def __len__(self) -> int:
    return int(self.rows.size)

  @property
  def num_modalities(self) -> int:
    return self.present.shape[0]

  def gather(self, rows) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Examples at `rows`: (M arrays (B, ...) with zeros where absent, (B,) labels)."""
    rows = np.asarray(rows)
    xs, labels = self.base.gather(self.rows[rows])
    out = []
    for x, p in zip(xs, self.present[:, rows]):
      x = np.array(x, copy=True)
      x[~p] = 0
      out.append(x)
    return tuple(out), labels

  def __repr__(self) -> str:
    frac = ", ".join(f"{1 - f:.3f}" for f in self.present.mean(axis=1))
    return f"IncompletePairs({len(self)} examples, hidden fraction per modality: [{frac}])"


def hide_modalities(dataset, names: Sequence[str], fractions: dict[str, float], seed: int,
                    mode: str = "keep") -> tuple[IncompletePairs, dict]:
  """`dataset` with the fractions of `fractions` hidden (`hidden_mask`), as `IncompletePairs`.

  mode "keep": every example with at least one observed modality; "drop": the complete ones.
  Returns (the set, a JSON-able description: counts of examples and hidden entries).
  """
  if mode not in MODES:
    raise ValueError(f"--missing_mode must be one of {', '.join(MODES)}, got {mode!r}")
  present = hidden_mask(dataset, names, fractions, seed)
  keep = present.all(axis=0) if mode == "drop" else present.any(axis=0)
  rows = np.flatnonzero(keep)
  if not rows.size:
    raise ValueError(f"--missing={','.join(f'{k}:{v:g}' for k, v in fractions.items())} with "
                     f"--missing_mode={mode} leaves no training example: lower the fractions")
  out = IncompletePairs(dataset, rows, present[:, rows])
  desc = {"mode": mode, "fractions": dict(fractions), "examples_before": len(dataset),
          "examples": len(out),
          "hidden": {n: int((~out.present[m]).sum()) for m, n in enumerate(names)},
          "complete": int(out.present.all(axis=0).sum())}
  return out, desc
