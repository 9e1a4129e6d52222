"""The configuration of a run: one flat dataclass, the whole of it stored in run.json.

`RunConfig` holds every value a run depends on (experiment, model, data, training); the
experiment scripts fill it from flags (`mmvae_jax.cli`), `mmvae_jax.runs.load_run` reads it back,
and `RunConfig.train_config()` is the part the training loop reads (`mmvae_jax.train.TrainConfig`).
Experiment-specific values (CUB's caption files, say) live in ``options``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from mmvae_jax.models.base import DEFAULT_ESTIMATOR

SCHEMA = 2  # version of run.json


@dataclasses.dataclass
class RunConfig:
  """Everything a run depends on. Defaults: the MNIST-SVHN headline run of the paper."""
  experiment: str = "mnist_svhn"
  model: str = "mmvae"
  # model
  latent_dim: int = 20
  private_dim: int = 10           # private latent per modality (mmvae_plus)
  beta: float = 1.0               # β on the regularisation terms (mmvae_plus)
  learn_prior: bool = True
  llik_scaling: float = 0.0       # 0: the experiment's λ rule; else λ of the first modality
  expert_scale: str = "logvar"    # scale of Gaussian experts (product-of-experts models)
  decoder_impl: str = "auto"      # transposed-convolution formulation (not in the parameters)
  # data
  sources: dict = dataclasses.field(default_factory=dict)  # {modality: tfds name or .npz}
  data_dir: str | None = None
  partners: int = 30
  options: dict = dataclasses.field(default_factory=dict)  # experiment-specific values
  missing: str = ""               # incomplete training data: "name:fraction,..." hidden
  missing_mode: str = "keep"      # keep the incomplete examples, or drop them
  # training (mmvae_jax.train.TrainConfig)
  k: int = 30
  estimator: str = DEFAULT_ESTIMATOR
  objective: str = "auto"
  looser: bool = True
  batch_size: int = 128
  epochs: int = 30
  max_steps: int = 0
  lr: float = 1e-3
  seed: int = 1
  eval_every: int = 0
  eval_batches: int = 0
  eval_batch_size: int = 0
  checkpoint_every: int = 1000
  log_every: int = 10
  keep_checkpoints: int = 3
  figures: bool = True

  def train_config(self):
    """The `mmvae_jax.train.TrainConfig` of this run."""
    from mmvae_jax.train import TrainConfig
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
    """A config from run.json's "config" (unknown keys: ValueError naming them)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown config entries {unknown}")
    return cls(**values)

  def validate(self) -> None:
    """ValueError with a one-line message for the first impossible value (devices aside)."""
    self.train_config().validate(1)
    if self.latent_dim < 1:
      raise ValueError(f"--latent_dim must be >= 1, got {self.latent_dim}")
    if self.private_dim < 1:
      raise ValueError(f"--private_dim must be >= 1, got {self.private_dim}")
    if self.beta <= 0:
      raise ValueError(f"--beta must be > 0, got {self.beta}")
    if self.partners < 1:
      raise ValueError(f"--partners must be >= 1, got {self.partners}")
    if self.llik_scaling < 0:
      raise ValueError(f"--llik_scaling must be >= 0, got {self.llik_scaling}")
    if self.missing_fractions() and self.model == "mmvae_plus":
      raise ValueError("--missing: model mmvae_plus does not train on incomplete data yet: "
                       "choose --model=mmvae, mvae or mopoe")
    if self.model == "mmvae_plus" and self.estimator == "dreg_moe":
      raise ValueError("--estimator=dreg_moe is derived for the MMVAE's mixture bound, not "
                       "for MMVAE+'s: use --estimator=iwae, dreg or legacy")

  def missing_fractions(self) -> dict[str, float]:
    """{modality: fraction hidden} of `missing` (ValueError, one line, when it is malformed,
    names a modality the run's model does not read, or `missing_mode` is unknown)."""
    from mmvae_jax.data import missing as missing_lib
    if self.missing_mode not in missing_lib.MODES:
      raise ValueError(f"--missing_mode must be one of {', '.join(missing_lib.MODES)}, got "
                       f"{self.missing_mode!r}")
    fractions = missing_lib.parse_missing(self.missing)
    if fractions and self.estimator == "dreg_moe":
      raise ValueError("--estimator=dreg_moe does not take incomplete data (--missing) yet: "
                       "use --estimator=iwae (unbiased) or dreg")
    if fractions:
      from mmvae_jax import experiments, models
      exp = experiments.get(self.experiment)
      unknown = [n for n in fractions if n not in exp.modalities]
      if unknown:
        raise ValueError(f"--missing: unknown modality {unknown[0]!r}: choose among "
                         f"{', '.join(exp.modalities)}")
      used = models.used_modalities(self.model, exp.modalities)
      unused = [n for n in fractions if n not in used]
      if unused:
        raise ValueError(f"--missing: model {self.model} does not read {unused[0]!r}: hide "
                         f"{', '.join(used)} or choose another model")
    return fractions
