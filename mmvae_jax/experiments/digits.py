"""Digit experiments: image sources paired by digit label, with the paper's networks.

"mnist_svhn"    modalities mnist (28×28×1), svhn (32×32×3): the paper's headline experiment.
"three_digits"  modalities mnist, usps_colour (32×32×3), usps (16×16×1): M = 3, offline data.

Each modality's source is a tfds name or an ``.npz`` file (x_train, y_train, x_test, y_test);
a relative ``.npz`` name not found from the working directory is looked up in ``data_dir``.
Networks follow the data shape: 28×28×1 gets the MNIST MLP of the paper, 32×32×3 its SVHN CNN,
any other shape an MLP of the MNIST widths. λ_d = (largest datum size) / (datum size d), which
is 3072/784 for MNIST beside SVHN; a nonzero ``llik_scaling`` sets the first modality's λ instead.
Every likelihood is Laplace with scale 0.75; experts are Laplace with softmax·D + 1e-6 scales.
"""
from __future__ import annotations

import dataclasses
import math
import os

from mmvae_jax import models
from mmvae_jax.config import RunConfig
from mmvae_jax.experiments.base import Data, Experiment

NUM_CLASSES = 10  # digit labels 0..9 (pairing, classifiers and the probe use them)
MNIST_SHAPE = (28, 28, 1)
SVHN_SHAPE = (32, 32, 3)


def resolve_source(spec: str, data_dir: str | None, *roots: str) -> str:
  """An .npz `spec` as given when it exists, else under `data_dir` or one of `roots`; a tfds
  name is returned unchanged."""
  if not spec or not spec.lower().endswith(".npz") or os.path.isabs(spec) or os.path.exists(spec):
    return spec
  for root in (data_dir, *roots):
    if root and os.path.exists(os.path.join(root, spec)):
      return os.path.join(root, spec)
  return spec


def digit_networks(shape, latent_dim: int, decoder_impl: str = "auto"):
  """(encoder, decoder) for images of `shape`: the paper's MNIST MLP for 28×28×1, its SVHN CNN
  for 32×32×3, an MLP of the MNIST widths otherwise."""
  from mmvae_jax import networks, networks_generic
  shape = tuple(shape)
  if shape == MNIST_SHAPE:
    return networks.MnistEncoder(latent_dim=latent_dim), networks.MnistDecoder(latent_dim=latent_dim)
  if shape == SVHN_SHAPE:
    return (networks.SvhnEncoder(latent_dim=latent_dim),
            networks.SvhnDecoder(latent_dim=latent_dim, impl=decoder_impl))
  return (networks_generic.MLPEncoder(latent_dim=latent_dim),
          networks_generic.MLPDecoder(data_shape=shape))


def digit_modalities(shapes: dict, latent_dim: int, *, llik_scaling: float = 0.0,
                     decoder_impl: str = "auto") -> tuple[models.Modality, ...]:
  """One Laplace-likelihood modality per {name: shape} (in order), networks by shape, λ by size."""
  sizes = {n: math.prod(s) for n, s in shapes.items()}
  largest = max(sizes.values())
  mods = []
  for i, (name, shape) in enumerate(shapes.items()):
    lam = llik_scaling if (i == 0 and llik_scaling) else largest / sizes[name]
    enc, dec = digit_networks(shape, latent_dim, decoder_impl)
    mods.append(models.Modality(name=name, encoder=enc, decoder=dec, data_shape=tuple(shape),
                                llik_scale=float(lam)))
  return tuple(mods)


def mnist_svhn_modalities(latent_dim: int = 20, *, llik_scaling: float = 0.0,
                          decoder_impl: str = "auto", shapes: dict | None = None):
  """The MNIST and SVHN modalities of the paper (λ_MNIST = 3072/784 unless `llik_scaling`)."""
  shapes = {"mnist": MNIST_SHAPE, "svhn": SVHN_SHAPE, **(shapes or {})}
  return digit_modalities(shapes, latent_dim, llik_scaling=llik_scaling, decoder_impl=decoder_impl)


@dataclasses.dataclass(frozen=True)
class DigitsExperiment(Experiment):
  """Sources paired by label (`mmvae_jax.data.PairedDataset`), `partners` per instance."""
  default_sources: tuple[tuple[str, str], ...] = ()

  def sources(self, config: RunConfig) -> dict:
    return {**dict(self.default_sources), **(config.sources or {})}

  def _paths(self, config: RunConfig, workdir: str | None) -> list[str]:
    """The source of each used modality: an .npz path resolved as `build_data` reads it, or a
    tfds name."""
    specs = self.sources(config)
    roots = [os.path.dirname(os.path.abspath(workdir))] if workdir else []
    return [resolve_source(specs[n], config.data_dir, *roots) for n in self.used_modalities(config)]

  def tfds_datasets(self, config: RunConfig, *, workdir: str | None = None) -> tuple[str, ...]:
    from mmvae_jax.data import sources as sources_lib
    return tuple(dict.fromkeys(p for p in self._paths(config, workdir)
                               if sources_lib.is_tfds_name(p)))

  def build_data(self, config: RunConfig, *, workdir: str | None = None,
                 resume: bool = False) -> Data:
    from mmvae_jax import data as data_lib
    used = self.used_modalities(config)
    specs = self.sources(config)
    paths = self._paths(config, workdir)
    train_src = data_lib.load_sources(paths, "train", config.data_dir)
    test_src = data_lib.load_sources(paths, "test", config.data_dir)
    for n, path, tr, te in zip(used, paths, train_src, test_src):
      for split, src in (("train", tr), ("test", te)):
        if not len(src):
          raise ValueError(f"{path}: the {split} split of the {n} modality is empty")
        bad = (src.labels < 0) | (src.labels >= NUM_CLASSES)
        if bad.any():
          raise ValueError(f"{path}: {int(bad.sum())} {split} label(s) outside the digits "
                           f"0..{NUM_CLASSES - 1} (e.g. {int(src.labels[bad][0])})")
      if tr.image_shape != te.image_shape:
        raise ValueError(f"{n}: train images {tr.image_shape} and test images "
                         f"{te.image_shape} differ in shape")
    # One source is visited once per epoch; several are paired with `partners` per instance.
    partners = config.partners if len(used) > 1 else 1
    train = data_lib.PairedDataset(train_src, partners=partners, seed=config.seed)
    test = data_lib.PairedDataset(test_src, partners=partners, seed=config.seed)
    if not len(train) or not len(test):
      raise ValueError(f"the sources {', '.join(paths)} give {len(train)} train / {len(test)} "
                       f"test pairs: they share no class")
    desc = {"sources": {n: specs[n] for n in used}, "paths": dict(zip(used, paths)),
            "shapes": {n: list(s.image_shape) for n, s in zip(used, train_src)},
            "train_pairs": len(train), "test_pairs": len(test), "partners": partners}
    return Data(train=train, test=test, description=desc,
                extras={"train_sources": train_src, "test_sources": test_src})

  def build_modalities(self, config: RunConfig, data: Data) -> tuple[models.Modality, ...]:
    shapes = {n: tuple(data.shapes[n]) for n in self.used_modalities(config)}
    return digit_modalities(shapes, self.network_latent_dim(config),
                            llik_scaling=config.llik_scaling,
                            decoder_impl=config.decoder_impl)

  def is_genuine(self, name: str, spec: str) -> bool:
    """Whether `spec` is the dataset the paper used for modality `name` (else a stand-in)."""
    stem = os.path.basename(str(spec).rstrip("/"))
    stem = (stem[:-4] if stem.lower().endswith(".npz") else stem).lower()
    return {"mnist": stem == "mnist", "svhn": "svhn" in stem}.get(name, True)


# The paper's numbers for MNIST-SVHN (Table 3's joint column is missing in the paper).
MNIST_SVHN_PAPER = {
    "table1": {"MMVAE": {"mnist": 91.3, "svhn": 68.0},
               "MVAE (single)": {"mnist": 95.7, "svhn": 9.1},
               "MVAE (both)": {"mnist": 94.9, "svhn": 90.1},
               "single-VAE": {"mnist": 85.3, "svhn": 20.7}},
    "table2": {"MMVAE": {"joint": 42.1, "mnist->svhn": 86.4, "svhn->mnist": 69.1},
               "MVAE": {"joint": 12.7, "mnist->svhn": 9.5, "svhn->mnist": 9.3}},
    "table3": {"MMVAE": {"mnist,svhn": [None, 868.76, 868.37, 628.31],
                         "svhn,mnist": [None, 3441.01, 3441.01, 2337.56]},
               "MVAE": {"mnist,svhn": [None, -176.68, -107.46, -778.20],
                        "svhn,mnist": [None, 3395.12, 3536.86, -12747.50]}},
}

MNIST_SVHN = DigitsExperiment(
    name="mnist_svhn", modalities=("mnist", "svhn"),
    default_sources=(("mnist", "mnist"), ("svhn", "svhn_cropped")), paper=MNIST_SVHN_PAPER)

THREE_DIGITS = DigitsExperiment(
    name="three_digits", modalities=("mnist", "usps_colour", "usps"),
    default_sources=(("mnist", "mnist.npz"), ("usps_colour", "usps_colour.npz"),
                     ("usps", "usps.npz")))
