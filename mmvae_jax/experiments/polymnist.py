"""PolyMNIST (Sutter, Daunhawer, Vogt 2021): five 28×28 RGB modalities m0 ... m4, each an MNIST
digit on its own background, read from the folder layout its authors distribute
(`mmvae_jax.data.polymnist`): ``--data_dir=PolyMNIST`` holding train/ and test/.

Tuples are the distributed ones (aligned by file name), not re-paired. Networks follow the
image shape (`mmvae_jax.experiments.digits.digit_networks`: 28×28×3 gets the MLP of the MNIST
widths); every modality has the same size, so λ = 1 for all; Laplace likelihoods of scale 0.75
and Laplace experts with softmax·D + 1e-6 scales, as the other digit experiments. Evaluation is
the digits' (a classifier per modality trained on its own train split, coherence, probe,
likelihoods, figures).
"""
from __future__ import annotations

import dataclasses

from mmvae_jax import models
from mmvae_jax.config import RunConfig
from mmvae_jax.experiments.base import Data, Experiment
from mmvae_jax.experiments.digits import NUM_CLASSES, digit_modalities

MODALITIES = tuple(f"m{i}" for i in range(5))


@dataclasses.dataclass(frozen=True)
class PolyMNISTExperiment(Experiment):
  """The PolyMNIST folder at ``config.data_dir``; the option ``max_tuples`` (0: all) reads only
  the first tuples of each split (a quick look at a large folder)."""

  def option_flags(self) -> dict:
    return {"max_tuples": (0, "Read only the first N tuples of each split (0: all).")}

  def build_data(self, config: RunConfig, *, workdir: str | None = None,
                 resume: bool = False) -> Data:
    from mmvae_jax.data import polymnist
    del workdir, resume
    root = config.data_dir
    if not root:
      raise ValueError("PolyMNIST needs --data_dir=<folder holding train/ and test/ with "
                       "m0 ... m4 subfolders>")
    used = self.used_modalities(config)
    for split in polymnist.SPLITS:
      found = polymnist.modality_folders(root, split)
      missing = [m for m in used if m not in found]
      if missing:
        raise ValueError(f"{root}/{split}: modality folder(s) {', '.join(missing)} missing "
                         f"(found {', '.join(found)})")
    limit = int((config.options or {}).get("max_tuples", 0)) or None
    out = {}
    for split in polymnist.SPLITS:
      srcs = polymnist.load_split(root, split, used, limit=limit)
      bad = (srcs[0].labels < 0) | (srcs[0].labels >= NUM_CLASSES)
      if bad.any():
        raise ValueError(f"{root}/{split}: {int(bad.sum())} label(s) outside the digits "
                         f"0..{NUM_CLASSES - 1}")
      out[split] = srcs
    for m, tr, te in zip(used, out["train"], out["test"]):
      if tr.image_shape != te.image_shape:
        raise ValueError(f"{m}: train images {tr.image_shape} and test images "
                         f"{te.image_shape} differ in shape")
    train = polymnist.AlignedDataset(out["train"])
    test = polymnist.AlignedDataset(out["test"])
    desc = {"sources": {m: f"{root}/{{train,test}}/{m}" for m in used}, "root": root,
            "shapes": {m: list(s.image_shape) for m, s in zip(used, out["train"])},
            "train_pairs": len(train), "test_pairs": len(test), "partners": 1}
    return Data(train=train, test=test, description=desc,
                extras={"train_sources": out["train"], "test_sources": out["test"]})

  def build_modalities(self, config: RunConfig, data: Data) -> tuple[models.Modality, ...]:
    shapes = {n: tuple(data.shapes[n]) for n in self.used_modalities(config)}
    return digit_modalities(shapes, self.network_latent_dim(config),
                            llik_scaling=config.llik_scaling, decoder_impl=config.decoder_impl)


POLYMNIST = PolyMNISTExperiment(name="polymnist", modalities=MODALITIES)
