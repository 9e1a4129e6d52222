"""Digit classifiers for the coherence metrics (official helper.py architecture).

Architecture (PyTorch layer order kept; NHWC here):

  Conv 1→10 (or 3→10) k5 → max-pool 2 → ReLU
  Conv 10→20 k5 → channel dropout 0.5 → max-pool 2 → ReLU
  flatten (320 for 28×28, 500 for 32×32) → Dense 50 + ReLU → dropout 0.5 → Dense 10

21,840 parameters for MNIST (28×28×1), 31,340 for SVHN-shaped inputs (32×32×3). Any
(H, W, C) with H, W >= 16 works; the flatten size follows from the shape. Initialisation is
flax's default (not PyTorch's): these are our own classifiers, not a port of trained weights.

Training recipes (`recipe`):

* ``"source"`` (default): a few epochs over the source's own train split. This is the paper's
  reading ("off-the-shelf digit classifiers of the original MNIST and SVHN datasets"). Default:
  5 epochs, raised to at least 1,500 steps for small sources (MNIST 7 epochs, SVHN 6, the
  7,291-image usps_colour stand-in 52: with 5 epochs = 145 steps it reaches only ~71%).
* ``"paired"``: the official code's recipe, 30 epochs over the *paired* train set (each image
  appears once per partner; MNIST-SVHN: 1,682,040 pairs, 6,571 batches an epoch).

Both use Adam(1e-3), batch 256, inputs in [0, 1] without normalisation, cross-entropy on
log-softmax outputs. The test accuracy is measured on the source's own test split.

Cache: ``<cache_dir>/<source-key>/`` (default cache_dir ``$MMVAE_JAX_CACHE/classifiers`` or
``~/.cache/mmvae_jax/classifiers``) holds ``params.msgpack`` (flax msgpack of the params),
``params.sha256`` (sha256 of those bytes, ``sha256sum`` format) and ``meta.json`` (test accuracy,
recipe, epochs, seed, shapes). The source key names the source, its image shape, the recipe,
epochs and seed and a fingerprint of the training data, so a different recipe or different data
never reuses a stale classifier. A cached classifier is reused unless a file is missing, the
checksum does not match the params file, or ``retrain=True``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmvae_jax.evaluation.common import as_float, padded_rows

NUM_CLASSES = 10
RECIPES = ("source", "paired")
DEFAULT_EPOCHS = {"source": 5, "paired": 30}
MIN_DEFAULT_STEPS = 1500  # recipe "source" with default epochs: at least this many steps
MIN_SIDE = 16  # smallest H, W for which both k5 convolutions and pools leave >= 1 pixel


class DigitClassifier(nn.Module):
  """The official digit classifier: x (B, H, W, C) in [0, 1] -> logits (B, 10)."""
  num_classes: int = NUM_CLASSES
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"DigitClassifier expects (B, H, W, C) images, got shape {x.shape}")
    if min(x.shape[1], x.shape[2]) < MIN_SIDE:
      raise ValueError(f"DigitClassifier needs images of at least {MIN_SIDE}x{MIN_SIDE}, "
                       f"got {x.shape[1]}x{x.shape[2]}")
    h = nn.Conv(10, (5, 5), padding="VALID", name="conv1")(x)
    h = nn.relu(nn.max_pool(h, (2, 2), strides=(2, 2)))
    h = nn.Conv(20, (5, 5), padding="VALID", name="conv2")(h)
    # Channel dropout (PyTorch Dropout2d): one Bernoulli per (example, channel).
    h = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(h)
    h = nn.relu(nn.max_pool(h, (2, 2), strides=(2, 2)))
    h = h.reshape(h.shape[0], -1)
    h = nn.relu(nn.Dense(50, name="fc1")(h))
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    return nn.Dense(self.num_classes, name="fc2")(h)


def num_params(params) -> int:
  """Number of scalars in a params pytree (arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


@dataclasses.dataclass(frozen=True, eq=False)
class Classifier:
  """A trained classifier: any flax module mapping (B, *input_shape) to (B, classes) logits.

  Attributes:
    module: the flax module (its ``__call__(x)`` must work without extra arguments).
    params: its parameters (the "params" collection; ``{}`` for a parameter-free module).
    test_accuracy: accuracy (%) on the source's test split, when known.
    checksum: sha256 hex digest of the serialized params, when saved.
    path: the cache directory it was loaded from or saved to.
    trained: True when it was trained by the call that returned it, False when loaded.
    meta: the cache's meta.json contents.
  """
  module: nn.Module
  params: Any
  test_accuracy: Optional[float] = None
  checksum: Optional[str] = None
  path: Optional[str] = None
  trained: bool = False
  meta: dict = dataclasses.field(default_factory=dict)

  def logits(self, params, x: jax.Array) -> jax.Array:
    """Pure, jittable: (B, *input_shape) -> (B, classes); eval mode (no dropout)."""
    return self.module.apply({"params": params}, x)

  def predict(self, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """(N, *input_shape) -> (N,) int32 predicted classes, in batches."""
    return predict(self, x, batch_size)


def predict(classifier: Classifier, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
  """Predicted classes (N,) int32 of images x (N, H, W, C) (float32 in [0, 1] or uint8), in
  padded batches (one compile)."""
  fn = jax.jit(lambda p, xb: jnp.argmax(classifier.logits(p, xb), axis=-1))
  n = len(x)
  out = np.zeros((n,), np.int32)
  for start in range(0, n, batch_size):
    xb = as_float(x[start:start + batch_size])
    real = len(xb)
    if real < batch_size and n > batch_size:
      xb = np.concatenate([xb, np.repeat(xb[:1], batch_size - real, axis=0)])
    out[start:start + real] = np.asarray(fn(classifier.params, xb))[:real]
  return out


def accuracy(classifier: Classifier, x: np.ndarray, y: np.ndarray, batch_size: int = 1024
             ) -> float:
  """Accuracy (%) of `classifier` on images x (N, H, W, C) with labels y (N,)."""
  if len(x) == 0:
    raise ValueError("accuracy of an empty test set")
  return float(100.0 * np.mean(predict(classifier, x, batch_size) == np.asarray(y)))


# ---------------------------------------------------------------------------------------------
# Training.

Fetch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def train_classifier(fetch: Fetch, num_train: int, input_shape: tuple[int, ...], *,
                     epochs: int, batch_size: int = 256, lr: float = 1e-3, seed: int = 0,
                     module: nn.Module | None = None, log: Callable[[str], None] | None = None
                     ) -> Any:
  """Trains a `DigitClassifier` (Adam, cross-entropy) and returns its params.

  Args:
    fetch: rows (b,) int -> (images (b, *input_shape) float32 in [0, 1], labels (b,) int).
    num_train: number of training rows (rows are 0..num_train-1).
    input_shape: (H, W, C) of one image.
    epochs: passes over the rows, each in a fresh random order (seed, epoch).
    batch_size: B; the last batch of an epoch is padded and its padding masked out.
  Returns:
    the "params" pytree.
  """
  if epochs < 1 or num_train < 1 or batch_size < 1:
    raise ValueError(f"train_classifier: epochs, num_train and batch_size must be >= 1, got "
                     f"{epochs}, {num_train}, {batch_size}")
  module = DigitClassifier() if module is None else module
  key = jax.random.key(seed)
  params = module.init(key, jnp.zeros((1,) + tuple(input_shape), jnp.float32))["params"]
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, x, y, mask, rng):
    def loss_fn(p):
      logits = module.apply({"params": p}, x, train=True, rngs={"dropout": rng})
      ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
      return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  bs = min(batch_size, num_train)
  step_index = 0
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(num_train)
    losses = []
    for start in range(0, num_train, bs):
      rows, mask = padded_rows(order[start:start + bs], bs)
      x, y = fetch(rows)
      params, opt_state, loss = step(params, opt_state, np.asarray(x, np.float32),
                                     np.asarray(y, np.int32), mask,
                                     jax.random.fold_in(key, step_index))
      losses.append(loss)
      step_index += 1
    if log is not None:
      log(f"classifier epoch {epoch + 1}/{epochs}: loss {float(np.mean(jax.device_get(losses))):.4f}")
  return jax.device_get(params)


# ---------------------------------------------------------------------------------------------
# Serialization and the cache.


def serialize(params) -> bytes:
  return flax.serialization.to_bytes(jax.device_get(params))


def checksum(params) -> str:
  """sha256 hex digest of the serialized (flax msgpack) params."""
  return hashlib.sha256(serialize(params)).hexdigest()


def default_cache_dir() -> str:
  root = os.environ.get("MMVAE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "mmvae_jax")
  return os.path.join(root, "classifiers")


def data_fingerprint(*arrays: np.ndarray) -> str:
  """sha256 hex digest over the shapes, dtypes and bytes of `arrays`."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()


def source_key(name: str, shape: tuple[int, ...], recipe: str, epochs: int, seed: int,
               fingerprint: str) -> str:
  """Cache folder name, e.g. "usps_colour-32x32x3-source-e5-s0-1a2b3c4d5e"."""
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "source"
  dims = "x".join(str(int(s)) for s in shape)
  return f"{slug}-{dims}-{recipe}-e{epochs}-s{seed}-{fingerprint[:10]}"


PARAMS_FILE, CHECKSUM_FILE, META_FILE = "params.msgpack", "params.sha256", "meta.json"


def save(path: str, params, meta: dict) -> tuple[str, dict]:
  """Writes params, their sha256 and meta.json into `path` (atomically per file).

  Returns:
    (sha256 hex digest of the params file, the meta written).
  """
  os.makedirs(path, exist_ok=True)
  blob = serialize(params)
  digest = hashlib.sha256(blob).hexdigest()
  meta = dict(meta, sha256=digest, num_params=num_params(params))
  for fname, content in ((PARAMS_FILE, blob), (CHECKSUM_FILE, f"{digest}  {PARAMS_FILE}\n".encode()),
                         (META_FILE, json.dumps(meta, indent=2).encode())):
    tmp = os.path.join(path, fname + ".tmp")
    with open(tmp, "wb") as f:
      f.write(content)
    os.replace(tmp, os.path.join(path, fname))
  return digest, meta


def load(path: str) -> tuple[Any, dict, str] | None:
  """(params, meta, digest) from a cache folder, or None when a file is missing, unreadable or
  the params' sha256 differs from the stored checksum."""
  try:
    with open(os.path.join(path, PARAMS_FILE), "rb") as f:
      blob = f.read()
    with open(os.path.join(path, CHECKSUM_FILE)) as f:
      stored = f.read().split()
    with open(os.path.join(path, META_FILE)) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  digest = hashlib.sha256(blob).hexdigest()
  if not stored or stored[0] != digest:
    return None
  try:
    params = flax.serialization.msgpack_restore(blob)
  except Exception:  # pylint: disable=broad-except  # a corrupt blob whose digest was rewritten
    return None
  return jax.tree.map(jnp.asarray, params), meta, digest


def default_epochs(recipe: str, num_train: int, batch_size: int = 256) -> int:
  """Recipe "paired": 30. Recipe "source": 5, or more so that training takes at least
  MIN_DEFAULT_STEPS steps of `batch_size`."""
  if recipe == "paired":
    return DEFAULT_EPOCHS["paired"]
  steps_per_epoch = max(1, -(-int(num_train) // int(batch_size)))
  return max(DEFAULT_EPOCHS["source"], -(-MIN_DEFAULT_STEPS // steps_per_epoch))


def load_or_train(name: str, train_x: np.ndarray | None, train_y: np.ndarray | None,
                  test_x: np.ndarray, test_y: np.ndarray, *, recipe: str = "source",
                  epochs: int | None = None, seed: int = 0, batch_size: int = 256,
                  lr: float = 1e-3, cache_dir: str | None = None, retrain: bool = False,
                  fetch: Fetch | None = None, num_train: int | None = None,
                  fingerprint: str | None = None, log: Callable[[str], None] | None = None
                  ) -> Classifier:
  """The cached classifier of one source, trained (and cached) when needed.

  Args:
    name: source name (e.g. "mnist", "usps_colour"), used in the cache key.
    train_x, train_y: (N, H, W, C) float32 in [0, 1] or uint8 images and (N,) labels of the
      training rows. May be None when `fetch` and `num_train` are given (e.g. the paired set).
    test_x, test_y: the source's test split, for the reported accuracy.
    recipe: "source" or "paired" (module docstring); only names the cache entry and picks the
      default epochs — the rows come from train_x/train_y or `fetch`.
    epochs: default `default_epochs` (recipe "source": 5, at least 1,500 steps; "paired": 30).
    cache_dir: default `default_cache_dir()`.
    retrain: train even when a valid cached classifier exists.
    fetch, num_train: row access for data not held as one array.
    fingerprint: data fingerprint for the cache key (default: computed from train_x, train_y).
  Returns:
    a `Classifier` whose `trained` says whether this call trained it.
  """
  if recipe not in RECIPES:
    raise ValueError(f"unknown classifier recipe {recipe!r}: choose {' or '.join(RECIPES)}")
  if fetch is None:
    if train_x is None or train_y is None:
      raise ValueError("load_or_train needs train_x/train_y or fetch/num_train")
    fetch = lambda rows: (as_float(train_x[rows]), train_y[rows])
    num_train = len(train_x)
  elif num_train is None:
    raise ValueError("load_or_train: pass num_train with fetch")
  epochs = default_epochs(recipe, num_train, batch_size) if epochs is None else int(epochs)
  shape = tuple(int(s) for s in test_x.shape[1:])
  if fingerprint is None:
    if train_x is None:
      raise ValueError("load_or_train: pass fingerprint when training through fetch")
    fingerprint = data_fingerprint(train_x, np.asarray(train_y))
  path = os.path.join(cache_dir or default_cache_dir(),
                      source_key(name, shape, recipe, epochs, seed, fingerprint))
  module = DigitClassifier()
  if not retrain:
    cached = load(path)
    if cached is not None:
      params, meta, digest = cached
      return Classifier(module=module, params=params, test_accuracy=meta.get("test_accuracy"),
                        checksum=digest, path=path, trained=False, meta=meta)
  start = time.perf_counter()
  params = train_classifier(fetch, num_train, shape, epochs=epochs, batch_size=batch_size, lr=lr,
                            seed=seed, module=module, log=log)
  clf = Classifier(module=module, params=jax.tree.map(jnp.asarray, params))
  acc = accuracy(clf, test_x, test_y)
  meta = {"source": name, "input_shape": list(shape), "recipe": recipe, "epochs": epochs,
          "seed": seed, "batch_size": batch_size, "lr": lr, "num_train": int(num_train),
          "num_test": int(len(test_x)), "test_accuracy": acc, "data_fingerprint": fingerprint,
          "train_seconds": round(time.perf_counter() - start, 2)}
  digest, meta = save(path, params, meta)
  return dataclasses.replace(clf, test_accuracy=acc, checksum=digest, path=path, trained=True,
                             meta=meta)


def for_source(train_source, test_source, **kw) -> Classifier:
  """`load_or_train` on a `mmvae_jax.data.Source`'s own train split (recipe "source")."""
  return load_or_train(train_source.name, train_source.images, train_source.labels,
                       test_source.images, test_source.labels, recipe="source", **kw)


def for_paired(paired, modality: int, test_source, **kw) -> Classifier:
  """`load_or_train` on modality `modality` of a `PairedDataset` (the official recipe "paired")."""
  src = paired.sources[modality]
  idx = paired.indices[modality]
  fetch = lambda rows: (src.get(idx[rows]), paired.labels[rows])
  fp = data_fingerprint(src.images, src.labels, idx)
  return load_or_train(src.name, None, None, test_source.images, test_source.labels,
                       recipe="paired", fetch=fetch, num_train=len(paired), fingerprint=fp, **kw)
