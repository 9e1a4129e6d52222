"""CUB image features + captions: loading, pairing, splits, nearest-neighbour lookup.

Pairing: the official loaders zip 10 captions per image, caption i with image ⌊i/10⌋ (the
caption file lists the captions of each image in the order of the sorted image files). A
`CubPairs` holds the features once per image and the captions once; pairs are rows of the
caption list.

Features: (N_images, 2048) float32 ResNet-101 pooled features in ``.npy`` files, as written by
experiments/extract_cub_features.py (``train.npy`` / ``test.npy`` in a folder, or one file).
Captions: a ``.txt`` file with one caption per line (the official ``text_*classes.txt``) or an
``.npz`` with a ``captions`` string array (and optionally ``class_id``, e.g. a
``cub_captions_test.npz`` holding the captions of the 50 test classes).

For an offline check with only the 50 test classes' captions (no images, no features):
`split_by_image` holds out a seeded fraction of the images (with their 10 captions each) as a
test split, and `synthetic_features` draws class-conditional stand-in features (NOT ResNet
features: a random non-negative mean per class plus noise, clipped at 0 as post-ReLU features).
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Sequence

import numpy as np

from mmvae_jax.data import captions as cap

CAPTIONS_PER_IMAGE = 10
FEATURE_DIM = 2048
MODALITIES = ("image", "sentence")


@dataclasses.dataclass(frozen=True)
class CaptionFile:
  """Captions read from a file: (N,) strings and, if the file has them, (N,) int class ids."""
  captions: tuple[str, ...]
  class_ids: np.ndarray | None
  path: str


def load_captions(path: str) -> CaptionFile:
  """Captions from a ``.txt`` (one per non-empty line) or an ``.npz`` (key ``captions``)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such caption file (give a .txt with one caption per line "
                            f"or an .npz with a 'captions' array, e.g. "
                            f"cub_captions_test.npz)")
  if path.lower().endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as npz:
        if "captions" not in npz.files:
          raise ValueError(f"{path}: no 'captions' array (has {', '.join(npz.files) or 'none'})")
        captions = tuple(str(c) for c in npz["captions"])
        class_ids = np.asarray(npz["class_id"]).astype(np.int32) if "class_id" in npz.files else None
    except (OSError, zipfile.BadZipFile) as e:
      raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
  else:
    with open(path, encoding="utf-8") as f:
      captions = tuple(line.strip() for line in f if line.strip())
    class_ids = None
  if not captions:
    raise ValueError(f"{path}: no captions")
  if class_ids is not None and class_ids.shape != (len(captions),):
    raise ValueError(f"{path}: {len(captions)} captions but class_id of shape {class_ids.shape}")
  return CaptionFile(captions=captions, class_ids=class_ids, path=path)


def load_features(path: str, split: str | None = None) -> np.ndarray:
  """(N, 2048) float32 features from an ``.npy`` file, or ``{split}.npy`` in a folder."""
  path = os.fspath(path)
  if os.path.isdir(path):
    if split is None:
      raise ValueError(f"{path} is a folder: name the split (train or test) to read {path}/<split>.npy")
    path = os.path.join(path, f"{split}.npy")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such feature file (write it with "
                            f"experiments/extract_cub_features.py, or use --synthetic_features)")
  try:
    feats = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable .npy array ({str(e).splitlines()[0]})") from None
  if feats.ndim != 2 or feats.shape[1] != FEATURE_DIM:
    raise ValueError(f"{path}: features must be (N, {FEATURE_DIM}), got shape {feats.shape}")
  if not np.issubdtype(feats.dtype, np.floating):
    raise ValueError(f"{path}: features must be floats, got dtype {feats.dtype}")
  if not np.all(np.isfinite(feats)):
    raise ValueError(f"{path}: features contain non-finite values")
  return feats.astype(np.float32, copy=False)


def check_alignment(num_captions: int, num_images: int, where: str = "CUB data") -> None:
  """The official pairing needs exactly 10 captions per image (caption i ↔ image i // 10)."""
  if num_captions != CAPTIONS_PER_IMAGE * num_images:
    raise ValueError(f"{where}: {num_captions} captions for {num_images} images; the pairing "
                     f"caption i <-> image i // 10 needs exactly {CAPTIONS_PER_IMAGE} per image")


def image_classes(class_ids: np.ndarray) -> np.ndarray:
  """(N_captions,) per-caption classes -> (N_images,) per-image classes (10 equal per image)."""
  class_ids = np.asarray(class_ids)
  if class_ids.size % CAPTIONS_PER_IMAGE:
    raise ValueError(f"{class_ids.size} captions is not a multiple of {CAPTIONS_PER_IMAGE}")
  per = class_ids.reshape(-1, CAPTIONS_PER_IMAGE)
  if np.any(per != per[:, :1]):
    raise ValueError("the 10 captions of an image have different class ids")
  return per[:, 0].copy()


def split_by_image(num_images: int, test_fraction: float, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Seeded held-out split of images: (sorted train image indices, sorted test image indices)."""
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  num_test = int(round(test_fraction * num_images))
  if not 0 < num_test < num_images:
    raise ValueError(f"cannot hold out {test_fraction} of {num_images} images")
  perm = np.random.default_rng(seed).permutation(num_images)
  return np.sort(perm[num_test:]), np.sort(perm[:num_test])


def synthetic_features(classes: np.ndarray, *, dim: int = FEATURE_DIM, seed: int = 0,
                       mean_scale: float = 0.5, noise: float = 0.35) -> np.ndarray:
  """SYNTHETIC class-conditional stand-ins for ResNet features (not image features).

  Each class c gets a mean μ_c with entries Exponential(`mean_scale`) (non-negative, skewed like
  pooled post-ReLU activations); an image of class c is max(0, μ_c + `noise`·ε), ε ~ N(0, I).

  Args:
    classes: (N_images,) integer class of each image.
  Returns:
    (N_images, dim) float32, >= 0; a deterministic function of (classes, seed).
  """
  classes = np.asarray(classes)
  uniq, inv = np.unique(classes, return_inverse=True)
  rng = np.random.default_rng(seed)
  means = rng.exponential(mean_scale, size=(len(uniq), dim))
  x = means[inv] + noise * rng.standard_normal((classes.size, dim))
  return np.maximum(x, 0.0).astype(np.float32)


class CubPairs:
  """Image features and captions of one split, paired caption i ↔ image image_of[i].

  Attributes:
    modalities: the modalities `gather` returns, in order (a subset of ("image", "sentence")).
    features: (N_images, 2048) float32 or None (a sentence-only dataset).
    tokens: (N_captions, 32) int32 token ids or None (an image-only dataset).
    image_of: (N_captions,) int64 row of `features` for each caption.
    labels: (N_rows,) int32 class ids (or image indices when classes are unknown).
    synthetic_features: whether `features` are synthetic stand-ins.

  A dataset with the sentence modality has one row per caption (88,550 train / 29,330 test
  pairs at full size); an image-only one has one row per image. `gather` follows the
  `mmvae_jax.data.PairedDataset` interface, so `mmvae_jax.data.batches` and `mmvae_jax.train`
  use it unchanged.
  """

  def __init__(self, features: np.ndarray | None, tokens: np.ndarray | None,
               labels: np.ndarray | None = None, *, modalities: Sequence[str] = MODALITIES,
               synthetic_features: bool = False, name: str = "cub"):
    self.modalities = tuple(modalities)
    bad = [m for m in self.modalities if m not in MODALITIES]
    if bad or not self.modalities or len(set(self.modalities)) != len(self.modalities):
      raise ValueError(f"modalities must be distinct names from {MODALITIES}, got {self.modalities}")
    self.name, self.synthetic_features = name, synthetic_features
    if features is not None:
      features = np.asarray(features, np.float32)
      if features.ndim != 2 or features.shape[1] != FEATURE_DIM:
        raise ValueError(f"{name}: features must be (N, {FEATURE_DIM}), got {features.shape}")
    if tokens is not None:
      tokens = np.asarray(tokens)
      if tokens.ndim != 2 or tokens.shape[1] != cap.MAX_LENGTH or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{name}: tokens must be integer ids of shape (N, {cap.MAX_LENGTH}), got "
                         f"{tokens.dtype} {tokens.shape}")
    if "image" in self.modalities and features is None:
      raise ValueError(f"{name}: the image modality needs features")
    if "sentence" in self.modalities and tokens is None:
      raise ValueError(f"{name}: the sentence modality needs tokens")
    if features is not None and tokens is not None:
      check_alignment(len(tokens), len(features), name)
    self.features = features
    self.tokens = None if tokens is None else tokens.astype(np.int32)
    num_images = len(features) if features is not None else len(tokens) // CAPTIONS_PER_IMAGE
    self.num_images = num_images
    self.image_of = (np.arange(len(tokens), dtype=np.int64) // CAPTIONS_PER_IMAGE
                     if tokens is not None else np.arange(num_images, dtype=np.int64))
    n = len(self.image_of) if "sentence" in self.modalities else num_images
    if labels is None:
      labels = self.image_of if "sentence" in self.modalities else np.arange(n)
    labels = np.asarray(labels).astype(np.int32)
    if labels.shape != (n,):
      raise ValueError(f"{name}: labels of shape {labels.shape} for {n} rows")
    self.labels = labels

  def __len__(self) -> int:
    return self.labels.shape[0]

  @property
  def num_modalities(self) -> int:
    return len(self.modalities)

  def gather(self, rows) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Rows (B,) -> (arrays in `modalities` order: image (B, 2048) float32 features, sentence
    (B, 32) float32 token ids; (B,) int32 labels)."""
    rows = np.asarray(rows)
    out = []
    for m in self.modalities:
      if m == "image":
        img = self.image_of[rows] if "sentence" in self.modalities else rows
        out.append(self.features[img])
      else:
        out.append(self.tokens[rows].astype(np.float32))
    return tuple(out), self.labels[rows]

  def with_modalities(self, modalities: Sequence[str]) -> "CubPairs":
    """The same data with other modalities (e.g. ("sentence",) for the sentence VAE alone)."""
    labels = None
    if ("sentence" in modalities) == ("sentence" in self.modalities):
      labels = self.labels
    elif "sentence" in self.modalities:  # captions -> images: the label of each image's first caption
      labels = self.labels[::CAPTIONS_PER_IMAGE] if self.tokens is not None else None
    else:
      labels = np.repeat(self.labels, CAPTIONS_PER_IMAGE)
    return CubPairs(self.features, self.tokens, labels, modalities=modalities,
                    synthetic_features=self.synthetic_features, name=self.name)

  def subset_images(self, images: np.ndarray, name: str | None = None) -> "CubPairs":
    """The images `images` ((n,) indices) with their 10 captions each, in the given order."""
    images = np.asarray(images, np.int64)
    feats = None if self.features is None else self.features[images]
    caption_rows = (images[:, None] * CAPTIONS_PER_IMAGE + np.arange(CAPTIONS_PER_IMAGE)).reshape(-1)
    toks = None if self.tokens is None else self.tokens[caption_rows]
    labels = self.labels[caption_rows] if "sentence" in self.modalities else self.labels[images]
    return CubPairs(feats, toks, labels, modalities=self.modalities,
                    synthetic_features=self.synthetic_features, name=name or self.name)

  def __repr__(self) -> str:
    kind = " SYNTHETIC features" if self.synthetic_features else ""
    return (f"CubPairs({self.name}: {list(self.modalities)}, {len(self)} rows, "
            f"{self.num_images} images{kind})")


def nearest_neighbours(query: np.ndarray, bank: np.ndarray, chunk: int = 1024
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Index of the nearest bank feature for every query (the paper's "feature search").

  Distance sqrt(1e-5 + |‖q − b‖²|), as the official lookup.

  Args:
    query: (Q, F) generated or reconstructed features.
    bank: (N, F) features of real images (e.g. the train set).
  Returns:
    ((Q,) int64 indices into `bank`, (Q,) float32 distances).
  """
  query, bank = np.asarray(query, np.float64), np.asarray(bank, np.float64)
  if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
    raise ValueError(f"nearest_neighbours: query (Q, F) and bank (N, F) with the same F, got "
                     f"{query.shape} and {bank.shape}")
  if len(bank) == 0:
    raise ValueError("nearest_neighbours: empty bank")
  bank_sq = np.sum(bank**2, axis=1)
  idx = np.empty((len(query),), np.int64)
  dist = np.empty((len(query),), np.float32)
  for start in range(0, len(query), chunk):
    q = query[start:start + chunk]
    d2 = np.sum(q**2, axis=1)[:, None] - 2.0 * q @ bank.T + bank_sq[None, :]
    d = np.sqrt(1e-5 + np.abs(d2))
    j = np.argmin(d, axis=1)
    idx[start:start + chunk] = j
    dist[start:start + chunk] = d[np.arange(len(q)), j]
  return idx, dist


def tokenise_split(caption_file: CaptionFile, vocab: cap.Vocabulary | None = None
                   ) -> tuple[np.ndarray, cap.Vocabulary, list[list[str]]]:
  """Tokenises a caption file; builds the vocabulary from it when `vocab` is None (train).

  Returns:
    ((N, 32) int32 token ids, the vocabulary, the word tokens of each caption).
  """
  tokenised = cap.tokenize_all(caption_file.captions)
  if vocab is None:
    vocab = cap.build_vocabulary(tokenised)
  ids, _ = vocab.encode_all(tokenised)
  return ids, vocab, tokenised
