"""Image sources: tfds datasets (read TF-free through `tfds.data_source`) and local `.npz` files.

A `Source` holds one split of one dataset in host memory, ONCE:

* `images` (N, H, W, C), NHWC. uint8 where the data are uint8 (MNIST, SVHN, `usps_colour.npz`),
  converted to float32 in [0, 1] per batch by `Source.get` (x / 255). Keeping uint8 is cheaper
  on both counts: a quarter of the memory (usps_colour train: 21 MiB instead of 85 MiB; SVHN
  train 225 MiB instead of 900 MiB) and gathering 128 uint8 rows then converting them is
  slightly faster than gathering 128 float32 rows (about 125 vs 145 us for 32x32x3 on the
  2-core CI machine), because 4x fewer bytes are read at random. Float sources are converted
  once at load time to float32 in [0, 1] (floats with any negative value are taken as [-1, 1]
  data, such as `usps.npz`, and become (x + 1) / 2).
* `labels` (N,) int32. Sources whose name contains "svhn" map label 10 (digit 0 in the .mat
  release) to 0; tfds `svhn_cropped` already uses 0..9.

Layout: grey (N, H, W) images get a channel axis (N, H, W, 1); (N, C, H, W) arrays with C in
{1, 3} are transposed to NHWC. Image sizes are kept as they are (16x16 USPS-style inputs too).

Pairs of several sources are index arrays into these (see `mmvae_jax.data.pairing`), never
copies of images.

The machine that trains may be offline. tfds datasets are therefore never downloaded here: a
dataset must have been prepared (in the array_record format), by the scripts' `--download=auto`
(`mmvae_jax.data.download`) or by `tfds build` on a connected machine and copied over;
otherwise `load_source` fails at once with a one-line `DatasetNotPreparedError` naming the
remedies. TensorFlow is used only as a fallback, for data prepared in the tfrecord format, and
only when it is importable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import zipfile
from typing import Sequence

import numpy as np

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_CHUNK = 1024  # examples read per `__getitems__` call when reading a tfds split


class DatasetNotPreparedError(FileNotFoundError, RuntimeError):
  """A tfds dataset is not available locally and may not be downloaded (one-line message)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
  """One split of one image dataset, held once in host memory.

  Attributes:
    images: (N, H, W, C) uint8 in 0..255 or float32 in [0, 1].
    labels: (N,) int32 class labels.
    name: short name for messages and logs (tfds name or .npz file stem).
  """
  images: np.ndarray
  labels: np.ndarray
  name: str

  def __post_init__(self):
    if self.images.ndim != 4:
      raise ValueError(f"source {self.name!r}: images must be (N, H, W, C), got shape {self.images.shape}")
    if self.images.dtype not in (np.uint8, np.float32):
      raise ValueError(f"source {self.name!r}: images must be uint8 or float32, got {self.images.dtype}")
    if self.labels.shape != (self.images.shape[0],):
      raise ValueError(f"source {self.name!r}: {self.images.shape[0]} images but labels of shape "
                       f"{self.labels.shape}")

  def __len__(self) -> int:
    return self.images.shape[0]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(self.images.shape[1:])

  def get(self, indices) -> np.ndarray:
    """Images at `indices` ((B,) ints) as float32 in [0, 1], shape (B, H, W, C)."""
    rows = np.take(self.images, np.asarray(indices), axis=0)
    if rows.dtype == np.uint8:
      return np.divide(rows, np.float32(255), dtype=np.float32)
    return rows


def _images_to_nhwc(images: np.ndarray, where: str) -> np.ndarray:
  """(N, H, W) -> (N, H, W, 1); (N, C, H, W) with C in {1, 3} and W > 4 -> NHWC; NHWC as is."""
  if images.ndim == 3:
    return images[..., None]
  if images.ndim == 4:
    if images.shape[-1] in (1, 3, 4):
      return images
    if images.shape[1] in (1, 3):
      return np.ascontiguousarray(np.moveaxis(images, 1, -1))
  raise ValueError(f"{where}: images must be (N, H, W) or (N, H, W, C) with C in 1/3/4, "
                   f"got shape {images.shape}")


def _images_to_storage(images: np.ndarray, where: str) -> np.ndarray:
  """Storage dtype: uint8 stays uint8; ints in 0..255 -> uint8; floats -> float32 in [0, 1].

  Floats with any negative value are taken as [-1, 1] data and mapped by (x + 1) / 2; floats
  already in [0, 1] are kept. Anything else is rejected.
  """
  if images.dtype == np.uint8:
    return images
  if images.size == 0:
    raise ValueError(f"{where}: no images")
  if np.issubdtype(images.dtype, np.integer):
    lo, hi = int(images.min()), int(images.max())
    if lo < 0 or hi > 255:
      raise ValueError(f"{where}: integer images must lie in 0..255, found {lo}..{hi}")
    return images.astype(np.uint8)
  if np.issubdtype(images.dtype, np.floating):
    lo, hi = float(images.min()), float(images.max())
    eps = 1e-6
    if lo >= -eps and hi <= 1 + eps:
      out = images.astype(np.float32, copy=images.dtype != np.float32)
    elif lo >= -1 - eps and hi <= 1 + eps:
      out = (images.astype(np.float32) + 1) / 2
    else:
      raise ValueError(f"{where}: float images must lie in [0, 1] or [-1, 1], found {lo:g}..{hi:g}")
    return np.clip(out, 0, 1, out=out) if out is not images else out
  raise ValueError(f"{where}: unsupported image dtype {images.dtype}")


def _labels_to_storage(labels: np.ndarray, name: str, where: str) -> np.ndarray:
  """(N,) or (N, 1) integer labels -> (N,) int32; SVHN's label 10 (digit 0) becomes 0."""
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    raise ValueError(f"{where}: labels must be (N,), got shape {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    if not (np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))):
      raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
  labels = labels.astype(np.int32)
  if "svhn" in name.lower():
    labels = np.where(labels == 10, 0, labels).astype(np.int32)
  return labels


def source_from_arrays(images, labels, name: str) -> Source:
  """A `Source` from raw arrays, normalising layout, dtype and range (see module docstring).

  Args:
    images: (N, H, W) grey, (N, H, W, C) NHWC or (N, C, H, W) with C in {1, 3}; uint8, integers
      in 0..255, or floats in [0, 1] or [-1, 1].
    labels: (N,) or (N, 1) integer class labels.
    name: name used in messages; an "svhn" name maps label 10 to 0.
  """
  where = f"source {name!r}"
  images = _images_to_storage(_images_to_nhwc(np.asarray(images), where), where)
  labels = _labels_to_storage(labels, name, where)
  if labels.shape[0] != images.shape[0]:
    raise ValueError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
  return Source(images=images, labels=labels, name=name)


def _npz_split_keys(split: str, path: str) -> tuple[str, str]:
  if split not in ("train", "test"):
    raise ValueError(f"{path}: split must be 'train' or 'test' for an .npz source, got {split!r}")
  return f"x_{split}", f"y_{split}"


def load_npz(path: str, split: str) -> Source:
  """Loads split "train" or "test" of an .npz with x_train, y_train, x_test, y_test."""
  xk, yk = _npz_split_keys(split, path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such .npz file")
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
  with npz:
    if not hasattr(npz, "files"):
      raise ValueError(f"{path}: holds a single array, expected an .npz with keys {', '.join(NPZ_KEYS)}")
    missing = [k for k in NPZ_KEYS if k not in npz.files]
    if missing:
      raise ValueError(f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(npz.files) or 'none'}); "
                       f"expected {', '.join(NPZ_KEYS)}")
    try:
      images, labels = npz[xk], npz[yk]
    except ValueError as e:  # e.g. object arrays, which would need pickle
      raise ValueError(f"{path}: cannot read {xk}/{yk} ({str(e).splitlines()[0]})") from None
  name = os.path.splitext(os.path.basename(path))[0]
  where = f"{path} [{xk}, {yk}]"
  if images.ndim < 1 or labels.ndim not in (1, 2) or labels.shape[0] != images.shape[0]:
    raise ValueError(f"{where}: images of shape {images.shape} but labels of shape {labels.shape} "
                     f"(need one label per image)")
  images = _images_to_storage(_images_to_nhwc(images, where), where)
  return Source(images=images, labels=_labels_to_storage(labels, name, where), name=name)


def tensorflow_available() -> bool:
  """Whether TensorFlow is importable (needed only for tfrecord-prepared tfds data)."""
  return importlib.util.find_spec("tensorflow") is not None


def not_prepared(tfds, name: str, split: str | None, data_dir, looked_in: str, cause: str,
                 download: str = "and will not be downloaded (offline, download=False)"
                 ) -> DatasetNotPreparedError:
  """The one-line error for a tfds dataset that is not there: `cause` and `download` say why,
  the remedies follow."""
  root = os.fspath(data_dir) if data_dir is not None else f"{default_data_dir(tfds)}"
  default = " (tfds default)" if data_dir is None else ""
  which = f" (split {split!r})" if split else ""
  return DatasetNotPreparedError(
      f"tfds dataset {name!r}{which} {cause} under data_dir {root}{default} (looked in "
      f"{looked_in}) {download}; remedies: prepare it on "
      f"a connected machine with `tfds build {name} --data_dir={root} --file_format=array_record`, "
      f"copy that directory here and pass --data_dir, or pass a local .npz file with x_train, "
      f"y_train, x_test, y_test")


def default_data_dir(tfds) -> str:
  """tfds's default data directory (``TFDS_DATA_DIR`` or ``~/tensorflow_datasets``)."""
  try:
    return os.fspath(tfds.core.constants.DATA_DIR)
  except Exception:  # pylint: disable=broad-except
    return "~/tensorflow_datasets"


@contextlib.contextmanager
def quiet_lookup():
  """Silences tfds's warnings while it looks for a dataset ("Variant folder ... has no
  dataset_info.json" for one not prepared): the outcome is reported in one line instead."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    logger.setLevel(level)


def _prepared(tfds, name: str, data_dir) -> tuple[str, bool]:
  """(directory the builder looks in, whether a prepared copy is there); creates nothing."""
  try:
    with quiet_lookup():
      builder = tfds.builder(name, data_dir=data_dir)
      return str(builder.data_dir), bool(builder.is_prepared())
  except Exception:  # pylint: disable=broad-except
    return (str(data_dir) if data_dir is not None else "<tfds default data_dir>"), False


def _read_data_source(ds, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All (image, label) records of a tfds random-access source -> (N, H, W, C), (N,) arrays.

  The image array is allocated once from the first record and filled chunk by chunk.
  """
  n = len(ds)
  if n == 0:
    raise ValueError(f"tfds dataset {name!r} split {split!r} is empty")
  first = ds[0]
  if not (isinstance(first, dict) and "image" in first and "label" in first):
    keys = list(first) if isinstance(first, dict) else type(first).__name__
    raise ValueError(f"tfds dataset {name!r} has no 'image'/'label' features (has {keys})")
  img0 = np.asarray(first["image"])
  images = np.empty((n,) + img0.shape, img0.dtype)
  labels = np.empty((n,), np.int64)
  for start in range(0, n, _CHUNK):
    keys = list(range(start, min(n, start + _CHUNK)))
    try:
      records = ds.__getitems__(keys)
    except (AttributeError, TypeError):  # tfds mock sources lack a working __getitems__
      records = [ds[k] for k in keys]
    for k, rec in zip(keys, records):
      images[k] = rec["image"]
      labels[k] = rec["label"]
  return images, labels


def _load_tfds_with_tf(tfds, name: str, split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
  """tf.data fallback for tfrecord-prepared data: the whole split as numpy arrays."""
  ds = tfds.load(name, split=split, data_dir=data_dir, download=False, batch_size=-1)
  arrays = tfds.as_numpy(ds)
  if "image" not in arrays or "label" not in arrays:
    raise ValueError(f"tfds dataset {name!r} has no 'image'/'label' features (has {list(arrays)})")
  return np.asarray(arrays["image"]), np.asarray(arrays["label"])


def load_tfds(name: str, split: str, data_dir=None) -> Source:
  """Loads a tfds split with `image`/`label` features into host memory, never downloading.

  Reads through `tfds.data_source(..., download=False)` (random access, no TensorFlow; needs
  array_record-prepared data); falls back to `tfds.load(..., download=False)` only when
  TensorFlow is importable. Raises `DatasetNotPreparedError` (one line) when the data are not
  there, and a one-line ValueError for an unknown dataset name.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core import registered  # pylint: disable=import-outside-toplevel

  try:
    with quiet_lookup():
      ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except registered.DatasetNotFoundError:
    raise ValueError(f"{name!r} is neither a registered tfds dataset nor an existing .npz file") from None
  except Exception as e:  # pylint: disable=broad-except
    # Which exception tfds raises for missing data varies (NotImplementedError, KeyError,
    # AssertionError): decide from the data directory itself.
    looked_in, prepared = _prepared(tfds, name, data_dir)
    if not prepared:
      raise not_prepared(tfds, name, split, data_dir, looked_in, "is not prepared") from None
    if not isinstance(e, NotImplementedError):
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise ValueError(f"tfds dataset {name!r} is prepared in {looked_in} but split {split!r} "
                       f"cannot be read ({type(e).__name__}: {first})") from e
    # Prepared, but in the tfrecord format, which only tf.data reads.
    if not tensorflow_available():
      raise not_prepared(tfds, name, split, data_dir, looked_in, "is prepared only in the tfrecord "
                          "format (readable only with TensorFlow, not installed)") from None
    images, labels = _load_tfds_with_tf(tfds, name, split, data_dir)
  else:
    images, labels = _read_data_source(ds, name, split)
  where = f"tfds {name!r} split {split!r}"
  images = _images_to_storage(_images_to_nhwc(images, where), where)
  return Source(images=images, labels=_labels_to_storage(labels, name, where), name=name)


def _is_npz_spec(spec: str) -> bool:
  """Whether `spec` is a file path: an existing file, a name ending in .npz, or a path that
  starts with "/", "./", "../" or "~", or has a file extension (tfds names such as
  "mnist_corrupted/shot_noise" may contain "/", so a slash alone does not make a path)."""
  return (spec.lower().endswith(".npz") or os.path.isfile(spec)
          or spec.startswith(("/", "./", "../", "~")) or bool(os.path.splitext(spec)[1]))


def is_tfds_name(spec: str) -> bool:
  """Whether `load_source` reads `spec` through tfds (else it is an .npz path)."""
  return not _is_npz_spec(os.path.expanduser(os.fspath(spec)))


def load_source(spec: str, split: str, data_dir=None) -> Source:
  """One split of a source given by `spec`: a `.npz` path or a tfds dataset name.

  Args:
    spec: path of an .npz with x_train, y_train, x_test, y_test, or a tfds name ("mnist",
      "svhn_cropped", "fashion_mnist", any dataset with image/label features).
    split: "train" or "test" (tfds names also accept any tfds split string, e.g. "train[:10%]").
    data_dir: tfds data directory (None: tfds's default); ignored for .npz files.

  Returns:
    A `Source` with images (N, H, W, C) uint8 or float32 in [0, 1] and labels (N,) int32.
  """
  spec = os.path.expanduser(os.fspath(spec))
  if _is_npz_spec(spec):
    return load_npz(spec, split)
  return load_tfds(spec, split, data_dir=data_dir)


def load_sources(specs: Sequence[str], split: str, data_dir=None) -> list[Source]:
  """`load_source` for each spec (one per modality)."""
  return [load_source(s, split, data_dir=data_dir) for s in specs]
