"""The experiment interface: data → modalities → model, from a `RunConfig`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mmvae_jax import models
from mmvae_jax.config import RunConfig


@dataclasses.dataclass
class Data:
  """What `Experiment.build_data` returns.

  Attributes:
    train, test: paired datasets (``len``, ``gather(rows) -> (xs, labels)``) whose modalities
      are the model's, in order.
    description: JSON-able facts about the data (sizes, sources, split), stored in run.json.
    extras: experiment-specific objects (e.g. CUB's vocabulary).
  """
  train: Any
  test: Any
  description: dict
  extras: dict = dataclasses.field(default_factory=dict)

  @property
  def shapes(self) -> dict:
    return dict(self.description.get("shapes", {}))


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A dataset pairing and its networks.

  Attributes:
    name: registry name.
    modalities: the modality names, in batch order.
    defaults: `RunConfig` values this experiment changes (e.g. CUB's K = 50).
    paper: the paper's reference numbers for this experiment ({} when it has none).
    evaluation: "digits" (classifier coherence, probe, likelihoods, figures) or "cca" (CUB).
  """
  name: str
  modalities: tuple[str, ...]
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  paper: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  evaluation: str = "digits"

  # -- what a subclass provides --------------------------------------------------------------

  def option_flags(self) -> dict:
    """{name: (default, help)} of the experiment's own settings (RunConfig.options)."""
    return {}

  def build_data(self, config: RunConfig, *, workdir: str | None = None,
                 resume: bool = False) -> Data:
    raise NotImplementedError

  def build_modalities(self, config: RunConfig, data: Data) -> tuple[models.Modality, ...]:
    raise NotImplementedError

  def model_options(self, config: RunConfig) -> models.ModelOptions:
    return models.ModelOptions(latent_dim=config.latent_dim, learn_prior=config.learn_prior,
                               expert_scale=config.expert_scale, private_dim=config.private_dim,
                               beta=config.beta)

  def network_latent_dim(self, config: RunConfig) -> int:
    """The latent width of the networks `config.model` needs (Dz + Dw for MMVAE+)."""
    return models.network_latent_dim(config.model, self.model_options(config))

  def tfds_datasets(self, config: RunConfig, *, workdir: str | None = None) -> tuple[str, ...]:
    """The tfds datasets `build_data` reads for `config` (the scripts' --download prepares
    them first); none by default."""
    del config, workdir
    return ()

  def training_set(self, config: RunConfig, data: Data):
    """The set the model trains on: ``data.train``, with the modalities of ``config.missing``
    hidden in part of the examples (`mmvae_jax.data.missing.hide_modalities`, seeded by
    ``config.seed``) and the incomplete examples kept or dropped (``config.missing_mode``).
    Records what was hidden in ``data.description["missing"]``. Evaluation always uses the
    complete ``data.train`` and ``data.test``."""
    fractions = config.missing_fractions()
    if not fractions:
      return data.train
    from mmvae_jax.data import missing as missing_lib
    train, desc = missing_lib.hide_modalities(data.train, self.used_modalities(config),
                                              fractions, config.seed, config.missing_mode)
    data.description["missing"] = desc
    return train

  def write_files(self, data: Data, workdir: str) -> None:
    """Writes what the experiment keeps beside the checkpoints (called after every check)."""
    del data, workdir

  def prepare_params(self, model, params, data: Data, config: RunConfig):
    """Parameters as evaluation needs them (e.g. with population BatchNorm statistics)."""
    del model, data, config
    return params

  # -- shared --------------------------------------------------------------------------------

  def config(self, **values) -> RunConfig:
    """A `RunConfig` of this experiment: its defaults, then `values`."""
    return RunConfig(experiment=self.name, **{**dict(self.defaults), **values})

  def used_modalities(self, config: RunConfig) -> tuple[str, ...]:
    return models.used_modalities(config.model, self.modalities)

  def model_names(self) -> list[str]:
    return models.names(self.modalities)

  def build_model(self, config: RunConfig, data: Data):
    """The model `config.model` over the modalities the data hold."""
    return models.build(config.model, self.build_modalities(config, data),
                        self.model_options(config))
