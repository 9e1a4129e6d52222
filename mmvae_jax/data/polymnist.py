"""PolyMNIST (Sutter, Daunhawer, Vogt 2021) in the folder layout its authors distribute.

    PolyMNIST/
      train/m0/<index>.<label>.png  ...  train/m4/...
      test/m0/...                   ...  test/m4/...

Every modality folder ``m<i>`` holds one 28×28 RGB PNG per tuple, named ``<index>.<label>.png``
(the index counts within its label, so the name, not the index, identifies a tuple); the same
file name in every modality folder is one multimodal tuple: the same digit class, each modality
on its own background. Tuples are therefore aligned by file name, never re-paired by label.

`load_split` reads one split into one `Source` per modality, rows in the same tuple order (by
label, then index); `AlignedDataset` zips them row by row with the interface of
`mmvae_jax.data.PairedDataset` (``len``, ``gather``, ``sources``, ``indices``, ``labels``).
Every problem (missing folder, no modality folders, a file name that is not ``<index>.<label>.png``,
tuples missing in some modality, images of different shapes) is a ValueError naming the path.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np

from mmvae_jax.data import pairing
from mmvae_jax.data.sources import Source, source_from_arrays

SPLITS = ("train", "test")
_MODALITY = re.compile(r"^m(\d+)$")
_FILE = re.compile(r"^(\d+)\.(\d+)\.png$")


def modality_folders(root: str, split: str = "train") -> list[str]:
  """The modality folder names of `root`/`split` in index order (m0, m1, ...).

  ValueError when the split folder is missing, holds no ``m<i>`` folder, or the indices do not
  run 0, 1, ..., M − 1.
  """
  where = os.path.join(root, split)
  if not os.path.isdir(root):
    raise ValueError(f"PolyMNIST folder {root!r} not found: pass --data_dir=<folder holding "
                     f"train/ and test/>")
  if not os.path.isdir(where):
    raise ValueError(f"{where}: missing; a PolyMNIST folder holds train/ and test/, each with "
                     f"m0 ... m4 subfolders of <index>.<label>.png images")
  found = sorted((int(m.group(1)), n) for n in os.listdir(where)
                 if (m := _MODALITY.match(n)) and os.path.isdir(os.path.join(where, n)))
  if not found:
    raise ValueError(f"{where}: no modality folders m0, m1, ... found")
  if [i for i, _ in found] != list(range(len(found))):
    raise ValueError(f"{where}: modality folders {[n for _, n in found]} do not run m0 ... "
                     f"m{len(found) - 1}")
  return [n for _, n in found]


def _tuple_names(folder: str) -> dict[str, tuple[int, int]]:
  names = {}
  for n in os.listdir(folder):
    if n.startswith("."):
      continue
    m = _FILE.match(n)
    if not m:
      raise ValueError(f"{os.path.join(folder, n)}: not a PolyMNIST image name "
                       f"(<index>.<label>.png)")
    names[n] = (int(m.group(2)), int(m.group(1)))  # (label, index)
  return names


def _read_png(path: str) -> np.ndarray:
  from PIL import Image
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"), dtype=np.uint8)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable PNG image ({e})") from None


def load_split(root: str, split: str, modalities: Sequence[str] | None = None,
               limit: int | None = None) -> list[Source]:
  """One `Source` per modality of `root`/`split`, rows aligned by tuple (file name).

  Args:
    root: the PolyMNIST folder (holding train/ and test/).
    split: "train" or "test".
    modalities: folder names to read (default: every ``m<i>`` of the split).
    limit: read only the first `limit` tuples (in tuple order), e.g. for a quick look.
  Returns:
    Sources named ``polymnist_<m>`` with (N, 28, 28, 3) uint8 images (any common shape is
    accepted) and the labels of the file names.
  """
  if split not in SPLITS:
    raise ValueError(f"unknown PolyMNIST split {split!r}: choose {', '.join(SPLITS)}")
  folders = list(modalities) if modalities else modality_folders(root, split)
  base = os.path.join(root, split)
  names = {}
  for m in folders:
    path = os.path.join(base, m)
    if not os.path.isdir(path):
      raise ValueError(f"{path}: modality folder missing")
    names[m] = _tuple_names(path)
  first = folders[0]
  common = set(names[first])
  for m in folders[1:]:
    diff = common.symmetric_difference(names[m])
    if diff:
      example = sorted(diff)[0]
      where = first if example in names[first] else m
      raise ValueError(f"{base}: {len(diff)} tuple(s) are not in every modality folder (e.g. "
                       f"{example} in {where} only); each m<i> must hold the same file names")
  order = sorted(common, key=lambda n: names[first][n])
  if limit is not None:
    order = order[:max(0, int(limit))]
  if not order:
    raise ValueError(f"{base}: no images in {', '.join(folders)}")
  labels = np.asarray([names[first][n][0] for n in order], np.int32)
  sources = []
  shape = None
  for m in folders:
    images = np.stack([_read_png(os.path.join(base, m, n)) for n in order])
    if shape is not None and images.shape[1:] != shape:
      raise ValueError(f"{os.path.join(base, m)}: images of shape {images.shape[1:]}, but "
                       f"{shape} in {folders[0]}")
    shape = images.shape[1:]
    sources.append(source_from_arrays(images, labels, f"polymnist_{m}"))
  return sources


class AlignedDataset(pairing.PairedDataset):
  """M sources of equal length zipped row by row: row i of every source is tuple i (a
  `PairedDataset` whose pairing is the identity: length, `gather` and the rest are its own).

  Attributes:
    sources: the M `Source`s.
    indices: (M, N) int32, row i of modality m is sources[m] row indices[m, i] (= i).
    labels: (N,) int32 tuple labels (those of the first source).
  """

  def __init__(self, sources: Sequence[Source]):
    self.sources = tuple(sources)
    if not self.sources:
      raise ValueError("AlignedDataset needs at least one source")
    n = len(self.sources[0])
    for s in self.sources[1:]:
      if len(s) != n:
        raise ValueError(f"AlignedDataset: {s.name} has {len(s)} rows, {self.sources[0].name} "
                         f"{n}")
      if not np.array_equal(s.labels, self.sources[0].labels):
        raise ValueError(f"AlignedDataset: the labels of {s.name} and {self.sources[0].name} "
                         f"differ row by row")
    self.indices = np.tile(np.arange(n, dtype=np.int32), (len(self.sources), 1))
    self.labels = self.sources[0].labels.astype(np.int32)
    self.partners, self.seed, self.max_per_class = 1, None, None

  def __repr__(self) -> str:
    names = ", ".join(f"{s.name}{s.image_shape}" for s in self.sources)
    return f"AlignedDataset([{names}], tuples={len(self)})"
