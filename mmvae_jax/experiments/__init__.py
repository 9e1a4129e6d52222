"""Experiments by name: which data fill which modalities, their networks and λ, and the
paper's reference numbers where they exist.

    from mmvae_jax import experiments
    exp = experiments.get("three_digits")
    data = exp.build_data(config)                      # train / test sets, description
    model = exp.build_model(config, data)              # any registered model

An experiment is an `Experiment` (`base`); `digits` defines "mnist_svhn" and "three_digits",
`cub` defines "cub", `polymnist` "polymnist". Adding one is a subclass instance and a line in `EXPERIMENTS`.
"""
from __future__ import annotations

from mmvae_jax.experiments.base import Data, Experiment
from mmvae_jax.experiments import digits


def _polymnist():
  from mmvae_jax.experiments import polymnist
  return polymnist.POLYMNIST


def _cub():
  from mmvae_jax.experiments import cub
  return cub.CUB


EXPERIMENTS = {
    "mnist_svhn": lambda: digits.MNIST_SVHN,
    "three_digits": lambda: digits.THREE_DIGITS,
    "cub": _cub,
    "polymnist": _polymnist,
}


def get(name: str) -> Experiment:
  """The experiment `name` (ValueError naming the choices when unknown)."""
  if name not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)}")
  return EXPERIMENTS[name]()


__all__ = ["Data", "EXPERIMENTS", "Experiment", "get"]
